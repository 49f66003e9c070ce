//! Engine benchmarks on the deterministic demo dataset (10,000,000 users by default; set
//! `AUDIENCE_BENCH_USERS` for a smaller run). Everything is measured in-process, server-side:
//! what a gRPC handler calls. Each target has its baseline in the same run:
//! - `count/*`: 1-, 3- and 10-predicate counts, and the same 3-predicate filter as a scan of the
//!   Arrow columns with arrow's compute kernels (`count/arrow_scan_3`).
//! - `export`: members of a 50% segment mapped to external ids.
//! - `segments_for_user/1000`: all saved segments containing one user, over 1,000 segments.
//! - `membership`: 10,000 more, mostly small segments: the membership index's memory (printed)
//!   and segments-for-user over all 11,000.
//! - `import/parquet`: a 1,000,000-row Parquet file into an empty dataset.
//! - resident bytes per user: printed once (RSS growth while loading / users).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, Scalar, StringArray};
use arrow_buffer::BooleanBuffer;
use audience::engine::import::open_file;
use audience::engine::{Audience, Change, DatasetState, ImportBatch};
use audience::rng::SplitMix64;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{env_u64, resident_bytes, truthy, wanted};

const SEED: u64 = 42;
const AS_OF: i64 = audience::demo::DEMO_EPOCH;

fn users() -> u64 {
    env_u64("AUDIENCE_BENCH_USERS", 10_000_000)
}

fn import(state: &mut DatasetState, batches: impl Iterator<Item = RecordBatch>) {
    for batch in batches {
        let change = Change::ImportUsers(ImportBatch {
            batch,
            id_column: "user_id".into(),
        });
        state.apply(&change, AS_OF).expect("demo batch imports");
    }
}

/// The dataset, loaded once, with the resident bytes it added.
fn dataset(rows: u64) -> (DatasetState, u64, f64) {
    let before = resident_bytes();
    let started = Instant::now();
    let mut state = DatasetState::default();
    state.reserve_users(rows as usize);
    import(&mut state, audience::demo::batches(rows, 64 * 1024, SEED));
    let seconds = started.elapsed().as_secs_f64();
    let grown = resident_bytes().saturating_sub(before);
    (state, grown, seconds)
}

fn parse(text: &str) -> Audience {
    Audience::Expression(audience::expr::parse(text).expect("bench expression parses"))
}

const ONE: &str = r#"country = "US""#;
const THREE: &str = r#"country = "US" AND age BETWEEN 25 AND 34 AND interests HAS "sports""#;
const TEN: &str = r#"country IN ("US", "GB", "DE") AND age BETWEEN 18 AND 44 AND device != "desktop"
    AND interests HAS ANY ("sports", "travel") AND NOT interests HAS "gaming" AND subscriber = TRUE
    AND lifetime_spend > 100 AND signup_ts >= "2024-06-01T00:00:00Z" AND gender IS NOT NULL
    AND region != "US-R0""#;
/// Shapes the issue measured far from plain bitmap queries: a range on a high-cardinality float
/// or timestamp with a 20-value `IN` and a 10-value `HAS ANY`; a negated `IN` with a flag and a
/// time bound; an `OR` of two `IS NULL`.
const RANGE_FLOAT_IN_ANY: &str = r#"lifetime_spend BETWEEN 20 AND 400
    AND city IN ("US-R0-C0", "US-R0-C1", "US-R0-C2", "US-R1-C0", "US-R1-C1", "US-R2-C0", "GB-R0-C0",
        "GB-R0-C1", "GB-R1-C0", "DE-R0-C0", "DE-R0-C1", "DE-R1-C0", "FR-R0-C0", "FR-R0-C1",
        "BR-R0-C0", "IN-R0-C0", "JP-R0-C0", "CA-R0-C0", "ES-R0-C0", "IT-R0-C0")
    AND interests HAS ANY ("sports", "travel", "music", "movies", "tech", "fashion", "food",
        "fitness", "gaming", "finance")"#;
const RANGE_TIME_IN_ANY: &str = r#"signup_ts BETWEEN "2024-03-01T00:00:00Z" AND "2025-02-15T12:00:00Z"
    AND city IN ("US-R0-C0", "US-R0-C1", "US-R0-C2", "US-R1-C0", "US-R1-C1", "US-R2-C0", "GB-R0-C0",
        "GB-R0-C1", "GB-R1-C0", "DE-R0-C0", "DE-R0-C1", "DE-R1-C0", "FR-R0-C0", "FR-R0-C1",
        "BR-R0-C0", "IN-R0-C0", "JP-R0-C0", "CA-R0-C0", "ES-R0-C0", "IT-R0-C0")
    AND interests HAS ANY ("sports", "travel", "music", "movies", "tech", "fashion", "food",
        "fitness", "gaming", "finance")"#;
const NOT_IN_FLAG_TIME: &str = r#"NOT country IN ("US", "GB", "DE") AND subscriber = TRUE
    AND signup_ts >= "2025-01-01T00:00:00Z""#;
const OR_NULLS: &str = r#"age IS NULL OR lifetime_spend IS NULL"#;

/// The 3-predicate filter as a scan of Arrow columns with arrow's compute kernels.
fn arrow_scan_3(columns: &[(ArrayRef, ArrayRef, ArrayRef)]) -> usize {
    let us = Scalar::new(StringArray::from(vec!["US"]));
    let sports = Scalar::new(StringArray::from(vec!["sports"]));
    let low = Scalar::new(arrow_array::Int16Array::from(vec![25i16]));
    let high = Scalar::new(arrow_array::Int16Array::from(vec![34i16]));
    let mut total = 0;
    for (country, age, interests) in columns {
        let in_country = truthy(&arrow_ord::cmp::eq(country, &us).expect("eq"));
        let old_enough = truthy(&arrow_ord::cmp::gt_eq(age, &low).expect("ge"));
        let young_enough = truthy(&arrow_ord::cmp::lt_eq(age, &high).expect("le"));
        let lists = interests.as_list::<i32>();
        let hits = truthy(&arrow_ord::cmp::eq(lists.values(), &sports).expect("eq"));
        let offsets = lists.value_offsets();
        let has: BooleanBuffer = (0..lists.len())
            .map(|i| {
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                lists.is_valid(i) && hits.slice(start, end - start).count_set_bits() > 0
            })
            .collect();
        total += (&(&(&in_country & &old_enough) & &young_enough) & &has).count_set_bits();
    }
    total
}

fn segments(state: &mut DatasetState, count: usize) {
    for definition in common::segment_definitions(count, AS_OF) {
        state
            .apply(&Change::CreateSegment(definition), AS_OF)
            .expect("segment");
    }
}

fn benches(c: &mut Criterion) {
    let rows = users();
    let label = format!("{}M", rows as f64 / 1e6);
    let (mut state, grown, load_seconds) = dataset(rows);
    println!(
        "dataset {label}: loaded in {load_seconds:.1} s ({:.2} M users/s); resident growth {} MB = {:.1} bytes/user",
        rows as f64 / load_seconds / 1e6,
        grown / 1_000_000,
        grown as f64 / rows as f64
    );

    if wanted("count") {
        bench_counts(c, &state, rows, &label);
    }
    if wanted("export") {
        bench_export(c, &state, &label);
    }
    if wanted("segments_for_user") {
        bench_segments_for_user(c, &mut state, rows, &label);
    }
    if wanted("membership") {
        bench_many_small_segments(c, &mut state, rows, &label);
    }
    drop(state);
    if wanted("import") {
        bench_import(c, rows);
    }
}

fn bench_counts(c: &mut Criterion, state: &DatasetState, rows: u64, label: &str) {
    let mut group = c.benchmark_group("count");
    for (name, text) in [
        ("1_predicate", ONE),
        ("3_predicates", THREE),
        ("10_predicates", TEN),
        ("range_float_in_any", RANGE_FLOAT_IN_ANY),
        ("range_time_in_any", RANGE_TIME_IN_ANY),
        ("not_in_flag_time", NOT_IN_FLAG_TIME),
        ("or_nulls", OR_NULLS),
    ] {
        let audience = parse(text);
        println!(
            "{name}: {} users",
            state.count(&audience, AS_OF).expect("count")
        );
        group.bench_function(BenchmarkId::new(name, label), |b| {
            b.iter(|| black_box(state.count(&audience, AS_OF).expect("count")))
        });
    }
    let columns: Vec<(ArrayRef, ArrayRef, ArrayRef)> = audience::demo::batches(rows, 1 << 20, SEED)
        .map(|batch| {
            let country =
                arrow_cast::cast(batch.column(1), &arrow_schema::DataType::Utf8).expect("cast");
            (country, batch.column(4).clone(), batch.column(7).clone())
        })
        .collect();
    let scanned = arrow_scan_3(&columns);
    assert_eq!(
        scanned as u64,
        state.count(&parse(THREE), AS_OF).expect("count"),
        "baseline agrees"
    );
    group.bench_function(BenchmarkId::new("arrow_scan_3", label), |b| {
        b.iter(|| black_box(arrow_scan_3(&columns)))
    });
    drop(columns);
    group.finish();
}

fn bench_export(c: &mut Criterion, state: &DatasetState, label: &str) {
    let mut group = c.benchmark_group("export");
    let half = parse(r#"device = "ios" OR gender = "female""#);
    let members = state.select(&half, AS_OF).expect("select");
    group.throughput(Throughput::Elements(members.len()));
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("external_ids", label), |b| {
        b.iter(|| {
            let mut n = 0usize;
            let mut ids = members.iter();
            loop {
                let chunk: Vec<u32> = ids.by_ref().take(10_000).collect();
                if chunk.is_empty() {
                    break;
                }
                n += state.external_ids(chunk).len();
            }
            black_box(n)
        })
    });
    group.finish();
}

fn bench_segments_for_user(c: &mut Criterion, state: &mut DatasetState, rows: u64, label: &str) {
    let started = Instant::now();
    segments(state, 1_000);
    println!(
        "1,000 segments created in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut group = c.benchmark_group("segments_for_user");
    let mut rng = SplitMix64::new(11);
    let ids: Vec<String> = (0..1_024)
        .map(|_| audience::demo::user_id(rng.below(rows)))
        .collect();
    let mut next = 0usize;
    group.bench_function(BenchmarkId::new("1000_segments", label), |b| {
        b.iter(|| {
            next = (next + 1) % ids.len();
            black_box(state.segments_for_user(&ids[next]).len())
        })
    });
    group.finish();
}

/// 10,000 saved segments (the default limit), mostly small as real segment lists are: 90% a
/// city with an interest, 9% a city, 1% a region with a device. Prints the membership index's
/// heap bytes, the segments' own member sets, and the resident growth, then times
/// segments-for-user over all of them.
fn bench_many_small_segments(c: &mut Criterion, state: &mut DatasetState, rows: u64, label: &str) {
    let mut rng = SplitMix64::new(7);
    let existing = state.segments().len();
    let index_before = state.membership_heap_bytes();
    let before = resident_bytes();
    let started = Instant::now();
    for i in 0..10_000 {
        let (country, _) = audience::demo::COUNTRIES[rng.below(20) as usize];
        let region = format!("{country}-R{}", rng.below(5));
        let city = format!("{region}-C{}", rng.below(40));
        let interest = audience::demo::INTERESTS[rng.below(30) as usize];
        let text = match i % 100 {
            0 => format!(r#"region = "{region}" AND device = "ios""#),
            1..=9 => format!(r#"city = "{city}""#),
            _ => format!(r#"city = "{city}" AND interests HAS "{interest}""#),
        };
        let definition = common::segment(format!("small-{i}"), &text, AS_OF);
        state
            .apply(&Change::CreateSegment(definition), AS_OF)
            .expect("segment");
    }
    let seconds = started.elapsed().as_secs_f64();
    let grown = resident_bytes().saturating_sub(before);
    let members: u64 = state.segments().values().map(|s| s.members().len()).sum();
    let own: usize = state
        .segments()
        .values()
        .map(|s| s.members().serialized_size())
        .sum();
    println!(
        "10,000 more segments (on {existing}) created in {seconds:.1} s; memberships {members}; \
         membership index {} MB (+{} MB); segments' own member sets {} MB; resident growth {} MB",
        state.membership_heap_bytes() / 1_000_000,
        state.membership_heap_bytes().saturating_sub(index_before) / 1_000_000,
        own / 1_000_000,
        grown / 1_000_000,
    );
    let mut group = c.benchmark_group("segments_for_user");
    let ids: Vec<String> = (0..1_024)
        .map(|_| audience::demo::user_id(rng.below(rows)))
        .collect();
    let mut next = 0usize;
    group.bench_function(
        BenchmarkId::new(format!("{}_segments", state.segments().len()), label),
        |b| {
            b.iter(|| {
                next = (next + 1) % ids.len();
                black_box(state.segments_for_user(&ids[next]).len())
            })
        },
    );
    group.finish();
}

fn bench_import(c: &mut Criterion, rows: u64) {
    let import_rows = rows.min(1_000_000);
    let path = std::env::temp_dir().join(format!("audience-bench-{}.parquet", std::process::id()));
    write_parquet(&path, import_rows);
    let mut group = c.benchmark_group("import");
    group.throughput(Throughput::Elements(import_rows));
    group.sample_size(10);
    group.bench_function(
        BenchmarkId::new("parquet", format!("{}M", import_rows as f64 / 1e6)),
        |b| {
            b.iter(|| {
                let source = open_file(&path, 64 * 1024).expect("open");
                let mut fresh = DatasetState::default();
                // What the server's file import does with the row count Parquet declares.
                fresh.reserve_users(source.reservable_rows as usize);
                import(&mut fresh, source.batches.map(|b| b.expect("batch")));
                black_box(Arc::new(fresh))
            })
        },
    );
    group.finish();
    let _ = std::fs::remove_file(&path);
}

fn write_parquet(path: &std::path::Path, rows: u64) {
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, audience::demo::schema(), None).expect("writer");
    for batch in audience::demo::batches(rows, 64 * 1024, SEED) {
        writer.write(&batch).expect("write");
    }
    writer.close().expect("close");
}

criterion_group!(engine, benches);
criterion_main!(engine);
