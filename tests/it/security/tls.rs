//! TLS and mutual TLS, certificates rotated on disk, and settings that stop the start.

use std::time::Duration;

use super::*;
use crate::process::Launch;

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
