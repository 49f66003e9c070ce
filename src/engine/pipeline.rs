//! Writes to one dataset that wait for their fsync together (embedded mode).
//!
//! A writer applies its change to the newest version under the dataset's writer lock, hands the
//! record to the log (which numbers it at once) and leaves the lock while the record is being
//! made durable, so that the next writer can apply its change on top and join the same fsync.
//! Versions are published in log order once they are durable: each writer's version waits in
//! the queue here for those before it. When the log fails, it fails every later record too, so
//! the versions built on a failed one are dropped with it and never published.
//!
//! Whoever needs the dataset quiet (an import, a snapshot, a write that creates a dataset)
//! [`drains`](Pipeline::drain) the queue under the writer lock first.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use super::state::{DatasetState, SegmentTransition};
use crate::persist::wal::{InProgress, Wal};

/// A write between its start and the moment its record is handed to the log. An embedded log
/// under `fsync = "interval"` holds its group sync for such a write's record instead of syncing
/// without it (up to the interval), so writers that come together share a sync and a lone one
/// is not held (see [`InProgress`]). Dropped without its record (the write failed, or its
/// caller went away), it stops being waited for. Empty in memory and in Redis mode, whose
/// appends are not grouped.
#[derive(Debug, Default)]
#[must_use = "a write in progress ends when dropped: hand it to the log with its record"]
pub(super) struct WriteInProgress {
    pub(super) announced: Option<InProgress>,
}

/// A version waiting for its record to be durable.
#[derive(Debug)]
struct Pending {
    state: Arc<DatasetState>,
    transitions: Vec<SegmentTransition>,
    /// `None` until the log answered; then whether the record is durable.
    durable: Option<bool>,
}

#[derive(Debug, Default)]
struct Queue {
    /// The newest applied version, durable or not: the base of the next write.
    tip: Option<Arc<DatasetState>>,
    /// By sequence number.
    waiting: BTreeMap<u64, Pending>,
}

/// The queue of one dataset.
#[derive(Debug)]
pub(super) struct Pipeline {
    queue: Mutex<Queue>,
    /// The highest sequence number settled (published or dropped), for writers to wait on.
    settled: watch::Sender<u64>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            queue: Mutex::default(),
            settled: watch::Sender::new(0),
        }
    }
}

/// A version to publish, in log order.
pub(super) type Ready = (Arc<DatasetState>, Vec<SegmentTransition>);

impl Pipeline {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The version the next write applies to: the newest applied one, or the published one.
    /// `published` is read under the queue's lock, the lock versions are published under, so
    /// that a version published (and its tip cleared) just now is not missed.
    pub(super) fn base(&self, published: impl FnOnce() -> Arc<DatasetState>) -> Arc<DatasetState> {
        let queue = self.lock();
        queue.tip.clone().unwrap_or_else(published)
    }

    /// Queues a version whose record was handed to the log as `seq`; called under the writer
    /// lock, in log order.
    pub(super) fn submitted(&self, seq: u64, mut state: DatasetState) {
        let transitions = state.take_transitions();
        let state = Arc::new(state);
        let mut queue = self.lock();
        queue.tip = Some(state.clone());
        queue.waiting.insert(
            seq,
            Pending {
                state,
                transitions,
                durable: None,
            },
        );
    }

    /// Records the log's answer for `seq` and returns the versions now ready to publish, in
    /// order (`publish` is called for each while the queue is held, so that publishing follows
    /// the log order even when answers arrive out of order).
    pub(super) fn settle(&self, seq: u64, durable: bool, mut publish: impl FnMut(Ready)) {
        let mut queue = self.lock();
        if let Some(pending) = queue.waiting.get_mut(&seq) {
            pending.durable = Some(durable);
        }
        let mut settled = None;
        while let Some(entry) = queue.waiting.first_entry() {
            let Some(durable) = entry.get().durable else {
                break;
            };
            let (seq, pending) = entry.remove_entry();
            settled = Some(seq);
            if durable {
                publish((pending.state, pending.transitions));
            } else {
                // Every later record fails as well: start the next write from what is published.
                queue.tip = None;
            }
        }
        if queue.waiting.is_empty() {
            queue.tip = None;
        }
        drop(queue);
        if let Some(seq) = settled {
            self.settled.send_if_modified(|current| {
                let moved = seq > *current;
                *current = (*current).max(seq);
                moved
            });
        }
    }

    /// Waits until `seq` is settled (published, or dropped with its failed record).
    pub(super) async fn wait_settled(&self, seq: u64) {
        let mut settled = self.settled.subscribe();
        let _ = settled.wait_for(|done| *done >= seq).await;
    }

    /// Waits until every queued version is settled; called under the writer lock, so that no
    /// new one arrives meanwhile.
    pub(super) async fn drain(&self) {
        let last = self.lock().waiting.last_key_value().map(|(seq, _)| *seq);
        if let Some(seq) = last {
            self.wait_settled(seq).await;
        }
    }
}

impl super::Engine {
    /// Starts a write: from now until its record is handed to the log (or it is dropped), an
    /// `interval` group sync waits for it (see [`WriteInProgress`]).
    pub(super) fn write_in_progress(&self) -> WriteInProgress {
        WriteInProgress {
            announced: self.local_wal().map(Wal::announce),
        }
    }

    /// The embedded log, when that is where records go.
    pub(super) fn local_wal(&self) -> Option<&Wal> {
        match &self.journal()?.backend {
            super::durable::Backend::Local { wal, .. } => Some(wal),
            super::durable::Backend::Shared(_) => None,
        }
    }

    /// Applies a change to an existing dataset in embedded mode: applied and handed to the log
    /// (ending `in_progress`) under the writer lock, made durable after it, published in log
    /// order.
    ///
    /// # Errors
    /// As [`super::Engine::apply`]; a log that cannot take the record (nothing is published).
    pub(super) async fn apply_pipelined(
        &self,
        name: &str,
        handle: &Arc<super::Dataset>,
        writer: tokio::sync::OwnedMutexGuard<()>,
        in_progress: WriteInProgress,
        change: &super::Change,
        wal: &Wal,
    ) -> super::Result<super::ChangeOutcome> {
        use super::error::EngineError;
        let mut state = DatasetState::clone(&handle.pipeline.base(|| handle.current()));
        let record = change.resolve(&state, self.limits())?;
        let (now, dataset) = (self.now(), name.to_owned());
        let (mut state, outcome, bytes) = tokio::task::spawn_blocking(move || {
            let outcome = state.apply(&record, now)?;
            let bytes = super::record::encode(&super::record::LogRecord {
                dataset,
                now,
                body: super::record::RecordBody::Change(record),
            })?;
            Ok::<_, EngineError>((state, outcome, bytes))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("write task failed: {e}")))??;
        let (seq, done) = wal.submit(bytes, in_progress.announced)?;
        state.log_position = crate::persist::Position::seq(seq);
        handle.pipeline.submitted(seq, state);
        drop(writer);
        // Settled by a task of its own: a caller that goes away must not stall the queue.
        let is_delete = matches!(change, super::Change::DeleteUsers(_));
        let settled = self.settle_when_durable(handle, seq, done, is_delete);
        tokio::spawn(settled)
            .await
            .map_err(|e| EngineError::Internal(format!("log task failed: {e}")))??;
        Ok(outcome)
    }

    /// Waits for record `seq` to be durable, then publishes the versions it makes ready (in
    /// log order) and waits until its own is settled; run as a task of its own, so that no
    /// caller's going away stalls the queue.
    ///
    /// # Errors
    /// The log could not make the record durable (nothing of it is published).
    pub(super) fn settle_when_durable(
        &self,
        handle: &Arc<super::Dataset>,
        seq: u64,
        done: tokio::sync::oneshot::Receiver<crate::persist::Result<u64>>,
        is_delete: bool,
    ) -> impl std::future::Future<Output = crate::persist::Result<()>> + Send + 'static {
        let (settler, bounds) = (handle.clone(), super::feed::FeedBounds::from(self.limits()));
        let journal = self.journal.get().cloned();
        async move {
            let durable = Wal::durable(done).await;
            if let (Ok(_), Some(journal)) = (&durable, journal) {
                journal.note_appended(is_delete);
            }
            settler.pipeline.settle(seq, durable.is_ok(), |ready| {
                settler.publish_ready(ready, bounds)
            });
            settler.pipeline.wait_settled(seq).await;
            durable.map(|_| ())
        }
    }
}
