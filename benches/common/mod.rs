//! What the benchmarks share: settings from the environment, resident memory, the saved
//! segments of the demo dataset, and the null-aware booleans of their arrow-kernel baselines.

// Each bench compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;

use arrow_array::{Array, BooleanArray};
use arrow_buffer::BooleanBuffer;
use audience::engine::SegmentDefinition;
use audience::time::Millis;

/// A number from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether a group should run: `AUDIENCE_BENCH_GROUPS=count,import` runs only those (each
/// group's set-up is skipped too, which criterion's own filter cannot do).
pub fn wanted(group: &str) -> bool {
    match std::env::var("AUDIENCE_BENCH_GROUPS") {
        Ok(groups) => groups.split(',').any(|g| g.trim() == group),
        Err(_) => true,
    }
}

/// The process's resident memory, in bytes.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The most resident memory the process has had, in bytes (`VmHWM`).
pub fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The median of some measurements (the upper middle one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Values and validity: a null compares as false.
pub fn truthy(result: &BooleanArray) -> BooleanBuffer {
    match result.nulls() {
        Some(nulls) => result.values() & nulls.inner(),
        None => result.values().clone(),
    }
}

/// A saved segment of the text `text`.
pub fn segment(id: String, text: &str, created_at: Millis) -> SegmentDefinition {
    SegmentDefinition {
        id,
        name: text.to_owned(),
        description: String::new(),
        labels: BTreeMap::new(),
        expression: audience::expr::parse(text).expect("segment parses"),
        created_at,
        updated_at: created_at,
    }
}

/// `count` saved segments of the demo ([`audience::demo::segments`]: broad, combined,
/// narrow and behavioural ones), the same in every run.
pub fn segment_definitions(count: usize, created_at: Millis) -> Vec<SegmentDefinition> {
    audience::demo::segments(count, 42)
        .into_iter()
        .map(|(id, text)| segment(id, &text, created_at))
        .collect()
}
