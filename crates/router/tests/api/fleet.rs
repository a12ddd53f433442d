//! The router's own stalls and mass silences (SPEC §10), with the injected clock: no test sleeps.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, TestNode, body};

/// `n` approved nodes, each online after a heartbeat with a ready model.
async fn online_fleet(app: &TestApp, n: usize) -> Vec<TestNode> {
    let admin = app.admin_token().await;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let node = app.register_node(&format!("gpu-{i:02}")).await;
        assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
        assert_eq!(body(app.heartbeat(&node, &["m"]).await).await["status"], "online");
        nodes.push(node);
    }
    nodes
}

async fn heartbeat_all(app: &TestApp, nodes: &[TestNode]) {
    for node in nodes {
        assert_eq!(body(app.heartbeat(node, &["m"]).await).await["status"], "online");
    }
}

async fn fleet_events(app: &TestApp) -> Vec<Value> {
    // An administrator's token: viewers may list too (the dismissal test signs one in).
    let viewer = app.admin_token().await;
    let response =
        app.request(Method::GET, "/v0/fleet/events").bearer_auth(&viewer).send().await.expect("fleet events");
    assert_eq!(response.status(), 200);
    body(response).await.as_array().expect("array").clone()
}

async fn count(app: &TestApp, status: &str) -> usize {
    app.nodes().await.iter().filter(|node| node["status"] == status).count()
}

#[tokio::test]
async fn a_router_paused_for_twice_offline_after_marks_nobody_offline_on_its_first_sweep() {
    let app = TestApp::spawn().await;
    let nodes = online_fleet(&app, 12).await;
    // Silent for most of offline_after before the pause, as far as the router saw.
    assert_eq!(app.advance_and_sweep(20_000).await, 0);

    assert_eq!(app.pause_and_sweep(60_000).await, 0, "the silence during the pause is the router's");
    assert_eq!(count(&app, "online").await, 12);

    // The grace period is offline_after from the sweep that found the stall.
    assert_eq!(app.advance_and_sweep(29_000).await, 0);
    assert_eq!(count(&app, "online").await, 12);
    heartbeat_all(&app, &nodes[..2]).await;
    assert_eq!(app.advance_and_sweep(1_000).await, 10, "those that stay silent go offline after all");
    assert_eq!(count(&app, "offline").await, 10);
    assert_eq!(count(&app, "online").await, 2);
}

#[tokio::test]
async fn a_late_sweep_is_no_stall_when_it_is_less_than_half_of_offline_after_late() {
    let app = TestApp::spawn().await;
    online_fleet(&app, 2).await;
    assert_eq!(app.advance_and_sweep(20_000).await, 0);
    // 14 s late at most (15 s after the last sweep, which is due every second): silence still counts.
    assert_eq!(app.pause_and_sweep(15_000).await, 2);
}

#[tokio::test]
async fn a_mass_silence_is_reported_once_and_ends_when_the_nodes_come_back_or_an_admin_dismisses_it() {
    let app = TestApp::spawn().await;
    let nodes = online_fleet(&app, 20).await;
    assert_eq!(app.metric("llm_router_mass_silence").await, 0.0);
    assert_eq!(app.advance_and_sweep(20_000).await, 0);
    heartbeat_all(&app, &nodes[15..]).await;
    assert_eq!(app.advance_and_sweep(10_000).await, 15, "the router still marks them");

    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["kind"], "mass_silence");
    assert_eq!(events[0]["message"], "mass silence: 15 of 20 nodes");
    assert_eq!(events[0]["nodes_affected"], 15);
    assert_eq!(events[0]["nodes_live"], 20);
    assert!(events[0]["resolved_at"].is_null());
    assert_eq!(app.metric("llm_router_mass_silence").await, 1.0);
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 1.0);

    // Not again on the next sweeps.
    assert_eq!(app.advance_and_sweep(2_000).await, 0);
    assert_eq!(fleet_events(&app).await.len(), 1);
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 1.0);

    // Ten of the fifteen back: it lasts; all of them back: it ends by itself.
    heartbeat_all(&app, &nodes[..10]).await;
    assert_eq!(app.advance_and_sweep(1_000).await, 0);
    assert_eq!(app.metric("llm_router_mass_silence").await, 1.0);
    heartbeat_all(&app, &nodes[10..15]).await;
    assert_eq!(app.advance_and_sweep(1_000).await, 0);
    let events = fleet_events(&app).await;
    assert_eq!(events[0]["resolution"], "nodes returned");
    assert!(events[0]["resolved_at"].is_string());
    assert!(events[0]["resolved_by"].is_null());
    assert_eq!(app.metric("llm_router_mass_silence").await, 0.0);

    // A second one, dismissed by an administrator; a viewer may not.
    heartbeat_all(&app, &nodes).await;
    assert_eq!(app.advance_and_sweep(30_000).await, 20);
    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["message"], "mass silence: 20 of 20 nodes");
    let id = events[0]["id"].as_i64().expect("id");
    let dismiss = format!("/v0/fleet/events/{id}/dismiss");
    let viewer = app.user_token("watcher", "viewer").await;
    let refused = app.request(Method::POST, &dismiss).bearer_auth(&viewer).send().await.expect("dismiss");
    assert_eq!(refused.status(), 403);
    assert_eq!(app.metric("llm_router_mass_silence").await, 1.0);
    let admin = app.admin_token().await;
    let dismissed = app.request(Method::POST, &dismiss).bearer_auth(&admin).send().await.expect("dismiss");
    assert_eq!(dismissed.status(), 204);
    assert_eq!(app.metric("llm_router_mass_silence").await, 0.0);
    let events = fleet_events(&app).await;
    assert_eq!(events[0]["resolution"], "dismissed");
    assert_eq!(events[0]["resolved_by"], "admin");
    let again = app.request(Method::POST, &dismiss).bearer_auth(&admin).send().await.expect("dismiss");
    assert_eq!(again.status(), 404);
    // An id that is no event's, or no number at all, is 404 with the API's error body.
    for path in ["/v0/fleet/events/9223372036854775808/dismiss", "/v0/fleet/events/abc/dismiss"] {
        let unknown = app.request(Method::POST, path).bearer_auth(&admin).send().await.expect("dismiss");
        crate::helpers::assert_error(unknown, 404, "not_found").await;
    }
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 2.0);
}

#[tokio::test]
async fn half_of_the_fleet_going_silent_is_no_mass_silence() {
    let app = TestApp::spawn().await;
    let nodes = online_fleet(&app, 20).await;
    assert_eq!(app.advance_and_sweep(20_000).await, 0);
    heartbeat_all(&app, &nodes[10..]).await;
    assert_eq!(app.advance_and_sweep(10_000).await, 10);
    assert!(fleet_events(&app).await.is_empty());
    assert_eq!(app.metric("llm_router_mass_silence").await, 0.0);
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 0.0);
}

#[tokio::test]
async fn silences_that_pass_offline_after_a_few_sweeps_apart_are_one_mass_silence() {
    let app = TestApp::spawn().await;
    let nodes = online_fleet(&app, 20).await;
    // Agents heartbeat at their own phase: the partition silences them all, but eight had heartbeated 5 s before
    // the others.
    assert_eq!(app.advance_and_sweep(5_000).await, 0);
    heartbeat_all(&app, &nodes[8..]).await;
    assert_eq!(app.advance_and_sweep(25_000).await, 8, "eight of twenty: not yet more than half");
    assert!(fleet_events(&app).await.is_empty());
    heartbeat_all(&app, &nodes[15..]).await;
    assert_eq!(app.advance_and_sweep(5_000).await, 7, "seven more, 5 s later");

    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["message"], "mass silence: 15 of 20 nodes");
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 1.0);
}

#[tokio::test]
async fn the_rest_of_a_mass_silence_joins_its_event_until_offline_after_from_its_start() {
    let app = TestApp::spawn().await;
    let nodes = online_fleet(&app, 20).await;
    // The partition silences them all; twelve had last heartbeated 4 s before the others, two of which later still.
    assert_eq!(app.advance_and_sweep(4_000).await, 0);
    heartbeat_all(&app, &nodes[12..]).await;
    assert_eq!(app.advance_and_sweep(26_000).await, 12, "twelve of twenty: a mass silence");
    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["message"], "mass silence: 12 of 20 nodes");
    let started = events[0]["at"].clone();

    // Six more, 4 s after the first: the same silence, counted in the same event.
    heartbeat_all(&app, &nodes[18..]).await;
    assert_eq!(app.advance_and_sweep(4_000).await, 6);
    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["message"], "mass silence: 18 of 20 nodes");
    assert_eq!(events[0]["nodes_affected"], 18);
    assert_eq!(events[0]["nodes_live"], 20);
    assert_eq!(events[0]["at"], started, "it started when it started");
    assert!(events[0]["resolved_at"].is_null());
    assert_eq!(app.metric("llm_router_mass_silences_total").await, 1.0);

    // The last two go silent more than offline_after after its start: theirs is a silence of their own.
    assert_eq!(app.advance_and_sweep(27_000).await, 2);
    let events = fleet_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["message"], "mass silence: 18 of 20 nodes");

    // The twelve back: it lasts, for the six that joined are not.
    heartbeat_all(&app, &nodes[..12]).await;
    assert_eq!(app.advance_and_sweep(1_000).await, 0);
    assert!(fleet_events(&app).await[0]["resolved_at"].is_null());
    assert_eq!(app.metric("llm_router_mass_silence").await, 1.0);
    heartbeat_all(&app, &nodes[12..18]).await;
    assert_eq!(app.advance_and_sweep(1_000).await, 0);
    let events = fleet_events(&app).await;
    assert_eq!(events[0]["resolution"], "nodes returned", "the last two were never part of it");
    assert_eq!(app.metric("llm_router_mass_silence").await, 0.0);
}
