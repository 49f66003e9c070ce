//! A deterministic, realistic users table: the data of `serve --demo-users N`, the tests and
//! the benchmarks. The same `(rows, seed)` always gives the same table, batch by batch.
//!
//! Real user tables are skewed, and an index that is only ever tried on uniform data hides its
//! worst cases, so the table is skewed the way production data is: `lifetime_spend` is
//! zero-inflated (most users never paid) with heavy price points and a long, rare tail;
//! `sessions_30d` is a count that is mostly 0; countries, regions, cities and interests follow
//! popularity curves, so a few values hold most users and many hold a handful.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int16Builder, Int32Builder, ListBuilder, StringBuilder,
    StringDictionaryBuilder, TimestampMillisecondBuilder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, TimeUnit};

use crate::rng::SplitMix64;
use crate::time::Millis;

/// Countries with population-like weights (percent).
pub const COUNTRIES: &[(&str, u64)] = &[
    ("US", 30),
    ("GB", 9),
    ("DE", 8),
    ("FR", 7),
    ("BR", 6),
    ("IN", 6),
    ("JP", 5),
    ("CA", 4),
    ("ES", 4),
    ("IT", 4),
    ("MX", 3),
    ("AU", 3),
    ("NL", 2),
    ("SE", 2),
    ("PL", 2),
    ("KR", 1),
    ("AR", 1),
    ("ZA", 1),
    ("NG", 1),
    ("SG", 1),
];
/// Interests, most popular first.
pub const INTERESTS: &[&str] = &[
    "sports",
    "travel",
    "music",
    "movies",
    "tech",
    "fashion",
    "food",
    "fitness",
    "gaming",
    "finance",
    "news",
    "beauty",
    "cars",
    "books",
    "parenting",
    "pets",
    "outdoors",
    "photography",
    "crypto",
    "home",
    "gardening",
    "art",
    "science",
    "education",
    "health",
    "luxury",
    "diy",
    "anime",
    "esports",
    "wine",
];
const GENDERS: &[(&str, u64)] = &[("female", 48), ("male", 48), ("other", 2)];
const DEVICES: &[(&str, u64)] = &[("android", 45), ("ios", 45), ("desktop", 10)];
/// Regions per country and cities per region.
const REGIONS: u64 = 5;
const CITIES: u64 = 40;
/// Signup times fall in the three years before this instant (2026-11-01T00:00:00Z).
pub const DEMO_EPOCH: Millis = 1_793_491_200_000;
const THREE_YEARS: u64 = 3 * 365 * 86_400_000;

/// The external id of demo user `row`: 16 hex digits, like a hashed device id.
pub fn user_id(row: u64) -> String {
    format!("{:016x}", SplitMix64::new(row).next_u64())
}

/// The demo table's schema.
pub fn schema() -> Arc<Schema> {
    let dict = || DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("country", dict(), true),
        Field::new("region", dict(), true),
        Field::new("city", dict(), true),
        Field::new("age", DataType::Int16, true),
        Field::new("gender", dict(), true),
        Field::new("device", dict(), true),
        Field::new(
            "interests",
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            true,
        ),
        Field::new("lifetime_spend", DataType::Float64, true),
        Field::new("sessions_30d", DataType::Int32, true),
        Field::new("subscriber", DataType::Boolean, true),
        Field::new(
            "signup_ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]))
}

/// Rows `0..rows` in batches of `batch_rows`.
pub fn batches(rows: u64, batch_rows: usize, seed: u64) -> impl Iterator<Item = RecordBatch> {
    let batch_rows = batch_rows.max(1) as u64;
    (0..rows.div_ceil(batch_rows)).map(move |index| {
        let start = index * batch_rows;
        batch(start..(start + batch_rows).min(rows), seed)
    })
}

fn pick<'a>(rng: &mut SplitMix64, weighted: &[(&'a str, u64)]) -> &'a str {
    let total: u64 = weighted.iter().map(|(_, w)| w).sum();
    let mut roll = rng.below(total);
    for (value, weight) in weighted {
        if roll < *weight {
            return value;
        }
        roll -= weight;
    }
    weighted[0].0
}

/// Uniform `u` in `[0, 1)` raised to this power picks small ranks often: with 3, the first 10%
/// of the ranks get ~46% of the picks.
const SKEW: i32 = 3;

/// A rank in `0..n`, low ranks far more likely (a popularity curve).
fn skewed(rng: &mut SplitMix64, n: u64) -> u64 {
    ((rng.unit().powi(SKEW) * n as f64) as u64).min(n - 1)
}

/// Price points that many paying users share exactly (one purchase of a common product).
const PRICE_POINTS: &[f64] = &[4.99, 9.99, 19.99, 49.99];

/// Zero-inflated spend: 10% unknown, 60% exactly 0 (never paid), 12% at one of a few price
/// points, the rest a long tail in cents up to ~50,000 where a rare few hold the largest values.
fn lifetime_spend(rng: &mut SplitMix64) -> Option<f64> {
    match rng.below(100) {
        0..=9 => None,
        10..=69 => Some(0.0),
        70..=81 => Some(PRICE_POINTS[rng.below(PRICE_POINTS.len() as u64) as usize]),
        _ => {
            let tail = if rng.below(1_000) == 0 {
                50_000.0
            } else {
                5_000.0
            };
            Some((rng.unit().powi(3) * tail * 100.0).round() / 100.0 + 0.01)
        }
    }
}

/// Sessions in the last 30 days: 5% unknown, ~55% none, then a geometric tail (1, 2, 3, ...
/// each rarer) with a few very active users.
fn sessions_30d(rng: &mut SplitMix64) -> Option<i32> {
    if rng.below(100) < 5 {
        return None;
    }
    let mut sessions: u64 = 0;
    while sessions < 500 && rng.below(100) < 45 + sessions.min(40) {
        sessions += 1;
    }
    Some(sessions as i32)
}

/// One batch holding `rows`; each row's values depend only on `(seed, row)`.
pub fn batch(rows: std::ops::Range<u64>, seed: u64) -> RecordBatch {
    let mut ids = StringBuilder::new();
    let mut country = StringDictionaryBuilder::<Int32Type>::new();
    let mut region = StringDictionaryBuilder::<Int32Type>::new();
    let mut city = StringDictionaryBuilder::<Int32Type>::new();
    let mut age = Int16Builder::new();
    let mut gender = StringDictionaryBuilder::<Int32Type>::new();
    let mut device = StringDictionaryBuilder::<Int32Type>::new();
    let mut interests = ListBuilder::new(StringBuilder::new());
    let mut spend = Float64Builder::new();
    let mut sessions = Int32Builder::new();
    let mut subscriber = BooleanBuilder::new();
    let mut signup = TimestampMillisecondBuilder::new().with_timezone("UTC");
    for row in rows {
        let mut rng = SplitMix64::new(seed ^ row.wrapping_mul(0x2545_F491_4F6C_DD1D));
        ids.append_value(user_id(row));
        let c = pick(&mut rng, COUNTRIES);
        let r = skewed(&mut rng, REGIONS);
        country.append_value(c);
        region.append_value(format!("{c}-R{r}"));
        city.append_value(format!("{c}-R{r}-C{}", skewed(&mut rng, CITIES)));
        // Ages 13-90, most between 18 and 45.
        if rng.below(100) < 5 {
            age.append_null();
        } else {
            let skew = (rng.unit() * rng.unit() * 77.0) as i16;
            age.append_value(if rng.below(4) == 0 {
                13 + skew
            } else {
                18 + (skew % 28)
            });
        }
        match rng.below(100) {
            0 | 1 => gender.append_null(),
            _ => gender.append_value(pick(&mut rng, GENDERS)),
        }
        device.append_value(pick(&mut rng, DEVICES));
        let wanted = rng.below(6);
        let mut held = Vec::new();
        for _ in 0..wanted {
            // Squaring skews picks toward the popular interests.
            let index = (rng.unit() * rng.unit() * INTERESTS.len() as f64) as usize;
            if !held.contains(&index) {
                held.push(index);
            }
        }
        held.sort_unstable();
        for index in held {
            interests.values().append_value(INTERESTS[index]);
        }
        interests.append(true);
        spend.append_option(lifetime_spend(&mut rng));
        sessions.append_option(sessions_30d(&mut rng));
        match rng.below(100) {
            0..=4 => subscriber.append_null(),
            5..=24 => subscriber.append_value(true),
            _ => subscriber.append_value(false),
        }
        signup.append_value(DEMO_EPOCH - rng.below(THREE_YEARS) as i64);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(country.finish()),
        Arc::new(region.finish()),
        Arc::new(city.finish()),
        Arc::new(age.finish()),
        Arc::new(gender.finish()),
        Arc::new(device.finish()),
        Arc::new(interests.finish()),
        Arc::new(spend.finish()),
        Arc::new(sessions.finish()),
        Arc::new(subscriber.finish()),
        Arc::new(signup.finish()),
    ];
    match RecordBatch::try_new(schema(), columns) {
        Ok(batch) => batch,
        // The builders above produce exactly the schema's columns.
        Err(e) => unreachable!("demo batch does not match its schema: {e}"),
    }
}

/// Event names of the demo behaviour stream, with weights (per mille of events in a session).
pub const EVENT_NAMES: &[(&str, u64)] = &[
    ("page_view", 560),
    ("view_item", 200),
    ("search", 100),
    ("add_to_cart", 80),
    ("share", 30),
    ("purchase", 25),
    ("signup", 5),
];

/// Days of history the demo events span, ending at their `end` instant.
pub const EVENT_DAYS: u64 = 365;

/// One demo event: a user row (see [`user_id`]), an index into [`EVENT_NAMES`], a time and,
/// for purchases, an amount.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemoEvent {
    pub user: u64,
    pub event: u8,
    pub ts: Millis,
    pub value: Option<f64>,
}

/// `count` events of `users` users over [`EVENT_DAYS`] days before `end`, in sessions: a user
/// picked with skewed activity (a few heavy users, a long tail of light ones) does 1 to ~15
/// things within half an hour. Events come in session order, not time order, as a log merged
/// from many sources would.
pub fn events(users: u64, count: u64, seed: u64, end: Millis) -> impl Iterator<Item = DemoEvent> {
    let users = users.max(1);
    let mut rng = SplitMix64::new(seed ^ 0xE7E7_E7E7);
    let mut left_in_session = 0u64;
    let mut session = DemoEvent {
        user: 0,
        event: 0,
        ts: end,
        value: None,
    };
    (0..count).map(move |_| {
        if left_in_session == 0 {
            // rank = users * u^3: the first 10% of ranks do about 46% of the sessions.
            let u = rng.unit();
            let rank = ((users as f64) * u * u * u) as u64 % users;
            // A fixed permutation, so that activity does not follow the id order.
            session.user = rank.wrapping_mul(1_000_000_007) % users;
            session.ts = end - 1 - rng.below(EVENT_DAYS * 86_400_000) as Millis;
            left_in_session = 1 + rng.below(4) + rng.below(4) * rng.below(4);
        }
        left_in_session -= 1;
        let name = pick(&mut rng, EVENT_NAMES);
        let event = EVENT_NAMES
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or(0) as u8;
        let ts = session.ts + rng.below(30 * 60_000) as Millis;
        let value = (name == "purchase").then(|| 5.0 + rng.below(50_000) as f64 / 100.0);
        DemoEvent {
            user: session.user,
            event,
            ts: ts.min(end - 1),
            value,
        }
    })
}

/// The events table's schema: dictionary-encoded ids and names, as warehouses export them.
pub fn events_schema() -> Arc<Schema> {
    let dict = || DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new("user_id", dict(), false),
        Field::new("event", dict(), false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("value", DataType::Float64, true),
    ]))
}

/// A record batch of events by [`events_schema`].
pub fn events_batch(events: &[DemoEvent]) -> RecordBatch {
    let mut ids = StringDictionaryBuilder::<Int32Type>::new();
    let mut names = StringDictionaryBuilder::<Int32Type>::new();
    let mut ts = TimestampMillisecondBuilder::with_capacity(events.len()).with_timezone("UTC");
    let mut values = Float64Builder::with_capacity(events.len());
    for event in events {
        ids.append_value(user_id(event.user));
        names.append_value(EVENT_NAMES[event.event as usize].0);
        ts.append_value(event.ts);
        values.append_option(event.value);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(names.finish()),
        Arc::new(ts.finish()),
        Arc::new(values.finish()),
    ];
    RecordBatch::try_new(events_schema(), columns).expect("demo events match their schema")
}

/// `count` saved segment definitions `(id, expression)` over the demo tables, as a marketing
/// team accumulates them: many broad audiences (a country, an interest, a spend tier), combined
/// ones, narrow ones (a city, a rare interest pair) and behavioural ones, so that a typical user
/// is in a few hundred of 1,000 and some segments hold a handful of users. The same `count` and
/// `seed` always give the same list.
pub fn segments(count: usize, seed: u64) -> Vec<(String, String)> {
    let mut rng = SplitMix64::new(seed ^ 0x5E6_5E6);
    (0..count)
        .map(|i| (format!("seg-{i:05}"), segment_expression(&mut rng)))
        .collect()
}

fn segment_expression(rng: &mut SplitMix64) -> String {
    let country = |rng: &mut SplitMix64| COUNTRIES[skewed(rng, COUNTRIES.len() as u64) as usize].0;
    let interest = |rng: &mut SplitMix64| INTERESTS[rng.below(INTERESTS.len() as u64) as usize];
    match rng.below(14) {
        0 => format!(
            r#"country IN ("{}", "{}", "{}")"#,
            country(rng),
            country(rng),
            country(rng)
        ),
        1 => format!(r#"interests HAS "{}""#, interest(rng)),
        2 => format!(
            r#"interests HAS ANY ("{}", "{}", "{}")"#,
            interest(rng),
            interest(rng),
            interest(rng)
        ),
        3 => {
            let low = 13 + rng.below(40);
            format!("age BETWEEN {low} AND {}", low + 5 + rng.below(30))
        }
        4 => format!(
            "lifetime_spend >= {}",
            [0.01, 5.0, 10.0, 50.0, 500.0][rng.below(5) as usize]
        ),
        5 => format!("sessions_30d >= {}", 1 + rng.below(5)),
        6 => format!(
            r#"country IN ("{}", "{}") AND device = "{}""#,
            country(rng),
            country(rng),
            DEVICES[rng.below(DEVICES.len() as u64) as usize].0
        ),
        7 => format!(
            r#"interests HAS "{}" AND age < {} AND subscriber = {}"#,
            interest(rng),
            25 + rng.below(30),
            ["TRUE", "FALSE"][rng.below(2) as usize]
        ),
        8 => {
            let c = country(rng);
            let r = skewed(rng, REGIONS);
            format!(r#"city = "{c}-R{r}-C{}""#, skewed(rng, CITIES))
        }
        9 => format!(
            r#"NOT country IN ("{}", "{}") AND lifetime_spend = 0 AND signup_ts >= NOW - {}d"#,
            country(rng),
            country(rng),
            30 + rng.below(700)
        ),
        10 => format!(
            "DID {} IN LAST {}d",
            EVENT_NAMES[rng.below(EVENT_NAMES.len() as u64) as usize].0,
            [7, 30, 90][rng.below(3) as usize]
        ),
        11 => format!(r#"NOT interests HAS "{}""#, interest(rng)),
        12 => format!("signup_ts >= NOW - {}d", 90 + rng.below(1_000)),
        _ => format!(
            r#"interests HAS ALL ("{}", "{}") OR sessions_30d >= {}"#,
            interest(rng),
            interest(rng),
            5 + rng.below(20)
        ),
    }
}
