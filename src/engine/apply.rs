//! How a [`Change`] turns one dataset version into the next: user writes, deletes, and the
//! dispatch of every other kind of change to the file that owns it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::change::{
    checked_float, exact_float, AttributeChange, AttributeValue, Change, ChangeOp, ChangeOutcome,
    SegmentDefinition, UserUpdate,
};
use super::error::{EngineError, Result};
use super::maintenance::Written;
use super::state::DatasetState;
use crate::index::events::EventBatch;
use crate::index::keys::DenseId;
use crate::index::{Attribute, AttributeKind, Bitmap};
use crate::time::{parse_rfc3339, Millis};

impl DatasetState {
    /// Applies one change at time `now` (which anchors `NOW` in segment maintenance).
    ///
    /// # Errors
    /// Any invalid part; the state is then partly changed and must be discarded.
    pub fn apply(&mut self, change: &Change, now: Millis) -> Result<ChangeOutcome> {
        let outcome = match change {
            Change::UpsertUsers(_) | Change::DeleteUsers(_) | Change::RecordEvents(_) => {
                let mut outcomes = self
                    .apply_user_writes(&[change], now)
                    .map_err(|(_, error)| error)?;
                return Ok(outcomes.pop().unwrap_or_default());
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
            Change::PatchSegment(patch) => {
                return Err(EngineError::Internal(format!(
                    "the update of segment '{}' was applied before it was resolved",
                    patch.id
                )))
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

    /// Applies user writes (upserts, deletes, events) as one version: each change's data in
    /// order, then one pass of segment maintenance over every user they touched. Coalescing the
    /// single-user writes queued on a dataset this way costs one segment pass instead of one
    /// each, and gives the same version as applying them one by one: a user's memberships
    /// depend only on the user's final data and `now`.
    ///
    /// # Errors
    /// The position of the first change that fails, and its error; the state is then partly
    /// changed and must be discarded.
    pub fn apply_user_writes(
        &mut self,
        changes: &[&Change],
        now: Millis,
    ) -> std::result::Result<Vec<ChangeOutcome>, (usize, EngineError)> {
        let bound = self.keys.id_bound();
        let mut touched = Touched::default();
        let mut staged = EventBatch::new();
        let mut outcomes = Vec::with_capacity(changes.len());
        for (index, change) in changes.iter().enumerate() {
            let outcome = self
                .stage_user_write(change, now, &mut staged, &mut touched)
                .map_err(|error| (index, error))?;
            outcomes.push(outcome);
        }
        self.events.add(staged);
        let last = changes.len().saturating_sub(1);
        self.maintain(touched, bound, now).map_err(|e| (last, e))?;
        self.version += 1;
        Ok(outcomes)
    }

    /// One user write's data; events are staged in `staged` for one store update.
    fn stage_user_write(
        &mut self,
        change: &Change,
        now: Millis,
        staged: &mut EventBatch,
        touched: &mut Touched,
    ) -> Result<ChangeOutcome> {
        match change {
            Change::UpsertUsers(updates) => {
                let (outcome, users) = self.upsert_users(updates)?;
                touched.users |= users;
                let names = updates.iter().flat_map(|u| &u.changes);
                touched
                    .attributes
                    .extend(names.map(|c| c.attribute.clone()));
                Ok(outcome)
            }
            Change::DeleteUsers(user_ids) => {
                // Events staged for these users must be stored before their events go.
                self.events.add(std::mem::take(staged));
                let (outcome, users) = self.delete_users(user_ids);
                touched.deleted |= users;
                Ok(outcome)
            }
            Change::RecordEvents(events) => {
                let (outcome, users) = self.stage_events(events, now, staged)?;
                touched.users |= users;
                touched
                    .events
                    .extend(events.iter().map(|e| e.event.clone()));
                Ok(outcome)
            }
            _ => Err(EngineError::Internal(
                "only upserts, deletes and events are applied as user writes".into(),
            )),
        }
    }

    /// Brings segments up to date for the users of a group of writes: deleted users leave
    /// every segment, users created since `bound` are evaluated for every segment, and the
    /// others only for the segments that read what was written.
    fn maintain(&mut self, touched: Touched, bound: u64, now: Millis) -> Result<()> {
        if !touched.deleted.is_empty() {
            self.after_user_writes(&touched.deleted, &Written::Deleted, now)?;
        }
        let mut created = touched.users.clone();
        match DenseId::try_from(bound) {
            Ok(bound) => {
                created.remove_range(..bound);
            }
            Err(_) => created.clear(),
        }
        if !created.is_empty() {
            self.after_user_writes(&created, &Written::Anything, now)?;
        }
        let existing = &touched.users - &created;
        let written = Written::Only {
            attributes: touched.attributes,
            events: touched.events,
        };
        self.after_user_writes(&existing, &written, now)
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
        let unique: BTreeSet<&String> = user_ids.iter().collect();
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
        (Attribute::Float(a), AttributeValue::Int(i)) => a.set(id, exact_float(name, *i)?),
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

/// What a group of user writes touched, by what segment maintenance must re-evaluate.
#[derive(Debug, Default)]
struct Touched {
    /// Users created, updated or given events.
    users: Bitmap,
    /// The attributes and event names written for them.
    attributes: BTreeSet<String>,
    events: BTreeSet<String>,
    /// Users deleted.
    deleted: Bitmap,
}
