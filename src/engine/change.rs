//! Writes as records: every change to a dataset is one value of [`Change`], applied whole or not
//! at all, so that the write path can be logged and replayed as it is.

use std::collections::BTreeMap;

use arrow_array::RecordBatch;

use super::error::{EngineError, Result};
use crate::expr::Expr;
use crate::index::AttributeKind;
use crate::time::Millis;

/// One atomic write to one dataset.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Change {
    /// Partial updates of users, created when unknown.
    UpsertUsers(Vec<UserUpdate>),
    /// Complete removal of users; unknown ids are counted, not errors.
    DeleteUsers(Vec<String>),
    /// Rows of a users table by the import convention.
    ImportUsers(ImportBatch),
    /// Attribute kinds fixed before data arrives.
    DeclareAttributes(Vec<(String, AttributeKind)>),
    /// Create a saved segment; its id must be new.
    CreateSegment(SegmentDefinition),
    /// Replace a saved segment's definition; it must exist (its creation time is kept).
    UpdateSegment(SegmentDefinition),
    /// Remove a saved segment.
    DeleteSegment(String),
    /// Behaviour events; unknown users are created.
    RecordEvents(Vec<EventRecord>),
    /// Time has passed: drop events beyond retention and re-evaluate segments whose windows
    /// moved, for the users whose membership can have changed.
    AdvanceTime,
    /// Keep events for this many days.
    SetRetention { days: u32 },
    /// Change the fields of a saved segment given here and keep the others. Merged with the
    /// version it applies to under the dataset's writer lock, so that concurrent updates do
    /// not lose each other's labels; logged as the [`Change::UpdateSegment`] it resolves to.
    #[serde(skip)]
    PatchSegment(SegmentPatch),
}

/// The fields of an update of a saved segment; `None` keeps the current value.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentPatch {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Added to the current labels (replacing values of the same keys), or replacing them all.
    pub labels: BTreeMap<String, String>,
    pub replace_labels: bool,
    pub expression: Option<Expr>,
    pub updated_at: Millis,
}

/// One behaviour event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EventRecord {
    pub user_id: String,
    pub event: String,
    pub ts: Millis,
    /// Accepted and checked (finite), not yet indexed: no predicate reads it.
    pub value: Option<f64>,
}

/// A record batch of a users table and the name of its id column.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImportBatch {
    /// Logged as an Arrow IPC stream.
    #[serde(with = "super::ipc")]
    pub batch: RecordBatch,
    pub id_column: String,
}

/// Changes to one user.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserUpdate {
    pub user_id: String,
    pub changes: Vec<AttributeChange>,
}

/// One change to one attribute of one user.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttributeChange {
    pub attribute: String,
    pub op: ChangeOp,
}

/// What happens to the attribute.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ChangeOp {
    /// Replace the value (a set attribute: all its members).
    Set(AttributeValue),
    /// Make it null.
    Clear,
    /// Add members to a set attribute.
    Add(Vec<String>),
    /// Remove members from a set attribute.
    Remove(Vec<String>),
}

/// A value written to an attribute; its variant picks the kind of a new attribute.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AttributeValue {
    String(String),
    Set(Vec<String>),
    Bool(bool),
    Int(i64),
    Float(f64),
    Timestamp(Millis),
}

impl AttributeValue {
    /// The kind an attribute first written with this value gets.
    pub fn natural_kind(&self) -> AttributeKind {
        match self {
            AttributeValue::String(_) => AttributeKind::Categorical,
            AttributeValue::Set(_) => AttributeKind::Set,
            AttributeValue::Bool(_) => AttributeKind::Boolean,
            AttributeValue::Int(_) => AttributeKind::Integer,
            AttributeValue::Float(_) => AttributeKind::Float,
            AttributeValue::Timestamp(_) => AttributeKind::Timestamp,
        }
    }
}

/// A saved segment's definition (its membership is derived).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegmentDefinition {
    pub id: String,
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub expression: Expr,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeOutcome {
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    pub not_found: u64,
    /// Events stored.
    pub events: u64,
    /// Events older than the retention, dropped.
    pub expired: u64,
}

impl std::ops::AddAssign for ChangeOutcome {
    fn add_assign(&mut self, other: Self) {
        self.created += other.created;
        self.updated += other.updated;
        self.deleted += other.deleted;
        self.not_found += other.not_found;
        self.events += other.events;
        self.expired += other.expired;
    }
}

/// A float fit for a column: finite, with -0.0 folded into 0.0 so equality is plain.
///
/// # Errors
/// NaN and infinities, which no range could select consistently.
pub fn checked_float(name: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value + 0.0)
    } else {
        Err(EngineError::kind_mismatch(
            name,
            AttributeKind::Float,
            format!("{value} is not a finite number"),
        ))
    }
}

/// An integer as a float, refused unless the float holds it exactly (beyond 2^53 most do not,
/// and a silently rounded amount is a wrong answer later).
pub(super) fn exact_float(name: &str, value: i64) -> Result<f64> {
    let float = value as f64;
    // Compared in i128: `2^63 as i64` would saturate back to `i64::MAX` and look exact.
    if float as i128 == i128::from(value) {
        return Ok(float);
    }
    Err(EngineError::kind_mismatch(
        name,
        AttributeKind::Float,
        format!("{value} has no exact float value (integers beyond 2^53 may not)"),
    ))
}
