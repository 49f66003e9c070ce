//! TLS and mutual TLS on the server, with certificates that rotate on disk.
//!
//! tonic's own `ServerTlsConfig` is fixed at start, so the server accepts TCP itself and runs
//! each handshake with the rustls configuration in force at that moment ([`Reloading`]):
//! a certificate, key or client CA replaced on disk serves new connections without a
//! restart, while connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;

use super::reload::{Reloading, Source};

/// The longest a client may take over its handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed `accept` (out of file descriptors), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BUFFER: usize = 64;

/// The server's certificate files (`tls_cert`, `tls_key`, `tls_client_ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, the server's own first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With mutual TLS: the CA (PEM, one or more) that signs the clients' certificates.
    pub client_ca: Option<PathBuf>,
}

/// Why certificate files make no TLS configuration; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert {path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("tls_key {path}: no PEM private key in it")]
    NoKey { path: PathBuf },
    #[error("{setting} {path}: {reason}")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("tls_cert {cert} and tls_key {key} make no server identity: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("tls_client_ca {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

impl Source for TlsFiles {
    type Output = ServerConfig;
    type Error = TlsError;

    fn what(&self) -> &'static str {
        "TLS certificate"
    }

    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }

    fn parse(&self, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
        let certs = certificates("tls_cert", &self.cert, &contents[0])?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|error| match error {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: self.key.clone(),
            },
            other => TlsError::Pem {
                setting: "tls_key",
                path: self.key.clone(),
                reason: other.to_string(),
            },
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| self.identity_error(source))?;
        let builder = match (&self.client_ca, contents.get(2)) {
            (Some(path), Some(pem)) => {
                let verifier = client_verifier(path, pem, provider)?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|source| self.identity_error(source))?;
        // gRPC is HTTP/2 only; clients such as grpc-go require it to be negotiated.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl TlsFiles {
    fn identity_error(&self, source: rustls::Error) -> TlsError {
        TlsError::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}

fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            setting,
            path: path.to_owned(),
            reason: error.to_string(),
        })
}

/// A verifier that requires a client certificate signed by one of the CAs in `pem`.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let refused = |reason: String| TlsError::ClientCa {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates("tls_client_ca", path, pem)? {
        roots
            .add(cert)
            .map_err(|e| refused(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(refused("no PEM certificate in it".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| refused(e.to_string()))
}

/// The server's connections over TLS: accepted here, handshaken concurrently (one slow or
/// silent client holds up no other), and yielded once encrypted. Dropping it stops accepting.
pub struct TlsIncoming {
    accepted: mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
    accept_loop: JoinHandle<()>,
}

impl TlsIncoming {
    /// Starts accepting on `listener` with the configuration `tls` holds at each connection.
    pub fn new(listener: TcpListener, tls: Arc<Reloading<TlsFiles>>) -> Self {
        let (sender, accepted) = mpsc::channel(ACCEPTED_BUFFER);
        let accept_loop = tokio::spawn(accept_loop(listener, tls, sender));
        Self {
            accepted,
            accept_loop,
        }
    }
}

impl Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx)
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<Reloading<TlsFiles>>,
    sender: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Without TCP_NODELAY, the last frames of a response (a stream's trailers) wait for
        // the client's delayed ACK: 40 ms added to every streaming call on Linux.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, %peer, "cannot set TCP_NODELAY");
        }
        if sender.is_closed() {
            return;
        }
        let acceptor = TlsAcceptor::from(tls.current());
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = sender.send(Ok(stream)).await;
                }
                // A plaintext client, an untrusted or missing client certificate: the client
                // sees the failure; the server has nothing to act on.
                Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;
    use tokio_stream::StreamExt;

    use super::*;

    /// A self-signed certificate for 127.0.0.1 written to `dir`, and its DER for the client.
    fn self_signed(dir: &Path) -> (TlsFiles, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        (files, cert.der().clone())
    }

    #[tokio::test]
    async fn accepted_connections_are_encrypted_and_skip_nagle() {
        let dir = std::env::temp_dir().join(format!("audience-tls-{}", std::process::id()));
        let (files, der) = self_signed(&dir);
        let tls = Reloading::load(files).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = TlsIncoming::new(listener, tls);

        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let (connected, accepted) = tokio::join!(connector.connect(name, tcp), incoming.next());
        let connected = connected.unwrap();
        assert_eq!(connected.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let accepted = accepted.unwrap().unwrap();
        assert!(
            accepted.get_ref().0.nodelay().unwrap(),
            "TCP_NODELAY is set"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_that_make_no_identity_are_named() {
        let dir = std::env::temp_dir().join(format!("audience-tls-bad-{}", std::process::id()));
        let (files, _) = self_signed(&dir);
        let other = dir.join("other");
        let (other_files, _) = self_signed(&other);
        let pem = |path: &Path| std::fs::read(path).unwrap();
        let parse = |cert: Vec<u8>, key: Vec<u8>| {
            files
                .parse(&[cert, key])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mismatched = parse(pem(&files.cert), pem(&other_files.key));
        assert!(
            mismatched.contains("cert.pem") && mismatched.contains("key.pem"),
            "{mismatched}"
        );
        let no_cert = parse(b"nothing".to_vec(), pem(&files.key));
        assert!(
            no_cert.contains("tls_cert") && no_cert.contains("cert.pem"),
            "{no_cert}"
        );
        let no_key = parse(pem(&files.cert), pem(&files.cert));
        assert!(
            no_key.contains("tls_key") && no_key.contains("key.pem"),
            "{no_key}"
        );
        let with_ca = TlsFiles {
            client_ca: Some(dir.join("ca.pem")),
            ..files.clone()
        };
        let bad_ca = with_ca
            .parse(&[pem(&files.cert), pem(&files.key), b"no ca here".to_vec()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            bad_ca.contains("tls_client_ca") && bad_ca.contains("ca.pem"),
            "{bad_ca}"
        );
        assert!(files.parse(&[pem(&files.cert), pem(&files.key)]).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
