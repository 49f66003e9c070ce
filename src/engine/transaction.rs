//! Multi-batch imports: batches apply to a private version, published (and logged, as one
//! record) by [`Import::commit`] all at once, so a crash or a failed batch leaves the whole import
//! or none of it.

use std::sync::Arc;

use arrow_array::RecordBatch;

use super::change::{Change, ChangeOutcome, ImportBatch};
use super::error::{EngineError, Result};
use super::maintenance::Written;
use super::record::{ImportPart, LogRecord, RecordBody};
use super::state::DatasetState;
use super::{event_import, feed, register, unregister, Dataset, Engine, Pending, Registry};
use crate::time::Millis;

/// The steps of an import applied to a private version: the same code runs live and when the
/// import's log record is replayed.
#[derive(Debug, Default)]
pub(super) struct ImportSteps {
    now: Millis,
    /// Events read so far, merged into the index by a [`ImportStep::Settle`].
    staged: event_import::StagedEvents,
    /// Rows of events read so far, to name a bad row by its place in the whole import.
    rows: u64,
}

/// One step of an import.
#[derive(Debug, Clone, Copy)]
pub(super) enum ImportStep<'a> {
    Part(&'a ImportPart),
    /// Merge the staged events into the index and bring segments up to date.
    Settle,
}

impl ImportSteps {
    pub(super) fn new(now: Millis) -> Self {
        Self {
            now,
            ..Self::default()
        }
    }

    fn has_staged(&self) -> bool {
        !self.staged.batch.is_empty() || !self.staged.touched.is_empty()
    }

    /// Applies one step to `state`.
    ///
    /// # Errors
    /// A bad column or value; `state` is then partly changed and must be dropped.
    pub(super) fn apply(
        &mut self,
        state: &mut DatasetState,
        step: ImportStep,
    ) -> Result<ChangeOutcome> {
        let now = self.now;
        match step {
            ImportStep::Part(ImportPart::Users(batch)) => {
                state.apply(&Change::ImportUsers(batch.clone()), now)
            }
            ImportStep::Part(ImportPart::Events(batch)) => {
                let cutoff = state.retention_cutoff(now);
                let first_row = self.rows;
                self.rows += batch.num_rows() as u64;
                event_import::stage_batch(state, batch, (cutoff, now, first_row), &mut self.staged)
            }
            ImportStep::Settle => {
                if self.has_staged() {
                    let staged = std::mem::take(&mut self.staged);
                    state.events.add(staged.batch);
                    state.after_user_writes(&staged.touched, &Written::Anything, now)?;
                    state.version += 1;
                    drop(staged.touched);
                    // The staging (8 bytes an event) is free now; do not keep the import's peak.
                    crate::memory::release_free_memory();
                }
                Ok(ChangeOutcome::default())
            }
        }
    }
}

/// Replays an import's record on `state`: its parts in order, staged events settled at the end.
///
/// # Errors
/// As the import would have failed (a record is logged only after it succeeded).
pub(super) fn replay(state: &mut DatasetState, now: Millis, parts: &[ImportPart]) -> Result<()> {
    let before = state.clone();
    let mut steps = ImportSteps::new(now);
    for part in parts {
        steps.apply(state, ImportStep::Part(part))?;
    }
    steps.apply(state, ImportStep::Settle)?;
    state.net_transitions(&before);
    Ok(())
}

impl Engine {
    /// Starts a multi-batch import: batches apply to a private version, published by
    /// [`Import::commit`] all at once. Other writers of the dataset wait until then; readers do not.
    ///
    /// # Errors
    /// An invalid dataset name.
    pub async fn begin_import(self: &Arc<Self>, dataset: &str) -> Result<Import> {
        let (mut handle, mut pending) = self.dataset_or_new(dataset)?;
        let mut guard = handle.writer.clone().lock_owned().await;
        // Another first write may have created the dataset while this one queued: continue on
        // the registered dataset instead of racing to register it again.
        if let (Some(_), Ok(registered)) = (&pending, self.dataset(dataset)) {
            pending = None;
            if !Arc::ptr_eq(&registered, &handle) {
                drop(guard);
                handle = registered;
                guard = handle.writer.clone().lock_owned().await;
            }
        }
        // Writes still being made durable publish first: the import starts from the newest.
        handle.pipeline.drain().await;
        let state = DatasetState::clone(&handle.current());
        let now = self.now();
        Ok(Import {
            engine: self.clone(),
            name: super::dataset_name(dataset)?.to_owned(),
            registry: self.datasets.clone(),
            handle,
            pending,
            _guard: guard,
            state: Some(state),
            outcome: ChangeOutcome::default(),
            steps: Some(ImportSteps::new(now)),
            now,
            logged: self.journal.get().map(|_| Vec::new()),
            bounds: feed::FeedBounds::from(self.limits()),
            _active: super::stats::Open::new(&self.counters.imports_active),
        })
    }
}

/// A multi-batch import in progress; dropped without [`Import::commit`], it leaves no trace.
pub struct Import {
    engine: Arc<Engine>,
    /// The dataset's checked name.
    name: String,
    /// Where a dataset created by this import is registered on commit.
    registry: Registry,
    handle: Arc<Dataset>,
    /// Set when the import creates its dataset.
    pending: Pending,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    /// The private version; `None` only while a batch is being applied.
    state: Option<DatasetState>,
    outcome: ChangeOutcome,
    /// Staged events and rows read; `None` only while a batch is being applied.
    steps: Option<ImportSteps>,
    now: Millis,
    /// The parts applied so far, for the log record written at commit; `None` when nothing is
    /// logged (in memory only).
    logged: Option<Vec<ImportPart>>,
    /// How much of the import's transitions the watch feed keeps.
    bounds: feed::FeedBounds,
    /// Counts this import among those in progress until it is committed or dropped.
    _active: super::stats::Open,
}

impl Import {
    /// Runs one step on the blocking pool.
    async fn run(&mut self, part: Option<ImportPart>) -> Result<ChangeOutcome> {
        let unusable = || EngineError::Internal("import used after a failed batch".into());
        let mut state = self.state.take().ok_or_else(unusable)?;
        let mut steps = self.steps.take().ok_or_else(unusable)?;
        let (state, steps, part, outcome) = tokio::task::spawn_blocking(move || {
            let step = part.as_ref().map_or(ImportStep::Settle, ImportStep::Part);
            let outcome = steps.apply(&mut state, step)?;
            Ok::<_, EngineError>((state, steps, part, outcome))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("import task failed: {e}")))??;
        self.state = Some(state);
        self.steps = Some(steps);
        if let Some(part) = &part {
            self.engine.count_imported(part);
        }
        if let (Some(logged), Some(part)) = (self.logged.as_mut(), part) {
            logged.push(part);
        }
        self.outcome += outcome;
        Ok(outcome)
    }

    /// Applies one record batch of a users table to the private version.
    ///
    /// # Errors
    /// A bad column or value; the import is then unusable and must be dropped.
    pub async fn apply(&mut self, batch: ImportBatch) -> Result<ChangeOutcome> {
        self.run(Some(ImportPart::Users(batch))).await
    }

    /// Reads one record batch of an events table; its events reach the index in
    /// [`Import::settle`], all at once.
    ///
    /// # Errors
    /// A bad column or value; the import is then unusable and must be dropped.
    pub async fn apply_events(&mut self, batch: RecordBatch) -> Result<ChangeOutcome> {
        self.run(Some(ImportPart::Events(batch))).await
    }

    /// Merges staged events into the index and brings segments up to date for their users.
    ///
    /// # Errors
    /// A segment that fails to evaluate; the import is then unusable.
    pub async fn settle(&mut self) -> Result<()> {
        if self.steps.as_ref().is_some_and(|s| !s.has_staged()) {
            return Ok(());
        }
        self.run(None).await.map(|_| ())
    }

    /// Makes room for an import of `rows` users of which most may be new (a Parquet file says
    /// its row count up front), so the key tables never rehash mid-import. Rows beyond the
    /// dataset's current size are reserved, so re-importing a dataset reserves nothing.
    pub fn reserve(&mut self, rows: u64) {
        if let Some(state) = self.state.as_mut() {
            let rows = usize::try_from(rows).unwrap_or(usize::MAX);
            state.keys.reserve(rows.saturating_sub(state.keys.len()));
        }
    }

    /// Users created and updated so far.
    pub fn outcome(&self) -> ChangeOutcome {
        self.outcome
    }

    /// Logs the import's record; when another replica wrote to the dataset first, applies its
    /// records and the import again on top of them, and logs that.
    async fn log(&self, mut state: DatasetState, record: &LogRecord) -> Result<DatasetState> {
        let mut conflicts = 0;
        loop {
            match self.engine.log(record, state.log_position).await {
                Ok(position) => {
                    state.log_position = position;
                    return Ok(state);
                }
                Err(EngineError::Storage(crate::persist::PersistError::Conflict)) => {
                    conflicts += 1;
                    super::check_conflicts(conflicts)?;
                    self.engine.catch_up(&self.name, &self.handle).await?;
                    let mut again = DatasetState::clone(&self.handle.current());
                    let RecordBody::Import(parts) = &record.body else {
                        return Err(EngineError::Internal("an import logged as a change".into()));
                    };
                    let (now, parts) = (record.now, parts.clone());
                    state = tokio::task::spawn_blocking(move || {
                        replay(&mut again, now, &parts).map(|()| again)
                    })
                    .await
                    .map_err(|e| EngineError::Internal(format!("import task failed: {e}")))??;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Logs the whole import as one record (when the engine is durable), then publishes it.
    ///
    /// # Errors
    /// An import whose last batch failed, a log that cannot be written (nothing is published
    /// then), or a new dataset created by another write meanwhile (the caller may retry).
    pub async fn commit(self) -> Result<ChangeOutcome> {
        // Once its record may be in the log, a commit must publish it even if the caller goes
        // away: a task of its own finishes it.
        tokio::spawn(self.commit_now())
            .await
            .map_err(|e| EngineError::Internal(format!("import commit failed: {e}")))?
    }

    async fn commit_now(mut self) -> Result<ChangeOutcome> {
        if self.steps.as_ref().is_some_and(ImportSteps::has_staged) {
            return Err(EngineError::Internal(
                "import committed with unsettled events".into(),
            ));
        }
        let mut state = self
            .state
            .take()
            .ok_or_else(|| EngineError::Internal("import used after a failed batch".into()))?;
        // Registered before it is logged: a record in the log is never one that lost the race
        // to create its dataset. Until the publish below, readers see it empty.
        if let Some(name) = &self.pending {
            register(&self.registry, name, &self.handle)?;
        }
        if let Some(parts) = self.logged.take() {
            let record = LogRecord {
                dataset: self.name.clone(),
                now: self.now,
                body: RecordBody::Import(parts),
            };
            state = match self.log(state, &record).await {
                Ok(state) => state,
                Err(error) => {
                    if let Some(name) = &self.pending {
                        unregister(&self.registry, name, &self.handle);
                    }
                    return Err(error);
                }
            };
        }
        state.net_transitions(&self.handle.current());
        self.handle.publish(state, self.bounds);
        Ok(self.outcome)
    }
}
