//! The engine's error type: one enum, mapped exhaustively to gRPC codes at the service edge.

use crate::expr::ParseError;
use crate::index::keys::KeyError;
use crate::index::AttributeKind;
use crate::time::TimestampError;

/// Everything a caller of the engine can get wrong, and the few things the engine can.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("dataset '{0}' not found")]
    DatasetNotFound(String),
    #[error("invalid dataset name '{0}': use 1-64 characters of [A-Za-z0-9_.-]")]
    InvalidDatasetName(String),
    #[error("unknown attribute '{0}'")]
    UnknownAttribute(String),
    #[error("attribute '{attribute}' is {kind}: {reason}")]
    KindMismatch {
        attribute: String,
        kind: &'static str,
        reason: String,
    },
    #[error("attribute '{attribute}' is already declared as {existing}, not {requested}")]
    KindConflict {
        attribute: String,
        existing: &'static str,
        requested: &'static str,
    },
    #[error("invalid attribute name '{0}': use [A-Za-z_][A-Za-z0-9_.]*, at most 128 characters")]
    InvalidAttributeName(String),
    #[error(transparent)]
    Timestamp(#[from] TimestampError),
    #[error("expression: {0}")]
    Parse(#[from] ParseError),
    #[error("expression: {0}")]
    InvalidExpression(String),
    #[error("expression has {size} nodes, more than the limit of {limit}")]
    ExpressionTooLarge { size: usize, limit: usize },
    #[error("expression nests {depth} levels deep, more than the limit of {limit}")]
    ExpressionTooDeep { depth: usize, limit: usize },
    #[error("expression: {error}, over the limit of {limit}")]
    TextTooDeep { error: ParseError, limit: usize },
    #[error(
        "expression: {error} (at most {per_node} tokens per node of limits.max_expression_nodes)"
    )]
    TextTooLong { error: ParseError, per_node: usize },
    #[error("segment '{0}' not found")]
    SegmentNotFound(String),
    #[error("segment '{0}' already exists")]
    SegmentExists(String),
    #[error("invalid segment id '{0}': use 1-128 characters of [A-Za-z0-9_.:-]")]
    InvalidSegmentId(String),
    #[error("segment references form a cycle: {}", .0.join(" -> "))]
    SegmentCycle(Vec<String>),
    #[error("segment '{segment}' is referenced by {}: delete or change those first", .referenced_by.join(", "))]
    SegmentInUse {
        segment: String,
        referenced_by: Vec<String>,
    },
    #[error("user {index} ('{user_id}'): {reason}")]
    InvalidRecord {
        index: usize,
        user_id: String,
        reason: Box<EngineError>,
    },
    #[error("events[{index}].{field}: {reason}")]
    InvalidEvent {
        index: usize,
        field: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{what} is {actual}, more than the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        actual: u64,
        limit: u64,
    },
    #[error("import: {0}")]
    Import(String),
    #[error("import: row {row}: {message}")]
    ImportRow { row: u64, message: String },
    #[error("import: column '{column}' has type {data_type}, which maps to no attribute kind")]
    UnsupportedColumn { column: String, data_type: String },
    #[error("import: {0}")]
    ImportIo(#[source] std::io::Error),
    #[error(
        "server-side imports are off: the server has no import_dir (stream the file instead: \
         `audience import` without --server-side)"
    )]
    ImportsDisabled,
    /// A server-side import path that is missing or not allowed; the reason is for the
    /// server's log only, so that callers cannot tell the two apart.
    #[error("no importable file at that path inside the server's import directory")]
    ImportRefused(String),
    #[error("import: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("import: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("page token is invalid or has expired; start the listing again")]
    InvalidPageToken,
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("resume_token {0}")]
    InvalidResumeToken(&'static str),
    #[error(
        "resume_token: the change history it points into was discarded ({0}); re-read the \
         segments (e.g. with ExportMembers) and watch again without a resume_token"
    )]
    WatchHistoryDiscarded(&'static str),
    #[error(
        "this watcher fell {lag} membership changes behind the writes, over the limit of \
         {limit}; reconnect with resume_token={resume_token}"
    )]
    WatcherTooSlow {
        lag: u64,
        limit: u64,
        resume_token: String,
    },
    #[error("segment '{0}' was deleted")]
    SegmentDeleted(String),
    #[error("dataset '{0}' was created by another write at the same time; retry")]
    ConcurrentCreate(String),
    #[error(
        "resume_token: this replica has not yet applied the writes the token points after; \
         retry in a moment"
    )]
    ReplicaBehind,
    #[error("loading: {done} of {total}")]
    Loading { done: u64, total: u64 },
    #[error("storage: {0}")]
    Storage(#[from] crate::persist::PersistError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A value of the wrong kind for an attribute.
    pub fn kind_mismatch(attribute: &str, kind: AttributeKind, reason: impl Into<String>) -> Self {
        EngineError::KindMismatch {
            attribute: attribute.to_owned(),
            kind: kind.name(),
            reason: reason.into(),
        }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
