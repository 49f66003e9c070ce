//! The one mapping from engine errors to gRPC statuses, and where errors get logged.

use tonic::{Code, Status};

use crate::engine::EngineError;

/// The gRPC code of an engine error. Exhaustive: a new error variant must choose its code.
pub fn code_of(error: &EngineError) -> Code {
    match error {
        EngineError::DatasetNotFound(_)
        | EngineError::SegmentNotFound(_)
        | EngineError::SegmentDeleted(_) => Code::NotFound,
        EngineError::SegmentExists(_) => Code::AlreadyExists,
        EngineError::SegmentInUse { .. }
        | EngineError::InvalidPageToken
        | EngineError::WatchHistoryDiscarded(_) => Code::FailedPrecondition,
        EngineError::WatcherTooSlow { .. } => Code::ResourceExhausted,
        EngineError::LimitExceeded { .. }
        | EngineError::ExpressionTooLarge { .. }
        | EngineError::ExpressionTooDeep { .. }
        | EngineError::TextTooDeep { .. }
        | EngineError::TextTooLong { .. } => Code::ResourceExhausted,
        EngineError::InvalidRecord { reason, .. } => code_of(reason),
        EngineError::Key(crate::engine::KeyError::Exhausted(_)) => Code::ResourceExhausted,
        EngineError::InvalidDatasetName(_)
        | EngineError::UnknownAttribute(_)
        | EngineError::KindMismatch { .. }
        | EngineError::KindConflict { .. }
        | EngineError::InvalidAttributeName(_)
        | EngineError::Timestamp(_)
        | EngineError::Parse(_)
        | EngineError::InvalidExpression(_)
        | EngineError::InvalidSegmentId(_)
        | EngineError::SegmentCycle(_)
        | EngineError::Key(_)
        | EngineError::InvalidEvent { .. }
        | EngineError::Import(_)
        | EngineError::ImportRow { .. }
        | EngineError::UnsupportedColumn { .. }
        | EngineError::Arrow(_)
        | EngineError::Parquet(_)
        | EngineError::InvalidArgument { .. }
        | EngineError::InvalidResumeToken(_) => Code::InvalidArgument,
        EngineError::ImportIo(e) if e.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        EngineError::ImportIo(_) | EngineError::ImportsDisabled => Code::FailedPrecondition,
        EngineError::ImportRefused(_) => Code::NotFound,
        EngineError::ConcurrentCreate(_) => Code::Aborted,
        EngineError::Loading { .. } | EngineError::ReplicaBehind => Code::Unavailable,
        EngineError::Storage(error) => storage_code(error),
        EngineError::Internal(_) => Code::Internal,
    }
}

/// Storage that cannot take a write now is a retryable outage; damaged storage is internal.
fn storage_code(error: &crate::persist::PersistError) -> Code {
    use crate::persist::PersistError;
    match error {
        PersistError::Unavailable(_) | PersistError::Closed | PersistError::Conflict => {
            Code::Unavailable
        }
        PersistError::Io { .. }
        | PersistError::Corrupt { .. }
        | PersistError::Format(_)
        | PersistError::Locked(_)
        | PersistError::WrongDirectory { .. } => Code::Internal,
    }
}

/// The longest message sent back: error messages quote the caller's input, and an over-long
/// `grpc-message` header would make the client drop the connection instead of reading a status.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// Converts an engine error into the status sent to the caller, logging it once here.
///
/// `field` names the request field the error is about (e.g. `audience.expression`), so that
/// the caller sees which part of the request was wrong.
pub fn to_status(error: EngineError, field: &str) -> Status {
    let code = code_of(&error);
    if code == Code::Internal {
        tracing::error!(error = %error, "internal error");
        return Status::internal("internal error; see the server log");
    }
    let message = match (&error, field.is_empty()) {
        // These name their field themselves.
        (
            EngineError::SegmentInUse { .. }
            | EngineError::InvalidPageToken
            | EngineError::InvalidResumeToken(_)
            | EngineError::ReplicaBehind
            | EngineError::WatchHistoryDiscarded(_)
            | EngineError::WatcherTooSlow { .. }
            | EngineError::SegmentDeleted(_),
            _,
        )
        | (_, true) => error.to_string(),
        _ => format!("{field}: {error}"),
    };
    let message = bounded(message);
    // What the caller must not see (why a path was refused) still reaches the log.
    let detail = match &error {
        EngineError::ImportRefused(reason) => Some(reason.as_str()),
        _ => None,
    };
    tracing::info!(code = ?code, error = %message, detail, "request refused");
    Status::new(code, message)
}

/// A call refused, or a stream cut short, because the server is stopping.
pub fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; call again (another replica may serve it)")
}

/// A request field that is missing or malformed.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    let message = bounded(format!("{field}: {reason}"));
    tracing::info!(error = %message, "invalid argument");
    Status::invalid_argument(message)
}

/// Gives tonic's own transport-level refusals the codes the gRPC spec and our contract name:
/// a message that fails to decode (bad bytes, nesting past prost's recursion limit) is the
/// caller's INVALID_ARGUMENT, not INTERNAL; one over the size limit is RESOURCE_EXHAUSTED, not
/// OUT_OF_RANGE. Applied to every response as one layer, so no handler needs to know.
pub fn precise_transport_codes<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let replacement = match code {
        Some("13") if message.starts_with("failed to decode Protobuf message") => Some("3"),
        Some("11") if message.contains("message length too large") => Some("8"),
        _ => None,
    };
    if let Some(replacement) = replacement {
        tracing::info!(message, "request refused by the transport");
        headers.insert("grpc-status", http::HeaderValue::from_static(replacement));
    }
    response
}
