//! Keeping saved segments current after a write: which segments a write can change, and
//! re-evaluating only those, only for the users it touched.
//!
//! A single-user write into a dataset with a thousand segments must cost what it touches: a
//! segment that reads none of the written attributes or events keeps its members as they are
//! (no evaluation, no copy of its bitmap), and one whose members did not change is not copied.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::error::Result;
use super::eval::Scope;
use super::plan::Binder;
use super::segment::{signature, SegmentReads};
use super::state::DatasetState;
use crate::index::Bitmap;
use crate::time::Millis;

/// Up to this many touched users are evaluated row by row ([`crate::engine::plan::Plan::matches`])
/// rather than as sets.
const ROW_WISE_USERS: u64 = 64;

/// What a write changed about the users it touched, so that segment maintenance re-evaluates
/// only the segments that read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Anything about them may have changed (users created, imported; time moved on): every
    /// segment is evaluated for them.
    Anything,
    /// Only these attributes and event names of users that already existed.
    Only {
        attributes: BTreeSet<String>,
        events: BTreeSet<String>,
    },
    /// The users were deleted: they leave every segment, and nothing needs evaluating.
    Deleted,
}

impl DatasetState {
    /// Rebalances range indexes and brings every segment up to date for `touched` users.
    ///
    /// # Errors
    /// A segment that no longer binds (which writes prevent).
    pub(super) fn after_user_writes(
        &mut self,
        touched: &Bitmap,
        written: &Written,
        now: Millis,
    ) -> Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        for attribute in self.attributes.values_mut() {
            if attribute.needs_rebalance() {
                Arc::make_mut(attribute).rebalance();
            }
        }
        let order = self.segment_order();
        self.refresh_segments(&order, Some(touched), written, now)
    }

    /// Re-evaluates the segments of `order` (dependencies first) that `written` can change, for
    /// `touched` users, or fully when `None`.
    ///
    /// # Errors
    /// As [`DatasetState::after_user_writes`].
    pub(super) fn refresh_segments(
        &mut self,
        order: &[String],
        touched: Option<&Bitmap>,
        written: &Written,
        now: Millis,
    ) -> Result<()> {
        // Evaluating a large batch within itself costs more than evaluating once over everyone.
        let touched = touched.filter(|t| t.len().saturating_mul(2) < self.live.len());
        let scope_users = touched.map(|t| t & &*self.live);
        let written_signature = match written {
            Written::Only { attributes, events } => signature(attributes, events),
            Written::Anything | Written::Deleted => u64::MAX,
        };
        let mut changed: BTreeSet<&str> = BTreeSet::new();
        for id in order {
            let Some(segment) = self.segments.get(id) else {
                continue;
            };
            if !affected(&segment.reads, written, written_signature, &changed) {
                continue;
            }
            let slot = segment.slot;
            let (members, entered, left) = match (touched, &scope_users) {
                (Some(touched), _) if *written == Written::Deleted => {
                    (None, Bitmap::new(), segment.members_among(touched))
                }
                (Some(touched), Some(scope)) => {
                    let plan = Binder::new(self, now).bind(&segment.definition.expression)?;
                    let entering = if scope.len() <= ROW_WISE_USERS {
                        scope.iter().filter(|&id| plan.matches(id)).collect()
                    } else {
                        plan.select(Scope::Within(scope))
                    };
                    let was = segment.members_among(touched);
                    (None, &entering - &was, &was - &entering)
                }
                _ => {
                    let plan = Binder::new(self, now).bind(&segment.definition.expression)?;
                    let members = plan.select(Scope::All(&self.live));
                    let old = segment.members();
                    let entered = &members - &*old;
                    let left = &*old - &members;
                    (Some(members), entered, left)
                }
            };
            if entered.is_empty() && left.is_empty() {
                continue;
            }
            self.membership.update(slot, &entered, &left);
            self.record_transition(id, &entered, &left);
            if let Some(segment) = self.segments.get_mut(id) {
                let segment = Arc::make_mut(segment);
                match members {
                    Some(members) => segment.replace_members(Arc::new(members)),
                    None => segment.update_members(&entered, &left),
                }
            }
            changed.insert(id);
        }
        Ok(())
    }
}

/// Whether a write of `written`, which changed the members of the segments in `changed`, can
/// change the members of a segment that reads `reads`.
fn affected(
    reads: &SegmentReads,
    written: &Written,
    written_signature: u64,
    changed: &BTreeSet<&str>,
) -> bool {
    match written {
        Written::Anything | Written::Deleted => true,
        Written::Only { attributes, events } => {
            reads.reads_any(attributes, events, written_signature, changed)
        }
    }
}
