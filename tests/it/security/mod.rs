//! Security of the real binary: TLS and mutual TLS with certificates made here (rcgen) and
//! rotated on disk, bearer tokens with scopes per dataset over every RPC, a token file edited
//! on disk, the protected mode, and the client's TLS and token flags.
//!
//! This module holds what the tests share: temporary files, certificates, token files, clients.

mod cli;
mod rpcs;
mod tls;
mod tokens;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use audience::cli::connect::{Authorization, Connection};
use audience::grpc::auth::sha256_hex;
use audience::grpc::pb;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::text;
use crate::process::{Process, POLL_EVERY};

/// How long a change on disk may take to show (the server looks every second).
const RELOAD_PATIENCE: Duration = Duration::from_secs(15);

// ---- files and certificates ---------------------------------------------------------------

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = crate::durability::temp_dir(name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` whole, by rename, so that the server never reads half a file.
    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        let partial = self.path(&format!(".{name}.partial"));
        std::fs::write(&partial, contents).expect("write");
        std::fs::rename(&partial, &path).expect("rename");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for 127.0.0.1 and localhost, for a server or a client.
    fn issue(&self, usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> Pair {
        self.issue(ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self) -> Pair {
        self.issue(ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes the server's certificate and key as `cert.pem` and `key.pem`.
fn write_server_pair(dir: &TempDir, pair: &Pair) {
    dir.write("key.pem", &pair.key);
    dir.write("cert.pem", &pair.cert);
}

/// A client that trusts `ca` and, for mutual TLS, shows `identity`.
fn client_tls(ca: &Ca, identity: Option<&Pair>) -> ClientTlsConfig {
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
    match identity {
        Some(pair) => config.identity(Identity::from_pem(&pair.cert, &pair.key)),
        None => config,
    }
}

/// Whether a fresh TLS connection with `tls` gets a health answer from `port`.
async fn tls_health(port: u16, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    health_of(channel).await
}

async fn health_of(channel: Channel) -> Result<(), String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

/// Polls `check` until it holds, failing after [`RELOAD_PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + RELOAD_PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {RELOAD_PATIENCE:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Lines of the server's log holding `needle`.
fn log_lines(server: &Process, needle: &str) -> usize {
    server
        .log_text()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

// ---- tokens ---------------------------------------------------------------------------------

/// One `[[token]]` of a token file: name, token, scopes, dataset patterns.
type TokenSpec<'a> = (&'a str, &'a str, &'a [&'a str], &'a [&'a str]);

fn token_file(entries: &[TokenSpec]) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    entries
        .iter()
        .map(|(name, token, scopes, datasets)| {
            format!(
                "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [{}]\ndatasets = [{}]\n\n",
                sha256_hex(token),
                list(scopes),
                list(datasets)
            )
        })
        .collect()
}

type Authed = Connection;

/// `channel` sending `authorization: <header>`, or no such header.
fn with_header(channel: Channel, header: Option<&str>) -> Authed {
    let authorization = match header {
        Some(value) => Authorization::header(value.parse().expect("header value")),
        None => Authorization::default(),
    };
    InterceptedService::new(channel, authorization)
}

fn bearer(channel: Channel, token: &str) -> Authed {
    with_header(channel, Some(&format!("Bearer {token}")))
}

/// DescribeDataset of `default`: a read that works on an empty server.
async fn describe(channel: Authed) -> Result<(), Status> {
    pb::schema_service_client::SchemaServiceClient::new(channel)
        .describe_dataset(pb::DescribeDatasetRequest::default())
        .await
        .map(drop)
}

async fn count(channel: Authed, dataset: &str, expr: &str) -> Result<u64, Status> {
    pb::query_service_client::QueryServiceClient::new(channel)
        .count(pb::CountRequest {
            dataset: dataset.to_owned(),
            audience: text(expr),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().count)
}

/// A path as a command-line argument.
fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}
