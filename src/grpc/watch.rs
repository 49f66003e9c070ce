//! `WatchService`: membership changes of saved segments, streamed as writes happen.
//!
//! The response stream pulls each message from the engine's [`Watcher`] only when tonic asks
//! for it, so a caller that stops reading holds back nothing but its own position: the writes
//! go on, and the watcher notices how far behind it fell when the caller reads again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::auth::authorize;
use super::pb;
use super::status::{shutting_down, to_status};
use super::Services;
use crate::engine::{ChangeKind, Engine, WatchBatch, Watcher};

/// The watch service.
#[derive(Debug, Clone)]
pub struct WatchApi {
    engine: Arc<Engine>,
    /// Turns true when the server starts shutting down: every stream then ends.
    stopping: watch::Receiver<bool>,
}

impl WatchApi {
    pub fn new(services: &Services, stopping: watch::Receiver<bool>) -> Self {
        Self {
            engine: services.engine.clone(),
            stopping,
        }
    }
}

#[tonic::async_trait]
impl pb::watch_service_server::WatchService for WatchApi {
    type WatchStream = WatchStream;

    #[tracing::instrument(skip_all, fields(
        dataset = %request.get_ref().dataset,
        segments = ?request.get_ref().segment_ids,
        resumed = !request.get_ref().resume_token.is_empty(),
    ))]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let watcher = self
            .engine
            .watch(
                &request.dataset,
                &request.segment_ids,
                &request.resume_token,
            )
            .map_err(|e| {
                let field = field_of(&e);
                to_status(e, field)
            })?;
        tracing::info!("watch started");
        Ok(Response::new(WatchStream::new(
            watcher,
            self.stopping.clone(),
            tracing::Span::current(),
        )))
    }
}

/// The request field an error at the start of a watch is about.
fn field_of(error: &crate::engine::EngineError) -> &'static str {
    use crate::engine::EngineError;
    match error {
        EngineError::DatasetNotFound(_) | EngineError::InvalidDatasetName(_) => "dataset",
        _ => "segment_ids",
    }
}

fn to_proto(batch: WatchBatch) -> pb::WatchResponse {
    pb::WatchResponse {
        changes: batch
            .changes
            .into_iter()
            .map(|change| pb::MembershipChange {
                segment_id: change.segment,
                user_id: change.user_id,
                kind: match change.kind {
                    ChangeKind::Entered => pb::MembershipChangeKind::Entered,
                    ChangeKind::Left => pb::MembershipChangeKind::Left,
                } as i32,
            })
            .collect(),
        resume_token: batch.resume_token,
    }
}

/// What one step yields: the next message, and the watcher and shutdown signal for the next.
type StepOutput = (
    Result<pb::WatchResponse, Status>,
    Watcher,
    watch::Receiver<bool>,
);

/// One step of the stream.
type Step = Pin<Box<dyn Future<Output = StepOutput> + Send>>;

/// The response stream: one [`Watcher::next`] in flight at a time, started only when polled.
pub struct WatchStream {
    /// `None` once the stream has ended with an error.
    step: Option<Step>,
    span: tracing::Span,
}

impl WatchStream {
    fn new(watcher: Watcher, stopping: watch::Receiver<bool>, span: tracing::Span) -> Self {
        Self {
            step: Some(Self::step(watcher, stopping, span.clone())),
            span,
        }
    }

    fn step(
        mut watcher: Watcher,
        mut stopping: watch::Receiver<bool>,
        span: tracing::Span,
    ) -> Step {
        Box::pin(
            async move {
                // `Watcher::next` is cancel-safe: giving up on it at shutdown loses nothing.
                let message = tokio::select! {
                    next = watcher.next() => next.map(to_proto).map_err(|e| {
                        tracing::info!(error = %e, "watch ended");
                        to_status(e, "")
                    }),
                    _ = stopping.wait_for(|stopping| *stopping) => Err(shutting_down()),
                };
                (message, watcher, stopping)
            }
            .instrument(span),
        )
    }
}

impl Stream for WatchStream {
    type Item = Result<pb::WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(step) = self.step.as_mut() else {
            return Poll::Ready(None);
        };
        let (message, watcher, stopping) = match step.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(done) => done,
        };
        self.step = match message {
            Ok(_) => Some(Self::step(watcher, stopping, self.span.clone())),
            Err(_) => None,
        };
        Poll::Ready(Some(message))
    }
}
