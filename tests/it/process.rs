//! The real `audience` binary as a child process: started on a free port, polled until SERVING,
//! killed (SIGKILL) on drop, its log kept in a file for the tests to read.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audience::grpc::pb;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A port free at the time of the call (the child binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One server process.
pub struct Process {
    child: Option<Child>,
    pub port: u16,
    /// Its stderr (the log).
    pub log: PathBuf,
    channel: Channel,
}

impl Process {
    /// Starts `audience serve --listen 127.0.0.1:<free port> <args>`.
    pub fn start(args: &[&str]) -> Self {
        let port = free_port();
        let log = crate::durability::temp_dir(&format!("serve-{port}")).with_extension("log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_audience"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the binary starts");
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        Self {
            child: Some(child),
            port,
            log,
            channel,
        }
    }

    /// Starts and waits until SERVING.
    pub async fn serving(args: &[&str]) -> Self {
        let process = Self::start(args);
        process.wait_serving(Duration::from_secs(60)).await;
        process
    }

    /// Polls health until SERVING; panics with the log after `limit`.
    pub async fn wait_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut health = HealthClient::new(self.channel.clone());
        while Instant::now() < deadline {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(response) = health.check(request).await {
                if response.into_inner().status == ServingStatus::Serving as i32 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "server did not serve within {limit:?}:\n{}",
            self.log_text()
        );
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

    /// SIGKILL, then reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
