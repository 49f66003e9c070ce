//! Snapshots in Redis: chunked files, a JSON manifest, and an atomic switch that publishes a
//! snapshot and trims the records it covers.

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::Script;
use serde::{Deserialize, Serialize};

use super::{check_dataset, corrupt, escape_glob, next_position, Chunked, RedisStore};
use crate::persist::{PersistError, Position, Result};

/// Version of the snapshot manifest; a reader refuses others.
const MANIFEST_VERSION: u32 = 1;

/// Publishes a snapshot and trims what it covers in one step, so that readers never see the
/// trim without the snapshot. Refuses a snapshot older (by id) than the current one, so that a
/// slow writer cannot replace a newer snapshot whose cleanup deleted its chunks, and one that
/// covers less than the current one, since the stream is already trimmed to that.
/// KEYS: snapshot, snapcovers, head, log; ARGV: snapshot id, covers, first id kept.
/// Replies `{1, previous id}`, `{0, current id or covers}` (refused) or `{-1, head}`.
static SWITCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("switch.lua")));

/// A snapshot read back from Redis: every file byte-exact, checked against its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// Every record up to and including this position is reflected in the files.
    pub covers: Position,
    /// File names and contents, in the order they were stored.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The snapshot manifest, JSON at `...:snap:S:manifest`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// A stream id, `major-minor`.
    covers: String,
    /// Milliseconds since the Unix epoch; for operators, not read back.
    created_ms: u64,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    len: u64,
    crc32: u32,
    chunks: usize,
    /// One per chunk, so that corruption is pinned to one key.
    chunk_crc32: Vec<u32>,
}

impl RedisStore {
    /// Stores a snapshot of `dataset` covering every record up to `covers`, makes it the
    /// current one, then trims those records (and their blobs) from the log and deletes older
    /// snapshots. When a newer snapshot was published meanwhile, this one is dropped.
    ///
    /// # Errors
    /// `Format` when `covers` is beyond the head, a file name repeats or the dataset name is
    /// invalid; `Unavailable` when Redis cannot be reached (the current snapshot is unchanged).
    pub async fn put_snapshot(
        &self,
        dataset: &str,
        covers: Position,
        files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        check_dataset(dataset)?;
        let mut names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(PersistError::Format(format!(
                "snapshot file '{}' given twice",
                pair[0]
            )));
        }
        let id: u64 = self
            .run(redis::cmd("INCR").arg(self.ds_key(dataset, "snapseq")))
            .await?;
        let base = self.ds_key(dataset, &format!("snap:{id}"));
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut manifest = Manifest {
            version: MANIFEST_VERSION,
            covers: covers.to_string(),
            created_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            files: Vec::with_capacity(files.len()),
        };
        for (name, bytes) in files {
            let keys = self
                .write_chunks(&format!("{base}:{name}"), bytes, None)
                .await?;
            manifest.files.push(ManifestFile {
                name: name.clone(),
                len: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
                chunks: keys.len(),
                chunk_crc32: bytes.chunks(self.chunk_size).map(crc32fast::hash).collect(),
            });
        }
        let manifest = serde_json::to_vec(&manifest)
            .map_err(|err| PersistError::Format(format!("snapshot manifest: {err}")))?;
        self.run::<()>(
            redis::cmd("SET")
                .arg(format!("{base}:manifest"))
                .arg(manifest),
        )
        .await?;
        // Entries up to `covers` never change (appends go after the head), so their blobs can
        // be listed before the switch trims them.
        let trimmed_blobs = self.blob_chunks(dataset, Some(covers)).await?;
        let mut switch = SWITCH.prepare_invoke();
        switch.key(&[
            self.ds_key(dataset, "snapshot"),
            self.ds_key(dataset, "snapcovers"),
        ]);
        switch.key(&[self.ds_key(dataset, "head"), self.ds_key(dataset, "log")]);
        switch.arg(&[
            id.to_string(),
            covers.to_string(),
            next_position(covers).to_string(),
        ]);
        let (outcome, detail): (i64, String) = self.invoke(&switch).await?;
        if outcome != 1 {
            self.delete_matching(&format!("{}:*", escape_glob(&base)), |_| true)
                .await?;
            if outcome == 0 {
                tracing::info!(dataset, %covers, newer = %detail, "a newer snapshot is published");
                return Ok(());
            }
            return Err(PersistError::Format(format!(
                "snapshot covers {covers}, beyond the head {detail}"
            )));
        }
        self.unlink(&trimmed_blobs).await?;
        let snapshots = self.ds_key(dataset, "snap:");
        let older = |key: &str| {
            let snapshot = key
                .strip_prefix(&snapshots)
                .and_then(|rest| rest.split(':').next());
            snapshot
                .and_then(|snapshot| snapshot.parse::<u64>().ok())
                .is_some_and(|snapshot| snapshot < id)
        };
        self.delete_matching(&format!("{}*", escape_glob(&snapshots)), older)
            .await
    }

    /// The current snapshot of `dataset`, every file checked; None when it has none.
    ///
    /// # Errors
    /// `Corrupt` naming the key whose bytes fail their length or checksum, or that is missing;
    /// `Format` for an unknown manifest version; `Unavailable` when Redis cannot be reached.
    pub async fn latest_snapshot(&self, dataset: &str) -> Result<Option<StoredSnapshot>> {
        check_dataset(dataset)?;
        let mut get_pointer = redis::cmd("GET");
        get_pointer.arg(self.ds_key(dataset, "snapshot"));
        let mut retries = 3;
        loop {
            let Some(id) = self.run::<Option<String>>(&get_pointer).await? else {
                return Ok(None);
            };
            match self.read_snapshot(dataset, &id).await {
                Ok(snapshot) => return Ok(Some(snapshot)),
                Err(err @ PersistError::Corrupt { .. }) => {
                    // A newer snapshot may have replaced this one and deleted it while we read.
                    let now: Option<String> = self.run(&get_pointer).await?;
                    retries -= 1;
                    if now.as_deref() == Some(id.as_str()) || retries == 0 {
                        return Err(err);
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn read_snapshot(&self, dataset: &str, id: &str) -> Result<StoredSnapshot> {
        let base = self.ds_key(dataset, &format!("snap:{id}"));
        let manifest_key = format!("{base}:manifest");
        let manifest: Option<Vec<u8>> = self.run(redis::cmd("GET").arg(&manifest_key)).await?;
        let Some(manifest) = manifest else {
            return Err(corrupt(
                &manifest_key,
                format!("snapshot {id} has no manifest"),
            ));
        };
        let manifest: Manifest = serde_json::from_slice(&manifest)
            .map_err(|err| corrupt(&manifest_key, format!("snapshot {id}: manifest: {err}")))?;
        if manifest.version != MANIFEST_VERSION {
            let version = manifest.version;
            return Err(PersistError::Format(format!(
                "{manifest_key}: unknown version {version}"
            )));
        }
        let mut files = Vec::with_capacity(manifest.files.len());
        for file in manifest.files {
            let context = format!("file '{}' of snapshot {id}", file.name);
            if file.chunk_crc32.len() != file.chunks {
                return Err(corrupt(
                    &manifest_key,
                    format!("{context}: chunk CRCs do not match chunks"),
                ));
            }
            let chunked = Chunked {
                base: format!("{base}:{}", file.name),
                len: file.len,
                crc: file.crc32,
                chunk_crcs: file.chunk_crc32,
            };
            files.push((file.name, self.read_chunked(&chunked, &context).await?));
        }
        let covers = manifest.covers.parse()?;
        Ok(StoredSnapshot { covers, files })
    }
}
