//! Against a real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`). Each test uses its own
//! key prefix and deletes its keys; without Redis the tests skip, unless
//! `AUDIENCE_REQUIRE_REDIS=1` makes that a failure (CI).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::rng::SplitMix64;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn store_or_skip(name: &str) -> Option<RedisStore> {
    let url = redis_url();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let prefix = format!("audience-test-{}-{nanos}-{name}", std::process::id());
    match RedisStore::connect(&url, &prefix).await {
        Ok(store) => Some(store),
        Err(err) if std::env::var("AUDIENCE_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("AUDIENCE_REQUIRE_REDIS=1 but Redis at {url} does not answer: {err}")
        }
        Err(err) => {
            eprintln!("skipped: no Redis (set REDIS_URL): {err}");
            None
        }
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

async fn keys(store: &RedisStore, pattern: &str) -> Vec<String> {
    let mut con = store.manager.clone();
    let mut cursor = 0u64;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .query_async(&mut con)
            .await
            .unwrap();
        found.extend(keys);
        if next == 0 {
            found.sort();
            return found;
        }
        cursor = next;
    }
}

/// Overwrites one stored byte with a different value, the way a bad disk or a stray writer would.
async fn flip_byte(store: &RedisStore, key: &str, offset: usize) {
    let mut con = store.manager.clone();
    let byte: Vec<u8> = redis::cmd("GETRANGE")
        .arg(key)
        .arg(offset)
        .arg(offset)
        .query_async(&mut con)
        .await
        .unwrap();
    redis::cmd("SETRANGE")
        .arg(key)
        .arg(offset)
        .arg(&[byte[0] ^ 0x10][..])
        .exec_async(&mut con)
        .await
        .unwrap();
}

async fn xlen(store: &RedisStore, dataset: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(store.ds_key(dataset, "log"))
        .query_async(&mut store.manager.clone())
        .await
        .unwrap()
}

fn assert_corrupt(result: Result<Vec<(Position, Vec<u8>)>>, key: &str, entry: Position) {
    match result {
        Err(PersistError::Corrupt { path, reason, .. }) => {
            assert_eq!(path, PathBuf::from(key));
            assert!(reason.contains(&entry.to_string()), "{reason}");
        }
        other => panic!("expected Corrupt naming {key}, got {other:?}"),
    }
}

#[tokio::test]
async fn appends_only_after_the_expected_position() {
    let Some(store) = store_or_skip("append").await else {
        return;
    };
    assert_eq!(store.head("d").await.unwrap(), Position::START);
    let first = store.append("d", Position::START, b"one").await.unwrap();
    let second = store.append("d", first, b"two").await.unwrap();
    assert!(Position::START < first && first < second);

    for stale in [Position::START, first] {
        assert!(matches!(
            store.append("d", stale, b"lost").await,
            Err(PersistError::Conflict)
        ));
    }
    assert_eq!(store.head("d").await.unwrap(), second);
    let all = store.read_after("d", Position::START, 10).await.unwrap();
    assert_eq!(
        all,
        vec![(first, b"one".to_vec()), (second, b"two".to_vec())]
    );
    assert_eq!(
        store.read_after("d", first, 10).await.unwrap(),
        vec![(second, b"two".to_vec())]
    );
    assert_eq!(
        store
            .read_after("d", Position::START, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.read_after("d", second, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .read_after("d", first, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .read_after("d", Position::START, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        store.append("no:colons", Position::START, b"x").await,
        Err(PersistError::Format(_))
    ));
    store.delete_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_have_one_winner() {
    let Some(store) = store_or_skip("race").await else {
        return;
    };
    let start = store.append("d", Position::START, b"base").await.unwrap();
    let racers: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append("d", start, &[i]).await })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        match racer.await.unwrap() {
            Ok(position) => winners.push(position),
            Err(PersistError::Conflict) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(store.head("d").await.unwrap(), winners[0]);
    assert_eq!(
        store
            .read_after("d", Position::START, 100)
            .await
            .unwrap()
            .len(),
        2
    );
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn large_records_round_trip_in_chunks() {
    let Some(store) = store_or_skip("blob").await else {
        return;
    };
    let store = store.with_chunk_size(1024);
    let large = random_bytes(10 * 1024 + 7, 1);
    let exact = random_bytes(1024, 2);
    let first = store.append("d", Position::START, &large).await.unwrap();
    let second = store.append("d", first, &exact).await.unwrap();
    let third = store.append("d", second, b"").await.unwrap();
    let records = store.read_after("d", Position::START, 10).await.unwrap();
    assert_eq!(
        records,
        vec![(first, large.clone()), (second, exact), (third, Vec::new())]
    );

    let blob_pattern = format!("{}:blob:*", store.prefix);
    let chunks = keys(&store, &blob_pattern).await;
    assert_eq!(chunks.len(), 11, "only the large record is chunked");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&chunks[0])
        .query_async(&mut store.manager.clone())
        .await
        .unwrap();
    assert_eq!(ttl, -1, "a successful append keeps its chunks");

    assert!(matches!(
        store.append("d", first, &large).await,
        Err(PersistError::Conflict)
    ));
    assert_eq!(
        keys(&store, &blob_pattern).await,
        chunks,
        "a conflicting append leaves no blob"
    );
    assert_eq!(store.head("d").await.unwrap(), third);
    store.delete_dataset("d").await.unwrap();
    assert!(keys(&store, &format!("{}:*", store.prefix))
        .await
        .iter()
        .all(|key| key.ends_with(":datasets") || key.ends_with(":announce")));
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn a_flipped_byte_in_a_chunk_is_corrupt() {
    let Some(store) = store_or_skip("flipchunk").await else {
        return;
    };
    let store = store.with_chunk_size(1024);
    let first = store
        .append("d", Position::START, &random_bytes(4000, 3))
        .await
        .unwrap();
    let chunk = keys(&store, &format!("{}:blob:*:2", store.prefix))
        .await
        .remove(0);
    flip_byte(&store, &chunk, 100).await;
    assert_corrupt(
        store.read_after("d", Position::START, 10).await,
        &chunk,
        first,
    );
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn a_flipped_byte_in_an_inline_record_is_corrupt() {
    let Some(store) = store_or_skip("flipinline").await else {
        return;
    };
    let log = store.ds_key("d", "log");
    // Stream entries cannot be edited: write one whose bytes do not match their CRC.
    let mut con = store.manager.clone();
    let id: String = redis::cmd("XADD")
        .arg(&log)
        .arg("*")
        .arg("r")
        .arg("hellp")
        .arg("crc")
        .arg(crc32fast::hash(b"hello"))
        .query_async(&mut con)
        .await
        .unwrap();
    let entry: Position = id.parse().unwrap();
    assert_corrupt(
        store.read_after("d", Position::START, 10).await,
        &log,
        entry,
    );
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn snapshots_round_trip_and_trim_the_log() {
    let Some(store) = store_or_skip("snap").await else {
        return;
    };
    let store = store.with_chunk_size(1024);
    assert_eq!(store.latest_snapshot("d").await.unwrap(), None);
    let p1 = store.append("d", Position::START, b"small").await.unwrap();
    let p2 = store.append("d", p1, &random_bytes(3000, 4)).await.unwrap();
    let p3 = store.append("d", p2, &random_bytes(2000, 5)).await.unwrap();
    let p4 = store.append("d", p3, b"tail").await.unwrap();

    let files = vec![
        ("empty".to_owned(), Vec::new()),
        ("big:file".to_owned(), random_bytes(5000, 6)),
        ("small".to_owned(), b"abc".to_vec()),
    ];
    store.put_snapshot("d", p2, &files).await.unwrap();
    let snapshot = store.latest_snapshot("d").await.unwrap().unwrap();
    assert_eq!(snapshot, StoredSnapshot { covers: p2, files });
    let tail = store.read_after("d", p2, 10).await.unwrap();
    assert_eq!(
        tail.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![p3, p4]
    );
    assert_eq!(xlen(&store, "d").await, 2);
    assert_eq!(
        keys(&store, &format!("{}:blob:*", store.prefix))
            .await
            .len(),
        2,
        "only p3's blob remains"
    );
    assert!(
        matches!(
            store.read_after("d", p1, 10).await,
            Err(PersistError::Conflict)
        ),
        "records after p1 were trimmed"
    );
    assert_eq!(store.head("d").await.unwrap(), p4);

    let second = vec![("state".to_owned(), random_bytes(2500, 7))];
    store.put_snapshot("d", p4, &second).await.unwrap();
    assert_eq!(
        store.latest_snapshot("d").await.unwrap().unwrap(),
        StoredSnapshot {
            covers: p4,
            files: second
        }
    );
    assert!(keys(&store, &store.ds_key("d", "snap:1:*"))
        .await
        .is_empty());
    assert_eq!(xlen(&store, "d").await, 0);
    assert!(keys(&store, &format!("{}:blob:*", store.prefix))
        .await
        .is_empty());
    assert!(store.read_after("d", p4, 10).await.unwrap().is_empty());

    // An older state never replaces a newer snapshot; a state beyond the head is refused.
    store
        .put_snapshot("d", p3, &[("old".to_owned(), vec![1])])
        .await
        .unwrap();
    assert_eq!(
        store.latest_snapshot("d").await.unwrap().unwrap().covers,
        p4
    );
    let beyond = next_position(p4);
    assert!(matches!(
        store.put_snapshot("d", beyond, &[]).await,
        Err(PersistError::Format(_))
    ));
    let snap_keys = keys(&store, &format!("{}*", store.ds_key("d", "snap:"))).await;
    assert!(
        snap_keys.iter().all(|key| key.contains(":snap:2:")),
        "{snap_keys:?}"
    );

    let chunk = store.ds_key("d", "snap:2:state:1");
    flip_byte(&store, &chunk, 0).await;
    match store.latest_snapshot("d").await {
        Err(PersistError::Corrupt { path, .. }) => assert_eq!(path, PathBuf::from(&chunk)),
        other => panic!("expected Corrupt naming {chunk}, got {other:?}"),
    }
    store.delete_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_sees_new_records_and_new_datasets() {
    let Some(store) = store_or_skip("wait").await else {
        return;
    };
    // A second replica with its own connection.
    let other = RedisStore::connect(&redis_url(), &store.prefix)
        .await
        .unwrap();
    let head = store.append("d1", Position::START, b"one").await.unwrap();

    let started = Instant::now();
    assert!(!store
        .wait(&[("d1".to_owned(), head)], Duration::from_millis(300))
        .await
        .unwrap());
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(!store
        .wait(&[("d1".to_owned(), head)], Duration::ZERO)
        .await
        .unwrap());
    assert!(store
        .wait(
            &[("d1".to_owned(), Position::START)],
            Duration::from_secs(5)
        )
        .await
        .unwrap());

    // The append lands while `wait` blocks (or just before; either way it must be seen).
    let writer = other.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.append("d1", head, b"two").await
    });
    let started = Instant::now();
    assert!(store
        .wait(&[("d1".to_owned(), head)], Duration::from_secs(5))
        .await
        .unwrap());
    assert!(started.elapsed() < Duration::from_secs(4));
    let head = append.await.unwrap().unwrap();

    let writer = other.clone();
    let create = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.append("d2", Position::START, b"new").await
    });
    let started = Instant::now();
    assert!(store
        .wait(&[("d1".to_owned(), head)], Duration::from_secs(5))
        .await
        .unwrap());
    assert!(started.elapsed() < Duration::from_secs(4));
    create.await.unwrap().unwrap();
    // Already known to the set: returns at once.
    assert!(store
        .wait(&[("d1".to_owned(), head)], Duration::from_secs(5))
        .await
        .unwrap());
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn datasets_lists_appended_datasets() {
    let Some(store) = store_or_skip("datasets").await else {
        return;
    };
    assert!(store.datasets().await.unwrap().is_empty());
    store.append("b", Position::START, b"x").await.unwrap();
    store.append("a.1", Position::START, b"y").await.unwrap();
    assert_eq!(
        store.datasets().await.unwrap(),
        vec!["a.1".to_owned(), "b".to_owned()]
    );
    store.delete_dataset("a.1").await.unwrap();
    assert_eq!(store.datasets().await.unwrap(), vec!["b".to_owned()]);
    assert!(keys(&store, &format!("{}*", store.ds_key("a.1", "")))
        .await
        .is_empty());
    store.delete_all().await.unwrap();
    assert!(keys(&store, &format!("{}:*", store.prefix))
        .await
        .is_empty());
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    // Port 1 (tcpmux) is closed on any machine that runs these tests.
    let started = Instant::now();
    let result = RedisStore::connect("redis://127.0.0.1:1", "audience-test-unreachable").await;
    assert!(
        matches!(result, Err(PersistError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an outage must not hang"
    );
    let result = RedisStore::connect("not a url", "p").await;
    assert!(
        matches!(result, Err(PersistError::Unavailable(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_log_is_known_by_its_first_record_and_retains_what_follows_its_trim_mark() {
    let Some(store) = store_or_skip("identity").await else {
        return;
    };
    let p1 = store.append("d", Position::START, b"one").await.unwrap();
    let id = store.log_id("d").await.unwrap();
    assert_eq!(id, p1.to_string());
    let p2 = store.append("d", p1, b"two").await.unwrap();
    let p3 = store.append("d", p2, b"three").await.unwrap();
    assert_eq!(
        store.log_id("d").await.unwrap(),
        id,
        "later appends keep it"
    );
    for position in [p1, p2, p3] {
        assert_eq!(
            store.retains("d", &id, position).await.unwrap(),
            Retention::Retained
        );
    }
    assert_eq!(
        store.retains("d", "another", p2).await.unwrap(),
        Retention::OtherLog
    );

    store.put_snapshot("d", p2, &[]).await.unwrap();
    let names = ["d".to_owned(), "none".to_owned()];
    assert_eq!(
        store.snapshot_positions(&names).await.unwrap(),
        vec![p2, Position::START]
    );
    assert_eq!(
        store.retains("d", &id, p1).await.unwrap(),
        Retention::Trimmed { covers: p2 }
    );
    for position in [p2, p3] {
        assert_eq!(
            store.retains("d", &id, position).await.unwrap(),
            Retention::Retained,
            "at the trim mark and after it"
        );
    }
    // Positions that never held a record: between two records, and beyond the head.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let p4 = store.append("d", p3, b"four").await.unwrap();
    assert!(p4.major > p3.major);
    for never in [next_position(p3), next_position(p4)] {
        assert_eq!(
            store.retains("d", &id, never).await.unwrap(),
            Retention::NotInLog { head: p4 }
        );
    }

    // Dropped and created again: another log, where the old positions mean nothing. Stream
    // ids are milliseconds: without the pause, the new log's first id can equal `p4`.
    store.delete_dataset("d").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = store.append("d", Position::START, b"again").await.unwrap();
    let new_id = store.log_id("d").await.unwrap();
    assert_ne!(new_id, id);
    assert_eq!(
        store.retains("d", &id, p4).await.unwrap(),
        Retention::OtherLog
    );
    assert_eq!(
        store.retains("d", &new_id, p4).await.unwrap(),
        Retention::NotInLog { head: again }
    );

    // A log from before identities gets one, once.
    redis::cmd("DEL")
        .arg(store.ds_key("d", "logid"))
        .exec_async(&mut store.manager.clone())
        .await
        .unwrap();
    let legacy = store.log_id("d").await.unwrap();
    assert!(legacy.starts_with("legacy-"), "{legacy}");
    assert_eq!(store.log_id("d").await.unwrap(), legacy);
    store.delete_all().await.unwrap();
}
