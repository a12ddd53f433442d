//! Several routers on one PostgreSQL database (SPEC §11), in this process: each with its own clock, data directory
//! and memory, sharing nothing but the database. What one router commits takes effect on the other within 1 s (the
//! contract), which each test waits for with a deadline, never a fixed sleep. Also `llm-router migrate`, from a
//! SQLite database made through the API into a fresh PostgreSQL one.
//!
//! These tests need the test PostgreSQL server (`LLM_ROUTER_TEST_POSTGRES`, started by `scripts/test.sh`) on either
//! pass of the suite: they are about PostgreSQL whichever backend the other tests run on. Without it they are
//! skipped, or fail under CI ([`postgres_server`]).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::helpers::*;

/// What the contract allows between a commit on one router and its effect on another.
const WITHIN: Duration = Duration::from_secs(1);

/// A router on `database`, with the suite's other defaults.
async fn router_on(database: &PgDatabase) -> TestApp {
    TestApp::with(Options { database: Database::Postgres(database.clone()), ..Options::default() }).await
}

/// Two routers, A and B, on one fresh database on `server`; A started first.
async fn two_routers(server: &str) -> (TestApp, TestApp) {
    let database = PgDatabase::create_on(server).await;
    let a = router_on(&database).await;
    let b = router_on(&database).await;
    (a, b)
}

/// The node's JSON on `app`, or `None` when it answers 404.
async fn node_on(app: &TestApp, session: &str, id: &str) -> Option<Value> {
    let response = app.get_node(session, id).await;
    if response.status() == 404 {
        return None;
    }
    assert_eq!(response.status(), 200, "GET /v0/nodes/{id}");
    Some(body(response).await)
}

/// `GET path` on `app` with `credential`; returns the status.
async fn status_of_get(app: &TestApp, credential: &str, path: &str) -> u16 {
    app.request(Method::GET, path).bearer_auth(credential).send().await.expect(path).status().as_u16()
}

async fn delete(app: &TestApp, session: &str, path: &str) {
    let response = app.request(Method::DELETE, path).bearer_auth(session).send().await.expect(path);
    assert_eq!(response.status(), 204, "DELETE {path}");
}

async fn post(app: &TestApp, session: &str, path: &str, request: Value) -> Value {
    let response = app.request(Method::POST, path).bearer_auth(session).json(&request).send().await.expect(path);
    let status = response.status();
    let answer = body(response).await;
    assert!(status.is_success(), "POST {path}: {status} {answer}");
    answer
}

/// A registration carrying a join token.
async fn join(app: &TestApp, token: &str, name: &str) -> reqwest::Response {
    app.request(Method::POST, "/v0/nodes")
        .header("X-Join-Token", token)
        .json(&registration(name, 8000))
        .send()
        .await
        .expect("register with a join token")
}

/// The router whose `llm_router_sweep_lease` is 1, after one sweep on each; fails unless exactly one holds it.
async fn lease_holder<'a>(a: &'a TestApp, b: &'a TestApp) -> (&'a TestApp, &'a TestApp) {
    a.state.registry.sweep().await.expect("sweep on A");
    b.state.registry.sweep().await.expect("sweep on B");
    let (on_a, on_b) = (a.metric("llm_router_sweep_lease").await, b.metric("llm_router_sweep_lease").await);
    match (on_a, on_b) {
        (1.0, 0.0) => (a, b),
        (0.0, 1.0) => (b, a),
        _ => panic!("exactly one router must hold the sweep lease: A says {on_a}, B says {on_b}"),
    }
}

#[tokio::test]
async fn a_node_registered_on_one_router_is_approved_on_another_and_heartbeats_to_it() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let node = a.register_node("gpu-shared").await;

    within(WITHIN, "B knows the node registered on A", || async { node_on(&b, &admin_b, &node.id).await.is_some() })
        .await;
    b.clock.advance_ms(1_000);
    let approved = body(b.approve(&admin_b, &node.id).await).await;
    assert_eq!(approved["status"], "registering", "{approved}");
    assert_eq!(approved["approved_at"], "2026-01-01T00:00:01.000Z");

    // The agent heartbeats to B with the token A issued, reporting a ready model.
    b.clock.advance_ms(1_000);
    let heartbeat = json!({
        "node_id": node.id,
        "cpu_usage": 41.5,
        "memory_usage": 63.0,
        "gpus": [{"index": 0, "model": "NVIDIA L4", "utilization": 87.0, "memory_used_bytes": 1000,
                  "memory_total_bytes": 24000, "temperature_c": 66.0},
                 {"index": 1, "model": "NVIDIA L4", "utilization": 12.0, "temperature_c": 51.0}],
        "loaded_models": ["llama-3", "qwen"],
        "ready_models": ["llama-3"],
        "active_requests": 2
    });
    let answer = b.heartbeat_body(&node.token, &heartbeat).await;
    assert_eq!(answer.status(), 200, "B accepts the token A issued");
    assert_eq!(body(answer).await["status"], "online");
    within(WITHIN, "A shows the node approved on B and online", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| {
            n["status"] == "online" && n["approved_by"] == "admin" && n["approved_at"] == approved["approved_at"]
        })
    })
    .await;

    // B writes the heartbeat figures behind (every second in production; here when told): A follows within 1 s.
    b.state.registry.flush().await.expect("flush on B");
    let on_b = b.node(&node.id).await;
    assert_eq!(on_b["last_seen_at"], "2026-01-01T00:00:02.000Z", "B's clock at receipt");
    assert_eq!(on_b["metrics"]["gpus"][0]["utilization"], 87.0);
    within(WITHIN, "A shows the heartbeat B received", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| {
            n["last_seen_at"] == on_b["last_seen_at"]
                && n["metrics"] == on_b["metrics"]
                && n["ready_models"] == json!(["llama-3"])
                && n["loaded_models"] == json!(["llama-3", "qwen"])
        })
    })
    .await;

    // The next figures replace those, on A too.
    b.clock.advance_ms(5_000);
    let next = json!({"node_id": node.id, "cpu_usage": 3.0, "ready_models": ["llama-3"]});
    assert_eq!(b.heartbeat_body(&node.token, &next).await.status(), 200);
    b.state.registry.flush().await.expect("flush on B");
    within(WITHIN, "A shows B's latest heartbeat", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| {
            n["last_seen_at"] == "2026-01-01T00:00:07.000Z"
                && n["metrics"]["cpu_usage"] == 3.0
                && n["metrics"]["gpus"].as_array().is_none_or(Vec::is_empty)
        })
    })
    .await;
}

#[tokio::test]
async fn a_node_token_issued_by_one_router_is_accepted_by_another_at_once() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let node = a.register_node("gpu-fresh").await;
    let other = a.register_node("gpu-other").await;
    // No wait: B looks a token it does not know up in the database, rather than tell the agent its identity is
    // gone (the agent would discard it and need an administrator).
    let answer = b.heartbeat(&node, &["m"]).await;
    assert_eq!(answer.status(), 200, "B refused a node token A had just issued");
    assert_eq!(body(answer).await["status"], "pending");
    // Looking tokens up accepts nothing else: a token nobody issued is unknown, another node's is forbidden.
    let claim = json!({"node_id": node.id, "cpu_usage": 1.0});
    let forged = "llmn_0000000000000000000000000000000000000000000";
    assert_error(b.heartbeat_body(forged, &claim).await, 401, "unauthorized").await;
    assert_error(b.heartbeat_body(&other.token, &claim).await, 403, "forbidden").await;

    // The agent rotates its token through A: B accepts the new one at once and refuses the old one within 1 s.
    let rotated = a
        .request(Method::POST, "/v0/nodes")
        .header("X-Node-Token", &node.token)
        .json(&registration("gpu-fresh", 8000))
        .send()
        .await
        .expect("rotate");
    assert_eq!(rotated.status(), 200, "token rotation on A");
    let rotated = body(rotated).await;
    assert_eq!(rotated["node_id"], json!(node.id), "the node keeps its id");
    let renewed = TestNode { id: node.id.clone(), token: rotated["node_token"].as_str().expect("token").to_owned() };
    assert_eq!(b.heartbeat(&renewed, &["m"]).await.status(), 200, "B refused the token A rotated to");
    within(WITHIN, "B refuses the token replaced on A", || async { b.heartbeat(&node, &["m"]).await.status() == 401 })
        .await;
    assert_eq!(b.heartbeat(&renewed, &["m"]).await.status(), 200, "and keeps accepting the new one");
}

#[tokio::test]
async fn a_node_deleted_on_one_router_is_refused_and_gone_on_the_other_within_a_second() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let node = a.register_node("gpu-gone").await;
    let kept = a.register_node("gpu-kept").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    // B has met both tokens.
    assert_eq!(b.heartbeat(&node, &["m"]).await.status(), 200);
    assert_eq!(b.heartbeat(&kept, &["m"]).await.status(), 200);

    delete(&a, &admin_a, &format!("/v0/nodes/{}", node.id)).await;
    within(WITHIN, "B refuses the deleted node's token", || async { b.heartbeat(&node, &["m"]).await.status() == 401 })
        .await;
    assert_error(b.heartbeat(&node, &["m"]).await, 401, "unauthorized").await;
    within(WITHIN, "B no longer shows the deleted node", || async { node_on(&b, &admin_b, &node.id).await.is_none() })
        .await;
    assert_eq!(b.heartbeat(&kept, &["m"]).await.status(), 200, "the other node is untouched");
    let ids: Vec<Value> = b.nodes().await.iter().map(|n| n["id"].clone()).collect();
    assert_eq!(ids, [json!(kept.id)]);
}

#[tokio::test]
async fn an_api_key_revoked_on_one_router_is_refused_on_the_other_within_a_second() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let admin_a = a.admin_token().await;
    // Without a scope, a key reaches both the admin API and /v1.
    let created = post(&a, &admin_a, "/v0/api-keys", json!({"name": "ci"})).await;
    let (key, id) = (created["key"].as_str().expect("key"), created["id"].as_str().expect("id"));
    // B accepts it at once, on both (and so has met it before the revocation).
    assert_eq!(status_of_get(&b, key, "/v0/nodes").await, 200, "B refused an API key made on A, on /v0");
    assert_eq!(status_of_get(&b, key, "/v1/models").await, 200, "B refused an API key made on A, on /v1");

    delete(&a, &admin_a, &format!("/v0/api-keys/{id}")).await;
    within(WITHIN, "B refuses the revoked key on /v0 and /v1", || async {
        status_of_get(&b, key, "/v0/nodes").await == 401 && status_of_get(&b, key, "/v1/models").await == 401
    })
    .await;
    let listed =
        body(b.request(Method::GET, "/v0/api-keys").bearer_auth(&b.admin_token().await).send().await.expect("list"))
            .await;
    assert_eq!(listed, json!([]), "B lists no key");
}

#[tokio::test]
async fn a_session_ended_on_one_router_is_refused_on_the_other_within_a_second() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let session = a.admin_token().await;
    assert_eq!(status_of_get(&b, &session, "/v0/auth/me").await, 200, "B refused a session begun on A");
    let out = a.request(Method::POST, "/v0/auth/logout").bearer_auth(&session).send().await.expect("logout");
    assert_eq!(out.status(), 204);
    within(WITHIN, "B refuses the ended session", || async { status_of_get(&b, &session, "/v0/auth/me").await == 401 })
        .await;
    assert_eq!(status_of_get(&b, &session, "/v0/nodes").await, 401);
}

#[tokio::test]
async fn a_cordon_on_one_router_shows_on_the_other_within_a_second() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let node = a.register_node("gpu-drain").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    within(WITHIN, "B knows of the approval made on A", || async {
        body(b.heartbeat(&node, &["m"]).await).await["status"] == "online"
    })
    .await;
    assert_eq!(node_on(&b, &admin_b, &node.id).await.expect("node")["schedulable"], true);

    let cordoned = post(&a, &admin_a, &format!("/v0/nodes/{}/cordon", node.id), json!({})).await;
    assert_eq!(cordoned["schedulable"], false);
    within(WITHIN, "B shows the cordon made on A", || async {
        node_on(&b, &admin_b, &node.id).await.is_some_and(|n| n["schedulable"] == false)
    })
    .await;
    post(&b, &admin_b, &format!("/v0/nodes/{}/uncordon", node.id), json!({})).await;
    within(WITHIN, "A shows the uncordon made on B", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| n["schedulable"] == true)
    })
    .await;
}

#[tokio::test]
async fn users_made_or_removed_on_one_router_are_so_on_the_other() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let viewer = json!({"username": "viewer-1", "password": "user-password-1", "role": "viewer"});
    post(&a, &admin_a, "/v0/users", viewer).await;
    within(WITHIN, "a user made on A signs in on B", || async {
        b.login("viewer-1", "user-password-1").await.status() == 200
    })
    .await;
    let session = body(b.login("viewer-1", "user-password-1").await).await["token"].as_str().expect("token").to_owned();
    let me = body(b.request(Method::GET, "/v0/auth/me").bearer_auth(&session).send().await.expect("me")).await;
    assert_eq!((&me["username"], &me["role"]), (&json!("viewer-1"), &json!("viewer")), "{me}");
    let node = b.register_node("gpu-x").await;
    assert_error(b.approve(&session, &node.id).await, 403, "forbidden").await;

    post(&b, &admin_b, "/v0/users", json!({"username": "ops", "password": "user-password-2", "role": "admin"})).await;
    within(WITHIN, "A lists the user made on B", || async {
        let users = body(a.request(Method::GET, "/v0/users").bearer_auth(&admin_a).send().await.expect("users")).await;
        users.as_array().expect("users").iter().any(|u| u["username"] == "ops" && u["role"] == "admin")
    })
    .await;

    // Deleted on A: no sign-in on B, and the session it began on B ends there.
    delete(&a, &admin_a, "/v0/users/viewer-1").await;
    within(WITHIN, "B refuses the user deleted on A", || async {
        b.login("viewer-1", "user-password-1").await.status() == 401
            && status_of_get(&b, &session, "/v0/auth/me").await == 401
    })
    .await;
}

#[tokio::test]
async fn join_tokens_made_or_revoked_on_one_router_are_so_on_the_other() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let lab = post(&a, &admin_a, "/v0/join-tokens", json!({"name": "lab", "max_uses": 2, "tags": ["lab"]})).await;
    let lab_token = lab["token"].as_str().expect("token");
    within(WITHIN, "B lists the join token made on A", || async {
        let listed =
            body(b.request(Method::GET, "/v0/join-tokens").bearer_auth(&admin_b).send().await.expect("list")).await;
        listed.as_array().expect("tokens").iter().any(|t| t["id"] == lab["id"] && t["state"] == "active")
    })
    .await;
    let joined = join(&b, lab_token, "joined-on-b").await;
    assert_eq!(joined.status(), 201, "a join token made on A works on B");
    let joined = body(joined).await;
    let tags = node_on(&b, &admin_b, joined["node_id"].as_str().expect("id")).await.expect("node")["tags"].clone();
    assert_eq!(tags, json!(["rack-a", "lab"]), "the node's own tags, then the join token's");
    assert_eq!(join(&a, lab_token, "joined-on-a").await.status(), 201);
    let third = join(&b, lab_token, "one-too-many").await;
    let message = assert_error(third, 401, "join_token_invalid").await;
    assert!(message.contains("used up"), "uses are counted across routers: {message}");

    // Revoked on A after B used it: B refuses it within 1 s.
    let rack = post(&a, &admin_a, "/v0/join-tokens", json!({"name": "rack", "max_uses": 10})).await;
    let rack_token = rack["token"].as_str().expect("token");
    assert_eq!(join(&b, rack_token, "rack-1").await.status(), 201);
    delete(&a, &admin_a, &format!("/v0/join-tokens/{}", rack["id"].as_str().expect("id"))).await;
    let mut attempt = 0;
    within(WITHIN, "B refuses the join token revoked on A", || {
        attempt += 1;
        let name = format!("rack-after-{attempt}");
        let b = &b;
        async move { join(b, rack_token, &name).await.status() == 401 }
    })
    .await;
    let message = assert_error(join(&b, rack_token, "rack-last").await, 401, "join_token_invalid").await;
    assert!(message.contains("revoked"), "{message}");
}

#[tokio::test]
async fn only_the_sweep_lease_holder_decides_offline_from_the_heartbeats_any_router_received() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (leader, follower) = lease_holder(&a, &b).await;
    let admin = leader.admin_token().await;
    let node = leader.register_node("gpu-far").await;
    assert_eq!(leader.approve(&admin, &node.id).await.status(), 200);
    within(WITHIN, "the other router knows of the approval", || async {
        body(follower.heartbeat(&node, &["m"]).await).await["status"] == "online"
    })
    .await;

    // Both clocks move together (routers keep their clocks in step); the node heartbeats to the follower only, for
    // longer than offline_after (30 s) in all: the leader counts the heartbeats the follower received.
    for round in 0..4 {
        follower.clock.advance_ms(10_000);
        assert_eq!(follower.heartbeat(&node, &["m"]).await.status(), 200);
        follower.state.registry.flush().await.expect("flush on the follower");
        let seen = follower.node(&node.id).await["last_seen_at"].clone();
        within(WITHIN, "the leader learns the follower's heartbeat", || async {
            leader.node(&node.id).await["last_seen_at"] == seen
        })
        .await;
        assert_eq!(leader.advance_and_sweep(10_000).await, 0, "round {round}: the leader marked the node offline");
        assert_eq!(leader.status_of(&node.id).await, "online");
    }

    // Silence everywhere. The follower, holding no lease, decides nothing...
    assert_eq!(follower.advance_and_sweep(31_000).await, 0, "a router without the sweep lease marked a node offline");
    assert_eq!(follower.status_of(&node.id).await, "online");
    // ...the leader marks the node offline after offline_after, and the follower shows it.
    assert_eq!(leader.advance_and_sweep(31_000).await, 1);
    within(WITHIN, "the follower shows the node offline", || async { follower.status_of(&node.id).await == "offline" })
        .await;
    assert_eq!(leader.metric("llm_router_sweep_lease").await, 1.0);
    assert_eq!(follower.metric("llm_router_sweep_lease").await, 0.0);
}

#[tokio::test]
async fn the_sweep_lease_passes_to_the_other_router_when_its_holder_stops() {
    let Some(server) = postgres_server() else { return };
    let (mut a, mut b) = two_routers(&server).await;
    let holder_is_a = std::ptr::eq(lease_holder(&a, &b).await.0, &a);
    let (holder, other) = if holder_is_a { (&mut a, &b) } else { (&mut b, &a) };
    holder.shutdown().await;
    // The contract: taken over within offline_after / 2.
    let limit = other.settings.offline_after / 2;
    within(limit, "the other router takes the sweep lease", || async {
        other.state.registry.sweep().await.expect("sweep");
        other.metric("llm_router_sweep_lease").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_restarted_router_rejoins_and_sees_what_changed_meanwhile() {
    let Some(server) = postgres_server() else { return };
    let (a, mut b) = two_routers(&server).await;
    let admin_a = a.admin_token().await;
    let before = a.register_node("gpu-before").await;
    let gone = a.register_node("gpu-gone").await;
    assert_eq!(b.heartbeat(&gone, &[]).await.status(), 200, "B has met the token");
    b.shutdown().await;

    let during = a.register_node("gpu-during").await;
    assert_eq!(a.approve(&admin_a, &before.id).await.status(), 200);
    delete(&a, &admin_a, &format!("/v0/nodes/{}", gone.id)).await;
    post(&a, &admin_a, "/v0/users", json!({"username": "ops", "password": "user-password-1", "role": "admin"})).await;

    let b = b.restart(0).await;
    let mut names: Vec<String> =
        b.nodes().await.iter().map(|n| n["machine_name"].as_str().expect("name").to_owned()).collect();
    names.sort();
    assert_eq!(names, ["gpu-before", "gpu-during"]);
    assert_eq!(b.status_of(&before.id).await, "registering");
    assert_eq!(b.status_of(&during.id).await, "pending");
    assert_error(b.heartbeat(&gone, &[]).await, 401, "unauthorized").await;
    assert_eq!(b.heartbeat(&during, &[]).await.status(), 200);
    assert_eq!(b.login("ops", "user-password-1").await.status(), 200);

    // And both follow each other again.
    assert_eq!(a.approve(&admin_a, &during.id).await.status(), 200);
    within(WITHIN, "the restarted B follows A", || async { b.status_of(&during.id).await == "registering" }).await;
    let admin_b = b.admin_token().await;
    delete(&b, &admin_b, &format!("/v0/nodes/{}", before.id)).await;
    within(WITHIN, "A follows the restarted B", || async { node_on(&a, &admin_a, &before.id).await.is_none() }).await;
}

/// Milliseconds since the epoch by the system clock.
fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970");
    i64::try_from(since.as_millis()).expect("ms")
}

/// The tables `llm-router migrate` copies and counts.
const MIGRATED_TABLES: [&str; 10] = [
    "nodes",
    "node_tokens",
    "node_events",
    "users",
    "sessions",
    "api_keys",
    "join_tokens",
    "audit_events",
    "deployments",
    "deployment_replicas",
];

/// Rows in each of [`MIGRATED_TABLES`].
async fn counts(db: &TestDb) -> BTreeMap<&'static str, i64> {
    let mut counts = BTreeMap::new();
    for table in MIGRATED_TABLES {
        let (rows,): (i64,) = db.fetch_one(&format!("SELECT COUNT(*) FROM {table}"), &[]).await;
        counts.insert(table, rows);
    }
    counts
}

/// Runs `llm-router migrate --from from --to to`; returns (exit code, stdout and stderr).
async fn migrate(from: &std::path::Path, to: &str) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llm-router"));
    command.arg("migrate").arg("--from").arg(from).args(["--to", to]).env("LLM_ROUTER_LOG", "warn").kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("migrate finished within 2 minutes")
        .expect("run llm-router migrate");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// `GET path` on `app` as JSON, asserting 200.
async fn get_json(app: &TestApp, credential: &str, path: &str) -> Value {
    let response = app.request(Method::GET, path).bearer_auth(credential).send().await.expect(path);
    assert_eq!(response.status(), 200, "GET {path}");
    body(response).await
}

#[tokio::test]
async fn migrate_copies_a_sqlite_database_into_postgres_and_a_second_run_adds_nothing() {
    let Some(server) = postgres_server() else { return };
    // The clocks stand at the real time, so that sessions and join tokens made here are valid by any clock.
    let start_ms = now_ms();
    let source = TestApp::with(Options { database: Database::Sqlite, start_ms, ..Options::default() }).await;
    let admin = source.admin_token().await;
    post(&source, &admin, "/v0/users", json!({"username": "ops", "password": "ops-password-1", "role": "viewer"}))
        .await;
    let key =
        post(&source, &admin, "/v0/api-keys", json!({"name": "ci"})).await["key"].as_str().expect("key").to_owned();
    let join_token = post(&source, &admin, "/v0/join-tokens", json!({"name": "rack 9", "max_uses": 5, "tags": ["r9"]}))
        .await["token"]
        .as_str()
        .expect("token")
        .to_owned();

    // An online node with figures, a cordoned registering one with an administrator's edits, a pending one that
    // joined with the join token.
    let online = source.register_node("gpu-online").await;
    assert_eq!(source.approve(&admin, &online.id).await.status(), 200);
    source.clock.advance_ms(1_500);
    let figures = json!({"node_id": online.id, "cpu_usage": 55.5, "ready_models": ["m"], "loaded_models": ["m"],
                         "gpus": [{"index": 0, "utilization": 90.0}, {"index": 1, "utilization": 10.0}]});
    assert_eq!(body(source.heartbeat_body(&online.token, &figures).await).await["status"], "online");
    let registering = source.register_node("gpu-registering").await;
    assert_eq!(source.approve(&admin, &registering.id).await.status(), 200);
    let edit = json!({"display_name": "Rack 9 / B", "notes": "spare", "tags": ["r9", "spare"]});
    let patched = source.request(Method::PATCH, &format!("/v0/nodes/{}", registering.id)).bearer_auth(&admin);
    assert_eq!(patched.json(&edit).send().await.expect("patch").status(), 200);
    post(&source, &admin, &format!("/v0/nodes/{}/cordon", registering.id), json!({})).await;
    let joined = join(&source, &join_token, "gpu-pending").await;
    assert_eq!(joined.status(), 201);
    let joined = body(joined).await;
    let pending = TestNode {
        id: joined["node_id"].as_str().expect("id").to_owned(),
        token: joined["node_token"].as_str().expect("token").to_owned(),
    };
    // A deployment with one replica waiting for a node, its reason stored.
    let deployment = json!({"name": "tiny", "model": "tiny-llama", "source": "file:///m/tiny.gguf",
                            "runtime": "llama_cpp", "replicas": 1, "args": ["-c", "512"]});
    post(&source, &admin, "/v0/deployments", deployment).await;
    source.state.registry.flush().await.expect("flush");

    let nodes = source.nodes().await;
    let deployments = get_json(&source, &admin, "/v0/deployments").await;
    let mut events = BTreeMap::new();
    for node in [&online, &registering, &pending] {
        events.insert(node.id.clone(), source.events(&node.id).await);
    }
    let audit = get_json(&source, &admin, "/v0/audit").await;
    let users = get_json(&source, &admin, "/v0/users").await;
    let keys = get_json(&source, &admin, "/v0/api-keys").await;
    let join_tokens = get_json(&source, &admin, "/v0/join-tokens").await;
    let mut source = source;
    source.shutdown().await;
    // What an agent reported of the GPUs a replica runs on goes with it.
    assert_eq!(source.sql().await.execute("UPDATE deployment_replicas SET gpus = '[0,1]'", &[]).await, 1);
    let mut deployments = deployments;
    deployments["deployments"][0]["replica_states"][0]["gpus"] = json!([0, 1]);
    let expected = counts(&source.sql().await).await;
    assert_eq!((expected["nodes"], expected["users"], expected["api_keys"], expected["join_tokens"]), (3, 2, 1, 1));
    assert_eq!((expected["deployments"], expected["deployment_replicas"]), (1, 1));
    assert!(expected["node_events"] >= 6 && expected["audit_events"] >= 1 && expected["sessions"] >= 1, "{expected:?}");

    let target = PgDatabase::create_on(&server).await;
    let file = source.data_dir().join("router.db");
    let (code, output) = migrate(&file, target.url()).await;
    assert_eq!(code, 0, "llm-router migrate failed:\n{output}");
    // It prints what it copied, table by table.
    for (table, rows) in &expected {
        let reported = output.lines().any(|line| {
            let words: Vec<&str> = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).collect();
            words.contains(table) && words.contains(&rows.to_string().as_str())
        });
        assert!(reported, "no line gives the {rows} rows of {table}:\n{output}");
    }
    let target_db = TestDb::Postgres(target.pool().await);
    assert_eq!(counts(&target_db).await, expected, "rows in PostgreSQL after the migration");

    // Again: nothing is added.
    let (code, again) = migrate(&file, target.url()).await;
    assert_eq!(code, 0, "a second llm-router migrate failed:\n{again}");
    assert_eq!(counts(&target_db).await, expected, "rows in PostgreSQL after a second migration");

    // A router on PostgreSQL has it all: first what reading adds nothing to, with the session made on SQLite.
    let options =
        Options { database: Database::Postgres(target.clone()), start_ms: source.clock_ms(), ..Options::default() };
    let router = TestApp::with(options).await;
    assert_eq!(get_json(&router, &admin, "/v0/audit").await, audit, "the audit log");
    assert_eq!(stored(router.nodes().await), stored(nodes), "every node, with its status, lists, edits and figures");
    for (id, history) in &events {
        assert_eq!(&router.events(id).await, history, "the events of node {id}");
    }
    assert_eq!(get_json(&router, &admin, "/v0/users").await, users);
    assert_eq!(get_json(&router, &admin, "/v0/api-keys").await, keys);
    assert_eq!(get_json(&router, &admin, "/v0/join-tokens").await, join_tokens);
    assert_eq!(get_json(&router, &admin, "/v0/deployments").await, deployments, "deployments and their replicas");
    // Then every credential.
    assert_eq!(body(router.heartbeat(&online, &["m"]).await).await["status"], "online", "the node's token");
    assert_eq!(body(router.heartbeat(&registering, &[]).await).await["status"], "registering");
    assert_eq!(body(router.heartbeat(&pending, &["m"]).await).await["status"], "pending");
    assert_eq!(router.login("ops", "ops-password-1").await.status(), 200, "the user's password");
    assert_eq!(router.login("admin", ADMIN_PASSWORD).await.status(), 200);
    assert_eq!(status_of_get(&router, &key, "/v0/nodes").await, 200, "the API key on /v0");
    assert_eq!(status_of_get(&router, &key, "/v1/models").await, 200, "the API key on /v1");
    let second = join(&router, &join_token, "gpu-joined-later").await;
    assert_eq!(second.status(), 201, "the join token");
    let listed = get_json(&router, &admin, "/v0/join-tokens").await;
    assert_eq!(listed[0]["uses"], 2, "its uses went on from where SQLite left them");
    // New rows go on after the copied ones: an approval's event comes after every copied event.
    assert_eq!(body(router.approve(&admin, &pending.id).await).await["status"], "online");
    let history = router.events(&pending.id).await;
    assert_eq!(history.len(), events[&pending.id].len() + 1, "{history:?}");
    let newest_copied = events.values().flatten().filter_map(|event| event["id"].as_i64()).max().expect("event ids");
    assert!(history[0]["id"].as_i64().is_some_and(|id| id > newest_copied), "{history:?}");
}

#[tokio::test]
async fn the_same_machine_registering_on_both_routers_is_one_node() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let node = a.register_node("gpu-twice").await;
    // At once on B, whether or not B has read A's registration yet: refused, naming the node that is there.
    let again = b.register(&registration("gpu-twice", 8000)).await;
    let message = assert_error(again, 409, "node_exists").await;
    assert!(message.contains(&node.id), "{message}");
    assert_eq!(a.nodes().await.len(), 1);
}

#[tokio::test]
async fn a_mass_silence_dismissed_through_the_other_router_ends_on_the_lease_holder() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (holder, other) = lease_holder(&a, &b).await;
    let admin = holder.admin_token().await;
    for i in 0..12 {
        let node = holder.register_node(&format!("gpu-{i:02}")).await;
        assert_eq!(holder.approve(&admin, &node.id).await.status(), 200);
        assert_eq!(body(holder.heartbeat(&node, &["m"]).await).await["status"], "online");
    }
    assert_eq!(holder.advance_and_sweep(31_000).await, 12);
    assert_eq!(holder.metric("llm_router_mass_silence").await, 1.0, "the whole fleet went silent at once");

    let admin_other = other.admin_token().await;
    let events =
        body(other.request(Method::GET, "/v0/fleet/events").bearer_auth(&admin_other).send().await.expect("events"));
    let id = events.await[0]["id"].as_i64().expect("the mass silence, listed on the other router");
    let dismissed = other.request(Method::POST, &format!("/v0/fleet/events/{id}/dismiss")).bearer_auth(&admin_other);
    assert_eq!(dismissed.send().await.expect("dismiss").status(), 204);
    // The holder's next sweep finds the dismissal in the database.
    holder.state.registry.sweep().await.expect("sweep");
    assert_eq!(holder.metric("llm_router_mass_silence").await, 0.0);
}

/// The nodes of `GET path` on `app` (a page), with the answer's revision.
async fn changed(app: &TestApp, session: &str, path: &str) -> (Vec<Value>, i64) {
    let response = app.request(Method::GET, path).bearer_auth(session).send().await.expect(path);
    assert_eq!(response.status(), 200, "GET {path}");
    let page = body(response).await;
    (page["nodes"].as_array().expect("nodes").clone(), page["revision"].as_i64().expect("revision"))
}

/// A dashboard behind a load balancer asks the routers in turn: a `changed_since` one router gave is answered by
/// the other too, and a change made on either reaches the client, from either (SPEC §11, §12).
#[tokio::test]
async fn a_revision_from_one_router_is_answered_by_the_other_without_losing_a_change() {
    let Some(server) = postgres_server() else { return };
    let (a, b) = two_routers(&server).await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let node = a.register_node("gpu-watched").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    within(WITHIN, "B knows of the node approved on A", || async {
        node_on(&b, &admin_b, &node.id).await.is_some_and(|n| n["status"] != "pending")
    })
    .await;
    let (_, from_a) = changed(&a, &admin_a, "/v0/nodes?limit=10").await;

    // Cordoned through B; A learns it from the database and sends it to a client of its own.
    post(&b, &admin_b, &format!("/v0/nodes/{}/cordon", node.id), json!({})).await;
    within(WITHIN, "A shows the cordon made on B", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| n["schedulable"] == false)
    })
    .await;
    let (nodes, again_a) = changed(&a, &admin_a, &format!("/v0/nodes?limit=10&changed_since={from_a}")).await;
    assert_eq!(nodes.len(), 1, "A sends the node changed since its own revision");
    assert_eq!(nodes[0]["schedulable"], false);
    let (nodes, _) = changed(&a, &admin_a, &format!("/v0/nodes?limit=10&changed_since={again_a}")).await;
    assert!(nodes.is_empty(), "nothing changed since A's latest answer: {nodes:?}");

    // The client's next request goes to B with A's revision: B stamped the cordon by its own count, so it answers
    // from a little earlier and the cordon comes again rather than never.
    let (nodes, from_b) = changed(&b, &admin_b, &format!("/v0/nodes?limit=10&changed_since={again_a}")).await;
    assert_eq!(nodes.len(), 1, "B sends what it changed lately to a client of A");
    assert_eq!(nodes[0]["schedulable"], false);
    // Its own revision B answers exactly.
    let (nodes, _) = changed(&b, &admin_b, &format!("/v0/nodes?limit=10&changed_since={from_b}")).await;
    assert!(nodes.is_empty(), "nothing changed since B's latest answer: {nodes:?}");
}
