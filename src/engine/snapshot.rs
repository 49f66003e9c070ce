//! A dataset version as a set of files, and back: what the persistence layer stores as a
//! snapshot. Open formats only, so that a snapshot can be read without this code:
//!
//! | file | format | content |
//! |---|---|---|
//! | `dataset.json` | JSON | format version, id bound, retention, refresh time, event cutoff, attribute kinds, segment slots |
//! | `keys.arrow` | Arrow IPC file, `user_id: Utf8` | one row per dense id in id order; null for a deleted id |
//! | `attribute.<name>.arrow` | Arrow IPC file | categorical, set: `value: Utf8, users: LargeBinary` (a roaring bitmap, portable format) per value in code order; boolean: `value: Boolean, users: LargeBinary`; integer, float, timestamp: `user: UInt32, value: Int64/Float64/Timestamp(ms)` per user with a value |
//! | `segments.arrow` | Arrow IPC file | `id: Utf8, slot: UInt32, definition: Utf8` (JSON), `users: LargeBinary` (roaring) |
//! | `events.arrow` | Arrow IPC file | per event name and UTC day: `name: Utf8, day: Int64` (days since the epoch), `users: LargeList<UInt32>` ascending, `run_ends: LargeList<UInt32>` (one past each user's last event in `times`), `times: LargeList<UInt32>` (milliseconds into the day, ascending within each user's run) |
//!
//! Dense ids, value codes and segment slots are kept as they were, so that a dataset loaded from
//! a snapshot answers (member order included) exactly as the one that wrote it.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;

use arrow_array::builder::{LargeBinaryBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType, UInt32Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, LargeBinaryArray, LargeListArray,
    RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use serde::{Deserialize, Serialize};

use super::change::SegmentDefinition;
use super::segment::Segment;
use super::state::DatasetState;
use crate::index::attribute::{BooleanAttribute, Categorical, SetAttribute};
use crate::index::events::{DayBucket, EventStore};
use crate::index::keys::DenseId;
use crate::index::membership::MembershipIndex;
use crate::index::numeric::NumericColumn;
use crate::index::{Attribute, AttributeKind, Bitmap, KeyDictionary};
use crate::time::Millis;

/// The version of this layout.
const FORMAT: u32 = 1;

/// Rows per record batch of the keys file.
const KEY_ROWS: usize = 1 << 20;

/// Event times per record batch of the events file, well inside Arrow's offsets.
const EVENT_VALUES: usize = 1 << 26;

/// Why a snapshot could not be read; names the file.
pub type SnapshotError = String;

/// `dataset.json`.
#[derive(Debug, Serialize, Deserialize)]
struct DatasetMeta {
    format: u32,
    /// Dense ids assigned (rows of `keys.arrow`).
    id_bound: u64,
    /// Live users (non-null keys).
    live: u64,
    retention_days: Option<u32>,
    time_refreshed_at: Option<Millis>,
    version: u64,
    event_cutoff: Millis,
    attributes: Vec<(String, AttributeKind)>,
    /// Slot → segment id, null for a free slot.
    segment_slots: Vec<Option<String>>,
}

/// The files of one dataset version.
///
/// # Errors
/// A column Arrow cannot write (an internal error).
pub fn to_files(state: &DatasetState) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let meta = DatasetMeta {
        format: FORMAT,
        id_bound: state.keys.id_bound(),
        live: state.live.len(),
        retention_days: state.retention_days,
        time_refreshed_at: state.time_refreshed_at,
        version: state.version,
        event_cutoff: state.events.cutoff(),
        attributes: state
            .attributes
            .iter()
            .map(|(name, a)| (name.clone(), a.kind()))
            .collect(),
        segment_slots: state
            .membership
            .slots()
            .map(|s| s.map(str::to_owned))
            .collect(),
    };
    let mut files = vec![(
        "dataset.json".to_owned(),
        serde_json::to_vec_pretty(&meta).map_err(|e| format!("dataset.json: {e}"))?,
    )];
    files.push(("keys.arrow".into(), keys_file(state)?));
    for (name, attribute) in &state.attributes {
        files.push((attribute_file_name(name), attribute_file(attribute)?));
    }
    files.push(("segments.arrow".into(), segments_file(state)?));
    files.push(("events.arrow".into(), events_file(&state.events)?));
    Ok(files)
}

/// A dataset version from its files; `read` returns a file's checked bytes by name.
///
/// # Errors
/// A file missing, unreadable or inconsistent with the others, named.
pub fn from_files(
    mut read: impl FnMut(&str) -> Result<Vec<u8>, SnapshotError>,
) -> Result<DatasetState, SnapshotError> {
    let meta: DatasetMeta =
        serde_json::from_slice(&read("dataset.json")?).map_err(|e| format!("dataset.json: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!(
            "dataset.json: format {} is not supported (this build reads {FORMAT})",
            meta.format
        ));
    }
    let (keys, live) =
        read_keys(&read("keys.arrow")?, &meta).map_err(|e| format!("keys.arrow: {e}"))?;
    let mut attributes = BTreeMap::new();
    for (name, kind) in &meta.attributes {
        let file = attribute_file_name(name);
        let attribute = read_attribute(&read(&file)?, *kind, meta.id_bound)
            .map_err(|e| format!("{file}: {e}"))?;
        attributes.insert(name.clone(), Arc::new(attribute));
    }
    let events = read_events(&read("events.arrow")?, meta.event_cutoff)
        .map_err(|e| format!("events.arrow: {e}"))?;
    let mut state = DatasetState::default();
    state.keys = keys;
    state.live = Arc::new(live);
    state.attributes = attributes;
    state.events = events;
    state.retention_days = meta.retention_days;
    state.time_refreshed_at = meta.time_refreshed_at;
    state.version = meta.version;
    read_segments(&read("segments.arrow")?, &meta, &mut state)
        .map_err(|e| format!("segments.arrow: {e}"))?;
    Ok(state)
}

fn attribute_file_name(name: &str) -> String {
    format!("attribute.{name}.arrow")
}

fn ipc_file(schema: Arc<Schema>, batches: &[RecordBatch]) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = Vec::new();
    let mut writer =
        arrow_ipc::writer::FileWriter::try_new(&mut bytes, &schema).map_err(|e| e.to_string())?;
    for batch in batches {
        writer.write(batch).map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    Ok(bytes)
}

fn read_ipc(bytes: Vec<u8>) -> Result<Vec<RecordBatch>, SnapshotError> {
    let reader = arrow_ipc::reader::FileReader::try_new(Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn batch(schema: &Arc<Schema>, columns: Vec<ArrayRef>) -> Result<RecordBatch, SnapshotError> {
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    index: usize,
    name: &str,
) -> Result<&'a T, SnapshotError> {
    batch
        .columns()
        .get(index)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column {index} ('{name}') is missing or of the wrong type"))
}

fn bitmap_bytes(bitmap: &Bitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = bitmap.serialize_into(&mut bytes);
    bytes
}

fn bitmap_from(bytes: &[u8]) -> Result<Bitmap, SnapshotError> {
    Bitmap::deserialize_from(bytes).map_err(|e| format!("a bitmap does not decode: {e}"))
}

fn keys_file(state: &DatasetState) -> Result<Vec<u8>, SnapshotError> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "user_id",
        DataType::Utf8,
        true,
    )]));
    let bound = state.keys.id_bound();
    let mut batches = Vec::new();
    let mut start = 0u64;
    while start < bound {
        let end = (start + KEY_ROWS as u64).min(bound);
        let mut builder = StringBuilder::new();
        for id in start..end {
            let id = id as DenseId;
            match state
                .live
                .contains(id)
                .then(|| state.keys.key(id))
                .flatten()
            {
                Some(key) => builder.append_value(key),
                None => builder.append_null(),
            }
        }
        batches.push(batch(&schema, vec![Arc::new(builder.finish())])?);
        start = end;
    }
    ipc_file(schema, &batches)
}

fn read_keys(bytes: &[u8], meta: &DatasetMeta) -> Result<(KeyDictionary, Bitmap), SnapshotError> {
    let batches = read_ipc(bytes.to_vec())?;
    let mut columns = Vec::with_capacity(batches.len());
    for batch in &batches {
        columns.push(column::<StringArray>(batch, 0, "user_id")?);
    }
    let rows: u64 = columns.iter().map(|c| c.len() as u64).sum();
    if rows != meta.id_bound {
        return Err(format!(
            "{rows} ids where dataset.json says {}",
            meta.id_bound
        ));
    }
    let slots = columns.iter().flat_map(|c| c.iter());
    let keys = KeyDictionary::restore(slots, meta.live as usize).map_err(|e| e.to_string())?;
    let valid = columns
        .iter()
        .flat_map(|c| (0..c.len()).map(|row| c.is_valid(row)));
    let live_ids = valid
        .enumerate()
        .filter(|&(_, valid)| valid)
        .map(|(id, _)| id as DenseId);
    let live = Bitmap::from_sorted_iter(live_ids).map_err(|e| e.to_string())?;
    if live.len() != meta.live {
        return Err(format!(
            "{} live users where dataset.json says {}",
            live.len(),
            meta.live
        ));
    }
    Ok((keys, live))
}

fn value_users_schema(value: DataType) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("value", value, false),
        Field::new("users", DataType::LargeBinary, false),
    ]))
}

fn user_value_schema(value: DataType) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user", DataType::UInt32, false),
        Field::new("value", value, false),
    ]))
}

fn string_bitmaps_file(parts: Vec<(&str, Arc<Bitmap>)>) -> Result<Vec<u8>, SnapshotError> {
    let schema = value_users_schema(DataType::Utf8);
    let mut values = StringBuilder::new();
    let mut users = LargeBinaryBuilder::new();
    for (value, members) in parts {
        values.append_value(value);
        users.append_value(bitmap_bytes(&members));
    }
    let batch = batch(
        &schema,
        vec![Arc::new(values.finish()), Arc::new(users.finish())],
    )?;
    ipc_file(schema, &[batch])
}

fn attribute_file(attribute: &Attribute) -> Result<Vec<u8>, SnapshotError> {
    match attribute {
        Attribute::Categorical(a) => string_bitmaps_file(a.value_bitmaps()),
        Attribute::Set(a) => string_bitmaps_file(a.value_bitmaps()),
        Attribute::Boolean(a) => {
            let schema = value_users_schema(DataType::Boolean);
            let mut users = LargeBinaryBuilder::new();
            users.append_value(bitmap_bytes(&a.false_users));
            users.append_value(bitmap_bytes(&a.true_users));
            let values = BooleanArray::from(vec![false, true]);
            let batch = batch(&schema, vec![Arc::new(values), Arc::new(users.finish())])?;
            ipc_file(schema, &[batch])
        }
        Attribute::Integer(c) => {
            let (ids, values): (Vec<u32>, Vec<i64>) = c.rows().unzip();
            numeric_file(DataType::Int64, ids, Arc::new(Int64Array::from(values)))
        }
        Attribute::Float(c) => {
            let (ids, values): (Vec<u32>, Vec<f64>) = c.rows().unzip();
            numeric_file(DataType::Float64, ids, Arc::new(Float64Array::from(values)))
        }
        Attribute::Timestamp(c) => {
            let (ids, values): (Vec<u32>, Vec<i64>) = c.rows().unzip();
            let values = TimestampMillisecondArray::from(values).with_timezone("UTC");
            let kind = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
            numeric_file(kind, ids, Arc::new(values))
        }
    }
}

fn numeric_file(kind: DataType, ids: Vec<u32>, values: ArrayRef) -> Result<Vec<u8>, SnapshotError> {
    let schema = user_value_schema(kind);
    let batch = batch(&schema, vec![Arc::new(UInt32Array::from(ids)), values])?;
    ipc_file(schema, &[batch])
}

fn read_attribute(
    bytes: &[u8],
    kind: AttributeKind,
    id_bound: u64,
) -> Result<Attribute, SnapshotError> {
    let batches = read_ipc(bytes.to_vec())?;
    match kind {
        AttributeKind::Categorical => Ok(Attribute::Categorical(Categorical::from_value_bitmaps(
            string_bitmaps(&batches)?,
        ))),
        AttributeKind::Set => Ok(Attribute::Set(SetAttribute::from_value_bitmaps(
            string_bitmaps(&batches)?,
        ))),
        AttributeKind::Boolean => {
            let mut attribute = BooleanAttribute::default();
            for batch in &batches {
                let values = column::<BooleanArray>(batch, 0, "value")?;
                let users = column::<LargeBinaryArray>(batch, 1, "users")?;
                for row in 0..batch.num_rows() {
                    let members = Arc::new(bitmap_from(users.value(row))?);
                    if values.value(row) {
                        attribute.true_users = members;
                    } else {
                        attribute.false_users = members;
                    }
                }
            }
            Ok(Attribute::Boolean(attribute))
        }
        AttributeKind::Integer => Ok(Attribute::Integer(NumericColumn::from_rows(
            &numeric_rows::<Int64Type>(&batches, id_bound)?,
        ))),
        AttributeKind::Float => Ok(Attribute::Float(NumericColumn::from_rows(&numeric_rows::<
            Float64Type,
        >(
            &batches, id_bound,
        )?))),
        AttributeKind::Timestamp => Ok(Attribute::Timestamp(NumericColumn::from_rows(
            &numeric_rows::<TimestampMillisecondType>(&batches, id_bound)?,
        ))),
    }
}

fn string_bitmaps(batches: &[RecordBatch]) -> Result<Vec<(String, Bitmap)>, SnapshotError> {
    let mut parts = Vec::new();
    for batch in batches {
        let values = column::<StringArray>(batch, 0, "value")?;
        let users = column::<LargeBinaryArray>(batch, 1, "users")?;
        for row in 0..batch.num_rows() {
            parts.push((values.value(row).to_owned(), bitmap_from(users.value(row))?));
        }
    }
    Ok(parts)
}

/// `(user, value)` rows of a numeric attribute, as [`NumericColumn::from_rows`] takes them.
type NumericRows<V> = Vec<(DenseId, Option<V>)>;

fn numeric_rows<T>(
    batches: &[RecordBatch],
    id_bound: u64,
) -> Result<NumericRows<T::Native>, SnapshotError>
where
    T: arrow_array::ArrowPrimitiveType,
{
    let mut rows = Vec::new();
    for batch in batches {
        let ids = column::<UInt32Array>(batch, 0, "user")?;
        let values = batch
            .columns()
            .get(1)
            .and_then(|c| c.as_primitive_opt::<T>())
            .ok_or("column 1 ('value') is missing or of the wrong type")?;
        if let Some(&id) = ids.values().iter().find(|&&id| u64::from(id) >= id_bound) {
            return Err(format!(
                "user {id} is beyond the {id_bound} ids of keys.arrow"
            ));
        }
        rows.extend(
            ids.values()
                .iter()
                .zip(values.values().iter())
                .map(|(&id, &value)| (id, Some(value))),
        );
    }
    Ok(rows)
}

fn segments_file(state: &DatasetState) -> Result<Vec<u8>, SnapshotError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("slot", DataType::UInt32, false),
        Field::new("definition", DataType::Utf8, false),
        Field::new("users", DataType::LargeBinary, false),
    ]));
    let (mut ids, mut definitions) = (StringBuilder::new(), StringBuilder::new());
    let (mut slots, mut users) = (Vec::new(), LargeBinaryBuilder::new());
    for (id, segment) in &state.segments {
        ids.append_value(id);
        slots.push(segment.slot as u32);
        let definition = serde_json::to_string(&*segment.definition)
            .map_err(|e| format!("segment '{id}': {e}"))?;
        definitions.append_value(definition);
        users.append_value(bitmap_bytes(&segment.members()));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(UInt32Array::from(slots)),
        Arc::new(definitions.finish()),
        Arc::new(users.finish()),
    ];
    let batch = batch(&schema, columns)?;
    ipc_file(schema, &[batch])
}

fn read_segments(
    bytes: &[u8],
    meta: &DatasetMeta,
    state: &mut DatasetState,
) -> Result<(), SnapshotError> {
    let slots: Vec<Option<&str>> = meta.segment_slots.iter().map(|s| s.as_deref()).collect();
    state.membership = MembershipIndex::with_slots(&slots);
    for batch in read_ipc(bytes.to_vec())? {
        let ids = column::<StringArray>(&batch, 0, "id")?;
        let slot_column = column::<UInt32Array>(&batch, 1, "slot")?;
        let definitions = column::<StringArray>(&batch, 2, "definition")?;
        let users = column::<LargeBinaryArray>(&batch, 3, "users")?;
        for row in 0..batch.num_rows() {
            let id = ids.value(row);
            let slot = slot_column.value(row) as usize;
            if slots.get(slot).copied().flatten() != Some(id) {
                return Err(format!(
                    "segment '{id}' is not in slot {slot} of dataset.json"
                ));
            }
            let definition: SegmentDefinition = serde_json::from_str(definitions.value(row))
                .map_err(|e| format!("segment '{id}': {e}"))?;
            let members = bitmap_from(users.value(row))?;
            state.membership.update(slot, &members, &Bitmap::new());
            let segment = Segment::new(definition, Arc::new(members), slot);
            state.definitions_changed();
            state.segments.insert(id.to_owned(), Arc::new(segment));
        }
    }
    if state.segments.len() != slots.iter().flatten().count() {
        return Err("segments and the slots of dataset.json disagree".into());
    }
    Ok(())
}

fn u32_list(lists: Vec<Vec<u32>>) -> ArrayRef {
    let mut offsets = Vec::with_capacity(lists.len() + 1);
    offsets.push(0i64);
    let mut values = Vec::with_capacity(lists.iter().map(Vec::len).sum());
    for list in lists {
        values.extend_from_slice(&list);
        offsets.push(values.len() as i64);
    }
    let field = Arc::new(Field::new("item", DataType::UInt32, false));
    Arc::new(LargeListArray::new(
        field,
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(UInt32Array::from(values)),
        None,
    ))
}

fn events_schema() -> Arc<Schema> {
    let list = || DataType::LargeList(Arc::new(Field::new("item", DataType::UInt32, false)));
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("day", DataType::Int64, false),
        Field::new("users", list(), false),
        Field::new("run_ends", list(), false),
        Field::new("times", list(), false),
    ]))
}

/// Rows of the events file not yet written.
#[derive(Default)]
struct EventRows {
    names: Vec<String>,
    days: Vec<i64>,
    users: Vec<Vec<u32>>,
    ends: Vec<Vec<u32>>,
    times: Vec<Vec<u32>>,
    values: usize,
}

impl EventRows {
    fn take_batch(&mut self, schema: &Arc<Schema>) -> Result<RecordBatch, SnapshotError> {
        let rows = std::mem::take(self);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(rows.names)),
            Arc::new(Int64Array::from(rows.days)),
            u32_list(rows.users),
            u32_list(rows.ends),
            u32_list(rows.times),
        ];
        batch(schema, columns)
    }
}

fn events_file(events: &EventStore) -> Result<Vec<u8>, SnapshotError> {
    let schema = events_schema();
    let mut batches = Vec::new();
    let mut rows = EventRows::default();
    for (name, day, bucket) in events.buckets() {
        let (ids, ends, times) = bucket.columns();
        rows.names.push(name.to_owned());
        rows.days.push(day);
        rows.users.push(ids.to_vec());
        rows.ends.push(ends.to_vec());
        rows.times.push(times.to_vec());
        rows.values += times.len();
        if rows.values >= EVENT_VALUES {
            batches.push(rows.take_batch(&schema)?);
        }
    }
    if !rows.names.is_empty() || batches.is_empty() {
        batches.push(rows.take_batch(&schema)?);
    }
    ipc_file(schema, &batches)
}

fn u32_values(list: &LargeListArray, row: usize) -> Result<Vec<u32>, SnapshotError> {
    let values = list.value(row);
    let values = values
        .as_primitive_opt::<UInt32Type>()
        .ok_or("a list is not of UInt32")?;
    Ok(values.values().to_vec())
}

fn read_events(bytes: &[u8], cutoff: Millis) -> Result<EventStore, SnapshotError> {
    let mut series: BTreeMap<String, BTreeMap<i64, DayBucket>> = BTreeMap::new();
    for batch in read_ipc(bytes.to_vec())? {
        let names = column::<StringArray>(&batch, 0, "name")?;
        let days = column::<Int64Array>(&batch, 1, "day")?;
        let users = column::<LargeListArray>(&batch, 2, "users")?;
        let ends = column::<LargeListArray>(&batch, 3, "run_ends")?;
        let times = column::<LargeListArray>(&batch, 4, "times")?;
        for row in 0..batch.num_rows() {
            let (name, day) = (names.value(row), days.value(row));
            let bucket = DayBucket::from_columns(
                u32_values(users, row)?,
                u32_values(ends, row)?,
                u32_values(times, row)?,
            )
            .map_err(|e| format!("'{name}' on day {day}: {e}"))?;
            if series
                .entry(name.to_owned())
                .or_default()
                .insert(day, bucket)
                .is_some()
            {
                return Err(format!("'{name}' has day {day} twice"));
            }
        }
    }
    Ok(EventStore::from_buckets(
        cutoff,
        crate::index::events::TierParams::DEFAULT,
        series,
    ))
}
