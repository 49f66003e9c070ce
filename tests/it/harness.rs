//! The test harness: the real server on `127.0.0.1:0`, typed clients, an injectable clock, the
//! demo data loaded through the engine, and small builders for requests.
//!
//! Every test starts its own [`TestServer`] and ends with [`TestServer::shutdown`]; readiness is
//! polled through `grpc.health.v1`, never waited for with a sleep.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int16Type, Int32Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use audience::engine::{ChangeOutcome, Engine, ImportBatch, Limits};
use audience::grpc::pb;
use audience::grpc::{serve, ServeError, Services};
use audience::time::{Clock, Millis};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long the harness waits for the server to become ready or to stop.
pub const HARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often health is polled while waiting.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// 2026-01-01T00:00:00Z, the default time of a [`FixedClock`].
pub const JAN_1_2026: Millis = 1_767_225_600_000;

/// A clock that stands still until a test moves it.
#[derive(Debug)]
pub struct FixedClock(AtomicI64);

impl FixedClock {
    pub fn new(millis: Millis) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(millis)))
    }

    pub fn set(&self, millis: Millis) {
        self.0.store(millis, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now_millis(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a test can change about the server it starts.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub limits: Limits,
    pub clock: Arc<dyn Clock>,
    pub max_message_bytes: usize,
    pub import_dir: Option<std::path::PathBuf>,
    /// Period of the time-driven segment refresh.
    pub time_refresh: std::time::Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            clock: FixedClock::new(JAN_1_2026),
            max_message_bytes: 64 * 1024 * 1024,
            import_dir: None,
            time_refresh: std::time::Duration::from_secs(60),
        }
    }
}

impl ServerOptions {
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn import_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.import_dir = Some(dir);
        self
    }

    /// Server-side imports read from the system temp dir, where [`temp_path`] puts files.
    pub fn temp_imports(self) -> Self {
        self.import_dir(std::env::temp_dir())
    }

    pub fn time_refresh(mut self, period: std::time::Duration) -> Self {
        self.time_refresh = period;
        self
    }

    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }
}

/// The real server on an ephemeral port, with its engine at hand.
pub struct TestServer {
    addr: SocketAddr,
    engine: Arc<Engine>,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// Held by a test that starts a server whose readiness it controls.
pub struct ReadyGate(oneshot::Sender<()>);

impl ReadyGate {
    pub fn open(self) {
        let _ = self.0.send(());
    }
}

impl TestServer {
    /// A server with default limits and a [`FixedClock`] at [`JAN_1_2026`], ready to serve.
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// A server on `clock` whose time-driven refresh runs every 50 ms, so that segments catch
    /// up with a moved clock within a test's patience.
    pub async fn start_on_clock(clock: Arc<FixedClock>) -> Self {
        Self::start_with(
            ServerOptions::default()
                .clock(clock)
                .time_refresh(Duration::from_millis(50)),
        )
        .await
    }

    /// A server with `options`, ready to serve.
    pub async fn start_with(options: ServerOptions) -> Self {
        let (server, gate) = Self::start_gated(options).await;
        gate.open();
        server.wait_until_serving().await;
        server
    }

    /// A server that stays NOT_SERVING until the gate is opened.
    pub async fn start_gated(options: ServerOptions) -> (Self, ReadyGate) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let engine = Arc::new(Engine::new(options.limits, options.clock));
        let services = Services {
            engine: engine.clone(),
            max_message_bytes: options.max_message_bytes,
            import_dir: options.import_dir.clone(),
            time_refresh: options.time_refresh,
            security: Default::default(),
            metrics: None,
            lifecycle: Default::default(),
        };
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let ready = async move {
            let _ = ready_rx.await;
            Ok(())
        };
        let shutdown = async move {
            let _ = shutdown_rx.await;
        };
        let task = tokio::spawn(serve(services, listener, ready, shutdown));
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        let server = Self {
            addr,
            engine,
            channel,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        };
        (server, ReadyGate(ready_tx))
    }

    /// Polls `grpc.health.v1` (service `""`) until SERVING, failing after [`HARD_TIMEOUT`].
    pub async fn wait_until_serving(&self) {
        let mut health = HealthClient::new(self.channel.clone());
        let mut ticks = tokio::time::interval(POLL_EVERY);
        let outcome = tokio::time::timeout(HARD_TIMEOUT, async {
            loop {
                ticks.tick().await;
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if let Ok(response) = status {
                    if response.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
        })
        .await;
        assert!(
            outcome.is_ok(),
            "server at {} not SERVING within {HARD_TIMEOUT:?}",
            self.addr
        );
    }

    /// The health status of one service name (`""` for the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine behind the server, for loading data without the wire.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn query(&self) -> pb::query_service_client::QueryServiceClient<Channel> {
        pb::query_service_client::QueryServiceClient::new(self.channel.clone())
    }

    pub fn segments(&self) -> pb::segment_service_client::SegmentServiceClient<Channel> {
        pb::segment_service_client::SegmentServiceClient::new(self.channel.clone())
    }

    pub fn ingest(&self) -> pb::ingest_service_client::IngestServiceClient<Channel> {
        pb::ingest_service_client::IngestServiceClient::new(self.channel.clone())
    }

    pub fn schema(&self) -> pb::schema_service_client::SchemaServiceClient<Channel> {
        pb::schema_service_client::SchemaServiceClient::new(self.channel.clone())
    }

    pub fn watch(&self) -> pb::watch_service_client::WatchServiceClient<Channel> {
        pb::watch_service_client::WatchServiceClient::new(self.channel.clone())
    }

    /// Triggers the shutdown future and waits for the server task, which must end cleanly.
    pub async fn shutdown(mut self) {
        if let Some(signal) = self.shutdown.take() {
            let _ = signal.send(());
        }
        let task = self.task.take().expect("server task");
        let result = tokio::time::timeout(HARD_TIMEOUT, task)
            .await
            .expect("server did not stop within the hard timeout")
            .expect("server task panicked");
        result.expect("server stopped with an error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that failed before `shutdown` still stops its server.
        if let Some(signal) = self.shutdown.take() {
            let _ = signal.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Loads `n` demo users (seed `seed`) into `dataset` through the engine in batches of `batch_rows`.
pub async fn load_demo(
    engine: &Arc<Engine>,
    dataset: &str,
    n: u64,
    batch_rows: usize,
    seed: u64,
) -> ChangeOutcome {
    let mut import = engine.begin_import(dataset).await.expect("begin import");
    for batch in audience::demo::batches(n, batch_rows, seed) {
        import
            .apply(ImportBatch {
                batch,
                id_column: "user_id".into(),
            })
            .await
            .expect("apply demo batch");
    }
    import.commit().await.expect("commit demo import")
}

/// One demo user read straight from the generated Arrow batches: the tests' oracle.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoRow {
    pub user_id: String,
    pub country: Option<String>,
    pub age: Option<i64>,
    pub gender: Option<String>,
    pub device: Option<String>,
    pub interests: BTreeSet<String>,
    pub lifetime_spend: Option<f64>,
    pub subscriber: Option<bool>,
    pub signup_ts: Option<Millis>,
}

fn dictionary_value(batch: &RecordBatch, column: &str, row: usize) -> Option<String> {
    let array = batch.column_by_name(column).expect("column");
    let dict = array.as_dictionary::<Int32Type>();
    if dict.is_null(row) {
        return None;
    }
    let key = dict.keys().value(row) as usize;
    Some(dict.values().as_string::<i32>().value(key).to_owned())
}

/// The demo rows `0..n` for `seed`, decoded from the same batches the server loads.
pub fn demo_rows(n: u64, seed: u64) -> Vec<DemoRow> {
    let mut rows = Vec::new();
    for batch in audience::demo::batches(n, 1024, seed) {
        let ids = batch.column_by_name("user_id").unwrap().as_string::<i32>();
        let age = batch
            .column_by_name("age")
            .unwrap()
            .as_primitive::<Int16Type>();
        let interests = batch.column_by_name("interests").unwrap().as_list::<i32>();
        let spend = batch
            .column_by_name("lifetime_spend")
            .unwrap()
            .as_primitive::<Float64Type>();
        let subscriber = batch.column_by_name("subscriber").unwrap().as_boolean();
        let signup = batch
            .column_by_name("signup_ts")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        for row in 0..batch.num_rows() {
            let held = if interests.is_null(row) {
                BTreeSet::new()
            } else {
                let values = interests.value(row);
                values
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect()
            };
            rows.push(DemoRow {
                user_id: ids.value(row).to_owned(),
                country: dictionary_value(&batch, "country", row),
                age: (!age.is_null(row)).then(|| i64::from(age.value(row))),
                gender: dictionary_value(&batch, "gender", row),
                device: dictionary_value(&batch, "device", row),
                interests: held,
                lifetime_spend: (!spend.is_null(row)).then(|| spend.value(row)),
                subscriber: (!subscriber.is_null(row)).then(|| subscriber.value(row)),
                signup_ts: (!signup.is_null(row)).then(|| signup.value(row)),
            });
        }
    }
    rows
}

/// The ids of the rows that pass `keep`, sorted.
pub fn ids_where<T>(rows: &[T], keep: impl Fn(&T) -> bool, id: impl Fn(&T) -> &str) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|r| keep(r))
        .map(|r| id(r).to_owned())
        .collect();
    ids.sort();
    ids
}

/// Sorted copy.
pub fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

// ---- request builders ----------------------------------------------------------------------

/// An audience given as text.
pub fn text(expr: &str) -> Option<pb::Audience> {
    Some(pb::Audience {
        kind: Some(pb::audience::Kind::Expression(text_expr(expr))),
    })
}

/// An expression given as text.
pub fn text_expr(expr: &str) -> pb::Expression {
    pb::Expression {
        kind: Some(pb::expression::Kind::Text(expr.to_owned())),
    }
}

/// An audience given as a tree.
pub fn tree(node: pb::Node) -> Option<pb::Audience> {
    Some(pb::Audience {
        kind: Some(pb::audience::Kind::Expression(tree_expr(node))),
    })
}

/// An expression given as a tree.
pub fn tree_expr(node: pb::Node) -> pb::Expression {
    pb::Expression {
        kind: Some(pb::expression::Kind::Tree(node)),
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A saved segment as the audience.
pub fn segment_audience(id: &str) -> Option<pb::Audience> {
    Some(pb::Audience {
        kind: Some(pb::audience::Kind::SegmentId(id.to_owned())),
    })
}

pub mod node {
    //! Tree nodes, one function per predicate.
    use audience::grpc::pb;
    use pb::node::Node as N;

    fn wrap(node: N) -> pb::Node {
        pb::Node { node: Some(node) }
    }

    pub fn and(nodes: Vec<pb::Node>) -> pb::Node {
        wrap(N::And(pb::NodeList { nodes }))
    }

    pub fn or(nodes: Vec<pb::Node>) -> pb::Node {
        wrap(N::Or(pb::NodeList { nodes }))
    }

    pub fn not(node: pb::Node) -> pb::Node {
        wrap(N::Not(Box::new(node)))
    }

    pub fn s(value: &str) -> pb::Literal {
        pb::Literal {
            kind: Some(pb::literal::Kind::StringValue(value.to_owned())),
        }
    }

    pub fn i(value: i64) -> pb::Literal {
        pb::Literal {
            kind: Some(pb::literal::Kind::IntValue(value)),
        }
    }

    pub fn f(value: f64) -> pb::Literal {
        pb::Literal {
            kind: Some(pb::literal::Kind::DoubleValue(value)),
        }
    }

    pub fn b(value: bool) -> pb::Literal {
        pb::Literal {
            kind: Some(pb::literal::Kind::BoolValue(value)),
        }
    }

    pub fn lit(literal: pb::Literal) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Literal(literal)),
        }
    }

    pub fn eq(attribute: &str, value: pb::Literal) -> pb::Node {
        wrap(N::Equals(pb::EqualsPredicate {
            attribute: attribute.to_owned(),
            value: Some(value),
            negated: false,
        }))
    }

    pub fn ne(attribute: &str, value: pb::Literal) -> pb::Node {
        wrap(N::Equals(pb::EqualsPredicate {
            attribute: attribute.to_owned(),
            value: Some(value),
            negated: true,
        }))
    }

    pub fn in_(attribute: &str, values: Vec<pb::Literal>) -> pb::Node {
        wrap(N::In(pb::InPredicate {
            attribute: attribute.to_owned(),
            values,
            negated: false,
        }))
    }

    pub fn has(attribute: &str, value: pb::Literal) -> pb::Node {
        wrap(N::Has(pb::HasPredicate {
            attribute: attribute.to_owned(),
            value: Some(value),
        }))
    }

    pub fn has_all(attribute: &str, values: Vec<pb::Literal>) -> pb::Node {
        wrap(N::HasAll(pb::HasAllPredicate {
            attribute: attribute.to_owned(),
            values,
        }))
    }

    pub fn has_any(attribute: &str, values: Vec<pb::Literal>) -> pb::Node {
        wrap(N::HasAny(pb::HasAnyPredicate {
            attribute: attribute.to_owned(),
            values,
        }))
    }

    pub fn compare(attribute: &str, op: pb::CompareOp, value: pb::Value) -> pb::Node {
        wrap(N::Compare(pb::ComparePredicate {
            attribute: attribute.to_owned(),
            op: op as i32,
            value: Some(value),
        }))
    }

    pub fn between(attribute: &str, low: pb::Value, high: pb::Value) -> pb::Node {
        wrap(N::Between(pb::BetweenPredicate {
            attribute: attribute.to_owned(),
            low: Some(low),
            high: Some(high),
        }))
    }

    pub fn is_null(attribute: &str, negated: bool) -> pb::Node {
        wrap(N::IsNull(pb::IsNullPredicate {
            attribute: attribute.to_owned(),
            negated,
        }))
    }

    pub fn segment(id: &str) -> pb::Node {
        wrap(N::Segment(pb::SegmentPredicate {
            segment_id: id.to_owned(),
        }))
    }
}

pub mod update {
    //! Attribute updates for `UpsertUsers`.
    use audience::grpc::pb;
    use pb::attribute_update::Change;
    use pb::attribute_value::Kind;

    fn set(attribute: &str, kind: Kind) -> pb::AttributeUpdate {
        pb::AttributeUpdate {
            attribute: attribute.to_owned(),
            change: Some(Change::Set(pb::AttributeValue { kind: Some(kind) })),
        }
    }

    pub fn string(attribute: &str, value: &str) -> pb::AttributeUpdate {
        set(attribute, Kind::StringValue(value.to_owned()))
    }

    pub fn int(attribute: &str, value: i64) -> pb::AttributeUpdate {
        set(attribute, Kind::IntValue(value))
    }

    pub fn float(attribute: &str, value: f64) -> pb::AttributeUpdate {
        set(attribute, Kind::DoubleValue(value))
    }

    pub fn boolean(attribute: &str, value: bool) -> pb::AttributeUpdate {
        set(attribute, Kind::BoolValue(value))
    }

    pub fn timestamp(attribute: &str, millis: i64) -> pb::AttributeUpdate {
        set(attribute, Kind::TimestampValue(super::timestamp(millis)))
    }

    pub fn set_of(attribute: &str, values: &[&str]) -> pb::AttributeUpdate {
        set(
            attribute,
            Kind::SetValue(pb::StringList {
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }),
        )
    }

    pub fn clear(attribute: &str) -> pb::AttributeUpdate {
        pb::AttributeUpdate {
            attribute: attribute.to_owned(),
            change: Some(Change::Clear(true)),
        }
    }

    pub fn add(attribute: &str, values: &[&str]) -> pb::AttributeUpdate {
        pb::AttributeUpdate {
            attribute: attribute.to_owned(),
            change: Some(Change::Add(pb::StringList {
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            })),
        }
    }

    pub fn remove(attribute: &str, values: &[&str]) -> pb::AttributeUpdate {
        pb::AttributeUpdate {
            attribute: attribute.to_owned(),
            change: Some(Change::Remove(pb::StringList {
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            })),
        }
    }

    pub fn user(user_id: &str, updates: Vec<pb::AttributeUpdate>) -> pb::UserUpdate {
        pb::UserUpdate {
            user_id: user_id.to_owned(),
            updates,
        }
    }
}

// ---- a small hand-made dataset -------------------------------------------------------------

/// One user of the hand-made "people" dataset; every field may be absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub id: String,
    pub country: Option<&'static str>,
    pub age: Option<i64>,
    pub interests: Vec<&'static str>,
    pub subscriber: Option<bool>,
    pub spend: Option<f64>,
}

impl Person {
    pub fn has(&self, interest: &str) -> bool {
        self.interests.contains(&interest)
    }
}

/// `n` people with values cycling through small domains, some of them null. Computed by
/// arithmetic on the index, so that tests can filter the same Vec to get expected answers.
pub fn people(n: usize) -> Vec<Person> {
    const COUNTRIES: [Option<&str>; 5] = [Some("US"), Some("GB"), Some("US"), Some("DE"), None];
    const INTERESTS: [&str; 4] = ["sports", "music", "travel", "tech"];
    (0..n)
        .map(|i| Person {
            id: format!("p{i:04}"),
            country: COUNTRIES[i % COUNTRIES.len()],
            age: (i % 7 != 3).then_some(18 + (i as i64 * 7) % 50),
            interests: INTERESTS
                .iter()
                .enumerate()
                .filter(|(k, _)| (i >> k) & 1 == 1 && i % 11 != 0)
                .map(|(_, v)| *v)
                .collect(),
            subscriber: match i % 3 {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            },
            spend: (i % 4 != 0).then_some((i as f64) * 2.5),
        })
        .collect()
}

/// The upserts that create `people` (nulls are simply not written).
pub fn people_request(dataset: &str, people: &[Person]) -> pb::UpsertUsersRequest {
    let users = people
        .iter()
        .map(|p| {
            let mut updates = Vec::new();
            if let Some(c) = p.country {
                updates.push(update::string("country", c));
            }
            if let Some(a) = p.age {
                updates.push(update::int("age", a));
            }
            if !p.interests.is_empty() {
                updates.push(update::set_of("interests", &p.interests));
            }
            if let Some(s) = p.subscriber {
                updates.push(update::boolean("subscriber", s));
            }
            if let Some(s) = p.spend {
                updates.push(update::float("spend", s));
            }
            update::user(&p.id, updates)
        })
        .collect();
    pb::UpsertUsersRequest {
        dataset: dataset.to_owned(),
        users,
    }
}

/// Starts a default server and loads `n` people into `default` over gRPC.
pub async fn server_with_people(n: usize) -> (TestServer, Vec<Person>) {
    let server = TestServer::start().await;
    let everyone = people(n);
    load_people(&server, "", &everyone).await;
    (server, everyone)
}

/// Upserts people over gRPC in batches within the server's batch limit.
pub async fn load_people(server: &TestServer, dataset: &str, people: &[Person]) {
    let mut ingest = server.ingest();
    let batch = server.engine().limits().max_batch_users.clamp(1, 1000);
    for chunk in people.chunks(batch) {
        ingest
            .upsert_users(people_request(dataset, chunk))
            .await
            .expect("upsert people");
    }
}

/// Ids of people passing `keep`, sorted.
pub fn people_where(people: &[Person], keep: impl Fn(&Person) -> bool) -> Vec<String> {
    ids_where(people, keep, |p| p.id.as_str())
}

// ---- small wire helpers --------------------------------------------------------------------

/// The count of an audience.
pub async fn count(server: &TestServer, dataset: &str, audience: Option<pb::Audience>) -> u64 {
    server
        .query()
        .count(pb::CountRequest {
            dataset: dataset.to_owned(),
            audience,
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner()
        .count
}

/// Every member of an audience via ExportMembers, sorted.
pub async fn members(
    server: &TestServer,
    dataset: &str,
    audience: Option<pb::Audience>,
) -> Vec<String> {
    let mut stream = server
        .query()
        .export_members(pb::ExportMembersRequest {
            dataset: dataset.to_owned(),
            audience,
            ..Default::default()
        })
        .await
        .expect("export members")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export chunk") {
        ids.extend(chunk.user_ids);
    }
    sorted(ids)
}

/// Asserts a status's code and that its message contains every one of `needles`.
#[track_caller]
pub fn assert_status(status: &tonic::Status, code: tonic::Code, needles: &[&str]) {
    assert_eq!(
        status.code(),
        code,
        "unexpected code; message: {}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} does not contain {needle:?}",
            status.message()
        );
    }
}

/// Value → count map from a breakdown.
pub fn breakdown_map(entries: &[pb::BreakdownEntry]) -> BTreeMap<String, u64> {
    entries.iter().map(|e| (e.value.clone(), e.count)).collect()
}

/// A unique path under the system temp dir for a test's file.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    static COUNTER: AtomicI64 = AtomicI64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("audience-it-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir.join(name)
}

/// `batch` with one more (nullable) column.
pub fn with_column(batch: &RecordBatch, name: &str, column: arrow_array::ArrayRef) -> RecordBatch {
    let mut fields: Vec<arrow_schema::Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(arrow_schema::Field::new(
        name,
        column.data_type().clone(),
        true,
    ));
    let mut columns = batch.columns().to_vec();
    columns.push(column);
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), columns).expect("batch")
}

// ---- Arrow IPC imports over the wire -------------------------------------------------------

/// `batches` as one Arrow IPC stream.
pub fn ipc_stream_bytes(batches: &[RecordBatch]) -> Vec<u8> {
    let schema = batches.first().expect("at least one batch").schema();
    let mut writer =
        arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema).expect("ipc writer");
    for batch in batches {
        writer.write(batch).expect("write batch");
    }
    writer.finish().expect("finish ipc stream");
    writer.into_inner().expect("ipc bytes")
}

/// `bytes` cut into pieces whose sizes cycle through `sizes`.
pub fn cut(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut rest = bytes;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        pieces.push(piece.to_vec());
        rest = tail;
    }
    pieces
}

/// What an import stream answered: every progress message, then the error if it failed.
#[derive(Debug)]
pub struct ImportOutcome {
    pub progress: Vec<pb::ImportProgress>,
    pub error: Option<tonic::Status>,
}

impl ImportOutcome {
    /// The final (done) progress message of a successful import.
    #[track_caller]
    pub fn done(&self) -> &pb::ImportProgress {
        assert!(self.error.is_none(), "import failed: {:?}", self.error);
        let last = self.progress.last().expect("some progress");
        assert!(last.done, "the last message says done");
        last
    }

    /// The error of a failed import.
    #[track_caller]
    pub fn error(&self) -> &tonic::Status {
        self.error.as_ref().expect("the import should have failed")
    }
}

/// Sends `chunks` as one ImportUsers call (the first message names the dataset and id column)
/// and collects what comes back.
pub async fn import_chunks(
    server: &TestServer,
    dataset: &str,
    id_column: &str,
    chunks: Vec<Vec<u8>>,
) -> ImportOutcome {
    let mut messages: Vec<pb::ImportUsersRequest> = chunks
        .into_iter()
        .map(|chunk| pb::ImportUsersRequest {
            arrow_ipc_chunk: chunk,
            ..Default::default()
        })
        .collect();
    if messages.is_empty() {
        messages.push(pb::ImportUsersRequest::default());
    }
    messages[0].dataset = dataset.to_owned();
    messages[0].id_column = id_column.to_owned();
    let response = server
        .ingest()
        .import_users(tokio_stream::iter(messages))
        .await;
    collect_progress(response).await
}

/// Every progress message of an import call, and the error that ended it, if any.
pub async fn collect_progress<R: pb::ImportResponse>(
    response: Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>,
) -> ImportOutcome {
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return ImportOutcome {
                progress: Vec::new(),
                error: Some(status),
            }
        }
    };
    let mut progress = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => progress.push(
                message
                    .into_progress()
                    .expect("every import response carries its progress"),
            ),
            Ok(None) => {
                return ImportOutcome {
                    progress,
                    error: None,
                }
            }
            Err(status) => {
                return ImportOutcome {
                    progress,
                    error: Some(status),
                }
            }
        }
    }
}

/// Loads `n` demo users into `dataset` over gRPC as one Arrow IPC stream.
pub async fn import_demo_over_grpc(server: &TestServer, dataset: &str, n: u64, seed: u64) {
    let batches: Vec<RecordBatch> = audience::demo::batches(n, 1000, seed).collect();
    let bytes = ipc_stream_bytes(&batches);
    let outcome = import_chunks(server, dataset, "", cut(&bytes, &[64 * 1024])).await;
    assert_eq!(outcome.done().rows_read, n);
}

/// The server's datasets (`ListDatasets`).
pub async fn dataset_names(server: &TestServer) -> Vec<String> {
    server
        .schema()
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .expect("list datasets")
        .into_inner()
        .datasets
}

/// ImportUsersFile of a path, collected.
pub async fn import_file(
    server: &TestServer,
    dataset: &str,
    path: &std::path::Path,
    id_column: &str,
) -> ImportOutcome {
    let response = server
        .ingest()
        .import_users_file(pb::ImportUsersFileRequest {
            dataset: dataset.to_owned(),
            path: path.display().to_string(),
            id_column: id_column.to_owned(),
        })
        .await;
    collect_progress(response).await
}

/// Writes `reflected_services_<version>`: the services a server lists by reflection in that
/// version's package (`v1` and `v1alpha` have the same messages under two names), with an
/// optional `authorization` header.
macro_rules! reflection_lister {
    ($name:ident, $version:ident) => {
        pub async fn $name(
            channel: Channel,
            authorization: Option<&str>,
        ) -> Result<BTreeSet<String>, tonic::Status> {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            let list = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut request = tonic::Request::new(tokio_stream::iter(vec![list]));
            if let Some(value) = authorization {
                let value = value.parse().expect("a header value");
                request.metadata_mut().insert("authorization", value);
            }
            let mut responses = ServerReflectionClient::new(channel)
                .server_reflection_info(request)
                .await?
                .into_inner();
            let first = responses.message().await?.expect("one answer");
            let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
                panic!("expected a service list, got {first:?}");
            };
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
    };
}

reflection_lister!(reflected_services_v1, v1);
reflection_lister!(reflected_services_v1alpha, v1alpha);
