//! The server measured through the wire: the real gRPC server on a loopback port (started
//! in-process, port 0) over the demo dataset with saved segments, called through the generated
//! tonic client, one request at a time. What `benches/engine.rs` measures in-process, plus
//! protobuf, HTTP/2, loopback TCP and the handlers: the floor of what a caller sees.
//! - `wire/segments_for_user`: one random demo user's saved segments (of 1,000);
//! - `wire/count_3_predicates`: `country = "US" AND age BETWEEN 25 AND 34 AND interests HAS "sports"`;
//! - `wire/upsert_1_user`: country and age of one random existing user;
//! - `wire/record_100_events`: a batch of 100 events of random users, timed near now.
//!
//! 100,000 users by default (`AUDIENCE_BENCH_USERS` for more); `AUDIENCE_BENCH_SEGMENTS`
//! saved segments (1,000). For load at concurrency, see `audience bench`.
//!
//! ```sh
//! cargo bench --bench wire -- --warm-up-time 1 --measurement-time 3
//! ```

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audience::engine::{Engine, ImportBatch, Limits};
use audience::grpc::{pb, serve, Services};
use audience::rng::SplitMix64;
use audience::time::{Clock, SystemClock};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tonic::transport::{Channel, Endpoint};

use common::env_u64;

const SEED: u64 = 42;
const THREE: &str = r#"country = "US" AND age BETWEEN 25 AND 34 AND interests HAS "sports""#;

/// The server on its port, and how to stop it.
struct Server {
    channel: Channel,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), audience::grpc::ServeError>>,
}

/// Loads the demo users and segments through the engine, then serves them on 127.0.0.1:0
/// and connects a client (once the server answers, so no sleep is needed).
async fn start(users: u64, segments: usize) -> Server {
    let engine = Arc::new(Engine::new(Limits::default(), Arc::new(SystemClock)));
    let mut import = engine.begin_import("default").await.expect("begin import");
    import.reserve(users);
    for batch in audience::demo::batches(users, 64 * 1024, SEED) {
        import
            .apply(ImportBatch {
                batch,
                id_column: "user_id".into(),
            })
            .await
            .expect("demo batch imports");
    }
    import.commit().await.expect("demo import commits");
    for definition in common::segment_definitions(segments, SystemClock.now_millis()) {
        engine
            .create_segment("default", definition)
            .await
            .expect("segment");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let services = Services {
        engine,
        max_message_bytes: 64 * 1024 * 1024,
        import_dir: None,
        time_refresh: Duration::from_secs(60),
        security: Default::default(),
        metrics: None,
        lifecycle: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        services,
        listener,
        async { Ok::<(), String>(()) },
        async {
            let _ = stopped.await;
        },
    ));
    // `connect` retries nothing: the listener is bound, so the connection is accepted even
    // before the server task polls it.
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to the bench server");
    Server {
        channel,
        stop,
        task,
    }
}

/// Times `iters` calls made by `call` (given a seeded generator), awaited one after another.
fn timed<F, Fut>(runtime: &Runtime, iters: u64, seed: u64, mut call: F) -> Duration
where
    F: FnMut(&mut SplitMix64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut rng = SplitMix64::new(seed);
    runtime.block_on(async {
        let started = Instant::now();
        for _ in 0..iters {
            call(&mut rng).await;
        }
        started.elapsed()
    })
}

fn benches(c: &mut Criterion) {
    let users = env_u64("AUDIENCE_BENCH_USERS", 100_000);
    let segments = env_u64("AUDIENCE_BENCH_SEGMENTS", 1_000) as usize;
    let label = format!("{}k", users / 1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let server = runtime.block_on(start(users, segments));
    println!(
        "server on loopback: {users} demo users, {segments} segments, loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let query = pb::query_service_client::QueryServiceClient::new(server.channel.clone());
    let ingest = pb::ingest_service_client::IngestServiceClient::new(server.channel.clone());
    let user = move |rng: &mut SplitMix64| audience::demo::user_id(rng.below(users));

    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("segments_for_user", &label), |b| {
        b.iter_custom(|iters| {
            timed(&runtime, iters, 1, |rng| {
                let mut client = query.clone();
                let request = pb::SegmentsForUserRequest {
                    dataset: String::new(),
                    user_id: user(rng),
                };
                async move {
                    black_box(client.segments_for_user(request).await.expect("segments"));
                }
            })
        })
    });
    group.bench_function(BenchmarkId::new("count_3_predicates", &label), |b| {
        b.iter_custom(|iters| {
            timed(&runtime, iters, 2, |_| {
                let mut client = query.clone();
                let request = pb::CountRequest {
                    audience: Some(pb::Audience {
                        kind: Some(pb::audience::Kind::Expression(pb::Expression {
                            kind: Some(pb::expression::Kind::Text(THREE.to_owned())),
                        })),
                    }),
                    ..Default::default()
                };
                async move {
                    black_box(client.count(request).await.expect("count"));
                }
            })
        })
    });
    group.bench_function(BenchmarkId::new("upsert_1_user", &label), |b| {
        b.iter_custom(|iters| {
            timed(&runtime, iters, 3, |rng| {
                let mut client = ingest.clone();
                let (country, _) = audience::demo::COUNTRIES
                    [rng.below(audience::demo::COUNTRIES.len() as u64) as usize];
                let set = |attribute: &str, kind| pb::AttributeUpdate {
                    attribute: attribute.to_owned(),
                    change: Some(pb::attribute_update::Change::Set(pb::AttributeValue {
                        kind: Some(kind),
                    })),
                };
                let request = pb::UpsertUsersRequest {
                    dataset: String::new(),
                    users: vec![pb::UserUpdate {
                        user_id: user(rng),
                        updates: vec![
                            set(
                                "country",
                                pb::attribute_value::Kind::StringValue(country.to_owned()),
                            ),
                            set(
                                "age",
                                pb::attribute_value::Kind::IntValue(18 + rng.below(60) as i64),
                            ),
                        ],
                    }],
                };
                async move {
                    black_box(client.upsert_users(request).await.expect("upsert"));
                }
            })
        })
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function(BenchmarkId::new("record_100_events", &label), |b| {
        b.iter_custom(|iters| {
            timed(&runtime, iters, 4, |rng| {
                let mut client = ingest.clone();
                let now = SystemClock.now_millis();
                let names = audience::demo::EVENT_NAMES;
                let events = (0..100)
                    .map(|_| pb::Event {
                        user_id: user(rng),
                        event: names[rng.below(names.len() as u64) as usize].0.to_owned(),
                        ts: Some(audience::grpc::convert::timestamp(
                            now - rng.below(600_000) as i64,
                        )),
                        value: None,
                    })
                    .collect();
                let request = pb::RecordEventsRequest {
                    dataset: String::new(),
                    events,
                };
                async move {
                    black_box(client.record_events(request).await.expect("events"));
                }
            })
        })
    });
    group.finish();

    let _ = server.stop.send(());
    runtime
        .block_on(server.task)
        .expect("server task")
        .expect("server stops cleanly");
}

criterion_group!(wire, benches);
criterion_main!(wire);
