//! The command line: `audience token`, and client calls over mutual TLS with a token.

use std::time::Duration;

use super::*;
use crate::cli::{audience_cli, audience_cli_with_input};
use crate::process::Launch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_tokens_and_calls_over_mutual_tls_with_one() {
    // `--addr` is global: the token commands ignore it.
    let unused = "http://127.0.0.1:1";
    let made = audience_cli(
        unused,
        &["token", "new", "--name", "cli", "--scopes", "read,write"],
    )
    .await
    .ok();
    let (token, entry) = made.split_once("\n\n").expect("token, blank line, entry");
    assert_eq!(token.len(), 64, "{made}");
    assert!(entry.contains(&sha256_hex(token)), "{entry}");
    assert!(!entry.contains(token), "the entry holds the hash only");
    let hashed = audience_cli_with_input(unused, &["token", "hash"], &format!("{token}\n"))
        .await
        .ok();
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
    let tls = [
        "--tls-ca",
        arg(&ca_file),
        "--tls-cert",
        arg(&client_cert),
        "--tls-key",
        arg(&client_key),
    ];
    let run = |extra: &[&str]| {
        let args: Vec<String> = tls.iter().chain(extra).map(|a| (*a).to_owned()).collect();
        let url = url.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            audience_cli(&url, &args).await
        }
    };

    let everyone = "age IS NULL OR age IS NOT NULL";
    let counted = run(&["count", everyone, "--token", token]).await.ok();
    assert_eq!(counted.trim(), "50");
    let anonymous = run(&["count", everyone]).await;
    assert!(
        !anonymous.success && anonymous.stderr.contains("Unauthenticated"),
        "{anonymous:?}"
    );
    let snapshot = run(&["snapshot", "--token", token]).await;
    assert!(
        !snapshot.success
            && snapshot.stderr.contains("PermissionDenied")
            && snapshot.stderr.contains("admin"),
        "{snapshot:?}"
    );
    let bench = ["bench", "count", "--expr", "age > 10", "--requests", "3"];
    let report = run(&[&bench[..], &["--json", "--token", token]].concat())
        .await
        .ok();
    assert!(report.contains("\"count\""), "{report}");

    // TLS flags need an https:// address; plaintext to the TLS server fails.
    let plain = format!("http://127.0.0.1:{}", server.port);
    let refused = audience_cli(&plain, &["--tls-ca", arg(&ca_file), "count", "age > 0"]).await;
    assert!(
        !refused.success && refused.stderr.contains("https://"),
        "{refused:?}"
    );
    let plaintext = audience_cli(&plain, &["count", "age > 0", "--token", token]).await;
    assert!(!plaintext.success, "plaintext to a TLS server fails");
}
