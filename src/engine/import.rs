//! Bulk import of users tables (Arrow record batches) by the import convention of PRODUCT.md,
//! and the readers that turn Parquet files and Arrow IPC streams into record batches.
//!
//! Columns are converted once per batch with arrow's cast kernels (every integer width to i64,
//! every float and decimal to f64, every timestamp and date to milliseconds), and dictionary
//! columns intern each distinct value once, so the per-row work is a bitmap insert.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_cast::{cast_with_options, CastOptions};
use arrow_schema::{DataType, Field, TimeUnit};

use super::change::{ChangeOutcome, ImportBatch};
use super::error::{EngineError, Result};
use super::state::{checked_float, DatasetState};
use crate::index::attribute::{Attribute, AttributeKind};
use crate::index::dictionary::ValueCode;
use crate::index::keys::DenseId;
use crate::index::Bitmap;

/// The id column's name when none is given.
pub const DEFAULT_ID_COLUMN: &str = "user_id";

/// The attribute kind an Arrow type maps to, if any.
pub fn kind_of(data_type: &DataType) -> Option<AttributeKind> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            Some(AttributeKind::Categorical)
        }
        DataType::Dictionary(_, values) if is_string(values) => Some(AttributeKind::Categorical),
        DataType::List(item) | DataType::LargeList(item) | DataType::ListView(item)
            if is_string(item.data_type()) || is_string_dictionary(item) =>
        {
            Some(AttributeKind::Set)
        }
        DataType::Boolean => Some(AttributeKind::Boolean),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Some(AttributeKind::Integer),
        DataType::Float16
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal32(_, _)
        | DataType::Decimal64(_, _)
        | DataType::Decimal128(_, _)
        | DataType::Decimal256(_, _) => Some(AttributeKind::Float),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            Some(AttributeKind::Timestamp)
        }
        _ => None,
    }
}

fn is_string(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn is_string_dictionary(item: &Field) -> bool {
    matches!(item.data_type(), DataType::Dictionary(_, v) if is_string(v))
}

/// Casts that fail on overflow instead of turning the value into a null.
fn strict_cast(column: &str, array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(array, to, &options)
        .map_err(|e| EngineError::Import(format!("column '{column}' cannot be read as {to}: {e}")))
}

/// Applies one batch to `state`, returning what it did and the users it touched.
///
/// # Errors
/// A missing or null id, an unsupported column, a kind that conflicts with the dataset's, or a
/// value no attribute can hold; the error names the column (and row where there is one).
pub fn apply_batch(
    state: &mut DatasetState,
    input: &ImportBatch,
) -> Result<(ChangeOutcome, Bitmap)> {
    let batch = &input.batch;
    let id_index = batch.schema().index_of(&input.id_column).map_err(|_| {
        EngineError::Import(format!("the batch has no id column '{}'", input.id_column))
    })?;
    let columns = plan_columns(state, batch, id_index)?;
    let (ids, outcome) = assign_ids(state, batch.column(id_index), &input.id_column)?;
    for (name, kind, array) in columns {
        load_column(state, &name, kind, &array, &ids)?;
    }
    let touched = Bitmap::from_iter(ids.iter().copied());
    Ok((outcome, touched))
}

/// Checks every column's type against the dataset before anything is written.
fn plan_columns(
    state: &DatasetState,
    batch: &RecordBatch,
    id_index: usize,
) -> Result<Vec<(String, AttributeKind, ArrayRef)>> {
    let schema = batch.schema();
    let mut columns = Vec::new();
    for (index, field) in schema.fields().iter().enumerate() {
        if index == id_index {
            continue;
        }
        let name = field.name();
        let kind = kind_of(field.data_type()).ok_or_else(|| EngineError::UnsupportedColumn {
            column: name.clone(),
            data_type: field.data_type().to_string(),
        })?;
        super::state::validate_attribute_name(name)?;
        if let Some(existing) = state.attributes.get(name) {
            let compatible = existing.kind() == kind
                || (existing.kind() == AttributeKind::Float && kind == AttributeKind::Integer);
            if !compatible {
                return Err(EngineError::KindConflict {
                    attribute: name.clone(),
                    existing: existing.kind().name(),
                    requested: kind.name(),
                });
            }
        }
        let kind = state.attributes.get(name).map_or(kind, |a| a.kind());
        columns.push((name.clone(), kind, batch.column(index).clone()));
    }
    Ok(columns)
}

/// The dense id of every row, creating unknown users.
fn assign_ids(
    state: &mut DatasetState,
    column: &ArrayRef,
    name: &str,
) -> Result<(Vec<DenseId>, ChangeOutcome)> {
    let strings = match column.data_type() {
        data_type if kind_of(data_type) == Some(AttributeKind::Categorical) => {
            strict_cast(name, column, &DataType::Utf8)?
        }
        data_type if kind_of(data_type) == Some(AttributeKind::Integer) => {
            strict_cast(name, column, &DataType::Utf8)?
        }
        other => {
            return Err(EngineError::Import(format!(
                "id column '{name}' has type {other}; use strings or integers"
            )))
        }
    };
    let strings = strings.as_string::<i32>();
    let mut ids = Vec::with_capacity(strings.len());
    let mut outcome = ChangeOutcome::default();
    for row in 0..strings.len() {
        if strings.is_null(row) {
            return Err(EngineError::Import(format!(
                "row {row}: id column '{name}' is null"
            )));
        }
        let (id, created) = state
            .user_mut(strings.value(row))
            .map_err(|e| EngineError::Import(format!("row {row}: {e}")))?;
        if created {
            outcome.created += 1;
        } else {
            outcome.updated += 1;
        }
        ids.push(id);
    }
    Ok((ids, outcome))
}

fn load_column(
    state: &mut DatasetState,
    name: &str,
    kind: AttributeKind,
    array: &ArrayRef,
    ids: &[DenseId],
) -> Result<()> {
    let attribute = state.attribute_mut(name, kind)?;
    match attribute {
        Attribute::Categorical(a) => {
            let codes = categorical_codes(name, array, &mut a.dictionary)?;
            for (&id, code) in ids.iter().zip(codes) {
                match code {
                    Some(code) => a.set_code(id, code),
                    None => a.clear(id),
                }
            }
        }
        Attribute::Set(a) => {
            let lists = strict_cast(
                name,
                array,
                &DataType::List(std::sync::Arc::new(Field::new_list_field(
                    DataType::Utf8,
                    true,
                ))),
            )?;
            let lists = lists.as_list::<i32>();
            for (row, &id) in ids.iter().enumerate() {
                if lists.is_null(row) {
                    a.clear(id);
                    continue;
                }
                let members = lists.value(row);
                let members = members.as_string::<i32>();
                a.set(id, members.iter().flatten());
            }
        }
        Attribute::Boolean(a) => {
            let values = array
                .as_boolean_opt()
                .ok_or_else(|| EngineError::Import(format!("column '{name}' is not boolean")))?;
            for (row, &id) in ids.iter().enumerate() {
                match values.is_valid(row) {
                    true => a.set(id, values.value(row)),
                    false => a.clear(id),
                }
            }
        }
        Attribute::Integer(a) => {
            let values = strict_cast(name, array, &DataType::Int64)?;
            let values = values.as_primitive::<Int64Type>();
            for (row, &id) in ids.iter().enumerate() {
                match values.is_valid(row) {
                    true => a.set(id, values.value(row)),
                    false => a.clear(id),
                }
            }
        }
        Attribute::Float(a) => {
            let values = strict_cast(name, array, &DataType::Float64)?;
            let values = values.as_primitive::<Float64Type>();
            for (row, &id) in ids.iter().enumerate() {
                if values.is_null(row) {
                    a.clear(id);
                    continue;
                }
                let value = checked_float(name, values.value(row))
                    .map_err(|e| EngineError::Import(format!("row {row}: {e}")))?;
                a.set(id, value);
            }
        }
        Attribute::Timestamp(a) => {
            let values = match array.data_type() {
                DataType::Int64 | DataType::Int32 => strict_cast(name, array, &DataType::Int64)?,
                _ => strict_cast(
                    name,
                    array,
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )?,
            };
            let millis: Vec<Option<i64>> = match values.data_type() {
                DataType::Int64 => values.as_primitive::<Int64Type>().iter().collect(),
                _ => values
                    .as_primitive::<TimestampMillisecondType>()
                    .iter()
                    .collect(),
            };
            for (&id, value) in ids.iter().zip(millis) {
                match value {
                    Some(ms) => a.set(id, ms),
                    None => a.clear(id),
                }
            }
        }
    }
    Ok(())
}

/// The value code of every row of a string or dictionary column (`None` for null), interning
/// each distinct value once.
fn categorical_codes(
    name: &str,
    array: &ArrayRef,
    dictionary: &mut crate::index::dictionary::ValueDictionary,
) -> Result<Vec<Option<ValueCode>>> {
    if let Some(dict) = array.as_any_dictionary_opt() {
        let values = strict_cast(name, dict.values(), &DataType::Utf8)?;
        let strings: &StringArray = values.as_string::<i32>();
        let value_codes: Vec<Option<ValueCode>> = strings
            .iter()
            .map(|v| v.map(|v| dictionary.intern(v)))
            .collect();
        let keys = dict.normalized_keys();
        let nulls = array.logical_nulls();
        let codes = keys
            .iter()
            .enumerate()
            .map(|(row, &key)| {
                let valid = nulls.as_ref().is_none_or(|n| n.is_valid(row));
                if valid {
                    value_codes.get(key).copied().flatten()
                } else {
                    None
                }
            })
            .collect();
        return Ok(codes);
    }
    let values = strict_cast(name, array, &DataType::Utf8)?;
    let strings: &StringArray = values.as_string::<i32>();
    let mut seen: HashMap<&str, ValueCode> = HashMap::new();
    let codes = strings
        .iter()
        .map(|v| v.map(|v| *seen.entry(v).or_insert_with(|| dictionary.intern(v))))
        .collect();
    Ok(codes)
}

/// A source of record batches: a Parquet file or an Arrow IPC file or stream.
pub struct BatchSource {
    /// The batches, read lazily.
    pub batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send>,
    /// Rows in the whole source when the format says (Parquet), else `None`.
    pub total_rows: Option<u64>,
}

/// Opens `path` by its extension: `.parquet`, or `.arrow`/`.arrows`/`.ipc` (file or stream).
///
/// # Errors
/// An unreadable file or an unknown extension.
pub fn open_file(path: &Path, batch_rows: usize) -> Result<BatchSource> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let file = File::open(path).map_err(EngineError::ImportIo)?;
    match extension.as_str() {
        "parquet" | "pq" => {
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
            let total_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).ok();
            let reader = builder.with_batch_size(batch_rows).build()?;
            Ok(BatchSource {
                batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
                total_rows,
            })
        }
        "arrow" | "arrows" | "ipc" | "feather" => open_ipc(file),
        other => Err(EngineError::Import(format!(
            "cannot tell the format of '{}' from its extension '{other}': use .parquet or .arrow",
            path.display()
        ))),
    }
}

/// An Arrow IPC file (with footer) or stream.
fn open_ipc(mut file: File) -> Result<BatchSource> {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 6];
    let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
    file.seek(SeekFrom::Start(0))
        .map_err(EngineError::ImportIo)?;
    if is_file_format {
        let reader = arrow_ipc::reader::FileReader::try_new(file, None)?;
        let total_rows = None;
        Ok(BatchSource {
            batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
            total_rows,
        })
    } else {
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)?;
        Ok(BatchSource {
            batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
            total_rows: None,
        })
    }
}
