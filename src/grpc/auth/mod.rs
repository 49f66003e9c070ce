//! Who may call what: bearer tokens from the token file, each with scopes and dataset patterns.
//!
//! Checked in two places, because a tower layer sees the HTTP/2 request but not the decoded
//! message:
//! - [`layer::Authenticate`], around every service: authenticates the token and checks the
//!   scope the method needs ([`scopes`]), then hands the handlers the [`Caller`] as a request
//!   extension. The token's name goes into the request's span, never the token.
//! - each handler, once it has the message: [`authorize`] the dataset it names (or
//!   [`Caller::may_use_every_dataset`], [`Caller::visible`] for calls about all datasets).

pub mod layer;
pub mod scopes;
pub mod tokens;

use std::sync::Arc;

use tonic::{Code, Request, Status};

pub use layer::AuthLayer;
pub use tokens::{sha256_hex, to_hex, Grant, Scope, TokenEntry, TokenFile, Tokens};

use super::status::to_status;
use crate::engine::dataset_name;

/// Why a call is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("malformed authorization metadata: expected `Bearer <token>`")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("token '{token}' lacks the '{}' scope that {method} needs", .scope.name())]
    Scope {
        token: String,
        scope: Scope,
        method: String,
    },
    #[error("no scope grants {method}")]
    UnknownMethod { method: String },
    #[error("token '{token}' may not use dataset '{dataset}'")]
    Dataset { token: String, dataset: String },
    #[error("token '{token}' may not act on every dataset at once: that needs the dataset pattern \"*\"")]
    EveryDataset { token: String },
}

/// The status of a refusal, logged here once. Exhaustive: a new reason chooses its code.
pub fn auth_status(error: AuthError) -> Status {
    let code = match &error {
        AuthError::Missing | AuthError::Malformed | AuthError::Unknown => Code::Unauthenticated,
        AuthError::Scope { .. }
        | AuthError::UnknownMethod { .. }
        | AuthError::Dataset { .. }
        | AuthError::EveryDataset { .. } => Code::PermissionDenied,
    };
    tracing::info!(code = ?code, error = %error, "request refused");
    Status::new(code, error.to_string())
}

/// Who is calling, as the auth layer established it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The server runs without a token file: every call may touch every dataset.
    Anyone,
    /// The holder of this token.
    Token(Arc<Grant>),
}

impl Caller {
    /// The caller of `request`. A request the auth layer has not seen is refused.
    ///
    /// # Errors
    /// UNAUTHENTICATED when no caller is attached.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| auth_status(AuthError::Missing))
    }

    /// Whether the caller may touch `dataset` (empty: `default`).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed name, PERMISSION_DENIED outside the token's patterns.
    pub fn may_use(&self, dataset: &str) -> Result<(), Status> {
        let name = dataset_name(dataset).map_err(|e| to_status(e, "dataset"))?;
        match self {
            Caller::Anyone => Ok(()),
            Caller::Token(grant) if grant.covers(name) => Ok(()),
            Caller::Token(grant) => Err(auth_status(AuthError::Dataset {
                token: grant.name.clone(),
                dataset: name.to_owned(),
            })),
        }
    }

    /// Whether the caller may act on all datasets at once (a snapshot of everything).
    ///
    /// # Errors
    /// PERMISSION_DENIED unless the token has the pattern `*`.
    pub fn may_use_every_dataset(&self) -> Result<(), Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Token(grant) if grant.covers_every_dataset() => Ok(()),
            Caller::Token(grant) => Err(auth_status(AuthError::EveryDataset {
                token: grant.name.clone(),
            })),
        }
    }

    /// The datasets of `names` the caller may see.
    pub fn visible(&self, mut names: Vec<String>) -> Vec<String> {
        if let Caller::Token(grant) = self {
            names.retain(|name| grant.covers(name));
        }
        names
    }
}

/// Whether the caller of `request` may touch `dataset`.
///
/// # Errors
/// As [`Caller::of`] and [`Caller::may_use`].
pub fn authorize<T>(request: &Request<T>, dataset: &str) -> Result<(), Status> {
    Caller::of(request)?.may_use(dataset)
}
