//! Durability in process: random writes of every kind go to an engine that logs them and to one
//! that keeps everything in memory (the model); the durable one is snapshotted and restarted at
//! random points, and after every restart each dataset must equal the model's, user by user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use audience::engine::{
    AttributeChange, AttributeValue, Change, ChangeOp, DatasetState, DurableOptions, Engine,
    EngineError, EventRecord, ImportBatch, Limits, SegmentDefinition, UserUpdate,
};
use audience::index::{Attribute, AttributeKind};
use audience::persist::wal::WalOptions;
use audience::persist::{FsyncPolicy, PersistError};
use audience::rng::SplitMix64 as SplitMix;

use crate::harness::{FixedClock, JAN_1_2026};

const DATASETS: [&str; 2] = ["default", "ads"];
const COUNTRIES: [&str; 4] = ["US", "GB", "FR", "DE"];
const INTERESTS: [&str; 4] = ["sports", "music", "news", "travel"];
const EVENTS: [&str; 3] = ["view", "cart", "buy"];
const EXPRESSIONS: [&str; 7] = [
    r#"country = "US""#,
    r#"age >= 30 AND interests HAS "sports""#,
    "DID buy IN LAST 3d",
    "DID view AT LEAST 2 TIMES",
    "NOT spend > 0",
    r#"vip = TRUE OR country IN ("GB", "FR")"#,
    "signup >= NOW - 2d",
];

pub fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("audience-it-{name}-{}-{nanos}", std::process::id()))
}

fn options(dir: &Path) -> DurableOptions {
    DurableOptions {
        data_dir: dir.to_owned(),
        wal: WalOptions {
            policy: FsyncPolicy::Interval,
            interval: Duration::from_millis(1),
            segment_bytes: 64 * 1024,
        },
        // Snapshots only where the test takes them (the test clock runs days ahead, so deletes
        // would otherwise look due for erasure at every restart).
        snapshot_log_bytes: u64::MAX,
        snapshot_log_records: u64::MAX,
        erasure_max_age: Duration::from_secs(3650 * 86_400),
        repair: false,
    }
}

/// A durable engine on `dir`, once the engine dropped before it (whose background snapshot
/// may still hold it for a moment) has let go of the directory.
pub(crate) async fn open(dir: &Path, clock: &Arc<FixedClock>) -> Arc<Engine> {
    open_with(dir, clock, options(dir)).await
}

async fn open_with(dir: &Path, clock: &Arc<FixedClock>, options: DurableOptions) -> Arc<Engine> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let engine = Arc::new(Engine::new(Limits::default(), clock.clone()));
        match engine.open_durable(options.clone()).await {
            Ok(_) => return engine,
            Err(EngineError::Storage(PersistError::Locked(_)))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("recovery of {} fails: {error}", dir.display()),
        }
    }
}

/// Everything observable about one dataset, user by user, in dense-id order.
pub(crate) fn fingerprint(state: &DatasetState) -> String {
    let mut out = String::new();
    let live: Vec<u32> = state.live().iter().collect();
    out += &format!(
        "retention {:?} refreshed {:?} cutoff {}\n",
        state.configured_retention(),
        state.time_refreshed_at(),
        state.events().cutoff()
    );
    for &id in &live {
        let key = state.keys().key(id).unwrap_or("?");
        let mut values = Vec::new();
        for (name, attribute) in state.attributes() {
            let value = match &**attribute {
                Attribute::Categorical(a) => format!("{:?}", a.value(id)),
                Attribute::Set(a) => format!("{:?}", a.values_of(id)),
                Attribute::Boolean(a) => format!("{:?}", a.value(id)),
                Attribute::Integer(a) | Attribute::Timestamp(a) => format!("{:?}", a.get(id)),
                Attribute::Float(a) => format!("{:?}", a.get(id)),
            };
            values.push(format!("{name}={value}"));
        }
        out += &format!(
            "{id} {key} [{}] in {:?}\n",
            values.join(" "),
            state.segments_for_user(key)
        );
    }
    out += &format!("{:?}\n", state.describe());
    for (id, segment) in state.segments() {
        out += &format!(
            "segment {id} {:?} {:?}\n",
            segment.definition,
            segment.members().iter().collect::<Vec<_>>()
        );
    }
    for (name, count) in state.events().names() {
        out += &format!("events {name} {count}\n");
    }
    for (name, day, bucket) in state.events().buckets() {
        out += &format!("bucket {name} {day} {:?}\n", bucket.columns());
    }
    out
}

/// Compares every dataset of the two engines.
fn assert_same(durable: &Engine, model: &Engine, context: &str) {
    assert_eq!(durable.dataset_names(), model.dataset_names(), "{context}");
    for name in model.dataset_names() {
        let (got, want) = (
            durable.snapshot(&name).expect("dataset"),
            model.snapshot(&name).expect("dataset"),
        );
        let (got, want) = (fingerprint(&got), fingerprint(&want));
        if got != want {
            let line = got
                .lines()
                .zip(want.lines())
                .find(|(a, b)| a != b)
                .map_or_else(
                    || "(lengths differ)".to_owned(),
                    |(a, b)| format!("{a}\n   vs {b}"),
                );
            panic!("{context}: dataset '{name}' differs after recovery:\n   {line}");
        }
    }
}

pub(crate) fn user(rng: &mut SplitMix) -> String {
    format!("u{}", rng.below(40))
}

fn pick<'a>(rng: &mut SplitMix, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

pub(crate) fn random_upsert(rng: &mut SplitMix, now: i64) -> Change {
    let users = (0..1 + rng.below(4))
        .map(|_| {
            let changes = (0..1 + rng.below(3))
                .map(|_| {
                    let (attribute, op) = match rng.below(8) {
                        0 => (
                            "country",
                            ChangeOp::Set(AttributeValue::String(pick(rng, &COUNTRIES).into())),
                        ),
                        1 => (
                            "age",
                            ChangeOp::Set(AttributeValue::Int(18 + rng.below(60) as i64)),
                        ),
                        // Zero-inflated, as spend is.
                        2 => {
                            let spend = if rng.below(10) < 6 {
                                0.0
                            } else {
                                rng.below(500) as f64 / 4.0
                            };
                            ("spend", ChangeOp::Set(AttributeValue::Float(spend)))
                        }
                        3 => (
                            "vip",
                            ChangeOp::Set(AttributeValue::Bool(rng.below(2) == 0)),
                        ),
                        4 => (
                            "interests",
                            ChangeOp::Add(vec![pick(rng, &INTERESTS).into()]),
                        ),
                        5 => (
                            "interests",
                            ChangeOp::Remove(vec![pick(rng, &INTERESTS).into()]),
                        ),
                        6 => {
                            let at = now - rng.below(4 * 86_400_000) as i64;
                            ("signup", ChangeOp::Set(AttributeValue::Timestamp(at)))
                        }
                        _ => (
                            pick(rng, &["country", "age", "spend", "vip"]),
                            ChangeOp::Clear,
                        ),
                    };
                    AttributeChange {
                        attribute: attribute.into(),
                        op,
                    }
                })
                .collect();
            UserUpdate {
                user_id: user(rng),
                changes,
            }
        })
        .collect();
    Change::UpsertUsers(users)
}

pub(crate) fn random_events(rng: &mut SplitMix, now: i64) -> Change {
    let events = (0..1 + rng.below(10))
        .map(|_| EventRecord {
            user_id: user(rng),
            event: pick(rng, &EVENTS).into(),
            ts: now - rng.below(6 * 86_400_000) as i64,
            value: None,
        })
        .collect();
    Change::RecordEvents(events)
}

fn random_segment(rng: &mut SplitMix, now: i64, update: bool) -> Change {
    let id = format!("s{}", rng.below(4));
    let text = pick(rng, &EXPRESSIONS);
    let definition = SegmentDefinition {
        id,
        name: "segment".into(),
        description: String::new(),
        labels: BTreeMap::from([("team".to_owned(), "growth".to_owned())]),
        expression: audience::expr::parse(text).expect("test expressions parse"),
        created_at: now,
        updated_at: now,
    };
    if update {
        Change::UpdateSegment(definition)
    } else {
        Change::CreateSegment(definition)
    }
}

/// One random change.
fn random_change(rng: &mut SplitMix, now: i64) -> Change {
    match rng.below(20) {
        0..=6 => random_upsert(rng, now),
        7..=10 => random_events(rng, now),
        11 | 12 => Change::DeleteUsers((0..1 + rng.below(2)).map(|_| user(rng)).collect()),
        13 | 14 => random_segment(rng, now, false),
        15 => random_segment(rng, now, true),
        16 => Change::DeleteSegment(format!("s{}", rng.below(4))),
        17 => Change::SetRetention {
            days: 2 + rng.below(5) as u32,
        },
        18 => Change::DeclareAttributes(vec![("score".into(), AttributeKind::Integer)]),
        _ => Change::AdvanceTime,
    }
}

fn users_batch(rng: &mut SplitMix) -> RecordBatch {
    let rows = 1 + rng.below(6) as usize;
    let ids: Vec<String> = (0..rows).map(|_| user(rng)).collect();
    let countries: Vec<Option<&str>> = (0..rows)
        .map(|_| (rng.below(4) > 0).then(|| pick(rng, &COUNTRIES)))
        .collect();
    let ages: Vec<Option<i64>> = (0..rows)
        .map(|_| (rng.below(4) > 0).then(|| 18 + rng.below(60) as i64))
        .collect();
    RecordBatch::try_from_iter([
        ("user_id", Arc::new(StringArray::from(ids)) as ArrayRef),
        (
            "country",
            Arc::new(StringArray::from(countries)) as ArrayRef,
        ),
        ("age", Arc::new(Int64Array::from(ages)) as ArrayRef),
    ])
    .expect("batch")
}

fn events_batch(rng: &mut SplitMix, now: i64) -> RecordBatch {
    let rows = 1 + rng.below(8) as usize;
    let ids: Vec<String> = (0..rows).map(|_| user(rng)).collect();
    let names: Vec<&str> = (0..rows).map(|_| pick(rng, &EVENTS)).collect();
    let ts: Vec<i64> = (0..rows)
        .map(|_| now - rng.below(5 * 86_400_000) as i64)
        .collect();
    RecordBatch::try_from_iter([
        ("user_id", Arc::new(StringArray::from(ids)) as ArrayRef),
        ("event", Arc::new(StringArray::from(names)) as ArrayRef),
        (
            "ts",
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")) as ArrayRef,
        ),
    ])
    .expect("batch")
}

/// A multi-batch import of users and events, on one engine.
async fn import(
    engine: &Arc<Engine>,
    dataset: &str,
    users: &[RecordBatch],
    events: &[RecordBatch],
) {
    let mut import = engine.begin_import(dataset).await.expect("begin");
    for batch in users {
        import
            .apply(ImportBatch {
                batch: batch.clone(),
                id_column: "user_id".into(),
            })
            .await
            .expect("users batch");
    }
    for batch in events {
        import
            .apply_events(batch.clone())
            .await
            .expect("events batch");
    }
    import.settle().await.expect("settle");
    import.commit().await.expect("commit");
}

/// Applies one change to both engines: both must succeed or both fail.
async fn apply_both(durable: &Engine, model: &Engine, dataset: &str, change: Change, step: usize) {
    let expected = model.apply(dataset, change.clone()).await;
    let got = durable.apply(dataset, change.clone()).await;
    assert_eq!(
        got.as_ref().map_err(|e| e.to_string()),
        expected.as_ref().map_err(|e| e.to_string()),
        "step {step}: {change:?}"
    );
}

async fn run_history(seed: u64, steps: usize) {
    let dir = temp_dir(&format!("history-{seed}"));
    let clock = FixedClock::new(JAN_1_2026);
    let model = Arc::new(Engine::new(Limits::default(), clock.clone()));
    let mut durable = open(&dir, &clock).await;
    let mut rng = SplitMix::new(seed);
    for step in 0..steps {
        clock.advance(Duration::from_secs(rng.below(6 * 3600)));
        let now = durable.now();
        let dataset = pick(&mut rng, &DATASETS);
        match rng.below(24) {
            0 => {
                let users: Vec<RecordBatch> = (0..1 + rng.below(2))
                    .map(|_| users_batch(&mut rng))
                    .collect();
                let events: Vec<RecordBatch> = (0..rng.below(3))
                    .map(|_| events_batch(&mut rng, now))
                    .collect();
                import(&model, dataset, &users, &events).await;
                import(&durable, dataset, &users, &events).await;
            }
            1 => {
                let only = (rng.below(2) == 0).then_some(dataset);
                durable
                    .write_snapshot(only, |_, _, _| {})
                    .await
                    .expect("snapshot");
            }
            2 | 3 => {
                drop(durable);
                durable = open(&dir, &clock).await;
                assert_same(
                    &durable,
                    &model,
                    &format!("seed {seed}, restart at step {step}"),
                );
            }
            4 => {
                model.advance_time().await.expect("model refresh");
                durable.advance_time().await.expect("durable refresh");
            }
            _ => {
                let change = random_change(&mut rng, now);
                apply_both(&durable, &model, dataset, change, step).await;
            }
        }
    }
    drop(durable);
    let durable = open(&dir, &clock).await;
    assert_same(&durable, &model, &format!("seed {seed}, final restart"));
    drop(durable);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_recover_exactly_through_snapshots_and_the_log() {
    for seed in 1..=12 {
        run_history(seed, 160).await;
    }
}

/// A `country = "US"` upsert of one user.
fn us_user(user: &str) -> Change {
    Change::UpsertUsers(vec![UserUpdate {
        user_id: user.into(),
        changes: vec![AttributeChange {
            attribute: "country".into(),
            op: ChangeOp::Set(AttributeValue::String("US".into())),
        }],
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_token_resumes_after_a_restart_where_nothing_was_missed() {
    let dir = temp_dir("watch-restart");
    let clock = FixedClock::new(JAN_1_2026);
    let engine = open(&dir, &clock).await;
    engine
        .apply("default", us_user("u0"))
        .await
        .expect("first write");
    let segment = random_segment(&mut SplitMix::new(1), JAN_1_2026, false);
    let Change::CreateSegment(mut definition) = segment else {
        unreachable!("a create");
    };
    definition.id = "us".into();
    definition.expression = audience::expr::parse(r#"country = "US""#).expect("parses");
    engine
        .apply("default", Change::CreateSegment(definition))
        .await
        .expect("segment");
    let ids = vec!["us".to_owned()];
    let mut watcher = engine.watch("default", &ids, "").expect("watch");
    let start = watcher.next().await.expect("greeting").resume_token;
    engine.apply("default", us_user("u1")).await.expect("write");
    let caught_up = watcher.next().await.expect("u1 arrives");
    assert_eq!(caught_up.changes.len(), 1);
    drop(watcher);
    drop(engine);

    let engine = open(&dir, &clock).await;
    engine
        .apply("default", us_user("u2"))
        .await
        .expect("write after restart");
    let mut resumed = engine
        .watch("default", &ids, &caught_up.resume_token)
        .expect("a caught-up token resumes after a restart");
    resumed.next().await.expect("greeting");
    let next = resumed.next().await.expect("the write after the restart");
    let users: Vec<&str> = next.changes.iter().map(|c| c.user_id.as_str()).collect();
    assert_eq!(users, ["u2"]);
    // A token from before changes the restarted server never held is refused, not skipped.
    let refused = engine
        .watch("default", &ids, &start)
        .expect_err("history not held");
    assert!(
        matches!(
            refused,
            audience::engine::EngineError::WatchHistoryDiscarded(_)
        ),
        "{refused}"
    );
    drop(resumed);
    drop(engine);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Whether any file under `dir` holds `needle`.
fn any_file_holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return any_file_holds(&path, needle);
        }
        std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    })
}

/// Waits (up to 20 s) until no file under `dir` holds `needle`: the erasure snapshot ran.
async fn wait_until_erased(dir: &Path, needle: &[u8]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while any_file_holds(dir, needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "deleted bytes stayed on disk"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erasure_clock_of_a_delete_survives_a_restart() {
    let dir = temp_dir("erasure-restart");
    let clock = FixedClock::new(JAN_1_2026);
    let erasure = DurableOptions {
        erasure_max_age: Duration::from_secs(2),
        ..options(&dir)
    };
    let open_with_erasure = || open_with(&dir, &clock, erasure.clone());
    let engine = open_with_erasure().await;
    for user in ["erase-me-4c1d", "keep-me-9a7e"] {
        engine
            .apply("default", us_user(user))
            .await
            .expect("upsert");
    }
    engine
        .apply("default", Change::DeleteUsers(vec!["erase-me-4c1d".into()]))
        .await
        .expect("delete");
    assert!(
        any_file_holds(&dir, b"erase-me-4c1d"),
        "the delete is on disk"
    );
    // Restarted before any snapshot: the delete's age is read back from the log.
    drop(engine);
    let engine = open_with_erasure().await;
    wait_until_erased(&dir, b"erase-me-4c1d").await;
    assert!(
        any_file_holds(&dir, b"keep-me-9a7e"),
        "live users stay on disk"
    );
    drop(engine);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// A delete applied together with other writes (one coalesced record) starts the erasure
/// clock on recovery as a delete alone does.
#[tokio::test(flavor = "current_thread")]
async fn the_erasure_clock_of_a_coalesced_delete_survives_a_restart() {
    let dir = temp_dir("erasure-coalesced");
    let clock = FixedClock::new(JAN_1_2026);
    let erasure = DurableOptions {
        erasure_max_age: Duration::from_secs(2),
        ..options(&dir)
    };
    let engine = open_with(&dir, &clock, erasure.clone()).await;
    for user in ["erase-me-77b2", "keep-me-1f0c"] {
        engine
            .apply("default", us_user(user))
            .await
            .expect("upsert");
    }
    // Sent at once: the first applies alone, the rest (the delete among them) together.
    let mut writes: Vec<Change> = (0..6).map(|i| us_user(&format!("other-{i}"))).collect();
    writes.push(Change::DeleteUsers(vec!["erase-me-77b2".into()]));
    let tasks: Vec<_> = writes
        .into_iter()
        .map(|write| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.apply("default", write).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer").expect("write");
    }
    drop(engine);
    let engine = open_with(&dir, &clock, erasure).await;
    wait_until_erased(&dir, b"erase-me-77b2").await;
    assert!(any_file_holds(&dir, b"keep-me-1f0c"), "live users stay");
    drop(engine);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_dataset_share_syncs_and_recover_in_log_order() {
    let dir = temp_dir("concurrent");
    let clock = FixedClock::new(JAN_1_2026);
    let engine = open(&dir, &clock).await;
    engine
        .apply("default", us_user("seed"))
        .await
        .expect("first write");
    let tasks: Vec<_> = (0..16u64)
        .map(|writer| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut rng = SplitMix::new(writer + 100);
                let mut acknowledged = 0;
                for _ in 0..150 {
                    let change = match rng.below(4) {
                        0 => random_events(&mut rng, JAN_1_2026),
                        1 => Change::DeleteUsers(vec![user(&mut rng)]),
                        _ => random_upsert(&mut rng, JAN_1_2026),
                    };
                    // A clear of an attribute nobody wrote yet is refused, and leaves nothing.
                    if engine.apply("default", change).await.is_ok() {
                        acknowledged += 1;
                    }
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged = 0;
    for task in tasks {
        acknowledged += task.await.expect("writer");
    }
    assert!(
        acknowledged > 400,
        "most writes apply ({acknowledged} of 640)"
    );
    let before = fingerprint(&engine.snapshot("default").expect("dataset"));
    drop(engine);
    let engine = open(&dir, &clock).await;
    let after = fingerprint(&engine.snapshot("default").expect("dataset"));
    assert_eq!(
        after, before,
        "the recovered dataset equals the one that wrote it"
    );
    drop(engine);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Applies a change and checks that it was not held by a 5 s `interval`.
async fn write_not_held(engine: &Engine, dataset: &str, change: Change) {
    let started = std::time::Instant::now();
    engine.apply(dataset, change).await.expect("write applies");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a write to {dataset} waited {:?} for the interval",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_hands_over_its_record_so_no_write_waits_for_the_interval() {
    let dir = temp_dir("long-interval");
    let clock = FixedClock::new(JAN_1_2026);
    let mut long = options(&dir);
    long.wal.interval = Duration::from_secs(5);
    let engine = open_with(&dir, &clock, long).await;
    let mut rng = SplitMix::new(7);
    // The first write creates its dataset (logged by a task of its own); later ones go
    // through the dataset's pipeline.
    write_not_held(&engine, "default", us_user("a")).await;
    write_not_held(&engine, "default", random_events(&mut rng, JAN_1_2026)).await;
    write_not_held(&engine, "default", Change::DeleteUsers(vec!["a".into()])).await;
    // A write that fails to apply ends its announcement too.
    let refused = engine
        .apply("default", Change::DeleteSegment("no-such-segment".into()))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    write_not_held(&engine, "default", us_user("b")).await;
    let started = std::time::Instant::now();
    import(&engine, "imported", &[users_batch(&mut rng)], &[]).await;
    assert!(started.elapsed() < Duration::from_secs(1), "import held");
    // Writers of datasets of their own at once.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    let change = us_user(&format!("user-{w}-{i}"));
                    write_not_held(&engine, &format!("spread-{w}"), change).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    assert_eq!(engine.dataset_names().len(), 18);
    drop(engine);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_starts_after_its_snapshot_ends_is_refused_not_half_replayed() {
    let dir = temp_dir("log-gap");
    let clock = FixedClock::new(JAN_1_2026);
    let engine = open(&dir, &clock).await;
    engine
        .apply("default", us_user("before"))
        .await
        .expect("write");
    engine
        .write_snapshot(None, |_, _, _| {})
        .await
        .expect("snapshot");
    engine
        .apply("default", us_user("after"))
        .await
        .expect("write");
    drop(engine);
    // As a backup that copied the log but lost its snapshot: the records before the log's
    // first segment are nowhere.
    std::fs::remove_dir_all(dir.join("snapshots")).expect("remove the snapshot");
    let engine = Arc::new(Engine::new(Limits::default(), clock.clone()));
    let refused = loop {
        match engine.open_durable(options(&dir)).await {
            Err(EngineError::Storage(PersistError::Locked(_))) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.expect_err("a gap in the log stops the start"),
        }
    };
    let message = refused.to_string();
    assert!(
        message.contains("wal") && message.contains("are missing"),
        "{message}"
    );
    let repaired = Arc::new(Engine::new(Limits::default(), clock.clone()));
    let report = repaired
        .open_durable(DurableOptions {
            repair: true,
            ..options(&dir)
        })
        .await
        .expect("repair starts from what is there");
    assert!(
        report.dropped.iter().any(|d| d.contains("are missing")),
        "{:?}",
        report.dropped
    );
    let state = repaired.snapshot("default").expect("dataset");
    assert!(state.live_id("after").is_some() && state.live_id("before").is_none());
    drop(repaired);
    // The repair wrote a snapshot of what it kept: a plain start reads the same.
    let plain = open(&dir, &clock).await;
    let state = plain.snapshot("default").expect("dataset");
    assert!(state.live_id("after").is_some() && state.live_id("before").is_none());
    drop(plain);
    std::fs::remove_dir_all(&dir).expect("clean up");
}
