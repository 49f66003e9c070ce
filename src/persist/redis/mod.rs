//! The shared log of several replicas in Redis: one stream of change records per dataset, a
//! conditional append that lets replicas write optimistically, and chunked snapshots from which
//! a new replica starts.
//!
//! Every replica appends only when the dataset's head is still the position it applied last,
//! so all replicas apply the same records in the same order. A snapshot covers every record up
//! to a position; publishing one trims those records (and their blobs) from the stream.
//!
//! # Key layout
//! Every key starts with the configured prefix `P`, so that deployments and tests share a Redis.
//! `D` is a dataset name, which never contains `:` or glob characters.
//! - `P:datasets`: set of the names of datasets that have records.
//! - `P:announce`: a short stream with one entry per newly created dataset, so that
//!   [`RedisStore::wait`] blocks on "a dataset appeared" the way it blocks on new records.
//! - `P:ds:D:log`: the records: fields `r` (the bytes inline) or `b`, `n`, `len`, `cc` (blob id,
//!   chunk count, length, chunk CRCs), and `crc` (CRC32 of the record).
//! - `P:ds:D:head`: the id of the newest record (absent: `0-0`); never moves back.
//! - `P:ds:D:logid`: the identity of the log, the id of its first record (see
//!   [`RedisStore::log_id`]); a dataset dropped and created again gets another.
//! - `P:blob:B:i`: chunk `i` of a record larger than a chunk; expires until its append succeeds.
//! - `P:ds:D:snapseq`: snapshot id counter; `P:ds:D:snapshot`: the current snapshot id;
//!   `P:ds:D:snapcovers`: what it covers, which is also how far the stream has been trimmed.
//! - `P:ds:D:snap:S:manifest`: the JSON manifest of snapshot `S`; `P:ds:D:snap:S:F:i`: chunk `i`
//!   of its file `F`.

mod identity;
mod snapshot;
#[cfg(test)]
mod tests;

pub use identity::Retention;
pub use snapshot::StoredSnapshot;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, Script,
    ScriptInvocation,
};

use super::{PersistError, Position, Result};

/// Largest value stored in one key or stream field: far below Redis's 512 MiB limit, and small
/// enough that one value never holds up the server or the shared connection for long.
pub const CHUNK_SIZE: usize = 1 << 20;
/// Bounds connecting and every reply, so that a Redis outage surfaces as `Unavailable` instead
/// of a hung write path.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Blob chunks of an append that fails or conflicts disappear on their own after this.
const BLOB_TTL_SECS: u64 = 3600;
/// Chunks per round trip: bounds one request to a few MiB.
const CHUNKS_PER_TRIP: usize = 8;
/// Keys per SCAN step and per UNLINK.
const SCAN_COUNT: usize = 500;
/// Stream entries per XRANGE when walking a whole log (each may carry a 1 MiB record).
const RANGE_COUNT: usize = 100;

/// Checks the head and appends in one step, so that two replicas can never both append after
/// the same record. KEYS: head, log, datasets, announce, log id, blob chunks...; ARGV: expected
/// head, dataset name, stream entry fields and values. Nil means the head moved (a conflict).
/// The first record of a log also sets its id. The announcement stream keeps about 1000
/// entries: a waiter only ever needs the newest.
static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("append.lua")));

/// The shared log and snapshot store of all replicas in one Redis. Cheap to clone: clones share
/// one reconnecting connection.
#[derive(Debug, Clone)]
pub struct RedisStore {
    /// One multiplexed connection for every non-blocking command; it reconnects on its own.
    manager: ConnectionManager,
    /// Opens the dedicated connection of [`Self::wait`]: a blocking XREAD on the shared
    /// connection would stall every command queued behind it.
    client: Client,
    /// Start of every key, so that several deployments (and tests) share one Redis.
    prefix: String,
    /// Largest stored value; larger records and files are split. A field so that tests
    /// exercise chunking with small data.
    chunk_size: usize,
}

/// A value stored as chunk keys `{base}:{i}`: a blob record or a snapshot file.
struct Chunked {
    base: String,
    len: u64,
    crc: u32,
    chunk_crcs: Vec<u32>,
}

impl RedisStore {
    /// Connects to the Redis at `url`; every key will start with `prefix`.
    ///
    /// # Errors
    /// `Unavailable` when Redis does not answer within a few seconds or rejects the connection;
    /// `Format` for an empty prefix.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore> {
        if prefix.is_empty() {
            return Err(PersistError::Format("the Redis key prefix is empty".into()));
        }
        let client = Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_with_config(client.clone(), config);
        let store = RedisStore {
            manager: manager.await.map_err(redis_error)?,
            client,
            prefix: prefix.to_owned(),
            chunk_size: CHUNK_SIZE,
        };
        // A connection can open without the server answering (a proxy, a wrong port).
        store.run::<()>(&redis::cmd("PING")).await?;
        Ok(store)
    }

    #[cfg(test)]
    fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size.max(1);
        self
    }

    /// Appends `record` to `dataset`'s log if its head is still `expected`, and returns the new
    /// head. Records larger than a chunk are stored as blob chunks first; readers never see
    /// the difference.
    ///
    /// # Errors
    /// `Conflict` when another record was appended after `expected` (nothing is written);
    /// `Unavailable` when Redis cannot be reached; `Format` for an invalid dataset name.
    pub async fn append(
        &self,
        dataset: &str,
        expected: Position,
        record: &[u8],
    ) -> Result<Position> {
        check_dataset(dataset)?;
        let mut invocation = APPEND.prepare_invoke();
        invocation
            .key(&[self.ds_key(dataset, "head"), self.ds_key(dataset, "log")])
            .key(&[self.key("datasets"), self.key("announce")])
            .key(self.ds_key(dataset, "logid"))
            .arg(&[expected.to_string(), dataset.to_owned()])
            .arg("crc")
            .arg(crc32fast::hash(record));
        let mut chunk_keys = Vec::new();
        if record.len() > self.chunk_size {
            let blob = random_id();
            let base = self.key(&format!("blob:{blob}"));
            chunk_keys = self
                .write_chunks(&base, record, Some(BLOB_TTL_SECS))
                .await?;
            let chunk_crcs: Vec<u8> = record
                .chunks(self.chunk_size)
                .flat_map(|chunk| crc32fast::hash(chunk).to_be_bytes())
                .collect();
            invocation.arg(&["b", &blob, "n", &chunk_keys.len().to_string()]);
            invocation
                .arg(&["len", &record.len().to_string(), "cc"])
                .arg(chunk_crcs);
            invocation.key(&chunk_keys);
        } else {
            invocation.arg("r").arg(record);
        }
        match self.invoke::<Option<String>>(&invocation).await? {
            Some(id) => id.parse(),
            None => {
                if let Err(err) = self.unlink(&chunk_keys).await {
                    tracing::warn!(%err, "cannot delete a conflicting append's blob; it expires");
                }
                Err(PersistError::Conflict)
            }
        }
    }

    /// The records after `after` in log order, at most `max`, each checked against its CRC.
    ///
    /// # Errors
    /// `Corrupt` naming the key and the entry when stored bytes fail their checksum;
    /// `Conflict` when a snapshot has trimmed records after `after` from the log (the caller
    /// must reload from [`Self::latest_snapshot`]); `Unavailable` when Redis cannot be reached;
    /// `Format` for an invalid dataset name.
    pub async fn read_after(
        &self,
        dataset: &str,
        after: Position,
        max: usize,
    ) -> Result<Vec<(Position, Vec<u8>)>> {
        check_dataset(dataset)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let (log, trim_mark) = (
            self.ds_key(dataset, "log"),
            self.ds_key(dataset, "snapcovers"),
        );
        let mut pipe = redis::pipe();
        // Atomic, so that the trim mark describes exactly the entries read with it.
        pipe.atomic().cmd("GET").arg(&trim_mark);
        pipe.cmd("XRANGE")
            .arg(&[log.clone(), format!("({after}"), "+".into(), "COUNT".into()])
            .arg(max.min(i64::MAX as usize));
        let (trimmed, range): (Option<String>, StreamRangeReply) = self.run_pipe(&pipe).await?;
        check_not_trimmed(after, trimmed)?;
        let mut records = Vec::with_capacity(range.ids.len());
        for entry in &range.ids {
            let position: Position = entry.id.parse()?;
            match self.decode_entry(&log, entry).await {
                Ok(record) => records.push((position, record)),
                Err(err @ PersistError::Corrupt { .. }) => {
                    // A snapshot may have trimmed the entry and deleted its blob since the XRANGE.
                    check_not_trimmed(after, self.run(redis::cmd("GET").arg(&trim_mark)).await?)?;
                    return Err(err);
                }
                Err(other) => return Err(other),
            }
        }
        Ok(records)
    }

    /// The position of `dataset`'s newest record; [`Position::START`] when it has none.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached; `Format` when the head is not a stream id.
    pub async fn head(&self, dataset: &str) -> Result<Position> {
        check_dataset(dataset)?;
        let head: Option<String> = self
            .run(redis::cmd("GET").arg(self.ds_key(dataset, "head")))
            .await?;
        head.map_or(Ok(Position::START), |head| head.parse())
    }

    /// The names of every dataset with records, sorted.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub async fn datasets(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .run(redis::cmd("SMEMBERS").arg(self.key("datasets")))
            .await?;
        names.sort_unstable();
        Ok(names)
    }

    /// Blocks until a dataset in `positions` has a record after its position, or a dataset not
    /// in `positions` appears, or `block` passes. True when something new arrived.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached; `Format` for an invalid dataset name.
    pub async fn wait(&self, positions: &[(String, Position)], block: Duration) -> Result<bool> {
        for (dataset, _) in positions {
            check_dataset(dataset)?;
        }
        let announce = self.key("announce");
        let mut pipe = redis::pipe();
        // Atomic, so that a dataset created after this read is announced after `announced`.
        pipe.atomic().cmd("SMEMBERS").arg(self.key("datasets"));
        pipe.cmd("XREVRANGE")
            .arg(&[announce.as_str(), "+", "-", "COUNT", "1"]);
        let (names, newest): (Vec<String>, StreamRangeReply) = self.run_pipe(&pipe).await?;
        if names
            .iter()
            .any(|name| positions.iter().all(|(known, _)| known != name))
        {
            return Ok(true);
        }
        let announced = newest
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone());
        let mut xread = redis::cmd("XREAD");
        xread.arg(&["COUNT", "1"]);
        // Redis reads BLOCK 0 as "forever"; a zero wait is a plain non-blocking read.
        let block_ms = u64::try_from(block.as_millis())
            .map_or(u64::from(u32::MAX), |ms| ms.min(u64::from(u32::MAX)));
        if block_ms > 0 {
            xread.arg("BLOCK").arg(block_ms);
        }
        xread.arg("STREAMS");
        xread.arg(
            positions
                .iter()
                .map(|(dataset, _)| self.ds_key(dataset, "log"))
                .collect::<Vec<_>>(),
        );
        xread.arg(&announce);
        xread.arg(
            positions
                .iter()
                .map(|(_, position)| position.to_string())
                .collect::<Vec<_>>(),
        );
        xread.arg(announced);
        let response_timeout = Duration::from_millis(block_ms).saturating_add(TIMEOUT);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let blocking = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let mut blocking = blocking.await.map_err(redis_error)?;
        let arrived = xread.query_async::<Option<StreamReadReply>>(&mut blocking);
        Ok(arrived
            .await
            .map_err(redis_error)?
            .is_some_and(|reply| !reply.keys.is_empty()))
    }

    /// Deletes every key of `dataset`, its blobs and its name; for tests and cleanup, not
    /// meant to race with writers.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub async fn delete_dataset(&self, dataset: &str) -> Result<()> {
        check_dataset(dataset)?;
        self.unlink(&self.blob_chunks(dataset, None).await?).await?;
        let pattern = format!("{}*", escape_glob(&self.ds_key(dataset, "")));
        self.delete_matching(&pattern, |_| true).await?;
        self.run(redis::cmd("SREM").arg(self.key("datasets")).arg(dataset))
            .await
    }

    /// Deletes every key under the prefix; for tests.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub async fn delete_all(&self) -> Result<()> {
        self.delete_matching(&format!("{}:*", escape_glob(&self.prefix)), |_| true)
            .await
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    fn ds_key(&self, dataset: &str, suffix: &str) -> String {
        format!("{}:ds:{dataset}:{suffix}", self.prefix)
    }

    /// Runs one command on the shared connection.
    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        cmd.query_async(&mut self.manager.clone())
            .await
            .map_err(redis_error)
    }

    async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T> {
        let mut con = self.manager.clone();
        invocation.invoke_async(&mut con).await.map_err(redis_error)
    }

    async fn run_pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
        pipe.query_async(&mut self.manager.clone())
            .await
            .map_err(redis_error)
    }

    /// Reconstructs the record of one stream entry.
    async fn decode_entry(&self, log: &str, entry: &StreamId) -> Result<Vec<u8>> {
        let context = format!("entry {} of {log}", entry.id);
        let Some(crc) = entry.get::<u32>("crc") else {
            return Err(corrupt(log, format!("{context}: no CRC field")));
        };
        if let Some(record) = entry.get::<Vec<u8>>("r") {
            if crc32fast::hash(&record) != crc {
                return Err(corrupt(log, format!("{context}: the record fails its CRC")));
            }
            return Ok(record);
        }
        let (Some(blob), Some(count), Some(len), Some(chunk_crcs)) = (
            entry.get::<String>("b"),
            entry.get::<usize>("n"),
            entry.get::<u64>("len"),
            entry.get::<Vec<u8>>("cc"),
        ) else {
            return Err(corrupt(
                log,
                format!("{context}: neither a record nor a blob"),
            ));
        };
        if chunk_crcs.len() != count.saturating_mul(4) {
            return Err(corrupt(
                log,
                format!("{context}: {count} chunks, other CRC count"),
            ));
        }
        let chunk_crcs = chunk_crcs
            .chunks_exact(4)
            .map(|crc| u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]))
            .collect();
        let base = self.key(&format!("blob:{blob}"));
        self.read_chunked(
            &Chunked {
                base,
                len,
                crc,
                chunk_crcs,
            },
            &context,
        )
        .await
    }

    /// Writes `bytes` as chunk keys `{base}:{i}` and returns the keys.
    async fn write_chunks(
        &self,
        base: &str,
        bytes: &[u8],
        ttl_secs: Option<u64>,
    ) -> Result<Vec<String>> {
        let chunks: Vec<&[u8]> = bytes.chunks(self.chunk_size).collect();
        let keys: Vec<String> = (0..chunks.len()).map(|i| format!("{base}:{i}")).collect();
        for (keys, chunks) in keys
            .chunks(CHUNKS_PER_TRIP)
            .zip(chunks.chunks(CHUNKS_PER_TRIP))
        {
            let mut pipe = redis::pipe();
            for (key, chunk) in keys.iter().zip(chunks) {
                pipe.cmd("SET").arg(key).arg(*chunk);
                if let Some(ttl) = ttl_secs {
                    pipe.arg("EX").arg(ttl);
                }
                pipe.ignore();
            }
            self.run_pipe::<()>(&pipe).await?;
        }
        Ok(keys)
    }

    /// Reads and checks a chunked value: each chunk against its CRC, then the whole.
    async fn read_chunked(&self, value: &Chunked, context: &str) -> Result<Vec<u8>> {
        let keys: Vec<String> = (0..value.chunk_crcs.len())
            .map(|i| format!("{}:{i}", value.base))
            .collect();
        let mut chunks = Vec::with_capacity(keys.len());
        for keys in keys.chunks(CHUNKS_PER_TRIP) {
            chunks.extend(
                self.run::<Vec<Option<Vec<u8>>>>(redis::cmd("MGET").arg(keys))
                    .await?,
            );
        }
        for ((key, chunk), crc) in keys.iter().zip(&chunks).zip(&value.chunk_crcs) {
            let Some(chunk) = chunk else {
                return Err(corrupt(key, format!("{context}: chunk missing")));
            };
            if crc32fast::hash(chunk) != *crc {
                return Err(corrupt(key, format!("{context}: chunk fails its CRC")));
            }
        }
        let bytes = chunks.into_iter().flatten().collect::<Vec<_>>().concat();
        if bytes.len() as u64 != value.len || crc32fast::hash(&bytes) != value.crc {
            let reason = format!(
                "{context}: {} bytes, {} expected, or bad CRC",
                bytes.len(),
                value.len
            );
            return Err(corrupt(&value.base, reason));
        }
        Ok(bytes)
    }

    /// The chunk keys of the blobs referenced by `dataset`'s entries up to `until` (all: None).
    async fn blob_chunks(&self, dataset: &str, until: Option<Position>) -> Result<Vec<String>> {
        let log = self.ds_key(dataset, "log");
        let end = until.map_or_else(|| "+".to_owned(), |until| until.to_string());
        let mut start = "-".to_owned();
        let mut keys = Vec::new();
        loop {
            let mut xrange = redis::cmd("XRANGE");
            xrange
                .arg(&[&log, &start, &end])
                .arg("COUNT")
                .arg(RANGE_COUNT);
            let range: StreamRangeReply = self.run(&xrange).await?;
            for entry in &range.ids {
                if let (Some(blob), Some(count)) =
                    (entry.get::<String>("b"), entry.get::<usize>("n"))
                {
                    keys.extend((0..count).map(|i| self.key(&format!("blob:{blob}:{i}"))));
                }
            }
            match range.ids.last() {
                Some(last) if range.ids.len() == RANGE_COUNT => start = format!("({}", last.id),
                Some(_) | None => return Ok(keys),
            }
        }
    }

    /// Deletes the keys matching the SCAN `pattern` for which `delete` holds.
    async fn delete_matching(&self, pattern: &str, delete: impl Fn(&str) -> bool) -> Result<()> {
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg(&["MATCH", pattern, "COUNT"])
                .arg(SCAN_COUNT);
            let (next, keys): (u64, Vec<String>) = self.run(&scan).await?;
            let doomed: Vec<String> = keys.into_iter().filter(|key| delete(key)).collect();
            self.unlink(&doomed).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn unlink(&self, keys: &[String]) -> Result<()> {
        for keys in keys.chunks(SCAN_COUNT) {
            self.run::<()>(redis::cmd("UNLINK").arg(keys)).await?;
        }
        Ok(())
    }
}

/// Dataset names become parts of keys and SCAN patterns: the engine's rule keeps `:` and glob
/// characters out, so that one dataset's keys never match another's pattern.
fn check_dataset(name: &str) -> Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(PersistError::Format(format!(
            "dataset name '{name}' not usable in a key: use 1-64 of [A-Za-z0-9_.-]"
        )))
    }
}

/// Records up to the trim mark are gone from the log; a reader behind it would silently miss
/// them, so it is told to start again from the snapshot.
fn check_not_trimmed(after: Position, trimmed: Option<String>) -> Result<()> {
    match trimmed {
        Some(trimmed) if after < trimmed.parse::<Position>()? => Err(PersistError::Conflict),
        Some(_) | None => Ok(()),
    }
}

/// The smallest stream id after `position`.
fn next_position(position: Position) -> Position {
    match position.minor.checked_add(1) {
        Some(minor) => Position { minor, ..position },
        None => Position {
            major: position.major.saturating_add(1),
            minor: 0,
        },
    }
}

/// 128 random bits in hex: blob ids must not collide between replicas, and std's randomly
/// keyed hasher is random enough without another dependency.
fn random_id() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let high = RandomState::new().hash_one((call, nanos, std::process::id()));
    let low = RandomState::new().hash_one((nanos, call));
    format!("{high:016x}{low:016x}")
}

fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn corrupt(key: &str, reason: String) -> PersistError {
    PersistError::Corrupt {
        path: PathBuf::from(key),
        offset: 0,
        reason,
    }
}

/// Replies that do not have the shape this store writes are `Format`; every other failure
/// means the store cannot serve us now, and nothing may be assumed written.
fn redis_error(err: RedisError) -> PersistError {
    let message = err.to_string();
    match err.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            PersistError::Format(format!("unexpected reply from Redis: {message}"))
        }
        ErrorKind::Extension if err.code() == Some("WRONGTYPE") => PersistError::Format(format!(
            "a key holds another type than this store writes: {message}"
        )),
        ErrorKind::Io
        | ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Client
        | ErrorKind::Extension
        | ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel
        | ErrorKind::EmptySentinelList
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(_)
        | ErrorKind::RESP3NotSupported => PersistError::Unavailable(message),
        // `ErrorKind` is `#[non_exhaustive]`, so the compiler demands this arm: kinds a later
        // `redis` adds are treated as an outage, which promises nothing was written.
        _ => PersistError::Unavailable(message),
    }
}
