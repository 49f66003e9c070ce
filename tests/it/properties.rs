//! Property tests: random datasets (nulls, empty sets, unicode, deleted and re-created users)
//! and random expressions of depth ≥ 5 over every predicate give exactly the model's answer,
//! before and after random writes; materialized segments equal a fresh evaluation; member pages
//! concatenate to the full set.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use audience::engine::{
    AttributeChange, AttributeValue, Audience, Change, ChangeOp, DatasetState, Engine, UserUpdate,
};
use audience::expr::{
    CompareOp, Duration, DurationUnit, Expr, Literal, Predicate, SignedDuration, Value,
};
use audience::index::AttributeKind;
use proptest::prelude::*;

use super::model::{boolean_trees, saved_segment, Model};

/// `as_of` of every write and query: 2026-06-01T00:00:00Z.
const AS_OF: i64 = 1_780_272_000_000;
const DAY: i64 = 86_400_000;
const COUNTRIES: &[&str] = &["US", "GB", "日本", "é\"q\\", ""];
const TAGS: &[&str] = &["a", "b", "ü", "x y"];
const SCORES: &[f64] = &[-2.5, 0.0, 1.0, 3.75, 10.0, 1e-9, 1e12, -0.0];

fn schema() -> Vec<(String, AttributeKind)> {
    [
        ("country", AttributeKind::Categorical),
        ("tags", AttributeKind::Set),
        ("flag", AttributeKind::Boolean),
        ("age", AttributeKind::Integer),
        ("score", AttributeKind::Float),
        ("ts", AttributeKind::Timestamp),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_owned(), k))
    .collect()
}

fn string_of(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        9 => proptest::sample::select(pool).prop_map(str::to_owned),
        1 => Just("unknown-value".to_owned()),
    ]
}

fn int_value() -> impl Strategy<Value = i64> {
    prop_oneof![8 => -3i64..40, 1 => Just(i64::MAX), 1 => Just(i64::MIN)]
}

fn ts_value() -> impl Strategy<Value = i64> {
    // Around AS_OF, including exactly the edges of day windows.
    prop_oneof![
        (-40i64..5).prop_map(|d| AS_OF + d * DAY),
        (-40i64..5, -2i64..3).prop_map(|(d, ms)| AS_OF + d * DAY + ms),
    ]
}

fn change() -> impl Strategy<Value = AttributeChange> {
    let set = |attribute: &str, value: BoxedStrategy<AttributeValue>| {
        let attribute = attribute.to_owned();
        value.prop_map(move |v| AttributeChange {
            attribute: attribute.clone(),
            op: ChangeOp::Set(v),
        })
    };
    let tags =
        || proptest::collection::vec(proptest::sample::select(TAGS).prop_map(str::to_owned), 0..3);
    prop_oneof![
        set(
            "country",
            string_of(COUNTRIES)
                .prop_map(AttributeValue::String)
                .boxed()
        ),
        set("tags", tags().prop_map(AttributeValue::Set).boxed()),
        set("flag", any::<bool>().prop_map(AttributeValue::Bool).boxed()),
        set("age", int_value().prop_map(AttributeValue::Int).boxed()),
        set(
            "score",
            proptest::sample::select(SCORES)
                .prop_map(AttributeValue::Float)
                .boxed()
        ),
        set("ts", ts_value().prop_map(AttributeValue::Timestamp).boxed()),
        tags().prop_map(|v| AttributeChange {
            attribute: "tags".into(),
            op: ChangeOp::Add(v)
        }),
        tags().prop_map(|v| AttributeChange {
            attribute: "tags".into(),
            op: ChangeOp::Remove(v)
        }),
        proptest::sample::select(vec!["country", "tags", "flag", "age", "score", "ts"]).prop_map(
            |a| AttributeChange {
                attribute: a.into(),
                op: ChangeOp::Clear
            }
        ),
    ]
}

/// A write: upserts of users `u0..u{n}` or deletions.
#[derive(Debug, Clone)]
enum Write {
    Upsert(Vec<UserUpdate>),
    Delete(Vec<String>),
}

fn user_id() -> impl Strategy<Value = String> {
    (0u32..40).prop_map(|i| format!("u{i}"))
}

fn write() -> impl Strategy<Value = Write> {
    let update = (user_id(), proptest::collection::vec(change(), 0..5))
        .prop_map(|(user_id, changes)| UserUpdate { user_id, changes });
    prop_oneof![
        4 => proptest::collection::vec(update, 1..30).prop_map(Write::Upsert),
        1 => proptest::collection::vec(user_id(), 1..6).prop_map(Write::Delete),
    ]
}

fn string_lit(pool: &'static [&'static str]) -> impl Strategy<Value = Literal> {
    string_of(pool).prop_map(Literal::String)
}

fn lits(item: impl Strategy<Value = Literal>) -> impl Strategy<Value = Vec<Literal>> {
    proptest::collection::vec(item, 1..4)
}

fn op() -> impl Strategy<Value = CompareOp> {
    proptest::sample::select(vec![
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
    ])
}

fn number_lit() -> impl Strategy<Value = Literal> {
    prop_oneof![
        int_value().prop_map(Literal::Int),
        proptest::sample::select(vec![-2.5, 0.5, 3.75, 9.99, 1e12, -0.0, 1e300])
            .prop_map(Literal::Float),
    ]
}

fn time_value() -> impl Strategy<Value = Value> {
    let now = (
        any::<bool>(),
        0u64..35,
        proptest::sample::select(vec![DurationUnit::Days, DurationUnit::Hours]),
    )
        .prop_map(|(negative, amount, unit)| Value::Now {
            offset: Some(SignedDuration {
                negative,
                duration: Duration { amount, unit },
            }),
        });
    prop_oneof![
        now,
        Just(Value::Now { offset: None }),
        ts_value().prop_map(|t| Value::Literal(Literal::Int(t))),
        ts_value().prop_map(|t| Value::Literal(Literal::String(audience::time::format_rfc3339(t)))),
    ]
}

/// Every predicate form, with literals of the right kind for the attribute.
fn predicate(segments: Vec<String>) -> BoxedStrategy<Expr> {
    let p = |s: BoxedStrategy<Predicate>| s.prop_map(Expr::Predicate).boxed();
    let a = |name: &str| name.to_owned();
    let num_value = || number_lit().prop_map(Value::Literal);
    let mut choices: Vec<BoxedStrategy<Expr>> = vec![
        p((string_lit(COUNTRIES), any::<bool>())
            .prop_map(move |(value, negated)| Predicate::Equals {
                attribute: a("country"),
                value,
                negated,
            })
            .boxed()),
        p((lits(string_lit(COUNTRIES)), any::<bool>())
            .prop_map(move |(values, negated)| Predicate::In {
                attribute: a("country"),
                values,
                negated,
            })
            .boxed()),
        p(string_lit(COUNTRIES)
            .prop_map(move |value| Predicate::Has {
                attribute: a("country"),
                value,
            })
            .boxed()),
        p(lits(string_lit(COUNTRIES))
            .prop_map(move |values| Predicate::HasAll {
                attribute: a("country"),
                values,
            })
            .boxed()),
        p((op(), string_lit(COUNTRIES))
            .prop_map(move |(op, v)| Predicate::Compare {
                attribute: a("country"),
                op,
                value: Value::Literal(v),
            })
            .boxed()),
        p((string_lit(TAGS), any::<bool>())
            .prop_map(move |(value, negated)| Predicate::Equals {
                attribute: a("tags"),
                value,
                negated,
            })
            .boxed()),
        p((lits(string_lit(TAGS)), any::<bool>())
            .prop_map(move |(values, negated)| Predicate::In {
                attribute: a("tags"),
                values,
                negated,
            })
            .boxed()),
        p(string_lit(TAGS)
            .prop_map(move |value| Predicate::Has {
                attribute: a("tags"),
                value,
            })
            .boxed()),
        p(lits(string_lit(TAGS))
            .prop_map(move |values| Predicate::HasAny {
                attribute: a("tags"),
                values,
            })
            .boxed()),
        p(lits(string_lit(TAGS))
            .prop_map(move |values| Predicate::HasAll {
                attribute: a("tags"),
                values,
            })
            .boxed()),
        p((any::<bool>(), any::<bool>())
            .prop_map(move |(b, negated)| Predicate::Equals {
                attribute: a("flag"),
                value: Literal::Bool(b),
                negated,
            })
            .boxed()),
        p((lits(any::<bool>().prop_map(Literal::Bool)), any::<bool>())
            .prop_map(move |(values, negated)| Predicate::In {
                attribute: a("flag"),
                values,
                negated,
            })
            .boxed()),
        p((number_lit(), any::<bool>())
            .prop_map(move |(value, negated)| Predicate::Equals {
                attribute: a("age"),
                value,
                negated,
            })
            .boxed()),
        p((lits(number_lit()), any::<bool>())
            .prop_map(move |(values, negated)| Predicate::In {
                attribute: a("age"),
                values,
                negated,
            })
            .boxed()),
        p((op(), num_value())
            .prop_map(move |(op, value)| Predicate::Compare {
                attribute: a("age"),
                op,
                value,
            })
            .boxed()),
        p((num_value(), num_value())
            .prop_map(move |(low, high)| Predicate::Between {
                attribute: a("age"),
                low,
                high,
            })
            .boxed()),
        p((number_lit(), any::<bool>())
            .prop_map(move |(value, negated)| Predicate::Equals {
                attribute: a("score"),
                value,
                negated,
            })
            .boxed()),
        p((op(), num_value())
            .prop_map(move |(op, value)| Predicate::Compare {
                attribute: a("score"),
                op,
                value,
            })
            .boxed()),
        p((num_value(), num_value())
            .prop_map(move |(low, high)| Predicate::Between {
                attribute: a("score"),
                low,
                high,
            })
            .boxed()),
        p((op(), time_value())
            .prop_map(move |(op, value)| Predicate::Compare {
                attribute: a("ts"),
                op,
                value,
            })
            .boxed()),
        p((time_value(), time_value())
            .prop_map(move |(low, high)| Predicate::Between {
                attribute: a("ts"),
                low,
                high,
            })
            .boxed()),
        p((
            proptest::sample::select(vec!["country", "tags", "flag", "age", "score", "ts"]),
            any::<bool>(),
        )
            .prop_map(|(attribute, negated)| Predicate::IsNull {
                attribute: attribute.into(),
                negated,
            })
            .boxed()),
    ];
    if !segments.is_empty() {
        choices.push(p(proptest::sample::select(segments)
            .prop_map(|id| Predicate::Segment { id })
            .boxed()));
    }
    proptest::strategy::Union::new(choices).boxed()
}

fn expression(segments: Vec<String>) -> BoxedStrategy<Expr> {
    boolean_trees(predicate(segments), 6, 48)
}

/// The engine's members of `expr` as external ids.
fn engine_select(state: &DatasetState, expr: &Expr) -> BTreeSet<String> {
    let members = state
        .select(&Audience::Expression(expr.clone()), AS_OF)
        .expect("query binds");
    members
        .iter()
        .map(|id| state.keys().key(id).expect("member has a key").to_owned())
        .collect()
}

fn apply(state: &mut DatasetState, model: &mut Model, write: &Write) {
    match write {
        Write::Upsert(updates) => {
            state
                .apply(&Change::UpsertUsers(updates.clone()), AS_OF)
                .expect("upsert applies");
            model.upsert(updates);
        }
        Write::Delete(ids) => {
            state
                .apply(&Change::DeleteUsers(ids.clone()), AS_OF)
                .expect("delete applies");
            model.delete(ids);
        }
    }
}

fn new_state() -> DatasetState {
    let mut state = DatasetState::default();
    state
        .apply(&Change::DeclareAttributes(schema()), AS_OF)
        .expect("declare");
    state
}

/// Writes, then segments defined over the data, then more writes, then queries.
#[derive(Debug, Clone)]
struct Scenario {
    before: Vec<Write>,
    segments: Vec<Expr>,
    after: Vec<Write>,
    queries: Vec<Expr>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec(write(), 1..6),
        proptest::collection::vec(expression(vec![]), 0..3),
        proptest::collection::vec(write(), 0..6),
    )
        .prop_flat_map(|(before, segments, after)| {
            let ids: Vec<String> = (0..segments.len()).map(|i| format!("s{i}")).collect();
            let queries = proptest::collection::vec(expression(ids), 1..6);
            (Just(before), Just(segments), Just(after), queries)
        })
        .prop_map(|(before, segments, after, queries)| Scenario {
            before,
            segments,
            after,
            queries,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn queries_and_segments_match_the_row_model(s in scenario()) {
        let mut state = new_state();
        let mut model = Model::default();
        for w in &s.before {
            apply(&mut state, &mut model, w);
        }
        for (i, expr) in s.segments.iter().enumerate() {
            let id = format!("s{i}");
            state.apply(&Change::CreateSegment(saved_segment(&id, expr.clone(), AS_OF)), AS_OF).expect("segment");
            model.segments.insert(id, expr.clone());
        }
        for w in &s.after {
            apply(&mut state, &mut model, w);
        }
        // Materialized segments, kept current incrementally, equal the model and a fresh evaluation.
        for (id, expr) in &model.segments {
            let members = &state.segments()[id].members();
            let materialized: BTreeSet<String> =
                members.iter().map(|u| state.keys().key(u).unwrap().to_owned()).collect();
            prop_assert_eq!(&materialized, &model.select(expr, AS_OF), "segment {} = {}", id, expr);
            prop_assert_eq!(&materialized, &engine_select(&state, expr));
        }
        // The per-user lookup mirrors the materialized members, for every user ever written.
        let expected_by_segment: BTreeMap<&String, BTreeSet<String>> =
            model.segments.iter().map(|(id, e)| (id, model.select(e, AS_OF))).collect();
        for user in (0..40).map(|i| format!("u{i}")) {
            let expected: Vec<&str> = expected_by_segment
                .iter()
                .filter(|(_, members)| members.contains(&user))
                .map(|(id, _)| id.as_str())
                .collect();
            prop_assert_eq!(state.segments_for_user(&user), expected, "segments of {}", user);
        }
        for expr in &s.queries {
            let expected = model.select(expr, AS_OF);
            prop_assert_eq!(&engine_select(&state, expr), &expected, "query {}", expr);
            let count = state.count(&Audience::Expression(expr.clone()), AS_OF).unwrap();
            prop_assert_eq!(count, expected.len() as u64, "count {}", expr);
            // The text form and the protobuf tree are the same expression.
            let reparsed = audience::expr::parse(&expr.to_string()).unwrap();
            prop_assert_eq!(&reparsed, expr);
            let node = audience::grpc::convert::expr_to_node(expr);
            let from_tree = audience::grpc::convert::node_to_expr(&node, "tree").unwrap();
            prop_assert_eq!(&from_tree, expr);
        }
    }

    #[test]
    fn member_pages_concatenate_to_the_full_set(
        writes in proptest::collection::vec(write(), 1..5),
        expr in expression(vec![]),
        page in 1usize..7,
    ) {
        let mut state = new_state();
        let mut model = Model::default();
        for w in &writes {
            apply(&mut state, &mut model, w);
        }
        let engine = Engine::default();
        let state = Arc::new(state);
        let audience = Audience::Expression(expr.clone());
        let mut listed = Vec::new();
        let mut next = engine.first_page("default", state.clone(), &audience, AS_OF, page).unwrap();
        loop {
            prop_assert!(next.user_ids.len() <= page);
            listed.extend(next.user_ids.clone());
            if next.next_token.is_empty() {
                break;
            }
            next = engine.next_page("default", None, &next.next_token, page).unwrap();
        }
        let unique: BTreeSet<String> = listed.iter().cloned().collect();
        prop_assert_eq!(unique.len(), listed.len(), "duplicates in pages");
        prop_assert_eq!(unique, model.select(&expr, AS_OF));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Enough users that numeric indexes cut real buckets, then move users across them; ranges
    /// are also queried inside scopes narrowed by set and categorical operands (and their
    /// negations), so that scans, whole buckets and the order of operands all answer.
    #[test]
    fn ranges_over_rebucketed_columns_match_the_model(
        users in proptest::collection::vec(
            (proptest::option::weighted(0.9, -50i64..5_000), 0u8..16, 0usize..COUNTRIES.len()),
            3_000,
        ),
        moves in proptest::collection::vec((0usize..3_000, proptest::option::of(-50i64..5_000)), 0..200),
        queries in proptest::collection::vec(
            (op(), -60i64..5_100, -60i64..5_100, proptest::sample::select(vec![0.0, 0.5]), 1u8..16),
            8),
    ) {
        let mut state = new_state();
        let mut model = Model::default();
        let age = |age: Option<i64>| AttributeChange {
            attribute: "age".into(),
            op: age.map_or(ChangeOp::Clear, |a| ChangeOp::Set(AttributeValue::Int(a))),
        };
        for chunk in users.chunks(1_000).enumerate() {
            let updates: Vec<UserUpdate> = chunk.1.iter().enumerate()
                .map(|(j, &(years, tags, country))| UserUpdate {
                    user_id: format!("u{}", chunk.0 * 1_000 + j),
                    changes: vec![
                        age(years),
                        AttributeChange {
                            attribute: "tags".into(),
                            op: ChangeOp::Set(AttributeValue::Set(tag_subset(tags))),
                        },
                        AttributeChange {
                            attribute: "country".into(),
                            op: ChangeOp::Set(AttributeValue::String(COUNTRIES[country].into())),
                        },
                    ],
                })
                .collect();
            apply(&mut state, &mut model, &Write::Upsert(updates));
        }
        let moved: Vec<UserUpdate> = moves.iter()
            .map(|(i, years)| UserUpdate { user_id: format!("u{i}"), changes: vec![age(*years)] })
            .collect();
        apply(&mut state, &mut model, &Write::Upsert(moved));
        for (op, a, b, frac, tags) in queries {
            let low = a.min(b) as f64 + frac;
            let compare = |op, value| Expr::Predicate(Predicate::Compare {
                attribute: "age".into(),
                op,
                value: Value::Literal(Literal::Int(value)),
            });
            let between = Expr::Predicate(Predicate::Between {
                attribute: "age".into(),
                low: Value::Literal(Literal::Float(low)),
                high: Value::Literal(Literal::Int(a.max(b))),
            });
            let tag_literals: Vec<Literal> =
                tag_subset(tags).into_iter().map(Literal::String).collect();
            let any_tag = Expr::Predicate(Predicate::HasAny {
                attribute: "tags".into(),
                values: tag_literals.clone(),
            });
            let countries = Expr::Predicate(Predicate::In {
                attribute: "country".into(),
                values: tag_literals.iter().take(1)
                    .map(|_| Literal::String(COUNTRIES[tags as usize % COUNTRIES.len()].into()))
                    .chain([Literal::String("US".into())])
                    .collect(),
                negated: false,
            });
            let exprs = [
                compare(op, a),
                between.clone(),
                Expr::And(vec![
                    compare(CompareOp::Ge, a.min(b)),
                    Expr::Not(Box::new(compare(CompareOp::Gt, a.max(b)))),
                ]),
                Expr::And(vec![between.clone(), any_tag.clone(), countries.clone()]),
                Expr::And(vec![compare(op, a), Expr::Not(Box::new(countries.clone())), any_tag.clone()]),
                Expr::And(vec![Expr::Not(Box::new(any_tag.clone())), between, compare(op, b)]),
                Expr::Or(vec![Expr::And(vec![any_tag, compare(op, b)]), countries]),
            ];
            for expr in &exprs {
                prop_assert_eq!(&engine_select(&state, expr), &model.select(expr, AS_OF), "{}", expr);
                prop_assert_eq!(state.count(&Audience::Expression(expr.clone()), AS_OF).unwrap(), model.select(expr, AS_OF).len() as u64);
            }
        }
    }
}

/// The tags whose bits are set in `mask`.
fn tag_subset(mask: u8) -> Vec<String> {
    TAGS.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, t)| (*t).to_owned())
        .collect()
}

/// A value most users hold (as `0` in a spend column), a few common ones and a long tail.
fn heavy_score() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => Just(0.0),
        1 => Just(9.99),
        3 => (1u32..500_000).prop_map(|cents| f64::from(cents) / 100.0),
    ]
}

fn heavy_age() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![5 => Just(Some(30)), 4 => (13i64..90).prop_map(Some), 1 => Just(None)]
}

/// One single-user write over the heavy columns, of a user that exists or a new one.
fn heavy_write() -> impl Strategy<Value = UserUpdate> {
    (
        0u32..4_200,
        proptest::option::of(heavy_score()),
        heavy_age(),
        string_of(COUNTRIES),
    )
        .prop_map(|(user, score, age, country)| UserUpdate {
            user_id: format!("u{user}"),
            changes: vec![
                AttributeChange {
                    attribute: "score".into(),
                    op: score.map_or(ChangeOp::Clear, |s| ChangeOp::Set(AttributeValue::Float(s))),
                },
                AttributeChange {
                    attribute: "age".into(),
                    op: age.map_or(ChangeOp::Clear, |a| ChangeOp::Set(AttributeValue::Int(a))),
                },
                AttributeChange {
                    attribute: "country".into(),
                    op: ChangeOp::Set(AttributeValue::String(country)),
                },
            ],
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// Skewed data, as production has it: enough users that the numeric indexes cut real
    /// buckets around a heavy value, then single-user writes (each its own change, as live
    /// traffic sends them) that move users into, out of and around the heavy values, with saved
    /// segments over those columns kept current on every write.
    #[test]
    fn single_writes_over_heavy_values_keep_segments_and_ranges_exact(
        initial in proptest::collection::vec((heavy_score(), heavy_age()), 4_000),
        writes in proptest::collection::vec(heavy_write(), 1..120),
        deletes in proptest::collection::vec(0u32..4_200, 0..10),
    ) {
        let mut state = new_state();
        let mut model = Model::default();
        let updates: Vec<UserUpdate> = initial.iter().enumerate().map(|(i, (score, age))| UserUpdate {
            user_id: format!("u{i}"),
            changes: vec![
                AttributeChange { attribute: "score".into(), op: ChangeOp::Set(AttributeValue::Float(*score)) },
                AttributeChange {
                    attribute: "age".into(),
                    op: age.map_or(ChangeOp::Clear, |a| ChangeOp::Set(AttributeValue::Int(a))),
                },
            ],
        }).collect();
        apply(&mut state, &mut model, &Write::Upsert(updates));
        let segments = [
            "score = 0",
            "score > 0",
            "score BETWEEN 0 AND 9.99",
            "score >= 9.99 AND age >= 30",
            "NOT score = 0 AND age < 31",
            r#"age = 30 OR country = "US""#,
            "score IS NULL OR age IS NULL",
        ];
        for (i, text) in segments.iter().enumerate() {
            let expr = audience::expr::parse(text).unwrap();
            let id = format!("h{i}");
            state.apply(&Change::CreateSegment(saved_segment(&id, expr.clone(), AS_OF)), AS_OF).expect("segment");
            model.segments.insert(id, expr);
        }
        for (i, write) in writes.iter().enumerate() {
            apply(&mut state, &mut model, &Write::Upsert(vec![write.clone()]));
            if let Some(user) = deletes.get(i) {
                apply(&mut state, &mut model, &Write::Delete(vec![format!("u{user}")]));
            }
        }
        for (id, expr) in &model.segments {
            let materialized: BTreeSet<String> = state.segments()[id].members().iter()
                .map(|u| state.keys().key(u).unwrap().to_owned()).collect();
            prop_assert_eq!(&materialized, &model.select(expr, AS_OF), "segment {} = {}", id, expr);
        }
        for text in ["score = 0", "score BETWEEN 0 AND 0.5", "score > 9.99", "age BETWEEN 30 AND 30", "age > 30"] {
            let expr = audience::expr::parse(text).unwrap();
            prop_assert_eq!(&engine_select(&state, &expr), &model.select(&expr, AS_OF), "{}", text);
        }
    }
}
