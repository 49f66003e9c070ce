//! Redis mode's local cache: a data directory holding each dataset's version at a position of
//! its Redis log, so that a restart reads only the records after it from Redis.
//!
//! Redis stays the only source of truth. The cache is a snapshot directory of the embedded
//! format (`persist::snapshot`), each dataset with its position and the identity of the log it
//! is in, in a directory marked as the cache of one Redis prefix (`persist::cache`). A start
//! uses a dataset's cached version only while Redis holds every record after it in the same log;
//! otherwise (no cache, a stale or damaged one, a dataset dropped or created again) the dataset
//! loads from Redis as it would without a cache, and the cache is rewritten soon after.
//!
//! The cache is written from published versions, so no reader or writer waits for it: with
//! every snapshot this replica writes to Redis (from the same files), and in the background when
//! it holds a dataset not yet cached or a snapshot of another replica has made its copy stale.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::error::{EngineError, Result};
use super::recovery;
use super::redis_load::{self, load_tail, retry_load, Loaded};
use super::state::DatasetState;
use super::{snapshot, Engine};
use crate::persist::redis::{RedisStore, Retention};
use crate::persist::snapshot::{self as snapshot_dir, Found, SnapshotWriter};
use crate::persist::{DirLock, PersistError, Position};
use crate::time::Millis;

/// How often the cache is compared with the snapshots in Redis.
const STALE_CHECK: Duration = Duration::from_secs(5);

/// A cache that could not be written (a full disk) is not tried again before this.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// A dataset's version in the cache on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    position: Position,
    log_id: String,
}

/// The local cache of a replica.
#[derive(Debug)]
pub(crate) struct Cache {
    /// `DIR/snapshots`.
    root: PathBuf,
    _lock: DirLock,
    /// The cache as the start found it.
    at_start: Option<Arc<Found>>,
    /// The datasets of the cache on disk that a start may use.
    entries: Mutex<HashMap<String, Entry>>,
    /// The identity of the log each dataset's version in memory is in.
    log_ids: Mutex<HashMap<String, String>>,
    /// The cache on disk holds versions no start may use (stale, damaged, of datasets gone from
    /// Redis): rewrite it whole, so that it holds no bytes of users deleted since.
    dirty: AtomicBool,
    /// One write of the cache at a time.
    writing: tokio::sync::Mutex<()>,
    failed_at: Mutex<Option<Instant>>,
}

/// Why a dataset's cached version was not used.
enum Unused {
    Absent,
    Stale(Retention),
    Damaged(EngineError),
    /// A snapshot in Redis trimmed the records after it while the cache was read.
    TrimmedMeanwhile,
}

impl std::fmt::Display for Unused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unused::Absent => write!(f, "not in the local cache"),
            Unused::Stale(retention) => write!(f, "{retention}"),
            Unused::Damaged(error) => write!(f, "damaged: {error}"),
            Unused::TrimmedMeanwhile => write!(
                f,
                "stale: a snapshot in Redis trimmed the records after it while it was read"
            ),
        }
    }
}

impl Cache {
    /// Takes `dir` (locked, and marked as the cache of `prefix`) and reads its manifest; an
    /// unreadable one is a warning, and every dataset then loads from Redis.
    ///
    /// # Errors
    /// The directory is held by another server, is an embedded-mode data directory or the
    /// cache of another prefix.
    pub(super) fn open(dir: &Path, prefix: &str) -> Result<Cache> {
        let lock = DirLock::acquire(dir)?;
        crate::persist::cache::claim(dir, prefix)?;
        let root = snapshot_dir::root_of(dir);
        let (at_start, dirty) = match snapshot_dir::latest(&root) {
            Ok(found) => (found.map(Arc::new), false),
            Err(error) => {
                tracing::warn!(%error, "the local cache cannot be read; every dataset loads from Redis");
                (None, true)
            }
        };
        Ok(Cache {
            root,
            _lock: lock,
            at_start,
            entries: Mutex::new(HashMap::new()),
            log_ids: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(dirty),
            writing: tokio::sync::Mutex::new(()),
            failed_at: Mutex::new(None),
        })
    }

    /// When the oldest delete no snapshot in Redis held was applied, as the cache recorded it
    /// (Unix milliseconds).
    pub(super) fn pending_delete(&self) -> Option<u64> {
        let at = self.at_start.as_ref()?.manifest.pending_delete_ms?;
        Some(u64::try_from(at).unwrap_or(0))
    }

    /// Ends the start: a cache holding anything the start did not use is rewritten whole.
    pub(super) fn loaded(&self) {
        let Ok(entries) = self.entries.lock() else {
            return;
        };
        let unused = self.at_start.as_ref().is_some_and(|found| {
            let datasets = &found.manifest.datasets;
            datasets.iter().any(|d| !entries.contains_key(&d.name))
        });
        if unused {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Serializes writes of the cache.
    pub(super) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writing.lock().await
    }

    /// The identity of the log `dataset`'s version in memory is in: as loaded, or asked now.
    ///
    /// # Errors
    /// Redis unreachable.
    pub(super) async fn log_id(&self, store: &RedisStore, dataset: &str) -> Result<String> {
        if let Some(id) = self
            .log_ids
            .lock()
            .ok()
            .and_then(|m| m.get(dataset).cloned())
        {
            return Ok(id);
        }
        let id = store.log_id(dataset).await?;
        if let Ok(mut ids) = self.log_ids.lock() {
            ids.insert(dataset.to_owned(), id.clone());
        }
        Ok(id)
    }

    /// `dataset` from the cache and the records after it in Redis, if Redis still holds them
    /// in the log `log_id`.
    async fn try_load(
        &self,
        store: &RedisStore,
        name: &str,
        log_id: &str,
    ) -> Result<std::result::Result<Loaded, Unused>> {
        let Some(found) = &self.at_start else {
            return Ok(Err(Unused::Absent));
        };
        let Some(entry) = found.manifest.datasets.iter().find(|d| d.name == name) else {
            return Ok(Err(Unused::Absent));
        };
        if entry.log_id.as_deref() != Some(log_id) {
            return Ok(Err(Unused::Stale(Retention::OtherLog)));
        }
        let position = entry.position;
        match store.retains(name, log_id, position).await? {
            Retention::Retained => {}
            other => return Ok(Err(Unused::Stale(other))),
        }
        let (found, entry) = (found.clone(), entry.clone());
        let read = tokio::task::spawn_blocking(move || recovery::load_dataset(&found, &entry))
            .await
            .map_err(|e| EngineError::Internal(format!("reading the local cache failed: {e}")));
        let mut state = match read.and_then(|read| read) {
            Ok(state) => state,
            Err(error) => return Ok(Err(Unused::Damaged(error))),
        };
        state.log_position = position;
        let Some(loaded) = load_tail(store, name, state).await? else {
            return Ok(Err(Unused::TrimmedMeanwhile));
        };
        if let Ok(mut entries) = self.entries.lock() {
            let log_id = log_id.to_owned();
            entries.insert(name.to_owned(), Entry { position, log_id });
        }
        Ok(Ok(loaded))
    }

    fn recently_failed(&self) -> bool {
        let failed_at = self.failed_at.lock().ok().and_then(|f| *f);
        failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE)
    }

    /// Starts a write of the cache (the caller holds [`Self::lock`]); `None` for a minute after
    /// a write failed.
    pub(super) fn begin(&self, created_at: Millis) -> Option<CacheWrite> {
        if self.recently_failed() {
            return None;
        }
        // A damaged previous cache is not carried from: its datasets are written afresh.
        let previous = snapshot_dir::latest(&self.root).ok().flatten();
        match SnapshotWriter::begin(&self.root, 0, created_at) {
            Ok(writer) => Some(CacheWrite {
                writer,
                root: self.root.clone(),
                previous,
                written: HashMap::new(),
                failed: None,
                fresh: 0,
            }),
            Err(error) => {
                let cleared = snapshot_dir::remove_all(&self.root).is_ok();
                self.finished(Written::Failed { error, cleared });
                None
            }
        }
    }

    /// Completes a write: `carry` (datasets not written in it) are carried over from the cache
    /// on disk where they are usable, then the cache is published.
    pub(super) async fn finish(
        &self,
        write: CacheWrite,
        carry: Vec<String>,
        pending: Option<Millis>,
    ) {
        let carried: Vec<(String, Entry)> = match self.entries.lock() {
            Ok(entries) => carry
                .into_iter()
                .filter_map(|name| {
                    let entry = entries.get(&name)?.clone();
                    Some((name, entry))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let written = tokio::task::spawn_blocking(move || write.finish(carried, pending)).await;
        match written {
            Ok(written) => self.finished(written),
            Err(error) => tracing::error!(%error, "the local cache write failed"),
        }
    }

    /// Gives a write up (a snapshot to Redis failed): the cache on disk stays as it was.
    pub(super) async fn abandon(&self, write: CacheWrite) {
        let abandoned = tokio::task::spawn_blocking(move || write.writer.abandon()).await;
        if let Ok(Err(error)) = abandoned {
            tracing::warn!(%error, "cannot delete an unfinished write of the local cache");
        }
    }

    fn finished(&self, written: Written) {
        match written {
            Written::Done { entries, fresh } => {
                tracing::info!(
                    datasets = entries.len(),
                    written = fresh,
                    "local cache written"
                );
                if let Ok(mut current) = self.entries.lock() {
                    *current = entries;
                }
                self.dirty.store(false, Ordering::Relaxed);
            }
            Written::Failed { error, cleared } => {
                tracing::error!(
                    %error,
                    cleared,
                    "cannot write the local cache; it is deleted, and restarts load from Redis \
                     until it is written again"
                );
                if let Ok(mut current) = self.entries.lock() {
                    current.clear();
                }
                self.dirty.store(!cleared, Ordering::Relaxed);
                if let Ok(mut failed_at) = self.failed_at.lock() {
                    *failed_at = Some(Instant::now());
                }
            }
        }
    }

    /// Which datasets to write afresh (a new dataset, a stale copy, or all of them when the
    /// cache is dirty) and which to carry over.
    fn plan(
        &self,
        versions: Vec<(String, Arc<DatasetState>)>,
        covers: &[Position],
    ) -> (Vec<(String, Arc<DatasetState>)>, Vec<String>) {
        let dirty = self.dirty.load(Ordering::Relaxed);
        let Ok(entries) = self.entries.lock() else {
            return (Vec::new(), Vec::new());
        };
        let (mut fresh, mut carry) = (Vec::new(), Vec::new());
        for ((name, state), &covers) in versions.into_iter().zip(covers) {
            let cached = entries.get(&name);
            if dirty {
                fresh.push((name, state));
            } else if cached.is_some_and(|entry| entry.position >= covers) {
                carry.push(name);
            } else if state.log_position < covers {
                // Behind the snapshot in Redis: the follower brings it up first.
                if cached.is_some() {
                    carry.push(name);
                }
            } else {
                fresh.push((name, state));
            }
        }
        (fresh, carry)
    }
}

/// The outcome of a write of the cache.
enum Written {
    Done {
        entries: HashMap<String, Entry>,
        fresh: usize,
    },
    Failed {
        error: PersistError,
        cleared: bool,
    },
}

/// A write of the cache under way: datasets added from their versions, the others carried over.
#[derive(Debug)]
pub(crate) struct CacheWrite {
    writer: SnapshotWriter,
    root: PathBuf,
    /// The cache on disk, to carry datasets from.
    previous: Option<Found>,
    written: HashMap<String, Entry>,
    /// The first failure; later steps are skipped and the write ends in [`Written::Failed`].
    failed: Option<PersistError>,
    /// Datasets written from their versions.
    fresh: usize,
}

impl CacheWrite {
    /// Writes one dataset's files (blocking).
    pub(super) fn add(
        &mut self,
        name: &str,
        position: Position,
        log_id: &str,
        files: &[(String, Vec<u8>)],
    ) {
        if self.failed.is_some() {
            return;
        }
        match self
            .writer
            .add_logged_dataset(name, position, log_id, files)
        {
            Ok(()) => {
                let log_id = log_id.to_owned();
                self.written
                    .insert(name.to_owned(), Entry { position, log_id });
                self.fresh += 1;
            }
            Err(error) => self.failed = Some(error),
        }
    }

    fn fail(&mut self, error: PersistError) {
        self.failed.get_or_insert(error);
    }

    /// Carries the datasets over, publishes the cache, and deletes the previous one; on any
    /// failure deletes the whole cache instead (blocking).
    fn finish(mut self, carry: Vec<(String, Entry)>, pending: Option<Millis>) -> Written {
        for (name, entry) in carry {
            let Some(previous) = &self.previous else {
                break;
            };
            let on_disk = previous.manifest.datasets.iter().find(|d| {
                d.name == name
                    && d.position == entry.position
                    && d.log_id.as_deref() == Some(entry.log_id.as_str())
            });
            let Some(on_disk) = on_disk else {
                continue;
            };
            if self.failed.is_some() {
                break;
            }
            match self.writer.carry_dataset(previous, on_disk) {
                Ok(()) => {
                    self.written.insert(name, entry);
                }
                Err(error) => self.failed = Some(error),
            }
        }
        self.writer.set_pending_delete(pending);
        let error = match self.failed {
            None => match self.writer.finish() {
                Ok(_) => {
                    return Written::Done {
                        entries: self.written,
                        fresh: self.fresh,
                    }
                }
                Err(error) => error,
            },
            Some(error) => error,
        };
        let cleared = snapshot_dir::remove_all(&self.root).is_ok();
        Written::Failed { error, cleared }
    }
}

/// Loads one dataset at start: from the cache and the records after it where Redis still holds
/// them, else from Redis alone, saying why once. Returns whether the cache was used.
///
/// # Errors
/// A snapshot or record in Redis that cannot be read (a damaged cache is only a warning).
pub(super) async fn load(
    store: &RedisStore,
    cache: Option<&Cache>,
    name: &str,
) -> Result<(Loaded, bool)> {
    let from_redis = || redis_load::load(store, name);
    let Some(cache) = cache else {
        return Ok((retry_load(name, from_redis).await?, false));
    };
    // The identity first: a dataset created again while this loads fails the next start's
    // check instead of passing it.
    let log_id = retry_load(name, || cache.log_id(store, name)).await?;
    let why = match retry_load(name, || cache.try_load(store, name, &log_id)).await? {
        Ok(loaded) => {
            tracing::info!(
                dataset = name,
                from = "local cache",
                records = loaded.records,
                "dataset loaded from the local cache and the records after it in Redis"
            );
            return Ok((loaded, true));
        }
        Err(why) => why,
    };
    match &why {
        Unused::Damaged(_) => tracing::warn!(
            dataset = name,
            why = %why,
            "the local cache of this dataset is damaged; loading it from Redis"
        ),
        _ => tracing::info!(dataset = name, why = %why, "loading the dataset from Redis"),
    }
    Ok((retry_load(name, from_redis).await?, false))
}

/// Keeps the cache usable for as long as the engine lives: every few seconds, rewrites the
/// datasets it lacks or whose copy a snapshot in Redis has made stale.
pub(super) async fn refresh_when_stale(engine: Weak<Engine>) {
    let mut tick = tokio::time::interval(STALE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        // Redis down: the follower says so already; the next round tries again.
        if let Err(error) = engine.refresh_cache().await {
            tracing::debug!(%error, "the local cache was not refreshed");
        }
    }
}

impl Engine {
    /// One round of [`refresh_when_stale`].
    async fn refresh_cache(&self) -> Result<()> {
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        let Some(cache) = &shared.cache else {
            return Ok(());
        };
        if cache.recently_failed() {
            return Ok(());
        }
        let _writing = cache.lock().await;
        let versions: Vec<(String, Arc<DatasetState>)> = self
            .dataset_names()
            .into_iter()
            .filter_map(|name| {
                let state = self.snapshot(&name).ok()?;
                (state.log_position != Position::START).then_some((name, state))
            })
            .collect();
        let names: Vec<String> = versions.iter().map(|(name, _)| name.clone()).collect();
        let covers = shared.store.snapshot_positions(&names).await?;
        let (fresh, carry) = cache.plan(versions, &covers);
        if fresh.is_empty() && !cache.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut log_ids = Vec::with_capacity(fresh.len());
        for (name, _) in &fresh {
            log_ids.push(cache.log_id(&shared.store, name).await?);
        }
        let Some(mut write) = cache.begin(self.now()) else {
            return Ok(());
        };
        let write = tokio::task::spawn_blocking(move || {
            for ((name, state), log_id) in fresh.iter().zip(&log_ids) {
                match snapshot::to_files(state) {
                    Ok(files) => write.add(name, state.log_position, log_id, &files),
                    Err(error) => write.fail(PersistError::Format(format!(
                        "snapshot of dataset '{name}': {error}"
                    ))),
                }
            }
            write
        })
        .await
        .map_err(|e| EngineError::Internal(format!("cache task failed: {e}")))?;
        let pending = self.journal().and_then(|j| j.oldest_delete_at(self.now()));
        cache.finish(write, carry, pending).await;
        Ok(())
    }
}
