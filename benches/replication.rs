//! Replication lag in Redis mode, measured over gRPC from this separate process.
//!
//! Two replicas (the optimized `audience` binary) share a Redis. A writer upserts one new user
//! at a time at a fixed rate on replica A, for a duration; each new user enters the saved
//! segment `fresh`. A watcher of `fresh` on replica B (the other replica) and one on A (the same
//! replica: the baseline, everything but the trip through Redis) receive every entry. The lag of
//! a write is the time from its acknowledgement on A to its watch message; percentiles over
//! every write.
//!
//! ```sh
//! cargo bench --bench replication    # REDIS_URL (default redis://127.0.0.1:6379)
//! AUDIENCE_BENCH_RATE=500 AUDIENCE_BENCH_SECONDS=30 cargo bench --bench replication
//! ```

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audience::grpc::pb;
use tonic::transport::{Channel, Endpoint};

/// One replica process, killed on drop.
struct Replica {
    child: Child,
    channel: Channel,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number from the environment, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn replica(url: &str, prefix: &str) -> Replica {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_audience"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", url, "--redis-prefix", prefix])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        if let Ok(response) = health.check(request).await {
            if response.into_inner().status == 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the replica did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Replica { child, channel }
}

fn upsert_request(user: String) -> pb::UpsertUsersRequest {
    pb::UpsertUsersRequest {
        dataset: String::new(),
        users: vec![pb::UserUpdate {
            user_id: user,
            updates: vec![pb::AttributeUpdate {
                attribute: "fresh".into(),
                change: Some(pb::attribute_update::Change::Set(pb::AttributeValue {
                    kind: Some(pb::attribute_value::Kind::BoolValue(true)),
                })),
            }],
        }],
    }
}

/// Receive times of every user entering `fresh`, on one replica.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn watch(replica: &Replica) -> Arrivals {
    let arrivals: Arrivals = Arc::default();
    let mut client = pb::watch_service_client::WatchServiceClient::new(replica.channel.clone());
    let request = pb::WatchRequest {
        dataset: String::new(),
        segment_ids: vec!["fresh".into()],
        resume_token: String::new(),
    };
    let mut stream = client.watch(request).await.expect("watch").into_inner();
    // The first message says the watch is live.
    stream.message().await.expect("watch starts");
    let seen = arrivals.clone();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            let now = Instant::now();
            if let Ok(mut seen) = seen.lock() {
                for change in message.changes {
                    seen.entry(change.user_id).or_insert(now);
                }
            }
        }
    });
    arrivals
}

/// p50, p90, p99, p99.9 and max of `lags`, in milliseconds.
fn percentiles(mut lags: Vec<f64>) -> String {
    if lags.is_empty() {
        return "no samples".into();
    }
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| lags[((lags.len() as f64 * q) as usize).min(lags.len() - 1)];
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} writes)",
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        lags[lags.len() - 1],
        lags.len()
    )
}

fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rate = env_u64("AUDIENCE_BENCH_RATE", 200).max(1);
    let seconds = env_u64("AUDIENCE_BENCH_SECONDS", 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let prefix = format!("audience-bench-replication-{}", std::process::id());
        let a = replica(&url, &prefix).await;
        let b = replica(&url, &prefix).await;
        let mut ingest = pb::ingest_service_client::IngestServiceClient::new(a.channel.clone());
        ingest
            .upsert_users(upsert_request("first".into()))
            .await
            .expect("first write");
        let mut segments = pb::segment_service_client::SegmentServiceClient::new(a.channel.clone());
        segments
            .create_segment(pb::CreateSegmentRequest {
                segment_id: "fresh".into(),
                expression: Some(pb::Expression {
                    kind: Some(pb::expression::Kind::Text("fresh = TRUE".into())),
                }),
                ..Default::default()
            })
            .await
            .expect("segment");
        // B sees the segment once it has caught up with its creation.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (on_a, on_b) = loop {
            let mut probe =
                pb::segment_service_client::SegmentServiceClient::new(b.channel.clone());
            let found = probe
                .get_segment(pb::GetSegmentRequest {
                    dataset: String::new(),
                    segment_id: "fresh".into(),
                })
                .await;
            if found.is_ok() {
                break (watch(&a).await, watch(&b).await);
            }
            assert!(Instant::now() < deadline, "replica B never saw the segment");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut acked = Vec::new();
        let mut write_ms = Vec::new();
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut i = 0u64;
        while started.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            let user = format!("lag-{i}");
            let sent = Instant::now();
            ingest
                .upsert_users(upsert_request(user.clone()))
                .await
                .expect("write");
            let ack = Instant::now();
            write_ms.push((ack - sent).as_secs_f64() * 1e3);
            acked.push((user, ack));
            i += 1;
        }
        // Let the last writes arrive.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lags = |arrivals: &Arrivals| {
            let seen = arrivals.lock().expect("arrivals");
            let lags: Vec<f64> = acked
                .iter()
                .filter_map(|(user, ack)| {
                    let at = seen.get(user)?;
                    Some(at.saturating_duration_since(*ack).as_secs_f64() * 1e3)
                })
                .collect();
            (lags, acked.len() - seen.len().min(acked.len()))
        };
        let (local, _) = lags(&on_a);
        let (remote, missing) = lags(&on_b);
        println!("replication lag, {rate} writes/s for {seconds} s, two replicas on loopback:");
        println!(
            "  write latency on A (ack):          {}",
            percentiles(write_ms)
        );
        println!(
            "  ack on A -> watch on A (baseline): {}",
            percentiles(local)
        );
        println!(
            "  ack on A -> watch on B (replica):  {}",
            percentiles(remote)
        );
        assert_eq!(missing, 0, "every acknowledged write reached replica B");
        if let Ok(store) = audience::persist::redis::RedisStore::connect(&url, &prefix).await {
            let _ = store.delete_all().await;
        }
    });
}
