//! `POST /v0/nodes` (SPEC §2.1): every answer, in the order the spec checks them.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::helpers::*;

#[tokio::test]
async fn a_new_node_is_pending_and_its_token_is_shown_once() {
    let app = TestApp::spawn().await;
    let response = app.register(&registration("gpu-a", 8000)).await;
    assert_eq!(response.status(), 201);
    let answer = body(response).await;
    assert_eq!(answer["status"], "pending");
    assert_eq!(answer["heartbeat_interval_secs"], 10);
    let token = answer["node_token"].as_str().expect("token");
    assert!(token.starts_with("llmn_") && token.len() >= 5 + 32, "{token}");
    let id = answer["node_id"].as_str().expect("id");

    let node = app.node(id).await;
    assert_eq!(node["machine_name"], "gpu-a");
    assert_eq!(node["status"], "pending");
    assert_eq!(node["gpu_devices"], json!([{"model": "NVIDIA L4", "count": 2, "memory_bytes": 24_000_000_000u64}]));
    assert_eq!(node["tags"], json!(["rack-a"]));
    assert_eq!(node["supported_runtimes"], json!(["llama_cpp"]));
    assert_eq!(node["registered_at"], "2026-01-01T00:00:00.000Z");
    assert!(node["approved_at"].is_null() && node["metrics"].is_null());
    let listed = serde_json::to_string(&app.nodes().await).expect("json");
    assert!(!listed.contains(token) && !listed.contains("token"), "node JSON must never carry a token");

    // Only the SHA-256 of the token is stored.
    let stored: (String,) =
        app.sql().await.fetch_one("SELECT token_hash FROM node_tokens WHERE node_id = $1", &[id]).await;
    assert_eq!(stored.0, hex::encode(Sha256::digest(token.as_bytes())));
}

#[tokio::test]
async fn a_missing_address_means_the_peer_address() {
    let app = TestApp::spawn().await;
    let mut request = registration("gpu-peer", 8000);
    request.as_object_mut().expect("object").remove("ip_address");
    let response = app.register(&request).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["ip_address"], "127.0.0.1");
}

#[tokio::test]
async fn bad_shapes_and_values_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            "machine_name",
            json!({"runtime_port": 1, "runtime_version": "v", "gpu_devices": [{"model": "A", "count": 1}]}),
        ),
        ("machine_name", json!({"machine_name": "  ", "runtime_port": 1, "runtime_version": "v"})),
        ("machine_name", json!({"machine_name": "x".repeat(256), "runtime_port": 1, "runtime_version": "v"})),
        ("runtime_port", json!({"machine_name": "a", "runtime_port": 0, "runtime_version": "v"})),
        ("runtime_port", json!({"machine_name": "a", "runtime_port": 65536, "runtime_version": "v"})),
        ("runtime_port", json!({"machine_name": "a", "runtime_port": "80", "runtime_version": "v"})),
        ("runtime_version", json!({"machine_name": "a", "runtime_port": 1, "runtime_version": ""})),
        (
            "ip_address",
            json!({"machine_name": "a", "ip_address": "10.0.0.256", "runtime_port": 1, "runtime_version": "v"}),
        ),
        (
            "gpu_devices[0].count",
            json!({"machine_name": "a", "runtime_port": 1, "runtime_version": "v",
                                         "gpu_devices": [{"model": "A", "count": "two"}]}),
        ),
        ("tags", json!({"machine_name": "a", "runtime_port": 1, "runtime_version": "v", "tags": "rack"})),
    ];
    for (field, request) in cases {
        let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
        assert!(message.contains(field), "{field} not named in: {message}");
    }
    assert!(app.nodes().await.is_empty(), "a refused registration changes nothing");
}

#[tokio::test]
async fn no_usable_gpu_is_403_gpu_required() {
    let app = TestApp::spawn().await;
    let gpu_lists = [
        None,
        Some(json!([])),
        Some(json!([{"model": "NVIDIA L4", "count": 0}])),
        Some(json!([{"model": "NVIDIA L4", "count": -1}])),
        Some(json!([{"model": "NVIDIA L4", "count": 1}, {"model": " ", "count": 1}])),
    ];
    for gpus in gpu_lists {
        let mut request = registration("cpu-box", 8000);
        match gpus {
            Some(list) => request["gpu_devices"] = list,
            None => {
                request.as_object_mut().expect("object").remove("gpu_devices");
            }
        }
        assert_error(app.register(&request).await, 403, "gpu_required").await;
    }
    assert!(app.nodes().await.is_empty());
}

#[tokio::test]
async fn a_taken_name_and_port_is_409_with_the_recovery_steps() {
    let app = TestApp::spawn().await;
    let first = app.register_node("gpu-dup").await;
    let message = assert_error(app.register(&registration("gpu-dup", 8000)).await, 409, "node_exists").await;
    assert!(message.contains(&first.id) && message.contains("delete"), "{message}");
    // Another node's token does not help.
    let other = app.register(&registration("gpu-other", 8000)).await;
    let other_token = body(other).await["node_token"].as_str().expect("token").to_owned();
    let response = app
        .request(reqwest::Method::POST, "/v0/nodes")
        .header("X-Node-Token", &other_token)
        .json(&registration("gpu-dup", 8000))
        .send()
        .await
        .expect("send");
    assert_error(response, 409, "node_exists").await;
    // Same name on another port is another node.
    assert_eq!(app.register(&registration("gpu-dup", 8001)).await.status(), 201);
    assert_eq!(app.nodes().await.len(), 3);
}

#[tokio::test]
async fn the_node_own_token_rotates_it_and_keeps_id_and_status() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-rot").await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    let mut request = registration("gpu-rot", 8000);
    request["runtime_version"] = json!("llama.cpp b5000");
    request["tags"] = json!(["rack-b"]);
    let response = app
        .request(reqwest::Method::POST, "/v0/nodes")
        .header("X-Node-Token", &node.token)
        .json(&request)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let answer = body(response).await;
    assert_eq!(answer["node_id"], node.id.as_str());
    assert_eq!(answer["status"], "registering");
    let new_token = answer["node_token"].as_str().expect("token").to_owned();
    assert_ne!(new_token, node.token);

    let stored = app.node(&node.id).await;
    assert_eq!(stored["runtime_version"], "llama.cpp b5000");
    assert_eq!(stored["tags"], json!(["rack-b"]));
    assert_eq!(stored["approved_by"], "admin");
    assert_error(app.heartbeat(&node, &[]).await, 401, "unauthorized").await;
    let rotated = TestNode { id: node.id.clone(), token: new_token };
    assert_eq!(app.heartbeat(&rotated, &["m"]).await.status(), 200);
}

#[tokio::test]
async fn an_unreachable_runtime_is_422_naming_the_url_and_cause() {
    let app = TestApp::with(Options { reachability_check: true, ..Options::default() }).await;
    let port = closed_port().await;
    let message = assert_error(app.register(&registration("gpu-down", port)).await, 422, "node_unreachable").await;
    assert!(message.contains(&format!("http://127.0.0.1:{port}/v1/models")), "{message}");
    assert!(message.contains("connection failed"), "{message}");

    let runtime = StandInRuntime::start(&["m1"]).await;
    runtime.answer_with(StatusCode::SERVICE_UNAVAILABLE);
    let message =
        assert_error(app.register(&registration("gpu-503", runtime.addr.port())).await, 422, "node_unreachable").await;
    assert!(message.contains("503"), "{message}");

    runtime.answer_with(StatusCode::OK);
    runtime.delay(Duration::from_secs(3));
    let message =
        assert_error(app.register(&registration("gpu-slow", runtime.addr.port())).await, 422, "node_unreachable").await;
    assert!(message.contains("did not answer in time"), "{message}");
    assert!(app.nodes().await.is_empty());
}

#[tokio::test]
async fn a_reachable_runtime_fills_loaded_models_when_none_were_given() {
    let app = TestApp::with(Options { reachability_check: true, ..Options::default() }).await;
    let runtime = StandInRuntime::start(&["llama-3-8b", "qwen-7b"]).await;
    let response = app.register(&registration("gpu-up", runtime.addr.port())).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["loaded_models"], json!(["llama-3-8b", "qwen-7b"]));

    let mut request = registration("gpu-given", runtime.addr.port());
    request["loaded_models"] = json!(["own-model"]);
    let response = app.register(&request).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["loaded_models"], json!(["own-model"]));
}

#[tokio::test]
async fn uniqueness_is_checked_before_reachability() {
    let app = TestApp::with(Options { reachability_check: true, ..Options::default() }).await;
    let runtime = StandInRuntime::start(&[]).await;
    assert_eq!(app.register(&registration("gpu-order", runtime.addr.port())).await.status(), 201);
    runtime.answer_with(StatusCode::INTERNAL_SERVER_ERROR);
    assert_error(app.register(&registration("gpu-order", runtime.addr.port())).await, 409, "node_exists").await;
}

#[tokio::test]
async fn concurrent_registrations_of_one_machine_create_exactly_one_node() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = app.client.clone();
        let url = app.url("/v0/nodes");
        tasks.push(tokio::spawn(async move {
            client.post(url).json(&registration("gpu-race", 8000)).send().await.expect("send").status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 19, "{statuses:?}");
    assert_eq!(app.nodes().await.len(), 1);
}

#[tokio::test]
async fn gpu_uuids_are_kept_and_survive_a_restart() {
    let app = TestApp::spawn().await;
    let mut request = registration("gpu-uuids", 8000);
    let devices = json!([
        {"model": "NVIDIA L4", "count": 2, "memory_bytes": 24_000_000_000u64,
         "uuids": ["GPU-00000000-0000-0000-0000-000000000001", "GPU-00000000-0000-0000-0000-000000000002"]},
        {"model": "NVIDIA T4", "count": 1}
    ]);
    request["gpu_devices"] = devices.clone();
    let response = app.register(&request).await;
    assert_eq!(response.status(), 201);
    let id = body(response).await["node_id"].as_str().expect("id").to_owned();
    assert_eq!(app.node(&id).await["gpu_devices"], devices);
    let app = app.restart(1_000).await;
    assert_eq!(app.node(&id).await["gpu_devices"], devices, "the stored GPU groups keep their uuids");
}

#[tokio::test]
async fn bad_gpu_uuids_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    for (field, uuids) in [
        ("gpu_devices[0].uuids", json!(["GPU-1"])),
        ("gpu_devices[0].uuids", json!(["GPU-1", "GPU-2", "GPU-3"])),
        ("gpu_devices[0].uuids[1]", json!(["GPU-1", "u".repeat(97)])),
        ("gpu_devices[0].uuids[0]", json!(["", "GPU-2"])),
        ("gpu_devices[0].uuids[0]", json!(["GPU-\n", "GPU-2"])),
    ] {
        let mut request = registration("gpu-bad-uuids", 8000);
        request["gpu_devices"][0]["uuids"] = uuids;
        let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
        assert!(message.contains(field), "{field}: {message}");
    }
    assert!(app.nodes().await.is_empty(), "nothing was stored");
}
