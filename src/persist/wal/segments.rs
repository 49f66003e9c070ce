//! The log's segment files: naming, listing, creating, and reading them back at recovery.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::frame::{self, Ending, MAGIC};
use super::super::{PersistError, Result};

/// A closed or open segment file.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) first_seq: u64,
    pub(super) path: PathBuf,
    pub(super) bytes: u64,
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
pub(super) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

/// Segments in a directory, oldest first.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
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
pub(super) fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, Segment)> {
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
