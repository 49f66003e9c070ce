//! `IngestService`: upserts, deletions and bulk imports, each applied all or nothing.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::auth::{authorize, Caller};
use super::convert::user_updates;
use super::pb;
use super::status::{invalid, to_status};
use super::{blocking, Services};
use crate::engine::import::{read_file, BatchSource, DEFAULT_ID_COLUMN};
use crate::engine::import_dir::ImportDir;
use crate::engine::{Change, Engine, EngineError, Import, ImportBatch};

/// Rows per batch when the server reads a file itself.
const FILE_BATCH_ROWS: usize = 64 * 1024;
/// Progress messages buffered ahead of the caller.
const PROGRESS_BUFFER: usize = 16;

/// The ingest service.
#[derive(Debug, Clone)]
pub struct IngestApi {
    engine: Arc<Engine>,
    /// Where server-side imports may read; unset, they are refused.
    import_dir: Option<ImportDir>,
}

impl IngestApi {
    pub fn new(services: &Services) -> Self {
        Self {
            engine: services.engine.clone(),
            import_dir: services.import_dir.as_deref().map(ImportDir::new),
        }
    }
}

/// An import RPC's response stream: its own message around each progress report.
type ResponseStream<R> = Pin<Box<dyn tokio_stream::Stream<Item = Result<R, Status>> + Send>>;
/// Where an import's progress goes, and whether it has reached its commit (after which a
/// deadline no longer stops it: the commit completes, and the caller is told it may have).
#[derive(Clone)]
struct ProgressSender {
    sender: mpsc::Sender<Result<pb::ImportProgress, Status>>,
    committing: Arc<std::sync::atomic::AtomicBool>,
}

impl ProgressSender {
    fn try_send(&self, message: Result<pb::ImportProgress, Status>) {
        // A caller that stopped reading progress does not stop the import.
        let _ = self.sender.try_send(message);
    }

    async fn send(&self, message: Result<pb::ImportProgress, Status>) {
        let _ = self.sender.send(message).await;
    }
}

/// What an import reads.
#[derive(Debug, Clone)]
enum ImportKind {
    /// A users table with its id column.
    Users { id_column: String },
    /// An events table.
    Events,
}

impl ImportKind {
    fn users(id_column: &str) -> Self {
        let id_column = if id_column.is_empty() {
            DEFAULT_ID_COLUMN
        } else {
            id_column
        };
        ImportKind::Users {
            id_column: id_column.to_owned(),
        }
    }
}

/// One import under way: applies batches and reports progress.
struct ImportRun {
    import: Import,
    kind: ImportKind,
    rows_read: u64,
    rows_total: u64,
    progress: ProgressSender,
}

impl ImportRun {
    async fn start(
        engine: &Arc<Engine>,
        dataset: &str,
        kind: ImportKind,
        (rows_total, reservable): (u64, u64),
        progress: ProgressSender,
    ) -> Result<Self, Status> {
        let mut import = engine
            .begin_import(dataset)
            .await
            .map_err(|e| to_status(e, "dataset"))?;
        if matches!(kind, ImportKind::Users { .. }) {
            import.reserve(reservable);
        }
        Ok(Self {
            import,
            kind,
            rows_read: 0,
            rows_total,
            progress,
        })
    }

    async fn push(&mut self, batch: RecordBatch) -> Result<(), Status> {
        let rows = batch.num_rows() as u64;
        let first_row = self.rows_read;
        let applied = match &self.kind {
            ImportKind::Users { id_column } => {
                let id_column = id_column.clone();
                self.import.apply(ImportBatch { batch, id_column }).await
            }
            ImportKind::Events => self.import.apply_events(batch).await,
        };
        applied.map_err(|e| to_status(e, &format!("rows {first_row}..{}", first_row + rows)))?;
        self.rows_read += rows;
        self.progress.try_send(Ok(self.report(false)));
        Ok(())
    }

    fn report(&self, done: bool) -> pb::ImportProgress {
        let outcome = self.import.outcome();
        pb::ImportProgress {
            rows_read: self.rows_read,
            rows_total: self.rows_total,
            done,
            users_created: outcome.created,
            users_updated: outcome.updated,
            events_imported: outcome.events,
            events_expired: outcome.expired,
        }
    }

    async fn finish(mut self) -> Result<(), Status> {
        self.import.settle().await.map_err(|e| to_status(e, ""))?;
        let last = self.report(true);
        self.progress
            .committing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.import.commit().await.map_err(|e| to_status(e, ""))?;
        tracing::info!(
            rows = last.rows_read,
            created = last.users_created,
            updated = last.users_updated,
            events = last.events_imported,
            expired = last.events_expired,
            "import committed"
        );
        self.progress.send(Ok(last)).await;
        Ok(())
    }
}

/// Decodes an Arrow IPC stream sent in arbitrary chunks and imports it.
async fn import_stream<M>(
    engine: Arc<Engine>,
    (dataset, kind, first_chunk): (String, ImportKind, Vec<u8>),
    mut input: Streaming<M>,
    chunk_of: fn(M) -> Vec<u8>,
    progress: ProgressSender,
) -> Result<(), Status> {
    let mut run = ImportRun::start(&engine, &dataset, kind, (0, 0), progress).await?;
    let mut decoder = arrow_ipc::reader::StreamDecoder::new();
    let mut chunk = Some(first_chunk);
    let idle = Duration::from_secs(engine.limits().import_idle_secs);
    loop {
        let bytes = match chunk.take() {
            Some(bytes) => bytes,
            None => match tokio::time::timeout(idle, input.message()).await {
                Ok(Ok(Some(message))) => chunk_of(message),
                Ok(Ok(None)) => break,
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no import data for {} s; the import was abandoned and nothing applied",
                        idle.as_secs()
                    )))
                }
            },
        };
        let mut buffer = arrow_buffer::Buffer::from(bytes);
        while !buffer.is_empty() {
            let decoded = decoder
                .decode(&mut buffer)
                .map_err(|e| to_status(EngineError::Arrow(e), "arrow_ipc_chunk"))?;
            if let Some(batch) = decoded {
                run.push(batch).await?;
            }
        }
    }
    decoder
        .finish()
        .map_err(|e| to_status(EngineError::Arrow(e), "arrow_ipc_chunk"))?;
    if !saw_end_of_stream(&mut decoder) {
        return Err(invalid(
            "arrow_ipc_chunk",
            "the Arrow IPC stream ended without its end-of-stream marker (a sender that failed \
             mid-file?); nothing was applied",
        ));
    }
    run.finish().await
}

/// Whether the decoder has read the IPC end-of-stream marker, which a writer emits only when
/// it finished: a stream cut at a message boundary otherwise looks complete. A decoder past
/// the marker refuses any further byte; one at a message boundary takes it as a header byte.
fn saw_end_of_stream(decoder: &mut arrow_ipc::reader::StreamDecoder) -> bool {
    let mut probe = arrow_buffer::Buffer::from(vec![0xFF_u8]);
    decoder.decode(&mut probe).is_err()
}

/// Imports a file the server reads itself, opened already.
async fn import_file(
    engine: Arc<Engine>,
    (dataset, source, kind): (String, BatchSource, ImportKind),
    progress: ProgressSender,
) -> Result<(), Status> {
    let sizes = (source.total_rows.unwrap_or(0), source.reservable_rows);
    let mut run = ImportRun::start(&engine, &dataset, kind, sizes, progress).await?;
    let mut batches = source.batches;
    loop {
        let (next, rest) = tokio::task::spawn_blocking(move || (batches.next(), batches))
            .await
            .map_err(|e| to_status(EngineError::Internal(e.to_string()), ""))?;
        batches = rest;
        match next {
            Some(batch) => run.push(batch.map_err(|e| to_status(e, "path"))?).await?,
            None => break,
        }
    }
    run.finish().await
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
///
/// tonic enforces it only until the response headers go out; an import streams its response
/// for its whole run, so it enforces the deadline itself.
fn deadline<T>(request: &Request<T>) -> Option<tokio::time::Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    tokio::time::Instant::now().checked_add(timeout)
}

/// Runs an import task that reports its progress, and its failure, on the response stream.
/// Past the caller's deadline the task is dropped, and with it the uncommitted import.
/// The status of an import whose caller's deadline passed: before its commit nothing was
/// applied; from its commit on, the commit completes on its own (it is logged and published
/// whole or not at all), so the caller must look before retrying.
fn deadline_passed(progress: &ProgressSender) -> Status {
    if progress
        .committing
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        tracing::info!("the caller's deadline passed during the import's commit, which goes on");
        Status::deadline_exceeded(
            "the import passed its deadline while being committed: the commit completes on its \
             own, so check the dataset before retrying",
        )
    } else {
        tracing::info!("import abandoned at the caller's deadline");
        Status::deadline_exceeded("the import passed its deadline; nothing was applied")
    }
}

fn spawn_import<R: pb::ImportResponse, F>(
    deadline: Option<tokio::time::Instant>,
    work: impl FnOnce(ProgressSender) -> F,
) -> ResponseStream<R>
where
    F: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(PROGRESS_BUFFER);
    let progress = ProgressSender {
        sender,
        committing: Arc::default(),
    };
    let task = work(progress.clone());
    tokio::spawn(
        async move {
            let result = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, task)
                    .await
                    .unwrap_or_else(|_| Err(deadline_passed(&progress))),
                None => task.await,
            };
            if let Err(status) = result {
                progress.send(Err(status)).await;
            }
        }
        .instrument(tracing::Span::current()),
    );
    Box::pin(ReceiverStream::new(receiver).map(|message| message.map(R::from_progress)))
}

#[tonic::async_trait]
impl pb::ingest_service_server::IngestService for IngestApi {
    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, users = request.get_ref().users.len()))]
    async fn upsert_users(
        &self,
        request: Request<pb::UpsertUsersRequest>,
    ) -> Result<Response<pb::UpsertUsersResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let updates = user_updates(&request.users)?;
        let outcome = self
            .engine
            .apply(&request.dataset, Change::UpsertUsers(updates))
            .await
            .map_err(|e| to_status(e, "users"))?;
        Ok(Response::new(pb::UpsertUsersResponse {
            created: outcome.created,
            updated: outcome.updated,
        }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, users = request.get_ref().user_ids.len()))]
    async fn delete_users(
        &self,
        request: Request<pb::DeleteUsersRequest>,
    ) -> Result<Response<pb::DeleteUsersResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        if let Some(index) = request.user_ids.iter().position(String::is_empty) {
            return Err(invalid(&format!("user_ids[{index}]"), "must not be empty"));
        }
        let outcome = self
            .engine
            .apply(&request.dataset, Change::DeleteUsers(request.user_ids))
            .await
            .map_err(|e| to_status(e, "user_ids"))?;
        Ok(Response::new(pb::DeleteUsersResponse {
            deleted: outcome.deleted,
            not_found: outcome.not_found,
        }))
    }

    type ImportUsersStream = ResponseStream<pb::ImportUsersResponse>;

    #[tracing::instrument(skip_all, fields(dataset))]
    async fn import_users(
        &self,
        request: Request<Streaming<pb::ImportUsersRequest>>,
    ) -> Result<Response<Self::ImportUsersStream>, Status> {
        let caller = Caller::of(&request)?;
        let (deadline, first, input) = first_message(request).await?;
        tracing::Span::current().record("dataset", first.dataset.as_str());
        caller.may_use(&first.dataset)?;
        let start = (
            first.dataset,
            ImportKind::users(&first.id_column),
            first.arrow_ipc_chunk,
        );
        let engine = self.engine.clone();
        Ok(Response::new(spawn_import(deadline, |progress| {
            import_stream(engine, start, input, |m| m.arrow_ipc_chunk, progress)
        })))
    }

    type ImportUsersFileStream = ResponseStream<pb::ImportUsersFileResponse>;

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, path = %request.get_ref().path))]
    async fn import_users_file(
        &self,
        request: Request<pb::ImportUsersFileRequest>,
    ) -> Result<Response<Self::ImportUsersFileStream>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let deadline = deadline(&request);
        let request = request.into_inner();
        let kind = ImportKind::users(&request.id_column);
        self.file_import(deadline, (request.dataset, request.path, kind))
            .await
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, events = request.get_ref().events.len()))]
    async fn record_events(
        &self,
        request: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let outcome = self.record(request, None).await?;
        Ok(Response::new(outcome))
    }

    #[tracing::instrument(skip_all, fields(dataset, messages))]
    async fn stream_events(
        &self,
        request: Request<Streaming<pb::StreamEventsRequest>>,
    ) -> Result<Response<pb::StreamEventsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let mut input = request.into_inner();
        let mut total = pb::StreamEventsResponse::default();
        let mut index = 0usize;
        while let Some(message) = input.message().await? {
            if index == 0 {
                tracing::Span::current().record("dataset", message.dataset.as_str());
            }
            // Each message names its own dataset.
            let outcome = match caller.may_use(&message.dataset) {
                Ok(()) => self.record(batch_of(message), Some(index)).await,
                Err(status) => Err(status),
            }
            .map_err(|status| recorded_before(status, index, &total))?;
            total.recorded += outcome.recorded;
            total.expired += outcome.expired;
            total.users_created += outcome.users_created;
            index += 1;
        }
        tracing::Span::current().record("messages", index);
        Ok(Response::new(total))
    }

    type ImportEventsStream = ResponseStream<pb::ImportEventsResponse>;

    #[tracing::instrument(skip_all, fields(dataset))]
    async fn import_events(
        &self,
        request: Request<Streaming<pb::ImportEventsRequest>>,
    ) -> Result<Response<Self::ImportEventsStream>, Status> {
        let caller = Caller::of(&request)?;
        let (deadline, first, input) = first_message(request).await?;
        tracing::Span::current().record("dataset", first.dataset.as_str());
        caller.may_use(&first.dataset)?;
        let engine = self.engine.clone();
        let start = (first.dataset, ImportKind::Events, first.arrow_ipc_chunk);
        Ok(Response::new(spawn_import(deadline, |progress| {
            import_stream(engine, start, input, |m| m.arrow_ipc_chunk, progress)
        })))
    }

    type ImportEventsFileStream = ResponseStream<pb::ImportEventsFileResponse>;

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, path = %request.get_ref().path))]
    async fn import_events_file(
        &self,
        request: Request<pb::ImportEventsFileRequest>,
    ) -> Result<Response<Self::ImportEventsFileStream>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let deadline = deadline(&request);
        let request = request.into_inner();
        self.file_import(
            deadline,
            (request.dataset, request.path, ImportKind::Events),
        )
        .await
    }
}

/// A stream's failure at message `index`, saying what the messages before it recorded (they
/// stay applied), so that a caller retries from there instead of recording them twice.
fn recorded_before(status: Status, index: usize, total: &pb::StreamEventsResponse) -> Status {
    if index == 0 {
        return status;
    }
    let message = format!(
        "{}; messages 0..{index} were recorded ({} events): resend from message {index}",
        status.message(),
        total.recorded
    );
    Status::new(status.code(), message)
}

/// A StreamEvents message as the batch it is, which RecordEvents records.
fn batch_of(message: pb::StreamEventsRequest) -> pb::RecordEventsRequest {
    pb::RecordEventsRequest {
        dataset: message.dataset,
        events: message.events,
    }
}

/// The deadline, the first message (which names the dataset) and the rest of an import stream.
async fn first_message<M>(
    request: Request<Streaming<M>>,
) -> Result<(Option<tokio::time::Instant>, M, Streaming<M>), Status> {
    let deadline = deadline(&request);
    let mut input = request.into_inner();
    let first = input
        .message()
        .await?
        .ok_or_else(|| invalid("dataset", "the import stream sent no message"))?;
    Ok((deadline, first, input))
}

impl IngestApi {
    /// Starts a server-side file import of `(dataset, path, kind)`: the file is opened (once,
    /// inside the import directory) before the progress stream starts.
    async fn file_import<R: pb::ImportResponse>(
        &self,
        deadline: Option<tokio::time::Instant>,
        (dataset, path, kind): (String, String, ImportKind),
    ) -> Result<Response<ResponseStream<R>>, Status> {
        if path.is_empty() {
            return Err(invalid("path", "must not be empty"));
        }
        let Some(dir) = self.import_dir.clone() else {
            return Err(to_status(EngineError::ImportsDisabled, "path"));
        };
        let source = blocking(move || {
            let name = PathBuf::from(path);
            let file = dir.open(&name).map_err(|e| to_status(e, "path"))?;
            read_file(file, &name, FILE_BATCH_ROWS).map_err(|e| to_status(e, "path"))
        })
        .await?;
        let engine = self.engine.clone();
        Ok(Response::new(spawn_import(deadline, |progress| {
            import_file(engine, (dataset, source, kind), progress)
        })))
    }

    /// Records one batch of events; `field` prefixes error fields.
    async fn record(
        &self,
        request: pb::RecordEventsRequest,
        message: Option<usize>,
    ) -> Result<pb::RecordEventsResponse, Status> {
        let prefix = message.map_or(String::new(), |i| format!("message {i}"));
        let field = match message {
            None => "events".to_owned(),
            Some(_) => format!("{prefix}: events"),
        };
        let events = super::convert::events(&request.events, &field)?;
        let outcome = self
            .engine
            .apply(&request.dataset, Change::RecordEvents(events))
            .await
            .map_err(|e| match e {
                // It names its own field path (`events[i].ts`).
                EngineError::InvalidEvent { .. } => to_status(e, &prefix),
                other => to_status(other, &field),
            })?;
        Ok(pb::RecordEventsResponse {
            recorded: outcome.events,
            expired: outcome.expired,
            users_created: outcome.created,
        })
    }
}
