//! `audience health`: one `grpc.health.v1.Health/Check`, for Kubernetes exec probes, `helm
//! test` and the image's HEALTHCHECK, where a native gRPC probe is not available (TLS).

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::client::ClientError;
use super::connect::ConnectArgs;

/// Asks `addr` about `service` and prints the status (`{"status": ...}` with `json`).
///
/// # Errors
/// No connection or answer within `timeout`, or a status other than SERVING
/// ([`ClientError::NotServing`]), so that the exit code says whether the server serves.
pub async fn run(
    addr: &str,
    connect: &ConnectArgs,
    json: bool,
    service: String,
    timeout: Duration,
) -> Result<(), ClientError> {
    let endpoint = connect
        .endpoint(addr)?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = connect.open(&endpoint, addr).await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(response.status)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("UNKNOWN_STATUS_{}", response.status));
    let out = &mut std::io::stdout().lock();
    if json {
        writeln!(out, "{}", json!({ "status": status }))?;
    } else {
        writeln!(out, "{status}")?;
    }
    if response.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(ClientError::NotServing(status))
    }
}
