//! One version of one dataset: the data a query reads, behind methods.
//!
//! A `DatasetState` clones shallowly; the engine clones the published version, applies a change
//! to the clone ([`super::apply`]) and publishes it only if every part succeeded, so a failed
//! write leaves nothing behind and readers never see half of one. Its fields are visible to the
//! engine's files that implement writes, snapshots and queries, and to nothing outside `engine`:
//! callers read a version through the methods here and in [`super::query`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use super::error::{EngineError, Result};
use super::segment::Segment;
use crate::index::events::EventStore;
use crate::index::keys::DenseId;
use crate::index::membership::MembershipIndex;
use crate::index::{Attribute, AttributeKind, Bitmap, KeyDictionary};
use crate::persist::Position;
use crate::time::Millis;

/// A consistent version of one dataset.
#[derive(Debug, Clone, Default)]
pub struct DatasetState {
    /// External ids ↔ dense ids.
    pub(super) keys: KeyDictionary,
    /// Users that exist; `NOT` complements within this set.
    pub(super) live: Arc<Bitmap>,
    /// Attribute name → storage.
    pub(super) attributes: BTreeMap<String, Arc<Attribute>>,
    /// Segment id → definition and members.
    pub(super) segments: BTreeMap<String, Arc<Segment>>,
    /// Every user's segments, mirrored from `segments` for per-user lookups.
    pub(super) membership: MembershipIndex,
    /// Behaviour events by name and day.
    pub(super) events: EventStore,
    /// Days of events kept; `None` is the default.
    pub(super) retention_days: Option<u32>,
    /// When time-driven segment changes were last brought up to date; `None` before the first.
    pub(super) time_refreshed_at: Option<Millis>,
    /// Bumped by every applied change; names this version.
    pub(super) version: u64,
    /// The log record this version is the result of ([`Position::START`] in memory only), so
    /// that replay after a snapshot skips what the snapshot holds.
    pub(super) log_position: Position,
    /// [`DatasetState::segment_order`], computed once per set of definitions; reset wherever
    /// a definition is added, replaced or removed.
    order_cache: OnceLock<Arc<[String]>>,
    /// Membership changes made by the change being applied, in order; the engine takes them
    /// (leaving this empty) before it publishes the version, to feed watchers.
    transitions: Vec<SegmentTransition>,
}

/// Users that entered and left one saved segment in one change.
#[derive(Debug, Clone, Default)]
pub struct SegmentTransition {
    pub segment: String,
    pub entered: Bitmap,
    pub left: Bitmap,
    /// The change deleted the segment (`left` holds its last members), so that a watcher can
    /// end its stream instead of waiting for changes that will never come.
    pub deleted: bool,
}

impl DatasetState {
    /// Replaces the transitions recorded batch by batch (an import) with each segment's net
    /// change since `before`, so that a user who entered in one batch and left in a later one
    /// is not reported at all, and watchers get one entry per segment.
    pub fn net_transitions(&mut self, before: &DatasetState) {
        if self.transitions.is_empty() {
            return;
        }
        self.transitions.clear();
        let empty = Bitmap::new();
        for id in self.segment_order().iter() {
            let Some(segment) = self.segments.get(id) else {
                continue;
            };
            let after = segment.members();
            let was = before.segments.get(id).map(|s| s.members());
            let was = was.as_deref().unwrap_or(&empty);
            self.record_transition(id, &(&*after - was), &(was - &*after));
        }
    }

    /// Records that segment `id` was deleted, even when it was empty: watchers learn of it.
    pub(super) fn record_deletion(&mut self, id: &str, last_members: &Bitmap) {
        self.transitions.push(SegmentTransition {
            segment: id.to_owned(),
            entered: Bitmap::new(),
            left: last_members.clone(),
            deleted: true,
        });
    }

    pub(super) fn record_transition(&mut self, segment: &str, entered: &Bitmap, left: &Bitmap) {
        if entered.is_empty() && left.is_empty() {
            return;
        }
        self.transitions.push(SegmentTransition {
            segment: segment.to_owned(),
            entered: entered.clone(),
            left: left.clone(),
            deleted: false,
        });
    }
}

/// The longest attribute name accepted.
const MAX_ATTRIBUTE_NAME: usize = 128;

/// Checks an attribute name against the expression language's identifier rule.
///
/// # Errors
/// A name the text language could not refer to.
pub fn validate_attribute_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = name.len() <= MAX_ATTRIBUTE_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(EngineError::InvalidAttributeName(name.to_owned()))
    }
}

impl DatasetState {
    /// The attribute `name`, created with `kind` when new.
    ///
    /// # Errors
    /// An invalid name, or an existing attribute of another kind.
    pub fn attribute_mut(&mut self, name: &str, kind: AttributeKind) -> Result<&mut Attribute> {
        if !self.attributes.contains_key(name) {
            validate_attribute_name(name)?;
            self.attributes
                .insert(name.to_owned(), Arc::new(Attribute::new(kind)));
        }
        let attribute = self
            .attributes
            .get_mut(name)
            .ok_or_else(|| EngineError::UnknownAttribute(name.to_owned()))?;
        if attribute.kind() != kind {
            return Err(EngineError::KindConflict {
                attribute: name.to_owned(),
                existing: attribute.kind().name(),
                requested: kind.name(),
            });
        }
        Ok(Arc::make_mut(attribute))
    }

    /// The dense id of `user_id`, created (and made live) when new.
    ///
    /// # Errors
    /// An invalid or one-too-many user id.
    pub fn user_mut(&mut self, user_id: &str) -> Result<(DenseId, bool)> {
        let (id, created) = self.keys.get_or_insert(user_id)?;
        if created {
            Arc::make_mut(&mut self.live).insert(id);
        }
        Ok((id, created))
    }

    /// External ids and their dense ids.
    pub fn keys(&self) -> &KeyDictionary {
        &self.keys
    }

    /// The users that exist.
    pub fn live(&self) -> &Arc<Bitmap> {
        &self.live
    }

    /// Attributes by name.
    pub fn attributes(&self) -> &BTreeMap<String, Arc<Attribute>> {
        &self.attributes
    }

    /// Heap bytes of the index of which segments each user is in (beyond the segments' own
    /// member sets), for memory reports.
    pub fn membership_heap_bytes(&self) -> usize {
        self.membership.heap_bytes()
    }

    /// Saved segments by id.
    pub fn segments(&self) -> &BTreeMap<String, Arc<Segment>> {
        &self.segments
    }

    /// Behaviour events.
    pub fn events(&self) -> &EventStore {
        &self.events
    }

    /// Days of events kept, when set (`None`: the default).
    pub fn configured_retention(&self) -> Option<u32> {
        self.retention_days
    }

    /// When time-driven segment changes were last brought up to date.
    pub fn time_refreshed_at(&self) -> Option<Millis> {
        self.time_refreshed_at
    }

    /// Makes room for `users` more users, before a large import.
    pub fn reserve_users(&mut self, users: usize) {
        self.keys.reserve(users);
    }

    /// Bumped by every applied change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The log record this version is the result of.
    pub fn log_position(&self) -> Position {
        self.log_position
    }

    /// Takes the membership changes recorded since the last take, to feed watchers.
    pub fn take_transitions(&mut self) -> Vec<SegmentTransition> {
        std::mem::take(&mut self.transitions)
    }

    /// Forgets recorded membership changes (replay and catch-up have no watchers to feed).
    pub(super) fn clear_transitions(&mut self) {
        self.transitions.clear();
    }

    /// Drops the cached segment order; called wherever a definition is added, replaced or removed.
    pub(super) fn definitions_changed(&mut self) {
        self.order_cache = OnceLock::new();
    }

    /// Every segment id, each after the segments it references; computed once per set of
    /// definitions (every write walks it).
    pub fn segment_order(&self) -> Arc<[String]> {
        self.order_cache
            .get_or_init(|| {
                let mut order = Vec::with_capacity(self.segments.len());
                let mut seen = BTreeSet::new();
                for id in self.segments.keys() {
                    self.visit_segment(id, &mut seen, &mut order);
                }
                order.into()
            })
            .clone()
    }

    fn visit_segment(&self, id: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(id.to_owned()) {
            return;
        }
        if let Some(segment) = self.segments.get(id) {
            for dependency in segment.definition.expression.segment_refs() {
                self.visit_segment(dependency, seen, order);
            }
            order.push(id.to_owned());
        }
    }
}
