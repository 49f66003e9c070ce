//! Log records: every applied write as bytes, and back, so that replaying the records on the
//! version they were applied to gives the same version again.
//!
//! A record is one byte of format version followed by a [postcard] encoding of [`LogRecord`]
//! (record batches inside it as Arrow IPC streams). It carries the time the write used, so that
//! `NOW`, segment maintenance and time refreshes replay to the same state at any later time.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use arrow_array::RecordBatch;
use serde::{Deserialize, Serialize};

use super::change::{Change, ImportBatch};
use super::error::{EngineError, Result};
use crate::time::Millis;

/// The format version written first in every record.
const VERSION: u8 = 1;

/// One write to one dataset, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub dataset: String,
    /// The clock reading the write was applied at.
    pub now: Millis,
    pub body: RecordBody,
}

/// What the write was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RecordBody {
    /// One change, applied whole.
    Change(Change),
    /// A multi-batch import, applied whole: its batches in the order they arrived.
    Import(Vec<ImportPart>),
    /// User writes (upserts, deletes, events) applied together as one version
    /// ([`super::state::DatasetState::apply_user_writes`]).
    Changes(Vec<Change>),
}

impl RecordBody {
    /// Whether the write deleted users (alone or among coalesced writes): the erasure clock
    /// starts at the oldest such record not yet in a snapshot.
    pub fn deletes_users(&self) -> bool {
        match self {
            RecordBody::Change(change) => matches!(change, Change::DeleteUsers(_)),
            RecordBody::Changes(changes) => {
                changes.iter().any(|c| matches!(c, Change::DeleteUsers(_)))
            }
            RecordBody::Import(_) => false,
        }
    }
}

/// One batch of an import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ImportPart {
    /// Rows of a users table.
    Users(ImportBatch),
    /// Rows of an events table.
    Events(#[serde(with = "super::ipc")] RecordBatch),
}

/// The bytes of a record.
///
/// # Errors
/// A batch Arrow cannot write.
pub fn encode(record: &LogRecord) -> Result<Vec<u8>> {
    let mut bytes = vec![VERSION];
    postcard::to_io(record, &mut bytes)
        .map_err(|e| EngineError::Internal(format!("cannot encode a log record: {e}")))?;
    Ok(bytes)
}

/// A record from its bytes.
///
/// # Errors
/// An unknown version or bytes that do not decode.
pub fn decode(bytes: &[u8]) -> std::result::Result<LogRecord, String> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| format!("the record does not decode: {e}"))
        }
        Some((version, _)) => Err(format!("record format {version} is not supported")),
        None => Err("the record is empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, StringArray};

    use super::*;
    use crate::engine::change::{AttributeChange, AttributeValue, ChangeOp, UserUpdate};

    #[test]
    fn changes_and_imports_round_trip() {
        let upsert = LogRecord {
            dataset: "ads".into(),
            now: 1_700_000_000_000,
            body: RecordBody::Change(Change::UpsertUsers(vec![UserUpdate {
                user_id: "u1".into(),
                changes: vec![AttributeChange {
                    attribute: "age".into(),
                    op: ChangeOp::Set(AttributeValue::Int(42)),
                }],
            }])),
        };
        let decoded = decode(&encode(&upsert).unwrap()).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{upsert:?}"));

        let batch = RecordBatch::try_from_iter([
            (
                "user_id",
                Arc::new(StringArray::from(vec![Some("a"), None])) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ])
        .unwrap();
        let import = LogRecord {
            dataset: "default".into(),
            now: 5,
            body: RecordBody::Import(vec![
                ImportPart::Users(ImportBatch {
                    batch: batch.clone(),
                    id_column: "user_id".into(),
                }),
                ImportPart::Events(batch.clone()),
            ]),
        };
        let RecordBody::Import(parts) = decode(&encode(&import).unwrap()).unwrap().body else {
            panic!("not an import");
        };
        match (&parts[0], &parts[1]) {
            (ImportPart::Users(users), ImportPart::Events(events)) => {
                assert_eq!(users.batch, batch);
                assert_eq!(users.id_column, "user_id");
                assert_eq!(*events, batch);
            }
            other => panic!("unexpected parts {other:?}"),
        }
        assert!(decode(&[9, 1, 2]).unwrap_err().contains("format 9"));
        assert!(decode(&[VERSION, 0xff, 0xff]).is_err());
    }
}
