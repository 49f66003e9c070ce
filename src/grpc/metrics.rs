//! Requests and their latency per RPC and status code: a tower layer beside the auth layer,
//! recording when a response's body ends (a stream's status comes in its trailers) or is
//! dropped (the caller went away).
//!
//! Labels are the RPC path and the gRPC code name only, never a dataset, so that the number
//! of series stays bounded; a path the server does not serve is counted as `unknown`.

use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tower::{Layer, Service};

use super::body::BoxFuture;

/// `rpc` and `code` of one series.
type Labels = [(&'static str, String); 2];

/// Latency buckets from 100 µs to about 105 s (×2 each): a bitmap count and a long export
/// both land inside.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// The request counters and latency histograms, shared by every connection.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl RequestMetrics {
    /// Adds the families to `registry` (which prefixes `audience_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "grpc_requests",
            "gRPC calls finished, by RPC and status code",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "grpc_request_duration",
            "Time from a call's arrival to the end of its response (streams included), by RPC \
             and status code",
            Unit::Seconds,
            self.latency.clone(),
        );
    }

    fn record(&self, rpc: &str, code: tonic::Code, seconds: f64) {
        // A method the server does not have answers UNIMPLEMENTED: its path is the caller's
        // text, and must not become a series.
        let rpc = match code {
            tonic::Code::Unimplemented => "unknown".to_owned(),
            _ => rpc.to_owned(),
        };
        let labels = [("rpc", rpc), ("code", format!("{code:?}"))];
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
    }
}

/// Puts [`Measure`] around a service; without metrics it passes calls through untouched.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Option<RequestMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Option<RequestMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Measure<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Measure {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Measure<S> {
    inner: S,
    metrics: Option<RequestMetrics>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Measure<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let rpc = request.uri().path().to_owned();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let mut call = Call {
                metrics,
                rpc,
                started,
                code: None,
            };
            // A refusal before any message (trailers-only) carries its status in the headers.
            if let Some(code) = grpc_code(response.headers()) {
                call.code = Some(code);
            }
            Ok(response.map(|body| super::body::watched(body, call)))
        })
    }
}

/// One call until its response ends: recorded once, when dropped.
struct Call {
    metrics: RequestMetrics,
    rpc: String,
    started: Instant,
    /// From the headers or the trailers; none seen when the caller went away first.
    code: Option<tonic::Code>,
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.record(&self.rpc, code, seconds);
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(tonic::Code::from)
}

impl super::body::Watcher for Call {
    /// A stream's status comes in its trailers.
    fn frame(&mut self, frame: &http_body::Frame<bytes::Bytes>) {
        if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
            self.code = Some(code);
        }
    }
}
