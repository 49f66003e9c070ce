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

use super::change::{checked_float, exact_float};
use super::change::{ChangeOutcome, ImportBatch};
use super::error::{EngineError, Result};
use super::state::DatasetState;
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

/// How much larger than the buffers it arrived in a view column may grow when cast to plain
/// offsets (views may share bytes: repeated long strings legitimately expand), and the growth
/// always allowed.
const VIEW_EXPANSION: u64 = 8;
const VIEW_EXPANSION_FREE: u64 = 64 << 20;

/// Refuses a view column (`Utf8View`, `ListView`) whose cast would materialize far more than
/// was received: the cast reserves what the views declare, and overlapping views of a few MiB
/// can declare terabytes.
fn check_view_expansion(column: &str, array: &dyn Array) -> Result<()> {
    let (declared, received) = match array.data_type() {
        DataType::Utf8View => {
            let views = array.as_string_view();
            let declared: u64 = views.views().iter().map(|&v| u64::from(v as u32)).sum();
            let received = views.data_buffers().iter().map(|b| b.len() as u64).sum();
            (declared, received)
        }
        DataType::ListView(_) => {
            let lists = array.as_list_view::<i32>();
            check_view_expansion(column, lists.values().as_ref())?;
            let declared: u64 = lists.sizes().iter().map(|&n| n.max(0) as u64).sum();
            let width = lists.values().get_buffer_memory_size() as u64;
            let items = (lists.values().len() as u64).max(1);
            // In bytes of the child values, so that one budget covers both kinds.
            (declared.saturating_mul(width.div_ceil(items)), width)
        }
        DataType::Dictionary(_, _) => match array.as_any_dictionary_opt() {
            Some(dictionary) => return check_view_expansion(column, dictionary.values().as_ref()),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    let allowed = received
        .saturating_mul(VIEW_EXPANSION)
        .saturating_add(VIEW_EXPANSION_FREE);
    if declared > allowed {
        return Err(EngineError::Import(format!(
            "column '{column}': its views declare {declared} bytes from {received} bytes \
             received; more than {VIEW_EXPANSION}× plus {} MiB is refused",
            VIEW_EXPANSION_FREE >> 20
        )));
    }
    Ok(())
}

/// Casts that fail on overflow instead of turning the value into a null.
pub(super) fn strict_cast(column: &str, array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    check_view_expansion(column, array.as_ref())?;
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
    let (rows, touched) = last_rows(&ids);
    for (name, kind, array) in columns {
        load_column(state, &name, kind, &array, &rows)?;
    }
    Ok((outcome, touched))
}

/// `(row, id)` of the last row of each id (a later row of the same user replaces every column
/// of an earlier one), in row order, and the set of ids.
fn last_rows(ids: &[DenseId]) -> (Vec<(usize, DenseId)>, Bitmap) {
    let mut seen = Bitmap::new();
    let mut rows: Vec<(usize, DenseId)> = ids
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, &id)| seen.insert(id))
        .map(|(row, &id)| (row, id))
        .collect();
    rows.reverse();
    (rows, seen)
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
            // Integers widen into floats, and are epoch milliseconds in a timestamp.
            let compatible = existing.kind() == kind
                || (kind == AttributeKind::Integer
                    && matches!(
                        existing.kind(),
                        AttributeKind::Float | AttributeKind::Timestamp
                    ));
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
    let kind = kind_of(column.data_type());
    if !matches!(
        kind,
        Some(AttributeKind::Categorical | AttributeKind::Integer)
    ) {
        return Err(EngineError::Import(format!(
            "id column '{name}' has type {}; use strings or integers",
            column.data_type()
        )));
    }
    let strings = strict_cast(name, column, &DataType::Utf8)?;
    let strings = strings.as_string::<i32>();
    let mut ids = Vec::with_capacity(strings.len());
    let mut outcome = ChangeOutcome::default();
    let mut created = Vec::new();
    for row in 0..strings.len() {
        if strings.is_null(row) {
            return Err(EngineError::Import(format!(
                "row {row}: id column '{name}' is null"
            )));
        }
        let (id, new) = state
            .keys
            .get_or_insert(strings.value(row))
            .map_err(|e| EngineError::Import(format!("row {row}: {e}")))?;
        if new {
            outcome.created += 1;
            created.push(id);
        } else {
            outcome.updated += 1;
        }
        ids.push(id);
    }
    crate::index::attribute::update_set(&mut state.live, &created, &[]);
    Ok((ids, outcome))
}

/// Writes one column for the given `(row, id)` pairs (nulls clear).
fn load_column(
    state: &mut DatasetState,
    name: &str,
    kind: AttributeKind,
    array: &ArrayRef,
    rows: &[(usize, DenseId)],
) -> Result<()> {
    let attribute = state.attribute_mut(name, kind)?;
    match attribute {
        Attribute::Categorical(a) => {
            let codes = categorical_codes(name, array, &mut a.dictionary)?;
            let rows: Vec<_> = rows.iter().map(|&(row, id)| (id, codes[row])).collect();
            a.set_codes(&rows);
        }
        Attribute::Set(a) => {
            let item = Field::new_list_field(DataType::Utf8, true);
            let lists = strict_cast(name, array, &DataType::List(std::sync::Arc::new(item)))?;
            let lists = lists.as_list::<i32>();
            let values = lists.values().as_string::<i32>();
            let offsets = lists.value_offsets();
            let rows: Vec<(DenseId, Vec<&str>)> = rows
                .iter()
                .map(|&(row, id)| {
                    let members = if lists.is_null(row) {
                        Vec::new()
                    } else {
                        (offsets[row] as usize..offsets[row + 1] as usize)
                            .filter(|&i| values.is_valid(i))
                            .map(|i| values.value(i))
                            .collect()
                    };
                    (id, members)
                })
                .collect();
            a.set_many(&rows);
        }
        Attribute::Boolean(a) => {
            let values = array
                .as_boolean_opt()
                .ok_or_else(|| EngineError::Import(format!("column '{name}' is not boolean")))?;
            let rows: Vec<_> = rows
                .iter()
                .map(|&(row, id)| (id, values.is_valid(row).then(|| values.value(row))))
                .collect();
            a.set_many(&rows);
        }
        Attribute::Integer(a) => {
            let values = strict_cast(name, array, &DataType::Int64)?;
            let values = values.as_primitive::<Int64Type>();
            let rows: Vec<_> = rows
                .iter()
                .map(|&(row, id)| (id, values.is_valid(row).then(|| values.value(row))))
                .collect();
            a.set_many(&rows);
        }
        Attribute::Float(a) => {
            // Integers widen into a float column only where the float holds them exactly.
            let from_integers = kind_of(array.data_type()) == Some(AttributeKind::Integer);
            let to = if from_integers {
                DataType::Int64
            } else {
                DataType::Float64
            };
            let values = strict_cast(name, array, &to)?;
            let (ints, floats) = (
                values.as_primitive_opt::<Int64Type>(),
                values.as_primitive_opt::<Float64Type>(),
            );
            let value = |row: usize| match (ints, floats) {
                (Some(ints), _) => exact_float(name, ints.value(row)),
                (_, Some(floats)) => checked_float(name, floats.value(row)),
                _ => Err(EngineError::Internal(format!(
                    "column '{name}' was cast to {to}"
                ))),
            };
            let rows = rows
                .iter()
                .map(|&(row, id)| match values.is_valid(row) {
                    true => value(row)
                        .map(|v| (id, Some(v)))
                        .map_err(|e| EngineError::Import(format!("row {row}: {e}"))),
                    false => Ok((id, None)),
                })
                .collect::<Result<Vec<_>>>()?;
            a.set_many(&rows);
        }
        Attribute::Timestamp(a) => {
            let values = match array.data_type() {
                data_type if kind_of(data_type) == Some(AttributeKind::Integer) => {
                    strict_cast(name, array, &DataType::Int64)?
                }
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
            let rows: Vec<_> = rows.iter().map(|&(row, id)| (id, millis[row])).collect();
            a.set_many(&rows);
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
    /// Rows in the whole source when the format says (Parquet), else `None`: for progress only,
    /// as a footer can claim any count.
    pub total_rows: Option<u64>,
    /// Users it is safe to make room for before reading: the claimed rows, at most one per byte
    /// of the file (a hash table sized by a forged footer would be the largest allocation of
    /// the import, made before a single row is read).
    pub reservable_rows: u64,
}

/// Opens `path` by its extension: `.parquet`, or `.arrow`/`.arrows`/`.ipc` (file or stream).
///
/// # Errors
/// An unreadable file or an unknown extension.
pub fn open_file(path: &Path, batch_rows: usize) -> Result<BatchSource> {
    let file = File::open(path).map_err(EngineError::ImportIo)?;
    read_file(file, path, batch_rows)
}

/// Reads an open `file` by the extension of `path`, the name it was opened by, as
/// [`open_file`] does.
///
/// # Errors
/// An unknown extension, or a file that is not of its format.
pub fn read_file(file: File, path: &Path, batch_rows: usize) -> Result<BatchSource> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match extension.as_str() {
        "parquet" | "pq" => {
            let bytes = file.metadata().map_err(EngineError::ImportIo)?.len();
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
            let total_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).ok();
            let reader = builder.with_batch_size(batch_rows).build()?;
            Ok(BatchSource {
                batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
                total_rows,
                reservable_rows: total_rows.unwrap_or(0).min(bytes),
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
        Ok(BatchSource {
            batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
            total_rows: None,
            reservable_rows: 0,
        })
    } else {
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)?;
        Ok(BatchSource {
            batches: Box::new(reader.map(|b| b.map_err(EngineError::from))),
            total_rows: None,
            reservable_rows: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::StringViewBuilder;
    use arrow_array::ListViewArray;
    use arrow_buffer::{Buffer, ScalarBuffer};
    use arrow_schema::Field;

    use super::*;

    /// `rows` views of the same `len` bytes of one block.
    fn overlapping_views(rows: usize, len: usize) -> ArrayRef {
        let mut builder = StringViewBuilder::new();
        let block = builder.append_block(Buffer::from(vec![b'x'; len]));
        for _ in 0..rows {
            builder
                .try_append_view(block, 0, len as u32)
                .expect("a view of the block");
        }
        Arc::new(builder.finish())
    }

    #[test]
    fn overlapping_string_views_are_refused_before_the_cast_reserves_them() {
        // 1 MiB received, 4 GiB declared.
        let array = overlapping_views(4_096, 1 << 20);
        let error = strict_cast("city", &array, &DataType::Utf8).unwrap_err();
        assert!(
            error.to_string().contains("column 'city'") && error.to_string().contains("declare"),
            "{error}"
        );
        // Repeated long strings that expand within the budget still import.
        let modest = overlapping_views(64, 1 << 16);
        let cast = strict_cast("city", &modest, &DataType::Utf8).expect("within the budget");
        assert_eq!(cast.as_string::<i32>().value(63).len(), 1 << 16);
    }

    #[test]
    fn a_parquet_footer_sizes_no_reservation_beyond_the_file() {
        // 200,000 rows of one repeated id encode in a few KiB: the claimed count is real, but
        // only as many users as bytes are made room for.
        let path =
            std::env::temp_dir().join(format!("audience-reserve-{}.parquet", std::process::id()));
        let ids: ArrayRef = Arc::new(StringArray::from(vec!["same-user"; 200_000]));
        let batch = RecordBatch::try_from_iter([("user_id", ids)]).expect("batch");
        let file = File::create(&path).expect("create");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let bytes = std::fs::metadata(&path).expect("metadata").len();
        let source = open_file(&path, 8_192).expect("open");
        let _ = std::fs::remove_file(&path);
        assert_eq!(source.total_rows, Some(200_000));
        assert!(bytes < 200_000, "{bytes} bytes");
        assert_eq!(source.reservable_rows, bytes);
    }

    #[test]
    fn integers_widen_into_a_float_column_only_when_exact() {
        let batch = |score: ArrayRef| {
            let ids: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
            ImportBatch {
                batch: RecordBatch::try_from_iter([("user_id", ids), ("score", score)])
                    .expect("batch"),
                id_column: "user_id".into(),
            }
        };
        let mut state = DatasetState::default();
        let floats: ArrayRef = Arc::new(arrow_array::Float64Array::from(vec![0.5, 1.5]));
        apply_batch(&mut state, &batch(floats)).expect("floats");
        let exact: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1 << 60, -7]));
        apply_batch(&mut state, &batch(exact)).expect("exact integers widen");
        let inexact: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![5, (1 << 53) + 1]));
        let error = apply_batch(&mut state, &batch(inexact))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("row 1") && error.contains("9007199254740993"),
            "{error}"
        );
    }

    #[test]
    fn overlapping_list_views_are_refused() {
        let values: ArrayRef = Arc::new(StringArray::from(vec!["sports"; 1_000]));
        let rows = 200_000;
        let field = Arc::new(Field::new_list_field(DataType::Utf8, true));
        let lists = ListViewArray::new(
            field.clone(),
            ScalarBuffer::from(vec![0i32; rows]),
            ScalarBuffer::from(vec![1_000i32; rows]),
            values.clone(),
            None,
        );
        let array: ArrayRef = Arc::new(lists);
        let error = strict_cast("interests", &array, &DataType::List(field.clone())).unwrap_err();
        assert!(error.to_string().contains("column 'interests'"), "{error}");
        let small = ListViewArray::new(
            field.clone(),
            ScalarBuffer::from(vec![0i32, 500]),
            ScalarBuffer::from(vec![500i32, 500]),
            values,
            None,
        );
        let small: ArrayRef = Arc::new(small);
        let cast = strict_cast("interests", &small, &DataType::List(field)).expect("no expansion");
        assert_eq!(cast.as_list::<i32>().value(1).len(), 500);
    }
}
