//! Tests of SQLite itself, as the router keeps its data in it: its own schema and journal mode, the copy of a node's
//! lists beside the child tables, its migrations, its write-ahead log kept bounded, and its file in the data
//! directory. PostgreSQL has none of these (a node's lists live on its row only; the log and the files are the
//! server's), so every router here keeps its data in SQLite ([`Database::Sqlite`]).
//!
//! They run on the SQLite pass of the suite only: `scripts/test.sh` skips them on the PostgreSQL pass
//! (`--skip sqlite::`). There they would test SQLite again and count as tests of PostgreSQL, so each fails at once
//! if it is run there ([`sqlite_pass_only`]). What the router does alike over either backend (restarts,
//! write-behind figures, a full disk) is in `storage.rs` and `durability.rs`, on both passes.

use crate::durability::register_together;
use crate::helpers::*;
use crate::storage::{fleet_with_lists, lists_written_every_way};

/// The first thing every test here does: on the PostgreSQL pass (`LLM_ROUTER_TEST_BACKEND=postgres`) it fails,
/// saying that pass must skip this module.
fn sqlite_pass_only() {
    assert!(
        on_sqlite(),
        "a test of SQLite itself (sqlite::) ran on the PostgreSQL pass, where it would pass as a test of PostgreSQL \
         without testing it: that pass must skip the module with `--skip sqlite::`, as scripts/test.sh does"
    );
}

/// A router on SQLite, in its data directory.
fn on_sqlite_file() -> Options {
    Options { database: Database::Sqlite, ..Options::default() }
}

async fn sqlite_app() -> TestApp {
    TestApp::with(on_sqlite_file()).await
}

#[tokio::test]
async fn the_database_has_the_spec_tables_in_wal_mode() {
    sqlite_pass_only();
    let app = sqlite_app().await;
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
async fn rows_without_the_copy_of_their_lists_are_read_from_the_child_tables() {
    sqlite_pass_only();
    let app = sqlite_app().await;
    let before = fleet_with_lists(&app).await;
    let db = app.db().await;
    sqlx::query("UPDATE nodes SET lists = NULL").execute(&db).await.expect("clear the copies");
    db.close().await;
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before));
}

#[tokio::test]
async fn every_write_of_a_nodes_lists_keeps_the_child_rows_in_step_with_the_copy() {
    sqlite_pass_only();
    let app = sqlite_app().await;
    let before = lists_written_every_way(&app).await;
    // Read back from the child rows alone.
    let db = app.db().await;
    sqlx::query("UPDATE nodes SET lists = NULL").execute(&db).await.expect("clear the copies");
    db.close().await;
    let app = app.restart(0).await;
    assert_eq!(stored(app.nodes().await), stored(before));
}

#[tokio::test]
async fn the_migration_fills_the_copy_of_the_lists_from_the_child_tables() {
    sqlite_pass_only();
    let app = sqlite_app().await;
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

/// The migration that adds `degraded` rebuilds the nodes table (SQLite cannot change a CHECK constraint in place):
/// every node keeps its row, its lists and its token, and foreign keys are on again afterwards.
#[tokio::test]
async fn the_rebuild_of_the_nodes_table_for_degraded_keeps_every_node_with_its_lists_and_token() {
    sqlite_pass_only();
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

#[tokio::test]
async fn writes_keep_the_write_ahead_log_bounded() {
    sqlite_pass_only();
    // 1,280 pending nodes: over the default cap on pending nodes.
    let app = TestApp::with_settings(on_sqlite_file(), |settings| settings.max_pending = 0).await;
    let wal = app.data_dir().join("router.db-wal");
    let limit = 1024 * 1024;
    app.sqlite_store().limit_log(limit).await.expect("limit the log");
    let mut largest = 0;
    // Back-to-back group commits, with no pause for the background checkpoint to catch up.
    for round in 0..40 {
        let names: Vec<String> = (0..32).map(|i| format!("wal-{round}-{i}")).collect();
        let (created, failed) = register_together(&app, &names).await;
        assert_eq!((created.len(), failed.len()), (32, 0));
        largest = largest.max(std::fs::metadata(&wal).map(|meta| meta.len()).unwrap_or(0));
    }
    // Over the limit by at most what one group commit appends before the writer starts the log over.
    assert!(largest <= 2 * limit, "the log reached {largest} bytes with a limit of {limit}");
    assert_eq!(app.nodes().await.len(), 40 * 32, "starting the log over loses nothing");
    let app = app.restart(0).await;
    assert_eq!(app.nodes().await.len(), 40 * 32);
}

#[tokio::test]
async fn a_reader_that_stays_does_not_stall_writes() {
    sqlite_pass_only();
    let app = TestApp::with_settings(on_sqlite_file(), |settings| settings.max_pending = 0).await;
    app.sqlite_store().limit_log(256 * 1024).await.expect("limit the log");
    // A reader holding one snapshot throughout, as an online backup does: the log cannot start over meanwhile.
    let db = app.db().await;
    let mut reader = db.acquire().await.expect("reader");
    sqlx::query("BEGIN").execute(&mut *reader).await.expect("begin");
    let _: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM nodes").fetch_one(&mut *reader).await.expect("read");
    let mut slowest = std::time::Duration::ZERO;
    for round in 0..20 {
        let names: Vec<String> = (0..32).map(|i| format!("held-{round}-{i}")).collect();
        let started = std::time::Instant::now();
        let (created, failed) = register_together(&app, &names).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!((created.len(), failed.len()), (32, 0));
    }
    let log = std::fs::metadata(app.data_dir().join("router.db-wal")).expect("wal").len();
    assert!(log > 256 * 1024, "the reader did not hold the log ({log} bytes)");
    // Each checkpoint the reader blocks waits 200 ms at most, and the next is tried 5 s later, not on every write.
    assert!(slowest < std::time::Duration::from_secs(2), "a round of registrations took {slowest:?}");
    sqlx::query("COMMIT").execute(&mut *reader).await.expect("commit");
}

#[tokio::test]
async fn an_empty_database_in_an_initialised_directory_stops_the_start() {
    sqlite_pass_only();
    let mut app = sqlite_app().await;
    app.register_node("precious").await;
    app.shutdown().await;
    let data = app.data_dir();
    for leftover in ["router.db-wal", "router.db-shm"] {
        let _ = std::fs::remove_file(data.join(leftover));
    }
    std::fs::write(data.join("router.db"), b"").expect("truncate");
    let settings = app.settings.clone();
    let clock = std::sync::Arc::new(llm_router::clock::ManualClock::new(START_MS));
    let err = llm_router::app::App::build(settings.clone(), clock.clone()).await.err().expect("the start must stop");
    let message = format!("{err:#}");
    assert!(message.contains("empty (0 bytes)") && message.contains("Restore it from a backup"), "{message}");
    assert_eq!(std::fs::metadata(data.join("router.db")).expect("db").len(), 0, "the empty file is left alone");

    std::fs::remove_file(data.join("router.db")).expect("remove");
    let err = llm_router::app::App::build(settings.clone(), clock.clone()).await.err().expect("the start must stop");
    assert!(format!("{err:#}").contains("missing"));

    // A brand-new directory with an empty file (no marker) is a fresh install.
    let fresh = tempfile::tempdir().expect("dir");
    let mut fresh_settings = settings.clone();
    fresh_settings.data_dir = fresh.path().to_owned();
    std::fs::write(fresh.path().join("router.db"), b"").expect("empty file");
    let built = llm_router::app::App::build(fresh_settings, clock).await.expect("a fresh install starts");
    built.state.store.close().await;
}
