//! Binding: an [`Expr`] checked against one dataset snapshot and resolved to bitmaps and column
//! ranges, ready to evaluate.
//!
//! Every predicate becomes one of a few leaf shapes, so evaluation has one code path per shape:
//! a union or intersection of value bitmaps, or a numeric range. A negated predicate (`!=`,
//! `NOT IN`) is `present AND NOT positive`, which keeps "a predicate on null is false".

use std::sync::Arc;

use super::error::{EngineError, Result};
use super::query::AsOf;
use super::state::DatasetState;
use crate::expr::{CompareOp, Expr, Literal, Predicate, Value, Window};
use crate::index::events::{EventSeries, TimeWindow};
use crate::index::numeric::{NumericColumn, NumericValue, ValueRange};
use crate::index::{Attribute, AttributeKind, Bitmap};
use crate::time::{parse_rfc3339, Millis};

/// A bound expression.
#[derive(Debug, Clone)]
pub enum Plan {
    /// No user.
    Empty,
    /// Every live user in scope.
    All,
    /// Users in any of the sets. `disjoint` (values of one categorical attribute) lets a count
    /// add per-set counts instead of building the union.
    AnyOf {
        sets: Vec<Arc<Bitmap>>,
        disjoint: bool,
    },
    /// Users in every set (never empty).
    AllOf(Vec<Arc<Bitmap>>),
    /// Users whose numeric value lies in a range.
    Range(RangeLeaf),
    /// Users with at least `k` events of one name in a window.
    Did(DidLeaf),
    Not(Box<Plan>),
    And(Vec<Plan>),
    Or(Vec<Plan>),
}

/// De Morgan over the negated operands of an AND or an OR: `NOT a AND NOT b` becomes
/// `NOT (a OR b)` and `NOT a OR NOT b` becomes `NOT (a AND b)` (`join` builds the inner
/// operation), so that two or more complements, each as large as the scope (`x IS NULL` is one),
/// cost one complement.
fn merge_negations(operands: Vec<Plan>, join: fn(Vec<Plan>) -> Plan) -> Vec<Plan> {
    let negated = operands
        .iter()
        .filter(|p| matches!(p, Plan::Not(_)))
        .count();
    if negated < 2 {
        return operands;
    }
    let (mut merged, mut inner) = (Vec::with_capacity(operands.len()), Vec::new());
    for operand in operands {
        match operand {
            Plan::Not(positive) => inner.push(*positive),
            other => merged.push(other),
        }
    }
    merged.push(Plan::Not(Box::new(join(inner))));
    merged
}

/// A numeric range over one attribute's column.
#[derive(Debug, Clone)]
pub struct RangeLeaf {
    pub attribute: Arc<Attribute>,
    pub range: NumericRange,
}

/// An inclusive range in the column's own value type.
#[derive(Debug, Clone, Copy)]
pub enum NumericRange {
    Int(ValueRange<i64>),
    Float(ValueRange<f64>),
}

impl RangeLeaf {
    fn with_column<R>(
        &self,
        on_int: impl FnOnce(&NumericColumn<i64>, &ValueRange<i64>) -> R,
        on_float: impl FnOnce(&NumericColumn<f64>, &ValueRange<f64>) -> R,
        empty: R,
    ) -> R {
        match (&*self.attribute, &self.range) {
            (Attribute::Integer(c) | Attribute::Timestamp(c), NumericRange::Int(r)) => on_int(c, r),
            (Attribute::Float(c), NumericRange::Float(r)) => on_float(c, r),
            _ => empty,
        }
    }

    /// Matching users among `within` (every user when `None`).
    pub fn select(&self, within: Option<&Bitmap>) -> Bitmap {
        self.with_column(
            |c, r| c.select(r, within),
            |c, r| c.select(r, within),
            Bitmap::new(),
        )
    }

    /// The number of matching users among `within`.
    pub fn count(&self, within: Option<&Bitmap>) -> u64 {
        self.with_column(|c, r| c.count(r, within), |c, r| c.count(r, within), 0)
    }

    /// Whether answering reads the column for the users of a straddled bucket.
    pub fn reads_rows(&self) -> bool {
        self.with_column(|c, r| c.reads_rows(r), |c, r| c.reads_rows(r), false)
    }

    /// An upper bound of the matches.
    pub fn estimate(&self) -> u64 {
        self.with_column(|c, r| c.estimate(r), |c, r| c.estimate(r), 0)
    }

    /// Whether one user's value lies in the range.
    pub fn matches(&self, id: u32) -> bool {
        self.with_column(
            |c, r| c.get(id).is_some_and(|v| r.contains(v)),
            |c, r| c.get(id).is_some_and(|v| r.contains(v)),
            false,
        )
    }
}

/// A DID predicate resolved to one event series and an absolute, retention-clamped window.
#[derive(Debug, Clone)]
pub struct DidLeaf {
    pub series: Arc<EventSeries>,
    pub window: TimeWindow,
    pub k: u64,
    /// Deleted users whose events the series still holds (see `EventStore::erased`).
    pub erased: Arc<Bitmap>,
}

impl DidLeaf {
    /// Matching users among `within` (every live user when `None`).
    pub fn select(&self, within: Option<&Bitmap>) -> Bitmap {
        let found = self.series.select(self.window, self.k, within);
        match within {
            // A scope holds only live users, so nothing deleted can be in the answer.
            None if !self.erased.is_empty() => found - &*self.erased,
            _ => found,
        }
    }

    /// Whether one live user matches.
    pub fn matches(&self, id: u32) -> bool {
        let mut one = Bitmap::new();
        one.insert(id);
        !self
            .series
            .select(self.window, self.k, Some(&one))
            .is_empty()
    }
}

/// The absolute window of a DID predicate at `as_of` (no window: all time).
///
/// # Errors
/// A bound that is not a timestamp (an RFC 3339 string, epoch milliseconds or `NOW`).
pub fn did_window(window: Option<&Window>, as_of: Millis) -> Result<TimeWindow> {
    Ok(match window {
        None => TimeWindow {
            start: Millis::MIN,
            end: Millis::MAX,
        },
        Some(Window::Last(duration)) => TimeWindow {
            start: as_of.saturating_sub(duration.as_millis()),
            end: as_of,
        },
        Some(Window::Between { start, end }) => TimeWindow {
            start: instant(start, as_of)?,
            end: instant(end, as_of)?,
        },
    })
}

/// A window bound as an instant.
fn instant(value: &Value, as_of: Millis) -> Result<Millis> {
    match value {
        Value::Now { offset } => Ok(as_of.saturating_add(offset.map_or(0, |o| o.as_millis()))),
        Value::Literal(Literal::String(text)) => Ok(parse_rfc3339(text)?),
        Value::Literal(Literal::Int(ms)) => Ok(*ms),
        Value::Literal(other) => Err(EngineError::InvalidExpression(format!(
            "a DID window bound must be a timestamp (an RFC 3339 string, epoch milliseconds or \
             NOW), not {}",
            describe(other)
        ))),
    }
}

/// Binds expressions against one snapshot, anchoring `NOW` at `as_of`.
pub struct Binder<'a> {
    state: &'a DatasetState,
    as_of: Millis,
    /// A saved segment whose members depend on time is bound from its definition at `as_of`
    /// instead of read as materialized (which is at the server's clock).
    saved_at_as_of: bool,
}

impl<'a> Binder<'a> {
    /// A binder that reads saved segments as materialized: for segment maintenance, which
    /// runs at the server's clock.
    pub fn new(state: &'a DatasetState, as_of: Millis) -> Self {
        Self {
            state,
            as_of,
            saved_at_as_of: false,
        }
    }

    /// A binder for a query at `as_of`: at an instant the caller chose, saved segments that
    /// move with time are evaluated there, as their definitions say.
    pub fn at(state: &'a DatasetState, as_of: AsOf) -> Self {
        Self {
            state,
            as_of: as_of.millis(),
            saved_at_as_of: matches!(as_of, AsOf::At(_)),
        }
    }

    /// Resolves every name and literal of `expr`.
    ///
    /// # Errors
    /// Unknown attributes or segments, and literals of the wrong kind, each named.
    pub fn bind(&self, expr: &Expr) -> Result<Plan> {
        match expr {
            Expr::And(children) => Ok(Plan::And(merge_negations(
                self.bind_all(children)?,
                Plan::Or,
            ))),
            Expr::Or(children) => Ok(Plan::Or(merge_negations(
                self.bind_all(children)?,
                Plan::And,
            ))),
            Expr::Not(child) => Ok(Plan::Not(Box::new(self.bind(child)?))),
            Expr::Predicate(predicate) => self.bind_predicate(predicate),
        }
    }

    fn bind_all(&self, children: &[Expr]) -> Result<Vec<Plan>> {
        if children.is_empty() {
            return Err(EngineError::InvalidExpression(
                "AND and OR need at least one operand".into(),
            ));
        }
        children.iter().map(|c| self.bind(c)).collect()
    }

    fn attribute(&self, name: &str) -> Result<&'a Arc<Attribute>> {
        self.state
            .attributes
            .get(name)
            .ok_or_else(|| EngineError::UnknownAttribute(name.to_owned()))
    }

    fn bind_predicate(&self, predicate: &Predicate) -> Result<Plan> {
        match predicate {
            Predicate::Did {
                event,
                at_least,
                window,
            } => {
                let window = self
                    .state
                    .events
                    .clamp(did_window(window.as_ref(), self.as_of)?);
                Ok(match self.state.events.series(event) {
                    Some(series) if window.start < window.end => Plan::Did(DidLeaf {
                        series: series.clone(),
                        window,
                        k: at_least.unwrap_or(1),
                        erased: self.state.events.erased().clone(),
                    }),
                    _ => Plan::Empty,
                })
            }
            Predicate::Segment { id } => {
                let segment = self
                    .state
                    .segments
                    .get(id)
                    .ok_or_else(|| EngineError::SegmentNotFound(id.clone()))?;
                // References are acyclic and at most 32 deep (see `definitions`).
                if self.saved_at_as_of && segment.reads.anchored_in_time() {
                    return self.bind(&segment.definition.expression);
                }
                Ok(any_of(vec![segment.members()], false))
            }
            Predicate::IsNull { attribute, negated } => {
                let present = Plan::AnyOf {
                    sets: vec![self.attribute(attribute)?.present()],
                    disjoint: true,
                };
                Ok(if *negated {
                    present
                } else {
                    Plan::Not(Box::new(present))
                })
            }
            Predicate::Equals {
                attribute,
                value,
                negated,
            } => self.negatable(attribute, *negated, |b, a| {
                b.values(attribute, a, std::slice::from_ref(value))
            }),
            Predicate::In {
                attribute,
                values,
                negated,
            } => self.negatable(attribute, *negated, |b, a| b.values(attribute, a, values)),
            Predicate::Has { attribute, value } => {
                let attr = self.attribute(attribute)?;
                self.members(attribute, attr, std::slice::from_ref(value), false)
            }
            Predicate::HasAny { attribute, values } => {
                let attr = self.attribute(attribute)?;
                self.members(attribute, attr, values, false)
            }
            Predicate::HasAll { attribute, values } => {
                let attr = self.attribute(attribute)?;
                self.members(attribute, attr, values, true)
            }
            Predicate::Compare {
                attribute,
                op,
                value,
            } => {
                let attr = self.attribute(attribute)?;
                let bound = self.bound_value(attribute, attr, value)?;
                self.compare(attr, *op, bound)
            }
            Predicate::Between {
                attribute,
                low,
                high,
            } => {
                let attr = self.attribute(attribute)?;
                let low = self.bound_value(attribute, attr, low)?;
                let high = self.bound_value(attribute, attr, high)?;
                let from = self.compare(attr, CompareOp::Ge, low)?;
                let to = self.compare(attr, CompareOp::Le, high)?;
                Ok(intersect_ranges(attr, from, to))
            }
        }
    }

    /// `present AND NOT positive` for negated predicates.
    fn negatable(
        &self,
        name: &str,
        negated: bool,
        positive: impl FnOnce(&Self, &Arc<Attribute>) -> Result<Plan>,
    ) -> Result<Plan> {
        let attr = self.attribute(name)?;
        let plan = positive(self, attr)?;
        if !negated {
            return Ok(plan);
        }
        let present = Plan::AnyOf {
            sets: vec![attr.present()],
            disjoint: true,
        };
        Ok(Plan::And(vec![present, Plan::Not(Box::new(plan))]))
    }

    /// Users whose value is one of `values` (`=`, `IN`).
    fn values(&self, name: &str, attr: &Arc<Attribute>, values: &[Literal]) -> Result<Plan> {
        match &**attr {
            Attribute::Categorical(_) | Attribute::Set(_) | Attribute::Boolean(_) => {
                self.members(name, attr, values, false)
            }
            Attribute::Integer(_) | Attribute::Float(_) | Attribute::Timestamp(_) => {
                let points = values
                    .iter()
                    .map(|v| {
                        let bound = self.bound_literal(name, attr, v)?;
                        let low = self.compare(attr, CompareOp::Ge, bound.clone())?;
                        let high = self.compare(attr, CompareOp::Le, bound)?;
                        Ok(intersect_ranges(attr, low, high))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(match points.len() {
                    1 => points.into_iter().next().unwrap_or(Plan::Empty),
                    _ => Plan::Or(points),
                })
            }
        }
    }

    /// Users holding any (or all) of string/bool `values`.
    fn members(
        &self,
        name: &str,
        attr: &Arc<Attribute>,
        values: &[Literal],
        all: bool,
    ) -> Result<Plan> {
        let kind = attr.kind();
        let mut sets: Vec<Arc<Bitmap>> = Vec::with_capacity(values.len());
        let mut missing = false;
        for value in values {
            let set = match (&**attr, value) {
                (Attribute::Categorical(a), Literal::String(s)) => {
                    a.dictionary.code(s).and_then(|c| a.bitmap(c)).cloned()
                }
                (Attribute::Set(a), Literal::String(s)) => {
                    a.dictionary.code(s).and_then(|c| a.bitmap(c)).cloned()
                }
                (Attribute::Boolean(a), Literal::Bool(b)) => Some(a.users(*b).clone()),
                (Attribute::Categorical(_) | Attribute::Set(_), other) => {
                    return Err(EngineError::kind_mismatch(
                        name,
                        kind,
                        format!("compare it with a string, not {}", describe(other)),
                    ))
                }
                (Attribute::Boolean(_), other) => {
                    return Err(EngineError::kind_mismatch(
                        name,
                        kind,
                        format!("compare it with TRUE or FALSE, not {}", describe(other)),
                    ))
                }
                _ => {
                    return Err(EngineError::kind_mismatch(
                        name,
                        kind,
                        "HAS applies to set, categorical and boolean attributes",
                    ))
                }
            };
            match set {
                Some(set) => {
                    if !sets.iter().any(|s| Arc::ptr_eq(s, &set)) {
                        sets.push(set);
                    }
                }
                None => missing = true,
            }
        }
        if all {
            if missing || sets.is_empty() {
                return Ok(Plan::Empty);
            }
            return Ok(Plan::AllOf(sets));
        }
        let disjoint = !matches!(&**attr, Attribute::Set(_));
        Ok(any_of(sets, disjoint))
    }

    fn bound_value(&self, name: &str, attr: &Attribute, value: &Value) -> Result<Bound> {
        match value {
            Value::Literal(literal) => self.bound_literal(name, attr, literal),
            Value::Now { offset } => {
                if attr.kind() != AttributeKind::Timestamp {
                    return Err(EngineError::kind_mismatch(
                        name,
                        attr.kind(),
                        "NOW compares only with timestamp attributes",
                    ));
                }
                let shift = offset.map_or(0, |o| o.as_millis());
                Ok(Bound::Int(self.as_of.saturating_add(shift)))
            }
        }
    }

    fn bound_literal(&self, name: &str, attr: &Attribute, literal: &Literal) -> Result<Bound> {
        let kind = attr.kind();
        let mismatch = |what: &str| {
            Err(EngineError::kind_mismatch(
                name,
                kind,
                format!("cannot compare it with {what}"),
            ))
        };
        match (kind, literal) {
            (AttributeKind::Categorical, Literal::String(s)) => Ok(Bound::Text(s.clone())),
            (AttributeKind::Integer, Literal::Int(i)) => Ok(Bound::Int(*i)),
            (AttributeKind::Integer | AttributeKind::Float, Literal::Float(f)) if f.is_finite() => {
                Ok(Bound::Float(*f))
            }
            (AttributeKind::Float, Literal::Int(i)) => Ok(Bound::Float(*i as f64)),
            (AttributeKind::Timestamp, Literal::String(s)) => Ok(Bound::Int(parse_rfc3339(s)?)),
            (AttributeKind::Timestamp, Literal::Int(ms)) => Ok(Bound::Int(*ms)),
            (AttributeKind::Set | AttributeKind::Boolean, _) => mismatch("<, <=, >, >= or BETWEEN"),
            (_, other) => mismatch(&describe(other)),
        }
    }

    /// `attr op bound` as a plan.
    fn compare(&self, attr: &Arc<Attribute>, op: CompareOp, bound: Bound) -> Result<Plan> {
        let range = match (&**attr, bound) {
            (Attribute::Categorical(a), Bound::Text(text)) => {
                let sets = a
                    .values()
                    .filter(|(value, _)| compare_text(value, op, &text))
                    .map(|(_, users)| users.clone())
                    .collect();
                return Ok(any_of(sets, true));
            }
            (Attribute::Integer(_) | Attribute::Timestamp(_), bound) => int_range(op, bound),
            (Attribute::Float(_), bound) => float_range(op, bound),
            _ => None,
        };
        Ok(match range {
            Some(range) => Plan::Range(RangeLeaf {
                attribute: attr.clone(),
                range,
            }),
            None => Plan::Empty,
        })
    }
}

/// A comparison bound after checking it against the attribute's kind.
#[derive(Debug, Clone)]
enum Bound {
    Text(String),
    Int(i64),
    Float(f64),
}

fn compare_text(value: &str, op: CompareOp, bound: &str) -> bool {
    match op {
        CompareOp::Lt => value < bound,
        CompareOp::Le => value <= bound,
        CompareOp::Gt => value > bound,
        CompareOp::Ge => value >= bound,
    }
}

/// The inclusive integer range for `x op bound`; `None` when nothing can match.
fn int_range(op: CompareOp, bound: Bound) -> Option<NumericRange> {
    let (low, high) = match bound {
        Bound::Int(b) => match op {
            CompareOp::Lt => (i64::MIN, b.checked_sub(1)?),
            CompareOp::Le => (i64::MIN, b),
            CompareOp::Gt => (b.checked_add(1)?, i64::MAX),
            CompareOp::Ge => (b, i64::MAX),
        },
        Bound::Float(f) => match op {
            // x < f  ⇔  x <= ceil(f) - 1 ; x <= f ⇔ x <= floor(f)
            CompareOp::Lt => (i64::MIN, high_to_int(f.ceil() - 1.0)?),
            CompareOp::Le => (i64::MIN, high_to_int(f.floor())?),
            CompareOp::Gt => (low_to_int(f.floor() + 1.0)?, i64::MAX),
            CompareOp::Ge => (low_to_int(f.ceil())?, i64::MAX),
        },
        Bound::Text(_) => return None,
    };
    let range = ValueRange { low, high };
    (!range.is_empty()).then_some(NumericRange::Int(range))
}

/// 2^63: the first float above every i64.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// An integral float as the lower end of an i64 range; `None` when above every i64.
fn low_to_int(f: f64) -> Option<i64> {
    // `as` saturates below i64::MIN, which is the clamp wanted for a lower end.
    (f < TWO_POW_63).then_some(f as i64)
}

/// An integral float as the upper end of an i64 range; `None` when below every i64.
fn high_to_int(f: f64) -> Option<i64> {
    (f >= -TWO_POW_63).then_some(f as i64)
}

fn float_range(op: CompareOp, bound: Bound) -> Option<NumericRange> {
    // Columns hold 0.0 for -0.0, so the bound must too.
    let b = match bound {
        Bound::Float(f) => f + 0.0,
        Bound::Int(i) => i as f64,
        Bound::Text(_) => return None,
    };
    let (low, high) = match op {
        CompareOp::Lt => (f64::NEG_INFINITY, b.next_down()),
        CompareOp::Le => (f64::NEG_INFINITY, b),
        CompareOp::Gt => (b.next_up(), f64::INFINITY),
        CompareOp::Ge => (b, f64::INFINITY),
    };
    let range = ValueRange { low, high };
    (!range.is_empty()).then_some(NumericRange::Float(range))
}

/// `low AND high` where both are ranges on the same column: one range.
fn intersect_ranges(attr: &Arc<Attribute>, low: Plan, high: Plan) -> Plan {
    match (low, high) {
        (Plan::Range(a), Plan::Range(b)) => {
            let range = match (a.range, b.range) {
                (NumericRange::Int(x), NumericRange::Int(y)) => NumericRange::Int(ValueRange {
                    low: max_of(x.low, y.low),
                    high: min_of(x.high, y.high),
                }),
                (NumericRange::Float(x), NumericRange::Float(y)) => {
                    NumericRange::Float(ValueRange {
                        low: max_of(x.low, y.low),
                        high: min_of(x.high, y.high),
                    })
                }
                _ => return Plan::Empty,
            };
            Plan::Range(RangeLeaf {
                attribute: attr.clone(),
                range,
            })
        }
        (Plan::Empty, _) | (_, Plan::Empty) => Plan::Empty,
        (low, high) => Plan::And(vec![low, high]),
    }
}

fn max_of<T: NumericValue>(a: T, b: T) -> T {
    if a.order(&b).is_ge() {
        a
    } else {
        b
    }
}

fn min_of<T: NumericValue>(a: T, b: T) -> T {
    if a.order(&b).is_le() {
        a
    } else {
        b
    }
}

fn any_of(sets: Vec<Arc<Bitmap>>, disjoint: bool) -> Plan {
    if sets.is_empty() {
        Plan::Empty
    } else {
        Plan::AnyOf { sets, disjoint }
    }
}

fn describe(literal: &Literal) -> String {
    match literal {
        Literal::String(s) => format!("the string {s:?}"),
        Literal::Int(i) => format!("the number {i}"),
        Literal::Float(f) => format!("the number {f}"),
        Literal::Bool(b) => format!("the boolean {}", if *b { "TRUE" } else { "FALSE" }),
    }
}
