//! Start-up configuration: defaults, then a TOML file, then `AUDIENCE_*` variables and flags
//! (clap reads both), validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::Limits;
use crate::grpc::Lifecycle;
pub use crate::persist::FsyncPolicy;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Everything the server needs to start.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Directory of the write-ahead log and snapshots; unset, everything is kept in memory
    /// only and lost at exit. With `redis_url`, a local cache of each dataset's snapshot
    /// instead, so that a restart reads only the records after it from Redis.
    pub data_dir: Option<PathBuf>,
    /// Redis as the shared log and snapshot store of several replicas.
    pub redis_url: Option<String>,
    /// Start of every Redis key, so that several deployments can share one Redis.
    pub redis_prefix: String,
    /// When a logged write is forced to disk before it is acknowledged: `always` (what is
    /// queued is synced at once, shared with writes arriving at the same time) or `interval` (a
    /// group fsync waits for the writes still in progress, at most `fsync_interval_ms` after
    /// the previous one).
    pub fsync: FsyncPolicy,
    /// The longest a group fsync of `fsync = "interval"` waits for writes in progress, counted
    /// from the previous one, in milliseconds: under load, at most one fsync per interval.
    pub fsync_interval_ms: u64,
    /// A log segment file is closed and a new one started past this size.
    pub wal_segment_bytes: u64,
    /// A snapshot is written in the background once the log holds this many bytes.
    pub snapshot_log_bytes: u64,
    /// ... or this many records: a restart replays each at the cost of a write.
    pub snapshot_log_records: u64,
    /// The longest, in seconds, that a deleted user's bytes stay in the log or a snapshot.
    pub erasure_max_age_secs: u64,
    /// Users of generated demo data to load at start (0: none).
    pub demo_users: u64,
    /// Behaviour events of those users to generate at start (0: none).
    pub demo_events: u64,
    /// Saved segments to create over the demo data at start (0: none), kept current on every
    /// write as a production dataset's are.
    pub demo_segments: u64,
    pub log_format: LogFormat,
    /// The only directory server-side imports (`ImportUsersFile`, `ImportEventsFile`) read
    /// from; unset, they are refused (callers stream their files instead).
    pub import_dir: Option<PathBuf>,
    /// The server's certificate chain (PEM); with `tls_key`, every connection is TLS.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate one of them signed (mutual
    /// TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// The token file: every call but health needs one of its tokens, with the scope and
    /// dataset it asks for.
    pub auth_file: Option<PathBuf>,
    /// Serve a non-loopback address without `auth_file`, e.g. behind a network policy that
    /// already keeps callers out. Without it such a start is refused.
    pub allow_unauthenticated: bool,
    /// Where Prometheus metrics are served (`GET /metrics`); unset, they are off. Its port
    /// must differ from `listen`'s.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Seconds between re-evaluations of segments whose windows move with time (and drops of
    /// events past retention).
    pub segment_refresh_secs: u64,
    /// Seconds the calls running at SIGTERM get to finish before the server stops anyway.
    pub shutdown_grace_secs: u64,
    /// Seconds of silence on a connection after which the server sends an HTTP/2 ping.
    pub keepalive_interval_secs: u64,
    /// Seconds a ping may go unanswered before the connection is closed.
    pub keepalive_timeout_secs: u64,
    /// Request-size limits of the engine.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: None,
            redis_url: None,
            redis_prefix: "audience".into(),
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 10,
            wal_segment_bytes: 64 << 20,
            snapshot_log_bytes: 256 << 20,
            snapshot_log_records: 10_000,
            erasure_max_age_secs: 24 * 3600,
            demo_users: 0,
            demo_events: 0,
            demo_segments: 0,
            log_format: LogFormat::Text,
            import_dir: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_file: None,
            allow_unauthenticated: false,
            metrics_listen: None,
            max_message_bytes: 64 * 1024 * 1024,
            segment_refresh_secs: 60,
            shutdown_grace_secs: Lifecycle::DEFAULT.shutdown_grace.as_secs(),
            keepalive_interval_secs: Lifecycle::DEFAULT.keepalive_interval.as_secs(),
            keepalive_timeout_secs: Lifecycle::DEFAULT.keepalive_timeout.as_secs(),
            limits: Limits::default(),
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// Settings from variables or flags that do not fit the configuration (clap has typed
    /// them, so this names a mismatch between the flags and the keys).
    #[error("config: AUDIENCE_* variables and flags: {0}")]
    Overlay(#[source] serde_json::Error),
    /// One line per unusable setting, each naming it.
    #[error("config: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("config: cannot print as TOML: {0}")]
    Print(#[source] toml::ser::Error),
}

impl Config {
    /// The effective configuration: the defaults, overlaid with the TOML file when there is
    /// one, then with `overrides` (the settings given as `AUDIENCE_*` variables or flags),
    /// validated.
    ///
    /// # Errors
    /// As [`Config::from_file`], [`Config::overlay`] and [`Config::validate`].
    pub fn load(file: Option<&Path>, overrides: &impl Serialize) -> Result<Self, ConfigError> {
        let base = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let config = base.overlay(overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// The defaults overlaid with a TOML file.
    ///
    /// # Errors
    /// An unreadable file, bad TOML or an unknown key.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// This configuration with every setting that `overrides` gives replaced: `overrides`
    /// serializes to the shape of the file (tables for sections), and an absent or null field
    /// leaves the setting as it is. One generic merge, so that a new setting needs only its
    /// field here and its flag, never a line of copying.
    ///
    /// # Errors
    /// A field of `overrides` that is not a setting, or of the wrong type.
    pub fn overlay(&self, overrides: &impl Serialize) -> Result<Self, ConfigError> {
        let mut merged = serde_json::to_value(self).map_err(ConfigError::Overlay)?;
        let overrides = serde_json::to_value(overrides).map_err(ConfigError::Overlay)?;
        merge_set_fields(&mut merged, overrides);
        serde_json::from_value(merged).map_err(ConfigError::Overlay)
    }

    /// The configuration as a TOML file that [`Config::from_file`] reads back, with the
    /// password of `redis_url` masked (it is a secret, and this is printed).
    ///
    /// # Errors
    /// A number TOML cannot hold (above 2^63 - 1).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let shown = Self {
            redis_url: self.redis_url.as_deref().map(mask_url_password),
            ..self.clone()
        };
        toml::to_string(&shown).map_err(ConfigError::Print)
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// Every unusable value, each named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems: Vec<String> = self
            .checks()
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, message)| message.to_owned())
            .collect();
        problems.extend(self.security_problems());
        if let Some(metrics) = self.metrics_listen {
            if metrics.port() != 0 && metrics.port() == self.listen.port() {
                problems.push(format!(
                    "metrics_listen ({metrics}) must use another port than listen ({})",
                    self.listen
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Each rule with whether this configuration keeps it.
    fn checks(&self) -> Vec<(bool, &'static str)> {
        let limits = &self.limits;
        vec![
            (
                self.max_message_bytes >= 64 * 1024,
                "max_message_bytes must be at least 65536",
            ),
            (
                self.demo_users > 0 || (self.demo_events == 0 && self.demo_segments == 0),
                "demo_events and demo_segments need demo_users: they are generated for the demo users",
            ),
            (
                self.segment_refresh_secs > 0,
                "segment_refresh_secs must be positive",
            ),
            (
                self.keepalive_interval_secs > 0 && self.keepalive_timeout_secs > 0,
                "keepalive_interval_secs and keepalive_timeout_secs must be positive",
            ),
            (
                !self.redis_prefix.is_empty()
                    && !self
                        .redis_prefix
                        .contains(|c: char| c.is_whitespace() || "*?[]".contains(c)),
                "redis_prefix must be non-empty, without spaces or glob characters (* ? [ ])",
            ),
            (
                (1..=60_000).contains(&self.fsync_interval_ms),
                "fsync_interval_ms must be between 1 and 60000",
            ),
            (
                self.wal_segment_bytes >= 64 * 1024,
                "wal_segment_bytes must be at least 65536",
            ),
            (
                self.snapshot_log_bytes >= 64 * 1024,
                "snapshot_log_bytes must be at least 65536",
            ),
            (
                self.snapshot_log_records > 0,
                "snapshot_log_records must be positive",
            ),
            (
                self.erasure_max_age_secs > 0,
                "erasure_max_age_secs must be positive",
            ),
            (
                limits.max_expression_nodes > 0,
                "limits.max_expression_nodes must be positive",
            ),
            (
                (1..=64).contains(&limits.max_expression_depth),
                "limits.max_expression_depth must be between 1 and 64",
            ),
            (
                limits.max_batch_users > 0,
                "limits.max_batch_users must be positive",
            ),
            (
                limits.max_batch_events > 0,
                "limits.max_batch_events must be positive",
            ),
            (
                limits.max_page_size > 0,
                "limits.max_page_size must be positive",
            ),
            (
                limits.max_breakdown_values > 0,
                "limits.max_breakdown_values must be positive",
            ),
            (
                limits.max_overlap_audiences >= 2,
                "limits.max_overlap_audiences must be at least 2",
            ),
            (
                limits.max_segments > 0,
                "limits.max_segments must be positive",
            ),
            (
                limits.max_datasets > 0,
                "limits.max_datasets must be positive",
            ),
            (
                limits.max_open_cursors > 0,
                "limits.max_open_cursors must be positive",
            ),
            (
                limits.cursor_ttl_secs > 0,
                "limits.cursor_ttl_secs must be positive",
            ),
            (
                limits.import_idle_secs > 0,
                "limits.import_idle_secs must be positive",
            ),
            (
                limits.watch_history_changes > 0,
                "limits.watch_history_changes must be positive",
            ),
            (
                limits.watch_history_entries > 0,
                "limits.watch_history_entries must be positive",
            ),
            (
                limits.watch_max_lag > 0 && limits.watch_max_lag < limits.watch_history_changes,
                "limits.watch_max_lag must be positive and below limits.watch_history_changes",
            ),
        ]
    }
    /// TLS settings that go together, the protected mode, and the import directory.
    fn security_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), None) => problems.push(format!(
                "tls_cert ({}) is set without tls_key, its private key",
                cert.display()
            )),
            (None, Some(key)) => problems.push(format!(
                "tls_key ({}) is set without tls_cert, the certificate it belongs to",
                key.display()
            )),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            problems
                .push("tls_client_ca needs tls_cert and tls_key: mutual TLS runs over TLS".into());
        }
        if !self.listen.ip().is_loopback()
            && self.auth_file.is_none()
            && !self.allow_unauthenticated
        {
            problems.push(format!(
                "refusing to serve {} without auth_file: anyone who reaches that address could \
                 read, change and delete every dataset. Set auth_file (--auth-file), listen on \
                 a loopback address, or set allow_unauthenticated (--allow-unauthenticated) if \
                 something else keeps callers out",
                self.listen
            ));
        }
        if let Some(dir) = &self.import_dir {
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => problems.push(format!("import_dir {}: not a directory", dir.display())),
                Err(e) => problems.push(format!("import_dir {}: {e}", dir.display())),
            }
        }
        problems
    }
}

/// Writes every non-null field of `overrides` into `base`, objects key by key.
fn merge_set_fields(base: &mut serde_json::Value, overrides: serde_json::Value) {
    use serde_json::Value;
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge_set_fields(slot, value),
                    None if !value.is_null() => {
                        base.insert(key, value);
                    }
                    None => {}
                }
            }
        }
        (_, Value::Null) => {}
        (base, value) => *base = value,
    }
}

/// `scheme://user:***@host...` for a URL with a password; any other text as it is.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        let defaults = Config::default();
        defaults.validate().unwrap();
        let dir = std::env::temp_dir().join(format!("audience-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audience.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:6000\"\ndemo_users = 5\n[limits]\nmax_page_size = 7\n",
        )
        .unwrap();
        let config = Config::from_file(&path).unwrap();
        assert_eq!(config.listen.port(), 6000);
        assert_eq!(config.demo_users, 5);
        assert_eq!(config.limits.max_page_size, 7);
        assert_eq!(
            config.limits.max_batch_users,
            Limits::default().max_batch_users
        );
        std::fs::write(&path, "listen = \"0.0.0.0:6000\"\nbogus = 1\n").unwrap();
        assert!(matches!(
            Config::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        let bad = Config {
            max_message_bytes: 10,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        let orphan_segments = Config {
            demo_segments: 10,
            ..Config::default()
        };
        let refused = orphan_segments.validate().unwrap_err().to_string();
        assert!(refused.contains("demo_users"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn security_settings_that_cannot_work_are_refused_by_name() {
        let everywhere = SocketAddr::from(([0, 0, 0, 0], 50051));
        let refused = |config: Config| config.validate().unwrap_err().to_string();
        let cases = [
            (
                Config {
                    tls_cert: Some("cert.pem".into()),
                    ..Config::default()
                },
                "tls_cert (cert.pem) is set without tls_key",
            ),
            (
                Config {
                    tls_key: Some("key.pem".into()),
                    ..Config::default()
                },
                "tls_key (key.pem) is set without tls_cert",
            ),
            (
                Config {
                    tls_client_ca: Some("ca.pem".into()),
                    ..Config::default()
                },
                "tls_client_ca needs tls_cert",
            ),
            (
                Config {
                    listen: everywhere,
                    ..Config::default()
                },
                "refusing to serve 0.0.0.0:50051 without auth_file",
            ),
            (
                Config {
                    import_dir: Some("/definitely/not/here".into()),
                    ..Config::default()
                },
                "import_dir /definitely/not/here",
            ),
        ];
        for (config, expected) in cases {
            let message = refused(config);
            assert!(message.contains(expected), "{message}");
        }
        for open in [
            Config {
                listen: everywhere,
                auth_file: Some("tokens.toml".into()),
                ..Config::default()
            },
            Config {
                listen: everywhere,
                allow_unauthenticated: true,
                ..Config::default()
            },
            Config {
                listen: SocketAddr::from(([127, 0, 0, 2], 50051)),
                ..Config::default()
            },
        ] {
            open.validate().unwrap();
        }
    }

    #[test]
    fn a_zero_limit_is_refused_by_name() {
        let limits = serde_json::to_value(Limits::default()).unwrap();
        let names: Vec<&String> = limits.as_object().unwrap().keys().collect();
        assert!(names.len() >= 13, "{names:?}");
        for name in names {
            let zero = serde_json::json!({ "limits": { name.as_str(): 0 } });
            let config = Config::default().overlay(&zero).unwrap();
            let refused = config.validate().unwrap_err().to_string();
            assert!(
                refused.contains(&format!("limits.{name} must")),
                "{name}: {refused}"
            );
        }
    }

    #[test]
    fn the_metrics_port_must_differ_from_the_grpc_port() {
        let same = Config {
            listen: "127.0.0.1:7000".parse().unwrap(),
            metrics_listen: Some("0.0.0.0:7000".parse().unwrap()),
            ..Config::default()
        };
        let refused = same.validate().unwrap_err().to_string();
        assert!(
            refused.contains("metrics_listen (0.0.0.0:7000) must use another port than listen"),
            "{refused}"
        );
        let other = Config {
            metrics_listen: Some("127.0.0.1:9090".parse().unwrap()),
            ..same
        };
        other.validate().unwrap();
    }

    #[test]
    fn every_bad_setting_is_reported_at_once() {
        let bad = Config {
            segment_refresh_secs: 0,
            fsync_interval_ms: 0,
            ..Config::default()
        };
        let refused = bad.validate().unwrap_err().to_string();
        assert!(refused.contains("segment_refresh_secs must"), "{refused}");
        assert!(refused.contains("fsync_interval_ms must"), "{refused}");
    }

    #[test]
    fn printed_toml_reads_back_with_the_redis_password_masked() {
        for (url, shown) in [
            (
                "redis://app:s3cret@redis:6379/0",
                "redis://app:***@redis:6379/0",
            ),
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("redis://user@redis/1", "redis://user@redis/1"),
        ] {
            let mut config = Config {
                redis_url: Some(url.into()),
                data_dir: Some("/data".into()),
                ..Config::default()
            };
            config.limits.max_page_size = 9;
            let text = config.to_toml().unwrap();
            assert!(!text.contains("s3cret"), "{text}");
            let back: Config = toml::from_str(&text).unwrap();
            config.redis_url = Some(shown.into());
            assert_eq!(back, config);
        }
    }
}
