//! User writes queued on one dataset, applied together as one version.
//!
//! A single-user upsert costs little data work but a pass of segment maintenance and a new
//! version; under load the writes of one dataset queue on its writer lock anyway. So each
//! caller queues its write here, and whoever gets the writer lock takes every write queued by
//! then and applies them as one version ([`DatasetState::apply_user_writes`]): one segment
//! pass, one log record, one publish. Each write still succeeds or fails on its own: a failing
//! one is left out and the rest applied again without it. A lone writer finds only its own
//! write and pays nothing more than before.
//!
//! Used in memory and in embedded mode; Redis mode and a dataset's first write take the
//! one-change path, whose conditional append and registration have their own retries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::change::{Change, ChangeOutcome};
use super::error::{EngineError, Result};
use super::pipeline::WriteInProgress;
use super::record::{LogRecord, RecordBody};
use super::state::DatasetState;
use super::{feed, Dataset, Engine, WriterGuard};
use crate::persist::PersistError;
use crate::time::Millis;

/// The most writes applied as one version: bounds the time a batch holds the writer lock and
/// the work redone when one of them fails.
const MAX_WRITES: usize = 512;

/// A write waiting for a writer to take it.
#[derive(Debug)]
pub(super) struct Queued {
    id: u64,
    change: Change,
    /// Ends when the batch's record is handed to the log (or the write is answered without).
    in_progress: WriteInProgress,
    reply: oneshot::Sender<Result<ChangeOutcome>>,
}

/// The writes queued on one dataset, oldest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    writes: VecDeque<Queued>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(
        &self,
        change: Change,
        in_progress: WriteInProgress,
        reply: oneshot::Sender<Result<ChangeOutcome>>,
    ) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.writes.push_back(Queued {
            id,
            change,
            in_progress,
            reply,
        });
        id
    }

    /// Takes back a write whose caller went away before any writer took it.
    fn withdraw(&self, id: u64) {
        self.lock().writes.retain(|w| w.id != id);
    }

    /// Puts writes of an abandoned batch back at the front, in their order.
    fn requeue(&self, writes: Vec<Queued>) {
        let mut inner = self.lock();
        for write in writes.into_iter().rev() {
            inner.writes.push_front(write);
        }
    }

    /// The oldest queued writes, within `limits` (at least one when any is queued).
    fn take(&self, limits: &super::Limits) -> Vec<Queued> {
        let mut inner = self.lock();
        let (mut users, mut events) = (0, 0);
        let mut taken = Vec::new();
        while let Some(next) = inner.writes.front() {
            let (u, e) = size(&next.change);
            let full = taken.len() >= MAX_WRITES
                || users + u > limits.max_batch_users
                || events + e > limits.max_batch_events;
            if full && !taken.is_empty() {
                break;
            }
            users += u;
            events += e;
            taken.extend(inner.writes.pop_front());
        }
        taken
    }
}

/// Users and events in a write, for the batch limits.
fn size(change: &Change) -> (usize, usize) {
    match change {
        Change::UpsertUsers(users) => (users.len(), 0),
        Change::DeleteUsers(users) => (users.len(), 0),
        Change::RecordEvents(events) => (0, events.len()),
        _ => (0, 0),
    }
}

/// Whether `change` is a user write, which may be applied together with others.
pub(super) fn coalescable(change: &Change) -> bool {
    matches!(
        change,
        Change::UpsertUsers(_) | Change::DeleteUsers(_) | Change::RecordEvents(_)
    )
}

/// Withdraws a caller's write if the caller goes away while it may still be queued.
struct Waiting<'a> {
    queue: &'a Queue,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.queue.withdraw(self.id);
        }
    }
}

/// Writes taken from the queue, with the writer lock they were taken under; put back if
/// dropped before they were applied (the leader's caller went away), so that their own callers
/// are still answered. The lock is let go only after that (fields drop after `drop`): a writer
/// that then finds the queue empty knows its write is being made durable, not lost.
struct Batch<'a> {
    queue: &'a Queue,
    writes: Vec<Queued>,
    writer: Option<WriterGuard>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.writes.is_empty() {
            self.queue.requeue(std::mem::take(&mut self.writes));
        }
    }
}

/// Each write's result, in order, and the version with every write that succeeded (`None`
/// when all failed).
type Applied = (Option<DatasetState>, Vec<Result<ChangeOutcome>>);

/// Applies `changes` to a copy of `base` as one version, leaving out each change that fails.
fn apply_all(base: &DatasetState, changes: &[&Change], now: Millis) -> Applied {
    let mut results: Vec<Option<Result<ChangeOutcome>>> = changes.iter().map(|_| None).collect();
    let mut kept: Vec<usize> = (0..changes.len()).collect();
    while !kept.is_empty() {
        let mut state = base.clone();
        let attempt: Vec<&Change> = kept.iter().map(|&i| changes[i]).collect();
        match state.apply_user_writes(&attempt, now) {
            Ok(outcomes) => {
                for (&i, outcome) in kept.iter().zip(outcomes) {
                    results[i] = Some(Ok(outcome));
                }
                return (Some(state), finish(results));
            }
            Err((failed, error)) => {
                results[kept[failed]] = Some(Err(error));
                kept.remove(failed);
            }
        }
    }
    (None, finish(results))
}

fn finish(results: Vec<Option<Result<ChangeOutcome>>>) -> Vec<Result<ChangeOutcome>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(EngineError::Internal("a write was not applied".into()))))
        .collect()
}

impl Engine {
    /// Queues a user write on an existing dataset and returns its result once a writer (this
    /// caller or another) applied it with the others queued.
    ///
    /// # Errors
    /// As [`Engine::apply`].
    pub(super) async fn apply_coalesced(
        &self,
        name: &str,
        handle: Arc<Dataset>,
        change: Change,
        in_progress: WriteInProgress,
    ) -> Result<ChangeOutcome> {
        let (reply, mut answer) = oneshot::channel();
        let id = handle.coalesce.push(change, in_progress, reply);
        let mut waiting = Waiting {
            queue: &handle.coalesce,
            id,
            answered: false,
        };
        loop {
            tokio::select! {
                biased;
                result = &mut answer => {
                    waiting.answered = true;
                    return unanswered(result);
                }
                writer = handle.writer.clone().lock_owned() => {
                    let writes = handle.coalesce.take(&self.limits);
                    if writes.is_empty() {
                        // Another writer took this write and is making it durable.
                        drop(writer);
                        waiting.answered = true;
                        return unanswered(answer.await);
                    }
                    let batch = Batch {
                        queue: &handle.coalesce,
                        writes,
                        writer: Some(writer),
                    };
                    self.write_batch(name, &handle, batch).await;
                }
            }
        }
    }

    /// Applies a batch as one version, publishes it (in embedded mode once its record is
    /// durable) and answers each write.
    async fn write_batch(&self, name: &str, handle: &Arc<Dataset>, mut batch: Batch<'_>) {
        let wal = self.local_wal();
        let base = match wal {
            Some(_) => handle.pipeline.base(|| handle.current()),
            None => handle.current(),
        };
        let now = self.now();
        let changes: Vec<Change> = batch.writes.iter().map(|w| w.change.clone()).collect();
        let applied = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Change> = changes.iter().collect();
            let (state, results) = apply_all(&base, &refs, now);
            (state, results, changes)
        })
        .await;
        let (state, results, changes) = match applied {
            Ok(applied) => applied,
            Err(error) => {
                let error = EngineError::Internal(format!("write task failed: {error}"));
                return answer_all(std::mem::take(&mut batch.writes), &error);
            }
        };
        // From here on nothing awaits before the writes are answered or handed to a task that
        // answers them, so the batch is never abandoned half-applied.
        let mut writes = std::mem::take(&mut batch.writes);
        let Some(mut state) = state else {
            return answer(writes, results);
        };
        let Some(wal) = wal else {
            handle.publish(state, feed::FeedBounds::from(&self.limits));
            return answer(writes, results);
        };
        let record = LogRecord {
            dataset: name.to_owned(),
            now,
            body: record_body(changes, &results),
        };
        let is_delete = record.body.deletes_users();
        // The record is handed over with one write's announcement; the others end just after,
        // when the record is already queued, so the group sync never runs without it.
        let mut announced = writes.iter_mut().map(|w| w.in_progress.announced.take());
        let first = announced.next().flatten();
        let rest: Vec<_> = announced.collect();
        let submitted = super::record::encode(&record).and_then(|b| Ok(wal.submit(b, first)?));
        drop(rest);
        let (seq, done) = match submitted {
            Ok(submitted) => submitted,
            Err(error) => return answer_all(writes, &error),
        };
        state.log_position = crate::persist::Position::seq(seq);
        handle.pipeline.submitted(seq, state);
        drop(batch.writer.take());
        // A task of its own waits for the record and answers: no caller's going away may stall
        // the queue or leave a write unanswered.
        let settled = self.settle_when_durable(handle, seq, done, is_delete);
        tokio::spawn(async move {
            match settled.await {
                Ok(_) => answer(writes, results),
                Err(error) => answer_all(writes, &EngineError::from(error)),
            }
        });
    }
}

/// The record of the writes that succeeded: one change as itself, several together.
fn record_body(changes: Vec<Change>, results: &[Result<ChangeOutcome>]) -> RecordBody {
    let mut applied: Vec<Change> = changes
        .into_iter()
        .zip(results)
        .filter(|(_, r)| r.is_ok())
        .map(|(c, _)| c)
        .collect();
    match applied.len() {
        1 => RecordBody::Change(applied.remove(0)),
        _ => RecordBody::Changes(applied),
    }
}

fn answer(writes: Vec<Queued>, results: Vec<Result<ChangeOutcome>>) {
    for (write, result) in writes.into_iter().zip(results) {
        let _ = write.reply.send(result);
    }
}

fn answer_all(writes: Vec<Queued>, error: &EngineError) {
    for write in writes {
        let _ = write.reply.send(Err(copy_of(error)));
    }
}

/// The same failure for another write of the batch: a log that cannot take records stays
/// `UNAVAILABLE` for each, anything else is internal.
fn copy_of(error: &EngineError) -> EngineError {
    match error {
        EngineError::Storage(PersistError::Unavailable(reason)) => {
            EngineError::Storage(PersistError::Unavailable(reason.clone()))
        }
        other => EngineError::Internal(other.to_string()),
    }
}

fn unanswered(
    result: std::result::Result<Result<ChangeOutcome>, oneshot::error::RecvError>,
) -> Result<ChangeOutcome> {
    result.unwrap_or_else(|_| {
        Err(EngineError::Internal(
            "a queued write went unanswered".into(),
        ))
    })
}
