//! Running totals of what the engine did since the start, and what it holds now, for the
//! metrics exporter: counters bumped where the work happens (one relaxed atomic add each),
//! everything else read at scrape time from the published versions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::record::ImportPart;
use super::Engine;

/// Counters owned by the engine.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Rows of users tables applied by imports (streamed, server-side and demo).
    pub(super) imported_user_rows: AtomicU64,
    /// Rows of events tables read by imports.
    pub(super) imported_event_rows: AtomicU64,
    /// Imports begun and not yet committed or dropped.
    pub(super) imports_active: Arc<AtomicU64>,
    /// The last snapshot written: its bytes and how long it took, in microseconds.
    pub(super) last_snapshot_bytes: AtomicU64,
    pub(super) last_snapshot_micros: AtomicU64,
    /// Watch streams open.
    pub(super) watchers: Arc<AtomicU64>,
}

/// Counts one while alive: an import in progress, an open watcher.
#[derive(Debug)]
pub(super) struct Open(Arc<AtomicU64>);

impl Open {
    pub(super) fn new(gauge: &Arc<AtomicU64>) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine-wide figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineFigures {
    pub imported_user_rows: u64,
    pub imported_event_rows: u64,
    pub imports_active: u64,
    /// Log records and bytes appended by this process (0 in memory only).
    pub log_records: u64,
    pub log_bytes: u64,
    /// Group fsyncs of the embedded log.
    pub log_syncs: u64,
    /// Log bytes not yet in a snapshot.
    pub log_unsnapshotted_bytes: u64,
    pub snapshots: u64,
    pub last_snapshot_bytes: u64,
    pub last_snapshot_seconds: f64,
    pub watchers: u64,
    pub open_cursors: u64,
}

/// What one dataset's published version holds.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFigures {
    pub name: String,
    pub users: u64,
    pub attributes: u64,
    pub segments: u64,
    pub events: u64,
    /// Redis mode only: how far behind the shared log this replica was at its last catch-up.
    pub lag: Option<super::replica::Lag>,
}

impl Engine {
    /// The engine-wide figures now.
    pub fn figures(&self) -> EngineFigures {
        let counters = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let log = self.log_stats().unwrap_or_default();
        let (log_records, log_bytes) = self.journal().map_or((0, 0), |j| j.appended());
        EngineFigures {
            imported_user_rows: load(&counters.imported_user_rows),
            imported_event_rows: load(&counters.imported_event_rows),
            imports_active: load(&counters.imports_active),
            log_records,
            log_bytes,
            log_syncs: log.syncs,
            log_unsnapshotted_bytes: log.unsnapshotted_bytes,
            snapshots: log.snapshots,
            last_snapshot_bytes: load(&counters.last_snapshot_bytes),
            last_snapshot_seconds: load(&counters.last_snapshot_micros) as f64 / 1e6,
            watchers: load(&counters.watchers),
            open_cursors: self.cursors.open() as u64,
        }
    }

    /// Each dataset's figures, read from its published version (no writer is waited for).
    pub fn dataset_figures(&self) -> Vec<DatasetFigures> {
        self.dataset_names()
            .into_iter()
            .filter_map(|name| {
                let state = self.snapshot(&name).ok()?;
                Some(DatasetFigures {
                    users: state.live().len(),
                    attributes: state.attributes().len() as u64,
                    segments: state.segments().len() as u64,
                    events: state.events().events(),
                    lag: self.replication_lag(&name),
                    name,
                })
            })
            .collect()
    }

    /// Counts the rows of an import's batch, once applied.
    pub(super) fn count_imported(&self, part: &ImportPart) {
        let (counter, rows) = match part {
            ImportPart::Users(batch) => (&self.counters.imported_user_rows, batch.batch.num_rows()),
            ImportPart::Events(batch) => (&self.counters.imported_event_rows, batch.num_rows()),
        };
        counter.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Remembers the size and duration of the snapshot just written.
    pub(super) fn count_snapshot(&self, bytes: u64, seconds: f64) {
        let counters = &self.counters;
        counters.last_snapshot_bytes.store(bytes, Ordering::Relaxed);
        counters
            .last_snapshot_micros
            .store((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}
