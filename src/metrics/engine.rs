//! The engine's figures and the process's memory, read at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::engine::stats::{DatasetFigures, EngineFigures};
use crate::engine::Engine;

/// Reads [`Engine::figures`] and [`Engine::dataset_figures`] on every scrape.
#[derive(Debug)]
pub(super) struct EngineCollector {
    engine: Arc<Engine>,
}

impl EngineCollector {
    pub(super) fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type Result = std::result::Result<(), std::fmt::Error>;

/// One unlabelled series (a counter's name gets `_total`).
fn single(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<Unit>),
    metric: impl EncodeMetric,
) -> Result {
    metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?)
}

/// A gauge with one series per dataset.
fn per_dataset(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<Unit>),
    datasets: &[DatasetFigures],
    value: impl Fn(&DatasetFigures) -> Option<f64>,
) -> Result {
    let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for dataset in datasets {
        if let Some(value) = value(dataset) {
            let labels = [("dataset", dataset.name.as_str())];
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result {
        let datasets = self.engine.dataset_figures();
        encode_datasets(&mut encoder, &datasets)?;
        encode_engine(&mut encoder, &self.engine.figures())?;
        if let Some(bytes) = resident_bytes() {
            let name = "process_resident_memory";
            let help = "Resident set size of the server process";
            let value = ConstGauge::new(bytes as f64);
            single(&mut encoder, (name, help, Some(Unit::Bytes)), value)?;
        }
        Ok(())
    }
}

/// One figure of a dataset.
type Figure = fn(&DatasetFigures) -> u64;

fn encode_datasets(encoder: &mut DescriptorEncoder, datasets: &[DatasetFigures]) -> Result {
    let figures: [(&str, &str, Figure); 4] = [
        (
            "dataset_users",
            "Users in the dataset's published version",
            |d| d.users,
        ),
        ("dataset_attributes", "Attributes of the dataset", |d| {
            d.attributes
        }),
        ("dataset_segments", "Saved segments of the dataset", |d| {
            d.segments
        }),
        (
            "dataset_events",
            "Behaviour events the dataset keeps",
            |d| d.events,
        ),
    ];
    for (name, help, figure) in figures {
        per_dataset(encoder, (name, help, None), datasets, |d| {
            Some(figure(d) as f64)
        })?;
    }
    // Redis mode only: a dataset has a lag once this replica has caught up on it.
    per_dataset(
        encoder,
        (
            "replication_lag_records",
            "Records other replicas had appended that this one had not applied, at its last catch-up",
            None,
        ),
        datasets,
        |d| d.lag.map(|lag| lag.records as f64),
    )?;
    per_dataset(
        encoder,
        (
            "replication_lag",
            "Age of the oldest record this replica had not applied, at its last catch-up",
            Some(Unit::Seconds),
        ),
        datasets,
        |d| d.lag.map(|lag| lag.seconds),
    )
}

fn encode_engine(encoder: &mut DescriptorEncoder, figures: &EngineFigures) -> Result {
    let mut rows = encoder.encode_descriptor(
        "import_rows",
        "Rows applied by imports (streamed, server-side and demo), by table kind",
        None,
        MetricType::Counter,
    )?;
    for (kind, value) in [
        ("users", figures.imported_user_rows),
        ("events", figures.imported_event_rows),
    ] {
        ConstCounter::new(value).encode(rows.encode_family(&[("kind", kind)])?)?;
    }
    let counters = [
        (
            "log_appended_records",
            "Records appended to the log (local or Redis) by this process",
            None,
            figures.log_records,
        ),
        (
            "log_appended",
            "Record bytes appended to the log by this process",
            Some(Unit::Bytes),
            figures.log_bytes,
        ),
        (
            "log_fsyncs",
            "Group fsyncs of the embedded log (one fdatasync each)",
            None,
            figures.log_syncs,
        ),
        (
            "snapshots",
            "Snapshots written since the start",
            None,
            figures.snapshots,
        ),
    ];
    for (name, help, unit, value) in counters {
        single(encoder, (name, help, unit), ConstCounter::new(value))?;
    }
    let gauges = [
        (
            "imports_active",
            "Imports begun and not yet committed or abandoned",
            None,
            figures.imports_active as f64,
        ),
        (
            "log_unsnapshotted",
            "Log bytes not yet covered by a snapshot",
            Some(Unit::Bytes),
            figures.log_unsnapshotted_bytes as f64,
        ),
        (
            "snapshot_last",
            "Size of the last snapshot written",
            Some(Unit::Bytes),
            figures.last_snapshot_bytes as f64,
        ),
        (
            "snapshot_last_duration",
            "How long the last snapshot took to write",
            Some(Unit::Seconds),
            figures.last_snapshot_seconds,
        ),
        (
            "watchers",
            "Open Watch streams",
            None,
            figures.watchers as f64,
        ),
        (
            "open_cursors",
            "Member listings kept open for their next page",
            None,
            figures.open_cursors as f64,
        ),
    ];
    for (name, help, unit, value) in gauges {
        single(encoder, (name, help, unit), ConstGauge::new(value))?;
    }
    Ok(())
}

/// The process's resident set size, from `/proc/self/status` (`VmRSS`, in KiB); `None` off
/// Linux.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
