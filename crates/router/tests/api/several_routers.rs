//! Several routers on one PostgreSQL database (SPEC §11), in this process: each with its own clock, data directory
//! and memory, sharing nothing but the database. What one router commits shows on the other within 1 s (the
//! contract), which each test waits for with a deadline, never a fixed sleep. These tests need the test PostgreSQL
//! server (`LLM_ROUTER_TEST_POSTGRES`, started by `scripts/test.sh`) on either pass of the suite.

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// What the contract allows between a commit on one router and its effect on another.
const WITHIN: Duration = Duration::from_secs(1);

/// Two routers, A and B, on one fresh database; A started first.
async fn two_routers() -> (TestApp, TestApp) {
    let url = fresh_postgres_database().await;
    let on = |url: String| move |settings: &mut llm_router::config::Settings| settings.database_url = Some(url);
    let a = TestApp::with_settings(Options::default(), on(url.clone())).await;
    let b = TestApp::with_settings(Options::default(), on(url)).await;
    (a, b)
}

/// Polls `check` until it holds, failing the test when it does not within [`WITHIN`] of the call; returns how
/// long it took.
async fn within<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < WITHIN, "{what}: not within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn node_on(app: &TestApp, token: &str, id: &str) -> Option<Value> {
    let response = app.get_node(token, id).await;
    if response.status() == 404 {
        return None;
    }
    assert_eq!(response.status(), 200);
    Some(body(response).await)
}

#[tokio::test]
async fn a_node_registered_on_one_router_is_approved_and_heartbeats_on_the_other() {
    let (a, b) = two_routers().await;
    let (admin_a, admin_b) = (a.admin_token().await, b.admin_token().await);
    let node = a.register_node("gpu-shared").await;

    // B learns of the registration, then approves the node.
    within("B lists the node registered on A", || async { node_on(&b, &admin_b, &node.id).await.is_some() }).await;
    assert_eq!(body(b.approve(&admin_b, &node.id).await).await["status"], "registering");
    within("A shows the approval made on B", || async {
        node_on(&a, &admin_a, &node.id)
            .await
            .is_some_and(|n| n["status"] == "registering" && n["approved_by"] == "admin")
    })
    .await;

    // The agent heartbeats to B with the token A issued: accepted at once, and the node goes online everywhere.
    let answer = b.heartbeat(&node, &["llama-3"]).await;
    assert_eq!(answer.status(), 200, "B accepts a token A issued");
    assert_eq!(body(answer).await["status"], "online");
    within("A shows the node online", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| n["status"] == "online")
    })
    .await;
    // Its models come with B's next write of heartbeat figures (every second in production; here on demand).
    b.state.registry.flush().await.expect("flush on B");
    within("A routes the node's models", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| n["ready_models"] == json!(["llama-3"]))
    })
    .await;

    // B's heartbeat figures reach A once B writes them (every second in production; here on demand).
    b.clock.advance_ms(5_000);
    let figures = json!({"node_id": node.id, "cpu_usage": 77.5, "ready_models": ["llama-3"]});
    assert_eq!(b.heartbeat_body(&node.token, &figures).await.status(), 200);
    b.state.registry.flush().await.expect("flush on B");
    within("A shows B's latest heartbeat", || async {
        node_on(&a, &admin_a, &node.id).await.is_some_and(|n| n["metrics"]["cpu_usage"] == 77.5)
    })
    .await;
}

#[tokio::test]
async fn a_token_issued_by_one_router_works_on_the_other_at_once() {
    let (a, b) = two_routers().await;
    let admin_a = a.admin_token().await;
    let node = a.register_node("gpu-fresh").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    // No wait: B looks the token up in the database rather than call the agent's identity unknown.
    let answer = b.heartbeat(&node, &[]).await;
    assert_eq!(answer.status(), 200, "the node's token from A on B");
    within("B answers the approval made on A", || async {
        body(b.heartbeat(&node, &[]).await).await["status"] == "registering"
    })
    .await;
    // A token nobody issued is still refused.
    let forged = json!({"node_id": node.id});
    assert_eq!(b.heartbeat_body("llmn_0000000000000000000000000000000000000000000", &forged).await.status(), 401);
}

#[tokio::test]
async fn what_an_administrator_revokes_on_one_router_is_refused_on_the_other_within_a_second() {
    let (a, b) = two_routers().await;
    let admin_a = a.admin_token().await;
    let node = a.register_node("gpu-gone").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    assert_eq!(b.heartbeat(&node, &[]).await.status(), 200);

    // An API key made on A works on B, and stops working there once A revokes it.
    let created = a
        .request(Method::POST, "/v0/api-keys")
        .bearer_auth(&admin_a)
        .json(&json!({"name": "ci", "scope": "inference"}))
        .send()
        .await
        .expect("create key");
    assert_eq!(created.status(), 201);
    let created = body(created).await;
    let (key, key_id) =
        (created["key"].as_str().expect("key").to_owned(), created["id"].as_str().expect("id").to_owned());
    let models = || b.request(Method::GET, "/v1/models").bearer_auth(&key).send();
    assert_eq!(models().await.expect("models").status(), 200, "B accepts a key made on A");
    let revoked = a.request(Method::DELETE, &format!("/v0/api-keys/{key_id}")).bearer_auth(&admin_a).send().await;
    assert_eq!(revoked.expect("revoke").status(), 204);
    within("B refuses the revoked key", || async { models().await.expect("models").status() == 401 }).await;

    // A session ended on A is refused on B.
    let session = b.admin_token().await;
    let me = || b.request(Method::GET, "/v0/auth/me").bearer_auth(&session).send();
    assert_eq!(me().await.expect("me").status(), 200);
    let out = a.request(Method::POST, "/v0/auth/logout").bearer_auth(&session).send().await.expect("logout");
    assert_eq!(out.status(), 204);
    within("B refuses the ended session", || async { me().await.expect("me").status() == 401 }).await;

    // A node cordoned on A is cordoned on B.
    let admin_b = b.admin_token().await;
    let cordoned = a.request(Method::POST, &format!("/v0/nodes/{}/cordon", node.id)).bearer_auth(&admin_a).send().await;
    assert_eq!(cordoned.expect("cordon").status(), 200);
    within("B shows the cordon", || async {
        node_on(&b, &admin_b, &node.id).await.is_some_and(|n| n["schedulable"] == false)
    })
    .await;

    // A node deleted on A: its token is refused on B, and B lists it no more.
    let deleted = a.request(Method::DELETE, &format!("/v0/nodes/{}", node.id)).bearer_auth(&admin_a).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    within("B refuses the deleted node's token", || async { b.heartbeat(&node, &[]).await.status() == 401 }).await;
    assert!(node_on(&b, &admin_b, &node.id).await.is_none());
}

#[tokio::test]
async fn users_and_join_tokens_are_shared() {
    let (a, b) = two_routers().await;
    let admin_a = a.admin_token().await;
    let created = a
        .request(Method::POST, "/v0/users")
        .bearer_auth(&admin_a)
        .json(&json!({"username": "viewer-1", "password": "user-password-1", "role": "viewer"}))
        .send()
        .await
        .expect("create user");
    assert_eq!(created.status(), 201);
    assert_eq!(b.login("viewer-1", "user-password-1").await.status(), 200, "a user made on A signs in on B");
    let deleted = a.request(Method::DELETE, "/v0/users/viewer-1").bearer_auth(&admin_a).send().await;
    assert_eq!(deleted.expect("delete user").status(), 204);
    assert_eq!(b.login("viewer-1", "user-password-1").await.status(), 401, "a user deleted on A is gone on B");

    let token = a
        .request(Method::POST, "/v0/join-tokens")
        .bearer_auth(&admin_a)
        .json(&json!({"name": "lab", "max_uses": 2}))
        .send()
        .await
        .expect("join token");
    assert_eq!(token.status(), 201);
    let token = body(token).await;
    let join = |app: &TestApp, name: &str| {
        app.request(Method::POST, "/v0/nodes")
            .header("X-Join-Token", token["token"].as_str().expect("token"))
            .json(&registration(name, 8000))
            .send()
    };
    assert_eq!(join(&b, "joined-on-b").await.expect("join").status(), 201, "a join token made on A works on B");
    assert_eq!(join(&a, "joined-on-a").await.expect("join").status(), 201);
    let third = join(&b, "one-too-many").await.expect("join");
    assert!(
        assert_error(third, 401, "join_token_invalid").await.contains("used up"),
        "uses are counted across routers"
    );
    let id = token["id"].as_str().expect("id");
    a.request(Method::DELETE, &format!("/v0/join-tokens/{id}")).bearer_auth(&admin_a).send().await.expect("revoke");
    let listed = b.request(Method::GET, "/v0/join-tokens").bearer_auth(&b.admin_token().await).send().await;
    assert!(body(listed.expect("list")).await[0]["revoked_at"].is_string(), "B sees the revocation");
}

#[tokio::test]
async fn one_router_decides_offline_transitions_from_the_heartbeats_any_router_saw() {
    let (a, b) = two_routers().await;
    // A sweeps first: it takes the sweep lease, and B, sweeping after, finds it held.
    a.state.registry.sweep().await.expect("sweep on A");
    b.state.registry.sweep().await.expect("sweep on B");
    assert_eq!(a.metric("llm_router_sweep_lease").await, 1.0, "A holds the lease");
    assert_eq!(b.metric("llm_router_sweep_lease").await, 0.0, "B does not");

    let admin_a = a.admin_token().await;
    let node = a.register_node("gpu-far").await;
    assert_eq!(a.approve(&admin_a, &node.id).await.status(), 200);
    within("B knows of the approval", || async { body(b.heartbeat(&node, &["m"]).await).await["status"] == "online" })
        .await;
    // Both clocks move together (routers keep their clocks in step); the node heartbeats to B only.
    for _ in 0..4 {
        b.clock.advance_ms(10_000);
        assert_eq!(b.heartbeat(&node, &["m"]).await.status(), 200);
        b.state.registry.flush().await.expect("flush on B");
        let seen = b.node(&node.id).await["last_seen_at"].clone();
        within("A learns B's heartbeat", || async { a.node(&node.id).await["last_seen_at"] == seen }).await;
        a.advance_and_sweep(10_000).await;
        assert_eq!(a.status_of(&node.id).await, "online", "A counts the heartbeats B received");
    }
    // Silence everywhere: A marks the node offline after offline_after, and B follows.
    b.clock.advance_ms(31_000);
    assert_eq!(a.advance_and_sweep(31_000).await, 1);
    within("B shows the node offline", || async { b.status_of(&node.id).await == "offline" }).await;
    // B never marked it offline itself: it holds no lease.
    assert_eq!(b.advance_and_sweep(60_000).await, 0);
}

#[tokio::test]
async fn the_sweep_lease_passes_to_another_router_when_its_holder_stops() {
    let (mut a, b) = two_routers().await;
    a.state.registry.sweep().await.expect("sweep on A");
    b.state.registry.sweep().await.expect("sweep on B");
    assert_eq!(b.metric("llm_router_sweep_lease").await, 0.0);
    a.shutdown().await;
    let started = Instant::now();
    loop {
        b.state.registry.sweep().await.expect("sweep on B");
        if b.metric("llm_router_sweep_lease").await == 1.0 {
            break;
        }
        assert!(started.elapsed() < WITHIN, "B did not take the lease within {WITHIN:?} of A's stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_restarted_router_rejoins_and_sees_what_changed_meanwhile() {
    let (a, mut b) = two_routers().await;
    let admin_a = a.admin_token().await;
    let before = a.register_node("gpu-before").await;
    b.shutdown().await;
    let during = a.register_node("gpu-during").await;
    assert_eq!(a.approve(&admin_a, &before.id).await.status(), 200);
    let b = b.restart(0).await;
    let mut names: Vec<String> =
        b.nodes().await.iter().map(|n| n["machine_name"].as_str().expect("name").to_owned()).collect();
    names.sort();
    assert_eq!(names, ["gpu-before", "gpu-during"]);
    assert_eq!(b.status_of(&before.id).await, "registering");
    assert_eq!(b.status_of(&during.id).await, "pending");
    // And it follows again.
    assert_eq!(a.approve(&admin_a, &during.id).await.status(), 200);
    within("the restarted B follows A", || async { b.status_of(&during.id).await == "registering" }).await;
}

#[tokio::test]
async fn the_same_machine_registering_on_both_routers_is_one_node() {
    let (a, b) = two_routers().await;
    let node = a.register_node("gpu-twice").await;
    // At once on B, whether or not B has read A's registration yet: refused, naming the node that is there.
    let again = b.register(&registration("gpu-twice", 8000)).await;
    let message = assert_error(again, 409, "node_exists").await;
    assert!(message.contains(&node.id), "{message}");
    assert_eq!(a.nodes().await.len(), 1);
}
