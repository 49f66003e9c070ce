//! The tower layer in front of every service: one span per request, named by method and by
//! the token's name; the token authenticated and the method's scope checked before anything
//! is decoded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::Instrument;

use super::scopes::{rule_of, Rule};
use super::tokens::{Grant, TokenFile};
use super::{auth_status, AuthError, Caller};
use crate::grpc::reload::Reloading;

/// Puts [`Authenticate`] around a service. Without a token file every caller is
/// [`Caller::Anyone`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<Reloading<TokenFile>>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<Reloading<TokenFile>>>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    tokens: Option<Arc<Reloading<TokenFile>>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let span = tracing::info_span!(
            "rpc",
            method = %request.uri().path(),
            caller = tracing::field::Empty
        );
        let admitted = span.in_scope(|| self.admit(&mut request));
        match admitted {
            Ok(caller) => {
                if let Caller::Token(grant) = &caller {
                    span.record("caller", tracing::field::display(&grant.name));
                }
                request.extensions_mut().insert(caller);
                // The service that was polled ready takes the call; its clone waits for next.
                let ready = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, ready);
                Box::pin(inner.call(request).instrument(span))
            }
            Err(error) => {
                if let Some(name) = error.token_name() {
                    span.record("caller", tracing::field::display(name));
                }
                let status = span.in_scope(|| auth_status(error));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S> Authenticate<S> {
    /// The caller of `request` if the method's rule lets it in.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Caller, AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(Caller::Anyone);
        };
        let method = request.uri().path();
        let rule = rule_of(method);
        if rule == Some(Rule::Open) {
            return Ok(Caller::Anyone);
        }
        let grant = authenticate(request.headers(), &tokens.current())?;
        match rule {
            Some(Rule::Open | Rule::AnyToken) => {}
            Some(Rule::Needs(scope)) if grant.has(scope) => {}
            Some(Rule::Needs(scope)) => {
                return Err(AuthError::Scope {
                    token: grant.name.clone(),
                    scope,
                    method: method.to_owned(),
                })
            }
            None => {
                return Err(AuthError::UnknownMethod {
                    method: method.to_owned(),
                })
            }
        }
        Ok(Caller::Token(grant))
    }
}

impl AuthError {
    /// The name of the token a refusal is about, for the span.
    fn token_name(&self) -> Option<&str> {
        match self {
            AuthError::Scope { token, .. }
            | AuthError::Dataset { token, .. }
            | AuthError::EveryDataset { token } => Some(token),
            AuthError::Missing
            | AuthError::Malformed
            | AuthError::Unknown
            | AuthError::UnknownMethod { .. } => None,
        }
    }
}

/// The grant of the `authorization: Bearer <token>` header.
fn authenticate(
    headers: &http::HeaderMap,
    tokens: &super::Tokens,
) -> Result<Arc<Grant>, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    tokens.find(token).ok_or(AuthError::Unknown)
}
