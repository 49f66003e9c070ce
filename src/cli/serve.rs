//! `audience serve`: configuration, logging, the demo load, signals and the server.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::connect::ConnectArgs;
use super::settings::{ServeOverrides, SettingsArgs};
use crate::config::{Config, LogFormat};
use crate::engine::{
    DurableOptions, Engine, ImportBatch, SegmentDefinition, SharedOptions, DEFAULT_DATASET,
};
use crate::grpc::metrics::RequestMetrics;
use crate::grpc::tls::TlsFiles;
use crate::grpc::{serve, Lifecycle, Security, SecurityError, Services};
use crate::metrics::Exporter;
use crate::persist::wal::WalOptions;
use crate::time::SystemClock;

/// Flags of `serve`: the settings (each also read from an `AUDIENCE_*` variable, both over
/// the config file), and what to do with them.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A TOML config file.
    #[arg(long, env = "AUDIENCE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Start from what is valid when the log or a snapshot is corrupt, dropping the rest (and
    /// saying what), instead of refusing to start.
    #[arg(long, env = "AUDIENCE_RECOVER_TRUNCATE")]
    recover_truncate: bool,
    /// Print the effective configuration (defaults, file, variables and flags) as TOML and
    /// exit; the Redis password is masked.
    #[arg(long, conflicts_with = "check_config")]
    print_config: bool,
    /// Validate the configuration and exit: 0 when it is usable, 1 with the reason.
    #[arg(long)]
    check_config: bool,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] crate::grpc::ServeError),
    #[error("cannot print the configuration: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("{0} is for client commands, not serve{1}")]
    ClientFlag(&'static str, &'static str),
}

impl ServeArgs {
    /// The effective configuration: the file, then the settings given as variables or flags
    /// (the global `--tls-cert`/`--tls-key` among them), validated. Refuses client-only flags,
    /// which `serve` would otherwise accept and ignore.
    fn config(
        &self,
        connect: &ConnectArgs,
        client_flags: &[(&'static str, &'static str)],
    ) -> Result<Config, ServeError> {
        refuse_client_flags(connect, client_flags)?;
        let overrides = ServeOverrides::new(&self.settings, connect);
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

/// Refuses the flags that only client commands read: `serve` has no use for them.
/// `client_flags` are those given on the command line, each with what to use instead.
fn refuse_client_flags(
    connect: &ConnectArgs,
    client_flags: &[(&'static str, &'static str)],
) -> Result<(), ServeError> {
    if let Some(&(flag, instead)) = client_flags.first() {
        return Err(ServeError::ClientFlag(flag, instead));
    }
    if connect.tls_ca.is_some() {
        return Err(ServeError::ClientFlag(
            "--tls-ca",
            ": the server trusts client certificates from --tls-client-ca",
        ));
    }
    if connect.token.is_some() {
        return Err(ServeError::ClientFlag(
            "--token (AUDIENCE_TOKEN)",
            ": the server's tokens are in --auth-file",
        ));
    }
    Ok(())
}

/// The certificate and token files of `config`, loaded (and named when they cannot be).
fn security(config: &Config) -> Result<Security, SecurityError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let security = Security::load(tls, config.auth_file.clone())?;
    if let Some(tokens) = &security.tokens {
        let count = tokens.current().len();
        tracing::info!(tokens = count, "calls need a token from the token file");
    } else if config.allow_unauthenticated && !config.listen.ip().is_loopback() {
        tracing::warn!("no auth_file: every caller that reaches the port may do everything");
    }
    Ok(security)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests running several servers) is harmless: keep the first.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Starts the server and runs until SIGINT or SIGTERM.
///
/// # Errors
/// A bad configuration, an address in use, or a transport failure.
pub async fn run(
    args: ServeArgs,
    connect: ConnectArgs,
    client_flags: &[(&'static str, &'static str)],
) -> Result<(), ServeError> {
    let config = args.config(&connect, client_flags)?;
    // Before the certificate and token files are read: a probe of the configuration alone.
    if args.print_config {
        let text = config.to_toml()?;
        return std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
            .map_err(ServeError::Output);
    }
    if args.check_config {
        eprintln!("configuration ok");
        return Ok(());
    }
    init_logging(config.log_format);
    let security = security(&config)?;
    if config.data_dir.is_none() && config.redis_url.is_none() {
        tracing::warn!("no data_dir: data is kept in memory only and lost when the server stops");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    tracing::info!(
        addr = %config.listen,
        tls = security.tls.is_some(),
        mutual_tls = config.tls_client_ca.is_some(),
        "listening"
    );
    let engine = Arc::new(Engine::new(config.limits, Arc::new(SystemClock)));
    // Requests get `loading` until recovery and the demo load are done.
    engine.progress().begin(1);
    let services = Services {
        engine: engine.clone(),
        max_message_bytes: config.max_message_bytes,
        import_dir: config.import_dir.clone(),
        time_refresh: std::time::Duration::from_secs(config.segment_refresh_secs),
        security,
        metrics: config.metrics_listen.map(|_| RequestMetrics::default()),
        lifecycle: lifecycle(&config),
    };
    let exporter = match (config.metrics_listen, &services.metrics) {
        (Some(addr), Some(requests)) => Some(start_metrics(addr, &engine, requests).await?),
        _ => None,
    };
    let durable = durable_options(&config, args.recover_truncate);
    let shared = shared_options(&config);
    let demo = DemoSize {
        users: config.demo_users,
        events: config.demo_events,
        segments: config.demo_segments,
    };
    let ready = async move {
        if let Some(options) = durable {
            let report = engine
                .open_durable(options)
                .await
                .map_err(|e| e.to_string())?;
            for dropped in &report.dropped {
                tracing::warn!(%dropped, "recovery dropped data");
            }
        }
        if let Some(options) = shared {
            engine
                .open_shared(options)
                .await
                .map_err(|e| e.to_string())?;
        }
        // A dataset recovered from disk is not loaded again.
        let has_default = engine
            .snapshot(DEFAULT_DATASET)
            .is_ok_and(|state| !state.is_empty());
        if demo.users > 0 && !has_default {
            load_demo(&engine, demo).await?;
        }
        engine.progress().finish();
        Ok(())
    };
    let served = serve(services, listener, ready, shutdown_signal()).await;
    if let Some(exporter) = exporter {
        exporter.abort();
    }
    served?;
    Ok(())
}

/// Binds `addr` and serves the metrics there until the returned task is aborted.
async fn start_metrics(
    addr: std::net::SocketAddr,
    engine: &Arc<Engine>,
    requests: &RequestMetrics,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(addr = %addr, "metrics at /metrics");
    let exporter = Arc::new(Exporter::new(engine.clone(), requests));
    Ok(tokio::spawn(crate::metrics::serve(listener, exporter)))
}

/// The keepalive and shutdown settings of `config`.
fn lifecycle(config: &Config) -> Lifecycle {
    Lifecycle {
        shutdown_grace: std::time::Duration::from_secs(config.shutdown_grace_secs),
        keepalive_interval: std::time::Duration::from_secs(config.keepalive_interval_secs),
        keepalive_timeout: std::time::Duration::from_secs(config.keepalive_timeout_secs),
    }
}

/// The embedded store's settings, when a data directory is set without Redis.
fn durable_options(config: &Config, repair: bool) -> Option<DurableOptions> {
    if config.redis_url.is_some() {
        return None;
    }
    let data_dir = config.data_dir.clone()?;
    Some(DurableOptions {
        data_dir,
        wal: WalOptions {
            policy: config.fsync,
            interval: std::time::Duration::from_millis(config.fsync_interval_ms),
            segment_bytes: config.wal_segment_bytes,
        },
        snapshot_log_bytes: config.snapshot_log_bytes,
        snapshot_log_records: config.snapshot_log_records,
        erasure_max_age: std::time::Duration::from_secs(config.erasure_max_age_secs),
        repair,
    })
}

/// Redis mode's settings, when a Redis URL is set; a data directory is then its local cache.
fn shared_options(config: &Config) -> Option<SharedOptions> {
    Some(SharedOptions {
        url: config.redis_url.clone()?,
        prefix: config.redis_prefix.clone(),
        snapshot_log_bytes: config.snapshot_log_bytes,
        snapshot_log_records: config.snapshot_log_records,
        erasure_max_age: std::time::Duration::from_secs(config.erasure_max_age_secs),
        cache_dir: config.data_dir.clone(),
    })
}

/// What `--demo-*` asks to generate.
#[derive(Debug, Clone, Copy)]
struct DemoSize {
    users: u64,
    events: u64,
    segments: u64,
}

/// Loads the demo users, then their events, then the saved segments, counting all three in
/// the load progress.
async fn load_demo(engine: &Arc<Engine>, demo: DemoSize) -> Result<(), String> {
    engine
        .progress()
        .begin(demo.users + demo.events + demo.segments);
    load_demo_users(engine, demo.users).await?;
    if demo.events > 0 {
        load_demo_events(engine, demo.users, demo.events).await?;
    }
    if demo.segments > 0 {
        create_demo_segments(engine, demo).await?;
    }
    Ok(())
}

/// Creates the demo's saved segments one by one, as a team would, logging progress every ~10%.
///
/// # Errors
/// As [`load_demo_users`].
async fn create_demo_segments(engine: &Arc<Engine>, demo: DemoSize) -> Result<(), String> {
    let started = std::time::Instant::now();
    let definitions = crate::demo::segments(demo.segments as usize, 42);
    let step = (definitions.len() / 10).max(1);
    for (done, (id, text)) in definitions.into_iter().enumerate() {
        let expression = crate::expr::parse(&text)
            .map_err(|e| format!("demo segment {id} ({text}) does not parse: {e}"))?;
        let now = engine.now();
        let definition = SegmentDefinition {
            name: id.clone(),
            id: id.clone(),
            description: String::new(),
            labels: Default::default(),
            expression,
            created_at: now,
            updated_at: now,
        };
        engine
            .create_segment(DEFAULT_DATASET, definition)
            .await
            .map_err(|e| format!("demo segment {id} ({text}) failed: {e}"))?;
        engine
            .progress()
            .advance(demo.users + demo.events + done as u64 + 1);
        if (done + 1) % step == 0 {
            tracing::info!(
                created = done + 1,
                segments = demo.segments,
                "creating demo segments"
            );
        }
    }
    tracing::info!(
        segments = demo.segments,
        seconds = started.elapsed().as_secs_f64(),
        "demo segments created"
    );
    Ok(())
}

/// Loads the demo dataset, logging progress every ~10%.
///
/// # Errors
/// The import failed: the server must not serve a dataset without the data it was asked for.
async fn load_demo_users(engine: &Arc<Engine>, users: u64) -> Result<(), String> {
    const BATCH_ROWS: usize = 64 * 1024;
    let started = std::time::Instant::now();
    let result = async {
        let mut import = engine.begin_import(DEFAULT_DATASET).await?;
        import.reserve(users);
        let mut loaded = 0u64;
        let step = (users / 10).max(1);
        for batch in crate::demo::batches(users, BATCH_ROWS, 42) {
            loaded += batch.num_rows() as u64;
            import
                .apply(ImportBatch {
                    batch,
                    id_column: "user_id".into(),
                })
                .await?;
            engine.progress().advance(loaded);
            if loaded % step < BATCH_ROWS as u64 || loaded == users {
                tracing::info!(loaded, users, "loading demo users");
            }
        }
        import.commit().await
    }
    .await;
    match result {
        Ok(outcome) => {
            tracing::info!(
                users = outcome.created,
                seconds = started.elapsed().as_secs_f64(),
                "demo dataset loaded"
            );
            Ok(())
        }
        Err(error) => Err(format!("demo dataset failed to load: {error}")),
    }
}

/// Loads demo behaviour events of the demo users over the year before now, logging progress
/// every ~10%.
///
/// # Errors
/// As [`load_demo_users`].
async fn load_demo_events(engine: &Arc<Engine>, users: u64, events: u64) -> Result<(), String> {
    const BATCH_ROWS: u64 = 64 * 1024;
    let started = std::time::Instant::now();
    let result = async {
        let mut import = engine.begin_import(DEFAULT_DATASET).await?;
        let generated = crate::demo::events(users, events, 42, engine.now());
        let mut chunk = Vec::with_capacity(BATCH_ROWS as usize);
        let mut loaded = 0u64;
        let step = (events / 10).max(1);
        for event in generated {
            chunk.push(event);
            if chunk.len() as u64 == BATCH_ROWS || loaded + chunk.len() as u64 == events {
                loaded += chunk.len() as u64;
                import
                    .apply_events(crate::demo::events_batch(&chunk))
                    .await?;
                chunk.clear();
                engine.progress().advance(users + loaded);
                if loaded % step < BATCH_ROWS || loaded == events {
                    tracing::info!(loaded, events, "loading demo events");
                }
            }
        }
        import.settle().await?;
        import.commit().await
    }
    .await;
    match result {
        Ok(outcome) => {
            tracing::info!(
                events = outcome.events,
                seconds = started.elapsed().as_secs_f64(),
                "demo events loaded"
            );
            Ok(())
        }
        Err(error) => Err(format!("demo events failed to load: {error}")),
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (Kubernetes stopping the pod).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
