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
use crate::persist::Position as LogPosition;

/// An entry's place in the log: its record and its index among the record's entries. The
/// index [`AFTER_RECORD`] names the place after all of a record's entries.
pub type LogKey = (LogPosition, u32);

/// The index of a [`LogKey`] after every entry of its record.
pub const AFTER_RECORD: u32 = u32::MAX;

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
    /// The log record that produced it and its index among that record's entries.
    pub key: LogKey,
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
    /// It names a log record this feed has not reached yet (a replica behind another).
    Ahead,
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
    /// The log record of the last append (entries or not).
    head_log: LogPosition,
    /// The newest log key whose entries the ring does not hold (evicted, or before it started).
    floor: LogKey,
}

impl Ring {
    fn tail_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The place of `key` (then `offset` changes into its entry), or of the first entry after
    /// it when no entry has that key.
    fn find(&self, key: LogKey, offset: u64) -> Result<Position, FeedError> {
        let resumable = key > self.floor || (key == self.floor && key.1 == AFTER_RECORD);
        if !resumable {
            return Err(FeedError::Discarded);
        }
        if key.0 > self.head_log {
            return Err(FeedError::Ahead);
        }
        let index = self.entries.partition_point(|e| e.key < key);
        match self.entries.get(index) {
            Some(entry) if entry.key == key && offset < entry.len().max(1) => Ok(Position {
                seq: entry.seq,
                offset,
            }),
            Some(entry) if entry.key > key && offset == 0 => Ok(Position {
                seq: entry.seq,
                offset: 0,
            }),
            None if offset == 0 => Ok(Position {
                seq: self.next_seq,
                offset: 0,
            }),
            _ => Err(FeedError::Invalid),
        }
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

    /// Appends one published write's transitions in order (`log`: the write's record), evicts
    /// what exceeds `bounds` (but never the newest entry), and wakes watchers. Called under the
    /// dataset's writer lock, for every publish.
    pub fn append(
        &self,
        transitions: Vec<SegmentTransition>,
        log: LogPosition,
        bounds: FeedBounds,
    ) {
        let head = {
            let mut ring = self.lock();
            ring.head_log = log;
            if transitions.is_empty() {
                return;
            }
            for (index, transition) in transitions.into_iter().enumerate() {
                let entry = FeedEntry {
                    seq: ring.next_seq,
                    start: ring.total_changes,
                    segment: transition.segment,
                    entered: transition.entered,
                    left: transition.left,
                    deleted: transition.deleted,
                    key: (log, u32::try_from(index).unwrap_or(AFTER_RECORD - 1)),
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
                    ring.floor = oldest.key;
                }
            }
            ring.next_seq
        };
        self.head.send_replace(head);
    }

    /// Starts the feed after log record `log` (a version loaded from storage): it holds no
    /// entry of that record or any before it. Entries held so far are dropped, so that watchers
    /// reading them learn they missed history.
    pub fn anchor(&self, log: LogPosition) {
        let mut ring = self.lock();
        ring.entries.clear();
        ring.held_changes = 0;
        ring.head_log = log;
        ring.floor = (log, AFTER_RECORD);
    }

    /// The log key and offset of a position: `AFTER_RECORD` of the last record at the head.
    /// `None` for an evicted position.
    pub fn key_of(&self, position: Position) -> Option<(LogKey, u64)> {
        let ring = self.lock();
        match ring.get(position.seq).ok()? {
            None => Some(((ring.head_log, AFTER_RECORD), 0)),
            Some(entry) => Some((entry.key, position.offset)),
        }
    }

    /// The position of a log key and offset (see [`LogToken`]).
    ///
    /// # Errors
    /// A key this feed does not hold (evicted, or from before it started), one it has not
    /// reached yet, or an offset outside its entry.
    pub fn find(&self, key: LogKey, offset: u64) -> Result<Position, FeedError> {
        self.lock().find(key, offset)
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

/// A place named by the log (see the module docs): valid on every replica of the same log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogToken {
    pub dataset_tag: u32,
    /// Tells the log (a data directory, a Redis prefix) the token belongs to.
    pub log_id: u64,
    pub key: LogKey,
    pub offset: u64,
}

/// Prefix of every log token.
const LOG_TOKEN_PREFIX: &str = "w2";

impl LogToken {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        format!(
            "{LOG_TOKEN_PREFIX}{:08x}{:016x}{:016x}{:016x}{:08x}{:016x}",
            self.dataset_tag,
            self.log_id,
            self.key.0.major,
            self.key.0.minor,
            self.key.1,
            self.offset
        )
    }

    /// Parses [`LogToken::encode`]'s output; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(LOG_TOKEN_PREFIX)?;
        if hex.len() != 8 + 16 * 3 + 8 + 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let field = |from: usize, to: usize| u64::from_str_radix(&hex[from..to], 16).ok();
        Some(Self {
            dataset_tag: u32::try_from(field(0, 8)?).ok()?,
            log_id: field(8, 24)?,
            key: (
                LogPosition {
                    major: field(24, 40)?,
                    minor: field(40, 56)?,
                },
                u32::try_from(field(56, 64)?).ok()?,
            ),
            offset: field(64, 80)?,
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
            LogPosition::START,
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
        feed.append(
            vec![transition("a", &[10, 20, 30], &[5, 6])],
            LogPosition::START,
            ROOMY,
        );
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
        feed.append(vec![transition("a", &[1], &[])], LogPosition::START, bounds);
        feed.append(vec![transition("a", &[2], &[])], LogPosition::START, bounds);
        feed.append(vec![transition("a", &[3], &[])], LogPosition::START, bounds);
        assert_eq!(feed.entry(0).unwrap_err(), FeedError::Discarded);
        assert!(feed.entry(1).unwrap().is_some());
        feed.append(
            vec![transition("a", &[4, 5, 6, 7], &[])],
            LogPosition::START,
            bounds,
        );
        assert_eq!(feed.entry(2).unwrap_err(), FeedError::Discarded);
        assert_eq!(feed.entry(3).unwrap().unwrap().len(), 4);
    }

    #[test]
    fn log_keys_find_places_across_feeds_that_applied_the_same_records() {
        let record = |n: u64| LogPosition { major: n, minor: 7 };
        let bounds = FeedBounds {
            max_entries: 3,
            max_changes: 100,
        };
        // Two feeds of the same records: one from the start, one anchored after record 2.
        let (whole, late) = (Feed::default(), Feed::default());
        late.anchor(record(2));
        for n in 1..=4 {
            let transitions = || {
                vec![
                    transition("a", &[n as u32], &[]),
                    transition("b", &[9], &[]),
                ]
            };
            whole.append(transitions(), record(n), bounds);
            if n > 2 {
                late.append(transitions(), record(n), ROOMY);
            }
        }
        // The whole feed evicted records 1 and 2 (3 entries kept) and part of 3.
        assert_eq!(whole.find((record(2), 1), 0), Err(FeedError::Discarded));
        assert_eq!(whole.find((record(3), 0), 0), Err(FeedError::Discarded));
        let at_b3 = whole.find((record(3), 1), 0).unwrap();
        assert_eq!(whole.key_of(at_b3), Some(((record(3), 1), 0)));
        assert_eq!(
            late.find((record(3), 1), 0).unwrap(),
            Position { seq: 1, offset: 0 }
        );
        // After all of record 2: the late feed starts there; the whole one lost it.
        assert_eq!(
            late.find((record(2), AFTER_RECORD), 0).unwrap(),
            Position { seq: 0, offset: 0 }
        );
        assert_eq!(late.find((record(2), 1), 0), Err(FeedError::Discarded));
        // The head is after the last record; a later record is ahead of both.
        let head = late.head();
        assert_eq!(late.key_of(head), Some(((record(4), AFTER_RECORD), 0)));
        assert_eq!(late.find((record(4), AFTER_RECORD), 0).unwrap(), head);
        assert_eq!(whole.find((record(5), 0), 0), Err(FeedError::Ahead));
        assert_eq!(late.find((record(4), 0), 5), Err(FeedError::Invalid));
        let token = LogToken {
            dataset_tag: 1,
            log_id: 2,
            key: (record(3), 1),
            offset: 0,
        };
        assert_eq!(LogToken::decode(&token.encode()), Some(token));
        assert_eq!(LogToken::decode("w1abc"), None);
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
