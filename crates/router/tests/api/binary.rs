//! The real `llm-router` binary: configuration errors, the first administrator, and durability under SIGKILL; on
//! the suite's backend (on its PostgreSQL pass, each test's routers share a database of the test's own).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llm_router::app::LISTENING_ON;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::helpers::{PgDatabase, on_sqlite, registration};

const BIN: &str = env!("CARGO_BIN_EXE_llm-router");

struct Router {
    child: Child,
    base: String,
    /// Lines printed before the listening line.
    banner: Vec<String>,
    _stdout: Lines<BufReader<ChildStdout>>,
}

/// Where a test's routers keep their data: SQLite in their data directory or, on the PostgreSQL pass of the suite, a
/// database of the test's own (`--database-url`), which the routers it starts one after the other share.
struct Store(Option<PgDatabase>);

impl Store {
    async fn new() -> Store {
        Store(if on_sqlite() { None } else { Some(PgDatabase::for_suite().await) })
    }
}

fn command(store: &Store, data_dir: &Path, password: Option<&str>) -> Command {
    command_on(store, data_dir, password, "127.0.0.1:0")
}

fn command_on(store: &Store, data_dir: &Path, password: Option<&str>, listen: &str) -> Command {
    let mut command = Command::new(BIN);
    command.args(["serve", "--listen", listen, "--no-reachability-check", "--data-dir"]).arg(data_dir);
    if let Some(database) = &store.0 {
        command.args(["--database-url", database.url()]);
    }
    command
        .env_remove("LLM_ROUTER_DATABASE_URL")
        .env_remove("LLM_ROUTER_ADMIN_PASSWORD")
        .env_remove("LLM_ROUTER_LISTEN")
        .env("LLM_ROUTER_LOG", "warn")
        // These tests register hundreds of nodes from one address: the anonymous registration limits are off.
        .env("LLM_ROUTER_REGISTRATION_RATE", "0")
        .env("LLM_ROUTER_MAX_PENDING", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("LLM_ROUTER_ADMIN_PASSWORD", password);
    }
    command
}

async fn start(store: &Store, data_dir: &Path, password: Option<&str>) -> Router {
    let mut child = command(store, data_dir, password).spawn().expect("spawn llm-router");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = Vec::new();
    let base = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix(LISTENING_ON) {
                return url.to_owned();
            }
            banner.push(line);
        }
        panic!("llm-router exited before listening");
    })
    .await
    .expect("router started in time");
    Router { child, base, banner, _stdout: stdout }
}

async fn login(client: &reqwest::Client, base: &str, password: &str) -> reqwest::Response {
    client
        .post(format!("{base}/v0/auth/login"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .await
        .expect("login")
}

/// Runs the binary to completion and returns (exit code, stderr).
async fn run_to_exit(mut command: Command) -> (i32, String) {
    let output = tokio::time::timeout(Duration::from_secs(20), command.output()).await.expect("exits").expect("run");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn bad_configuration_ends_the_start_with_one_line_and_writes_nothing() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");

    let (code, stderr) = run_to_exit(command_on(&store, &data, Some("first-admin-pw"), "nowhere")).await;
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");

    let mut bad_number = command(&store, &data, Some("first-admin-pw"));
    bad_number.env("LLM_ROUTER_OFFLINE_AFTER_SECS", "soon");
    let (code, stderr) = run_to_exit(bad_number).await;
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let in_use = taken.local_addr().expect("addr").to_string();
    let (code, stderr) = run_to_exit(command_on(&store, &data, Some("first-admin-pw"), &in_use)).await;
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!data.exists(), "nothing was written");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let (code, stderr) = run_to_exit(command(&store, &file.join("data"), Some("first-admin-pw"))).await;
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("data directory"), "{stderr}");
}

#[tokio::test]
async fn a_short_first_admin_password_stops_the_start_before_anything_is_written() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let (code, stderr) = run_to_exit(command(&store, &data, Some("12345678"))).await;
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("LLM_ROUTER_ADMIN_PASSWORD") && stderr.contains("at least 12"), "{stderr}");
    assert!(!data.exists(), "nothing was written");
}

#[tokio::test]
async fn the_first_start_prints_a_generated_admin_password_once() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let client = crate::helpers::http_client().build().expect("client");
    let mut router = start(&store, dir.path(), None).await;
    let line = router.banner.iter().find(|l| l.contains("with password: ")).expect("password printed").clone();
    let password = line.rsplit("with password: ").next().expect("password").trim().to_owned();
    assert!(password.len() >= 24, "{password}");
    assert_eq!(login(&client, &router.base, &password).await.status(), 200);
    router.child.kill().await.expect("kill");

    let mut again = start(&store, dir.path(), None).await;
    assert!(again.banner.iter().all(|l| !l.contains("password")), "{:?}", again.banner);
    assert_eq!(login(&client, &again.base, &password).await.status(), 200);
    again.child.kill().await.expect("kill");
}

#[tokio::test]
async fn registrations_survive_sigkill_mid_burst() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let client = crate::helpers::http_client().build().expect("client");
    let mut router = start(&store, dir.path(), Some("first-admin-pw")).await;

    async fn register(client: reqwest::Client, base: String, name: String) -> Option<(String, String)> {
        let response = client.post(format!("{base}/v0/nodes")).json(&registration(&name, 8000)).send().await.ok()?;
        if response.status() != 201 {
            return None;
        }
        let answer: Value = response.json().await.ok()?;
        Some((answer["node_id"].as_str()?.to_owned(), answer["node_token"].as_str()?.to_owned()))
    }

    // 300 concurrent registrations, every one acknowledged.
    let first: Vec<_> =
        (0..300).map(|i| tokio::spawn(register(client.clone(), router.base.clone(), format!("burst-a-{i}")))).collect();
    let mut acknowledged = Vec::new();
    for task in first {
        acknowledged.push(task.await.expect("task").expect("acknowledged"));
    }

    // A second burst, killed while in flight.
    let acks = Arc::new(AtomicUsize::new(0));
    let second: Vec<_> = (0..300)
        .map(|i| {
            let (client, base, acks) = (client.clone(), router.base.clone(), acks.clone());
            tokio::spawn(async move {
                let result = register(client, base, format!("burst-b-{i}")).await;
                if result.is_some() {
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                result
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(30), async {
        while acks.load(Ordering::SeqCst) < 20 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("some of the second burst answered");
    router.child.start_kill().expect("SIGKILL");
    router.child.wait().await.expect("wait");
    for task in second {
        if let Some(node) = task.await.expect("task") {
            acknowledged.push(node);
        }
    }
    assert!(acknowledged.len() >= 320);

    let router = start(&store, dir.path(), Some("first-admin-pw")).await;
    let token: Value = login(&client, &router.base, "first-admin-pw").await.json().await.expect("json");
    let token = token["token"].as_str().expect("token");
    let nodes: Vec<Value> = client
        .get(format!("{}/v0/nodes", router.base))
        .bearer_auth(token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(nodes.len() >= acknowledged.len(), "{} stored < {} acknowledged", nodes.len(), acknowledged.len());
    for (id, node_token) in &acknowledged {
        let response = client
            .post(format!("{}/v0/health", router.base))
            .header("X-Node-Token", node_token)
            .json(&json!({"node_id": id}))
            .send()
            .await
            .expect("heartbeat");
        assert_eq!(response.status(), 200, "acknowledged node {id} lost its token");
    }
}

#[tokio::test]
async fn the_start_up_log_names_legacy_entries_left_out() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("nodes.json"), crate::helpers::legacy_fixture()).expect("write");
    let mut child = command(&store, dir.path(), Some("first-admin-pw")).spawn().expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), stdout.next_line()).await.expect("started");
    assert!(ready.expect("read").is_some_and(|l| l.starts_with(LISTENING_ON)));
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.expect("read") {
            if line.contains("not imported") {
                return line;
            }
        }
        panic!("no line about the skipped entry");
    })
    .await
    .expect("logged in time");
    assert!(line.contains("cpu-only-box") && line.contains("no GPU"), "{line}");
    child.kill().await.expect("kill");
    assert!(dir.path().join("nodes.json.migrated").exists());
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_writes_the_last_figures() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let client = crate::helpers::http_client().build().expect("client");
    let mut router = start(&store, dir.path(), Some("first-admin-pw")).await;
    let answer: Value = client
        .post(format!("{}/v0/nodes", router.base))
        .json(&registration("gpu-term", 8000))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let (id, token) = (answer["node_id"].as_str().expect("id"), answer["node_token"].as_str().expect("token"));
    let heartbeat = client
        .post(format!("{}/v0/health", router.base))
        .header("X-Node-Token", token)
        .json(&json!({"node_id": id, "cpu_usage": 33.0}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(heartbeat.status(), 200);

    let pid = router.child.id().expect("pid").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(killed.success());
    let status =
        tokio::time::timeout(Duration::from_secs(10), router.child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status:?}");

    let router = start(&store, dir.path(), Some("first-admin-pw")).await;
    let token: Value = login(&client, &router.base, "first-admin-pw").await.json().await.expect("json");
    let node: Value = client
        .get(format!("{}/v0/nodes/{id}", router.base))
        .bearer_auth(token["token"].as_str().expect("token"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(node["metrics"]["cpu_usage"], 33.0, "figures written at shutdown: {node}");
}

#[tokio::test]
async fn plain_http_on_a_non_loopback_listener_is_warned_about_and_loopback_is_not() {
    let store = Store::new().await;
    for (listen, warned) in [("0.0.0.0:0", true), ("127.0.0.1:0", false)] {
        let dir = tempfile::tempdir().expect("dir");
        let mut child = command_on(&store, dir.path(), Some("first-admin-pw"), listen).spawn().expect("spawn");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), stdout.next_line()).await.expect("started");
        assert!(ready.expect("read").is_some_and(|l| l.starts_with(&format!("{LISTENING_ON}http://"))));
        // The warning, if any, is written before the listening line; stop the router and read all it logged.
        child.start_kill().expect("kill");
        let output = child.wait_with_output().await.expect("output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.contains("plain HTTP on a non-loopback address"), warned, "{listen}: {stderr}");
    }
}

/// A runtime that answers every chat completion at once, with usage.
async fn answering_runtime() -> u16 {
    let app = axum::Router::new()
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "m"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(|| async {
                axum::Json(json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// SPEC §14: usage records are written at most a second behind, so a router killed outright loses at most the
/// requests that ended in its last second, and nothing else.
#[tokio::test]
async fn a_sigkill_loses_at_most_the_last_second_of_usage_records() {
    let store = Store::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let client = crate::helpers::http_client().build().expect("client");
    let mut router = start(&store, dir.path(), Some("first-admin-pw")).await;
    let base = router.base.clone();
    let admin: Value = login(&client, &base, "first-admin-pw").await.json().await.expect("json");
    let admin = admin["token"].as_str().expect("token").to_owned();
    let port = answering_runtime().await;
    let created: Value = client
        .post(format!("{base}/v0/nodes"))
        .json(&registration("gpu-k", port))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let (id, token) = (created["node_id"].as_str().expect("id"), created["node_token"].as_str().expect("token"));
    let approved =
        client.post(format!("{base}/v0/nodes/{id}/approve")).bearer_auth(&admin).send().await.expect("approve");
    assert_eq!(approved.status(), 200);
    let beat = client
        .post(format!("{base}/v0/health"))
        .header("X-Node-Token", token)
        .json(&json!({"node_id": id, "ready_models": ["m"]}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(beat.status(), 200);

    // Requests one after another for two seconds, each noted with when its answer ended; then SIGKILL at once.
    let mut ended = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let answer = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&admin)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "q"}]}))
            .send()
            .await
            .expect("chat");
        assert_eq!(answer.status(), 200);
        answer.bytes().await.expect("answer");
        ended.push(wall_ms());
    }
    let killed_at = wall_ms();
    router.child.start_kill().expect("SIGKILL");
    router.child.wait().await.expect("wait");

    let router = start(&store, dir.path(), Some("first-admin-pw")).await;
    let admin: Value = login(&client, &router.base, "first-admin-pw").await.json().await.expect("json");
    let admin = admin["token"].as_str().expect("token");
    let mut kept = 0;
    let mut next = format!("{}/v0/usage/requests?limit=1000", router.base);
    loop {
        let page = client.get(&next).bearer_auth(admin).send().await.expect("records");
        let link = page.headers().get("link").and_then(|l| l.to_str().ok()).map(str::to_owned);
        let rows: Vec<Value> = page.json().await.expect("json");
        kept += rows.iter().filter(|r| r["status"] == 200 && r["prompt_tokens"] == 7).count();
        match link {
            Some(link) => {
                next = format!("{}{}", router.base, link.trim_start_matches('<').split('>').next().unwrap_or_default())
            }
            None => break,
        }
    }
    let older = ended.iter().filter(|at| **at < killed_at - 1000).count();
    assert!(older > 10, "{older} requests ended more than a second before the kill");
    assert!(kept >= older, "{kept} records kept < {older} requests that ended more than a second before the kill");
    assert!(kept <= ended.len(), "{kept} records for {} requests", ended.len());
    // Nothing else is lost: the node and its token.
    let beat = client
        .post(format!("{}/v0/health", router.base))
        .header("X-Node-Token", token)
        .json(&json!({"node_id": id}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(beat.status(), 200);
}
