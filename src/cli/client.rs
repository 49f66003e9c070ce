//! The client subcommands: one call (or stream) each, printed as lines or JSON.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use super::connect::{ConnectArgs, Connection};
use super::{Command, ImportKind, SegmentCommand};
use crate::engine::import::{open_file, DEFAULT_ID_COLUMN};
use crate::grpc::pb;
use crate::time::parse_rfc3339;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Bytes per import message: the IPC stream is cut into pieces of this size.
const IMPORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Rows per record batch read from the file.
const IMPORT_BATCH_ROWS: usize = 64 * 1024;
/// Page size of `members --limit`.
const MEMBERS_PAGE: u64 = 10_000;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {}", with_causes(source))]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Input(String),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Serve(super::serve::ServeError),
    /// The health check answered, with another status than SERVING.
    #[error("not serving: {0}")]
    NotServing(String),
}

/// An error and its causes, `: `-separated: tonic's transport error alone says only
/// "transport error", its cause says "Connection refused".
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        // Some layers repeat their cause's words as their own.
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        cause = e.source();
    }
    parts.join(": ")
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

type Result<T> = std::result::Result<T, ClientError>;

/// Runs one client subcommand against `addr`.
///
/// # Errors
/// Connection failures, refused requests and bad arguments.
pub async fn run(addr: &str, connect: &ConnectArgs, json: bool, command: Command) -> Result<()> {
    let channel = connect.connect(addr).await?;
    let out = &mut std::io::stdout().lock();
    match command {
        Command::Serve(_) | Command::Bench(_) | Command::Token(_) | Command::Health { .. } => {
            Ok(())
        }
        Command::Import {
            kind,
            file,
            dataset,
            id_column,
            server_side,
        } => import(channel, kind, &file, dataset, id_column, server_side, json).await,
        Command::Count {
            expr,
            dataset,
            as_of,
            by,
            top,
        } => {
            let mut client = pb::query_service_client::QueryServiceClient::new(channel);
            let response = client
                .count(pb::CountRequest {
                    dataset,
                    audience: Some(text_audience(expr)),
                    as_of: as_of_arg(as_of.as_deref())?,
                    // `--top` applies to a breakdown only; the server refuses it alone.
                    breakdown_limit: if by.is_some() { top } else { 0 },
                    breakdown_attribute: by.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_count(out, &response, json)
        }
        Command::Members {
            expr,
            limit,
            dataset,
            as_of,
        } => members(channel, out, expr, limit, dataset, as_of, json).await,
        Command::Segment(command) => segment(channel, out, command, json).await,
        Command::SegmentsFor { user_id, dataset } => {
            let mut client = pb::query_service_client::QueryServiceClient::new(channel);
            let ids = client
                .segments_for_user(pb::SegmentsForUserRequest { dataset, user_id })
                .await?
                .into_inner()
                .segment_ids;
            if json {
                writeln!(out, "{}", json!(ids))?;
            } else {
                for id in ids {
                    writeln!(out, "{id}")?;
                }
            }
            Ok(())
        }
        Command::Schema { dataset } => {
            let mut client = pb::schema_service_client::SchemaServiceClient::new(channel);
            let schema = client
                .describe_dataset(pb::DescribeDatasetRequest { dataset })
                .await?
                .into_inner();
            print_schema(out, &schema, json)
        }
        Command::Watch {
            segment_ids,
            dataset,
            resume,
        } => watch(channel, out, segment_ids, dataset, resume, json).await,
        Command::Snapshot { dataset } => snapshot(channel, out, dataset, json).await,
    }
}

/// Asks for a snapshot, showing a bar of datasets written, and prints where it went.
async fn snapshot(
    channel: Connection,
    out: &mut impl Write,
    dataset: Option<String>,
    json: bool,
) -> Result<()> {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel);
    let request = pb::SnapshotRequest {
        dataset: dataset.unwrap_or_default(),
    };
    let mut progress = client.snapshot(request).await?.into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} datasets {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = pb::SnapshotResponse::default();
    while let Some(update) = progress.message().await? {
        bar.set_length(update.datasets_total);
        bar.set_position(update.datasets_written);
        bar.set_message(update.dataset.clone());
        last = update;
    }
    bar.finish_and_clear();
    if !last.done {
        return Err(ClientError::Input(
            "the snapshot ended before the server confirmed it".into(),
        ));
    }
    if json {
        let line = json!({
            "path": last.path,
            "datasets": last.datasets_written,
            "bytes": last.bytes,
            "log_bytes_freed": last.log_bytes_freed,
            "seconds": last.seconds,
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "snapshot {}: {} datasets, {} bytes, {} log bytes freed, {:.2} s",
            last.path, last.datasets_written, last.bytes, last.log_bytes_freed, last.seconds
        )?;
    }
    Ok(())
}

pub(super) fn text_audience(expr: String) -> pb::Audience {
    pb::Audience {
        kind: Some(pb::audience::Kind::Expression(pb::Expression {
            kind: Some(pb::expression::Kind::Text(expr)),
        })),
    }
}

fn as_of_arg(as_of: Option<&str>) -> Result<Option<prost_types::Timestamp>> {
    as_of
        .map(|text| {
            parse_rfc3339(text)
                .map(crate::grpc::convert::timestamp)
                .map_err(|e| ClientError::Input(format!("--as-of: {e}")))
        })
        .transpose()
}

fn print_count(out: &mut impl Write, response: &pb::CountResponse, json: bool) -> Result<()> {
    if json {
        let breakdown: Vec<_> = response
            .breakdown
            .iter()
            .map(|e| json!({"value": e.value, "count": e.count}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"count": response.count, "breakdown": breakdown,
                   "null_count": response.breakdown_null_count,
                   "other_count": response.breakdown_other_count})
        )?;
        return Ok(());
    }
    writeln!(out, "{}", response.count)?;
    for entry in &response.breakdown {
        writeln!(out, "{}\t{}", entry.value, entry.count)?;
    }
    if !response.breakdown.is_empty() || response.breakdown_null_count > 0 {
        if response.breakdown_other_count > 0 {
            writeln!(out, "(other)\t{}", response.breakdown_other_count)?;
        }
        if response.breakdown_null_count > 0 {
            writeln!(out, "(null)\t{}", response.breakdown_null_count)?;
        }
    }
    Ok(())
}

fn print_schema(
    out: &mut impl Write,
    schema: &pb::DescribeDatasetResponse,
    json: bool,
) -> Result<()> {
    let kind = |k: i32| {
        pb::AttributeKind::try_from(k)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("ATTRIBUTE_KIND_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default()
    };
    if json {
        let attributes: Vec<_> = schema
            .attributes
            .iter()
            .map(|a| {
                json!({"name": a.name, "kind": kind(a.kind),
                            "distinct_values": a.distinct_values, "null_count": a.null_count})
            })
            .collect();
        let events: Vec<_> = schema
            .event_names
            .iter()
            .zip(&schema.event_counts)
            .map(|(name, count)| json!({"name": name, "count": count}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"dataset": schema.dataset, "users": schema.user_count,
                   "segments": schema.segment_count, "attributes": attributes,
                   "events": events, "event_retention_days": schema.event_retention_days})
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "dataset\t{}\nusers\t{}\nsegments\t{}",
        schema.dataset, schema.user_count, schema.segment_count
    )?;
    writeln!(out, "attribute\tkind\tdistinct\tnulls")?;
    for a in &schema.attributes {
        writeln!(
            out,
            "{}\t{}\t{}\t{}",
            a.name,
            kind(a.kind),
            a.distinct_values,
            a.null_count
        )?;
    }
    writeln!(
        out,
        "event\tcount\t(kept {} days)",
        schema.event_retention_days
    )?;
    for (name, count) in schema.event_names.iter().zip(&schema.event_counts) {
        writeln!(out, "{name}\t{count}")?;
    }
    Ok(())
}

async fn members(
    channel: Connection,
    out: &mut impl Write,
    expr: String,
    limit: Option<u64>,
    dataset: String,
    as_of: Option<String>,
    json: bool,
) -> Result<()> {
    let mut client = pb::query_service_client::QueryServiceClient::new(channel);
    let as_of = as_of_arg(as_of.as_deref())?;
    let mut print = |ids: &[String]| -> Result<()> {
        for id in ids {
            if json {
                writeln!(out, "{}", json!(id))?;
            } else {
                writeln!(out, "{id}")?;
            }
        }
        Ok(())
    };
    let Some(limit) = limit else {
        let mut stream = client
            .export_members(pb::ExportMembersRequest {
                dataset,
                audience: Some(text_audience(expr)),
                as_of,
                chunk_size: 0,
            })
            .await?
            .into_inner();
        while let Some(chunk) = stream.message().await? {
            print(&chunk.user_ids)?;
        }
        return Ok(());
    };
    let mut left = limit;
    let mut token = String::new();
    while left > 0 {
        let page = client
            .list_members(pb::ListMembersRequest {
                dataset: dataset.clone(),
                audience: Some(text_audience(expr.clone())),
                as_of,
                page_size: left.min(MEMBERS_PAGE) as u32,
                page_token: token,
            })
            .await?
            .into_inner();
        left -= page.user_ids.len() as u64;
        print(&page.user_ids)?;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(())
}

fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>> {
    labels
        .iter()
        .map(|label| {
            label
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ClientError::Input(format!("--label {label}: use key=value")))
        })
        .collect()
}

fn print_segment(out: &mut impl Write, segment: &pb::Segment, json: bool) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            json!({"id": segment.id, "name": segment.name, "description": segment.description,
                   "labels": segment.labels, "expression": segment.expression_text,
                   "size": segment.size,
                   "create_time": segment.create_time.as_ref().map(|t| t.to_string()),
                   "update_time": segment.update_time.as_ref().map(|t| t.to_string())})
        )?;
    } else {
        writeln!(
            out,
            "{}\t{}\t{}\t{}",
            segment.id, segment.size, segment.name, segment.expression_text
        )?;
    }
    Ok(())
}

async fn segment(
    channel: Connection,
    out: &mut impl Write,
    command: SegmentCommand,
    json: bool,
) -> Result<()> {
    let mut client = pb::segment_service_client::SegmentServiceClient::new(channel);
    let text = |expr: String| pb::Expression {
        kind: Some(pb::expression::Kind::Text(expr)),
    };
    match command {
        SegmentCommand::Create {
            id,
            expr,
            name,
            description,
            labels,
            dataset,
        } => {
            let response = client
                .create_segment(pb::CreateSegmentRequest {
                    dataset,
                    segment_id: id,
                    name,
                    description,
                    labels: parse_labels(&labels)?,
                    expression: Some(text(expr)),
                })
                .await?
                .into_inner();
            if let Some(segment) = response.segment {
                print_segment(out, &segment, json)?;
            }
        }
        SegmentCommand::Get { id, dataset } => {
            let response = client
                .get_segment(pb::GetSegmentRequest {
                    dataset,
                    segment_id: id,
                })
                .await?
                .into_inner();
            if let Some(segment) = response.segment {
                print_segment(out, &segment, json)?;
            }
        }
        SegmentCommand::List { labels, dataset } => {
            let response = client
                .list_segments(pb::ListSegmentsRequest {
                    dataset,
                    label_filter: parse_labels(&labels)?,
                })
                .await?
                .into_inner();
            for segment in &response.segments {
                print_segment(out, segment, json)?;
            }
        }
        SegmentCommand::Update {
            id,
            expr,
            name,
            description,
            labels,
            dataset,
        } => {
            let response = client
                .update_segment(pb::UpdateSegmentRequest {
                    dataset,
                    segment_id: id,
                    name,
                    description,
                    labels: parse_labels(&labels)?,
                    replace_labels: false,
                    expression: expr.map(text),
                })
                .await?
                .into_inner();
            if let Some(segment) = response.segment {
                print_segment(out, &segment, json)?;
            }
        }
        SegmentCommand::Delete { id, dataset } => {
            client
                .delete_segment(pb::DeleteSegmentRequest {
                    dataset,
                    segment_id: id.clone(),
                })
                .await?;
            if json {
                writeln!(out, "{}", json!({"deleted": id}))?;
            } else {
                writeln!(out, "deleted {id}")?;
            }
        }
    }
    Ok(())
}

/// Prints membership changes until the stream ends; when the server cuts the stream off
/// because this reader fell behind, reconnects with the last token it received.
async fn watch(
    channel: Connection,
    out: &mut impl Write,
    segment_ids: Vec<String>,
    dataset: String,
    resume: Option<String>,
    json: bool,
) -> Result<()> {
    let mut client = pb::watch_service_client::WatchServiceClient::new(channel);
    let mut token = resume.unwrap_or_default();
    // The token of the last reconnect: a reconnect that got nothing further ends the command.
    let mut reconnected_at: Option<String> = None;
    loop {
        let request = pb::WatchRequest {
            dataset: dataset.clone(),
            segment_ids: segment_ids.clone(),
            resume_token: token.clone(),
        };
        let mut stream = client.watch(request).await?.into_inner();
        let ended = loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    print_changes(out, &message, json)?;
                    token = message.resume_token;
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        match ended {
            Some(status)
                if status.code() == tonic::Code::ResourceExhausted
                    && status.message().contains("resume_token=")
                    && reconnected_at.as_ref() != Some(&token) =>
            {
                eprintln!("note: fell behind the server's writes; reconnecting where it left off");
                reconnected_at = Some(token.clone());
            }
            Some(status) => return Err(status.into()),
            None => return Ok(()),
        }
    }
}

/// One line per change; in JSON the last change of a message carries the token that resumes
/// after it (the others carry `null`: resuming there would skip the rest of the message).
fn print_changes(out: &mut impl Write, message: &pb::WatchResponse, json: bool) -> Result<()> {
    let last = message.changes.len().saturating_sub(1);
    for (index, change) in message.changes.iter().enumerate() {
        let kind = match pb::MembershipChangeKind::try_from(change.kind) {
            Ok(pb::MembershipChangeKind::Entered) => "entered",
            Ok(pb::MembershipChangeKind::Left) => "left",
            _ => "unknown",
        };
        if json {
            let token = (index == last).then_some(message.resume_token.as_str());
            writeln!(
                out,
                "{}",
                json!({"kind": kind, "segment_id": change.segment_id,
                       "user_id": change.user_id, "resume_token": token})
            )?;
        } else {
            writeln!(out, "{kind}\t{}\t{}", change.segment_id, change.user_id)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Streams a file to the server as Arrow IPC (or asks the server to read it), with a progress
/// bar, and prints what the import did.
async fn import(
    channel: Connection,
    kind: ImportKind,
    file: &Path,
    dataset: String,
    id_column: String,
    server_side: bool,
    json: bool,
) -> Result<()> {
    if kind == ImportKind::Events && id_column != DEFAULT_ID_COLUMN {
        return Err(ClientError::Input(format!(
            "--id-column applies to users imports; an events table always has a \
             '{DEFAULT_ID_COLUMN}' column"
        )));
    }
    let mut client = pb::ingest_service_client::IngestServiceClient::new(channel);
    let last = match (kind, server_side) {
        (ImportKind::Users, true) => {
            let stream = client
                .import_users_file(pb::ImportUsersFileRequest {
                    dataset,
                    path: file.display().to_string(),
                    id_column,
                })
                .await?
                .into_inner();
            follow_progress(stream, 0).await?
        }
        (ImportKind::Events, true) => {
            let stream = client
                .import_events_file(pb::ImportEventsFileRequest {
                    dataset,
                    path: file.display().to_string(),
                })
                .await?
                .into_inner();
            follow_progress(stream, 0).await?
        }
        (ImportKind::Users, false) => {
            let mut first = Some((dataset, id_column));
            let (chunks, total) = stream_file(file, move |arrow_ipc_chunk| {
                let (dataset, id_column) = first.take().unwrap_or_default();
                pb::ImportUsersRequest {
                    dataset,
                    id_column,
                    arrow_ipc_chunk,
                }
            })?;
            follow_progress(client.import_users(chunks).await?.into_inner(), total).await?
        }
        (ImportKind::Events, false) => {
            let mut first = Some(dataset);
            let (chunks, total) =
                stream_file(file, move |arrow_ipc_chunk| pb::ImportEventsRequest {
                    dataset: first.take().unwrap_or_default(),
                    arrow_ipc_chunk,
                })?;
            follow_progress(client.import_events(chunks).await?.into_inner(), total).await?
        }
    };
    let out = &mut std::io::stdout().lock();
    print_import(out, kind, &last, json)
}

/// Opens `file` and encodes it on a thread as one Arrow IPC stream of messages made by
/// `message` from each chunk; also returns the row count when the format tells it.
fn stream_file<M: Send + 'static>(
    file: &Path,
    message: impl FnMut(Vec<u8>) -> M + Send + 'static,
) -> Result<(ReceiverStream<M>, u64)> {
    let source =
        open_file(file, IMPORT_BATCH_ROWS).map_err(|e| ClientError::Input(e.to_string()))?;
    let total = source.total_rows.unwrap_or(0);
    let (sender, receiver) = mpsc::channel(4);
    // Detached: it ends when the file is sent or the call drops the receiver.
    std::thread::spawn(move || encode_ipc(source, message, &sender));
    Ok((ReceiverStream::new(receiver), total))
}

/// Shows the server's progress reports as a bar; returns the last one, which must say done.
async fn follow_progress<R: pb::ImportResponse>(
    mut progress: tonic::Streaming<R>,
    total: u64,
) -> Result<pb::ImportProgress> {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rows ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = pb::ImportProgress::default();
    while let Some(response) = progress.message().await? {
        let update = response.into_progress().ok_or_else(|| {
            ClientError::Input("the server sent an import response without its progress".into())
        })?;
        if update.rows_total > 0 {
            bar.set_length(update.rows_total);
        }
        bar.set_position(update.rows_read);
        last = update;
    }
    bar.finish_and_clear();
    if !last.done {
        return Err(ClientError::Input(
            "the import ended before the server confirmed it".into(),
        ));
    }
    Ok(last)
}

/// The one summary line of a finished import.
fn print_import(
    out: &mut impl Write,
    kind: ImportKind,
    last: &pb::ImportProgress,
    json: bool,
) -> Result<()> {
    match (kind, json) {
        (ImportKind::Users, true) => writeln!(
            out,
            "{}",
            json!({"rows": last.rows_read, "created": last.users_created,
                   "updated": last.users_updated})
        )?,
        (ImportKind::Users, false) => writeln!(
            out,
            "imported {} rows: {} users created, {} updated",
            last.rows_read, last.users_created, last.users_updated
        )?,
        (ImportKind::Events, true) => writeln!(
            out,
            "{}",
            json!({"rows": last.rows_read, "events": last.events_imported,
                   "expired": last.events_expired, "created": last.users_created})
        )?,
        (ImportKind::Events, false) => writeln!(
            out,
            "imported {} rows: {} events recorded, {} expired, {} users created",
            last.rows_read, last.events_imported, last.events_expired, last.users_created
        )?,
    }
    Ok(())
}

/// Reads record batches and sends them as one Arrow IPC stream cut into chunks, each wrapped
/// by `message` (runs on a thread).
fn encode_ipc<M>(
    source: crate::engine::import::BatchSource,
    mut message: impl FnMut(Vec<u8>) -> M,
    sender: &mpsc::Sender<M>,
) {
    let mut send = |bytes: Vec<u8>| -> bool {
        bytes
            .chunks(IMPORT_CHUNK_BYTES)
            .all(|piece| sender.blocking_send(message(piece.to_vec())).is_ok())
    };
    let mut writer: Option<arrow_ipc::writer::StreamWriter<Vec<u8>>> = None;
    for batch in source.batches {
        let Ok(batch) = batch else {
            eprintln!(
                "error: cannot read the import file: {}",
                batch.err().map(|e| e.to_string()).unwrap_or_default()
            );
            return;
        };
        if writer.is_none() {
            match arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema()) {
                Ok(w) => writer = Some(w),
                Err(e) => {
                    eprintln!("error: cannot encode the import: {e}");
                    return;
                }
            }
        }
        let Some(w) = writer.as_mut() else { return };
        if let Err(e) = w.write(&batch) {
            eprintln!("error: cannot encode the import: {e}");
            return;
        }
        if !send(std::mem::take(w.get_mut())) {
            return;
        }
    }
    if let Some(mut w) = writer {
        if w.finish().is_ok() {
            send(std::mem::take(w.get_mut()));
        }
    }
}
