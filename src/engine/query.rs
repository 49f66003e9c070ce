//! Read-only questions over one snapshot: counts with breakdowns, samples, overlap, per-user
//! lookups and the schema.

use std::sync::Arc;

use super::error::{EngineError, Result};
use super::eval::Scope;
use super::plan::Binder;
use super::state::DatasetState;
use crate::expr::Expr;
use crate::expr::Predicate;
use crate::index::bitmap::{intersect_all, union_all};
use crate::index::keys::DenseId;
use crate::index::{Attribute, AttributeKind, Bitmap};
use crate::rng::SplitMix64;
use crate::time::Millis;

/// The instant a query anchors `NOW` and relative windows at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The server's clock: a saved segment is read from its materialized members (kept
    /// current by writes and the time refresh), at no evaluation cost.
    Now(Millis),
    /// An instant the caller chose: a saved segment whose members depend on time (a DID, a
    /// `NOW` bound, a SEGMENT reference) is evaluated there from its definition.
    At(Millis),
}

impl AsOf {
    pub fn millis(self) -> Millis {
        match self {
            AsOf::Now(at) | AsOf::At(at) => at,
        }
    }
}

/// A bare instant is one the caller chose.
impl From<Millis> for AsOf {
    fn from(at: Millis) -> Self {
        AsOf::At(at)
    }
}

/// Who to count or list: an expression, or a saved segment's materialized members.
#[derive(Debug, Clone, PartialEq)]
pub enum Audience {
    Expression(Expr),
    Segment(String),
}

/// A count, with an optional breakdown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CountResult {
    pub count: u64,
    /// `(value, users)`, largest first, at most the requested number.
    pub breakdown: Vec<(String, u64)>,
    /// Matching users with no value for the breakdown attribute.
    pub null_count: u64,
    /// Matching users holding a value left out of `breakdown`, each counted once (a user of a
    /// set attribute may hold several, and values in `breakdown` too).
    pub other_count: u64,
}

/// Overlap between audiences.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlapResult {
    pub sizes: Vec<u64>,
    /// `(i, j, |a_i ∩ a_j|)` for every `i < j`.
    pub pairs: Vec<(usize, usize, u64)>,
    pub intersection: u64,
    pub union: u64,
    /// `cumulative_reach[k] = |a_0 ∪ … ∪ a_k|`.
    pub cumulative_reach: Vec<u64>,
}

/// One attribute in the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeInfo {
    pub name: String,
    pub kind: AttributeKind,
    pub distinct_values: u64,
    pub null_count: u64,
}

impl DatasetState {
    /// The members of an audience, as a shared set.
    ///
    /// # Errors
    /// Unknown names and mismatched kinds in the expression; an unknown segment.
    pub fn select(&self, audience: &Audience, as_of: impl Into<AsOf>) -> Result<Arc<Bitmap>> {
        let as_of = as_of.into();
        if let Some(segment) = self.materialized(audience, as_of)? {
            return Ok(segment.members());
        }
        let plan = Binder::at(self, as_of).bind(&audience_expr(audience))?;
        Ok(Arc::new(plan.select(Scope::All(&self.live))))
    }

    /// The saved segment whose materialized members answer for `audience` at `as_of`.
    fn materialized(
        &self,
        audience: &Audience,
        as_of: AsOf,
    ) -> Result<Option<&Arc<super::segment::Segment>>> {
        let Audience::Segment(id) = audience else {
            return Ok(None);
        };
        let segment = self.segment(id)?;
        let exact = matches!(as_of, AsOf::Now(_)) || !segment.reads.anchored_in_time();
        Ok(exact.then_some(segment))
    }

    /// The number of members, without building the set where the plan allows.
    ///
    /// # Errors
    /// As [`DatasetState::select`].
    pub fn count(&self, audience: &Audience, as_of: impl Into<AsOf>) -> Result<u64> {
        let as_of = as_of.into();
        if let Some(segment) = self.materialized(audience, as_of)? {
            return Ok(segment.size());
        }
        let plan = Binder::at(self, as_of).bind(&audience_expr(audience))?;
        Ok(plan.count(Scope::All(&self.live)))
    }

    /// The count of an audience broken down by the values of one attribute.
    ///
    /// # Errors
    /// As [`DatasetState::select`], an unknown breakdown attribute, and a numeric one: every
    /// distinct amount or instant would be a value of its own.
    pub fn count_by(
        &self,
        audience: &Audience,
        as_of: impl Into<AsOf>,
        attribute: &str,
        limit: usize,
    ) -> Result<CountResult> {
        let attr = self
            .attributes
            .get(attribute)
            .ok_or_else(|| EngineError::UnknownAttribute(attribute.to_owned()))?;
        let value_sets = value_sets(attr).ok_or_else(|| EngineError::InvalidArgument {
            field: "breakdown_attribute",
            reason: format!(
                "'{attribute}' is {}: a breakdown counts users per value of a categorical, set \
                 or boolean attribute (count numeric ranges with one Count each)",
                attr.kind().name()
            ),
        })?;
        let members = self.select(audience, as_of)?;
        let mut counts: Vec<(String, u64, &Bitmap)> = value_sets
            .into_iter()
            .map(|(value, users)| (value, users.intersection_len(&members), users))
            .filter(|(_, n, _)| *n > 0)
            .collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let left_out = counts.split_off(limit.min(counts.len()));
        // Counted as users, not (user, value) pairs: a user of a set holds several values.
        let other_count =
            union_all(left_out.iter().map(|(_, _, users)| *users)).intersection_len(&members);
        let counts: Vec<(String, u64)> =
            counts.into_iter().map(|(value, n, _)| (value, n)).collect();
        Ok(CountResult {
            count: members.len(),
            breakdown: counts,
            null_count: members.len() - attr.present().intersection_len(&members),
            other_count,
        })
    }

    /// A saved segment.
    ///
    /// # Errors
    /// An unknown id.
    pub fn segment(&self, id: &str) -> Result<&Arc<super::segment::Segment>> {
        self.segments
            .get(id)
            .ok_or_else(|| EngineError::SegmentNotFound(id.to_owned()))
    }

    /// The external ids of dense ids (skipping any that are not live).
    pub fn external_ids(&self, ids: impl IntoIterator<Item = DenseId>) -> Vec<String> {
        ids.into_iter()
            .filter_map(|id| self.keys.key(id).map(str::to_owned))
            .collect()
    }

    /// Overlap between audiences: every pair, all of them, and cumulative reach in order.
    ///
    /// # Errors
    /// As [`DatasetState::select`] for any audience.
    pub fn overlap(&self, audiences: &[Audience], as_of: impl Into<AsOf>) -> Result<OverlapResult> {
        let as_of = as_of.into();
        let sets = audiences
            .iter()
            .map(|a| self.select(a, as_of))
            .collect::<Result<Vec<_>>>()?;
        let mut result = OverlapResult {
            sizes: sets.iter().map(|s| s.len()).collect(),
            ..Default::default()
        };
        for i in 0..sets.len() {
            for j in i + 1..sets.len() {
                result
                    .pairs
                    .push((i, j, sets[i].intersection_len(&sets[j])));
            }
        }
        result.intersection = intersect_all(sets.iter().map(|s| &**s)).len();
        let mut reach = Bitmap::new();
        for set in &sets {
            reach |= &**set;
            result.cumulative_reach.push(reach.len());
        }
        result.union = union_all(sets.iter().map(|s| &**s)).len();
        Ok(result)
    }

    /// The saved segments that contain a user, sorted by id; empty for an unknown user.
    pub fn segments_for_user(&self, user_id: &str) -> Vec<&str> {
        let Some(id) = self.live_id(user_id) else {
            return Vec::new();
        };
        let mut segments: Vec<&str> = self.membership.segments_of(id).collect();
        segments.sort_unstable();
        segments
    }

    /// Whether a user is in each segment, in order; `None` for an unknown user.
    ///
    /// # Errors
    /// An unknown segment id.
    pub fn check_membership(
        &self,
        user_id: &str,
        segment_ids: &[String],
    ) -> Result<Option<Vec<bool>>> {
        let segments = segment_ids
            .iter()
            .map(|id| self.segment(id))
            .collect::<Result<Vec<_>>>()?;
        let Some(id) = self.live_id(user_id) else {
            return Ok(None);
        };
        Ok(Some(segments.iter().map(|s| s.contains(id)).collect()))
    }

    /// The dense id of a live user.
    pub fn live_id(&self, user_id: &str) -> Option<DenseId> {
        self.keys
            .lookup(user_id)
            .filter(|&id| self.live.contains(id))
    }

    /// Live users.
    pub fn user_count(&self) -> u64 {
        self.live.len()
    }

    /// Saved segments.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Every event name with its number of retained events.
    pub fn event_counts(&self) -> Vec<(String, u64)> {
        self.events
            .names()
            .map(|(name, count)| (name.to_owned(), count))
            .collect()
    }

    /// Whether the dataset holds no user and no event.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.events.events() == 0
    }

    /// Every attribute with its kind, distinct values and nulls among live users.
    pub fn describe(&self) -> Vec<AttributeInfo> {
        self.attributes
            .iter()
            .map(|(name, attr)| AttributeInfo {
                name: name.clone(),
                kind: attr.kind(),
                distinct_values: attr.distinct_values(),
                null_count: self.live.len() - attr.present().intersection_len(&self.live),
            })
            .collect()
    }
}

/// An audience as an expression (a saved segment as its `SEGMENT` reference).
fn audience_expr(audience: &Audience) -> std::borrow::Cow<'_, Expr> {
    match audience {
        Audience::Expression(expr) => std::borrow::Cow::Borrowed(expr),
        Audience::Segment(id) => {
            std::borrow::Cow::Owned(Expr::Predicate(Predicate::Segment { id: id.clone() }))
        }
    }
}

/// A uniformly random sample of `size` members without replacement, reproducible by `seed`,
/// in id order. Floyd's algorithm picks distinct ranks; `select` maps a rank to its member.
pub fn sample(members: &Bitmap, size: usize, seed: u64) -> Vec<DenseId> {
    let total = members.len();
    if size as u64 >= total {
        return members.iter().collect();
    }
    let mut rng = SplitMix64::new(seed);
    let mut ranks = std::collections::BTreeSet::new();
    for upper in total - size as u64..total {
        let pick = rng.below(upper + 1);
        if !ranks.insert(pick) {
            ranks.insert(upper);
        }
    }
    ranks
        .into_iter()
        .filter_map(|rank| u32::try_from(rank).ok().and_then(|r| members.select(r)))
        .collect()
}

/// `(value as text, users holding it)` for every value of a categorical, set or boolean
/// attribute; `None` for a numeric one.
fn value_sets(attr: &Attribute) -> Option<Vec<(String, &Bitmap)>> {
    fn owned<'a>(
        values: impl Iterator<Item = (&'a str, &'a Arc<Bitmap>)>,
    ) -> Vec<(String, &'a Bitmap)> {
        values.map(|(v, users)| (v.to_owned(), &**users)).collect()
    }
    match attr {
        Attribute::Categorical(a) => Some(owned(a.values())),
        Attribute::Set(a) => Some(owned(a.values())),
        Attribute::Boolean(a) => Some(vec![
            (true.to_string(), &*a.true_users),
            (false.to_string(), &*a.false_users),
        ]),
        Attribute::Integer(_) | Attribute::Timestamp(_) | Attribute::Float(_) => None,
    }
}
