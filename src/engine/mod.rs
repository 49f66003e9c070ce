//! The engine: datasets, their versions, the write path and the queries.
//!
//! Readers take the current [`DatasetState`] of a dataset (an `Arc`, taken under a lock held
//! only for the pointer copy) and never wait for a writer. Writers of one dataset queue on its
//! writer lock, apply their [`Change`] to a shallow clone off the async runtime, and publish the
//! clone only when the whole change succeeded.
//!
//! # Layout
//! - [`change`]: writes as records.
//! - [`state`]: one dataset version and how a change produces the next.
//! - [`plan`], [`eval`]: binding an expression to a snapshot, evaluating it on bitmaps.
//! - [`query`]: counts, breakdowns, samples, overlap, lookups, schema.
//! - [`import`]: Arrow record batches in, Parquet and Arrow IPC readers; [`import_dir`]: the
//!   one directory server-side imports may open.
//! - [`transaction`]: multi-batch imports, published and logged whole.
//! - [`record`], [`snapshot`], [`durable`], [`recovery`]: writes as log records, versions as
//!   snapshot files, logging before publishing, background snapshots, recovery.
//! - [`pipeline`]: writes of one dataset sharing fsyncs; [`replica`]: Redis mode, with
//!   `redis_load` (a dataset from Redis) and `cache` (its local cache in a data directory).
//! - [`cursor`]: member listings that stay on one snapshot from page to page.
//! - [`feed`], [`watch`]: each write's segment transitions, in publish order, for watchers.
//! - [`stats`]: running totals and per-dataset figures for the metrics exporter.

pub mod apply;
mod cache;
pub mod change;
mod coalesce;
pub mod cursor;
pub mod definitions;
pub mod durable;
pub mod error;
pub mod eval;
pub mod event_import;
pub mod events;
pub mod feed;
pub mod import;
pub mod import_dir;
pub mod ipc;
mod limits;
pub mod maintenance;
pub mod pipeline;
pub mod plan;
pub mod query;
pub mod record;
pub mod recovery;
mod redis_load;
pub mod replica;
pub mod segment;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod transaction;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub use crate::index::keys::{validate_key, KeyError};
pub use crate::index::AttributeKind;
pub use change::{
    AttributeChange, AttributeValue, Change, ChangeOp, ChangeOutcome, EventRecord, ImportBatch,
    SegmentDefinition, SegmentPatch, UserUpdate,
};
pub use durable::{DurableOptions, LoadProgress, LogStats, RecoveryReport, SnapshotReport};
pub use error::{EngineError, Result};
pub use limits::Limits;
pub use query::{AsOf, AttributeInfo, Audience, CountResult, OverlapResult};
pub use replica::{Lag, SharedOptions};
pub use segment::Segment;
pub use state::DatasetState;
pub use transaction::Import;
pub use watch::{ChangeKind, MembershipChange, WatchBatch, Watcher};

use crate::expr::Expr;
use crate::time::{Clock, Millis, SystemClock};
use cursor::CursorCache;

/// The dataset every call falls back to.
pub const DEFAULT_DATASET: &str = "default";

/// One dataset: its published version, the lock writers queue on, and its watch feed.
#[derive(Debug, Default)]
struct Dataset {
    /// The version readers see.
    current: RwLock<Arc<DatasetState>>,
    /// Serializes writers; held across the whole of a multi-batch import.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Segment transitions of recent versions, appended in publish order under `writer`.
    feed: feed::Feed,
    /// Versions whose records are being made durable (embedded mode), published in log order.
    pipeline: pipeline::Pipeline,
    /// User writes waiting to be applied together.
    coalesce: coalesce::Queue,
}

impl Dataset {
    fn current(&self) -> Arc<DatasetState> {
        match self.current.read() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Publishes a version and then feeds its transitions to watchers; called under `writer`,
    /// so that the feed order is the publish order. The version goes first, so that a watcher
    /// reading an entry finds its users' external ids in the current version.
    fn publish(&self, mut state: DatasetState, bounds: feed::FeedBounds) {
        let transitions = state.take_transitions();
        self.publish_ready((Arc::new(state), transitions), bounds);
    }

    /// Publishes a version of the pipeline and feeds its transitions, in log order.
    fn publish_ready(&self, (state, transitions): pipeline::Ready, bounds: feed::FeedBounds) {
        let log = state.log_position;
        match self.current.write() {
            Ok(mut current) => *current = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
        self.feed.append(transitions, log, bounds);
    }
}

/// Tokens a text may hold per node of `max_expression_nodes` (the longest predicate,
/// `DID "e" AT LEAST 3 TIMES IN LAST 7d`, has 9; a list literal 2): the parser stops reading past
/// that, so a 64 MiB text costs what its first tokens cost.
const TOKENS_PER_NODE: usize = 16;

/// Every dataset of one service.
#[derive(Debug)]
pub struct Engine {
    datasets: Registry,
    clock: Arc<dyn Clock>,
    limits: Limits,
    cursors: CursorCache,
    /// The log and snapshots once [`Engine::open_durable`] ran; in memory only without.
    journal: std::sync::OnceLock<Arc<durable::Journal>>,
    /// Requests are refused while a start-up load runs.
    progress: LoadProgress,
    /// Running totals for the metrics exporter.
    counters: stats::Counters,
    /// Handles of datasets being created by a first write not yet registered, so that
    /// concurrent first writers (two imports) queue on one writer lock instead of racing.
    creating: std::sync::Mutex<BTreeMap<String, std::sync::Weak<Dataset>>>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(Limits::default(), Arc::new(SystemClock))
    }
}

/// Checks a dataset name: `[A-Za-z0-9_.-]{1,64}`; empty means [`DEFAULT_DATASET`].
///
/// # Errors
/// Any other name.
pub fn dataset_name(name: &str) -> Result<&str> {
    if name.is_empty() {
        return Ok(DEFAULT_DATASET);
    }
    let valid = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(name)
    } else {
        Err(EngineError::InvalidDatasetName(name.to_owned()))
    }
}

impl Engine {
    /// An engine with the `default` dataset, empty.
    pub fn new(limits: Limits, clock: Arc<dyn Clock>) -> Self {
        let mut datasets = BTreeMap::new();
        datasets.insert(DEFAULT_DATASET.to_owned(), Arc::new(Dataset::default()));
        Self {
            datasets: Arc::new(RwLock::new(datasets)),
            clock,
            cursors: CursorCache::new(limits.max_open_cursors, limits.cursor_ttl_secs),
            limits,
            journal: std::sync::OnceLock::new(),
            progress: LoadProgress::default(),
            counters: stats::Counters::default(),
            creating: std::sync::Mutex::default(),
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The clock's current time.
    pub fn now(&self) -> Millis {
        self.clock.now_millis()
    }

    /// Names of every dataset.
    pub fn dataset_names(&self) -> Vec<String> {
        match self.datasets.read() {
            Ok(map) => map.keys().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().keys().cloned().collect(),
        }
    }

    fn dataset(&self, name: &str) -> Result<Arc<Dataset>> {
        let name = dataset_name(name)?;
        let map = self
            .datasets
            .read()
            .map_err(|_| EngineError::Internal("dataset registry lock poisoned".into()))?;
        map.get(name)
            .cloned()
            .ok_or_else(|| EngineError::DatasetNotFound(name.to_owned()))
    }

    /// The dataset's handle, or a new one not yet registered (`Pending`): a dataset exists
    /// only once a write to it has succeeded.
    fn dataset_or_new(&self, name: &str) -> Result<(Arc<Dataset>, Pending)> {
        let name = dataset_name(name)?;
        match self.dataset(name) {
            Ok(dataset) => Ok((dataset, None)),
            Err(EngineError::DatasetNotFound(_)) => {
                let mut creating = self
                    .creating
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Forget handles nobody holds, and those of datasets registered since.
                let registered = self.dataset_names();
                creating.retain(|name, handle| {
                    handle.strong_count() > 0 && registered.binary_search(name).is_err()
                });
                // Datasets being created count too, so that concurrent first writes to new
                // names cannot overshoot together.
                let others = creating.keys().filter(|other| *other != name).count();
                if registered.len() + others >= self.limits.max_datasets {
                    return Err(EngineError::LimitExceeded {
                        what: "the number of datasets",
                        actual: (registered.len() + others + 1) as u64,
                        limit: self.limits.max_datasets as u64,
                    });
                }
                let handle = match creating.get(name).and_then(std::sync::Weak::upgrade) {
                    Some(handle) => handle,
                    None => {
                        let handle = Arc::new(Dataset::default());
                        creating.insert(name.to_owned(), Arc::downgrade(&handle));
                        handle
                    }
                };
                Ok((handle, Some(name.to_owned())))
            }
            Err(other) => Err(other),
        }
    }

    /// The current version of a dataset, for any number of reads.
    ///
    /// # Errors
    /// An invalid or unknown dataset name.
    pub fn snapshot(&self, dataset: &str) -> Result<Arc<DatasetState>> {
        Ok(self.dataset(dataset)?.current())
    }

    /// Checks an expression against the size and depth limits.
    ///
    /// # Errors
    /// An expression over a limit.
    pub fn check_expression(&self, expr: &Expr) -> Result<()> {
        let depth = expr.depth();
        if depth > self.limits.max_expression_depth {
            return Err(EngineError::ExpressionTooDeep {
                depth,
                limit: self.limits.max_expression_depth,
            });
        }
        let size = expr.size();
        if size > self.limits.max_expression_nodes {
            return Err(EngineError::ExpressionTooLarge {
                size,
                limit: self.limits.max_expression_nodes,
            });
        }
        Ok(())
    }

    /// Parses the text language under the configured depth limit.
    ///
    /// # Errors
    /// A syntax error with its position, or an expression over a limit.
    pub fn parse(&self, text: &str) -> Result<Expr> {
        let max_tokens = self
            .limits
            .max_expression_nodes
            .saturating_mul(TOKENS_PER_NODE);
        let expr = crate::expr::parse_bounded(text, self.limits.max_expression_depth, max_tokens)
            .map_err(|e| match (e.too_deep, e.too_long) {
            (true, _) => EngineError::TextTooDeep {
                error: e,
                limit: self.limits.max_expression_depth,
            },
            (_, true) => EngineError::TextTooLong {
                error: e,
                per_node: TOKENS_PER_NODE,
            },
            _ => EngineError::Parse(e),
        })?;
        self.check_expression(&expr)?;
        Ok(expr)
    }

    /// Applies one change to a dataset (created by its first write) atomically.
    ///
    /// # Errors
    /// Whatever is invalid in the change; nothing is applied then.
    pub async fn apply(&self, dataset: &str, change: Change) -> Result<ChangeOutcome> {
        self.check_change(&change)?;
        let name = dataset_name(dataset)?;
        // Counted from before the writer lock: a group sync of the log can wait for the record
        // of a write queued behind another one of the same dataset.
        let mut in_progress = self.write_in_progress();
        if coalesce::coalescable(&change) && self.shared().is_none() {
            if let Ok(handle) = self.dataset(name) {
                return self
                    .apply_coalesced(name, handle, change, in_progress)
                    .await;
            }
        }
        let mut conflicts = 0;
        loop {
            let (handle, pending) = match &change {
                Change::DeleteSegment(_) | Change::DeleteUsers(_) | Change::PatchSegment(_) => {
                    (self.dataset(name)?, None)
                }
                _ => self.dataset_or_new(name)?,
            };
            let writer = handle.writer.clone().lock_owned().await;
            if let (Some(wal), None) = (self.local_wal(), &pending) {
                return self
                    .apply_pipelined(name, &handle, writer, in_progress, &change, wal)
                    .await;
            }
            let mut state = DatasetState::clone(&handle.current());
            let now = self.now();
            let is_delete = matches!(change, Change::DeleteUsers(_));
            let change = change.resolve(&state, &self.limits)?;
            let logged = self.is_durable().then(|| name.to_owned());
            let (state, outcome, bytes) = tokio::task::spawn_blocking(move || {
                let outcome = state.apply(&change, now)?;
                let bytes = match logged {
                    Some(dataset) => Some(record::encode(&record::LogRecord {
                        dataset,
                        now,
                        body: record::RecordBody::Change(change),
                    })?),
                    None => None,
                };
                Ok::<_, EngineError>((state, outcome, bytes))
            })
            .await
            .map_err(|e| EngineError::Internal(format!("write task failed: {e}")))??;
            if let Some(name) = &pending {
                match register(&self.datasets, name, &handle) {
                    Ok(()) => {}
                    // Another first write won the race: apply this one on top of it.
                    Err(EngineError::ConcurrentCreate(_)) => continue,
                    Err(other) => return Err(other),
                }
            }
            let Some((bytes, journal)) = bytes.zip(self.journal.get().cloned()) else {
                handle.publish(state, feed::FeedBounds::from(&self.limits));
                return Ok(outcome);
            };
            // Once the record may be in the log, the version must be published even if the
            // caller goes away: a task of its own logs and publishes it.
            let logged = LoggedWrite {
                journal,
                handle: handle.clone(),
                registry: self.datasets.clone(),
                pending,
                bounds: feed::FeedBounds::from(&self.limits),
            };
            let (dataset, writer) = (name.to_owned(), writer);
            let in_progress = std::mem::take(&mut in_progress);
            let result =
                tokio::spawn(logged.run(dataset, state, bytes, is_delete, writer, in_progress))
                    .await
                    .map_err(|e| EngineError::Internal(format!("write task failed: {e}")))?;
            match result {
                Ok(()) => return Ok(outcome),
                Err((
                    EngineError::Storage(crate::persist::PersistError::Conflict),
                    Some(_writer),
                )) => {
                    // Another replica wrote first: apply its records, then this change again.
                    conflicts += 1;
                    check_conflicts(conflicts)?;
                    self.catch_up(name, &handle).await?;
                    continue;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    fn check_change(&self, change: &Change) -> Result<()> {
        let batch = match change {
            Change::UpsertUsers(users) => users.len(),
            Change::DeleteUsers(users) => users.len(),
            _ => 0,
        };
        if let Change::RecordEvents(events) = change {
            if events.len() > self.limits.max_batch_events {
                return Err(EngineError::LimitExceeded {
                    what: "the number of events in one batch",
                    actual: events.len() as u64,
                    limit: self.limits.max_batch_events as u64,
                });
            }
        }
        if batch > self.limits.max_batch_users {
            return Err(EngineError::LimitExceeded {
                what: "the batch size",
                actual: batch as u64,
                limit: self.limits.max_batch_users as u64,
            });
        }
        if let Change::CreateSegment(definition) | Change::UpdateSegment(definition) = change {
            self.check_expression(&definition.expression)?;
        }
        Ok(())
    }

    /// Brings every dataset whose segments or events depend on time up to the clock: drops
    /// events past retention and re-evaluates moving windows (see [`events`]). Returns how
    /// many datasets it advanced.
    ///
    /// # Errors
    /// The first dataset that failed; the others are still advanced.
    pub async fn advance_time(&self) -> Result<usize> {
        let mut advanced = 0;
        let mut first_error = None;
        for name in self.dataset_names() {
            let Ok(handle) = self.dataset(&name) else {
                continue;
            };
            if !handle.current().depends_on_time() {
                continue;
            }
            // A dataset busy with a long import is skipped this time: the strips its windows
            // sweep over accumulate, so the next refresh catches up exactly.
            if handle.writer.try_lock().is_err() {
                tracing::debug!(dataset = %name, "busy writer; time refresh deferred");
                continue;
            }
            match self.apply(&name, Change::AdvanceTime).await {
                Ok(_) => advanced += 1,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(advanced),
        }
    }

    /// Creates a saved segment.
    ///
    /// # Errors
    /// An existing id, a bad definition, or too many segments.
    pub async fn create_segment(
        &self,
        dataset: &str,
        definition: SegmentDefinition,
    ) -> Result<Arc<Segment>> {
        // Existence and `max_segments` are checked under the writer lock ([`Change::resolve`]).
        let id = definition.id.clone();
        self.apply(dataset, Change::CreateSegment(definition))
            .await?;
        Ok(self.snapshot(dataset)?.segment(&id)?.clone())
    }

    /// Opens a member listing of `dataset` over one snapshot and returns its first page.
    ///
    /// # Errors
    /// An invalid dataset name; as [`DatasetState::select`].
    pub fn first_page(
        &self,
        dataset: &str,
        state: Arc<DatasetState>,
        audience: &Audience,
        as_of: impl Into<query::AsOf>,
        page_size: usize,
    ) -> Result<cursor::Page> {
        let members = state.select(audience, as_of)?;
        let listing = cursor::Listing::new(dataset_name(dataset)?, audience, state, members);
        Ok(self.cursors.first_page(listing, page_size))
    }

    /// The page after `token`, from the listing's own snapshot. The token must be one this
    /// process issued for `dataset` and, when given, `audience`.
    ///
    /// # Errors
    /// A forged token, or one of another dataset or audience; an unknown or expired one.
    pub fn next_page(
        &self,
        dataset: &str,
        audience: Option<&Audience>,
        token: &str,
        page_size: usize,
    ) -> Result<cursor::Page> {
        self.cursors
            .next_page(dataset_name(dataset)?, audience, token, page_size)
    }
}

/// The name of a dataset that exists only once the write creating it succeeds.
type Pending = Option<String>;

/// Every dataset by name.
type Registry = Arc<RwLock<BTreeMap<String, Arc<Dataset>>>>;

/// Conditional appends a write may lose to other replicas before it gives up.
const MAX_CONFLICTS: u32 = 64;

/// Refuses a write that keeps losing the race to the shared log (or a log that moved back, as
/// after a Redis failover to a replica that lost records).
///
/// # Errors
/// Past [`MAX_CONFLICTS`].
fn check_conflicts(conflicts: u32) -> Result<()> {
    if conflicts <= MAX_CONFLICTS {
        return Ok(());
    }
    Err(EngineError::Storage(
        crate::persist::PersistError::Unavailable(format!(
            "the shared log moved on {conflicts} times while this write waited; retry (or check \
         that Redis did not lose records)"
        )),
    ))
}

/// The logging and publishing of one write, done by a task of its own.
struct LoggedWrite {
    journal: Arc<durable::Journal>,
    handle: Arc<Dataset>,
    registry: Registry,
    /// The dataset this write created and registered, taken back if the record fails.
    pending: Pending,
    bounds: feed::FeedBounds,
}

/// A writer lock held across a task.
type WriterGuard = tokio::sync::OwnedMutexGuard<()>;

impl LoggedWrite {
    /// Appends the record and publishes `state`; on a conflict (nothing was appended) hands
    /// the writer lock back, so that the caller can catch up under it and try again.
    async fn run(
        self,
        dataset: String,
        mut state: DatasetState,
        bytes: Vec<u8>,
        is_delete: bool,
        writer: WriterGuard,
        in_progress: pipeline::WriteInProgress,
    ) -> std::result::Result<(), (EngineError, Option<WriterGuard>)> {
        let expected = state.log_position;
        match self
            .journal
            .append(&dataset, expected, bytes, is_delete, in_progress)
            .await
        {
            Ok(position) => {
                state.log_position = position;
                self.handle.publish(state, self.bounds);
                drop(writer);
                Ok(())
            }
            Err(EngineError::Storage(crate::persist::PersistError::Conflict)) => Err((
                EngineError::Storage(crate::persist::PersistError::Conflict),
                Some(writer),
            )),
            Err(error) => {
                if let Some(name) = &self.pending {
                    unregister(&self.registry, name, &self.handle);
                }
                Err((error, None))
            }
        }
    }
}

/// Takes back a dataset registered by a first write that then failed to be logged.
fn unregister(registry: &Registry, name: &str, handle: &Arc<Dataset>) {
    let mut map = match registry.write() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    if map.get(name).is_some_and(|h| Arc::ptr_eq(h, handle)) {
        map.remove(name);
    }
}

/// Registers a dataset created by its first successful write.
///
/// # Errors
/// Another first write registered the same name meanwhile: the caller retries on it.
fn register(registry: &Registry, name: &str, handle: &Arc<Dataset>) -> Result<()> {
    let mut map = registry
        .write()
        .map_err(|_| EngineError::Internal("dataset registry lock poisoned".into()))?;
    if map.contains_key(name) {
        return Err(EngineError::ConcurrentCreate(name.to_owned()));
    }
    map.insert(name.to_owned(), handle.clone());
    Ok(())
}
