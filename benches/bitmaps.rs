//! roaring vs croaring on our own workload: the bitmaps of the demo dataset (10,000,000 users by
//! default, `AUDIENCE_BENCH_USERS` to change), and the operations the engine performs on them.
//! Run with `cargo bench --features compare-croaring --bench bitmaps`.

use std::hint::black_box;

use audience::engine::{Change, DatasetState, ImportBatch};
use audience::index::numeric::ValueRange;
use audience::index::{Attribute, Bitmap};
use audience::rng::SplitMix64;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use croaring::Portable;
use roaring::MultiOps;

fn users() -> u64 {
    std::env::var("AUDIENCE_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}

fn value_bitmap(state: &DatasetState, attribute: &str, value: &str) -> Bitmap {
    match &*state.attributes()[attribute] {
        Attribute::Categorical(a) => (**a
            .bitmap(a.dictionary.code(value).expect("value"))
            .expect("bitmap"))
        .clone(),
        Attribute::Set(a) => (**a
            .bitmap(a.dictionary.code(value).expect("value"))
            .expect("bitmap"))
        .clone(),
        _ => panic!("{attribute} has no value bitmaps"),
    }
}

fn to_croaring(bitmap: &Bitmap) -> croaring::Bitmap {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut bytes).expect("serialize");
    croaring::Bitmap::deserialize::<Portable>(&bytes)
}

fn benches(c: &mut Criterion) {
    let rows = users();
    let label = format!("{}M", rows as f64 / 1e6);
    let mut state = DatasetState::default();
    for batch in audience::demo::batches(rows, 64 * 1024, 42) {
        state
            .apply(
                &Change::ImportUsers(ImportBatch {
                    batch,
                    id_column: "user_id".into(),
                }),
                0,
            )
            .expect("import");
    }
    let us = value_bitmap(&state, "country", "US");
    let sports = value_bitmap(&state, "interests", "sports");
    let ios = value_bitmap(&state, "device", "ios");
    let Attribute::Integer(age) = &*state.attributes()["age"] else {
        panic!("age is an integer")
    };
    let ages: Vec<Bitmap> = (25..=34)
        .map(|v| age.select(&ValueRange { low: v, high: v }, None))
        .collect();
    let cities: Vec<Bitmap> = match &*state.attributes()["city"] {
        Attribute::Categorical(a) => a.values().map(|(_, b)| (**b).clone()).collect(),
        _ => panic!("city is categorical"),
    };
    let c_us = to_croaring(&us);
    let c_sports = to_croaring(&sports);
    let c_ios = to_croaring(&ios);
    let c_ages: Vec<croaring::Bitmap> = ages.iter().map(to_croaring).collect();
    let c_cities: Vec<croaring::Bitmap> = cities.iter().map(to_croaring).collect();
    let mut rng = SplitMix64::new(3);
    let probes: Vec<u32> = (0..1_000).map(|_| rng.below(rows) as u32).collect();

    let mut group = c.benchmark_group("bitmaps");
    group.bench_function(BenchmarkId::new("roaring/and3_count", &label), |b| {
        b.iter(|| black_box((&us & &sports).intersection_len(&ios)))
    });
    group.bench_function(BenchmarkId::new("croaring/and3_count", &label), |b| {
        b.iter(|| black_box(c_us.and(&c_sports).and_cardinality(&c_ios)))
    });
    group.bench_function(BenchmarkId::new("roaring/or10_ages", &label), |b| {
        b.iter(|| black_box(ages.iter().union().len()))
    });
    group.bench_function(BenchmarkId::new("croaring/or10_ages", &label), |b| {
        let refs: Vec<&croaring::Bitmap> = c_ages.iter().collect();
        b.iter(|| black_box(croaring::Bitmap::fast_or(&refs).cardinality()))
    });
    group.bench_function(BenchmarkId::new("roaring/andnot", &label), |b| {
        b.iter(|| black_box((&ios - &sports).len()))
    });
    group.bench_function(BenchmarkId::new("croaring/andnot", &label), |b| {
        b.iter(|| black_box(c_ios.andnot(&c_sports).cardinality()))
    });
    group.bench_function(BenchmarkId::new("roaring/iterate_ios", &label), |b| {
        b.iter(|| black_box(ios.iter().collect::<Vec<u32>>().len()))
    });
    group.bench_function(BenchmarkId::new("croaring/iterate_ios", &label), |b| {
        b.iter(|| black_box(c_ios.to_vec().len()))
    });
    group.bench_function(
        BenchmarkId::new("roaring/contains_1000_cities", &label),
        |b| {
            b.iter(|| {
                black_box(
                    probes
                        .iter()
                        .zip(cities.iter().cycle())
                        .filter(|(p, s)| s.contains(**p))
                        .count(),
                )
            })
        },
    );
    group.bench_function(
        BenchmarkId::new("croaring/contains_1000_cities", &label),
        |b| {
            b.iter(|| {
                black_box(
                    probes
                        .iter()
                        .zip(c_cities.iter().cycle())
                        .filter(|(p, s)| s.contains(**p))
                        .count(),
                )
            })
        },
    );
    group.finish();
}

criterion_group!(bitmaps, benches);
criterion_main!(bitmaps);
