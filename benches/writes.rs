//! The write path on skewed data, in-process: what one write costs the dataset's writer while
//! 1,000 saved segments are kept current (`AUDIENCE_BENCH_USERS`, default 1,000,000 users;
//! `AUDIENCE_BENCH_SEGMENTS`, default 1,000; `AUDIENCE_BENCH_EVENTS`, default 10 per user).
//!
//! Every write is applied as the engine applies it: to a shallow clone of the published version
//! (which still shares every column and bitmap), then published in its place, so each
//! copy-on-write a write causes is in the figure.
//! - `upsert/categorical_set_numeric`: one existing user's `country`, `interests` and
//!   `lifetime_spend` changed (the spend moving in and out of the heavy value 0).
//! - `upsert/numeric`: one user's `sessions_30d` (zero-inflated) changed.
//! - `record_events/100`: a batch of 100 events of existing users.
//! - `delete/1`: one active user deleted.
//! - `create_segment/1`: one saved segment created over every user.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use audience::engine::{
    AttributeChange, AttributeValue, Change, ChangeOp, DatasetState, EventRecord, ImportBatch,
    UserUpdate,
};
use audience::rng::SplitMix64;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{env_u64, wanted};

const SEED: u64 = 42;
const AS_OF: i64 = audience::demo::DEMO_EPOCH;

/// The demo users, their events over the year before `AS_OF`, and the demo segments.
fn dataset(users: u64, events: u64, segments: usize) -> DatasetState {
    let started = Instant::now();
    let mut state = DatasetState::default();
    state.reserve_users(users as usize);
    for batch in audience::demo::batches(users, 64 * 1024, SEED) {
        let change = Change::ImportUsers(ImportBatch {
            batch,
            id_column: "user_id".into(),
        });
        state.apply(&change, AS_OF).expect("demo batch imports");
    }
    let generated: Vec<_> = audience::demo::events(users, events, SEED, AS_OF).collect();
    for chunk in generated.chunks(64 * 1024) {
        let records: Vec<EventRecord> = chunk.iter().map(event_record).collect();
        state
            .apply(&Change::RecordEvents(records), AS_OF)
            .expect("demo events record");
    }
    for definition in common::segment_definitions(segments, AS_OF) {
        state
            .apply(&Change::CreateSegment(definition), AS_OF)
            .expect("demo segment");
    }
    println!(
        "dataset: {users} users, {events} events, {segments} segments in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    state
}

fn event_record(event: &audience::demo::DemoEvent) -> EventRecord {
    EventRecord {
        user_id: audience::demo::user_id(event.user),
        event: audience::demo::EVENT_NAMES[event.event as usize]
            .0
            .to_owned(),
        ts: event.ts,
        value: event.value,
    }
}

/// Applies `change` as the engine does: to a clone of `published`, then published in its place.
fn publish(published: &mut Arc<DatasetState>, change: &Change) {
    let mut next = DatasetState::clone(published);
    next.apply(change, AS_OF).expect("bench write applies");
    next.take_transitions();
    *published = Arc::new(next);
}

/// Times `iters` writes made by `make` (not timed), each published.
fn timed(
    published: &mut Arc<DatasetState>,
    iters: u64,
    mut make: impl FnMut() -> Change,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let change = make();
        let started = Instant::now();
        publish(published, &change);
        total += started.elapsed();
    }
    total
}

fn set(attribute: &str, value: AttributeValue) -> AttributeChange {
    AttributeChange {
        attribute: attribute.into(),
        op: ChangeOp::Set(value),
    }
}

fn upsert(user: u64, changes: Vec<AttributeChange>) -> Change {
    Change::UpsertUsers(vec![UserUpdate {
        user_id: audience::demo::user_id(user),
        changes,
    }])
}

fn benches(c: &mut Criterion) {
    let users = env_u64("AUDIENCE_BENCH_USERS", 1_000_000);
    let events = env_u64("AUDIENCE_BENCH_EVENTS", users * 10);
    let segments = env_u64("AUDIENCE_BENCH_SEGMENTS", 1_000) as usize;
    let label = format!("{}M/{segments}seg", users as f64 / 1e6);
    let mut published = Arc::new(dataset(users, events, segments));
    let mut rng = SplitMix64::new(7);
    let mut group = c.benchmark_group("writes");
    group.throughput(Throughput::Elements(1));
    if wanted("upsert") {
        let countries = audience::demo::COUNTRIES;
        let interests = audience::demo::INTERESTS;
        group.bench_function(
            BenchmarkId::new("upsert/categorical_set_numeric", &label),
            |b| {
                b.iter_custom(|iters| {
                    timed(&mut published, iters, || {
                        let user = rng.below(users);
                        let country = countries[rng.below(countries.len() as u64) as usize].0;
                        let held: Vec<String> = (0..rng.below(4))
                            .map(|_| {
                                interests[rng.below(interests.len() as u64) as usize].to_owned()
                            })
                            .collect();
                        let spend = match rng.below(3) {
                            0 => 0.0,
                            1 => 9.99,
                            _ => rng.below(500_000) as f64 / 100.0,
                        };
                        upsert(
                            user,
                            vec![
                                set("country", AttributeValue::String(country.into())),
                                set("interests", AttributeValue::Set(held)),
                                set("lifetime_spend", AttributeValue::Float(spend)),
                            ],
                        )
                    })
                })
            },
        );
        group.bench_function(BenchmarkId::new("upsert/numeric", &label), |b| {
            b.iter_custom(|iters| {
                timed(&mut published, iters, || {
                    let sessions = if rng.below(2) == 0 { 0 } else { rng.below(30) };
                    upsert(
                        rng.below(users),
                        vec![set("sessions_30d", AttributeValue::Int(sessions as i64))],
                    )
                })
            })
        });
    }
    if wanted("record_events") {
        group.throughput(Throughput::Elements(100));
        group.bench_function(BenchmarkId::new("record_events/100", &label), |b| {
            b.iter_custom(|iters| {
                timed(&mut published, iters, || {
                    let records = (0..100)
                        .map(|_| EventRecord {
                            user_id: audience::demo::user_id(rng.below(users)),
                            event: "view_item".into(),
                            ts: AS_OF - 1 - rng.below(86_400_000) as i64,
                            value: None,
                        })
                        .collect();
                    Change::RecordEvents(records)
                })
            })
        });
        group.throughput(Throughput::Elements(1));
    }
    if wanted("delete") {
        group.bench_function(BenchmarkId::new("delete/1", &label), |b| {
            b.iter_custom(|iters| {
                timed(&mut published, iters, || {
                    Change::DeleteUsers(vec![audience::demo::user_id(rng.below(users))])
                })
            })
        });
    }
    if wanted("create_segment") {
        let definitions = common::segment_definitions(segments + 10_000, AS_OF);
        let mut next = segments;
        group.bench_function(BenchmarkId::new("create_segment/1", &label), |b| {
            b.iter_custom(|iters| {
                timed(&mut published, iters, || {
                    let mut definition = definitions[next % definitions.len()].clone();
                    definition.id = format!("bench-{next}");
                    next += 1;
                    Change::CreateSegment(definition)
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = writes;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(writes);
