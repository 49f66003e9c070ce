//! The one mapping from engine errors to gRPC statuses, and where errors get logged.

use tonic::{Code, Status};

use crate::engine::EngineError;

/// The gRPC code of an engine error. Exhaustive: a new error variant must choose its code.
pub fn code_of(error: &EngineError) -> Code {
    match error {
        EngineError::DatasetNotFound(_) | EngineError::SegmentNotFound(_) => Code::NotFound,
        EngineError::SegmentExists(_) => Code::AlreadyExists,
        EngineError::SegmentInUse { .. } | EngineError::InvalidPageToken => {
            Code::FailedPrecondition
        }
        EngineError::LimitExceeded { .. }
        | EngineError::ExpressionTooLarge { .. }
        | EngineError::ExpressionTooDeep { .. } => Code::ResourceExhausted,
        EngineError::InvalidRecord { reason, .. } => code_of(reason),
        EngineError::Key(crate::index::keys::KeyError::Exhausted(_)) => Code::ResourceExhausted,
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
        | EngineError::Import(_)
        | EngineError::UnsupportedColumn { .. }
        | EngineError::Arrow(_)
        | EngineError::Parquet(_)
        | EngineError::InvalidArgument { .. } => Code::InvalidArgument,
        EngineError::ImportIo(e) if e.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        EngineError::ImportIo(_) => Code::FailedPrecondition,
        EngineError::Internal(_) => Code::Internal,
    }
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
    tracing::info!(code = ?code, error = %error, "request refused");
    let message = match (&error, field.is_empty()) {
        (EngineError::SegmentInUse { .. } | EngineError::InvalidPageToken, _) | (_, true) => {
            error.to_string()
        }
        _ => format!("{field}: {error}"),
    };
    Status::new(code, message)
}

/// A request field that is missing or malformed.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    tracing::info!(field, reason = %reason, "invalid argument");
    Status::invalid_argument(format!("{field}: {reason}"))
}
