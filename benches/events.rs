//! Behaviour benchmarks: 100,000,000 demo events of 10,000,000 users over a year (set
//! `AUDIENCE_BENCH_EVENTS` and `AUDIENCE_BENCH_USERS` for a smaller run), imported from a
//! Parquet file through the real import path, then queried server-side (what a gRPC handler
//! calls). Every query has its baseline in the same run: the same filter as a scan of the raw
//! event columns with arrow's compute kernels, counting per user in a dense array.
//! - `did/recent_not_last_week`: `DID purchase IN LAST 30d AND NOT DID purchase IN LAST 7d`
//! - `did/carts_no_purchase`: `DID add_to_cart AT LEAST 3 TIMES IN LAST 14d AND NOT DID purchase
//!   IN LAST 14d`
//! - `did/frequent_views`: `DID page_view AT LEAST 20 TIMES IN LAST 90d`
//! - `did/record_100_events`: a `RecordEvents` batch of 100 events of a live stream
//! - `did/frequent_views_after_writes`: the third query again after that stream
//! - `did/delete_1_user`: deleting one active user
//! - printed once: import throughput (events/s) and resident bytes per event.

mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{Int64Array, Scalar, UInt32Array, UInt8Array};
use arrow_buffer::BooleanBuffer;
use audience::demo::{DemoEvent, EVENT_NAMES};
use audience::engine::import::open_file;
use audience::engine::{Audience, Change, DatasetState, Engine, EventRecord, Limits};
use audience::time::{Millis, SystemClock};
use criterion::{criterion_group, criterion_main, Criterion};

use common::{env_u64, resident_bytes, truthy};

const SEED: u64 = 7;
/// The query instant, not on a day boundary: 2026-11-01T13:37:00.123Z.
const AS_OF: Millis = audience::demo::DEMO_EPOCH + 13 * 3_600_000 + 37 * 60_000 + 123;
const DAY: i64 = 86_400_000;

/// The demo events as a Parquet file, written once per size and kept for later runs.
fn parquet_file(users: u64, events: u64) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("events-{users}-{events}-{SEED}.parquet"));
    if path.exists() {
        return path;
    }
    let started = Instant::now();
    let partial = path.with_extension("partial");
    let file = std::fs::File::create(&partial).expect("create parquet");
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, audience::demo::events_schema(), Some(props))
            .expect("writer");
    let mut chunk = Vec::with_capacity(1 << 20);
    for event in audience::demo::events(users, events, SEED, AS_OF) {
        chunk.push(event);
        if chunk.len() == chunk.capacity() {
            writer
                .write(&audience::demo::events_batch(&chunk))
                .expect("write");
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        writer
            .write(&audience::demo::events_batch(&chunk))
            .expect("write");
    }
    writer.close().expect("close parquet");
    std::fs::rename(&partial, &path).expect("rename parquet");
    eprintln!(
        "wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    path
}

/// Imports the file into an empty engine through the import path a server uses.
fn import(
    path: &Path,
    runtime: &tokio::runtime::Runtime,
) -> (Arc<Engine>, Arc<DatasetState>, u64, u64) {
    let engine = Arc::new(Engine::new(Limits::default(), Arc::new(SystemClock)));
    let before = resident_bytes();
    let started = Instant::now();
    let imported = runtime.block_on(async {
        let source = open_file(path, 64 * 1024).expect("open parquet");
        let mut import = engine.begin_import("default").await.expect("begin");
        let mut events = 0;
        for batch in source.batches {
            let outcome = import
                .apply_events(batch.expect("batch reads"))
                .await
                .expect("batch applies");
            events += outcome.events;
        }
        import.settle().await.expect("settle");
        import.commit().await.expect("commit");
        events
    });
    let seconds = started.elapsed().as_secs_f64();
    let grown = resident_bytes().saturating_sub(before);
    eprintln!(
        "import: {imported} events in {seconds:.1} s = {:.2} M events/s; resident growth {:.2} \
         bytes/event",
        imported as f64 / seconds / 1e6,
        grown as f64 / imported as f64
    );
    let state = engine.snapshot("default").expect("dataset");
    (engine, state, grown, imported)
}

/// Batch `round` of a live event stream: 100 demo events (skewed users, mixed names) that
/// happened a moment before `AS_OF`.
fn live_batch(users: u64, round: u64) -> Vec<EventRecord> {
    audience::demo::events(users, 100, round, AS_OF)
        .enumerate()
        .map(|(i, e)| EventRecord {
            user_id: audience::demo::user_id(e.user),
            event: EVENT_NAMES[e.event as usize].0.to_owned(),
            ts: AS_OF - 60_000 + i as i64,
            value: e.value,
        })
        .collect()
}

/// The raw events as columns, as an OLAP engine would scan them.
struct RawEvents {
    users: UInt32Array,
    events: UInt8Array,
    ts: Int64Array,
    user_count: usize,
}

fn raw_events(users: u64, count: u64) -> RawEvents {
    let mut u = Vec::with_capacity(count as usize);
    let mut e = Vec::with_capacity(count as usize);
    let mut t = Vec::with_capacity(count as usize);
    for DemoEvent {
        user, event, ts, ..
    } in audience::demo::events(users, count, SEED, AS_OF)
    {
        u.push(user as u32);
        e.push(event);
        t.push(ts);
    }
    RawEvents {
        users: UInt32Array::from(u),
        events: UInt8Array::from(e),
        ts: Int64Array::from(t),
        user_count: users as usize,
    }
}

fn code(name: &str) -> u8 {
    EVENT_NAMES
        .iter()
        .position(|(n, _)| *n == name)
        .expect("demo event") as u8
}

impl RawEvents {
    /// Rows of `event` in `[as_of - days, as_of)`, by compute kernels.
    fn rows(&self, event: &str, days: i64) -> BooleanBuffer {
        let is_event = Scalar::new(UInt8Array::from(vec![code(event)]));
        let start = Scalar::new(Int64Array::from(vec![AS_OF - days * DAY]));
        let end = Scalar::new(Int64Array::from(vec![AS_OF]));
        let named = truthy(&arrow_ord::cmp::eq(&self.events, &is_event).expect("eq"));
        let after = truthy(&arrow_ord::cmp::gt_eq(&self.ts, &start).expect("ge"));
        let before = truthy(&arrow_ord::cmp::lt(&self.ts, &end).expect("lt"));
        &(&named & &after) & &before
    }

    /// Events per user among the selected rows.
    fn counts(&self, rows: &BooleanBuffer) -> Vec<u32> {
        let mut counts = vec![0u32; self.user_count];
        let users = self.users.values();
        for row in rows.set_indices() {
            counts[users[row] as usize] += 1;
        }
        counts
    }

    fn recent_not_last_week(&self) -> usize {
        let month = self.counts(&self.rows("purchase", 30));
        let week = self.counts(&self.rows("purchase", 7));
        month
            .iter()
            .zip(&week)
            .filter(|(m, w)| **m > 0 && **w == 0)
            .count()
    }

    fn carts_no_purchase(&self) -> usize {
        let carts = self.counts(&self.rows("add_to_cart", 14));
        let bought = self.counts(&self.rows("purchase", 14));
        carts
            .iter()
            .zip(&bought)
            .filter(|(c, b)| **c >= 3 && **b == 0)
            .count()
    }

    fn frequent_views(&self) -> usize {
        let views = self.counts(&self.rows("page_view", 90));
        views.iter().filter(|v| **v >= 20).count()
    }
}

/// A query's scan of the raw events.
type Scan = fn(&RawEvents) -> usize;

const RECENT_NOT_LAST_WEEK: &str = "DID purchase IN LAST 30d AND NOT DID purchase IN LAST 7d";
const CARTS_NO_PURCHASE: &str =
    "DID add_to_cart AT LEAST 3 TIMES IN LAST 14d AND NOT DID purchase IN LAST 14d";
const FREQUENT_VIEWS: &str = "DID page_view AT LEAST 20 TIMES IN LAST 90d";

fn parse(text: &str) -> Audience {
    Audience::Expression(audience::expr::parse(text).expect("bench expression parses"))
}

fn benches(c: &mut Criterion) {
    let users = env_u64("AUDIENCE_BENCH_USERS", 10_000_000);
    let count = env_u64("AUDIENCE_BENCH_EVENTS", 100_000_000);
    let path = parquet_file(users, count);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (engine, state, grown, imported) = import(&path, &runtime);
    // The users the events created cost what any user costs (their keys); the rest is events.
    let users_bytes = state.keys().heap_bytes() as u64 + state.live().serialized_size() as u64;
    eprintln!(
        "index: {} users, {imported} events; event index heap {:.2} bytes/event; resident \
         growth less the users' keys {:.2} bytes/event",
        state.live().len(),
        state.events().heap_bytes() as f64 / imported as f64,
        grown.saturating_sub(users_bytes) as f64 / imported as f64
    );
    // AUDIENCE_BENCH_SCAN=0 skips the baselines (and their check), e.g. to profile a query.
    let scan = std::env::var("AUDIENCE_BENCH_SCAN").map_or(true, |v| v != "0");
    let raw = if scan {
        raw_events(users, count)
    } else {
        raw_events(1, 0)
    };

    let queries: [(&str, &str, Scan); 3] = [
        (
            "recent_not_last_week",
            RECENT_NOT_LAST_WEEK,
            RawEvents::recent_not_last_week,
        ),
        (
            "carts_no_purchase",
            CARTS_NO_PURCHASE,
            RawEvents::carts_no_purchase,
        ),
        ("frequent_views", FREQUENT_VIEWS, RawEvents::frequent_views),
    ];
    for (name, days) in [("purchase", 30), ("add_to_cart", 14), ("page_view", 90)] {
        if let Some(series) = state.events().series(name) {
            let window = audience::index::events::TimeWindow {
                start: AS_OF - days * DAY,
                end: AS_OF,
            };
            eprintln!(
                "{name}: {} events, {} (user, day) pairs in the last {days} days",
                series.events(),
                series.pairs(window)
            );
        }
    }
    for (name, series) in audience::demo::EVENT_NAMES
        .iter()
        .filter_map(|(n, _)| Some((n, state.events().series(n)?)))
    {
        if let Some(tier) = series.tier_stats() {
            let all = audience::index::events::TimeWindow {
                start: i64::MIN,
                end: i64::MAX,
            };
            eprintln!(
                "{name}: frequent-user tier of {} users, {} of the name's {} pairs, {} rows, \
                 {:.2} bytes/event of the dataset",
                tier.users,
                tier.pairs,
                series.pairs(all),
                tier.rows,
                tier.heap_bytes as f64 / imported as f64
            );
        }
    }
    let mut group = c.benchmark_group("did");
    group.sample_size(20);
    for (name, text, run_scan) in queries {
        let audience = parse(text);
        let indexed = state.count(&audience, AS_OF).expect("query runs");
        eprintln!("{name}: {indexed} users");
        group.bench_function(name, |b| {
            b.iter(|| black_box(state.count(&audience, AS_OF).expect("query runs")))
        });
        if scan {
            let scanned = run_scan(&raw) as u64;
            assert_eq!(indexed, scanned, "{name}: index and scan disagree");
            group.bench_function(format!("{name}_scan"), |b| {
                b.iter(|| black_box(run_scan(&raw)))
            });
        }
    }
    // Writes: what a RecordEvents batch costs on this dataset, the snapshot above still
    // held by a reader (as a query in flight would), so that every change is copied.
    let mut round = 0;
    group.bench_function("record_100_events", |b| {
        b.iter(|| {
            round += 1;
            let change = Change::RecordEvents(live_batch(users, round));
            black_box(
                runtime
                    .block_on(engine.apply("default", change))
                    .expect("write"),
            )
        })
    });
    // The frequent-view query again on what the stream left: up to 31 new frequent users
    // wait for their places and are counted one by one.
    let streamed = engine.snapshot("default").expect("dataset");
    let audience = parse(FREQUENT_VIEWS);
    group.bench_function("frequent_views_after_writes", |b| {
        b.iter(|| black_box(streamed.count(&audience, AS_OF).expect("query runs")))
    });
    // A delete rewrites the days its user appears in and rebuilds the tiers of busy names.
    let mut row = 0;
    group.sample_size(10);
    group.bench_function("delete_1_user", |b| {
        b.iter(|| {
            row += 1;
            let user = audience::demo::events(users, 1, row, AS_OF)
                .next()
                .map_or(row, |e| e.user);
            let change = Change::DeleteUsers(vec![audience::demo::user_id(user)]);
            black_box(
                runtime
                    .block_on(engine.apply("default", change))
                    .expect("delete"),
            )
        })
    });
    group.finish();
}

criterion_group!(events, benches);
criterion_main!(events);
