//! A saved segment as a dataset version holds it: its definition, its materialized members, and
//! what the definition reads, so that a write can tell which segments it may change.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::change::SegmentDefinition;
use super::error::{EngineError, Result};
use crate::expr::{Expr, Predicate};
use crate::index::keys::DenseId;
use crate::index::layered::LayeredBitmap;
use crate::index::Bitmap;

/// A saved segment and its materialized members.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Shared between versions: a write that changes the members does not copy it.
    pub definition: Arc<SegmentDefinition>,
    /// Kept current on every write; a subset of the live users. Layered, so that a write
    /// copies only what changed.
    members: LayeredBitmap,
    /// The segment's bit in the dataset's membership index.
    pub(super) slot: usize,
    /// What the definition reads, so that a write skips segments it cannot change.
    pub(super) reads: Arc<SegmentReads>,
}

impl Segment {
    /// A segment of `definition` holding `members` in `slot`.
    pub fn new(definition: SegmentDefinition, members: Arc<Bitmap>, slot: usize) -> Self {
        Self {
            reads: Arc::new(SegmentReads::of(&definition.expression)),
            definition: Arc::new(definition),
            members: LayeredBitmap::new(members),
            slot,
        }
    }

    /// Current members.
    pub fn size(&self) -> u64 {
        self.members.len()
    }

    /// Current members as one set (built once per version when recent writes changed them).
    pub fn members(&self) -> Arc<Bitmap> {
        self.members.whole()
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: DenseId) -> bool {
        self.members.contains(id)
    }

    /// The members among `ids`.
    pub fn members_among(&self, ids: &Bitmap) -> Bitmap {
        self.members.intersect(ids)
    }

    /// Records users entering (not members yet) and leaving (members).
    pub(super) fn update_members(&mut self, entered: &Bitmap, left: &Bitmap) {
        self.members.update(entered, left);
    }

    /// Replaces the members with a set evaluated anew.
    pub(super) fn replace_members(&mut self, members: Arc<Bitmap>) {
        self.members = LayeredBitmap::new(members);
    }
}

/// What a segment's definition reads, computed once when it is defined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentReads {
    attributes: BTreeSet<String>,
    events: BTreeSet<String>,
    segments: BTreeSet<String>,
    /// The definition has a DID, a `NOW` bound or a SEGMENT reference: its members at an
    /// `as_of` other than the server's clock may differ from the materialized ones.
    anchored_in_time: bool,
    /// [`signature`] of the attributes and events: a write whose signature shares no bit with
    /// it reads none of them, found without comparing names (a write asks every segment).
    signature: u64,
}

/// One bit per attribute name and one per event name (by hash), OR-ed: disjoint signatures
/// mean disjoint names.
pub fn signature<'a>(
    attributes: impl IntoIterator<Item = &'a String>,
    events: impl IntoIterator<Item = &'a String>,
) -> u64 {
    let bit = |kind: u8, name: &str| {
        // FNV-1a: small, deterministic, good enough to spread names over 64 bits.
        let hash = std::iter::once(kind)
            .chain(name.bytes())
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        1u64 << (hash % 64)
    };
    let attributes = attributes.into_iter().map(|a| bit(b'a', a));
    let events = events.into_iter().map(|e| bit(b'e', e));
    attributes.chain(events).fold(0, |all, b| all | b)
}

impl SegmentReads {
    /// The attributes, event names and segments `expression` reads.
    pub fn of(expression: &Expr) -> Self {
        let mut reads = SegmentReads::default();
        for predicate in expression.predicates() {
            match predicate {
                Predicate::Equals { attribute, .. }
                | Predicate::In { attribute, .. }
                | Predicate::Has { attribute, .. }
                | Predicate::HasAny { attribute, .. }
                | Predicate::HasAll { attribute, .. }
                | Predicate::Compare { attribute, .. }
                | Predicate::Between { attribute, .. }
                | Predicate::IsNull { attribute, .. } => {
                    reads.attributes.insert(attribute.clone());
                }
                Predicate::Segment { id } => {
                    reads.segments.insert(id.clone());
                }
                Predicate::Did { event, .. } => {
                    reads.events.insert(event.clone());
                }
            }
        }
        reads.signature = signature(&reads.attributes, &reads.events);
        reads.anchored_in_time = !reads.segments.is_empty()
            || expression
                .predicates()
                .into_iter()
                .any(super::events::is_time_relative);
        reads
    }

    /// Whether the members may depend on `as_of` (see the field's comment).
    pub fn anchored_in_time(&self) -> bool {
        self.anchored_in_time
    }

    /// Whether the definition reads one of `attributes` or `events` (whose [`signature`] is
    /// `written_signature`), or a segment of `changed`.
    pub fn reads_any(
        &self,
        attributes: &BTreeSet<String>,
        events: &BTreeSet<String>,
        written_signature: u64,
        changed: &BTreeSet<&str>,
    ) -> bool {
        if self.signature & written_signature == 0 {
            return !changed.is_empty()
                && self.segments.iter().any(|s| changed.contains(s.as_str()));
        }
        !self.attributes.is_disjoint(attributes)
            || !self.events.is_disjoint(events)
            || self.segments.iter().any(|s| changed.contains(s.as_str()))
    }
}

/// Checks a segment id: `[A-Za-z0-9_.:-]{1,128}`.
///
/// # Errors
/// Any other id.
pub fn validate_segment_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if valid {
        Ok(())
    } else {
        Err(EngineError::InvalidSegmentId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The signature only skips the name comparison: the answer is the exact one, collisions
    /// (64 bits for 80 names here) included.
    #[test]
    fn reads_any_is_exact_whatever_the_signatures() {
        let mut rng = SplitMix64::new(3);
        let names: Vec<String> = (0..40).map(|i| format!("name_{i}")).collect();
        let pick = |rng: &mut SplitMix64| -> BTreeSet<String> {
            (0..rng.below(4))
                .map(|_| names[rng.below(40) as usize].clone())
                .collect()
        };
        for _ in 0..2_000 {
            let reads = SegmentReads {
                attributes: pick(&mut rng),
                events: pick(&mut rng),
                ..SegmentReads::default()
            };
            let reads = SegmentReads {
                signature: signature(&reads.attributes, &reads.events),
                ..reads
            };
            let (attributes, events) = (pick(&mut rng), pick(&mut rng));
            let exact =
                !reads.attributes.is_disjoint(&attributes) || !reads.events.is_disjoint(&events);
            let written = signature(&attributes, &events);
            assert_eq!(
                reads.reads_any(&attributes, &events, written, &BTreeSet::new()),
                exact
            );
        }
    }
}
