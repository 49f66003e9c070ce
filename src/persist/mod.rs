//! Durable storage under the engine: a log of change records and snapshots of whole dataset
//! versions, kept in a local directory or in Redis.
//!
//! This layer moves opaque bytes: it knows records, positions, files and checksums, never what a
//! record or a snapshot file means (that is the engine's). The engine appends a record before it
//! publishes the version the record produced, and recovers by loading the newest snapshot and
//! applying the records after it.
//!
//! # Layout
//! - [`frame`]: the checksummed framing shared by log segments and snapshot files.
//! - [`wal`]: the embedded write-ahead log: segment files, group commit, fsync policy.
//! - [`snapshot`]: snapshot directories: files, a manifest with checksums, atomic publication.
//! - [`redis`]: the shared store of several replicas: a stream per dataset, chunked snapshots.
//! - [`cache`]: the marker that makes a data directory the local cache of one Redis prefix.

pub mod cache;
pub mod frame;
pub mod redis;

pub mod snapshot;
pub mod wal;

use std::path::PathBuf;

/// Where a record sits in its log. Embedded logs number records from 1 (`major`, with
/// `minor = 0`); Redis streams use their entry ids (`major-minor`). Ordered like the log.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub major: u64,
    pub minor: u64,
}

impl Position {
    /// Before every record.
    pub const START: Position = Position { major: 0, minor: 0 };

    /// The position of the `n`-th record of an embedded log.
    pub fn seq(n: u64) -> Self {
        Self { major: n, minor: 0 }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.major, self.minor)
    }
}

impl std::str::FromStr for Position {
    type Err = PersistError;

    /// Parses `major-minor` (a Redis stream id) or a bare `major`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || PersistError::Format(format!("'{text}' is not a log position"));
        let (major, minor) = text.split_once('-').unwrap_or((text, "0"));
        Ok(Self {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes that fail their checksum or do not parse, where a torn write cannot explain them.
    #[error("{path}: corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("storage format: {0}")]
    Format(String),
    /// The store cannot be reached now (Redis down); nothing was written.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A conditional append found another writer's record at the head (Redis mode).
    #[error("the log moved on from the expected position")]
    Conflict,
    #[error("storage closed")]
    Closed,
    /// Another process (or engine) has the data directory open.
    #[error("{0}: the data directory is in use by another server")]
    Locked(PathBuf),
    /// The data directory belongs to the other mode, or to another Redis prefix.
    #[error("{path}: {reason}")]
    WrongDirectory { path: PathBuf, reason: String },
}

impl PersistError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PersistError::Io {
            path: path.into(),
            source,
        }
    }
}

/// An exclusive hold on a data directory for as long as it lives, so that two servers never
/// write the same log and snapshots.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes `DIR/LOCK` (created if needed) without waiting.
    ///
    /// # Errors
    /// The directory cannot be created, or another holder has it ([`PersistError::Locked`]).
    pub fn acquire(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| PersistError::io(dir, e))?;
        let path = dir.join("LOCK");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| PersistError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(PersistError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => Err(PersistError::io(&path, e)),
        }
    }
}

/// The layer's result type.
pub type Result<T, E = PersistError> = std::result::Result<T, E>;

/// When an appended record is forced to disk before its write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every write waits for its own fsync (shared with writes that arrive at the same time):
    /// what is queued is synced at once.
    #[default]
    Always,
    /// A group fsync waits, up to `fsync_interval_ms` after the previous one, for the records
    /// of writes still in progress, and no longer once every one has queued: a lone writer is
    /// not held, concurrent writers share one fsync, and under a steady load there is at most
    /// one fsync per interval.
    Interval,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "interval" => Ok(FsyncPolicy::Interval),
            other => Err(format!(
                "'{other}' is not an fsync policy: use always or interval"
            )),
        }
    }
}

/// A directory of its own for one unit test (under the system's temporary directory, absent).
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("audience-{name}-{}-{nanos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_has_one_holder_at_a_time() {
        let dir = test_dir("lock");
        let first = DirLock::acquire(&dir).unwrap();
        assert!(matches!(
            DirLock::acquire(&dir),
            Err(PersistError::Locked(_))
        ));
        drop(first);
        let again = DirLock::acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
