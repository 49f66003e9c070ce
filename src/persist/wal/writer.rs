//! The thread that owns the open segment: it writes each group of queued records with one
//! `write` and makes them durable with one `fdatasync`, then answers each.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::super::frame;
use super::super::{PersistError, Result};
use super::queue::{Inbox, Request};
use super::segments::create_segment;
use super::{Shared, WalOptions};

/// Records from this size on are written from their own buffer rather than copied into the
/// group's.
pub(super) const DIRECT_BYTES: usize = 1 << 20;

/// A queued record: sequence number, payload, and where its answer goes.
type Append = (u64, Vec<u8>, oneshot::Sender<Result<u64>>);

/// The thread that owns the open segment.
pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) file: File,
    pub(super) shared: Arc<Shared>,
    pub(super) options: WalOptions,
    /// When the last group sync ended: an `interval` group waits at most until the interval
    /// since then has passed.
    pub(super) last_sync: Instant,
    /// Reused for each group's bytes.
    pub(super) buffer: Vec<u8>,
}

impl Writer {
    pub(super) fn run(mut self, inbox: &Inbox) {
        let (policy, interval) = (self.options.policy, self.options.interval);
        while let Some(group) = inbox.next_group(policy, interval, self.last_sync) {
            let mut appends = Vec::new();
            for request in group {
                match request {
                    Request::Append {
                        seq,
                        payload,
                        reply,
                    } => appends.push((seq, payload, reply)),
                    Request::Rotate { reply } => {
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.rotate());
                    }
                }
            }
            self.commit(appends);
        }
    }

    /// Writes and syncs a group of records, then answers each.
    fn commit(&mut self, appends: Vec<Append>) {
        let Some(last) = appends.last().map(|(seq, _, _)| *seq) else {
            return;
        };
        let result = self.write_group(&appends);
        if result.is_ok() {
            self.shared.next_seq.store(last + 1, Ordering::Relaxed);
        }
        for (seq, _, reply) in appends {
            let answer = match &result {
                Ok(()) => Ok(seq),
                Err(message) => Err(PersistError::Unavailable(message.clone())),
            };
            let _ = reply.send(answer);
        }
        if result.is_ok() && self.open_bytes() > self.options.segment_bytes {
            if let Err(error) = self.rotate() {
                tracing::error!(%error, "write-ahead log rotation failed");
            }
        }
    }

    fn write_group(&mut self, appends: &[Append]) -> std::result::Result<(), String> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err("the write-ahead log failed earlier; restart to recover".into());
        }
        self.buffer.clear();
        let mut written = Ok(());
        let mut len = 0u64;
        for (seq, payload, _) in appends {
            let seq = *seq;
            len += (frame::HEADER_BYTES + payload.len()) as u64;
            if payload.len() < DIRECT_BYTES {
                frame::encode(seq, payload, &mut self.buffer);
                continue;
            }
            // A large record (an import) is written from where it is, not copied first.
            frame::encode_header(seq, payload, &mut self.buffer);
            written = written
                .and_then(|()| self.file.write_all(&self.buffer))
                .and_then(|()| self.file.write_all(payload));
            self.buffer.clear();
        }
        let written = written
            .and_then(|()| self.file.write_all(&self.buffer))
            .and_then(|()| self.file.sync_data());
        self.last_sync = Instant::now();
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = written {
            self.shared.failed.store(true, Ordering::Relaxed);
            tracing::error!(%error, "write-ahead log write failed; no further write is acknowledged");
            return Err(format!("write-ahead log: {error}"));
        }
        self.shared.bytes.fetch_add(len, Ordering::Relaxed);
        if let Ok(mut segments) = self.shared.segments.lock() {
            if let Some(open) = segments.last_mut() {
                open.bytes += len;
            }
        }
        if self.buffer.capacity() > 16 << 20 {
            self.buffer = Vec::new();
        }
        Ok(())
    }

    fn open_bytes(&self) -> u64 {
        self.shared
            .segments
            .lock()
            .ok()
            .and_then(|s| s.last().map(|s| s.bytes))
            .unwrap_or(0)
    }

    fn rotate(&mut self) -> Result<u64> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(PersistError::Unavailable(
                "the write-ahead log failed earlier; restart to recover".into(),
            ));
        }
        let next = self.shared.next_seq.load(Ordering::Relaxed);
        let is_empty = self
            .shared
            .segments
            .lock()
            .map_err(|_| PersistError::Closed)?
            .last()
            .is_some_and(|s| s.first_seq == next);
        if is_empty {
            return Ok(next);
        }
        let (file, segment) = create_segment(&self.dir, next)?;
        self.file = file;
        self.shared
            .bytes
            .fetch_add(segment.bytes, Ordering::Relaxed);
        self.shared
            .segments
            .lock()
            .map_err(|_| PersistError::Closed)?
            .push(segment);
        Ok(next)
    }
}
