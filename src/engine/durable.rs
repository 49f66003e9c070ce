//! Durability of the engine: every applied write is logged before the version it produced is
//! published (so an acknowledged write survives a crash), snapshots of published versions are
//! written while readers and writers go on, and a start recovers from the newest snapshot and
//! the log records after it.
//!
//! A snapshot first rotates the log, so that every record before the new segment is in closed
//! segments; it then takes each dataset's published version (waiting only for a write in flight
//! on it), writes them, and deletes the closed segments and the older snapshot. Each dataset's
//! files name the last record they hold, so that replay skips what they already contain.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::error::{EngineError, Result};
use super::record::{self, LogRecord};
use super::recovery::recover;
use super::state::DatasetState;
use super::{feed, snapshot, Dataset, Engine};
use crate::persist::snapshot::{self as snapshot_dir, SnapshotWriter};
use crate::persist::wal::{Wal, WalOptions};
use crate::persist::{DirLock, Position};
use crate::time::Millis;

/// How the embedded store is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableOptions {
    /// Holds `wal/` and `snapshots/`.
    pub data_dir: PathBuf,
    pub wal: WalOptions,
    /// A snapshot is written in the background once the log holds this many bytes.
    pub snapshot_log_bytes: u64,
    /// ... or this many records (each replays at the cost of a write at restart).
    pub snapshot_log_records: u64,
    /// The longest a deleted user's bytes stay in the log or a snapshot: a snapshot is written
    /// once the oldest delete it would cover is this old.
    pub erasure_max_age: Duration,
    /// Start from what is valid instead of refusing a corrupt log or snapshot.
    pub repair: bool,
}

/// The engine's log and snapshots.
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) backend: Backend,
    /// Names the log in watch tokens (a hash of the data directory or the Redis prefix), so
    /// that a token of another deployment is refused.
    pub(super) log_id: u64,
    /// A snapshot is due once this many log bytes, or records, are not in one.
    snapshot_log_bytes: u64,
    snapshot_log_records: u64,
    /// Records appended since the last snapshot began.
    unsnapshotted_records: AtomicU64,
    erasure_max_age: Duration,
    /// One snapshot at a time.
    snapshotting: tokio::sync::Mutex<()>,
    /// When the oldest delete not yet in a snapshot was logged.
    oldest_delete: Mutex<Option<Instant>>,
    /// Snapshots written since the start, for tests and the log.
    snapshots: AtomicU64,
}

/// Where records and snapshots go.
#[derive(Debug)]
pub(super) enum Backend {
    /// A data directory of this server, held with a lock.
    Local {
        wal: Wal,
        data_dir: PathBuf,
        _lock: DirLock,
    },
    /// Redis, shared with other replicas.
    Shared(Box<super::replica::Shared>),
}

impl Journal {
    pub(super) fn new(
        backend: Backend,
        log_name: &str,
        (snapshot_log_bytes, snapshot_log_records): (u64, u64),
        erasure_max_age: Duration,
    ) -> Self {
        let log_id = log_name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        Self {
            backend,
            log_id,
            snapshot_log_bytes,
            snapshot_log_records,
            unsnapshotted_records: AtomicU64::new(0),
            erasure_max_age,
            snapshotting: tokio::sync::Mutex::new(()),
            oldest_delete: Mutex::new(None),
            snapshots: AtomicU64::new(0),
        }
    }

    /// Appends a record of `dataset` whose version was `expected`, ending its write's
    /// `in_progress` as it is handed over; returns its position once it is durable, counted for
    /// the snapshot triggers (and the erasure clock when it deletes).
    ///
    /// # Errors
    /// The store cannot take it ([`PersistError::Conflict`]: another replica wrote first).
    pub(super) async fn append(
        &self,
        dataset: &str,
        expected: Position,
        bytes: Vec<u8>,
        is_delete: bool,
        in_progress: super::pipeline::WriteInProgress,
    ) -> Result<Position> {
        let position = match &self.backend {
            Backend::Local { wal, .. } => {
                let (_, done) = wal.submit(bytes, in_progress.announced)?;
                Wal::durable(done).await?
            }
            Backend::Shared(shared) => shared.append(dataset, expected, bytes).await?,
        };
        self.note_appended(is_delete);
        Ok(position)
    }

    /// Records and bytes appended to the log by this process.
    pub(super) fn appended(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Local { wal, .. } => wal.appended(),
            Backend::Shared(shared) => shared.appended(),
        }
    }

    /// Log bytes not yet in a snapshot.
    fn unsnapshotted_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Local { wal, .. } => wal.bytes(),
            Backend::Shared(shared) => shared.unsnapshotted_bytes(),
        }
    }

    /// Counts a record made durable, for the snapshot triggers.
    pub(super) fn note_appended(&self, is_delete: bool) {
        self.unsnapshotted_records.fetch_add(1, Ordering::Relaxed);
        if is_delete {
            self.note_delete();
        }
    }

    /// Remembers that a delete was logged now, unless an older one waits already.
    pub(super) fn note_delete(&self) {
        self.note_delete_at(Instant::now());
    }

    /// Remembers a delete logged at `at`, unless an older one waits already.
    pub(super) fn note_delete_at(&self, at: Instant) {
        if let Ok(mut oldest) = self.oldest_delete.lock() {
            *oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
    }

    /// When the oldest delete not yet in a snapshot was logged, on the clock that reads `now`.
    pub(super) fn oldest_delete_at(&self, now: Millis) -> Option<Millis> {
        let oldest = self.oldest_delete.lock().ok().and_then(|o| *o)?;
        Some(now.saturating_sub(i64::try_from(oldest.elapsed().as_millis()).unwrap_or(i64::MAX)))
    }

    /// Takes the oldest delete's time for a snapshot that covers it.
    pub(super) fn take_oldest_delete(&self) -> Option<Instant> {
        self.oldest_delete.lock().ok().and_then(|mut o| o.take())
    }

    /// Puts a delete's time back after a snapshot that would have covered it failed.
    pub(super) fn restore_oldest_delete(&self, at: Option<Instant>) {
        if let (Some(at), Ok(mut oldest)) = (at, self.oldest_delete.lock()) {
            *oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
    }
}

/// What a start recovered.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// The snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
    pub datasets: usize,
    /// Datasets loaded from the local cache of Redis mode (each with the records after it).
    pub from_cache: usize,
    /// Log records replayed after the snapshot (in Redis mode: read from Redis).
    pub records: u64,
    /// What was dropped: a torn tail, and with repair, corrupt data.
    pub dropped: Vec<String>,
    /// When the oldest delete replayed from the log (so in no snapshot yet) was applied: the
    /// erasure clock goes on from there, not from the restart.
    pub oldest_delete: Option<Millis>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub datasets: usize,
    /// Bytes of the snapshot's files.
    pub bytes: u64,
    /// Log bytes deleted because the snapshot covers them.
    pub log_bytes_freed: u64,
    pub seconds: f64,
}

/// What the log holds and what it cost since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Log bytes not yet in a snapshot.
    pub unsnapshotted_bytes: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Group syncs of the embedded log (one `fdatasync` each, however many writes it made
    /// durable): what the fsync policy costs the disk. 0 in Redis mode.
    pub syncs: u64,
}

/// How far a start has come, for `UNAVAILABLE: loading: N of M` and health.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Zero once the engine is ready.
    total: AtomicU64,
    done: AtomicU64,
}

impl LoadProgress {
    /// Marks the start of a load of `total` steps (at least one).
    pub fn begin(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total.max(1), Ordering::Release);
    }

    pub fn advance(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    /// The engine answers requests.
    pub fn finish(&self) {
        self.total.store(0, Ordering::Release);
    }

    /// `(done, total)` while loading.
    pub fn loading(&self) -> Option<(u64, u64)> {
        match self.total.load(Ordering::Acquire) {
            0 => None,
            total => Some((self.done.load(Ordering::Relaxed).min(total), total)),
        }
    }
}

impl Engine {
    /// Refuses requests while the engine loads.
    ///
    /// # Errors
    /// [`EngineError::Loading`] until the load finishes.
    pub fn check_ready(&self) -> Result<()> {
        match self.progress.loading() {
            Some((done, total)) => Err(EngineError::Loading { done, total }),
            None => Ok(()),
        }
    }

    /// The start-up load's progress (recovery, demo data).
    pub fn progress(&self) -> &LoadProgress {
        &self.progress
    }

    /// Whether writes are logged.
    pub fn is_durable(&self) -> bool {
        self.journal.get().is_some()
    }

    /// Logs a record of a version that followed `expected` and returns its position once it
    /// is durable; a no-op in memory.
    ///
    /// # Errors
    /// The log cannot be written: the write must not be published.
    pub(super) async fn log(&self, record: &LogRecord, expected: Position) -> Result<Position> {
        let Some(journal) = self.journal() else {
            return Ok(Position::START);
        };
        let in_progress = self.write_in_progress();
        let is_delete = record.body.deletes_users();
        let dataset = record.dataset.clone();
        let owned = record.clone();
        let bytes = tokio::task::spawn_blocking(move || record::encode(&owned))
            .await
            .map_err(|e| EngineError::Internal(format!("log encoding failed: {e}")))??;
        journal
            .append(&dataset, expected, bytes, is_delete, in_progress)
            .await
    }

    /// The id of the log watch tokens name, when durable.
    pub(super) fn log_id(&self) -> Option<u64> {
        Some(self.journal()?.log_id)
    }

    /// The journal, when durable.
    pub(super) fn journal(&self) -> Option<&Journal> {
        self.journal.get().map(|j| &**j)
    }

    /// Recovers every dataset from `options.data_dir` (newest snapshot, then the log after it),
    /// then logs every later write there and snapshots in the background. Requests are refused
    /// with `loading: N of M` meanwhile.
    ///
    /// # Errors
    /// A corrupt snapshot or log (named, with the byte offset) unless `options.repair`; an
    /// unusable directory; an engine that is durable already.
    pub async fn open_durable(self: &Arc<Self>, options: DurableOptions) -> Result<RecoveryReport> {
        let started = Instant::now();
        let lock = DirLock::acquire(&options.data_dir)?;
        crate::persist::cache::refuse_cache(&options.data_dir)?;
        // A caller that marked the engine loading (the server) ends the load itself.
        let was_loading = self.progress.loading().is_some();
        let engine = self.clone();
        let opts = options.clone();
        let (states, report, next_seq) =
            tokio::task::spawn_blocking(move || recover(&opts, &engine.progress))
                .await
                .map_err(|e| EngineError::Internal(format!("recovery failed: {e}")))??;
        let wal = Wal::open(&options.data_dir.join("wal"), next_seq, options.wal)?;
        let backend = Backend::Local {
            wal,
            data_dir: options.data_dir.clone(),
            _lock: lock,
        };
        let log_name = std::fs::canonicalize(&options.data_dir)
            .unwrap_or_else(|_| options.data_dir.clone())
            .display()
            .to_string();
        let journal = Arc::new(Journal::new(
            backend,
            &log_name,
            (options.snapshot_log_bytes, options.snapshot_log_records),
            options.erasure_max_age,
        ));
        if let Some(at) = report.oldest_delete {
            let age = Duration::from_millis(self.now().saturating_sub(at).max(0) as u64);
            journal.note_delete_at(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        }
        self.install(states)?;
        if self.journal.set(journal).is_err() {
            return Err(EngineError::Internal(
                "the engine is durable already".into(),
            ));
        }
        // After a repair, what is on disk no longer matches what a plain start would read
        // (a dropped dataset stays in the old snapshot, a cut log may be followed by new
        // records): a fresh snapshot makes it whole before anything else is written.
        if options.repair && !report.dropped.is_empty() {
            self.write_snapshot(None, |_, _, _| {}).await?;
        }
        tokio::spawn(snapshot_when_due(Arc::downgrade(self)));
        if !was_loading {
            self.progress.finish();
        }
        tracing::info!(
            datasets = report.datasets,
            records = report.records,
            snapshot = ?report.snapshot,
            seconds = started.elapsed().as_secs_f64(),
            "recovered"
        );
        Ok(report)
    }

    /// Publishes recovered versions as the engine's datasets.
    pub(super) fn install(&self, states: BTreeMap<String, DatasetState>) -> Result<()> {
        let mut map = self
            .datasets
            .write()
            .map_err(|_| EngineError::Internal("dataset registry lock poisoned".into()))?;
        for (name, mut state) in states {
            state.clear_transitions();
            let log = state.log_position;
            let handle = Arc::new(Dataset::default());
            handle.publish(state, feed::FeedBounds::from(&self.limits));
            handle.feed.anchor(log);
            map.insert(name, handle);
        }
        Ok(())
    }

    /// Writes a snapshot of every dataset now and deletes the log it covers; `progress` hears
    /// `(datasets written, datasets, name)`. With `only`, that dataset is written afresh and the
    /// others are carried over from the previous snapshot, so no log is freed.
    ///
    /// # Errors
    /// An engine that keeps nothing on disk, an unknown `only`, or a snapshot that cannot be
    /// written (the previous one then stays, with the log).
    pub async fn write_snapshot(
        &self,
        only: Option<&str>,
        progress: impl Fn(usize, usize, &str) + Send + 'static,
    ) -> Result<SnapshotReport> {
        let journal = self.journal().ok_or_else(|| EngineError::InvalidArgument {
            field: "data_dir",
            reason: "the server keeps its data in memory only: start it with --data-dir".into(),
        })?;
        if let Some(name) = only {
            self.dataset(name)?;
        }
        let _one = journal.snapshotting.lock().await;
        let started = Instant::now();
        let (wal, data_dir) = match &journal.backend {
            Backend::Local { wal, data_dir, .. } => (wal, data_dir),
            Backend::Shared(shared) => {
                return self
                    .snapshot_shared(journal, shared, only, progress, started)
                    .await
            }
        };
        let root = snapshot_dir::root_of(data_dir);
        let previous = match only {
            Some(_) => snapshot_dir::latest(&root)?,
            None => None,
        };
        let full = previous.is_none();
        let covered_deletes = match full {
            true => journal.take_oldest_delete(),
            false => None,
        };
        let covered_records = match full {
            true => self.take_unsnapshotted_records(journal),
            false => 0,
        };
        let log_from = match &previous {
            Some(previous) => previous.manifest.log_from,
            None => wal.rotate().await?,
        };
        let mut versions = Vec::new();
        for name in self.dataset_names() {
            let carried = previous.as_ref().and_then(|p| {
                let entry = p.manifest.datasets.iter().find(|d| d.name == name)?;
                (Some(name.as_str()) != only).then(|| entry.clone())
            });
            if let Some(entry) = carried {
                versions.push((name, Version::Carried(entry)));
                continue;
            }
            let handle = self.dataset(&name)?;
            // A write in flight has logged its record but not yet published its version.
            let _writer = handle.writer.lock().await;
            handle.pipeline.drain().await;
            versions.push((name, Version::Fresh(handle.current())));
        }
        let created_at = self.now();
        let written = tokio::task::spawn_blocking(move || {
            let mut writer = SnapshotWriter::begin(&root, log_from, created_at)?;
            let total = versions.len();
            for (index, (name, version)) in versions.iter().enumerate() {
                match (version, &previous) {
                    (Version::Carried(entry), Some(previous)) => {
                        writer.carry_dataset(previous, entry)?
                    }
                    (Version::Carried(_), None) => {
                        return Err(EngineError::Internal("no snapshot to carry from".into()))
                    }
                    (Version::Fresh(state), _) => {
                        let files = snapshot::to_files(state).map_err(|e| {
                            EngineError::Internal(format!("snapshot of dataset '{name}': {e}"))
                        })?;
                        writer.add_dataset(name, state.log_position, &files)?;
                    }
                }
                progress(index + 1, total, name);
            }
            Ok::<_, EngineError>((writer.finish()?, total))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("snapshot task failed: {e}")));
        let ((path, bytes), datasets) = match written {
            Ok(Ok(written)) => written,
            Ok(Err(error)) | Err(error) => {
                journal.restore_oldest_delete(covered_deletes);
                self.restore_unsnapshotted_records(journal, covered_records);
                return Err(error);
            }
        };
        let log_bytes_freed = match full {
            true => wal.remove_before(log_from)?,
            false => 0,
        };
        self.snapshot_written(journal);
        let report = SnapshotReport {
            path,
            datasets,
            bytes,
            log_bytes_freed,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.count_snapshot(report.bytes, report.seconds);
        tracing::info!(
            path = %report.path.display(),
            datasets,
            bytes,
            log_bytes_freed,
            seconds = report.seconds,
            "snapshot written"
        );
        Ok(report)
    }

    /// Why a snapshot is due now, if one is.
    fn snapshot_due(&self) -> Option<&'static str> {
        let journal = self.journal()?;
        if journal.unsnapshotted_bytes() >= journal.snapshot_log_bytes {
            return Some("the log grew past snapshot_log_bytes");
        }
        if journal.unsnapshotted_records.load(Ordering::Relaxed) >= journal.snapshot_log_records {
            return Some("the log grew past snapshot_log_records");
        }
        let oldest = journal.oldest_delete.lock().ok().and_then(|o| *o)?;
        (oldest.elapsed() >= journal.erasure_max_age)
            .then_some("deleted users reached erasure_max_age")
    }

    /// What the log holds and what it cost so far, when durable.
    pub fn log_stats(&self) -> Option<LogStats> {
        let journal = self.journal()?;
        Some(LogStats {
            unsnapshotted_bytes: journal.unsnapshotted_bytes(),
            snapshots: journal.snapshots.load(Ordering::Relaxed),
            syncs: self.local_wal().map_or(0, Wal::syncs),
        })
    }

    /// Counts a snapshot written.
    pub(super) fn snapshot_written(&self, journal: &Journal) {
        journal.snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// Restarts the record count of the snapshot trigger (a snapshot is starting); the count
    /// before, to put back if the snapshot fails.
    pub(super) fn take_unsnapshotted_records(&self, journal: &Journal) -> u64 {
        journal.unsnapshotted_records.swap(0, Ordering::Relaxed)
    }

    /// Puts back the count of a snapshot that failed.
    pub(super) fn restore_unsnapshotted_records(&self, journal: &Journal, records: u64) {
        journal
            .unsnapshotted_records
            .fetch_add(records, Ordering::Relaxed);
    }
}

/// A dataset's part of a snapshot.
enum Version {
    /// Written from the published version.
    Fresh(Arc<DatasetState>),
    /// Carried over from the previous snapshot.
    Carried(snapshot_dir::DatasetEntry),
}

/// Writes a snapshot whenever one is due, for as long as the engine lives.
pub(super) async fn snapshot_when_due(engine: Weak<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let Some(reason) = engine.snapshot_due() else {
            continue;
        };
        let span = tracing::info_span!("snapshot", reason);
        let written =
            tracing::Instrument::instrument(engine.write_snapshot(None, |_, _, _| {}), span).await;
        if let Err(error) = written {
            tracing::error!(%error, "background snapshot failed; retrying in a minute");
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}
