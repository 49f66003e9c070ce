//! The gRPC edge: generated types, the services, and one server builder that applies message
//! limits and authentication ([`auth`]) to every service, over plaintext or TLS ([`tls`]),
//! and serves health and reflection beside them.
//!
//! Handlers stay thin: validate and convert the request, call the engine (CPU-heavy work on the
//! blocking pool), convert the answer back. Errors become statuses only here ([`status`]).

pub mod admin;
pub mod auth;
pub mod body;
pub mod convert;
pub mod drain;
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

    /// The response of an import RPC: each RPC has its own message (the Buf style), all
    /// carrying one `ImportProgress`, so that servers and clients handle them alike.
    pub trait ImportResponse: Send + 'static {
        fn from_progress(progress: ImportProgress) -> Self;
        /// `None` when the sender left the progress out.
        fn into_progress(self) -> Option<ImportProgress>;
    }

    macro_rules! import_responses {
        ($($response:ident),*) => {$(
            impl ImportResponse for $response {
                fn from_progress(progress: ImportProgress) -> Self {
                    Self { progress: Some(progress) }
                }
                fn into_progress(self) -> Option<ImportProgress> {
                    self.progress
                }
            }
        )*};
    }

    import_responses!(
        ImportUsersResponse,
        ImportUsersFileResponse,
        ImportEventsResponse,
        ImportEventsFileResponse
    );
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
    /// Keepalives and the shutdown grace period.
    pub lifecycle: Lifecycle,
}

/// How connections are kept alive and how long a stopping server waits for its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// After a shutdown signal, how long calls already running may take before the server
    /// stops anyway (below Kubernetes' `terminationGracePeriodSeconds`, minus the preStop pause).
    pub shutdown_grace: std::time::Duration,
    /// Idle time after which the server pings a connection (HTTP/2 PING), so that proxies and
    /// load balancers with idle timeouts keep quiet streams (Watch, exports) open.
    pub keepalive_interval: std::time::Duration,
    /// How long a ping may go unanswered before the connection is closed as dead.
    pub keepalive_timeout: std::time::Duration,
}

impl Lifecycle {
    /// 25 s of grace (the chart gives the pod 60 s, 5 of them before SIGTERM); a ping after
    /// 30 s of silence, below the 60 s idle timeout common to cloud load balancers; 10 s to
    /// answer it.
    pub const DEFAULT: Self = Self {
        shutdown_grace: std::time::Duration::from_secs(25),
        keepalive_interval: std::time::Duration::from_secs(30),
        keepalive_timeout: std::time::Duration::from_secs(10),
    };
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::DEFAULT
    }
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
/// NOT_SERVING, new calls are refused with UNAVAILABLE, watches end, and the calls already
/// running get `lifecycle.shutdown_grace` to finish; past it the server stops anyway.
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
    let reflection = reflection_builder().build_v1()?;
    // Older tools (Postman, some grpcurl builds) only ask the pre-release name.
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;
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
    let drain = drain::Drain::default();
    let draining = drain.clone();
    let grace = services.lifecycle.shutdown_grace;
    let (deadline_tx, deadline_rx) = tokio::sync::oneshot::channel();
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
        draining.start();
        stopping.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        wait_for_calls(&draining, grace).await;
        // Sent after the wait, so that its outcome is logged before the server may stop.
        let _ = deadline_tx.send(deadline);
    };
    let lifecycle = services.lifecycle;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(lifecycle.keepalive_interval))
        .http2_keepalive_timeout(Some(lifecycle.keepalive_timeout))
        // Outermost: it sees the final status of every call, refusals included.
        .layer(metrics::MetricsLayer::new(services.metrics.clone()))
        .layer(drain::layer(drain))
        .layer(tower::util::MapResponseLayer::new(
            status::precise_transport_codes,
        ))
        .layer(AuthLayer::new(security.tokens.clone()))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(query, gate.clone()))
        .add_service(InterceptedService::new(segments, gate.clone()))
        .add_service(InterceptedService::new(ingest, gate.clone()))
        .add_service(InterceptedService::new(schema, gate.clone()))
        .add_service(InterceptedService::new(watch, gate.clone()))
        .add_service(InterceptedService::new(admin, gate));
    let serving = async move {
        match security.tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(TlsIncoming::new(listener, tls), shutdown)
                    .await
            }
            // Without TCP_NODELAY, the last frames of a response (a stream's trailers) wait
            // for the client's delayed ACK: 40 ms added to every streaming call on Linux.
            None => {
                router
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown,
                    )
                    .await
            }
        }
    };
    // tonic waits for every connection to close; past the grace period the server stops
    // without them (their calls are dropped with the process).
    let served = tokio::select! {
        served = serving => served,
        () = grace_over(deadline_rx) => {
            tracing::info!("stopping without waiting for the connections still open");
            Ok(())
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

/// Reflection of every service served, both reflection versions included, so that either
/// version lists the same services.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Waits for the calls running at shutdown to end, at most `grace`, saying how it went.
async fn wait_for_calls(drain: &drain::Drain, grace: std::time::Duration) {
    let running = drain.running();
    tracing::info!(
        running,
        grace_secs = grace.as_secs_f64(),
        "shutting down: refusing new calls, waiting for those running"
    );
    if drain.idle_within(grace).await {
        tracing::info!("every call ended; stopping");
    } else {
        tracing::warn!(
            running = drain.running(),
            "grace period over with calls still running; stopping anyway"
        );
    }
}

/// Completes when the shutdown's grace period has passed; never before shutdown starts.
async fn grace_over(deadline: tokio::sync::oneshot::Receiver<tokio::time::Instant>) {
    match deadline.await {
        Ok(deadline) => tokio::time::sleep_until(deadline).await,
        // The server stopped without a shutdown (a transport error): nothing to cut short.
        Err(_) => std::future::pending().await,
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
