//! Tokens: the protected mode, every RPC under every scope and dataset pattern, and a token
//! file edited on disk.

use std::time::Duration;

use tonic::Code;

use super::rpcs::{call, Rpc, RPCS};
use super::*;
use crate::harness::{ipc_stream_bytes, reflected_services_v1alpha, update};
use crate::process::Launch;

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

/// Whether a status is an authentication or authorization refusal.
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
    let alpha = |header| reflected_services_v1alpha(server.channel(), header);
    let anonymous = alpha(None).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let listed = alpha(Some("Bearer e-secret-5")).await.unwrap();
    assert!(listed.contains("audience.v1.QueryService"), "{listed:?}");

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
