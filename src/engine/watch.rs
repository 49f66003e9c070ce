//! Watching saved segments: a [`Watcher`] reads its dataset's [`Feed`](super::feed::Feed) from
//! a position and hands out batches of membership changes of the segments it watches.
//!
//! A watcher copies nothing ahead of its caller: it reads the ring only when asked for the next
//! batch, so a caller that stops reading costs a position and one entry, never a growing buffer,
//! and writers never wait for it. Such a caller does fall behind; see [`Watcher::next`].

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

use super::error::{EngineError, Result};
use super::feed::{FeedEntry, FeedError, LogToken, Position, ResumeToken};
use super::{dataset_name, Dataset, Engine};

/// Changes in one batch at most, so that a bulk import streams in many small messages.
pub const MAX_CHANGES_PER_BATCH: usize = 1_000;

/// Feed entries skipped (other segments' changes) before a watcher lets other tasks run.
const MAX_ENTRIES_PER_SCAN: usize = 4_096;

/// A change as read from the feed: its entry (which names the segment), the user's dense id,
/// and whether the user entered.
type RawChange = (Arc<FeedEntry>, u32, bool);

/// Which way a user crossed a segment's boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Entered,
    Left,
}

/// One user entering or leaving one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub segment: String,
    /// The external id.
    pub user_id: String,
    pub kind: ChangeKind,
}

/// Changes in feed order, and the token that resumes right after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub changes: Vec<MembershipChange>,
    pub resume_token: String,
}

/// A reader of one dataset's feed, filtered to some saved segments.
#[derive(Debug)]
pub struct Watcher {
    /// Holds the feed and resolves dense ids through its current version.
    dataset: Arc<Dataset>,
    segments: BTreeSet<String>,
    dataset_tag: u32,
    /// The next change to read.
    position: Position,
    /// User changes appended before `position`, to measure the lag.
    position_changes: u64,
    /// The lag may grow this far past `initial_lag` before the stream is ended.
    max_lag: u64,
    /// The lag when the watcher started: a caller resuming with a backlog may work it off.
    initial_lag: u64,
    /// The token of the last batch handed out: where a caller that was cut off resumes.
    delivered: String,
    /// With storage on, the log that tokens name by record, valid on every replica.
    log_id: Option<u64>,
    /// Wakes the watcher on appends.
    head: watch::Receiver<u64>,
    /// The first batch (no changes, the starting token) has been handed out.
    greeted: bool,
    /// A watched segment whose deletion has been read; the next call reports it.
    deleted: Option<String>,
    /// Counts this watcher among the open ones while it lives.
    _open: super::stats::Open,
}

impl Engine {
    /// Starts watching saved segments of a dataset, after `resume_token` (empty: from now).
    ///
    /// # Errors
    /// An unknown dataset or segment, no segment, or a token that is malformed, belongs to
    /// another dataset, or points into history this server no longer (or never) had.
    pub fn watch(
        &self,
        dataset: &str,
        segment_ids: &[String],
        resume_token: &str,
    ) -> Result<Watcher> {
        let name = dataset_name(dataset)?;
        if segment_ids.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "segment_ids",
                reason: "name at least one saved segment".into(),
            });
        }
        let handle = self.dataset(name)?;
        // Subscribed before the head is read, so that no append after it goes unnoticed.
        let head = handle.feed.subscribe();
        let dataset_tag = ResumeToken::dataset_tag(name);
        let position = match resume_token {
            "" => handle.feed.head(),
            token if token.starts_with("w2") => {
                self.log_token_position(&handle, dataset_tag, token)?
            }
            token => {
                let token = ResumeToken::decode(token).ok_or(EngineError::InvalidResumeToken(
                    "is not a token this server issued",
                ))?;
                if token.dataset_tag != dataset_tag {
                    return Err(EngineError::InvalidResumeToken(
                        "was issued for another dataset",
                    ));
                }
                if token.epoch != handle.feed.epoch() {
                    return Err(EngineError::WatchHistoryDiscarded(
                        "the token comes from another server process or replica, whose \
                         history this one does not have",
                    ));
                }
                token.position
            }
        };
        let position_changes = handle.feed.changes_before(position).map_err(|e| match e {
            FeedError::Discarded => EngineError::WatchHistoryDiscarded(
                "the server keeps a bounded history, and the token is older than it",
            ),
            FeedError::Invalid | FeedError::Ahead => {
                EngineError::InvalidResumeToken("points past the end of the history")
            }
        })?;
        // Checked after taking the position: a deletion published before it is seen here, one
        // after it is read from the feed and ends the stream.
        let state = handle.current();
        for id in segment_ids {
            state.segment(id)?;
        }
        let initial_lag = handle.feed.total_changes().saturating_sub(position_changes);
        let log_id = self.log_id();
        let delivered = token_of(&handle, dataset_tag, log_id, position);
        Ok(Watcher {
            dataset: handle,
            segments: segment_ids.iter().cloned().collect(),
            dataset_tag,
            position,
            position_changes,
            max_lag: self.limits.watch_max_lag,
            initial_lag,
            delivered,
            log_id,
            head,
            greeted: false,
            deleted: None,
            _open: super::stats::Open::new(&self.counters.watchers),
        })
    }
}

impl Engine {
    /// The feed position of a token that names its place by log record.
    fn log_token_position(
        &self,
        handle: &Dataset,
        dataset_tag: u32,
        token: &str,
    ) -> Result<Position> {
        let token = LogToken::decode(token).ok_or(EngineError::InvalidResumeToken(
            "is not a token this server issued",
        ))?;
        if token.dataset_tag != dataset_tag {
            return Err(EngineError::InvalidResumeToken(
                "was issued for another dataset",
            ));
        }
        if self.log_id() != Some(token.log_id) {
            return Err(EngineError::WatchHistoryDiscarded(
                "the token comes from a server with another data directory or Redis prefix",
            ));
        }
        handle
            .feed
            .find(token.key, token.offset)
            .map_err(|e| match e {
                FeedError::Discarded => EngineError::WatchHistoryDiscarded(
                    "this server does not hold the history the token points into (it keeps a \
                 bounded history from its own start)",
                ),
                FeedError::Ahead => EngineError::ReplicaBehind,
                FeedError::Invalid => EngineError::InvalidResumeToken("points inside no change"),
            })
    }
}

/// The token of a position: by log record when storage is on, by feed place otherwise.
fn token_of(
    dataset: &Dataset,
    dataset_tag: u32,
    log_id: Option<u64>,
    position: Position,
) -> String {
    let by_log = log_id.and_then(|log_id| {
        let (key, offset) = dataset.feed.key_of(position)?;
        Some(
            LogToken {
                dataset_tag,
                log_id,
                key,
                offset,
            }
            .encode(),
        )
    });
    by_log.unwrap_or_else(|| {
        ResumeToken {
            dataset_tag,
            epoch: dataset.feed.epoch(),
            position,
        }
        .encode()
    })
}

impl Watcher {
    /// The next batch: first one with no changes and the starting token (the watch is live),
    /// then batches of up to [`MAX_CHANGES_PER_BATCH`] changes, waiting for writes when
    /// caught up. Cancel-safe while it waits: dropping the future loses nothing.
    ///
    /// # Errors
    /// - [`EngineError::WatcherTooSlow`] when the caller fell more than `watch_max_lag` changes
    ///   further behind the writes than it was when it started; the error carries the token of
    ///   the last batch handed out, which resumes without loss while the ring still holds it.
    /// - [`EngineError::WatchHistoryDiscarded`] when the ring evicted the watcher's position.
    /// - [`EngineError::SegmentDeleted`] after the changes up to a watched segment's deletion.
    pub async fn next(&mut self) -> Result<WatchBatch> {
        if !self.greeted {
            self.greeted = true;
            return Ok(self.batch(Vec::new()));
        }
        if let Some(segment) = &self.deleted {
            return Err(EngineError::SegmentDeleted(segment.clone()));
        }
        self.check_lag()?;
        loop {
            let (raw, more) = self.scan()?;
            if !raw.is_empty() {
                let changes = self.resolve(raw);
                return Ok(self.batch(changes));
            }
            if let Some(segment) = &self.deleted {
                return Err(EngineError::SegmentDeleted(segment.clone()));
            }
            if more {
                tokio::task::yield_now().await;
                continue;
            }
            let seq = self.position.seq;
            self.head
                .wait_for(|head| *head > seq)
                .await
                .map_err(|_| EngineError::Internal("watch feed closed".into()))?;
        }
    }

    fn check_lag(&self) -> Result<()> {
        let lag = self
            .dataset
            .feed
            .total_changes()
            .saturating_sub(self.position_changes);
        if lag.saturating_sub(self.initial_lag) > self.max_lag {
            return Err(EngineError::WatcherTooSlow {
                lag,
                limit: self.max_lag,
                resume_token: self.delivered.clone(),
            });
        }
        Ok(())
    }

    /// Reads watched changes from the position on, up to a batch; `more` when it stopped
    /// early on [`MAX_ENTRIES_PER_SCAN`] rather than at the head.
    fn scan(&mut self) -> Result<(Vec<RawChange>, bool)> {
        let mut raw = Vec::new();
        for _ in 0..MAX_ENTRIES_PER_SCAN {
            if raw.len() >= MAX_CHANGES_PER_BATCH || self.deleted.is_some() {
                return Ok((raw, false));
            }
            let entry = match self.dataset.feed.entry(self.position.seq) {
                Ok(Some(entry)) => entry,
                Ok(None) => return Ok((raw, false)),
                Err(FeedError::Discarded) => {
                    return Err(EngineError::WatchHistoryDiscarded(
                        "the watcher fell behind the server's bounded history",
                    ))
                }
                Err(FeedError::Invalid | FeedError::Ahead) => {
                    return Err(EngineError::Internal(format!(
                        "watch position {:?} is outside the feed",
                        self.position
                    )))
                }
            };
            if self.segments.contains(&entry.segment) {
                let taken = entry.changes(self.position.offset, MAX_CHANGES_PER_BATCH - raw.len());
                self.position.offset += taken.len() as u64;
                self.position_changes += taken.len() as u64;
                raw.extend(
                    taken
                        .into_iter()
                        .map(|(id, entered)| (entry.clone(), id, entered)),
                );
                if self.position.offset < entry.len() {
                    continue;
                }
                if entry.deleted {
                    self.deleted = Some(entry.segment.clone());
                }
            }
            self.position = Position {
                seq: entry.seq + 1,
                offset: 0,
            };
            self.position_changes = entry.start + entry.len();
        }
        let more = raw.is_empty();
        Ok((raw, more))
    }

    /// External ids from the current version, which is at least as new as any entry read:
    /// a version is published before its transitions are appended, and ids are never reused.
    fn resolve(&self, raw: Vec<RawChange>) -> Vec<MembershipChange> {
        let state = self.dataset.current();
        raw.into_iter()
            .filter_map(|(entry, id, entered)| {
                let Some(user_id) = state.keys.key(id) else {
                    tracing::error!(id, segment = %entry.segment, "watched user has no key");
                    return None;
                };
                Some(MembershipChange {
                    segment: entry.segment.clone(),
                    user_id: user_id.to_owned(),
                    kind: if entered {
                        ChangeKind::Entered
                    } else {
                        ChangeKind::Left
                    },
                })
            })
            .collect()
    }

    fn batch(&mut self, changes: Vec<MembershipChange>) -> WatchBatch {
        self.delivered = token_of(&self.dataset, self.dataset_tag, self.log_id, self.position);
        WatchBatch {
            changes,
            resume_token: self.delivered.clone(),
        }
    }
}
