//! Import of the legacy `nodes.json` (SPEC §4), with the fixture from the JSON-file era.

use std::sync::Arc;

use llm_router::app::App;
use llm_router::clock::ManualClock;
use llm_router::config::Settings;
use serde_json::json;

use crate::helpers::*;

const RACK: &str = "3f1c2a4e-8b7d-4c21-9a55-0d2e6f7a8b91";
const TANAKA: &str = "a07b9e52-1d3f-4e8a-b6c4-92f1e0d3c7a5";
const MAC: &str = "5d6e7f80-91a2-4b3c-8d4e-5f6a7b8c9d0e";
const CPU_ONLY: &str = "c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f";

async fn imported() -> TestApp {
    TestApp::with(Options { legacy_nodes_json: Some(legacy_fixture()), ..Options::default() }).await
}

#[tokio::test]
async fn every_kept_field_survives_the_import() {
    let app = imported().await;
    let nodes = app.nodes().await;
    assert_eq!(nodes.len(), 3, "the entry without a GPU is left out");

    let rack = app.node(RACK).await;
    assert_eq!(rack["machine_name"], "gpu-rack1-a");
    assert_eq!(rack["ip_address"], "10.20.0.11");
    assert_eq!(rack["runtime_port"], 11434);
    assert_eq!(rack["runtime_version"], "0.3.2");
    assert_eq!(rack["display_name"], "Rack 1 / A");
    assert_eq!(rack["notes"], "primary inference box");
    assert_eq!(rack["tags"], json!(["rack1", "h100"]));
    assert_eq!(
        rack["gpu_devices"],
        json!([{"model": "NVIDIA H100 80GB HBM3", "count": 2, "memory_bytes": 85899345920u64}])
    );
    assert_eq!(rack["registered_at"], "2025-11-02T08:15:30.120Z");
    assert_eq!(rack["last_seen_at"], "2025-12-05T23:59:10.004Z");
    assert_eq!(rack["loaded_models"], json!(["gpt-oss:20b"]));
    assert_eq!(rack["status"], "offline", "imported nodes start offline");
    assert!(rack["approved_at"].is_string(), "imported nodes count as approved");

    let tanaka = app.node(TANAKA).await;
    assert_eq!(
        tanaka["gpu_devices"],
        json!([{"model": "NVIDIA GeForce RTX 4090", "count": 1, "memory_bytes": 25757220864u64},
               {"model": "NVIDIA GeForce RTX 3090", "count": 1}])
    );
    assert_eq!(tanaka["ip_address"], "192.168.1.42");
    assert!(tanaka["display_name"].is_null());

    let mac = app.node(MAC).await;
    assert_eq!(mac["gpu_devices"], json!([{"model": "Apple M2 Ultra", "count": 1}]));
    assert_eq!(mac["ip_address"], "fd00::1:5");
    assert_eq!(mac["registered_at"], "2025-10-31T01:02:03.000Z");

    let admin = app.admin_token().await;
    assert_error(app.get_node(&admin, CPU_ONLY).await, 404, "not_found").await;
    assert_eq!(app.events(RACK).await[0]["reason"], "imported from nodes.json");
    let dir = app.data_dir();
    assert!(!dir.join("nodes.json").exists());
    assert_eq!(std::fs::read(dir.join("nodes.json.migrated")).expect("renamed"), legacy_fixture());
}

#[tokio::test]
async fn imported_nodes_stay_offline_until_their_agent_registers_again() {
    let app = imported().await;
    assert_eq!(app.advance_and_sweep(3_600_000).await, 0);
    assert_eq!(app.status_of(RACK).await, "offline");
}

#[tokio::test]
async fn a_second_import_of_the_same_file_adds_nothing() {
    let app = imported().await;
    std::fs::write(app.data_dir().join("nodes.json"), legacy_fixture()).expect("put the file back");
    let app = app.restart(0).await;
    assert_eq!(app.nodes().await.len(), 3);
    assert_eq!(app.events(RACK).await.len(), 1, "no second import event");
    assert!(!app.data_dir().join("nodes.json").exists());
}

#[tokio::test]
async fn a_corrupt_file_stops_the_start_and_is_left_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let postgres = if on_sqlite() { None } else { Some(PgDatabase::for_suite().await) };
    let mut settings = Settings::new(data.clone());
    settings.admin_password = Some(ADMIN_PASSWORD.to_owned());
    settings.database_url = postgres.as_ref().map(|database| database.url().to_owned());
    for corrupt in
        [&b"[{\"id\": \"3f1c2a4e"[..], b"{\"nodes\": []}", b"[{\"machine_name\": \"a\", \"runtime_port\": \"x\"}]"]
    {
        std::fs::write(data.join("nodes.json"), corrupt).expect("write");
        let err =
            App::build(settings.clone(), Arc::new(ManualClock::new(START_MS))).await.err().expect("start refused");
        let message = format!("{err:#}");
        assert!(message.contains("nodes.json") && message.contains("corrupt"), "{message}");
        assert_eq!(std::fs::read(data.join("nodes.json")).expect("still there"), corrupt);
        assert!(!data.join("nodes.json.migrated").exists());
        assert!(!data.join("router.db").exists(), "nothing written");
    }
    if postgres.is_some() {
        // Nothing of the file reached the shared database either: without it, the router starts with no node.
        std::fs::remove_file(data.join("nodes.json")).expect("remove");
        let app = App::build(settings, Arc::new(ManualClock::new(START_MS))).await.expect("start without the file");
        let nodes = app.state.registry.len();
        app.state.store.close().await;
        assert_eq!(nodes, 0, "a refused import left nodes behind");
    }
}

#[tokio::test]
async fn an_agent_takes_over_its_imported_node_as_pending() {
    let app = imported().await;
    let mut request = registration("gpu-rack1-a", 11434);
    request["runtime_version"] = json!("0.4.0");
    let response = app.register(&request).await;
    assert_eq!(response.status(), 201);
    let answer = body(response).await;
    assert_eq!(answer["node_id"], RACK, "same id");
    assert_eq!(answer["status"], "pending");
    let node = app.node(RACK).await;
    assert_eq!(node["runtime_version"], "0.4.0");
    assert_eq!(node["display_name"], "Rack 1 / A", "the admin's fields stay");
    assert!(node["approved_at"].is_null());
    let token = answer["node_token"].as_str().expect("token").to_owned();
    let taken = TestNode { id: RACK.to_owned(), token };
    assert_eq!(body(app.heartbeat(&taken, &["m"]).await).await["status"], "pending");
    // Now it has a token: a second registration without it is a conflict.
    assert_error(app.register(&request).await, 409, "node_exists").await;
    // Approval brings it back.
    let admin = app.admin_token().await;
    assert_eq!(body(app.approve(&admin, RACK).await).await["status"], "online");
    assert_eq!(app.nodes().await.len(), 3);
}
