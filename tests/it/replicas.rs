//! Redis mode with real server processes on loopback sharing one Redis: writes on one replica
//! reach the others, late and restarted replicas catch up by themselves, a write storm on every
//! replica converges, and a Redis outage loses no acknowledged write.
//!
//! Needs Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`); without it the tests print
//! "skipped: no Redis", unless `AUDIENCE_REQUIRE_REDIS=1` (CI), where they fail instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audience::grpc::pb;
use audience::persist::redis::RedisStore;
use audience::rng::SplitMix64;
use tonic::Code;

use crate::harness::text;
use crate::process::{free_port, Process};

/// The Redis to use, or `None` (after saying so) when there is none and none is required.
pub fn redis_or_skip(test: &str) -> Option<String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let address = url
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    let answers = std::net::TcpStream::connect_timeout(
        &address
            .parse()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 6379).into()),
        Duration::from_secs(1),
    )
    .is_ok();
    if answers {
        return Some(url);
    }
    if std::env::var("AUDIENCE_REQUIRE_REDIS").as_deref() == Ok("1") {
        panic!("{test}: Redis does not answer at {url}, and AUDIENCE_REQUIRE_REDIS=1");
    }
    eprintln!("{test}: skipped: no Redis (set REDIS_URL)");
    None
}

/// A key prefix no other test or run shares.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("audience-it-{test}-{}-{nanos}", std::process::id())
}

/// Deletes every key of a prefix.
pub async fn clean(url: &str, prefix: &str) {
    if let Ok(store) = RedisStore::connect(url, prefix).await {
        let _ = store.delete_all().await;
    }
}

pub fn replica(url: &str, prefix: &str) -> Vec<String> {
    vec![
        "--redis-url".into(),
        url.into(),
        "--redis-prefix".into(),
        prefix.into(),
    ]
}

pub async fn start(args: &[String]) -> Process {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::serving(&args).await
}

fn set(attribute: &str, value: pb::attribute_value::Kind) -> pb::AttributeUpdate {
    pb::AttributeUpdate {
        attribute: attribute.into(),
        change: Some(pb::attribute_update::Change::Set(pb::AttributeValue {
            kind: Some(value),
        })),
    }
}

/// Upserts one user with a country and a writer tag.
pub async fn upsert(
    server: &Process,
    user: &str,
    country: &str,
    writer: &str,
) -> Result<(), tonic::Status> {
    use pb::attribute_value::Kind;
    let request = pb::UpsertUsersRequest {
        dataset: String::new(),
        users: vec![pb::UserUpdate {
            user_id: user.into(),
            updates: vec![
                set("country", Kind::StringValue(country.into())),
                set("writer", Kind::StringValue(writer.into())),
            ],
        }],
    };
    server.ingest().upsert_users(request).await.map(|_| ())
}

pub async fn record_view(server: &Process, user: &str) -> Result<(), tonic::Status> {
    let now = crate::harness::now_ms().div_euclid(1000);
    let request = pb::RecordEventsRequest {
        dataset: String::new(),
        events: vec![pb::Event {
            user_id: user.into(),
            event: "view".into(),
            ts: Some(prost_types::Timestamp {
                seconds: now - 60,
                nanos: 0,
            }),
            value: None,
        }],
    };
    server.ingest().record_events(request).await.map(|_| ())
}

pub async fn delete(server: &Process, user: &str) -> Result<(), tonic::Status> {
    let request = pb::DeleteUsersRequest {
        dataset: String::new(),
        user_ids: vec![user.into()],
    };
    server.ingest().delete_users(request).await.map(|_| ())
}

/// Every member of an expression, in the server's order.
pub async fn members(server: &Process, expr: &str) -> Result<Vec<String>, tonic::Status> {
    let request = pb::ExportMembersRequest {
        dataset: String::new(),
        audience: text(expr),
        as_of: None,
        chunk_size: 0,
    };
    let mut stream = server.query().export_members(request).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(chunk) = stream.message().await? {
        ids.extend(chunk.user_ids);
    }
    Ok(ids)
}

const PROBES: [&str; 5] = [
    r#"country = "US""#,
    r#"NOT country = "US""#,
    "DID view",
    r#"writer IN ("a", "b") AND DID view"#,
    r#"SEGMENT "us""#,
];

/// What every probe returns on one replica (an error text where it fails).
pub async fn view(server: &Process) -> BTreeMap<&'static str, Result<Vec<String>, String>> {
    let mut out = BTreeMap::new();
    for probe in PROBES {
        let found = members(server, probe)
            .await
            .map_err(|s| s.message().to_owned());
        out.insert(probe, found);
    }
    out
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Waits until every replica answers every probe as the first does, then returns that view.
pub async fn converged(
    replicas: &[&Process],
    limit: Duration,
) -> BTreeMap<&'static str, Result<Vec<String>, String>> {
    let deadline = Instant::now() + limit;
    loop {
        let first = view(replicas[0]).await;
        let mut same = true;
        for other in &replicas[1..] {
            same &= view(other).await == first;
        }
        if same {
            return first;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn create_us_segment(server: &Process) {
    let request = pb::CreateSegmentRequest {
        segment_id: "us".into(),
        name: "US".into(),
        expression: Some(crate::harness::text_expr(r#"country = "US""#)),
        ..Default::default()
    };
    server
        .segments()
        .create_segment(request)
        .await
        .expect("segment created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_replica_and_late_or_restarted_ones_catch_up() {
    let Some(url) = redis_or_skip("replicas catch up") else {
        return;
    };
    let prefix = unique_prefix("catch-up");
    let args = replica(&url, &prefix);
    let a = start(&args).await;
    let b = start(&args).await;
    let mut c = start(&args).await;
    let mut rng = SplitMix64::new(7);
    let mut us = Vec::new();
    for i in 0..60 {
        let user = format!("user-{i}");
        let country = ["US", "GB", "FR"][rng.below(3) as usize];
        if country == "US" {
            us.push(user.clone());
        }
        upsert(&a, &user, country, "a").await.expect("upsert on a");
        if i % 3 == 0 {
            record_view(&b, &user).await.expect("event on b");
        }
    }
    create_us_segment(&c).await;
    // Read your writes on the replica that took them.
    let on_a = members(&a, r#"country = "US""#).await.expect("count on a");
    assert_eq!(
        crate::harness::sorted(on_a.clone()),
        crate::harness::sorted(us.clone())
    );
    let agreed = converged(&[&a, &b, &c], Duration::from_secs(10)).await;
    assert_eq!(agreed[r#"SEGMENT "us""#].as_ref().ok(), Some(&on_a));
    assert_eq!(agreed["DID view"].as_ref().map(Vec::len).ok(), Some(20));

    // A replica started late has everything before it turns SERVING.
    let d = start(&args).await;
    assert_eq!(
        view(&d).await,
        view(&a).await,
        "a late replica starts complete"
    );

    // A replica killed, missing writes meanwhile, catches up on restart.
    c.kill();
    for i in 60..80 {
        upsert(&b, &format!("user-{i}"), "US", "b")
            .await
            .expect("upsert on b");
    }
    delete(&a, "user-0").await.expect("delete on a");
    c.restart();
    c.wait_serving(Duration::from_secs(60)).await;
    assert_eq!(
        view(&c).await,
        view(&b).await,
        "a restarted replica catches up"
    );

    // A snapshot trims the log; a replica started after it loads it, then the tail.
    b.snapshot().await;
    upsert(&c, "after-snapshot", "US", "b")
        .await
        .expect("upsert after snapshot");
    let e = start(&args).await;
    let expected = converged(&[&a, &b, &c, &d], Duration::from_secs(10)).await;
    assert_eq!(
        view(&e).await,
        expected,
        "a replica started from the snapshot"
    );
    let us_now = expected[r#"country = "US""#]
        .as_ref()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(
        us_now,
        us.len() + 20 + 1 - usize::from(us.contains(&"user-0".to_owned()))
    );
    clean(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_storm_on_every_replica_converges_with_every_acknowledged_write() {
    let Some(url) = redis_or_skip("write storm") else {
        return;
    };
    let prefix = unique_prefix("storm");
    let args = replica(&url, &prefix);
    let replicas = [start(&args).await, start(&args).await, start(&args).await];
    upsert(&replicas[0], "seed", "US", "seed")
        .await
        .expect("first upsert");
    create_us_segment(&replicas[0]).await;
    let mut acknowledged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let writers = ["a", "b", "c"];
    let storms = replicas
        .iter()
        .zip(writers)
        .map(|(server, writer)| async move {
            let mut rng = SplitMix64::new(writer.as_bytes()[0] as u64);
            let mut live = Vec::new();
            for i in 0..120 {
                let user = format!("{writer}-{i}");
                let country = ["US", "GB"][rng.below(2) as usize];
                upsert(server, &user, country, writer)
                    .await
                    .expect("upsert in the storm");
                live.push(user.clone());
                if i % 4 == 0 {
                    record_view(server, &user)
                        .await
                        .expect("event in the storm");
                }
                if i % 10 == 9 {
                    let gone = live.remove(rng.below(live.len() as u64) as usize);
                    delete(server, &gone).await.expect("delete in the storm");
                }
            }
            (writer, live)
        });
    for (writer, live) in futures_join(storms.collect()).await {
        acknowledged.insert(writer.to_owned(), live);
    }
    let all: Vec<&Process> = replicas.iter().collect();
    converged(&all, Duration::from_secs(15)).await;
    for server in &replicas {
        for (writer, live) in &acknowledged {
            let found = members(server, &format!("writer = \"{writer}\""))
                .await
                .expect("members");
            assert_eq!(
                crate::harness::sorted(found),
                crate::harness::sorted(live.clone()),
                "writer {writer}'s acknowledged users on port {}",
                server.port
            );
        }
    }
    clean(&url, &prefix).await;
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut outputs = Vec::with_capacity(futures.len());
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, result) in pinned.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => *result = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.extend(results.into_iter().flatten());
    outputs
}

/// A Redis server of the test's own, persisting every write (so that a restart keeps them).
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (install Redis)");
        let redis = Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it gracefully (SIGTERM), so that its append-only file is complete.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_writes_keeps_reads_and_loses_no_acknowledged_write() {
    if redis_or_skip("redis outage").is_none() {
        return;
    }
    let port = free_port();
    let dir = crate::durability::temp_dir("own-redis");
    let mut redis = OwnRedis::start(port, &dir);
    let args = replica(&redis.url(), "outage");
    let a = start(&args).await;
    let b = start(&args).await;
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let user = format!("before-{i}");
        upsert(&a, &user, "US", "a")
            .await
            .expect("upsert before the outage");
        acknowledged.push(user);
    }
    create_us_segment(&a).await;
    converged(&[&a, &b], Duration::from_secs(10)).await;

    redis.stop();
    let refused = upsert(&b, "during", "US", "b")
        .await
        .expect_err("no write without Redis");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    for server in [&a, &b] {
        let found = members(server, r#"country = "US""#)
            .await
            .expect("reads go on");
        assert_eq!(found.len(), acknowledged.len());
    }

    let redis = OwnRedis::start(port, &redis.dir.clone());
    let mut after = 0;
    let recovered = eventually(Duration::from_secs(30), || {
        let user = format!("after-{after}");
        let server = &b;
        async move { upsert(server, &user, "US", "b").await.is_ok() }
    })
    .await;
    assert!(recovered, "writes succeed again once Redis is back");
    acknowledged.push(format!("after-{after}"));
    for i in 1..10 {
        after = i;
        let user = format!("after-{after}");
        upsert(&a, &user, "US", "a")
            .await
            .expect("upsert after the outage");
        acknowledged.push(user);
    }
    let agreed = converged(&[&a, &b], Duration::from_secs(15)).await;
    let found = agreed[r#"country = "US""#].clone().expect("members");
    assert_eq!(
        crate::harness::sorted(found),
        crate::harness::sorted(acknowledged),
        "every acknowledged write, and only those"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads watch messages until `count` changes arrived; returns them (`user_id`) and the token
/// of the last message.
async fn watched(
    server: &Process,
    token: &str,
    count: usize,
) -> Result<(Vec<String>, String), tonic::Status> {
    let mut client = pb::watch_service_client::WatchServiceClient::new(server.channel());
    let request = pb::WatchRequest {
        dataset: String::new(),
        segment_ids: vec!["us".into()],
        resume_token: token.into(),
    };
    let mut stream = client.watch(request).await?.into_inner();
    let mut users = Vec::new();
    let mut last = String::new();
    // The first message carries no change: it says the watch is live.
    while users.len() < count || last.is_empty() {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no watch message"))??
            .ok_or_else(|| tonic::Status::aborted("the watch ended"))?;
        users.extend(message.changes.into_iter().map(|c| c.user_id));
        last = message.resume_token;
    }
    Ok((users, last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_token_resumes_on_another_replica() {
    let Some(url) = redis_or_skip("watch across replicas") else {
        return;
    };
    let prefix = unique_prefix("watch");
    let args = replica(&url, &prefix);
    let a = start(&args).await;
    let b = start(&args).await;
    upsert(&a, "seed", "GB", "a").await.expect("first upsert");
    create_us_segment(&a).await;
    let (_, start_token) = watched(&a, "", 0).await.expect("watch starts");
    for user in ["u1", "u2"] {
        upsert(&a, user, "US", "a").await.expect("upsert");
    }
    let (first, token) = watched(&a, &start_token, 2).await.expect("watch on a");
    assert_eq!(first, ["u1", "u2"]);
    upsert(&a, "u3", "US", "a").await.expect("upsert on a");
    upsert(&b, "u4", "US", "b").await.expect("upsert on b");
    // B resumes A's token: exactly the changes after it, in log order.
    let (on_b, _) = watched(&b, &token, 2).await.expect("resumed on b");
    assert_eq!(on_b, ["u3", "u4"]);
    let (on_a, _) = watched(&a, &token, 2).await.expect("resumed on a");
    assert_eq!(on_a, on_b);
    // A replica started after those writes never saw them: it says so instead of skipping.
    let c = start(&args).await;
    let refused = watched(&c, &start_token, 1)
        .await
        .expect_err("history not held");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    clean(&url, &prefix).await;
}
