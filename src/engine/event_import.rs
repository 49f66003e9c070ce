//! Arrow record batches of an events table in: `user_id`, `event`, `ts` and an optional
//! numeric `value` (checked, not stored: no predicate reads it yet).
//!
//! Ids and names usually arrive dictionary-encoded, so each distinct value is resolved once per
//! batch, not once per row. Events are staged, grouped by name and day, and merged into the
//! index once at the end of the import, so that a day's bucket is rebuilt once, not per batch.

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMillisecondType;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, TimeUnit};

use super::change::ChangeOutcome;
use super::error::{EngineError, Result};
use super::events::{validate_event_name, validate_event_time};
use super::import::strict_cast;
use super::state::DatasetState;
use crate::index::events::{day_of, pack, EventBatch, PackedEvent};
use crate::index::keys::DenseId;
use crate::index::Bitmap;
use crate::time::Millis;

/// The columns of an events table.
pub const USER_COLUMN: &str = "user_id";
pub const EVENT_COLUMN: &str = "event";
pub const TS_COLUMN: &str = "ts";
pub const VALUE_COLUMN: &str = "value";

/// Events read but not yet in the index.
#[derive(Debug, Default)]
pub struct StagedEvents {
    pub batch: EventBatch,
    /// Users with a staged event.
    pub touched: Bitmap,
}

/// An error at one row of the batch being read; [`stage_batch`] makes the row absolute.
fn at_row(row: usize, message: String) -> EngineError {
    EngineError::ImportRow {
        row: row as u64,
        message,
    }
}

/// Reads one batch into `staged`, creating unknown users in `state`; events before `cutoff`
/// are counted as expired and dropped.
///
/// # Errors
/// A missing, null or mistyped column, an extra column, or an invalid id or name, naming the
/// column and row.
pub fn stage_batch(
    state: &mut DatasetState,
    batch: &RecordBatch,
    (cutoff, now, first_row): (Millis, Millis, u64),
    staged: &mut StagedEvents,
) -> Result<ChangeOutcome> {
    stage_rows(state, batch, (cutoff, now), staged).map_err(|error| match error {
        EngineError::ImportRow { row, message } => EngineError::ImportRow {
            row: row + first_row,
            message,
        },
        other => other,
    })
}

fn stage_rows(
    state: &mut DatasetState,
    batch: &RecordBatch,
    (cutoff, now): (Millis, Millis),
    staged: &mut StagedEvents,
) -> Result<ChangeOutcome> {
    let schema = batch.schema();
    for field in schema.fields() {
        let name = field.name().as_str();
        if ![USER_COLUMN, EVENT_COLUMN, TS_COLUMN, VALUE_COLUMN].contains(&name) {
            return Err(EngineError::Import(format!(
                "column '{name}' is not part of an events table (user_id, event, ts, value)"
            )));
        }
    }
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| EngineError::Import(format!("the events table has no '{name}' column")))
    };
    let (users, mut outcome) = user_ids(state, column(USER_COLUMN)?)?;
    let (names, codes) = event_codes(column(EVENT_COLUMN)?)?;
    let times = timestamps(column(TS_COLUMN)?)?;
    if let Some(values) = batch.column_by_name(VALUE_COLUMN) {
        check_values(values)?;
    }
    let mut groups: Vec<HashMap<i64, Vec<PackedEvent>>> = vec![HashMap::new(); names.len()];
    if let Some(row) = (0..times.len()).find(|&r| validate_event_time(times.value(r), now).is_err())
    {
        let reason = validate_event_time(times.value(row), now)
            .err()
            .unwrap_or_default();
        return Err(at_row(row, format!("column '{TS_COLUMN}': {reason}")));
    }
    for row in 0..batch.num_rows() {
        let ts = times.value(row);
        // A user created by an expired event still exists, and can enter a NOT segment.
        staged.touched.insert(users[row]);
        if ts < cutoff {
            outcome.expired += 1;
            continue;
        }
        let (day, offset) = day_of(ts);
        let code = codes[row] as usize;
        groups[code]
            .entry(day)
            .or_default()
            .push(pack(users[row], offset));
        outcome.events += 1;
    }
    for (name, days) in names.into_iter().zip(groups) {
        let series = staged.batch.entry(name).or_default();
        for (day, events) in days {
            series.entry(day).or_default().extend(events);
        }
    }
    Ok(outcome)
}

/// The dense id of every row, creating unknown users; a dictionary value is resolved once.
fn user_ids(state: &mut DatasetState, column: &ArrayRef) -> Result<(Vec<DenseId>, ChangeOutcome)> {
    if column.null_count() > 0 {
        let row = (0..column.len()).find(|&r| column.is_null(r)).unwrap_or(0);
        return Err(at_row(row, format!("column '{USER_COLUMN}' is null")));
    }
    let mut outcome = ChangeOutcome::default();
    let mut created = Vec::new();
    let mut resolve = |key: &str, row: usize| -> Result<DenseId> {
        let (id, new) = state
            .keys
            .get_or_insert(key)
            .map_err(|e| at_row(row, e.to_string()))?;
        if new {
            outcome.created += 1;
            created.push(id);
        }
        Ok(id)
    };
    let ids = resolve_each(USER_COLUMN, column, &mut resolve)?;
    crate::index::attribute::update_set(&mut state.live, &created, &[]);
    Ok((ids, outcome))
}

/// `resolve(value, row)` of every row of a string column; for a dictionary-encoded column,
/// once per distinct value.
fn resolve_each<T: Copy>(
    name: &str,
    column: &ArrayRef,
    resolve: &mut impl FnMut(&str, usize) -> Result<T>,
) -> Result<Vec<T>> {
    let Some(dict) = column.as_any_dictionary_opt() else {
        let values = strings(name, column)?;
        return (0..values.len())
            .map(|row| resolve(values.value(row), row))
            .collect();
    };
    let values = strings(name, dict.values())?;
    let mut resolved: Vec<Option<T>> = vec![None; values.len()];
    let keys = dict.normalized_keys();
    let mut out = Vec::with_capacity(keys.len());
    for (row, &key) in keys.iter().enumerate() {
        let value = match resolved.get(key).copied().flatten() {
            Some(value) => value,
            None => {
                let value = resolve(values.value(key), row)?;
                if let Some(slot) = resolved.get_mut(key) {
                    *slot = Some(value);
                }
                value
            }
        };
        out.push(value);
    }
    Ok(out)
}

/// A string (or integer) column as strings.
fn strings(name: &str, array: &ArrayRef) -> Result<StringArray> {
    let is_text_or_int = matches!(
        array.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) || array.data_type().is_integer();
    if !is_text_or_int {
        return Err(EngineError::Import(format!(
            "column '{name}' has type {}; use strings",
            array.data_type()
        )));
    }
    let cast = strict_cast(name, array, &DataType::Utf8)?;
    Ok(cast.as_string::<i32>().clone())
}

/// Distinct event names and each row's index into them.
fn event_codes(column: &ArrayRef) -> Result<(Vec<String>, Vec<u32>)> {
    let null_row = (0..column.len()).find(|&r| column.is_null(r));
    if let Some(row) = null_row {
        return Err(at_row(row, format!("column '{EVENT_COLUMN}' is null")));
    }
    let mut names = Vec::new();
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut code_of = |name: &str, row: usize| -> Result<u32> {
        if let Some(&code) = index.get(name) {
            return Ok(code);
        }
        validate_event_name(name).map_err(|reason| at_row(row, reason))?;
        let code = names.len() as u32;
        names.push(name.to_owned());
        index.insert(name.to_owned(), code);
        Ok(code)
    };
    let codes = resolve_each(EVENT_COLUMN, column, &mut code_of)?;
    Ok((names, codes))
}

/// The `ts` column in epoch milliseconds: a timestamp of any unit, a date, or integers taken
/// as milliseconds.
fn timestamps(column: &ArrayRef) -> Result<arrow_array::TimestampMillisecondArray> {
    if let Some(row) = (0..column.len()).find(|&r| column.is_null(r)) {
        return Err(at_row(row, format!("column '{TS_COLUMN}' is null")));
    }
    let usable = matches!(
        column.data_type(),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64
    ) || column.data_type().is_integer();
    if !usable {
        return Err(EngineError::Import(format!(
            "column '{TS_COLUMN}' has type {}; use a timestamp, a date or epoch milliseconds",
            column.data_type()
        )));
    }
    let plain = match column.data_type() {
        // Integers are milliseconds; go through Int64 so that the cast keeps the number.
        t if t.is_integer() => strict_cast(TS_COLUMN, column, &DataType::Int64)?,
        _ => column.clone(),
    };
    let cast = strict_cast(
        TS_COLUMN,
        &plain,
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?;
    Ok(cast.as_primitive::<TimestampMillisecondType>().clone())
}

/// The optional `value` column must be numeric and finite where present.
fn check_values(column: &ArrayRef) -> Result<()> {
    let numeric = column.data_type().is_numeric();
    if !numeric {
        return Err(EngineError::Import(format!(
            "column '{VALUE_COLUMN}' has type {}; use numbers",
            column.data_type()
        )));
    }
    let floats = strict_cast(VALUE_COLUMN, column, &DataType::Float64)?;
    let floats = floats.as_primitive::<arrow_array::types::Float64Type>();
    if let Some(row) =
        (0..floats.len()).find(|&r| floats.is_valid(r) && !floats.value(r).is_finite())
    {
        return Err(at_row(
            row,
            format!("column '{VALUE_COLUMN}' is not a finite number"),
        ));
    }
    Ok(())
}
