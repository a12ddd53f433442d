//! `llm-router migrate --from <sqlite file> --to postgres://…` (SPEC §11), with the real binary: everything a router
//! keeps arrives, a router on PostgreSQL serves it as the SQLite one did, and a second run adds nothing.

use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-router");

/// Runs `llm-router migrate`; returns its stdout, failing the test unless it exits 0.
fn migrate(from: &std::path::Path, to: &str) -> String {
    let output = Command::new(BIN).args(["migrate", "--from"]).arg(from).args(["--to", to]).output().expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "migrate failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// The line of `table` in migrate's output: (rows, copied).
fn line(stdout: &str, table: &str) -> (u64, u64) {
    let line = stdout.lines().find(|l| l.starts_with(&format!("{table}: "))).unwrap_or_else(|| panic!("{stdout}"));
    let numbers: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[tokio::test]
async fn everything_a_sqlite_router_kept_is_served_from_postgres_and_a_second_run_adds_nothing() {
    // A SQLite router with a fleet, users, keys, a join token and their history.
    let mut sqlite = TestApp::with_settings(Options::default(), |settings| settings.database_url = None).await;
    let admin = sqlite.admin_token().await;
    let online = sqlite.register_node("gpu-online").await;
    let pending = sqlite.register_node("gpu-pending").await;
    assert_eq!(sqlite.approve(&admin, &online.id).await.status(), 200);
    assert_eq!(body(sqlite.heartbeat(&online, &["llama-3"]).await).await["status"], "online");
    sqlite.state.registry.flush().await.expect("flush");
    let viewer = sqlite.user_token("viewer-1", "viewer").await;
    assert!(!viewer.is_empty());
    let key = sqlite
        .request(Method::POST, "/v0/api-keys")
        .bearer_auth(&admin)
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .expect("key");
    let key = body(key).await["key"].as_str().expect("key").to_owned();
    let join = sqlite
        .request(Method::POST, "/v0/join-tokens")
        .bearer_auth(&admin)
        .json(&json!({"name": "lab", "tags": ["lab"]}))
        .send()
        .await
        .expect("join token");
    assert_eq!(join.status(), 201);
    sqlite.state.audit.flush().await;
    let events_before = sqlite.events(&online.id).await;
    let audit_before = body(sqlite.request(Method::GET, "/v0/audit").bearer_auth(&admin).send().await.expect("audit"))
        .await
        .as_array()
        .map_or(0, Vec::len);
    sqlite.shutdown().await;

    let url = fresh_postgres_database().await;
    let db = sqlite.data_dir().join("router.db");
    let first = migrate(&db, &url);
    assert_eq!(line(&first, "nodes"), (2, 2), "{first}");
    assert_eq!(line(&first, "users"), (2, 2), "the administrator and the viewer: {first}");
    assert_eq!(line(&first, "api_keys"), (1, 1), "{first}");
    assert_eq!(line(&first, "join_tokens"), (1, 1), "{first}");
    assert_eq!(line(&first, "node_tokens"), (2, 2), "{first}");
    let (events, copied) = line(&first, "node_events");
    assert!(events >= 4 && copied == events, "{first}");
    assert!(first.contains("every row is there"), "{first}");

    let again = migrate(&db, &url);
    for table in ["nodes", "node_tokens", "node_events", "users", "sessions", "api_keys", "join_tokens", "audit_events"]
    {
        let (rows, copied) = line(&again, table);
        assert_eq!(copied, 0, "{table}: a second run adds nothing ({rows} rows)\n{again}");
    }

    // A router on PostgreSQL serves what the SQLite one kept.
    let pg = TestApp::with_settings(Options::default(), move |settings| settings.database_url = Some(url)).await;
    let admin = pg.admin_token().await;
    assert_eq!(pg.status_of(&online.id).await, "online", "as stored; a full grace period before any silence counts");
    assert_eq!(pg.status_of(&pending.id).await, "pending");
    assert_eq!(pg.node(&online.id).await["ready_models"], json!(["llama-3"]));
    assert_eq!(pg.events(&online.id).await, events_before, "the node's history, ids included");
    let answer = pg.heartbeat(&online, &["llama-3"]).await;
    assert_eq!(answer.status(), 200, "the agent's token still works");
    assert_eq!(body(answer).await["status"], "online");
    assert_eq!(pg.login("viewer-1", "user-password-1").await.status(), 200, "the password hash came along");
    let with_key = pg.request(Method::GET, "/v0/nodes").bearer_auth(&key).send().await.expect("nodes");
    assert_eq!(with_key.status(), 200, "the API key came along");
    let tokens = body(pg.request(Method::GET, "/v0/join-tokens").bearer_auth(&admin).send().await.expect("list")).await;
    assert_eq!(tokens[0]["name"], "lab");
    let audit: Value =
        body(pg.request(Method::GET, "/v0/audit").bearer_auth(&admin).send().await.expect("audit")).await;
    assert!(audit_before > 0 && audit.as_array().map_or(0, Vec::len) >= audit_before, "the audit log came along");
}

#[tokio::test]
async fn a_missing_sqlite_file_is_a_clear_error_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("router.db");
    let output = Command::new(BIN)
        .args(["migrate", "--from"])
        .arg(&missing)
        .args(["--to", "postgres://nobody@127.0.0.1:1/none"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a file"), "{stderr}");
    assert!(!missing.exists(), "no database was created");
}
