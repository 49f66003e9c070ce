//! Saved segment definitions: creating, replacing and deleting them, with the checks that keep
//! the graph of SEGMENT references acyclic and shallow.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::change::{Change, SegmentDefinition, SegmentPatch};
use super::error::{EngineError, Result};
use super::eval::Scope;
use super::limits::Limits;
use super::maintenance::Written;
use super::plan::Binder;
use super::segment::{validate_segment_id, Segment};
use super::state::DatasetState;
use crate::index::Bitmap;
use crate::time::Millis;

/// The longest chain of SEGMENT references (a segment naming one naming one ...).
const MAX_REFERENCE_DEPTH: usize = 32;

impl Change {
    /// The change as it applies to `base`, the version under the dataset's writer lock: a
    /// patch merged with the segment it patches, and a new segment counted against
    /// `max_segments`. Checked there, concurrent writers cannot both pass on one old version.
    ///
    /// # Errors
    /// A patch of an unknown segment; one segment too many.
    pub(super) fn resolve(&self, base: &DatasetState, limits: &Limits) -> Result<Change> {
        match self {
            Change::PatchSegment(patch) => Ok(Change::UpdateSegment(merge(base, patch)?)),
            Change::CreateSegment(definition)
                if !base.segments.contains_key(&definition.id)
                    && base.segments.len() >= limits.max_segments =>
            {
                Err(EngineError::LimitExceeded {
                    what: "the number of segments",
                    actual: base.segments.len() as u64 + 1,
                    limit: limits.max_segments as u64,
                })
            }
            other => Ok(other.clone()),
        }
    }
}

/// The definition `patch` makes of the segment's current one.
fn merge(base: &DatasetState, patch: &SegmentPatch) -> Result<SegmentDefinition> {
    let current = &base.segment(&patch.id)?.definition;
    let mut labels = match patch.replace_labels {
        true => BTreeMap::new(),
        false => current.labels.clone(),
    };
    labels.extend(patch.labels.clone());
    Ok(SegmentDefinition {
        id: current.id.clone(),
        name: patch.name.clone().unwrap_or_else(|| current.name.clone()),
        description: patch
            .description
            .clone()
            .unwrap_or_else(|| current.description.clone()),
        labels,
        expression: patch
            .expression
            .clone()
            .unwrap_or_else(|| current.expression.clone()),
        created_at: current.created_at,
        updated_at: patch.updated_at,
    })
}

impl DatasetState {
    pub(super) fn put_segment(&mut self, definition: SegmentDefinition, now: Millis) -> Result<()> {
        validate_segment_id(&definition.id)?;
        self.check_references(&definition)?;
        let plan = Binder::new(self, now).bind(&definition.expression)?;
        let members = plan.select(Scope::All(&self.live));
        let id = definition.id.clone();
        let (slot, old) = match self.segments.get(&id) {
            Some(existing) => (existing.slot, existing.members()),
            None => (self.membership.add_segment(&id), Arc::new(Bitmap::new())),
        };
        let (entered, left) = (&members - &*old, &*old - &members);
        self.membership.update(slot, &entered, &left);
        self.record_transition(&id, &entered, &left);
        self.segments.insert(
            id.clone(),
            Arc::new(Segment::new(definition, Arc::new(members), slot)),
        );
        self.definitions_changed();
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

    pub(super) fn delete_segment(&mut self, id: &str) -> Result<()> {
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
            self.definitions_changed();
            self.membership
                .remove_segment(segment.slot, &segment.members());
            self.record_deletion(id, &segment.members());
        }
        Ok(())
    }
}
