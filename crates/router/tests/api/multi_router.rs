//! Several `llm-router serve` processes, the real binary, on one PostgreSQL database (SPEC §11), driven over HTTP
//! as an operator's load balancer and agents would: a node registered on one router is approved on another and
//! heartbeats to either; what one router commits takes effect on the others within 1 s; killing the router that
//! decides offline transitions (`kill -9`) hands that decision to a survivor in time; a killed router rejoins by
//! itself when started again.
//!
//! Real time here, not a manual clock: every wait is a deadline measured with `Instant` and polled every 50 ms.
//! These tests need the test PostgreSQL server (`LLM_ROUTER_TEST_POSTGRES`, started by `scripts/test.sh`) on
//! either pass of the suite; without it they are skipped, or fail under CI ([`postgres_server`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use llm_router::app::LISTENING_ON;
use reqwest::{Method, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{ADMIN_PASSWORD, POLL, PgDatabase, TestNode, http_client, postgres_server, registration, within};

const BIN: &str = env!("CARGO_BIN_EXE_llm-router");
/// `--offline-after-secs` of every router here: short, so that the tests of silence take seconds.
const OFFLINE_AFTER: Duration = Duration::from_secs(4);
/// What the contract allows between a commit on one router and its effect on another.
const WITHIN: Duration = Duration::from_secs(1);

/// One `llm-router serve` process.
struct Router {
    child: Child,
    base: String,
    client: reqwest::Client,
    /// Its data directory, kept for a restart.
    data_dir: PathBuf,
    /// Where its log (stderr) goes, for the failure messages.
    log: PathBuf,
}

impl Router {
    /// Starts a router on `database` with its own data directory `data_dir`; returns once it listens.
    async fn start(database: &PgDatabase, data_dir: &Path) -> Router {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = data_dir.with_extension("log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut command = Command::new(BIN);
        // Nothing of the environment's own router settings: only what the test says.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("LLM_ROUTER_") {
                command.env_remove(name);
            }
        }
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--no-reachability-check", "--database-url", database.url()])
            .arg("--offline-after-secs")
            .arg(OFFLINE_AFTER.as_secs().to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env("LLM_ROUTER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("LLM_ROUTER_REGISTRATION_RATE", "0")
            .env("LLM_ROUTER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn llm-router");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = stdout.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix(LISTENING_ON) {
                    return url.to_owned();
                }
            }
            panic!("llm-router exited before listening; its log:\n{}", read_log(&log));
        })
        .await
        .unwrap_or_else(|_| panic!("llm-router did not listen within 30 s; its log:\n{}", read_log(&log)));
        // Whatever else it prints is read, so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let client = http_client().timeout(Duration::from_secs(10)).build().expect("HTTP client");
        Router { child, base, client, data_dir: data_dir.to_owned(), log }
    }

    /// `kill -9`: no shutdown, no last flush.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("wait for the killed router");
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Response {
        request
            .send()
            .await
            .unwrap_or_else(|err| panic!("{what} on {}: {err}; its log:\n{}", self.base, read_log(&self.log)))
    }

    async fn admin_token(&self) -> String {
        let login = self
            .request(Method::POST, "/v0/auth/login")
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}));
        let response = self.send(login, "login").await;
        assert_eq!(response.status(), 200, "admin login on {}", self.base);
        json_of(response).await["token"].as_str().expect("token").to_owned()
    }

    async fn register(&self, name: &str) -> TestNode {
        let response =
            self.send(self.request(Method::POST, "/v0/nodes").json(&registration(name, 8000)), "register").await;
        assert_eq!(response.status(), 201, "registering {name} on {}", self.base);
        let answer = json_of(response).await;
        TestNode {
            id: answer["node_id"].as_str().expect("id").to_owned(),
            token: answer["node_token"].as_str().expect("token").to_owned(),
        }
    }

    async fn heartbeat(&self, node: &TestNode, body: Value) -> Response {
        let mut body = body;
        body["node_id"] = json!(node.id);
        self.send(self.request(Method::POST, "/v0/health").header("X-Node-Token", &node.token).json(&body), "heartbeat")
            .await
    }

    /// The node's JSON, or `None` when this router answers 404.
    async fn node(&self, session: &str, id: &str) -> Option<Value> {
        let response =
            self.send(self.request(Method::GET, &format!("/v0/nodes/{id}")).bearer_auth(session), "get node").await;
        if response.status() == 404 {
            return None;
        }
        assert_eq!(response.status(), 200, "GET /v0/nodes/{id} on {}", self.base);
        Some(json_of(response).await)
    }

    async fn status(&self, session: &str, id: &str) -> String {
        let node = self.node(session, id).await.unwrap_or_else(|| panic!("{} does not know node {id}", self.base));
        node["status"].as_str().expect("status").to_owned()
    }

    /// (id, status) of every node, sorted.
    async fn fleet(&self, session: &str) -> Vec<(String, String)> {
        let response = self.send(self.request(Method::GET, "/v0/nodes").bearer_auth(session), "list nodes").await;
        assert_eq!(response.status(), 200);
        let mut fleet: Vec<(String, String)> = json_of(response)
            .await
            .as_array()
            .expect("array")
            .iter()
            .map(|n| (n["id"].as_str().expect("id").to_owned(), n["status"].as_str().expect("status").to_owned()))
            .collect();
        fleet.sort();
        fleet
    }

    /// `llm_router_sweep_lease` on `/metrics`: 1 while this router decides offline transitions.
    async fn sweep_lease(&self) -> f64 {
        let response = self.send(self.request(Method::GET, "/metrics"), "scrape").await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("metrics text");
        text.lines()
            .find_map(|line| line.strip_prefix("llm_router_sweep_lease "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no llm_router_sweep_lease sample on {}/metrics:\n{text}", self.base))
    }
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn json_of(response: Response) -> Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// Two routers on one fresh database on `server`, A started (and listening) before B.
async fn two_routers(server: &str, dir: &Path) -> (PgDatabase, Router, Router) {
    let database = PgDatabase::create_on(server).await;
    let a = Router::start(&database, &dir.join("a")).await;
    let b = Router::start(&database, &dir.join("b")).await;
    (database, a, b)
}

#[tokio::test]
async fn a_node_registered_on_one_router_is_approved_on_another_and_deleted_from_either() {
    let Some(server) = postgres_server() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (_database, a, b) = two_routers(&server, dir.path()).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);

    let node = a.register("gpu-e2e").await;
    within(WITHIN, "B knows the node registered on A", || async { b.node(&admin_b, &node.id).await.is_some() }).await;
    let approve = b.request(Method::POST, &format!("/v0/nodes/{}/approve", node.id)).bearer_auth(&admin_b);
    let approved = b.send(approve, "approve").await;
    assert_eq!(approved.status(), 200);
    assert_eq!(json_of(approved).await["status"], "registering");

    let answer = b.heartbeat(&node, json!({"cpu_usage": 61.0, "ready_models": ["m"]})).await;
    assert_eq!(answer.status(), 200, "B accepts the token A issued");
    assert_eq!(json_of(answer).await["status"], "online");
    within(WITHIN, "A shows the node approved on B and online", || async {
        a.node(&admin_a, &node.id).await.is_some_and(|n| n["status"] == "online" && n["approved_by"] == "admin")
    })
    .await;
    // Heartbeat figures are written behind, at most 1 s after receipt (the binary's flush interval), and then
    // followed within 1 s: 2 s in all.
    within(2 * WITHIN, "A shows the figures of B's heartbeat", || async {
        a.node(&admin_a, &node.id)
            .await
            .is_some_and(|n| n["metrics"]["cpu_usage"] == 61.0 && n["ready_models"] == json!(["m"]))
    })
    .await;

    // A node token A issued works on B at once; deleted on A, it is refused on B within 1 s.
    let doomed = a.register("gpu-doomed").await;
    assert_eq!(b.heartbeat(&doomed, json!({})).await.status(), 200, "B refused a token A had just issued");
    let delete = a.request(Method::DELETE, &format!("/v0/nodes/{}", doomed.id)).bearer_auth(&admin_a);
    assert_eq!(a.send(delete, "delete").await.status(), 204);
    within(WITHIN, "B refuses the token of the node deleted on A", || async {
        b.heartbeat(&doomed, json!({})).await.status() == 401
    })
    .await;
    assert!(b.node(&admin_b, &doomed.id).await.is_none(), "B still shows the deleted node");
    assert_eq!(b.heartbeat(&node, json!({"ready_models": ["m"]})).await.status(), 200, "the other node is untouched");
}

#[tokio::test]
async fn a_survivor_of_the_killed_lease_holder_marks_a_silent_node_offline_in_time_and_the_killed_router_rejoins() {
    let Some(server) = postgres_server() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (database, a, b) = two_routers(&server, dir.path()).await;

    // Each router tries for the lease at every sweep (a tenth of offline_after); exactly one gets it.
    let started = Instant::now();
    let holder_is_a = loop {
        let (on_a, on_b) = (a.sweep_lease().await, b.sweep_lease().await);
        assert!(on_a + on_b <= 1.0, "both routers hold the sweep lease (A {on_a}, B {on_b})");
        if on_a + on_b == 1.0 {
            break on_a == 1.0;
        }
        assert!(started.elapsed() < OFFLINE_AFTER, "no router took the sweep lease within {OFFLINE_AFTER:?}");
        tokio::time::sleep(POLL).await;
    };
    let (mut holder, survivor) = if holder_is_a { (a, b) } else { (b, a) };
    let (admin_h, admin_s) = (holder.admin_token().await, survivor.admin_token().await);

    let node = holder.register("gpu-silent").await;
    within(WITHIN, "the survivor knows the node", || async { survivor.node(&admin_s, &node.id).await.is_some() }).await;
    let approve = survivor.request(Method::POST, &format!("/v0/nodes/{}/approve", node.id)).bearer_auth(&admin_s);
    assert_eq!(survivor.send(approve, "approve").await.status(), 200);
    let ready = json!({"ready_models": ["m"]});
    assert_eq!(json_of(survivor.heartbeat(&node, ready.clone()).await).await["status"], "online");
    within(WITHIN, "the lease holder shows the node online", || async {
        holder.status(&admin_h, &node.id).await == "online"
    })
    .await;

    // The node heartbeats to the survivor only, for longer than offline_after: the holder, which decides, counts
    // the heartbeats the survivor received, and never marks the node offline.
    let started = Instant::now();
    while started.elapsed() < OFFLINE_AFTER + OFFLINE_AFTER / 2 {
        assert_eq!(survivor.heartbeat(&node, ready.clone()).await.status(), 200);
        assert_eq!(
            holder.status(&admin_h, &node.id).await,
            "online",
            "the lease holder ignored the other's heartbeats"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The last heartbeat, then the holder is killed.
    let last = Instant::now();
    assert_eq!(survivor.heartbeat(&node, ready.clone()).await.status(), 200);
    holder.kill().await;
    let killed = Instant::now();

    // The survivor takes the lease within offline_after / 2 of the death, and marks the node offline no later than
    // last heartbeat + offline_after + offline_after / 2. The slack covers how the test looks: one poll interval
    // (50 ms) and the time of the GETs of one look on a busy 2-core machine (200 ms).
    let slack = POLL + Duration::from_millis(200);
    let mut lease_taken = None;
    let offline = loop {
        let looked = last.elapsed();
        if lease_taken.is_none() && survivor.sweep_lease().await == 1.0 {
            lease_taken = Some(killed.elapsed());
        }
        if survivor.status(&admin_s, &node.id).await == "offline" {
            break looked;
        }
        assert!(
            last.elapsed() < OFFLINE_AFTER + OFFLINE_AFTER / 2 + slack,
            "the survivor did not mark the silent node offline within offline_after * 1.5 of its last heartbeat \
             (lease taken after the kill: {lease_taken:?})"
        );
        tokio::time::sleep(POLL).await;
    };
    // Only the lease holder decides offline transitions: the survivor holds it now, and took it in time.
    assert_eq!(survivor.sweep_lease().await, 1.0, "the survivor marked the node offline without the lease");
    let lease_taken = lease_taken.unwrap_or_else(|| killed.elapsed());
    assert!(
        lease_taken <= OFFLINE_AFTER / 2 + slack,
        "the survivor took the sweep lease {lease_taken:?} after the kill"
    );
    // Not before offline_after either: the router counts from its receipt of the last heartbeat, which came after
    // `last` (10 ms for the router's clock, read in whole milliseconds, and the test's).
    let seen_offline = last.elapsed();
    assert!(
        seen_offline + Duration::from_millis(10) >= OFFLINE_AFTER,
        "offline {seen_offline:?} after the last heartbeat, before offline_after"
    );
    assert!(offline <= OFFLINE_AFTER + OFFLINE_AFTER / 2 + slack, "offline only {offline:?} after the last heartbeat");
    eprintln!(
        "lease holder killed: lease taken over {lease_taken:?} after; node offline {offline:?} after its last heartbeat"
    );

    // The killed router starts again on its data directory and database: it rejoins, with the same fleet.
    let data_dir = holder.data_dir.clone();
    let restarted = Router::start(&database, &data_dir).await;
    let admin_r = restarted.admin_token().await;
    assert_eq!(restarted.fleet(&admin_r).await, survivor.fleet(&admin_s).await, "the restarted router's fleet");
    assert_eq!(restarted.status(&admin_r, &node.id).await, "offline");
    // It takes part again: a heartbeat to it brings the node back, on the survivor too.
    assert_eq!(json_of(restarted.heartbeat(&node, ready).await).await["status"], "online");
    within(WITHIN, "the survivor shows the node back online", || async {
        survivor.status(&admin_s, &node.id).await == "online"
    })
    .await;
    assert_eq!(restarted.sweep_lease().await, 0.0, "the survivor kept the lease");
    assert_eq!(survivor.sweep_lease().await, 1.0);
}

/// A deployment created on one router is placed once among both (the lease holder places), a node heartbeating to
/// the other is answered its assignment, and what that node reports shows on the first (SPEC §15).
#[tokio::test]
async fn a_deployment_created_on_one_router_is_assigned_through_the_other_and_its_state_shows_on_both() {
    let Some(server) = postgres_server() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (_database, a, b) = two_routers(&server, dir.path()).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);

    let mut managed = registration("gpu-managed", 8090);
    managed["supported_runtimes"] = json!(["managed:llama_cpp"]);
    let registered = a.send(a.request(Method::POST, "/v0/nodes").json(&managed), "register").await;
    assert_eq!(registered.status(), 201);
    let answer = json_of(registered).await;
    let node = TestNode {
        id: answer["node_id"].as_str().expect("id").to_owned(),
        token: answer["node_token"].as_str().expect("token").to_owned(),
    };
    let approve = a.request(Method::POST, &format!("/v0/nodes/{}/approve", node.id)).bearer_auth(&admin_a);
    assert_eq!(a.send(approve, "approve").await.status(), 200);
    let body = json!({
        "name": "tiny", "model": "tiny-llama", "source": "file:///models/tiny.gguf", "runtime": "llama_cpp",
        "replicas": 1,
    });
    let created = a.send(a.request(Method::POST, "/v0/deployments").bearer_auth(&admin_a).json(&body), "create").await;
    assert_eq!(created.status(), 201);
    let id = json_of(created).await["id"].clone();

    // Placed by whichever router holds the lease, within a placement pass and a read-back: 2 s with margin.
    let started = Instant::now();
    let assigned = loop {
        let answer = json_of(b.heartbeat(&node, json!({"replicas": []})).await).await;
        let assignments = answer["assignments"].as_array().expect("assignments").clone();
        if !assignments.is_empty() {
            break assignments;
        }
        assert!(started.elapsed() < 3 * WITHIN, "B never answered the node its assignment");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(assigned[0]["deployment_id"], id);
    assert_eq!(assigned[0]["source"], "file:///models/tiny.gguf");

    let ready = json!({"ready_models": ["tiny-llama"], "replicas": [{"deployment_id": id, "revision": 1, "state": "ready",
        "port": 41000, "restarts": 0}]});
    assert_eq!(b.heartbeat(&node, ready).await.status(), 200);
    // Written behind by B within half a second, read back by A within a second.
    within(3 * WITHIN, "A shows the replica ready, as B heard it", || async {
        let answer = a.send(a.request(Method::GET, "/v0/deployments/tiny").bearer_auth(&admin_a), "get").await;
        let deployment = json_of(answer).await;
        deployment["ready_replicas"] == 1 && deployment["replica_states"][0]["port"] == 41000
    })
    .await;
    let on_b = json_of(b.send(b.request(Method::GET, "/v0/deployments/tiny").bearer_auth(&admin_b), "get").await).await;
    assert_eq!(on_b["replica_states"][0]["node_id"], json!(node.id));
}
