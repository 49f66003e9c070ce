//! IngestService and SchemaService over the wire: partial upserts, atomic batches, deletions,
//! Arrow IPC imports streamed in odd-sized chunks, Parquet and Arrow files read by the server,
//! dataset descriptions and declarations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int8Builder,
    ListBuilder, StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder, UInt32Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, Date32Array, RecordBatch, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use audience::grpc::pb;
use tonic::Code;

use crate::harness::*;

async fn upsert(
    server: &TestServer,
    dataset: &str,
    users: Vec<pb::UserUpdate>,
) -> Result<pb::UpsertUsersResponse, tonic::Status> {
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            dataset: dataset.into(),
            users,
        })
        .await
        .map(|r| r.into_inner())
}

async fn delete_users(
    server: &TestServer,
    ids: &[&str],
) -> Result<pb::DeleteUsersResponse, tonic::Status> {
    server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            user_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Whether `user` matches `expr` in `default`.
async fn matches(server: &TestServer, user: &str, expr: &str) -> bool {
    members(server, "", text(expr))
        .await
        .iter()
        .any(|id| id == user)
}

#[tokio::test]
async fn upserts_set_clear_add_and_remove_parts_of_a_user() {
    let server = TestServer::start().await;
    let created = upsert(
        &server,
        "",
        vec![
            update::user(
                "u1",
                vec![
                    update::string("country", "US"),
                    update::int("age", 30),
                    update::set_of("interests", &["a", "b"]),
                    update::boolean("subscriber", true),
                    update::float("spend", 10.5),
                    update::timestamp("signup", JAN_1_2026),
                ],
            ),
            update::user("u2", vec![update::string("country", "US")]),
        ],
    )
    .await
    .unwrap();
    assert_eq!((created.created, created.updated), (2, 0));
    for expr in [
        r#"country = "US""#,
        "age = 30",
        r#"interests HAS ALL ("a", "b")"#,
        "subscriber = TRUE",
        "spend = 10.5",
        r#"signup = "2026-01-01T00:00:00Z""#,
    ] {
        assert!(matches(&server, "u1", expr).await, "{expr}");
    }

    // Each update touches only the attributes it names.
    let response = upsert(
        &server,
        "",
        vec![update::user(
            "u1",
            vec![
                update::string("country", "GB"),
                update::clear("age"),
                update::add("interests", &["c"]),
            ],
        )],
    )
    .await
    .unwrap();
    assert_eq!((response.created, response.updated), (0, 1));
    assert!(matches(&server, "u1", r#"country = "GB""#).await);
    assert!(!matches(&server, "u1", r#"country = "US""#).await);
    assert!(matches(&server, "u1", "age IS NULL").await);
    assert!(matches(&server, "u1", r#"interests HAS ALL ("a", "b", "c")"#).await);
    assert!(matches(&server, "u1", "subscriber = TRUE AND spend = 10.5").await);

    upsert(
        &server,
        "",
        vec![update::user(
            "u1",
            vec![update::remove("interests", &["a"])],
        )],
    )
    .await
    .unwrap();
    assert!(!matches(&server, "u1", r#"interests HAS "a""#).await);
    assert!(matches(&server, "u1", r#"interests HAS ALL ("b", "c")"#).await);

    // Removing the last members makes the set null, like an empty list.
    upsert(
        &server,
        "",
        vec![update::user(
            "u1",
            vec![update::remove("interests", &["b", "c", "zz"])],
        )],
    )
    .await
    .unwrap();
    assert!(matches(&server, "u1", "interests IS NULL").await);
    upsert(
        &server,
        "",
        vec![update::user(
            "u1",
            vec![update::set_of("interests", &["x"])],
        )],
    )
    .await
    .unwrap();
    assert!(
        matches(
            &server,
            "u1",
            r#"interests HAS "x" AND NOT interests HAS "c""#
        )
        .await
    );
    upsert(
        &server,
        "",
        vec![update::user("u1", vec![update::set_of("interests", &[])])],
    )
    .await
    .unwrap();
    assert!(matches(&server, "u1", "interests IS NULL").await);

    // Lossless conversions: an integer into a float, RFC 3339 text into a timestamp.
    upsert(
        &server,
        "",
        vec![update::user(
            "u1",
            vec![
                update::int("spend", 7),
                update::string("signup", "2026-02-01T00:00:00Z"),
                update::boolean("subscriber", false),
            ],
        )],
    )
    .await
    .unwrap();
    assert!(matches(&server, "u1", "spend = 7 AND subscriber = FALSE").await);
    assert!(matches(&server, "u1", r#"signup > "2026-01-31T23:59:59Z""#).await);

    // An update with no changes still counts as an update and leaves the user alone.
    let response = upsert(&server, "", vec![update::user("u2", vec![])])
        .await
        .unwrap();
    assert_eq!((response.created, response.updated), (0, 1));
    assert!(matches(&server, "u2", r#"country = "US" AND age IS NULL"#).await);
    assert_eq!(count(&server, "", text(r#"country = "US""#)).await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_with_a_bad_record_applies_nothing_and_names_its_index() {
    let (server, everyone) = server_with_people(30).await;
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "us".into(),
            expression: Some(text_expr(r#"country = "US""#)),
            ..Default::default()
        })
        .await
        .unwrap();
    let us_before = people_where(&everyone, |p| p.country == Some("US"));
    let everyone_expr = "age IS NULL OR age IS NOT NULL";

    // The third record writes a string into the integer attribute `age`.
    let status = upsert(
        &server,
        "",
        vec![
            update::user("fresh-0", vec![update::string("country", "US")]),
            update::user("p0001", vec![update::string("country", "US")]),
            update::user("fresh-2", vec![update::string("age", "old")]),
            update::user("fresh-3", vec![update::string("country", "US")]),
        ],
    )
    .await
    .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["users", "user 2", "fresh-2", "age", "integer"],
    );
    assert_eq!(count(&server, "", text(everyone_expr)).await, 30);
    assert_eq!(
        members(&server, "", text(r#"country = "US""#)).await,
        us_before
    );
    assert_eq!(
        members(&server, "", segment_audience("us")).await,
        us_before,
        "segments untouched"
    );
    let lookup = server
        .query()
        .check_membership(pb::CheckMembershipRequest {
            user_id: "fresh-0".into(),
            segment_ids: vec!["us".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !lookup.user_exists,
        "the first record was not applied either"
    );

    // Refusals found while reading the request name the field path.
    let cases: Vec<(Vec<pb::UserUpdate>, &str)> = vec![
        (
            vec![
                update::user("fresh-0", vec![]),
                update::user("fresh-1", vec![]),
                update::user("", vec![update::int("age", 3)]),
            ],
            "users[2].user_id",
        ),
        (
            vec![
                update::user("fresh-0", vec![]),
                update::user("fresh-1", vec![]),
                update::user(
                    "fresh-2",
                    vec![
                        update::int("age", 3),
                        pb::AttributeUpdate {
                            attribute: "age".into(),
                            change: None,
                        },
                    ],
                ),
            ],
            "users[2].updates[1]",
        ),
        (
            vec![
                update::user("fresh-0", vec![]),
                update::user("fresh-1", vec![]),
                update::user("fresh-2", vec![update::float("spend", f64::NAN)]),
            ],
            "users[2].updates[0].set",
        ),
        (
            vec![
                update::user("fresh-0", vec![]),
                update::user("fresh-1", vec![]),
                update::user("fresh-2", vec![update::int("", 1)]),
            ],
            "users[2].updates[0].attribute",
        ),
    ];
    for (users, field) in cases {
        let status = upsert(&server, "", users).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, &[field]);
        assert_eq!(count(&server, "", text(everyone_expr)).await, 30);
    }

    // Refusals found while applying name the record.
    let cases: Vec<(pb::UserUpdate, &[&str])> = vec![
        (
            update::user("fresh-2", vec![update::add("country", &["x"])]),
            &["user 2", "country", "categorical"],
        ),
        (
            update::user("fresh-2", vec![update::clear("no_such_attribute")]),
            &["user 2", "no_such_attribute"],
        ),
        (
            update::user("fresh-2", vec![update::int("9lives", 1)]),
            &["user 2", "9lives"],
        ),
        (
            update::user("fresh-2", vec![update::string("subscriber", "yes")]),
            &["user 2", "subscriber", "boolean"],
        ),
        (
            update::user(&"x".repeat(513), vec![]),
            &["user 2", "513 bytes", "512"],
        ),
    ];
    for (bad, needles) in cases {
        let users = vec![
            update::user("fresh-0", vec![update::string("country", "US")]),
            update::user("p0002", vec![update::string("country", "US")]),
            bad,
        ];
        let status = upsert(&server, "", users).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, needles);
        assert_eq!(count(&server, "", text(everyone_expr)).await, 30);
        assert_eq!(
            members(&server, "", text(r#"country = "US""#)).await,
            us_before
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn deleted_users_leave_every_answer_and_come_back_fresh() {
    let (server, everyone) = server_with_people(60).await;
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "sporty".into(),
            expression: Some(text_expr(r#"interests HAS "sports""#)),
            ..Default::default()
        })
        .await
        .unwrap();
    let victim = everyone
        .iter()
        .find(|p| p.has("sports") && p.country == Some("US") && p.age.is_some())
        .unwrap()
        .clone();
    let response = delete_users(&server, &[&victim.id, "never-existed"])
        .await
        .unwrap();
    assert_eq!((response.deleted, response.not_found), (1, 1));

    let rest: Vec<Person> = everyone
        .iter()
        .filter(|p| p.id != victim.id)
        .cloned()
        .collect();
    assert_eq!(
        members(&server, "", text(r#"country = "US""#)).await,
        people_where(&rest, |p| p.country == Some("US"))
    );
    // NOT complements among live users: the deleted user does not come back.
    assert_eq!(
        members(&server, "", text(r#"NOT country = "US""#)).await,
        people_where(&rest, |p| p.country != Some("US"))
    );
    assert_eq!(
        members(&server, "", segment_audience("sporty")).await,
        people_where(&rest, |p| p.has("sports"))
    );
    let mut query = server.query();
    let segments = query
        .segments_for_user(pb::SegmentsForUserRequest {
            user_id: victim.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(segments.segment_ids.is_empty());
    let check = query
        .check_membership(pb::CheckMembershipRequest {
            user_id: victim.id.clone(),
            segment_ids: vec!["sporty".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.user_exists);
    let schema = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(schema.user_count, 59);

    // The same id again is a new user with none of the old attributes.
    let response = upsert(
        &server,
        "",
        vec![update::user(
            &victim.id,
            vec![update::string("country", "DE")],
        )],
    )
    .await
    .unwrap();
    assert_eq!((response.created, response.updated), (1, 0));
    assert!(
        matches(
            &server,
            &victim.id,
            r#"country = "DE" AND age IS NULL AND interests IS NULL"#
        )
        .await
    );
    assert!(!matches(&server, &victim.id, "SEGMENT \"sporty\"").await);
    let segments = query
        .segments_for_user(pb::SegmentsForUserRequest {
            user_id: victim.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(segments.segment_ids.is_empty());

    // Deleting from an unknown dataset is NOT_FOUND; deleting nobody is fine.
    let status = server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            dataset: "no-such-dataset".into(),
            user_ids: vec!["a".into()],
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["no-such-dataset"]);
    let response = delete_users(&server, &["ghost-1", "ghost-2"])
        .await
        .unwrap();
    assert_eq!((response.deleted, response.not_found), (0, 2));
    server.shutdown().await;
}

/// One row of the tables the import tests build.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    country: Option<&'static str>,
    age: Option<i32>,
    /// `None` is a null list; `Some(vec![])` an empty one.
    tags: Option<Vec<&'static str>>,
    vip: Option<bool>,
    score: Option<f64>,
    joined: Option<i64>,
}

impl Row {
    fn tagged(&self, tag: &str) -> bool {
        self.tags.as_ref().is_some_and(|t| t.contains(&tag))
    }
}

fn rows(range: std::ops::Range<usize>, variant: usize) -> Vec<Row> {
    const COUNTRIES: [Option<&str>; 4] = [Some("US"), Some("FR"), None, Some("JP")];
    const TAGS: [&str; 3] = ["red", "green", "blue"];
    range
        .map(|i| {
            let k = i + variant;
            Row {
                id: format!("imp{i:05}"),
                country: COUNTRIES[k % 4],
                age: (!k.is_multiple_of(6)).then_some(15 + (k % 40) as i32),
                tags: match k % 5 {
                    0 => None,
                    1 => Some(vec![]),
                    n => Some(TAGS.iter().take(n - 1).copied().collect()),
                },
                vip: (!k.is_multiple_of(7)).then_some(k.is_multiple_of(2)),
                score: (!k.is_multiple_of(3)).then_some(k as f64 / 4.0),
                joined: (!k.is_multiple_of(8))
                    .then_some(JAN_1_2026 - (k as i64 % 100) * 86_400_000),
            }
        })
        .collect()
}

fn batch_of(rows: &[Row]) -> RecordBatch {
    let mut id = StringBuilder::new();
    let mut country = StringBuilder::new();
    let mut age = Int32Builder::new();
    let mut tags = ListBuilder::new(StringBuilder::new());
    let mut vip = BooleanBuilder::new();
    let mut score = Float64Builder::new();
    let mut joined = TimestampMillisecondBuilder::new().with_timezone("UTC");
    for row in rows {
        id.append_value(&row.id);
        country.append_option(row.country);
        age.append_option(row.age);
        match &row.tags {
            None => tags.append(false),
            Some(values) => {
                for v in values {
                    tags.values().append_value(v);
                }
                tags.append(true);
            }
        }
        vip.append_option(row.vip);
        score.append_option(row.score);
        joined.append_option(row.joined);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(country.finish()),
        Arc::new(age.finish()),
        Arc::new(tags.finish()),
        Arc::new(vip.finish()),
        Arc::new(score.finish()),
        Arc::new(joined.finish()),
    ];
    let schema = Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, true),
        Field::new("age", DataType::Int32, true),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            true,
        ),
        Field::new("vip", DataType::Boolean, true),
        Field::new("score", DataType::Float64, true),
        Field::new(
            "joined",
            DataType::Timestamp(arrow_schema::TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]);
    RecordBatch::try_new(Arc::new(schema), columns).unwrap()
}

type RowCheck = (&'static str, fn(&Row) -> bool);

fn row_checks() -> Vec<RowCheck> {
    vec![
        (r#"country = "US""#, |r| r.country == Some("US")),
        ("country IS NULL", |r| r.country.is_none()),
        ("age BETWEEN 20 AND 29", |r| {
            r.age.is_some_and(|a| (20..=29).contains(&a))
        }),
        ("age IS NULL", |r| r.age.is_none()),
        (r#"tags HAS "green""#, |r| r.tagged("green")),
        // An empty list and a null list are both null.
        ("tags IS NULL", |r| {
            r.tags.as_ref().is_none_or(|t| t.is_empty())
        }),
        ("vip = TRUE", |r| r.vip == Some(true)),
        ("vip IS NULL", |r| r.vip.is_none()),
        ("score >= 100.25", |r| r.score.is_some_and(|s| s >= 100.25)),
        (r#"joined >= "2025-12-02T00:00:00Z""#, |r| {
            r.joined.is_some_and(|t| t >= JAN_1_2026 - 30 * 86_400_000)
        }),
        ("joined IS NULL", |r| r.joined.is_none()),
    ]
}

async fn assert_rows_match(server: &TestServer, dataset: &str, table: &[Row]) {
    for (expr, keep) in row_checks() {
        let expected = ids_where(table, keep, |r| r.id.as_str());
        assert_eq!(
            members(server, dataset, text(expr)).await,
            expected,
            "{expr} in {dataset}"
        );
    }
}

#[tokio::test]
async fn import_users_streams_ipc_in_odd_chunks_with_progress() {
    let server = TestServer::start().await;
    let table = rows(0..2_100, 0);
    let batches: Vec<RecordBatch> = table.chunks(700).map(batch_of).collect();
    let bytes = ipc_stream_bytes(&batches);
    let chunks = cut(&bytes, &[1, 7, 1000, 4097, 13, 65_537]);
    assert!(chunks.len() > 10);
    let outcome = import_chunks(&server, "imported", "", chunks).await;
    let last = outcome.done();
    assert_eq!(last.rows_read, 2_100);
    assert_eq!((last.users_created, last.users_updated), (2_100, 0));
    assert!(
        outcome.progress.len() >= 2,
        "progress arrives before the end"
    );
    assert!(outcome.progress[..outcome.progress.len() - 1]
        .iter()
        .all(|p| !p.done));
    assert!(outcome
        .progress
        .windows(2)
        .all(|w| w[0].rows_read <= w[1].rows_read));
    assert_rows_match(&server, "imported", &table).await;
    let default = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.user_count, 0, "nothing leaked into default");

    // Importing existing users updates them (and only the columns the file has).
    let mut updated_table = table.clone();
    let second = rows(1_800..2_300, 1);
    for row in &second {
        match updated_table.iter_mut().find(|r| r.id == row.id) {
            Some(existing) => *existing = row.clone(),
            None => updated_table.push(row.clone()),
        }
    }
    let bytes = ipc_stream_bytes(&[batch_of(&second)]);
    let outcome = import_chunks(&server, "imported", "user_id", cut(&bytes, &[333])).await;
    let last = outcome.done();
    assert_eq!((last.users_created, last.users_updated), (200, 300));
    assert_rows_match(&server, "imported", &updated_table).await;
    server.shutdown().await;
}

#[tokio::test]
async fn imports_keep_segments_current() {
    let server = TestServer::start().await;
    let table = rows(0..400, 0);
    let bytes = ipc_stream_bytes(&[batch_of(&table)]);
    import_chunks(&server, "", "", vec![bytes]).await.done();
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "green_us".into(),
            expression: Some(text_expr(r#"tags HAS "green" AND country = "US""#)),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut updated = table.clone();
    let changes = rows(300..450, 2);
    for row in &changes {
        match updated.iter_mut().find(|r| r.id == row.id) {
            Some(existing) => *existing = row.clone(),
            None => updated.push(row.clone()),
        }
    }
    let bytes = ipc_stream_bytes(&[batch_of(&changes)]);
    import_chunks(&server, "", "", cut(&bytes, &[999]))
        .await
        .done();
    assert_eq!(
        members(&server, "", segment_audience("green_us")).await,
        ids_where(
            &updated,
            |r| r.tagged("green") && r.country == Some("US"),
            |r| r.id.as_str()
        )
    );
    server.shutdown().await;
}

/// A batch with the good columns plus one extra column.
fn with_extra_column(rows: &[Row], name: &str, column: ArrayRef) -> RecordBatch {
    with_column(&batch_of(rows), name, column)
}

#[tokio::test]
async fn import_refuses_unsupported_columns_by_name_and_applies_nothing() {
    let server = TestServer::start().await;
    let table = rows(0..50, 0);
    import_chunks(&server, "", "", vec![ipc_stream_bytes(&[batch_of(&table)])])
        .await
        .done();
    let newcomers = rows(50..80, 0);
    let mut returning = table[..10].to_vec();
    for r in &mut returning {
        r.country = Some("ZZ");
    }
    let mut mixed = newcomers.clone();
    mixed.extend(returning);

    let mut binary = BinaryBuilder::new();
    for _ in &mixed {
        binary.append_value(b"\x00\x01");
    }
    let inner: ArrayRef = Arc::new(arrow_array::Int32Array::from(vec![1; mixed.len()]));
    let structs = StructArray::new(
        Fields::from(vec![Field::new("x", DataType::Int32, true)]),
        vec![inner],
        None,
    );
    let bad_columns: Vec<(&str, ArrayRef)> = vec![
        ("payload", Arc::new(binary.finish())),
        ("meta", Arc::new(structs)),
    ];
    for (name, column) in bad_columns {
        let batch = with_extra_column(&mixed, name, column);
        let outcome = import_chunks(&server, "", "", vec![ipc_stream_bytes(&[batch])]).await;
        assert_status(outcome.error(), Code::InvalidArgument, &[name]);
        assert!(outcome.progress.iter().all(|p| !p.done));
        assert_eq!(
            count(&server, "", text("age IS NULL OR age IS NOT NULL")).await,
            50
        );
        assert_eq!(count(&server, "", text(r#"country = "ZZ""#)).await, 0);
    }

    // A failure in a later batch of the same stream undoes the earlier batches too.
    let good = batch_of(&mixed);
    let mut bad_rows = rows(80..90, 0);
    bad_rows[4].score = Some(f64::INFINITY);
    let bad = batch_of(&bad_rows);
    let outcome = import_chunks(
        &server,
        "",
        "",
        cut(&ipc_stream_bytes(&[good, bad]), &[100]),
    )
    .await;
    assert_status(outcome.error(), Code::InvalidArgument, &["score"]);
    assert_eq!(
        count(&server, "", text("age IS NULL OR age IS NOT NULL")).await,
        50
    );
    assert_eq!(count(&server, "", text(r#"country = "ZZ""#)).await, 0);

    // A column whose type conflicts with the attribute's kind is named too.
    let mut text_age = StringBuilder::new();
    for _ in &newcomers {
        text_age.append_value("old");
    }
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("age", DataType::Utf8, true),
        ])),
        vec![Arc::new(id_column(&newcomers)), Arc::new(text_age.finish())],
    )
    .unwrap();
    let outcome = import_chunks(&server, "", "", vec![ipc_stream_bytes(&[batch])]).await;
    assert_status(outcome.error(), Code::InvalidArgument, &["age", "integer"]);

    // No id column, garbage bytes, and a truncated stream.
    let outcome = import_chunks(
        &server,
        "",
        "customer",
        vec![ipc_stream_bytes(&[batch_of(&newcomers)])],
    )
    .await;
    assert_status(outcome.error(), Code::InvalidArgument, &["customer"]);
    let outcome = import_chunks(&server, "", "", vec![b"definitely not arrow".to_vec()]).await;
    assert_eq!(outcome.error().code(), Code::InvalidArgument);
    let whole = ipc_stream_bytes(&[batch_of(&newcomers)]);
    let outcome = import_chunks(&server, "", "", vec![whole[..whole.len() / 2].to_vec()]).await;
    assert_eq!(outcome.error().code(), Code::InvalidArgument);
    assert_eq!(
        count(&server, "", text("age IS NULL OR age IS NOT NULL")).await,
        50
    );
    server.shutdown().await;
}

/// A string column of the rows' ids.
fn id_column(rows: &[Row]) -> arrow_array::StringArray {
    rows.iter().map(|r| Some(r.id.as_str())).collect()
}

#[tokio::test]
async fn import_over_grpc_of_the_demo_data_matches_its_rows() {
    let server = TestServer::start().await;
    import_demo_over_grpc(&server, "demo", 3_000, 7).await;
    let rows = demo_rows(3_000, 7);
    let response = server
        .query()
        .count(pb::CountRequest {
            dataset: "demo".into(),
            audience: text(r#"interests HAS "music""#),
            breakdown_attribute: "country".into(),
            breakdown_limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.interests.contains("music")) {
        *expected.entry(row.country.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(breakdown_map(&response.breakdown), expected);
    assert_eq!(response.count, expected.values().sum::<u64>());
    server.shutdown().await;
}

/// A Parquet table with every column type the import convention names.
struct TypedTable {
    batch: RecordBatch,
    ids: Vec<String>,
    city: Vec<Option<&'static str>>,
    tags: Vec<Option<Vec<&'static str>>>,
    small: Vec<Option<i8>>,
    big: Vec<Option<u32>>,
    ratio: Vec<Option<f32>>,
    seen_micros: Vec<Option<i64>>,
    day: Vec<Option<i32>>,
    flag: Vec<Option<bool>>,
}

fn typed_table(n: usize) -> TypedTable {
    const CITIES: [Option<&str>; 4] = [Some("Paris"), Some("Lyon"), None, Some("Nice")];
    let mut t = TypedTable {
        batch: RecordBatch::new_empty(Arc::new(Schema::empty())),
        ids: Vec::new(),
        city: Vec::new(),
        tags: Vec::new(),
        small: Vec::new(),
        big: Vec::new(),
        ratio: Vec::new(),
        seen_micros: Vec::new(),
        day: Vec::new(),
        flag: Vec::new(),
    };
    for i in 0..n {
        t.ids.push(format!("t{i}"));
        t.city.push(CITIES[i % 4]);
        t.tags.push(match i % 4 {
            0 => None,
            1 => Some(vec![]),
            2 => Some(vec!["a"]),
            _ => Some(vec!["a", "b"]),
        });
        t.small
            .push((i % 5 != 0).then_some(((i % 200) as i16 - 100) as i8));
        t.big.push((i % 6 != 0).then_some(4_000_000_000 - i as u32));
        t.ratio.push((i % 7 != 0).then_some((i % 8) as f32 * 0.25));
        // Microseconds since the epoch, around 2026-01-01.
        t.seen_micros
            .push((i % 9 != 0).then_some((JAN_1_2026 + i as i64 * 3_600_000) * 1_000 + 999));
        // Days since the epoch: 2026-01-01 is day 20454.
        t.day
            .push((i % 10 != 0).then_some(20_454 + (i % 30) as i32));
        t.flag.push((i % 11 != 0).then_some(i % 2 == 1));
    }
    let mut city = StringDictionaryBuilder::<Int32Type>::new();
    let mut tags = ListBuilder::new(StringBuilder::new());
    let mut small = Int8Builder::new();
    let mut big = UInt32Builder::new();
    let mut ratio = Float32Builder::new();
    let mut seen = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut flag = BooleanBuilder::new();
    for i in 0..n {
        city.append_option(t.city[i]);
        match &t.tags[i] {
            None => tags.append(false),
            Some(values) => {
                for v in values {
                    tags.values().append_value(v);
                }
                tags.append(true);
            }
        }
        small.append_option(t.small[i]);
        big.append_option(t.big[i]);
        ratio.append_option(t.ratio[i]);
        seen.append_option(t.seen_micros[i]);
        flag.append_option(t.flag[i]);
    }
    let ids: ArrayRef = Arc::new(arrow_array::StringArray::from(t.ids.clone()));
    let columns: Vec<ArrayRef> = vec![
        ids,
        Arc::new(city.finish()),
        Arc::new(tags.finish()),
        Arc::new(small.finish()),
        Arc::new(big.finish()),
        Arc::new(ratio.finish()),
        Arc::new(seen.finish()),
        Arc::new(Date32Array::from(t.day.clone())),
        Arc::new(flag.finish()),
    ];
    let schema = Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new(
            "city",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            true,
        ),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            true,
        ),
        Field::new("small", DataType::Int8, true),
        Field::new("big", DataType::UInt32, true),
        Field::new("ratio", DataType::Float32, true),
        Field::new(
            "seen",
            DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("day", DataType::Date32, true),
        Field::new("flag", DataType::Boolean, true),
    ]);
    t.batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
    t
}

fn write_parquet(path: &std::path::Path, batch: &RecordBatch, row_group: usize) {
    let file = std::fs::File::create(path).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(properties)).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

fn count_where<T>(values: &[T], keep: impl Fn(&T) -> bool) -> u64 {
    values.iter().filter(|v| keep(v)).count() as u64
}

#[tokio::test]
async fn import_users_file_reads_every_parquet_column_type() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let t = typed_table(1_500);
    let path = temp_path("typed.parquet");
    write_parquet(&path, &t.batch, 400);
    let outcome = import_file(&server, "typed", &path, "").await;
    let last = outcome.done();
    assert_eq!(last.rows_read, 1_500);
    assert_eq!(last.rows_total, 1_500);
    assert_eq!(last.users_created, 1_500);
    assert!(outcome.progress.iter().all(|p| p.rows_total == 1_500));

    let n = |expr: &'static str| count(&server, "typed", text(expr));
    assert_eq!(
        n(r#"city = "Paris""#).await,
        count_where(&t.city, |c| *c == Some("Paris"))
    );
    assert_eq!(
        n("city IS NULL").await,
        count_where(&t.city, |c| c.is_none())
    );
    assert_eq!(
        n("tags IS NULL").await,
        count_where(&t.tags, |v| v.as_ref().is_none_or(|v| v.is_empty()))
    );
    assert_eq!(
        n(r#"tags HAS ALL ("a", "b")"#).await,
        count_where(&t.tags, |v| v.as_ref().is_some_and(|v| v.len() == 2))
    );
    assert_eq!(
        n("small < 0").await,
        count_where(&t.small, |v| v.is_some_and(|v| v < 0))
    );
    assert_eq!(
        n("small = -100").await,
        count_where(&t.small, |v| *v == Some(-100))
    );
    assert_eq!(
        n("big > 3999999000").await,
        count_where(&t.big, |v| v.is_some_and(|v| v > 3_999_999_000))
    );
    assert_eq!(
        n("ratio >= 0.5 AND ratio < 1.25").await,
        count_where(&t.ratio, |v| v.is_some_and(|v| (0.5..1.25).contains(&v)))
    );
    assert_eq!(
        n("ratio IS NULL").await,
        count_where(&t.ratio, |v| v.is_none())
    );
    // Microseconds become milliseconds: a value 999µs past an hour is still in that hour.
    assert_eq!(
        n(r#"seen < "2026-01-02T00:00:00Z""#).await,
        count_where(&t.seen_micros, |v| v
            .is_some_and(|v| v < (JAN_1_2026 + 86_400_000) * 1_000))
    );
    assert_eq!(
        n(r#"day BETWEEN "2026-01-05" AND "2026-01-09""#).await,
        count_where(&t.day, |v| v
            .is_some_and(|d| (20_458..=20_462).contains(&d)))
    );
    assert_eq!(
        n("flag = TRUE").await,
        count_where(&t.flag, |v| *v == Some(true))
    );
    assert_eq!(
        n("flag IS NULL").await,
        count_where(&t.flag, |v| v.is_none())
    );

    // The schema: kinds, distinct values and nulls, computed from the columns.
    let schema = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "typed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(schema.dataset, "typed");
    assert_eq!(schema.user_count, 1_500);
    let described: BTreeMap<String, (i32, u64, u64)> = schema
        .attributes
        .iter()
        .map(|a| (a.name.clone(), (a.kind, a.distinct_values, a.null_count)))
        .collect();
    fn distinct<T: Ord + Clone>(values: &[Option<T>]) -> u64 {
        values
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<T>>()
            .len() as u64
    }
    use pb::AttributeKind as K;
    let ratio_bits: Vec<Option<u32>> = t.ratio.iter().map(|v| v.map(f32::to_bits)).collect();
    let expected: BTreeMap<String, (i32, u64, u64)> = [
        (
            "city",
            (
                K::Categorical,
                distinct(&t.city),
                count_where(&t.city, |c| c.is_none()),
            ),
        ),
        (
            "tags",
            (
                K::Set,
                2,
                count_where(&t.tags, |v| v.as_ref().is_none_or(|v| v.is_empty())),
            ),
        ),
        (
            "small",
            (
                K::Integer,
                distinct(&t.small),
                count_where(&t.small, |v| v.is_none()),
            ),
        ),
        (
            "big",
            (
                K::Integer,
                distinct(&t.big),
                count_where(&t.big, |v| v.is_none()),
            ),
        ),
        (
            "ratio",
            (
                K::Float,
                distinct(&ratio_bits),
                count_where(&t.ratio, |v| v.is_none()),
            ),
        ),
        (
            "seen",
            (
                K::Timestamp,
                distinct(&t.seen_micros),
                count_where(&t.seen_micros, |v| v.is_none()),
            ),
        ),
        (
            "day",
            (
                K::Timestamp,
                distinct(&t.day),
                count_where(&t.day, |v| v.is_none()),
            ),
        ),
        (
            "flag",
            (K::Boolean, 2, count_where(&t.flag, |v| v.is_none())),
        ),
    ]
    .into_iter()
    .map(|(name, (kind, d, nulls))| (name.to_owned(), (kind as i32, d, nulls)))
    .collect();
    assert_eq!(described, expected);
    std::fs::remove_file(&path).ok();
    server.shutdown().await;
}

#[tokio::test]
async fn import_users_file_reads_arrow_ipc_files_and_streams() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let table = rows(0..900, 3);
    let batches: Vec<RecordBatch> = table.chunks(250).map(batch_of).collect();

    // The IPC file format (with footer).
    let file_path = temp_path("users.arrow");
    {
        let file = std::fs::File::create(&file_path).unwrap();
        let mut writer =
            arrow_ipc::writer::FileWriter::try_new(file, &batches[0].schema()).unwrap();
        for b in &batches {
            writer.write(b).unwrap();
        }
        writer.finish().unwrap();
    }
    let outcome = import_file(&server, "ipc-file", &file_path, "").await;
    assert_eq!(outcome.done().rows_read, 900);
    assert_rows_match(&server, "ipc-file", &table).await;

    // The IPC stream format.
    let stream_path = temp_path("users.arrows");
    std::fs::write(&stream_path, ipc_stream_bytes(&batches)).unwrap();
    let outcome = import_file(&server, "ipc-stream", &stream_path, "").await;
    assert_eq!(outcome.done().users_created, 900);
    assert_rows_match(&server, "ipc-stream", &table).await;

    // A missing file, an unknown extension, an empty path.
    let missing = temp_path("missing.parquet");
    let outcome = import_file(&server, "ipc-file", &missing, "").await;
    assert_status(outcome.error(), Code::NotFound, &["path"]);
    let csv = temp_path("users.csv");
    std::fs::write(&csv, "user_id\nx\n").unwrap();
    let outcome = import_file(&server, "ipc-file", &csv, "").await;
    assert_status(outcome.error(), Code::InvalidArgument, &["path", "csv"]);
    let status = server
        .ingest()
        .import_users_file(pb::ImportUsersFileRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["path"]);
    // A corrupt Parquet file.
    let corrupt = temp_path("corrupt.parquet");
    std::fs::write(&corrupt, b"PAR1 this is not parquet PAR1").unwrap();
    let outcome = import_file(&server, "ipc-file", &corrupt, "").await;
    assert_eq!(outcome.error().code(), Code::InvalidArgument);
    assert_eq!(
        count(&server, "ipc-file", text("age IS NULL OR age IS NOT NULL")).await,
        900
    );
    for p in [file_path, stream_path, csv, corrupt] {
        std::fs::remove_file(p).ok();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn import_reads_a_custom_integer_id_column() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer", DataType::Int64, false),
        Field::new("plan", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(arrow_array::Int64Array::from(vec![101, 102, 103, 104])),
            Arc::new(arrow_array::StringArray::from(vec![
                Some("pro"),
                Some("free"),
                None,
                Some("pro"),
            ])),
        ],
    )
    .unwrap();
    let path = temp_path("customers.parquet");
    write_parquet(&path, &batch, 1024);
    import_file(&server, "crm", &path, "customer").await.done();
    assert_eq!(
        members(&server, "crm", text(r#"plan = "pro""#)).await,
        vec!["101", "104"]
    );
    // The id column is not an attribute.
    let schema = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "crm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        schema
            .attributes
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        vec!["plan"]
    );
    std::fs::remove_file(path).ok();
    server.shutdown().await;
}

#[tokio::test]
async fn describe_dataset_reports_kinds_distinct_values_and_nulls() {
    let (server, everyone) = server_with_people(210).await;
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: "s".into(),
            expression: Some(text_expr("age > 20")),
            ..Default::default()
        })
        .await
        .unwrap();
    let schema = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(schema.dataset, "default");
    assert_eq!(schema.user_count, 210);
    assert_eq!(schema.segment_count, 1);
    assert!(schema.event_names.is_empty());
    let got: Vec<(String, i32, u64, u64)> = schema
        .attributes
        .iter()
        .map(|a| (a.name.clone(), a.kind, a.distinct_values, a.null_count))
        .collect();
    use pb::AttributeKind as K;
    let nulls = |f: fn(&Person) -> bool| everyone.iter().filter(|p| f(p)).count() as u64;
    let ages: BTreeSet<i64> = everyone.iter().filter_map(|p| p.age).collect();
    let spends: BTreeSet<u64> = everyone
        .iter()
        .filter_map(|p| p.spend.map(f64::to_bits))
        .collect();
    let mut expected = vec![
        (
            "age".to_owned(),
            K::Integer as i32,
            ages.len() as u64,
            nulls(|p| p.age.is_none()),
        ),
        (
            "country".to_owned(),
            K::Categorical as i32,
            3,
            nulls(|p| p.country.is_none()),
        ),
        (
            "interests".to_owned(),
            K::Set as i32,
            4,
            nulls(|p| p.interests.is_empty()),
        ),
        (
            "spend".to_owned(),
            K::Float as i32,
            spends.len() as u64,
            nulls(|p| p.spend.is_none()),
        ),
        (
            "subscriber".to_owned(),
            K::Boolean as i32,
            2,
            nulls(|p| p.subscriber.is_none()),
        ),
    ];
    expected.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, expected);

    // Null counts and categorical values follow deletions.
    let germans: Vec<&str> = everyone
        .iter()
        .filter(|p| p.country == Some("DE"))
        .map(|p| p.id.as_str())
        .collect();
    delete_users(&server, &germans).await.unwrap();
    let rest: Vec<&Person> = everyone
        .iter()
        .filter(|p| p.country != Some("DE"))
        .collect();
    let schema = server
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(schema.user_count, rest.len() as u64);
    let country = schema
        .attributes
        .iter()
        .find(|a| a.name == "country")
        .unwrap();
    assert_eq!(country.distinct_values, 2);
    assert_eq!(
        country.null_count,
        rest.iter().filter(|p| p.country.is_none()).count() as u64
    );
    let age = schema.attributes.iter().find(|a| a.name == "age").unwrap();
    assert_eq!(
        age.null_count,
        rest.iter().filter(|p| p.age.is_none()).count() as u64
    );
    server.shutdown().await;
}

#[tokio::test]
async fn declared_attributes_fix_kinds_before_data() {
    let server = TestServer::start().await;
    let mut schema_client = server.schema();
    let declare = |attributes: Vec<(&str, pb::AttributeKind)>| pb::DeclareAttributesRequest {
        dataset: "decl".into(),
        attributes: attributes
            .into_iter()
            .map(|(name, kind)| pb::AttributeDeclaration {
                name: name.into(),
                kind: kind as i32,
            })
            .collect(),
    };
    schema_client
        .declare_attributes(declare(vec![
            ("tier", pb::AttributeKind::Categorical),
            ("score", pb::AttributeKind::Float),
            ("born", pb::AttributeKind::Timestamp),
        ]))
        .await
        .unwrap();
    // Declaring the same kind again is harmless.
    schema_client
        .declare_attributes(declare(vec![("tier", pb::AttributeKind::Categorical)]))
        .await
        .unwrap();
    let described = schema_client
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "decl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: BTreeMap<String, i32> = described
        .attributes
        .iter()
        .map(|a| (a.name.clone(), a.kind))
        .collect();
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("born".to_owned(), pb::AttributeKind::Timestamp as i32),
            ("score".to_owned(), pb::AttributeKind::Float as i32),
            ("tier".to_owned(), pb::AttributeKind::Categorical as i32),
        ])
    );
    assert_eq!(count(&server, "decl", text(r#"tier = "gold""#)).await, 0);

    // The declared kind wins over the value's natural kind: an integer into a float.
    upsert(
        &server,
        "decl",
        vec![
            update::user(
                "a",
                vec![
                    update::int("score", 3),
                    update::string("born", "2000-01-01"),
                ],
            ),
            update::user("b", vec![update::float("score", 3.5)]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(count(&server, "decl", text("score > 3.25")).await, 1);
    assert_eq!(
        count(&server, "decl", text(r#"born < "2001-01-01""#)).await,
        1
    );
    let status = upsert(
        &server,
        "decl",
        vec![update::user("c", vec![update::string("score", "high")])],
    )
    .await
    .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["score", "float"]);

    // A kind conflict names the attribute and both kinds; nothing of the request is applied.
    let status = schema_client
        .declare_attributes(declare(vec![
            ("fresh", pb::AttributeKind::Boolean),
            ("score", pb::AttributeKind::Integer),
        ]))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["attributes", "score", "float", "integer"],
    );
    let status = schema_client
        .declare_attributes(declare(vec![
            ("ok", pb::AttributeKind::Boolean),
            ("bad", pb::AttributeKind::Unspecified),
        ]))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["attributes[1].kind"]);
    let status = schema_client
        .declare_attributes(declare(vec![("1st", pb::AttributeKind::Boolean)]))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["1st"]);
    let described = schema_client
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "decl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.attributes.len(), 3, "{:?}", described.attributes);
    server.shutdown().await;
}

#[tokio::test]
async fn list_datasets_names_every_dataset_written() {
    let server = TestServer::start().await;
    let list = || {
        let mut schema = server.schema();
        async move {
            schema
                .list_datasets(pb::ListDatasetsRequest {})
                .await
                .unwrap()
                .into_inner()
                .datasets
        }
    };
    assert_eq!(list().await, vec!["default"]);
    upsert(&server, "brand-b", vec![update::user("x", vec![])])
        .await
        .unwrap();
    let import = ipc_stream_bytes(&[batch_of(&rows(0..3, 0))]);
    import_chunks(&server, "brand.a", "", vec![import])
        .await
        .done();
    let mut got = list().await;
    got.sort();
    assert_eq!(got, vec!["brand-b", "brand.a", "default"]);
    server.shutdown().await;
}

#[tokio::test]
async fn an_ipc_stream_cut_at_a_message_boundary_is_refused_and_applies_nothing() {
    let server = TestServer::start().await;
    let table = rows(0..1_400, 0);
    let batches: Vec<RecordBatch> = table.chunks(700).map(batch_of).collect();
    let schema = batches[0].schema();
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema).unwrap();
    writer.write(&batches[0]).unwrap();
    writer.write(&batches[1]).unwrap();
    // A sender that failed mid-file: two whole batches, but no end-of-stream marker.
    let truncated = writer.get_ref().clone();
    let outcome = import_chunks(&server, "cut", "", cut(&truncated, &[4097])).await;
    let error = outcome.error.expect("a truncated stream is refused");
    assert_status(&error, tonic::Code::InvalidArgument, &["end-of-stream"]);
    let datasets = dataset_names(&server).await;
    assert!(!datasets.contains(&"cut".to_owned()), "{datasets:?}");
}

#[tokio::test]
async fn server_side_imports_read_only_regular_files_inside_the_import_directory() {
    let dir = temp_path("import-dir");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let table = rows(0..50, 0);
    let bytes = ipc_stream_bytes(&[batch_of(&table)]);
    let inside = dir.join("sub/users.arrow");
    std::fs::write(&inside, &bytes).unwrap();
    let outside = dir.parent().unwrap().join("outside.arrow");
    std::fs::write(&outside, &bytes).unwrap();
    // A link inside that leads out, and one that stays in.
    std::os::unix::fs::symlink(&outside, dir.join("escape.arrow")).unwrap();
    std::os::unix::fs::symlink(&inside, dir.join("alias.arrow")).unwrap();

    // Without an import directory, server-side imports are off.
    let closed = TestServer::start().await;
    let outcome = import_file(&closed, "", &inside, "").await;
    assert_status(
        outcome.error(),
        Code::FailedPrecondition,
        &["path", "import_dir"],
    );
    closed.shutdown().await;

    let server = TestServer::start_with(ServerOptions::default().import_dir(dir.clone())).await;
    let refused = [
        outside.display().to_string(),
        format!("{}/../outside.arrow", dir.display()),
        "../outside.arrow".to_owned(),
        "escape.arrow".to_owned(),
        "missing.arrow".to_owned(),
        dir.join("missing.arrow").display().to_string(),
        "sub".to_owned(),
        "/etc/hostname".to_owned(),
    ];
    let mut messages = BTreeSet::new();
    for path in refused {
        let error = server
            .ingest()
            .import_users_file(pb::ImportUsersFileRequest {
                dataset: "imported".into(),
                path: path.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{path}: {error:?}");
        messages.insert(error.message().to_owned());
    }
    assert_eq!(
        messages.len(),
        1,
        "missing and not allowed answer the same: {messages:?}"
    );
    assert!(
        messages.iter().all(|m| m.contains("import directory")),
        "{messages:?}"
    );
    // Nothing of a refused import landed.
    let datasets = dataset_names(&server).await;
    assert!(!datasets.contains(&"imported".to_owned()), "{datasets:?}");

    for (dataset, path) in [
        ("absolute", inside.display().to_string()),
        ("relative", "sub/users.arrow".to_owned()),
        ("linked", "alias.arrow".to_owned()),
    ] {
        let outcome = import_file(&server, dataset, std::path::Path::new(&path), "").await;
        assert_eq!(outcome.done().users_created, 50, "{path}");
    }
    server.shutdown().await;
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
