//! Storage (SPEC §4, §11): restarts, write-behind figures and the restart grace period, on either backend; SQLite's
//! own schema, journal and migrations on SQLite only.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn the_database_has_the_spec_tables_in_wal_mode() {
    if !on_sqlite() {
        return; // SQLite's own schema and journal mode; this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let tables: Vec<(String,)> =
        sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table'").fetch_all(&db).await.expect("tables");
    let tables: Vec<String> = tables.into_iter().map(|t| t.0).collect();
    for table in [
        "nodes",
        "node_gpu_devices",
        "node_loaded_models",
        "node_supported_runtimes",
        "node_tags",
        "node_events",
        "users",
        "api_keys",
        "node_tokens",
    ] {
        assert!(tables.iter().any(|t| t == table), "missing table {table}: {tables:?}");
    }
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode").fetch_one(&db).await.expect("pragma");
    assert_eq!(mode, "wal");
    let (migrations,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success").fetch_one(&db).await.expect("migrations");
    assert!(migrations >= 1);
}

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

async fn fleet_with_lists(app: &TestApp) -> Vec<serde_json::Value> {
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
async fn rows_without_the_copy_of_their_lists_are_read_from_the_child_tables() {
    if !on_sqlite() {
        return; // SQLite keeps a node's lists twice (a copy on the row, child tables); this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let before = fleet_with_lists(&app).await;
    let db = app.db().await;
    sqlx::query("UPDATE nodes SET lists = NULL").execute(&db).await.expect("clear the copies");
    db.close().await;
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before));
}

#[tokio::test]
async fn the_migration_fills_the_copy_of_the_lists_from_the_child_tables() {
    if !on_sqlite() {
        return; // One of SQLite's own migrations; this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let before = fleet_with_lists(&app).await;
    let db = app.db().await;
    let expected: Vec<(String, String)> =
        sqlx::query_as("SELECT id, lists FROM nodes ORDER BY id").fetch_all(&db).await.expect("copies");
    // Back to the schema before the copy existed, then let the router migrate again.
    sqlx::query("ALTER TABLE nodes DROP COLUMN lists").execute(&db).await.expect("drop");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 2").execute(&db).await.expect("forget");
    db.close().await;
    let app = app.restart(0).await;
    let db = app.db().await;
    let migrated: Vec<(String, String)> =
        sqlx::query_as("SELECT id, lists FROM nodes ORDER BY id").fetch_all(&db).await.expect("copies");
    for ((id, want), (_, got)) in expected.iter().zip(&migrated) {
        let want: serde_json::Value = serde_json::from_str(want).expect("json");
        let got: serde_json::Value = serde_json::from_str(got).expect("json");
        assert_eq!(got, want, "node {id}");
    }
    assert_eq!(migrated.len(), 2);
    assert_eq!(stored(app.nodes().await), stored(before));
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

#[tokio::test]
async fn every_write_of_a_nodes_lists_keeps_the_copy_and_the_child_rows_in_step() {
    let app = TestApp::spawn().await;
    // Registration and token rotation.
    fleet_with_lists(&app).await;
    let node = app.register_node("lists-writer").await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    // An administrator's edit of the tags.
    let patched = app
        .request(reqwest::Method::PATCH, &format!("/v0/nodes/{}", node.id))
        .bearer_auth(&admin)
        .json(&json!({"tags": ["edited", "twice"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    // Models changed by a heartbeat, written behind.
    assert_eq!(app.heartbeat(&node, &["m-ready"]).await.status(), 200);
    app.state.registry.flush().await.expect("flush");
    let before = app.nodes().await;
    let edited = before.iter().find(|n| n["machine_name"] == "lists-writer").expect("node");
    assert_eq!(edited["tags"], json!(["edited", "twice"]));
    assert_eq!(edited["ready_models"], json!(["m-ready"]));

    // Read back from the copies on the rows (PostgreSQL: the lists on the row, its only copy)...
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before.clone()), "from the copies of the lists");
    if !on_sqlite() {
        return; // The child rows are SQLite's alone.
    }
    // ...and from the child rows alone.
    let db = app.db().await;
    sqlx::query("UPDATE nodes SET lists = NULL").execute(&db).await.expect("clear the copies");
    db.close().await;
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before), "from the child rows");
}

/// The migration that adds `degraded` rebuilds the nodes table (SQLite cannot change a CHECK constraint in place):
/// every node keeps its row, its lists and its token, and foreign keys are on again afterwards.
#[tokio::test]
async fn the_rebuild_of_the_nodes_table_for_degraded_keeps_every_node_with_its_lists_and_token() {
    if !on_sqlite() {
        return; // One of SQLite's own migrations, on a database of its own; this runs in the SQLite pass.
    }
    use sqlx::migrate::Migrator;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    let dir = tempfile::tempdir().expect("dir");
    let options =
        SqliteConnectOptions::new().filename(dir.path().join("router.db")).create_if_missing(true).foreign_keys(true);
    let db = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("open");
    let all = Migrator::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations")).await.expect("read");
    let rebuild = all.migrations.iter().find(|m| m.description.contains("degraded")).expect("the migration").version;
    let before = Migrator {
        migrations: std::borrow::Cow::Owned(all.migrations.iter().filter(|m| m.version < rebuild).cloned().collect()),
        ..Migrator::DEFAULT
    };
    before.run(&db).await.expect("the schema before");
    for statement in [
        "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, registered_at, \
         cordoned, max_concurrency) VALUES ('n1', 'gpu-a', '10.0.0.1', 8000, 'vLLM', 'online', 1, 1, 4)",
        "INSERT INTO node_gpu_devices (node_id, position, model, count) VALUES ('n1', 0, 'NVIDIA L4', 2)",
        "INSERT INTO node_tags (node_id, position, tag) VALUES ('n1', 0, 'rack-a')",
        "INSERT INTO node_tokens (node_id, token_hash, created_at) VALUES ('n1', 'abc', 1)",
    ] {
        sqlx::query(statement).execute(&db).await.expect(statement);
    }

    all.run(&db).await.expect("the rebuild");
    let (name, status, cordoned, limit, conditions): (String, String, bool, i64, Option<String>) =
        sqlx::query_as("SELECT machine_name, status, cordoned, max_concurrency, conditions FROM nodes WHERE id = 'n1'")
            .fetch_one(&db)
            .await
            .expect("the node");
    assert_eq!((name.as_str(), status.as_str(), cordoned, limit, conditions), ("gpu-a", "online", true, 4, None));
    for (table, count) in [
        ("node_gpu_devices", "SELECT COUNT(*) FROM node_gpu_devices WHERE node_id = 'n1'"),
        ("node_tags", "SELECT COUNT(*) FROM node_tags WHERE node_id = 'n1'"),
        ("node_tokens", "SELECT COUNT(*) FROM node_tokens WHERE node_id = 'n1'"),
    ] {
        let (rows,): (i64,) = sqlx::query_as(count).fetch_one(&db).await.expect("count");
        assert_eq!(rows, 1, "{table} kept its row");
    }
    let (on,): (i64,) = sqlx::query_as("PRAGMA foreign_keys").fetch_one(&db).await.expect("pragma");
    assert_eq!(on, 1, "foreign keys are on again");
    let broken: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check").fetch_all(&db).await.expect("check");
    assert!(broken.is_empty(), "{broken:?}");
    sqlx::query("UPDATE nodes SET status = 'degraded', conditions = 'gpu_fault' WHERE id = 'n1'")
        .execute(&db)
        .await
        .expect("degraded is a status now");
    assert!(sqlx::query("UPDATE nodes SET status = 'broken' WHERE id = 'n1'").execute(&db).await.is_err());
    // The cascade still works: deleting the node deletes its lists.
    sqlx::query("DELETE FROM nodes WHERE id = 'n1'").execute(&db).await.expect("delete");
    let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM node_tags").fetch_one(&db).await.expect("count");
    assert_eq!(left, 0);
}
