//! Redis mode with a local cache (`--redis-url` and `--data-dir`), with real server processes
//! sharing one Redis: a restarted replica starts from its own copy of each dataset and reads
//! only the records after it from Redis; a stale, damaged or foreign cache is never trusted, and
//! a data directory of one mode is refused by the other.
//!
//! Needs Redis as `replicas.rs` does (skipped without it unless `AUDIENCE_REQUIRE_REDIS=1`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use audience::grpc::pb;
use audience::persist::redis::RedisStore;

use crate::durability::temp_dir;
use crate::process::Process;
use crate::replicas::{
    clean, converged, create_us_segment, delete, eventually, members, record_view, redis_or_skip,
    replica, start, unique_prefix, upsert, view,
};

const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Replica arguments: JSON logs (the tests read the start report), and no time refresh, whose
/// records would make the counts of records read depend on timing.
fn replica_args(url: &str, prefix: &str) -> Vec<String> {
    let mut args = replica(url, prefix);
    args.extend(["--log-format", "json", "--segment-refresh-secs", "3600"].map(String::from));
    args
}

/// A replica with `dir` as its cache.
fn cached_args(url: &str, prefix: &str, dir: &Path) -> Vec<String> {
    let mut args = replica_args(url, prefix);
    args.extend(["--data-dir".to_owned(), dir.display().to_string()]);
    args
}

/// Every JSON log line's `fields`.
fn log_fields(server: &Process) -> Vec<serde_json::Value> {
    server
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|mut line| line["fields"].take())
        .collect()
}

/// The start report: datasets loaded from the cache, and records read from Redis.
fn start_report(server: &Process) -> (u64, u64) {
    let report = log_fields(server)
        .into_iter()
        .find(|fields| fields["message"] == "joined the replicas");
    let Some(report) = report else {
        panic!("no start report; log:\n{}", server.log_text());
    };
    let number = |name: &str| {
        report[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in the start report {report}"))
    };
    (number("from_cache"), number("records"))
}

/// Why the start loaded `dataset` from Redis instead of the cache, and whether it warned.
fn fallback(server: &Process, dataset: &str) -> Option<(String, bool)> {
    let text = server.log_text();
    text.lines().find_map(|line| {
        let line: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &line["fields"];
        let message = fields["message"].as_str()?;
        if fields["dataset"] != dataset || !message.contains("loading") {
            return None;
        }
        let why = fields["why"].as_str()?.to_owned();
        Some((why, line["level"] == "WARN"))
    })
}

/// Restarts a killed replica on the same arguments and waits until it serves.
async fn restart(server: &mut Process) {
    server.restart();
    server.wait_serving(START_TIMEOUT).await;
}

/// Waits until the replica's log says it wrote its cache.
async fn cache_written(server: &Process) {
    let written = eventually(Duration::from_secs(30), || async {
        log_fields(server)
            .iter()
            .any(|fields| fields["message"] == "local cache written")
    })
    .await;
    assert!(
        written,
        "the cache was not written; log:\n{}",
        server.log_text()
    );
}

/// The one snapshot directory of a cache.
fn cache_snapshot(dir: &Path) -> PathBuf {
    let snapshots: Vec<PathBuf> = std::fs::read_dir(dir.join("snapshots"))
        .expect("the cache has snapshots")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.join("MANIFEST.json").is_file())
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    snapshots[0].clone()
}

/// Writes users `from..to` on `server`, every third also viewing; returns the records written.
async fn write_users(server: &Process, from: usize, to: usize) -> u64 {
    let mut records = 0;
    for i in from..to {
        let country = ["US", "GB", "FR"][i % 3];
        upsert(server, &format!("user-{i}"), country, "a")
            .await
            .expect("upsert");
        records += 1;
        if i % 3 == 0 {
            record_view(server, &format!("user-{i}"))
                .await
                .expect("event");
            records += 1;
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_starts_from_its_cache_and_reads_only_the_records_after_it() {
    let Some(url) = redis_or_skip("cache restart") else {
        return;
    };
    let prefix = unique_prefix("cache-restart");
    let dir = temp_dir("cache-restart");
    let mut a = start(&cached_args(&url, &prefix, &dir)).await;
    let b = start(&replica_args(&url, &prefix)).await;
    write_users(&a, 0, 30).await;
    create_us_segment(&b).await;
    converged(&[&a, &b], Duration::from_secs(10)).await;
    a.snapshot().await;

    let mut after = write_users(&b, 30, 40).await;
    a.kill();
    after += write_users(&b, 40, 50).await;
    delete(&b, "user-3").await.expect("delete");
    after += 1;

    restart(&mut a).await;
    assert_eq!(
        start_report(&a),
        (1, after),
        "the dataset came from the cache, and only the records after it from Redis"
    );
    assert_eq!(
        view(&a).await,
        view(&b).await,
        "the restarted replica caught up"
    );
    let us = members(&a, r#"country = "US""#).await.expect("members");
    assert!(us.contains(&"user-48".to_owned()) && !us.contains(&"user-3".to_owned()));
    // Writes go on from where the cache left off.
    upsert(&a, "after-restart", "US", "a")
        .await
        .expect("upsert");
    converged(&[&a, &b], Duration::from_secs(10)).await;
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_made_stale_by_a_newer_snapshot_falls_back_to_redis_and_is_rewritten() {
    let Some(url) = redis_or_skip("stale cache") else {
        return;
    };
    let prefix = unique_prefix("cache-stale");
    let dir = temp_dir("cache-stale");
    let mut a = start(&cached_args(&url, &prefix, &dir)).await;
    let b = start(&replica_args(&url, &prefix)).await;
    write_users(&a, 0, 20).await;
    create_us_segment(&a).await;
    a.snapshot().await;
    a.kill();
    write_users(&b, 20, 30).await;
    // B's snapshot trims the records after A's cached version from the stream.
    b.snapshot().await;
    delete(&b, "user-0").await.expect("delete");

    restart(&mut a).await;
    assert_eq!(start_report(&a), (0, 1), "Redis snapshot, then one record");
    let (why, _) = fallback(&a, "default").expect("the fallback is logged");
    assert!(why.contains("stale: a newer snapshot in Redis"), "{why}");
    assert_eq!(view(&a).await, view(&b).await);

    // Rewritten in the background, the cache serves the next restart again.
    cache_written(&a).await;
    restart(&mut a).await;
    assert_eq!(start_report(&a), (1, 0));
    assert_eq!(view(&a).await, view(&b).await);
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_is_a_warning_and_the_dataset_loads_from_redis() {
    let Some(url) = redis_or_skip("damaged cache") else {
        return;
    };
    let prefix = unique_prefix("cache-damaged");
    let dir = temp_dir("cache-damaged");
    let mut a = start(&cached_args(&url, &prefix, &dir)).await;
    let b = start(&replica_args(&url, &prefix)).await;
    write_users(&a, 0, 20).await;
    a.snapshot().await;
    a.kill();

    let keys = cache_snapshot(&dir).join("default").join("keys.arrow");
    let mut bytes = std::fs::read(&keys).expect("read keys.arrow");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&keys, &bytes).expect("damage keys.arrow");
    restart(&mut a).await;
    assert_eq!(start_report(&a).0, 0);
    let (why, warned) = fallback(&a, "default").expect("the fallback is logged");
    assert!(
        warned && why.contains("damaged") && why.contains("keys.arrow"),
        "{why}"
    );
    assert_eq!(view(&a).await, view(&b).await);

    // An unreadable manifest: every dataset from Redis, with a warning.
    cache_written(&a).await;
    a.kill();
    let manifest = cache_snapshot(&dir).join("MANIFEST.json");
    std::fs::write(&manifest, b"{ not json").expect("damage the manifest");
    restart(&mut a).await;
    assert_eq!(start_report(&a).0, 0);
    let warned = log_fields(&a).iter().any(|fields| {
        fields["message"]
            .as_str()
            .is_some_and(|m| m.contains("the local cache cannot be read"))
    });
    assert!(warned, "{}", a.log_text());
    assert_eq!(view(&a).await, view(&b).await);
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn upsert_into(server: &Process, dataset: &str, user: &str) {
    let request = pb::UpsertUsersRequest {
        dataset: dataset.into(),
        users: vec![pb::UserUpdate {
            user_id: user.into(),
            updates: Vec::new(),
        }],
    };
    server
        .ingest()
        .upsert_users(request)
        .await
        .expect("upsert into a dataset");
}

async fn datasets(server: &Process) -> Vec<String> {
    let mut names = server
        .schema()
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .expect("list datasets")
        .into_inner()
        .datasets;
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_dropped_or_created_again_in_redis_are_never_taken_from_the_cache() {
    let Some(url) = redis_or_skip("cache of dropped datasets") else {
        return;
    };
    let prefix = unique_prefix("cache-dropped");
    let dir = temp_dir("cache-dropped");
    let mut a = start(&cached_args(&url, &prefix, &dir)).await;
    write_users(&a, 0, 20).await;
    upsert_into(&a, "gone", "someone").await;
    a.snapshot().await;
    a.kill();

    let store = RedisStore::connect(&url, &prefix).await.expect("Redis");
    for dataset in ["default", "gone"] {
        store.delete_dataset(dataset).await.expect("drop a dataset");
    }
    // Created again: a new log, whose positions the cached ones are not.
    let b = start(&replica_args(&url, &prefix)).await;
    upsert(&b, "new-user", "US", "b").await.expect("upsert");

    restart(&mut a).await;
    assert_eq!(start_report(&a), (0, 1));
    let (why, _) = fallback(&a, "default").expect("the fallback is logged");
    assert!(why.contains("another one"), "{why}");
    assert_eq!(
        members(&a, r#"country = "US""#).await.expect("members"),
        ["new-user"]
    );
    assert_eq!(view(&a).await, view(&b).await);
    assert!(!datasets(&a).await.contains(&"gone".to_owned()));
    assert_eq!(datasets(&a).await, datasets(&b).await);
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a server that must refuse to start, and returns its log.
async fn refused(args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Process::start(&args);
    let status = server.wait_exit(START_TIMEOUT).await;
    assert!(!status.success(), "the start was not refused");
    server.log_text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_one_mode_or_prefix_is_refused_by_the_other() {
    let Some(url) = redis_or_skip("cache refusals") else {
        return;
    };
    let prefix = unique_prefix("cache-refused");
    let embedded = temp_dir("cache-refused-embedded");
    let server = start(&["--data-dir".to_owned(), embedded.display().to_string()]).await;
    upsert(&server, "u", "US", "e").await.expect("upsert");
    server.kill();
    let log = refused(&cached_args(&url, &prefix, &embedded)).await;
    assert!(
        log.contains("embedded-mode data directory"),
        "an embedded directory as a cache: {log}"
    );

    let cache = temp_dir("cache-refused-cache");
    let server = start(&cached_args(&url, &prefix, &cache)).await;
    upsert(&server, "u", "US", "r").await.expect("upsert");
    server.kill();
    let log = refused(&["--data-dir".to_owned(), cache.display().to_string()]).await;
    assert!(
        log.contains(&format!("the local cache of Redis prefix '{prefix}'")),
        "a cache as an embedded directory: {log}"
    );
    let log = refused(&cached_args(&url, "another-prefix", &cache)).await;
    assert!(
        log.contains(&format!("'{prefix}', not of 'another-prefix'")),
        "a cache of another prefix: {log}"
    );
    // Both still start in their own mode.
    let again = start(&cached_args(&url, &prefix, &cache)).await;
    assert_eq!(
        members(&again, r#"country = "US""#).await.expect("members"),
        ["u"]
    );
    drop(again);
    let again = start(&["--data-dir".to_owned(), embedded.display().to_string()]).await;
    assert_eq!(
        members(&again, r#"country = "US""#).await.expect("members"),
        ["u"]
    );
    drop(again);
    clean(&url, &prefix).await;
    for dir in [embedded, cache] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Every key under `prefix` with its `DUMP`, as a Redis backup holds them.
async fn backup(url: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let client = redis::Client::open(url).expect("Redis URL");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg(&["MATCH", &format!("{prefix}:*"), "COUNT", "500"])
            .query_async(&mut con)
            .await
            .expect("SCAN");
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut dumped = Vec::with_capacity(keys.len());
    for key in keys {
        let bytes: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("DUMP");
        dumped.push((key, bytes));
    }
    dumped
}

/// Replaces every key under `prefix` with a backup.
async fn restore(url: &str, prefix: &str, backup: &[(String, Vec<u8>)]) {
    clean(url, prefix).await;
    let client = redis::Client::open(url).expect("Redis URL");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    for (key, bytes) in backup {
        redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(bytes.as_slice())
            .arg("REPLACE")
            .exec_async(&mut con)
            .await
            .expect("RESTORE");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_ahead_of_a_redis_restored_from_an_older_copy_is_not_trusted() {
    let Some(url) = redis_or_skip("cache ahead of a restored Redis") else {
        return;
    };
    let prefix = unique_prefix("cache-restored");
    let dir = temp_dir("cache-restored");
    let mut a = start(&cached_args(&url, &prefix, &dir)).await;
    write_users(&a, 0, 10).await;
    let older = backup(&url, &prefix).await;
    write_users(&a, 10, 20).await;
    a.snapshot().await;
    a.kill();

    // The same log, as it was before the cached version: later records differ from the lost ones.
    restore(&url, &prefix, &older).await;
    let b = start(&replica_args(&url, &prefix)).await;
    upsert(&b, "new-user", "US", "b").await.expect("upsert");

    restart(&mut a).await;
    assert_eq!(start_report(&a).0, 0);
    let (why, _) = fallback(&a, "default").expect("the fallback is logged");
    assert!(why.contains("no record at its position"), "{why}");
    assert_eq!(view(&a).await, view(&b).await);
    let us = members(&a, r#"country = "US""#).await.expect("members");
    assert!(us.contains(&"new-user".to_owned()) && !us.contains(&"user-12".to_owned()));
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether any file under `dir` holds `needle`.
fn holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return holds(&path, needle);
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        bytes.windows(needle.len()).any(|window| window == needle)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_bytes_leave_the_cache_within_the_erasure_bound() {
    let Some(url) = redis_or_skip("cache erasure") else {
        return;
    };
    let prefix = unique_prefix("cache-erasure");
    let dir = temp_dir("cache-erasure");
    let mut args = cached_args(&url, &prefix, &dir);
    args.extend(["--erasure-max-age-secs", "2"].map(String::from));
    let a = start(&args).await;
    let secret = b"erase-me-4f1c9";
    upsert(&a, "erase-me-4f1c9", "US", "a")
        .await
        .expect("upsert");
    upsert(&a, "kept", "US", "a").await.expect("upsert");
    a.snapshot().await;
    assert!(
        holds(&dir, secret),
        "the cache holds the user before the delete"
    );
    delete(&a, "erase-me-4f1c9").await.expect("delete");
    let erased = eventually(Duration::from_secs(20), || async { !holds(&dir, secret) }).await;
    assert!(erased, "the deleted user's bytes are still in the cache");
    assert!(holds(&dir, b"kept"), "the cache was rewritten, not dropped");
    clean(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}
