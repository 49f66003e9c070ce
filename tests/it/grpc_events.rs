//! Behaviour events over the wire: RecordEvents and StreamEvents, DID in text and tree form with
//! exact window edges, refusals that apply nothing, Arrow IPC and Parquet imports of events
//! tables, retention, deletion, and segments that follow the clock with no write at all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use audience::engine::Limits;
use audience::grpc::convert::timestamp;
use audience::grpc::pb;
use audience::time::format_rfc3339;
use pb::did_predicate::Window;
use tonic::Code;

use crate::harness::*;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

// ---- helpers -------------------------------------------------------------------------------

fn event(user: &str, name: &str, ts: i64) -> pb::Event {
    pb::Event {
        user_id: user.to_owned(),
        event: name.to_owned(),
        ts: Some(timestamp(ts)),
        value: None,
    }
}

fn with_value(mut event: pb::Event, value: f64) -> pb::Event {
    event.value = Some(value);
    event
}

fn batch(dataset: &str, events: Vec<pb::Event>) -> pb::RecordEventsRequest {
    pb::RecordEventsRequest {
        dataset: dataset.to_owned(),
        events,
    }
}

async fn record(
    server: &TestServer,
    dataset: &str,
    events: Vec<pb::Event>,
) -> Result<pb::RecordEventsResponse, tonic::Status> {
    server
        .ingest()
        .record_events(batch(dataset, events))
        .await
        .map(tonic::Response::into_inner)
}

/// One StreamEvents call sending each batch as one message.
async fn stream(
    server: &TestServer,
    batches: Vec<pb::RecordEventsRequest>,
) -> Result<pb::StreamEventsResponse, tonic::Status> {
    let messages = batches.into_iter().map(|batch| pb::StreamEventsRequest {
        dataset: batch.dataset,
        events: batch.events,
    });
    server
        .ingest()
        .stream_events(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// Members of an audience at an explicit `as_of`, sorted.
async fn members_at(
    server: &TestServer,
    dataset: &str,
    audience: Option<pb::Audience>,
    as_of: i64,
) -> Vec<String> {
    let mut chunks = server
        .query()
        .export_members(pb::ExportMembersRequest {
            dataset: dataset.to_owned(),
            audience,
            as_of: Some(timestamp(as_of)),
            chunk_size: 0,
        })
        .await
        .expect("export members")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(chunk) = chunks.message().await.expect("export chunk") {
        ids.extend(chunk.user_ids);
    }
    sorted(ids)
}

/// Count of an audience at an explicit `as_of`.
async fn count_at(
    server: &TestServer,
    dataset: &str,
    audience: Option<pb::Audience>,
    as_of: i64,
) -> u64 {
    server
        .query()
        .count(pb::CountRequest {
            dataset: dataset.to_owned(),
            audience,
            as_of: Some(timestamp(as_of)),
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner()
        .count
}

fn ids(names: &[&str]) -> Vec<String> {
    sorted(names.iter().map(|n| (*n).to_owned()).collect())
}

async fn describe(server: &TestServer, dataset: &str) -> pb::DescribeDatasetResponse {
    server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: dataset.to_owned(),
        })
        .await
        .expect("describe dataset")
        .into_inner()
}

/// Event name → count, as DescribeDataset reports them.
fn event_counts(schema: &pb::DescribeDatasetResponse) -> BTreeMap<String, u64> {
    assert_eq!(schema.event_names.len(), schema.event_counts.len());
    schema
        .event_names
        .iter()
        .cloned()
        .zip(schema.event_counts.iter().copied())
        .collect()
}

async fn create_segment(server: &TestServer, id: &str, expr: &str) -> pb::Segment {
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: id.to_owned(),
            expression: Some(text_expr(expr)),
            ..Default::default()
        })
        .await
        .expect("create segment")
        .into_inner()
        .segment
        .expect("the created segment")
}

async fn segment_size(server: &TestServer, id: &str) -> u64 {
    server
        .segments()
        .get_segment(pb::GetSegmentRequest {
            dataset: String::new(),
            segment_id: id.to_owned(),
        })
        .await
        .expect("get segment")
        .into_inner()
        .segment
        .expect("the segment")
        .size
}

async fn segments_for(server: &TestServer, user: &str) -> Vec<String> {
    server
        .query()
        .segments_for_user(pb::SegmentsForUserRequest {
            dataset: String::new(),
            user_id: user.to_owned(),
        })
        .await
        .expect("segments for user")
        .into_inner()
        .segment_ids
}

/// Polls `check` every 20 ms until it holds, failing after 5 s with `what`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- tree form -----------------------------------------------------------------------------

fn did(name: &str, at_least: u64, window: Option<Window>) -> pb::Node {
    pb::Node {
        node: Some(pb::node::Node::Did(pb::DidPredicate {
            event: name.to_owned(),
            at_least,
            window,
        })),
    }
}

fn last(amount: u64, unit: pb::DurationUnit) -> Option<Window> {
    Some(Window::Last(pb::Duration {
        amount,
        unit: unit as i32,
    }))
}

fn between(start: pb::Value, end: pb::Value) -> Option<Window> {
    Some(Window::Between(pb::TimeRange {
        start: Some(start),
        end: Some(end),
    }))
}

fn at(millis: i64) -> pb::Value {
    node::lit(node::s(&format_rfc3339(millis)))
}

fn now_minus(amount: u64, unit: pb::DurationUnit) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Now(pb::RelativeTime {
            amount,
            unit: unit as i32,
            subtract: true,
        })),
    }
}

fn plain_now() -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Now(pb::RelativeTime::default())),
    }
}

// ---- RecordEvents and DID ------------------------------------------------------------------

/// The instant the hand-made histories are queried at: ten days before the server clock, so
/// that answers come from `as_of` and not from the clock.
const AS_OF: i64 = JAN_1_2026 - 10 * DAY;

/// Small histories with events on every window edge:
/// - a: purchases at `AS_OF - 30d` (the first instant of `IN LAST 30d`) and `AS_OF - 2d`;
/// - b: a purchase at `AS_OF` itself (outside every `IN LAST` window);
/// - c: a purchase 1 ms before `AS_OF - 30d`, a view at `AS_OF - 60m`;
/// - d: two purchases at the same instant `AS_OF - 5d`;
/// - e: purchases at `AS_OF - 3d` and `AS_OF - 40d`;
/// - f: a view at `AS_OF - 10d`.
fn histories() -> Vec<pb::Event> {
    vec![
        event("a", "purchase", AS_OF - 30 * DAY),
        event("a", "purchase", AS_OF - 2 * DAY),
        event("b", "purchase", AS_OF),
        event("c", "purchase", AS_OF - 30 * DAY - 1),
        event("c", "view", AS_OF - 60 * MINUTE),
        with_value(event("d", "purchase", AS_OF - 5 * DAY), 19.5),
        with_value(event("d", "purchase", AS_OF - 5 * DAY), 19.5),
        event("e", "purchase", AS_OF - 3 * DAY),
        event("e", "purchase", AS_OF - 40 * DAY),
        event("f", "view", AS_OF - 10 * DAY),
    ]
}

/// A server holding `z` (an attribute, no event) and then [`histories`].
async fn server_with_histories() -> TestServer {
    let server = TestServer::start().await;
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            dataset: String::new(),
            users: vec![update::user("z", vec![update::string("country", "US")])],
        })
        .await
        .unwrap();
    let recorded = record(&server, "", histories()).await.unwrap();
    assert_eq!(recorded.recorded, 10);
    assert_eq!(recorded.expired, 0);
    assert_eq!(recorded.users_created, 6, "a..f are new, z existed");
    server
}

/// Text expressions and who they hold at [`AS_OF`].
fn did_cases() -> Vec<(String, Vec<String>)> {
    let rfc = format_rfc3339;
    vec![
        ("DID purchase".into(), ids(&["a", "b", "c", "d", "e"])),
        ("DID purchase IN LAST 30d".into(), ids(&["a", "d", "e"])),
        ("did purchase in last 30d".into(), ids(&["a", "d", "e"])),
        ("DID purchase IN LAST 720h".into(), ids(&["a", "d", "e"])),
        (
            "DID purchase AT LEAST 2 TIMES".into(),
            ids(&["a", "d", "e"]),
        ),
        (
            "DID purchase AT LEAST 2 TIMES IN LAST 7d".into(),
            ids(&["d"]),
        ),
        (
            "DID purchase AT LEAST 1 TIMES IN LAST 7d".into(),
            ids(&["a", "d", "e"]),
        ),
        ("DID purchase AT LEAST 3 TIMES".into(), ids(&[])),
        (
            format!(
                r#"DID purchase BETWEEN "{}" AND "{}""#,
                rfc(AS_OF - 30 * DAY),
                rfc(AS_OF - 5 * DAY)
            ),
            ids(&["a"]),
        ),
        (
            format!(
                r#"DID purchase BETWEEN "{}" AND "{}""#,
                rfc(AS_OF - 30 * DAY - 1),
                rfc(AS_OF - 5 * DAY + 1)
            ),
            ids(&["a", "c", "d"]),
        ),
        (
            "DID purchase BETWEEN NOW - 30d AND NOW".into(),
            ids(&["a", "d", "e"]),
        ),
        (
            "DID purchase AT LEAST 2 TIMES BETWEEN NOW - 6d AND NOW - 4d".into(),
            ids(&["d"]),
        ),
        ("DID view IN LAST 60m".into(), ids(&["c"])),
        ("DID view IN LAST 59m".into(), ids(&[])),
        ("DID view IN LAST 1h".into(), ids(&["c"])),
        ("DID \"view\" IN LAST 10d".into(), ids(&["c", "f"])),
        ("DID view IN LAST 239h".into(), ids(&["c"])),
        ("DID never_recorded".into(), ids(&[])),
        ("DID never_recorded IN LAST 30d".into(), ids(&[])),
        (
            "NOT DID never_recorded".into(),
            ids(&["a", "b", "c", "d", "e", "f", "z"]),
        ),
        (
            "NOT DID purchase IN LAST 30d".into(),
            ids(&["b", "c", "f", "z"]),
        ),
        (
            r#"DID view OR country = "US""#.into(),
            ids(&["c", "f", "z"]),
        ),
    ]
}

#[tokio::test]
async fn did_text_answers_exactly_on_window_edges() {
    let server = server_with_histories().await;
    for (expr, expected) in did_cases() {
        assert_eq!(
            members_at(&server, "", text(&expr), AS_OF).await,
            expected,
            "{expr}"
        );
        assert_eq!(
            count_at(&server, "", text(&expr), AS_OF).await,
            expected.len() as u64,
            "count of {expr}"
        );
    }
    // The users created by events are live users like any other.
    let schema = describe(&server, "").await;
    assert_eq!(schema.user_count, 7);
    // Three days earlier the window `[AS_OF - 33d, AS_OF - 3d)` holds c's late purchase, and
    // no longer e's purchase at its end.
    assert_eq!(
        members_at(
            &server,
            "",
            text("DID purchase IN LAST 30d"),
            AS_OF - 3 * DAY
        )
        .await,
        ids(&["a", "c", "d"])
    );
    // Without `as_of` the server clock (ten days later) anchors the window.
    assert_eq!(
        count(&server, "", text("DID purchase IN LAST 10d")).await,
        1,
        "only b's purchase at AS_OF is within ten days of the clock"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn did_tree_gives_the_same_answers_as_the_text() {
    use pb::DurationUnit::{Days, Hours, Minutes};
    let server = server_with_histories().await;
    let cases: Vec<(&str, pb::Node)> = vec![
        ("DID purchase", did("purchase", 0, None)),
        (
            "DID purchase IN LAST 30d",
            did("purchase", 0, last(30, Days)),
        ),
        (
            "DID purchase IN LAST 720h",
            did("purchase", 0, last(720, Hours)),
        ),
        ("DID purchase AT LEAST 2 TIMES", did("purchase", 2, None)),
        (
            "DID purchase AT LEAST 2 TIMES IN LAST 7d",
            did("purchase", 2, last(7, Days)),
        ),
        (
            "DID purchase AT LEAST 1 TIMES IN LAST 7d",
            did("purchase", 1, last(7, Days)),
        ),
        ("DID purchase AT LEAST 3 TIMES", did("purchase", 3, None)),
        (
            "DID purchase BETWEEN NOW - 30d AND NOW",
            did("purchase", 0, between(now_minus(30, Days), plain_now())),
        ),
        (
            "DID purchase AT LEAST 2 TIMES BETWEEN NOW - 6d AND NOW - 4d",
            did(
                "purchase",
                2,
                between(now_minus(6, Days), now_minus(4, Days)),
            ),
        ),
        ("DID view IN LAST 60m", did("view", 0, last(60, Minutes))),
        ("DID view IN LAST 59m", did("view", 0, last(59, Minutes))),
        ("DID never_recorded", did("never_recorded", 0, None)),
        (
            "NOT DID never_recorded",
            node::not(did("never_recorded", 0, None)),
        ),
        (
            "NOT DID purchase IN LAST 30d",
            node::not(did("purchase", 0, last(30, Days))),
        ),
        (
            r#"DID view OR country = "US""#,
            node::or(vec![
                did("view", 0, None),
                node::eq("country", node::s("US")),
            ]),
        ),
    ];
    let expected: BTreeMap<String, Vec<String>> = did_cases().into_iter().collect();
    for (expr, tree_form) in cases {
        let from_text = members_at(&server, "", text(expr), AS_OF).await;
        assert_eq!(from_text, expected[expr], "{expr}");
        assert_eq!(
            members_at(&server, "", tree(tree_form), AS_OF).await,
            from_text,
            "tree form of {expr}"
        );
    }
    // BETWEEN with RFC 3339 literals, half-open: a's purchase at the start is in, d's at the
    // end is out.
    let literal = did(
        "purchase",
        0,
        between(at(AS_OF - 30 * DAY), at(AS_OF - 5 * DAY)),
    );
    assert_eq!(
        members_at(&server, "", tree(literal), AS_OF).await,
        ids(&["a"])
    );
    server.shutdown().await;
}

// ---- StreamEvents --------------------------------------------------------------------------

#[tokio::test]
async fn stream_events_sums_messages_and_keeps_those_before_a_bad_one() {
    let server = TestServer::start().await;
    let now = JAN_1_2026;
    let total = stream(
        &server,
        vec![
            batch(
                "",
                vec![
                    event("s1", "view", now - DAY),
                    event("s2", "view", now - DAY),
                ],
            ),
            batch("", vec![event("s1", "purchase", now - HOUR)]),
            batch(
                "",
                vec![
                    event("s3", "purchase", now - 2 * HOUR),
                    event("s3", "purchase", now - 500 * DAY),
                ],
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        (total.recorded, total.expired, total.users_created),
        (4, 1, 3)
    );
    assert_eq!(
        members_at(&server, "", text("DID purchase IN LAST 1d"), now).await,
        ids(&["s1", "s3"])
    );
    assert_eq!(count_at(&server, "", text("DID view"), now).await, 2);

    // A bad message ends the stream naming the message and the field; the ones before it
    // stay applied, the one after it is never read.
    let bad_messages: Vec<(pb::Event, &str)> = vec![
        (event("x", "", now - HOUR), "message 1: events[1].event"),
        (
            pb::Event {
                ts: None,
                ..event("x", "view", now)
            },
            "message 1: events[1].ts",
        ),
        (
            event("", "view", now - HOUR),
            "message 1: events[1].user_id",
        ),
        (event("x", "view", now + 2 * DAY), "message 1: events[1].ts"),
    ];
    for (round, (bad, field)) in bad_messages.into_iter().enumerate() {
        let good = format!("good{round}");
        let error = stream(
            &server,
            vec![
                batch("", vec![event(&good, "signup", now - HOUR)]),
                batch("", vec![event(&good, "signup", now - HOUR), bad]),
                batch("", vec![event("after", "signup", now - HOUR)]),
            ],
        )
        .await
        .unwrap_err();
        assert_status(
            &error,
            Code::InvalidArgument,
            &[field, "messages 0..1 were recorded (1 events)"],
        );
        assert_eq!(
            members_at(&server, "", text("DID signup AT LEAST 1 TIMES"), now).await,
            sorted((0..=round).map(|r| format!("good{r}")).collect()),
            "message 0 of round {round} applied, message 1 and 2 not"
        );
        assert_eq!(
            count_at(&server, "", text("DID signup AT LEAST 2 TIMES"), now).await,
            0,
            "nothing of the bad message applied"
        );
    }
    assert_eq!(
        describe(&server, "").await.user_count,
        3 + 4,
        "one good user per round"
    );
    server.shutdown().await;
}

/// A non-finite value is refused (with the message and the event's index); the contract asks
/// for the field path `message N: events[i].value` like the other fields.
#[tokio::test]
async fn stream_events_refuses_a_non_finite_value() {
    let server = TestServer::start().await;
    for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let error = stream(
            &server,
            vec![
                batch("", vec![event("v1", "order", JAN_1_2026 - HOUR)]),
                batch(
                    "",
                    vec![
                        event("v2", "order", JAN_1_2026 - HOUR),
                        with_value(event("v2", "order", JAN_1_2026 - HOUR), value),
                    ],
                ),
            ],
        )
        .await
        .unwrap_err();
        assert_status(&error, Code::InvalidArgument, &["message 1", "finite"]);
    }
    assert_eq!(
        members_at(&server, "", text("DID order"), JAN_1_2026).await,
        ids(&["v1"])
    );
    assert_eq!(
        describe(&server, "").await.user_count,
        1,
        "v2 was not created"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn stream_events_names_the_value_field_of_a_non_finite_value() {
    let server = TestServer::start().await;
    let error = stream(
        &server,
        vec![
            batch("", vec![event("v1", "order", JAN_1_2026 - HOUR)]),
            batch(
                "",
                vec![
                    event("v2", "order", JAN_1_2026 - HOUR),
                    with_value(event("v2", "order", JAN_1_2026 - HOUR), f64::NAN),
                ],
            ),
        ],
    )
    .await
    .unwrap_err();
    assert_status(
        &error,
        Code::InvalidArgument,
        &["message 1: events[1].value"],
    );
    server.shutdown().await;
}

// ---- refusals ------------------------------------------------------------------------------

#[tokio::test]
async fn record_events_refuses_a_bad_batch_whole() {
    let server = TestServer::start().await;
    let now = JAN_1_2026;
    record(&server, "", vec![event("r0", "purchase", now - HOUR)])
        .await
        .unwrap();
    let good = |i: usize| event(&format!("r{}", i + 1), "purchase", now - HOUR);
    let cases: Vec<(pb::Event, Vec<&str>)> = vec![
        (event("x", "", now), vec!["events[2].event"]),
        (event("", "purchase", now), vec!["events[2].user_id"]),
        (
            pb::Event {
                ts: None,
                ..event("x", "purchase", now)
            },
            vec!["events[2].ts"],
        ),
        (
            pb::Event {
                ts: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..event("x", "purchase", now)
            },
            vec!["events[2].ts", "nanos"],
        ),
        (
            with_value(event("x", "purchase", now - HOUR), f64::NAN),
            vec!["events", "2", "finite"],
        ),
        (
            event("x", "bad\nname", now - HOUR),
            vec!["events", "2", "control character"],
        ),
        (
            event("x", &"e".repeat(129), now - HOUR),
            vec!["events", "2", "129 bytes"],
        ),
        // More than a day ahead of the clock: refused at the engine, by its field path.
        (
            event("x", "purchase", now + DAY + 1),
            vec!["events[2].ts", "more than a day after the server's clock"],
        ),
    ];
    for (bad, needles) in cases {
        let error = record(&server, "", vec![good(0), good(1), bad])
            .await
            .unwrap_err();
        assert_status(&error, Code::InvalidArgument, &needles);
        assert_eq!(
            members_at(&server, "", text("DID purchase"), now).await,
            ids(&["r0"]),
            "nothing of the batch applied ({needles:?})"
        );
        assert_eq!(describe(&server, "").await.user_count, 1, "no user created");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn record_events_over_the_batch_limit_is_resource_exhausted() {
    let limits = Limits {
        max_batch_events: 3,
        ..Limits::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    let events = |n: usize| {
        (0..n)
            .map(|i| event(&format!("l{i}"), "view", JAN_1_2026 - HOUR))
            .collect::<Vec<_>>()
    };
    let error = record(&server, "", events(4)).await.unwrap_err();
    assert_status(&error, Code::ResourceExhausted, &["4", "3"]);
    assert_eq!(describe(&server, "").await.user_count, 0);
    assert_eq!(record(&server, "", events(3)).await.unwrap().recorded, 3);
    // One message of a stream is one batch.
    let error = stream(&server, vec![batch("", events(2)), batch("", events(4))])
        .await
        .unwrap_err();
    assert_status(&error, Code::ResourceExhausted, &["message 1"]);
    assert_eq!(
        count_at(&server, "", text("DID view AT LEAST 2 TIMES"), JAN_1_2026).await,
        2,
        "the first message of the stream applied"
    );
    server.shutdown().await;
}

// ---- imports -------------------------------------------------------------------------------

/// One row of a generated events table.
#[derive(Debug, Clone)]
struct Row {
    user: String,
    event: &'static str,
    ts: i64,
    value: Option<f64>,
}

/// `n` rows over 50 users and three event names, spread over the last 40 days before
/// `JAN_1_2026`; every 97th row is older than the default retention.
fn event_rows(n: usize) -> Vec<Row> {
    const NAMES: [&str; 3] = ["view", "cart", "purchase"];
    (0..n)
        .map(|i| Row {
            user: format!("u{:02}", (i * 7) % 50),
            event: NAMES[(i * 5 + i / 50) % 3],
            ts: if i % 97 == 96 {
                JAN_1_2026 - 500 * DAY
            } else {
                JAN_1_2026 - ((i as i64 * 7_919) % 40) * DAY - (i as i64 % 24) * HOUR - 1
            },
            value: (i % 4 == 0).then_some(i as f64 / 4.0),
        })
        .collect()
}

/// Users with at least `times` `name` events in `[from, to)`, sorted.
fn model(rows: &[Row], name: &str, times: usize, from: i64, to: i64) -> Vec<String> {
    let mut per_user: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        if row.event == name && (from..to).contains(&row.ts) {
            *per_user.entry(&row.user).or_default() += 1;
        }
    }
    per_user
        .into_iter()
        .filter(|(_, n)| *n >= times)
        .map(|(u, _)| u.to_owned())
        .collect()
}

fn dictionary<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    let array: DictionaryArray<Int32Type> = values.collect();
    Arc::new(array)
}

/// `rows` as an events table: dictionary-encoded `user_id` and `event`, millisecond `ts`, an
/// optional Float64 `value`.
fn events_batch(rows: &[Row]) -> RecordBatch {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let schema = Schema::new(vec![
        Field::new("user_id", dict.clone(), false),
        Field::new("event", dict, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        Field::new("value", DataType::Float64, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        dictionary(rows.iter().map(|r| r.user.as_str())),
        dictionary(rows.iter().map(|r| r.event)),
        Arc::new(TimestampMillisecondArray::from(
            rows.iter().map(|r| r.ts).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.value).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(Arc::new(schema), columns).unwrap()
}

/// `batch` with `ts` null at `row`.
fn with_null_ts(batch: &RecordBatch, row: usize) -> RecordBatch {
    with_ts(batch, row, None)
}

/// `batch` with the `ts` of `row` replaced (by a null when `None`).
fn with_ts(batch: &RecordBatch, row: usize, value: Option<i64>) -> RecordBatch {
    let ts = batch
        .column_by_name("ts")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    let values: TimestampMillisecondArray = (0..ts.len())
        .map(|r| if r == row { value } else { Some(ts.value(r)) })
        .collect();
    let mut columns = batch.columns().to_vec();
    columns[2] = Arc::new(values);
    RecordBatch::try_new(batch.schema(), columns).unwrap()
}

/// Progress messages of an import call, and the error that ended it.
async fn collect<R: pb::ImportResponse>(
    response: Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>,
) -> (Vec<pb::ImportProgress>, Option<tonic::Status>) {
    let outcome = collect_progress(response).await;
    (outcome.progress, outcome.error)
}

async fn import_events_ipc(
    server: &TestServer,
    dataset: &str,
    chunks: Vec<Vec<u8>>,
) -> (Vec<pb::ImportProgress>, Option<tonic::Status>) {
    let mut messages: Vec<pb::ImportEventsRequest> = chunks
        .into_iter()
        .map(|arrow_ipc_chunk| pb::ImportEventsRequest {
            dataset: String::new(),
            arrow_ipc_chunk,
        })
        .collect();
    messages[0].dataset = dataset.to_owned();
    collect(
        server
            .ingest()
            .import_events(tokio_stream::iter(messages))
            .await,
    )
    .await
}

async fn import_events_file(
    server: &TestServer,
    dataset: &str,
    path: &std::path::Path,
) -> (Vec<pb::ImportProgress>, Option<tonic::Status>) {
    collect(
        server
            .ingest()
            .import_events_file(pb::ImportEventsFileRequest {
                dataset: dataset.to_owned(),
                path: path.display().to_string(),
            })
            .await,
    )
    .await
}

/// The done report of a successful import, after checking the reports before it.
#[track_caller]
fn done(outcome: &(Vec<pb::ImportProgress>, Option<tonic::Status>)) -> &pb::ImportProgress {
    let (progress, error) = outcome;
    assert!(error.is_none(), "import failed: {error:?}");
    let last = progress.last().expect("some progress");
    assert!(last.done, "the last report says done");
    assert!(progress[..progress.len() - 1].iter().all(|p| !p.done));
    assert!(progress
        .windows(2)
        .all(|w| w[0].rows_read <= w[1].rows_read));
    last
}

/// DID answers on an imported dataset equal the model's.
async fn assert_imported(server: &TestServer, dataset: &str, rows: &[Row]) {
    let now = JAN_1_2026;
    let kept: Vec<Row> = rows
        .iter()
        .filter(|r| r.ts >= now - 400 * DAY)
        .cloned()
        .collect();
    let cases = [
        (
            "DID purchase",
            model(&kept, "purchase", 1, i64::MIN, i64::MAX),
        ),
        (
            "DID purchase IN LAST 7d",
            model(&kept, "purchase", 1, now - 7 * DAY, now),
        ),
        (
            "DID cart AT LEAST 3 TIMES IN LAST 20d",
            model(&kept, "cart", 3, now - 20 * DAY, now),
        ),
        (
            "DID view AT LEAST 2 TIMES IN LAST 36h",
            model(&kept, "view", 2, now - 36 * HOUR, now),
        ),
    ];
    for (expr, expected) in cases {
        assert!(!expected.is_empty(), "{expr} should match someone");
        assert_eq!(
            members_at(server, dataset, text(expr), now).await,
            expected,
            "{expr} in {dataset}"
        );
    }
    let users: BTreeSet<&str> = rows.iter().map(|r| r.user.as_str()).collect();
    assert_eq!(
        describe(server, dataset).await.user_count,
        users.len() as u64
    );
}

#[tokio::test]
async fn import_events_streams_dictionary_encoded_ipc_with_progress() {
    let server = TestServer::start().await;
    // A saved segment in the dataset before the import is kept current by it.
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            dataset: "ipc".into(),
            segment_id: "buyers".into(),
            expression: Some(text_expr("DID purchase IN LAST 7d")),
            ..Default::default()
        })
        .await
        .unwrap();
    let rows = event_rows(3_000);
    let expired = rows
        .iter()
        .filter(|r| r.ts < JAN_1_2026 - 400 * DAY)
        .count() as u64;
    assert!(expired > 0);
    let batches: Vec<RecordBatch> = rows.chunks(700).map(events_batch).collect();
    let bytes = ipc_stream_bytes(&batches);
    let outcome = import_events_ipc(&server, "ipc", cut(&bytes, &[1, 13, 4_096, 65_537])).await;
    let last = done(&outcome);
    assert!(outcome.0.len() >= 2, "progress arrives before the end");
    assert_eq!(last.rows_read, 3_000);
    assert_eq!(last.events_imported, 3_000 - expired);
    assert_eq!(last.events_expired, expired);
    assert_eq!(last.users_created, 50);
    assert_imported(&server, "ipc", &rows).await;
    assert_eq!(
        members(&server, "ipc", segment_audience("buyers")).await,
        model(&rows, "purchase", 1, JAN_1_2026 - 7 * DAY, JAN_1_2026)
    );
    let schema = describe(&server, "ipc").await;
    let counts = event_counts(&schema);
    assert_eq!(counts.values().sum::<u64>(), 3_000 - expired);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["cart", "purchase", "view"]
    );
    assert_eq!(
        describe(&server, "").await.user_count,
        0,
        "nothing in default"
    );
    server.shutdown().await;
}

fn write_parquet(path: &std::path::Path, batches: &[RecordBatch]) {
    let file = std::fs::File::create(path).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(500))
        .build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), Some(properties)).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
}

#[tokio::test]
async fn import_events_file_reads_parquet_with_progress() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let rows = event_rows(2_000);
    let expired = rows
        .iter()
        .filter(|r| r.ts < JAN_1_2026 - 400 * DAY)
        .count() as u64;
    let path = temp_path("events.parquet");
    let batches: Vec<RecordBatch> = rows.chunks(600).map(events_batch).collect();
    write_parquet(&path, &batches);
    let outcome = import_events_file(&server, "file", &path).await;
    let last = done(&outcome);
    assert_eq!((last.rows_read, last.rows_total), (2_000, 2_000));
    assert_eq!(
        (
            last.events_imported,
            last.events_expired,
            last.users_created
        ),
        (2_000 - expired, expired, 50)
    );
    assert_imported(&server, "file", &rows).await;

    // The same file again adds the same events again: every count doubles, nobody is new.
    let outcome = import_events_file(&server, "file", &path).await;
    assert_eq!(done(&outcome).users_created, 0);
    let doubled: Vec<Row> = rows.iter().chain(rows.iter()).cloned().collect();
    assert_imported(&server, "file", &doubled).await;
    std::fs::remove_file(path).ok();
    server.shutdown().await;
}

#[tokio::test]
async fn import_events_refuses_bad_tables_by_name_and_applies_nothing() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let rows = event_rows(2_000);
    let good = events_batch(&rows);
    let outcome = import_events_ipc(
        &server,
        "",
        vec![ipc_stream_bytes(std::slice::from_ref(&good))],
    )
    .await;
    done(&outcome);
    let before = describe(&server, "").await;

    // New users and events that must not land: each table below is refused whole.
    let fresh = event_rows(2_600)[2_000..].to_vec();
    let fresh_batch = events_batch(&fresh);

    // An extra column, over IPC (two batches) and in a Parquet file.
    let country = |n: usize| -> ArrayRef { Arc::new(StringArray::from(vec!["US"; n])) };
    let extra = [
        with_column(&fresh_batch, "country", country(fresh.len())),
        with_column(&good, "country", country(rows.len())),
    ];
    let (_, error) = import_events_ipc(&server, "", cut(&ipc_stream_bytes(&extra), &[999])).await;
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["'country'", "not part of an events table"],
    );
    let path = temp_path("extra-column.parquet");
    write_parquet(&path, &extra);
    let (_, error) = import_events_file(&server, "", &path).await;
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["'country'"],
    );
    std::fs::remove_file(path).ok();

    // A null ts, in a Parquet file and over IPC.
    let path = temp_path("null-ts.parquet");
    write_parquet(&path, &[with_null_ts(&fresh_batch, 7)]);
    let (_, error) = import_events_file(&server, "", &path).await;
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["'ts'", "null", "row 7"],
    );
    std::fs::remove_file(path).ok();
    let broken = with_null_ts(&fresh_batch, 42);
    let (_, error) = import_events_ipc(&server, "", vec![ipc_stream_bytes(&[broken])]).await;
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["'ts'", "row 42"],
    );
    // A time in the wrong unit (microseconds read as milliseconds) lands far in the future.
    let future = with_ts(&fresh_batch, 3, Some(JAN_1_2026 * 1000));
    let (_, error) = import_events_ipc(&server, "", vec![ipc_stream_bytes(&[future])]).await;
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["row 3", "'ts'", "more than a day after the server's clock"],
    );
    // A bad row in a later batch is named by its place in the whole stream.
    let second = with_null_ts(&fresh_batch, 7);
    let stream = ipc_stream_bytes(&[good.clone(), second]);
    let (_, error) = import_events_ipc(&server, "", vec![stream]).await;
    let row = format!("row {}", good.num_rows() + 7);
    assert_status(
        &error.expect("refused"),
        Code::InvalidArgument,
        &["'ts'", row.as_str()],
    );

    let after = describe(&server, "").await;
    assert_eq!(after.user_count, before.user_count, "no user created");
    assert_eq!(
        event_counts(&after),
        event_counts(&before),
        "no event added"
    );
    assert_imported(&server, "", &rows).await;
    server.shutdown().await;
}

// ---- retention and deletion ----------------------------------------------------------------

#[tokio::test]
async fn retention_drops_older_events() {
    let server = TestServer::start().await;
    let now = JAN_1_2026;
    let recorded = record(
        &server,
        "",
        vec![
            event("old", "purchase", now - 100 * DAY),
            event("edge", "purchase", now - 30 * DAY),
            event("past_edge", "purchase", now - 30 * DAY - 1),
            event("recent", "purchase", now - 2 * DAY),
            event("recent", "view", now - 40 * DAY),
            event("ancient", "view", now - 401 * DAY),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        (recorded.recorded, recorded.expired, recorded.users_created),
        (5, 1, 5),
        "beyond the default 400 days an event is dropped, its user still created"
    );
    let schema = describe(&server, "").await;
    assert_eq!(schema.event_retention_days, 400);
    assert_eq!(
        event_counts(&schema),
        BTreeMap::from([("purchase".to_owned(), 4), ("view".to_owned(), 1)])
    );
    assert_eq!(
        members_at(&server, "", text("DID purchase"), now).await,
        ids(&["edge", "old", "past_edge", "recent"])
    );
    assert_eq!(
        members_at(&server, "", text("DID view"), now).await,
        ids(&["recent"])
    );

    server
        .schema()
        .set_event_retention(pb::SetEventRetentionRequest {
            dataset: String::new(),
            days: 30,
        })
        .await
        .unwrap();
    // Events before `now - 30d` are gone, even for a query anchored earlier.
    assert_eq!(
        members_at(&server, "", text("DID purchase"), now).await,
        ids(&["edge", "recent"])
    );
    assert_eq!(
        members_at(
            &server,
            "",
            text("DID purchase IN LAST 200d"),
            now - 50 * DAY
        )
        .await,
        ids(&[])
    );
    assert_eq!(count_at(&server, "", text("DID view"), now).await, 0);
    let schema = describe(&server, "").await;
    assert_eq!(schema.event_retention_days, 30);
    assert_eq!(event_counts(&schema)["purchase"], 2);
    assert_eq!(event_counts(&schema).get("view").copied().unwrap_or(0), 0);
    assert_eq!(
        schema.user_count,
        6 - 1,
        "users stay when their events expire"
    );

    // New events older than the retention are dropped on arrival.
    let recorded = record(&server, "", vec![event("recent", "view", now - 31 * DAY)])
        .await
        .unwrap();
    assert_eq!((recorded.recorded, recorded.expired), (0, 1));

    let error = server
        .schema()
        .set_event_retention(pb::SetEventRetentionRequest {
            dataset: String::new(),
            days: 0,
        })
        .await
        .unwrap_err();
    assert_status(&error, Code::InvalidArgument, &["days"]);
    assert_eq!(describe(&server, "").await.event_retention_days, 30);
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_user_removes_their_events() {
    let server = TestServer::start().await;
    let now = JAN_1_2026;
    record(
        &server,
        "",
        vec![
            event("gone", "purchase", now - DAY),
            event("gone", "purchase", now - 2 * DAY),
            event("kept", "purchase", now - DAY),
        ],
    )
    .await
    .unwrap();
    create_segment(&server, "buyers", "DID purchase IN LAST 7d").await;
    create_segment(&server, "non_buyers", "NOT DID purchase").await;
    assert_eq!(segment_size(&server, "buyers").await, 2);
    let deleted = server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            dataset: String::new(),
            user_ids: vec!["gone".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    assert_eq!(
        members_at(&server, "", text("DID purchase"), now).await,
        ids(&["kept"])
    );
    assert_eq!(segment_size(&server, "buyers").await, 1);
    assert_eq!(segment_size(&server, "non_buyers").await, 0);

    // The same id again is a new user with no history.
    record(&server, "", vec![event("gone", "view", now - HOUR)])
        .await
        .unwrap();
    assert_eq!(
        members_at(&server, "", text("DID purchase"), now).await,
        ids(&["kept"])
    );
    assert_eq!(
        members_at(&server, "", text("NOT DID purchase"), now).await,
        ids(&["gone"])
    );
    assert_eq!(segments_for(&server, "gone").await, vec!["non_buyers"]);
    assert_eq!(
        count_at(&server, "", text("DID purchase AT LEAST 2 TIMES"), now).await,
        0
    );
    server.shutdown().await;
}

// ---- time-driven membership ----------------------------------------------------------------

#[tokio::test]
async fn segments_follow_the_clock_with_no_write() {
    let clock = FixedClock::new(JAN_1_2026);
    let server = TestServer::start_on_clock(clock.clone()).await;
    let now = JAN_1_2026;
    create_segment(&server, "recent_buyers", "DID purchase IN LAST 7d").await;
    create_segment(&server, "lapsed", "NOT DID purchase IN LAST 7d").await;
    record(
        &server,
        "",
        vec![
            event("u1", "purchase", now - 6 * DAY),
            event("u2", "purchase", now - DAY),
            event("u3", "view", now - HOUR),
            // In the future: outside `[now - 7d, now)` until the clock passes it.
            event("u4", "purchase", now + HOUR),
        ],
    )
    .await
    .unwrap();
    assert_eq!(segment_size(&server, "recent_buyers").await, 2);
    assert_eq!(segments_for(&server, "u1").await, vec!["recent_buyers"]);
    assert_eq!(segments_for(&server, "u4").await, vec!["lapsed"]);
    assert_eq!(
        members(&server, "", segment_audience("lapsed")).await,
        ids(&["u3", "u4"])
    );

    // Two days later, with no write: u1's purchase is eight days old, u4's has happened.
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(
        members(&server, "", text("DID purchase IN LAST 7d")).await,
        ids(&["u2", "u4"]),
        "a query is evaluated at the clock"
    );
    let s = &server;
    eventually("u1 leaves recent_buyers and u4 enters it", || async move {
        segments_for(s, "u1").await == ["lapsed"]
            && segments_for(s, "u4").await == ["recent_buyers"]
    })
    .await;
    assert_eq!(segment_size(&server, "recent_buyers").await, 2);
    assert_eq!(
        members(&server, "", segment_audience("recent_buyers")).await,
        ids(&["u2", "u4"])
    );
    assert_eq!(
        members(&server, "", segment_audience("lapsed")).await,
        ids(&["u1", "u3"])
    );

    // Six more days: everyone's purchase is older than a week.
    clock.advance(Duration::from_secs(6 * 86_400));
    eventually("recent_buyers empties", || async move {
        segment_size(s, "recent_buyers").await == 0
    })
    .await;
    assert_eq!(segment_size(&server, "lapsed").await, 4);
    server.shutdown().await;
}

#[tokio::test]
async fn retention_follows_the_clock_with_no_write() {
    let clock = FixedClock::new(JAN_1_2026);
    let server = TestServer::start_on_clock(clock.clone()).await;
    let now = JAN_1_2026;
    record(
        &server,
        "",
        vec![
            event("early", "purchase", now - 9 * DAY),
            event("late", "purchase", now - DAY),
        ],
    )
    .await
    .unwrap();
    server
        .schema()
        .set_event_retention(pb::SetEventRetentionRequest {
            dataset: String::new(),
            days: 10,
        })
        .await
        .unwrap();
    create_segment(&server, "ever", "DID purchase").await;
    assert_eq!(segment_size(&server, "ever").await, 2);
    // Two days later early's purchase is past the ten days kept.
    clock.advance(Duration::from_secs(2 * 86_400));
    let s = &server;
    eventually("early's purchase expires", || async move {
        segments_for(s, "early").await.is_empty()
    })
    .await;
    assert_eq!(
        members(&server, "", text("DID purchase")).await,
        ids(&["late"])
    );
    assert_eq!(event_counts(&describe(&server, "").await)["purchase"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn retention_inside_a_day_updates_the_event_counts() {
    let now = JAN_1_2026 + 5 * HOUR;
    let clock = FixedClock::new(now);
    let server = TestServer::start_with(ServerOptions::default().clock(clock.clone())).await;
    record(
        &server,
        "",
        vec![
            event("a", "purchase", now - 9 * DAY),
            event("b", "purchase", now - 10 * DAY + 1),
        ],
    )
    .await
    .unwrap();
    server
        .schema()
        .set_event_retention(pb::SetEventRetentionRequest {
            dataset: String::new(),
            days: 10,
        })
        .await
        .unwrap();
    assert_eq!(event_counts(&describe(&server, "").await)["purchase"], 2);
    // 2 ms later b's event is 1 ms past the ten days kept.
    clock.advance(Duration::from_millis(2));
    server.engine().advance_time().await.unwrap();
    assert_eq!(
        members(&server, "", text("DID purchase")).await,
        ids(&["a"])
    );
    assert_eq!(event_counts(&describe(&server, "").await)["purchase"], 1);
    server.shutdown().await;
}
