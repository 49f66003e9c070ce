//! Behaviour events in a dataset: recording them, retention, and the passage of time.
//!
//! Materialized segments are evaluated at the instant of the write that last touched each user.
//! When time passes with no write, a segment with a moving window (`DID x IN LAST 7d`,
//! `signup_ts >= NOW - 30d`) changes only for users with an event or a value in the strip of
//! time its window edges swept over; [`DatasetState::advance_time`] re-evaluates exactly those.

use std::collections::BTreeSet;

use super::change::{ChangeOutcome, EventRecord};
use super::error::{EngineError, Result};
use super::maintenance::Written;
use super::plan::Binder;
use super::state::DatasetState;
use crate::expr::{Expr, Literal, Predicate, Value, Window};
use crate::index::events::{day_of, pack, EventBatch, TimeWindow, DAY_MS};
use crate::index::Bitmap;
use crate::time::Millis;

/// Days of events a dataset keeps unless told otherwise.
pub const DEFAULT_RETENTION_DAYS: u32 = 400;

/// The longest event name accepted.
const MAX_EVENT_NAME: usize = 128;

/// Checks an event name: 1-128 bytes, no control characters.
///
/// # Errors
/// The reason the name is refused.
pub fn validate_event_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the event name must not be empty".into());
    }
    if name.len() > MAX_EVENT_NAME {
        return Err(format!(
            "the event name is {} bytes, more than {MAX_EVENT_NAME}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the event name contains a control character".into());
    }
    Ok(())
}

/// Checks one event's own fields (not its user).
/// How far ahead of the server's clock an event may be: clocks drift, but an event from the
/// far future (often a timestamp in the wrong unit) would match windowless DIDs at once and
/// never expire.
pub const MAX_EVENT_FUTURE_MS: Millis = DAY_MS;

/// Checks an event's time against the server's clock.
///
/// # Errors
/// The reason a time is refused.
pub fn validate_event_time(ts: Millis, now: Millis) -> std::result::Result<(), String> {
    if ts > now.saturating_add(MAX_EVENT_FUTURE_MS) {
        return Err(format!(
            "{} is more than a day after the server's clock ({}); is it in the wrong unit?",
            crate::time::format_rfc3339(ts),
            crate::time::format_rfc3339(now)
        ));
    }
    Ok(())
}

/// Checks one event's own fields (not its user): the failing field and the reason.
fn validate_event(
    event: &EventRecord,
    now: Millis,
) -> std::result::Result<(), (&'static str, String)> {
    validate_event_name(&event.event).map_err(|r| ("event", r))?;
    crate::index::keys::validate_key(&event.user_id).map_err(|e| ("user_id", e.to_string()))?;
    validate_event_time(event.ts, now).map_err(|r| ("ts", r))?;
    if event.value.is_some_and(|v| !v.is_finite()) {
        return Err(("value", "must be a finite number".into()));
    }
    Ok(())
}

impl DatasetState {
    /// Days of events kept.
    pub fn retention_days(&self) -> u32 {
        self.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS)
    }

    /// Milliseconds of events kept.
    pub fn retention_ms(&self) -> Millis {
        i64::from(self.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS)) * DAY_MS
    }

    /// The first instant retained at `now`.
    pub fn retention_cutoff(&self, now: Millis) -> Millis {
        now.saturating_sub(self.retention_ms())
            .max(self.events.cutoff())
    }

    /// Whether time alone can change this dataset: it holds events (retention) or a segment
    /// with a DID predicate or a `NOW` bound.
    pub fn depends_on_time(&self) -> bool {
        self.events.events() > 0
            || self.segments.values().any(|s| {
                s.definition
                    .expression
                    .predicates()
                    .into_iter()
                    .any(is_time_relative)
            })
    }

    /// Checks events and creates their unknown users, adding the events to `batch` for one
    /// [`EventStore::add`](crate::index::events::EventStore::add) of several writes; returns what
    /// happened and the users touched.
    ///
    /// # Errors
    /// The first invalid event, by index; users created before it stay created, so the state
    /// must then be discarded.
    pub(super) fn stage_events(
        &mut self,
        events: &[EventRecord],
        now: Millis,
        batch: &mut EventBatch,
    ) -> Result<(ChangeOutcome, Bitmap)> {
        for (index, event) in events.iter().enumerate() {
            validate_event(event, now).map_err(|(field, reason)| EngineError::InvalidEvent {
                index,
                field,
                reason,
            })?;
        }
        let cutoff = self.retention_cutoff(now);
        let mut outcome = ChangeOutcome::default();
        let mut touched = Bitmap::new();
        for event in events {
            let (id, created) = self.user_mut(&event.user_id)?;
            // A user created by an expired event still exists, and can enter a NOT segment.
            touched.insert(id);
            if created {
                outcome.created += 1;
            }
            if event.ts < cutoff {
                outcome.expired += 1;
                continue;
            }
            let (day, offset) = day_of(event.ts);
            batch
                .entry(event.event.clone())
                .or_default()
                .entry(day)
                .or_default()
                .push(pack(id, offset));
            outcome.events += 1;
        }
        Ok((outcome, touched))
    }

    /// Drops events beyond retention and brings moving-window segments to `now`.
    ///
    /// # Errors
    /// A segment that no longer binds (which writes prevent).
    pub(super) fn advance_time(&mut self, now: Millis) -> Result<()> {
        let cutoff = self.retention_cutoff(now);
        let affected = self
            .time_refreshed_at
            .map(|then| self.moved_users(then, now, cutoff));
        // Deletes only mark their users' events; the periodic time step drops them, in one
        // pass for every user deleted since the last.
        self.events.purge();
        self.events.retain_from(cutoff);
        self.time_refreshed_at = Some(now);
        if affected.as_ref().is_some_and(Bitmap::is_empty) || self.segments.is_empty() {
            return Ok(());
        }
        let order = self.segment_order();
        self.refresh_segments(&order, affected.as_ref(), &Written::Anything, now)
    }

    /// Users whose membership in some segment can differ between `then` and `now`: those with
    /// an event or a value in a strip a window edge swept over, or in the events retention drops.
    fn moved_users(&self, then: Millis, now: Millis, cutoff: Millis) -> Bitmap {
        let swept = |from: Millis, to: Millis| TimeWindow {
            start: from.min(to),
            end: from.max(to),
        };
        let expired = swept(self.events.cutoff(), cutoff);
        // Many segments share events, windows and bounds: each strip is read once.
        let mut event_strips: BTreeSet<(&str, Millis, Millis)> = BTreeSet::new();
        let mut value_strips: BTreeSet<(&str, Millis)> = BTreeSet::new();
        for segment in self.segments.values() {
            for predicate in segment.definition.expression.predicates() {
                match predicate {
                    Predicate::Did { event, window, .. } => {
                        let mut strips = vec![expired];
                        strips.extend(window_edges(window.as_ref(), then, now, &swept));
                        for strip in strips.into_iter().filter(|s| s.start < s.end) {
                            event_strips.insert((event.as_str(), strip.start, strip.end));
                        }
                    }
                    Predicate::Compare {
                        attribute, value, ..
                    } => value_strips.extend(now_shift(value).map(|s| (attribute.as_str(), s))),
                    Predicate::Between {
                        attribute,
                        low,
                        high,
                    } => value_strips.extend(
                        [low, high]
                            .into_iter()
                            .filter_map(now_shift)
                            .map(|s| (attribute.as_str(), s)),
                    ),
                    _ => {}
                }
            }
        }
        let mut moved = Bitmap::new();
        for (event, start, end) in event_strips {
            moved |= self.events.users_in(&[event], TimeWindow { start, end });
        }
        for (attribute, shift) in value_strips {
            moved |= self.value_strip(attribute, shift, then, now);
        }
        moved
    }

    /// Users whose `attribute` lies between where a `NOW + shift` bound was at `then` and is
    /// at `now`, both ends included.
    fn value_strip(&self, attribute: &str, shift: Millis, then: Millis, now: Millis) -> Bitmap {
        let (a, b) = (then.saturating_add(shift), now.saturating_add(shift));
        let strip = Expr::Predicate(Predicate::Between {
            attribute: attribute.to_owned(),
            low: Value::Literal(Literal::Int(a.min(b))),
            high: Value::Literal(Literal::Int(a.max(b))),
        });
        // A segment that binds also binds this (the same attribute, as a timestamp).
        match Binder::new(self, now).bind(&strip) {
            Ok(plan) => plan.select(super::eval::Scope::All(&self.live)),
            Err(_) => Bitmap::new(),
        }
    }
}

/// The shift of a `NOW [± d]` bound; `None` for a constant.
fn now_shift(value: &Value) -> Option<Millis> {
    match value {
        Value::Now { offset } => Some(offset.map_or(0, |o| o.as_millis())),
        Value::Literal(_) => None,
    }
}

/// Whether a predicate's answer depends on the instant it is evaluated at.
pub(super) fn is_time_relative(predicate: &Predicate) -> bool {
    let now = |v: &Value| matches!(v, Value::Now { .. });
    match predicate {
        Predicate::Did { .. } => true,
        Predicate::Compare { value, .. } => now(value),
        Predicate::Between { low, high, .. } => now(low) || now(high),
        _ => false,
    }
}

/// The strips of time a DID window's moving edges swept over between `then` and `now`.
fn window_edges(
    window: Option<&Window>,
    then: Millis,
    now: Millis,
    swept: &dyn Fn(Millis, Millis) -> TimeWindow,
) -> Vec<TimeWindow> {
    match window {
        None => Vec::new(),
        Some(Window::Last(duration)) => {
            let d = duration.as_millis();
            vec![
                swept(then.saturating_sub(d), now.saturating_sub(d)),
                swept(then, now),
            ]
        }
        Some(Window::Between { start, end }) => [start, end]
            .into_iter()
            .filter_map(now_shift)
            .map(|shift| swept(then.saturating_add(shift), now.saturating_add(shift)))
            .collect(),
    }
}
