//! The log: order, framing, recovery, and how groups are synced under each policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::super::frame::{self, MAGIC};
use super::segments::{list_segments, segment_path};
use super::writer::DIRECT_BYTES;
use super::*;

fn temp_dir(name: &str) -> PathBuf {
    crate::persist::test_dir(&format!("wal-{name}"))
}

type Records = Vec<(u64, Vec<u8>)>;

fn read_all(dir: &Path, repair: bool) -> Result<(Records, Recovered)> {
    let mut seen = Vec::new();
    let recovered = recover(dir, repair, |seq, payload| {
        seen.push((seq, payload.to_vec()));
        Ok(())
    })?;
    Ok((seen, recovered))
}

#[tokio::test]
async fn appended_records_come_back_in_order_across_rotations_and_restarts() {
    let dir = temp_dir("order");
    let options = WalOptions {
        segment_bytes: 200,
        ..WalOptions::default()
    };
    let wal = Wal::open(&dir, 1, options).unwrap();
    for i in 0..50u64 {
        let position = wal
            .append(format!("record {i}").into_bytes())
            .await
            .unwrap();
        assert_eq!(position, Position::seq(i + 1));
    }
    wal.close();
    let (seen, recovered) = read_all(&dir, false).unwrap();
    assert_eq!(recovered.next_seq, 51);
    assert!(
        list_segments(&dir).unwrap().len() > 3,
        "segments rotate by size"
    );
    let expected: Vec<(u64, Vec<u8>)> = (0..50u64)
        .map(|i| (i + 1, format!("record {i}").into_bytes()))
        .collect();
    assert_eq!(seen, expected);
    let wal = Wal::open(&dir, recovered.next_seq, options).unwrap();
    assert_eq!(
        wal.append(b"after".to_vec()).await.unwrap(),
        Position::seq(51)
    );
    wal.close();
    assert_eq!(read_all(&dir, false).unwrap().0.len(), 51);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn large_records_are_written_in_place_between_small_ones() {
    let dir = temp_dir("large");
    let wal = Arc::new(Wal::open(&dir, 1, WalOptions::default()).unwrap());
    let large: Vec<u8> = (0..DIRECT_BYTES * 3 + 5).map(|i| (i % 251) as u8).collect();
    let payloads = [
        b"small".to_vec(),
        large,
        b"after".to_vec(),
        vec![7; DIRECT_BYTES],
    ];
    let tasks: Vec<_> = payloads
        .iter()
        .map(|p| {
            let (wal, p) = (wal.clone(), p.clone());
            tokio::spawn(async move { wal.append(p).await })
        })
        .collect();
    let mut by_seq = Vec::new();
    for (task, payload) in tasks.into_iter().zip(&payloads) {
        by_seq.push((task.await.unwrap().unwrap().major, payload.clone()));
    }
    by_seq.sort();
    wal.close();
    assert_eq!(read_all(&dir, false).unwrap().0, by_seq);
    assert_eq!(
        wal.bytes(),
        std::fs::metadata(segment_path(&dir, 1)).unwrap().len(),
        "the size kept matches the file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn concurrent_appends_share_syncs_under_both_policies() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Interval] {
        let dir = temp_dir("group");
        let options = WalOptions {
            policy,
            ..WalOptions::default()
        };
        let wal = Arc::new(Wal::open(&dir, 1, options).unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let wal = wal.clone();
                tokio::spawn(async move { wal.append(i.to_le_bytes().to_vec()).await })
            })
            .collect();
        let mut positions = Vec::new();
        for task in tasks {
            positions.push(task.await.unwrap().unwrap().major);
        }
        positions.sort_unstable();
        assert_eq!(positions, (1..=64).collect::<Vec<_>>(), "{policy:?}");
        wal.close();
        assert_eq!(read_all(&dir, false).unwrap().0.len(), 64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `interval` with a long interval: any wait for it shows as seconds, not milliseconds.
fn long_interval() -> WalOptions {
    WalOptions {
        policy: FsyncPolicy::Interval,
        interval: Duration::from_secs(5),
        ..WalOptions::default()
    }
}

/// Well under [`long_interval`]: an answer that waited for the interval comes after it.
const NOT_HELD: Duration = Duration::from_secs(1);

/// Whether a submitted record's answer has come.
fn answered(done: &mut oneshot::Receiver<Result<u64>>) -> bool {
    !matches!(done.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

#[tokio::test]
async fn a_lone_write_is_not_held_by_the_interval() {
    let dir = temp_dir("lone");
    let wal = Wal::open(&dir, 1, long_interval()).unwrap();
    for i in 0..3u8 {
        let started = Instant::now();
        let announced = wal.announce();
        let (seq, done) = wal.submit(vec![i; 10], Some(announced)).unwrap();
        assert_eq!(Wal::durable(done).await.unwrap(), Position::seq(seq));
        assert!(
            started.elapsed() < NOT_HELD,
            "write {i} waited {:?} with nothing to wait for",
            started.elapsed()
        );
    }
    let started = Instant::now();
    wal.append(b"unannounced".to_vec()).await.unwrap();
    assert!(started.elapsed() < NOT_HELD, "{:?}", started.elapsed());
    assert_eq!(wal.syncs(), 4, "one sync per lone write");
    assert_eq!(wal.in_progress(), 0);
    wal.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn announced_writes_share_one_sync_once_all_have_queued() {
    let dir = temp_dir("siblings");
    let wal = Wal::open(&dir, 1, long_interval()).unwrap();
    let announced: Vec<_> = (0..4).map(|_| wal.announce()).collect();
    assert_eq!(wal.in_progress(), 4);
    let started = Instant::now();
    let mut pending = Vec::new();
    for (i, announced) in announced.into_iter().enumerate() {
        if i > 0 {
            // Time for a sync that would not wait for the others.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                !pending.iter_mut().any(answered),
                "synced before write {i} of 4 queued"
            );
        }
        pending.push(wal.submit(vec![i as u8; 10], Some(announced)).unwrap().1);
    }
    assert_eq!(wal.in_progress(), 0);
    for done in pending {
        Wal::durable(done).await.unwrap();
    }
    assert!(
        started.elapsed() < NOT_HELD,
        "the last record completed the group, yet it waited {:?}",
        started.elapsed()
    );
    assert_eq!(wal.syncs(), 1, "the four writes share one sync");
    wal.close();
    assert_eq!(read_all(&dir, false).unwrap().0.len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_write_given_up_does_not_hold_the_group() {
    let dir = temp_dir("given-up");
    let wal = Wal::open(&dir, 1, long_interval()).unwrap();
    let (first, second) = (wal.announce(), wal.announce());
    let started = Instant::now();
    let (_, mut done) = wal.submit(b"one".to_vec(), Some(first)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!answered(&mut done), "the second write may still join");
    // As when its change fails to apply, or its caller goes away: nothing more can join.
    drop(second);
    Wal::durable(done).await.unwrap();
    assert!(started.elapsed() < NOT_HELD, "{:?}", started.elapsed());
    assert_eq!((wal.in_progress(), wal.syncs()), (0, 1));
    wal.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_write_stays_in_progress_there_is_at_most_one_sync_per_interval() {
    let dir = temp_dir("bounded");
    let interval = Duration::from_millis(20);
    let options = WalOptions {
        policy: FsyncPolicy::Interval,
        interval,
        ..WalOptions::default()
    };
    let wal = Arc::new(Wal::open(&dir, 1, options).unwrap());
    // A write that prepares a long record (an import) keeps every group waiting its interval.
    let slow = wal.announce();
    let started = Instant::now();
    let writers: Vec<_> = (0..8u8)
        .map(|w| {
            let wal = wal.clone();
            tokio::spawn(async move {
                let mut writes = 0u64;
                while started.elapsed() < Duration::from_millis(300) {
                    let announced = wal.announce();
                    let (_, done) = wal.submit(vec![w; 10], Some(announced)).unwrap();
                    Wal::durable(done).await.unwrap();
                    writes += 1;
                }
                writes
            })
        })
        .collect();
    let mut writes = 0;
    for writer in writers {
        writes += writer.await.unwrap();
    }
    let elapsed = started.elapsed();
    drop(slow);
    let bound = (elapsed.as_secs_f64() / interval.as_secs_f64()) as u64 + 1;
    assert!(
        wal.syncs() <= bound,
        "{} syncs in {elapsed:?} (at most {bound}) for {writes} writes",
        wal.syncs()
    );
    assert!(writes > wal.syncs(), "writers shared syncs");
    wal.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn removing_before_a_rotation_keeps_only_later_records() {
    let dir = temp_dir("remove");
    let wal = Wal::open(&dir, 1, WalOptions::default()).unwrap();
    for i in 0..5u64 {
        wal.append(vec![i as u8; 10]).await.unwrap();
    }
    let next = wal.rotate().await.unwrap();
    assert_eq!(next, 6);
    wal.append(vec![9; 10]).await.unwrap();
    let freed = wal.remove_before(next).unwrap();
    assert!(freed > 0);
    wal.close();
    let (seen, recovered) = read_all(&dir, false).unwrap();
    assert_eq!(seen, vec![(6, vec![9; 10])]);
    assert_eq!(recovered.next_seq, 7);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_torn_tail_is_dropped_and_corruption_names_file_and_offset() {
    let dir = temp_dir("torn");
    let wal = Wal::open(&dir, 1, WalOptions::default()).unwrap();
    for i in 0..3u64 {
        wal.append(vec![i as u8; 100]).await.unwrap();
    }
    wal.close();
    let path = segment_path(&dir, 1);
    let whole = std::fs::read(&path).unwrap();
    std::fs::write(&path, &whole[..whole.len() - 30]).unwrap();
    let (seen, recovered) = read_all(&dir, false).unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(recovered.dropped.len(), 1, "{:?}", recovered.dropped);
    assert_eq!(recovered.next_seq, 3);

    let mut flipped = std::fs::read(&path).unwrap();
    let second = MAGIC.len() + frame::HEADER_BYTES + 100;
    flipped[second + frame::HEADER_BYTES + 5] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    // A second segment after the damaged one: the damage is not at the tail.
    let wal = Wal::open(&dir, 3, WalOptions::default()).unwrap();
    wal.append(vec![7; 10]).await.unwrap();
    wal.close();
    match read_all(&dir, false) {
        Err(PersistError::Corrupt {
            path: bad, offset, ..
        }) => {
            assert_eq!(bad, path);
            assert_eq!(offset, second as u64);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let (seen, recovered) = read_all(&dir, true).unwrap();
    assert_eq!(seen.len(), 1, "repair keeps what precedes the damage");
    assert_eq!(recovered.next_seq, 2);
    assert!(recovered.dropped[0].contains(&format!("byte offset {second}")));
    assert_eq!(
        read_all(&dir, false).unwrap().0.len(),
        1,
        "repaired for good"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
