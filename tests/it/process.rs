//! The real `audience` binary as a child process: started on a free port, polled until SERVING
//! (or until it exits, for starts that must fail), killed (SIGKILL) on drop, its log (stderr) kept
//! in a file for the tests to read.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audience::grpc::pb;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How often health and process state are polled while waiting.
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// A port free at the time of the call (the child binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The child, shared with whoever kills it from elsewhere (a timer task); `None` once reaped.
type SharedChild = Arc<Mutex<Option<Child>>>;

/// One server process.
pub struct Process {
    child: SharedChild,
    pub port: u16,
    /// Its stderr (the log): a file, not a pipe, so that it never fills up unread.
    pub log: PathBuf,
    /// Whether the log is removed on drop (it is unless the caller chose where it goes).
    remove_log: bool,
    /// `serve` arguments after `--listen`, for [`Process::restart`].
    args: Vec<String>,
    /// Where it listens and how it is reached.
    launch: Launch,
    channel: Channel,
}

/// How a server listens and how the tests reach it.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The address `--listen` binds (the tests connect to 127.0.0.1 whatever it is).
    pub ip: &'static str,
    /// Set: the server speaks TLS, and this is how the tests' own channel connects.
    pub tls: Option<ClientTlsConfig>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            ip: "127.0.0.1",
            tls: None,
        }
    }
}

impl Process {
    /// Starts `audience serve --listen 127.0.0.1:<free port> <args>`, its log in a temporary file
    /// removed on drop.
    pub fn start(args: &[&str]) -> Self {
        Self::launch(args, Launch::default())
    }

    /// Starts `audience serve --listen <launch.ip>:<free port> <args>`, its log in a temporary
    /// file removed on drop.
    pub fn launch(args: &[&str], launch: Launch) -> Self {
        let port = free_port();
        let log = crate::durability::temp_dir(&format!("serve-{port}")).with_extension("log");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut process = Self::spawn(port, args, log, launch);
        process.remove_log = true;
        process
    }

    /// Starts `audience serve --listen 127.0.0.1:<free port> <args>`, its log in `log` (created or
    /// truncated, and left in place on drop).
    pub fn start_logging_to(args: &[String], log: PathBuf) -> Self {
        Self::spawn(free_port(), args.to_vec(), log, Launch::default())
    }

    /// Starts and waits until SERVING.
    pub async fn serving(args: &[&str]) -> Self {
        let process = Self::start(args);
        process.wait_serving(Duration::from_secs(60)).await;
        process
    }

    fn spawn(port: u16, args: Vec<String>, log: PathBuf, launch: Launch) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_audience"))
            .args(["serve", "--listen", &format!("{}:{port}", launch.ip)])
            .args(&args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("AUDIENCE_TOKEN")
            .env_remove("AUDIENCE_TLS_CERT")
            .env_remove("AUDIENCE_TLS_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the binary starts");
        let scheme = if launch.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        if let Some(tls) = launch.tls.clone() {
            endpoint = endpoint.tls_config(tls).expect("client TLS");
        }
        Self {
            child: Arc::new(Mutex::new(Some(child))),
            port,
            log,
            remove_log: false,
            args,
            launch,
            channel: endpoint.connect_lazy(),
        }
    }

    /// Kills it, then starts it again on the same arguments (and a new free port); the log file
    /// then holds the new start's log only.
    pub fn restart(&mut self) {
        self.kill();
        let mut restarted = Self::spawn(
            free_port(),
            self.args.clone(),
            self.log.clone(),
            self.launch.clone(),
        );
        restarted.remove_log = self.remove_log;
        // The old value's drop finds its child reaped and leaves the log to the new one.
        self.remove_log = false;
        *self = restarted;
    }

    /// `http://127.0.0.1:<port>`, or `https://` when it speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.launch.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's health (`""`), or `None` while it cannot be reached.
    pub async fn health(&self) -> Option<ServingStatus> {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let response = HealthClient::new(self.channel.clone())
            .check(request)
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Polls health until SERVING; panics with the log if the process exits first or `limit`
    /// passes.
    pub async fn wait_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.health().await != Some(ServingStatus::Serving) {
            if let Some(status) = self.exit_status() {
                panic!(
                    "the server exited ({status}) before serving; stderr:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the server at {} was not SERVING within {limit:?}; stderr:\n{}",
                self.url(),
                self.log_text()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// How the process ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().expect("child lock");
        child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll the child"))
    }

    /// Waits for the process to end by itself (a refused start); panics with the log after
    /// `limit`.
    pub async fn wait_exit(&self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {limit:?}; stderr:\n{}",
                self.log_text()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn ingest(&self) -> pb::ingest_service_client::IngestServiceClient<Channel> {
        pb::ingest_service_client::IngestServiceClient::new(self.channel())
    }

    pub fn query(&self) -> pb::query_service_client::QueryServiceClient<Channel> {
        pb::query_service_client::QueryServiceClient::new(self.channel())
    }

    pub fn segments(&self) -> pb::segment_service_client::SegmentServiceClient<Channel> {
        pb::segment_service_client::SegmentServiceClient::new(self.channel())
    }

    pub fn schema(&self) -> pb::schema_service_client::SchemaServiceClient<Channel> {
        pb::schema_service_client::SchemaServiceClient::new(self.channel())
    }

    /// `AdminService.Snapshot`, followed to its last message, which must say it is done.
    pub async fn snapshot(&self) {
        let mut stream = pb::admin_service_client::AdminServiceClient::new(self.channel())
            .snapshot(pb::SnapshotRequest::default())
            .await
            .expect("snapshot starts")
            .into_inner();
        let mut done = false;
        while let Some(message) = stream.message().await.expect("snapshot progresses") {
            done |= message.done;
        }
        assert!(done, "the snapshot finished");
    }

    /// A handle that SIGKILLs the process from elsewhere (a timer task), without reaping it.
    pub fn killer(&self) -> impl FnOnce() + Send + 'static {
        let child = self.child.clone();
        move || {
            if let Some(child) = child.lock().expect("child lock").as_mut() {
                let _ = child.kill();
            }
        }
    }

    /// SIGTERM, as Kubernetes stops a pod; the process is left to exit by itself.
    pub fn terminate(&self) {
        let pid = self
            .child
            .lock()
            .expect("child lock")
            .as_ref()
            .map(Child::id)
            .expect("a running child");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// SIGKILL, then reaps the child.
    pub fn kill(&self) {
        let taken = self.child.lock().map(|mut c| c.take());
        if let Ok(Some(mut child)) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if self.remove_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
