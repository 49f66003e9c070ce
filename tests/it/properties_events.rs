//! Property tests of behaviour: random event histories (equal timestamps, events exactly on
//! window edges, late and future events, deleted and re-created users, retention) and random
//! expressions mixing DID with attribute predicates give exactly the answer of a row-by-row
//! count over the raw events, at many `as_of` instants; materialized segments stay equal to
//! the model as time moves with no write at all.

use std::collections::BTreeSet;

use audience::engine::{
    AttributeChange, AttributeValue, Audience, Change, ChangeOp, DatasetState, EventRecord,
    UserUpdate,
};
use audience::expr::{
    CompareOp, Duration, DurationUnit, Expr, Literal, Predicate, SignedDuration, Value, Window,
};
use audience::index::AttributeKind;
use proptest::prelude::*;

use super::model::{boolean_trees, saved_segment, Model};

/// Where every scenario starts: 2026-06-01T00:00:00Z.
const T0: i64 = 1_780_272_000_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;
const EVENTS: &[&str] = &["view", "cart", "buy"];
const COUNTRIES: &[&str] = &["US", "GB"];

fn user() -> impl Strategy<Value = String> {
    (0..12u32).prop_map(|i| format!("u{i}"))
}

/// An offset from the current instant, dense around the edges of the windows used below.
fn offset() -> impl Strategy<Value = i64> {
    let edges = [
        0,
        -1,
        1,
        -DAY,
        -DAY - 1,
        -DAY + 1,
        -7 * DAY,
        -7 * DAY + 1,
        -2 * HOUR,
        -90 * MINUTE,
    ];
    prop_oneof![
        4 => proptest::sample::select(edges.to_vec()),
        3 => -12 * DAY..DAY,
        1 => -45 * DAY..-12 * DAY,
        1 => (-3i64..=1).prop_map(|d| d * DAY),
    ]
}

/// One step of a history; each applies at the current instant, which only `Advance` moves.
#[derive(Debug, Clone)]
enum Step {
    Events(Vec<(String, &'static str, i64)>),
    Upsert(String, Option<&'static str>, Option<i64>),
    Delete(Vec<String>),
    Advance(i64),
    Retention(u32),
}

fn step() -> impl Strategy<Value = Step> {
    let event = (user(), proptest::sample::select(EVENTS), offset());
    prop_oneof![
        5 => proptest::collection::vec(event, 1..12).prop_map(Step::Events),
        2 => (
            user(),
            proptest::option::of(proptest::sample::select(COUNTRIES)),
            proptest::option::of(0i64..5),
        )
            .prop_map(|(u, c, a)| Step::Upsert(u, c, a)),
        1 => proptest::collection::vec(user(), 1..3).prop_map(Step::Delete),
        1 => (2u32..40).prop_map(Step::Retention),
        2 => prop_oneof![
            Just(1),
            Just(MINUTE),
            Just(HOUR),
            Just(DAY),
            Just(DAY - 1),
            (1..10 * DAY),
        ]
        .prop_map(Step::Advance),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..9).prop_map(|amount| Duration {
            amount,
            unit: DurationUnit::Days
        }),
        (1u64..50).prop_map(|amount| Duration {
            amount,
            unit: DurationUnit::Hours
        }),
        Just(Duration {
            amount: 90,
            unit: DurationUnit::Minutes
        }),
    ]
}

fn bound() -> impl Strategy<Value = Value> {
    prop_oneof![
        (any::<bool>(), duration()).prop_map(|(negative, duration)| Value::Now {
            offset: Some(SignedDuration { negative, duration })
        }),
        Just(Value::Now { offset: None }),
        offset().prop_map(|o| Value::Literal(Literal::Int(T0 + o))),
        Just(Value::Literal(Literal::String(
            "2026-05-30T00:00:00Z".into()
        ))),
    ]
}

fn did() -> impl Strategy<Value = Expr> {
    let window = prop_oneof![
        1 => Just(None),
        3 => duration().prop_map(|d| Some(Window::Last(d))),
        2 => (bound(), bound()).prop_map(|(start, end)| Some(Window::Between { start, end })),
    ];
    (
        proptest::sample::select(EVENTS),
        proptest::option::of(1u64..5),
        window,
    )
        .prop_map(|(event, at_least, window)| {
            Expr::Predicate(Predicate::Did {
                event: event.to_owned(),
                at_least,
                window,
            })
        })
}

fn attribute_test() -> impl Strategy<Value = Expr> {
    prop_oneof![
        proptest::sample::select(COUNTRIES).prop_map(|c| Expr::Predicate(Predicate::Equals {
            attribute: "country".into(),
            value: Literal::String(c.into()),
            negated: false,
        })),
        (0i64..5).prop_map(|a| Expr::Predicate(Predicate::Compare {
            attribute: "age".into(),
            op: CompareOp::Lt,
            value: Value::Literal(Literal::Int(a)),
        })),
        Just(Expr::Predicate(Predicate::IsNull {
            attribute: "age".into(),
            negated: false,
        })),
        Just(Expr::Predicate(Predicate::Did {
            event: "never-recorded".into(),
            at_least: None,
            window: None,
        })),
    ]
}

fn expression() -> BoxedStrategy<Expr> {
    boolean_trees(
        prop_oneof![3 => did(), 1 => attribute_test()].boxed(),
        4,
        24,
    )
}

#[derive(Debug, Clone)]
struct Scenario {
    retention_days: u32,
    early: Vec<Step>,
    segments: Vec<Expr>,
    late: Vec<Step>,
    queries: Vec<(Expr, i64)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![Just(400u32), 5u32..40],
        proptest::collection::vec(step(), 1..8),
        proptest::collection::vec(expression(), 1..4),
        proptest::collection::vec(step(), 0..10),
        proptest::collection::vec((expression(), offset()), 1..6),
    )
        .prop_map(
            |(retention_days, early, segments, late, queries)| Scenario {
                retention_days,
                early,
                segments,
                late,
                queries,
            },
        )
}

/// The engine and the model, driven together.
struct Pair {
    state: DatasetState,
    model: Model,
    now: i64,
    retention: i64,
}

impl Pair {
    fn new(retention_days: u32) -> Self {
        let mut state = DatasetState::default();
        let schema = vec![
            ("country".to_owned(), AttributeKind::Categorical),
            ("age".to_owned(), AttributeKind::Integer),
        ];
        state
            .apply(&Change::DeclareAttributes(schema), T0)
            .expect("declare");
        state
            .apply(
                &Change::SetRetention {
                    days: retention_days,
                },
                T0,
            )
            .expect("retention");
        let retention = i64::from(retention_days) * DAY;
        let mut model = Model::default();
        model.retain_from(T0 - retention);
        Self {
            state,
            model,
            now: T0,
            retention,
        }
    }

    fn apply(&mut self, step: &Step) {
        match step {
            Step::Events(events) => {
                let records: Vec<EventRecord> = events
                    .iter()
                    .map(|(user, event, offset)| EventRecord {
                        user_id: user.clone(),
                        event: (*event).to_owned(),
                        ts: self.now + offset,
                        value: None,
                    })
                    .collect();
                let outcome = self
                    .state
                    .apply(&Change::RecordEvents(records.clone()), self.now)
                    .expect("events apply");
                let before = self.model.events.len();
                self.model.record(&records);
                let kept = (self.model.events.len() - before) as u64;
                assert_eq!(outcome.events, kept, "events kept");
                assert_eq!(
                    outcome.expired,
                    records.len() as u64 - kept,
                    "events expired"
                );
            }
            Step::Upsert(user, country, age) => {
                let mut changes = vec![AttributeChange {
                    attribute: "country".into(),
                    op: country.map_or(ChangeOp::Clear, |c| {
                        ChangeOp::Set(AttributeValue::String(c.into()))
                    }),
                }];
                if let Some(age) = age {
                    changes.push(AttributeChange {
                        attribute: "age".into(),
                        op: ChangeOp::Set(AttributeValue::Int(*age)),
                    });
                }
                let updates = vec![UserUpdate {
                    user_id: user.clone(),
                    changes,
                }];
                self.state
                    .apply(&Change::UpsertUsers(updates.clone()), self.now)
                    .expect("upsert applies");
                self.model.upsert(&updates);
            }
            Step::Delete(ids) => {
                self.state
                    .apply(&Change::DeleteUsers(ids.clone()), self.now)
                    .expect("delete applies");
                self.model.delete(ids);
            }
            Step::Retention(days) => {
                self.state
                    .apply(&Change::SetRetention { days: *days }, self.now)
                    .expect("retention applies");
                self.retention = i64::from(*days) * DAY;
                self.model.set_retention(self.now, self.retention);
            }
            Step::Advance(ms) => {
                self.now += ms;
                self.state
                    .apply(&Change::AdvanceTime, self.now)
                    .expect("time advances");
                self.model.retain_from(self.now - self.retention);
            }
        }
    }

    fn select(&self, expr: &Expr, as_of: i64) -> BTreeSet<String> {
        let members = self
            .state
            .select(&Audience::Expression(expr.clone()), as_of)
            .expect("query binds");
        members
            .iter()
            .map(|id| {
                self.state
                    .keys()
                    .key(id)
                    .expect("member has a key")
                    .to_owned()
            })
            .collect()
    }

    /// Every materialized segment equals the model at the current instant.
    fn check_segments(&self) -> Result<(), TestCaseError> {
        for (id, expr) in &self.model.segments {
            let materialized: BTreeSet<String> = self.state.segments()[id]
                .members()
                .iter()
                .map(|u| self.state.keys().key(u).expect("key").to_owned())
                .collect();
            prop_assert_eq!(
                &materialized,
                &self.model.select(expr, self.now),
                "segment {} = {} at now {}",
                id,
                expr,
                self.now - T0
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn did_queries_and_moving_segments_match_the_raw_events(s in scenario()) {
        let mut pair = Pair::new(s.retention_days);
        for step in &s.early {
            pair.apply(step);
        }
        for (i, expr) in s.segments.iter().enumerate() {
            let id = format!("s{i}");
            pair.state
                .apply(&Change::CreateSegment(saved_segment(&id, expr.clone(), pair.now)), pair.now)
                .expect("segment");
            pair.model.segments.insert(id, expr.clone());
        }
        pair.check_segments()?;
        for step in &s.late {
            pair.apply(step);
            pair.check_segments()?;
        }
        for (expr, offset) in &s.queries {
            for as_of in [pair.now, pair.now + offset] {
                let expected = pair.model.select(expr, as_of);
                prop_assert_eq!(&pair.select(expr, as_of), &expected, "{} at {}", expr, as_of - T0);
                let count = pair.state.count(&Audience::Expression(expr.clone()), as_of).unwrap();
                prop_assert_eq!(count, expected.len() as u64, "count {}", expr);
            }
        }
    }
}
