//! Crash safety of the real binary, `audience serve --data-dir`:
//!
//! - killed with SIGKILL while writes of every kind are in flight and restarted on the same
//!   directory, it serves exactly what a model (an in-memory server that received every
//!   acknowledged write) serves, with or without the one write in flight at the kill;
//! - a torn last log record is dropped with a warning; a flipped byte in the log or in a snapshot
//!   stops the start, naming the file and the byte offset, and `--recover-truncate` starts from
//!   what is valid and says what it dropped;
//! - requests during the start-up load are refused with `loading:`, never answered from half a
//!   dataset;
//! - the bytes of deleted users leave every file within `--erasure-max-age-secs`.
//!
//! Every write that can create a user also writes a fresh marker user, so whether the write in
//! flight at a kill was applied shows in the list of all users.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use audience::grpc::pb;
use audience::rng::SplitMix64;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::{
    cut, ipc_stream_bytes, now_ms, segment_audience, sorted, text, text_expr, timestamp, update,
    FixedClock, ServerOptions, TestServer,
};
use crate::process::{Process, POLL_EVERY};

/// How long a start (recovery, a demo load in a debug build on a busy machine) may take.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The magic and the record header of a log segment (`src/persist/frame.rs`).
const LOG_MAGIC: &[u8] = b"AUDLOG03";
const RECORD_HEADER: usize = 24;
/// Bytes per checksummed block of a snapshot file.
const SNAPSHOT_BLOCK: u64 = 1 << 20;

// ---- processes -----------------------------------------------------------------------------

/// A test's directory: `data/` for the server and one stderr file per start beside it. Removed
/// on drop (declare it before the servers, so that they are killed first).
struct Scratch {
    root: PathBuf,
    starts: usize,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let root = crate::durability::temp_dir(&format!("crash-{name}"));
        std::fs::create_dir_all(root.join("data")).expect("create the scratch directory");
        Self { root, starts: 0 }
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn wal(&self) -> PathBuf {
        self.data().join("wal")
    }

    /// `--data-dir DIR` followed by `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--data-dir".to_owned(), self.data().display().to_string()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// Starts `audience serve ARGS` with its stderr in a new file here.
    fn start(&mut self, args: &[String]) -> Process {
        self.starts += 1;
        Process::start_logging_to(args, self.stderr(self.starts))
    }

    fn stderr(&self, start: usize) -> PathBuf {
        self.root.join(format!("stderr-{start}.log"))
    }

    /// Every start's stderr, concatenated.
    fn all_stderr(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.stderr(n)).unwrap_or_default())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// ---- small wire helpers --------------------------------------------------------------------

async fn count(
    channel: &Channel,
    dataset: &str,
    audience: Option<pb::Audience>,
) -> Result<u64, tonic::Status> {
    let request = pb::CountRequest {
        dataset: dataset.to_owned(),
        audience,
        ..Default::default()
    };
    let response = pb::query_service_client::QueryServiceClient::new(channel.clone())
        .count(request)
        .await?;
    Ok(response.into_inner().count)
}

/// Every member via ExportMembers, sorted.
async fn members(
    channel: &Channel,
    dataset: &str,
    audience: Option<pb::Audience>,
) -> Result<Vec<String>, tonic::Status> {
    let request = pb::ExportMembersRequest {
        dataset: dataset.to_owned(),
        audience,
        ..Default::default()
    };
    let mut stream = pb::query_service_client::QueryServiceClient::new(channel.clone())
        .export_members(request)
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(chunk) = stream.message().await? {
        ids.extend(chunk.user_ids);
    }
    ids.sort();
    Ok(ids)
}

const ALL_USERS: &str = "country IS NULL OR NOT country IS NULL";

async fn all_users(channel: &Channel, dataset: &str) -> Vec<String> {
    members(channel, dataset, text(ALL_USERS))
        .await
        .expect("list every user")
}

async fn upsert(channel: &Channel, dataset: &str, users: Vec<pb::UserUpdate>) {
    pb::ingest_service_client::IngestServiceClient::new(channel.clone())
        .upsert_users(pb::UpsertUsersRequest {
            dataset: dataset.to_owned(),
            users,
        })
        .await
        .expect("upsert");
}

/// Upserts each id alone (one log record each), with a country.
async fn upsert_one_by_one(channel: &Channel, ids: &[String]) {
    for id in ids {
        upsert(
            channel,
            "",
            vec![update::user(id, vec![update::string("country", "US")])],
        )
        .await;
    }
}

// ---- files of the data directory -----------------------------------------------------------

/// The files directly in `dir`, sorted by name.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read a directory")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The newest log segment holding at least one record byte.
fn newest_nonempty_segment(wal: &Path) -> PathBuf {
    files_in(wal)
        .into_iter()
        .rfind(|path| std::fs::metadata(path).map_or(0, |m| m.len()) > LOG_MAGIC.len() as u64)
        .expect("a log segment with records")
}

/// `(offset, payload)` of each whole record of a log segment, read by the documented framing.
fn log_records(bytes: &[u8]) -> Vec<(usize, &[u8])> {
    assert_eq!(&bytes[..LOG_MAGIC.len()], LOG_MAGIC, "segment magic");
    let mut records = Vec::new();
    let mut at = LOG_MAGIC.len();
    while at + RECORD_HEADER <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        let end = at + RECORD_HEADER + len;
        if end > bytes.len() {
            break;
        }
        records.push((at, &bytes[at + RECORD_HEADER..end]));
        at = end;
    }
    records
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).expect("read the file to damage");
    bytes[offset] ^= 0x5a;
    std::fs::write(path, bytes).expect("write the damaged file");
}

#[track_caller]
fn assert_mentions(stderr: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr does not mention {needle:?}:\n{stderr}"
        );
    }
}

// ---- the writes of the crash rounds --------------------------------------------------------

const DATASET: &str = "default";
/// Users most writes touch, so that they overwrite, delete and re-create each other's work.
const POOL: u64 = 60;
/// Users of the large imports, which grow the log past the snapshot threshold.
const BULK_POOL: u64 = 3000;
const COUNTRIES: [&str; 4] = ["US", "GB", "FR", "DE"];
const INTERESTS: [&str; 4] = ["sports", "music", "news", "travel"];
const EVENTS: [&str; 3] = ["view", "cart", "buy"];
const SEGMENT_IDS: [&str; 4] = ["s0", "s1", "s2", "s3"];
/// Saved segment definitions: none depends on where NOW is, so that the model's clock need
/// only be close to the server's.
const SEGMENT_EXPRESSIONS: [&str; 6] = [
    r#"country = "US" AND interests HAS "sports""#,
    "spend > 0 OR vip = TRUE",
    "DID view AT LEAST 2 TIMES",
    r#"DID buy AND NOT country IN ("GB", "FR")"#,
    "NOT spend > 0",
    "age >= 30 AND DID cart",
];
/// Audiences compared after every restart (besides the saved segments).
const PROBES: [&str; 16] = [
    ALL_USERS,
    r#"country = "US""#,
    r#"country IN ("GB", "FR")"#,
    "country IS NULL",
    r#"interests HAS "sports""#,
    r#"interests HAS ANY ("music", "news")"#,
    r#"NOT interests HAS "travel""#,
    "spend > 0",
    "spend = 0",
    "spend IS NULL",
    "vip = TRUE",
    "vip = FALSE",
    "age >= 30",
    "DID view",
    "DID cart AT LEAST 2 TIMES",
    "NOT DID buy",
];

/// One write, replayable on any server.
#[derive(Debug, Clone)]
enum Write {
    Upsert(pb::UpsertUsersRequest),
    Delete(pb::DeleteUsersRequest),
    Events(pb::RecordEventsRequest),
    /// One Arrow IPC stream, sent in pieces.
    Import(Vec<Vec<u8>>),
    CreateSegment(pb::CreateSegmentRequest),
    UpdateSegment(pb::UpdateSegmentRequest),
    DeleteSegment(pb::DeleteSegmentRequest),
}

impl Write {
    /// Sends the write; `Ok` once the server acknowledged it.
    async fn send(&self, channel: &Channel) -> Result<(), tonic::Status> {
        use pb::ingest_service_client::IngestServiceClient;
        use pb::segment_service_client::SegmentServiceClient;
        let (mut ingest, mut segments) = (
            IngestServiceClient::new(channel.clone()),
            SegmentServiceClient::new(channel.clone()),
        );
        match self.clone() {
            Write::Upsert(request) => ingest.upsert_users(request).await.map(drop),
            Write::Delete(request) => ingest.delete_users(request).await.map(drop),
            Write::Events(request) => ingest.record_events(request).await.map(drop),
            Write::Import(pieces) => import(&mut ingest, pieces).await,
            Write::CreateSegment(request) => segments.create_segment(request).await.map(drop),
            Write::UpdateSegment(request) => segments.update_segment(request).await.map(drop),
            Write::DeleteSegment(request) => segments.delete_segment(request).await.map(drop),
        }
    }
}

/// ImportUsers of `pieces`, acknowledged by its last (`done`) progress message.
async fn import(
    ingest: &mut pb::ingest_service_client::IngestServiceClient<Channel>,
    pieces: Vec<Vec<u8>>,
) -> Result<(), tonic::Status> {
    let mut messages: Vec<pb::ImportUsersRequest> = pieces
        .into_iter()
        .map(|arrow_ipc_chunk| pb::ImportUsersRequest {
            arrow_ipc_chunk,
            ..Default::default()
        })
        .collect();
    messages[0].dataset = DATASET.to_owned();
    let mut stream = ingest
        .import_users(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut done = false;
    while let Some(response) = stream.message().await? {
        done |= response.progress.is_some_and(|progress| progress.done);
    }
    match done {
        true => Ok(()),
        false => Err(tonic::Status::unknown("the import ended without `done`")),
    }
}

/// Random writes from a seed.
struct Writes {
    rng: SplitMix64,
    /// Marker users issued so far.
    markers: u64,
    /// Events happen in the five days before this.
    now_ms: i64,
}

impl Writes {
    fn new(seed: u64, now_ms: i64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            markers: 0,
            now_ms,
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.rng.below(items.len() as u64) as usize]
    }

    /// A user no write has touched: its presence says whether its write was applied.
    fn marker(&mut self) -> String {
        self.markers += 1;
        format!("m{:06}", self.markers)
    }

    /// `n` distinct users of the pool.
    fn pool_users(&mut self, n: u64) -> Vec<String> {
        let mut users = Vec::new();
        while (users.len() as u64) < n {
            let user = format!("u{:02}", self.rng.below(POOL));
            if !users.contains(&user) {
                users.push(user);
            }
        }
        users
    }

    /// Spend is zero for most users who have one.
    fn spend(&mut self) -> f64 {
        match self.chance(60) {
            true => 0.0,
            false => (1 + self.rng.below(500)) as f64 / 4.0,
        }
    }

    /// The next write; `segments` are the ids saved now.
    fn next(&mut self, segments: &[String]) -> Write {
        match self.rng.below(100) {
            0..=34 => self.upsert(),
            35..=59 => self.events(),
            60..=69 => self.delete(),
            70..=81 => self.import(),
            _ => self.segment(segments),
        }
    }

    fn upsert(&mut self) -> Write {
        let count = 1 + self.rng.below(4);
        let mut users: Vec<pb::UserUpdate> = self
            .pool_users(count)
            .iter()
            .map(|user| update::user(user, self.attribute_updates()))
            .collect();
        let marker = self.marker();
        users.push(update::user(&marker, vec![update::float("spend", 0.0)]));
        Write::Upsert(pb::UpsertUsersRequest {
            dataset: DATASET.to_owned(),
            users,
        })
    }

    /// At least one update, at most one per attribute, of every kind.
    fn attribute_updates(&mut self) -> Vec<pb::AttributeUpdate> {
        let mut updates = Vec::new();
        while updates.is_empty() {
            if self.chance(50) {
                updates.push(match self.chance(80) {
                    true => update::string("country", self.pick(&COUNTRIES)),
                    false => update::clear("country"),
                });
            }
            if self.chance(50) {
                let interest = self.pick(&INTERESTS);
                updates.push(match self.rng.below(10) {
                    0..=3 => update::add("interests", &[interest]),
                    4..=6 => update::remove("interests", &[interest]),
                    7 | 8 => update::set_of("interests", &[interest, self.pick(&INTERESTS)]),
                    _ => update::clear("interests"),
                });
            }
            if self.chance(50) {
                updates.push(match self.chance(85) {
                    true => update::float("spend", self.spend()),
                    false => update::clear("spend"),
                });
            }
            if self.chance(40) {
                updates.push(match self.chance(85) {
                    true => update::boolean("vip", self.chance(50)),
                    false => update::clear("vip"),
                });
            }
            if self.chance(40) {
                updates.push(match self.chance(85) {
                    true => update::int("age", 18 + self.rng.below(50) as i64),
                    false => update::clear("age"),
                });
            }
        }
        updates
    }

    fn delete(&mut self) -> Write {
        let count = 1 + self.rng.below(3);
        Write::Delete(pb::DeleteUsersRequest {
            dataset: DATASET.to_owned(),
            user_ids: self.pool_users(count),
        })
    }

    fn events(&mut self) -> Write {
        let count = 1 + self.rng.below(8);
        let mut events: Vec<pb::Event> = (0..count)
            .map(|_| {
                let user = self.pool_users(1).remove(0);
                self.event(user)
            })
            .collect();
        let marker = self.marker();
        events.push(self.event(marker));
        Write::Events(pb::RecordEventsRequest {
            dataset: DATASET.to_owned(),
            events,
        })
    }

    fn event(&mut self, user_id: String) -> pb::Event {
        let ts = self.now_ms - 1 - self.rng.below(5 * 86_400_000) as i64;
        pb::Event {
            user_id,
            event: self.pick(&EVENTS).to_owned(),
            ts: Some(timestamp(ts)),
            value: self.chance(30).then(|| self.rng.below(100) as f64),
        }
    }

    /// A few rows of pool users, or (one in six) hundreds of bulk users; a marker row last.
    fn import(&mut self) -> Write {
        let bulk = self.chance(16);
        let rows = match bulk {
            true => 200 + self.rng.below(400),
            false => 1 + self.rng.below(20),
        };
        let mut ids: Vec<String> = (0..rows)
            .map(|_| match bulk {
                true => format!("b{:04}", self.rng.below(BULK_POOL)),
                false => self.pool_users(1).remove(0),
            })
            .collect();
        ids.push(self.marker());
        let batch = self.users_batch(ids);
        Write::Import(cut(&ipc_stream_bytes(&[batch]), &[16 * 1024]))
    }

    fn users_batch(&mut self, ids: Vec<String>) -> RecordBatch {
        let n = ids.len();
        let country: Vec<Option<&str>> = (0..n)
            .map(|_| self.chance(80).then(|| self.pick(&COUNTRIES)))
            .collect();
        let age: Vec<Option<i64>> = (0..n)
            .map(|_| self.chance(80).then(|| 18 + self.rng.below(50) as i64))
            .collect();
        let vip: Vec<Option<bool>> = (0..n)
            .map(|_| self.chance(70).then(|| self.chance(30)))
            .collect();
        let spend: Vec<Option<f64>> = (0..n)
            .map(|_| self.chance(70).then(|| self.spend()))
            .collect();
        RecordBatch::try_from_iter([
            ("user_id", Arc::new(StringArray::from(ids)) as ArrayRef),
            ("country", Arc::new(StringArray::from(country)) as ArrayRef),
            ("age", Arc::new(Int64Array::from(age)) as ArrayRef),
            ("vip", Arc::new(BooleanArray::from(vip)) as ArrayRef),
            ("spend", Arc::new(Float64Array::from(spend)) as ArrayRef),
        ])
        .expect("users batch")
    }

    /// Creates a segment while fewer than four exist (sometimes), else updates or deletes one.
    fn segment(&mut self, existing: &[String]) -> Write {
        let expression = Some(text_expr(self.pick(&SEGMENT_EXPRESSIONS)));
        let free: Vec<&str> = SEGMENT_IDS
            .iter()
            .copied()
            .filter(|id| !existing.iter().any(|e| e == id))
            .collect();
        if !free.is_empty() && (existing.is_empty() || self.chance(50)) {
            return Write::CreateSegment(pb::CreateSegmentRequest {
                dataset: DATASET.to_owned(),
                segment_id: self.pick(&free).to_owned(),
                name: "crash".into(),
                expression,
                ..Default::default()
            });
        }
        let segment_id = existing[self.rng.below(existing.len() as u64) as usize].clone();
        match self.chance(60) {
            true => Write::UpdateSegment(pb::UpdateSegmentRequest {
                dataset: DATASET.to_owned(),
                segment_id,
                name: Some(format!("crash {}", self.rng.below(100))),
                expression,
                ..Default::default()
            }),
            false => Write::DeleteSegment(pb::DeleteSegmentRequest {
                dataset: DATASET.to_owned(),
                segment_id,
            }),
        }
    }
}

/// Declares the attributes the writes use, so that every probe binds from the first write on.
async fn declare_attributes(channel: &Channel) {
    use pb::AttributeKind as K;
    let attributes = [
        ("country", K::Categorical),
        ("interests", K::Set),
        ("spend", K::Float),
        ("vip", K::Boolean),
        ("age", K::Integer),
    ]
    .into_iter()
    .map(|(name, kind)| pb::AttributeDeclaration {
        name: name.to_owned(),
        kind: kind as i32,
    })
    .collect();
    pb::schema_service_client::SchemaServiceClient::new(channel.clone())
        .declare_attributes(pb::DeclareAttributesRequest {
            dataset: DATASET.to_owned(),
            attributes,
        })
        .await
        .expect("declare attributes");
}

/// The saved segments of the dataset.
async fn list_segments(channel: &Channel) -> pb::ListSegmentsResponse {
    pb::segment_service_client::SegmentServiceClient::new(channel.clone())
        .list_segments(pb::ListSegmentsRequest {
            dataset: DATASET.to_owned(),
            ..Default::default()
        })
        .await
        .expect("list segments")
        .into_inner()
}

async fn segment_ids(channel: &Channel) -> Vec<String> {
    let listed = list_segments(channel).await;
    sorted(listed.segments.into_iter().map(|s| s.id).collect())
}

// ---- comparing a server with the model -----------------------------------------------------

/// What a server answers, by question.
type Observation = BTreeMap<String, String>;

/// Schema figures, probe counts and members, saved segments and their members, and the
/// segments of `sampled` users.
async fn observe(channel: &Channel, sampled: &[String]) -> Observation {
    let mut seen = Observation::new();
    let described = pb::schema_service_client::SchemaServiceClient::new(channel.clone())
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: DATASET.to_owned(),
        })
        .await
        .expect("describe the dataset")
        .into_inner();
    seen.insert("schema".into(), format!("{described:?}"));
    for probe in PROBES {
        let audience = text(probe);
        let counted = count(channel, DATASET, audience.clone()).await;
        seen.insert(format!("count {probe}"), format!("{counted:?}"));
        let listed = members(channel, DATASET, audience).await.expect("members");
        seen.insert(format!("members {probe}"), format!("{listed:?}"));
    }
    observe_segments(channel, &mut seen).await;
    let mut query = pb::query_service_client::QueryServiceClient::new(channel.clone());
    for user in sampled {
        let request = pb::SegmentsForUserRequest {
            dataset: DATASET.to_owned(),
            user_id: user.clone(),
        };
        let answer = match query.segments_for_user(request).await {
            Ok(response) => format!("{:?}", sorted(response.into_inner().segment_ids)),
            Err(status) => format!("{:?}", status.code()),
        };
        seen.insert(format!("segments for {user}"), answer);
    }
    seen
}

async fn observe_segments(channel: &Channel, seen: &mut Observation) {
    let listed = list_segments(channel).await;
    let mut ids = Vec::new();
    for segment in listed.segments {
        let listed = members(channel, DATASET, segment_audience(&segment.id))
            .await
            .expect("segment members");
        seen.insert(
            format!("segment {}", segment.id),
            format!(
                "{} {:?} size {} members {listed:?}",
                segment.name, segment.expression_text, segment.size
            ),
        );
        ids.push(segment.id);
    }
    seen.insert("segment ids".into(), format!("{:?}", sorted(ids)));
}

/// The first question the two answer differently, with both answers.
fn difference(got: &Observation, want: &Observation) -> Option<String> {
    let clip = |s: &str| s.chars().take(3000).collect::<String>();
    want.iter().find_map(|(question, wanted)| {
        let answer = got.get(question).map_or("(missing)", String::as_str);
        (answer != wanted).then(|| {
            format!(
                "{question}:\n    server: {}\n    model:  {}",
                clip(answer),
                clip(wanted)
            )
        })
    })
}

/// Asserts that the restarted server answers as the model, with or without the write that was
/// in flight at the kill (applied to the model when only that matches).
async fn assert_matches_model(
    server: &Process,
    model: &TestServer,
    in_flight: Option<&Write>,
    sampled: &[String],
    context: &str,
) -> bool {
    let got = observe(&server.channel(), sampled).await;
    let Some(without) = difference(&got, &observe(&model.channel(), sampled).await) else {
        return false;
    };
    let Some(write) = in_flight else {
        panic!("{context}: the restarted server differs from the model at {without}");
    };
    write
        .send(&model.channel())
        .await
        .unwrap_or_else(|e| panic!("{context}: the model refuses {write:?}: {e}"));
    if let Some(with) = difference(&got, &observe(&model.channel(), sampled).await) {
        panic!(
            "{context}: the restarted server matches the model neither without the write in \
             flight ({without}) nor with it ({with}); the write: {write:?}"
        );
    }
    true
}

/// Writes to the server (and each acknowledged write to the model) until a timer task kills
/// the server after `kill_after`; returns the write in flight at the kill, if any was sent,
/// and how many were acknowledged.
async fn write_until_killed(
    server: &Process,
    model: &TestServer,
    writes: &mut Writes,
    kill_after: Duration,
) -> (Option<Write>, usize) {
    let killed = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let (kill, killed) = (server.killer(), killed.clone());
        async move {
            tokio::time::sleep(kill_after).await;
            killed.store(true, Ordering::SeqCst);
            kill();
        }
    });
    let mut acknowledged = 0;
    loop {
        let write = writes.next(&segment_ids(&model.channel()).await);
        match write.send(&server.channel()).await {
            Ok(()) => {
                write.send(&model.channel()).await.unwrap_or_else(|e| {
                    panic!("the model refuses an acknowledged write {write:?}: {e}")
                });
                acknowledged += 1;
            }
            Err(_) if killed.load(Ordering::SeqCst) => {
                killer.await.expect("the killer task");
                server.wait_exit(START_TIMEOUT).await;
                return (Some(write), acknowledged);
            }
            Err(status) => panic!(
                "{write:?} failed while the server ran: {status}; stderr:\n{}",
                server.log_text()
            ),
        }
    }
}

/// Pool users and markers issued so far whose segments are compared.
fn sample_users(rng: &mut SplitMix64, markers: u64) -> Vec<String> {
    let mut users: Vec<String> = (0..16)
        .map(|_| format!("u{:02}", rng.below(POOL)))
        .collect();
    users.extend((0..4).map(|_| format!("m{:06}", 1 + rng.below(markers.max(1)))));
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_write_it_restarts_with_every_acknowledged_write() {
    const SEED: u64 = 0xC0FF_EE15_DEAD;
    const ROUNDS: u64 = 30;
    let started = Instant::now();
    let mut scratch = Scratch::new("rounds");
    let mut rng = SplitMix64::new(SEED);
    let mut writes = Writes::new(SEED.rotate_left(17), now_ms());
    let model =
        TestServer::start_with(ServerOptions::default().clock(FixedClock::new(writes.now_ms)))
            .await;
    let start = |scratch: &mut Scratch, round: u64| {
        // Every eighth process acknowledges after group syncs instead of one sync each.
        let fsync = match round % 8 == 5 {
            true => ["--fsync", "interval", "--fsync-interval-ms", "5"].as_slice(),
            false => ["--fsync", "always"].as_slice(),
        };
        let mut extra = vec!["--snapshot-log-bytes", "65536"];
        extra.extend(fsync);
        scratch.start(&scratch.args(&extra))
    };
    let mut server = start(&mut scratch, 0);
    server.wait_serving(START_TIMEOUT).await;
    declare_attributes(&server.channel()).await;
    declare_attributes(&model.channel()).await;
    let (mut in_flight_applied, mut acknowledged) = (0, 0);
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(50 + rng.below(600));
        let (in_flight, acked) = write_until_killed(&server, &model, &mut writes, kill_after).await;
        acknowledged += acked;
        server = start(&mut scratch, round + 1);
        server.wait_serving(START_TIMEOUT).await;
        let context = format!("seed {SEED:#x}, round {round} ({acked} writes acknowledged)");
        let sampled = sample_users(&mut rng, writes.markers);
        if assert_matches_model(&server, &model, in_flight.as_ref(), &sampled, &context).await {
            in_flight_applied += 1;
        }
    }
    let stderr = scratch.all_stderr();
    let snapshots = stderr.matches("snapshot written").count();
    let from_snapshot = stderr.matches("snapshot=Some").count();
    eprintln!(
        "{ROUNDS} rounds, {acknowledged} writes acknowledged, {in_flight_applied} writes in \
         flight applied, {snapshots} snapshots, {from_snapshot} starts from a snapshot, {} torn \
         tails, {:.1} s",
        stderr.matches("torn").count(),
        started.elapsed().as_secs_f64()
    );
    assert!(acknowledged > ROUNDS as usize * 5, "the rounds wrote");
    assert!(
        snapshots > 0 && from_snapshot > 0,
        "snapshots were taken and recovered from"
    );
    drop(server);
    model.shutdown().await;
}

// ---- damaged files -------------------------------------------------------------------------

/// `prefix-0000`, `prefix-0001`, ...
fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_is_dropped_with_a_warning() {
    let mut scratch = Scratch::new("torn");
    let args = scratch.args(&["--snapshot-log-bytes", "1000000000"]);
    let mut server = scratch.start(&args);
    server.wait_serving(START_TIMEOUT).await;
    let users = numbered("torn-user", 30);
    upsert_one_by_one(&server.channel(), &users).await;
    server.kill();

    let segment = newest_nonempty_segment(&scratch.wal());
    let bytes = std::fs::read(&segment).expect("read the segment");
    let &(offset, payload) = log_records(&bytes).last().expect("records");
    assert!(
        contains(payload, users[29].as_bytes()),
        "the last record is the last write"
    );
    let cut_at = offset + RECORD_HEADER + payload.len() / 2;
    std::fs::write(&segment, &bytes[..cut_at]).expect("tear the last record");

    server.restart();
    server.wait_serving(START_TIMEOUT).await;
    let stderr = server.log_text();
    assert_mentions(
        &stderr,
        &[
            "torn",
            &segment.display().to_string(),
            &format!("byte offset {offset}"),
        ],
    );
    assert_eq!(
        all_users(&server.channel(), "").await,
        users[..29],
        "every write acknowledged before the torn record"
    );
}

/// Starts on the damaged directory, which must fail (`refusal` says why it must) with a log
/// naming `refused`; then starts with `--recover-truncate`, which must serve with a log naming
/// `repaired`. Returns the repaired server.
async fn refused_until_truncated(
    scratch: &mut Scratch,
    refusal: &str,
    refused: &[&str],
    repaired: &[&str],
) -> Process {
    let refused_start = scratch.start(&scratch.args(&[]));
    let status = refused_start.wait_exit(START_TIMEOUT).await;
    assert!(!status.success(), "{refusal}");
    assert_mentions(&refused_start.log_text(), refused);

    let repaired_start = scratch.start(&scratch.args(&["--recover-truncate"]));
    repaired_start.wait_serving(START_TIMEOUT).await;
    assert_mentions(&repaired_start.log_text(), repaired);
    repaired_start
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_log_stops_the_start_until_truncated() {
    let mut scratch = Scratch::new("flip-log");
    let server = scratch.start(&scratch.args(&[]));
    server.wait_serving(START_TIMEOUT).await;
    let users = numbered("flip-user", 30);
    upsert_one_by_one(&server.channel(), &users).await;
    server.kill();

    let segment = newest_nonempty_segment(&scratch.wal());
    let bytes = std::fs::read(&segment).expect("read the segment");
    let records = log_records(&bytes);
    assert_eq!(records.len(), 30, "one record per write");
    let (offset, payload) = records[15];
    assert!(contains(payload, users[15].as_bytes()));
    flip_byte(&segment, offset + RECORD_HEADER + payload.len() / 2);

    let at = format!("byte offset {offset}");
    let repaired = refused_until_truncated(
        &mut scratch,
        "a corrupt log refuses the start",
        &[&segment.display().to_string(), &at],
        &["dropped", &at],
    )
    .await;
    assert_eq!(
        all_users(&repaired.channel(), "").await,
        users[..15],
        "what preceded the damage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_snapshot_stops_the_start_until_truncated() {
    let mut scratch = Scratch::new("flip-snapshot");
    let server = scratch.start(&scratch.args(&[]));
    server.wait_serving(START_TIMEOUT).await;
    // Long ids, so that the keys file has a second 1 MiB block to damage.
    let ids: Vec<String> = (0..60_000)
        .map(|i| format!("snapshot-user-{i:08}"))
        .collect();
    let batch = RecordBatch::try_from_iter([(
        "user_id",
        Arc::new(StringArray::from(ids.clone())) as ArrayRef,
    )])
    .expect("batch");
    Write::Import(cut(&ipc_stream_bytes(&[batch]), &[256 * 1024]))
        .send(&server.channel())
        .await
        .expect("import");
    let others = numbered("other-user", 3);
    let updates = others
        .iter()
        .map(|id| update::user(id, vec![update::string("country", "GB")]))
        .collect();
    upsert(&server.channel(), "other", updates).await;
    let cli = Command::new(env!("CARGO_BIN_EXE_audience"))
        .args(["--addr", &server.url(), "snapshot"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run audience snapshot");
    assert!(cli.status.success(), "{cli:?}");
    server.kill();

    let keys = files_under(&scratch.data().join("snapshots"))
        .into_iter()
        .find(|p| p.ends_with("default/keys.arrow"))
        .expect("the keys file of the snapshot");
    let size = std::fs::metadata(&keys).expect("keys file").len();
    assert!(size > SNAPSHOT_BLOCK + 4096, "{size} bytes");
    flip_byte(&keys, (SNAPSHOT_BLOCK + 4096) as usize);

    let at = format!("byte offset {SNAPSHOT_BLOCK}");
    let repaired = refused_until_truncated(
        &mut scratch,
        "a corrupt snapshot refuses the start",
        &[&keys.display().to_string(), &at],
        &[&at, "dataset 'default' is dropped"],
    )
    .await;
    assert_eq!(all_users(&repaired.channel(), "other").await, others);
    // The engine always has a `default` dataset: the dropped one comes back empty.
    let described = repaired
        .schema()
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: DATASET.to_owned(),
        })
        .await
        .expect("describe the dropped dataset")
        .into_inner();
    assert_eq!(described.user_count, 0, "{described:?}");
}

// ---- loading -------------------------------------------------------------------------------

/// Demo users of the loading test: about 2.3 s to generate and load, and 1.2 s to recover from
/// a snapshot, in a debug build on the 2-core machine (300,000 took 6.8 s and 3.7 s).
const DEMO_USERS: u64 = 100_000;

/// What the loading poll saw.
#[derive(Debug, Default)]
struct LoadingSeen {
    /// `UNAVAILABLE "loading: ..."` answers, each while health said NOT_SERVING.
    refused: usize,
    /// The counts of `probes` once serving.
    counts: Vec<u64>,
}

/// Polls health and a count from the start until SERVING: while loading, the count must be
/// refused with `loading:` and health NOT_SERVING; once it answers, it must be `users`.
async fn poll_through_loading(server: &Process, users: u64, probes: &[&str]) -> LoadingSeen {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = LoadingSeen::default();
    loop {
        assert!(Instant::now() < deadline, "not serving in time");
        assert!(server.exit_status().is_none(), "{}", server.log_text());
        let health = server.health().await;
        match count(&server.channel(), "", text(ALL_USERS)).await {
            Ok(counted) => {
                assert_eq!(counted, users, "a count is answered only in full");
                if health == Some(ServingStatus::Serving) {
                    break;
                }
            }
            Err(status) if status.message().starts_with("loading:") => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(status.message().contains(" of "), "{status:?}");
                // Health was asked first: the server may not have been listening yet then.
                assert!(
                    matches!(health, None | Some(ServingStatus::NotServing)),
                    "health while loading: {health:?}"
                );
                seen.refused += 1;
            }
            // Not listening yet.
            Err(status) => assert_ne!(health, Some(ServingStatus::Serving), "{status:?}"),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    for probe in probes {
        let counted = count(&server.channel(), "", text(probe)).await;
        seen.counts.push(counted.expect("count once serving"));
    }
    seen
}

const LOADING_PROBES: [&str; 3] = [
    r#"country = "US""#,
    r#"age BETWEEN 25 AND 34 AND interests HAS "sports""#,
    "subscriber = TRUE",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_the_load_are_refused_not_answered_from_half_a_dataset() {
    let mut scratch = Scratch::new("loading");
    let demo = DEMO_USERS.to_string();
    let in_memory = scratch.start(&["--demo-users".to_owned(), demo.clone()]);
    let seen = poll_through_loading(&in_memory, DEMO_USERS, &LOADING_PROBES).await;
    assert!(
        seen.refused > 0,
        "the demo load was seen refusing: {seen:?}"
    );
    drop(in_memory);

    let durable = scratch.start(&scratch.args(&["--demo-users", &demo]));
    let loaded = poll_through_loading(&durable, DEMO_USERS, &LOADING_PROBES).await;
    assert_eq!(loaded.counts, seen.counts, "the same demo data");
    durable.snapshot().await;
    durable.kill();

    let recovered = scratch.start(&scratch.args(&[]));
    let seen = poll_through_loading(&recovered, DEMO_USERS, &LOADING_PROBES).await;
    assert!(seen.refused > 0, "the recovery was seen refusing: {seen:?}");
    assert_eq!(seen.counts, loaded.counts, "exact counts after recovery");
    assert_mentions(&recovered.log_text(), &["snapshot=Some"]);
}

// ---- erasure -------------------------------------------------------------------------------

/// Which of `ids` some file under `dir` holds.
fn ids_on_disk(dir: &Path, ids: &[String]) -> Vec<String> {
    let contents: Vec<Vec<u8>> = files_under(dir)
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect();
    ids.iter()
        .filter(|id| contents.iter().any(|bytes| contains(bytes, id.as_bytes())))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_users_leave_every_file_within_the_erasure_age() {
    let mut scratch = Scratch::new("erasure");
    let args = scratch.args(&["--erasure-max-age-secs", "1"]);
    let mut server = scratch.start(&args);
    server.wait_serving(START_TIMEOUT).await;
    let erased = numbered("erase-me-7f3a9c", 6);
    let kept = numbered("keep-me-b21e04", 6);
    let everyone: Vec<String> = erased.iter().chain(&kept).cloned().collect();
    upsert_one_by_one(&server.channel(), &everyone).await;
    pb::ingest_service_client::IngestServiceClient::new(server.channel())
        .delete_users(pb::DeleteUsersRequest {
            dataset: DATASET.to_owned(),
            user_ids: erased.clone(),
        })
        .await
        .expect("delete");
    assert_eq!(
        ids_on_disk(&scratch.data(), &erased),
        erased,
        "logged first"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (left, found) = (
            ids_on_disk(&scratch.data(), &erased),
            ids_on_disk(&scratch.data(), &kept),
        );
        assert_eq!(found, kept, "the users not deleted stay on disk");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deleted users still on disk after 20 s: {left:?}; files: {:?}",
            files_under(&scratch.data())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart();
    server.wait_serving(START_TIMEOUT).await;
    assert_eq!(all_users(&server.channel(), "").await, kept);
}
