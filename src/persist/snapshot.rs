//! Snapshot directories of the embedded store: every dataset's files at one moment, with a
//! manifest of checksums, published by one rename so that a crash leaves the old snapshot or the
//! new one, never half of one.
//!
//! ```text
//! DIR/snapshots/00000000000000000042-00000000000000000007/MANIFEST.json
//! DIR/snapshots/00000000000000000042-00000000000000000007/<dataset>/<file>
//! ```
//! The directory is named by the first log record it does not cover, then a serial number that
//! grows with each snapshot (the newest wins). Every record before the first number is in the
//! snapshot, and the log segments holding only such records are deleted once it is
//! published. A dataset may also cover some records after that point (they are skipped on
//! replay by its `position`). Each file's CRC-32 is kept per 1 MiB block, so that damage is
//! reported at the offset of the block that holds it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wal::sync_dir;
use super::{PersistError, Position, Result};

/// The manifest's file name; a snapshot without one is incomplete and ignored.
pub const MANIFEST: &str = "MANIFEST.json";

/// Bytes per checksummed block of a file.
const BLOCK_BYTES: usize = 1 << 20;

/// The current manifest format.
const FORMAT: u32 = 1;

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The first log record not covered.
    pub log_from: u64,
    /// When it was written, in Unix milliseconds.
    pub created_at_ms: i64,
    /// Redis mode's local cache: when the oldest delete that no snapshot in Redis held yet was
    /// applied (Unix milliseconds), so that a restart from this cache keeps the erasure clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_delete_ms: Option<i64>,
    pub datasets: Vec<DatasetEntry>,
}

/// One dataset in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetEntry {
    pub name: String,
    /// The last log record applied to this dataset's files.
    pub position: Position,
    /// Redis mode's local cache: the identity of the dataset's log that `position` is in (a
    /// dataset dropped and created again in Redis has another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
    pub files: Vec<FileEntry>,
}

/// One file of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    /// CRC-32 (IEEE) of each 1 MiB block, in order.
    pub block_crc32: Vec<u32>,
}

/// A published snapshot found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// A snapshot being written into a temporary directory.
#[derive(Debug)]
pub struct SnapshotWriter {
    root: PathBuf,
    /// `<name>.tmp`, renamed to `<name>` when finished.
    temp: PathBuf,
    manifest: Manifest,
    bytes: u64,
}

fn block_checksums(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks(BLOCK_BYTES).map(crc32fast::hash).collect()
}

fn snapshot_name(log_from: u64, serial: u64) -> String {
    format!("{log_from:020}-{serial:020}")
}

/// `(log_from, serial)` of a snapshot directory's name.
fn parse_name(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?;
    let (log_from, serial) = name.split_once('-')?;
    Some((log_from.parse().ok()?, serial.parse().ok()?))
}

/// The published snapshots under `root`, newest first.
fn published(root: &Path) -> Result<Vec<((u64, u64), PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PersistError::io(root, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| PersistError::io(root, e))?.path();
        if let Some(key) = parse_name(&path) {
            if path.join(MANIFEST).is_file() {
                found.push((key, path));
            }
        }
    }
    found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(found)
}

/// The root of the snapshots under a data directory.
pub fn root_of(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

impl SnapshotWriter {
    /// Starts a snapshot covering every log record before `log_from`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn begin(root: &Path, log_from: u64, created_at_ms: i64) -> Result<Self> {
        let serial = published(root)?
            .first()
            .map_or(1, |((_, serial), _)| serial + 1);
        let temp = root.join(format!("{}.tmp", snapshot_name(log_from, serial)));
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(|e| PersistError::io(&temp, e))?;
        }
        std::fs::create_dir_all(&temp).map_err(|e| PersistError::io(&temp, e))?;
        Ok(Self {
            root: root.to_owned(),
            temp,
            manifest: Manifest {
                format: FORMAT,
                log_from,
                created_at_ms,
                pending_delete_ms: None,
                datasets: Vec::new(),
            },
            bytes: 0,
        })
    }

    /// Writes one dataset's files.
    ///
    /// # Errors
    /// A file that cannot be written and synced.
    pub fn add_dataset(
        &mut self,
        name: &str,
        position: Position,
        files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        self.add(name, position, None, files)
    }

    /// Writes one dataset's files at `position` of the Redis log `log_id` (the local cache).
    ///
    /// # Errors
    /// A file that cannot be written and synced.
    pub fn add_logged_dataset(
        &mut self,
        name: &str,
        position: Position,
        log_id: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        self.add(name, position, Some(log_id.to_owned()), files)
    }

    /// Records when the oldest delete not yet erased from the shared store was applied.
    pub fn set_pending_delete(&mut self, at_ms: Option<i64>) {
        self.manifest.pending_delete_ms = at_ms;
    }

    fn add(
        &mut self,
        name: &str,
        position: Position,
        log_id: Option<String>,
        files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        let dir = self.temp.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| PersistError::io(&dir, e))?;
        let mut entries = Vec::with_capacity(files.len());
        for (file_name, bytes) in files {
            let path = dir.join(file_name);
            write_synced(&path, bytes)?;
            self.bytes += bytes.len() as u64;
            entries.push(FileEntry {
                name: file_name.clone(),
                bytes: bytes.len() as u64,
                block_crc32: block_checksums(bytes),
            });
        }
        sync_dir(&dir)?;
        self.manifest.datasets.push(DatasetEntry {
            name: name.to_owned(),
            position,
            log_id,
            files: entries,
        });
        Ok(())
    }

    /// Carries a dataset over from an earlier snapshot unchanged (its files hard-linked, or
    /// copied where links are not possible), with the position it had there.
    ///
    /// # Errors
    /// A file that cannot be linked or copied.
    pub fn carry_dataset(&mut self, from: &Found, entry: &DatasetEntry) -> Result<()> {
        let dir = self.temp.join(&entry.name);
        std::fs::create_dir_all(&dir).map_err(|e| PersistError::io(&dir, e))?;
        for file in &entry.files {
            let (source, target) = (
                from.dir.join(&entry.name).join(&file.name),
                dir.join(&file.name),
            );
            if std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target).map_err(|e| PersistError::io(&source, e))?;
            }
            self.bytes += file.bytes;
        }
        sync_dir(&dir)?;
        self.manifest.datasets.push(entry.clone());
        Ok(())
    }

    /// Writes the manifest, publishes the snapshot and deletes every older one; returns its
    /// directory and the bytes of its files.
    ///
    /// # Errors
    /// A write, sync or rename that fails; the previous snapshot then stays the newest.
    pub fn finish(self) -> Result<(PathBuf, u64)> {
        let manifest = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| PersistError::Format(format!("snapshot manifest: {e}")))?;
        write_synced(&self.temp.join(MANIFEST), &manifest)?;
        sync_dir(&self.temp)?;
        let published = self.temp.with_extension("");
        std::fs::rename(&self.temp, &published).map_err(|e| PersistError::io(&published, e))?;
        sync_dir(&self.root)?;
        remove_others(&self.root, &published)?;
        Ok((published, self.bytes))
    }

    /// Gives the snapshot up: its temporary directory is deleted, the newest one stays.
    ///
    /// # Errors
    /// The directory cannot be deleted.
    pub fn abandon(self) -> Result<()> {
        std::fs::remove_dir_all(&self.temp).map_err(|e| PersistError::io(&self.temp, e))
    }
}

/// Deletes every snapshot under `root` (a cache that can no longer be kept current must not
/// keep the bytes of users deleted since).
///
/// # Errors
/// A directory that cannot be deleted.
pub fn remove_all(root: &Path) -> Result<()> {
    match std::fs::metadata(root) {
        Ok(_) => remove_others(root, Path::new("")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PersistError::io(root, e)),
    }
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| PersistError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| PersistError::io(path, e))
}

/// Deletes every snapshot (and leftover temporary directory) but `keep`: older snapshots may
/// hold the bytes of users deleted since.
fn remove_others(root: &Path, keep: &Path) -> Result<()> {
    let entries = std::fs::read_dir(root).map_err(|e| PersistError::io(root, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PersistError::io(root, e))?.path();
        if path != keep && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| PersistError::io(&path, e))?;
        }
    }
    sync_dir(root)
}

/// The newest published snapshot, if any.
///
/// # Errors
/// An unreadable directory, or a manifest that does not parse (named, with its offset).
pub fn latest(root: &Path) -> Result<Option<Found>> {
    let Some((_, dir)) = published(root)?.into_iter().next() else {
        return Ok(None);
    };
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| PersistError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
        offset: byte_offset(&bytes, e.line(), e.column()),
        path: path.clone(),
        reason: format!("the manifest does not parse: {e}"),
    })?;
    if manifest.format != FORMAT {
        return Err(PersistError::Format(format!(
            "{}: snapshot format {} is not supported (this build reads {FORMAT})",
            path.display(),
            manifest.format
        )));
    }
    Ok(Some(Found { dir, manifest }))
}

/// The byte offset of a 1-based line and column.
fn byte_offset(bytes: &[u8], line: usize, column: usize) -> u64 {
    let line_start: usize = bytes
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (line_start + column.saturating_sub(1)) as u64
}

impl Found {
    /// Reads one file of a dataset and checks it against the manifest.
    ///
    /// # Errors
    /// A missing or short file, or a block that fails its checksum (named with its offset).
    pub fn read(&self, dataset: &DatasetEntry, file: &FileEntry) -> Result<Vec<u8>> {
        let path = self.dir.join(&dataset.name).join(&file.name);
        let bytes = std::fs::read(&path).map_err(|e| PersistError::io(&path, e))?;
        if bytes.len() as u64 != file.bytes {
            return Err(PersistError::Corrupt {
                offset: bytes.len().min(file.bytes as usize) as u64,
                path,
                reason: format!(
                    "{} bytes where the manifest says {}",
                    bytes.len(),
                    file.bytes
                ),
            });
        }
        let actual = block_checksums(&bytes);
        if let Some(block) =
            (0..actual.len()).find(|&i| file.block_crc32.get(i) != Some(&actual[i]))
        {
            return Err(PersistError::Corrupt {
                path,
                offset: (block * BLOCK_BYTES) as u64,
                reason: format!(
                    "the {} KiB block starting here fails its checksum",
                    BLOCK_BYTES / 1024
                ),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        crate::persist::test_dir(&format!("snap-{name}"))
    }

    fn files(seed: u8) -> Vec<(String, Vec<u8>)> {
        vec![
            ("empty".into(), Vec::new()),
            ("big".into(), vec![seed; BLOCK_BYTES * 2 + 17]),
        ]
    }

    #[test]
    fn the_newest_published_snapshot_wins_and_older_ones_are_removed() {
        let root = temp_root("newest");
        for log_from in [5u64, 9] {
            let mut writer = SnapshotWriter::begin(&root, log_from, 1).unwrap();
            writer
                .add_dataset(
                    "default",
                    Position::seq(log_from - 1),
                    &files(log_from as u8),
                )
                .unwrap();
            writer.finish().unwrap();
        }
        // An unfinished one (no manifest) is ignored.
        let mut unfinished = SnapshotWriter::begin(&root, 12, 1).unwrap();
        unfinished
            .add_dataset("default", Position::seq(11), &files(1))
            .unwrap();
        let found = latest(&root).unwrap().unwrap();
        assert_eq!(found.manifest.log_from, 9);
        assert_eq!(
            published(&root).unwrap().len(),
            1,
            "older snapshots are removed"
        );
        let dataset = &found.manifest.datasets[0];
        for (entry, (_, expected)) in dataset.files.iter().zip(files(9)) {
            assert_eq!(found.read(dataset, entry).unwrap(), expected);
        }
        // A snapshot of one dataset carries the others over, under the same log position.
        let mut writer = SnapshotWriter::begin(&root, 9, 2).unwrap();
        writer.carry_dataset(&found, dataset).unwrap();
        writer
            .add_dataset("other", Position::seq(3), &files(3))
            .unwrap();
        writer.finish().unwrap();
        let carried = latest(&root).unwrap().unwrap();
        assert_eq!(carried.manifest.log_from, 9);
        assert_ne!(carried.dir, found.dir);
        assert_eq!(carried.manifest.datasets.len(), 2);
        let entry = &carried.manifest.datasets[0];
        assert_eq!(carried.read(entry, &entry.files[1]).unwrap(), files(9)[1].1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn damage_is_reported_with_the_file_and_offset_of_its_block() {
        let root = temp_root("damage");
        let mut writer = SnapshotWriter::begin(&root, 3, 1).unwrap();
        writer
            .add_dataset("ds", Position::seq(2), &files(7))
            .unwrap();
        let (dir, _) = writer.finish().unwrap();
        let path = dir.join("ds").join("big");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[BLOCK_BYTES + 100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let found = latest(&root).unwrap().unwrap();
        let dataset = &found.manifest.datasets[0];
        match found.read(dataset, &dataset.files[1]) {
            Err(PersistError::Corrupt {
                path: bad, offset, ..
            }) => {
                assert_eq!(bad, path);
                assert_eq!(offset, BLOCK_BYTES as u64);
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        std::fs::write(dir.join(MANIFEST), b"{\n  \"format\": 1,\n  oops").unwrap();
        match latest(&root) {
            Err(PersistError::Corrupt { offset, .. }) => assert!(offset > 10, "{offset}"),
            other => panic!("expected corruption, got {other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
