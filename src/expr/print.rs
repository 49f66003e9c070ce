//! [`Expr`] → canonical text, the inverse of [`super::parse()`].
//!
//! Keywords print uppercase and parentheses appear only where precedence (NOT > AND > OR) or the
//! tree's shape needs them, so `parse(&to_text(e)) == Ok(e)` for every tree the parser builds and
//! for every hand-built tree whose And/Or nodes have at least two children.
//!
//! Text that no parser accepts comes only from trees the parser never builds: an And/Or with
//! fewer than two children, an empty IN/HAS ANY/HAS ALL list, an attribute name that is not an
//! identifier or is a keyword, and a non-finite float (printed as `inf`/`NaN`; the protobuf
//! converter rejects those before they reach a tree).

use super::{Duration, Expr, Literal, Predicate, SignedDuration, Value, Window};

/// The canonical text of `expr`.
pub fn to_text(expr: &Expr) -> String {
    let mut out = String::new();
    write_expr(&mut out, expr);
    out
}

fn write_expr(out: &mut String, expr: &Expr) {
    match expr {
        // A nested And must keep its parentheses, or it would come back flattened.
        Expr::And(children) => write_joined(out, children, " AND ", |child| {
            matches!(child, Expr::And(_) | Expr::Or(_))
        }),
        Expr::Or(children) => {
            write_joined(out, children, " OR ", |child| matches!(child, Expr::Or(_)))
        }
        Expr::Not(child) => {
            out.push_str("NOT ");
            let wrap = matches!(**child, Expr::And(_) | Expr::Or(_));
            write_operand(out, child, wrap);
        }
        Expr::Predicate(predicate) => write_predicate(out, predicate),
    }
}

fn write_joined(out: &mut String, children: &[Expr], separator: &str, wrap: fn(&Expr) -> bool) {
    for (index, child) in children.iter().enumerate() {
        if index > 0 {
            out.push_str(separator);
        }
        write_operand(out, child, wrap(child));
    }
}

fn write_operand(out: &mut String, expr: &Expr, wrap: bool) {
    if wrap {
        out.push('(');
        write_expr(out, expr);
        out.push(')');
    } else {
        write_expr(out, expr);
    }
}

fn write_predicate(out: &mut String, predicate: &Predicate) {
    match predicate {
        Predicate::Equals {
            attribute,
            value,
            negated,
        } => {
            let op = if *negated { " != " } else { " = " };
            push_all(out, &[attribute, op, &literal_text(value)]);
        }
        Predicate::In {
            attribute,
            values,
            negated,
        } => {
            let op = if *negated { " NOT IN " } else { " IN " };
            push_all(out, &[attribute, op, &list_text(values)]);
        }
        Predicate::Has { attribute, value } => {
            push_all(out, &[attribute, " HAS ", &literal_text(value)]);
        }
        Predicate::HasAny { attribute, values } => {
            push_all(out, &[attribute, " HAS ANY ", &list_text(values)]);
        }
        Predicate::HasAll { attribute, values } => {
            push_all(out, &[attribute, " HAS ALL ", &list_text(values)]);
        }
        Predicate::Compare {
            attribute,
            op,
            value,
        } => push_all(out, &[attribute, " ", op.symbol(), " ", &value_text(value)]),
        Predicate::Between {
            attribute,
            low,
            high,
        } => push_all(
            out,
            &[
                attribute,
                " BETWEEN ",
                &value_text(low),
                " AND ",
                &value_text(high),
            ],
        ),
        Predicate::IsNull { attribute, negated } => {
            let test = if *negated { " IS NOT NULL" } else { " IS NULL" };
            push_all(out, &[attribute, test]);
        }
        Predicate::Segment { id } => push_all(out, &["SEGMENT ", &string_text(id)]),
        Predicate::Did {
            event,
            at_least,
            window,
        } => {
            out.push_str("DID ");
            if super::parse::is_plain_identifier(event) {
                out.push_str(event);
            } else {
                out.push_str(&string_text(event));
            }
            if let Some(k) = at_least {
                push_all(out, &[" AT LEAST ", &k.to_string(), " TIMES"]);
            }
            match window {
                None => {}
                Some(Window::Last(duration)) => {
                    push_all(out, &[" IN LAST ", &duration_text(*duration)])
                }
                Some(Window::Between { start, end }) => push_all(
                    out,
                    &[" BETWEEN ", &value_text(start), " AND ", &value_text(end)],
                ),
            }
        }
    }
}

fn push_all(out: &mut String, parts: &[&str]) {
    parts.iter().for_each(|part| out.push_str(part));
}

fn list_text(values: &[Literal]) -> String {
    let items: Vec<String> = values.iter().map(literal_text).collect();
    format!("({})", items.join(", "))
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Literal(literal) => literal_text(literal),
        Value::Now { offset: None } => "NOW".to_owned(),
        Value::Now {
            offset: Some(offset),
        } => format!("NOW {}", offset_text(*offset)),
    }
}

fn offset_text(offset: SignedDuration) -> String {
    let sign = if offset.negative { '-' } else { '+' };
    format!("{sign} {}", duration_text(offset.duration))
}

fn duration_text(duration: Duration) -> String {
    let unit = match duration.unit {
        super::DurationUnit::Days => 'd',
        super::DurationUnit::Hours => 'h',
        super::DurationUnit::Minutes => 'm',
    };
    format!("{}{unit}", duration.amount)
}

fn literal_text(literal: &Literal) -> String {
    match literal {
        Literal::String(s) => string_text(s),
        Literal::Int(i) => i.to_string(),
        Literal::Float(f) => float_text(*f),
        Literal::Bool(true) => "TRUE".to_owned(),
        Literal::Bool(false) => "FALSE".to_owned(),
    }
}

/// `{:?}` is the shortest text that reads back to the same `f64`; it already has a `.` or an
/// exponent for finite values, and the `.0` guard keeps it lexing as a float regardless.
fn float_text(value: f64) -> String {
    let text = format!("{value:?}");
    let integral = text
        .strip_prefix('-')
        .unwrap_or(&text)
        .chars()
        .all(|c| c.is_ascii_digit());
    if integral {
        text + ".0"
    } else {
        text
    }
}

fn string_text(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::parse::parse_with_limit;
    use crate::expr::{parse, CompareOp, Duration, DurationUnit};
    use proptest::prelude::*;

    fn eq(attribute: &str, value: Literal) -> Expr {
        Expr::Predicate(Predicate::Equals {
            attribute: attribute.into(),
            value,
            negated: false,
        })
    }

    fn int(attribute: &str, value: i64) -> Expr {
        eq(attribute, Literal::Int(value))
    }

    fn not(expr: Expr) -> Expr {
        Expr::Not(Box::new(expr))
    }

    fn is_null(attribute: &str) -> Expr {
        Expr::Predicate(Predicate::IsNull {
            attribute: attribute.into(),
            negated: false,
        })
    }

    fn round_trips(expr: &Expr) {
        let text = to_text(expr);
        assert_eq!(parse(&text), Ok(expr.clone()), "text {text:?}");
    }

    #[test]
    fn canonical_examples() {
        let text = "country = \"US\" AND age BETWEEN 25 AND 34 AND interests HAS \"sports\"";
        let parsed = parse(text);
        assert_eq!(parsed.as_ref().map(to_text), Ok(text.to_owned()));
        assert_eq!(
            parse("not  country in (\"US\",\"GB\")").map(|e| to_text(&e)),
            Ok("NOT country IN (\"US\", \"GB\")".to_owned())
        );
        let mixed = Expr::And(vec![
            Expr::Or(vec![int("a", 1), int("b", 2)]),
            not(is_null("c")),
        ]);
        assert_eq!(to_text(&mixed), "(a = 1 OR b = 2) AND NOT c IS NULL");
        round_trips(&mixed);
    }

    #[test]
    fn every_predicate_form() {
        let cases = [
            "a != -5",
            "a IN (1, 2.5, TRUE, \"x\")",
            "a NOT IN (FALSE)",
            "a HAS \"x\"",
            "a HAS ANY (1)",
            "a HAS ALL (1, 2)",
            "a < 1",
            "a <= NOW",
            "a > NOW - 30d",
            "a >= NOW + 12h",
            "a BETWEEN NOW - 90m AND 1e20",
            "a IS NULL",
            "a IS NOT NULL",
            "SEGMENT \"s\\\"1\"",
        ];
        for text in cases {
            assert_eq!(parse(text).map(|e| to_text(&e)), Ok(text.to_owned()));
        }
    }

    #[test]
    fn parentheses_only_where_needed() {
        let (a, b, c) = (int("a", 1), int("b", 2), int("c", 3));
        let cases = [
            (
                Expr::And(vec![Expr::And(vec![a.clone(), b.clone()]), c.clone()]),
                "(a = 1 AND b = 2) AND c = 3",
            ),
            (
                Expr::Or(vec![a.clone(), Expr::Or(vec![b.clone(), c.clone()])]),
                "a = 1 OR (b = 2 OR c = 3)",
            ),
            (
                Expr::Or(vec![Expr::And(vec![a.clone(), b.clone()]), c.clone()]),
                "a = 1 AND b = 2 OR c = 3",
            ),
            (
                not(Expr::And(vec![a.clone(), b.clone()])),
                "NOT (a = 1 AND b = 2)",
            ),
            (not(not(a.clone())), "NOT NOT a = 1"),
            (
                Expr::And(vec![not(a.clone()), b.clone()]),
                "NOT a = 1 AND b = 2",
            ),
        ];
        for (expr, text) in cases {
            assert_eq!(to_text(&expr), text);
            round_trips(&expr);
        }
    }

    #[test]
    fn floats_always_read_back_as_floats() {
        let cases = [
            (3.0, "3.0"),
            (-0.0, "-0.0"),
            (1e20, "1e20"),
            (1e-7, "1e-7"),
            (0.1, "0.1"),
            (f64::MAX, "1.7976931348623157e308"),
            (5e-324, "5e-324"),
        ];
        for (value, text) in cases {
            assert_eq!(float_text(value), text);
            round_trips(&eq("x", Literal::Float(value)));
        }
        assert_eq!(float_text(f64::NAN), "NaN");
    }

    #[test]
    fn strings_escape_quotes_and_backslashes() {
        let tricky = "a \"quoted\" \\ back\\slash\n😀";
        assert_eq!(
            string_text(tricky),
            "\"a \\\"quoted\\\" \\\\ back\\\\slash\n😀\""
        );
        round_trips(&eq("x", Literal::String(tricky.into())));
    }

    #[test]
    fn extreme_integers_and_durations() {
        round_trips(&int("x", i64::MIN));
        round_trips(&int("x", i64::MAX));
        round_trips(&Expr::Predicate(Predicate::Compare {
            attribute: "t".into(),
            op: CompareOp::Lt,
            value: Value::Now {
                offset: Some(SignedDuration {
                    negative: true,
                    duration: Duration {
                        amount: u64::MAX,
                        unit: DurationUnit::Minutes,
                    },
                }),
            },
        }));
    }

    const KEYWORDS: &[&str] = &[
        "AND", "OR", "NOT", "IN", "HAS", "ANY", "ALL", "BETWEEN", "IS", "NULL", "DID", "AT",
        "LEAST", "TIMES", "SEGMENT", "NOW", "TRUE", "FALSE", "LAST",
    ];

    fn attribute() -> impl Strategy<Value = String> {
        "[A-Za-z_][A-Za-z0-9_.]{0,8}".prop_filter("keywords are reserved", |name| {
            !KEYWORDS.iter().any(|kw| kw.eq_ignore_ascii_case(name))
        })
    }

    fn text_value() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z\"\\\\ é😀\n]{0,8}"]
    }

    fn float() -> impl Strategy<Value = f64> {
        let special = proptest::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -2.5e3,
            1e20,
            1e-7,
            5e-324,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
        ]);
        prop_oneof![
            special,
            any::<f64>().prop_filter("finite", |f| f.is_finite())
        ]
    }

    fn literal() -> impl Strategy<Value = Literal> {
        prop_oneof![
            text_value().prop_map(Literal::String),
            any::<i64>().prop_map(Literal::Int),
            prop_oneof![Just(i64::MIN), Just(i64::MAX), -5i64..5].prop_map(Literal::Int),
            float().prop_map(Literal::Float),
            any::<bool>().prop_map(Literal::Bool),
        ]
    }

    fn literals() -> impl Strategy<Value = Vec<Literal>> {
        proptest::collection::vec(literal(), 1..4)
    }

    fn offset() -> impl Strategy<Value = SignedDuration> {
        let unit = prop_oneof![
            Just(DurationUnit::Days),
            Just(DurationUnit::Hours),
            Just(DurationUnit::Minutes)
        ];
        let amount = prop_oneof![0u64..1000, any::<u64>()];
        (any::<bool>(), amount, unit).prop_map(|(negative, amount, unit)| SignedDuration {
            negative,
            duration: Duration { amount, unit },
        })
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            literal().prop_map(Value::Literal),
            proptest::option::of(offset()).prop_map(|offset| Value::Now { offset }),
        ]
    }

    fn compare_op() -> impl Strategy<Value = CompareOp> {
        prop_oneof![
            Just(CompareOp::Lt),
            Just(CompareOp::Le),
            Just(CompareOp::Gt),
            Just(CompareOp::Ge)
        ]
    }

    fn predicate() -> BoxedStrategy<Predicate> {
        let a = attribute;
        prop_oneof![
            (a(), literal(), any::<bool>()).prop_map(|(attribute, value, negated)| {
                Predicate::Equals {
                    attribute,
                    value,
                    negated,
                }
            }),
            (a(), literals(), any::<bool>()).prop_map(|(attribute, values, negated)| {
                Predicate::In {
                    attribute,
                    values,
                    negated,
                }
            }),
            (a(), literal()).prop_map(|(attribute, value)| Predicate::Has { attribute, value }),
            (a(), literals())
                .prop_map(|(attribute, values)| Predicate::HasAny { attribute, values }),
            (a(), literals())
                .prop_map(|(attribute, values)| Predicate::HasAll { attribute, values }),
            (a(), compare_op(), value()).prop_map(|(attribute, op, value)| Predicate::Compare {
                attribute,
                op,
                value
            }),
            (a(), value(), value()).prop_map(|(attribute, low, high)| Predicate::Between {
                attribute,
                low,
                high
            }),
            (a(), any::<bool>())
                .prop_map(|(attribute, negated)| Predicate::IsNull { attribute, negated }),
            text_value().prop_map(|id| Predicate::Segment { id }),
            (
                prop_oneof![a(), text_value()],
                proptest::option::of(1u64..=i64::MAX as u64),
                proptest::option::of(window()),
            )
                .prop_map(|(event, at_least, window)| Predicate::Did {
                    event,
                    at_least,
                    window
                })
                .boxed(),
        ]
        .boxed()
    }

    fn window() -> BoxedStrategy<Window> {
        prop_oneof![
            offset().prop_map(|o| Window::Last(o.duration)),
            (value(), value()).prop_map(|(start, end)| Window::Between { start, end }),
        ]
        .boxed()
    }

    fn expr() -> impl Strategy<Value = Expr> {
        predicate()
            .prop_map(Expr::Predicate)
            .prop_recursive(6, 64, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 2..5).prop_map(Expr::And),
                    proptest::collection::vec(inner.clone(), 2..5).prop_map(Expr::Or),
                    inner.prop_map(|child| Expr::Not(Box::new(child))),
                ]
            })
    }

    proptest! {
        #[test]
        fn printed_text_parses_back_to_the_same_tree(e in expr()) {
            let text = to_text(&e);
            prop_assert_eq!(parse(&text), Ok(e.clone()), "text {:?}", text);
            // The printer adds at most one nesting level per tree level below the root.
            let limit = e.depth() - 1;
            prop_assert_eq!(parse_with_limit(&text, limit), Ok(e));
        }
    }
}
