//! Evaluation of a bound [`Plan`] with n-ary bitmap operations.
//!
//! Every operand is evaluated within a *scope*: all live users, or a set already narrowed by
//! the operands before it. An AND evaluates its cheapest operand first and each next one only
//! within what is left, so a selective operand makes every later one cheap (a range reads a
//! handful of rows, a NOT subtracts from a small set). Counts avoid building the last set.

use super::plan::Plan;
use crate::index::bitmap::{intersect_all, union_all};
use crate::index::Bitmap;

/// The users an operand is evaluated among. Invariant: always a subset of the live users.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// Every live user; leaf bitmaps need no intersection (they hold only live users).
    All(&'a Bitmap),
    /// A narrowed set.
    Within(&'a Bitmap),
}

impl<'a> Scope<'a> {
    fn users(self) -> &'a Bitmap {
        match self {
            Scope::All(users) | Scope::Within(users) => users,
        }
    }

    fn restriction(self) -> Option<&'a Bitmap> {
        match self {
            Scope::All(_) => None,
            Scope::Within(users) => Some(users),
        }
    }
}

impl Plan {
    /// An upper bound of the users this plan selects, to order AND operands cheapest first.
    pub fn estimate(&self, scope_len: u64) -> u64 {
        match self {
            Plan::Empty => 0,
            Plan::All => scope_len,
            Plan::AnyOf { sets, .. } => sets.iter().map(|s| s.len()).sum::<u64>().min(scope_len),
            Plan::AllOf(sets) => sets.iter().map(|s| s.len()).min().unwrap_or(0),
            Plan::Range(leaf) => leaf.estimate().min(scope_len),
            Plan::Did(leaf) => leaf.series.estimate(leaf.window).min(scope_len),
            Plan::Not(inner) => scope_len.saturating_sub(inner.lower_estimate()),
            Plan::And(children) => children
                .iter()
                .map(|c| c.estimate(scope_len))
                .min()
                .unwrap_or(scope_len),
            Plan::Or(children) => children
                .iter()
                .map(|c| c.estimate(scope_len))
                .sum::<u64>()
                .min(scope_len),
        }
    }

    /// A cheap lower bound, used under NOT (0 when unknown); exact for the disjoint values of
    /// one attribute.
    fn lower_estimate(&self) -> u64 {
        match self {
            Plan::AnyOf {
                sets,
                disjoint: true,
            } => sets.iter().map(|s| s.len()).sum(),
            Plan::AnyOf { sets, .. } => sets.iter().map(|s| s.len()).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether evaluating reads column values user by user (a range straddling buckets), whose
    /// cost grows with the scope where a bitmap operand's does not: such operands go after the
    /// bitmap ones, into the smallest scope, and the last one is counted without building a set.
    fn reads_rows(&self) -> bool {
        match self {
            Plan::Range(leaf) => leaf.reads_rows(),
            Plan::Not(inner) => inner.reads_rows(),
            _ => false,
        }
    }

    /// The matching users within `scope`.
    pub fn select(&self, scope: Scope<'_>) -> Bitmap {
        match self {
            Plan::Empty => Bitmap::new(),
            Plan::All => scope.users().clone(),
            Plan::AnyOf { sets, .. } => select_any(sets, scope),
            Plan::AllOf(sets) => match scope.restriction() {
                None => intersect_all(sets.iter().map(|s| &**s)),
                Some(within) => intersect_all(sets.iter().map(|s| &**s).chain([within])),
            },
            Plan::Range(leaf) => leaf.select(scope.restriction()),
            Plan::Did(leaf) => leaf.select(scope.restriction()),
            Plan::Not(inner) => scope.users() - inner.select(scope),
            Plan::And(children) => select_and(children, scope),
            Plan::Or(children) => {
                let parts: Vec<Bitmap> = children.iter().map(|c| c.select(scope)).collect();
                union_all(&parts)
            }
        }
    }

    /// Whether one live user matches, read row-wise: a few bitmap probes and column reads,
    /// where [`Plan::select`] over a one-user scope would build a set per operand. Segment
    /// maintenance evaluates a write's few touched users this way.
    pub fn matches(&self, id: u32) -> bool {
        match self {
            Plan::Empty => false,
            Plan::All => true,
            Plan::AnyOf { sets, .. } => sets.iter().any(|s| s.contains(id)),
            Plan::AllOf(sets) => sets.iter().all(|s| s.contains(id)),
            Plan::Range(leaf) => leaf.matches(id),
            Plan::Did(leaf) => leaf.matches(id),
            Plan::Not(inner) => !inner.matches(id),
            Plan::And(children) => children.iter().all(|c| c.matches(id)),
            Plan::Or(children) => children.iter().any(|c| c.matches(id)),
        }
    }

    /// The number of matching users within `scope`.
    pub fn count(&self, scope: Scope<'_>) -> u64 {
        match self {
            Plan::Empty => 0,
            Plan::All => scope.users().len(),
            Plan::AnyOf {
                sets,
                disjoint: true,
            } => match scope.restriction() {
                None => sets.iter().map(|s| s.len()).sum(),
                Some(within) => sets.iter().map(|s| s.intersection_len(within)).sum(),
            },
            Plan::AnyOf { sets, .. } if sets.len() == 1 => match scope.restriction() {
                None => sets[0].len(),
                Some(within) => sets[0].intersection_len(within),
            },
            Plan::AnyOf { sets, .. } => match scope.restriction() {
                None => union_all(sets.iter().map(|s| &**s)).len(),
                Some(within) => within.len() - outside_all(sets, within).len(),
            },
            Plan::Range(leaf) => leaf.count(scope.restriction()),
            Plan::Not(inner) => scope.users().len() - inner.count(scope),
            Plan::And(children) => count_and(children, scope),
            Plan::AllOf(_) | Plan::Or(_) | Plan::Did(_) => self.select(scope).len(),
        }
    }
}

fn select_any(sets: &[std::sync::Arc<Bitmap>], scope: Scope<'_>) -> Bitmap {
    match scope.restriction() {
        None => union_all(sets.iter().map(|s| &**s)),
        Some(within) => within - &outside_all(sets, within),
    }
}

/// The users of `within` in none of `sets`, by subtracting each set from a copy of the scope:
/// each step touches only the scope's containers, in place, and shrinks what the next one
/// touches, where a union would pass over every container of every set and intersections
/// would build a set per operand.
fn outside_all(sets: &[std::sync::Arc<Bitmap>], within: &Bitmap) -> Bitmap {
    let mut largest_first: Vec<&Bitmap> = sets.iter().map(|s| &**s).collect();
    largest_first.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut outside = within.clone();
    for set in largest_first {
        if outside.is_empty() {
            break;
        }
        outside -= set;
    }
    outside
}

/// AND operands cheapest first: plain sets by n-ary intersection, then the rest, each within
/// what is left, operands that read rows last.
fn ordered(children: &[Plan], scope_len: u64) -> Vec<&Plan> {
    let mut order: Vec<(bool, u64, &Plan)> = children
        .iter()
        .map(|c| (c.reads_rows(), c.estimate(scope_len), c))
        .collect();
    order.sort_by_key(|(reads_rows, estimate, plan)| {
        (*reads_rows, *estimate, matches!(plan, Plan::Not(_)))
    });
    order.into_iter().map(|(_, _, plan)| plan).collect()
}

fn select_and(children: &[Plan], scope: Scope<'_>) -> Bitmap {
    let order = ordered(children, scope.users().len());
    narrow(&order, scope).unwrap_or_else(|| scope.users().clone())
}

/// Evaluates `order` left to right, each within the previous result; `None` for no operands.
fn narrow(order: &[&Plan], scope: Scope<'_>) -> Option<Bitmap> {
    let (singles, rest): (Vec<&Plan>, Vec<&Plan>) =
        order.iter().partition(|p| plain_sets(p).is_some());
    let mut acc: Option<Bitmap> = if singles.is_empty() {
        None
    } else {
        let sets: Vec<&Bitmap> = singles
            .iter()
            .filter_map(|p| plain_sets(p))
            .flatten()
            .map(|s| &**s)
            .chain(scope.restriction())
            .collect();
        Some(intersect_all(sets))
    };
    for child in rest {
        if acc.as_ref().is_some_and(Bitmap::is_empty) {
            break;
        }
        let next = match &acc {
            None => child.select(scope),
            Some(users) => child.select(Scope::Within(users)),
        };
        acc = Some(next);
    }
    acc
}

/// The sets of an operand that is a plain intersection of stored bitmaps.
fn plain_sets(plan: &Plan) -> Option<&[std::sync::Arc<Bitmap>]> {
    match plan {
        Plan::AnyOf { sets, .. } if sets.len() == 1 => Some(sets),
        Plan::AllOf(sets) => Some(sets),
        _ => None,
    }
}

fn count_and(children: &[Plan], scope: Scope<'_>) -> u64 {
    let order = ordered(children, scope.users().len());
    let Some((last, first)) = order.split_last() else {
        return scope.users().len();
    };
    match narrow(first, scope) {
        None => last.count(scope),
        Some(users) if users.is_empty() => 0,
        Some(users) => last.count(Scope::Within(&users)),
    }
}
