//! Where appends wait for the writer thread, and when the thread closes a group.
//!
//! A writer announces its write before it prepares the record ([`InProgress`]) and hands the
//! record over with the announcement, in one step. Under [`FsyncPolicy::Interval`] the writer
//! thread then syncs a group as soon as no announced write is still preparing its record
//! (nothing more can join), or once the interval since the last sync has passed, whichever
//! comes first (the idea of PostgreSQL's `commit_delay` and `commit_siblings`): a lone writer is
//! never held by the interval, writers that come together share one sync, and while writes keep
//! coming there is at most one sync per interval. Under [`FsyncPolicy::Always`] it syncs what is
//! queued at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::super::{FsyncPolicy, PersistError, Result};
use super::Submitted;

/// What the writer thread is asked to do.
pub(super) enum Request {
    Append {
        seq: u64,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Rotate {
        reply: oneshot::Sender<Result<u64>>,
    },
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    /// The sequence number the next append gets: assigned as it is queued, so that numbers
    /// follow the queue order.
    next_seq: u64,
    /// Writes announced whose record is neither queued nor given up.
    in_progress: usize,
    /// Nothing more is taken; the writer stops once the queue is empty.
    closed: bool,
}

/// The queue between callers and the writer thread.
pub(super) struct Inbox {
    queue: Mutex<Queue>,
    /// Wakes the writer thread when it may have something to do: a first request, the last
    /// write in progress queued or given up, a close.
    wake: Condvar,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.lock();
        f.debug_struct("Inbox")
            .field("requests", &queue.requests.len())
            .field("next_seq", &queue.next_seq)
            .field("in_progress", &queue.in_progress)
            .field("closed", &queue.closed)
            .finish()
    }
}

impl Inbox {
    pub(super) fn new(next_seq: u64) -> Self {
        Self {
            queue: Mutex::new(Queue {
                next_seq,
                ..Queue::default()
            }),
            wake: Condvar::new(),
        }
    }

    /// The queue; every change to it is one step, so a panic elsewhere leaves it whole.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a record; with `release`, its write stops counting as in progress in the same
    /// step, so that the writer thread never sees one without the other.
    pub(super) fn append(&self, payload: Vec<u8>, release: bool) -> Result<Submitted> {
        let (reply, done) = oneshot::channel();
        let mut queue = self.lock();
        if release {
            queue.in_progress = queue.in_progress.saturating_sub(1);
        }
        if queue.closed {
            return Err(PersistError::Closed);
        }
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let first = queue.requests.is_empty();
        queue.requests.push(Request::Append {
            seq,
            payload,
            reply,
        });
        let wake = first || queue.in_progress == 0;
        drop(queue);
        if wake {
            self.wake.notify_one();
        }
        Ok((seq, done))
    }

    /// Queues a rotation.
    pub(super) fn rotate(&self, reply: oneshot::Sender<Result<u64>>) -> Result<()> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(PersistError::Closed);
        }
        queue.requests.push(Request::Rotate { reply });
        drop(queue);
        self.wake.notify_one();
        Ok(())
    }

    /// Counts a write in progress until the returned guard is submitted or dropped.
    pub(super) fn announce(self: &Arc<Self>) -> InProgress {
        self.lock().in_progress += 1;
        InProgress {
            inbox: Some(self.clone()),
        }
    }

    /// Ends an announced write that queued nothing.
    fn release(&self) {
        let mut queue = self.lock();
        queue.in_progress = queue.in_progress.saturating_sub(1);
        let last = queue.in_progress == 0;
        drop(queue);
        if last {
            self.wake.notify_one();
        }
    }

    /// Writes announced whose record is not queued yet.
    pub(super) fn in_progress(&self) -> usize {
        self.lock().in_progress
    }

    /// Takes nothing more; the writer stops after what is queued.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits for the next group to write and sync (see the module's doc); `None` once closed
    /// and empty.
    pub(super) fn next_group(
        &self,
        policy: FsyncPolicy,
        interval: Duration,
        last_sync: Instant,
    ) -> Option<Vec<Request>> {
        let mut queue = self.lock();
        while queue.requests.is_empty() {
            if queue.closed {
                return None;
            }
            queue = self
                .wake
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if policy == FsyncPolicy::Interval {
            let deadline = last_sync.checked_add(interval).unwrap_or(last_sync);
            while queue.in_progress > 0 && !queue.closed {
                let wait = deadline.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                queue = match self.wake.wait_timeout(queue, wait) {
                    Ok((queue, _)) => queue,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
        }
        Some(std::mem::take(&mut queue.requests))
    }
}

/// A write announced to the log before its record exists, so that an `interval` group commit
/// waits for the record instead of syncing without it. It ends when its record is submitted
/// with it ([`super::Wal::submit`]) or when it is dropped (the write failed or its caller went
/// away), so that no path can leave the log waiting for a record that will never come.
#[derive(Debug)]
#[must_use = "a write in progress ends when dropped: submit its record with it"]
pub struct InProgress {
    /// `None` once handed over with the record.
    inbox: Option<Arc<Inbox>>,
}

impl InProgress {
    /// Hands the announcement over to `inbox`'s append, if it was made there.
    pub(super) fn take_for(&mut self, inbox: &Arc<Inbox>) -> bool {
        match &self.inbox {
            Some(own) if Arc::ptr_eq(own, inbox) => {
                self.inbox = None;
                true
            }
            _ => false,
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            inbox.release();
        }
    }
}
