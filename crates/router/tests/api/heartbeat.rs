//! `POST /v0/health` (SPEC §2.2) and every row of the state machine (SPEC §2.3).

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn tokens_are_checked_before_anything_is_recorded() {
    let app = TestApp::spawn().await;
    let a = app.register_node("gpu-a").await;
    let b = app.register_node("gpu-b").await;
    let body_a = json!({"node_id": a.id, "cpu_usage": 50.0});
    let missing = app.request(reqwest::Method::POST, "/v0/health").json(&body_a).send().await.expect("send");
    assert_error(missing, 401, "unauthorized").await;
    assert_error(app.heartbeat_body("llmn_not-a-real-token", &body_a).await, 401, "unauthorized").await;
    assert_error(app.heartbeat_body(&b.token, &body_a).await, 403, "forbidden").await;
    assert!(app.node(&a.id).await["metrics"].is_null(), "refused heartbeats record nothing");
    assert!(app.node(&a.id).await["last_seen_at"].is_null());
}

#[tokio::test]
async fn a_heartbeat_records_figures_and_the_router_clock() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-m").await;
    app.clock.advance_ms(1_500);
    let heartbeat = json!({
        "node_id": node.id,
        "cpu_usage": 37.5,
        "memory_usage": 61.0,
        "gpus": [{"index": 0, "model": "NVIDIA L4", "utilization": 88.0, "memory_used_bytes": 1000,
                  "memory_total_bytes": 24000, "temperature_c": 71.0}],
        "loaded_models": ["a", "b"],
        "ready_models": ["a"],
        "active_requests": 3
    });
    let response = app.heartbeat_body(&node.token, &heartbeat).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body(response).await, json!({"status": "pending", "heartbeat_interval_secs": 10}));
    let stored = app.node(&node.id).await;
    assert_eq!(stored["last_seen_at"], "2026-01-01T00:00:01.500Z");
    assert_eq!(stored["metrics"]["cpu_usage"], 37.5);
    assert_eq!(stored["metrics"]["memory_usage"], 61.0);
    assert_eq!(stored["metrics"]["active_requests"], 3);
    assert_eq!(stored["metrics"]["gpus"][0]["utilization"], 88.0);
    assert_eq!(stored["metrics"]["gpus"][0]["temperature_c"], 71.0);
    assert_eq!(stored["loaded_models"], json!(["a", "b"]));
    assert_eq!(stored["ready_models"], json!(["a"]));

    // The next heartbeat replaces figures and lists.
    let next = json!({"node_id": node.id, "cpu_usage": 5.0, "ready_models": []});
    assert_eq!(app.heartbeat_body(&node.token, &next).await.status(), 200);
    let stored = app.node(&node.id).await;
    assert_eq!(stored["metrics"]["cpu_usage"], 5.0);
    assert!(stored["metrics"]["memory_usage"].is_null());
    assert_eq!(stored["loaded_models"], json!([]));
    assert_eq!(stored["ready_models"], json!([]));
}

#[tokio::test]
async fn out_of_range_figures_are_400_and_change_nothing() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-bad").await;
    for (field, heartbeat) in [
        ("cpu_usage", json!({"node_id": node.id, "cpu_usage": 100.5})),
        ("memory_usage", json!({"node_id": node.id, "memory_usage": -3})),
        ("gpus[0].utilization", json!({"node_id": node.id, "gpus": [{"index": 0, "utilization": 101}]})),
        ("node_id", json!({"node_id": "not-a-uuid"})),
        ("active_requests", json!({"node_id": node.id, "active_requests": -1})),
    ] {
        let message = assert_error(app.heartbeat_body(&node.token, &heartbeat).await, 400, "invalid_request").await;
        assert!(message.contains(field), "{field}: {message}");
    }
    assert!(app.node(&node.id).await["metrics"].is_null());
}

#[tokio::test]
async fn pending_nodes_stay_pending_until_an_admin_approves() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-p").await;
    for _ in 0..3 {
        let response = app.heartbeat(&node, &["m"]).await;
        assert_eq!(body(response).await["status"], "pending");
    }
    // Silence does not make a pending node offline either.
    assert_eq!(app.advance_and_sweep(10 * 60_000).await, 0);
    assert_eq!(app.status_of(&node.id).await, "pending");
}

#[tokio::test]
async fn approval_gives_online_with_ready_models_and_registering_without() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let ready = app.register_node("gpu-ready").await;
    let idle = app.register_node("gpu-idle").await;
    assert_eq!(app.heartbeat(&ready, &["m"]).await.status(), 200);
    assert_eq!(app.heartbeat(&idle, &[]).await.status(), 200);
    app.clock.advance_ms(2_000);

    let approved = body(app.approve(&admin, &ready.id).await).await;
    assert_eq!(approved["status"], "online");
    assert_eq!(approved["approved_by"], "admin");
    assert_eq!(approved["approved_at"], "2026-01-01T00:00:02.000Z");
    assert_eq!(body(app.approve(&admin, &idle.id).await).await["status"], "registering");

    let message = assert_error(app.approve(&admin, &ready.id).await, 409, "not_pending").await;
    assert!(message.contains("online"), "{message}");
}

#[tokio::test]
async fn every_row_of_the_state_machine() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-sm").await;
    let status = |response: reqwest::Response| async move { body(response).await["status"].clone() };

    assert_eq!(status(app.heartbeat(&node, &[]).await).await, "pending");
    assert_eq!(body(app.approve(&admin, &node.id).await).await["status"], "registering");
    assert_eq!(status(app.heartbeat(&node, &[]).await).await, "registering");
    assert_eq!(status(app.heartbeat(&node, &["m"]).await).await, "online");
    assert_eq!(status(app.heartbeat(&node, &["m"]).await).await, "online");
    assert_eq!(status(app.heartbeat(&node, &[]).await).await, "registering");
    assert_eq!(status(app.heartbeat(&node, &["m"]).await).await, "online");

    // Silence: just under offline_after keeps it, reaching it marks offline.
    assert_eq!(app.advance_and_sweep(29_999).await, 0);
    assert_eq!(app.status_of(&node.id).await, "online");
    assert_eq!(app.advance_and_sweep(1).await, 1);
    assert_eq!(app.status_of(&node.id).await, "offline");
    assert_eq!(status(app.heartbeat(&node, &["m"]).await).await, "online");

    // registering nodes go offline too, and come back as registering.
    assert_eq!(status(app.heartbeat(&node, &[]).await).await, "registering");
    assert_eq!(app.advance_and_sweep(30_000).await, 1);
    assert_eq!(app.status_of(&node.id).await, "offline");
    assert_eq!(status(app.heartbeat(&node, &[]).await).await, "registering");

    let events = app.events(&node.id).await;
    let path: Vec<(String, String)> = events
        .iter()
        .rev()
        .map(|e| (e["from"].as_str().unwrap_or("-").to_owned(), e["to"].as_str().expect("to").to_owned()))
        .collect();
    let expected = [
        ("-", "pending"),
        ("pending", "registering"),
        ("registering", "online"),
        ("online", "registering"),
        ("registering", "online"),
        ("online", "offline"),
        ("offline", "online"),
        ("online", "registering"),
        ("registering", "offline"),
        ("offline", "registering"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(path, expected, "one event per transition, newest first");
    let approval = &events[events.len() - 2];
    assert_eq!(approval["actor"], "admin");
    assert_eq!(approval["reason"], "approved");
    let offline = events.iter().find(|e| e["to"] == "offline").expect("offline event");
    assert!(offline["actor"].is_null());
    assert!(offline["reason"].as_str().expect("reason").contains("no heartbeat"));
}

#[tokio::test]
async fn a_deleted_node_token_stops_working_at_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-del").await;
    assert_eq!(app.heartbeat(&node, &[]).await.status(), 200);
    let deleted =
        app.request(reqwest::Method::DELETE, &format!("/v0/nodes/{}", node.id)).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    assert_error(app.heartbeat(&node, &[]).await, 401, "unauthorized").await;
    assert_error(app.get_node(&admin, &node.id).await, 404, "not_found").await;
    // The machine can register again and is pending.
    let again = app.register(&registration("gpu-del", 8000)).await;
    assert_eq!(again.status(), 201);
    assert_eq!(body(again).await["status"], "pending");
}

#[tokio::test]
async fn gpu_health_figures_are_shown_and_survive_a_restart() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-health").await;
    let gpus = json!([
        {"index": 0, "model": "NVIDIA H100 80GB HBM3", "temperature_c": 64.0,
         "uuid": "GPU-5d2c0e8a-6f35-4b6e-9a0c-3f1e2d4c5b6a", "ecc_uncorrected": 3, "xid": 79, "power_watts": 512.25,
         "throttle_reasons": ["sw_power_cap", "hw_slowdown"]},
        {"index": 1, "uuid": "GPU-00000000-0000-0000-0000-000000000001", "ecc_uncorrected": 0,
         "throttle_reasons": []},
        {"index": 2}
    ]);
    let heartbeat = json!({"node_id": node.id, "gpus": gpus});
    assert_eq!(app.heartbeat_body(&node.token, &heartbeat).await.status(), 200);
    assert_eq!(app.node(&node.id).await["metrics"]["gpus"], gpus);
    let app = app.restart(1_000).await;
    assert_eq!(app.node(&node.id).await["metrics"]["gpus"], gpus, "the stored figures keep the health fields");
}

#[tokio::test]
async fn bad_gpu_health_figures_are_400_naming_the_field_and_change_nothing() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-health-bad").await;
    let gpu = |figures: serde_json::Value| {
        let mut gpu = json!({"index": 0});
        gpu.as_object_mut().expect("object").extend(figures.as_object().expect("object").clone());
        json!({"node_id": node.id, "gpus": [gpu]})
    };
    for (field, heartbeat) in [
        ("gpus[0].uuid", gpu(json!({"uuid": "x".repeat(97)}))),
        ("gpus[0].uuid", gpu(json!({"uuid": " "}))),
        ("gpus[0].uuid", gpu(json!({"uuid": "GPU-\u{7}"}))),
        ("gpus[0].ecc_uncorrected", gpu(json!({"ecc_uncorrected": -1}))),
        ("gpus[0].ecc_uncorrected", gpu(json!({"ecc_uncorrected": 1u64 << 60}))),
        ("gpus[0].xid", gpu(json!({"xid": 0}))),
        ("gpus[0].xid", gpu(json!({"xid": 1u64 << 33}))),
        ("gpus[0].power_watts", gpu(json!({"power_watts": -0.5}))),
        ("gpus[0].power_watts", gpu(json!({"power_watts": 1e9}))),
        ("gpus[0].throttle_reasons", gpu(json!({"throttle_reasons": vec!["hw_slowdown"; 17]}))),
        ("gpus[0].throttle_reasons[1]", gpu(json!({"throttle_reasons": ["hw_slowdown", "r".repeat(65)]}))),
        ("gpus[0].throttle_reasons[0]", gpu(json!({"throttle_reasons": [""]}))),
        ("gpus[0].throttle_reasons", gpu(json!({"throttle_reasons": "hw_slowdown"}))),
    ] {
        let message = assert_error(app.heartbeat_body(&node.token, &heartbeat).await, 400, "invalid_request").await;
        assert!(message.contains(field), "{field}: {message}");
    }
    assert!(app.node(&node.id).await["metrics"].is_null());
}
