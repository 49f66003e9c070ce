//! `QueryService`: counts, member listings, exports, samples, overlap and per-user lookups.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::auth::authorize;
use super::convert::{as_of, audience};
use super::pb;
use super::status::{invalid, to_status};
use super::{blocking, Services};
use crate::engine::query::sample;
use crate::engine::{Engine, EngineError};

/// Ids per export message when the caller does not say.
const DEFAULT_CHUNK: usize = 10_000;
/// Ids per page when the caller does not say.
const DEFAULT_PAGE: usize = 1_000;
/// Export messages buffered ahead of a slow reader.
const EXPORT_BUFFER: usize = 4;

/// The query service.
#[derive(Debug, Clone)]
pub struct QueryApi {
    engine: Arc<Engine>,
}

impl QueryApi {
    pub fn new(services: &Services) -> Self {
        Self {
            engine: services.engine.clone(),
        }
    }

    /// A requested size: `default` when 0, refused above the engine's page limit.
    fn size(&self, requested: u32, default: usize, field: &'static str) -> Result<usize, Status> {
        let limit = self.engine.limits().max_page_size;
        match requested as usize {
            0 => Ok(default.min(limit)),
            n if n > limit => Err(to_status(
                EngineError::LimitExceeded {
                    what: field,
                    actual: n as u64,
                    limit: limit as u64,
                },
                "",
            )),
            n => Ok(n),
        }
    }
}

impl QueryApi {
    /// A breakdown's `breakdown_limit`: 1 to the engine's limit, and only with an attribute.
    fn breakdown_limit(&self, request: &pb::CountRequest) -> Result<usize, Status> {
        let limit = self.engine.limits().max_breakdown_values;
        match (
            request.breakdown_attribute.is_empty(),
            request.breakdown_limit as usize,
        ) {
            (true, 0) => Ok(0),
            (true, _) => Err(invalid(
                "breakdown_limit",
                "is set without a breakdown_attribute",
            )),
            (false, 0) => Err(invalid("breakdown_limit", "must be at least 1")),
            (false, n) if n > limit => Err(invalid(
                "breakdown_limit",
                format!("{n} is more than the limit of {limit} (limits.max_breakdown_values)"),
            )),
            (false, n) => Ok(n),
        }
    }
}

type ExportStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportMembersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::query_service_server::QueryService for QueryApi {
    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn count(
        &self,
        request: Request<pb::CountRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let engine = self.engine.clone();
        let audience = audience(&engine, request.audience.as_ref(), "audience")?;
        let as_of = as_of(&engine, request.as_of.as_ref())?;
        let limit = self.breakdown_limit(&request)?;
        let state = engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        blocking(move || {
            if request.breakdown_attribute.is_empty() {
                let count = state
                    .count(&audience, as_of)
                    .map_err(|e| to_status(e, "audience"))?;
                return Ok(Response::new(pb::CountResponse {
                    count,
                    ..Default::default()
                }));
            }
            let result = state
                .count_by(&audience, as_of, &request.breakdown_attribute, limit)
                .map_err(|e| match e {
                    EngineError::InvalidArgument { .. } => to_status(e, ""),
                    e => to_status(e, "audience"),
                })?;
            Ok(Response::new(pb::CountResponse {
                count: result.count,
                breakdown: result
                    .breakdown
                    .into_iter()
                    .map(|(value, count)| pb::BreakdownEntry { value, count })
                    .collect(),
                breakdown_null_count: result.null_count,
                breakdown_other_count: result.other_count,
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let size = self.size(request.page_size, DEFAULT_PAGE, "page_size")?;
        let engine = self.engine.clone();
        let page = if request.page_token.is_empty() {
            let audience = audience(&engine, request.audience.as_ref(), "audience")?;
            let as_of = as_of(&engine, request.as_of.as_ref())?;
            let state = engine
                .snapshot(&request.dataset)
                .map_err(|e| to_status(e, "dataset"))?;
            blocking(move || {
                engine
                    .first_page(&request.dataset, state, &audience, as_of, size)
                    .map_err(|e| to_status(e, "audience"))
            })
            .await?
        } else {
            // A later page may repeat the audience; the token must then be of that audience.
            let audience = match request.audience.as_ref() {
                Some(given) => Some(audience(&engine, Some(given), "audience")?),
                None => None,
            };
            blocking(move || {
                engine
                    .next_page(
                        &request.dataset,
                        audience.as_ref(),
                        &request.page_token,
                        size,
                    )
                    .map_err(|e| match e {
                        EngineError::InvalidArgument { .. } => to_status(e, ""),
                        e => to_status(e, "page_token"),
                    })
            })
            .await?
        };
        Ok(Response::new(pb::ListMembersResponse {
            user_ids: page.user_ids,
            next_page_token: page.next_token,
            total_count: page.total,
        }))
    }

    type ExportMembersStream = ExportStream;

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn export_members(
        &self,
        request: Request<pb::ExportMembersRequest>,
    ) -> Result<Response<Self::ExportMembersStream>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let chunk = self.size(request.chunk_size, DEFAULT_CHUNK, "chunk_size")?;
        let engine = self.engine.clone();
        let audience = audience(&engine, request.audience.as_ref(), "audience")?;
        let as_of = as_of(&engine, request.as_of.as_ref())?;
        let state = engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        let members = {
            let state = state.clone();
            // Owned, for the export task to iterate: a saved segment's shared set is copied
            // here, on the blocking pool.
            blocking(move || {
                state
                    .select(&audience, as_of)
                    .map(Arc::unwrap_or_clone)
                    .map_err(|e| to_status(e, "audience"))
            })
            .await?
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(EXPORT_BUFFER);
        tokio::spawn(
            export_chunks(state, members, chunk, sender).instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn sample_members(
        &self,
        request: Request<pb::SampleMembersRequest>,
    ) -> Result<Response<pb::SampleMembersResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        if request.size == 0 {
            return Err(invalid("size", "must be positive"));
        }
        let size = self.size(request.size, DEFAULT_PAGE, "size")?;
        let engine = self.engine.clone();
        let audience = audience(&engine, request.audience.as_ref(), "audience")?;
        let as_of = as_of(&engine, request.as_of.as_ref())?;
        let state = engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        blocking(move || {
            let members = state
                .select(&audience, as_of)
                .map_err(|e| to_status(e, "audience"))?;
            let picked = sample(&members, size, request.seed);
            Ok(Response::new(pb::SampleMembersResponse {
                user_ids: state.external_ids(picked),
                total_count: members.len(),
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn overlap(
        &self,
        request: Request<pb::OverlapRequest>,
    ) -> Result<Response<pb::OverlapResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        let engine = self.engine.clone();
        let limit = engine.limits().max_overlap_audiences;
        if request.audiences.len() < 2 {
            return Err(invalid("audiences", "at least two audiences are needed"));
        }
        if request.audiences.len() > limit {
            return Err(to_status(
                EngineError::LimitExceeded {
                    what: "the number of audiences",
                    actual: request.audiences.len() as u64,
                    limit: limit as u64,
                },
                "audiences",
            ));
        }
        let audiences = request
            .audiences
            .iter()
            .enumerate()
            .map(|(i, a)| audience(&engine, Some(a), &format!("audiences[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let as_of = as_of(&engine, request.as_of.as_ref())?;
        let state = engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        blocking(move || {
            let result = state
                .overlap(&audiences, as_of)
                .map_err(|e| to_status(e, "audiences"))?;
            Ok(Response::new(pb::OverlapResponse {
                sizes: result.sizes,
                pairs: result
                    .pairs
                    .into_iter()
                    .map(|(first, second, intersection_count)| pb::PairOverlap {
                        first: first as u32,
                        second: second as u32,
                        intersection_count,
                    })
                    .collect(),
                intersection_count: result.intersection,
                union_count: result.union,
                cumulative_reach: result.cumulative_reach,
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn segments_for_user(
        &self,
        request: Request<pb::SegmentsForUserRequest>,
    ) -> Result<Response<pb::SegmentsForUserResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        if request.user_id.is_empty() {
            return Err(invalid("user_id", "must not be empty"));
        }
        let state = self
            .engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        // A few thousand bitmap probes: cheaper inline than a hop to the blocking pool.
        let segment_ids = state
            .segments_for_user(&request.user_id)
            .into_iter()
            .map(str::to_owned)
            .collect();
        Ok(Response::new(pb::SegmentsForUserResponse { segment_ids }))
    }

    #[tracing::instrument(skip_all, fields(dataset = %request.get_ref().dataset))]
    async fn check_membership(
        &self,
        request: Request<pb::CheckMembershipRequest>,
    ) -> Result<Response<pb::CheckMembershipResponse>, Status> {
        authorize(&request, &request.get_ref().dataset)?;
        let request = request.into_inner();
        if request.user_id.is_empty() {
            return Err(invalid("user_id", "must not be empty"));
        }
        if request.segment_ids.is_empty() {
            return Err(invalid("segment_ids", "name at least one segment"));
        }
        let state = self
            .engine
            .snapshot(&request.dataset)
            .map_err(|e| to_status(e, "dataset"))?;
        let found = state
            .check_membership(&request.user_id, &request.segment_ids)
            .map_err(|e| to_status(e, "segment_ids"))?;
        let user_exists = found.is_some();
        let flags = found.unwrap_or_else(|| vec![false; request.segment_ids.len()]);
        Ok(Response::new(pb::CheckMembershipResponse {
            memberships: request
                .segment_ids
                .into_iter()
                .zip(flags)
                .map(|(segment_id, member)| pb::Membership { segment_id, member })
                .collect(),
            user_exists,
        }))
    }
}

/// Sends `members` as external ids, `chunk` at a time. An async task: a caller that stops
/// reading leaves it waiting on the channel, holding no thread (a blocking thread per slow
/// reader would exhaust the pool that every query and write uses); each chunk's ids are
/// mapped on the blocking pool, a bounded piece of work.
async fn export_chunks(
    state: Arc<crate::engine::DatasetState>,
    members: crate::index::Bitmap,
    chunk: usize,
    sender: tokio::sync::mpsc::Sender<Result<pb::ExportMembersResponse, Status>>,
) {
    let total = members.len();
    let mut sent = 0u64;
    let mut ids = members.into_iter();
    loop {
        let chunk_ids: Vec<u32> = ids.by_ref().take(chunk).collect();
        if chunk_ids.is_empty() {
            break;
        }
        sent += chunk_ids.len() as u64;
        let state = state.clone();
        let user_ids = match blocking(move || Ok(state.external_ids(chunk_ids))).await {
            Ok(user_ids) => user_ids,
            Err(status) => {
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        let message = pb::ExportMembersResponse {
            user_ids,
            sent,
            total,
        };
        if sender.send(Ok(message)).await.is_err() {
            tracing::info!(sent, total, "export cancelled by the caller");
            return;
        }
    }
    tracing::info!(total, "export complete");
}
