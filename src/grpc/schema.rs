//! `SchemaService`: what a dataset holds, and attribute kinds declared up front.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{authorize, Caller};
use super::convert::{kind_from, kind_to};
use super::pb;
use super::status::to_status;
use super::{blocking, Services};
use crate::engine::{dataset_name, Change, Engine};

/// The schema service.
#[derive(Debug, Clone)]
pub struct SchemaApi {
    engine: Arc<Engine>,
}

impl SchemaApi {
    pub fn new(services: &Services) -> Self {
        Self {
            engine: services.engine.clone(),
        }
    }
}

#[tonic::async_trait]
impl pb::schema_service_server::SchemaService for SchemaApi {
    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn describe_dataset(
        &self,
        request: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DescribeDatasetResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let name = dataset_name(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?
            .to_owned();
        let state = self
            .engine
            .snapshot(&name)
            .map_err(|e| to_status(e, "dataset"))?;
        let lag = self.engine.replication_lag(&name).unwrap_or_default();
        // Distinct counts of numeric columns read the column: off the async workers.
        blocking(move || {
            let events = state.event_counts();
            let attributes = state
                .describe()
                .into_iter()
                .map(|info| pb::AttributeInfo {
                    name: info.name,
                    kind: kind_to(info.kind) as i32,
                    distinct_values: info.distinct_values,
                    null_count: info.null_count,
                })
                .collect();
            Ok(Response::new(pb::DescribeDatasetResponse {
                dataset: name,
                user_count: state.user_count(),
                attributes,
                event_names: events.iter().map(|(n, _)| n.clone()).collect(),
                event_counts: events.iter().map(|(_, c)| *c).collect(),
                event_retention_days: state.retention_days(),
                segment_count: state.segment_count() as u64,
                replication_lag_records: lag.records,
                replication_lag_seconds: lag.seconds,
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn declare_attributes(
        &self,
        request: Request<pb::DeclareAttributesRequest>,
    ) -> Result<Response<pb::DeclareAttributesResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let declarations = request
            .attributes
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Ok((
                    a.name.clone(),
                    kind_from(a.kind, &format!("attributes[{i}].kind"))?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.engine
            .apply(&request.dataset, Change::DeclareAttributes(declarations))
            .await
            .map_err(|e| to_status(e, "attributes"))?;
        Ok(Response::new(pb::DeclareAttributesResponse {}))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset, days = request.get_ref().days))]
    async fn set_event_retention(
        &self,
        request: Request<pb::SetEventRetentionRequest>,
    ) -> Result<Response<pb::SetEventRetentionResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        if request.days == 0 {
            return Err(super::status::invalid("days", "must be at least 1"));
        }
        self.engine
            .apply(
                &request.dataset,
                Change::SetRetention { days: request.days },
            )
            .await
            .map_err(|e| to_status(e, "days"))?;
        Ok(Response::new(pb::SetEventRetentionResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        // A token sees the datasets its patterns match, and only those.
        let caller = Caller::of(&request)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: caller.visible(self.engine.dataset_names()),
        }))
    }
}
