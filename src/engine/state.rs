//! One version of one dataset, and how a [`Change`] turns it into the next version.
//!
//! A `DatasetState` clones shallowly; the engine clones the published version, applies a change
//! to the clone and publishes it only if every part succeeded, so a failed write leaves nothing
//! behind and readers never see half of one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use super::change::{
    AttributeChange, AttributeValue, Change, ChangeOp, ChangeOutcome, SegmentDefinition, UserUpdate,
};
use super::error::{EngineError, Result};
use super::eval::Scope;
use super::maintenance::{SegmentReads, Written};
use super::plan::Binder;
use crate::index::events::EventStore;
use crate::index::keys::DenseId;
use crate::index::membership::MembershipIndex;
use crate::index::{Attribute, AttributeKind, Bitmap, KeyDictionary};
use crate::persist::Position;
use crate::time::{parse_rfc3339, Millis};

/// A saved segment and its materialized members.
#[derive(Debug, Clone)]
pub struct Segment {
    pub definition: SegmentDefinition,
    /// Kept current on every write; a subset of the live users.
    pub members: Arc<Bitmap>,
    /// The segment's bit in [`DatasetState::membership`].
    pub slot: usize,
    /// What the definition reads, so that a write skips segments it cannot change.
    pub reads: Arc<SegmentReads>,
}

impl Segment {
    /// A segment of `definition` holding `members` in `slot`.
    pub fn new(definition: SegmentDefinition, members: Arc<Bitmap>, slot: usize) -> Self {
        Self {
            reads: Arc::new(SegmentReads::of(&definition.expression)),
            definition,
            members,
            slot,
        }
    }

    /// Current members.
    pub fn size(&self) -> u64 {
        self.members.len()
    }
}

/// A consistent version of one dataset.
#[derive(Debug, Clone, Default)]
pub struct DatasetState {
    /// External ids ↔ dense ids.
    pub keys: KeyDictionary,
    /// Users that exist; `NOT` complements within this set.
    pub live: Arc<Bitmap>,
    /// Attribute name → storage.
    pub attributes: BTreeMap<String, Arc<Attribute>>,
    /// Segment id → definition and members.
    pub segments: BTreeMap<String, Arc<Segment>>,
    /// Every user's segments, mirrored from `segments` for per-user lookups.
    pub membership: MembershipIndex,
    /// Behaviour events by name and day.
    pub events: EventStore,
    /// Days of events kept; `None` is the default.
    pub retention_days: Option<u32>,
    /// When time-driven segment changes were last brought up to date; `None` before the first.
    pub time_refreshed_at: Option<Millis>,
    /// Bumped by every applied change; names this version.
    pub version: u64,
    /// The log record this version is the result of ([`Position::START`] in memory only), so
    /// that replay after a snapshot skips what the snapshot holds.
    pub log_position: Position,
    /// [`DatasetState::segment_order`], computed once per set of definitions; reset wherever
    /// a definition is added, replaced or removed.
    pub order_cache: OnceLock<Arc<[String]>>,
    /// Membership changes made by the change being applied, in order; the engine takes them
    /// (leaving this empty) before it publishes the version, to feed watchers.
    pub transitions: Vec<SegmentTransition>,
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
            let after = segment.members.clone();
            let was = before.segments.get(id).map_or(&empty, |s| &*s.members);
            self.record_transition(id, &(&*after - was), &(was - &*after));
        }
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

/// The longest chain of SEGMENT references (a segment naming one naming one ...).
const MAX_REFERENCE_DEPTH: usize = 32;

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
    /// Applies one change at time `now` (which anchors `NOW` in segment maintenance).
    ///
    /// # Errors
    /// Any invalid part; the state is then partly changed and must be discarded.
    pub fn apply(&mut self, change: &Change, now: Millis) -> Result<ChangeOutcome> {
        let outcome = match change {
            Change::UpsertUsers(updates) => {
                let (outcome, touched) = self.upsert_users(updates)?;
                let written = if outcome.created > 0 {
                    Written::Anything
                } else {
                    Written::attributes(
                        updates
                            .iter()
                            .flat_map(|u| &u.changes)
                            .map(|c| c.attribute.as_str()),
                    )
                };
                self.after_user_writes(&touched, &written, now)?;
                outcome
            }
            Change::DeleteUsers(user_ids) => {
                let (outcome, touched) = self.delete_users(user_ids);
                self.after_user_writes(&touched, &Written::Deleted, now)?;
                outcome
            }
            Change::ImportUsers(batch) => {
                let (outcome, touched) = super::import::apply_batch(self, batch)?;
                self.after_user_writes(&touched, &Written::Anything, now)?;
                outcome
            }
            Change::DeclareAttributes(declarations) => {
                for (name, kind) in declarations {
                    self.attribute_mut(name, *kind)?;
                }
                ChangeOutcome::default()
            }
            Change::CreateSegment(definition) => {
                if self.segments.contains_key(&definition.id) {
                    return Err(EngineError::SegmentExists(definition.id.clone()));
                }
                self.put_segment(definition.clone(), now)?;
                ChangeOutcome::default()
            }
            Change::UpdateSegment(definition) => {
                let existing = self.segment(&definition.id)?;
                let definition = SegmentDefinition {
                    created_at: existing.definition.created_at,
                    ..definition.clone()
                };
                self.put_segment(definition, now)?;
                ChangeOutcome::default()
            }
            Change::DeleteSegment(id) => {
                self.delete_segment(id)?;
                ChangeOutcome::default()
            }
            Change::RecordEvents(events) => {
                let (outcome, touched) = self.record_events(events, now)?;
                let written = if outcome.created > 0 {
                    Written::Anything
                } else {
                    Written::events(events.iter().map(|e| e.event.as_str()))
                };
                self.after_user_writes(&touched, &written, now)?;
                outcome
            }
            Change::AdvanceTime => {
                self.advance_time(now)?;
                ChangeOutcome::default()
            }
            Change::SetRetention { days } => {
                if *days == 0 {
                    return Err(EngineError::InvalidArgument {
                        field: "retention_days",
                        reason: "must be at least 1".into(),
                    });
                }
                self.retention_days = Some(*days);
                self.events
                    .lower_cutoff(now.saturating_sub(self.retention_ms()));
                self.advance_time(now)?;
                ChangeOutcome::default()
            }
        };
        self.version += 1;
        Ok(outcome)
    }

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

    fn upsert_users(&mut self, updates: &[UserUpdate]) -> Result<(ChangeOutcome, Bitmap)> {
        let mut outcome = ChangeOutcome::default();
        let mut touched = Bitmap::new();
        for (index, update) in updates.iter().enumerate() {
            let created = self.upsert_user(update, &mut touched).map_err(|reason| {
                EngineError::InvalidRecord {
                    index,
                    user_id: update.user_id.clone(),
                    reason: Box::new(reason),
                }
            })?;
            if created {
                outcome.created += 1;
            } else {
                outcome.updated += 1;
            }
        }
        Ok((outcome, touched))
    }

    fn upsert_user(&mut self, update: &UserUpdate, touched: &mut Bitmap) -> Result<bool> {
        let (id, created) = self.user_mut(&update.user_id)?;
        touched.insert(id);
        for change in &update.changes {
            self.apply_attribute_change(id, change)?;
        }
        Ok(created)
    }

    fn apply_attribute_change(&mut self, id: DenseId, change: &AttributeChange) -> Result<()> {
        let name = change.attribute.as_str();
        match &change.op {
            ChangeOp::Clear => {
                let attribute = self
                    .attributes
                    .get_mut(name)
                    .ok_or_else(|| EngineError::UnknownAttribute(name.to_owned()))?;
                Arc::make_mut(attribute).clear(id);
            }
            ChangeOp::Add(values) | ChangeOp::Remove(values) => {
                let adding = matches!(change.op, ChangeOp::Add(_));
                let kind = self
                    .attributes
                    .get(name)
                    .map_or(AttributeKind::Set, |a| a.kind());
                let Attribute::Set(set) = self.attribute_mut(name, kind)? else {
                    return Err(EngineError::kind_mismatch(
                        name,
                        kind,
                        "members can be added and removed only on set attributes",
                    ));
                };
                let values = values.iter().map(String::as_str);
                if adding {
                    set.add(id, values);
                } else {
                    set.remove(id, values);
                }
            }
            ChangeOp::Set(value) => {
                let kind = self
                    .attributes
                    .get(name)
                    .map_or_else(|| value.natural_kind(), |a| a.kind());
                set_value(self.attribute_mut(name, kind)?, name, id, value)?;
            }
        }
        Ok(())
    }

    fn delete_users(&mut self, user_ids: &[String]) -> (ChangeOutcome, Bitmap) {
        let mut outcome = ChangeOutcome::default();
        let mut touched = Bitmap::new();
        let unique: std::collections::BTreeSet<&String> = user_ids.iter().collect();
        for user_id in unique {
            match self.keys.remove(user_id) {
                Some(id) if touched.insert(id) => {
                    for attribute in self.attributes.values_mut() {
                        Arc::make_mut(attribute).clear(id);
                    }
                    Arc::make_mut(&mut self.live).remove(id);
                    outcome.deleted += 1;
                }
                Some(_) => {}
                None => outcome.not_found += 1,
            }
        }
        self.events.remove_users(&touched);
        (outcome, touched)
    }

    fn put_segment(&mut self, definition: SegmentDefinition, now: Millis) -> Result<()> {
        validate_segment_id(&definition.id)?;
        self.check_references(&definition)?;
        let plan = Binder::new(self, now).bind(&definition.expression)?;
        let members = plan.select(Scope::All(&self.live));
        let id = definition.id.clone();
        let (slot, old) = match self.segments.get(&id) {
            Some(existing) => (existing.slot, existing.members.clone()),
            None => (self.membership.add_segment(&id), Arc::new(Bitmap::new())),
        };
        let (entered, left) = (&members - &*old, &*old - &members);
        self.membership.update(slot, &entered, &left);
        self.record_transition(&id, &entered, &left);
        self.segments.insert(
            id.clone(),
            Arc::new(Segment::new(definition, Arc::new(members), slot)),
        );
        self.order_cache = OnceLock::new();
        let dependents: Vec<String> = self
            .segment_order()
            .iter()
            .filter(|other| **other != id && self.depends_on(other, &id))
            .cloned()
            .collect();
        self.refresh_segments(&dependents, None, &Written::Anything, now)
    }

    /// Unknown references and cycles through the new definition.
    fn check_references(&self, definition: &SegmentDefinition) -> Result<()> {
        for reference in definition.expression.segment_refs() {
            if reference == definition.id {
                return Err(EngineError::SegmentCycle(vec![
                    definition.id.clone(),
                    definition.id.clone(),
                ]));
            }
            if !self.segments.contains_key(reference) {
                return Err(EngineError::SegmentNotFound(reference.to_owned()));
            }
            if let Some(mut path) = self.path_to(reference, &definition.id) {
                path.insert(0, definition.id.clone());
                return Err(EngineError::SegmentCycle(path));
            }
        }
        // Chains of references are walked recursively (ordering, dependents): bound them, with
        // the new definition in place, so no chain can exhaust a thread's stack.
        let mut memo = BTreeMap::new();
        let deepest = self
            .segments
            .keys()
            .map(String::as_str)
            .chain([definition.id.as_str()])
            .map(|id| self.reference_depth(id, definition, &mut memo))
            .max()
            .unwrap_or(0);
        if deepest > MAX_REFERENCE_DEPTH {
            return Err(EngineError::LimitExceeded {
                what: "the depth of SEGMENT references",
                actual: deepest as u64,
                limit: MAX_REFERENCE_DEPTH as u64,
            });
        }
        Ok(())
    }

    /// How many SEGMENT references deep `id` goes, reading `replacing` for its own id. Cycles
    /// are refused before this runs, and every stored chain is within the limit, so the
    /// recursion is at most about twice the limit deep.
    fn reference_depth<'a>(
        &'a self,
        id: &'a str,
        replacing: &'a SegmentDefinition,
        memo: &mut BTreeMap<&'a str, usize>,
    ) -> usize {
        if let Some(&depth) = memo.get(id) {
            return depth;
        }
        let expression = if id == replacing.id {
            Some(&replacing.expression)
        } else {
            self.segments.get(id).map(|s| &s.definition.expression)
        };
        let depth = expression.map_or(0, |e| {
            e.segment_refs()
                .into_iter()
                .map(|r| 1 + self.reference_depth(r, replacing, memo))
                .max()
                .unwrap_or(0)
        });
        memo.insert(id, depth);
        depth
    }

    /// A reference path from `from` to `target` through saved segments, if one exists.
    fn path_to(&self, from: &str, target: &str) -> Option<Vec<String>> {
        let mut stack = vec![(from.to_owned(), vec![from.to_owned()])];
        let mut seen = BTreeSet::new();
        while let Some((id, path)) = stack.pop() {
            if id == target {
                return Some(path);
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(segment) = self.segments.get(&id) {
                for next in segment.definition.expression.segment_refs() {
                    let mut longer = path.clone();
                    longer.push(next.to_owned());
                    stack.push((next.to_owned(), longer));
                }
            }
        }
        None
    }

    fn depends_on(&self, id: &str, dependency: &str) -> bool {
        self.segments.get(id).is_some_and(|segment| {
            segment
                .definition
                .expression
                .segment_refs()
                .into_iter()
                .any(|r| r != id && self.path_to(r, dependency).is_some())
        })
    }

    fn delete_segment(&mut self, id: &str) -> Result<()> {
        if !self.segments.contains_key(id) {
            return Err(EngineError::SegmentNotFound(id.to_owned()));
        }
        let referenced_by: Vec<String> = self
            .segments
            .iter()
            .filter(|(_, s)| s.definition.expression.segment_refs().contains(&id))
            .map(|(other, _)| other.clone())
            .collect();
        if !referenced_by.is_empty() {
            return Err(EngineError::SegmentInUse {
                segment: id.to_owned(),
                referenced_by,
            });
        }
        if let Some(segment) = self.segments.remove(id) {
            self.order_cache = OnceLock::new();
            self.membership
                .remove_segment(segment.slot, &segment.members);
            // Recorded even when the segment was empty: watchers learn of the deletion.
            self.transitions.push(SegmentTransition {
                segment: id.to_owned(),
                entered: Bitmap::new(),
                left: Bitmap::clone(&segment.members),
                deleted: true,
            });
        }
        Ok(())
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

/// Writes one value into an attribute of a known kind, converting where it is lossless.
fn set_value(
    attribute: &mut Attribute,
    name: &str,
    id: DenseId,
    value: &AttributeValue,
) -> Result<()> {
    let kind = attribute.kind();
    let mismatch = |what: &str| {
        Err(EngineError::kind_mismatch(
            name,
            kind,
            format!("got {what}"),
        ))
    };
    match (attribute, value) {
        (Attribute::Categorical(a), AttributeValue::String(s)) => a.set(id, s),
        (Attribute::Set(a), AttributeValue::Set(values)) => {
            a.set(id, values.iter().map(String::as_str))
        }
        (Attribute::Boolean(a), AttributeValue::Bool(b)) => a.set(id, *b),
        (Attribute::Integer(a), AttributeValue::Int(i)) => a.set(id, *i),
        (Attribute::Float(a), AttributeValue::Float(f)) => a.set(id, checked_float(name, *f)?),
        (Attribute::Float(a), AttributeValue::Int(i)) => a.set(id, *i as f64),
        (Attribute::Timestamp(a), AttributeValue::Timestamp(ms) | AttributeValue::Int(ms)) => {
            a.set(id, *ms)
        }
        (Attribute::Timestamp(a), AttributeValue::String(s)) => a.set(id, parse_rfc3339(s)?),
        (_, AttributeValue::String(_)) => return mismatch("a string"),
        (_, AttributeValue::Set(_)) => return mismatch("a list of strings"),
        (_, AttributeValue::Bool(_)) => return mismatch("a boolean"),
        (_, AttributeValue::Int(_)) => return mismatch("an integer"),
        (_, AttributeValue::Float(_)) => return mismatch("a float"),
        (_, AttributeValue::Timestamp(_)) => return mismatch("a timestamp"),
    }
    Ok(())
}

/// A float fit for a column: finite, with -0.0 folded into 0.0 so equality is plain.
///
/// # Errors
/// NaN and infinities, which no range could select consistently.
pub fn checked_float(name: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value + 0.0)
    } else {
        Err(EngineError::kind_mismatch(
            name,
            AttributeKind::Float,
            format!("{value} is not a finite number"),
        ))
    }
}
