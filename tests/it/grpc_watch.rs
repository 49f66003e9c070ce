//! WatchService over the wire: users entering and leaving saved segments as writes happen,
//! resuming by token without loss or duplicates, refused tokens, deleted segments, a stalled
//! reader cut off with a token while the writes go on, and `audience watch`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use audience::engine::Limits;
use audience::grpc::pb;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::harness::*;

/// One change as `(segment, user, "entered" | "left")`.
type Change = (String, String, &'static str);

fn entered(segment: &str, user: &str) -> Change {
    (segment.to_owned(), user.to_owned(), "entered")
}

fn left(segment: &str, user: &str) -> Change {
    (segment.to_owned(), user.to_owned(), "left")
}

fn changes_of(message: &pb::WatchResponse) -> Vec<Change> {
    message
        .changes
        .iter()
        .map(|c| {
            let kind = match pb::MembershipChangeKind::try_from(c.kind) {
                Ok(pb::MembershipChangeKind::Entered) => "entered",
                Ok(pb::MembershipChangeKind::Left) => "left",
                other => panic!("unexpected change kind {other:?}"),
            };
            (c.segment_id.clone(), c.user_id.clone(), kind)
        })
        .collect()
}

/// An open watch and the token of the last message read from it.
struct Watch {
    stream: Streaming<pb::WatchResponse>,
    token: String,
    /// Messages read, the first (empty) one included.
    messages: usize,
}

impl Watch {
    /// Reads until exactly `n` changes have arrived.
    async fn take(&mut self, n: usize) -> Vec<Change> {
        let mut changes = Vec::new();
        while changes.len() < n {
            let message = tokio::time::timeout(HARD_TIMEOUT, self.stream.message())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} changes arrived", changes.len()))
                .expect("a watch message")
                .expect("the stream to go on");
            assert!(
                message.changes.len() <= 1_000,
                "a batch of {}",
                message.changes.len()
            );
            changes.extend(changes_of(&message));
            self.token = message.resume_token;
            self.messages += 1;
        }
        assert_eq!(changes.len(), n, "more changes than expected: {changes:?}");
        changes
    }

    /// Reads until the stream ends with a status, returning the changes read before it.
    async fn until_error(&mut self) -> (Vec<Change>, Status) {
        let mut changes = Vec::new();
        loop {
            let message = tokio::time::timeout(HARD_TIMEOUT, self.stream.message())
                .await
                .expect("the stream to end in time");
            match message {
                Ok(Some(message)) => {
                    changes.extend(changes_of(&message));
                    self.token = message.resume_token;
                    self.messages += 1;
                }
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return (changes, status),
            }
        }
    }
}

/// Opens a watch on `channel` and reads its first message, which carries no changes.
async fn watch_on(
    channel: Channel,
    dataset: &str,
    segments: &[&str],
    token: &str,
) -> Result<Watch, Status> {
    let mut stream = pb::watch_service_client::WatchServiceClient::new(channel)
        .watch(pb::WatchRequest {
            dataset: dataset.to_owned(),
            segment_ids: segments.iter().map(|s| (*s).to_owned()).collect(),
            resume_token: token.to_owned(),
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(HARD_TIMEOUT, stream.message())
        .await
        .expect("the first watch message in time")?
        .expect("a first watch message");
    assert!(first.changes.is_empty(), "the first message has no changes");
    assert!(!first.resume_token.is_empty());
    Ok(Watch {
        stream,
        token: first.resume_token,
        messages: 1,
    })
}

async fn watch(server: &TestServer, segments: &[&str], token: &str) -> Result<Watch, Status> {
    watch_on(server.channel(), "", segments, token).await
}

/// Declares the attributes the tests' segments use, then creates a segment.
async fn create_segment(server: &TestServer, dataset: &str, id: &str, expr: &str) {
    let declare = |name: &str, kind: pb::AttributeKind| pb::AttributeDeclaration {
        name: name.to_owned(),
        kind: kind as i32,
    };
    server
        .schema()
        .declare_attributes(pb::DeclareAttributesRequest {
            dataset: dataset.to_owned(),
            attributes: vec![
                declare("age", pb::AttributeKind::Integer),
                declare("country", pb::AttributeKind::Categorical),
                declare("interests", pb::AttributeKind::Set),
            ],
        })
        .await
        .expect("declare attributes");
    server
        .segments()
        .create_segment(pb::CreateSegmentRequest {
            dataset: dataset.to_owned(),
            segment_id: id.to_owned(),
            expression: Some(text_expr(expr)),
            ..Default::default()
        })
        .await
        .expect("create segment");
}

async fn upsert(server: &TestServer, users: Vec<pb::UserUpdate>) {
    upsert_in(server, "", users).await;
}

async fn upsert_in(server: &TestServer, dataset: &str, users: Vec<pb::UserUpdate>) {
    server
        .ingest()
        .upsert_users(pb::UpsertUsersRequest {
            dataset: dataset.to_owned(),
            users,
        })
        .await
        .expect("upsert users");
}

fn aged(user: &str, age: i64) -> pb::UserUpdate {
    update::user(user, vec![update::int("age", age)])
}

#[tokio::test]
async fn attribute_changes_move_users_in_and_out_in_write_order() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let mut adults = watch(&server, &["adults"], "").await.unwrap();

    upsert(&server, vec![aged("u1", 20), aged("u2", 10)]).await;
    upsert(&server, vec![aged("u1", 15)]).await;
    upsert(&server, vec![aged("u2", 30)]).await;
    // A write that moves nobody across the boundary says nothing.
    upsert(&server, vec![aged("u2", 31), aged("u3", 5)]).await;
    for _ in 0..3 {
        upsert(&server, vec![aged("u3", 40)]).await;
        upsert(&server, vec![aged("u3", 4)]).await;
    }
    let mut expected = vec![
        entered("adults", "u1"),
        left("adults", "u1"),
        entered("adults", "u2"),
    ];
    for _ in 0..3 {
        expected.push(entered("adults", "u3"));
        expected.push(left("adults", "u3"));
    }
    assert_eq!(adults.take(expected.len()).await, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn one_stream_watches_two_segments_and_sees_deleted_users_leave() {
    let server = TestServer::start().await;
    create_segment(&server, "", "us", r#"country = "US""#).await;
    create_segment(&server, "", "sports", r#"interests HAS "sports""#).await;
    create_segment(&server, "", "unwatched", "age > 0").await;
    let mut both = watch(&server, &["us", "sports"], "").await.unwrap();

    let fan = |id: &str, country: &str| {
        update::user(
            id,
            vec![
                update::string("country", country),
                update::set_of("interests", &["sports"]),
                update::int("age", 30),
            ],
        )
    };
    upsert(&server, vec![fan("a", "US"), fan("b", "GB")]).await;
    let mut first = both.take(3).await;
    first.sort();
    assert_eq!(
        first,
        vec![
            entered("sports", "a"),
            entered("sports", "b"),
            entered("us", "a")
        ]
    );

    upsert(
        &server,
        vec![update::user("b", vec![update::string("country", "US")])],
    )
    .await;
    assert_eq!(both.take(1).await, vec![entered("us", "b")]);

    server
        .ingest()
        .delete_users(pb::DeleteUsersRequest {
            dataset: String::new(),
            user_ids: vec!["a".into()],
        })
        .await
        .unwrap();
    let mut gone = both.take(2).await;
    gone.sort();
    assert_eq!(gone, vec![left("sports", "a"), left("us", "a")]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_bulk_write_streams_in_batches_of_at_most_a_thousand() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let mut adults = watch(&server, &["adults"], "").await.unwrap();
    let users: Vec<_> = (0..4_500).map(|i| aged(&format!("u{i:05}"), 30)).collect();
    upsert(&server, users).await;
    let changes = adults.take(4_500).await;
    // The first, empty message and at least five batches.
    assert!(adults.messages > 5, "{} messages", adults.messages);
    let expected: Vec<_> = (0..4_500)
        .map(|i| entered("adults", &format!("u{i:05}")))
        .collect();
    assert_eq!(changes, expected, "in dense-id order, each once");
    server.shutdown().await;
}

#[tokio::test]
async fn a_multi_batch_import_reports_exactly_the_membership_difference() {
    let server = TestServer::start().await;
    import_demo_over_grpc(&server, "", 3_000, 1).await;
    for (id, expr) in [("young", "age < 30"), ("us", r#"country = "US""#)] {
        server
            .segments()
            .create_segment(pb::CreateSegmentRequest {
                segment_id: id.to_owned(),
                expression: Some(text_expr(expr)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let before = [
        members(&server, "", segment_audience("young")).await,
        members(&server, "", segment_audience("us")).await,
    ];
    let mut both = watch(&server, &["young", "us"], "").await.unwrap();
    // Updates the 3,000 users with other values and adds 2,000, in several record batches.
    import_demo_over_grpc(&server, "", 5_000, 2).await;
    let after = [
        members(&server, "", segment_audience("young")).await,
        members(&server, "", segment_audience("us")).await,
    ];
    let mut expected = Vec::new();
    for (segment, (before, after)) in ["young", "us"].iter().zip(before.iter().zip(&after)) {
        let before: std::collections::BTreeSet<_> = before.iter().collect();
        let after: std::collections::BTreeSet<_> = after.iter().collect();
        expected.extend(after.difference(&before).map(|u| entered(segment, u)));
        expected.extend(before.difference(&after).map(|u| left(segment, u)));
    }
    assert!(expected.len() > 1_000, "a large difference");
    let mut changes = both.take(expected.len()).await;
    changes.sort();
    expected.sort();
    assert_eq!(changes, expected);

    // Nothing more from the import: the next change is the next write's.
    upsert(&server, vec![aged("zz", 1)]).await;
    assert_eq!(both.take(1).await, vec![entered("young", "zz")]);
    server.shutdown().await;
}

#[tokio::test]
async fn resuming_with_the_last_token_delivers_exactly_the_missed_changes() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let mut adults = watch(&server, &["adults"], "").await.unwrap();
    upsert(&server, vec![aged("u1", 20)]).await;
    assert_eq!(adults.take(1).await, vec![entered("adults", "u1")]);
    let token = adults.token.clone();
    drop(adults);

    upsert(&server, vec![aged("u2", 20)]).await;
    upsert(&server, vec![aged("u1", 2)]).await;
    let mut resumed = watch(&server, &["adults"], &token).await.unwrap();
    assert_eq!(
        resumed.take(2).await,
        vec![entered("adults", "u2"), left("adults", "u1")]
    );
    // Nothing repeated after them: the next change is the next write.
    upsert(&server, vec![aged("u3", 20)]).await;
    assert_eq!(resumed.take(1).await, vec![entered("adults", "u3")]);

    // The first message's token resumes at the stream's start, even mid-way through a batch.
    let users: Vec<_> = (0..2_500).map(|i| aged(&format!("m{i:04}"), 40)).collect();
    let mut bulk = watch(&server, &["adults"], "").await.unwrap();
    upsert(&server, users).await;
    let head = bulk.take(1_000).await;
    let middle = bulk.token.clone();
    drop(bulk);
    let mut rest = watch(&server, &["adults"], &middle).await.unwrap();
    let tail = rest.take(1_500).await;
    let all: Vec<_> = head.into_iter().chain(tail).collect();
    let expected: Vec<_> = (0..2_500)
        .map(|i| entered("adults", &format!("m{i:04}")))
        .collect();
    assert_eq!(all, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_and_tokens_get_precise_statuses() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    create_segment(&server, "other", "adults", "age >= 18").await;

    let status = watch(&server, &["adults", "nope"], "").await.err().unwrap();
    assert_status(&status, Code::NotFound, &["segment_ids", "'nope'"]);
    let status = watch(&server, &[], "").await.err().unwrap();
    assert_status(&status, Code::InvalidArgument, &["segment_ids"]);
    let status = watch_on(server.channel(), "missing", &["adults"], "")
        .await
        .err()
        .unwrap();
    assert_status(&status, Code::NotFound, &["dataset", "missing"]);

    let status = watch(&server, &["adults"], "not-a-token")
        .await
        .err()
        .unwrap();
    assert_status(&status, Code::InvalidArgument, &["resume_token"]);

    let elsewhere = watch_on(server.channel(), "other", &["adults"], "")
        .await
        .unwrap();
    let status = watch(&server, &["adults"], &elsewhere.token)
        .await
        .err()
        .unwrap();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["resume_token", "another dataset"],
    );

    // A token of another server process: its history is not this one's.
    let other_server = TestServer::start().await;
    create_segment(&other_server, "", "adults", "age >= 18").await;
    let foreign = watch(&other_server, &["adults"], "").await.unwrap();
    let status = watch(&server, &["adults"], &foreign.token)
        .await
        .err()
        .unwrap();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["resume_token", "discarded", "re-read"],
    );
    drop(foreign);
    other_server.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_older_than_the_kept_history_is_refused() {
    let limits = Limits {
        watch_history_entries: 3,
        ..Limits::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let old = watch(&server, &["adults"], "").await.unwrap();
    for i in 0..5 {
        upsert(&server, vec![aged(&format!("u{i}"), 20)]).await;
    }
    let status = watch(&server, &["adults"], &old.token).await.err().unwrap();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["discarded", "ExportMembers", "without a resume_token"],
    );
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_watched_segment_ends_the_stream_after_its_last_changes() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    create_segment(&server, "", "empty", "age > 1000").await;
    upsert(&server, vec![aged("u1", 20), aged("u2", 30)]).await;
    let mut adults = watch(&server, &["adults"], "").await.unwrap();
    let mut empty = watch(&server, &["empty"], "").await.unwrap();
    server
        .segments()
        .delete_segment(pb::DeleteSegmentRequest {
            dataset: String::new(),
            segment_id: "adults".into(),
        })
        .await
        .unwrap();
    let (changes, status) = adults.until_error().await;
    assert_eq!(changes, vec![left("adults", "u1"), left("adults", "u2")]);
    assert_status(&status, Code::NotFound, &["segment 'adults' was deleted"]);

    server
        .segments()
        .delete_segment(pb::DeleteSegmentRequest {
            dataset: String::new(),
            segment_id: "empty".into(),
        })
        .await
        .unwrap();
    let (changes, status) = empty.until_error().await;
    assert!(changes.is_empty());
    assert_status(&status, Code::NotFound, &["segment 'empty' was deleted"]);
    server.shutdown().await;
}

#[tokio::test]
async fn shutting_down_ends_open_watches_as_unavailable() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let mut adults = watch(&server, &["adults"], "").await.unwrap();
    let stop = tokio::spawn(server.shutdown());
    let (changes, status) = adults.until_error().await;
    assert!(changes.is_empty());
    assert_status(&status, Code::Unavailable, &["shutting down"]);
    stop.await.expect("the server stopped");
}

/// The token a RESOURCE_EXHAUSTED message names.
fn named_token(status: &Status) -> String {
    let (_, after) = status
        .message()
        .split_once("resume_token=")
        .unwrap_or_else(|| panic!("no token in {:?}", status.message()));
    after
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_off_with_a_token_that_resumes_without_loss() {
    const USERS: usize = 2_000;
    const FLIPS: usize = 40;
    let limits = Limits {
        watch_max_lag: 1_000,
        ..Limits::default()
    };
    let server = TestServer::start_with(ServerOptions::default().limits(limits)).await;
    create_segment(&server, "", "adults", "age >= 18").await;
    // A small flow-control window, so that little is buffered in the transport for the reader.
    let channel = Endpoint::from_shared(server.addr())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(64 * 1024))
        .connect()
        .await
        .unwrap();
    let mut stalled = watch_on(channel, "", &["adults"], "").await.unwrap();

    // The reader does not read; every write still completes.
    let writes = async {
        for flip in 0..FLIPS {
            let age = if flip % 2 == 0 { 30 } else { 3 };
            let users = (0..USERS).map(|i| aged(&format!("u{i:04}"), age)).collect();
            upsert(&server, users).await;
        }
    };
    tokio::time::timeout(HARD_TIMEOUT * 3, writes)
        .await
        .expect("writes completed while the watcher was stalled");

    let (mut changes, status) = stalled.until_error().await;
    assert_status(&status, Code::ResourceExhausted, &["resume_token="]);
    let token = named_token(&status);
    assert_eq!(token, stalled.token, "the token of the last message sent");
    assert!(changes.len() < USERS * FLIPS, "cut off before the end");

    let mut resumed = watch(&server, &["adults"], &token).await.unwrap();
    changes.extend(resumed.take(USERS * FLIPS - changes.len()).await);
    // Every user entered and left in turn, FLIPS times, each change exactly once.
    let mut by_user: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (segment, user, kind) in &changes {
        assert_eq!(segment, "adults");
        by_user.entry(user.clone()).or_default().push(kind);
    }
    assert_eq!(by_user.len(), USERS);
    let expected: Vec<&str> = (0..FLIPS)
        .map(|flip| if flip % 2 == 0 { "entered" } else { "left" })
        .collect();
    for (user, kinds) in &by_user {
        assert_eq!(kinds, &expected, "{user}");
    }
    server.shutdown().await;
}

/// Runs `audience watch ARGS...` until it has printed `lines` lines, then stops it.
async fn cli_watch_lines(addr: String, args: Vec<String>, lines: usize) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_audience"))
            .arg("--addr")
            .arg(addr)
            .arg("watch")
            .args(args)
            .env_remove("AUDIENCE_ADDR")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the audience binary");
        let stdout = child.stdout.take().expect("stdout");
        let printed: Vec<String> = BufReader::new(stdout)
            .lines()
            .take(lines)
            .map(|line| line.expect("a line of output"))
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        printed
    })
    .await
    .expect("the command thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_one_line_per_change_and_json_with_tokens() {
    let server = TestServer::start().await;
    create_segment(&server, "", "adults", "age >= 18").await;
    let start = watch(&server, &["adults"], "").await.unwrap().token;
    upsert(&server, vec![aged("u1", 20), aged("u2", 20)]).await;
    upsert(&server, vec![aged("u1", 2)]).await;

    let args = |json: bool| {
        let mut args = vec!["adults".to_owned(), "--resume".to_owned(), start.clone()];
        if json {
            args.push("--json".to_owned());
        }
        args
    };
    let plain = tokio::time::timeout(HARD_TIMEOUT, cli_watch_lines(server.addr(), args(false), 3))
        .await
        .expect("three lines in time");
    assert_eq!(
        plain,
        vec![
            "entered\tadults\tu1",
            "entered\tadults\tu2",
            "left\tadults\tu1"
        ]
    );

    let json = tokio::time::timeout(HARD_TIMEOUT, cli_watch_lines(server.addr(), args(true), 3))
        .await
        .expect("three lines in time");
    let objects: Vec<serde_json::Value> = json
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
        .collect();
    assert_eq!(objects[2]["kind"], "left");
    assert_eq!(objects[2]["segment_id"], "adults");
    assert_eq!(objects[2]["user_id"], "u1");
    // The last change's token resumes after it.
    let token = objects[2]["resume_token"].as_str().expect("a token");
    let mut after = watch(&server, &["adults"], token).await.unwrap();
    upsert(&server, vec![aged("u9", 20)]).await;
    assert_eq!(after.take(1).await, vec![entered("adults", "u9")]);
    server.shutdown().await;
}

fn event_at(user: &str, event: &str, ts: i64) -> pb::Event {
    pb::Event {
        user_id: user.to_owned(),
        event: event.to_owned(),
        ts: Some(prost_types::Timestamp {
            seconds: ts.div_euclid(1000),
            nanos: (ts.rem_euclid(1000) * 1_000_000) as i32,
        }),
        value: None,
    }
}

/// Event writes move users in; time alone (an injected clock, no write) moves them out of a
/// `DID ... IN LAST 7d` segment and into its complement, and a watcher sees both, in order.
#[tokio::test]
async fn event_writes_and_the_passing_of_time_are_reported() {
    const DAY: i64 = 86_400_000;
    let clock = FixedClock::new(JAN_1_2026);
    let server = TestServer::start_with(
        ServerOptions::default()
            .clock(clock.clone())
            .time_refresh(std::time::Duration::from_millis(20)),
    )
    .await;
    create_segment(&server, "", "recent", "DID purchase IN LAST 7d").await;
    create_segment(&server, "", "lapsed", "NOT DID purchase IN LAST 7d").await;
    let mut watch = watch(&server, &["recent", "lapsed"], "")
        .await
        .expect("watch");
    let record = |events: Vec<pb::Event>| {
        let mut ingest = server.ingest();
        async move {
            ingest
                .record_events(pb::RecordEventsRequest {
                    dataset: String::new(),
                    events,
                })
                .await
                .expect("record events")
        }
    };
    // u1 bought 6 days ago, u2 3 days ago: both are new users, so both enter "recent".
    record(vec![
        event_at("u1", "purchase", JAN_1_2026 - 6 * DAY),
        event_at("u2", "purchase", JAN_1_2026 - 3 * DAY),
    ])
    .await;
    assert_eq!(
        sorted_changes(watch.take(2).await),
        vec![entered("recent", "u1"), entered("recent", "u2")]
    );
    // Two days later, with no write, u1's purchase is 8 days old: u1 moves to "lapsed".
    clock.advance(std::time::Duration::from_millis(2 * DAY as u64));
    assert_eq!(
        sorted_changes(watch.take(2).await),
        vec![entered("lapsed", "u1"), left("recent", "u1")]
    );
    let recent = server
        .segments()
        .get_segment(pb::GetSegmentRequest {
            dataset: String::new(),
            segment_id: "recent".into(),
        })
        .await
        .expect("get segment")
        .into_inner();
    assert_eq!(recent.segment.map(|s| s.size), Some(1));
    // A new purchase brings u1 back.
    record(vec![event_at("u1", "purchase", JAN_1_2026 + 2 * DAY - 1)]).await;
    assert_eq!(
        sorted_changes(watch.take(2).await),
        vec![left("lapsed", "u1"), entered("recent", "u1")]
    );
    server.shutdown().await;
}

fn sorted_changes(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort();
    changes
}

/// An import reports each segment's net change: a user who enters in one record batch and
/// leaves in a later one is not reported at all.
#[tokio::test]
async fn an_import_reports_net_changes_across_its_batches() {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let server = TestServer::start().await;
    create_segment(&server, "", "young", "age < 30").await;
    let mut watch = watch(&server, &["young"], "").await.expect("watch");
    let batch = |rows: &[(&str, i64)]| {
        let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)));
        let ages: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1)));
        RecordBatch::try_from_iter([("user_id", ids), ("age", ages)]).expect("batch")
    };
    // u1 is young in the first batch and not in the second; u2 ends young.
    let bytes = ipc_stream_bytes(&[batch(&[("u1", 20)]), batch(&[("u1", 40), ("u2", 25)])]);
    import_chunks(&server, "", "", vec![bytes]).await;
    assert_eq!(watch.take(1).await, vec![entered("young", "u2")]);
    // The next change is the next write's: nothing about u1 was queued.
    upsert(&server, vec![aged("u3", 1)]).await;
    assert_eq!(watch.take(1).await, vec![entered("young", "u3")]);
    server.shutdown().await;
}
