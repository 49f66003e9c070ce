//! Every RPC, the scope the contract gives it, and a small valid call of each.

use std::sync::atomic::{AtomicUsize, Ordering};

use audience::grpc::pb;
use tonic::Status;

use super::Authed;
use crate::harness::{ipc_stream_bytes, text, update};

/// Every RPC, with the scope the contract (PRODUCT.md, "Security") gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Count,
    ListMembers,
    ExportMembers,
    SampleMembers,
    Overlap,
    SegmentsForUser,
    CheckMembership,
    CreateSegment,
    GetSegment,
    ListSegments,
    UpdateSegment,
    DeleteSegment,
    UpsertUsers,
    DeleteUsers,
    ImportUsers,
    ImportUsersFile,
    RecordEvents,
    StreamEvents,
    ImportEvents,
    ImportEventsFile,
    DescribeDataset,
    DeclareAttributes,
    ListDatasets,
    SetEventRetention,
    Watch,
    Snapshot,
}

/// read = queries, schema, watch; write = ingest and segment changes; admin = retention,
/// declarations, snapshots, server-side file imports.
pub const RPCS: [(Rpc, &str); 26] = [
    (Rpc::Count, "read"),
    (Rpc::ListMembers, "read"),
    (Rpc::ExportMembers, "read"),
    (Rpc::SampleMembers, "read"),
    (Rpc::Overlap, "read"),
    (Rpc::SegmentsForUser, "read"),
    (Rpc::CheckMembership, "read"),
    (Rpc::GetSegment, "read"),
    (Rpc::ListSegments, "read"),
    (Rpc::DescribeDataset, "read"),
    (Rpc::ListDatasets, "read"),
    (Rpc::Watch, "read"),
    (Rpc::CreateSegment, "write"),
    (Rpc::UpdateSegment, "write"),
    (Rpc::DeleteSegment, "write"),
    (Rpc::UpsertUsers, "write"),
    (Rpc::DeleteUsers, "write"),
    (Rpc::ImportUsers, "write"),
    (Rpc::RecordEvents, "write"),
    (Rpc::StreamEvents, "write"),
    (Rpc::ImportEvents, "write"),
    (Rpc::ImportUsersFile, "admin"),
    (Rpc::ImportEventsFile, "admin"),
    (Rpc::DeclareAttributes, "admin"),
    (Rpc::SetEventRetention, "admin"),
    (Rpc::Snapshot, "admin"),
];

/// A small valid request of `rpc` about `dataset`; only whether it was let in matters.
pub async fn call(rpc: Rpc, channel: Authed, dataset: &str) -> Result<(), Status> {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    let dataset = dataset.to_owned();
    let query = || pb::query_service_client::QueryServiceClient::new(channel.clone());
    let segments = || pb::segment_service_client::SegmentServiceClient::new(channel.clone());
    let ingest = || pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let schema = || pb::schema_service_client::SchemaServiceClient::new(channel.clone());
    let users_ipc = ipc_stream_bytes(&audience::demo::batches(5, 5, 7).collect::<Vec<_>>());
    let event = pb::Event {
        user_id: "u1".into(),
        event: "visit".into(),
        ts: Some(crate::harness::timestamp(crate::harness::now_ms())),
        value: None,
    };
    match rpc {
        Rpc::Count => query()
            .count(pb::CountRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ListMembers => query()
            .list_members(pb::ListMembersRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ExportMembers => query()
            .export_members(pb::ExportMembersRequest {
                dataset,
                audience: text("age > 0"),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::SampleMembers => query()
            .sample_members(pb::SampleMembersRequest {
                dataset,
                audience: text("age > 0"),
                size: 2,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Overlap => query()
            .overlap(pb::OverlapRequest {
                dataset,
                audiences: vec![text("age > 0").unwrap(), text("age > 50").unwrap()],
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::SegmentsForUser => query()
            .segments_for_user(pb::SegmentsForUserRequest {
                dataset,
                user_id: "u1".into(),
            })
            .await
            .map(drop),
        Rpc::CheckMembership => query()
            .check_membership(pb::CheckMembershipRequest {
                dataset,
                user_id: "u1".into(),
                segment_ids: vec!["s".into()],
            })
            .await
            .map(drop),
        Rpc::CreateSegment => segments()
            .create_segment(pb::CreateSegmentRequest {
                dataset,
                segment_id: format!("made-{}", CREATED.fetch_add(1, Ordering::SeqCst)),
                expression: Some(crate::harness::text_expr("age > 10")),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::GetSegment => segments()
            .get_segment(pb::GetSegmentRequest {
                dataset,
                segment_id: "s".into(),
            })
            .await
            .map(drop),
        Rpc::ListSegments => segments()
            .list_segments(pb::ListSegmentsRequest {
                dataset,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::UpdateSegment => segments()
            .update_segment(pb::UpdateSegmentRequest {
                dataset,
                segment_id: "s".into(),
                description: Some("updated".into()),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::DeleteSegment => segments()
            .delete_segment(pb::DeleteSegmentRequest {
                dataset,
                segment_id: "never-made".into(),
            })
            .await
            .map(drop),
        Rpc::UpsertUsers => ingest()
            .upsert_users(pb::UpsertUsersRequest {
                dataset,
                users: vec![pb::UserUpdate {
                    user_id: "u-new".into(),
                    updates: vec![update::int("age", 33)],
                }],
            })
            .await
            .map(drop),
        Rpc::DeleteUsers => ingest()
            .delete_users(pb::DeleteUsersRequest {
                dataset,
                user_ids: vec!["nobody".into()],
            })
            .await
            .map(drop),
        Rpc::ImportUsers => ingest()
            .import_users(tokio_stream::iter(vec![pb::ImportUsersRequest {
                dataset,
                id_column: String::new(),
                arrow_ipc_chunk: users_ipc,
            }]))
            .await
            .map(drop),
        Rpc::ImportUsersFile => ingest()
            .import_users_file(pb::ImportUsersFileRequest {
                dataset,
                path: "users.arrow".into(),
                id_column: String::new(),
            })
            .await
            .map(drop),
        Rpc::RecordEvents => ingest()
            .record_events(pb::RecordEventsRequest {
                dataset,
                events: vec![event],
            })
            .await
            .map(drop),
        Rpc::StreamEvents => ingest()
            .stream_events(tokio_stream::iter(vec![pb::StreamEventsRequest {
                dataset,
                events: vec![event],
            }]))
            .await
            .map(drop),
        Rpc::ImportEvents => ingest()
            .import_events(tokio_stream::iter(vec![pb::ImportEventsRequest {
                dataset,
                arrow_ipc_chunk: Vec::new(),
            }]))
            .await
            .map(drop),
        Rpc::ImportEventsFile => ingest()
            .import_events_file(pb::ImportEventsFileRequest {
                dataset,
                path: "users.arrow".into(),
            })
            .await
            .map(drop),
        Rpc::DescribeDataset => schema()
            .describe_dataset(pb::DescribeDatasetRequest { dataset })
            .await
            .map(drop),
        Rpc::DeclareAttributes => schema()
            .declare_attributes(pb::DeclareAttributesRequest {
                dataset,
                attributes: vec![pb::AttributeDeclaration {
                    name: "tier".into(),
                    kind: pb::AttributeKind::Categorical as i32,
                }],
            })
            .await
            .map(drop),
        Rpc::ListDatasets => schema()
            .list_datasets(pb::ListDatasetsRequest {})
            .await
            .map(drop),
        Rpc::SetEventRetention => schema()
            .set_event_retention(pb::SetEventRetentionRequest { dataset, days: 400 })
            .await
            .map(drop),
        Rpc::Watch => pb::watch_service_client::WatchServiceClient::new(channel.clone())
            .watch(pb::WatchRequest {
                dataset,
                segment_ids: vec!["s".into()],
                resume_token: String::new(),
            })
            .await
            .map(drop),
        Rpc::Snapshot => pb::admin_service_client::AdminServiceClient::new(channel.clone())
            .snapshot(pb::SnapshotRequest { dataset })
            .await
            .map(drop),
    }
}
