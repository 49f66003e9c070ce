//! User writes queued on one dataset are applied together as one version. Each must get the
//! result it would have got alone, in queue order, and the dataset must end exactly as if they
//! had been applied one by one; in embedded mode, the coalesced record must replay to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use audience::engine::{
    AttributeChange, AttributeKind, AttributeValue, Change, ChangeOp, DatasetState, Engine, Limits,
    SegmentDefinition, UserUpdate,
};
use audience::rng::SplitMix64 as SplitMix;

use crate::durability::{fingerprint, open, random_events, random_upsert, temp_dir, user};
use crate::harness::{FixedClock, JAN_1_2026};

const SEGMENTS: [&str; 6] = [
    r#"country = "US""#,
    r#"age >= 30 AND interests HAS "sports""#,
    "DID buy IN LAST 3d",
    "DID view AT LEAST 2 TIMES",
    "NOT spend > 0",
    r#"SEGMENT "s0" OR vip = TRUE"#,
];

fn segment(index: usize) -> Change {
    Change::CreateSegment(SegmentDefinition {
        id: format!("s{index}"),
        name: format!("segment {index}"),
        description: String::new(),
        labels: BTreeMap::new(),
        expression: audience::expr::parse(SEGMENTS[index]).expect("test expressions parse"),
        created_at: JAN_1_2026,
        updated_at: JAN_1_2026,
    })
}

/// A write that fails: a string where `age` holds integers.
fn bad_age(rng: &mut SplitMix) -> Change {
    Change::UpsertUsers(vec![UserUpdate {
        user_id: user(rng),
        changes: vec![AttributeChange {
            attribute: "age".into(),
            op: ChangeOp::Set(AttributeValue::String("old".into())),
        }],
    }])
}

/// A random user write: upserts, events, deletes, and some that fail.
fn random_write(rng: &mut SplitMix) -> Change {
    match rng.below(10) {
        0..=3 => random_upsert(rng, JAN_1_2026),
        4..=6 => random_events(rng, JAN_1_2026),
        7 | 8 => Change::DeleteUsers((0..1 + rng.below(2)).map(|_| user(rng)).collect()),
        _ => bad_age(rng),
    }
}

/// A dataset with segments and some users, through `engine`.
async fn seed(engine: &Engine, rng: &mut SplitMix) {
    let declared = Change::DeclareAttributes(vec![
        ("country".into(), AttributeKind::Categorical),
        ("interests".into(), AttributeKind::Set),
        ("age".into(), AttributeKind::Integer),
        ("spend".into(), AttributeKind::Float),
        ("vip".into(), AttributeKind::Boolean),
        ("signup".into(), AttributeKind::Timestamp),
    ]);
    engine.apply("default", declared).await.expect("declare");
    for index in 0..SEGMENTS.len() {
        engine
            .apply("default", segment(index))
            .await
            .expect("segment");
    }
    for _ in 0..20 {
        let _ = engine
            .apply("default", random_upsert(rng, JAN_1_2026))
            .await;
        let _ = engine
            .apply("default", random_events(rng, JAN_1_2026))
            .await;
    }
}

/// Applies `writes` one at a time to a copy of `state`, as if alone: each result, and the end.
fn one_by_one(state: &DatasetState, writes: &[Change]) -> (Vec<Result<String, String>>, String) {
    let mut state = state.clone();
    let mut results = Vec::new();
    for write in writes {
        let mut next = state.clone();
        match next.apply(write, JAN_1_2026) {
            Ok(outcome) => {
                results.push(Ok(format!("{outcome:?}")));
                state = next;
            }
            Err(error) => results.push(Err(error.to_string())),
        }
    }
    (results, fingerprint(&state))
}

/// Sends every write at once (a single-threaded runtime queues them in this order while the
/// first is applied), and returns each result.
async fn all_at_once(engine: &Arc<Engine>, writes: &[Change]) -> Vec<Result<String, String>> {
    let tasks: Vec<_> = writes
        .iter()
        .map(|write| {
            let (engine, write) = (engine.clone(), write.clone());
            tokio::spawn(async move { engine.apply("default", write).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        let result = task.await.expect("writer task");
        results.push(result.map(|o| format!("{o:?}")).map_err(|e| e.to_string()));
    }
    results
}

/// Seeds `engine`, sends random writes all at once and checks each result against the same
/// writes applied one by one; returns the version before and the expected end.
async fn send_and_check(
    engine: &Arc<Engine>,
    seed_value: u64,
    rng: &mut SplitMix,
) -> (Arc<DatasetState>, Vec<Result<String, String>>, String) {
    seed(engine, rng).await;
    let before = engine.snapshot("default").expect("dataset");
    let writes: Vec<Change> = (0..2 + rng.below(60)).map(|_| random_write(rng)).collect();
    let (expected, expected_end) = one_by_one(&before, &writes);
    let got = all_at_once(engine, &writes).await;
    assert_eq!(got, expected, "seed {seed_value}: each write's own result");
    (before, expected, expected_end)
}

#[tokio::test(flavor = "current_thread")]
async fn queued_writes_applied_together_equal_the_same_writes_one_by_one() {
    let (mut succeeded, mut versions) = (0, 0);
    for seed_value in 1..=25 {
        let clock = FixedClock::new(JAN_1_2026);
        let engine = Arc::new(Engine::new(Limits::default(), clock));
        let mut rng = SplitMix::new(seed_value);
        let (before, expected, expected_end) = send_and_check(&engine, seed_value, &mut rng).await;
        let after = engine.snapshot("default").expect("dataset");
        assert_eq!(
            fingerprint(&after),
            expected_end,
            "seed {seed_value}: the dataset"
        );
        succeeded += expected.iter().filter(|r| r.is_ok()).count() as u64;
        versions += after.version() - before.version();
    }
    // Proof that they were applied together: far fewer versions than writes that succeeded.
    // (Per seed it depends on timing: the first write may finish before the others queue.)
    assert!(
        versions * 2 < succeeded,
        "{succeeded} writes made {versions} versions"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn queued_writes_logged_together_replay_to_the_same_dataset() {
    for seed_value in 1..=6 {
        let dir = temp_dir(&format!("coalesce-{seed_value}"));
        let clock = FixedClock::new(JAN_1_2026);
        let engine = open(&dir, &clock).await;
        let mut rng = SplitMix::new(seed_value + 100);
        let (_, _, expected_end) = send_and_check(&engine, seed_value, &mut rng).await;
        drop(engine);
        let engine = open(&dir, &clock).await;
        let recovered = engine.snapshot("default").expect("dataset");
        assert_eq!(
            fingerprint(&recovered),
            expected_end,
            "seed {seed_value}: replayed"
        );
        drop(engine);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
