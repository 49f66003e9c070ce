//! Redis mode: several replicas share one log per dataset, kept in Redis, and each applies it in
//! log order, so that all of them converge to the same versions.
//!
//! A write is applied on the replica that took it to a private copy of the dataset at the
//! position it has applied last, then appended only if the dataset's log has not moved on since
//! (a conditional append); otherwise the replica applies the records it missed and tries again.
//! So a record in the log always applied cleanly to the version before it, on every replica,
//! and the writer reads its own write as soon as it is acknowledged. A follower task applies the
//! records other replicas append, within moments.
//!
//! Snapshots go to Redis too, one per dataset; a new replica loads each dataset's newest
//! snapshot and the records after it, then serves. A replica with a local cache (`cache.rs`)
//! starts from its own copy where Redis still holds every record after it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cache::{self, Cache, CacheWrite};
use super::durable::{Backend, Journal, SnapshotReport};
use super::error::{EngineError, Result};
use super::record;
use super::recovery::apply_record;
use super::redis_load::{connect, load, retry, READ_BATCH};
use super::state::DatasetState;
use super::{feed, register, snapshot, Dataset, Engine, RecoveryReport};
use crate::persist::redis::RedisStore;
use crate::persist::{PersistError, Position};

/// A replica this far behind the shared log says so in its log.
const LAG_WARNING_SECS: f64 = 1.0;

/// How the shared store is reached and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedOptions {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Start of every key, so that several deployments can share one Redis.
    pub prefix: String,
    /// Datasets are snapshotted once this many bytes of records are not in a snapshot.
    pub snapshot_log_bytes: u64,
    /// ... or this many records written by this replica.
    pub snapshot_log_records: u64,
    /// The longest a deleted user's bytes stay in the log or a snapshot.
    pub erasure_max_age: Duration,
    /// A local directory caching each dataset's snapshot, so that a restart reads only the
    /// records after it from Redis; unset, every start loads everything from Redis.
    pub cache_dir: Option<PathBuf>,
}

/// How far behind its dataset's log a replica was when it last caught up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lag {
    /// Records other replicas had appended that this one had not applied.
    pub records: u64,
    /// Age of the oldest of them, by the Redis clock that stamped it.
    pub seconds: f64,
}

/// Redis mode's part of the journal.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) store: RedisStore,
    prefix: String,
    /// The local cache, when the replica has a data directory.
    pub(super) cache: Option<Cache>,
    /// Record bytes per dataset that no snapshot holds yet (as far as this replica knows).
    unsnapshotted: Mutex<HashMap<String, u64>>,
    /// The lag found at each dataset's last catch-up.
    lag: Mutex<HashMap<String, Lag>>,
    /// Records and bytes this replica appended since the start.
    appended_records: AtomicU64,
    appended_bytes: AtomicU64,
}

impl Shared {
    /// Appends a record of a version that followed `expected`.
    ///
    /// # Errors
    /// [`PersistError::Conflict`] when the log moved on; `Unavailable` when Redis is down.
    pub(super) async fn append(
        &self,
        dataset: &str,
        expected: Position,
        bytes: Vec<u8>,
    ) -> crate::persist::Result<Position> {
        let position = self.store.append(dataset, expected, &bytes).await?;
        self.count(dataset, bytes.len() as u64);
        self.appended_records.fetch_add(1, Ordering::Relaxed);
        self.appended_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(position)
    }

    fn count(&self, dataset: &str, bytes: u64) {
        if let Ok(mut map) = self.unsnapshotted.lock() {
            *map.entry(dataset.to_owned()).or_default() += bytes;
        }
    }

    /// Records and bytes this replica appended since the start.
    pub(super) fn appended(&self) -> (u64, u64) {
        (
            self.appended_records.load(Ordering::Relaxed),
            self.appended_bytes.load(Ordering::Relaxed),
        )
    }

    /// The most record bytes of one dataset not in a snapshot.
    pub(super) fn unsnapshotted_bytes(&self) -> u64 {
        self.unsnapshotted
            .lock()
            .map_or(0, |map| map.values().copied().max().unwrap_or(0))
    }
}

/// The earlier of two optional times.
fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    pub(super) fn shared(&self) -> Option<&Shared> {
        match &self.journal()?.backend {
            Backend::Shared(shared) => Some(shared),
            Backend::Local { .. } => None,
        }
    }

    /// How far behind the shared log this replica was for `dataset` when it last caught up;
    /// `None` outside Redis mode.
    pub fn replication_lag(&self, dataset: &str) -> Option<Lag> {
        let shared = self.shared()?;
        let lag = shared.lag.lock().ok()?.get(dataset).copied();
        Some(lag.unwrap_or_default())
    }

    /// Joins the replicas sharing `options.url`: loads every dataset (from the local cache and
    /// the records after it where Redis still holds them, else from its newest snapshot in
    /// Redis and the records after that), then applies what other replicas append and logs
    /// every write there. Requests are refused with `loading: N of M` meanwhile; Redis is
    /// retried until it answers.
    ///
    /// # Errors
    /// A cache directory that belongs to the embedded mode or another prefix; a snapshot or
    /// record in Redis that cannot be read; an engine that is durable already.
    pub async fn open_shared(self: &Arc<Self>, options: SharedOptions) -> Result<RecoveryReport> {
        let started = Instant::now();
        let was_loading = self.progress.loading().is_some();
        // Before Redis, so that a wrong directory stops the start even while Redis is down.
        let cache = match &options.cache_dir {
            Some(dir) => Some(Cache::open(dir, &options.prefix)?),
            None => None,
        };
        let store = connect(&options).await;
        let names = retry(|| store.datasets()).await;
        self.progress.begin(names.len() as u64 + 1);
        let mut states = std::collections::BTreeMap::new();
        let mut report = RecoveryReport::default();
        let mut unsnapshotted = HashMap::new();
        let mut oldest_delete = cache.as_ref().and_then(Cache::pending_delete);
        for (index, name) in names.iter().enumerate() {
            let (loaded, from_cache) = cache::load(&store, cache.as_ref(), name).await?;
            report.records += loaded.records;
            report.from_cache += usize::from(from_cache);
            oldest_delete = earliest(oldest_delete, loaded.oldest_delete);
            unsnapshotted.insert(name.clone(), loaded.bytes);
            states.insert(name.clone(), loaded.state);
            self.progress.advance(index as u64 + 1);
        }
        if let Some(cache) = &cache {
            cache.loaded();
        }
        report.datasets = states.len();
        self.install(states)?;
        let has_cache = cache.is_some();
        let shared = Shared {
            store,
            prefix: options.prefix.clone(),
            cache,
            unsnapshotted: Mutex::new(unsnapshotted),
            lag: Mutex::new(HashMap::new()),
            appended_records: AtomicU64::new(0),
            appended_bytes: AtomicU64::new(0),
        };
        let journal = Journal::new(
            Backend::Shared(Box::new(shared)),
            &format!("redis:{}", options.prefix),
            (options.snapshot_log_bytes, options.snapshot_log_records),
            options.erasure_max_age,
        );
        // The erasure clock runs from the oldest delete no snapshot holds, not from the start.
        if let Some(at) = oldest_delete {
            let age = Duration::from_millis(millis_now().saturating_sub(at));
            journal.note_delete_at(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        }
        if self.journal.set(Arc::new(journal)).is_err() {
            return Err(EngineError::Internal(
                "the engine is durable already".into(),
            ));
        }
        tokio::spawn(follow(Arc::downgrade(self)));
        tokio::spawn(super::durable::snapshot_when_due(Arc::downgrade(self)));
        if has_cache {
            tokio::spawn(cache::refresh_when_stale(Arc::downgrade(self)));
        }
        if !was_loading {
            self.progress.finish();
        }
        tracing::info!(
            datasets = report.datasets,
            from_cache = report.from_cache,
            records = report.records,
            seconds = started.elapsed().as_secs_f64(),
            "joined the replicas"
        );
        Ok(report)
    }

    /// Applies the records other replicas appended after the dataset's published version and
    /// publishes the result; the caller holds the dataset's writer lock.
    ///
    /// # Errors
    /// Redis unreachable; a log that is not Redis (no other writer can exist there).
    pub(super) async fn catch_up(&self, name: &str, handle: &Dataset) -> Result<()> {
        let shared = self.shared().ok_or_else(|| {
            EngineError::Internal("the log moved on under a single writer".into())
        })?;
        let bounds = feed::FeedBounds::from(&self.limits);
        let mut lag: Option<Lag> = None;
        loop {
            let current = handle.current();
            let batch = match shared
                .store
                .read_after(name, current.log_position, READ_BATCH)
                .await
            {
                Ok(batch) => batch,
                Err(PersistError::Conflict) => {
                    // The records after this version were trimmed behind a newer snapshot.
                    tracing::info!(dataset = name, "fell behind a snapshot; reloading from it");
                    let state = load(&shared.store, name).await?.state;
                    let log = state.log_position;
                    handle.publish(state, bounds);
                    handle.feed.anchor(log);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let Some(first) = batch.first() else {
                break;
            };
            let found = lag.get_or_insert(Lag {
                records: 0,
                seconds: millis_now().saturating_sub(first.0.major) as f64 / 1000.0,
            });
            found.records += batch.len() as u64;
            let bytes: u64 = batch.iter().map(|(_, b)| b.len() as u64).sum();
            let mut state = DatasetState::clone(&current);
            let dataset = name.to_owned();
            // One version per record, so that watchers see each record's entries under its key.
            let (versions, deleted) = tokio::task::spawn_blocking(move || {
                let mut versions = Vec::with_capacity(batch.len());
                let mut deleted = false;
                for (position, bytes) in batch {
                    deleted |= apply_shared(&mut state, &dataset, position, &bytes);
                    versions.push(state.clone());
                    state.clear_transitions();
                }
                (versions, deleted)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("replication task failed: {e}")))?;
            shared.count(name, bytes);
            // Any replica's snapshot erases the deleted users: each keeps the clock.
            if let (true, Some(journal)) = (deleted, self.journal()) {
                journal.note_delete();
            }
            for version in versions {
                handle.publish(version, bounds);
            }
        }
        if let Some(found) = lag {
            if found.seconds >= LAG_WARNING_SECS {
                tracing::warn!(
                    dataset = name,
                    records = found.records,
                    seconds = found.seconds,
                    "this replica was behind the shared log"
                );
            }
            if let Ok(mut map) = shared.lag.lock() {
                map.insert(name.to_owned(), found);
            }
        }
        Ok(())
    }

    /// One round of the follower: every dataset in Redis brought up to its log's head.
    async fn follow_once(&self) -> Result<()> {
        let shared = self
            .shared()
            .ok_or_else(|| EngineError::Internal("follower without Redis".into()))?;
        for name in shared.store.datasets().await? {
            let (handle, pending) = self.dataset_or_new(&name)?;
            if let Some(pending) = &pending {
                match register(&self.datasets, pending, &handle) {
                    Ok(()) => {}
                    // A local write created it meanwhile: the next round catches it up.
                    Err(EngineError::ConcurrentCreate(_)) => continue,
                    Err(other) => return Err(other),
                }
            }
            // A dataset busy with a long import is caught up next round (the import's commit
            // catches it up itself if the log moved): the others must not wait for it.
            let Ok(_writer) = handle.writer.try_lock() else {
                continue;
            };
            self.catch_up(&name, &handle).await?;
        }
        Ok(())
    }

    /// Snapshots datasets into Redis (each then trims its log behind the snapshot), and into
    /// the local cache from the same files.
    pub(super) async fn snapshot_shared(
        &self,
        journal: &Journal,
        shared: &Shared,
        only: Option<&str>,
        progress: impl Fn(usize, usize, &str) + Send + 'static,
        started: Instant,
    ) -> Result<SnapshotReport> {
        let names = match only {
            Some(name) => vec![name.to_owned()],
            None => self.dataset_names(),
        };
        let covered_deletes = only
            .is_none()
            .then(|| journal.take_oldest_delete())
            .flatten();
        let covered_records = match only {
            None => self.take_unsnapshotted_records(journal),
            Some(_) => 0,
        };
        let _caching = match &shared.cache {
            Some(cache) => Some(cache.lock().await),
            None => None,
        };
        let mut local = match &shared.cache {
            Some(cache) => cache.begin(self.now()),
            None => None,
        };
        let mut bytes = 0;
        let mut freed = 0;
        for (index, name) in names.iter().enumerate() {
            let written = self.snapshot_one(shared, name, &mut local).await;
            match written {
                Ok((written, unsnapshotted)) => {
                    bytes += written;
                    freed += unsnapshotted;
                }
                Err(error) => {
                    journal.restore_oldest_delete(covered_deletes);
                    self.restore_unsnapshotted_records(journal, covered_records);
                    if let (Some(cache), Some(local)) = (&shared.cache, local) {
                        cache.abandon(local).await;
                    }
                    return Err(error);
                }
            }
            progress(index + 1, names.len(), name);
        }
        if let (Some(cache), Some(local)) = (&shared.cache, local) {
            let others = match only {
                Some(name) => self
                    .dataset_names()
                    .into_iter()
                    .filter(|other| other != name)
                    .collect(),
                None => Vec::new(),
            };
            let pending = journal.oldest_delete_at(self.now());
            cache.finish(local, others, pending).await;
        }
        self.snapshot_written(journal);
        let report = SnapshotReport {
            path: format!("redis:{}", shared.prefix).into(),
            datasets: names.len(),
            bytes,
            log_bytes_freed: freed,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.count_snapshot(report.bytes, report.seconds);
        tracing::info!(
            datasets = report.datasets,
            bytes,
            seconds = report.seconds,
            "snapshot written to Redis"
        );
        Ok(report)
    }

    /// One dataset's snapshot, also added to `local` (the cache being written); returns its
    /// bytes and the record bytes it covers.
    async fn snapshot_one(
        &self,
        shared: &Shared,
        name: &str,
        local: &mut Option<CacheWrite>,
    ) -> Result<(u64, u64)> {
        let handle = self.dataset(name)?;
        let state = {
            let _writer = handle.writer.lock().await;
            handle.current()
        };
        if state.log_position == Position::START {
            return Ok((0, 0));
        }
        let log_id = match (&shared.cache, &local) {
            (Some(cache), Some(_)) => Some(cache.log_id(&shared.store, name).await?),
            _ => None,
        };
        let unsnapshotted = shared
            .unsnapshotted
            .lock()
            .map_or(0, |mut map| map.remove(name).unwrap_or(0));
        let position = state.log_position;
        let mut caching = local.take();
        let dataset = name.to_owned();
        let (files, caching) = tokio::task::spawn_blocking(move || {
            let files = snapshot::to_files(&state)?;
            if let (Some(write), Some(log_id)) = (caching.as_mut(), &log_id) {
                write.add(&dataset, position, log_id, &files);
            }
            Ok::<_, String>((files, caching))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("snapshot task failed: {e}")))?
        .map_err(|e| EngineError::Internal(format!("snapshot of dataset '{name}': {e}")))?;
        *local = caching;
        let bytes = files.iter().map(|(_, b)| b.len() as u64).sum();
        if let Err(error) = shared.store.put_snapshot(name, position, &files).await {
            shared.count(name, unsnapshotted);
            return Err(error.into());
        }
        Ok((bytes, unsnapshotted))
    }
}

/// Applies one record appended by any replica; returns whether it deleted users. A record that
/// does not apply (impossible unless replicas run different code) is skipped loudly rather than
/// stopping replication.
pub(super) fn apply_shared(
    state: &mut DatasetState,
    dataset: &str,
    position: Position,
    bytes: &[u8],
) -> bool {
    let applied = record::decode(bytes)
        .map_err(EngineError::Internal)
        .and_then(|record| {
            let mut next = state.clone();
            apply_record(&mut next, &record)?;
            *state = next;
            Ok(record.body.deletes_users())
        });
    state.log_position = position;
    applied.unwrap_or_else(|error| {
        tracing::error!(dataset, %position, %error, "a record of the shared log does not apply here; skipped");
        false
    })
}

/// Applies what other replicas append, for as long as the engine lives; while Redis is down it
/// retries with backoff (queries go on from memory, writes fail) and catches up when it is back.
async fn follow(engine: Weak<Engine>) {
    let mut backoff = Duration::from_millis(100);
    let mut down = false;
    loop {
        let Some((store, positions)) = engine.upgrade().and_then(|engine| {
            let store = engine.shared()?.store.clone();
            let positions = engine
                .dataset_names()
                .into_iter()
                .filter_map(|name| {
                    let position = engine.snapshot(&name).ok()?.log_position;
                    Some((name, position))
                })
                .collect::<Vec<_>>();
            Some((store, positions))
        }) else {
            return;
        };
        let waited = store.wait(&positions, Duration::from_secs(1)).await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let result = match waited {
            Ok(_) => engine.follow_once().await,
            Err(error) => Err(error.into()),
        };
        match result {
            Ok(()) => {
                if down {
                    tracing::info!("Redis answers again; caught up");
                }
                down = false;
                backoff = Duration::from_millis(100);
            }
            Err(error) => {
                if !down {
                    tracing::warn!(
                        %error,
                        "cannot follow the shared log; queries go on from memory, writes fail \
                         until Redis answers"
                    );
                }
                down = true;
                drop(engine);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
