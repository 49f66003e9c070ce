//! Which mode a data directory belongs to: the embedded store's own log and snapshots, or the
//! local cache of one Redis prefix. The two are never mixed: the cache holds snapshots of
//! positions in Redis streams, meaningless to an embedded log, and a cache of one prefix says
//! nothing about another.
//!
//! A cache directory holds `DIR/REDIS_CACHE.json` (`{"format": 1, "redis_prefix": "..."}`),
//! written before anything else goes there; an embedded directory holds `DIR/wal/`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::snapshot::write_synced;
use super::wal::sync_dir;
use super::{PersistError, Result};

/// The marker file of a cache directory.
pub const MARKER: &str = "REDIS_CACHE.json";

/// The marker's current format.
const FORMAT: u32 = 1;

/// `REDIS_CACHE.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: u32,
    /// The Redis key prefix whose datasets the cache holds.
    redis_prefix: String,
}

/// Makes `dir` (held with [`super::DirLock`]) the local cache of `prefix`, or checks that it is.
///
/// # Errors
/// [`PersistError::WrongDirectory`] when it is an embedded data directory or the cache of
/// another prefix; an unreadable or unwritable marker.
pub fn claim(dir: &Path, prefix: &str) -> Result<()> {
    let path = dir.join(MARKER);
    if let Some(marker) = read(dir)? {
        if marker.redis_prefix == prefix {
            return Ok(());
        }
        return Err(PersistError::WrongDirectory {
            path,
            reason: format!(
                "the local cache of Redis prefix '{}', not of '{prefix}': give each prefix a \
                 directory of its own",
                marker.redis_prefix
            ),
        });
    }
    if dir.join("wal").exists() {
        return Err(PersistError::WrongDirectory {
            path: dir.to_owned(),
            reason: "an embedded-mode data directory (it has a write-ahead log), not a Redis \
                     cache: give --redis-url a new directory, or start without --redis-url to \
                     serve it"
                .into(),
        });
    }
    let marker = Marker {
        format: FORMAT,
        redis_prefix: prefix.to_owned(),
    };
    let bytes = serde_json::to_vec_pretty(&marker)
        .map_err(|e| PersistError::Format(format!("{}: {e}", path.display())))?;
    write_synced(&path, &bytes)?;
    sync_dir(dir)
}

/// Refuses a cache directory as an embedded data directory.
///
/// # Errors
/// [`PersistError::WrongDirectory`] when `dir` is the cache of a Redis prefix; an unreadable
/// marker.
pub fn refuse_cache(dir: &Path) -> Result<()> {
    match read(dir)? {
        None => Ok(()),
        Some(marker) => Err(PersistError::WrongDirectory {
            path: dir.join(MARKER),
            reason: format!(
                "the local cache of Redis prefix '{}', not an embedded-mode data directory: \
                 start with --redis-url and --redis-prefix {} to use it, or give --data-dir a \
                 new directory",
                marker.redis_prefix, marker.redis_prefix
            ),
        }),
    }
}

fn read(dir: &Path) -> Result<Option<Marker>> {
    let path = dir.join(MARKER);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PersistError::io(&path, e)),
    };
    let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason: format!("the cache marker does not parse: {e}"),
    })?;
    if marker.format != FORMAT {
        return Err(PersistError::Format(format!(
            "{}: cache marker format {} is not supported (this build reads {FORMAT})",
            path.display(),
            marker.format
        )));
    }
    Ok(Some(marker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::test_dir;

    #[test]
    fn a_cache_belongs_to_one_prefix_and_never_to_the_embedded_store() {
        let dir = test_dir("cache-marker");
        std::fs::create_dir_all(&dir).unwrap();
        refuse_cache(&dir).unwrap();
        claim(&dir, "blue").unwrap();
        claim(&dir, "blue").unwrap();
        let other = claim(&dir, "green").unwrap_err().to_string();
        assert!(other.contains("'blue', not of 'green'"), "{other}");
        let embedded = refuse_cache(&dir).unwrap_err().to_string();
        assert!(
            embedded.contains("cache of Redis prefix 'blue'"),
            "{embedded}"
        );

        let wal = test_dir("cache-marker-wal");
        std::fs::create_dir_all(wal.join("wal")).unwrap();
        let refused = claim(&wal, "blue").unwrap_err().to_string();
        assert!(
            refused.contains("embedded-mode data directory"),
            "{refused}"
        );
        assert!(
            !wal.join(MARKER).exists(),
            "a refused directory is left as it was"
        );
        for dir in [dir, wal] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
