//! Protobuf ↔ engine types. Every conversion from the wire checks its input and names the
//! field it rejects; nothing here panics on a message.

use std::collections::BTreeMap;

use prost_types::Timestamp;
use tonic::Status;

use super::pb;
use super::status::invalid;
use crate::engine::AttributeKind;
use crate::engine::{
    AsOf, AttributeChange, AttributeValue, Audience, ChangeOp, Engine, EventRecord, UserUpdate,
};
use crate::expr::{
    CompareOp, Duration, DurationUnit, Expr, Literal, Predicate, SignedDuration, Value, Window,
};
use crate::time::Millis;

/// A request timestamp as milliseconds; `None` when absent.
pub fn millis_from(ts: Option<&Timestamp>, field: &str) -> Result<Option<Millis>, Status> {
    let Some(ts) = ts else { return Ok(None) };
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(invalid(field, "nanos must be in 0..1e9"));
    }
    ts.seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(i64::from(ts.nanos / 1_000_000)))
        .map(Some)
        .ok_or_else(|| invalid(field, "timestamp out of range"))
}

/// Milliseconds as a protobuf timestamp.
pub fn timestamp(millis: Millis) -> Timestamp {
    Timestamp {
        seconds: millis.div_euclid(1_000),
        nanos: (millis.rem_euclid(1_000) * 1_000_000) as i32,
    }
}

/// `as_of`: the instant given, or the engine's clock (saved segments read as materialized).
pub fn as_of(engine: &Engine, ts: Option<&Timestamp>) -> Result<AsOf, Status> {
    Ok(match millis_from(ts, "as_of")? {
        Some(at) => AsOf::At(at),
        None => AsOf::Now(engine.now()),
    })
}

/// An expression message (text or tree), checked against the engine's limits.
pub fn expression(
    engine: &Engine,
    message: Option<&pb::Expression>,
    field: &str,
) -> Result<Expr, Status> {
    let kind = message
        .and_then(|m| m.kind.as_ref())
        .ok_or_else(|| invalid(field, "an expression (text or tree) is required"))?;
    let expr = match kind {
        pb::expression::Kind::Text(text) => {
            return engine
                .parse(text)
                .map_err(|e| super::status::to_status(e, &format!("{field}.text")))
        }
        pb::expression::Kind::Tree(node) => {
            let limit = engine.limits().max_expression_nodes;
            if let Some(size) = tree_exceeds(node, limit) {
                return Err(Status::resource_exhausted(format!(
                    "{field}.tree: expression has at least {size} nodes (list values count one \
                     each), over the limit of {limit}"
                )));
            }
            node_to_expr(node, &format!("{field}.tree"))?
        }
    };
    engine
        .check_expression(&expr)
        .map_err(|e| super::status::to_status(e, &format!("{field}.tree")))?;
    Ok(expr)
}

/// An audience message.
pub fn audience(
    engine: &Engine,
    message: Option<&pb::Audience>,
    field: &str,
) -> Result<Audience, Status> {
    match message.and_then(|m| m.kind.as_ref()) {
        Some(pb::audience::Kind::SegmentId(id)) if !id.is_empty() => {
            Ok(Audience::Segment(id.clone()))
        }
        Some(pb::audience::Kind::SegmentId(_)) => {
            Err(invalid(&format!("{field}.segment_id"), "must not be empty"))
        }
        Some(pb::audience::Kind::Expression(e)) => Ok(Audience::Expression(expression(
            engine,
            Some(e),
            &format!("{field}.expression"),
        )?)),
        None => Err(invalid(field, "an expression or a segment_id is required")),
    }
}

fn required_attribute(name: &str, field: &str) -> Result<String, Status> {
    if name.is_empty() {
        Err(invalid(&format!("{field}.attribute"), "must not be empty"))
    } else {
        Ok(name.to_owned())
    }
}

/// The size a tree reached once past `limit` nodes (`None`: within it), list values counted one each as
/// [`Expr::size`] counts them: walked before converting, and only until past the limit, so that
/// a huge tree is refused for what its first nodes cost.
fn tree_exceeds(root: &pb::Node, limit: usize) -> Option<usize> {
    use pb::node::Node as N;
    let mut pending = vec![root];
    let mut size = 0usize;
    while let Some(node) = pending.pop() {
        size += 1;
        match &node.node {
            Some(N::And(list) | N::Or(list)) => pending.extend(&list.nodes),
            Some(N::Not(child)) => pending.push(child),
            Some(N::In(p)) => size += p.values.len(),
            Some(N::HasAny(p)) => size += p.values.len(),
            Some(N::HasAll(p)) => size += p.values.len(),
            _ => {}
        }
        if size > limit {
            return Some(size);
        }
    }
    None
}

/// A tree node. Recursion is bounded by prost's decoding depth limit (100 levels).
pub fn node_to_expr(node: &pb::Node, field: &str) -> Result<Expr, Status> {
    use pb::node::Node as N;
    let inner = node
        .node
        .as_ref()
        .ok_or_else(|| invalid(field, "empty node"))?;
    let predicate = |p: Predicate| Ok(Expr::Predicate(p));
    match inner {
        N::And(list) | N::Or(list) => {
            let name = if matches!(inner, N::And(_)) {
                "and"
            } else {
                "or"
            };
            if list.nodes.is_empty() {
                return Err(invalid(
                    &format!("{field}.{name}"),
                    "needs at least one node",
                ));
            }
            let children = list
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| node_to_expr(n, &format!("{field}.{name}.nodes[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if name == "and" {
                Expr::And(children)
            } else {
                Expr::Or(children)
            })
        }
        N::Not(child) => Ok(Expr::Not(Box::new(node_to_expr(
            child,
            &format!("{field}.not"),
        )?))),
        N::Equals(p) => {
            let f = format!("{field}.equals");
            predicate(Predicate::Equals {
                attribute: required_attribute(&p.attribute, &f)?,
                value: literal(p.value.as_ref(), &format!("{f}.value"))?,
                negated: p.negated,
            })
        }
        N::In(p) => {
            let f = format!("{field}.in");
            predicate(Predicate::In {
                attribute: required_attribute(&p.attribute, &f)?,
                values: literals(&p.values, &f)?,
                negated: p.negated,
            })
        }
        N::Has(p) => {
            let f = format!("{field}.has");
            predicate(Predicate::Has {
                attribute: required_attribute(&p.attribute, &f)?,
                value: literal(p.value.as_ref(), &format!("{f}.value"))?,
            })
        }
        N::HasAny(p) => {
            let f = format!("{field}.has_any");
            predicate(Predicate::HasAny {
                attribute: required_attribute(&p.attribute, &f)?,
                values: literals(&p.values, &f)?,
            })
        }
        N::HasAll(p) => {
            let f = format!("{field}.has_all");
            predicate(Predicate::HasAll {
                attribute: required_attribute(&p.attribute, &f)?,
                values: literals(&p.values, &f)?,
            })
        }
        N::Compare(p) => {
            let f = format!("{field}.compare");
            let op = match pb::CompareOp::try_from(p.op) {
                Ok(pb::CompareOp::Lt) => CompareOp::Lt,
                Ok(pb::CompareOp::Le) => CompareOp::Le,
                Ok(pb::CompareOp::Gt) => CompareOp::Gt,
                Ok(pb::CompareOp::Ge) => CompareOp::Ge,
                Ok(pb::CompareOp::Unspecified) | Err(_) => {
                    return Err(invalid(&format!("{f}.op"), "must be LT, LE, GT or GE"))
                }
            };
            predicate(Predicate::Compare {
                attribute: required_attribute(&p.attribute, &f)?,
                op,
                value: value(p.value.as_ref(), &format!("{f}.value"))?,
            })
        }
        N::Between(p) => {
            let f = format!("{field}.between");
            predicate(Predicate::Between {
                attribute: required_attribute(&p.attribute, &f)?,
                low: value(p.low.as_ref(), &format!("{f}.low"))?,
                high: value(p.high.as_ref(), &format!("{f}.high"))?,
            })
        }
        N::IsNull(p) => predicate(Predicate::IsNull {
            attribute: required_attribute(&p.attribute, &format!("{field}.is_null"))?,
            negated: p.negated,
        }),
        N::Segment(p) => {
            if p.segment_id.is_empty() {
                return Err(invalid(
                    &format!("{field}.segment.segment_id"),
                    "must not be empty",
                ));
            }
            predicate(Predicate::Segment {
                id: p.segment_id.clone(),
            })
        }
        N::Did(p) => did(p, &format!("{field}.did")),
    }
}

fn did(p: &pb::DidPredicate, field: &str) -> Result<Expr, Status> {
    use pb::did_predicate::Window as W;
    if p.event.is_empty() {
        return Err(invalid(&format!("{field}.event"), "must not be empty"));
    }
    if p.at_least > i64::MAX as u64 {
        return Err(invalid(&format!("{field}.at_least"), "is too large"));
    }
    let window = match &p.window {
        None => None,
        Some(W::Last(d)) => Some(Window::Last(Duration {
            amount: d.amount,
            unit: duration_unit(d.unit, &format!("{field}.last.unit"))?,
        })),
        Some(W::Between(range)) => Some(Window::Between {
            start: value(range.start.as_ref(), &format!("{field}.between.start"))?,
            end: value(range.end.as_ref(), &format!("{field}.between.end"))?,
        }),
    };
    Ok(Expr::Predicate(Predicate::Did {
        event: p.event.clone(),
        at_least: (p.at_least > 0).then_some(p.at_least),
        window,
    }))
}

fn duration_unit(unit: i32, field: &str) -> Result<DurationUnit, Status> {
    match pb::DurationUnit::try_from(unit) {
        Ok(pb::DurationUnit::Days) => Ok(DurationUnit::Days),
        Ok(pb::DurationUnit::Hours) => Ok(DurationUnit::Hours),
        Ok(pb::DurationUnit::Minutes) => Ok(DurationUnit::Minutes),
        Ok(pb::DurationUnit::Unspecified) | Err(_) => {
            Err(invalid(field, "must be DAYS, HOURS or MINUTES"))
        }
    }
}

fn literals(values: &[pb::Literal], field: &str) -> Result<Vec<Literal>, Status> {
    if values.is_empty() {
        return Err(invalid(
            &format!("{field}.values"),
            "needs at least one value",
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| literal(Some(v), &format!("{field}.values[{i}]")))
        .collect()
}

fn literal(message: Option<&pb::Literal>, field: &str) -> Result<Literal, Status> {
    use pb::literal::Kind;
    match message.and_then(|m| m.kind.as_ref()) {
        Some(Kind::StringValue(s)) => Ok(Literal::String(s.clone())),
        Some(Kind::IntValue(i)) => Ok(Literal::Int(*i)),
        Some(Kind::DoubleValue(f)) if f.is_finite() => Ok(Literal::Float(*f)),
        Some(Kind::DoubleValue(_)) => Err(invalid(field, "must be a finite number")),
        Some(Kind::BoolValue(b)) => Ok(Literal::Bool(*b)),
        None => Err(invalid(field, "a value is required")),
    }
}

fn value(message: Option<&pb::Value>, field: &str) -> Result<Value, Status> {
    match message.and_then(|m| m.kind.as_ref()) {
        Some(pb::value::Kind::Literal(l)) => Ok(Value::Literal(literal(
            Some(l),
            &format!("{field}.literal"),
        )?)),
        Some(pb::value::Kind::Now(relative)) => {
            let unspecified = pb::DurationUnit::Unspecified as i32;
            if relative.unit == unspecified && relative.amount == 0 && !relative.subtract {
                return Ok(Value::Now { offset: None });
            }
            let unit = duration_unit(relative.unit, &format!("{field}.now.unit"))?;
            Ok(Value::Now {
                offset: Some(SignedDuration {
                    negative: relative.subtract,
                    duration: Duration {
                        amount: relative.amount,
                        unit,
                    },
                }),
            })
        }
        None => Err(invalid(field, "a value is required")),
    }
}

/// An expression as a tree message.
pub fn expr_to_node(expr: &Expr) -> pb::Node {
    use pb::node::Node as N;
    let node = match expr {
        Expr::And(children) => N::And(pb::NodeList {
            nodes: children.iter().map(expr_to_node).collect(),
        }),
        Expr::Or(children) => N::Or(pb::NodeList {
            nodes: children.iter().map(expr_to_node).collect(),
        }),
        Expr::Not(child) => N::Not(Box::new(expr_to_node(child))),
        Expr::Predicate(p) => predicate_to_node(p),
    };
    pb::Node { node: Some(node) }
}

fn predicate_to_node(predicate: &Predicate) -> pb::node::Node {
    use pb::node::Node as N;
    let lits = |values: &[Literal]| values.iter().map(literal_to_proto).collect();
    match predicate {
        Predicate::Equals {
            attribute,
            value,
            negated,
        } => N::Equals(pb::EqualsPredicate {
            attribute: attribute.clone(),
            value: Some(literal_to_proto(value)),
            negated: *negated,
        }),
        Predicate::In {
            attribute,
            values,
            negated,
        } => N::In(pb::InPredicate {
            attribute: attribute.clone(),
            values: lits(values),
            negated: *negated,
        }),
        Predicate::Has { attribute, value } => N::Has(pb::HasPredicate {
            attribute: attribute.clone(),
            value: Some(literal_to_proto(value)),
        }),
        Predicate::HasAny { attribute, values } => N::HasAny(pb::HasAnyPredicate {
            attribute: attribute.clone(),
            values: lits(values),
        }),
        Predicate::HasAll { attribute, values } => N::HasAll(pb::HasAllPredicate {
            attribute: attribute.clone(),
            values: lits(values),
        }),
        Predicate::Compare {
            attribute,
            op,
            value,
        } => N::Compare(pb::ComparePredicate {
            attribute: attribute.clone(),
            op: match op {
                CompareOp::Lt => pb::CompareOp::Lt,
                CompareOp::Le => pb::CompareOp::Le,
                CompareOp::Gt => pb::CompareOp::Gt,
                CompareOp::Ge => pb::CompareOp::Ge,
            } as i32,
            value: Some(value_to_proto(value)),
        }),
        Predicate::Between {
            attribute,
            low,
            high,
        } => N::Between(pb::BetweenPredicate {
            attribute: attribute.clone(),
            low: Some(value_to_proto(low)),
            high: Some(value_to_proto(high)),
        }),
        Predicate::IsNull { attribute, negated } => N::IsNull(pb::IsNullPredicate {
            attribute: attribute.clone(),
            negated: *negated,
        }),
        Predicate::Segment { id } => N::Segment(pb::SegmentPredicate {
            segment_id: id.clone(),
        }),
        Predicate::Did {
            event,
            at_least,
            window,
        } => N::Did(pb::DidPredicate {
            event: event.clone(),
            at_least: at_least.unwrap_or(0),
            window: window.as_ref().map(|w| match w {
                Window::Last(d) => pb::did_predicate::Window::Last(pb::Duration {
                    amount: d.amount,
                    unit: unit_to_proto(d.unit) as i32,
                }),
                Window::Between { start, end } => {
                    pb::did_predicate::Window::Between(pb::TimeRange {
                        start: Some(value_to_proto(start)),
                        end: Some(value_to_proto(end)),
                    })
                }
            }),
        }),
    }
}

fn unit_to_proto(unit: DurationUnit) -> pb::DurationUnit {
    match unit {
        DurationUnit::Days => pb::DurationUnit::Days,
        DurationUnit::Hours => pb::DurationUnit::Hours,
        DurationUnit::Minutes => pb::DurationUnit::Minutes,
    }
}

fn literal_to_proto(literal: &Literal) -> pb::Literal {
    use pb::literal::Kind;
    let kind = match literal {
        Literal::String(s) => Kind::StringValue(s.clone()),
        Literal::Int(i) => Kind::IntValue(*i),
        Literal::Float(f) => Kind::DoubleValue(*f),
        Literal::Bool(b) => Kind::BoolValue(*b),
    };
    pb::Literal { kind: Some(kind) }
}

fn value_to_proto(value: &Value) -> pb::Value {
    let kind = match value {
        Value::Literal(l) => pb::value::Kind::Literal(literal_to_proto(l)),
        Value::Now { offset } => pb::value::Kind::Now(match offset {
            None => pb::RelativeTime::default(),
            Some(o) => pb::RelativeTime {
                amount: o.duration.amount,
                unit: unit_to_proto(o.duration.unit) as i32,
                subtract: o.negative,
            },
        }),
    };
    pb::Value { kind: Some(kind) }
}

/// A batch of events; `field` names the list in errors.
pub fn events(events: &[pb::Event], field: &str) -> Result<Vec<EventRecord>, Status> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let at = |name: &str| format!("{field}[{i}].{name}");
            if e.user_id.is_empty() {
                return Err(invalid(&at("user_id"), "must not be empty"));
            }
            crate::engine::validate_key(&e.user_id)
                .map_err(|reason| invalid(&at("user_id"), reason))?;
            crate::engine::events::validate_event_name(&e.event)
                .map_err(|reason| invalid(&at("event"), reason))?;
            if e.value.is_some_and(|v| !v.is_finite()) {
                return Err(invalid(&at("value"), "must be a finite number"));
            }
            let ts = millis_from(e.ts.as_ref(), &at("ts"))?
                .ok_or_else(|| invalid(&at("ts"), "is required"))?;
            Ok(EventRecord {
                user_id: e.user_id.clone(),
                event: e.event.clone(),
                ts,
                value: e.value,
            })
        })
        .collect()
}

/// A batch of user updates.
pub fn user_updates(users: &[pb::UserUpdate]) -> Result<Vec<UserUpdate>, Status> {
    users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let field = format!("users[{i}]");
            if user.user_id.is_empty() {
                return Err(invalid(&format!("{field}.user_id"), "must not be empty"));
            }
            let changes = user
                .updates
                .iter()
                .enumerate()
                .map(|(j, u)| attribute_change(u, &format!("{field}.updates[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(UserUpdate {
                user_id: user.user_id.clone(),
                changes,
            })
        })
        .collect()
}

fn attribute_change(update: &pb::AttributeUpdate, field: &str) -> Result<AttributeChange, Status> {
    use pb::attribute_update::Change as C;
    let attribute = required_attribute(&update.attribute, field)?;
    let op = match update.change.as_ref() {
        Some(C::Set(value)) => ChangeOp::Set(attribute_value(value, &format!("{field}.set"))?),
        Some(C::Clear(true)) => ChangeOp::Clear,
        Some(C::Clear(false)) => {
            return Err(invalid(&format!("{field}.clear"), "must be true when set"))
        }
        Some(C::Add(list)) => ChangeOp::Add(list.values.clone()),
        Some(C::Remove(list)) => ChangeOp::Remove(list.values.clone()),
        None => {
            return Err(invalid(
                field,
                "one of set, clear, add or remove is required",
            ))
        }
    };
    Ok(AttributeChange { attribute, op })
}

fn attribute_value(value: &pb::AttributeValue, field: &str) -> Result<AttributeValue, Status> {
    use pb::attribute_value::Kind;
    match value.kind.as_ref() {
        Some(Kind::StringValue(s)) => Ok(AttributeValue::String(s.clone())),
        Some(Kind::SetValue(list)) => Ok(AttributeValue::Set(list.values.clone())),
        Some(Kind::BoolValue(b)) => Ok(AttributeValue::Bool(*b)),
        Some(Kind::IntValue(i)) => Ok(AttributeValue::Int(*i)),
        Some(Kind::DoubleValue(f)) if f.is_finite() => Ok(AttributeValue::Float(*f)),
        Some(Kind::DoubleValue(_)) => Err(invalid(field, "must be a finite number")),
        Some(Kind::TimestampValue(ts)) => {
            let millis = millis_from(Some(ts), &format!("{field}.timestamp_value"))?;
            Ok(AttributeValue::Timestamp(millis.unwrap_or_default()))
        }
        None => Err(invalid(field, "a value is required")),
    }
}

/// An attribute kind from the wire.
pub fn kind_from(kind: i32, field: &str) -> Result<AttributeKind, Status> {
    match pb::AttributeKind::try_from(kind) {
        Ok(pb::AttributeKind::Categorical) => Ok(AttributeKind::Categorical),
        Ok(pb::AttributeKind::Set) => Ok(AttributeKind::Set),
        Ok(pb::AttributeKind::Boolean) => Ok(AttributeKind::Boolean),
        Ok(pb::AttributeKind::Integer) => Ok(AttributeKind::Integer),
        Ok(pb::AttributeKind::Float) => Ok(AttributeKind::Float),
        Ok(pb::AttributeKind::Timestamp) => Ok(AttributeKind::Timestamp),
        Ok(pb::AttributeKind::Unspecified) | Err(_) => {
            Err(invalid(field, "an attribute kind is required"))
        }
    }
}

/// An attribute kind on the wire.
pub fn kind_to(kind: AttributeKind) -> pb::AttributeKind {
    match kind {
        AttributeKind::Categorical => pb::AttributeKind::Categorical,
        AttributeKind::Set => pb::AttributeKind::Set,
        AttributeKind::Boolean => pb::AttributeKind::Boolean,
        AttributeKind::Integer => pb::AttributeKind::Integer,
        AttributeKind::Float => pb::AttributeKind::Float,
        AttributeKind::Timestamp => pb::AttributeKind::Timestamp,
    }
}

/// A saved segment on the wire.
pub fn segment_to_proto(segment: &crate::engine::Segment) -> pb::Segment {
    let d = &segment.definition;
    pb::Segment {
        id: d.id.clone(),
        name: d.name.clone(),
        description: d.description.clone(),
        labels: d.labels.clone().into_iter().collect(),
        expression_tree: Some(expr_to_node(&d.expression)),
        expression_text: d.expression.to_string(),
        create_time: Some(timestamp(d.created_at)),
        update_time: Some(timestamp(d.updated_at)),
        size: segment.size(),
    }
}

/// Labels from the wire, sorted.
pub fn labels(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
