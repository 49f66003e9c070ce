//! An obviously-correct model of a dataset: users as rows of optional values, expressions
//! evaluated row by row. Written independently of the engine's index and planner.

use std::collections::{BTreeMap, BTreeSet};

use audience::engine::{
    AttributeChange, AttributeValue, ChangeOp, EventRecord, SegmentDefinition, UserUpdate,
};
use audience::expr::{CompareOp, Expr, Literal, Predicate, Value, Window};
use audience::time::{parse_rfc3339, Millis};

/// Random boolean trees over `leaf` predicates: AND and OR of 2-3 operands, and NOT.
pub fn boolean_trees(
    leaf: proptest::strategy::BoxedStrategy<Expr>,
    depth: u32,
    size: u32,
) -> proptest::strategy::BoxedStrategy<Expr> {
    use proptest::prelude::*;
    leaf.prop_recursive(depth, size, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
            inner.prop_map(|e| Expr::Not(Box::new(e))),
        ]
    })
    .boxed()
}

/// A saved segment named by its id, defined at `at`.
pub fn saved_segment(id: &str, expression: Expr, at: Millis) -> SegmentDefinition {
    SegmentDefinition {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        labels: BTreeMap::new(),
        expression,
        created_at: at,
        updated_at: at,
    }
}

/// One attribute value of one user.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Tags(BTreeSet<String>),
    Flag(bool),
    Int(i64),
    Float(f64),
    Time(Millis),
}

/// The model dataset: live users by external id.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub users: BTreeMap<String, BTreeMap<String, Cell>>,
    pub segments: BTreeMap<String, Expr>,
    /// Every retained event, as recorded: (user, event name, timestamp).
    pub events: Vec<(String, String, Millis)>,
    /// Events before this instant are gone (retention); `None` keeps everything.
    pub cutoff: Option<Millis>,
}

impl Model {
    /// Applies upserts exactly as PRODUCT.md describes them.
    pub fn upsert(&mut self, updates: &[UserUpdate]) {
        for update in updates {
            let row = self.users.entry(update.user_id.clone()).or_default();
            for AttributeChange { attribute, op } in &update.changes {
                match op {
                    ChangeOp::Clear => {
                        row.remove(attribute);
                    }
                    ChangeOp::Set(value) => {
                        let cell = match value {
                            AttributeValue::String(s) => Cell::Text(s.clone()),
                            AttributeValue::Set(v) => Cell::Tags(v.iter().cloned().collect()),
                            AttributeValue::Bool(b) => Cell::Flag(*b),
                            AttributeValue::Int(i) => Cell::Int(*i),
                            AttributeValue::Float(f) => Cell::Float(*f),
                            AttributeValue::Timestamp(t) => Cell::Time(*t),
                        };
                        row.insert(attribute.clone(), cell);
                    }
                    ChangeOp::Add(values) => {
                        let mut tags = match row.remove(attribute) {
                            Some(Cell::Tags(t)) => t,
                            _ => BTreeSet::new(),
                        };
                        tags.extend(values.iter().cloned());
                        row.insert(attribute.clone(), Cell::Tags(tags));
                    }
                    ChangeOp::Remove(values) => {
                        if let Some(Cell::Tags(tags)) = row.get_mut(attribute) {
                            for v in values {
                                tags.remove(v);
                            }
                        }
                    }
                }
                // An empty set is null.
                if matches!(row.get(attribute), Some(Cell::Tags(t)) if t.is_empty()) {
                    row.remove(attribute);
                }
            }
        }
    }

    pub fn delete(&mut self, ids: &[String]) {
        for id in ids {
            self.users.remove(id);
        }
        self.events.retain(|(user, _, _)| !ids.contains(user));
    }

    /// Records events: unknown users are created; events before the cutoff are dropped.
    pub fn record(&mut self, events: &[EventRecord]) {
        for e in events {
            self.users.entry(e.user_id.clone()).or_default();
            if self.cutoff.is_none_or(|c| e.ts >= c) {
                self.events.push((e.user_id.clone(), e.event.clone(), e.ts));
            }
        }
    }

    /// Forgets events before `cutoff` (the cutoff never moves back).
    pub fn retain_from(&mut self, cutoff: Millis) {
        let cutoff = self.cutoff.map_or(cutoff, |c| c.max(cutoff));
        self.cutoff = Some(cutoff);
        self.events.retain(|(_, _, ts)| *ts >= cutoff);
    }

    /// A new retention at `now`: a shorter one drops events, a longer one only accepts older
    /// events from now on (what was dropped stays dropped).
    pub fn set_retention(&mut self, now: Millis, retention: Millis) {
        let cutoff = now - retention;
        match self.cutoff {
            Some(old) if cutoff < old => self.cutoff = Some(cutoff),
            _ => self.retain_from(cutoff),
        }
    }

    /// How many of `user`'s events named `event` fall in `[start, end)`.
    fn count_events(&self, user: &str, event: &str, start: Millis, end: Millis) -> u64 {
        self.events
            .iter()
            .filter(|(u, e, ts)| u == user && e == event && start <= *ts && *ts < end)
            .count() as u64
    }

    /// The ids matching `expr` at `as_of`.
    pub fn select(&self, expr: &Expr, as_of: Millis) -> BTreeSet<String> {
        self.users
            .iter()
            .filter(|(id, row)| self.matches(expr, id, row, as_of))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn matches(&self, expr: &Expr, id: &str, row: &BTreeMap<String, Cell>, as_of: Millis) -> bool {
        match expr {
            Expr::And(children) => children.iter().all(|c| self.matches(c, id, row, as_of)),
            Expr::Or(children) => children.iter().any(|c| self.matches(c, id, row, as_of)),
            Expr::Not(child) => !self.matches(child, id, row, as_of),
            Expr::Predicate(p) => self.predicate(p, id, row, as_of),
        }
    }

    fn predicate(
        &self,
        p: &Predicate,
        id: &str,
        row: &BTreeMap<String, Cell>,
        as_of: Millis,
    ) -> bool {
        let cell = |name: &String| row.get(name);
        match p {
            Predicate::Segment { id: segment } => {
                self.matches(&self.segments[segment], id, row, as_of)
            }
            Predicate::Did {
                event,
                at_least,
                window,
            } => {
                let (start, end) = match window {
                    None => (Millis::MIN, Millis::MAX),
                    Some(Window::Last(d)) => (as_of.saturating_sub(d.as_millis()), as_of),
                    Some(Window::Between { start, end }) => {
                        (instant(start, as_of), instant(end, as_of))
                    }
                };
                self.count_events(id, event, start, end) >= at_least.unwrap_or(1)
            }
            Predicate::IsNull { attribute, negated } => cell(attribute).is_none() != *negated,
            Predicate::Equals {
                attribute,
                value,
                negated,
            } => match cell(attribute) {
                None => false,
                Some(c) => equals(c, value) != *negated,
            },
            Predicate::In {
                attribute,
                values,
                negated,
            } => match cell(attribute) {
                None => false,
                Some(c) => values.iter().any(|v| equals(c, v)) != *negated,
            },
            Predicate::Has { attribute, value } => {
                cell(attribute).is_some_and(|c| equals(c, value))
            }
            Predicate::HasAny { attribute, values } => {
                cell(attribute).is_some_and(|c| values.iter().any(|v| equals(c, v)))
            }
            Predicate::HasAll { attribute, values } => {
                cell(attribute).is_some_and(|c| values.iter().all(|v| equals(c, v)))
            }
            Predicate::Compare {
                attribute,
                op,
                value,
            } => cell(attribute).is_some_and(|c| compare(c, *op, value, as_of)),
            Predicate::Between {
                attribute,
                low,
                high,
            } => cell(attribute).is_some_and(|c| {
                compare(c, CompareOp::Ge, low, as_of) && compare(c, CompareOp::Le, high, as_of)
            }),
        }
    }
}

/// A DID window bound as an instant.
fn instant(value: &Value, as_of: Millis) -> Millis {
    match value {
        Value::Now { offset } => as_of.saturating_add(offset.map_or(0, |o| o.as_millis())),
        Value::Literal(Literal::Int(ms)) => *ms,
        Value::Literal(Literal::String(s)) => {
            parse_rfc3339(s).unwrap_or_else(|e| panic!("model: bad window bound {s:?}: {e}"))
        }
        other => panic!("model: {other:?} is not a window bound"),
    }
}

/// `cell = literal` (for a set: contains).
fn equals(cell: &Cell, literal: &Literal) -> bool {
    match (cell, literal) {
        (Cell::Text(s), Literal::String(l)) => s == l,
        (Cell::Tags(t), Literal::String(l)) => t.contains(l),
        (Cell::Flag(b), Literal::Bool(l)) => b == l,
        (Cell::Int(i), Literal::Int(l)) => i == l,
        (Cell::Int(i), Literal::Float(l)) => (*i as f64) == *l,
        (Cell::Float(f), Literal::Float(l)) => f == l,
        (Cell::Float(f), Literal::Int(l)) => *f == *l as f64,
        (Cell::Time(t), Literal::Int(l)) => t == l,
        (Cell::Time(t), Literal::String(l)) => parse_rfc3339(l).is_ok_and(|l| *t == l),
        _ => panic!("model: {cell:?} = {literal:?} is a kind error"),
    }
}

fn compare(cell: &Cell, op: CompareOp, value: &Value, as_of: Millis) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (cell, value) {
        (Cell::Time(t), Value::Now { offset }) => {
            Some(t.cmp(&(as_of + offset.map_or(0, |o| o.as_millis()))))
        }
        (Cell::Time(t), Value::Literal(Literal::String(s))) => {
            parse_rfc3339(s).ok().map(|l| t.cmp(&l))
        }
        (Cell::Time(t), Value::Literal(Literal::Int(l))) => Some(t.cmp(l)),
        (Cell::Int(i), Value::Literal(Literal::Int(l))) => Some(i.cmp(l)),
        (Cell::Int(i), Value::Literal(Literal::Float(l))) => (*i as f64).partial_cmp(l),
        (Cell::Float(f), Value::Literal(Literal::Float(l))) => f.partial_cmp(l),
        (Cell::Float(f), Value::Literal(Literal::Int(l))) => f.partial_cmp(&(*l as f64)),
        (Cell::Text(s), Value::Literal(Literal::String(l))) => Some(s.as_str().cmp(l.as_str())),
        _ => panic!("model: {cell:?} compared with {value:?} is a kind error"),
    };
    ordering.is_some_and(|o| match op {
        CompareOp::Lt => o.is_lt(),
        CompareOp::Le => o.is_le(),
        CompareOp::Gt => o.is_gt(),
        CompareOp::Ge => o.is_ge(),
    })
}
