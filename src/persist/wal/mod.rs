//! The embedded write-ahead log: records appended to segment files in a directory, each
//! acknowledged only once it is on disk.
//!
//! One thread owns the open segment. Appends queue to it; it writes every queued record with one
//! `write` and makes them durable with one `fdatasync` (group commit), so that writers to
//! different datasets share the cost. With [`FsyncPolicy::Interval`] it also waits, up to the
//! interval since the last sync, for the records of writes announced as in progress
//! ([`Wal::announce`]), so that writers that come together share a sync while a lone writer is
//! never held (see [`queue`]).
//!
//! Segments are named by the sequence number of their first record (`00000000000000000001.log`)
//! and rotated past a size; a snapshot rotates the log too, so that the files before it hold only
//! records the snapshot covers and can be deleted whole.
//!
//! # Layout
//! - [`queue`]: where appends wait for the writer thread, and when a group is complete.
//! - [`writer`]: the thread that writes and syncs each group.
//! - [`segments`]: segment files, and reading them back at recovery.

mod queue;
mod segments;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{FsyncPolicy, PersistError, Position, Result};
use queue::Inbox;
use segments::{create_segment, list_segments, Segment};
use writer::Writer;

pub use queue::InProgress;
pub use segments::{first_segment, recover, sync_dir, Recovered};

/// How the log writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    pub policy: FsyncPolicy,
    /// The longest a write waits for other writes' records to join its group's sync under
    /// [`FsyncPolicy::Interval`], counted from the previous sync.
    pub interval: Duration,
    /// A segment is closed and a new one started once it grows past this.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            policy: FsyncPolicy::Always,
            interval: Duration::from_millis(10),
            segment_bytes: 64 << 20,
        }
    }
}

/// What the writer thread and the callers share.
#[derive(Debug, Default)]
struct Shared {
    /// Every segment on disk, oldest first; the last is the open one.
    segments: Mutex<Vec<Segment>>,
    /// Bytes in every segment on disk.
    bytes: AtomicU64,
    /// The sequence number after the last record written.
    next_seq: AtomicU64,
    /// Group syncs (one `fdatasync` of appended records each) since the log was opened.
    syncs: AtomicU64,
    /// Records and payload bytes submitted since the log was opened.
    appended_records: AtomicU64,
    appended_bytes: AtomicU64,
    /// Set after a failed write or sync: what reached the disk is unknown, so nothing more is
    /// acknowledged until a restart recovers the log.
    failed: AtomicBool,
}

/// A record handed to the log: its sequence number, known at once, and the answer once it is
/// durable.
pub type Submitted = (u64, oneshot::Receiver<Result<u64>>);

/// The open log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// Where appends queue for the writer thread.
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Wal {
    /// Opens the log for appending after [`recover`]: a new segment starting at `next_seq`.
    ///
    /// # Errors
    /// The directory cannot be created or written.
    pub fn open(dir: &Path, next_seq: u64, options: WalOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| PersistError::io(dir, e))?;
        let mut segments = list_segments(dir)?;
        segments.retain(|s| s.first_seq != next_seq);
        let (file, segment) = create_segment(dir, next_seq)?;
        segments.push(segment);
        let shared = Arc::new(Shared {
            bytes: AtomicU64::new(segments.iter().map(|s| s.bytes).sum()),
            segments: Mutex::new(segments),
            next_seq: AtomicU64::new(next_seq),
            syncs: AtomicU64::new(0),
            appended_records: AtomicU64::new(0),
            appended_bytes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        });
        let inbox = Arc::new(Inbox::new(next_seq));
        let writer = Writer {
            dir: dir.to_owned(),
            file,
            shared: shared.clone(),
            options,
            last_sync: Instant::now(),
            buffer: Vec::new(),
        };
        let queued = inbox.clone();
        let thread = std::thread::Builder::new()
            .name("audience-wal".into())
            .spawn(move || writer.run(&queued))
            .map_err(|e| PersistError::io(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            inbox,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Announces a write whose record will be submitted with the returned guard: until then
    /// (or until the guard is dropped), an `interval` group waits for it rather than syncing
    /// without it. Take it before preparing the record, and hold it across waits that another
    /// write's record could use to arrive.
    pub fn announce(&self) -> InProgress {
        self.inbox.announce()
    }

    /// Queues one record and returns its sequence number at once, with the answer that comes
    /// once it is durable: a writer can go on (and the next one queue after it) while the sync
    /// runs, so that records of one dataset share syncs too. `announced`, the write's
    /// [`InProgress`] if it has one, ends as the record is queued.
    ///
    /// # Errors
    /// A closed log.
    pub fn submit(&self, payload: Vec<u8>, announced: Option<InProgress>) -> Result<Submitted> {
        // An announcement of another log is simply dropped (ended) there.
        let release = announced.is_some_and(|mut a| a.take_for(&self.inbox));
        let bytes = payload.len() as u64;
        let submitted = self.inbox.append(payload, release)?;
        self.shared.appended_records.fetch_add(1, Ordering::Relaxed);
        self.shared
            .appended_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(submitted)
    }

    /// Waits for a submitted record to be durable.
    ///
    /// # Errors
    /// The log failed earlier or fails now; the record may or may not be on disk, and the
    /// caller must not acknowledge its write.
    pub async fn durable(done: oneshot::Receiver<Result<u64>>) -> Result<Position> {
        let seq = done.await.map_err(|_| PersistError::Closed)??;
        Ok(Position::seq(seq))
    }

    /// Appends one record; returns its position once it is durable (per the fsync policy).
    ///
    /// # Errors
    /// As [`Wal::durable`].
    pub async fn append(&self, payload: Vec<u8>) -> Result<Position> {
        let (_, done) = self.submit(payload, None)?;
        Self::durable(done).await
    }

    /// Closes the open segment and starts a new one; returns the first sequence number of the
    /// new one (every record before it is in closed segments).
    ///
    /// # Errors
    /// As [`Wal::append`].
    pub async fn rotate(&self) -> Result<u64> {
        let (reply, done) = oneshot::channel();
        self.inbox.rotate(reply)?;
        done.await.map_err(|_| PersistError::Closed)?
    }

    /// Deletes the closed segments that hold only records before `seq`; returns the bytes freed.
    ///
    /// # Errors
    /// A file that cannot be removed.
    pub fn remove_before(&self, seq: u64) -> Result<u64> {
        let mut segments = self
            .shared
            .segments
            .lock()
            .map_err(|_| PersistError::Closed)?;
        let mut freed = 0;
        while segments.len() > 1 && segments[1].first_seq <= seq {
            let segment = segments.remove(0);
            std::fs::remove_file(&segment.path).map_err(|e| PersistError::io(&segment.path, e))?;
            freed += segment.bytes;
        }
        self.shared.bytes.fetch_sub(freed, Ordering::Relaxed);
        drop(segments);
        if freed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }

    /// Bytes of every segment on disk.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Group syncs since the log was opened (one `fdatasync` of appended records each): with
    /// [`Wal::bytes`], what the fsync policy costs.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Records and payload bytes submitted since the log was opened.
    pub fn appended(&self) -> (u64, u64) {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        (
            load(&self.shared.appended_records),
            load(&self.shared.appended_bytes),
        )
    }

    /// Writes announced whose record is not queued yet.
    pub fn in_progress(&self) -> usize {
        self.inbox.in_progress()
    }

    /// Stops the writer after the records already queued.
    pub fn close(&self) {
        self.inbox.close();
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}
