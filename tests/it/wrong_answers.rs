//! Regression tests of wrong answers (issue 10, point 4): `as_of` and saved segments, set
//! breakdowns and their limits, page tokens, writes that raced outside the writer lock, and
//! floats set from integers. Each failed before its fix.

use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use audience::engine::{EngineError, ImportBatch, Limits, SegmentDefinition};
use audience::grpc::pb;
use tonic::Code;

use crate::harness::*;

const DAY_MS: i64 = 86_400_000;

async fn record(server: &TestServer, events: &[(&str, &str, i64)]) {
    server
        .ingest()
        .record_events(pb::RecordEventsRequest {
            events: events
                .iter()
                .map(|(user, event, ts)| pb::Event {
                    user_id: (*user).into(),
                    event: (*event).into(),
                    ts: Some(timestamp(*ts)),
                    value: None,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn create(server: &TestServer, id: &str, expr: &str) -> Result<(), tonic::Status> {
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            segment_id: id.into(),
            expression: Some(text_expr(expr)),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn listed(
    server: &TestServer,
    audience: Option<pb::Audience>,
    as_of: Option<i64>,
) -> Vec<String> {
    let page = server
        .query()
        .list_members(pb::ListMembersRequest {
            audience,
            as_of: as_of.map(timestamp),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    sorted(page.user_ids)
}

#[tokio::test]
async fn as_of_anchors_the_windows_of_saved_segments() {
    let server = TestServer::start().await;
    let now = JAN_1_2026;
    record(
        &server,
        &[
            ("early", "purchase", now - 40 * DAY_MS),
            ("late", "purchase", now - 2 * DAY_MS),
        ],
    )
    .await;
    create(&server, "recent", "DID purchase IN LAST 7d")
        .await
        .unwrap();
    create(&server, "outer", r#"SEGMENT "recent""#)
        .await
        .unwrap();
    let past = Some(now - 35 * DAY_MS);
    for audience in [
        segment_audience("recent"),
        segment_audience("outer"),
        text(r#"SEGMENT "recent""#),
        text(r#"SEGMENT "outer" OR SEGMENT "recent""#),
    ] {
        assert_eq!(listed(&server, audience.clone(), None).await, ["late"]);
        assert_eq!(listed(&server, audience.clone(), past).await, ["early"]);
        let count = server
            .query()
            .count(pb::CountRequest {
                audience,
                as_of: past.map(timestamp),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .count;
        assert_eq!(count, 1);
    }
    server.shutdown().await;
}

async fn breakdown_of(
    server: &TestServer,
    attribute: &str,
    limit: u32,
) -> Result<pb::CountResponse, tonic::Status> {
    server
        .query()
        .count(pb::CountRequest {
            audience: text("interests IS NOT NULL OR age IS NOT NULL"),
            breakdown_attribute: attribute.into(),
            breakdown_limit: limit,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn set_breakdown_counts_each_left_out_user_once_and_limits_are_checked() {
    let limits = Limits {
        max_breakdown_values: 50,
        ..Default::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![
                update::user("u1", vec![update::set_of("interests", &["x", "y", "z"])]),
                update::user("u2", vec![update::set_of("interests", &["x"])]),
                update::user("u3", vec![update::set_of("interests", &["x"])]),
                update::user("u4", vec![update::set_of("interests", &["y"])]),
                update::user("u5", vec![update::int("age", 30)]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let response = breakdown_of(&server, "interests", 1).await.unwrap();
    assert_eq!(response.breakdown.len(), 1);
    assert_eq!(response.breakdown[0].value, "x");
    assert_eq!(response.breakdown[0].count, 3);
    // y and z are held by u1 and u4: two users, not three (user, value) pairs.
    assert_eq!(response.breakdown_other_count, 2);
    assert_eq!(response.breakdown_null_count, 1);

    for limit in [0, 51, u32::MAX] {
        let status = breakdown_of(&server, "interests", limit).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, &["breakdown_limit"]);
    }
    assert!(breakdown_of(&server, "interests", 50).await.is_ok());
    let status = breakdown_of(&server, "age", 5).await.unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["breakdown_attribute", "age"],
    );
    server.shutdown().await;
}

async fn page(
    server: &TestServer,
    dataset: &str,
    audience: Option<pb::Audience>,
    token: &str,
) -> Result<pb::ListMembersResponse, tonic::Status> {
    server
        .query()
        .list_members(pb::ListMembersRequest {
            dataset: dataset.into(),
            audience,
            page_size: 2,
            page_token: token.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_dataset_and_audience_and_cannot_be_forged() {
    let server = TestServer::start().await;
    let everyone = people(40);
    load_people(&server, "a", &everyone).await;
    load_people(&server, "b", &everyone).await;
    let us = r#"country = "US""#;
    let first = page(&server, "a", text(us), "").await.unwrap();
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());

    let status = page(&server, "b", None, &token).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["page_token"]);
    let status = page(&server, "a", text(r#"country = "GB""#), &token)
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["page_token"]);
    // Every single-character change, wherever it lands, is refused as forged.
    for at in 0..token.len() {
        let mut forged: Vec<char> = token.chars().collect();
        forged[at] = if forged[at] == '0' { '1' } else { '0' };
        let forged: String = forged.into_iter().collect();
        let status = page(&server, "a", None, &forged).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, &["page_token"]);
    }
    // The real token still reads on, with or without the same audience.
    let second = page(&server, "a", text(us), &token).await.unwrap();
    let again = page(&server, "a", None, &token).await.unwrap();
    assert_eq!(second.user_ids, again.user_ids);
    assert!(second
        .user_ids
        .iter()
        .all(|id| !first.user_ids.contains(id)));
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_label_updates_are_all_kept() {
    let server = TestServer::start().await;
    load_people(&server, "", &people(20)).await;
    create(&server, "s", r#"country = "US""#).await.unwrap();
    let updates = (0..8).map(|i| {
        let mut client = server.segments();
        async move {
            client
                .update_segment(pb::UpdateSegmentRequest {
                    segment_id: "s".into(),
                    labels: [(format!("k{i}"), format!("v{i}"))].into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    all_at_once(updates).await;
    let segment = server
        .segments()
        .get_segment(pb::GetSegmentRequest {
            segment_id: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(segment.labels.len(), 8, "labels: {:?}", segment.labels);
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_creates_never_exceed_max_segments() {
    let limits = Limits {
        max_segments: 2,
        ..Default::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    load_people(&server, "", &people(20)).await;
    let engine = server.engine().clone();
    let creates = (0..8).map(|i| {
        let engine = engine.clone();
        async move {
            let definition = SegmentDefinition {
                id: format!("s{i}"),
                name: format!("s{i}"),
                description: String::new(),
                labels: Default::default(),
                expression: engine.parse(r#"country = "US""#)?,
                created_at: JAN_1_2026,
                updated_at: JAN_1_2026,
            };
            engine.create_segment("default", definition).await
        }
    });
    let results = all_at_once(creates).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(refused, EngineError::LimitExceeded { .. }),
            "{refused}"
        );
    }
    assert_eq!(engine.snapshot("default").unwrap().segment_count(), 2);
    assert_eq!(created, 2);
    server.shutdown().await;
}

fn users_batch(ids: &[&str]) -> ImportBatch {
    let batch = RecordBatch::try_from_iter([
        (
            "user_id",
            Arc::new(StringArray::from(ids.to_vec())) as arrow_array::ArrayRef,
        ),
        (
            "country",
            Arc::new(StringArray::from(vec!["US"; ids.len()])) as arrow_array::ArrayRef,
        ),
    ])
    .unwrap();
    ImportBatch {
        batch,
        id_column: "user_id".into(),
    }
}

#[tokio::test]
async fn two_imports_creating_one_dataset_both_land() {
    let server = TestServer::start().await;
    let engine = server.engine().clone();
    let mut first = engine.begin_import("fresh").await.unwrap();
    let second = tokio::spawn({
        let engine = engine.clone();
        async move {
            let mut import = engine.begin_import("fresh").await?;
            import.apply(users_batch(&["b1", "b2"])).await?;
            import.commit().await
        }
    });
    // Give the second import every chance to start beside the first.
    tokio::task::yield_now().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    first.apply(users_batch(&["a1"])).await.unwrap();
    first.commit().await.unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(engine.snapshot("fresh").unwrap().user_count(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_float_attribute_refuses_integers_it_cannot_hold_exactly() {
    let server = TestServer::start().await;
    let mut ingest = server.ingest();
    ingest
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user("u", vec![update::float("spend", 1.5)])],
            ..Default::default()
        })
        .await
        .unwrap();
    let exact = 1_i64 << 60;
    ingest
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user("u", vec![update::int("spend", exact)])],
            ..Default::default()
        })
        .await
        .unwrap();
    let status = ingest
        .upsert_users(pb::UpsertUsersRequest {
            users: vec![update::user("u", vec![update::int("spend", (1 << 53) + 1)])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["spend", "9007199254740993"],
    );
    let count = server
        .query()
        .count(pb::CountRequest {
            audience: text(&format!("spend = {exact}")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1, "the refused write left the exact value in place");
    server.shutdown().await;
}

/// Runs `tasks` at once on the runtime and returns their outputs in order.
async fn all_at_once<T: Send + 'static>(
    tasks: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = tasks.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}
