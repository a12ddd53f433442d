//! Storage (SPEC §4, §11): restarts, write-behind figures and the restart grace period, on either backend. SQLite's
//! own schema, journal, child tables and migrations are in `sqlite.rs`.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_restart_keeps_nodes_tokens_statuses_figures_and_history() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let online = app.register_node("gpu-keep").await;
    let pending = app.register_node("gpu-wait").await;
    let mut other = registration("gpu-other", 9000);
    other["gpu_devices"] = json!([{"model": "A", "count": 1}, {"model": "B", "count": 3, "memory_bytes": 7}]);
    other["tags"] = json!(["z", "a", "m"]);
    other["supported_runtimes"] = json!(["vllm", "ollama"]);
    other["loaded_models"] = json!(["m2", "m1"]);
    assert_eq!(app.register(&other).await.status(), 201);
    let heartbeat = json!({"node_id": online.id, "cpu_usage": 42.0, "loaded_models": ["m"], "ready_models": ["m"]});
    assert_eq!(app.approve(&admin, &online.id).await.status(), 200);
    assert_eq!(app.heartbeat_body(&online.token, &heartbeat).await.status(), 200);
    let patch = app.request(reqwest::Method::PATCH, &format!("/v0/nodes/{}", online.id)).bearer_auth(&admin);
    assert_eq!(patch.json(&json!({"notes": "kept"})).send().await.expect("patch").status(), 200);
    let before = app.node(&online.id).await;
    assert_eq!(before["status"], "online");
    let fleet_before = app.nodes().await;

    let app = app.restart(1_000).await;
    let after = app.node(&online.id).await;
    assert_eq!(stored(after), stored(before), "everything survives, figures included");
    assert_eq!(stored(app.nodes().await), stored(fleet_before), "every node with its lists, in order");
    assert_eq!(app.status_of(&pending.id).await, "pending");
    assert_eq!(app.events(&online.id).await.len(), 3);
    assert_eq!(body(app.heartbeat(&online, &["m"]).await).await["status"], "online");
    assert_eq!(body(app.heartbeat(&pending, &[]).await).await["status"], "pending");
    assert_eq!(app.admin_token().await.len(), 5 + 64, "users survive");
}

#[tokio::test]
async fn heartbeat_figures_are_written_behind_in_batches() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-batch").await;
    let db = app.sql().await;
    let heartbeat = json!({"node_id": node.id, "cpu_usage": 77.0, "ready_models": ["x"]});
    assert_eq!(app.heartbeat_body(&node.token, &heartbeat).await.status(), 200);
    let read =
        || async { db.fetch_one::<(Option<String>,)>("SELECT metrics FROM nodes WHERE id = $1", &[&node.id]).await.0 };
    assert_eq!(read().await, None, "not yet written");
    assert_eq!(app.state.registry.flush().await.expect("flush"), 1);
    let metrics = read().await.expect("written");
    assert!(metrics.contains("77"), "{metrics}");
    if on_sqlite() {
        // SQLite also keeps the models in a child table (PostgreSQL keeps the lists on the row only).
        let (ready,): (String,) = db
            .fetch_one("SELECT model FROM node_loaded_models WHERE node_id = $1 AND kind = 'ready'", &[&node.id])
            .await;
        assert_eq!(ready, "x");
    }
    assert_eq!(app.state.registry.flush().await.expect("flush"), 0, "nothing new to write");
}

#[tokio::test]
async fn after_a_restart_approved_nodes_get_a_full_grace_period() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("gpu-grace").await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    assert_eq!(app.heartbeat(&node, &["m"]).await.status(), 200);

    // The router was down for far longer than offline_after.
    let app = app.restart(10 * 60_000).await;
    assert_eq!(app.advance_and_sweep(0).await, 0);
    assert_eq!(app.status_of(&node.id).await, "online");
    assert_eq!(app.advance_and_sweep(29_000).await, 0);
    assert_eq!(app.status_of(&node.id).await, "online");
    assert_eq!(app.advance_and_sweep(1_000).await, 1);
    assert_eq!(app.status_of(&node.id).await, "offline");
}

#[tokio::test]
async fn three_hundred_concurrent_registrations_are_all_stored() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let client = app.client.clone();
        let url = app.url("/v0/nodes");
        tasks.push(tokio::spawn(async move {
            let response = client.post(url).json(&registration(&format!("gpu-{i:03}"), 8000)).send().await;
            let response = response.expect("send");
            assert_eq!(response.status(), 201);
            let answer: serde_json::Value = response.json().await.expect("json");
            TestNode {
                id: answer["node_id"].as_str().expect("id").to_owned(),
                token: answer["node_token"].as_str().expect("token").to_owned(),
            }
        }));
    }
    let mut nodes = Vec::new();
    for task in tasks {
        nodes.push(task.await.expect("task"));
    }
    let app = app.restart(0).await;
    assert_eq!(app.nodes().await.len(), 300);
    for node in &nodes {
        assert_eq!(app.heartbeat(node, &[]).await.status(), 200, "token of {} works", node.id);
    }
}

/// A node with every list, rewritten by a token rotation, and a plain one; returns the fleet as shown.
pub async fn fleet_with_lists(app: &TestApp) -> Vec<serde_json::Value> {
    let mut other = registration("gpu-lists", 9000);
    other["gpu_devices"] = json!([{"model": "A", "count": 1}, {"model": "B", "count": 3, "memory_bytes": 7}]);
    other["tags"] = json!(["z", "a"]);
    other["supported_runtimes"] = json!(["vllm", "ollama"]);
    other["loaded_models"] = json!(["m2", "m1"]);
    other["ready_models"] = json!(["m1"]);
    let first = app.register(&other).await;
    assert_eq!(first.status(), 201);
    let token = body(first).await["node_token"].as_str().expect("token").to_owned();
    // A token rotation rewrites every list.
    other["gpu_devices"] = json!([{"model": "C", "count": 2}]);
    other["tags"] = json!(["rotated"]);
    other["loaded_models"] = json!(["m3"]);
    let rotated = app.request(reqwest::Method::POST, "/v0/nodes").header("X-Node-Token", token).json(&other);
    assert_eq!(rotated.send().await.expect("rotate").status(), 200);
    app.register_node("gpu-plain").await;
    let nodes = app.nodes().await;
    let node = nodes.iter().find(|n| n["machine_name"] == "gpu-lists").expect("node");
    assert_eq!(node["gpu_devices"], json!([{"model": "C", "count": 2}]));
    assert_eq!(node["tags"], json!(["rotated"]));
    nodes
}

#[tokio::test]
async fn a_batch_with_a_node_deleted_meanwhile_still_writes_the_others() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let kept = app.register_node("gpu-kept").await;
    let gone = app.register_node("gpu-gone").await;
    assert_eq!(app.heartbeat(&kept, &["new-model"]).await.status(), 200);
    assert_eq!(app.heartbeat(&gone, &["new-model"]).await.status(), 200);
    let deleted = app.request(reqwest::Method::DELETE, &format!("/v0/nodes/{}", gone.id)).bearer_auth(&admin).send();
    assert_eq!(deleted.await.expect("delete").status(), 204);
    assert_eq!(app.state.registry.flush().await.expect("flush"), 1);
    let db = app.sql().await;
    if on_sqlite() {
        // SQLite also keeps the models in a child table (PostgreSQL keeps the lists on the row only).
        let (ready,): (i64,) =
            db.fetch_one("SELECT COUNT(*) FROM node_loaded_models WHERE model = 'new-model'", &[]).await;
        assert_eq!(ready, 1, "only the kept node's models are written");
    }
    let (metrics,): (Option<String>,) = db.fetch_one("SELECT metrics FROM nodes WHERE id = $1", &[&kept.id]).await;
    assert!(metrics.is_some_and(|m| m.contains("12.5")));
    // Read back by a router: the kept node with its models, the deleted one not at all.
    let app = app.restart(0).await;
    let nodes = app.nodes().await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!((&nodes[0]["id"], &nodes[0]["ready_models"]), (&json!(kept.id), &json!(["new-model"])));
}

/// Writes a node's lists every way a router does: registration and token rotation ([`fleet_with_lists`]), an
/// administrator's edit of the tags, and models changed by a heartbeat, written behind. Returns the fleet as shown.
pub async fn lists_written_every_way(app: &TestApp) -> Vec<serde_json::Value> {
    fleet_with_lists(app).await;
    let node = app.register_node("lists-writer").await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    let patched = app
        .request(reqwest::Method::PATCH, &format!("/v0/nodes/{}", node.id))
        .bearer_auth(&admin)
        .json(&json!({"tags": ["edited", "twice"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    assert_eq!(app.heartbeat(&node, &["m-ready"]).await.status(), 200);
    app.state.registry.flush().await.expect("flush");
    let fleet = app.nodes().await;
    let edited = fleet.iter().find(|n| n["machine_name"] == "lists-writer").expect("node");
    assert_eq!(edited["tags"], json!(["edited", "twice"]));
    assert_eq!(edited["ready_models"], json!(["m-ready"]));
    fleet
}

#[tokio::test]
async fn every_write_of_a_nodes_lists_is_read_back_after_a_restart() {
    let app = TestApp::spawn().await;
    let before = lists_written_every_way(&app).await;
    // Read back from the lists on the rows (on SQLite their copy beside the child rows, which `sqlite.rs` reads).
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before));
}
