//! Behaviour events in a dataset: recording them, retention, and the passage of time.
//!
//! Materialized segments are evaluated at the instant of the write that last touched each user.
//! When time passes with no write, a segment with a moving window (`DID x IN LAST 7d`,
//! `signup_ts >= NOW - 30d`) changes only for users with an event or a value in the strip of
//! time its window edges swept over; [`DatasetState::advance_time`] re-evaluates exactly those.

use super::change::{ChangeOutcome, EventRecord};
use super::error::{EngineError, Result};
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
fn validate_event(event: &EventRecord) -> std::result::Result<(), String> {
    validate_event_name(&event.event)?;
    if event.value.is_some_and(|v| !v.is_finite()) {
        return Err("value must be a finite number".into());
    }
    Ok(())
}

impl DatasetState {
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

    /// Stores events (creating unknown users); returns what happened and the users touched.
    ///
    /// # Errors
    /// The first invalid event, by index; nothing is stored then.
    pub(super) fn record_events(
        &mut self,
        events: &[EventRecord],
        now: Millis,
    ) -> Result<(ChangeOutcome, Bitmap)> {
        for (index, event) in events.iter().enumerate() {
            validate_event(event).map_err(|reason| EngineError::InvalidEvent { index, reason })?;
            crate::index::keys::validate_key(&event.user_id).map_err(|e| {
                EngineError::InvalidEvent {
                    index,
                    reason: e.to_string(),
                }
            })?;
        }
        let cutoff = self.retention_cutoff(now);
        let mut outcome = ChangeOutcome::default();
        let mut touched = Bitmap::new();
        let mut batch = EventBatch::new();
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
        self.events.add(batch);
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
        self.events.retain_from(cutoff);
        self.time_refreshed_at = Some(now);
        if affected.as_ref().is_some_and(Bitmap::is_empty) || self.segments.is_empty() {
            return Ok(());
        }
        let order = self.segment_order();
        self.refresh_segments(&order, affected.as_ref(), now)
    }

    /// Users whose membership in some segment can differ between `then` and `now`: those with
    /// an event or a value in a strip a window edge swept over, or in the events retention drops.
    fn moved_users(&self, then: Millis, now: Millis, cutoff: Millis) -> Bitmap {
        let mut moved = Bitmap::new();
        let swept = |from: Millis, to: Millis| TimeWindow {
            start: from.min(to),
            end: from.max(to),
        };
        let expired = swept(self.events.cutoff(), cutoff);
        for segment in self.segments.values() {
            for predicate in segment.definition.expression.predicates() {
                match predicate {
                    Predicate::Did { event, window, .. } => {
                        let mut strips = vec![expired];
                        strips.extend(window_edges(window.as_ref(), then, now, &swept));
                        for strip in strips {
                            moved |= self.events.users_in(&[event.as_str()], strip);
                        }
                    }
                    Predicate::Compare {
                        attribute, value, ..
                    } => moved |= self.value_strip(attribute, [value], then, now),
                    Predicate::Between {
                        attribute,
                        low,
                        high,
                    } => moved |= self.value_strip(attribute, [low, high], then, now),
                    _ => {}
                }
            }
        }
        moved
    }

    /// Users whose `attribute` lies between where a `NOW` bound was at `then` and is at `now`.
    fn value_strip<'a>(
        &self,
        attribute: &str,
        bounds: impl IntoIterator<Item = &'a Value>,
        then: Millis,
        now: Millis,
    ) -> Bitmap {
        let mut moved = Bitmap::new();
        for bound in bounds {
            let Value::Now { offset } = bound else {
                continue;
            };
            let shift = offset.map_or(0, |o| o.as_millis());
            let (a, b) = (then.saturating_add(shift), now.saturating_add(shift));
            let strip = Expr::Predicate(Predicate::Between {
                attribute: attribute.to_owned(),
                low: Value::Literal(Literal::Int(a.min(b))),
                high: Value::Literal(Literal::Int(a.max(b))),
            });
            // A segment that binds also binds this (the same attribute, as a timestamp).
            if let Ok(plan) = Binder::new(self, now).bind(&strip) {
                moved |= plan.select(super::eval::Scope::All(&self.live));
            }
        }
        moved
    }
}

fn is_time_relative(predicate: &Predicate) -> bool {
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
            .filter_map(|bound| match bound {
                Value::Now { offset } => {
                    let shift = offset.map_or(0, |o| o.as_millis());
                    Some(swept(then.saturating_add(shift), now.saturating_add(shift)))
                }
                Value::Literal(_) => None,
            })
            .collect(),
    }
}
