//! Bounded work for anonymous registrations (SPEC §9): the per-address rate limit, the pending cap, and the expiry
//! of pending nodes that never heartbeat. Time moves on the manual clock.

use std::time::{Duration, Instant};

use reqwest::{Method, Response};
use serde_json::Value;

use crate::helpers::*;

const HOUR_MS: i64 = 3_600_000;

fn retry_after(response: &Response) -> u64 {
    let value = response.headers().get("retry-after").expect("Retry-After header");
    value.to_str().expect("text").parse().expect("seconds")
}

async fn register_via(app: &TestApp, body: &Value, forwarded_for: &str) -> Response {
    app.request(Method::POST, "/v0/nodes")
        .header("X-Forwarded-For", forwarded_for)
        .json(body)
        .send()
        .await
        .expect("register")
}

/// Asserts a 429 with `code` and returns its `Retry-After`.
async fn assert_429(response: Response, code: &str) -> u64 {
    let secs = retry_after(&response);
    assert_error(response, 429, code).await;
    secs
}

#[tokio::test]
async fn anonymous_registrations_are_limited_per_address_and_recover_with_time() {
    // Two a minute, bursts of four.
    let app = TestApp::with(Options { registration_rate: 2, ..Options::default() }).await;
    for i in 0..4 {
        app.register_node(&format!("burst-{i}")).await;
    }
    let refused = app.register(&registration("burst-4", 8000)).await;
    assert_eq!(assert_429(refused, "rate_limited").await, 30, "the next token comes in half a minute");
    assert_eq!(app.metric("llm_router_registrations_rate_limited_total").await, 1.0);
    assert_eq!(app.nodes().await.len(), 4, "the refused registration stored nothing");

    app.clock.advance_ms(29_000);
    assert_eq!(assert_429(app.register(&registration("burst-4", 8000)).await, "rate_limited").await, 1);
    app.clock.advance_ms(1_000);
    app.register_node("burst-4").await;
    assert_429(app.register(&registration("burst-5", 8000)).await, "rate_limited").await;
    assert_eq!(app.metric("llm_router_registrations_rate_limited_total").await, 3.0);
}

#[tokio::test]
async fn each_client_address_behind_a_trusted_proxy_has_its_own_limit() {
    let app = TestApp::with_settings(Options { registration_rate: 1, ..Options::default() }, |settings| {
        settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    for i in 0..2 {
        let response = register_via(&app, &registration(&format!("a-{i}"), 8000), "198.51.100.7").await;
        assert_eq!(response.status(), 201);
    }
    assert_429(register_via(&app, &registration("a-2", 8000), "198.51.100.7").await, "rate_limited").await;
    let other = register_via(&app, &registration("b-0", 8000), "198.51.100.8").await;
    assert_eq!(other.status(), 201, "another address is not limited by the first one's registrations");
}

#[tokio::test]
async fn the_limits_apply_before_the_reachability_probe() {
    let app = TestApp::with(Options { reachability_check: true, registration_rate: 1, ..Options::default() }).await;
    let port = closed_port().await;
    // A refused probe still used a token: the limit is checked first, so every attempt costs the caller.
    for i in 0..2 {
        let response = app.register(&registration(&format!("down-{i}"), port)).await;
        assert_error(response, 422, "node_unreachable").await;
    }
    assert_429(app.register(&registration("down-2", port)).await, "rate_limited").await;

    let app = TestApp::with_settings(Options { reachability_check: true, ..Options::default() }, |settings| {
        settings.max_pending = 1;
    })
    .await;
    let runtime = StandInRuntime::start(&["m1"]).await;
    assert_eq!(app.register(&registration("up", runtime.addr.port())).await.status(), 201);
    assert_429(app.register(&registration("down", port)).await, "too_many_pending").await;
}

#[tokio::test]
async fn a_registration_with_the_node_own_token_is_not_anonymous() {
    let app = TestApp::with(Options { registration_rate: 1, ..Options::default() }).await;
    let node = app.register_node("gpu-a").await;
    app.register_node("gpu-b").await;
    assert_429(app.register(&registration("gpu-c", 8000)).await, "rate_limited").await;
    let rotated = app
        .request(Method::POST, "/v0/nodes")
        .header("X-Node-Token", &node.token)
        .json(&registration("gpu-a", 8000))
        .send()
        .await
        .expect("re-register");
    assert_eq!(rotated.status(), 200, "a token rotation is neither rate limited nor counted");
}

#[tokio::test]
async fn the_pending_cap_refuses_more_until_places_free_up() {
    let app = TestApp::with_settings(Options::default(), |settings| settings.max_pending = 2).await;
    let a = app.register_node("gpu-a").await;
    let b = app.register_node("gpu-b").await;
    let refused = app.register(&registration("gpu-c", 8000)).await;
    assert_eq!(assert_429(refused, "too_many_pending").await, 60);
    assert_eq!(app.metric("llm_router_registrations_too_many_pending_total").await, 1.0);

    // An approval frees a place, and so does a deletion.
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &a.id).await.status(), 200);
    app.register_node("gpu-c").await;
    assert_429(app.register(&registration("gpu-d", 8000)).await, "too_many_pending").await;
    let deleted =
        app.request(Method::DELETE, &format!("/v0/nodes/{}", b.id)).bearer_auth(&admin).send().await.expect("delete");
    assert_eq!(deleted.status(), 204);
    app.register_node("gpu-d").await;

    // The count survives a restart: gpu-c and gpu-d are still pending.
    let app = app.restart(0).await;
    assert_429(app.register(&registration("gpu-e", 8000)).await, "too_many_pending").await;
    assert_eq!(app.state.registry.pending_count(), 2);
}

#[tokio::test]
async fn pending_nodes_silent_for_the_ttl_are_removed_with_an_event() {
    let app = TestApp::with_settings(Options::default(), |settings| settings.max_pending = 2).await;
    let ttl_ms = 72 * HOUR_MS;
    let admin = app.admin_token().await;
    let approved = app.register_node("gpu-approved").await;
    assert_eq!(app.approve(&admin, &approved.id).await.status(), 200);
    let silent = app.register_node("gpu-silent").await;
    let alive = app.register_node("gpu-alive").await;

    app.clock.advance_ms(71 * HOUR_MS);
    assert_eq!(app.heartbeat(&alive, &["m"]).await.status(), 200, "a pending node may heartbeat");
    app.clock.advance_ms(HOUR_MS - 1);
    assert_eq!(app.state.registry.expire_pending(ttl_ms).await.expect("expire"), 0, "not yet");
    app.clock.advance_ms(1);
    assert_eq!(app.state.registry.expire_pending(ttl_ms).await.expect("expire"), 1);

    let admin = app.admin_token().await;
    assert_eq!(app.get_node(&admin, &silent.id).await.status(), 404);
    assert_error(app.heartbeat(&silent, &["m"]).await, 401, "unauthorized").await;
    assert_eq!(app.status_of(&alive.id).await, "pending");
    app.get_node(&admin, &approved.id).await.error_for_status().expect("an approved node never expires");
    assert_eq!(app.metric("llm_router_pending_expired_total").await, 1.0);

    let (from, to, reason, actor): (Option<String>, String, String, Option<String>) = app
        .sql()
        .await
        .fetch_one(
            "SELECT from_status, to_status, reason, actor FROM node_events WHERE node_id = $1 ORDER BY id DESC LIMIT 1",
            &[&silent.id],
        )
        .await;
    assert_eq!((from.as_deref(), to.as_str(), actor), (Some("pending"), "deleted", None));
    assert!(reason.contains("pending for 72 h without a heartbeat"), "{reason}");

    // Its name and port are free, and its place under the pending cap too.
    app.register_node("gpu-silent").await;
    assert_429(app.register(&registration("gpu-more", 8000)).await, "too_many_pending").await;
}

#[tokio::test]
async fn the_router_removes_expired_pending_nodes_by_itself() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.pending_ttl = Duration::from_secs(100);
    })
    .await;
    let node = app.register_node("gpu-silent").await;
    let admin = app.admin_token().await;
    app.clock.advance_ms(100_000);
    // The background task checks every second for this TTL.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get_node(&admin, &node.id).await.status() != 404 {
        assert!(Instant::now() < deadline, "the silent pending node was not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.metric("llm_router_pending_expired_total").await, 1.0);
}
