//! What the requests are: the workload's operations and their weights, and the data the
//! requests draw from (user ids, attribute values, event names), discovered from the dataset
//! once at start so that every request during the run is valid and cheap to build.
//!
//! Each request's random choices come from a generator seeded by `(seed, sequence number)`,
//! so that request `n` is the same in every run with the same seed, and no generator state is
//! shared between the concurrent requests.

use std::path::PathBuf;
use std::sync::Arc;

use super::driver::Outcome;
use crate::cli::client::{text_audience, ClientError};
use crate::cli::connect::Connection;
use crate::grpc::convert::timestamp;
use crate::grpc::pb;
use crate::rng::SplitMix64;
use crate::time::{parse_rfc3339, Clock, Millis, SystemClock};

type Result<T> = std::result::Result<T, ClientError>;

/// Every live user: the complement of an event nobody did (the language has no `TRUE`
/// audience, and `NOT` complements among live users).
const EVERYONE: &str = r#"NOT DID "__audience_bench_no_such_event__""#;
/// Values learned per attribute for upserts (the most frequent ones).
const KNOWN_VALUES: u32 = 100;
/// One categorical upsert in this many sets a value the dataset did not have.
const NEW_VALUE_ONE_IN: u64 = 1_000;
/// New categorical values come from this many (`bench-0`..), so the dictionary stays small.
const NEW_VALUES: u64 = 16;
/// Events are timed up to this long before now.
const EVENT_SPREAD_MS: u64 = 10 * 60 * 1000;
/// Largest answer accepted (a sample of many ids).
const MAX_DECODING_BYTES: usize = 256 * 1024 * 1024;

/// One kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    SegmentsFor,
    Count,
    Upsert,
    RecordEvents,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::SegmentsFor,
        Operation::Count,
        Operation::Upsert,
        Operation::RecordEvents,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Operation::SegmentsFor => "segments-for",
            Operation::Count => "count",
            Operation::Upsert => "upsert",
            Operation::RecordEvents => "record-events",
        }
    }

    fn needs_users(self) -> bool {
        !matches!(self, Operation::Count)
    }
}

/// Operations with their (positive) weights, as `--mix` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(pub Vec<(Operation, u32)>);

/// Parses `--mix segments-for=90,count=5,...`: operations with positive weights, each named
/// once.
///
/// # Errors
/// An unknown operation, a missing or non-numeric weight, a repeated operation, or no
/// positive weight at all.
pub fn parse_mix(text: &str) -> std::result::Result<Mix, String> {
    let mut mix: Vec<(Operation, u32)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}': use operation=weight"))?;
        let op = Operation::ALL
            .into_iter()
            .find(|op| op.name() == name.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Operation::ALL.iter().map(|op| op.name()).collect();
                format!("unknown operation '{name}' (one of {})", names.join(", "))
            })?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("'{part}': the weight must be a whole number"))?;
        if mix.iter().any(|(seen, _)| *seen == op) {
            return Err(format!("'{name}' is given twice"));
        }
        if weight > 0 {
            mix.push((op, weight));
        }
    }
    if mix.is_empty() {
        return Err("no operation has a positive weight".into());
    }
    Ok(Mix(mix))
}

/// Where the user ids come from.
#[derive(Debug, Clone)]
pub enum UserSource {
    /// A random sample of this many of the dataset's users.
    Sample(u32),
    /// A file of ids, one per line.
    File(PathBuf),
}

/// What the command line asked for, before anything is known of the dataset.
#[derive(Debug, Clone)]
pub struct Spec {
    pub dataset: String,
    pub mix: Vec<(Operation, u32)>,
    /// The text expression of `count`.
    pub expr: Option<String>,
    pub users: UserSource,
    /// Attributes upserts change (empty: all of them).
    pub attributes: Vec<String>,
    /// Events per `RecordEvents` request.
    pub batch: u32,
    /// Event names to record (empty: the dataset's own).
    pub event_names: Vec<String>,
    pub seed: u64,
}

/// How to draw a random valid value of one attribute.
#[derive(Debug, Clone)]
enum ValueGen {
    Categorical(Vec<String>),
    Set(Vec<String>),
    Boolean,
    Integer(i64, i64),
    Float(f64, f64),
    Timestamp(Millis, Millis),
}

/// The requests of a run, ready to build.
#[derive(Debug)]
pub struct Workload {
    dataset: String,
    /// Operations with the running sum of the weights up to each.
    ops: Vec<(Operation, u64)>,
    expr: String,
    user_ids: Vec<String>,
    attributes: Vec<(String, ValueGen)>,
    event_names: Vec<String>,
    batch: usize,
    seed: u64,
    /// One client connection each; request `n` goes to `channels[n % len]`.
    channels: Vec<Connection>,
}

impl Workload {
    /// Learns from the dataset what the requests need: user ids (a sample or the file),
    /// attribute kinds and values (for upserts), event names (for events); and checks the
    /// count expression once, so that a typo fails here rather than in every request.
    ///
    /// # Errors
    /// A refused setup call, an unreadable ids file, or a dataset without what the
    /// workload needs.
    pub async fn prepare(spec: Spec, channels: Vec<Connection>) -> Result<Self> {
        let Some(channel) = channels.first().cloned() else {
            return Err(ClientError::Input("no connection to the server".into()));
        };
        let has = |op: Operation| spec.mix.iter().any(|(o, _)| *o == op);
        let mut workload = Workload {
            dataset: spec.dataset.clone(),
            ops: spec
                .mix
                .iter()
                .scan(0u64, |sum, (op, weight)| {
                    *sum += u64::from(*weight);
                    Some((*op, *sum))
                })
                .collect(),
            expr: spec.expr.clone().unwrap_or_default(),
            user_ids: Vec::new(),
            attributes: Vec::new(),
            event_names: spec.event_names.clone(),
            batch: spec.batch.max(1) as usize,
            seed: spec.seed,
            channels,
        };
        if has(Operation::Count) {
            if workload.expr.is_empty() {
                return Err(ClientError::Input("count needs --expr".into()));
            }
            count(&channel, &spec.dataset, &workload.expr, "")
                .await
                .map_err(|s| setup_error("--expr", &s))?;
        }
        if spec.mix.iter().any(|(op, _)| op.needs_users()) {
            workload.user_ids = user_ids(&channel, &spec).await?;
        }
        if has(Operation::Upsert) || (has(Operation::RecordEvents) && spec.event_names.is_empty()) {
            let schema = pb::schema_service_client::SchemaServiceClient::new(channel.clone())
                .describe_dataset(pb::DescribeDatasetRequest {
                    dataset: spec.dataset.clone(),
                })
                .await
                .map_err(|s| setup_error("cannot describe the dataset", &s))?
                .into_inner();
            if has(Operation::Upsert) {
                workload.attributes = attributes(&channel, &spec, &schema).await?;
            }
            if workload.event_names.is_empty() {
                workload.event_names = schema.event_names;
            }
        }
        if has(Operation::RecordEvents) && workload.event_names.is_empty() {
            return Err(ClientError::Input(format!(
                "dataset '{}' has no events yet: give --event-names",
                spec.dataset
            )));
        }
        Ok(workload)
    }

    /// Operation names, in the order of [`Outcome::op`].
    pub fn operation_names(&self) -> Vec<&'static str> {
        self.ops.iter().map(|(op, _)| op.name()).collect()
    }

    /// User ids requests pick from.
    pub fn user_count(&self) -> usize {
        self.user_ids.len()
    }

    /// Builds and sends request `n`.
    pub async fn call(self: Arc<Self>, n: u64) -> Outcome {
        let mut rng = SplitMix64::new(self.seed ^ n.wrapping_mul(0xD134_2543_DE82_EF95));
        let total = self.ops.last().map_or(1, |(_, sum)| *sum);
        let roll = rng.below(total);
        let op = self
            .ops
            .iter()
            .position(|(_, sum)| roll < *sum)
            .unwrap_or(0);
        let channel = self.channels[(n % self.channels.len() as u64) as usize].clone();
        let result = match self.ops.get(op).map(|(o, _)| *o) {
            Some(Operation::Count) | None => count(&channel, &self.dataset, &self.expr, "")
                .await
                .map(|_| 0),
            Some(Operation::SegmentsFor) => {
                pb::query_service_client::QueryServiceClient::new(channel)
                    .segments_for_user(pb::SegmentsForUserRequest {
                        dataset: self.dataset.clone(),
                        user_id: self.user(&mut rng),
                    })
                    .await
                    .map(|_| 0)
            }
            Some(Operation::Upsert) => {
                let user = pb::UserUpdate {
                    user_id: self.user(&mut rng),
                    updates: self
                        .attributes
                        .iter()
                        .map(|(name, values)| pb::AttributeUpdate {
                            attribute: name.clone(),
                            change: Some(pb::attribute_update::Change::Set(pb::AttributeValue {
                                kind: Some(values.draw(&mut rng)),
                            })),
                        })
                        .collect(),
                };
                pb::ingest_service_client::IngestServiceClient::new(channel)
                    .upsert_users(pb::UpsertUsersRequest {
                        dataset: self.dataset.clone(),
                        users: vec![user],
                    })
                    .await
                    .map(|_| 0)
            }
            Some(Operation::RecordEvents) => {
                let now = SystemClock.now_millis();
                let events = (0..self.batch)
                    .map(|_| pb::Event {
                        user_id: self.user(&mut rng),
                        event: pick(&self.event_names, &mut rng).to_owned(),
                        ts: Some(timestamp(now - rng.below(EVENT_SPREAD_MS) as Millis)),
                        value: None,
                    })
                    .collect();
                pb::ingest_service_client::IngestServiceClient::new(channel)
                    .record_events(pb::RecordEventsRequest {
                        dataset: self.dataset.clone(),
                        events,
                    })
                    .await
                    .map(|response| response.into_inner().recorded)
            }
        };
        Outcome {
            op,
            result: result.map_err(|status| status.code()),
        }
    }

    fn user(&self, rng: &mut SplitMix64) -> String {
        pick(&self.user_ids, rng).to_owned()
    }
}

/// A uniformly random element; `""` of an empty slice (which `prepare` never leaves).
fn pick<'a>(values: &'a [String], rng: &mut SplitMix64) -> &'a str {
    values
        .get(rng.below(values.len() as u64) as usize)
        .map_or("", String::as_str)
}

/// A setup call's refusal, with what was being done.
fn setup_error(what: &str, status: &tonic::Status) -> ClientError {
    ClientError::Input(format!("{what}: {:?}: {}", status.code(), status.message()))
}

/// A count of `expr`, with a breakdown by `by` when not empty (top [`KNOWN_VALUES`]).
async fn count(
    channel: &Connection,
    dataset: &str,
    expr: &str,
    by: &str,
) -> std::result::Result<pb::CountResponse, tonic::Status> {
    pb::query_service_client::QueryServiceClient::new(channel.clone())
        .count(pb::CountRequest {
            dataset: dataset.to_owned(),
            audience: Some(text_audience(expr.to_owned())),
            as_of: None,
            breakdown_attribute: by.to_owned(),
            breakdown_limit: if by.is_empty() { 0 } else { KNOWN_VALUES },
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The ids requests pick from: the file's lines, or a random sample of the dataset.
async fn user_ids(channel: &Connection, spec: &Spec) -> Result<Vec<String>> {
    let ids = match &spec.users {
        UserSource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ClientError::Input(format!("--ids-file {}: {e}", path.display())))?;
            let ids: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            if ids.is_empty() {
                return Err(ClientError::Input(format!(
                    "--ids-file {}: no ids in it",
                    path.display()
                )));
            }
            ids
        }
        UserSource::Sample(size) => {
            let ids = pb::query_service_client::QueryServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_DECODING_BYTES)
                .sample_members(pb::SampleMembersRequest {
                    dataset: spec.dataset.clone(),
                    audience: Some(text_audience(EVERYONE.to_owned())),
                    as_of: None,
                    size: *size,
                    seed: spec.seed,
                })
                .await
                .map_err(|s| setup_error("cannot sample users (--sample-ids)", &s))?
                .into_inner()
                .user_ids;
            if ids.is_empty() {
                return Err(ClientError::Input(format!(
                    "dataset '{}' has no users to pick from: load some, or give --ids-file",
                    spec.dataset
                )));
            }
            ids
        }
    };
    Ok(ids)
}

/// The attributes upserts change, each with values drawn like the dataset's own: its most
/// frequent values for strings; numbers in default ranges (breakdowns count no numbers).
async fn attributes(
    channel: &Connection,
    spec: &Spec,
    schema: &pb::DescribeDatasetResponse,
) -> Result<Vec<(String, ValueGen)>> {
    let names: Vec<&str> = schema.attributes.iter().map(|a| a.name.as_str()).collect();
    if let Some(unknown) = spec
        .attributes
        .iter()
        .find(|name| !names.contains(&name.as_str()))
    {
        return Err(ClientError::Input(format!(
            "--attributes: dataset '{}' has no attribute '{unknown}' (it has: {})",
            spec.dataset,
            names.join(", ")
        )));
    }
    let chosen = schema
        .attributes
        .iter()
        .filter(|a| spec.attributes.is_empty() || spec.attributes.contains(&a.name));
    let mut generators = Vec::new();
    for attribute in chosen {
        let kind =
            pb::AttributeKind::try_from(attribute.kind).unwrap_or(pb::AttributeKind::Unspecified);
        if matches!(
            kind,
            pb::AttributeKind::Boolean | pb::AttributeKind::Unspecified
        ) {
            if kind == pb::AttributeKind::Boolean {
                generators.push((attribute.name.clone(), ValueGen::Boolean));
            }
            continue;
        }
        let numeric = matches!(
            kind,
            pb::AttributeKind::Integer | pb::AttributeKind::Float | pb::AttributeKind::Timestamp
        );
        // The server breaks nothing down by a number: numbers take the default ranges.
        if numeric {
            generators.push((attribute.name.clone(), ValueGen::learn(kind, Vec::new())));
            continue;
        }
        let known: Vec<String> = count(channel, &spec.dataset, EVERYONE, &attribute.name)
            .await
            .map_err(|s| {
                setup_error(
                    &format!("cannot read the values of '{}'", attribute.name),
                    &s,
                )
            })?
            .breakdown
            .into_iter()
            .map(|entry| entry.value)
            .collect();
        generators.push((attribute.name.clone(), ValueGen::learn(kind, known)));
    }
    if generators.is_empty() {
        return Err(ClientError::Input(format!(
            "dataset '{}' has no attributes to upsert",
            spec.dataset
        )));
    }
    Ok(generators)
}

/// The smallest and largest of some values, or `default` when there are none.
fn range<T: PartialOrd + Copy>(values: impl Iterator<Item = T>, default: (T, T)) -> (T, T) {
    values
        .fold(None, |acc: Option<(T, T)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((if v < lo { v } else { lo }, if v > hi { v } else { hi })),
        })
        .unwrap_or(default)
}

impl ValueGen {
    /// A generator for an attribute of `kind` whose frequent values are `known` (as the
    /// breakdown prints them).
    fn learn(kind: pb::AttributeKind, known: Vec<String>) -> Self {
        const DAY_MS: Millis = 86_400_000;
        match kind {
            pb::AttributeKind::Set => ValueGen::Set(known),
            pb::AttributeKind::Integer => {
                let (lo, hi) = range(known.iter().filter_map(|v| v.parse().ok()), (0, 100));
                ValueGen::Integer(lo, hi)
            }
            pb::AttributeKind::Float => {
                let parsed = known.iter().filter_map(|v| v.parse::<f64>().ok());
                let (lo, hi) = range(parsed.filter(|v| v.is_finite()), (0.0, 1000.0));
                ValueGen::Float(lo, hi)
            }
            pb::AttributeKind::Timestamp => {
                let now = SystemClock.now_millis();
                let parsed = known.iter().filter_map(|v| parse_rfc3339(v).ok());
                let (lo, hi) = range(parsed, (now - 365 * DAY_MS, now));
                ValueGen::Timestamp(lo, hi)
            }
            pb::AttributeKind::Boolean => ValueGen::Boolean,
            pb::AttributeKind::Categorical | pb::AttributeKind::Unspecified => {
                ValueGen::Categorical(known)
            }
        }
    }

    fn draw(&self, rng: &mut SplitMix64) -> pb::attribute_value::Kind {
        use pb::attribute_value::Kind;
        // Uniform in `lo..=hi` without overflow, whatever the signs.
        let between = |rng: &mut SplitMix64, lo: i64, hi: i64| -> i64 {
            let span = (i128::from(hi) - i128::from(lo) + 1).clamp(1, i128::from(u64::MAX));
            (i128::from(lo) + i128::from(rng.below(span as u64))) as i64
        };
        match self {
            ValueGen::Categorical(known) => {
                if known.is_empty() || rng.below(NEW_VALUE_ONE_IN) == 0 {
                    Kind::StringValue(format!("bench-{}", rng.below(NEW_VALUES)))
                } else {
                    Kind::StringValue(pick(known, rng).to_owned())
                }
            }
            ValueGen::Set(known) => {
                let wanted = 1 + rng.below(3);
                let mut values: Vec<String> = Vec::new();
                for _ in 0..wanted {
                    let value = if known.is_empty() {
                        format!("bench-{}", rng.below(NEW_VALUES))
                    } else {
                        pick(known, rng).to_owned()
                    };
                    if !values.contains(&value) {
                        values.push(value);
                    }
                }
                Kind::SetValue(pb::StringList { values })
            }
            ValueGen::Boolean => Kind::BoolValue(rng.below(2) == 1),
            ValueGen::Integer(lo, hi) => Kind::IntValue(between(rng, *lo, *hi)),
            ValueGen::Float(lo, hi) => Kind::DoubleValue(lo + rng.unit() * (hi - lo)),
            ValueGen::Timestamp(lo, hi) => Kind::TimestampValue(timestamp(between(rng, *lo, *hi))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_refuses_nonsense() {
        let Mix(mix) = parse_mix("segments-for=90, count=5,upsert=0,record-events=1").unwrap();
        assert_eq!(
            mix,
            vec![
                (Operation::SegmentsFor, 90),
                (Operation::Count, 5),
                (Operation::RecordEvents, 1)
            ]
        );
        assert!(parse_mix("count=1,count=2").unwrap_err().contains("twice"));
        assert!(parse_mix("counts=1")
            .unwrap_err()
            .contains("unknown operation"));
        assert!(parse_mix("count").unwrap_err().contains("operation=weight"));
        assert!(parse_mix("count=-1").unwrap_err().contains("whole number"));
        assert!(parse_mix("count=0").unwrap_err().contains("positive"));
    }

    #[test]
    fn values_stay_in_what_was_learned() {
        let mut rng = SplitMix64::new(3);
        let ages = ValueGen::learn(
            pb::AttributeKind::Integer,
            vec!["18".into(), "65".into(), "30".into()],
        );
        let stamps = ValueGen::learn(
            pb::AttributeKind::Timestamp,
            vec!["2026-01-01T00:00:00Z".into(), "2025-01-01T00:00:00Z".into()],
        );
        let interests = ValueGen::learn(pb::AttributeKind::Set, vec!["a".into(), "b".into()]);
        for _ in 0..1000 {
            match ages.draw(&mut rng) {
                pb::attribute_value::Kind::IntValue(v) => assert!((18..=65).contains(&v)),
                other => panic!("{other:?}"),
            }
            match stamps.draw(&mut rng) {
                pb::attribute_value::Kind::TimestampValue(t) => {
                    assert!((1_735_689_600..=1_767_225_600).contains(&t.seconds))
                }
                other => panic!("{other:?}"),
            }
            match interests.draw(&mut rng) {
                pb::attribute_value::Kind::SetValue(list) => {
                    assert!(!list.values.is_empty() && list.values.len() <= 2);
                    assert!(list.values.iter().all(|v| v == "a" || v == "b"));
                }
                other => panic!("{other:?}"),
            }
        }
        // Extreme bounds do not overflow.
        let wide = ValueGen::Integer(i64::MIN, i64::MAX);
        for _ in 0..100 {
            wide.draw(&mut rng);
        }
    }
}
