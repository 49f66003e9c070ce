use std::cmp::Ordering;

use super::*;

fn reference(values: &[Option<i64>], range: &ValueRange<i64>) -> Vec<u32> {
    (0..values.len() as u32)
        .filter(|&id| values[id as usize].is_some_and(|v| range.contains(v)))
        .collect()
}

#[test]
fn ranges_match_a_scan_before_and_after_rebalance() {
    let mut column = NumericColumn::<i64>::default();
    let values: Vec<Option<i64>> = (0..50_000i64)
        .map(|i| (i % 7 != 0).then_some((i * 7919) % 1000 - 300))
        .collect();
    for (id, v) in values.iter().enumerate() {
        if let Some(v) = v {
            column.set(id as u32, *v);
        }
    }
    let ranges = [
        (-300, 699),
        (10, 20),
        (5, 5),
        (700, 900),
        (3, 2),
        (i64::MIN, 0),
    ];
    for _ in 0..2 {
        for (low, high) in ranges {
            let range = ValueRange { low, high };
            let expected = reference(&values, &range);
            let got: Vec<u32> = column.select(&range, None).iter().collect();
            assert_eq!(got, expected, "{range:?}");
            assert_eq!(column.count(&range, None), expected.len() as u64);
            let within = Bitmap::from_iter((0..50_000).step_by(3));
            let restricted: Vec<u32> = expected.iter().copied().filter(|id| id % 3 == 0).collect();
            assert_eq!(
                column
                    .select(&range, Some(&within))
                    .iter()
                    .collect::<Vec<_>>(),
                restricted
            );
            assert_eq!(column.count(&range, Some(&within)), restricted.len() as u64);
        }
        column.rebalance();
        assert!(column.buckets.len() > 100);
    }
}

#[test]
fn cumulative_sets_follow_moves_and_answer_ranges() {
    let mut column = NumericColumn::<i64>::default();
    let mut values: Vec<Option<i64>> = (0..20_000i64).map(|i| Some((i * 7) % 60)).collect();
    let rows: Vec<(u32, Option<i64>)> = values
        .iter()
        .enumerate()
        .map(|(id, v)| (id as u32, *v))
        .collect();
    column.set_many(&rows);
    column.rebalance();
    assert!(column.cumulative.is_some());
    let mut rng = crate::rng::SplitMix64::new(5);
    for round in 0..3 {
        let moves: Vec<(u32, Option<i64>)> = (0..500)
            .map(|_| {
                let id = rng.below(20_000) as u32;
                let value = (rng.below(10) > 0).then(|| rng.below(64) as i64 - 2);
                (id, value)
            })
            .collect();
        let mut seen = std::collections::BTreeMap::new();
        for (id, value) in &moves {
            seen.insert(*id, *value);
        }
        let unique: Vec<(u32, Option<i64>)> = seen.into_iter().collect();
        if round == 1 {
            for &(id, value) in &unique {
                match value {
                    Some(v) => column.set(id, v),
                    None => column.clear(id),
                }
            }
        } else {
            column.set_many(&unique);
        }
        for &(id, value) in &unique {
            values[id as usize] = value;
        }
        let within = Bitmap::from_iter((0..20_000).step_by(5));
        for low in -3..63 {
            for high in [low, low + 2, low + 10, low + 40, 70] {
                let range = ValueRange { low, high };
                let expected = reference(&values, &range);
                let got: Vec<u32> = column.select(&range, None).iter().collect();
                assert_eq!(got, expected, "{range:?}");
                assert_eq!(column.count(&range, None), expected.len() as u64);
                let restricted = expected.iter().filter(|id| *id % 5 == 0).count() as u64;
                assert_eq!(column.count(&range, Some(&within)), restricted);
            }
        }
    }
}

#[test]
fn updates_move_users_between_buckets() {
    let mut column = NumericColumn::<f64>::default();
    for id in 0..10_000u32 {
        column.set(id, f64::from(id));
    }
    column.rebalance();
    column.set(5, 9_999.5);
    column.clear(6);
    let range = ValueRange {
        low: 0.0,
        high: 10.0,
    };
    let got: Vec<u32> = column.select(&range, None).iter().collect();
    assert_eq!(got, vec![0, 1, 2, 3, 4, 7, 8, 9, 10]);
    assert_eq!(column.get(5), Some(9_999.5));
    assert_eq!(column.get(6), None);
}

/// Zero-inflated spend (most users at exactly 0, a few price points, a long tail): single
/// writes anywhere in it must not rebuild the index each time, as they did while the bucket
/// around the heavy value stayed over its limit whatever the cut.
#[test]
fn single_writes_over_a_heavy_value_do_not_rebuild_each_time() {
    let mut rng = crate::rng::SplitMix64::new(9);
    let spend = |rng: &mut crate::rng::SplitMix64| match rng.below(100) {
        0..=59 => 0.0,
        60..=69 => 9.99,
        _ => (rng.unit() * 5_000.0 * 100.0).round() / 100.0,
    };
    let rows: Vec<(u32, Option<f64>)> = (0..200_000u32)
        .map(|id| (id, Some(spend(&mut rng))))
        .collect();
    let mut values: Vec<Option<f64>> = rows.iter().map(|r| r.1).collect();
    let mut column = NumericColumn::<f64>::from_rows(&rows);
    let built = column.rebuilds();
    for _ in 0..3_000 {
        let id = rng.below(200_000) as u32;
        let value = spend(&mut rng);
        column.set(id, value);
        values[id as usize] = Some(value);
        column.rebalance();
    }
    assert!(
        column.rebuilds() <= built + 1,
        "{} rebuilds for 3,000 single writes",
        column.rebuilds() - built
    );
    for (low, high) in [
        (0.0, 0.0),
        (0.0, 9.99),
        (0.01, 100.0),
        (9.99, 9.99),
        (10.0, 5e3),
    ] {
        let range = ValueRange { low, high };
        let expected: Vec<u32> = (0..values.len() as u32)
            .filter(|&id| values[id as usize].is_some_and(|v| range.contains(v)))
            .collect();
        let got: Vec<u32> = column.select(&range, None).iter().collect();
        assert_eq!(got, expected, "{range:?}");
    }
    // The heavy values have buckets of their own: a range next to them reads few rows.
    let zero = column.bucket_of(0.0);
    assert_eq!(
        column.buckets[zero].min.order(&column.buckets[zero].max),
        Ordering::Equal
    );
}
