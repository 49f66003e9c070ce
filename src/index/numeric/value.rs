//! The value types of numeric columns and the ranges queried over them.

use std::cmp::Ordering;

/// A value type of a numeric column: totally ordered (floats never hold NaN here).
pub trait NumericValue:
    Copy + PartialOrd + Default + std::fmt::Debug + Send + Sync + 'static
{
    /// The smallest value, the lower bound of the first bucket.
    const LOWEST: Self;
    /// A total order (floats: IEEE total order; NaN never enters a column).
    fn order(&self, other: &Self) -> Ordering;

    /// `low <= self <= high`, the hot comparison of range scans.
    fn within(self, low: Self, high: Self) -> bool;

    /// The smallest value above `self` (itself at the top), so that `[v, v.successor())` is a
    /// bucket holding `v` alone.
    fn successor(self) -> Self;
}

impl NumericValue for i64 {
    const LOWEST: Self = i64::MIN;
    fn order(&self, other: &Self) -> Ordering {
        self.cmp(other)
    }
    #[inline]
    fn within(self, low: Self, high: Self) -> bool {
        low <= self && self <= high
    }
    fn successor(self) -> Self {
        self.saturating_add(1)
    }
}

impl NumericValue for f64 {
    const LOWEST: Self = f64::NEG_INFINITY;
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
    /// Plain IEEE comparisons agree with the total order here: columns hold no NaN and no
    /// -0.0, and range bounds are normalized the same way.
    #[inline]
    fn within(self, low: Self, high: Self) -> bool {
        low <= self && self <= high
    }
    fn successor(self) -> Self {
        self.next_up()
    }
}

/// An inclusive range of values; `low > high` is the empty range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange<T> {
    pub low: T,
    pub high: T,
}

impl<T: NumericValue> ValueRange<T> {
    /// True when `value` lies in the range.
    #[inline]
    pub fn contains(&self, value: T) -> bool {
        value.within(self.low, self.high)
    }

    /// True when no value can lie in the range.
    pub fn is_empty(&self) -> bool {
        self.low.order(&self.high).is_gt()
    }
}
