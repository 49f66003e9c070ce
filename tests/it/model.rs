//! An obviously-correct model of a dataset: users as rows of optional values, expressions
//! evaluated row by row. Written independently of the engine's index and planner.

use std::collections::{BTreeMap, BTreeSet};

use audience::engine::{AttributeChange, AttributeValue, ChangeOp, UserUpdate};
use audience::expr::{CompareOp, Expr, Literal, Predicate, Value};
use audience::time::{parse_rfc3339, Millis};

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
    }

    /// The ids matching `expr` at `as_of`.
    pub fn select(&self, expr: &Expr, as_of: Millis) -> BTreeSet<String> {
        self.users
            .iter()
            .filter(|(_, row)| self.matches(expr, row, as_of))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn matches(&self, expr: &Expr, row: &BTreeMap<String, Cell>, as_of: Millis) -> bool {
        match expr {
            Expr::And(children) => children.iter().all(|c| self.matches(c, row, as_of)),
            Expr::Or(children) => children.iter().any(|c| self.matches(c, row, as_of)),
            Expr::Not(child) => !self.matches(child, row, as_of),
            Expr::Predicate(p) => self.predicate(p, row, as_of),
        }
    }

    fn predicate(&self, p: &Predicate, row: &BTreeMap<String, Cell>, as_of: Millis) -> bool {
        let cell = |name: &String| row.get(name);
        match p {
            Predicate::Segment { id } => self.matches(&self.segments[id], row, as_of),
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
