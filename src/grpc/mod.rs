//! The gRPC edge: generated types, the services, and one server builder that applies message
//! limits and authentication ([`auth`]) to every service, over plaintext or TLS ([`tls`]),
//! and serves health and reflection beside them.
//!
//! Handlers stay thin: validate and convert the request, call the engine (CPU-heavy work on the
//! blocking pool), convert the answer back. Errors become statuses only here ([`status`]).

pub mod admin;
pub mod auth;
pub mod convert;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod reload;
pub mod schema;
pub mod segment;
pub mod status;
pub mod tls;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};

use crate::engine::Engine;
use auth::{AuthLayer, TokenFile};
use reload::{ReloadError, Reloading};
use tls::{TlsError, TlsFiles, TlsIncoming};

/// Generated protobuf and tonic code for `audience.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("audience.v1");

    /// The encoded descriptor set that server reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/audience_descriptor.bin"));
}

/// Runs a CPU-heavy closure on the blocking pool, keeping the async workers free.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "blocking task failed");
            Status::internal("internal error; see the server log")
        })?
}

/// The server's shared state handed to every service.
#[derive(Debug, Clone)]
pub struct Services {
    pub engine: Arc<Engine>,
    /// Largest message decoded or encoded.
    pub max_message_bytes: usize,
    /// The only directory server-side imports (`ImportUsersFile`, `ImportEventsFile`) read
    /// from; unset, they are refused.
    pub import_dir: Option<std::path::PathBuf>,
    /// How often segments with moving time windows are brought up to date.
    pub time_refresh: std::time::Duration,
    /// TLS and tokens.
    pub security: Security,
    /// Request counts and latencies, when metrics are served.
    pub metrics: Option<metrics::RequestMetrics>,
}

/// The server's TLS identity and its tokens, each re-read from its files while it runs.
#[derive(Debug, Clone)]
pub struct Security {
    /// Unset: plaintext.
    pub tls: Option<Arc<Reloading<TlsFiles>>>,
    /// Unset: every caller may do everything.
    pub tokens: Option<Arc<Reloading<TokenFile>>>,
    /// How often the files are looked at.
    pub reload_every: std::time::Duration,
}

impl Default for Security {
    /// Plaintext, no tokens.
    fn default() -> Self {
        Self {
            tls: None,
            tokens: None,
            reload_every: reload::RELOAD_EVERY,
        }
    }
}

/// Why the certificate or token files cannot be used at start.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] ReloadError<TlsError>),
    #[error(transparent)]
    Tokens(#[from] ReloadError<auth::tokens::TokenFileError>),
}

impl Security {
    /// Loads the certificate files and the token file that are given.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, named.
    pub fn load(
        tls: Option<TlsFiles>,
        auth_file: Option<std::path::PathBuf>,
    ) -> Result<Self, SecurityError> {
        Ok(Self {
            tls: tls.map(Reloading::load).transpose()?,
            tokens: auth_file.map(TokenFile).map(Reloading::load).transpose()?,
            reload_every: reload::RELOAD_EVERY,
        })
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The start-up load (recovery, demo data) failed; the server stopped.
    #[error("start-up failed: {0}")]
    Start(String),
}

/// Names of the services whose health is reported besides the server's (`""`).
const SERVICE_NAMES: &[&str] = &[
    "audience.v1.QueryService",
    "audience.v1.SegmentService",
    "audience.v1.IngestService",
    "audience.v1.SchemaService",
    "audience.v1.WatchService",
    "audience.v1.AdminService",
];

async fn set_all(
    reporter: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Serves every service on `listener` until `shutdown` completes.
///
/// With `services.security`, connections are TLS and calls need tokens; their files are
/// re-read every `reload_every` while the server runs.
///
/// Health starts NOT_SERVING; when `ready` completes (after any start-up load) it turns
/// SERVING, or, when `ready` fails, the server stops with its error. On shutdown health turns
/// NOT_SERVING first, then in-flight requests finish.
///
/// # Errors
/// A transport failure, or a descriptor set reflection cannot read.
pub async fn serve(
    services: Services,
    listener: TcpListener,
    ready: impl Future<Output = Result<(), String>> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let limit = services.max_message_bytes;
    let gate = ready_gate(services.engine.clone());
    let query = pb::query_service_server::QueryServiceServer::new(query::QueryApi::new(&services))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let segments =
        pb::segment_service_server::SegmentServiceServer::new(segment::SegmentApi::new(&services))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
    let ingest =
        pb::ingest_service_server::IngestServiceServer::new(ingest::IngestApi::new(&services))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
    let schema =
        pb::schema_service_server::SchemaServiceServer::new(schema::SchemaApi::new(&services))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
    let admin = pb::admin_service_server::AdminServiceServer::new(admin::AdminApi::new(&services))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    // Watch streams never end by themselves: they end when this turns true at shutdown, so
    // that in-flight requests can finish and the server stop.
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let watch = pb::watch_service_server::WatchServiceServer::new(watch::WatchApi::new(
        &services,
        stopping_rx,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    let ticker = tokio::spawn(advance_time(services.engine.clone(), services.time_refresh));
    let security = services.security.clone();
    let reloaders: Vec<_> = [
        security
            .tls
            .as_ref()
            .map(|tls| tls.watch(security.reload_every)),
        security
            .tokens
            .as_ref()
            .map(|t| t.watch(security.reload_every)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let ready_reporter = reporter.clone();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        match ready.await {
            Ok(()) => {
                set_all(&ready_reporter, tonic_health::ServingStatus::Serving).await;
                tracing::info!("serving");
            }
            Err(error) => {
                let _ = failed_tx.send(error);
            }
        }
    });
    let failure = Arc::new(std::sync::Mutex::new(None));
    let failed = failure.clone();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            Ok(error) = failed_rx => {
                tracing::error!(%error, "start-up failed; stopping");
                if let Ok(mut slot) = failed.lock() {
                    *slot = Some(error);
                }
            }
        }
        set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
        stopping.send_replace(true);
        tracing::info!("shutting down");
    };
    let router = tonic::transport::Server::builder()
        // Outermost: it sees the final status of every call, refusals included.
        .layer(metrics::MetricsLayer::new(services.metrics.clone()))
        .layer(tower::util::MapResponseLayer::new(
            status::precise_transport_codes,
        ))
        .layer(AuthLayer::new(security.tokens.clone()))
        .add_service(health)
        .add_service(reflection)
        .add_service(InterceptedService::new(query, gate.clone()))
        .add_service(InterceptedService::new(segments, gate.clone()))
        .add_service(InterceptedService::new(ingest, gate.clone()))
        .add_service(InterceptedService::new(schema, gate.clone()))
        .add_service(InterceptedService::new(watch, gate.clone()))
        .add_service(InterceptedService::new(admin, gate));
    let served = match security.tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(TlsIncoming::new(listener, tls), shutdown)
                .await
        }
        // Without TCP_NODELAY, the last frames of a response (a stream's trailers) wait for
        // the client's delayed ACK: 40 ms added to every streaming call on Linux.
        None => {
            router
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await
        }
    };
    ticker.abort();
    for reloader in reloaders {
        reloader.abort();
    }
    served?;
    match failure.lock().ok().and_then(|mut f| f.take()) {
        Some(error) => Err(ServeError::Start(error)),
        None => Ok(()),
    }
}

/// Refuses every dataset request with `UNAVAILABLE: loading: N of M` while the engine loads
/// (recovery, demo data), so that no caller gets an answer from half a dataset. Health and
/// reflection are not gated.
fn ready_gate(
    engine: Arc<Engine>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request| match engine.check_ready() {
        Ok(()) => Ok(request),
        Err(error) => Err(Status::unavailable(error.to_string())),
    }
}

/// Brings time-windowed segments up to date every `period`, for as long as the server runs.
async fn advance_time(engine: Arc<Engine>, period: std::time::Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let span = tracing::info_span!("advance_time");
        if let Err(error) = tracing::Instrument::instrument(engine.advance_time(), span).await {
            tracing::warn!(%error, "time-driven segment refresh failed; retrying next period");
        }
    }
}
