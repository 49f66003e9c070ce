//! How client commands reach the server: plaintext or TLS (an `https://` address), with a
//! client certificate for mutual TLS, and a bearer token on every call.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::client::ClientError;

/// The connection every client command talks through: a channel that adds the token.
pub type Connection = InterceptedService<Channel, Authorization>;

/// TLS and token flags. Global, so that they go anywhere on the line; `serve` reads
/// `--tls-cert`/`--tls-key` as its own identity and refuses the others.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Client commands: trust only this CA (PEM) for the server's certificate [default with
    /// an https:// address: the system's roots].
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// serve: the server's certificate chain (PEM). Client commands: the certificate shown
    /// for mutual TLS.
    #[arg(long, global = true, env = "AUDIENCE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "AUDIENCE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Client commands: the bearer token sent with every call.
    #[arg(long, global = true, env = "AUDIENCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Sends an `authorization` header (`Bearer <token>`) with every call, when there is one.
#[derive(Clone, Default)]
pub struct Authorization(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        let shown = if self.0.is_some() { "set" } else { "none" };
        f.debug_tuple("Authorization").field(&shown).finish()
    }
}

impl Authorization {
    /// `Bearer <token>`, or no header without a token.
    ///
    /// # Errors
    /// A token that cannot go in a header (control characters, non-ASCII).
    pub fn bearer(token: Option<&str>) -> Result<Self, ClientError> {
        token
            .map(|token| {
                format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        ClientError::Input("--token: only printable ASCII can be sent".into())
                    })
            })
            .transpose()
            .map(Self)
    }

    /// Exactly `value` (another scheme, a malformed header: what tests of the server send).
    pub fn header(value: MetadataValue<Ascii>) -> Self {
        Self(Some(value))
    }
}

impl Interceptor for Authorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ConnectArgs {
    /// The endpoint of `addr`, with TLS when it is `https://`.
    ///
    /// # Errors
    /// A bad address, TLS flags with a plaintext address, unreadable certificate files.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, ClientError> {
        let endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| ClientError::Input(format!("--addr {addr}: {e}")))?;
        if endpoint.uri().scheme_str() != Some("https") {
            if self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(ClientError::Input(format!(
                    "--tls-ca, --tls-cert and --tls-key need an https:// address, not {addr}"
                )));
            }
            return Ok(endpoint);
        }
        let tls = self.client_tls()?;
        endpoint
            .tls_config(tls)
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })
    }

    fn client_tls(&self) -> Result<ClientTlsConfig, ClientError> {
        let config = match &self.tls_ca {
            Some(path) => ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("--tls-ca", path)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ))),
            (None, None) => Ok(config),
            (Some(_), None) => Err(ClientError::Input(
                "--tls-cert needs --tls-key (the certificate's private key)".into(),
            )),
            (None, Some(_)) => Err(ClientError::Input(
                "--tls-key needs --tls-cert (the certificate it belongs to)".into(),
            )),
        }
    }

    /// One connection to `addr`.
    ///
    /// # Errors
    /// As [`ConnectArgs::endpoint`], and a server that cannot be reached.
    pub async fn connect(&self, addr: &str) -> Result<Connection, ClientError> {
        self.open(&self.endpoint(addr)?, addr).await
    }

    /// A new connection through `endpoint` (of `addr`), with the token.
    ///
    /// # Errors
    /// A server that cannot be reached, a token that cannot be sent.
    pub async fn open(&self, endpoint: &Endpoint, addr: &str) -> Result<Connection, ClientError> {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(InterceptedService::new(
            channel,
            Authorization::bearer(self.token.as_deref())?,
        ))
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Input(format!("{flag} {}: {e}", path.display())))
}
