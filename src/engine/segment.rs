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
        reads
    }

    /// Whether the definition reads one of `attributes` or `events`, or a segment of `changed`.
    pub fn reads_any(
        &self,
        attributes: &BTreeSet<String>,
        events: &BTreeSet<String>,
        changed: &BTreeSet<&str>,
    ) -> bool {
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
