//! Prometheus metrics of the real binary: `--metrics-listen` serves `/metrics`, request
//! counters and latency histograms move with RPCs, per-dataset gauges and log and snapshot
//! figures follow the data, and a metrics port equal to the gRPC one is refused.

use std::io::{Read, Write};

use audience::grpc::pb;

use crate::harness::{text, update};
use crate::process::{free_port, Process};

/// `GET path` on the metrics port: (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    body
}

/// The value of one series (`name{labels}` exactly as printed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn requests(rpc: &str, code: &str) -> String {
    format!("audience_grpc_requests_total{{rpc=\"/audience.v1.{rpc}\",code=\"{code}\"}}")
}

fn latency(part: &str, rpc: &str, code: &str, more: &str) -> String {
    format!(
        "audience_grpc_request_duration_seconds_{part}{{rpc=\"/audience.v1.{rpc}\",code=\"{code}\"{more}}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_requests_data_log_and_snapshots() {
    let dir = crate::durability::temp_dir("metrics");
    let port = free_port();
    let metrics_at = format!("127.0.0.1:{port}");
    let data_dir = dir.display().to_string();
    let server =
        Process::serving(&["--data-dir", &data_dir, "--metrics-listen", &metrics_at]).await;

    let before = scrape(port);
    assert_eq!(value(&before, &requests("QueryService/Count", "Ok")), None);
    assert_eq!(must(&before, "audience_log_appended_records_total"), 0.0);
    assert!(must(&before, "audience_process_resident_memory_bytes") > 0.0);

    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(server.channel());
    for users in [vec!["a", "b"], vec!["c"]] {
        let users = users
            .into_iter()
            .map(|id| update::user(id, vec![update::string("country", "US")]))
            .collect();
        ingest
            .upsert_users(pb::UpsertUsersRequest {
                dataset: "ads".into(),
                users,
            })
            .await
            .expect("upsert");
    }
    let mut query = pb::query_service_client::QueryServiceClient::new(server.channel());
    for _ in 0..2 {
        let count = pb::CountRequest {
            dataset: "ads".into(),
            audience: text("country = \"US\""),
            ..Default::default()
        };
        assert_eq!(
            query.count(count).await.expect("count").into_inner().count,
            3
        );
    }
    let bad = pb::CountRequest {
        dataset: "ads".into(),
        audience: text("country = "),
        ..Default::default()
    };
    let refused = query.count(bad).await.expect_err("a bad expression");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let after = scrape(port);
    assert_eq!(
        must(&after, &requests("IngestService/UpsertUsers", "Ok")),
        2.0
    );
    assert_eq!(must(&after, &requests("QueryService/Count", "Ok")), 2.0);
    assert_eq!(
        must(&after, &requests("QueryService/Count", "InvalidArgument")),
        1.0
    );
    // The histogram filled: every call in +Inf, a positive sum.
    let count_ok = ("QueryService/Count", "Ok");
    assert_eq!(
        must(&after, &latency("count", count_ok.0, count_ok.1, "")),
        2.0
    );
    assert_eq!(
        must(
            &after,
            &latency("bucket", count_ok.0, count_ok.1, ",le=\"+Inf\"")
        ),
        2.0
    );
    assert!(must(&after, &latency("sum", count_ok.0, count_ok.1, "")) > 0.0);
    // The per-dataset gauges read the published version.
    assert_eq!(must(&after, "audience_dataset_users{dataset=\"ads\"}"), 3.0);
    assert_eq!(
        must(&after, "audience_dataset_attributes{dataset=\"ads\"}"),
        1.0
    );
    assert_eq!(
        must(&after, "audience_dataset_segments{dataset=\"ads\"}"),
        0.0
    );
    assert_eq!(
        must(&after, "audience_dataset_users{dataset=\"default\"}"),
        0.0
    );
    // One log record per write, each made durable by a sync.
    assert_eq!(must(&after, "audience_log_appended_records_total"), 2.0);
    assert!(must(&after, "audience_log_appended_bytes_total") > 0.0);
    assert!(must(&after, "audience_log_fsyncs_total") >= 1.0);
    assert_eq!(must(&after, "audience_snapshots_total"), 0.0);
    // No Redis: no replication lag series.
    assert_eq!(
        value(&after, "audience_replication_lag_records{dataset=\"ads\"}"),
        None
    );

    server.snapshot().await;
    let snapshotted = scrape(port);
    assert_eq!(must(&snapshotted, "audience_snapshots_total"), 1.0);
    assert!(must(&snapshotted, "audience_snapshot_last_bytes") > 0.0);
    assert!(must(&snapshotted, "audience_snapshot_last_duration_seconds") > 0.0);
    assert_eq!(
        must(&snapshotted, &requests("AdminService/Snapshot", "Ok")),
        1.0
    );

    // Every metric the chart's Grafana dashboard queries is one the server exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/audience/files/dashboard.json"
    ))
    .expect("the chart's dashboard");
    let mut queried = 0;
    for (at, _) in dashboard.match_indices("audience_") {
        let name: String = dashboard[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let exported = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            snapshotted.contains(&format!("# TYPE {exported} ")),
            "the dashboard queries {name}, which the server does not export"
        );
        queried += 1;
    }
    assert!(queried >= 10, "{queried} metrics queried");

    let (status, _) = get(port, "/other");
    assert!(status.contains("404"), "{status}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_metrics_port_equal_to_the_grpc_port_is_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audience"))
        .args([
            "serve",
            "--check-config",
            "--listen",
            "127.0.0.1:7070",
            "--metrics-listen",
            "0.0.0.0:7070",
        ])
        .env_remove("AUDIENCE_CONFIG")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("metrics_listen (0.0.0.0:7070) must use another port than listen"),
        "{stderr}"
    );
}
