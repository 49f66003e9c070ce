//! Distinct string values of one attribute ↔ small integer codes.

use std::collections::HashMap;
use std::sync::Arc;

/// A value's code within its attribute; also the index of its bitmap.
pub type ValueCode = u32;

/// The distinct values of one categorical or set attribute, in first-seen order.
///
/// Codes are never reused, so a code held by an older snapshot keeps its meaning. The tables
/// are shared between versions: a write that assigns no new code (nearly every write: a user
/// moves to a city that exists) copies nothing, where a clone would copy every value.
#[derive(Debug, Clone, Default)]
pub struct ValueDictionary {
    tables: Arc<Tables>,
}

#[derive(Debug, Clone, Default)]
struct Tables {
    /// code → value.
    values: Vec<Box<str>>,
    /// value → code.
    codes: HashMap<Box<str>, ValueCode>,
}

impl ValueDictionary {
    /// The code of a known value.
    pub fn code(&self, value: &str) -> Option<ValueCode> {
        self.tables.codes.get(value).copied()
    }

    /// The code of `value`, assigning the next one when new.
    pub fn intern(&mut self, value: &str) -> ValueCode {
        if let Some(code) = self.code(value) {
            return code;
        }
        let tables = Arc::make_mut(&mut self.tables);
        let code = tables.values.len() as ValueCode;
        tables.values.push(value.into());
        tables.codes.insert(value.into(), code);
        code
    }

    /// The value of a code.
    pub fn value(&self, code: ValueCode) -> Option<&str> {
        self.tables.values.get(code as usize).map(|v| &**v)
    }

    /// Every `(code, value)`, in code order.
    pub fn iter(&self) -> impl Iterator<Item = (ValueCode, &str)> {
        self.tables
            .values
            .iter()
            .enumerate()
            .map(|(code, value)| (code as ValueCode, &**value))
    }

    /// Number of codes assigned.
    pub fn len(&self) -> usize {
        self.tables.values.len()
    }

    /// True when no value was ever seen.
    pub fn is_empty(&self) -> bool {
        self.tables.values.is_empty()
    }
}
