//! Graceful shutdown of the real binary: SIGTERM turns health NOT_SERVING, refuses new calls
//! with UNAVAILABLE, lets a running export finish within the grace period (or cuts it past it),
//! and exits 0. Also a stream paused through keepalive pings, and the dataset in request spans.

use std::time::Duration;

use audience::grpc::pb;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::text;
use crate::process::Process;

/// Enough ids (about 2 MB) that the server's send buffer (hyper's 400 KB per stream) cannot
/// hold the whole export: it runs until the test has read most of it.
const DEMO_USERS: &str = "200000";
const CHUNK: u32 = 500;

/// A channel whose stream window holds about two export chunks, so that the server cannot
/// send a whole export ahead of a slow reader: the export stays running while the test reads.
fn narrow_channel(server: &Process) -> Channel {
    Endpoint::from_shared(server.url())
        .expect("endpoint")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect_lazy()
}

/// An export of every demo user in small chunks.
async fn start_export(channel: Channel) -> tonic::Streaming<pb::ExportMembersResponse> {
    pb::query_service_client::QueryServiceClient::new(channel)
        .export_members(pb::ExportMembersRequest {
            audience: text("country IS NULL OR NOT country IS NULL"),
            chunk_size: CHUNK,
            ..Default::default()
        })
        .await
        .expect("the export starts")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_export_finish_refuses_new_calls_and_exits_0() {
    let server =
        Process::serving(&["--demo-users", DEMO_USERS, "--shutdown-grace-secs", "60"]).await;
    let mut export = start_export(narrow_channel(&server)).await;
    let first = export.message().await.expect("a chunk").expect("a chunk");
    let total = first.total;
    assert_eq!(total, DEMO_USERS.parse::<u64>().unwrap());
    server.terminate();

    // Health turns NOT_SERVING while the export still runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.health().await != Some(ServingStatus::NotServing) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new call, on a new connection or the one already open, is refused.
    let refused = pb::schema_service_client::SchemaServiceClient::new(server.channel())
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect_err("refused while shutting down");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{refused:?}");

    // The export goes on to its end, read slowly; the server waits for it.
    let mut sent = first.user_ids.len() as u64;
    while let Some(chunk) = export.message().await.expect("the export goes on") {
        sent += chunk.user_ids.len() as u64;
        assert_eq!(chunk.sent, sent);
        if sent.is_multiple_of(20 * CHUNK as u64) {
            assert!(server.exit_status().is_none(), "exited mid-export");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(sent, total, "every member exported");
    let status = server.wait_exit(Duration::from_secs(20)).await;
    let log = server.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("every call ended"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_period_the_server_stops_anyway_and_exits_0() {
    let server =
        Process::serving(&["--demo-users", DEMO_USERS, "--shutdown-grace-secs", "1"]).await;
    // An export nobody reads past its first chunk.
    let mut export = start_export(narrow_channel(&server)).await;
    export.message().await.expect("a chunk").expect("a chunk");
    let signalled = std::time::Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(20)).await;
    let log = server.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(signalled.elapsed() >= Duration::from_secs(1), "{log}");
    assert!(log.contains("grace period over"), "{log}");
    drop(export);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_idle_through_keepalive_pings_goes_on() {
    let server = Process::serving(&[
        "--demo-users",
        DEMO_USERS,
        "--keepalive-interval-secs",
        "1",
        "--keepalive-timeout-secs",
        "1",
    ])
    .await;
    let mut export = start_export(narrow_channel(&server)).await;
    let first = export.message().await.expect("a chunk").expect("a chunk");
    // The reader pauses through several ping rounds: the client answers them, so the
    // connection and the stream stay open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut sent = first.user_ids.len() as u64;
    while let Some(chunk) = export.message().await.expect("the export goes on") {
        sent += chunk.user_ids.len() as u64;
    }
    assert_eq!(sent, first.total, "every member exported after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_span_names_the_rpc_and_the_dataset() {
    let server = Process::serving(&["--log-format", "json"]).await;
    let refused = pb::query_service_client::QueryServiceClient::new(server.channel())
        .count(pb::CountRequest {
            dataset: "spans".into(),
            audience: text("country = "),
            ..Default::default()
        })
        .await
        .expect_err("a bad expression");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let log = server.log_text();
    // Every event logged during the call carries the request's span (RPC, token name) and the
    // handler's (dataset).
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["spans"][0]["method"] == "/audience.v1.QueryService/Count")
        .collect();
    assert!(!events.is_empty(), "no log line of the refused call: {log}");
    for event in events {
        let spans = event["spans"].as_array().expect("spans");
        assert!(
            spans.iter().any(|span| span["dataset"] == "spans"),
            "{event}"
        );
    }
}
