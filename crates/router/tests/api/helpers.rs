//! The test harness: the real app on `127.0.0.1:0` with a temporary database and a manual clock, a stand-in
//! OpenAI-compatible runtime, and typed request helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use futures_util::StreamExt;
use llm_router::app::App;
use llm_router::clock::ManualClock;
use llm_router::config::Settings;
use llm_router::state::AppState;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::exposition::{self, Exposition};

pub const ADMIN_PASSWORD: &str = "admin-password-1";
/// 2026-01-01T00:00:00Z
pub const START_MS: i64 = 1_767_225_600_000;

/// Whether the suite's routers keep their data in SQLite, the embedded default, rather than PostgreSQL
/// (`LLM_ROUTER_TEST_BACKEND=postgres`, which `scripts/test.sh` sets for its second pass of the suite). Every test
/// of [`Database::Suite`] runs on both. A test of SQLite itself chooses [`Database::Sqlite`] and lives in the
/// `sqlite` module, which the PostgreSQL pass skips (and whose tests fail if it does not); one of PostgreSQL itself
/// chooses [`Database::Postgres`], whatever the pass.
pub fn on_sqlite() -> bool {
    match std::env::var("LLM_ROUTER_TEST_BACKEND") {
        Ok(backend) if backend == "postgres" => false,
        Ok(backend) if backend == "sqlite" || backend.is_empty() => true,
        Ok(other) => panic!("LLM_ROUTER_TEST_BACKEND={other}: expected `sqlite` (the default) or `postgres`"),
        Err(_) => true,
    }
}

/// The test PostgreSQL server's admin URL (`LLM_ROUTER_TEST_POSTGRES`, set by `scripts/test.sh`) for a test of
/// PostgreSQL that needs it whatever the suite's backend. Without it, `None`, after a line on stderr saying the test
/// is skipped, for the test to return on (`let Some(server) = postgres_server() else { return };`); under CI (`CI`
/// set) the test fails instead.
pub use llm_router::store::postgres::test_server as postgres_server;

/// A database of its own on the test PostgreSQL server, created empty; dropped with its last clone (every router
/// on it is then stopped, or its connections are ended).
#[derive(Clone)]
pub struct PgDatabase(Arc<PgDatabaseInner>);

struct PgDatabaseInner {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    /// A database of its own on the test server, for a router of the suite's PostgreSQL pass, which cannot run
    /// without the server.
    pub async fn for_suite() -> PgDatabase {
        let server = llm_router::store::postgres::test_server_url().unwrap_or_else(|| {
            panic!(
                "LLM_ROUTER_TEST_BACKEND=postgres runs the suite's routers on the test PostgreSQL server, and \
                 LLM_ROUTER_TEST_POSTGRES is not set: run scripts/test.sh, or start one with \
                 `POSTGRES_NO_FSYNC=1 scripts/postgres.sh start DIR` and set LLM_ROUTER_TEST_POSTGRES to the URL it \
                 prints"
            )
        });
        PgDatabase::create_on(&server).await
    }

    /// A database of its own on the server at `server` (an admin URL).
    pub async fn create_on(server: &str) -> PgDatabase {
        use sqlx::Connection;
        let server = server.to_owned();
        let name = format!("llm_router_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|err| panic!("cannot reach the test PostgreSQL server at {server}: {err}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|err| panic!("cannot create a test database on {server}: {err}"));
        let _ = conn.close().await;
        let url = llm_router::store::postgres::with_database(&server, &name).expect("a postgres:// server URL");
        PgDatabase(Arc::new(PgDatabaseInner { server, name, url }))
    }

    /// Its `postgres://` URL, as `--database-url` takes it.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// A connection pool of the test's own, to look at what the routers stored.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(self.url())
            .await
            .unwrap_or_else(|err| panic!("cannot open the test database {}: {err}", self.url()))
    }
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgDatabase").field(&self.0.url).finish()
    }
}

impl Drop for PgDatabaseInner {
    /// Drops the database, so that a run of the suite does not leave hundreds of them on the server. Done on a
    /// thread of its own (a `Drop` cannot wait on the test's runtime); `WITH (FORCE)` ends the connections of
    /// routers that were not stopped. A failure leaves the database behind, which the throw-away server does not
    /// mind.
    fn drop(&mut self) {
        use sqlx::Connection;
        let (server, name) = (self.server.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await.ok()?;
                let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        });
        let _ = dropped.join();
    }
}

/// Which database a [`TestApp`] keeps its data in.
#[derive(Debug, Clone, Default)]
pub enum Database {
    /// The suite's backend: SQLite, or a fresh PostgreSQL database of its own on the PostgreSQL pass.
    #[default]
    Suite,
    /// SQLite in the data directory, on either pass.
    Sqlite,
    /// This PostgreSQL database, on either pass (several routers on one database).
    Postgres(PgDatabase),
}

/// A connection of the test's own to a router's database, SQLite or PostgreSQL, for the tests that look at what
/// was stored. Statements (the tests' own text, never input) are written once for both: `$1`, `$2`… for parameters (SQLite takes them too), and
/// columns whose types both read the same way (text, 64-bit integers, `COUNT(*)`).
pub enum TestDb {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl TestDb {
    /// The row `sql` selects with text parameters `binds`; fails the test when there is none or it cannot be read.
    pub async fn fetch_one<T>(&self, sql: &str, binds: &[&str]) -> T
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        let row = match self {
            TestDb::Sqlite(pool) => {
                let mut query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_one(pool).await
            }
            TestDb::Postgres(pool) => {
                let mut query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_one(pool).await
            }
        };
        row.unwrap_or_else(|err| panic!("{sql} with {binds:?}: {err}"))
    }

    /// Runs a statement with text parameters `binds`; returns the rows it changed.
    pub async fn execute(&self, sql: &str, binds: &[&str]) -> u64 {
        let done = match self {
            TestDb::Sqlite(pool) => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.execute(pool).await.map(|done| done.rows_affected())
            }
            TestDb::Postgres(pool) => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.execute(pool).await.map(|done| done.rows_affected())
            }
        };
        done.unwrap_or_else(|err| panic!("{sql} with {binds:?}: {err}"))
    }
}

/// How often [`within`] looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `check` every [`POLL`] until it holds, failing the test with `what` when it does not within `limit` (a
/// check begun before the limit counts); returns how long it took. For what another router, or a background task,
/// does within a bound the contract sets: never a fixed sleep.
pub async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        let begun = started.elapsed();
        if check().await {
            return begun;
        }
        let left = limit.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "{what}: not within {limit:?}");
        // The last look is at the limit itself.
        tokio::time::sleep(left.min(POLL)).await;
    }
}

/// An HTTP client for the tests, without a proxy. The tests' reqwest has no TLS provider of its own: this installs
/// ring as rustls' default, as the router does at start, for the tests that start no router in this process.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}

/// The router under test.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub state: AppState,
    pub settings: Settings,
    /// The PostgreSQL database the router keeps its data in; `None`: SQLite in the data directory.
    pub postgres: Option<PgDatabase>,
    dir: Arc<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// How to configure a [`TestApp`].
pub struct Options {
    pub reachability_check: bool,
    pub reachability_timeout: Duration,
    pub offline_after: Duration,
    /// Written to the data directory as `nodes.json` before the first start.
    pub legacy_nodes_json: Option<Vec<u8>>,
    /// Anonymous registrations per minute and address; off (0) unless a test is about the limit, since the
    /// tests register many nodes from 127.0.0.1.
    pub registration_rate: u32,
    /// Accept nodes at link-local addresses (`--allow-link-local-nodes`).
    pub allow_link_local_nodes: bool,
    /// `--public-url`; an `https://` one makes the session cookie `Secure`.
    pub public_url: Option<String>,
    /// Cap on open client connections; `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Connections one client address may hold; `None`: half of the cap; 0: no share.
    pub max_connections_per_source: Option<usize>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// SQLite or PostgreSQL: by default the suite's backend ([`on_sqlite`]).
    pub database: Database,
    /// Where the router's manual clock starts, in ms since the epoch.
    pub start_ms: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            reachability_check: false,
            reachability_timeout: Duration::from_millis(500),
            offline_after: Duration::from_secs(30),
            legacy_nodes_json: None,
            registration_rate: 0,
            allow_link_local_nodes: false,
            public_url: None,
            max_connections: None,
            max_connections_per_source: None,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            database: Database::Suite,
            start_ms: START_MS,
        }
    }
}

/// A node registered through the API.
#[derive(Debug, Clone)]
pub struct TestNode {
    pub id: String,
    pub token: String,
}

impl TestApp {
    /// Reachability check off; see [`TestApp::with`].
    pub async fn spawn() -> TestApp {
        TestApp::with(Options::default()).await
    }

    pub async fn with(options: Options) -> TestApp {
        TestApp::with_settings(options, |_| {}).await
    }

    /// Like [`TestApp::with`], then `configure` changes whatever else a test is about.
    pub async fn with_settings(options: Options, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = Settings::new(dir.path().join("data"));
        settings.reachability_check = options.reachability_check;
        settings.reachability_timeout = options.reachability_timeout;
        settings.offline_after = options.offline_after;
        settings.admin_password = Some(ADMIN_PASSWORD.to_owned());
        settings.registration_rate = options.registration_rate;
        settings.allow_link_local_nodes = options.allow_link_local_nodes;
        settings.public_url = options.public_url;
        settings.max_connections = options.max_connections;
        settings.max_connections_per_source = options.max_connections_per_source;
        settings.header_timeout = options.header_timeout;
        settings.idle_timeout = options.idle_timeout;
        settings.body_timeout = options.body_timeout;
        // The background flush must not race the tests' explicit flushes in a way that matters: keep it slow.
        settings.flush_interval = Duration::from_secs(3600);
        if let Some(bytes) = options.legacy_nodes_json {
            std::fs::create_dir_all(&settings.data_dir).expect("data dir");
            std::fs::write(settings.data_dir.join("nodes.json"), bytes).expect("write nodes.json");
        }
        let postgres = match options.database {
            Database::Suite if on_sqlite() => None,
            Database::Suite => Some(PgDatabase::for_suite().await),
            Database::Sqlite => None,
            Database::Postgres(database) => Some(database),
        };
        settings.database_url = postgres.as_ref().map(|database| database.url().to_owned());
        configure(&mut settings);
        TestApp::start(dir, settings, postgres, ManualClock::new(options.start_ms)).await
    }

    async fn start(dir: Arc<TempDir>, settings: Settings, postgres: Option<PgDatabase>, clock: ManualClock) -> TestApp {
        let app = App::build(settings.clone(), Arc::new(clock.clone())).await.expect("build app");
        let state = app.state.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        TestApp { addr, client, clock, state, settings, postgres, dir, stop: Some(stop), server: Some(server) }
    }

    /// Stops the server gracefully (flushing figures) and starts a new one on the same database, with a clock
    /// that starts where the old one stood plus `later_ms`.
    pub async fn restart(mut self, later_ms: i64) -> TestApp {
        self.shutdown().await;
        let clock = ManualClock::new(START_MS);
        clock.advance_ms(self.clock_ms() - START_MS + later_ms);
        TestApp::start(self.dir.clone(), self.settings.clone(), self.postgres.clone(), clock).await
    }

    /// Stops the server gracefully, lets `between` change its data directory (restore a file, say), and starts a new
    /// one on the same settings, with a clock that goes on where the old one stood.
    pub async fn restart_after(mut self, between: impl FnOnce(&std::path::Path)) -> TestApp {
        self.shutdown().await;
        between(&self.data_dir());
        let clock = ManualClock::new(START_MS);
        clock.advance_ms(self.clock_ms() - START_MS);
        TestApp::start(self.dir.clone(), self.settings.clone(), self.postgres.clone(), clock).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }

    pub fn clock_ms(&self) -> i64 {
        use llm_router::clock::Clock;
        self.clock.now_ms()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.settings.data_dir.clone()
    }

    /// A connection of the test's own to the router's SQLite database, for the tests of SQLite itself (see
    /// [`TestApp::sql`] for the others).
    pub async fn db(&self) -> sqlx::SqlitePool {
        assert!(self.postgres.is_none(), "this router keeps its data in PostgreSQL, not in SQLite");
        let url = format!("sqlite://{}", self.data_dir().join("router.db").display());
        sqlx::SqlitePool::connect(&url).await.expect("open the router's database")
    }

    /// The router's SQLite store, for its seams of the tests of SQLite itself (a page limit, a log limit).
    pub fn sqlite_store(&self) -> &llm_router::store::sqlite::SqliteStore {
        self.state.store.as_any().downcast_ref().expect("this router keeps its data in PostgreSQL, not in SQLite")
    }

    /// A connection of the test's own to the router's database, whichever it is, to look at what was stored.
    pub async fn sql(&self) -> TestDb {
        match &self.postgres {
            Some(database) => TestDb::Postgres(database.pool().await),
            None => TestDb::Sqlite(self.db().await),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn login(&self, username: &str, password: &str) -> Response {
        self.request(Method::POST, "/v0/auth/login")
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .expect("login")
    }

    /// A session token of the first administrator.
    pub async fn admin_token(&self) -> String {
        let response = self.login("admin", ADMIN_PASSWORD).await;
        assert_eq!(response.status(), 200);
        body(response).await["token"].as_str().expect("token").to_owned()
    }

    /// Creates a user with the given role and returns a session token for them.
    pub async fn user_token(&self, username: &str, role: &str) -> String {
        let admin = self.admin_token().await;
        let created = self
            .request(Method::POST, "/v0/users")
            .bearer_auth(&admin)
            .json(&json!({"username": username, "password": "user-password-1", "role": role}))
            .send()
            .await
            .expect("create user");
        assert_eq!(created.status(), 201);
        let response = self.login(username, "user-password-1").await;
        assert_eq!(response.status(), 200);
        body(response).await["token"].as_str().expect("token").to_owned()
    }

    pub async fn register(&self, request: &Value) -> Response {
        self.request(Method::POST, "/v0/nodes").json(request).send().await.expect("register")
    }

    /// Registers a valid node named `name` and returns its id and token.
    pub async fn register_node(&self, name: &str) -> TestNode {
        self.register_node_at(name, 8000).await
    }

    /// Registers a valid node named `name` whose runtime listens on 127.0.0.1:`port`.
    pub async fn register_node_at(&self, name: &str, port: u16) -> TestNode {
        let response = self.register(&registration(name, port)).await;
        assert_eq!(response.status(), 201, "registering {name}");
        let answer = body(response).await;
        TestNode {
            id: answer["node_id"].as_str().expect("id").to_owned(),
            token: answer["node_token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn heartbeat(&self, node: &TestNode, ready: &[&str]) -> Response {
        self.heartbeat_body(&node.token, &json!({"node_id": node.id, "cpu_usage": 12.5, "ready_models": ready})).await
    }

    pub async fn heartbeat_body(&self, token: &str, body: &Value) -> Response {
        self.request(Method::POST, "/v0/health")
            .header("X-Node-Token", token)
            .json(body)
            .send()
            .await
            .expect("heartbeat")
    }

    pub async fn approve(&self, token: &str, id: &str) -> Response {
        self.request(Method::POST, &format!("/v0/nodes/{id}/approve")).bearer_auth(token).send().await.expect("approve")
    }

    pub async fn get_node(&self, token: &str, id: &str) -> Response {
        self.request(Method::GET, &format!("/v0/nodes/{id}")).bearer_auth(token).send().await.expect("get node")
    }

    /// The node's current JSON, asserting it exists.
    pub async fn node(&self, id: &str) -> Value {
        let admin = self.admin_token().await;
        let response = self.get_node(&admin, id).await;
        assert_eq!(response.status(), 200);
        body(response).await
    }

    pub async fn status_of(&self, id: &str) -> String {
        self.node(id).await["status"].as_str().expect("status").to_owned()
    }

    pub async fn events(&self, id: &str) -> Vec<Value> {
        let admin = self.admin_token().await;
        let response = self
            .request(Method::GET, &format!("/v0/nodes/{id}/events"))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("events");
        assert_eq!(response.status(), 200);
        body(response).await.as_array().expect("array").clone()
    }

    pub async fn nodes(&self) -> Vec<Value> {
        let admin = self.admin_token().await;
        let response = self.request(Method::GET, "/v0/nodes").bearer_auth(&admin).send().await.expect("list");
        assert_eq!(response.status(), 200);
        body(response).await.as_array().expect("array").clone()
    }

    /// `GET /metrics`, parsed; fails the test unless it answers 200 with OpenMetrics text that parses.
    pub async fn scrape(&self) -> Exposition {
        let response = self.request(Method::GET, "/metrics").send().await.expect("scrape");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("text");
        exposition::parse(&text).unwrap_or_else(|error| panic!("{error} in:\n{text}"))
    }

    /// The value of an unlabelled metric in `GET /metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let scraped = self.scrape().await;
        scraped.value(name, &[]).unwrap_or_else(|| panic!("no {name} in {:#?}", scraped.samples))
    }

    /// Moves the router's clock by `ms` and runs the offline sweep as the background task would: at least every
    /// half of `offline_after`, so the sweep never takes the advance for a stall of the router. Returns how many
    /// nodes went offline.
    pub async fn advance_and_sweep(&self, ms: i64) -> usize {
        let step = (self.settings.offline_after.as_millis() as i64 / 2).max(1);
        let mut left = ms;
        let mut offline = 0;
        loop {
            let now = left.min(step);
            self.clock.advance_ms(now);
            left -= now;
            offline += self.state.registry.sweep().await.expect("sweep");
            if left == 0 {
                return offline;
            }
        }
    }

    /// Moves the router's clock by `ms` with no sweep in between, as when the router's process was paused, then
    /// runs the sweep once. Returns how many nodes went offline.
    pub async fn pause_and_sweep(&self, ms: i64) -> usize {
        self.clock.advance_ms(ms);
        self.state.registry.sweep().await.expect("sweep")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The legacy `nodes.json` fixture.
pub fn legacy_fixture() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy-nodes.json")).expect("fixture")
}

/// A valid registration body.
pub fn registration(name: &str, port: u16) -> Value {
    json!({
        "machine_name": name,
        "ip_address": "127.0.0.1",
        "runtime_port": port,
        "runtime_version": "llama.cpp b4500",
        "gpu_devices": [{"model": "NVIDIA L4", "count": 2, "memory_bytes": 24_000_000_000u64}],
        "supported_runtimes": ["llama_cpp"],
        "tags": ["rack-a"]
    })
}

/// A node's JSON (or an array of them) without what lives only in a router's memory: its `revision`, which a
/// restart gives anew. What is left is what the database keeps.
pub fn stored<T: Into<Value>>(node: T) -> Value {
    match node.into() {
        Value::Array(nodes) => Value::Array(nodes.into_iter().map(stored).collect()),
        Value::Object(mut fields) => {
            fields.remove("revision");
            Value::Object(fields)
        }
        other => other,
    }
}

pub async fn body(response: Response) -> Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// Asserts a SPEC §2 error answer and returns its message.
pub async fn assert_error(response: Response, status: u16, code: &str) -> String {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let value = body(response).await;
    assert_eq!(value["error"]["code"], code, "{value}");
    let message = value["error"]["message"].as_str().expect("message").to_owned();
    assert!(!message.is_empty());
    message
}

/// A stand-in OpenAI-compatible runtime whose `/v1/models` answer the test controls: a model list, a huge body, a
/// lying `Content-Length`, or a redirect.
pub struct StandInRuntime {
    pub addr: SocketAddr,
    state: Arc<Mutex<RuntimeAnswer>>,
    _server: JoinHandle<()>,
}

#[derive(Clone)]
struct RuntimeAnswer {
    status: StatusCode,
    models: Vec<String>,
    delay: Duration,
    body: AnswerBody,
}

#[derive(Clone)]
enum AnswerBody {
    /// `{"object": "list", "data": [{"id": …}, …]}` of `models`.
    Models,
    /// A valid model list padded to this many bytes, streamed in chunks without a `Content-Length`.
    Streamed(usize),
    /// A `Content-Length` of this many bytes, then a few bytes and silence.
    Declared(u64),
    /// `302 Found` to this location.
    Redirect(String),
}

impl StandInRuntime {
    pub async fn start(models: &[&str]) -> StandInRuntime {
        let state = Arc::new(Mutex::new(RuntimeAnswer {
            status: StatusCode::OK,
            models: models.iter().map(|m| m.to_string()).collect(),
            delay: Duration::ZERO,
            body: AnswerBody::Models,
        }));
        let app = axum::Router::new().route("/v1/models", get(models_handler)).with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind runtime");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandInRuntime { addr, state, _server: server }
    }

    pub fn answer_with(&self, status: StatusCode) {
        self.state.lock().expect("lock").status = status;
    }

    pub fn delay(&self, delay: Duration) {
        self.state.lock().expect("lock").delay = delay;
    }

    /// Lists these models from now on.
    pub fn list(&self, models: Vec<String>) {
        let mut state = self.state.lock().expect("lock");
        state.models = models;
        state.body = AnswerBody::Models;
    }

    /// Streams a model list of `bytes` bytes (padded with whitespace), without announcing its length.
    pub fn stream(&self, bytes: usize) {
        self.state.lock().expect("lock").body = AnswerBody::Streamed(bytes);
    }

    /// Announces a `Content-Length` of `bytes`, sends a few, and then nothing.
    pub fn declare_length(&self, bytes: u64) {
        self.state.lock().expect("lock").body = AnswerBody::Declared(bytes);
    }

    /// Answers `302 Found` to `location`.
    pub fn redirect_to(&self, location: String) {
        self.state.lock().expect("lock").body = AnswerBody::Redirect(location);
    }
}

async fn models_handler(State(state): State<Arc<Mutex<RuntimeAnswer>>>) -> axum::http::Response<Body> {
    let answer = state.lock().expect("lock").clone();
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let data: Vec<Value> = answer.models.iter().map(|id| json!({"id": id, "object": "model"})).collect();
    let list = serde_json::to_vec(&json!({"object": "list", "data": data})).expect("json");
    let response =
        axum::http::Response::builder().status(answer.status).header(header::CONTENT_TYPE, "application/json");
    match answer.body {
        AnswerBody::Models => response.body(Body::from(list)),
        AnswerBody::Streamed(total) => {
            const CHUNK: usize = 64 * 1024;
            let padding = total.saturating_sub(list.len());
            let chunks = std::iter::once(Bytes::from(list))
                .chain(
                    (0..padding.div_ceil(CHUNK)).map(move |i| Bytes::from(vec![b' '; CHUNK.min(padding - i * CHUNK)])),
                )
                .map(Ok::<_, std::io::Error>);
            response.body(Body::from_stream(futures_util::stream::iter(chunks)))
        }
        AnswerBody::Declared(length) => {
            let start = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"data\": ["))]);
            response
                .header(header::CONTENT_LENGTH, length)
                .body(Body::from_stream(start.chain(futures_util::stream::pending())))
        }
        AnswerBody::Redirect(location) => {
            response.status(StatusCode::FOUND).header(header::LOCATION, location).body(Body::empty())
        }
    }
    .expect("response")
}

/// A local port nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}
