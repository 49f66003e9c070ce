//! Recovery of the embedded store: the newest snapshot, then the log records after it, each
//! applied to the version it was applied to when it was written.

use std::collections::{BTreeMap, BTreeSet};

use super::durable::{LoadProgress, RecoveryReport};
use super::error::Result;
use super::record::{self, LogRecord, RecordBody};
use super::state::DatasetState;
use super::{snapshot, transaction, DurableOptions};
use crate::persist::snapshot as snapshot_dir;
use crate::persist::wal;
use crate::persist::{PersistError, Position};

/// Loads the newest snapshot and replays the log after it; returns the datasets, what was
/// recovered, and the number the next log record gets.
///
/// # Errors
/// Damage (named, with its offset) unless `options.repair`; an unreadable directory.
pub(super) fn recover(
    options: &DurableOptions,
    progress: &LoadProgress,
) -> Result<(BTreeMap<String, DatasetState>, RecoveryReport, u64)> {
    let mut report = RecoveryReport::default();
    let mut states = BTreeMap::new();
    let mut dropped_datasets = BTreeSet::new();
    let mut log_from = 1;
    let root = snapshot_dir::root_of(&options.data_dir);
    let found = match snapshot_dir::latest(&root) {
        Err(error) if options.repair => {
            let message = format!("{error}; the snapshot is ignored, and with it what it held");
            tracing::warn!("{message}");
            report.dropped.push(message);
            None
        }
        other => other?,
    };
    if let Some(found) = &found {
        log_from = found.manifest.log_from;
        let total = found.manifest.datasets.len() as u64;
        progress.begin(total + 1);
        for (index, entry) in found.manifest.datasets.iter().enumerate() {
            match load_dataset(found, entry) {
                Ok(mut state) => {
                    state.log_position = entry.position;
                    states.insert(entry.name.clone(), state);
                }
                Err(error) if options.repair => {
                    let message = format!(
                        "{error}; dataset '{}' is dropped, with its log records",
                        entry.name
                    );
                    tracing::warn!("{message}");
                    report.dropped.push(message);
                    dropped_datasets.insert(entry.name.clone());
                }
                Err(error) => return Err(error),
            }
            progress.advance(index as u64 + 1);
        }
        report.snapshot = Some(found.dir.clone());
    } else {
        progress.begin(1);
    }
    let wal_dir = options.data_dir.join("wal");
    check_log_start(&wal_dir, log_from, options.repair, &mut report)?;
    let recovered = wal::recover(&wal_dir, options.repair, |seq, bytes| {
        let record = record::decode(bytes)?;
        if dropped_datasets.contains(&record.dataset) {
            return Ok(());
        }
        let state = states.entry(record.dataset.clone()).or_default();
        if seq <= state.log_position.major {
            return Ok(());
        }
        if record.body.deletes_users() {
            let at = report
                .oldest_delete
                .map_or(record.now, |o| o.min(record.now));
            report.oldest_delete = Some(at);
        }
        replay(state, &record).map_err(|e| {
            format!(
                "record {seq} (dataset '{}') does not apply: {e}",
                record.dataset
            )
        })?;
        state.log_position = Position::seq(seq);
        report.records += 1;
        Ok(())
    })?;
    report.dropped.extend(recovered.dropped);
    // A record can name a dataset whose every write failed to apply: none was created then.
    states.retain(|_, state| state.version > 0 || state.log_position != Position::START);
    report.datasets = states.len();
    progress.advance(u64::MAX);
    // A snapshot's dataset may hold records after `log_from`; numbering never goes back below
    // any of them, even when repair cut the log shorter.
    let newest_held = states
        .values()
        .map(|s| s.log_position.major + 1)
        .max()
        .unwrap_or(1);
    let next_seq = recovered.next_seq.max(log_from).max(newest_held);
    Ok((states, report, next_seq))
}

/// The log must start at or before the first record the snapshot does not hold (record 1
/// without a snapshot): a later start means records are missing (a log copied after a newer
/// snapshot deleted segments, or files removed by hand).
fn check_log_start(
    wal_dir: &std::path::Path,
    log_from: u64,
    repair: bool,
    report: &mut RecoveryReport,
) -> Result<()> {
    let Some((first, path)) = wal::first_segment(wal_dir)? else {
        return Ok(());
    };
    if first <= log_from {
        return Ok(());
    }
    let reason = format!(
        "the log starts at record {first} but the snapshot holds only the records before \
         {log_from}: records {log_from} to {} are missing",
        first - 1
    );
    if !repair {
        return Err(PersistError::Corrupt {
            path,
            offset: 0,
            reason,
        }
        .into());
    }
    let message = format!("{}: {reason}; they are lost", path.display());
    tracing::warn!("{message}");
    report.dropped.push(message);
    Ok(())
}

/// One dataset of a snapshot directory, every file checked against the manifest.
///
/// # Errors
/// A file missing, damaged (named, with its offset) or inconsistent with the others.
pub(super) fn load_dataset(
    found: &snapshot_dir::Found,
    entry: &snapshot_dir::DatasetEntry,
) -> Result<DatasetState> {
    let mut failure: Option<PersistError> = None;
    let loaded = snapshot::from_files(|name| {
        let file = entry
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("{name} is not in the manifest"))?;
        found.read(entry, file).map_err(|error| {
            let message = error.to_string();
            failure = Some(error);
            message
        })
    });
    match (loaded, failure) {
        (Ok(state), _) => Ok(state),
        (Err(_), Some(error)) => Err(error.into()),
        (Err(message), None) => Err(PersistError::Format(format!(
            "{}: {message}",
            found.dir.join(&entry.name).display()
        ))
        .into()),
    }
}

/// Applies one logged write to the version it was applied to, dropping its transitions (no
/// watcher listens during recovery).
fn replay(state: &mut DatasetState, record: &LogRecord) -> Result<()> {
    apply_record(state, record)?;
    state.clear_transitions();
    Ok(())
}

/// Applies one logged write to the version it was applied to, keeping its transitions.
///
/// # Errors
/// As the write would have failed (a record is logged only after it succeeded).
pub(super) fn apply_record(state: &mut DatasetState, record: &LogRecord) -> Result<()> {
    match &record.body {
        RecordBody::Change(change) => state.apply(change, record.now).map(|_| ()),
        RecordBody::Import(parts) => transaction::replay(state, record.now, parts),
        RecordBody::Changes(changes) => {
            let changes: Vec<&super::change::Change> = changes.iter().collect();
            let applied = state.apply_user_writes(&changes, record.now);
            applied.map(|_| ()).map_err(|(_, error)| error)
        }
    }
}
