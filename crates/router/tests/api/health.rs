//! Fleet health (SPEC §10): a heartbeat whose GPU figures show a missing GPU, a fault or a GPU too hot makes a live
//! node `degraded` — out of routing, with the condition in its history — until a heartbeat shows them cleared.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// A heartbeat of `node` (registered with two NVIDIA L4s, see `registration`) with `gpus` and model `m` ready.
async fn beat(app: &TestApp, node: &TestNode, gpus: Value) -> Value {
    let answer =
        app.heartbeat_body(&node.token, &json!({"node_id": node.id, "ready_models": ["m"], "gpus": gpus})).await;
    assert_eq!(answer.status(), 200);
    body(answer).await
}

fn gpu(index: u32, extra: Value) -> Value {
    let mut gpu = json!({"index": index, "model": "NVIDIA L4", "temperature_c": 55.0, "utilization": 40.0});
    if let (Some(gpu), Some(extra)) = (gpu.as_object_mut(), extra.as_object()) {
        gpu.extend(extra.clone());
    }
    gpu
}

async fn approved_node(app: &TestApp, name: &str) -> TestNode {
    let node = app.register_node(name).await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    node
}

#[tokio::test]
async fn a_critical_xid_makes_a_node_degraded_out_of_routing_until_a_clean_heartbeat() {
    let app = TestApp::spawn().await;
    let node = approved_node(&app, "gpu-a").await;
    assert_eq!(beat(&app, &node, json!([gpu(0, json!({})), gpu(1, json!({}))])).await["status"], "online");

    let answer = beat(&app, &node, json!([gpu(0, json!({})), gpu(1, json!({"xid": 79}))])).await;
    assert_eq!(answer["status"], "degraded", "the agent learns it too");
    let shown = app.node(&node.id).await;
    assert_eq!(shown["status"], "degraded");
    assert_eq!(shown["conditions"], json!(["gpu_fault"]));
    let events = app.events(&node.id).await;
    assert_eq!(events[0]["from"], "online");
    assert_eq!(events[0]["to"], "degraded");
    assert_eq!(events[0]["reason"], "gpu_fault: GPU 1: XID 79");
    assert!(app.state.registry.routing().models().is_empty(), "a degraded node takes no inference traffic");

    // The same fault again: no new event.
    beat(&app, &node, json!([gpu(0, json!({})), gpu(1, json!({"xid": 79}))])).await;
    assert_eq!(app.events(&node.id).await.len(), events.len());

    // Repaired (the agent restarted, the XID is gone): back online, with the reason.
    assert_eq!(beat(&app, &node, json!([gpu(0, json!({})), gpu(1, json!({}))])).await["status"], "online");
    let events = app.events(&node.id).await;
    assert_eq!(events[0]["to"], "online");
    assert_eq!(events[0]["reason"], "gpu_fault cleared; heartbeat reports ready models");
    assert_eq!(app.node(&node.id).await["conditions"], json!([]));
    assert_eq!(app.state.registry.routing().models(), vec!["m".to_owned()]);
    // A harmless XID (13, an application's illegal memory access) is not a fault.
    assert_eq!(beat(&app, &node, json!([gpu(0, json!({"xid": 13})), gpu(1, json!({}))])).await["status"], "online");
}

#[tokio::test]
async fn uncorrectable_ecc_errors_and_heat_over_the_limit_degrade_and_each_is_named() {
    let app = TestApp::with_settings(Options::default(), |settings| settings.gpu_max_temp_c = 85.0).await;
    let node = approved_node(&app, "gpu-a").await;
    let hot = json!({"temperature_c": 85.0});
    let answer = beat(&app, &node, json!([gpu(0, json!({"ecc_uncorrected": 3})), gpu(1, hot)])).await;
    assert_eq!(answer["status"], "degraded");
    assert_eq!(app.node(&node.id).await["conditions"], json!(["gpu_fault", "gpu_overheat"]));
    let reason = app.events(&node.id).await[0]["reason"].as_str().expect("reason").to_owned();
    assert_eq!(reason, "gpu_fault, gpu_overheat: GPU 0: 3 uncorrectable ECC errors; GPU 1: 85 °C (limit 85 °C)");
    // Cooler, the ECC count still there: still degraded, for the fault only.
    beat(&app, &node, json!([gpu(0, json!({"ecc_uncorrected": 3})), gpu(1, json!({"temperature_c": 70.0}))])).await;
    assert_eq!(app.node(&node.id).await["conditions"], json!(["gpu_fault"]));
    assert_eq!(app.status_of(&node.id).await, "degraded");
    // 84 °C is under this router's limit of 85.
    let answer = beat(&app, &node, json!([gpu(0, json!({})), gpu(1, json!({"temperature_c": 84.0}))])).await;
    assert_eq!(answer["status"], "online");
}

#[tokio::test]
async fn a_missing_gpu_degrades_and_re_announcing_the_inventory_clears_it() {
    let app = TestApp::spawn().await;
    let node = approved_node(&app, "gpu-a").await;
    // Registered with two GPUs (by count: no UUIDs); one reports.
    let answer = beat(&app, &node, json!([gpu(0, json!({}))])).await;
    assert_eq!(answer["status"], "degraded");
    assert_eq!(app.events(&node.id).await[0]["reason"], "gpu_missing: 1 of 2 GPUs reported");
    // A heartbeat without any GPU figure says nothing about the GPUs: no condition.
    let silent = app.heartbeat(&node, &["m"]).await;
    assert_eq!(body(silent).await["status"], "online", "no figures: no condition");
    beat(&app, &node, json!([gpu(0, json!({}))])).await;
    assert_eq!(app.status_of(&node.id).await, "degraded");

    // After the repair the agent re-announces its inventory with its own token: one GPU now, with its UUID.
    let mut announce = registration("gpu-a", 8000);
    announce["gpu_devices"] = json!([{"model": "NVIDIA L4", "count": 1, "uuids": ["GPU-1111"]}]);
    let again = app
        .request(Method::POST, "/v0/nodes")
        .header("X-Node-Token", &node.token)
        .json(&announce)
        .send()
        .await
        .expect("re-announce");
    assert_eq!(again.status(), 200);
    let node = TestNode { id: node.id.clone(), token: body(again).await["node_token"].as_str().expect("token").into() };
    let answer = beat(&app, &node, json!([gpu(0, json!({"uuid": "GPU-1111"}))])).await;
    assert_eq!(answer["status"], "online");
    // By UUID: another GPU in its place is a missing one.
    let answer = beat(&app, &node, json!([gpu(0, json!({"uuid": "GPU-2222"}))])).await;
    assert_eq!(answer["status"], "degraded");
    assert!(app.events(&node.id).await[0]["reason"].as_str().expect("reason").contains("missing GPU-1111"));
}

#[tokio::test]
async fn a_degraded_node_goes_offline_when_silent_and_stays_degraded_across_a_restart() {
    let app = TestApp::spawn().await;
    let node = approved_node(&app, "gpu-a").await;
    beat(&app, &node, json!([gpu(0, json!({"xid": 48})), gpu(1, json!({}))])).await;
    let app = app.restart(0).await;
    let shown = app.node(&node.id).await;
    assert_eq!(shown["status"], "degraded");
    assert_eq!(shown["conditions"], json!(["gpu_fault"]));
    let live = app.scrape().await;
    assert_eq!(live.value("llm_router_nodes", &[("status", "degraded")]), Some(1.0));

    app.advance_and_sweep(31_000).await;
    assert_eq!(app.status_of(&node.id).await, "offline");
    // Back with the fault still there: degraded again, not online.
    let answer = beat(&app, &node, json!([gpu(0, json!({"xid": 48})), gpu(1, json!({}))])).await;
    assert_eq!(answer["status"], "degraded");
    let filtered = app.request(Method::GET, "/v0/nodes?status=degraded").bearer_auth(app.admin_token().await);
    let filtered = body(filtered.send().await.expect("list")).await;
    assert_eq!(filtered.as_array().expect("nodes").len(), 1);
}
