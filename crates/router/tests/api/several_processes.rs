//! Two real `llm-router` processes on one PostgreSQL database (SPEC §11), driven over HTTP with real time: a node
//! registered on A is approved and heartbeats on B; a deletion on A is refused on B within a second; when the
//! router holding the sweep lease is killed with SIGKILL, offline decisions resume on the other within
//! `offline_after / 2`; the killed router, started again, rejoins without a manual step.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use llm_router::app::LISTENING_ON;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::helpers::{fresh_postgres_database, registration};

const BIN: &str = env!("CARGO_BIN_EXE_llm-router");
const PASSWORD: &str = "admin-password-1";
/// `--offline-after-secs` of both routers: short, so the test takes seconds.
const OFFLINE_AFTER: Duration = Duration::from_secs(4);

struct Router {
    child: Child,
    base: String,
    _stdout: Lines<BufReader<ChildStdout>>,
}

async fn start(data_dir: &Path, database_url: &str) -> Router {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-reachability-check", "--data-dir"])
        .arg(data_dir)
        .args(["--database-url", database_url, "--offline-after-secs", &OFFLINE_AFTER.as_secs().to_string()])
        .env("LLM_ROUTER_ADMIN_PASSWORD", PASSWORD)
        .env("LLM_ROUTER_LOG", "warn")
        .env_remove("LLM_ROUTER_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn llm-router");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix(LISTENING_ON) {
                return url.trim().to_owned();
            }
        }
        panic!("llm-router exited before listening");
    })
    .await
    .expect("router started in time");
    Router { child, base, _stdout: stdout }
}

struct Client {
    http: reqwest::Client,
}

impl Client {
    async fn session(&self, router: &Router) -> String {
        let answer = self
            .http
            .post(format!("{}/v0/auth/login", router.base))
            .json(&json!({"username": "admin", "password": PASSWORD}))
            .send()
            .await
            .expect("login");
        assert_eq!(answer.status(), 200);
        answer.json::<Value>().await.expect("json")["token"].as_str().expect("token").to_owned()
    }

    /// Registers a node named `name` on `router`; returns its id and token.
    async fn register(&self, router: &Router, name: &str) -> (String, String) {
        let answer = self.http.post(format!("{}/v0/nodes", router.base)).json(&registration(name, 8000)).send();
        let answer: Value = answer.await.expect("register").json().await.expect("json");
        let field = |name: &str| answer[name].as_str().expect("registration field").to_owned();
        (field("node_id"), field("node_token"))
    }

    async fn node(&self, router: &Router, session: &str, id: &str) -> Option<Value> {
        let answer = self.http.get(format!("{}/v0/nodes/{id}", router.base)).bearer_auth(session).send().await.ok()?;
        if answer.status() != 200 {
            return None;
        }
        answer.json().await.ok()
    }

    async fn heartbeat(&self, router: &Router, id: &str, token: &str) -> u16 {
        let body = json!({"node_id": id, "ready_models": ["m"]});
        let answer = self.http.post(format!("{}/v0/health", router.base)).header("X-Node-Token", token).json(&body);
        answer.send().await.expect("heartbeat").status().as_u16()
    }

    /// Whether the router's `/metrics` says it holds the sweep lease.
    async fn holds_lease(&self, router: &Router) -> bool {
        let Ok(answer) = self.http.get(format!("{}/metrics", router.base)).send().await else { return false };
        answer.text().await.is_ok_and(|text| text.lines().any(|line| line == "llm_router_sweep_lease 1"))
    }
}

/// Polls `check` every 50 ms until it holds or `deadline` passes; returns when it held, if it did.
async fn poll_until<F, Fut>(deadline: Instant, mut check: F) -> Option<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_router_processes_share_the_fleet_and_survive_the_loss_of_the_lease_holder() {
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("dir");
    let a = start(&dir.path().join("a"), &url).await;
    let b = start(&dir.path().join("b"), &url).await;
    // The HTTP client's TLS provider, as the router installs its own (plain HTTP here, but the client wants one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client { http: reqwest::Client::builder().no_proxy().build().expect("client") };
    let (session_a, session_b) = (client.session(&a).await, client.session(&b).await);

    // Register on A, approve on B, heartbeat to B: A's view follows within a second.
    let (id, token) = client.register(&a, "gpu-e2e").await;
    let (id, token) = (id.as_str(), token.as_str());
    let known = poll_until(Instant::now() + Duration::from_secs(1), || async {
        client.node(&b, &session_b, id).await.is_some()
    });
    assert!(known.await.is_some(), "B knows the node registered on A within 1 s");
    let approved = client.http.post(format!("{}/v0/nodes/{id}/approve", b.base)).bearer_auth(&session_b).send();
    assert_eq!(approved.await.expect("approve").status(), 200);
    let online = poll_until(Instant::now() + Duration::from_secs(1), || async {
        client.heartbeat(&b, id, token).await == 200
            && client.node(&a, &session_a, id).await.is_some_and(|n| n["status"] == "online")
    });
    assert!(online.await.is_some(), "A shows the node online within 1 s of B's heartbeat");

    // A node deleted on A: its token is refused on B within a second.
    let (other_id, other_token) = client.register(&a, "gpu-doomed").await;
    let (other_id, other_token) = (other_id.as_str(), other_token.as_str());
    assert_eq!(client.heartbeat(&b, other_id, other_token).await, 200);
    let deleted = client.http.delete(format!("{}/v0/nodes/{other_id}", a.base)).bearer_auth(&session_a).send();
    assert_eq!(deleted.await.expect("delete").status(), 204);
    let refused = poll_until(Instant::now() + Duration::from_secs(1), || async {
        client.heartbeat(&b, other_id, other_token).await == 401
    });
    assert!(refused.await.is_some(), "B refuses the deleted node's token within 1 s");

    // Exactly one router holds the sweep lease (each sweeps every offline_after / 10).
    let settled = poll_until(Instant::now() + Duration::from_secs(2), || async {
        client.holds_lease(&a).await != client.holds_lease(&b).await
    });
    assert!(settled.await.is_some(), "one router, and only one, holds the sweep lease");
    let a_holds = client.holds_lease(&a).await;

    // The last heartbeat goes to the router that survives; then the holder dies without a word.
    let (mut holder, survivor, session) = if a_holds { (a, b, session_b) } else { (b, a, session_a) };
    assert_eq!(client.heartbeat(&survivor, id, token).await, 200);
    let last_heartbeat = Instant::now();
    holder.child.start_kill().expect("SIGKILL");
    holder.child.wait().await.expect("reaped");

    // Offline no sooner than offline_after after the last heartbeat, and no later than offline_after / 2 after
    // that (the takeover allowance), plus the survivor's sweep period (offline_after / 10) and this poll's 50 ms.
    let latest = last_heartbeat + OFFLINE_AFTER + OFFLINE_AFTER / 2 + OFFLINE_AFTER / 10 + Duration::from_millis(50);
    let offline = poll_until(latest, || async {
        client.node(&survivor, &session, id).await.is_some_and(|n| n["status"] == "offline")
    })
    .await;
    let offline = offline.expect("the survivor marks the silent node offline within offline_after * 1.5");
    assert!(offline >= last_heartbeat + OFFLINE_AFTER, "not before offline_after: {:?}", offline - last_heartbeat);
    eprintln!(
        "lease holder killed: the survivor marked the node offline {:?} after its last heartbeat",
        offline - last_heartbeat
    );
    assert!(client.holds_lease(&survivor).await, "the survivor took the lease");

    // The killed router, started again on its data directory and the same database, rejoins by itself.
    let name = if a_holds { "a" } else { "b" };
    let restarted = start(&dir.path().join(name), &url).await;
    let session = client.session(&restarted).await;
    let node = client.node(&restarted, &session, id).await.expect("the restarted router serves the node");
    assert_eq!(node["status"], "offline");
    assert!(client.node(&restarted, &session, other_id).await.is_none(), "nor the deleted one");
}
