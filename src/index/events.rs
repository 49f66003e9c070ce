//! Behaviour events: per event name, one bucket per UTC day, each holding who did it that day
//! (sorted ids), how many times (where each user's run of events ends), and when (millisecond
//! offsets within the day).
//!
//! A window `[start, end)` covers whole days and at most two partial days at its edges. Whole
//! days answer from their aggregates alone: a union of their users for "did", per-user counts
//! summed for "at least k times". Only the edge days read event times, and only the offsets of the
//! users in them, so a window is exact to the millisecond at any instant while the work grows
//! with the days in it, not with the events.
//!
//! Per bucket, users are sorted and their times sorted within each user, so that one user's
//! events are a contiguous run: `times[ends[i-1]..ends[i]]` belongs to `ids[i]`.
//!
//! A busy name also keeps its frequent users apart (`events/frequent.rs`), so that "at least
//! k times" with a large k reads them alone instead of every pair in the window.
//!
//! Memory per event: 4 bytes of time offset, plus per (user, day) pair 8 bytes of id and run
//! end; events of one user on one day share the pair.

mod frequent;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use frequent::Frequent;
pub use frequent::{TierParams, TierStats};

use super::bitmap::union_all;
use super::keys::DenseId;
use super::Bitmap;
use crate::time::Millis;

/// Milliseconds in one bucket: one UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// One event packed for sorting: the user in the high half, the offset in its day in the low.
pub type PackedEvent = u64;

/// Packs a user and a millisecond offset within a day.
pub fn pack(user: DenseId, offset: u32) -> PackedEvent {
    (u64::from(user) << 32) | u64::from(offset)
}

fn unpack(event: PackedEvent) -> (DenseId, u32) {
    ((event >> 32) as DenseId, event as u32)
}

/// The day of an instant, and the instant's offset within it.
pub fn day_of(ts: Millis) -> (i64, u32) {
    (ts.div_euclid(DAY_MS), ts.rem_euclid(DAY_MS) as u32)
}

/// One event name's events on one day.
#[derive(Debug, Clone, Default)]
pub struct DayBucket {
    /// Users with at least one event that day, ascending.
    ids: Vec<DenseId>,
    /// `ends[i]`: one past the last event of `ids[i]` in `times`.
    ends: Vec<u32>,
    /// Milliseconds since the day's start, ascending within each user's run.
    times: Vec<u32>,
}

impl DayBucket {
    /// A bucket from events sorted ascending (user, then offset).
    fn from_sorted(events: &[PackedEvent]) -> Self {
        let mut ids = Vec::new();
        let mut ends = Vec::new();
        let mut times = Vec::with_capacity(events.len());
        for &event in events {
            let (user, offset) = unpack(event);
            if ids.last() != Some(&user) {
                if !ids.is_empty() {
                    ends.push(times.len() as u32);
                }
                ids.push(user);
            }
            times.push(offset);
        }
        if !ids.is_empty() {
            ends.push(times.len() as u32);
        }
        ids.shrink_to_fit();
        ends.shrink_to_fit();
        Self { ids, ends, times }
    }

    /// The bucket's columns: users ascending, where each user's run ends, and the time
    /// offsets (the layout a snapshot stores).
    pub fn columns(&self) -> (&[DenseId], &[u32], &[u32]) {
        (&self.ids, &self.ends, &self.times)
    }

    /// A bucket from its [`DayBucket::columns`], checked.
    ///
    /// # Errors
    /// Columns that break the layout: users not ascending, runs empty or out of order, times
    /// outside the day or unsorted within a run.
    pub fn from_columns(
        ids: Vec<DenseId>,
        ends: Vec<u32>,
        times: Vec<u32>,
    ) -> Result<Self, String> {
        if ids.len() != ends.len() || ids.is_empty() {
            return Err(format!("{} users with {} run ends", ids.len(), ends.len()));
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err("users are not ascending".into());
        }
        if ends.last().map(|&e| e as usize) != Some(times.len())
            || ends.first() == Some(&0)
            || ends.windows(2).any(|w| w[0] >= w[1])
        {
            return Err("run ends do not cover the times in order".into());
        }
        let bucket = Self { ids, ends, times };
        let day = DAY_MS as u32;
        let sorted = (0..bucket.ids.len()).all(|i| bucket.run(i).windows(2).all(|w| w[0] <= w[1]))
            && bucket.times.iter().all(|&t| t < day);
        if !sorted {
            return Err("times are unsorted within a run or outside the day".into());
        }
        Ok(bucket)
    }

    /// Every event, packed and sorted.
    fn packed(&self) -> Vec<PackedEvent> {
        let mut out = Vec::with_capacity(self.times.len());
        for (i, &user) in self.ids.iter().enumerate() {
            out.extend(self.run(i).iter().map(|&t| pack(user, t)));
        }
        out
    }

    /// The times of the `i`-th user.
    fn run(&self, i: usize) -> &[u32] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.times[start..self.ends[i] as usize]
    }

    /// This bucket with `events` (sorted) added.
    fn merged(&self, events: &[PackedEvent]) -> Self {
        let old = self.packed();
        let mut all = Vec::with_capacity(old.len() + events.len());
        let (mut a, mut b) = (old.iter().peekable(), events.iter().peekable());
        while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
            if x <= y {
                all.push(x);
                a.next();
            } else {
                all.push(y);
                b.next();
            }
        }
        all.extend(a);
        all.extend(b);
        Self::from_sorted(&all)
    }

    /// This bucket without `users`' events, or `None` when nothing is left.
    fn without(&self, users: &Bitmap) -> Option<Self> {
        let kept: Vec<PackedEvent> = self
            .packed()
            .into_iter()
            .filter(|&e| !users.contains(unpack(e).0))
            .collect();
        (!kept.is_empty()).then(|| Self::from_sorted(&kept))
    }

    /// Whether any of `users` has an event here: a search per user when they are few, else
    /// one walk.
    fn holds_any(&self, users: &Bitmap) -> bool {
        if users.len().saturating_mul(16) < self.ids.len() as u64 {
            users.iter().any(|u| self.ids.binary_search(&u).is_ok())
        } else {
            self.ids.iter().any(|&u| users.contains(u))
        }
    }

    /// This bucket without the events before `offset`, or `None` when nothing is left.
    fn trimmed_before(&self, offset: u32) -> Option<Self> {
        let kept: Vec<PackedEvent> = self
            .packed()
            .into_iter()
            .filter(|&e| unpack(e).1 >= offset)
            .collect();
        (!kept.is_empty()).then(|| Self::from_sorted(&kept))
    }

    /// Events before `offset`.
    fn count_before(&self, offset: u32) -> u64 {
        self.times.iter().filter(|&&t| t < offset).count() as u64
    }

    /// Events of the `i`-th user with an offset in `[lo, hi)`.
    fn count_run(&self, i: usize, lo: u32, hi: u32) -> u32 {
        let run = self.run(i);
        let (Some(&first), Some(&last)) = (run.first(), run.last()) else {
            return 0;
        };
        // Runs are short and mostly all in or all out of a window's edge.
        if first >= lo && last < hi {
            return run.len() as u32;
        }
        if last < lo || first >= hi {
            return 0;
        }
        let from = run.partition_point(|&t| t < lo);
        let to = run.partition_point(|&t| t < hi);
        (to - from) as u32
    }

    /// Adds the counts within `span` of the users from index `from` up to id `limit` (all in
    /// the id block starting at `base`) to `counts`, pushing to `reached` the users whose count
    /// reaches `k`. Returns the index after the last user added.
    #[allow(clippy::too_many_arguments)]
    fn add_counts<C: Counter>(
        &self,
        from: usize,
        limit: u64,
        span: DaySpan,
        base: DenseId,
        k: C,
        counts: &mut [C],
        reached: &mut Vec<DenseId>,
    ) -> usize {
        let mut add = |id: DenseId, n: u32| {
            let slot = &mut counts[(id - base) as usize];
            let before = *slot;
            *slot = before.plus(n);
            if before < k && *slot >= k {
                reached.push(id);
            }
        };
        let ids = &self.ids[from..];
        let mut taken = 0;
        if span.is_whole() {
            let mut start = if from == 0 { 0 } else { self.ends[from - 1] };
            for (&id, &end) in ids.iter().zip(&self.ends[from..]) {
                if u64::from(id) >= limit {
                    break;
                }
                add(id, end - start);
                start = end;
                taken += 1;
            }
        } else {
            for &id in ids {
                if u64::from(id) >= limit {
                    break;
                }
                let n = self.count_run(from + taken, span.lo, span.hi);
                if n > 0 {
                    add(id, n);
                }
                taken += 1;
            }
        }
        from + taken
    }

    /// Events of `user` with an offset in `[lo, hi)`.
    fn count_of(&self, user: DenseId, lo: u32, hi: u32) -> u32 {
        match self.ids.binary_search(&user) {
            Ok(i) => self.count_run(i, lo, hi),
            Err(_) => 0,
        }
    }

    fn events(&self) -> u64 {
        self.times.len() as u64
    }

    /// Events of `users` with an offset from `lo` on: a search per user when they are few,
    /// else one walk.
    fn count_users(&self, users: &Bitmap, lo: u32) -> u64 {
        if users.len().saturating_mul(16) < self.ids.len() as u64 {
            users
                .iter()
                .map(|u| u64::from(self.count_of(u, lo, u32::MAX)))
                .sum()
        } else {
            (0..self.ids.len())
                .filter(|&i| users.contains(self.ids[i]))
                .map(|i| u64::from(self.count_run(i, lo, u32::MAX)))
                .sum()
        }
    }

    fn heap_bytes(&self) -> usize {
        4 * (self.ids.capacity() + self.ends.capacity() + self.times.capacity())
    }
}

/// A saturating per-user event counter.
trait Counter: Copy + Default + Ord {
    /// `self + n`, saturating.
    fn plus(self, n: u32) -> Self;
}

impl Counter for u8 {
    fn plus(self, n: u32) -> Self {
        self.saturating_add(u8::try_from(n).unwrap_or(u8::MAX))
    }
}

impl Counter for u32 {
    fn plus(self, n: u32) -> Self {
        self.saturating_add(n)
    }
}

/// Ids per block of the counting buffer (the id's high 16 bits name its block).
const BLOCK_IDS: usize = 1 << 16;

/// The lowest id block any cursor still points into.
fn next_block(spans: &[(&DayBucket, DaySpan)], cursors: &[usize]) -> Option<DenseId> {
    spans
        .iter()
        .zip(cursors)
        .filter_map(|((bucket, _), &cursor)| bucket.ids.get(cursor))
        .map(|&id| id >> 16)
        .min()
}

/// The part of one day a window covers: offsets `[lo, hi)`.
#[derive(Debug, Clone, Copy)]
struct DaySpan {
    lo: u32,
    hi: u32,
}

impl DaySpan {
    /// The part of `day` that `window` covers.
    fn of(day: i64, window: TimeWindow) -> Self {
        let day_start = day.saturating_mul(DAY_MS);
        let lo = window.start.saturating_sub(day_start).clamp(0, DAY_MS) as u32;
        let hi = window.end.saturating_sub(day_start).clamp(0, DAY_MS) as u32;
        Self { lo, hi }
    }

    fn is_whole(self) -> bool {
        self.lo == 0 && i64::from(self.hi) >= DAY_MS
    }
}

/// Every event of one name, by day.
#[derive(Debug, Clone, Default)]
pub struct EventSeries {
    days: BTreeMap<i64, Arc<DayBucket>>,
    events: u64,
    /// The frequent users apart, once the name is busy enough to need it.
    frequent: Option<Arc<Frequent>>,
}

/// A time window, half-open: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub start: Millis,
    pub end: Millis,
}

impl EventSeries {
    /// Events held.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Adds events of one day, sorted ascending.
    fn add_day(&mut self, day: i64, events: &[PackedEvent]) {
        if events.is_empty() {
            return;
        }
        let bucket = match self.days.get(&day) {
            Some(existing) => existing.merged(events),
            None => DayBucket::from_sorted(events),
        };
        self.events += events.len() as u64;
        self.days.insert(day, Arc::new(bucket));
    }

    /// Brings the frequent-user tier up to date after a write was merged into the days:
    /// `batch` holds its events (per day, sorted) when the tier can take them in one by one,
    /// and is `None` for a write as large as an eighth of the name, which rebuilds it.
    fn update_tier(&mut self, params: TierParams, batch: Option<&BTreeMap<i64, Vec<PackedEvent>>>) {
        match (&mut self.frequent, batch) {
            (Some(tier), Some(batch)) => Arc::make_mut(tier).add(&self.days, batch),
            _ => self.rebuild_tier(params),
        }
    }

    /// Builds the tier from the days when the name has enough pairs to need it.
    fn rebuild_tier(&mut self, params: TierParams) {
        let pairs: u64 = self.days.values().map(|b| b.ids.len() as u64).sum();
        self.frequent =
            (pairs >= params.min_pairs).then(|| Arc::new(Frequent::build(params, &self.days)));
    }

    /// The buckets a window touches, with the part of each it covers.
    fn spans(&self, window: TimeWindow) -> impl Iterator<Item = (&DayBucket, DaySpan)> {
        let first = window.start.div_euclid(DAY_MS);
        let last = window.end.saturating_sub(1).div_euclid(DAY_MS);
        use std::ops::Bound::{Excluded, Included};
        let range = if window.start < window.end {
            (Included(first), Included(last))
        } else {
            (Included(0), Excluded(0))
        };
        self.days
            .range(range)
            .map(move |(&day, bucket)| (&**bucket, DaySpan::of(day, window)))
    }

    /// Users with at least `k` events in `window`, among `within` when given.
    pub fn select(&self, window: TimeWindow, k: u64, within: Option<&Bitmap>) -> Bitmap {
        if window.start >= window.end || k == 0 {
            return Bitmap::new();
        }
        let (days, pairs) = self.spans(window).fold((0u64, 0u64), |(d, p), (b, _)| {
            (d + 1, p + b.ids.len() as u64)
        });
        match within {
            // A few users (a write's touched users) are looked up one by one: a binary search
            // per user and day against a walk of every pair.
            Some(scope) if scope.len().saturating_mul(days * 16) < pairs => {
                self.select_each(window, k, scope)
            }
            Some(scope) => self.select_all(window, k) & scope,
            None => self.select_all(window, k),
        }
    }

    fn select_all(&self, window: TimeWindow, k: u64) -> Bitmap {
        if k == 1 {
            return self.select_any(window);
        }
        // The tier's work grows with its users: a window with fewer pairs is walked instead.
        if let (Some(tier), Ok(k)) = (&self.frequent, u32::try_from(k)) {
            if k >= u32::from(tier.hot_at()) && self.pairs(window) > tier.users() as u64 {
                return self.select_frequent(tier, window, k);
            }
        }
        // The narrowest counter that can hold k keeps the buffer in the closest cache.
        match (u8::try_from(k), u32::try_from(k)) {
            (Ok(k), _) => self.count_up(window, k),
            (_, Ok(k)) => self.count_up(window, k),
            // Nobody holds 4 billion events of one name.
            _ => Bitmap::new(),
        }
    }

    /// Users with at least `k` events in `window`, by adding counts one block of 65,536 ids
    /// at a time in a buffer that stays in cache: every day's ids are sorted, so each day is
    /// walked once, a block after the other, and a user is recorded the moment it reaches k.
    fn count_up<C: Counter>(&self, window: TimeWindow, k: C) -> Bitmap {
        let spans: Vec<(&DayBucket, DaySpan)> = self.spans(window).collect();
        let mut cursors = vec![0usize; spans.len()];
        let mut counts = vec![C::default(); BLOCK_IDS];
        let mut reached = Vec::new();
        while let Some(block) = next_block(&spans, &cursors) {
            let base = block << 16;
            let limit = u64::from(base) + BLOCK_IDS as u64;
            for ((bucket, span), cursor) in spans.iter().zip(cursors.iter_mut()) {
                *cursor =
                    bucket.add_counts(*cursor, limit, *span, base, k, &mut counts, &mut reached);
            }
            counts.fill(C::default());
        }
        reached.sort_unstable();
        Bitmap::from_sorted_iter(reached).unwrap_or_default()
    }

    /// Users with an event in `window`: their ids set in a bitset as wide as the ids seen
    /// (1.25 MB at 10M users, in cache), read out as a bitmap in one pass. A window with few
    /// users sorts their ids instead.
    fn select_any(&self, window: TimeWindow) -> Bitmap {
        let spans: Vec<(&DayBucket, DaySpan)> = self.spans(window).collect();
        let pairs: usize = spans.iter().map(|(b, _)| b.ids.len()).sum();
        let bound = spans
            .iter()
            .filter_map(|(b, _)| b.ids.last())
            .max()
            .map_or(0, |&max| max as usize + 1);
        let mut ids_in = spans.iter().flat_map(|(bucket, span)| {
            let whole = span.is_whole();
            bucket
                .ids
                .iter()
                .enumerate()
                .filter(move |&(i, _)| whole || bucket.count_run(i, span.lo, span.hi) > 0)
                .map(|(_, &id)| id)
        });
        if pairs.saturating_mul(4096) < bound {
            let mut ids: Vec<DenseId> = ids_in.collect();
            ids.sort_unstable();
            ids.dedup();
            return Bitmap::from_sorted_iter(ids).unwrap_or_default();
        }
        let mut words = vec![0u64; bound.div_ceil(64)];
        for id in &mut ids_in {
            words[(id >> 6) as usize] |= 1 << (id & 63);
        }
        super::bitmap::from_words(&words)
    }

    /// `AT LEAST k` (k at or above the tier's threshold) through the frequent-user tier; the
    /// few frequent users it cannot count are looked up one by one.
    fn select_frequent(&self, tier: &Frequent, window: TimeWindow, k: u32) -> Bitmap {
        let (found, uncounted) = tier.select(&self.days, window, k);
        found | self.select_each(window, u64::from(k), &uncounted)
    }

    fn select_each(&self, window: TimeWindow, k: u64, scope: &Bitmap) -> Bitmap {
        let spans: Vec<_> = self.spans(window).collect();
        let matches = scope.iter().filter(|&user| {
            let mut total = 0u64;
            for (bucket, span) in &spans {
                total += u64::from(bucket.count_of(user, span.lo, span.hi));
                if total >= k {
                    return true;
                }
            }
            false
        });
        Bitmap::from_sorted_iter(matches).unwrap_or_default()
    }

    /// The size of the frequent-user tier, when the name has one.
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.frequent.as_ref().map(|t| t.stats())
    }

    /// The (user, day) pairs a window covers: the work of counting over it.
    pub fn pairs(&self, window: TimeWindow) -> u64 {
        self.spans(window).map(|(b, _)| b.ids.len() as u64).sum()
    }

    /// An upper bound of the users any window selects: everyone with an event in it.
    pub fn estimate(&self, window: TimeWindow) -> u64 {
        self.pairs(window)
    }

    fn heap_bytes(&self) -> usize {
        self.days.values().map(|b| b.heap_bytes()).sum::<usize>()
            + self.days.len() * 48
            + self.frequent.as_ref().map_or(0, |t| t.heap_bytes())
    }
}

/// Every event of one dataset.
#[derive(Debug, Clone)]
pub struct EventStore {
    series: BTreeMap<String, Arc<EventSeries>>,
    /// Events before this instant are dropped (retention) and never match.
    cutoff: Millis,
    /// When names get a frequent-user tier.
    tier: TierParams,
    /// Deleted users whose events are still in the buckets: a delete only marks them (readers
    /// of `series` subtract this set), so that deleting one active user costs a bitmap insert
    /// instead of a rewrite of every day bucket and tier holding them. [`EventStore::purge`]
    /// drops their events; snapshots never hold them. Dense ids are never reused, so a mark
    /// can never hide a later user's events.
    erased: Arc<Bitmap>,
}

/// Events grouped for one write: name → day → packed events (any order).
pub type EventBatch = BTreeMap<String, BTreeMap<i64, Vec<PackedEvent>>>;

impl Default for EventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EventStore {
    /// An empty store that keeps everything.
    pub fn new() -> Self {
        Self::with_tier(TierParams::DEFAULT)
    }

    /// An empty store whose names get frequent-user tiers as `tier` says.
    pub fn with_tier(tier: TierParams) -> Self {
        Self {
            series: BTreeMap::new(),
            cutoff: Millis::MIN,
            tier,
            erased: Arc::new(Bitmap::new()),
        }
    }

    /// The first instant still retained.
    pub fn cutoff(&self) -> Millis {
        self.cutoff
    }

    /// Every `(name, day, bucket)`, by name and day, without the events of deleted users (a
    /// bucket holding some is copied without them; one left empty is skipped).
    pub fn buckets(&self) -> impl Iterator<Item = (&str, i64, Cow<'_, DayBucket>)> {
        let erased = &*self.erased;
        self.series.iter().flat_map(move |(name, series)| {
            series.days.iter().filter_map(move |(&day, bucket)| {
                let bucket = if !erased.is_empty() && bucket.holds_any(erased) {
                    Cow::Owned(bucket.without(erased)?)
                } else {
                    Cow::Borrowed(&**bucket)
                };
                Some((name.as_str(), day, bucket))
            })
        })
    }

    /// Deleted users whose events are not yet purged: a series' answers must exclude them.
    pub fn erased(&self) -> &Arc<Bitmap> {
        &self.erased
    }

    /// A store holding these buckets (as [`EventStore::buckets`] gave them) and cutoff, with
    /// the frequent-user tiers built anew.
    pub fn from_buckets(
        cutoff: Millis,
        tier: TierParams,
        buckets: BTreeMap<String, BTreeMap<i64, DayBucket>>,
    ) -> Self {
        let mut store = Self::with_tier(tier);
        store.cutoff = cutoff;
        for (name, days) in buckets {
            let mut series = EventSeries::default();
            for (day, bucket) in days {
                series.events += bucket.times.len() as u64;
                series.days.insert(day, Arc::new(bucket));
            }
            series.rebuild_tier(tier);
            store.series.insert(name, Arc::new(series));
        }
        store
    }

    /// One event name's series.
    pub fn series(&self, name: &str) -> Option<&Arc<EventSeries>> {
        self.series.get(name)
    }

    /// Every event name with its number of retained events (of users not deleted).
    pub fn names(&self) -> impl Iterator<Item = (&str, u64)> {
        let (day, offset) = day_of(self.cutoff);
        self.series.iter().map(move |(n, s)| {
            let masked = s.days.get(&day).map_or(0, |b| b.count_before(offset));
            let erased = self.erased_events(s, |d| if d == day { offset } else { 0 });
            (n.as_str(), s.events - masked - erased)
        })
    }

    /// Total events held (of users not deleted).
    pub fn events(&self) -> u64 {
        self.series
            .values()
            .map(|s| s.events - self.erased_events(s, |_| 0))
            .sum()
    }

    /// Events of deleted, not yet purged users in `series`, from offset `lo(day)` of each day.
    fn erased_events(&self, series: &EventSeries, lo: impl Fn(i64) -> u32) -> u64 {
        if self.erased.is_empty() {
            return 0;
        }
        series
            .days
            .iter()
            .map(|(&day, bucket)| bucket.count_users(&self.erased, lo(day)))
            .sum()
    }

    /// Adds a batch; events before the cutoff must already be filtered out.
    pub fn add(&mut self, batch: EventBatch) {
        for (name, days) in batch {
            let series = Arc::make_mut(self.series.entry(name).or_default());
            let added: u64 = days.values().map(|e| e.len() as u64).sum();
            // A large write rebuilds the tier, so its events need not be kept for it.
            let keep = added.saturating_mul(8) < series.events;
            let mut kept = BTreeMap::new();
            for (day, mut events) in days {
                events.sort_unstable();
                series.add_day(day, &events);
                if keep {
                    kept.insert(day, events);
                }
            }
            series.update_tier(self.tier, keep.then_some(&kept));
        }
    }

    /// Drops every event before `cutoff` (it never moves back here). Whole days go; the early
    /// part of the day holding the cutoff stays until that day goes, masked by [`Self::clamp`]
    /// (rebuilding that day at every refresh would cost more than the memory it frees).
    pub fn retain_from(&mut self, cutoff: Millis) {
        if cutoff <= self.cutoff {
            return;
        }
        self.cutoff = cutoff;
        let (first_kept, _) = day_of(cutoff);
        let tier = self.tier;
        self.series.retain(|_, series| {
            if series
                .days
                .first_key_value()
                .is_some_and(|(&d, _)| d < first_kept)
            {
                let series = Arc::make_mut(series);
                series.days = series.days.split_off(&first_kept);
                series.events = series.days.values().map(|b| b.events()).sum();
                series.rebuild_tier(tier);
            }
            !series.days.is_empty()
        });
    }

    /// Moves the cutoff back (a longer retention), so that older events are accepted again.
    /// The masked early part of the day at the old cutoff is dropped first, so that nothing
    /// retention already hid comes back and no membership changes.
    pub fn lower_cutoff(&mut self, cutoff: Millis) {
        if cutoff >= self.cutoff {
            return;
        }
        let (day, offset) = day_of(self.cutoff);
        let tier = self.tier;
        self.series.retain(|_, series| {
            if series
                .days
                .get(&day)
                .is_some_and(|b| b.count_before(offset) > 0)
            {
                let series = Arc::make_mut(series);
                if let Some(boundary) = series.days.remove(&day) {
                    if let Some(rest) = boundary.trimmed_before(offset) {
                        series.days.insert(day, Arc::new(rest));
                    }
                }
                series.events = series.days.values().map(|b| b.events()).sum();
                series.rebuild_tier(tier);
            }
            !series.days.is_empty()
        });
        self.cutoff = cutoff;
    }

    /// A window limited to retained time.
    pub fn clamp(&self, window: TimeWindow) -> TimeWindow {
        TimeWindow {
            start: window.start.max(self.cutoff),
            end: window.end,
        }
    }

    /// Hides the events of deleted users at once (see `erased`); [`EventStore::purge`] drops
    /// them later, in one pass for every user deleted meanwhile.
    pub fn remove_users(&mut self, users: &Bitmap) {
        if !users.is_empty() {
            *Arc::make_mut(&mut self.erased) |= users;
        }
    }

    /// Drops the events of every user deleted since the last purge from the day buckets and
    /// tiers; a no-op when there are none.
    pub fn purge(&mut self) {
        if self.erased.is_empty() {
            return;
        }
        let users = std::mem::take(Arc::make_mut(&mut self.erased));
        self.series.retain(|_, series| {
            let hit: Vec<i64> = series
                .days
                .iter()
                .filter(|(_, b)| b.holds_any(&users))
                .map(|(&d, _)| d)
                .collect();
            if !hit.is_empty() {
                let series = Arc::make_mut(series);
                for day in hit {
                    let Some(bucket) = series.days.remove(&day) else {
                        continue;
                    };
                    series.events -= bucket.events();
                    if let Some(kept) = bucket.without(&users) {
                        series.events += kept.events();
                        series.days.insert(day, Arc::new(kept));
                    }
                }
                if let Some(frequent) = &mut series.frequent {
                    Arc::make_mut(frequent).remove(&series.days, &users);
                }
            }
            !series.days.is_empty()
        });
    }

    /// Users with any event in `window` (retained or not), of any name: the users whose
    /// windows can change when an edge sweeps over it.
    pub fn users_in(&self, names: &[&str], window: TimeWindow) -> Bitmap {
        let parts: Vec<Bitmap> = names
            .iter()
            .filter_map(|n| self.series.get(*n))
            .map(|s| s.select(window, 1, None))
            .collect();
        union_all(&parts)
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.series.values().map(|s| s.heap_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(events: &[(DenseId, &str, Millis)]) -> EventStore {
        let mut batch = EventBatch::new();
        for &(user, name, ts) in events {
            let (day, offset) = day_of(ts);
            batch
                .entry(name.to_owned())
                .or_default()
                .entry(day)
                .or_default()
                .push(pack(user, offset));
        }
        let mut store = EventStore::new();
        store.add(batch);
        store
    }

    /// Ids in three counting blocks, at their edges too.
    fn user() -> impl proptest::strategy::Strategy<Value = DenseId> {
        proptest::prop_oneof![
            0u32..8,
            65_530u32..65_542,
            200_000u32..200_004,
            proptest::strategy::Just(u32::MAX)
        ]
    }

    fn ids(set: &Bitmap) -> Vec<u32> {
        set.iter().collect()
    }

    #[test]
    fn windows_are_half_open_and_exact_at_the_millisecond() {
        let s = store(&[(1, "buy", DAY_MS - 1), (2, "buy", DAY_MS), (3, "buy", -1)]);
        let buy = s.series("buy").cloned().unwrap_or_default();
        let w = |start, end| TimeWindow { start, end };
        assert_eq!(ids(&buy.select(w(DAY_MS - 1, DAY_MS), 1, None)), [1]);
        assert_eq!(ids(&buy.select(w(DAY_MS - 1, DAY_MS + 1), 1, None)), [1, 2]);
        assert_eq!(ids(&buy.select(w(-1, DAY_MS), 1, None)), [1, 3]);
        assert!(buy.select(w(DAY_MS, DAY_MS), 1, None).is_empty());
        let scope: Bitmap = [2, 3].into_iter().collect();
        assert_eq!(
            ids(&buy.select(w(-DAY_MS, 2 * DAY_MS), 1, Some(&scope))),
            [2, 3]
        );
    }

    #[test]
    fn at_least_counts_events_across_days_and_edges() {
        let s = store(&[
            (7, "view", 10),
            (7, "view", 10),
            (7, "view", DAY_MS + 5),
            (8, "view", DAY_MS + 5),
            (8, "view", 3 * DAY_MS - 1),
        ]);
        let view = s.series("view").cloned().unwrap_or_default();
        let w = |start, end| TimeWindow { start, end };
        assert_eq!(ids(&view.select(w(0, 3 * DAY_MS), 3, None)), [7]);
        assert_eq!(ids(&view.select(w(0, 3 * DAY_MS), 2, None)), [7, 8]);
        assert_eq!(ids(&view.select(w(11, 3 * DAY_MS), 2, None)), [8]);
        let one: Bitmap = [7].into_iter().collect();
        assert_eq!(ids(&view.select(w(0, 11), 2, Some(&one))), [7]);
    }

    proptest::proptest! {
        /// The per-user path (a write's few touched users) and the bulk path agree.
        #[test]
        fn bulk_and_one_by_one_answers_equal_a_count_of_the_events(
            events in proptest::collection::vec((user(), -3 * DAY_MS..3 * DAY_MS), 0..200),
            start in -4 * DAY_MS..4 * DAY_MS,
            length in 0..5 * DAY_MS,
            k in 1u64..5,
            scope in proptest::collection::btree_set(user(), 0..20),
        ) {
            let rows: Vec<(DenseId, &str, Millis)> =
                events.iter().map(|&(u, ts)| (u, "e", ts)).collect();
            let series = store(&rows).series("e").cloned().unwrap_or_default();
            let window = TimeWindow { start, end: start + length };
            let mut counts = std::collections::BTreeMap::<DenseId, u64>::new();
            for &(user, ts) in &events {
                if window.start <= ts && ts < window.end {
                    *counts.entry(user).or_default() += 1;
                }
            }
            let expected: Bitmap =
                counts.into_iter().filter(|&(_, n)| n >= k).map(|(u, _)| u).collect();
            proptest::prop_assert_eq!(&series.select_all(window, k), &expected);
            let scope: Bitmap = scope.into_iter().collect();
            proptest::prop_assert_eq!(series.select_each(window, k, &scope), &expected & &scope);
        }
    }

    proptest::proptest! {
        /// Windows with many users per id (a dense bitset) agree with a count of the events.
        #[test]
        fn dense_unions_equal_a_count_of_the_events(
            events in proptest::collection::vec((0u32..300, -2 * DAY_MS..2 * DAY_MS), 0..400),
            start in -3 * DAY_MS..3 * DAY_MS,
            length in 0..4 * DAY_MS,
        ) {
            let rows: Vec<(DenseId, &str, Millis)> =
                events.iter().map(|&(u, ts)| (u, "e", ts)).collect();
            let series = store(&rows).series("e").cloned().unwrap_or_default();
            let window = TimeWindow { start, end: start + length };
            let expected: Bitmap = events
                .iter()
                .filter(|&&(_, ts)| window.start <= ts && ts < window.end)
                .map(|&(u, _)| u)
                .collect();
            proptest::prop_assert_eq!(series.select(window, 1, None), expected);
        }
    }

    #[test]
    fn counts_beyond_a_byte_use_wide_counters() {
        let mut rows: Vec<(DenseId, &str, Millis)> = (0..300).map(|i| (70_000, "v", i)).collect();
        rows.extend((0..255).map(|i| (5, "v", DAY_MS + i)));
        let v = store(&rows).series("v").cloned().unwrap_or_default();
        let all = TimeWindow {
            start: 0,
            end: 2 * DAY_MS,
        };
        assert_eq!(ids(&v.select(all, 255, None)), [5, 70_000]);
        assert_eq!(ids(&v.select(all, 256, None)), [70_000]);
        assert_eq!(ids(&v.select(all, 300, None)), [70_000]);
        assert!(v.select(all, 301, None).is_empty());
        assert!(v.select(all, u64::MAX, None).is_empty());
    }

    #[test]
    fn retention_and_deletes_drop_events() {
        let mut s = store(&[
            (1, "a", 0),
            (2, "a", 2 * DAY_MS + 7),
            (3, "a", 2 * DAY_MS + 9),
            (2, "b", 5),
        ]);
        s.retain_from(DAY_MS + 3);
        assert_eq!(s.series("a").map(|x| x.events()), Some(2));
        assert!(s.series("b").is_none());
        s.retain_from(2 * DAY_MS + 8);
        let a = |s: &EventStore| s.names().find(|(n, _)| *n == "a").map(|(_, c)| c);
        assert_eq!(
            a(&s),
            Some(1),
            "the day at the cutoff counts only what is retained"
        );
        s.remove_users(&[3].into_iter().collect());
        let always = TimeWindow {
            start: 0,
            end: Millis::MAX,
        };
        let raw = s.series("a").map(|a| ids(&a.select(always, 1, None)));
        assert_eq!(
            raw,
            Some(vec![2, 3]),
            "a mark leaves the buckets as they were"
        );
        assert_eq!(ids(s.erased()), [3], "readers subtract the marked users");
        let held: Vec<u32> = s
            .buckets()
            .flat_map(|(_, _, b)| b.columns().0.to_vec())
            .collect();
        assert_eq!(held, [2], "a snapshot holds no event of a deleted user");
        s.purge();
        assert!(s.erased().is_empty());
        assert_eq!(a(&s), Some(0));
        assert_eq!(s.events(), 1, "user 2's event is hidden, not yet dropped");
        // A longer retention drops what the shorter one hid, then accepts older events again.
        s.lower_cutoff(0);
        assert_eq!(s.cutoff(), 0);
        assert_eq!(a(&s), None);
        assert_eq!(s.events(), 0);
    }
}
