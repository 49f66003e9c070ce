//! The `audience` binary as a process, against a running [`TestServer`]: plain output, `--json`,
//! imports of Parquet and Arrow files, and errors on stderr with a non-zero exit.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use arrow_array::RecordBatch;
use audience::grpc::pb;

use crate::harness::*;

/// What one run of the binary printed.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "the command failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }
}

/// Runs `audience --addr ADDR ARGS...` to completion off the async workers.
pub async fn audience_cli(addr: &str, args: &[&str]) -> Run {
    audience_cli_with_input(addr, args, "").await
}

/// Runs `audience --addr ADDR ARGS...` with `input` on its standard input.
pub async fn audience_cli_with_input(addr: &str, args: &[&str], input: &str) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_audience"));
    command
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("AUDIENCE_ADDR")
        .env_remove("AUDIENCE_TOKEN")
        .env_remove("AUDIENCE_TLS_CERT")
        .env_remove("AUDIENCE_TLS_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = input.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .await
    .expect("the command thread")
    .expect("run the audience binary");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

async fn run(server: &TestServer, args: &[&str]) -> Run {
    audience_cli(&server.addr(), args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_prints_the_number_and_a_breakdown() {
    let (server, everyone) = server_with_people(200).await;
    let us = people_where(&everyone, |p| p.country == Some("US"));
    let out = run(&server, &["count", r#"country = "US""#]).await.ok();
    assert_eq!(out, format!("{}\n", us.len()));

    // `--by country --top 2` over people with an age: the count, the top two, other, null.
    let aged: Vec<&Person> = everyone.iter().filter(|p| p.age.is_some()).collect();
    let count_of = |c: &str| aged.iter().filter(|p| p.country == Some(c)).count();
    let nulls = aged.iter().filter(|p| p.country.is_none()).count();
    let (us_n, gb_n, de_n) = (count_of("US"), count_of("GB"), count_of("DE"));
    assert!(
        us_n > gb_n && us_n > de_n && gb_n != de_n,
        "a clear top two"
    );
    let (second, second_n, third_n) = if gb_n > de_n {
        ("GB", gb_n, de_n)
    } else {
        ("DE", de_n, gb_n)
    };
    let out = run(
        &server,
        &["count", "age IS NOT NULL", "--by", "country", "--top", "2"],
    )
    .await
    .ok();
    assert_eq!(
        Run::lines(&out),
        vec![
            aged.len().to_string(),
            format!("US\t{us_n}"),
            format!("{second}\t{second_n}"),
            format!("(other)\t{third_n}"),
            format!("(null)\t{nulls}"),
        ]
    );

    // `--json` parses and carries the same numbers.
    let out = run(
        &server,
        &[
            "count",
            "age IS NOT NULL",
            "--by",
            "country",
            "--top",
            "2",
            "--json",
        ],
    )
    .await
    .ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("count --json");
    assert_eq!(json["count"], aged.len());
    assert_eq!(json["breakdown"][0]["value"], "US");
    assert_eq!(json["breakdown"][0]["count"], us_n);
    assert_eq!(json["breakdown"].as_array().unwrap().len(), 2);
    assert_eq!(json["other_count"], third_n);
    assert_eq!(json["null_count"], nulls);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_prints_one_id_per_line() {
    let (server, everyone) = server_with_people(300).await;
    let expr = r#"interests HAS "music" OR age < 25"#;
    let expected = people_where(&everyone, |p| {
        p.has("music") || p.age.is_some_and(|a| a < 25)
    });
    assert!(expected.len() > 100);

    let out = run(&server, &["members", expr, "--limit", "3"]).await.ok();
    let three = Run::lines(&out);
    assert_eq!(three.len(), 3);
    assert_eq!(three.iter().collect::<BTreeSet<_>>().len(), 3);
    assert!(three.iter().all(|id| expected.contains(id)));

    // Without a limit: every member, once.
    let out = run(&server, &["members", expr]).await.ok();
    let all = Run::lines(&out);
    assert_eq!(all.len(), expected.len());
    assert_eq!(sorted(all), expected);

    // A limit above the total prints everyone; --json prints JSON strings.
    let out = run(&server, &["members", expr, "--limit", "100000", "--json"])
        .await
        .ok();
    let ids: Vec<String> = out
        .lines()
        .map(|line| serde_json::from_str::<String>(line).expect("a JSON string per line"))
        .collect();
    assert_eq!(sorted(ids), expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_commands_create_get_list_update_and_delete() {
    let (server, everyone) = server_with_people(100).await;
    let us = people_where(&everyone, |p| p.country == Some("US"));
    let gb = people_where(&everyone, |p| p.country == Some("GB"));

    let out = run(
        &server,
        &[
            "segment",
            "create",
            "us",
            r#"country = "US""#,
            "--name",
            "United States",
            "--label",
            "team=growth",
            "--label",
            "env=prod",
        ],
    )
    .await
    .ok();
    let fields: Vec<&str> = out.trim_end().split('\t').collect();
    assert_eq!(fields[..3], ["us", &us.len().to_string(), "United States"]);
    run(
        &server,
        &[
            "segment",
            "create",
            "gb",
            r#"country = "GB""#,
            "--label",
            "team=brand",
        ],
    )
    .await
    .ok();

    let out = run(&server, &["segment", "get", "us", "--json"]).await.ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("segment --json");
    assert_eq!(json["id"], "us");
    assert_eq!(json["name"], "United States");
    assert_eq!(json["size"], us.len());
    assert_eq!(json["labels"]["team"], "growth");
    assert_eq!(json["labels"]["env"], "prod");
    assert!(json["expression"].as_str().unwrap().contains("country"));

    let out = run(&server, &["segment", "list"]).await.ok();
    let ids: Vec<String> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec!["gb", "us"]);
    let out = run(&server, &["segment", "list", "--label", "team=growth"])
        .await
        .ok();
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with("us\t"));

    let out = run(
        &server,
        &[
            "segment",
            "update",
            "us",
            "--expr",
            r#"country = "GB""#,
            "--name",
            "Now GB",
        ],
    )
    .await
    .ok();
    let fields: Vec<&str> = out.trim_end().split('\t').collect();
    assert_eq!(fields[..3], ["us", &gb.len().to_string(), "Now GB"]);
    let segment = server
        .segments()
        .get_segment(pb::GetSegmentRequest {
            segment_id: "us".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(segment.size as usize, gb.len());
    assert_eq!(
        segment.labels.get("team").map(String::as_str),
        Some("growth")
    );

    // segments-for lists the segments of one user.
    let out = run(&server, &["segments-for", &gb[0]]).await.ok();
    assert_eq!(Run::lines(&out), vec!["gb", "us"]);
    let out = run(&server, &["segments-for", &gb[0], "--json"]).await.ok();
    let json: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json, vec!["gb", "us"]);
    let out = run(&server, &["segments-for", "nobody"]).await.ok();
    assert_eq!(out, "");

    let out = run(&server, &["segment", "delete", "us"]).await.ok();
    assert_eq!(out.trim(), "deleted us");
    let failed = run(&server, &["segment", "get", "us"]).await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("NotFound"), "{}", failed.stderr);
    assert!(failed.stderr.contains("us"));
    let failed = run(
        &server,
        &["segment", "create", "x", "age > 1", "--label", "oops"],
    )
    .await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("key=value"), "{}", failed.stderr);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_describes_the_dataset() {
    let (server, everyone) = server_with_people(50).await;
    let out = run(&server, &["schema"]).await.ok();
    let lines = Run::lines(&out);
    assert_eq!(lines[0], "dataset\tdefault");
    assert_eq!(lines[1], "users\t50");
    assert_eq!(lines[2], "segments\t0");
    assert_eq!(lines[3], "attribute\tkind\tdistinct\tnulls");
    let no_country = everyone.iter().filter(|p| p.country.is_none()).count();
    assert!(
        lines.contains(&format!("country\tcategorical\t3\t{no_country}")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.starts_with("interests\tset\t4\t")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("subscriber\tboolean\t2\t")));

    let out = run(&server, &["schema", "--json"]).await.ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("schema --json");
    assert_eq!(json["dataset"], "default");
    assert_eq!(json["users"], 50);
    let attributes = json["attributes"].as_array().unwrap();
    let age = attributes.iter().find(|a| a["name"] == "age").unwrap();
    assert_eq!(age["kind"], "integer");
    assert_eq!(
        age["null_count"],
        everyone.iter().filter(|p| p.age.is_none()).count()
    );
    let failed = run(&server, &["schema", "--dataset", "nowhere"]).await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("nowhere"));
    server.shutdown().await;
}

fn write_demo_parquet(path: &std::path::Path, batches: &[RecordBatch]) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
}

fn write_demo_arrow(path: &std::path::Path, batches: &[RecordBatch]) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = arrow_ipc::writer::FileWriter::try_new(file, &batches[0].schema()).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_streams_parquet_and_arrow_files() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let batches: Vec<RecordBatch> = audience::demo::batches(2_500, 600, 11).collect();
    let rows = demo_rows(2_500, 11);
    let parquet_path = temp_path("demo.parquet");
    write_demo_parquet(&parquet_path, &batches);

    let out = run(
        &server,
        &["import", "users", parquet_path.to_str().unwrap()],
    )
    .await
    .ok();
    assert_eq!(
        out.trim(),
        "imported 2500 rows: 2500 users created, 0 updated"
    );
    let us = rows
        .iter()
        .filter(|r| r.country.as_deref() == Some("US"))
        .count();
    let out = run(&server, &["count", r#"country = "US""#]).await.ok();
    assert_eq!(out.trim(), us.to_string());

    // The same file again updates everyone; --json prints the summary as JSON.
    let out = run(
        &server,
        &["import", "users", parquet_path.to_str().unwrap(), "--json"],
    )
    .await
    .ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("import --json");
    assert_eq!(json["rows"], 2_500);
    assert_eq!(json["created"], 0);
    assert_eq!(json["updated"], 2_500);

    // An Arrow IPC file into another dataset, and the server reading a file itself.
    let arrow_path = temp_path("demo.arrow");
    // One batch: the IPC file format allows a single dictionary per column.
    write_demo_arrow(&arrow_path, &[audience::demo::batch(0..1_200, 11)]);
    let out = run(
        &server,
        &[
            "import",
            "users",
            arrow_path.to_str().unwrap(),
            "--dataset",
            "ipc",
        ],
    )
    .await
    .ok();
    assert_eq!(
        out.trim(),
        "imported 1200 rows: 1200 users created, 0 updated"
    );
    let first_1200_ios = rows[..1200]
        .iter()
        .filter(|r| r.device.as_deref() == Some("ios"))
        .count();
    let out = run(&server, &["count", r#"device = "ios""#, "--dataset", "ipc"])
        .await
        .ok();
    assert_eq!(out.trim(), first_1200_ios.to_string());
    let out = run(
        &server,
        &[
            "import",
            "users",
            parquet_path.to_str().unwrap(),
            "--dataset",
            "server-side",
            "--server-side",
        ],
    )
    .await
    .ok();
    assert_eq!(
        out.trim(),
        "imported 2500 rows: 2500 users created, 0 updated"
    );
    assert_eq!(
        count(&server, "server-side", text(r#"country = "US""#)).await,
        us as u64
    );

    // A file the client cannot read, and a users file imported as events, fail with a message.
    let failed = run(
        &server,
        &["import", "users", "/definitely/not/here.parquet"],
    )
    .await;
    assert!(!failed.success);
    assert!(failed.stderr.starts_with("error:"), "{}", failed.stderr);
    let failed = run(
        &server,
        &["import", "events", parquet_path.to_str().unwrap()],
    )
    .await;
    assert!(!failed.success);
    assert!(
        failed.stderr.contains("InvalidArgument")
            && failed.stderr.contains("not part of an events table"),
        "{}",
        failed.stderr
    );
    for path in [parquet_path, arrow_path] {
        std::fs::remove_file(path).ok();
    }
    server.shutdown().await;
}

/// Five events, one of them older than the default retention, of three users.
fn write_events_parquet(path: &std::path::Path) {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    const DAY: i64 = 86_400_000;
    let rows: [(&str, &str, i64, Option<f64>); 5] = [
        ("c1", "purchase", JAN_1_2026 - DAY, Some(10.0)),
        ("c1", "purchase", JAN_1_2026 - 2 * DAY, None),
        ("c2", "view", JAN_1_2026 - DAY / 8, None),
        ("c3", "purchase", JAN_1_2026 - 500 * DAY, Some(3.5)),
        ("c2", "purchase", JAN_1_2026 - 10 * DAY, None),
    ];
    let schema = Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("value", DataType::Float64, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.2),
        )),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.3))),
    ];
    let batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
    write_demo_parquet(path, &[batch]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_events_streams_a_file_and_prints_a_summary() {
    let server = TestServer::start_with(ServerOptions::default().temp_imports()).await;
    let path = temp_path("events.parquet");
    write_events_parquet(&path);
    let file = path.to_str().unwrap();

    let out = run(&server, &["import", "events", file]).await.ok();
    assert_eq!(
        out.trim(),
        "imported 5 rows: 4 events recorded, 1 expired, 3 users created"
    );
    let out = run(&server, &["count", "DID purchase"]).await.ok();
    assert_eq!(out.trim(), "2");
    let out = run(&server, &["members", "DID purchase IN LAST 7d"])
        .await
        .ok();
    assert_eq!(Run::lines(&out), vec!["c1"]);
    let out = run(&server, &["count", "DID view IN LAST 1d"]).await.ok();
    assert_eq!(out.trim(), "1");
    // The user of the expired event exists, with no event.
    let out = run(&server, &["count", "NOT DID purchase"]).await.ok();
    assert_eq!(out.trim(), "1");
    // The schema lists event names with their counts, and the retention.
    let out = run(&server, &["schema"]).await.ok();
    let lines = Run::lines(&out);
    let events = lines
        .iter()
        .position(|l| l == "event\tcount\t(kept 400 days)")
        .expect("an events section");
    assert_eq!(lines[events + 1..], ["purchase\t3", "view\t1"]);
    let out = run(&server, &["schema", "--json"]).await.ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("schema --json");
    assert_eq!(json["event_retention_days"], 400);
    assert_eq!(json["events"][0]["name"], "purchase");
    assert_eq!(json["events"][0]["count"], 3);

    // --json, into another dataset.
    let out = run(
        &server,
        &["import", "events", file, "--dataset", "j", "--json"],
    )
    .await
    .ok();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("import --json");
    assert_eq!(json["rows"], 5);
    assert_eq!(json["events"], 4);
    assert_eq!(json["expired"], 1);
    assert_eq!(json["created"], 3);
    assert_eq!(
        count(&server, "j", text("DID purchase AT LEAST 2 TIMES")).await,
        1
    );

    // The server reading the file itself.
    let out = run(
        &server,
        &["import", "events", file, "--dataset", "s", "--server-side"],
    )
    .await
    .ok();
    assert_eq!(
        out.trim(),
        "imported 5 rows: 4 events recorded, 1 expired, 3 users created"
    );
    let out = run(&server, &["count", "DID purchase", "--dataset", "s"])
        .await
        .ok();
    assert_eq!(out.trim(), "2");

    // Importing it again adds the events again; nobody is new.
    let out = run(&server, &["import", "events", file]).await.ok();
    assert_eq!(
        out.trim(),
        "imported 5 rows: 4 events recorded, 1 expired, 0 users created"
    );
    let out = run(&server, &["count", "DID purchase AT LEAST 4 TIMES"])
        .await
        .ok();
    assert_eq!(out.trim(), "1");

    // An id column other than user_id means nothing for events.
    let failed = run(
        &server,
        &["import", "events", file, "--id-column", "customer"],
    )
    .await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("--id-column"), "{}", failed.stderr);
    std::fs::remove_file(path).ok();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_non_zero_with_the_message_on_stderr() {
    let (server, _) = server_with_people(10).await;
    let failed = run(&server, &["count", "age = AND x"]).await;
    assert!(!failed.success);
    assert_eq!(failed.stdout, "");
    assert!(failed.stderr.contains("1:7"), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("InvalidArgument"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("expected a value after '='"),
        "{}",
        failed.stderr
    );
    let failed = run(&server, &["members", "agee > 1", "--limit", "2"]).await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("agee"), "{}", failed.stderr);
    let failed = run(&server, &["count", "age > 1", "--as-of", "yesterday"]).await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("--as-of"), "{}", failed.stderr);

    // A server that is not there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let failed = audience_cli(&format!("http://{closed}"), &["count", "age > 1"]).await;
    assert!(!failed.success);
    assert!(
        failed.stderr.contains("cannot connect"),
        "{}",
        failed.stderr
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_is_passed_to_the_server() {
    let server = TestServer::start().await;
    const DAY: i64 = 86_400_000;
    let users = (0..40)
        .map(|d| {
            update::user(
                &format!("u{d}"),
                vec![update::timestamp("signup", JAN_1_2026 - d * DAY)],
            )
        })
        .collect();
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .unwrap();
    // The server clock is fixed at 2026-01-01: days 0..=7.
    let out = run(&server, &["count", "signup >= NOW - 7d"]).await.ok();
    assert_eq!(out.trim(), "8");
    // As of 2025-12-22 (ten days earlier): days 10..=17.
    let out = run(
        &server,
        &[
            "members",
            "signup >= NOW - 7d AND signup <= NOW",
            "--as-of",
            "2025-12-22T00:00:00Z",
        ],
    )
    .await
    .ok();
    let expected: Vec<String> = (10..=17).map(|d| format!("u{d}")).collect();
    assert_eq!(sorted(Run::lines(&out)), sorted(expected));
    server.shutdown().await;
}

/// The latency percentiles of a bench report (or of one operation), checked to be positive
/// and ordered p50 ≤ p90 ≤ p99 ≤ p99.9 ≤ max.
#[track_caller]
fn assert_percentiles_ordered(stats: &serde_json::Value) {
    let latency = &stats["latency_us"];
    let values: Vec<u64> = ["p50", "p90", "p99", "p99_9", "max"]
        .iter()
        .map(|key| latency[*key].as_u64().expect("a percentile"))
        .collect();
    assert!(values[0] > 0, "{latency}");
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{latency}");
}

/// Runs `audience --json bench ARGS... --requests 200` and returns its one JSON object.
async fn bench_json(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "bench"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--requests", "200"]);
    let out = run(server, &full).await.ok();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drives_every_workload_and_reports_json() {
    // Events are timed near the bench's own clock, which the server must accept.
    let server = TestServer::start_with(
        ServerOptions::default().clock(std::sync::Arc::new(audience::time::SystemClock)),
    )
    .await;
    let everyone = people(60);
    load_people(&server, "", &everyone).await;
    let now = audience::time::Clock::now_millis(&audience::time::SystemClock);
    let signups = (0..10)
        .map(|i| update::user(&format!("p{i:04}"), vec![update::timestamp("signup", now)]))
        .collect();
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            users: signups,
            ..Default::default()
        })
        .await
        .unwrap();
    for (id, text) in [
        ("us", r#"country = "US""#),
        ("music", r#"interests HAS "music""#),
    ] {
        run(&server, &["segment", "create", id, text]).await.ok();
    }
    // Before any event: record-events needs names from somewhere.
    let failed = run(&server, &["bench", "record-events", "--requests", "5"]).await;
    assert!(!failed.success);
    assert!(failed.stderr.contains("--event-names"), "{}", failed.stderr);

    let three = r#"country = "US" AND age > 20 AND interests HAS "music""#;
    let count = bench_json(&server, &["count", "--expr", three, "--concurrency", "4"]).await;
    let segments_for = bench_json(&server, &["segments-for", "--concurrency", "4"]).await;
    let upsert = bench_json(
        &server,
        &[
            "upsert",
            "--attributes",
            "country,age,interests,subscriber,spend,signup",
            "--concurrency",
            "2",
        ],
    )
    .await;
    let events = bench_json(
        &server,
        &[
            "record-events",
            "--batch",
            "10",
            "--event-names",
            "view,buy",
        ],
    )
    .await;
    // Now the dataset has events: mixed takes their names itself.
    let mixed = bench_json(
        &server,
        &[
            "mixed",
            "--expr",
            "age > 30",
            "--mix",
            "segments-for=50,count=20,upsert=20,record-events=10",
            "--concurrency",
            "8",
            "--connections",
            "2",
        ],
    )
    .await;
    for (name, report) in [
        ("count", &count),
        ("segments-for", &segments_for),
        ("upsert", &upsert),
        ("record-events", &events),
        ("mixed", &mixed),
    ] {
        assert_eq!(report["workload"], name);
        assert_eq!(report["mode"], "closed");
        assert_eq!(report["requests"], 200, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert_percentiles_ordered(report);
        assert!(report["throughput_rps"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert_eq!(count["concurrency"], 4);
    assert_eq!(events["events"], 2000);
    assert_eq!(mixed["connections"], 2);
    let operations = mixed["operations"].as_object().unwrap();
    assert_eq!(operations.len(), 4);
    let mut sum = 0;
    for stats in operations.values() {
        sum += stats["requests"].as_u64().unwrap();
        assert_eq!(stats["errors"], 0);
        if stats["requests"].as_u64().unwrap() > 0 {
            assert_percentiles_ordered(stats);
        }
    }
    assert_eq!(sum, 200);
    assert_eq!(
        mixed["events"].as_u64().unwrap(),
        operations["record-events"]["requests"].as_u64().unwrap() * 100
    );
    // The upserts and events went in: some user has a value only a bench upsert could set,
    // or the events are there.
    let schema = run(&server, &["--json", "schema"]).await.ok();
    assert!(schema.contains(r#""name":"view""#), "{schema}");

    // Open loop: 200 requests at 400/s take half a second, whatever the latency.
    let open = bench_json(&server, &["segments-for", "--rate", "400"]).await;
    assert_eq!(open["mode"], "open");
    assert_eq!(open["requests"], 200);
    assert_eq!(open["errors"], 0);
    assert_eq!(open["unsent"], 0);
    assert_percentiles_ordered(&open);
    let rps = open["throughput_rps"].as_f64().unwrap();
    assert!((340.0..=440.0).contains(&rps), "{rps} req/s at 400/s");

    // Plain text: a header, the column names, one row.
    let text = run(
        &server,
        &["bench", "count", "--expr", "age > 1", "--requests", "5"],
    )
    .await
    .ok();
    let lines = Run::lines(&text);
    assert!(
        lines[0].starts_with("bench count on dataset default"),
        "{text}"
    );
    assert!(lines[1].starts_with("operation"), "{text}");
    assert!(
        lines[2].starts_with("count") && lines[2].contains(" 5 "),
        "{text}"
    );

    // Refusals: nonsense flags (clap), a bad expression, an unknown attribute, no server.
    for (args, needle) in [
        (
            vec!["bench", "count", "--expr", "age > 1", "--rate", "0"],
            "--rate",
        ),
        (vec!["bench", "count"], "--expr"),
        (vec!["bench", "segments-for", "--duration", "10"], "unit"),
        (
            vec!["bench", "segments-for", "--concurrency", "0"],
            "--concurrency",
        ),
        (
            vec![
                "bench",
                "segments-for",
                "--concurrency",
                "2",
                "--connections",
                "3",
            ],
            "--connections",
        ),
        (
            vec!["bench", "count", "--expr", "age = AND"],
            "InvalidArgument",
        ),
        (vec!["bench", "mixed", "--requests", "5"], "--expr"),
        (vec!["bench", "upsert", "--attributes", "nope"], "'nope'"),
    ] {
        let failed = run(&server, &args).await;
        assert!(!failed.success, "{args:?} succeeded");
        assert!(
            failed.stderr.contains(needle),
            "{args:?}: {}",
            failed.stderr
        );
    }
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let failed = audience_cli(
        &format!("http://{closed}"),
        &["bench", "segments-for", "--requests", "5"],
    )
    .await;
    assert!(!failed.success);
    assert!(
        failed.stderr.contains("cannot connect"),
        "{}",
        failed.stderr
    );
    assert!(failed.stderr.contains("refused"), "{}", failed.stderr);
    server.shutdown().await;
}
