//! The watch feed of one dataset: the segment transitions of recent writes, in publish order,
//! kept in a bounded in-memory ring that watchers read at their own pace.
//!
//! Writers append under the dataset's writer lock right after publishing a version, so the feed
//! order is the publish order. Appending never waits for a watcher: the ring evicts its oldest
//! entries when it is full, and a watcher whose place was evicted is told to start over. The
//! feed does not care what caused a transition (a write, a segment definition, the clock).
//!
//! A place in the feed is a [`Position`]: an entry's sequence number and an offset among its
//! user changes (entered first, then left), so that one huge entry (a bulk import) can be
//! delivered in many messages and resumed in the middle. A [`ResumeToken`] carries a position
//! with the feed's random epoch, so a token from another feed (a restarted server, another
//! replica, another dataset) is recognised and refused instead of resuming at a wrong place.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use super::state::SegmentTransition;
use super::Limits;
use crate::index::Bitmap;

/// User changes in one entry: a segment's entered and left users in one published write.
#[derive(Debug)]
pub struct FeedEntry {
    /// Monotonic within the feed, without gaps.
    pub seq: u64,
    /// User changes appended to the feed before this entry, to measure a watcher's lag.
    pub start: u64,
    pub segment: String,
    pub entered: Bitmap,
    pub left: Bitmap,
    /// The write deleted the segment.
    pub deleted: bool,
}

impl FeedEntry {
    /// User changes in the entry.
    pub fn len(&self) -> u64 {
        self.entered.len() + self.left.len()
    }

    /// Whether the entry holds no user change (a deleted empty segment).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` changes from `offset` on, as `(dense id, entered)`.
    pub fn changes(&self, offset: u64, limit: usize) -> Vec<(u32, bool)> {
        let entered_len = self.entered.len();
        let mut out = Vec::with_capacity(limit.min(self.len().saturating_sub(offset) as usize));
        if offset < entered_len {
            out.extend(
                from_rank(&self.entered, offset)
                    .take(limit)
                    .map(|id| (id, true)),
            );
        }
        let left_offset = offset.saturating_sub(entered_len);
        let room = limit - out.len();
        if room > 0 && left_offset < self.left.len() {
            out.extend(
                from_rank(&self.left, left_offset)
                    .take(room)
                    .map(|id| (id, false)),
            );
        }
        out
    }
}

/// The ids of `set` from the `rank`-th (0-based) on, without walking the ones before.
fn from_rank(set: &Bitmap, rank: u64) -> impl Iterator<Item = u32> + '_ {
    match u32::try_from(rank).ok().and_then(|rank| set.select(rank)) {
        Some(first) => set.range(first..),
        // Past the end: an empty iterator of the same type.
        None => set.range(1..1),
    }
}

/// A place in the feed: before change `offset` of entry `seq`. The head is `(next seq, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

/// How much history the ring keeps; the oldest entries go first.
#[derive(Debug, Clone, Copy)]
pub struct FeedBounds {
    pub max_entries: usize,
    pub max_changes: u64,
}

impl From<&Limits> for FeedBounds {
    fn from(limits: &Limits) -> Self {
        Self {
            max_entries: limits.watch_history_entries,
            max_changes: limits.watch_history_changes,
        }
    }
}

/// Why a position cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedError {
    /// The ring evicted it.
    Discarded,
    /// It is past the head or inside no entry: no token of this feed says so.
    Invalid,
}

/// The entries themselves, under the feed's lock.
#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<Arc<FeedEntry>>,
    /// The sequence number of the next entry.
    next_seq: u64,
    /// User changes ever appended.
    total_changes: u64,
    /// User changes in `entries`.
    held_changes: u64,
}

impl Ring {
    fn tail_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    fn get(&self, seq: u64) -> Result<Option<&Arc<FeedEntry>>, FeedError> {
        if seq == self.next_seq {
            return Ok(None);
        }
        if seq > self.next_seq {
            return Err(FeedError::Invalid);
        }
        let tail = self.tail_seq();
        if seq < tail {
            return Err(FeedError::Discarded);
        }
        let index = usize::try_from(seq - tail).map_err(|_| FeedError::Invalid)?;
        self.entries.get(index).map(Some).ok_or(FeedError::Invalid)
    }
}

/// One dataset's feed.
pub struct Feed {
    ring: Mutex<Ring>,
    /// The head's sequence number, for watchers to wait on without polling.
    head: watch::Sender<u64>,
    /// Random per feed: tells this feed's tokens from those of any other.
    epoch: u64,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            ring: Mutex::new(Ring::default()),
            head: watch::Sender::new(0),
            epoch: std::collections::hash_map::RandomState::new().hash_one(std::process::id()),
        }
    }
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.lock();
        f.debug_struct("Feed")
            .field("epoch", &self.epoch)
            .field("entries", &ring.entries.len())
            .field("next_seq", &ring.next_seq)
            .field("held_changes", &ring.held_changes)
            .finish()
    }
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The feed's epoch, carried in its tokens.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends one published write's transitions in order, evicts what exceeds `bounds` (but
    /// never the newest entry), and wakes watchers. Called under the dataset's writer lock.
    pub fn append(&self, transitions: Vec<SegmentTransition>, bounds: FeedBounds) {
        if transitions.is_empty() {
            return;
        }
        let head = {
            let mut ring = self.lock();
            for transition in transitions {
                let entry = FeedEntry {
                    seq: ring.next_seq,
                    start: ring.total_changes,
                    segment: transition.segment,
                    entered: transition.entered,
                    left: transition.left,
                    deleted: transition.deleted,
                };
                ring.next_seq += 1;
                ring.total_changes += entry.len();
                ring.held_changes += entry.len();
                ring.entries.push_back(Arc::new(entry));
            }
            while ring.entries.len() > 1
                && (ring.entries.len() > bounds.max_entries
                    || ring.held_changes > bounds.max_changes)
            {
                if let Some(oldest) = ring.entries.pop_front() {
                    ring.held_changes -= oldest.len();
                }
            }
            ring.next_seq
        };
        self.head.send_replace(head);
    }

    /// The position after everything appended so far.
    pub fn head(&self) -> Position {
        Position {
            seq: self.lock().next_seq,
            offset: 0,
        }
    }

    /// User changes ever appended.
    pub fn total_changes(&self) -> u64 {
        self.lock().total_changes
    }

    /// The entry at `seq`; `None` at the head.
    ///
    /// # Errors
    /// A sequence number evicted or never issued.
    pub fn entry(&self, seq: u64) -> Result<Option<Arc<FeedEntry>>, FeedError> {
        Ok(self.lock().get(seq)?.cloned())
    }

    /// User changes appended before `position`, checking that it is a place in the ring.
    ///
    /// # Errors
    /// A position evicted, past the head, or past the end of its entry.
    pub fn changes_before(&self, position: Position) -> Result<u64, FeedError> {
        let ring = self.lock();
        match ring.get(position.seq)? {
            None if position.offset == 0 => Ok(ring.total_changes),
            Some(entry) if position.offset < entry.len().max(1) => {
                Ok(entry.start + position.offset)
            }
            _ => Err(FeedError::Invalid),
        }
    }

    /// A receiver of the head's sequence number, changed on every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

/// What a watcher hands its caller to resume after the last message it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken {
    /// Tells the dataset the token belongs to (a hash of its name).
    pub dataset_tag: u32,
    pub epoch: u64,
    pub position: Position,
}

/// Prefix of every token: a format version, so that a later format can be told apart.
const TOKEN_PREFIX: &str = "w1";

impl ResumeToken {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{:08x}{:016x}{:016x}{:016x}",
            self.dataset_tag, self.epoch, self.position.seq, self.position.offset
        )
    }

    /// Parses [`ResumeToken::encode`]'s output; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(TOKEN_PREFIX)?;
        if hex.len() != 8 + 16 * 3 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let field = |from: usize, to: usize| u64::from_str_radix(&hex[from..to], 16).ok();
        Some(Self {
            dataset_tag: u32::try_from(field(0, 8)?).ok()?,
            epoch: field(8, 24)?,
            position: Position {
                seq: field(24, 40)?,
                offset: field(40, 56)?,
            },
        })
    }

    /// A stable hash of a dataset name (FNV-1a), the same in every process.
    pub fn dataset_tag(dataset: &str) -> u32 {
        dataset.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(segment: &str, entered: &[u32], left: &[u32]) -> SegmentTransition {
        SegmentTransition {
            segment: segment.to_owned(),
            entered: entered.iter().copied().collect(),
            left: left.iter().copied().collect(),
            deleted: false,
        }
    }

    const ROOMY: FeedBounds = FeedBounds {
        max_entries: 100,
        max_changes: 100,
    };

    #[test]
    fn entries_get_consecutive_sequence_numbers_and_offsets() {
        let feed = Feed::default();
        feed.append(
            vec![transition("a", &[1, 2], &[3]), transition("b", &[4], &[])],
            ROOMY,
        );
        assert_eq!(feed.head(), Position { seq: 2, offset: 0 });
        let b = feed.entry(1).unwrap().unwrap();
        assert_eq!((b.segment.as_str(), b.start), ("b", 3));
        assert_eq!(feed.changes_before(Position { seq: 0, offset: 2 }), Ok(2));
        assert_eq!(feed.changes_before(feed.head()), Ok(4));
        assert_eq!(
            feed.changes_before(Position { seq: 1, offset: 1 }),
            Err(FeedError::Invalid)
        );
        assert_eq!(feed.entry(3).unwrap_err(), FeedError::Invalid);
    }

    #[test]
    fn changes_resume_in_the_middle_of_an_entry() {
        let feed = Feed::default();
        feed.append(vec![transition("a", &[10, 20, 30], &[5, 6])], ROOMY);
        let entry = feed.entry(0).unwrap().unwrap();
        assert_eq!(entry.changes(0, 2), vec![(10, true), (20, true)]);
        assert_eq!(
            entry.changes(2, 10),
            vec![(30, true), (5, false), (6, false)]
        );
        assert_eq!(entry.changes(4, 10), vec![(6, false)]);
        assert!(entry.changes(5, 10).is_empty());
    }

    #[test]
    fn the_ring_evicts_the_oldest_but_keeps_the_newest() {
        let feed = Feed::default();
        let bounds = FeedBounds {
            max_entries: 2,
            max_changes: 3,
        };
        feed.append(vec![transition("a", &[1], &[])], bounds);
        feed.append(vec![transition("a", &[2], &[])], bounds);
        feed.append(vec![transition("a", &[3], &[])], bounds);
        assert_eq!(feed.entry(0).unwrap_err(), FeedError::Discarded);
        assert!(feed.entry(1).unwrap().is_some());
        feed.append(vec![transition("a", &[4, 5, 6, 7], &[])], bounds);
        assert_eq!(feed.entry(2).unwrap_err(), FeedError::Discarded);
        assert_eq!(feed.entry(3).unwrap().unwrap().len(), 4);
    }

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let token = ResumeToken {
            dataset_tag: ResumeToken::dataset_tag("default"),
            epoch: u64::MAX,
            position: Position { seq: 7, offset: 3 },
        };
        assert_eq!(ResumeToken::decode(&token.encode()), Some(token));
        for garbage in ["", "w1", "hello", "w1zz", &token.encode()[1..]] {
            assert_eq!(ResumeToken::decode(garbage), None, "{garbage}");
        }
    }
}
