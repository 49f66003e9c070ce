//! One attribute of a dataset's users, kept as a column and bitmaps by kind.
//!
//! Invariant shared by every kind: each bitmap holds only live users (a deleted user is removed
//! from all of them), so evaluation never needs to intersect with the live set.

use std::collections::HashMap;
use std::sync::Arc;

use super::bitmap::Bitmap;
use super::chunked::ChunkedVec;
use super::dictionary::{ValueCode, ValueDictionary};
use super::keys::DenseId;
use super::numeric::NumericColumn;

/// What kind of values an attribute holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AttributeKind {
    /// One string value per user.
    Categorical,
    /// Several string values per user; no values is null.
    Set,
    Boolean,
    Integer,
    Float,
    /// Milliseconds since the Unix epoch.
    Timestamp,
}

impl AttributeKind {
    /// The kind's name in messages and the schema.
    pub fn name(self) -> &'static str {
        match self {
            AttributeKind::Categorical => "categorical",
            AttributeKind::Set => "set",
            AttributeKind::Boolean => "boolean",
            AttributeKind::Integer => "integer",
            AttributeKind::Float => "float",
            AttributeKind::Timestamp => "timestamp",
        }
    }
}

/// The code column's marker for "no value".
const NULL_CODE: ValueCode = ValueCode::MAX;

/// A categorical attribute: a bitmap per value plus each user's value code.
#[derive(Debug, Clone, Default)]
pub struct Categorical {
    pub dictionary: ValueDictionary,
    /// Indexed by value code.
    bitmaps: Vec<Arc<Bitmap>>,
    /// Each user's code, so that an update finds the bitmap to leave in O(1).
    codes: CodeColumn,
    present: Arc<Bitmap>,
}

/// Each user's value code, two bytes wide until an attribute has 65,535 distinct values, then
/// four: most categorical attributes (country, device, city) never need the wider form.
#[derive(Debug, Clone)]
enum CodeColumn {
    Narrow(ChunkedVec<u16>),
    Wide(ChunkedVec<u32>),
}

/// The narrow column's marker for "no value".
const NARROW_NULL: u16 = u16::MAX;

impl Default for CodeColumn {
    fn default() -> Self {
        CodeColumn::Narrow(ChunkedVec::new(NARROW_NULL))
    }
}

impl CodeColumn {
    fn get(&self, id: DenseId) -> ValueCode {
        match self {
            CodeColumn::Narrow(c) => match c.get(id) {
                NARROW_NULL => NULL_CODE,
                code => ValueCode::from(code),
            },
            CodeColumn::Wide(c) => c.get(id),
        }
    }

    fn set(&mut self, id: DenseId, code: ValueCode) {
        self.set_many(&[(id, code)]);
    }

    fn set_many(&mut self, writes: &[(DenseId, ValueCode)]) {
        let fits = |code: ValueCode| code == NULL_CODE || code < ValueCode::from(NARROW_NULL);
        if matches!(self, CodeColumn::Narrow(_)) && !writes.iter().all(|&(_, c)| fits(c)) {
            self.widen();
        }
        match self {
            CodeColumn::Narrow(c) => {
                let narrow: Vec<(DenseId, u16)> = writes
                    .iter()
                    .map(|&(id, code)| (id, u16::try_from(code).unwrap_or(NARROW_NULL)))
                    .collect();
                c.set_many(&narrow);
            }
            CodeColumn::Wide(c) => c.set_many(writes),
        }
    }

    /// Switches to four-byte codes, copying every code once.
    fn widen(&mut self) {
        if let CodeColumn::Narrow(narrow) = self {
            let mut wide = ChunkedVec::new(NULL_CODE);
            let codes: Vec<(DenseId, ValueCode)> = (0..narrow.len() as DenseId)
                .map(|id| match narrow.get(id) {
                    NARROW_NULL => (id, NULL_CODE),
                    code => (id, ValueCode::from(code)),
                })
                .collect();
            wide.set_many(&codes);
            *self = CodeColumn::Wide(wide);
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            CodeColumn::Narrow(c) => c.heap_bytes(),
            CodeColumn::Wide(c) => c.heap_bytes(),
        }
    }
}

impl Categorical {
    /// The bitmap of a value code (empty for a code with no users).
    pub fn bitmap(&self, code: ValueCode) -> Option<&Arc<Bitmap>> {
        self.bitmaps.get(code as usize)
    }

    /// Users with a value.
    pub fn present(&self) -> &Arc<Bitmap> {
        &self.present
    }

    /// The value of one user.
    pub fn value(&self, id: DenseId) -> Option<&str> {
        match self.codes.get(id) {
            NULL_CODE => None,
            code => self.dictionary.value(code),
        }
    }

    /// Sets one user's value.
    pub fn set(&mut self, id: DenseId, value: &str) {
        let code = self.dictionary.intern(value);
        self.set_code(id, code);
    }

    /// Sets one user's value by a code from [`ValueDictionary::intern`] (bulk loads intern each
    /// distinct value once).
    pub fn set_code(&mut self, id: DenseId, code: ValueCode) {
        let old = self.codes.get(id);
        if old == code {
            return;
        }
        self.clear(id);
        if self.bitmaps.len() <= code as usize {
            self.bitmaps
                .resize_with(code as usize + 1, || Arc::new(Bitmap::new()));
        }
        Arc::make_mut(&mut self.bitmaps[code as usize]).insert(id);
        self.codes.set(id, code);
        Arc::make_mut(&mut self.present).insert(id);
    }

    /// Sets (or, for `None`, clears) the values of many users, each id at most once: every
    /// bitmap and chunk is taken for writing once per call instead of once per user.
    pub fn set_codes(&mut self, rows: &[(DenseId, Option<ValueCode>)]) {
        let mut added: HashMap<ValueCode, Vec<DenseId>> = HashMap::new();
        let mut removed: HashMap<ValueCode, Vec<DenseId>> = HashMap::new();
        let (mut gained, mut lost) = (Vec::new(), Vec::new());
        let mut writes = Vec::with_capacity(rows.len());
        for &(id, code) in rows {
            let old = self.codes.get(id);
            let new = code.unwrap_or(NULL_CODE);
            if old == new {
                continue;
            }
            match (old == NULL_CODE, new == NULL_CODE) {
                (true, false) => gained.push(id),
                (false, true) => lost.push(id),
                _ => {}
            }
            if old != NULL_CODE {
                removed.entry(old).or_default().push(id);
            }
            if new != NULL_CODE {
                added.entry(new).or_default().push(id);
            }
            writes.push((id, new));
        }
        self.codes.set_many(&writes);
        if let Some(&max) = added.keys().max() {
            if self.bitmaps.len() <= max as usize {
                self.bitmaps
                    .resize_with(max as usize + 1, || Arc::new(Bitmap::new()));
            }
        }
        apply_grouped(&mut self.bitmaps, removed, added);
        update_set(&mut self.present, &gained, &lost);
    }

    /// Makes one user's value null.
    pub fn clear(&mut self, id: DenseId) {
        let old = self.codes.get(id);
        if old == NULL_CODE {
            return;
        }
        if let Some(bitmap) = self.bitmaps.get_mut(old as usize) {
            Arc::make_mut(bitmap).remove(id);
        }
        self.codes.set(id, NULL_CODE);
        Arc::make_mut(&mut self.present).remove(id);
    }

    /// Every `(value, users)` with at least one user.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Arc<Bitmap>)> {
        self.dictionary
            .iter()
            .filter_map(|(code, value)| Some((value, self.bitmap(code)?)))
            .filter(|(_, users)| !users.is_empty())
    }

    /// Every dictionary value in code order with its users (empty where it has none): the form
    /// a snapshot stores, which keeps every code as it was.
    pub fn value_bitmaps(&self) -> Vec<(&str, Arc<Bitmap>)> {
        value_bitmaps(&self.dictionary, &self.bitmaps)
    }

    /// The attribute [`Categorical::value_bitmaps`] describes.
    pub fn from_value_bitmaps(parts: Vec<(String, Bitmap)>) -> Self {
        let mut attribute = Categorical::default();
        let mut writes = Vec::new();
        for (value, users) in parts {
            let code = attribute.dictionary.intern(&value);
            writes.extend(users.iter().map(|id| (id, code)));
            attribute.bitmaps.push(Arc::new(users));
        }
        writes.sort_unstable_by_key(|&(id, _)| id);
        attribute.codes.set_many(&writes);
        attribute.present = Arc::new(super::bitmap::union_all(
            attribute.bitmaps.iter().map(|b| &**b),
        ));
        attribute
    }

    fn heap_bytes(&self) -> usize {
        bitmaps_bytes(&self.bitmaps) + self.codes.heap_bytes() + self.present.serialized_size()
    }
}

/// A set attribute: a bitmap per value; a user with no values is null.
#[derive(Debug, Clone, Default)]
pub struct SetAttribute {
    pub dictionary: ValueDictionary,
    /// Indexed by value code.
    bitmaps: Vec<Arc<Bitmap>>,
    /// Users with at least one value.
    present: Arc<Bitmap>,
}

impl SetAttribute {
    /// The bitmap of a value code.
    pub fn bitmap(&self, code: ValueCode) -> Option<&Arc<Bitmap>> {
        self.bitmaps.get(code as usize)
    }

    /// Users with at least one value.
    pub fn present(&self) -> &Arc<Bitmap> {
        &self.present
    }

    /// The values of one user, in code order.
    pub fn values_of(&self, id: DenseId) -> Vec<&str> {
        if !self.present.contains(id) {
            return Vec::new();
        }
        self.dictionary
            .iter()
            .filter(|(code, _)| self.bitmaps[*code as usize].contains(id))
            .map(|(_, value)| value)
            .collect()
    }

    /// Adds values to one user's set.
    pub fn add<'a>(&mut self, id: DenseId, values: impl IntoIterator<Item = &'a str>) {
        let mut added = false;
        for value in values {
            let code = self.dictionary.intern(value) as usize;
            if self.bitmaps.len() <= code {
                self.bitmaps
                    .resize_with(code + 1, || Arc::new(Bitmap::new()));
            }
            if !self.bitmaps[code].contains(id) {
                Arc::make_mut(&mut self.bitmaps[code]).insert(id);
            }
            added = true;
        }
        if added && !self.present.contains(id) {
            Arc::make_mut(&mut self.present).insert(id);
        }
    }

    /// Removes values from one user's set; removing the last makes it null.
    pub fn remove<'a>(&mut self, id: DenseId, values: impl IntoIterator<Item = &'a str>) {
        if !self.present.contains(id) {
            return;
        }
        for value in values {
            if let Some(code) = self.dictionary.code(value) {
                let bitmap = &mut self.bitmaps[code as usize];
                if bitmap.contains(id) {
                    Arc::make_mut(bitmap).remove(id);
                }
            }
        }
        if !self.bitmaps.iter().any(|b| b.contains(id)) {
            Arc::make_mut(&mut self.present).remove(id);
        }
    }

    /// Replaces the sets of many users (an empty list makes it null), each id at most once,
    /// taking each bitmap for writing once per call.
    pub fn set_many(&mut self, rows: &[(DenseId, Vec<&str>)]) {
        let mut added: HashMap<ValueCode, Vec<DenseId>> = HashMap::new();
        let mut removed: HashMap<ValueCode, Vec<DenseId>> = HashMap::new();
        let (mut gained, mut lost) = (Vec::new(), Vec::new());
        for (id, values) in rows {
            let had = self.present.contains(*id);
            let mut codes: Vec<ValueCode> =
                values.iter().map(|v| self.dictionary.intern(v)).collect();
            codes.sort_unstable();
            codes.dedup();
            let old: Vec<ValueCode> = if had {
                (0..self.bitmaps.len() as ValueCode)
                    .filter(|&c| self.bitmaps[c as usize].contains(*id))
                    .collect()
            } else {
                Vec::new()
            };
            for &code in old.iter().filter(|c| codes.binary_search(c).is_err()) {
                removed.entry(code).or_default().push(*id);
            }
            for &code in codes.iter().filter(|c| old.binary_search(c).is_err()) {
                added.entry(code).or_default().push(*id);
            }
            match (had, codes.is_empty()) {
                (false, false) => gained.push(*id),
                (true, true) => lost.push(*id),
                _ => {}
            }
        }
        if self.bitmaps.len() < self.dictionary.len() {
            self.bitmaps
                .resize_with(self.dictionary.len(), || Arc::new(Bitmap::new()));
        }
        apply_grouped(&mut self.bitmaps, removed, added);
        update_set(&mut self.present, &gained, &lost);
    }

    /// Replaces one user's set.
    pub fn set<'a>(&mut self, id: DenseId, values: impl IntoIterator<Item = &'a str>) {
        self.clear(id);
        self.add(id, values);
    }

    /// Makes one user's set empty (null).
    pub fn clear(&mut self, id: DenseId) {
        if !self.present.contains(id) {
            return;
        }
        for bitmap in &mut self.bitmaps {
            if bitmap.contains(id) {
                Arc::make_mut(bitmap).remove(id);
            }
        }
        Arc::make_mut(&mut self.present).remove(id);
    }

    /// Every `(value, users)` with at least one user.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Arc<Bitmap>)> {
        self.dictionary
            .iter()
            .filter_map(|(code, value)| Some((value, self.bitmap(code)?)))
            .filter(|(_, users)| !users.is_empty())
    }

    /// Every dictionary value in code order with its users, as [`Categorical::value_bitmaps`].
    pub fn value_bitmaps(&self) -> Vec<(&str, Arc<Bitmap>)> {
        value_bitmaps(&self.dictionary, &self.bitmaps)
    }

    /// The attribute [`SetAttribute::value_bitmaps`] describes.
    pub fn from_value_bitmaps(parts: Vec<(String, Bitmap)>) -> Self {
        let mut attribute = SetAttribute::default();
        for (value, users) in parts {
            attribute.dictionary.intern(&value);
            attribute.bitmaps.push(Arc::new(users));
        }
        attribute.present = Arc::new(super::bitmap::union_all(
            attribute.bitmaps.iter().map(|b| &**b),
        ));
        attribute
    }

    fn heap_bytes(&self) -> usize {
        bitmaps_bytes(&self.bitmaps) + self.present.serialized_size()
    }
}

/// Each code's users in code order, empty for a code no user holds.
fn value_bitmaps<'a>(
    dictionary: &'a ValueDictionary,
    bitmaps: &[Arc<Bitmap>],
) -> Vec<(&'a str, Arc<Bitmap>)> {
    dictionary
        .iter()
        .map(|(code, value)| {
            let users = bitmaps.get(code as usize).cloned().unwrap_or_default();
            (value, users)
        })
        .collect()
}

/// A boolean attribute: the users holding `true` and those holding `false`.
#[derive(Debug, Clone, Default)]
pub struct BooleanAttribute {
    pub true_users: Arc<Bitmap>,
    pub false_users: Arc<Bitmap>,
}

impl BooleanAttribute {
    /// The value of one user.
    pub fn value(&self, id: DenseId) -> Option<bool> {
        if self.true_users.contains(id) {
            Some(true)
        } else if self.false_users.contains(id) {
            Some(false)
        } else {
            None
        }
    }

    /// The users holding `value`.
    pub fn users(&self, value: bool) -> &Arc<Bitmap> {
        if value {
            &self.true_users
        } else {
            &self.false_users
        }
    }

    /// Sets one user's value.
    pub fn set(&mut self, id: DenseId, value: bool) {
        let (to, from) = if value {
            (&mut self.true_users, &mut self.false_users)
        } else {
            (&mut self.false_users, &mut self.true_users)
        };
        if from.contains(id) {
            Arc::make_mut(from).remove(id);
        }
        if !to.contains(id) {
            Arc::make_mut(to).insert(id);
        }
    }

    /// Sets (or clears) the values of many users, taking each bitmap for writing once.
    pub fn set_many(&mut self, rows: &[(DenseId, Option<bool>)]) {
        let (mut to_true, mut to_false, mut off_true, mut off_false) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(id, value) in rows {
            match (self.value(id), value) {
                (old, new) if old == new => {}
                (old, new) => {
                    match old {
                        Some(true) => off_true.push(id),
                        Some(false) => off_false.push(id),
                        None => {}
                    }
                    match new {
                        Some(true) => to_true.push(id),
                        Some(false) => to_false.push(id),
                        None => {}
                    }
                }
            }
        }
        update_set(&mut self.true_users, &to_true, &off_true);
        update_set(&mut self.false_users, &to_false, &off_false);
    }

    /// Makes one user's value null.
    pub fn clear(&mut self, id: DenseId) {
        for users in [&mut self.true_users, &mut self.false_users] {
            if users.contains(id) {
                Arc::make_mut(users).remove(id);
            }
        }
    }

    /// Users with a value.
    pub fn present(&self) -> Bitmap {
        &*self.true_users | &*self.false_users
    }
}

/// One attribute: its storage by kind.
#[derive(Debug, Clone)]
pub enum Attribute {
    Categorical(Categorical),
    Set(SetAttribute),
    Boolean(BooleanAttribute),
    Integer(NumericColumn<i64>),
    Float(NumericColumn<f64>),
    Timestamp(NumericColumn<i64>),
}

impl Attribute {
    /// An empty attribute of `kind`.
    pub fn new(kind: AttributeKind) -> Self {
        match kind {
            AttributeKind::Categorical => Attribute::Categorical(Categorical::default()),
            AttributeKind::Set => Attribute::Set(SetAttribute::default()),
            AttributeKind::Boolean => Attribute::Boolean(BooleanAttribute::default()),
            AttributeKind::Integer => Attribute::Integer(NumericColumn::default()),
            AttributeKind::Float => Attribute::Float(NumericColumn::default()),
            AttributeKind::Timestamp => Attribute::Timestamp(NumericColumn::default()),
        }
    }

    /// The attribute's kind.
    pub fn kind(&self) -> AttributeKind {
        match self {
            Attribute::Categorical(_) => AttributeKind::Categorical,
            Attribute::Set(_) => AttributeKind::Set,
            Attribute::Boolean(_) => AttributeKind::Boolean,
            Attribute::Integer(_) => AttributeKind::Integer,
            Attribute::Float(_) => AttributeKind::Float,
            Attribute::Timestamp(_) => AttributeKind::Timestamp,
        }
    }

    /// Users with a value.
    pub fn present(&self) -> Arc<Bitmap> {
        match self {
            Attribute::Categorical(a) => a.present().clone(),
            Attribute::Set(a) => a.present().clone(),
            Attribute::Boolean(a) => Arc::new(a.present()),
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.present().clone(),
            Attribute::Float(a) => a.present().clone(),
        }
    }

    /// Makes one user's value null (used when the user is deleted).
    pub fn clear(&mut self, id: DenseId) {
        match self {
            Attribute::Categorical(a) => a.clear(id),
            Attribute::Set(a) => a.clear(id),
            Attribute::Boolean(a) => a.clear(id),
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.clear(id),
            Attribute::Float(a) => a.clear(id),
        }
    }

    /// Number of distinct values held by at least one live user.
    pub fn distinct_values(&self) -> u64 {
        match self {
            Attribute::Categorical(a) => a.values().count() as u64,
            Attribute::Set(a) => a.values().count() as u64,
            Attribute::Boolean(a) => {
                u64::from(!a.true_users.is_empty()) + u64::from(!a.false_users.is_empty())
            }
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.distinct_values(),
            Attribute::Float(a) => a.distinct_values(),
        }
    }

    /// Whether [`Attribute::rebalance`] has work to do; cheap, so that a writer takes the
    /// attribute for writing (a copy while a snapshot shares it) only when it must.
    pub fn needs_rebalance(&self) -> bool {
        match self {
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.needs_rebalance(),
            Attribute::Float(a) => a.needs_rebalance(),
            Attribute::Categorical(_) | Attribute::Set(_) | Attribute::Boolean(_) => false,
        }
    }

    /// Re-cuts range indexes that fell out of balance after writes.
    pub fn rebalance(&mut self) {
        match self {
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.rebalance(),
            Attribute::Float(a) => a.rebalance(),
            Attribute::Categorical(_) | Attribute::Set(_) | Attribute::Boolean(_) => {}
        }
    }

    /// Approximate heap bytes (bitmaps at their serialized size).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Attribute::Categorical(a) => a.heap_bytes(),
            Attribute::Set(a) => a.heap_bytes(),
            Attribute::Boolean(a) => {
                a.true_users.serialized_size() + a.false_users.serialized_size()
            }
            Attribute::Integer(a) | Attribute::Timestamp(a) => a.heap_bytes(),
            Attribute::Float(a) => a.heap_bytes(),
        }
    }
}

/// Removes then adds grouped ids, taking each touched bitmap for writing once.
fn apply_grouped(
    bitmaps: &mut [Arc<Bitmap>],
    removed: HashMap<ValueCode, Vec<DenseId>>,
    added: HashMap<ValueCode, Vec<DenseId>>,
) {
    for (code, ids) in removed {
        if let Some(bitmap) = bitmaps.get_mut(code as usize) {
            let bitmap = Arc::make_mut(bitmap);
            ids.iter().for_each(|&id| {
                bitmap.remove(id);
            });
        }
    }
    for (code, ids) in added {
        if let Some(bitmap) = bitmaps.get_mut(code as usize) {
            let bitmap = Arc::make_mut(bitmap);
            ids.iter().for_each(|&id| {
                bitmap.insert(id);
            });
        }
    }
}

/// Adds and removes ids of one shared set, taking it for writing only when something changes.
pub(crate) fn update_set(set: &mut Arc<Bitmap>, gained: &[DenseId], lost: &[DenseId]) {
    if gained.is_empty() && lost.is_empty() {
        return;
    }
    let set = Arc::make_mut(set);
    for &id in lost {
        set.remove(id);
    }
    for &id in gained {
        set.insert(id);
    }
}

fn bitmaps_bytes(bitmaps: &[Arc<Bitmap>]) -> usize {
    bitmaps.iter().map(|b| b.serialized_size()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_widen_past_65535_values_and_keep_every_value() {
        let mut attribute = Categorical::default();
        attribute.set(3, "first");
        attribute.clear(4);
        let rows: Vec<(DenseId, Option<ValueCode>)> = (10..70_010u32)
            .map(|id| (id, Some(attribute.dictionary.intern(&format!("v{id}")))))
            .collect();
        attribute.set_codes(&rows);
        assert!(matches!(attribute.codes, CodeColumn::Wide(_)));
        assert_eq!(attribute.value(3), Some("first"));
        assert_eq!(attribute.value(4), None);
        assert_eq!(attribute.value(69_999), Some("v69999"));
        assert_eq!(attribute.value(70_009), Some("v70009"));
        attribute.clear(70_009);
        assert_eq!(attribute.value(70_009), None);
        assert_eq!(attribute.present().len(), 70_000);
        let code = attribute.dictionary.code("v500").unwrap();
        assert_eq!(
            attribute.bitmap(code).unwrap().iter().collect::<Vec<_>>(),
            vec![500]
        );
    }
}
