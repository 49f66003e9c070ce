//! Durability benchmarks: what the write-ahead log costs writers and how long a restart takes,
//! each against the in-memory engine measured in the same run. Custom loops rather than
//! criterion: concurrent throughput and multi-second restarts fit its one-closure-per-sample
//! model badly. Every figure is the median of `AUDIENCE_BENCH_REPS` repetitions.
//!
//! - `writes`: single-user upserts (3 attributes) and `RecordEvents` batches of 100 events into
//!   the demo users (`src/demo.rs`) with 20 saved segments, by 1 and 16 concurrent writers on a
//!   multi-thread runtime: in memory, `--fsync interval` (10 ms) and `--fsync always`. One
//!   engine per mode, loaded alike and kept side by side; each measurement gives every mode the
//!   same `AUDIENCE_BENCH_WRITES` writes (so that the engines grow alike), and the repetitions
//!   alternate which mode goes first (drift on a shared machine hits every mode alike).
//!   Writes/s, the ratio to in memory (target: interval ≥ 50%), latency percentiles, log bytes
//!   and group syncs (fdatasync) per write. Also upserts and event batches spread over 16 small
//!   datasets of their own: writers of one dataset queue on its writer lock, so these show what
//!   the log's group commit does with writers that do not. Each durable engine is then reopened
//!   (its snapshot and the stream's log records) and checked against the one that wrote.
//! - `restart`: the demo users, 20 segments and `AUDIENCE_BENCH_EVENTS` demo events, imported
//!   through `begin_import` in memory (the baseline: an in-memory server reloads from source)
//!   and into a durable engine; then fresh engines recover from the log alone (the import
//!   records replayed), one writes a snapshot, and fresh engines load it. Seconds, bytes per
//!   user and per event (target: restart under 20 s at 10M users and 100M events). Every
//!   recovered engine is checked against the in-memory one.
//!
//! ```sh
//! cargo bench --bench durability
//! # AUDIENCE_BENCH_USERS (2,000,000; full scale 10,000,000), AUDIENCE_BENCH_EVENTS (20,000,000;
//! # full scale 100,000,000), AUDIENCE_BENCH_WRITES (600), AUDIENCE_BENCH_REPS (3),
//! # AUDIENCE_BENCH_WRITERS (1,16), AUDIENCE_BENCH_GROUPS=writes,restart,
//! # AUDIENCE_BENCH_DIR (target/tmp: it must be on the disk the service would use, not tmpfs)
//! ```
//! Without `--bench` (`cargo test --benches`) it runs once at a tiny scale, as a smoke test.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use audience::demo::{self, EVENT_NAMES};
use audience::engine::{
    AttributeChange, AttributeValue, Audience, Change, ChangeOp, DurableOptions, Engine,
    EventRecord, ImportBatch, Limits, RecoveryReport, SegmentDefinition, UserUpdate,
    DEFAULT_DATASET,
};
use audience::persist::wal::WalOptions;
use audience::persist::FsyncPolicy;
use audience::rng::SplitMix64;
use audience::time::{Clock, Millis};
use tokio::runtime::Runtime;

use common::{env_u64, median, peak_resident_bytes, wanted};

const SEED: u64 = 42;
/// The engines' clock, fixed so that `NOW`, event windows and logged write times are the same
/// in every run: 2026-11-01T13:37:00.123Z, the end of the demo events.
const AS_OF: Millis = demo::DEMO_EPOCH + 13 * 3_600_000 + 37 * 60_000 + 123;
/// Rows per imported batch, as `serve --demo-users` imports them.
const BATCH_ROWS: usize = 64 * 1024;
const SEGMENTS: usize = 20;
const EVENTS_PER_BATCH: usize = 100;
const DEVICES: [&str; 3] = ["android", "ios", "desktop"];

#[derive(Debug)]
struct FixedClock(Millis);

impl Clock for FixedClock {
    fn now_millis(&self) -> Millis {
        self.0
    }
}

/// The run's scale and where its data goes.
struct Settings {
    users: u64,
    events: u64,
    /// Writes per measurement.
    writes: usize,
    reps: usize,
    writers: Vec<usize>,
    dir: PathBuf,
}

impl Settings {
    fn from_env() -> Self {
        // `cargo bench` passes `--bench`; without it (`cargo test --benches`) a smoke run.
        let bench = std::env::args().any(|a| a == "--bench");
        let (users, events, writes, reps) = match bench {
            true => (2_000_000, 20_000_000, 600, 3),
            false => (5_000, 50_000, 40, 1),
        };
        let writers = std::env::var("AUDIENCE_BENCH_WRITERS")
            .ok()
            .map(|list| {
                list.split(',')
                    .map(|w| w.trim().parse().expect("AUDIENCE_BENCH_WRITERS: numbers"))
                    .collect()
            })
            .unwrap_or_else(|| vec![1, 16]);
        let dir = std::env::var_os("AUDIENCE_BENCH_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
            .join(format!("durability-{}", std::process::id()));
        Self {
            users: env_u64("AUDIENCE_BENCH_USERS", users).max(1),
            events: env_u64("AUDIENCE_BENCH_EVENTS", events),
            writes: env_u64("AUDIENCE_BENCH_WRITES", writes).max(1) as usize,
            reps: env_u64("AUDIENCE_BENCH_REPS", reps).max(1) as usize,
            writers,
            dir,
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    std::fs::create_dir_all(&settings.dir).expect("bench data directory");
    println!(
        "data directory {} ({})",
        settings.dir.display(),
        filesystem_of(&settings.dir)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if wanted("writes") {
        bench_writes(&settings, &runtime);
    }
    if wanted("restart") {
        bench_restart(&settings, &runtime);
    }
    let _ = std::fs::remove_dir_all(&settings.dir);
    println!(
        "peak resident memory of the run: {:.2} GB",
        peak_resident_bytes() as f64 / 1e9
    );
}

/// The filesystem type a path is on, from the longest mount point above it: a log on tmpfs
/// would measure memory, not a disk.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let found = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then_some((point.len(), device, kind))
        })
        .max_by_key(|(len, ..)| *len);
    match found {
        Some((_, _, "tmpfs")) => {
            "tmpfs: in memory, set AUDIENCE_BENCH_DIR to a directory on disk".into()
        }
        Some((_, device, kind)) => format!("{kind} on {device}"),
        None => "unknown filesystem".into(),
    }
}

fn new_engine() -> Arc<Engine> {
    Arc::new(Engine::new(Limits::default(), Arc::new(FixedClock(AS_OF))))
}

fn durable_options(dir: &Path, policy: FsyncPolicy) -> DurableOptions {
    DurableOptions {
        data_dir: dir.to_owned(),
        wal: WalOptions {
            policy,
            interval: Duration::from_millis(10),
            ..WalOptions::default()
        },
        // The bench writes its snapshots itself, never in the middle of a measurement.
        snapshot_log_bytes: u64::MAX,
        snapshot_log_records: u64::MAX,
        erasure_max_age: Duration::from_secs(24 * 3600),
        repair: false,
    }
}

/// A fresh engine recovered from `dir`, and the seconds `open_durable` took.
fn reopen(runtime: &Runtime, dir: &Path) -> (Arc<Engine>, RecoveryReport, f64) {
    let engine = new_engine();
    let started = Instant::now();
    let report = runtime
        .block_on(engine.open_durable(durable_options(dir, FsyncPolicy::Always)))
        .expect("recovery");
    (engine, report, started.elapsed().as_secs_f64())
}

fn reset(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("clear bench directory");
    }
}

fn log_bytes(engine: &Engine) -> u64 {
    engine.log_stats().map_or(0, |s| s.unsnapshotted_bytes)
}

fn log_syncs(engine: &Engine) -> u64 {
    engine.log_stats().map_or(0, |s| s.syncs)
}

/// The demo users in import batches.
fn user_batches(users: u64) -> Vec<RecordBatch> {
    demo::batches(users, BATCH_ROWS, SEED).collect()
}

/// The demo events of `users` in import batches, ending at [`AS_OF`].
fn event_batches(users: u64, events: u64) -> Vec<RecordBatch> {
    let mut batches = Vec::new();
    let mut chunk = Vec::with_capacity(BATCH_ROWS);
    for event in demo::events(users, events, SEED, AS_OF) {
        chunk.push(event);
        if chunk.len() == BATCH_ROWS {
            batches.push(demo::events_batch(&chunk));
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        batches.push(demo::events_batch(&chunk));
    }
    batches
}

/// 18 segments over attributes and 2 over events, so that both kinds of write maintain some.
fn segment_definitions() -> Vec<SegmentDefinition> {
    let mut definitions = common::segment_definitions(SEGMENTS - 2, AS_OF);
    for (id, text) in [
        ("recent-buyers", "DID purchase IN LAST 30d"),
        ("engaged", "DID page_view AT LEAST 5 TIMES IN LAST 7d"),
    ] {
        definitions.push(common::segment(id.into(), text, AS_OF));
    }
    definitions
}

/// Users, then segments, then events, each import one transaction (and one log record).
async fn load(
    engine: &Arc<Engine>,
    users: &[RecordBatch],
    segments: &[SegmentDefinition],
    events: &[RecordBatch],
) {
    let mut import = engine.begin_import(DEFAULT_DATASET).await.expect("begin");
    import.reserve(users.iter().map(|b| b.num_rows() as u64).sum());
    for batch in users {
        let batch = ImportBatch {
            batch: batch.clone(),
            id_column: "user_id".into(),
        };
        import.apply(batch).await.expect("users import");
    }
    import.commit().await.expect("users commit");
    for definition in segments {
        let change = Change::CreateSegment(definition.clone());
        engine
            .apply(DEFAULT_DATASET, change)
            .await
            .expect("segment");
    }
    if events.is_empty() {
        return;
    }
    let mut import = engine.begin_import(DEFAULT_DATASET).await.expect("begin");
    for batch in events {
        import
            .apply_events(batch.clone())
            .await
            .expect("events import");
    }
    import.settle().await.expect("settle");
    import.commit().await.expect("events commit");
}

/// What a recovered engine must agree on with the one that wrote.
#[derive(Debug, PartialEq)]
struct Facts {
    /// Users of every dataset.
    datasets: BTreeMap<String, u64>,
    users: u64,
    id_bound: u64,
    events: u64,
    segments: BTreeMap<String, u64>,
    counts: Vec<(&'static str, u64)>,
}

const CHECKED: [&str; 3] = [
    r#"country = "US" AND age BETWEEN 25 AND 34 AND interests HAS "sports""#,
    r#"device = "ios" AND interests HAS "travel""#,
    "DID purchase IN LAST 30d AND NOT DID purchase IN LAST 7d",
];

impl Facts {
    fn of(engine: &Engine) -> Self {
        let state = engine.snapshot(DEFAULT_DATASET).expect("dataset");
        let counts = CHECKED
            .iter()
            .map(|text| {
                let audience = Audience::Expression(audience::expr::parse(text).expect("parses"));
                (*text, state.count(&audience, AS_OF).expect("count"))
            })
            .collect();
        let datasets = engine
            .dataset_names()
            .into_iter()
            .map(|name| {
                let users = engine.snapshot(&name).map_or(0, |s| s.live().len());
                (name, users)
            })
            .collect();
        Self {
            datasets,
            users: state.live().len(),
            id_bound: state.keys().id_bound(),
            events: state.events().events(),
            segments: state
                .segments()
                .iter()
                .map(|(id, s)| (id.clone(), s.size()))
                .collect(),
            counts,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Memory,
    Interval,
    Always,
}

const MODES: [Mode; 3] = [Mode::Memory, Mode::Interval, Mode::Always];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Memory => "in memory",
            Mode::Interval => "fsync interval 10 ms",
            Mode::Always => "fsync always",
        }
    }

    fn policy(self) -> Option<FsyncPolicy> {
        match self {
            Mode::Memory => None,
            Mode::Interval => Some(FsyncPolicy::Interval),
            Mode::Always => Some(FsyncPolicy::Always),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// One user, three attributes.
    Upsert,
    /// A `RecordEvents` batch of a live stream.
    Events,
    /// Upserts, write `i` to dataset `i % SPREAD` of its own (empty at first): writers of one
    /// dataset queue on its writer, so this shows what the log does with writers that do not.
    UpsertSpread,
    /// `RecordEvents` batches spread alike (their users created by the events).
    EventsSpread,
}

/// Datasets of [`Write::UpsertSpread`] and [`Write::EventsSpread`].
const SPREAD: usize = 16;

impl Write {
    fn label(self) -> String {
        match self {
            Write::Upsert => "upsert 1 user".into(),
            Write::Events => format!("RecordEvents {EVENTS_PER_BATCH}"),
            Write::UpsertSpread => format!("upsert 1 user, {SPREAD} small datasets"),
            Write::EventsSpread => {
                format!("RecordEvents {EVENTS_PER_BATCH}, {SPREAD} small datasets")
            }
        }
    }

    /// Whether writes go to datasets of their own rather than to the demo one.
    fn is_spread(self) -> bool {
        matches!(self, Write::UpsertSpread | Write::EventsSpread)
    }

    /// Writes per measurement: the small datasets' writes are cheap, so they get more.
    fn count(self, writes: usize) -> usize {
        match self.is_spread() {
            true => writes * 10,
            false => writes,
        }
    }

    /// The dataset of write `index`.
    fn dataset(self, index: usize) -> String {
        match self {
            Write::UpsertSpread => format!("spread-{}", index % SPREAD),
            Write::EventsSpread => format!("events-{}", index % SPREAD),
            Write::Upsert | Write::Events => DEFAULT_DATASET.into(),
        }
    }

    fn change(self, users: u64, rng: &mut SplitMix64) -> Change {
        match self {
            Write::Upsert | Write::UpsertSpread => {
                let set = |attribute: &str, op| AttributeChange {
                    attribute: attribute.into(),
                    op,
                };
                let age = AttributeValue::Int(13 + rng.below(70) as i64);
                let device = AttributeValue::String(DEVICES[rng.below(3) as usize].into());
                let interest = demo::INTERESTS[rng.below(demo::INTERESTS.len() as u64) as usize];
                Change::UpsertUsers(vec![UserUpdate {
                    user_id: demo::user_id(rng.below(users)),
                    changes: vec![
                        set("age", ChangeOp::Set(age)),
                        set("device", ChangeOp::Set(device)),
                        set("interests", ChangeOp::Add(vec![interest.into()])),
                    ],
                }])
            }
            // Skewed users and mixed names, as the demo stream has them, a moment ago.
            Write::Events | Write::EventsSpread => Change::RecordEvents(
                demo::events(users, EVENTS_PER_BATCH as u64, rng.next_u64(), AS_OF)
                    .enumerate()
                    .map(|(i, e)| EventRecord {
                        user_id: demo::user_id(e.user),
                        event: EVENT_NAMES[e.event as usize].0.to_owned(),
                        ts: AS_OF - 60_000 + i as i64,
                        value: e.value,
                    })
                    .collect(),
            ),
        }
    }
}

/// The writes of one measurement, each with its dataset.
type Writes = Arc<Vec<(String, Change)>>;

/// One measurement: `writers` tasks writing back to back.
struct Run {
    writes: u64,
    seconds: f64,
    /// Per write, microseconds, sorted.
    latencies: Vec<u32>,
    log_bytes: u64,
    /// Group syncs of the log.
    syncs: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.writes as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        let index = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
        f64::from(self.latencies[index]) / 1e3
    }
}

/// `(dataset, change)`s, applied by `writers` tasks that each take the next one until none is
/// left.
fn stream(runtime: &Runtime, engine: &Arc<Engine>, changes: &Writes, writers: usize) -> Run {
    let changes = changes.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let (log_before, syncs_before) = (log_bytes(engine), log_syncs(engine));
    let started = Instant::now();
    let mut latencies = runtime.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let (engine, changes, next) = (engine.clone(), changes.clone(), next.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while let Some((dataset, change)) =
                        changes.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        let change = change.clone();
                        let sent = Instant::now();
                        engine.apply(dataset, change).await.expect("write applies");
                        latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("writer task"));
        }
        all
    });
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Run {
        writes: latencies.len() as u64,
        seconds,
        latencies,
        log_bytes: log_bytes(engine).saturating_sub(log_before),
        syncs: log_syncs(engine).saturating_sub(syncs_before),
    }
}

fn bench_writes(settings: &Settings, runtime: &Runtime) {
    let users = settings.users;
    let batches = user_batches(users);
    let definitions = segment_definitions();
    let mut engines = Vec::new();
    for mode in MODES {
        let dir = settings.dir.join(format!("writes-{mode:?}").to_lowercase());
        reset(&dir);
        let started = Instant::now();
        let engine = runtime.block_on(async {
            let engine = new_engine();
            if let Some(policy) = mode.policy() {
                engine
                    .open_durable(durable_options(&dir, policy))
                    .await
                    .expect("open");
            }
            load(&engine, &batches, &definitions, &[]).await;
            // As a server runs after its first background snapshot: the log holds the stream.
            if mode.policy().is_some() {
                engine
                    .write_snapshot(None, |_, _, _| {})
                    .await
                    .expect("snapshot");
            }
            engine
        });
        eprintln!(
            "writes: {users} users and {SEGMENTS} segments loaded {} in {:.1} s",
            mode.label(),
            started.elapsed().as_secs_f64()
        );
        engines.push((mode, dir, engine));
    }
    drop(batches);

    let writes = [
        Write::Upsert,
        Write::Events,
        Write::UpsertSpread,
        Write::EventsSpread,
    ];
    let cases: Vec<(Write, usize)> = writes
        .into_iter()
        .flat_map(|w| settings.writers.iter().map(move |&n| (w, n)))
        .filter(|&(w, n)| !w.is_spread() || n > 1)
        .collect();
    let mut runs: BTreeMap<(usize, usize), Vec<Run>> = BTreeMap::new();
    for rep in 0..settings.reps {
        for (case, &(write, writers)) in cases.iter().enumerate() {
            // The same writes for every mode, so that every engine grows alike (the day's
            // event buckets grow with the stream, and writes into them get dearer).
            let mut rng = SplitMix64::new((rep as u64) << 32 | case as u64);
            let changes: Writes = Arc::new(
                (0..write.count(settings.writes))
                    .map(|i| (write.dataset(i), write.change(users, &mut rng)))
                    .collect(),
            );
            for k in 0..engines.len() {
                // Who goes first changes from case to case and repetition to repetition.
                let index = (k + rep + case) % engines.len();
                let (mode, _, engine) = &engines[index];
                let run = stream(runtime, engine, &changes, writers);
                eprintln!(
                    "  {} x{writers} {}: {:.0} writes/s",
                    write.label(),
                    mode.label(),
                    run.rate()
                );
                runs.entry((case, index)).or_default().push(run);
            }
        }
    }

    println!(
        "\nwrites into {users} demo users with {SEGMENTS} saved segments, {} x {} writes per \
         figure, medians; {} runtime worker threads",
        settings.reps,
        settings.writes,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| write | writers | mode | writes/s | vs in memory | p50 ms | p99 ms | p99.9 ms | log \
         bytes/write | writes/sync |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (case, &(write, writers)) in cases.iter().enumerate() {
        let mut baseline = f64::NAN;
        for (index, (mode, ..)) in engines.iter().enumerate() {
            let mut of_mode = runs.remove(&(case, index)).unwrap_or_default();
            let rate = median(of_mode.iter().map(Run::rate).collect());
            if *mode == Mode::Memory {
                baseline = rate;
            }
            // Latencies and log bytes of the repetition nearest the median.
            of_mode.sort_by(|a, b| (a.rate() - rate).abs().total_cmp(&(b.rate() - rate).abs()));
            let Some(run) = of_mode.first() else {
                continue;
            };
            let (per_write, per_sync) = match mode.policy() {
                Some(_) => (
                    format!("{:.0}", run.log_bytes as f64 / run.writes as f64),
                    format!("{:.1}", run.writes as f64 / run.syncs.max(1) as f64),
                ),
                None => ("-".into(), "-".into()),
            };
            println!(
                "| {} | {writers} | {} | {rate:.0} | {:.1}% | {:.3} | {:.3} | {:.3} | {per_write} \
                 | {per_sync} |",
                write.label(),
                mode.label(),
                100.0 * rate / baseline,
                run.percentile(0.5),
                run.percentile(0.99),
                run.percentile(0.999),
            );
        }
    }

    // Each durable engine, reopened from its snapshot and the stream's records, must hold what
    // it held.
    for (mode, dir, engine) in engines {
        if mode.policy().is_none() {
            continue;
        }
        let expected = Facts::of(&engine);
        drop(engine);
        let (reopened, report, seconds) = reopen(runtime, &dir);
        assert_eq!(
            Facts::of(&reopened),
            expected,
            "{}: the reopened engine differs",
            mode.label()
        );
        println!(
            "{}: reopened and checked in {seconds:.2} s (snapshot, then {} log records = {:.0} \
             records/s); {} users, {} events",
            mode.label(),
            report.records,
            report.records as f64 / seconds,
            expected.users,
            expected.events
        );
        drop(reopened);
        reset(&dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Restart

fn bench_restart(settings: &Settings, runtime: &Runtime) {
    let (users, events) = (settings.users, settings.events);
    let started = Instant::now();
    let user_batches = user_batches(users);
    let event_batches = event_batches(users, events);
    let definitions = segment_definitions();
    eprintln!(
        "restart: generated {users} users and {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The baseline: what an in-memory server does to get its data back, an import.
    let engine = new_engine();
    let started = Instant::now();
    runtime.block_on(load(&engine, &user_batches, &definitions, &event_batches));
    let memory_seconds = started.elapsed().as_secs_f64();
    let expected = Facts::of(&engine);
    assert_eq!(expected.users, users, "every demo user is loaded");
    assert_eq!(expected.events, events, "every demo event is kept");
    drop(engine);
    eprintln!("restart: in-memory import {memory_seconds:.1} s, {expected:?}");

    let dir = settings.dir.join("restart");
    reset(&dir);
    let engine = new_engine();
    let started = Instant::now();
    let (user_log, event_log) = runtime.block_on(async {
        engine
            .open_durable(durable_options(&dir, FsyncPolicy::Always))
            .await
            .expect("open");
        load(&engine, &user_batches, &definitions, &[]).await;
        let user_log = log_bytes(&engine);
        load(&engine, &[], &[], &event_batches).await;
        (user_log, log_bytes(&engine) - user_log)
    });
    let durable_seconds = started.elapsed().as_secs_f64();
    assert_eq!(Facts::of(&engine), expected, "durable import");
    drop(engine);
    drop((user_batches, event_batches));
    eprintln!("restart: durable import {durable_seconds:.1} s");

    // Recovery from the log alone: the import records replayed.
    let mut log_times = Vec::new();
    let mut last = None;
    for _ in 0..settings.reps {
        // One recovered engine at a time.
        drop(last.take());
        let (engine, report, seconds) = reopen(runtime, &dir);
        assert!(report.snapshot.is_none(), "no snapshot yet");
        assert_eq!(Facts::of(&engine), expected, "recovered from the log");
        eprintln!(
            "restart: log recovery {seconds:.1} s ({} records)",
            report.records
        );
        log_times.push(seconds);
        last = Some(engine);
    }
    let engine = last.expect("at least one repetition");

    let snapshot = runtime
        .block_on(engine.write_snapshot(None, |_, _, _| {}))
        .expect("snapshot");
    drop(engine);
    let files = snapshot_files(&dir);
    let event_file = files.get("events.arrow").copied().unwrap_or(0);
    eprintln!(
        "restart: snapshot {:.1} s, {} bytes",
        snapshot.seconds, snapshot.bytes
    );

    let mut snapshot_times = Vec::new();
    for _ in 0..settings.reps {
        let (engine, report, seconds) = reopen(runtime, &dir);
        assert!(report.snapshot.is_some(), "the snapshot is loaded");
        assert_eq!(report.records, 0, "the snapshot covers the whole log");
        assert_eq!(Facts::of(&engine), expected, "loaded from the snapshot");
        eprintln!("restart: snapshot load {seconds:.1} s");
        snapshot_times.push(seconds);
        drop(engine);
    }
    reset(&dir);

    let log_seconds = median(log_times);
    let load_seconds = median(snapshot_times);
    println!(
        "\nrestart of {users} demo users, {SEGMENTS} segments and {} events; files in the page \
         cache; {} repetitions, medians",
        expected.events, settings.reps
    );
    println!("| step | seconds | vs in-memory import |");
    println!("|---|---|---|");
    let row = |step: &str, seconds: f64| {
        println!(
            "| {step} | {seconds:.2} | {:.2}x |",
            seconds / memory_seconds
        )
    };
    row("in-memory import (baseline)", memory_seconds);
    row("durable import (logged)", durable_seconds);
    row("restart: recovery from the log alone", log_seconds);
    row("snapshot write", snapshot.seconds);
    row("restart: snapshot load", load_seconds);
    println!(
        "log: users import and segments {:.1} bytes/user, events import {:.2} bytes/event",
        user_log as f64 / users as f64,
        event_log as f64 / expected.events.max(1) as f64
    );
    println!(
        "snapshot: {} bytes = {:.1} bytes/user without events.arrow, {:.2} bytes/event in \
         events.arrow; files: {}",
        snapshot.bytes,
        (snapshot.bytes - event_file) as f64 / users as f64,
        event_file as f64 / expected.events.max(1) as f64,
        files
            .iter()
            .map(|(name, bytes)| format!("{name} {:.1} MB", *bytes as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The files of the newest snapshot under `dir` and their bytes, the attributes' summed.
fn snapshot_files(dir: &Path) -> BTreeMap<String, u64> {
    let root = audience::persist::snapshot::root_of(dir);
    let found = audience::persist::snapshot::latest(&root)
        .expect("snapshot readable")
        .expect("a snapshot");
    let mut files = BTreeMap::new();
    for file in found.manifest.datasets.iter().flat_map(|d| &d.files) {
        let name = match file.name.starts_with("attribute.") {
            true => "attribute.*.arrow".to_owned(),
            false => file.name.clone(),
        };
        *files.entry(name).or_default() += file.bytes;
    }
    files
}
