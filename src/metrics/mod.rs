//! Prometheus metrics on their own port (`metrics_listen`): `GET /metrics` answers the
//! Prometheus text format (0.0.4).
//!
//! Request counts and latencies are recorded as calls end ([`RequestMetrics`], a layer of the
//! gRPC server); everything the engine holds is read at scrape time from its published
//! versions and counters ([`engine`]), so that a write pays nothing for metrics.

mod engine;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::engine::Engine;
use crate::grpc::metrics::RequestMetrics;

/// Every metric of the server, named `audience_*`.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    /// The request metrics of the gRPC layer and the engine's figures.
    pub fn new(engine: Arc<Engine>, requests: &RequestMetrics) -> Self {
        let mut registry = Registry::with_prefix("audience");
        requests.register(&mut registry);
        registry.register_collector(Box::new(engine::EngineCollector::new(engine)));
        Self { registry }
    }

    /// The text a scrape gets.
    ///
    /// # Errors
    /// Only a formatting failure of the encoder (writing to a `String` does not fail).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn respond(
        &self,
        request: &http::Request<hyper::body::Incoming>,
    ) -> http::Response<Full<Bytes>> {
        let (status, content_type, body) = match (request.method(), request.uri().path()) {
            (&http::Method::GET, "/metrics") => match self.render() {
                Ok(text) => (http::StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
                Err(error) => {
                    tracing::error!(%error, "metrics could not be encoded");
                    let status = http::StatusCode::INTERNAL_SERVER_ERROR;
                    (
                        status,
                        "text/plain",
                        "metrics could not be encoded\n".into(),
                    )
                }
            },
            (_, "/metrics") => (
                http::StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            ),
            _ => (
                http::StatusCode::NOT_FOUND,
                "text/plain",
                "metrics are at /metrics\n".into(),
            ),
        };
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }
}

/// Answers scrapes on `listener` until the task is dropped (the server stops it with the gRPC
/// server).
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(%error, "metrics: cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = exporter.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics connection ended");
            }
        });
    }
}
