//! Redis mode's loading of a dataset: its newest snapshot in Redis (or a version of the local
//! cache) and every record after it, with Redis retried while it does not answer.

use std::collections::HashMap;
use std::time::Duration;

use super::error::{EngineError, Result};
use super::replica::{apply_shared, SharedOptions};
use super::snapshot;
use super::state::DatasetState;
use crate::persist::redis::RedisStore;
use crate::persist::PersistError;

/// Records read from Redis per round trip: records up to 1 MiB are inline, so this bounds a
/// reply to a few tens of MiB, well inside the response timeout.
pub(super) const READ_BATCH: usize = 32;

/// Connects, retrying with backoff until Redis answers.
pub(super) async fn connect(options: &SharedOptions) -> RedisStore {
    let mut backoff = Duration::from_millis(100);
    loop {
        match RedisStore::connect(&options.url, &options.prefix).await {
            Ok(store) => return store,
            Err(error) => {
                tracing::warn!(%error, "Redis does not answer; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs a Redis call until it succeeds, with backoff.
pub(super) async fn retry<T, F, Fut>(call: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = crate::persist::Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) => {
                tracing::warn!(%error, "Redis call failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs a load step until Redis answers; damaged data fails at once.
pub(super) async fn retry_load<T, F, Fut>(name: &str, call: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Err(EngineError::Storage(PersistError::Unavailable(error))) => {
                tracing::warn!(%error, dataset = name, "Redis unreachable while loading; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// A dataset loaded at start, and what was applied after its snapshot.
pub(super) struct Loaded {
    pub(super) state: DatasetState,
    /// Records read from Redis and applied.
    pub(super) records: u64,
    pub(super) bytes: u64,
    /// When the oldest of them that deleted users was appended (Unix milliseconds, the Redis
    /// clock in its stream id): the erasure clock runs from there.
    pub(super) oldest_delete: Option<u64>,
}

/// A dataset from its newest snapshot in Redis and every record after it.
pub(super) async fn load(store: &RedisStore, name: &str) -> Result<Loaded> {
    loop {
        let state = match store.latest_snapshot(name).await? {
            Some(stored) => {
                let covers = stored.covers;
                let dataset = name.to_owned();
                let mut state = tokio::task::spawn_blocking(move || {
                    let mut files: HashMap<String, Vec<u8>> = stored.files.into_iter().collect();
                    snapshot::from_files(|file| {
                        files
                            .remove(file)
                            .ok_or_else(|| format!("{file} is not in the snapshot"))
                    })
                    .map_err(|e| {
                        PersistError::Format(format!(
                            "snapshot of dataset '{dataset}' in Redis: {e}"
                        ))
                    })
                })
                .await
                .map_err(|e| EngineError::Internal(format!("snapshot load failed: {e}")))??;
                state.log_position = covers;
                state
            }
            None => DatasetState::default(),
        };
        // Trimmed behind a snapshot written meanwhile: start again from it.
        if let Some(loaded) = load_tail(store, name, state).await? {
            return Ok(loaded);
        }
    }
}

/// `state` with every record after its position applied; `None` when a snapshot has trimmed
/// some of them from the log meanwhile.
pub(super) async fn load_tail(
    store: &RedisStore,
    name: &str,
    mut state: DatasetState,
) -> Result<Option<Loaded>> {
    let (mut records, mut bytes, mut oldest_delete) = (0, 0, None);
    loop {
        let batch = match store.read_after(name, state.log_position, READ_BATCH).await {
            Ok(batch) if batch.is_empty() => {
                state.clear_transitions();
                return Ok(Some(Loaded {
                    state,
                    records,
                    bytes,
                    oldest_delete,
                }));
            }
            Ok(batch) => batch,
            Err(PersistError::Conflict) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        records += batch.len() as u64;
        bytes += batch.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        let dataset = name.to_owned();
        let applied = tokio::task::spawn_blocking(move || {
            let mut oldest_delete = None;
            for (position, bytes) in batch {
                if apply_shared(&mut state, &dataset, position, &bytes) {
                    oldest_delete.get_or_insert(position.major);
                }
            }
            state.clear_transitions();
            (state, oldest_delete)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("load task failed: {e}")))?;
        state = applied.0;
        oldest_delete = oldest_delete.or(applied.1);
    }
}
