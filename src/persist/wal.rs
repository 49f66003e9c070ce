//! The embedded write-ahead log: records appended to segment files in a directory, each
//! acknowledged only once it is on disk.
//!
//! One thread owns the open segment. Appends queue to it; it writes every queued record with one
//! `write` and makes them durable with one `fdatasync` (group commit), so that writers to
//! different datasets share the cost. With [`FsyncPolicy::Interval`] it also waits until the
//! interval since the last sync has passed, gathering more records per sync.
//!
//! Segments are named by the sequence number of their first record (`00000000000000000001.log`)
//! and rotated past a size; a snapshot rotates the log too, so that the files before it hold only
//! records the snapshot covers and can be deleted whole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::frame::{self, Ending, MAGIC};
use super::{FsyncPolicy, PersistError, Position, Result};

/// Records from this size on are written from their own buffer rather than copied into the
/// group's.
const DIRECT_BYTES: usize = 1 << 20;

/// How the log writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    pub policy: FsyncPolicy,
    /// The longest a write waits for its group's sync under [`FsyncPolicy::Interval`].
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

/// A closed or open segment file.
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
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
    /// Set after a failed write or sync: what reached the disk is unknown, so nothing more is
    /// acknowledged until a restart recovers the log.
    failed: AtomicBool,
}

enum Request {
    Append {
        seq: u64,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Rotate {
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// Where appends queue, and the sequence number the next one gets: assigned and sent under one
/// lock, so that numbers follow the queue order.
#[derive(Debug)]
struct Submitter {
    sender: Option<Sender<Request>>,
    next_seq: u64,
}

/// A record handed to the log: its sequence number, known at once, and the answer once it is
/// durable.
pub type Submitted = (u64, oneshot::Receiver<Result<u64>>);

/// The open log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    requests: Mutex<Submitter>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What recovery read.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// Records read and handed over.
    pub records: u64,
    /// What was dropped, one line each (a torn tail; with repair, corrupt data and all after).
    pub dropped: Vec<String>,
}

/// The segment file of a first sequence number.
fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

/// Segments in a directory, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PersistError::io(dir, e)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PersistError::io(dir, e))?;
        let path = entry.path();
        let Some(first_seq) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = entry
            .metadata()
            .map_err(|e| PersistError::io(&path, e))?
            .len();
        segments.push(Segment {
            first_seq,
            path,
            bytes,
        });
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

/// The first segment of the log in `dir` (its first record's number and its file), if any.
///
/// # Errors
/// An unreadable directory.
pub fn first_segment(dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_segments(dir)?
        .into_iter()
        .next()
        .map(|s| (s.first_seq, s.path)))
}

/// Reads every record of the log in `dir` in order, handing each to `visit`, and leaves the
/// directory ready to append to: a torn tail is cut off (with a warning in `dropped`).
///
/// With `repair`, corruption (or a record `visit` refuses) cuts the log there instead of
/// failing: the rest of that segment and every later segment are deleted and listed in
/// `dropped`.
///
/// # Errors
/// Corruption without `repair`, naming the file and the byte offset; an unreadable directory.
pub fn recover(
    dir: &Path,
    repair: bool,
    mut visit: impl FnMut(u64, &[u8]) -> std::result::Result<(), String>,
) -> Result<Recovered> {
    let segments = list_segments(dir)?;
    let mut recovered = Recovered {
        // An empty segment still says where numbering had reached.
        next_seq: segments.last().map_or(1, |s| s.first_seq.max(1)),
        ..Recovered::default()
    };
    let mut expected: Option<u64> = None;
    for (index, segment) in segments.iter().enumerate() {
        let is_last = index + 1 == segments.len();
        let bytes = frame::read_file(&segment.path)?;
        let (records, ending) = frame::read_segment(&bytes);
        let mut cut: Option<(u64, String)> = None;
        for record in &records {
            if let Some(wanted) = expected.filter(|&e| e != record.seq) {
                let reason = format!(
                    "expected record {wanted}, found {}: records are missing",
                    record.seq
                );
                cut = Some((record.offset, reason));
                break;
            }
            if let Err(reason) = visit(record.seq, record.payload) {
                cut = Some((record.offset, reason));
                break;
            }
            recovered.records += 1;
            expected = Some(record.seq + 1);
            recovered.next_seq = recovered.next_seq.max(record.seq + 1);
        }
        if cut.is_none() {
            match ending {
                Ending::Clean => {}
                Ending::Torn { offset } if is_last => {
                    let message = format!(
                        "{}: dropped a torn last record at byte offset {offset} ({} bytes)",
                        segment.path.display(),
                        bytes.len() as u64 - offset
                    );
                    tracing::warn!("{message}");
                    recovered.dropped.push(message);
                    truncate(&segment.path, offset)?;
                }
                Ending::Torn { offset } => {
                    cut = Some((
                        offset,
                        "a record is cut short before the last segment".into(),
                    ))
                }
                Ending::Corrupt { offset, reason } => cut = Some((offset, reason)),
            }
        }
        if let Some((offset, reason)) = cut {
            if !repair {
                return Err(PersistError::Corrupt {
                    path: segment.path.clone(),
                    offset,
                    reason,
                });
            }
            let message = format!(
                "{}: {reason} at byte offset {offset}; dropped the {} bytes from there and {} \
                 later segment(s)",
                segment.path.display(),
                bytes.len() as u64 - offset,
                segments.len() - index - 1
            );
            tracing::warn!("{message}");
            recovered.dropped.push(message);
            recovered.next_seq = expected.unwrap_or(segment.first_seq);
            truncate(&segment.path, offset.max(MAGIC.len() as u64))?;
            for later in &segments[index + 1..] {
                std::fs::remove_file(&later.path).map_err(|e| PersistError::io(&later.path, e))?;
            }
            break;
        }
    }
    Ok(recovered)
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| PersistError::io(path, e))?;
    file.set_len(len).map_err(|e| PersistError::io(path, e))?;
    file.sync_all().map_err(|e| PersistError::io(path, e))
}

/// Makes a directory's entries (new, renamed or removed files) durable.
///
/// # Errors
/// The directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PersistError::io(dir, e))
}

/// A new, empty segment with its magic, durable with its directory entry.
fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, Segment)> {
    let path = segment_path(dir, first_seq);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| PersistError::io(&path, e))?;
    file.write_all(MAGIC)
        .and_then(|()| file.sync_all())
        .map_err(|e| PersistError::io(&path, e))?;
    sync_dir(dir)?;
    let segment = Segment {
        first_seq,
        path,
        bytes: MAGIC.len() as u64,
    };
    Ok((file, segment))
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
            failed: AtomicBool::new(false),
        });
        let (sender, receiver) = std::sync::mpsc::channel();
        let writer = Writer {
            dir: dir.to_owned(),
            file,
            shared: shared.clone(),
            options,
            last_sync: Instant::now(),
            buffer: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("audience-wal".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| PersistError::io(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            requests: Mutex::new(Submitter {
                sender: Some(sender),
                next_seq,
            }),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, request: Request) -> Result<()> {
        let guard = self.requests.lock().map_err(|_| PersistError::Closed)?;
        guard
            .sender
            .as_ref()
            .ok_or(PersistError::Closed)?
            .send(request)
            .map_err(|_| PersistError::Closed)
    }

    /// Queues one record and returns its sequence number at once, with the answer that comes
    /// once it is durable: a writer can go on (and the next one queue after it) while the sync
    /// runs, so that records of one dataset share syncs too.
    ///
    /// # Errors
    /// A closed log.
    pub fn submit(&self, payload: Vec<u8>) -> Result<Submitted> {
        let (reply, done) = oneshot::channel();
        let mut submitter = self.requests.lock().map_err(|_| PersistError::Closed)?;
        let seq = submitter.next_seq;
        submitter
            .sender
            .as_ref()
            .ok_or(PersistError::Closed)?
            .send(Request::Append {
                seq,
                payload,
                reply,
            })
            .map_err(|_| PersistError::Closed)?;
        submitter.next_seq += 1;
        Ok((seq, done))
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
        let (_, done) = self.submit(payload)?;
        Self::durable(done).await
    }

    /// Closes the open segment and starts a new one; returns the first sequence number of the
    /// new one (every record before it is in closed segments).
    ///
    /// # Errors
    /// As [`Wal::append`].
    pub async fn rotate(&self) -> Result<u64> {
        let (reply, done) = oneshot::channel();
        self.send(Request::Rotate { reply })?;
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

    /// Stops the writer after the records already queued.
    pub fn close(&self) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.sender.take();
        }
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

/// A queued record: sequence number, payload, and where its answer goes.
type Append = (u64, Vec<u8>, oneshot::Sender<Result<u64>>);

/// The thread that owns the open segment.
struct Writer {
    dir: PathBuf,
    file: File,
    shared: Arc<Shared>,
    options: WalOptions,
    last_sync: Instant,
    /// Reused for each group's bytes.
    buffer: Vec<u8>,
}

impl Writer {
    fn run(mut self, requests: Receiver<Request>) {
        while let Ok(first) = requests.recv() {
            let mut group = vec![first];
            self.gather(&requests, &mut group);
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

    /// Adds what else is queued to `group`: what is there now, or, under the interval policy,
    /// what arrives until the interval since the last sync has passed.
    fn gather(&self, requests: &Receiver<Request>, group: &mut Vec<Request>) {
        if self.options.policy == FsyncPolicy::Interval {
            let deadline = self.last_sync + self.options.interval;
            loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                match requests.recv_timeout(wait) {
                    Ok(request) => group.push(request),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        group.extend(requests.try_iter());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        crate::persist::test_dir(&format!("wal-{name}"))
    }

    type Records = Vec<(u64, Vec<u8>)>;

    fn read_all(dir: &Path, repair: bool) -> Result<(Records, Recovered)> {
        let mut seen = Vec::new();
        let recovered = recover(dir, repair, |seq, payload| {
            seen.push((seq, payload.to_vec()));
            Ok(())
        })?;
        Ok((seen, recovered))
    }

    #[tokio::test]
    async fn appended_records_come_back_in_order_across_rotations_and_restarts() {
        let dir = temp_dir("order");
        let options = WalOptions {
            segment_bytes: 200,
            ..WalOptions::default()
        };
        let wal = Wal::open(&dir, 1, options).unwrap();
        for i in 0..50u64 {
            let position = wal
                .append(format!("record {i}").into_bytes())
                .await
                .unwrap();
            assert_eq!(position, Position::seq(i + 1));
        }
        wal.close();
        let (seen, recovered) = read_all(&dir, false).unwrap();
        assert_eq!(recovered.next_seq, 51);
        assert!(
            list_segments(&dir).unwrap().len() > 3,
            "segments rotate by size"
        );
        let expected: Vec<(u64, Vec<u8>)> = (0..50u64)
            .map(|i| (i + 1, format!("record {i}").into_bytes()))
            .collect();
        assert_eq!(seen, expected);
        let wal = Wal::open(&dir, recovered.next_seq, options).unwrap();
        assert_eq!(
            wal.append(b"after".to_vec()).await.unwrap(),
            Position::seq(51)
        );
        wal.close();
        assert_eq!(read_all(&dir, false).unwrap().0.len(), 51);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn large_records_are_written_in_place_between_small_ones() {
        let dir = temp_dir("large");
        let wal = Arc::new(Wal::open(&dir, 1, WalOptions::default()).unwrap());
        let large: Vec<u8> = (0..DIRECT_BYTES * 3 + 5).map(|i| (i % 251) as u8).collect();
        let payloads = [
            b"small".to_vec(),
            large,
            b"after".to_vec(),
            vec![7; DIRECT_BYTES],
        ];
        let tasks: Vec<_> = payloads
            .iter()
            .map(|p| {
                let (wal, p) = (wal.clone(), p.clone());
                tokio::spawn(async move { wal.append(p).await })
            })
            .collect();
        let mut by_seq = Vec::new();
        for (task, payload) in tasks.into_iter().zip(&payloads) {
            by_seq.push((task.await.unwrap().unwrap().major, payload.clone()));
        }
        by_seq.sort();
        wal.close();
        assert_eq!(read_all(&dir, false).unwrap().0, by_seq);
        assert_eq!(
            wal.bytes(),
            std::fs::metadata(segment_path(&dir, 1)).unwrap().len(),
            "the size kept matches the file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn concurrent_appends_share_syncs_under_both_policies() {
        for policy in [FsyncPolicy::Always, FsyncPolicy::Interval] {
            let dir = temp_dir("group");
            let options = WalOptions {
                policy,
                ..WalOptions::default()
            };
            let wal = Arc::new(Wal::open(&dir, 1, options).unwrap());
            let tasks: Vec<_> = (0..64u64)
                .map(|i| {
                    let wal = wal.clone();
                    tokio::spawn(async move { wal.append(i.to_le_bytes().to_vec()).await })
                })
                .collect();
            let mut positions = Vec::new();
            for task in tasks {
                positions.push(task.await.unwrap().unwrap().major);
            }
            positions.sort_unstable();
            assert_eq!(positions, (1..=64).collect::<Vec<_>>(), "{policy:?}");
            wal.close();
            assert_eq!(read_all(&dir, false).unwrap().0.len(), 64);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[tokio::test]
    async fn removing_before_a_rotation_keeps_only_later_records() {
        let dir = temp_dir("remove");
        let wal = Wal::open(&dir, 1, WalOptions::default()).unwrap();
        for i in 0..5u64 {
            wal.append(vec![i as u8; 10]).await.unwrap();
        }
        let next = wal.rotate().await.unwrap();
        assert_eq!(next, 6);
        wal.append(vec![9; 10]).await.unwrap();
        let freed = wal.remove_before(next).unwrap();
        assert!(freed > 0);
        wal.close();
        let (seen, recovered) = read_all(&dir, false).unwrap();
        assert_eq!(seen, vec![(6, vec![9; 10])]);
        assert_eq!(recovered.next_seq, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_and_corruption_names_file_and_offset() {
        let dir = temp_dir("torn");
        let wal = Wal::open(&dir, 1, WalOptions::default()).unwrap();
        for i in 0..3u64 {
            wal.append(vec![i as u8; 100]).await.unwrap();
        }
        wal.close();
        let path = segment_path(&dir, 1);
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 30]).unwrap();
        let (seen, recovered) = read_all(&dir, false).unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(recovered.dropped.len(), 1, "{:?}", recovered.dropped);
        assert_eq!(recovered.next_seq, 3);

        let mut flipped = std::fs::read(&path).unwrap();
        let second = MAGIC.len() + frame::HEADER_BYTES + 100;
        flipped[second + frame::HEADER_BYTES + 5] ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        // A second segment after the damaged one: the damage is not at the tail.
        let wal = Wal::open(&dir, 3, WalOptions::default()).unwrap();
        wal.append(vec![7; 10]).await.unwrap();
        wal.close();
        match read_all(&dir, false) {
            Err(PersistError::Corrupt {
                path: bad, offset, ..
            }) => {
                assert_eq!(bad, path);
                assert_eq!(offset, second as u64);
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        let (seen, recovered) = read_all(&dir, true).unwrap();
        assert_eq!(seen.len(), 1, "repair keeps what precedes the damage");
        assert_eq!(recovered.next_seq, 2);
        assert!(recovered.dropped[0].contains(&format!("byte offset {second}")));
        assert_eq!(
            read_all(&dir, false).unwrap().0.len(),
            1,
            "repaired for good"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
