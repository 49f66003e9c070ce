//! The settings of `serve` as flags and `AUDIENCE_*` variables: one flag per key of
//! [`Config`](crate::config::Config), named by one rule so that nobody has to look them up —
//! the key `a.b_c` is `--a-b-c` and `AUDIENCE_A_B_C` (`limits.max_page_size` is
//! `--limits-max-page-size` and `AUDIENCE_LIMITS_MAX_PAGE_SIZE`).
//!
//! These structs serialize to the shape of the config file, unset fields as null, and
//! [`Config::overlay`](crate::config::Config::overlay) writes what is set over the file: a new
//! setting needs its field in `Config` and its flag here, and a test fails until it has both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::connect::ConnectArgs;
use crate::config::LogFormat;
use crate::persist::FsyncPolicy;

/// Everything `serve` overlays on the config file: its own settings, and the server's
/// certificate and key, which come from the global `--tls-cert`/`--tls-key` (client commands
/// read the same flags as their own certificate for mutual TLS).
#[derive(Debug, Serialize)]
pub struct ServeOverrides<'a> {
    #[serde(flatten)]
    settings: &'a SettingsArgs,
    tls_cert: Option<&'a Path>,
    tls_key: Option<&'a Path>,
}

impl<'a> ServeOverrides<'a> {
    pub fn new(settings: &'a SettingsArgs, connect: &'a ConnectArgs) -> Self {
        Self {
            settings,
            tls_cert: connect.tls_cert.as_deref(),
            tls_key: connect.tls_key.as_deref(),
        }
    }
}

/// The top-level settings (see the README's configuration table for what each does).
#[derive(Debug, Default, clap::Args, Serialize)]
pub struct SettingsArgs {
    /// Listen address, e.g. 0.0.0.0:50051.
    #[arg(long, env = "AUDIENCE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory of the write-ahead log and snapshots (unset: memory only); with
    /// `--redis-url`, a local cache of the snapshots that makes restarts read less from Redis.
    #[arg(long, env = "AUDIENCE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis URL of the shared log and snapshots of several replicas.
    #[arg(long, env = "AUDIENCE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Start of every Redis key (several deployments can share one Redis).
    #[arg(long, env = "AUDIENCE_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// When a write is forced to disk before it is acknowledged: always or interval.
    #[arg(long, env = "AUDIENCE_FSYNC")]
    pub fsync: Option<FsyncPolicy>,
    /// With `--fsync interval`: the longest a group fsync waits for writes in progress,
    /// counted from the previous one (milliseconds).
    #[arg(long, env = "AUDIENCE_FSYNC_INTERVAL_MS")]
    pub fsync_interval_ms: Option<u64>,
    /// Bytes after which a log segment file is closed and a new one started.
    #[arg(long, env = "AUDIENCE_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    /// Log bytes after which a snapshot is written in the background.
    #[arg(long, env = "AUDIENCE_SNAPSHOT_LOG_BYTES")]
    pub snapshot_log_bytes: Option<u64>,
    /// Log records after which a snapshot is written in the background.
    #[arg(long, env = "AUDIENCE_SNAPSHOT_LOG_RECORDS")]
    pub snapshot_log_records: Option<u64>,
    /// Seconds within which a deleted user's bytes leave every log and snapshot file.
    #[arg(long, env = "AUDIENCE_ERASURE_MAX_AGE_SECS")]
    pub erasure_max_age_secs: Option<u64>,
    /// Load N generated demo users into the `default` dataset at start.
    #[arg(long, env = "AUDIENCE_DEMO_USERS")]
    pub demo_users: Option<u64>,
    /// Load N generated demo behaviour events (of the demo users) at start.
    #[arg(long, env = "AUDIENCE_DEMO_EVENTS")]
    pub demo_events: Option<u64>,
    /// Create N generated saved segments over the demo data at start (needs `--demo-users`).
    #[arg(long, env = "AUDIENCE_DEMO_SEGMENTS")]
    pub demo_segments: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "AUDIENCE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The only directory server-side imports may read from (unset: they are refused).
    #[arg(long, env = "AUDIENCE_IMPORT_DIR")]
    pub import_dir: Option<PathBuf>,
    /// CA certificates (PEM) that sign the clients' certificates: mutual TLS (needs
    /// --tls-cert and --tls-key, the server's own).
    #[arg(long, env = "AUDIENCE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// The token file (TOML of token hashes with scopes and dataset patterns); every call
    /// but health then needs `authorization: Bearer <token>`.
    #[arg(long, env = "AUDIENCE_AUTH_FILE", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// Serve a non-loopback address without --auth-file (refused otherwise).
    #[arg(
        long,
        env = "AUDIENCE_ALLOW_UNAUTHENTICATED",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub allow_unauthenticated: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 0.0.0.0:9090 (unset: off).
    #[arg(long, env = "AUDIENCE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "AUDIENCE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Seconds between re-evaluations of time-windowed segments.
    #[arg(long, env = "AUDIENCE_SEGMENT_REFRESH_SECS")]
    pub segment_refresh_secs: Option<u64>,
    /// Seconds the calls running at SIGTERM get to finish before the server stops anyway.
    #[arg(long, env = "AUDIENCE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds of silence on a connection after which the server sends an HTTP/2 ping.
    #[arg(long, env = "AUDIENCE_KEEPALIVE_INTERVAL_SECS")]
    pub keepalive_interval_secs: Option<u64>,
    /// Seconds a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "AUDIENCE_KEEPALIVE_TIMEOUT_SECS")]
    pub keepalive_timeout_secs: Option<u64>,
    #[command(flatten)]
    pub limits: LimitsArgs,
}

/// The `[limits]` section (see [`Limits`](crate::engine::Limits) for what each bounds).
#[derive(Debug, Default, clap::Args, Serialize)]
#[command(next_help_heading = "Limits ([limits] in the config file)")]
pub struct LimitsArgs {
    /// Nodes in one expression.
    #[arg(
        long = "limits-max-expression-nodes",
        env = "AUDIENCE_LIMITS_MAX_EXPRESSION_NODES"
    )]
    pub max_expression_nodes: Option<usize>,
    /// Nesting depth of one expression (1 to 64).
    #[arg(
        long = "limits-max-expression-depth",
        env = "AUDIENCE_LIMITS_MAX_EXPRESSION_DEPTH"
    )]
    pub max_expression_depth: Option<usize>,
    /// Users in one upsert or delete batch.
    #[arg(
        long = "limits-max-batch-users",
        env = "AUDIENCE_LIMITS_MAX_BATCH_USERS"
    )]
    pub max_batch_users: Option<usize>,
    /// Events in one recorded batch (or one message of a stream).
    #[arg(
        long = "limits-max-batch-events",
        env = "AUDIENCE_LIMITS_MAX_BATCH_EVENTS"
    )]
    pub max_batch_events: Option<usize>,
    /// Ids in one page, sample or export chunk.
    #[arg(long = "limits-max-page-size", env = "AUDIENCE_LIMITS_MAX_PAGE_SIZE")]
    pub max_page_size: Option<usize>,
    /// The largest `breakdown_limit` of a count.
    #[arg(
        long = "limits-max-breakdown-values",
        env = "AUDIENCE_LIMITS_MAX_BREAKDOWN_VALUES"
    )]
    pub max_breakdown_values: Option<usize>,
    /// Audiences in one overlap request (at least 2).
    #[arg(
        long = "limits-max-overlap-audiences",
        env = "AUDIENCE_LIMITS_MAX_OVERLAP_AUDIENCES"
    )]
    pub max_overlap_audiences: Option<usize>,
    /// Saved segments per dataset.
    #[arg(long = "limits-max-segments", env = "AUDIENCE_LIMITS_MAX_SEGMENTS")]
    pub max_segments: Option<usize>,
    /// Datasets of the server.
    #[arg(long = "limits-max-datasets", env = "AUDIENCE_LIMITS_MAX_DATASETS")]
    pub max_datasets: Option<usize>,
    /// Open member listings kept for their next page.
    #[arg(
        long = "limits-max-open-cursors",
        env = "AUDIENCE_LIMITS_MAX_OPEN_CURSORS"
    )]
    pub max_open_cursors: Option<usize>,
    /// Seconds an unused member listing is kept.
    #[arg(
        long = "limits-cursor-ttl-secs",
        env = "AUDIENCE_LIMITS_CURSOR_TTL_SECS"
    )]
    pub cursor_ttl_secs: Option<u64>,
    /// Seconds a streamed import may wait for its next message.
    #[arg(
        long = "limits-import-idle-secs",
        env = "AUDIENCE_LIMITS_IMPORT_IDLE_SECS"
    )]
    pub import_idle_secs: Option<u64>,
    /// User changes of recent writes kept per dataset for watchers.
    #[arg(
        long = "limits-watch-history-changes",
        env = "AUDIENCE_LIMITS_WATCH_HISTORY_CHANGES"
    )]
    pub watch_history_changes: Option<u64>,
    /// Feed entries (one per segment per write) kept per dataset.
    #[arg(
        long = "limits-watch-history-entries",
        env = "AUDIENCE_LIMITS_WATCH_HISTORY_ENTRIES"
    )]
    pub watch_history_entries: Option<usize>,
    /// User changes a watcher may fall behind before its stream ends with a resume token.
    #[arg(long = "limits-watch-max-lag", env = "AUDIENCE_LIMITS_WATCH_MAX_LAG")]
    pub watch_max_lag: Option<u64>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::config::Config;
    use crate::engine::Limits;

    /// Only the settings, as `serve` flattens them, and the global flags it reads.
    #[derive(Debug, Parser)]
    struct Settings {
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        connect: ConnectArgs,
    }

    impl Settings {
        fn overrides(&self) -> ServeOverrides<'_> {
            ServeOverrides::new(&self.settings, &self.connect)
        }
    }

    /// A configuration with every setting away from its default, written out field by field
    /// (no `..Default::default()`) so that a new setting must be added here.
    fn every_setting_changed() -> Config {
        Config {
            listen: "0.0.0.0:6000".parse().expect("an address"),
            data_dir: Some("/var/lib/audience".into()),
            redis_url: Some("redis://redis:6379/2".into()),
            redis_prefix: "tenant".into(),
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 25,
            wal_segment_bytes: 1 << 20,
            snapshot_log_bytes: 2 << 20,
            snapshot_log_records: 77,
            erasure_max_age_secs: 3600,
            demo_users: 5,
            demo_events: 6,
            demo_segments: 7,
            log_format: LogFormat::Json,
            import_dir: Some("/imports".into()),
            tls_cert: Some("/tls/tls.crt".into()),
            tls_key: Some("/tls/tls.key".into()),
            tls_client_ca: Some("/tls/ca.crt".into()),
            auth_file: Some("/auth/tokens.toml".into()),
            allow_unauthenticated: true,
            metrics_listen: Some("0.0.0.0:9090".parse().expect("an address")),
            max_message_bytes: 1 << 20,
            segment_refresh_secs: 30,
            shutdown_grace_secs: 7,
            keepalive_interval_secs: 8,
            keepalive_timeout_secs: 9,
            limits: Limits {
                max_expression_nodes: 11,
                max_expression_depth: 12,
                max_batch_users: 13,
                max_batch_events: 14,
                max_page_size: 15,
                max_breakdown_values: 24,
                max_overlap_audiences: 16,
                max_segments: 17,
                max_datasets: 25,
                max_open_cursors: 18,
                cursor_ttl_secs: 19,
                import_idle_secs: 20,
                watch_history_changes: 2_000,
                watch_history_entries: 22,
                watch_max_lag: 23,
            },
        }
    }

    /// `(key path, value as text)` of every setting of `config`, tables flattened.
    fn leaves(value: &serde_json::Value, prefix: &str, out: &mut Vec<(String, String)>) {
        let serde_json::Value::Object(fields) = value else {
            return;
        };
        for (key, value) in fields {
            let path = format!("{prefix}{key}");
            match value {
                serde_json::Value::Object(_) => leaves(value, &format!("{path}."), out),
                serde_json::Value::String(text) => out.push((path, text.clone())),
                other => out.push((path, other.to_string())),
            }
        }
    }

    #[test]
    fn every_setting_has_a_flag_and_a_variable_named_by_the_rule() {
        let command = Settings::command();
        let mut keys = Vec::new();
        leaves(
            &serde_json::to_value(every_setting_changed()).expect("json"),
            "",
            &mut keys,
        );
        for (key, _) in &keys {
            let flag = key.replace(['.', '_'], "-");
            let variable = format!("AUDIENCE_{}", key.replace('.', "_").to_uppercase());
            let argument = command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()))
                .unwrap_or_else(|| panic!("the setting {key} has no flag --{flag}"));
            assert_eq!(
                argument.get_env().and_then(|v| v.to_str()),
                Some(variable.as_str()),
                "the variable of {key}"
            );
        }
    }

    #[test]
    fn each_flag_sets_its_own_setting() {
        let wanted = every_setting_changed();
        let mut keys = Vec::new();
        leaves(&serde_json::to_value(&wanted).expect("json"), "", &mut keys);
        let mut argv = vec!["settings".to_owned()];
        for (key, value) in keys {
            argv.push(format!("--{}", key.replace(['.', '_'], "-")));
            argv.push(value);
        }
        let parsed = Settings::try_parse_from(&argv).expect("every flag parses");
        let config = Config::default()
            .overlay(&parsed.overrides())
            .expect("the flags overlay the defaults");
        assert_eq!(config, wanted);
    }

    #[test]
    fn unset_flags_leave_the_file_alone() {
        let from_file = every_setting_changed();
        let config = from_file
            .overlay(&ServeOverrides::new(
                &SettingsArgs::default(),
                &ConnectArgs::default(),
            ))
            .expect("nothing to overlay");
        assert_eq!(config, from_file);
        let one = SettingsArgs {
            limits: LimitsArgs {
                max_page_size: Some(3),
                ..LimitsArgs::default()
            },
            ..SettingsArgs::default()
        };
        let config = from_file.overlay(&one).expect("one limit");
        assert_eq!(config.limits.max_page_size, 3);
        assert_eq!(
            config.limits.max_batch_users,
            from_file.limits.max_batch_users
        );
        assert_eq!(config.redis_url, from_file.redis_url);
    }
}
