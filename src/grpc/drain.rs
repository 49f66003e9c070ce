//! Graceful shutdown: once the server starts stopping, new calls are refused with
//! `UNAVAILABLE` (the caller retries on another replica) while the calls already running,
//! streams included, are counted until they end, so that the server can wait for them within
//! its grace period.
//!
//! A tower layer, because only there is a call's whole life visible: it ends when its response
//! body ends or is dropped, not when the handler returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tower::{Layer, Service};

use super::body::BoxFuture;

use super::status::shutting_down;

/// Health checks stay answered while draining: they are how load balancers learn to stop
/// sending calls here.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The shared drain state: whether new calls are refused, and how many are running.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    running: Arc<watch::Sender<usize>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: Arc::new(AtomicBool::new(false)),
            running: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Drain {
    /// From now on new calls (health checks aside) are refused.
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        *self.running.borrow()
    }

    /// Waits until no call runs, or `grace` passes; whether they all ended.
    pub async fn idle_within(&self, grace: Duration) -> bool {
        let mut running = self.running.subscribe();
        let idle = tokio::time::timeout(grace, running.wait_for(|n| *n == 0)).await;
        idle.is_ok()
    }

    fn admit(&self, path: &str) -> Option<Running> {
        if self.draining.load(Ordering::SeqCst) && !path.starts_with(HEALTH_PREFIX) {
            return None;
        }
        self.running.send_modify(|n| *n += 1);
        Some(Running(self.running.clone()))
    }
}

/// One admitted call; it stops counting when dropped (its response body ended or went away).
struct Running(Arc<watch::Sender<usize>>);

impl super::body::Watcher for Running {}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Puts [`Drained`] around a service.
pub fn layer<S>(drain: Drain) -> impl Layer<S, Service = Drained<S>> + Clone {
    tower::layer::layer_fn(move |inner| Drained {
        inner,
        drain: drain.clone(),
    })
}

/// See [`layer`].
#[derive(Debug, Clone)]
pub struct Drained<S> {
    inner: S,
    drain: Drain,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Drained<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Some(running) = self.drain.admit(request.uri().path()) else {
            tracing::debug!(method = %request.uri().path(), "refused: shutting down");
            return Box::pin(std::future::ready(Ok(shutting_down().into_http())));
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| super::body::watched(body, running)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_calls_until_dropped_and_refuses_new_ones_once_draining() {
        let drain = Drain::default();
        let call = drain
            .admit("/audience.v1.QueryService/Count")
            .expect("admitted");
        assert_eq!(drain.running(), 1);
        drain.start();
        assert!(drain.admit("/audience.v1.QueryService/Count").is_none());
        let health = drain
            .admit("/grpc.health.v1.Health/Check")
            .expect("health stays open");
        drop(health);
        assert!(!drain.idle_within(Duration::from_millis(20)).await);
        drop(call);
        assert!(drain.idle_within(Duration::from_millis(20)).await);
        assert_eq!(drain.running(), 0);
    }
}
