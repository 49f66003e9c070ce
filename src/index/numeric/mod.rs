//! Numeric columns with a value-bucketed bitmap index for range predicates.
//!
//! Each bucket holds the users whose value falls in `[lower, next bucket's lower)`, plus the
//! actual `min`/`max` seen in it. A range query takes whole buckets that lie inside the range as
//! bitmaps (no row is read), skips buckets outside it, and reads the column only for the members
//! of the one or two buckets that straddle an end. A column with few distinct values (ages,
//! ratings) gets one bucket per value, so its ranges are pure bitmap unions; a high-cardinality
//! column (money, timestamps) gets equi-depth buckets, so an edge pass reads ~1/128 of the rows.

use std::sync::Arc;

use super::bitmap::{union_all, Bitmap};
use super::chunked::ChunkedVec;
use super::keys::DenseId;

mod value;
pub use value::{NumericValue, ValueRange};

/// Distinct values up to which every value gets its own bucket.
const EXACT_BUCKETS: usize = 256;
/// Buckets for a high-cardinality column.
const DEPTH_BUCKETS: usize = 128;
/// Values sampled to choose bucket bounds.
const BOUND_SAMPLE: usize = 1 << 16;
/// Columns with at most this many buckets also keep cumulative bitmaps (one bit per user per
/// bucket: ≤ 12.5 bytes per user), so a range over many whole buckets costs two set operations.
const CUMULATIVE_MAX_BUCKETS: usize = 100;
/// A bucket smaller than this is never worth a rebuild.
const MIN_REBUILD_BUCKET: u64 = 1024;

/// Users whose value lies in `[lower, next lower)`.
#[derive(Debug, Clone)]
struct Bucket<T> {
    lower: T,
    /// Smallest and largest value ever added since the last rebuild (a superset after removals).
    min: T,
    max: T,
    members: Arc<Bitmap>,
}

/// How a bucket relates to a queried range.
enum Overlap {
    Outside,
    Inside,
    Edge,
}

impl<T: NumericValue> Bucket<T> {
    fn empty(lower: T) -> Self {
        Self {
            lower,
            min: lower,
            max: lower,
            members: Arc::new(Bitmap::new()),
        }
    }

    fn overlap(&self, range: &ValueRange<T>) -> Overlap {
        if self.members.is_empty()
            || self.max.order(&range.low).is_lt()
            || self.min.order(&range.high).is_gt()
        {
            Overlap::Outside
        } else if range.contains(self.min) && range.contains(self.max) {
            Overlap::Inside
        } else {
            Overlap::Edge
        }
    }

    fn add_many(&mut self, items: &[(DenseId, T)]) {
        let was_empty = self.members.is_empty();
        let members = Arc::make_mut(&mut self.members);
        for (i, &(id, value)) in items.iter().enumerate() {
            if was_empty && i == 0 {
                self.min = value;
                self.max = value;
            }
            if value.order(&self.min).is_lt() {
                self.min = value;
            }
            if value.order(&self.max).is_gt() {
                self.max = value;
            }
            members.insert(id);
        }
    }
}

/// A nullable numeric column and its range index.
#[derive(Debug, Clone)]
pub struct NumericColumn<T: NumericValue> {
    /// The value of every user; meaningful only where `present` holds.
    values: ChunkedVec<T>,
    /// Users with a value.
    present: Arc<Bitmap>,
    /// Sorted by `lower`; the first bucket's lower is `T::LOWEST`, so every value has one.
    buckets: Vec<Bucket<T>>,
    /// Users with a value at the last rebuild.
    rebuilt_at: u64,
    /// The largest multi-value bucket the last rebuild left: data that cannot be balanced
    /// better must not trigger a rebuild on every write.
    worst_after_rebuild: u64,
    /// Rebuilds so far: they read every value, so tests hold them to an amortized bound.
    rebuilds: u64,
    /// `cumulative[i]`: the members of buckets `0..=i`; kept while there are few buckets.
    cumulative: Option<Vec<Arc<Bitmap>>>,
}

impl<T: NumericValue> Default for NumericColumn<T> {
    fn default() -> Self {
        Self {
            values: ChunkedVec::new(T::default()),
            present: Arc::new(Bitmap::new()),
            buckets: vec![Bucket::empty(T::LOWEST)],
            rebuilt_at: 0,
            worst_after_rebuild: 0,
            rebuilds: 0,
            cumulative: None,
        }
    }
}

impl<T: NumericValue> NumericColumn<T> {
    /// The value of one user, if any.
    #[inline]
    pub fn get(&self, id: DenseId) -> Option<T> {
        self.present.contains(id).then(|| self.values.get(id))
    }

    /// Users with a value.
    pub fn present(&self) -> &Arc<Bitmap> {
        &self.present
    }

    /// Every `(user, value)`, by user.
    pub fn rows(&self) -> impl Iterator<Item = (DenseId, T)> + '_ {
        let mut values = self.values.reader();
        self.present.iter().map(move |id| (id, values.get(id)))
    }

    /// A column holding `rows` (each user at most once), its index built once.
    pub fn from_rows(rows: &[(DenseId, Option<T>)]) -> Self {
        let mut column = Self::default();
        column.set_many(rows);
        column.rebalance();
        column
    }

    /// Sets one user's value, replacing any previous one.
    pub fn set(&mut self, id: DenseId, value: T) {
        self.set_many(&[(id, Some(value))]);
    }

    /// Makes one user's value null.
    pub fn clear(&mut self, id: DenseId) {
        self.set_many(&[(id, None)]);
    }

    /// Sets (or clears) the values of many users, each id at most once, taking each bucket,
    /// chunk and the present set for writing once per call.
    pub fn set_many(&mut self, rows: &[(DenseId, Option<T>)]) {
        let buckets = self.buckets.len();
        let mut removed: Vec<Vec<DenseId>> = vec![Vec::new(); buckets];
        let mut added: Vec<Vec<(DenseId, T)>> = vec![Vec::new(); buckets];
        let mut moves = Vec::with_capacity(rows.len());
        let (mut gained, mut lost) = (Vec::new(), Vec::new());
        let mut writes = Vec::with_capacity(rows.len());
        for &(id, value) in rows {
            let old = self.get(id).map(|old| self.bucket_of(old));
            let new = value.map(|value| self.bucket_of(value));
            if let Some(old) = old {
                removed[old].push(id);
            }
            match (old.is_some(), value) {
                (false, Some(_)) => gained.push(id),
                (true, None) => lost.push(id),
                _ => {}
            }
            if let (Some(value), Some(new)) = (value, new) {
                added[new].push((id, value));
                writes.push((id, value));
            }
            // No bucket sorts after every bucket, so it is "in none of the cumulative sets".
            moves.push((id, old.unwrap_or(buckets), new.unwrap_or(buckets)));
        }
        self.values.set_many(&writes);
        super::attribute::update_set(&mut self.present, &gained, &lost);
        for (bucket, ids) in self.buckets.iter_mut().zip(removed) {
            if !ids.is_empty() {
                let members = Arc::make_mut(&mut bucket.members);
                ids.iter().for_each(|&id| {
                    members.remove(id);
                });
            }
        }
        for (bucket, items) in self.buckets.iter_mut().zip(added) {
            if !items.is_empty() {
                bucket.add_many(&items);
            }
        }
        self.move_cumulative(&moves);
    }

    /// Moves users between cumulative sets: a user going from bucket `a` to `b < a` joins
    /// sets `b..a`; from `a` to `b > a` leaves sets `a..b`. Each set is taken once.
    fn move_cumulative(&mut self, moves: &[(DenseId, usize, usize)]) {
        let Some(cumulative) = self.cumulative.as_mut() else {
            return;
        };
        let n = cumulative.len();
        let mut join_from: Vec<Vec<DenseId>> = vec![Vec::new(); n + 1];
        let mut join_until: Vec<Vec<DenseId>> = vec![Vec::new(); n + 1];
        let mut leave_from: Vec<Vec<DenseId>> = vec![Vec::new(); n + 1];
        let mut leave_until: Vec<Vec<DenseId>> = vec![Vec::new(); n + 1];
        for &(id, old, new) in moves {
            if new < old {
                join_from[new].push(id);
                join_until[old].push(id);
            } else if old < new {
                leave_from[old].push(id);
                leave_until[new].push(id);
            }
        }
        let (mut joining, mut leaving) = (Bitmap::new(), Bitmap::new());
        for (i, set) in cumulative.iter_mut().enumerate() {
            join_until[i].iter().for_each(|&id| {
                joining.remove(id);
            });
            leave_until[i].iter().for_each(|&id| {
                leaving.remove(id);
            });
            joining.extend(join_from[i].iter().copied());
            leaving.extend(leave_from[i].iter().copied());
            if !joining.is_empty() || !leaving.is_empty() {
                let set = Arc::make_mut(set);
                *set |= &joining;
                *set -= &leaving;
            }
        }
    }

    /// The users whose value lies in `range`, among `within` (all users when `None`).
    pub fn select(&self, range: &ValueRange<T>, within: Option<&Bitmap>) -> Bitmap {
        if range.is_empty() {
            return Bitmap::new();
        }
        let (inside, edges) = self.classify(range);
        if let Some(universe) = within {
            if self.prefers_scan(&inside, &edges, universe) {
                return self.filter(universe & &*self.present, range);
            }
        }
        let mut selected = match self.cumulative_span(&inside) {
            Some((upto, below)) => match below {
                Some(below) => &*upto - &*below,
                None => (*upto).clone(),
            },
            None => union_all(inside.iter().map(|(_, b)| &**b)),
        };
        for edge in &edges {
            selected |= self.filter((**edge).clone(), range);
        }
        match within {
            Some(universe) => selected & universe,
            None => selected,
        }
    }

    /// The number of users whose value lies in `range`, among `within`, without building the set
    /// where whole buckets answer.
    pub fn count(&self, range: &ValueRange<T>, within: Option<&Bitmap>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let (inside, edges) = self.classify(range);
        if let Some(universe) = within {
            if self.prefers_scan(&inside, &edges, universe) {
                return self.count_in(&(universe & &*self.present), range);
            }
        }
        let count_in = |set: &Bitmap| match within {
            Some(universe) => set.intersection_len(universe),
            None => set.len(),
        };
        let whole: u64 = match self.cumulative_span(&inside) {
            Some((upto, below)) => count_in(&upto) - below.map_or(0, |b| count_in(&b)),
            None => inside.iter().map(|(_, b)| count_in(b)).sum(),
        };
        let edge: u64 = edges
            .iter()
            .map(|members| match within {
                Some(universe) => self.count_in(&(&**members & universe), range),
                None => self.count_in(members, range),
            })
            .sum();
        whole + edge
    }

    /// Whether `range` straddles a bucket, so that answering it reads the column for some
    /// users: otherwise it costs what a bitmap operand costs.
    pub fn reads_rows(&self, range: &ValueRange<T>) -> bool {
        self.buckets
            .iter()
            .any(|bucket| matches!(bucket.overlap(range), Overlap::Edge))
    }

    /// An upper bound of the users a range selects, for ordering operands.
    pub fn estimate(&self, range: &ValueRange<T>) -> u64 {
        let (inside, edges) = self.classify(range);
        inside
            .iter()
            .map(|(_, b)| b)
            .chain(&edges)
            .map(|b| b.len())
            .sum()
    }

    /// Number of distinct values among the users that have one (reads the column).
    pub fn distinct_values(&self) -> u64 {
        let mut values: Vec<T> = self.rows().map(|(_, value)| value).collect();
        values.sort_unstable_by(T::order);
        values.dedup_by(|a, b| a.order(b).is_eq());
        values.len() as u64
    }

    /// Re-cuts the buckets when one has grown far past its share, so edge passes stay small.
    ///
    /// A rebuild reads every value, so after one the column must grow by half, or a bucket grow
    /// to 8× its share and twice what the rebuild left, before the next: rebuilds stay amortized
    /// O(1) per write even when the data cannot be balanced. A value held by many users gets a
    /// bucket of its own (see [`NumericColumn::sample_bounds`]), which never counts as out of
    /// balance: no cut can split one value.
    pub fn rebalance(&mut self) {
        if self.needs_rebalance() {
            self.rebuild();
        }
    }

    /// Whether [`NumericColumn::rebalance`] would rebuild: it only looks at bucket sizes, so a
    /// caller can ask before taking the column for writing.
    pub fn needs_rebalance(&self) -> bool {
        let present = self.present.len();
        let limit = self.bucket_limit(present);
        let worst = self.worst_bucket();
        let grown = present >= self.rebuilt_at + self.rebuilt_at / 2;
        let much_worse = worst > 4 * limit && worst >= 2 * self.worst_after_rebuild;
        worst > limit && (grown || much_worse)
    }

    /// How many times the index was rebuilt.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// Members of the largest bucket holding more than one value.
    fn worst_bucket(&self) -> u64 {
        self.buckets
            .iter()
            .filter(|b| b.min.order(&b.max).is_ne())
            .map(|b| b.members.len())
            .max()
            .unwrap_or(0)
    }

    /// The size past which a bucket is out of balance.
    fn bucket_limit(&self, present: u64) -> u64 {
        (2 * (present / DEPTH_BUCKETS as u64)).max(MIN_REBUILD_BUCKET)
    }

    /// Heap bytes of the column and its index.
    pub fn heap_bytes(&self) -> usize {
        let bitmaps: usize = self
            .buckets
            .iter()
            .map(|b| b.members.serialized_size())
            .sum();
        let cumulative: usize = self
            .cumulative
            .iter()
            .flatten()
            .map(|b| b.serialized_size())
            .sum();
        self.values.heap_bytes() + self.present.serialized_size() + bitmaps + cumulative
    }

    /// Reading the column for the users in scope beats touching many bucket bitmaps when the
    /// scope is small next to what the range selects, unless cumulative sets answer the whole
    /// buckets in two operations anyway.
    fn prefers_scan(
        &self,
        inside: &[(usize, Arc<Bitmap>)],
        edges: &[Arc<Bitmap>],
        universe: &Bitmap,
    ) -> bool {
        if self.cumulative_span(inside).is_some() {
            return false;
        }
        let selected: u64 = inside
            .iter()
            .map(|(_, b)| b)
            .chain(edges)
            .map(|b| b.len())
            .sum();
        universe.len().saturating_mul(2) < selected
    }

    /// The buckets wholly inside a range (with their positions, which are contiguous but for
    /// empty buckets) and those straddling an end.
    #[allow(clippy::type_complexity)]
    fn classify(&self, range: &ValueRange<T>) -> (Vec<(usize, Arc<Bitmap>)>, Vec<Arc<Bitmap>>) {
        let mut inside = Vec::new();
        let mut edges = Vec::new();
        for (index, bucket) in self.buckets.iter().enumerate() {
            match bucket.overlap(range) {
                Overlap::Outside => {}
                Overlap::Inside => inside.push((index, bucket.members.clone())),
                Overlap::Edge => edges.push(bucket.members.clone()),
            }
        }
        (inside, edges)
    }

    /// For three or more whole buckets `i..=j`, the cumulative sets up to `j` and below `i`:
    /// their difference is the union of the buckets, in one operation instead of many.
    fn cumulative_span(
        &self,
        inside: &[(usize, Arc<Bitmap>)],
    ) -> Option<(Arc<Bitmap>, Option<Arc<Bitmap>>)> {
        let cumulative = self.cumulative.as_ref()?;
        if inside.len() < 3 {
            return None;
        }
        let (first, last) = (inside.first()?.0, inside.last()?.0);
        let upto = cumulative.get(last)?.clone();
        let below = match first {
            0 => None,
            _ => Some(cumulative.get(first - 1)?.clone()),
        };
        Some((upto, below))
    }

    /// The users of `ids` (all with a value) whose value lies in `range`, filtered in place
    /// container by container (building a new set id by id costs more than the reads).
    fn filter(&self, mut ids: Bitmap, range: &ValueRange<T>) -> Bitmap {
        let mut values = self.values.reader();
        ids.retain(|id| range.contains(values.get(id)));
        ids
    }

    /// How many of `ids` (all with a value) have a value in `range`, decoded a block at a time
    /// (a bitmap iterator's per-id step costs more than the read it feeds).
    fn count_in(&self, ids: &Bitmap, range: &ValueRange<T>) -> u64 {
        let mut values = self.values.reader();
        let mut block = [0; 1024];
        let mut iter = ids.iter();
        let mut count = 0;
        loop {
            let decoded = iter.next_many(&mut block);
            if decoded.is_empty() {
                return count;
            }
            count += decoded
                .iter()
                .map(|&id| u64::from(range.contains(values.get(id))))
                .sum::<u64>();
        }
    }

    fn bucket_of(&self, value: T) -> usize {
        self.buckets
            .partition_point(|b| b.lower.order(&value).is_le())
            .saturating_sub(1)
    }

    /// Chooses new bounds from a sample of the values and redistributes every user in one pass.
    fn rebuild(&mut self) {
        let bounds = self.sample_bounds();
        let mut members: Vec<Vec<DenseId>> = vec![Vec::new(); bounds.len()];
        let mut buckets: Vec<Bucket<T>> = bounds.iter().map(|&b| Bucket::empty(b)).collect();
        let mut values = self.values.reader();
        for id in self.present.iter() {
            let value = values.get(id);
            let index = bounds
                .partition_point(|b| b.order(&value).is_le())
                .saturating_sub(1);
            let bucket = &mut buckets[index];
            if members[index].is_empty() {
                bucket.min = value;
                bucket.max = value;
            } else {
                if value.order(&bucket.min).is_lt() {
                    bucket.min = value;
                }
                if value.order(&bucket.max).is_gt() {
                    bucket.max = value;
                }
            }
            members[index].push(id);
        }
        for (bucket, ids) in buckets.iter_mut().zip(members) {
            // Ids come out of the bitmap in ascending order.
            let mut set = Bitmap::from_sorted_iter(ids).unwrap_or_default();
            set.optimize();
            bucket.members = Arc::new(set);
        }
        self.buckets = buckets;
        self.rebuilt_at = self.present.len();
        self.worst_after_rebuild = self.worst_bucket();
        self.rebuilds += 1;
        self.cumulative = (self.buckets.len() <= CUMULATIVE_MAX_BUCKETS).then(|| {
            let mut running = Bitmap::new();
            self.buckets
                .iter()
                .map(|bucket| {
                    running |= &*bucket.members;
                    Arc::new(running.clone())
                })
                .collect()
        });
    }

    fn sample_bounds(&self) -> Vec<T> {
        let stride = (self.present.len() as usize / BOUND_SAMPLE).max(1);
        // One pass with a counter: `step_by` on a bitmap iterator re-counts containers per step.
        let mut sample: Vec<T> = self
            .present
            .iter()
            .enumerate()
            .filter(|(i, _)| i % stride == 0)
            .map(|(_, id)| self.values.get(id))
            .collect();
        sample.sort_unstable_by(T::order);
        let mut distinct = sample.clone();
        distinct.dedup_by(|a, b| a.order(b).is_eq());
        let mut bounds = vec![T::LOWEST];
        if distinct.len() <= EXACT_BUCKETS {
            bounds.extend(distinct);
        } else {
            // Quantiles of the values with their repeats, so each bucket holds a similar number
            // of users; a value repeated past a bucket's share gets a bucket of its own,
            // `[v, v.successor())`, or the values next to it would share its oversized bucket.
            let step = sample.len() as f64 / DEPTH_BUCKETS as f64;
            bounds.extend((1..DEPTH_BUCKETS).map(|i| sample[(i as f64 * step) as usize]));
            for heavy in heavy_values(&sample, step as usize) {
                bounds.push(heavy);
                bounds.push(heavy.successor());
            }
            bounds.sort_unstable_by(T::order);
        }
        bounds.dedup_by(|a, b| a.order(b).is_eq());
        bounds
    }
}

/// The values of a sorted sample repeated more than `share` times.
fn heavy_values<T: NumericValue>(sorted: &[T], share: usize) -> Vec<T> {
    sorted
        .chunk_by(|a, b| a.order(b).is_eq())
        .filter(|run| run.len() > share)
        .map(|run| run[0])
        .collect()
}

#[cfg(test)]
mod tests;
