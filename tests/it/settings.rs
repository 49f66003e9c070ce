//! The binary's configuration as an operator meets it: defaults, a file, `AUDIENCE_*`
//! variables and flags in that order (`serve --print-config`), `--check-config`, and the
//! `health` command that probes use.

use std::process::{Command, Stdio};

use audience::config::Config;

use crate::harness::{ServerOptions, TestServer};

/// What one run of the binary printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `audience ARGS...` with `env` and no other `AUDIENCE_*` variable.
fn audience(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_audience"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("AUDIENCE_")) {
        command.env_remove(name);
    }
    let output = command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the audience binary");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// The effective configuration `serve --print-config` prints for these arguments.
fn effective(args: &[&str], env: &[(&str, &str)]) -> Config {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let run = audience(&all, env);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    toml::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// A config file in its own temporary directory, removed with the value.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> Self {
        let dir = crate::durability::temp_dir(name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("audience.toml"), text).expect("write the config");
        Self(dir)
    }

    fn path(&self) -> String {
        self.0.join("audience.toml").display().to_string()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_limit_set_four_ways_takes_the_last_of_defaults_file_variable_flag() {
    let default = Config::default().limits.max_page_size;
    let file = ConfigFile::new(
        "precedence",
        "demo_users = 3\n[limits]\nmax_page_size = 7\nmax_batch_users = 70\n",
    );
    let path = file.path();
    let with_file = ["--config", path.as_str()];
    let variable = [("AUDIENCE_LIMITS_MAX_PAGE_SIZE", "8")];
    let flag = ["--config", path.as_str(), "--limits-max-page-size", "9"];

    assert_eq!(effective(&[], &[]).limits.max_page_size, default);
    let from_file = effective(&with_file, &[]);
    assert_eq!(from_file.limits.max_page_size, 7);
    let from_variable = effective(&with_file, &variable);
    assert_eq!(from_variable.limits.max_page_size, 8);
    let from_flag = effective(&flag, &variable);
    assert_eq!(from_flag.limits.max_page_size, 9);
    // What the later layers do not set stays as the file has it.
    for config in [from_file, from_variable, from_flag] {
        assert_eq!(config.limits.max_batch_users, 70);
        assert_eq!(config.demo_users, 3);
    }
    // The file itself may come from a variable.
    let by_variable = effective(&[], &[("AUDIENCE_CONFIG", path.as_str())]);
    assert_eq!(by_variable.limits.max_page_size, 7);
}

#[test]
fn print_config_masks_the_redis_password_and_reads_back() {
    let run = audience(
        &["serve", "--print-config"],
        &[("AUDIENCE_REDIS_URL", "redis://app:s3cret@redis:6379/0")],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains("s3cret"), "{}", run.stdout);
    let printed: Config = toml::from_str(&run.stdout).expect("TOML");
    assert_eq!(
        printed.redis_url.as_deref(),
        Some("redis://app:***@redis:6379/0")
    );
}

#[test]
fn check_config_exits_0_when_usable_and_1_naming_each_bad_setting() {
    let good = audience(&["serve", "--check-config"], &[]);
    assert_eq!(good.code, Some(0), "{}", good.stderr);
    assert!(good.stderr.contains("configuration ok"), "{}", good.stderr);

    let zero_limit = audience(
        &["serve", "--check-config", "--segment-refresh-secs", "0"],
        &[("AUDIENCE_LIMITS_MAX_OPEN_CURSORS", "0")],
    );
    assert_eq!(zero_limit.code, Some(1));
    assert!(
        zero_limit
            .stderr
            .contains("limits.max_open_cursors must be positive"),
        "{}",
        zero_limit.stderr
    );
    assert!(
        zero_limit.stderr.contains("segment_refresh_secs must"),
        "{}",
        zero_limit.stderr
    );

    let file = ConfigFile::new("unknown-key", "[limits]\nmax_page_sise = 5\n");
    let unknown = audience(&["serve", "--check-config", "--config", &file.path()], &[]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.contains("max_page_sise") && unknown.stderr.contains(&file.path()),
        "{}",
        unknown.stderr
    );

    let bad_variable = audience(
        &["serve", "--check-config"],
        &[("AUDIENCE_LIMITS_MAX_PAGE_SIZE", "lots")],
    );
    assert_eq!(bad_variable.code, Some(2), "clap's usage error");
    assert!(
        bad_variable.stderr.contains("--limits-max-page-size"),
        "{}",
        bad_variable.stderr
    );
}

#[test]
fn check_config_does_not_start_a_server() {
    // The address is taken: a start would fail to bind, a check does not try.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let run = audience(&["serve", "--check-config", "--listen", &addr], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_when_serving() {
    let (server, gate) = TestServer::start_gated(ServerOptions::default()).await;
    let addr = server.addr();
    let probe = |json: bool| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["--addr", addr.as_str(), "health", "--timeout-secs", "5"];
            if json {
                args.push("--json");
            }
            audience(&args, &[])
        })
    };
    let loading = probe(false).await.expect("probe");
    assert_eq!(loading.code, Some(1), "{}", loading.stderr);
    assert_eq!(loading.stdout, "NOT_SERVING\n");
    assert!(loading.stderr.contains("not serving"), "{}", loading.stderr);

    gate.open();
    server.wait_until_serving().await;
    let serving = probe(false).await.expect("probe");
    assert_eq!(serving.code, Some(0), "{}", serving.stderr);
    assert_eq!(serving.stdout, "SERVING\n");
    let json = probe(true).await.expect("probe");
    assert_eq!(json.stdout.trim(), r#"{"status":"SERVING"}"#);

    server.shutdown().await;
    let gone = probe(false).await.expect("probe");
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains("cannot connect"), "{}", gone.stderr);
}

#[test]
fn serve_refuses_the_flags_only_client_commands_read() {
    for (args, flag) in [
        (vec!["serve", "--addr", "http://127.0.0.1:1"], "--addr"),
        (vec!["--addr", "http://127.0.0.1:1", "serve"], "--addr"),
        (vec!["serve", "--json"], "--json"),
        (vec!["serve", "--tls-ca", "/ca.pem"], "--tls-ca"),
        (
            vec!["serve", "--token", "secret"],
            "--token (AUDIENCE_TOKEN)",
        ),
    ] {
        let mut args = args;
        args.push("--check-config");
        let run = audience(&args, &[]);
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("{flag} is for client commands, not serve")),
            "{args:?}: {}",
            run.stderr
        );
    }
    // AUDIENCE_ADDR is the environment's server for the client commands run beside it (a
    // probe in the same container), not a flag given to serve.
    let beside = audience(
        &["serve", "--check-config"],
        &[("AUDIENCE_ADDR", "http://127.0.0.1:1")],
    );
    assert_eq!(beside.code, Some(0), "{}", beside.stderr);
}

/// The server's certificate, key and token file, none of which exists here.
const ABSENT_FILES: [&str; 6] = [
    "--tls-cert",
    "/absent/tls.crt",
    "--tls-key",
    "/absent/tls.key",
    "--auth-file",
    "/absent/tokens.toml",
];

#[test]
fn security_settings_come_from_flags_and_variables_and_are_checked_without_their_files() {
    let mut args = ABSENT_FILES.to_vec();
    args.extend(["--listen", "0.0.0.0:50051"]);
    let config = effective(
        &args,
        &[
            ("AUDIENCE_TLS_CLIENT_CA", "/absent/ca.crt"),
            ("AUDIENCE_ALLOW_UNAUTHENTICATED", "true"),
        ],
    );
    assert_eq!(config.tls_cert, Some("/absent/tls.crt".into()));
    assert_eq!(config.tls_key, Some("/absent/tls.key".into()));
    assert_eq!(config.tls_client_ca, Some("/absent/ca.crt".into()));
    assert_eq!(config.auth_file, Some("/absent/tokens.toml".into()));
    assert!(config.allow_unauthenticated);

    // A probe of the configuration reads no certificate or token file: a chart renders it
    // where the mounted Secrets are absent.
    let mut args = vec!["serve", "--check-config"];
    args.extend(ABSENT_FILES);
    let check = audience(&args, &[]);
    assert_eq!(check.code, Some(0), "{}", check.stderr);

    let half = audience(
        &["serve", "--check-config", "--listen", "0.0.0.0:50051"],
        &[("AUDIENCE_TLS_KEY", "/absent/tls.key")],
    );
    assert_eq!(half.code, Some(1));
    for problem in [
        "tls_key (/absent/tls.key) is set without tls_cert",
        "without auth_file",
    ] {
        assert!(half.stderr.contains(problem), "{problem}: {}", half.stderr);
    }
}
