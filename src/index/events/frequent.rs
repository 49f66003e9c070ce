//! The frequent users of one busy event name, kept apart so that "at least k times" with a
//! large k reads them alone.
//!
//! A user with fewer than `hot_at` stored events of a name can never have `k >= hot_at` of
//! them in any window. Such queries therefore need only the users at or above it: a tenth or
//! less of a busy name's users, and none of the long tail that makes up most of its (user,
//! day) pairs. For those frequent users the tier keeps
//! - their count on each day (a copy of what the day buckets hold for them), and
//! - every `every` days a checkpoint row: each one's events on all earlier days.
//!
//! A window's whole days are then two rows subtracted, corrected by the frequent users' counts
//! of the days between each end and its nearest checkpoint (at most `every / 2` days), and its
//! two edge days are read from the day buckets' times, so that the result stays exact to the
//! millisecond while the work grows with the frequent users, not with the window.
//!
//! Memory: a byte per user id (the totals that say when a user becomes frequent), 8 bytes per
//! frequent user (id and stored total), 6 per frequent (user, day) pair and 2 per frequent
//! user per checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{DayBucket, DaySpan, PackedEvent, TimeWindow, DAY_MS};
use crate::index::keys::DenseId;
use crate::index::Bitmap;

/// When a name gets a tier and who is frequent in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierParams {
    /// Stored events of one name from which a user is frequent (below 255).
    pub hot_at: u8,
    /// Days between checkpoint rows.
    pub every: i64,
    /// Checkpoint rows at most, the latest kept: an event far older than the rest (a long
    /// retention and a timestamp in the wrong unit) must not cost a row per `every` days in
    /// between. Windows reaching further back read more days instead.
    pub max_rows: usize,
    /// (user, day) pairs from which a name gets a tier: below, walking every pair is as fast.
    pub min_pairs: u64,
    /// Users who became frequent wait for their places until this many do: placing them
    /// rewrites every day copy and row (~20 ms on a name of 20M pairs), while until then a
    /// query counts each one from the day buckets (~10 µs over 90 days).
    pub place_after: usize,
}

impl TierParams {
    /// The first and last checkpoint days for stored days `first..=last`: the last just after
    /// `last`, the first at or before `first`, at most `max_rows` in all.
    fn row_span(&self, first: i64, last: i64) -> (i64, i64) {
        let last_row = ceil_to(last.saturating_add(1), self.every);
        let span = (self.max_rows.max(1) as i64 - 1).saturating_mul(self.every);
        let first_row = (first.div_euclid(self.every) * self.every).max(last_row - span);
        (first_row, last_row)
    }

    /// Sixteen events, a row every sixteen days, from four million pairs on (a walk of
    /// every pair of a smaller name takes under ~15 ms, and the tier's byte per user id
    /// would cost more than it saves).
    pub const DEFAULT: Self = Self {
        hot_at: 16,
        every: 16,
        max_rows: 32,
        min_pairs: 1 << 22,
        place_after: 32,
    };
}

/// The size of one name's tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierStats {
    /// Frequent users.
    pub users: usize,
    /// Their (user, day) pairs.
    pub pairs: u64,
    /// Checkpoint rows.
    pub rows: usize,
    pub heap_bytes: usize,
}

/// Where a removed place moves to: nowhere.
const GONE: u32 = u32::MAX;

/// The total of a frequent user: they are no longer counted.
const HOT: u8 = u8::MAX;
/// Ids per chunk of the totals: small, so that a write copies little of what a snapshot shares.
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNK_BITS: u32 = 12;

/// Frequent users' counts on one day, by their place among the frequent users (ascending,
/// which is also the order of their ids), so that a query adds them without a lookup. A count
/// above 65,535 (a bot) takes several entries of the same place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HotDay {
    places: Vec<u32>,
    counts: Vec<u16>,
}

impl HotDay {
    /// Adds `n` events of `place` at the end, folded into its last entry when it is there
    /// already (only that one can be short of 65,535).
    fn push(&mut self, place: u32, mut n: u64) {
        if self.places.last() == Some(&place) {
            self.places.pop();
            n += self.counts.pop().map_or(0, u64::from);
        }
        if let Ok(small) = u16::try_from(n) {
            if small > 0 {
                self.places.push(place);
                self.counts.push(small);
            }
            return;
        }
        while n > 0 {
            let part = n.min(u64::from(u16::MAX));
            self.places.push(place);
            self.counts.push(part as u16);
            n -= part;
        }
    }

    /// This day with `adds` (ascending by place) added.
    fn merged(&self, adds: &[(u32, u32)]) -> Self {
        self.moved_and_merged(None, adds)
    }

    /// This day with every place moved to `moved[place]` (ascending too; [`GONE`] drops
    /// the entry), then `adds` (ascending by new place) added, in one pass.
    fn moved_and_merged(&self, moved: Option<&[u32]>, adds: &[(u32, u32)]) -> Self {
        let capacity = self.places.len() + adds.len();
        let mut out = HotDay {
            places: Vec::with_capacity(capacity),
            counts: Vec::with_capacity(capacity),
        };
        let (mut i, mut j) = (0, 0);
        while i < self.places.len() {
            let old = self.places[i];
            let mut sum = 0u64;
            while self.places.get(i) == Some(&old) {
                sum += u64::from(self.counts[i]);
                i += 1;
            }
            let place = moved.map_or(old, |m| m[old as usize]);
            if place == GONE {
                continue;
            }
            while let Some(&(p, n)) = adds.get(j).filter(|&&(p, _)| p < place) {
                out.push(p, u64::from(n));
                j += 1;
            }
            out.push(place, sum);
        }
        for &(p, n) in &adds[j..] {
            out.push(p, u64::from(n));
        }
        if out.places.len() + out.places.len() / 8 < capacity {
            out.shrink();
        }
        out
    }

    fn shrink(&mut self) {
        self.places.shrink_to_fit();
        self.counts.shrink_to_fit();
    }

    /// Adds (or subtracts) this day's counts to `counts`, by place.
    fn add_to(&self, counts: &mut [u32], negate: bool) {
        for (&place, &n) in self.places.iter().zip(&self.counts) {
            let n = u32::from(n);
            if let Some(count) = counts.get_mut(place as usize) {
                *count = if negate {
                    count.wrapping_sub(n)
                } else {
                    count.wrapping_add(n)
                };
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        4 * self.places.capacity() + 2 * self.counts.capacity()
    }
}

/// The frequent-user tier of one event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frequent {
    params: TierParams,
    /// Per chunk of 4,096 ids: each user's stored events while below `hot_at`, [`HOT`] once
    /// at or above.
    totals: Vec<Option<Arc<Vec<u8>>>>,
    /// Frequent users with a place, ascending.
    hot: Arc<Vec<DenseId>>,
    /// Frequent users still without one, ascending: queries count them one by one.
    pending: Arc<Vec<DenseId>>,
    /// Their counts, by day.
    days: BTreeMap<i64, Arc<HotDay>>,
    /// Each one's stored events: a user with more than 65,535 (a bot) may have more in a
    /// window than the rows can tell, and is counted from the day buckets instead.
    stored: Arc<Vec<u32>>,
    /// `rows[r][i]`: events of `hot[i]` on the days before `first_row + r * every`, modulo
    /// 2^16: only differences are read, exact for anyone but a bot.
    rows: Vec<Arc<Vec<u16>>>,
    /// The day of the first checkpoint, a multiple of `every`.
    first_row: i64,
}

/// Sums per user of the runs in a sorted day: `(user, events)` ascending.
fn runs(events: &[PackedEvent]) -> Vec<(DenseId, u32)> {
    let mut out: Vec<(DenseId, u32)> = Vec::new();
    for &event in events {
        let user = super::unpack(event).0;
        match out.last_mut() {
            Some((last, n)) if *last == user => *n += 1,
            _ => out.push((user, 1)),
        }
    }
    out
}

impl Frequent {
    /// The tier of the events in `days`, from scratch.
    pub fn build(params: TierParams, days: &BTreeMap<i64, Arc<DayBucket>>) -> Self {
        let mut totals: Vec<Option<Vec<u8>>> = Vec::new();
        for bucket in days.values() {
            for (i, &id) in bucket.ids.iter().enumerate() {
                let chunk = chunk_mut(&mut totals, id);
                let slot = &mut chunk[slot(id)];
                let n = u8::try_from(bucket.run(i).len()).unwrap_or(u8::MAX);
                *slot = slot.saturating_add(n).min(params.hot_at);
            }
        }
        // Frequent users, and each one's place among them (for the rows).
        let mut hot = Vec::new();
        let mut places: Vec<Option<Vec<u32>>> = vec![None; totals.len()];
        for (block, chunk) in totals.iter_mut().enumerate() {
            let Some(chunk) = chunk else { continue };
            for (low_id, total) in chunk.iter_mut().enumerate() {
                if *total >= params.hot_at {
                    *total = HOT;
                    let id = ((block as u32) << CHUNK_BITS) | low_id as u32;
                    let place = places[block].get_or_insert_with(|| vec![0; CHUNK]);
                    place[low_id] = hot.len() as u32;
                    hot.push(id);
                }
            }
        }
        let mut tier = Self {
            params,
            totals: totals.into_iter().map(|c| c.map(Arc::new)).collect(),
            stored: Arc::new(vec![0; hot.len()]),
            hot: Arc::new(hot),
            pending: Arc::default(),
            days: BTreeMap::new(),
            rows: Vec::new(),
            first_row: 0,
        };
        let (Some(&first), Some(&last)) = (days.keys().next(), days.keys().next_back()) else {
            return tier;
        };
        let (first_row, last_row) = params.row_span(first, last);
        tier.first_row = first_row;
        let mut sums = vec![0u16; tier.hot.len()];
        let mut stored = vec![0u32; tier.hot.len()];
        let mut boundary = tier.first_row;
        for (&day, bucket) in days {
            while boundary <= day {
                tier.rows.push(Arc::new(sums.clone()));
                boundary += params.every;
            }
            let mut hot_day = HotDay::default();
            for (i, &id) in bucket.ids.iter().enumerate() {
                if tier.total(id) == HOT {
                    let n = bucket.run(i).len() as u32;
                    let place = places[chunk_of(id)].as_ref().map_or(0, |p| p[slot(id)]);
                    sums[place as usize] = sums[place as usize].wrapping_add(n as u16);
                    stored[place as usize] = stored[place as usize].saturating_add(n);
                    hot_day.push(place, u64::from(n));
                }
            }
            if !hot_day.places.is_empty() {
                hot_day.shrink();
                tier.days.insert(day, Arc::new(hot_day));
            }
        }
        while boundary <= last_row {
            tier.rows.push(Arc::new(sums.clone()));
            boundary += params.every;
        }
        tier.stored = Arc::new(stored);
        tier
    }

    /// The stored events of `id` while below `hot_at`, or [`HOT`].
    fn total(&self, id: DenseId) -> u8 {
        self.totals
            .get(chunk_of(id))
            .and_then(Option::as_ref)
            .map_or(0, |chunk| chunk[slot(id)])
    }

    fn set_total(&mut self, id: DenseId, total: u8) {
        let block = chunk_of(id);
        if self.totals.len() <= block {
            self.totals.resize(block + 1, None);
        }
        let chunk = self.totals[block].get_or_insert_with(|| Arc::new(vec![0; CHUNK]));
        Arc::make_mut(chunk)[slot(id)] = total;
    }

    /// Frequent users, placed or not.
    pub fn users(&self) -> usize {
        self.hot.len() + self.pending.len()
    }

    /// The users at or above which a count can only come from frequent users.
    pub fn hot_at(&self) -> u8 {
        self.params.hot_at
    }

    /// Takes in a write: `batch` holds its events of this name per day (sorted), already
    /// merged into `days`. Frequent users' counts and rows grow; users who reach `hot_at`
    /// become frequent, with their counts of every day looked up.
    pub fn add(
        &mut self,
        days: &BTreeMap<i64, Arc<DayBucket>>,
        batch: &BTreeMap<i64, Vec<PackedEvent>>,
    ) {
        if batch.is_empty() {
            return;
        }
        self.cover(days);
        let mut rising: BTreeMap<DenseId, u32> = BTreeMap::new();
        for (&day, events) in batch {
            let (hot_adds, cold): (Vec<_>, Vec<_>) = runs(events)
                .into_iter()
                .partition(|&(id, _)| self.total(id) == HOT);
            for (id, n) in cold {
                let sum = rising.entry(id).or_default();
                *sum = sum.saturating_add(n);
            }
            self.add_hot(day, &hot_adds);
        }
        let mut promoted = Vec::new();
        for (id, n) in rising {
            let total = u32::from(self.total(id)).saturating_add(n);
            if total >= u32::from(self.params.hot_at) {
                promoted.push(id);
            } else {
                self.set_total(id, total as u8);
            }
        }
        if !promoted.is_empty() {
            for &id in &promoted {
                self.set_total(id, HOT);
            }
            let pending = Arc::make_mut(&mut self.pending);
            pending.extend(promoted);
            pending.sort_unstable();
            if pending.len() >= self.params.place_after {
                self.place_pending(days);
            }
        }
    }

    /// Moves the checkpoint rows to the span that `days` call for (a write already merged
    /// into them but not yet counted, or a delete already taken out). A new row after the
    /// last repeats it; one before the first is summed from the day copies.
    fn cover(&mut self, days: &BTreeMap<i64, Arc<DayBucket>>) {
        let (Some(&first), Some(&last)) = (days.keys().next(), days.keys().next_back()) else {
            return;
        };
        let every = self.params.every;
        let (first_row, last_row) = self.params.row_span(first, last);
        let mut rows = Vec::with_capacity(((last_row - first_row) / every + 1) as usize);
        let mut boundary = first_row;
        while boundary <= last_row {
            let row = match self.rows.last() {
                Some(row) if boundary > self.last_row() => row.clone(),
                Some(_) if boundary >= self.first_row => {
                    self.rows[((boundary - self.first_row) / every) as usize].clone()
                }
                _ => Arc::new(self.row_at(boundary)),
            };
            rows.push(row);
            boundary += every;
        }
        self.rows = rows;
        self.first_row = first_row;
    }

    /// The frequent users' events on the days before `boundary`, from the day copies.
    fn row_at(&self, boundary: i64) -> Vec<u16> {
        let mut row = vec![0u32; self.hot.len()];
        for day in self.days.range(..boundary).map(|(_, d)| d) {
            day.add_to(&mut row, false);
        }
        row.into_iter().map(|n| n as u16).collect()
    }

    fn last_row(&self) -> i64 {
        self.first_row + (self.rows.len() as i64 - 1) * self.params.every
    }

    /// The index of the first row whose checkpoint comes after `day`.
    fn row_after(&self, day: i64) -> usize {
        let after = ((day - self.first_row).div_euclid(self.params.every) + 1).max(0) as usize;
        after.min(self.rows.len())
    }

    /// Adds counts of frequent users (ascending) on `day`.
    fn add_hot(&mut self, day: i64, adds: &[(DenseId, u32)]) {
        let places: Vec<(u32, u32)> = adds
            .iter()
            .filter_map(|&(id, n)| self.hot.binary_search(&id).ok().map(|p| (p as u32, n)))
            .collect();
        if places.is_empty() {
            return;
        }
        self.merge_day(day, &places);
        let stored = Arc::make_mut(&mut self.stored);
        for &(place, n) in &places {
            stored[place as usize] = stored[place as usize].saturating_add(n);
        }
        let from = self.row_after(day);
        for row in &mut self.rows[from..] {
            let row = Arc::make_mut(row);
            for &(place, n) in &places {
                row[place as usize] = row[place as usize].wrapping_add(n as u16);
            }
        }
    }

    fn merge_day(&mut self, day: i64, places: &[(u32, u32)]) {
        let merged = match self.days.get(&day) {
            Some(existing) => existing.merged(places),
            None => HotDay::default().merged(places),
        };
        self.days.insert(day, Arc::new(merged));
    }

    /// Gives the pending frequent users their places: the places after theirs move up, and
    /// their counts of every day, looked up in `days`, go into the day copies and into every
    /// row as new columns.
    fn place_pending(&mut self, days: &BTreeMap<i64, Arc<DayBucket>>) {
        if self.pending.is_empty() {
            return;
        }
        let promoted = std::mem::take(&mut self.pending);
        let mut hot = Vec::with_capacity(self.hot.len() + promoted.len());
        let mut moved = Vec::with_capacity(self.hot.len());
        let mut new_places = Vec::with_capacity(promoted.len());
        let (mut i, mut j) = (0, 0);
        while i < self.hot.len() || j < promoted.len() {
            if j == promoted.len() || (i < self.hot.len() && self.hot[i] < promoted[j]) {
                moved.push(hot.len() as u32);
                hot.push(self.hot[i]);
                i += 1;
            } else {
                new_places.push(hot.len() as u32);
                hot.push(promoted[j]);
                j += 1;
            }
        }
        let mut columns = vec![vec![0u16; self.rows.len()]; promoted.len()];
        let mut totals = vec![0u32; promoted.len()];
        let mut new_days = BTreeMap::new();
        for (&day, bucket) in days {
            let from = self.row_after(day);
            let mut adds = Vec::new();
            for (j, &id) in promoted.iter().enumerate() {
                let n = bucket.count_of(id, 0, DAY_MS as u32);
                if n == 0 {
                    continue;
                }
                adds.push((new_places[j], n));
                totals[j] = totals[j].saturating_add(n);
                for sum in &mut columns[j][from..] {
                    *sum = sum.wrapping_add(n as u16);
                }
            }
            let old = self.days.get(&day).map(|d| &**d);
            if old.is_some() || !adds.is_empty() {
                let merged = old
                    .unwrap_or(&HotDay::default())
                    .moved_and_merged(Some(&moved), &adds);
                new_days.insert(day, Arc::new(merged));
            }
        }
        self.days = new_days;
        for (r, row) in self.rows.iter_mut().enumerate() {
            let new_column = |j: usize| columns[j][r];
            *row = Arc::new(widen(row, &moved, &new_places, new_column));
        }
        self.stored = Arc::new(widen(&self.stored, &moved, &new_places, |j| totals[j]));
        self.hot = Arc::new(hot);
    }

    /// Takes out deleted `users`, whose events `days` no longer hold: their totals are
    /// cleared, and frequent ones lose their places (the places after move down).
    pub fn remove(&mut self, days: &BTreeMap<i64, Arc<DayBucket>>, users: &Bitmap) {
        let mut cleared = Vec::new();
        for id in users {
            if self.total(id) != 0 {
                self.set_total(id, 0);
                cleared.push(chunk_of(id));
            }
        }
        // Chunks left empty go, as a build would not make them.
        for chunk in cleared {
            if self.totals[chunk]
                .as_ref()
                .is_some_and(|c| c.iter().all(|&t| t == 0))
            {
                self.totals[chunk] = None;
            }
        }
        while self.totals.last().is_some_and(Option::is_none) {
            self.totals.pop();
        }
        if self.pending.iter().any(|&id| users.contains(id)) {
            Arc::make_mut(&mut self.pending).retain(|&id| !users.contains(id));
        }
        let gone: Vec<usize> = users
            .iter()
            .filter_map(|id| self.hot.binary_search(&id).ok())
            .collect();
        if !gone.is_empty() {
            self.unplace(&gone);
        }
        self.cover(days);
    }

    /// Drops the places `gone` (ascending) from every day copy and row.
    fn unplace(&mut self, gone: &[usize]) {
        let mut moved = vec![GONE; self.hot.len()];
        let mut hot = Vec::with_capacity(self.hot.len() - gone.len());
        let mut gone = gone.iter().peekable();
        for (place, &id) in self.hot.iter().enumerate() {
            if gone.next_if_eq(&&place).is_none() {
                moved[place] = hot.len() as u32;
                hot.push(id);
            }
        }
        self.days.retain(|_, day| {
            *day = Arc::new(day.moved_and_merged(Some(&moved), &[]));
            !day.places.is_empty()
        });
        for row in &mut self.rows {
            *row = Arc::new(narrow(row, &moved));
        }
        self.stored = Arc::new(narrow(&self.stored, &moved));
        self.hot = Arc::new(hot);
    }

    /// The checkpoint nearest to `day`, as (day, row index).
    fn row_near(&self, day: i64) -> Option<(i64, usize)> {
        if self.rows.is_empty() {
            return None;
        }
        let every = self.params.every;
        let nearest = (day + every / 2).div_euclid(every) * every;
        let at = nearest.clamp(self.first_row, self.last_row());
        Some((at, ((at - self.first_row) / every) as usize))
    }

    /// Users with at least `k` events in `window`, for `k >= hot_at`: only frequent users
    /// can have that many. `days` are the name's day buckets, for the edge days' times.
    /// Returns the users found, and the frequent users the tier cannot count (those
    /// waiting for a place, and bots), for the caller to count one by one.
    pub fn select(
        &self,
        days: &BTreeMap<i64, Arc<DayBucket>>,
        window: TimeWindow,
        k: u32,
    ) -> (Bitmap, Bitmap) {
        if window.start >= window.end || k < u32::from(self.params.hot_at) {
            return (Bitmap::new(), Bitmap::new());
        }
        let first = window.start.div_euclid(DAY_MS);
        let last = (window.end - 1).div_euclid(DAY_MS);
        let whole_from = first + i64::from(window.start.rem_euclid(DAY_MS) != 0);
        let whole_to = (last + 1 - i64::from(window.end.rem_euclid(DAY_MS) != 0)).max(whole_from);
        let edges: Vec<(i64, &DayBucket, DaySpan)> = [first, last]
            .into_iter()
            .enumerate()
            .filter(|&(i, day)| (i == 0 || day != first) && !(whole_from..whole_to).contains(&day))
            .filter_map(|(_, day)| Some((day, &**days.get(&day)?, DaySpan::of(day, window))))
            .collect();
        // Whole days: two rows and the days between each end and its checkpoint, or when
        // the window is too short for two checkpoints, every day.
        let mut counts = vec![0u32; self.hot.len()];
        let add_days = |counts: &mut [u32], from: i64, to: i64, negate: bool| {
            if from < to {
                for day in self.days.range(from..to).map(|(_, d)| d) {
                    day.add_to(counts, negate);
                }
            }
        };
        match (self.row_near(whole_from), self.row_near(whole_to)) {
            (Some((c0, r0)), Some((c1, r1))) if c0 < c1 => {
                let (before, after) = (&self.rows[r0], &self.rows[r1]);
                for ((count, a), b) in counts.iter_mut().zip(after.iter()).zip(before.iter()) {
                    *count = u32::from(a.wrapping_sub(*b));
                }
                add_days(&mut counts, whole_from, c0, false);
                add_days(&mut counts, c0, whole_from, true);
                add_days(&mut counts, c1, whole_to, false);
                add_days(&mut counts, whole_to, c1, true);
            }
            _ => add_days(&mut counts, whole_from, whole_to, false),
        }
        for (day, bucket, span) in edges {
            if let Some(hot_day) = self.days.get(&day) {
                self.add_edge(&mut counts, hot_day, bucket, span);
            }
        }
        let mut reached = Vec::new();
        let mut bots = Vec::new();
        for ((&n, &stored), &id) in counts.iter().zip(self.stored.iter()).zip(self.hot.iter()) {
            if stored > u32::from(u16::MAX) {
                bots.push(id);
            } else if n >= k {
                reached.push(id);
            }
        }
        let uncounted: Bitmap = bots
            .into_iter()
            .chain(self.pending.iter().copied())
            .collect();
        (
            Bitmap::from_sorted_iter(reached).unwrap_or_default(),
            uncounted,
        )
    }

    /// Adds the frequent users' events of a partial day: their runs in the day bucket, found
    /// by walking it alongside the day's frequent users (both ascending by id).
    fn add_edge(&self, counts: &mut [u32], hot_day: &HotDay, bucket: &DayBucket, span: DaySpan) {
        let mut at = 0;
        let mut last = None;
        for &place in &hot_day.places {
            // A bot's count takes several entries; its run is read once.
            if last.replace(place) == Some(place) {
                continue;
            }
            let id = self.hot[place as usize];
            // Frequent users are a large share of a busy day: stepping beats searching.
            while bucket.ids.get(at).is_some_and(|&x| x < id) {
                at += 1;
            }
            if bucket.ids.get(at) == Some(&id) {
                let n = bucket.count_run(at, span.lo, span.hi);
                counts[place as usize] = counts[place as usize].wrapping_add(n);
            }
        }
    }

    /// What the tier holds.
    pub fn stats(&self) -> TierStats {
        TierStats {
            users: self.users(),
            pairs: self.days.values().map(|d| d.places.len() as u64).sum(),
            rows: self.rows.len(),
            heap_bytes: self.heap_bytes(),
        }
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        let totals = self.totals.iter().flatten().count() * CHUNK + self.totals.len() * 8;
        let days: usize = self.days.values().map(|d| d.heap_bytes() + 48).sum();
        let rows: usize = self.rows.iter().map(|r| r.capacity() * 2).sum();
        totals
            + days
            + rows
            + (self.hot.capacity() + self.stored.capacity()) * 4
            + self.pending.capacity() * 4
    }
}

/// `old` with its places moved to `moved` and `new(j)` at `new_places[j]`.
fn widen<T: Copy + Default>(
    old: &[T],
    moved: &[u32],
    new_places: &[u32],
    new: impl Fn(usize) -> T,
) -> Vec<T> {
    let mut out = vec![T::default(); old.len() + new_places.len()];
    for (&to, &n) in moved.iter().zip(old) {
        out[to as usize] = n;
    }
    for (j, &to) in new_places.iter().enumerate() {
        out[to as usize] = new(j);
    }
    out
}

/// `old` without the places `moved` marks [`GONE`].
fn narrow<T: Copy>(old: &[T], moved: &[u32]) -> Vec<T> {
    old.iter()
        .zip(moved)
        .filter(|&(_, &to)| to != GONE)
        .map(|(&n, _)| n)
        .collect()
}

fn chunk_of(id: DenseId) -> usize {
    (id >> CHUNK_BITS) as usize
}

fn slot(id: DenseId) -> usize {
    id as usize & (CHUNK - 1)
}

fn chunk_mut(chunks: &mut Vec<Option<Vec<u8>>>, id: DenseId) -> &mut Vec<u8> {
    let block = chunk_of(id);
    if chunks.len() <= block {
        chunks.resize(block + 1, None);
    }
    chunks[block].get_or_insert_with(|| vec![0; CHUNK])
}

/// `n` rounded up to a multiple of `step`.
fn ceil_to(n: i64, step: i64) -> i64 {
    n.div_euclid(step) * step + if n.rem_euclid(step) == 0 { 0 } else { step }
}

#[cfg(test)]
mod tests {
    use super::super::{day_of, pack, EventBatch, EventStore};
    use super::*;
    use crate::time::Millis;
    use proptest::prelude::*;

    const PARAMS: TierParams = TierParams {
        hot_at: 3,
        every: 2,
        max_rows: 100,
        min_pairs: 0,
        place_after: 1,
    };

    fn params() -> impl Strategy<Value = TierParams> {
        (2u8..5, 1i64..5, 1usize..9, 1usize..4).prop_map(
            |(hot_at, every, max_rows, place_after)| TierParams {
                hot_at,
                every,
                max_rows,
                min_pairs: 0,
                place_after,
            },
        )
    }

    /// A tier as a string short enough to read in a failure: the totals as (id, total)
    /// with the chunks held.
    fn summary(tier: &Frequent) -> String {
        let chunks: Vec<usize> = (0..tier.totals.len())
            .filter(|&c| tier.totals[c].is_some())
            .collect();
        let totals: Vec<(usize, u8)> = tier
            .totals
            .iter()
            .enumerate()
            .flat_map(|(c, chunk)| {
                chunk
                    .iter()
                    .flat_map(move |t| t.iter().enumerate().map(move |(i, &n)| (c * CHUNK + i, n)))
            })
            .filter(|&(_, n)| n != 0)
            .collect();
        format!(
            "chunks {chunks:?} of {}, totals {totals:?}, hot {:?}, pending {:?}, days {:?}, \
             stored {:?}, rows {:?} from {}",
            tier.totals.len(),
            tier.hot,
            tier.pending,
            tier.days,
            tier.stored,
            tier.rows,
            tier.first_row
        )
    }

    /// The tier with its pending users placed, as a build from scratch places them.
    fn placed(tier: &Frequent, days: &BTreeMap<i64, Arc<DayBucket>>) -> Frequent {
        let mut tier = tier.clone();
        tier.place_pending(days);
        tier
    }

    fn batch(events: &[(DenseId, Millis)]) -> EventBatch {
        let mut batch = EventBatch::new();
        for &(user, ts) in events {
            let (day, offset) = day_of(ts);
            batch
                .entry("e".to_owned())
                .or_default()
                .entry(day)
                .or_default()
                .push(pack(user, offset));
        }
        batch
    }

    /// Users on both sides of chunk and block boundaries, and far up the id space.
    fn user() -> impl Strategy<Value = DenseId> {
        prop_oneof![0u32..6, 4_094u32..4_098, 65_534u32..65_538, Just(1 << 24)]
    }

    fn event() -> impl Strategy<Value = (DenseId, Millis)> {
        (user(), -6 * DAY_MS..6 * DAY_MS)
    }

    #[derive(Debug, Clone)]
    enum Step {
        Add(Vec<(DenseId, Millis)>),
        Retain(Millis),
        Lengthen(Millis),
        Delete(Vec<DenseId>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => proptest::collection::vec(event(), 1..4).prop_map(Step::Add),
            1 => (-6 * DAY_MS..6 * DAY_MS).prop_map(Step::Retain),
            1 => (-8 * DAY_MS..0).prop_map(Step::Lengthen),
            1 => proptest::collection::vec(user(), 1..3).prop_map(Step::Delete),
        ]
    }

    /// Users with at least `k` of `events` in `window`, counted one by one.
    fn counted(events: &[(DenseId, Millis)], window: TimeWindow, k: u64) -> Bitmap {
        let mut counts = BTreeMap::<DenseId, u64>::new();
        for &(user, ts) in events {
            if window.start <= ts && ts < window.end {
                *counts.entry(user).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .filter(|&(_, n)| n >= k)
            .map(|(u, _)| u)
            .collect()
    }

    proptest! {
        /// After every write, retention change and delete, the tier equals one built from
        /// scratch, and "at least k" through it equals a count of the events.
        #[test]
        fn tier_follows_writes_and_answers_like_a_count(
            params in params(),
            first in proptest::collection::vec(event(), 30..120),
            steps in proptest::collection::vec(step(), 1..12),
            windows in proptest::collection::vec(
                (-7 * DAY_MS..7 * DAY_MS, 0..10 * DAY_MS, 1u64..8), 1..6),
        ) {
            let mut store = EventStore::with_tier(params);
            let mut model = first.clone();
            store.add(batch(&first));
            for step in std::iter::once(Step::Add(Vec::new())).chain(steps) {
                match step {
                    Step::Add(events) => {
                        let kept: Vec<_> =
                            events.into_iter().filter(|&(_, ts)| ts >= store.cutoff()).collect();
                        model.extend(&kept);
                        store.add(batch(&kept));
                    }
                    Step::Retain(cutoff) => {
                        store.retain_from(cutoff);
                        model.retain(|&(_, ts)| ts >= store.cutoff());
                    }
                    Step::Lengthen(cutoff) => store.lower_cutoff(cutoff),
                    Step::Delete(users) => {
                        store.remove_users(&users.iter().copied().collect());
                        store.purge();
                        model.retain(|(u, _)| !users.contains(u));
                    }
                }
                let Some(series) = store.series("e") else {
                    prop_assert!(model.is_empty());
                    continue;
                };
                let rows = series.frequent.as_ref().map_or(0, |t| t.rows.len());
                prop_assert!(rows <= params.max_rows.max(1), "{} rows", rows);
                let tier = series.frequent.as_deref().map(|t| placed(t, &series.days));
                let built = Frequent::build(params, &series.days);
                if let Some(tier) = &tier {
                    prop_assert_eq!(summary(tier), summary(&built));
                }
                prop_assert_eq!(tier, Some(built));
                for &(start, length, k) in &windows {
                    let window = store.clamp(TimeWindow { start, end: start + length });
                    let expected = counted(&model, window, k);
                    prop_assert_eq!(
                        series.select(window, k, None),
                        expected.clone(),
                        "window {:?}, k {}", window, k
                    );
                    if let (Some(tier), Ok(k)) = (&series.frequent, u32::try_from(k)) {
                        if k >= u32::from(tier.hot_at()) {
                            prop_assert_eq!(series.select_frequent(tier, window, k), expected);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_event_far_older_than_the_rest_costs_no_rows_in_between() {
        let params = TierParams {
            max_rows: 4,
            ..PARAMS
        };
        let mut store = EventStore::with_tier(params);
        let recent: Vec<(DenseId, Millis)> = (0..40u32)
            .map(|i| (i % 4, i64::from(i) * 3_600_000))
            .collect();
        store.add(batch(&recent));
        store.add(batch(&[(1, -100_000 * DAY_MS)]));
        let Some(series) = store.series("e") else {
            panic!("no series")
        };
        let tier = series.frequent.as_deref().map(|t| placed(t, &series.days));
        assert_eq!(tier.as_ref().map(|t| t.rows.len()), Some(4));
        assert_eq!(tier, Some(Frequent::build(params, &series.days)));
        let since = |start| TimeWindow {
            start,
            end: 2 * DAY_MS,
        };
        assert_eq!(series.select(since(0), 10, None).len(), 4);
        assert_eq!(
            series
                .select(since(-100_000 * DAY_MS), 11, None)
                .iter()
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn counts_beyond_sixteen_bits_take_several_entries() {
        let params = TierParams { every: 1, ..PARAMS };
        let mut store = EventStore::with_tier(params);
        let bot: Vec<(DenseId, Millis)> = (0..70_000).map(|i| (9, i)).collect();
        store.add(batch(&bot));
        store.add(batch(&[(9, 1), (9, DAY_MS), (4, 0), (4, 1), (4, 2)]));
        let Some(series) = store.series("e") else {
            panic!("no series")
        };
        assert_eq!(
            series.frequent.as_deref(),
            Some(&Frequent::build(params, &series.days))
        );
        let at_least = |start, k| {
            let window = TimeWindow {
                start,
                end: 2 * DAY_MS,
            };
            series.select(window, k, None).iter().collect::<Vec<_>>()
        };
        assert_eq!(at_least(-DAY_MS, 70_002), [9]);
        assert!(at_least(-DAY_MS, 70_003).is_empty());
        assert_eq!(at_least(1, 70_000), [9], "the edge day reads times");
        assert!(at_least(2, 70_000).is_empty());
        assert_eq!(at_least(0, 3), [4, 9]);
    }

    #[test]
    fn a_user_becomes_frequent_when_their_events_reach_the_threshold() {
        let mut store = EventStore::with_tier(PARAMS);
        store.add(batch(&[(1, 0), (1, DAY_MS), (2, 0)]));
        let tier = |s: &EventStore| s.series("e").and_then(|s| s.frequent.clone());
        assert_eq!(tier(&store).map(|t| t.hot.to_vec()), Some(vec![]));
        store.add(batch(&[(1, 5 * DAY_MS)]));
        let t = tier(&store).unwrap_or_else(|| panic!("no tier"));
        assert_eq!(t.hot.to_vec(), [1]);
        assert_eq!(t.total(2), 1);
        let all = TimeWindow {
            start: 0,
            end: 6 * DAY_MS,
        };
        let Some(series) = store.series("e") else {
            panic!("no series")
        };
        let found = series.select_frequent(&t, all, 3);
        assert_eq!(found.iter().collect::<Vec<_>>(), [1]);
    }
}
