//! The router when its database fails under it (SPEC §9, §11): a SQLite file deleted or replaced while it runs, and
//! a PostgreSQL server stopped and started again under load. Nothing is acknowledged that is not kept, what needs
//! the database fails at once with one code, routing goes on from memory, and `/healthz` and `/metrics` say which
//! state the database is in.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

async fn create_key(app: &TestApp, admin: &str, name: &str) -> reqwest::Response {
    app.request(Method::POST, "/v0/api-keys")
        .bearer_auth(admin)
        .json(&json!({"name": name, "scope": "inference"}))
        .send()
        .await
        .expect("create key")
}

async fn healthz(app: &TestApp, query: &str) -> (u16, Value) {
    let answer = app.request(Method::GET, &format!("/healthz{query}")).send().await.expect("healthz");
    let status = answer.status().as_u16();
    (status, body(answer).await)
}

#[tokio::test]
async fn a_deleted_database_file_refuses_every_write_and_its_copy_keeps_what_was_acknowledged() {
    let app = TestApp::with(Options { database: Database::Sqlite, ..Options::default() }).await;
    let admin = app.admin_token().await;
    let kept = app.register_node("gpu-kept").await;
    assert_eq!(create_key(&app, &admin, "kept").await.status(), 201);
    let dir = app.data_dir();
    for file in ["router.db", "router.db-wal", "router.db-shm"] {
        std::fs::remove_file(dir.join(file)).expect("remove the database's files");
    }
    // Within a second, without any write, the router knows.
    let noticed = within(Duration::from_secs(1), "the router notices the lost file", || async {
        healthz(&app, "").await.1["database"] == "lost"
    })
    .await;
    assert!(noticed < Duration::from_secs(1));
    let (status, health) = healthz(&app, "").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        health,
        json!({"status": "degraded", "database": "lost", "routes_inference": true, "accepts_changes": false})
    );
    assert_eq!(healthz(&app, "?require=changes").await.0, 503);
    let scraped = app.scrape().await;
    assert_eq!(scraped.value("llm_router_database", &[("state", "lost")]), Some(1.0));
    assert_eq!(scraped.value("llm_router_database", &[("state", "available")]), Some(0.0));
    // Every write is refused, none acknowledged.
    let message =
        assert_error(app.register(&registration("gpu-refused", 8000)).await, 503, "storage_unavailable").await;
    assert!(message.contains("deleted or replaced"), "{message}");
    assert_error(create_key(&app, &admin, "refused").await, 503, "storage_unavailable").await;
    assert_error(app.login("admin", ADMIN_PASSWORD).await, 503, "storage_unavailable").await;
    // Reads and heartbeats go on from memory and the open file.
    assert_eq!(app.heartbeat(&kept, &[]).await.status(), 200);
    let listed = app.request(Method::GET, "/v0/nodes").bearer_auth(&admin).send().await.expect("list");
    assert_eq!(body(listed).await.as_array().map(Vec::len), Some(1));

    // The router wrote what it holds beside the lost file: moved into place, it starts with everything that was
    // acknowledged, and nothing that was refused.
    let recovered = dir.join("router.db.recovered");
    within(Duration::from_secs(5), "the router copies its database out", || async { recovered.exists() }).await;
    let app = app
        .restart_after(|dir| std::fs::rename(dir.join("router.db.recovered"), dir.join("router.db")).expect("restore"))
        .await;
    let names: Vec<Value> = app.nodes().await.iter().map(|node| node["machine_name"].clone()).collect();
    assert_eq!(names, [json!("gpu-kept")]);
    let admin = app.admin_token().await;
    let keys = app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("keys");
    let keys: Vec<Value> = body(keys).await.as_array().expect("keys").iter().map(|key| key["name"].clone()).collect();
    assert_eq!(keys, [json!("kept")]);
    assert_eq!(healthz(&app, "").await.1["database"], "available");
}

#[tokio::test]
async fn a_database_file_replaced_under_the_router_is_lost_too() {
    let app = TestApp::with(Options { database: Database::Sqlite, ..Options::default() }).await;
    let dir = app.data_dir();
    let faults = app.state.store.storage_faults();
    let started = Instant::now();
    std::fs::copy(dir.join("router.db"), dir.join("other.db")).expect("copy");
    std::fs::rename(dir.join("other.db"), dir.join("router.db")).expect("replace");
    assert_error(app.register(&registration("gpu-refused", 8000)).await, 503, "storage_unavailable").await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(healthz(&app, "").await.1["database"], "lost");
    assert!(app.state.store.storage_faults() > faults, "the refused write is counted");
}

/// A PostgreSQL server of the test's own (`scripts/postgres.sh`), which it can stop and start again; removed when
/// dropped.
struct OwnServer {
    dir: tempfile::TempDir,
    url: String,
}

impl OwnServer {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh")
    }

    fn run(command: &str, dir: &std::path::Path) -> String {
        let output = std::process::Command::new("bash")
            .arg(Self::script())
            .arg(command)
            .arg(dir.join("cluster"))
            // Durable commits: the test stops the server as a crash would, and asynchronous commits would then lose
            // what the routers were told was committed.
            .env_remove("POSTGRES_NO_FSYNC")
            .output()
            .expect("run scripts/postgres.sh");
        assert!(output.status.success(), "postgres.sh {command}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("UTF-8").trim().to_owned()
    }

    fn start() -> OwnServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // Readable by the server's own user when the tests run as root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let url = Self::run("start", dir.path());
        OwnServer { dir, url }
    }

    /// Stops the server at once, as a crash would.
    fn stop(&self) {
        Self::run("stop", self.dir.path());
    }

    fn resume(&self) {
        Self::run("resume", self.dir.path());
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .arg(self.dir.path().join("cluster"))
            .output();
    }
}

/// Chat completions for `m` through `app` with `key`, one after another until `stop`: each answer's status and
/// latency.
fn keep_chatting(
    app: &TestApp,
    key: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<(u16, Duration)>> {
    let request =
        app.request(Method::POST, "/v1/chat/completions").bearer_auth(key).json(&json!({"model": "m", "messages": []}));
    tokio::spawn(async move {
        let mut answers = Vec::new();
        while !*stop.borrow() {
            let started = Instant::now();
            let status = request.try_clone().expect("clone").send().await.map_or(0, |answer| answer.status().as_u16());
            answers.push((status, started.elapsed()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    })
}

#[tokio::test]
async fn a_postgres_outage_keeps_routing_from_memory_and_refuses_the_rest_at_once() {
    // A server of its own, which it stops, rather than the suite's; PostgreSQL is there where the suite's server is.
    if postgres_server().is_none() {
        return;
    }
    let server = OwnServer::start();
    let database = PgDatabase::create_on(&server.url).await;
    let options = || Options { database: Database::Postgres(database.clone()), ..Options::default() };
    let (a, b) = (TestApp::with(options()).await, TestApp::with(options()).await);
    let runtime = crate::inference::Runtime::start("a", &["m"]).await;
    let node_id = crate::inference::online_node(&a, "gpu-a", &runtime, &["m"]).await;
    // Its ready models reach the other router with the figures the first one writes behind.
    a.state.registry.flush().await.expect("flush");
    let node = a.register_node("gpu-spare").await;
    let admin = a.admin_token().await;
    let key = |name: &'static str| {
        let (a, admin) = (&a, admin.clone());
        async move { body(create_key(a, &admin, name).await).await["key"].as_str().expect("key").to_owned() }
    };
    let (used, unused, revoked) = (key("used").await, key("unused").await, key("revoked").await);
    // Both routers have accepted `used` and `revoked`; `revoked` is then revoked, and both hear of it.
    for app in [&a, &b] {
        within(Duration::from_secs(2), "the node is online on both routers", || async {
            let models = app.request(Method::GET, "/v1/models").bearer_auth(&used).send().await.expect("models");
            body(models).await["data"].as_array().is_some_and(|data| !data.is_empty())
        })
        .await;
        let answer = crate::inference::chat(app, Some(&used), &json!({"model": "m", "messages": []})).await;
        assert_eq!(answer.status(), 200);
        let answer = crate::inference::chat(app, Some(&revoked), &json!({"model": "m", "messages": []})).await;
        assert_eq!(answer.status(), 200);
    }
    let keys = a.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("keys");
    let revoked_id =
        body(keys).await.as_array().expect("keys").iter().find(|k| k["name"] == "revoked").expect("key")["id"]
            .as_str()
            .expect("id")
            .to_owned();
    let deleted = a.request(Method::DELETE, &format!("/v0/api-keys/{revoked_id}")).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    within(Duration::from_secs(2), "both routers refuse the revoked key", || async {
        let mut refused = true;
        for app in [&a, &b] {
            let answer = crate::inference::chat(app, Some(&revoked), &json!({"model": "m", "messages": []})).await;
            refused &= answer.status() == 401;
        }
        refused
    })
    .await;

    // Clients keep sending through both routers while the database stops for a few seconds.
    let (stop_load, load) = tokio::sync::watch::channel(false);
    let chats = [keep_chatting(&a, used.clone(), load.clone()), keep_chatting(&b, used.clone(), load)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    for app in [&a, &b] {
        within(Duration::from_secs(5), "the router finds its database unreachable", || async {
            healthz(app, "").await.1["database"] == "unreachable"
        })
        .await;
    }
    let (status, health) = healthz(&b, "?require=changes").await;
    assert_eq!(status, 503);
    assert_eq!(
        health,
        json!({"status": "degraded", "database": "unreachable", "routes_inference": true, "accepts_changes": false})
    );
    assert_eq!(b.scrape().await.value("llm_router_database", &[("state", "unreachable")]), Some(1.0));
    for app in [&a, &b] {
        // What needs the database fails at once, with one code.
        let started = Instant::now();
        let message = assert_error(create_key(app, &admin, "during").await, 503, "storage_unavailable").await;
        assert!(message.contains("cannot reach its database"), "{message}");
        assert_error(app.login("admin", ADMIN_PASSWORD).await, 503, "storage_unavailable").await;
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
        // A key never seen by this router cannot be checked, and one revoked before the outage is forgotten:
        // neither is served.
        for key in [&unused, &revoked] {
            let answer = crate::inference::chat(app, Some(key), &json!({"model": "m", "messages": []})).await;
            crate::inference::openai_error(answer, 503, "storage_unavailable").await;
        }
        // Heartbeats go on.
        assert_eq!(app.heartbeat(&node, &[]).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume();
    for app in [&a, &b] {
        within(Duration::from_secs(5), "the router finds its database again", || async {
            healthz(app, "").await.1["database"] == "available"
        })
        .await;
    }
    let _ = stop_load.send(true);
    for chats in chats {
        let answers = chats.await.expect("load");
        assert!(answers.len() > 20, "{} requests", answers.len());
        let failed: Vec<_> = answers.iter().filter(|(status, _)| *status != 200).collect();
        assert!(failed.is_empty(), "requests failed during the outage: {failed:?}");
    }
    // Nothing acknowledged was lost, and changes are taken again on both routers.
    for app in [&a, &b] {
        assert_eq!(create_key(app, &admin, "after").await.status(), 201);
        assert_eq!(app.node(&node_id).await["status"], "online");
    }
    let keys = a.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("keys");
    let mut names: Vec<String> = body(keys)
        .await
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["name"].as_str().unwrap_or("").to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["after", "after", "unused", "used"]);
}
