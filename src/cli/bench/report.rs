//! What a run measured: one latency histogram and error tally per operation, their percentiles,
//! and the printed report (aligned text, or one JSON object).
//!
//! Latencies go into HDR histograms in microseconds with 3 significant digits: constant memory
//! whatever the run length, any percentile afterwards, and per-operation histograms that add up
//! exactly into the total.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// The largest latency told apart, in microseconds (an hour); longer ones count as an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant decimal digits kept: a value is known to within 0.1%.
const SIGNIFICANT_DIGITS: u8 = 3;

fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS) {
        Ok(histogram) => histogram,
        // Constant bounds that hdrhistogram accepts (low ≥ 1, high ≥ 2·low, digits ≤ 5).
        Err(e) => unreachable!("latency histogram bounds: {e:?}"),
    }
}

/// The statistics of one operation (or of all of them).
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Latencies of the requests that succeeded, in µs. Failures are left out: a refused
    /// request answers fast and would make a failing server look quick.
    latency: Histogram<u64>,
    ok: u64,
    /// Failed requests by gRPC code name (`Unavailable`), sorted for stable output.
    errors: BTreeMap<String, u64>,
    /// Events carried by successful requests (record-events), for events/s.
    events: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            latency: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            events: 0,
        }
    }
}

impl OpStats {
    /// Counts one finished request.
    pub fn record(&mut self, latency: Duration, result: Result<u64, tonic::Code>) {
        match result {
            Ok(events) => {
                self.ok += 1;
                self.events += events;
                // A latency under 1 µs is recorded as 1: the histogram's lowest value.
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.latency.saturating_record(micros.max(1));
            }
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    /// Adds another operation's statistics into these.
    pub fn add(&mut self, other: &OpStats) {
        // Same bounds on both sides, so the addition cannot fail; saturate if it ever did.
        if self.latency.add(&other.latency).is_err() {
            for value in other.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
        self.ok += other.ok;
        self.events += other.events;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }

    /// Requests that finished, successful or not.
    pub fn requests(&self) -> u64 {
        self.ok + self.error_count()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency percentiles of the successful requests.
    pub fn percentiles(&self) -> Percentiles {
        let h = &self.latency;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }

    /// Successful requests whose latency was at least `micros` (within the histogram's
    /// resolution).
    #[cfg(test)]
    pub fn count_at_least(&self, micros: u64) -> u64 {
        self.latency.count_between(micros, MAX_LATENCY_US)
    }
}

/// Latency percentiles in microseconds. Each is the highest value equivalent to the recorded
/// one at the histogram's resolution, so they never decrease from p50 to max.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    fn json(&self) -> Value {
        json!({"p50": self.p50, "p90": self.p90, "p99": self.p99, "p99_9": self.p99_9,
               "max": self.max, "mean": round(self.mean, 1)})
    }
}

/// Statistics per operation, in the order of the workload's operations.
#[derive(Debug, Clone)]
pub struct Recorder {
    ops: Vec<OpStats>,
}

impl Recorder {
    pub fn new(operations: usize) -> Self {
        Self {
            ops: vec![OpStats::default(); operations.max(1)],
        }
    }

    /// Counts one finished request of operation `op` (an index into the workload's list).
    pub fn record(&mut self, op: usize, latency: Duration, result: Result<u64, tonic::Code>) {
        let last = self.ops.len() - 1;
        self.ops[op.min(last)].record(latency, result);
    }

    pub fn operations(&self) -> &[OpStats] {
        &self.ops
    }

    /// All operations together.
    pub fn total(&self) -> OpStats {
        let mut total = OpStats::default();
        for op in &self.ops {
            total.add(op);
        }
        total
    }
}

/// How the load was shaped, for the report's header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub workload: String,
    pub dataset: String,
    /// `Some(rate)` for an open loop.
    pub rate: Option<f64>,
    /// Closed loop: workers; open loop: the most requests outstanding.
    pub concurrency: usize,
    pub connections: usize,
    pub warmup: Duration,
}

/// A finished run: what it was and what it measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub info: RunInfo,
    /// Operation names, parallel to the recorder's operations.
    pub names: Vec<&'static str>,
    pub recorder: Recorder,
    /// From the end of the warm-up to the last measured answer.
    pub elapsed: Duration,
    /// Open loop: requests scheduled within the duration that were never sent because the
    /// outstanding limit stayed full until the end.
    pub unsent: u64,
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

impl Report {
    fn stats_json(&self, stats: &OpStats) -> Value {
        json!({
            "requests": stats.requests(),
            "ok": stats.ok,
            "errors": stats.error_count(),
            "errors_by_code": stats.errors,
            "throughput_rps": round(per_second(stats.requests(), self.elapsed), 1),
            "events": stats.events,
            "events_per_s": round(per_second(stats.events, self.elapsed), 1),
            "latency_us": stats.percentiles().json(),
        })
    }

    /// The whole report as one JSON object: the run's shape, the totals at the top level, and
    /// the same figures per operation under `operations`.
    pub fn json(&self) -> Value {
        let info = &self.info;
        let mut top = self.stats_json(&self.recorder.total());
        let operations: serde_json::Map<String, Value> = self
            .names
            .iter()
            .zip(self.recorder.operations())
            .map(|(name, stats)| ((*name).to_owned(), self.stats_json(stats)))
            .collect();
        if let Value::Object(fields) = &mut top {
            let shape = json!({
                "workload": info.workload,
                "dataset": info.dataset,
                "mode": if info.rate.is_some() { "open" } else { "closed" },
                "rate": info.rate,
                "concurrency": info.concurrency,
                "connections": info.connections,
                "warmup_s": info.warmup.as_secs_f64(),
                "elapsed_s": round(self.elapsed.as_secs_f64(), 3),
                "unsent": self.unsent,
                "operations": operations,
            });
            if let Value::Object(shape) = shape {
                fields.extend(shape);
            }
        }
        top
    }

    /// The report as aligned text: a header line, one row per operation (and a total row when
    /// there are several), then events, errors and warnings when there are any.
    ///
    /// # Errors
    /// Writing to `out` failed.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        let info = &self.info;
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let shape = match info.rate {
            Some(rate) => format!(
                "open loop at {rate} req/s, at most {} outstanding",
                info.concurrency
            ),
            None => format!("closed loop, {} in flight", info.concurrency),
        };
        write!(
            out,
            "bench {} on dataset {}: {shape}, {}; {:.2} s measured",
            info.workload,
            info.dataset,
            plural(info.connections, "connection"),
            self.elapsed.as_secs_f64()
        )?;
        if !info.warmup.is_zero() {
            write!(out, " after {:.2} s of warm-up", info.warmup.as_secs_f64())?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:<14} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "operation",
            "requests",
            "req/s",
            "errors",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        )?;
        let total = self.recorder.total();
        let mut rows: Vec<(&str, &OpStats)> = self
            .names
            .iter()
            .copied()
            .zip(self.recorder.operations())
            .collect();
        if rows.len() > 1 {
            rows.push(("total", &total));
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        for (name, stats) in rows {
            let p = stats.percentiles();
            writeln!(
                out,
                "{:<14} {:>10} {:>10.1} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name,
                stats.requests(),
                per_second(stats.requests(), self.elapsed),
                stats.error_count(),
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p99_9),
                ms(p.max)
            )?;
        }
        if total.events > 0 {
            writeln!(
                out,
                "events recorded: {} ({:.1}/s)",
                total.events,
                per_second(total.events, self.elapsed)
            )?;
        }
        if !total.errors.is_empty() {
            let codes: Vec<String> = total
                .errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            writeln!(
                out,
                "errors by code: {} (latencies are of successful requests)",
                codes.join(", ")
            )?;
        }
        if let (Some(rate), true) = (info.rate, self.unsent > 0) {
            writeln!(
                out,
                "warning: {} scheduled requests were never sent: the server did not keep up \
                 with {rate} req/s within {} outstanding (latencies count from the scheduled \
                 send times, so the delay shows in them)",
                self.unsent, info.concurrency
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_known_latencies() {
        let mut stats = OpStats::default();
        // 1..=1000 µs once each: below 2048 the histogram is exact.
        for n in 1..=1000 {
            stats.record(micros(n), Ok(0));
        }
        let p = stats.percentiles();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p99_9, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert!((p.mean - 500.5).abs() < 0.01, "{}", p.mean);

        // One slow outlier in 1000 moves p99.9 and max, not p99.
        let mut stats = OpStats::default();
        for _ in 0..999 {
            stats.record(micros(100), Ok(0));
        }
        stats.record(Duration::from_secs(2), Ok(0));
        let p = stats.percentiles();
        assert_eq!((p.p50, p.p99), (100, 100));
        // Large values keep 3 significant digits: within 0.1%.
        assert!(
            p.p99_9 == 100 || p.p99_9.abs_diff(2_000_000) <= 2_000,
            "{p:?}"
        );
        assert!(p.max.abs_diff(2_000_000) <= 2_000, "{p:?}");
    }

    #[test]
    fn errors_are_counted_by_code_and_kept_out_of_latency() {
        let mut recorder = Recorder::new(2);
        recorder.record(0, micros(10), Ok(0));
        recorder.record(0, micros(50_000), Err(tonic::Code::Unavailable));
        recorder.record(1, micros(30), Ok(100));
        recorder.record(1, micros(5), Err(tonic::Code::Unavailable));
        recorder.record(1, micros(5), Err(tonic::Code::InvalidArgument));
        let total = recorder.total();
        assert_eq!((total.requests(), total.ok, total.error_count()), (5, 2, 3));
        assert_eq!(total.errors["Unavailable"], 2);
        assert_eq!(total.events, 100);
        assert_eq!(total.percentiles().max, 30);

        let report = Report {
            info: RunInfo {
                workload: "mixed".into(),
                dataset: "default".into(),
                rate: None,
                concurrency: 4,
                connections: 1,
                warmup: Duration::ZERO,
            },
            names: vec!["count", "record-events"],
            recorder,
            elapsed: Duration::from_secs(2),
            unsent: 0,
        };
        let json = report.json();
        assert_eq!(json["requests"], 5);
        assert_eq!(json["throughput_rps"], 2.5);
        assert_eq!(json["events_per_s"], 50.0);
        assert_eq!(json["operations"]["record-events"]["errors"], 2);
        assert_eq!(json["operations"]["count"]["latency_us"]["p50"], 10);
        let mut text = Vec::new();
        report.write_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("\ntotal "), "{text}");
        assert!(text.contains("InvalidArgument 1, Unavailable 2"), "{text}");
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let stats = OpStats::default();
        assert_eq!(stats.percentiles(), Percentiles::default());
        assert_eq!(per_second(0, Duration::ZERO), 0.0);
    }
}
