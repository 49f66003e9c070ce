//! `SegmentService`: saved segments, created, read, listed, changed and deleted.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::authorize;
use super::convert::{expression, labels, segment_to_proto};
use super::pb;
use super::status::{invalid, to_status};
use super::Services;
use crate::engine::{Change, Engine, EngineError, SegmentDefinition, SegmentPatch};

/// The segment service.
#[derive(Debug, Clone)]
pub struct SegmentApi {
    engine: Arc<Engine>,
}

impl SegmentApi {
    pub fn new(services: &Services) -> Self {
        Self {
            engine: services.engine.clone(),
        }
    }

    fn current(&self, dataset: &str, id: &str) -> Result<pb::Segment, Status> {
        let state = self
            .engine
            .snapshot(dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        let segment = state.segment(id).map_err(|e| to_status(e, "segment_id"))?;
        Ok(segment_to_proto(segment))
    }
}

fn required_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(invalid("segment_id", "must not be empty"))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::segment_service_server::SegmentService for SegmentApi {
    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, segment = %request.get_ref().segment_id))]
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        required_id(&request.segment_id)?;
        let expression = expression(&self.engine, request.expression.as_ref(), "expression")?;
        let now = self.engine.now();
        let definition = SegmentDefinition {
            name: if request.name.is_empty() {
                request.segment_id.clone()
            } else {
                request.name
            },
            id: request.segment_id,
            description: request.description,
            labels: labels(&request.labels),
            expression,
            created_at: now,
            updated_at: now,
        };
        let segment = self
            .engine
            .create_segment(&request.dataset, definition)
            .await
            .map_err(|e| to_status(e, "expression"))?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment_to_proto(&segment)),
        }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, segment = %request.get_ref().segment_id))]
    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        required_id(&request.segment_id)?;
        let segment = self.current(&request.dataset, &request.segment_id)?;
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(segment),
        }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let state = self
            .engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        let segments = state
            .segments()
            .values()
            .filter(|s| {
                request
                    .label_filter
                    .iter()
                    .all(|(k, v)| s.definition.labels.get(k) == Some(v))
            })
            .map(|s| segment_to_proto(s))
            .collect();
        Ok(Response::new(pb::ListSegmentsResponse { segments }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, segment = %request.get_ref().segment_id))]
    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::UpdateSegmentResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        required_id(&request.segment_id)?;
        let expression = match request.expression.as_ref() {
            Some(_) => Some(expression(
                &self.engine,
                request.expression.as_ref(),
                "expression",
            )?),
            None => None,
        };
        // Merged with the current definition under the dataset's writer lock, not here.
        let patch = SegmentPatch {
            id: request.segment_id.clone(),
            name: request.name,
            description: request.description,
            labels: labels(&request.labels),
            replace_labels: request.replace_labels,
            expression,
            updated_at: self.engine.now(),
        };
        self.engine
            .apply(&request.dataset, Change::PatchSegment(patch))
            .await
            .map_err(|e| match e {
                EngineError::DatasetNotFound(_) => to_status(e, "dataset"),
                EngineError::SegmentNotFound(ref id) if *id == request.segment_id => {
                    to_status(e, "segment_id")
                }
                e => to_status(e, "expression"),
            })?;
        let segment = self.current(&request.dataset, &request.segment_id)?;
        Ok(Response::new(pb::UpdateSegmentResponse {
            segment: Some(segment),
        }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, segment = %request.get_ref().segment_id))]
    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        required_id(&request.segment_id)?;
        self.engine
            .apply(&request.dataset, Change::DeleteSegment(request.segment_id))
            .await
            .map_err(|e| to_status(e, "segment_id"))?;
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }
}
