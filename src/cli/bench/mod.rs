//! `audience bench`: a load generator in the product, as `redis-benchmark` or `ghz` are. It
//! drives a running server through the same generated gRPC client as every other command and
//! prints throughput, errors by gRPC code and latency percentiles.
//!
//! # Layout
//! - this module: the flags, checking that they make sense together, the connections and
//!   the run with its progress line;
//! - [`driver`]: the load loop (closed or open), generic over an async request function;
//! - [`workload`]: what the requests are, and what they need learned from the dataset first;
//! - [`report`]: histograms, percentiles and the printed report.

mod driver;
mod report;
mod workload;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::ClientError;
use super::connect::{ConnectArgs, Connection};
use clap::{Args, Subcommand};
use driver::{LoadPlan, Progress, Shape};
use workload::{Operation, Spec, UserSource, Workload};

/// In-flight requests per HTTP/2 connection by default: one connection's frames all go
/// through one writer task, which caps it near 64 busy streams on loopback.
const IN_FLIGHT_PER_CONNECTION: usize = 64;
/// The open loop's outstanding limit when `--concurrency` is not given.
const DEFAULT_OUTSTANDING: u32 = 256;
/// How long a run lasts when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// How long to wait for each connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The workloads of `audience bench`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// `Count` of a text expression, over and over.
    Count(CountArgs),
    /// `SegmentsForUser` of random users of the dataset (the bidder's lookup).
    SegmentsFor(SegmentsForArgs),
    /// `UpsertUsers` of one random existing user per request, setting the chosen attributes
    /// to random values like the dataset's own. Writes to the dataset.
    Upsert(UpsertArgs),
    /// `RecordEvents` of batches of events of random existing users, timed within the last
    /// 10 minutes. Writes to the dataset.
    RecordEvents(RecordEventsArgs),
    /// A weighted mix of the other workloads, reported per operation and in total.
    Mixed(MixedArgs),
}

/// How hard and how long to load the server; every workload takes these.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The dataset the requests name.
    #[arg(long, default_value = "default")]
    dataset: String,
    /// Requests in flight. Without --rate (closed loop): N workers, each sending its next
    /// request when the last one answered [default: 1, serial]. With --rate: the most
    /// requests outstanding at once [default: 256]; when all are taken, the next sends wait,
    /// and the wait counts in their latency.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Option<u32>,
    /// Open loop: send R requests per second on a fixed schedule, whatever the answers'
    /// pace, and measure each latency from its scheduled send time, so that a server stall
    /// shows in the latency of every request it held up (no coordinated omission).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    rate: Option<f64>,
    /// How long to measure, e.g. 10s, 500ms, 2m [default: 10s, unless --requests is given].
    /// With --requests too, the run ends at whichever comes first.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Measure exactly this many requests (the warm-up's are not counted).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Send load for this long first and leave it out of the statistics (connections,
    /// server caches and allocators warm up).
    #[arg(long, value_parser = parse_warmup, default_value = "0s")]
    warmup: Duration,
    /// HTTP/2 connections to spread the requests over, round-robin. One connection writes
    /// every request through one h2 writer, which caps it at high concurrency [default: one
    /// per 64 requests in flight, so 1 up to --concurrency 64; at most --concurrency].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    connections: Option<u32>,
    /// Seed of every random choice (users, values, operations): request n is the same in
    /// every run with the same seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Where the user ids of a workload come from.
#[derive(Debug, Clone, Args)]
pub struct UserArgs {
    /// Pick users from a random sample of this many of the dataset's users, fetched at start
    /// (at most the server's page limit).
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    sample_ids: u32,
    /// Pick users from this file of external ids, one per line, instead of a sample.
    #[arg(long, value_name = "PATH", conflicts_with = "sample_ids")]
    ids_file: Option<PathBuf>,
}

impl UserArgs {
    fn source(&self) -> UserSource {
        match &self.ids_file {
            Some(path) => UserSource::File(path.clone()),
            None => UserSource::Sample(self.sample_ids),
        }
    }
}

/// What upserts change.
#[derive(Debug, Clone, Args)]
pub struct AttributeArgs {
    /// Attributes each upsert sets, comma-separated [default: every attribute]. Values are
    /// drawn by kind: one of the attribute's 100 most frequent values (rarely a new one) for
    /// categorical, 1-3 of them for sets, either for booleans; for numbers and timestamps,
    /// within the range of the 100 most frequent values, or (over 10,000 distinct values)
    /// 0-100 for integers, 0-1000 for floats, the last year for timestamps.
    #[arg(long, value_delimiter = ',')]
    attributes: Vec<String>,
}

/// What event batches hold.
#[derive(Debug, Clone, Args)]
pub struct EventArgs {
    /// Events per RecordEvents request.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Event names to record, comma-separated [default: the dataset's event names].
    #[arg(long, value_delimiter = ',')]
    event_names: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CountArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The expression to count, in the text language.
    #[arg(long)]
    expr: String,
}

#[derive(Debug, Clone, Args)]
pub struct SegmentsForArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    users: UserArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UpsertArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    users: UserArgs,
    #[command(flatten)]
    attributes: AttributeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RecordEventsArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    users: UserArgs,
    #[command(flatten)]
    events: EventArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MixedArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Operations and their weights; each request picks one at random by weight.
    #[arg(long, default_value = "segments-for=90,count=5,upsert=4,record-events=1",
          value_parser = workload::parse_mix)]
    mix: workload::Mix,
    /// The expression of the count operation (needed when count has a weight).
    #[arg(long)]
    expr: Option<String>,
    #[command(flatten)]
    users: UserArgs,
    #[command(flatten)]
    attributes: AttributeArgs,
    #[command(flatten)]
    events: EventArgs,
}

impl BenchCommand {
    /// The load flags and the workload's specification.
    fn into_parts(self) -> (&'static str, LoadArgs, Spec) {
        let spec = |load: &LoadArgs, mix: Vec<(Operation, u32)>| Spec {
            dataset: load.dataset.clone(),
            mix,
            expr: None,
            users: UserSource::Sample(1),
            attributes: Vec::new(),
            batch: 1,
            event_names: Vec::new(),
            seed: load.seed,
        };
        match self {
            BenchCommand::Count(args) => {
                let mut spec = spec(&args.load, vec![(Operation::Count, 1)]);
                spec.expr = Some(args.expr);
                ("count", args.load, spec)
            }
            BenchCommand::SegmentsFor(args) => {
                let mut spec = spec(&args.load, vec![(Operation::SegmentsFor, 1)]);
                spec.users = args.users.source();
                ("segments-for", args.load, spec)
            }
            BenchCommand::Upsert(args) => {
                let mut spec = spec(&args.load, vec![(Operation::Upsert, 1)]);
                spec.users = args.users.source();
                spec.attributes = args.attributes.attributes;
                ("upsert", args.load, spec)
            }
            BenchCommand::RecordEvents(args) => {
                let mut spec = spec(&args.load, vec![(Operation::RecordEvents, 1)]);
                spec.users = args.users.source();
                spec.batch = args.events.batch;
                spec.event_names = args.events.event_names;
                ("record-events", args.load, spec)
            }
            BenchCommand::Mixed(args) => {
                let mut spec = spec(&args.load, args.mix.0);
                spec.expr = args.expr;
                spec.users = args.users.source();
                spec.attributes = args.attributes.attributes;
                spec.batch = args.events.batch;
                spec.event_names = args.events.event_names;
                ("mixed", args.load, spec)
            }
        }
    }
}

/// `--rate`: a positive, finite number of requests per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        Ok(_) => Err("the rate must be a positive number of requests per second".into()),
        Err(_) => Err(format!("'{text}' is not a number")),
    }
}

/// A duration written as a number and a unit: `500ms`, `10s`, `1.5m`, `2h` (also `us`).
fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{text}' needs a unit: us, ms, s, m or h (e.g. 10s)"))?;
    let (number, unit) = text.split_at(split);
    let amount: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' does not start with a number"))?;
    let seconds_per_unit = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("'{unit}' is not a unit: use us, ms, s, m or h")),
    };
    Duration::try_from_secs_f64(amount * seconds_per_unit)
        .map_err(|_| format!("'{text}' is out of range"))
}

/// `--duration`: positive.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_span(text)?;
    if duration.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(duration)
}

/// `--warmup`: zero means none.
fn parse_warmup(text: &str) -> Result<Duration, String> {
    parse_span(text)
}

/// The run's plan and connection count from the flags.
fn plan(load: &LoadArgs) -> Result<(LoadPlan, usize), ClientError> {
    let (shape, in_flight) = match load.rate {
        Some(rate) => {
            let outstanding = load.concurrency.unwrap_or(DEFAULT_OUTSTANDING) as usize;
            let shape = Shape::Open {
                rate,
                max_outstanding: outstanding,
            };
            (shape, outstanding)
        }
        None => {
            let workers = load.concurrency.unwrap_or(1) as usize;
            (Shape::Closed { workers }, workers)
        }
    };
    let connections = match load.connections {
        Some(k) if k as usize > in_flight => {
            return Err(ClientError::Input(format!(
                "--connections {k} is more than the {in_flight} requests in flight \
                 (--concurrency): the extra connections would stay idle"
            )))
        }
        Some(k) => k as usize,
        None => in_flight.div_ceil(IN_FLIGHT_PER_CONNECTION).max(1),
    };
    let duration = match (load.duration, load.requests) {
        (None, None) => Some(DEFAULT_DURATION),
        (duration, _) => duration,
    };
    let plan = LoadPlan {
        shape,
        warmup: load.warmup,
        duration,
        requests: load.requests,
    };
    Ok((plan, connections))
}

/// `count` separate HTTP/2 connections to `addr`.
async fn connect(
    addr: &str,
    args: &ConnectArgs,
    count: usize,
) -> Result<Vec<Connection>, ClientError> {
    let endpoint = args
        .endpoint(addr)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        // Each `open` makes its own connection; clones of a channel would share one.
        channels.push(args.open(&endpoint, addr).await?);
    }
    Ok(channels)
}

/// Runs a workload against `addr` and prints the report (JSON with `json`).
///
/// # Errors
/// Flags that make no sense together, connection failures, and setup calls the server
/// refused (a bad expression, an unknown dataset or attribute). Requests that fail during
/// the run are counted in the report, not returned.
pub async fn run(
    addr: &str,
    args: &ConnectArgs,
    json: bool,
    command: BenchCommand,
) -> Result<(), ClientError> {
    let (name, load, spec) = command.into_parts();
    let (plan, connections) = plan(&load)?;
    let channels = connect(addr, args, connections).await?;
    let workload = Arc::new(Workload::prepare(spec, channels).await?);
    let names = workload.operation_names();
    let progress = Arc::new(Progress::default());
    // The progress line is for a person watching; scripts and `--json` readers get stdout.
    let show_progress = std::io::stderr().is_terminal();
    if show_progress && workload.user_count() > 0 {
        eprintln!("picking from {} users", workload.user_count());
    }
    let request = {
        let workload = workload.clone();
        move |n| workload.clone().call(n)
    };
    let drive = driver::drive(plan, names.len(), progress.clone(), request);
    tokio::pin!(drive);
    let started = Instant::now();
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut last_completed = 0;
    let measured = loop {
        tokio::select! {
            measured = &mut drive => break measured,
            _ = ticks.tick(), if show_progress => {
                let completed = progress.completed.load(Ordering::Relaxed);
                let errors = progress.errors.load(Ordering::Relaxed);
                let warming = started.elapsed() < plan.warmup;
                eprintln!(
                    "{:>6.1} s  {completed} requests  {} req/s  {errors} errors{}",
                    started.elapsed().as_secs_f64(),
                    completed - last_completed,
                    if warming { "  (warming up)" } else { "" }
                );
                last_completed = completed;
            }
        }
    };
    let (rate, concurrency) = match plan.shape {
        Shape::Open {
            rate,
            max_outstanding,
        } => (Some(rate), max_outstanding),
        Shape::Closed { workers } => (None, workers),
    };
    let report = report::Report {
        info: report::RunInfo {
            workload: name.to_owned(),
            dataset: load.dataset.clone(),
            rate,
            concurrency,
            connections,
            warmup: plan.warmup,
        },
        names,
        recorder: measured.recorder,
        elapsed: measured.elapsed,
        unsent: measured.unsent,
    };
    let out = &mut std::io::stdout().lock();
    if json {
        writeln!(out, "{}", report.json())?;
    } else {
        report.write_text(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_and_rates_must_be_positive() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("0s").unwrap_err().contains("more than zero"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_warmup("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_rate("5000"), Ok(5000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("inf").is_err());
        assert!(parse_rate("NaN").is_err());
    }

    fn load(rate: Option<f64>, concurrency: Option<u32>, connections: Option<u32>) -> LoadArgs {
        LoadArgs {
            dataset: "default".into(),
            concurrency,
            rate,
            duration: None,
            requests: None,
            warmup: Duration::ZERO,
            connections,
            seed: 1,
        }
    }

    #[test]
    fn plans_default_sensibly_and_refuse_idle_connections() {
        let (plan_closed, connections) = plan(&load(None, None, None)).unwrap();
        assert_eq!(plan_closed.shape, Shape::Closed { workers: 1 });
        assert_eq!(plan_closed.duration, Some(DEFAULT_DURATION));
        assert_eq!(connections, 1);
        let (open, connections) = plan(&load(Some(100.0), None, None)).unwrap();
        assert_eq!(
            open.shape,
            Shape::Open {
                rate: 100.0,
                max_outstanding: 256
            }
        );
        assert_eq!(connections, 4);
        let (_, connections) = plan(&load(None, Some(65), None)).unwrap();
        assert_eq!(connections, 2);
        assert!(plan(&load(None, Some(2), Some(3))).is_err());
    }
}
