//! The one place that names the bitmap library, so that it can change (roaring ↔ croaring).
//!
//! `roaring` was chosen for its pure-Rust build, its fast `contains` and cardinality (the bid-time
//! lookups) and `MultiOps`, which orders n-ary operations smallest-first and stops on empty.

use roaring::MultiOps;

/// A set of dense user ids.
pub type Bitmap = roaring::RoaringBitmap;

/// The union of many sets in one n-ary pass.
pub fn union_all<'a>(sets: impl IntoIterator<Item = &'a Bitmap>) -> Bitmap {
    sets.into_iter().union()
}

/// The intersection of many sets, smallest first; empty input gives the empty set.
pub fn intersect_all<'a>(sets: impl IntoIterator<Item = &'a Bitmap>) -> Bitmap {
    sets.into_iter().intersection()
}

/// A bitmap holding `0..len`.
pub fn full_range(len: u32) -> Bitmap {
    let mut set = Bitmap::new();
    set.insert_range(0..len);
    set
}
