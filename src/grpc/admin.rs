//! `AdminService`: operating the server's storage (snapshots on demand).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::pb;
use super::status::to_status;
use super::Services;
use crate::engine::{dataset_name, Engine, EngineError};

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    engine: Arc<Engine>,
}

impl AdminApi {
    pub fn new(services: &Services) -> Self {
        Self {
            engine: services.engine.clone(),
        }
    }
}

type SnapshotStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

/// The status of a snapshot refused because nothing is kept on disk: the server's state, not
/// the request, is wrong.
fn snapshot_status(error: EngineError, field: &str) -> Status {
    match error {
        EngineError::InvalidArgument {
            field: "data_dir",
            reason,
        } => Status::failed_precondition(reason),
        other => to_status(other, field),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    type SnapshotStream = SnapshotStream;

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        match request.dataset.as_str() {
            "" => caller.may_use_every_dataset()?,
            name => caller.may_use(name)?,
        }
        let only = match request.dataset.as_str() {
            "" => None,
            name => Some(
                dataset_name(name)
                    .map_err(|e| to_status(e, "dataset"))?
                    .to_owned(),
            ),
        };
        if !self.engine.is_durable() {
            return Err(Status::failed_precondition(
                "the server keeps its data in memory only: start it with --data-dir",
            ));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let engine = self.engine.clone();
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let progress = sender.clone();
                let written = engine
                    .write_snapshot(only.as_deref(), move |written, total, name| {
                        let message = pb::SnapshotResponse {
                            datasets_written: written as u64,
                            datasets_total: total as u64,
                            dataset: name.to_owned(),
                            ..Default::default()
                        };
                        // A caller that stopped reading progress does not stop the snapshot.
                        let _ = progress.try_send(Ok(message));
                    })
                    .await;
                let last = match written {
                    Ok(report) => Ok(pb::SnapshotResponse {
                        datasets_written: report.datasets as u64,
                        datasets_total: report.datasets as u64,
                        dataset: String::new(),
                        done: true,
                        path: report.path.display().to_string(),
                        bytes: report.bytes,
                        log_bytes_freed: report.log_bytes_freed,
                        seconds: report.seconds,
                    }),
                    Err(error) => Err(snapshot_status(error, "dataset")),
                };
                let _ = sender.send(last).await;
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
