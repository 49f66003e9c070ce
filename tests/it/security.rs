//! Security of the real binary: TLS and mutual TLS with certificates made here (rcgen) and
//! rotated on disk, bearer tokens with scopes per dataset over every RPC, a token file edited
//! on disk, the protected mode, and the client's TLS and token flags.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use audience::grpc::auth::sha256_hex;
use audience::grpc::pb;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::{ipc_stream_bytes, text, update};
use crate::process::{Launch, Process, POLL_EVERY};

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

/// Sends a fixed `authorization` header, or none.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// `channel` sending `authorization: <header>`.
fn with_header(channel: Channel, header: Option<&str>) -> Authed {
    let value = header.map(|h| h.parse().expect("header value"));
    InterceptedService::new(channel, Bearer(value))
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

// ---- TLS ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_untrusted_clients_fail_against_a_tls_server() {
    let dir = TempDir::new("tls");
    let ca = Ca::new("server CA");
    write_server_pair(&dir, &ca.server());
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let server = Process::launch(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--demo-users",
            "100",
        ],
        Launch {
            tls: Some(client_tls(&ca, None)),
            ..Launch::default()
        },
    );
    server.wait_serving(Duration::from_secs(60)).await;
    let everyone = "age IS NULL OR age IS NOT NULL";
    let counted = count(with_header(server.channel(), None), "", everyone).await;
    assert_eq!(counted.expect("queries work over TLS"), 100);

    let plaintext = Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect_lazy();
    let refused = health_of(plaintext).await;
    assert!(refused.is_err(), "plaintext to a TLS server must fail");

    let other = Ca::new("another CA");
    let refused = tls_health(server.port, client_tls(&other, None)).await;
    assert!(
        refused.is_err(),
        "a server certificate from an untrusted CA"
    );
    tls_health(server.port, client_tls(&ca, None))
        .await
        .expect("a client trusting the CA connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
    let dir = TempDir::new("mtls");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    write_server_pair(&dir, &server_ca.server());
    let client_ca_path = dir.write("client-ca.pem", &client_ca.pem);
    let client = client_ca.client();
    let server = Process::launch(
        &[
            "--tls-cert",
            dir.path("cert.pem").to_str().unwrap(),
            "--tls-key",
            dir.path("key.pem").to_str().unwrap(),
            "--tls-client-ca",
            client_ca_path.to_str().unwrap(),
        ],
        Launch {
            tls: Some(client_tls(&server_ca, Some(&client))),
            ..Launch::default()
        },
    );
    server.wait_serving(Duration::from_secs(60)).await;

    let without = tls_health(server.port, client_tls(&server_ca, None)).await;
    assert!(without.is_err(), "no client certificate must fail");
    let stranger = Ca::new("stranger CA").client();
    let foreign = tls_health(server.port, client_tls(&server_ca, Some(&stranger))).await;
    assert!(
        foreign.is_err(),
        "a client certificate from another CA must fail"
    );
    tls_health(server.port, client_tls(&server_ca, Some(&client)))
        .await
        .expect("a client certificate from the client CA connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = TempDir::new("rotate");
    let first_ca = Ca::new("first CA");
    write_server_pair(&dir, &first_ca.server());
    let server = Process::launch(
        &[
            "--tls-cert",
            dir.path("cert.pem").to_str().unwrap(),
            "--tls-key",
            dir.path("key.pem").to_str().unwrap(),
        ],
        Launch {
            tls: Some(client_tls(&first_ca, None)),
            ..Launch::default()
        },
    );
    server.wait_serving(Duration::from_secs(60)).await;

    // A broken certificate is refused, logged once, and the one in force stays.
    dir.write("cert.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    eventually("the broken certificate is reported", || async {
        log_lines(&server, "changed files refused") == 1
    })
    .await;
    tls_health(server.port, client_tls(&first_ca, None))
        .await
        .expect("the previous certificate is still served");

    // cert-manager's rotation: a new key and a certificate from another CA.
    let second_ca = Ca::new("second CA");
    write_server_pair(&dir, &second_ca.server());
    eventually("the new certificate is served", || async {
        tls_health(server.port, client_tls(&second_ca, None))
            .await
            .is_ok()
    })
    .await;
    let old = tls_health(server.port, client_tls(&first_ca, None)).await;
    assert!(old.is_err(), "the old certificate is no longer served");
    assert_eq!(
        log_lines(&server, "changed files refused"),
        1,
        "a bad version is reported once, not at every look:\n{}",
        server.log_text()
    );
}

// ---- protected mode -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_needs_tokens_or_an_explicit_opt_out() {
    let everywhere = Launch {
        ip: "0.0.0.0",
        tls: None,
    };
    let refused = Process::launch(&[], everywhere.clone());
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = refused.log_text();
    for needle in [
        "refusing to serve 0.0.0.0",
        "auth_file",
        "--allow-unauthenticated",
    ] {
        assert!(log.contains(needle), "{needle} in:\n{log}");
    }

    let opted_out = Process::launch(&["--allow-unauthenticated"], everywhere.clone());
    opted_out.wait_serving(Duration::from_secs(60)).await;
    describe(with_header(opted_out.channel(), None))
        .await
        .expect("open to every caller, as asked");

    let dir = TempDir::new("protected");
    let tokens = dir.write(
        "tokens.toml",
        token_file(&[("ops", "t0k", &["read"], &["*"])]),
    );
    let guarded = Process::launch(&["--auth-file", tokens.to_str().unwrap()], everywhere);
    guarded.wait_serving(Duration::from_secs(60)).await;
    let anonymous = describe(with_header(guarded.channel(), None)).await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    describe(bearer(guarded.channel(), "t0k"))
        .await
        .expect("a token works");
}

// ---- tokens and scopes ----------------------------------------------------------------------

/// Every RPC, with the scope the contract (PRODUCT.md, "Security") gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Count,
    ListMembers,
    ExportMembers,
    SampleMembers,
    Overlap,
    SegmentsForUser,
    CheckMembership,
    CreateSegment,
    GetSegment,
    ListSegments,
    UpdateSegment,
    DeleteSegment,
    UpsertUsers,
    DeleteUsers,
    ImportUsers,
    ImportUsersFile,
    RecordEvents,
    StreamEvents,
    ImportEvents,
    ImportEventsFile,
    DescribeDataset,
    DeclareAttributes,
    ListDatasets,
    SetEventRetention,
    Watch,
    Snapshot,
}

/// read = queries, schema, watch; write = ingest and segment changes; admin = retention,
/// declarations, snapshots, server-side file imports.
const RPCS: [(Rpc, &str); 26] = [
    (Rpc::Count, "read"),
    (Rpc::ListMembers, "read"),
    (Rpc::ExportMembers, "read"),
    (Rpc::SampleMembers, "read"),
    (Rpc::Overlap, "read"),
    (Rpc::SegmentsForUser, "read"),
    (Rpc::CheckMembership, "read"),
    (Rpc::GetSegment, "read"),
    (Rpc::ListSegments, "read"),
    (Rpc::DescribeDataset, "read"),
    (Rpc::ListDatasets, "read"),
    (Rpc::Watch, "read"),
    (Rpc::CreateSegment, "write"),
    (Rpc::UpdateSegment, "write"),
    (Rpc::DeleteSegment, "write"),
    (Rpc::UpsertUsers, "write"),
    (Rpc::DeleteUsers, "write"),
    (Rpc::ImportUsers, "write"),
    (Rpc::RecordEvents, "write"),
    (Rpc::StreamEvents, "write"),
    (Rpc::ImportEvents, "write"),
    (Rpc::ImportUsersFile, "admin"),
    (Rpc::ImportEventsFile, "admin"),
    (Rpc::DeclareAttributes, "admin"),
    (Rpc::SetEventRetention, "admin"),
    (Rpc::Snapshot, "admin"),
];

/// A small valid request of `rpc` about `dataset`; only whether it was let in matters.
async fn call(rpc: Rpc, channel: Authed, dataset: &str) -> Result<(), Status> {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    let dataset = dataset.to_owned();
    let query = || pb::query_service_client::QueryServiceClient::new(channel.clone());
    let segments = || pb::segment_service_client::SegmentServiceClient::new(channel.clone());
    let ingest = || pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let schema = || pb::schema_service_client::SchemaServiceClient::new(channel.clone());
    let users_ipc = ipc_stream_bytes(&audience::demo::batches(5, 5, 7).collect::<Vec<_>>());
    let event = pb::Event {
        user_id: "u1".into(),
        event: "visit".into(),
        ts: Some(crate::harness::timestamp(crate::harness::now_ms())),
        value: None,
    };
    match rpc {
        Rpc::Count => query()
            .count(pb::CountRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ListMembers => query()
            .list_members(pb::ListMembersRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ExportMembers => query()
            .export_members(pb::ExportMembersRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::SampleMembers => query()
            .sample_members(pb::SampleMembersRequest {
                dataset,
                audience: text("age > 0"),
                size: 2,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Overlap => query()
            .overlap(pb::OverlapRequest {
                dataset,
                audiences: vec![text("age > 0").unwrap(), text("age > 50").unwrap()],
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::SegmentsForUser => query()
            .segments_for_user(pb::SegmentsForUserRequest {
                dataset,
                user_id: "u1".into(),
            })
            .await
            .map(drop),
        Rpc::CheckMembership => query()
            .check_membership(pb::CheckMembershipRequest {
                dataset,
                user_id: "u1".into(),
                segment_ids: vec!["s".into()],
            })
            .await
            .map(drop),
        Rpc::CreateSegment => segments()
            .create_segment(pb::CreateSegmentRequest {
                dataset,
                segment_id: format!("made-{}", CREATED.fetch_add(1, Ordering::SeqCst)),
                expression: Some(crate::harness::text_expr("age > 10")),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::GetSegment => segments()
            .get_segment(pb::GetSegmentRequest {
                dataset,
                segment_id: "s".into(),
            })
            .await
            .map(drop),
        Rpc::ListSegments => segments()
            .list_segments(pb::ListSegmentsRequest {
                dataset,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::UpdateSegment => segments()
            .update_segment(pb::UpdateSegmentRequest {
                dataset,
                segment_id: "s".into(),
                description: Some("updated".into()),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::DeleteSegment => segments()
            .delete_segment(pb::DeleteSegmentRequest {
                dataset,
                segment_id: "never-made".into(),
            })
            .await
            .map(drop),
        Rpc::UpsertUsers => ingest()
            .upsert_users(pb::UpsertUsersRequest {
                dataset,
                users: vec![pb::UserUpdate {
                    user_id: "u-new".into(),
                    updates: vec![update::int("age", 33)],
                }],
            })
            .await
            .map(drop),
        Rpc::DeleteUsers => ingest()
            .delete_users(pb::DeleteUsersRequest {
                dataset,
                user_ids: vec!["nobody".into()],
            })
            .await
            .map(drop),
        Rpc::ImportUsers => ingest()
            .import_users(tokio_stream::iter(vec![pb::ImportUsersRequest {
                dataset,
                id_column: String::new(),
                arrow_ipc_chunk: users_ipc,
            }]))
            .await
            .map(drop),
        Rpc::ImportUsersFile => ingest()
            .import_users_file(pb::ImportUsersFileRequest {
                dataset,
                path: "users.arrow".into(),
                id_column: String::new(),
            })
            .await
            .map(drop),
        Rpc::RecordEvents => ingest()
            .record_events(pb::RecordEventsRequest {
                dataset,
                events: vec![event],
            })
            .await
            .map(drop),
        Rpc::StreamEvents => ingest()
            .stream_events(tokio_stream::iter(vec![pb::RecordEventsRequest {
                dataset,
                events: vec![event],
            }]))
            .await
            .map(drop),
        Rpc::ImportEvents => ingest()
            .import_events(tokio_stream::iter(vec![pb::ImportEventsRequest {
                dataset,
                arrow_ipc_chunk: Vec::new(),
            }]))
            .await
            .map(drop),
        Rpc::ImportEventsFile => ingest()
            .import_events_file(pb::ImportEventsFileRequest {
                dataset,
                path: "users.arrow".into(),
            })
            .await
            .map(drop),
        Rpc::DescribeDataset => schema()
            .describe_dataset(pb::DescribeDatasetRequest { dataset })
            .await
            .map(drop),
        Rpc::DeclareAttributes => schema()
            .declare_attributes(pb::DeclareAttributesRequest {
                dataset,
                attributes: vec![pb::AttributeDeclaration {
                    name: "tier".into(),
                    kind: pb::AttributeKind::Categorical as i32,
                }],
            })
            .await
            .map(drop),
        Rpc::ListDatasets => schema()
            .list_datasets(pb::ListDatasetsRequest {})
            .await
            .map(drop),
        Rpc::SetEventRetention => schema()
            .set_event_retention(pb::SetEventRetentionRequest { dataset, days: 400 })
            .await
            .map(drop),
        Rpc::Watch => pb::watch_service_client::WatchServiceClient::new(channel.clone())
            .watch(pb::WatchRequest {
                dataset,
                segment_ids: vec!["s".into()],
                resume_token: String::new(),
            })
            .await
            .map(drop),
        Rpc::Snapshot => pb::admin_service_client::AdminServiceClient::new(channel.clone())
            .snapshot(pb::SnapshotRequest { dataset })
            .await
            .map(drop),
    }
}

fn is_refusal(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

/// Tokens of the scope table: name, token, scopes, dataset patterns.
const TOKENS: [TokenSpec<'static>; 5] = [
    ("reader", "r-secret-1", &["read"], &["ads-*"]),
    ("writer", "w-secret-2", &["write"], &["ads-*"]),
    ("admin", "a-secret-3", &["admin"], &["ads-*"]),
    ("root", "x-secret-4", &["read", "write", "admin"], &["*"]),
    ("exact-only", "e-secret-5", &["exact"], &["*"]),
];

/// A server with the tokens above, a data directory (for snapshots), an import directory
/// holding `users.arrow`, and datasets `ads-1` and `other`, each with users and segment `s`.
async fn server_with_tokens(dir: &TempDir) -> Process {
    let tokens = dir.write("tokens.toml", token_file(&TOKENS));
    let imports = dir.path("imports");
    std::fs::create_dir_all(&imports).unwrap();
    let users = audience::demo::batches(20, 20, 3).collect::<Vec<_>>();
    std::fs::write(imports.join("users.arrow"), ipc_stream_bytes(&users)).unwrap();
    let data = dir.path("data");
    let server = Process::start(&[
        "--auth-file",
        tokens.to_str().unwrap(),
        "--import-dir",
        imports.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    server.wait_serving(Duration::from_secs(60)).await;
    let root = bearer(server.channel(), "x-secret-4");
    for dataset in ["ads-1", "other"] {
        pb::ingest_service_client::IngestServiceClient::new(root.clone())
            .upsert_users(pb::UpsertUsersRequest {
                dataset: dataset.into(),
                users: (1..=3)
                    .map(|i| pb::UserUpdate {
                        user_id: format!("u{i}"),
                        updates: vec![update::int("age", 20 * i)],
                    })
                    .collect(),
            })
            .await
            .expect("users");
        pb::segment_service_client::SegmentServiceClient::new(root.clone())
            .create_segment(pb::CreateSegmentRequest {
                dataset: dataset.into(),
                segment_id: "s".into(),
                expression: Some(crate::harness::text_expr("age > 30")),
                ..Default::default()
            })
            .await
            .expect("segment");
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_and_dataset_pattern_allows_exactly_what_the_contract_says() {
    let dir = TempDir::new("scopes");
    let server = server_with_tokens(&dir).await;
    let mut checked = 0;
    for (rpc, scope) in RPCS {
        // No credentials, an unknown token, a malformed header: UNAUTHENTICATED.
        for header in [None, Some("Bearer not-a-token"), Some("Basic r-secret-1")] {
            let result = call(rpc, with_header(server.channel(), header), "ads-1").await;
            let code = result.err().map(|s| s.code());
            assert_eq!(code, Some(Code::Unauthenticated), "{rpc:?} with {header:?}");
        }
        for (name, token, scopes, patterns) in TOKENS {
            for dataset in ["ads-1", "other"] {
                let covered = patterns
                    .iter()
                    .any(|p| *p == "*" || (*p == "ads-*" && dataset.starts_with("ads-")));
                let allowed = scopes.contains(&scope) && (covered || rpc == Rpc::ListDatasets);
                let result = call(rpc, bearer(server.channel(), token), dataset).await;
                match (&result, allowed) {
                    (Err(status), true) => assert!(
                        !is_refusal(status.code()),
                        "{name} must be let into {rpc:?} on {dataset}: {status:?}"
                    ),
                    (Err(status), false) => assert_eq!(
                        status.code(),
                        Code::PermissionDenied,
                        "{name} on {rpc:?} {dataset}: {status:?}"
                    ),
                    (Ok(()), true) => {}
                    (Ok(()), false) => panic!("{name} was let into {rpc:?} on {dataset}"),
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 26 * TOKENS.len() * 2);

    // Calls about every dataset: a listing shows only the datasets a token may touch, and a
    // snapshot of everything needs the pattern "*".
    let list = |token: &str| {
        let channel = bearer(server.channel(), token);
        async move {
            pb::schema_service_client::SchemaServiceClient::new(channel)
                .list_datasets(pb::ListDatasetsRequest {})
                .await
                .map(|r| r.into_inner().datasets)
        }
    };
    assert_eq!(list("r-secret-1").await.unwrap(), vec!["ads-1"]);
    let all = list("x-secret-4").await.unwrap();
    assert!(all.contains(&"other".to_owned()) && all.contains(&"default".to_owned()));
    let snapshot_all = |token: &str| call(Rpc::Snapshot, bearer(server.channel(), token), "");
    let refused = snapshot_all("a-secret-3").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("\"*\""), "{refused:?}");
    snapshot_all("x-secret-4")
        .await
        .expect("root snapshots all");

    // Health is open; reflection needs a token, any token.
    health_of(server.channel())
        .await
        .expect("health without a token");
    let reflect = |header: Option<&str>| {
        let channel = with_header(server.channel(), header);
        async move {
            use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::v1::ServerReflectionRequest;
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter(vec![request]))
                .await?
                .into_inner();
            stream.message().await.map(|m| m.is_some())
        }
    };
    let anonymous = reflect(None).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert!(reflect(Some("Bearer e-secret-5")).await.unwrap());

    // The token's name is in each request's span; the token never reaches the log.
    let log = server.log_text();
    assert!(log.contains("caller=reader"), "{log}");
    for (_, token, ..) in TOKENS {
        assert!(!log.contains(token), "the token {token} was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_edited_on_disk_takes_effect_without_a_restart() {
    let dir = TempDir::new("token-reload");
    let path = dir.write(
        "tokens.toml",
        token_file(&[("first", "one", &["read"], &["*"])]),
    );
    let server = Process::serving(&["--auth-file", path.to_str().unwrap()]).await;
    let works = |token: &'static str| {
        let channel = bearer(server.channel(), token);
        async move { describe(channel).await }
    };
    works("one").await.expect("the first token");
    assert_eq!(
        works("two").await.unwrap_err().code(),
        Code::Unauthenticated
    );

    dir.write(
        "tokens.toml",
        token_file(&[("second", "two", &["read"], &["*"])]),
    );
    eventually("the second token replaces the first", || async {
        works("two").await.is_ok()
    })
    .await;
    assert_eq!(
        works("one").await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // A bad edit keeps the tokens in force and is reported once.
    dir.write("tokens.toml", "[[token]]\nname = \"broken\"\n");
    eventually("the bad edit is reported", || async {
        log_lines(&server, "changed files refused") == 1
    })
    .await;
    works("two").await.expect("the tokens in force stay");
    // Scopes change too: a token narrowed to another dataset is refused on this one.
    dir.write(
        "tokens.toml",
        token_file(&[("second", "two", &["read"], &["elsewhere"])]),
    );
    eventually("the narrowed token is refused", || async {
        works("two")
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    })
    .await;
    assert_eq!(
        log_lines(&server, "changed files refused"),
        1,
        "one report per bad version:\n{}",
        server.log_text()
    );
}

// ---- the command line -------------------------------------------------------------------------

/// Runs `audience ARGS...` with `stdin`, returning (success, stdout, stderr).
async fn audience<S: AsRef<std::ffi::OsStr>>(args: &[S], stdin: &str) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_audience"));
    command
        .args(args)
        .env_remove("AUDIENCE_ADDR")
        .env_remove("AUDIENCE_TOKEN")
        .env_remove("AUDIENCE_TLS_CERT")
        .env_remove("AUDIENCE_TLS_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = command.spawn().expect("run the audience binary");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let output = child.wait_with_output().expect("wait");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("the command thread")
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_tokens_and_calls_over_mutual_tls_with_one() {
    let (ok, out, err) = audience(
        &[
            "token",
            "new",
            "--name",
            "cli",
            "--scopes",
            "read,write",
            "--datasets",
            "*",
        ],
        "",
    )
    .await;
    assert!(ok, "{err}");
    let (token, entry) = out.split_once("\n\n").expect("token, blank line, entry");
    assert_eq!(token.len(), 64, "{out}");
    assert!(entry.contains(&sha256_hex(token)), "{entry}");
    assert!(!entry.contains(token), "the entry holds the hash only");
    let (ok, hashed, err) = audience(&["token", "hash"], &format!("{token}\n")).await;
    assert!(ok, "{err}");
    assert_eq!(hashed.trim(), sha256_hex(token));

    let dir = TempDir::new("cli-tls");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    write_server_pair(&dir, &server_ca.server());
    let client = client_ca.client();
    let (ca_file, client_ca_file) = (
        dir.write("ca.pem", &server_ca.pem),
        dir.write("client-ca.pem", &client_ca.pem),
    );
    let (client_cert, client_key) = (
        dir.write("client.pem", &client.cert),
        dir.write("client-key.pem", &client.key),
    );
    let tokens = dir.write("tokens.toml", entry);
    let server = Process::launch(
        &[
            "--tls-cert",
            arg(&dir.path("cert.pem")),
            "--tls-key",
            arg(&dir.path("key.pem")),
            "--tls-client-ca",
            arg(&client_ca_file),
            "--auth-file",
            arg(&tokens),
            "--demo-users",
            "50",
        ],
        Launch {
            tls: Some(client_tls(&server_ca, Some(&client))),
            ..Launch::default()
        },
    );
    server.wait_serving(Duration::from_secs(60)).await;
    let url = server.url();
    let tls_flags = [
        "--addr",
        &url,
        "--tls-ca",
        arg(&ca_file),
        "--tls-cert",
        arg(&client_cert),
        "--tls-key",
        arg(&client_key),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        tls_flags
            .iter()
            .chain(extra)
            .map(|a| (*a).to_owned())
            .collect()
    };

    let everyone = "age IS NULL OR age IS NOT NULL";
    let (ok, out, err) = audience(&with(&["count", everyone, "--token", token]), "").await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "50");
    let (ok, _, err) = audience(&with(&["count", everyone]), "").await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = audience(&with(&["snapshot", "--token", token]), "").await;
    assert!(
        !ok && err.contains("PermissionDenied") && err.contains("admin"),
        "{err}"
    );
    let (ok, out, err) = audience(
        &with(&[
            "bench",
            "count",
            "--expr",
            "age > 10",
            "--requests",
            "3",
            "--json",
            "--token",
            token,
        ]),
        "",
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("\"count\""), "{out}");
    // TLS flags need an https:// address; plaintext to the TLS server fails.
    let plain = format!("http://127.0.0.1:{}", server.port);
    let (ok, _, err) = audience(
        &[
            "--addr",
            &plain,
            "--tls-ca",
            arg(&ca_file),
            "count",
            "age > 0",
        ],
        "",
    )
    .await;
    assert!(!ok && err.contains("https://"), "{err}");
    let (ok, _, _) = audience(
        &["--addr", &plain, "count", "age > 0", "--token", token],
        "",
    )
    .await;
    assert!(!ok, "plaintext to a TLS server fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_security_settings_stop_the_start_naming_the_setting_or_file() {
    let dir = TempDir::new("bad-settings");
    let ca = Ca::new("CA");
    write_server_pair(&dir, &ca.server());
    let missing = dir.path("missing.pem");
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let garbage = dir.write("tokens.toml", "this is not toml");
    let cases: [(Vec<&str>, &[&str]); 5] = [
        (vec!["--tls-cert", arg(&cert)], &["tls_cert", "tls_key"]),
        (
            vec!["--tls-cert", arg(&missing), "--tls-key", arg(&key)],
            &["missing.pem"],
        ),
        (vec!["--tls-client-ca", arg(&cert)], &["tls_client_ca"]),
        (
            vec!["--auth-file", arg(&garbage)],
            &["auth_file", "tokens.toml"],
        ),
        (vec!["--token", "x"], &["--token", "client"]),
    ];
    for (args, needles) in cases {
        let process = Process::start(&args);
        let status = process.wait_exit(Duration::from_secs(30)).await;
        assert!(!status.success(), "{args:?}");
        let log = process.log_text();
        for needle in needles {
            assert!(log.contains(needle), "{args:?}: {needle} in:\n{log}");
        }
    }
}
