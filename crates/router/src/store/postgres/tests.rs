//! Tests of what only the PostgreSQL backend does: cursors over node changes and heartbeat figures, the token
//! lookup, the sweep lease, notifications, join tokens counted across routers, faults, and `llm-router migrate`.
//!
//! They need a server: `scripts/test.sh` starts one and sets `LLM_ROUTER_TEST_POSTGRES`; each test makes a database
//! of its own on it. Without it they are skipped, or fail under CI ([`test_server`]). Several stores opened on one
//! database stand for several routers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_router_protocol::{GpuDevice, NodeStatus};
use sqlx::Connection;
use uuid::Uuid;

use super::{PgStore, open, redact, test_server};
use crate::model::auth::{Role, TokenHash};
use crate::model::enrollment::{JoinToken, JoinUse, Unusable};
use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent, NodeLists};
use crate::store::{Figures, SharedStorage, Store, StoreError, UserRow};

/// A fresh, empty database on the test server ([`test_server`]); returns its URL. `None`: there is no server, and
/// the test is skipped (or fails under CI) and returns.
async fn fresh_database() -> Option<String> {
    let server = test_server()?;
    let name = format!("t_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&server).await.expect("connect to the test PostgreSQL server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let _ = conn.close().await;
    let (base, _) = server.rsplit_once('/').expect("a database URL");
    Some(format!("{base}/{name}"))
}

/// A router's store on `url`.
async fn router(url: &str) -> Store {
    open(url).await.expect("open the PostgreSQL store")
}

fn shared(store: &Store) -> &dyn SharedStorage {
    store.shared().expect("PostgreSQL is shared")
}

fn node(n: u128) -> Node {
    Node {
        id: Uuid::from_u128(n),
        machine_name: format!("gpu-{n}"),
        ip_address: "10.0.0.1".into(),
        runtime_port: 8000,
        runtime_version: "vllm 0.9".into(),
        status: NodeStatus::Pending,
        display_name: None,
        notes: Some("rack 4".into()),
        gpu_devices: vec![GpuDevice {
            model: "NVIDIA H100".into(),
            count: 8,
            memory_bytes: Some(80 << 30),
            uuids: None,
        }],
        supported_runtimes: vec!["vllm".into()],
        loaded_models: vec!["llama".into()],
        ready_models: vec!["llama".into()],
        tags: vec!["eu".into()],
        figures: None,
        registered_at: 1_767_225_600_123,
        approved_at: None,
        approved_by: None,
        join_token: None,
        cordoned: false,
        max_concurrency: Some(4),
        conditions: Default::default(),
        last_seen_at: None,
    }
}

fn token(n: u128) -> TokenHash {
    TokenHash::of(&format!("node-token-{n}"))
}

async fn insert(store: &Store, node: &Node) {
    let event = NodeEvent::new(node.id, node.registered_at, None, "pending", "registered");
    store.insert_node(node.clone(), token(node.id.as_u128()), vec![event], None).await.expect("insert a node");
}

fn figures(id: Uuid, last_seen_at: i64, metrics: &str) -> Figures {
    Figures { node_id: id, last_seen_at, figures: Some(PackedFigures::from_stored(metrics.to_owned())), lists: None }
}

#[test]
fn the_password_never_shows() {
    assert_eq!(redact("postgres://router:s3cret@db.example:5432/fleet"), "postgres://router@db.example:5432/fleet");
    assert_eq!(redact("postgres://db.example/fleet"), "postgres://db.example/fleet");
}

#[test]
fn the_database_name_replaces_the_urls() {
    use super::with_database;
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "b1").expect("url"),
        "postgres://postgres@127.0.0.1:5432/b1"
    );
    assert_eq!(with_database("postgres://u:p@h:1", "b2").expect("url"), "postgres://u:p@h:1/b2");
    assert_eq!(
        with_database("postgres://u@h/db?sslmode=disable", "b3").expect("url"),
        "postgres://u@h/b3?sslmode=disable"
    );
    assert!(with_database("h/db", "b4").is_err());
}

#[tokio::test]
async fn a_change_after_a_cursor_comes_back_with_the_next_read() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);

    let first = shared(&a).node_changes(0).await.expect("changes");
    assert!(first.nodes.is_empty() && first.deleted.is_empty());

    let n1 = node(1);
    insert(&a, &n1).await;
    let changes = shared(&b).node_changes(first.cursor).await.expect("changes");
    let row = changes.nodes.iter().find(|row| row.node.id == n1.id).expect("the new node");
    assert_eq!(row.revision, 1);
    assert_eq!(row.token, Some(token(1)));
    assert_eq!(NodeLists::of(&row.node), NodeLists::of(&n1));
    assert_eq!((row.node.registered_at, row.node.max_concurrency), (n1.registered_at, Some(4)));
    assert!(changes.cursor >= first.cursor);

    // A status change, by the other router.
    let mut approved = n1.clone();
    approved.status = NodeStatus::Registering;
    approved.approved_at = Some(n1.registered_at + 1);
    approved.approved_by = Some("admin".into());
    let event = NodeEvent::new(n1.id, n1.registered_at + 1, Some(NodeStatus::Pending), "registering", "approved");
    b.record_transition(&approved, &event).await.expect("transition");
    let next = shared(&a).node_changes(changes.cursor).await.expect("changes");
    let row = next.nodes.iter().find(|row| row.node.id == n1.id).expect("the approved node");
    assert_eq!((row.revision, row.node.status), (2, NodeStatus::Registering));
    assert_eq!(row.node.approved_by.as_deref(), Some("admin"));

    // Plain figures are no change of the node; figures with new lists are.
    a.flush_figures(&[figures(n1.id, n1.registered_at + 2, "[1.0,null,null,[]]")]).await.expect("flush");
    let mut lists = NodeLists::of(&n1);
    lists.ready_models = vec!["llama".into(), "qwen".into()];
    let mut with_lists = figures(n1.id, n1.registered_at + 3, "[2.0,null,null,[]]");
    with_lists.lists = Some(lists.clone());
    a.flush_figures(&[with_lists]).await.expect("flush");
    let next = shared(&b).node_changes(next.cursor).await.expect("changes");
    let row = next.nodes.iter().find(|row| row.node.id == n1.id).expect("the node with new lists");
    assert_eq!(row.revision, 3, "one revision for the lists, none for the plain figures");
    assert_eq!(row.node.ready_models, lists.ready_models);

    // A deletion. A row of the node read before it (a read whose snapshot predates the deletion, applied after
    // it) counts as older than the deleting router's own write, so it does not bring the node back.
    let before = shared(&a).node_changes(0).await.expect("changes");
    let gone = NodeEvent::new(n1.id, n1.registered_at + 4, Some(NodeStatus::Registering), "deleted", "deleted");
    a.delete_node(n1.id, &gone).await.expect("delete");
    let stale = before.nodes.iter().find(|row| row.node.id == n1.id).expect("the node before its deletion");
    assert!(shared(&a).written_revision(n1.id) >= stale.revision);
    let next = shared(&b).node_changes(next.cursor).await.expect("changes");
    assert_eq!(next.deleted, vec![n1.id]);
    assert!(next.nodes.iter().all(|row| row.node.id != n1.id));
    // From the start: the deletion, and no node.
    let all = shared(&b).node_changes(0).await.expect("changes");
    assert!(all.nodes.is_empty() && all.deleted == vec![n1.id]);
}

/// A transaction that took its id before a read but commits after it is found by the read after: the cursor is
/// the oldest transaction still running, not the newest seen.
#[tokio::test]
async fn a_change_committed_after_a_read_that_began_before_it_is_not_missed() {
    let Some(url) = fresh_database().await else { return };
    let a = router(&url).await;
    let n1 = node(1);
    insert(&a, &n1).await;

    let mut slow = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut tx = slow.begin().await.expect("begin");
    sqlx::query(
        "UPDATE nodes SET notes = 'slow', revision = revision + 1, changed_xid = pg_current_xact_id() WHERE id = $1",
    )
    .bind(n1.id.to_string())
    .execute(&mut *tx)
    .await
    .expect("update");
    // A later transaction commits first.
    insert(&a, &node(2)).await;
    let read = shared(&a).node_changes(0).await.expect("changes");
    assert!(read.nodes.iter().any(|row| row.node.id == node(2).id));
    let stale = read.nodes.iter().find(|row| row.node.id == n1.id).expect("node 1");
    assert_eq!(stale.node.notes.as_deref(), Some("rack 4"), "the slow change is not committed yet");
    tx.commit().await.expect("commit");

    let next = shared(&a).node_changes(read.cursor).await.expect("changes");
    let row = next.nodes.iter().find(|row| row.node.id == n1.id).expect("the slow change");
    assert_eq!((row.revision, row.node.notes.as_deref()), (2, Some("slow")));
}

#[tokio::test]
async fn seen_changes_are_the_figures_other_routers_wrote() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);
    let n1 = node(1);
    insert(&a, &n1).await;
    let start_a = shared(&a).seen_changes(0).await.expect("seen");
    let start_b = shared(&b).seen_changes(0).await.expect("seen");
    assert!(start_a.seen.is_empty() && start_b.seen.is_empty(), "no figures yet");

    a.flush_figures(&[figures(n1.id, 1_000, "[0.5,null,null,[]]")]).await.expect("flush");
    let own = shared(&a).seen_changes(start_a.cursor).await.expect("seen");
    assert!(own.seen.is_empty(), "a router's own figures are not read back: {:?}", own.seen);
    let other = shared(&b).seen_changes(start_b.cursor).await.expect("seen");
    let [seen] = other.seen.as_slice() else { panic!("one node's figures: {:?}", other.seen) };
    assert_eq!((seen.node_id, seen.last_seen_at), (n1.id, 1_000));
    assert_eq!(seen.figures.as_ref().map(PackedFigures::as_str), Some("[0.5,null,null,[]]"));

    // The other way round, from the cursors just returned.
    b.flush_figures(&[figures(n1.id, 2_000, "[0.7,null,null,[]]")]).await.expect("flush");
    let seen = shared(&a).seen_changes(own.cursor).await.expect("seen");
    assert_eq!(seen.seen.iter().map(|s| (s.node_id, s.last_seen_at)).collect::<Vec<_>>(), vec![(n1.id, 2_000)]);
    assert!(shared(&b).seen_changes(other.cursor).await.expect("seen").seen.is_empty());

    // A node deleted meanwhile is skipped; the others of the batch are written.
    let n2 = node(2);
    insert(&a, &n2).await;
    let gone = NodeEvent::new(n2.id, 3_000, Some(NodeStatus::Pending), "deleted", "deleted");
    b.delete_node(n2.id, &gone).await.expect("delete");
    a.flush_figures(&[figures(n1.id, 3_000, "[0.1,null,null,[]]"), figures(n2.id, 3_000, "[0.1,null,null,[]]")])
        .await
        .expect("a batch with a deleted node");
    let seen = shared(&b).seen_changes(other.cursor).await.expect("seen");
    assert_eq!(seen.seen.iter().map(|s| (s.node_id, s.last_seen_at)).collect::<Vec<_>>(), vec![(n1.id, 3_000)]);
}

#[tokio::test]
async fn a_node_is_found_by_its_token() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);
    let n1 = node(1);
    insert(&a, &n1).await;
    let found = shared(&b).node_by_token(token(1)).await.expect("lookup").expect("the node");
    assert_eq!((found.node.id, found.token, found.revision), (n1.id, Some(token(1)), 1));
    assert_eq!(found.node.machine_name, n1.machine_name);
    assert!(shared(&b).node_by_token(token(2)).await.expect("lookup").is_none());

    // A new token replaces the old one.
    let event = NodeEvent::new(n1.id, 5, Some(NodeStatus::Pending), "pending", "registered again");
    a.reregister_node(&n1, token(7), 5, &[event], None).await.expect("reregister");
    assert!(shared(&b).node_by_token(token(1)).await.expect("lookup").is_none());
    let found = shared(&b).node_by_token(token(7)).await.expect("lookup").expect("the node");
    assert_eq!(found.revision, 2);

    let gone = NodeEvent::new(n1.id, 6, Some(NodeStatus::Pending), "deleted", "deleted");
    a.delete_node(n1.id, &gone).await.expect("delete");
    assert!(shared(&b).node_by_token(token(7)).await.expect("lookup").is_none());
}

/// Polls `store`'s lease until it is held, for at most `within`.
async fn takes_lease(store: &Store, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if shared(store).hold_sweep_lease().await.unwrap_or(false) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_sweep_lease_is_held_by_one_router_and_passes_on_when_it_stops() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);
    assert!(shared(&a).hold_sweep_lease().await.expect("lease"));
    assert!(!shared(&b).hold_sweep_lease().await.expect("lease"));
    assert!(shared(&a).hold_sweep_lease().await.expect("lease"), "the holder keeps it");
    assert!(!shared(&b).hold_sweep_lease().await.expect("lease"));

    // Closed: the lease passes on.
    a.close().await;
    assert!(takes_lease(&b, Duration::from_secs(5)).await, "the lease passes when its holder closes");
    let c = router(&url).await;
    assert!(!shared(&c).hold_sweep_lease().await.expect("lease"));

    // Dropped without closing (a router that stopped): its connection goes, and the lease with it.
    drop(b);
    assert!(takes_lease(&c, Duration::from_secs(5)).await, "the lease passes when its holder is dropped");

    // The holder's connection killed by the server: the holder gives it up, another takes it.
    let d = router(&url).await;
    assert!(!shared(&d).hold_sweep_lease().await.expect("lease"));
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .execute(&mut admin)
    .await
    .expect("terminate the holder's connection");
    assert!(takes_lease(&d, Duration::from_secs(5)).await, "the lease passes when its holder's connection dies");
    assert!(!shared(&c).hold_sweep_lease().await.unwrap_or(false), "the old holder knows it lost it");
}

#[tokio::test]
async fn changes_wake_the_other_routers() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);
    let wait = Duration::from_secs(5);

    let nodes = shared(&b).signals().nodes.notified();
    insert(&a, &node(1)).await;
    tokio::time::timeout(wait, nodes).await.expect("a new node wakes the other router");

    let mut edited = node(1);
    edited.display_name = Some("renamed".into());
    let nodes = shared(&b).signals().nodes.notified();
    a.update_admin_fields(&edited).await.expect("edit");
    tokio::time::timeout(wait, nodes).await.expect("an edit wakes the other router");
    let row = shared(&b).node_by_token(token(1)).await.expect("lookup").expect("node");
    assert_eq!(row.node.display_name.as_deref(), Some("renamed"));

    let user = UserRow { username: "ops".into(), password_hash: "x".into(), role: Role::Admin, created_at: 1 };
    assert!(a.insert_user(&user).await.expect("user"));
    let admin = UserRow { username: "root".into(), ..user.clone() };
    assert!(a.insert_user(&admin).await.expect("user"));
    let credentials = shared(&b).signals().credentials.notified();
    a.delete_user("ops").await.expect("delete a user");
    tokio::time::timeout(wait, credentials).await.expect("a deleted user wakes the other router");
}

#[tokio::test]
async fn a_join_tokens_last_use_goes_to_one_registration_across_routers() {
    let Some(url) = fresh_database().await else { return };
    let (a, b) = (router(&url).await, router(&url).await);
    let join = JoinToken {
        id: Uuid::new_v4(),
        name: "rack-4".into(),
        hash: TokenHash::of("join-secret"),
        created_by: "admin".into(),
        created_at: 1,
        expires_at: i64::MAX,
        max_uses: Some(3),
        uses: 0,
        auto_approve: false,
        tags: vec!["rack-4".into()],
        revoked_at: None,
    };
    a.insert_join_token(&join).await.expect("join token");
    let tasks: Vec<_> = (0..12u128)
        .map(|n| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            let join = JoinUse { token_id: join.id, name: join.name.clone(), at: 10 };
            tokio::spawn(async move {
                let mut node = node(100 + n);
                node.join_token = Some(join.name.clone());
                store.insert_node(node, token(100 + n), Vec::new(), Some(join)).await
            })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(()) => stored += 1,
            Err(StoreError::JoinToken(Unusable::UsedUp)) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 3);
    let counted = b.join_token(join.hash).await.expect("read").expect("token");
    assert_eq!(counted.uses, 3);
    assert_eq!(b.load_nodes().await.expect("load").len(), 3, "the refused registrations left nothing behind");
}

#[tokio::test]
async fn a_duplicate_machine_and_port_is_refused_and_leaves_nothing() {
    let Some(url) = fresh_database().await else { return };
    let a = router(&url).await;
    insert(&a, &node(1)).await;
    let mut twin = node(2);
    twin.machine_name = node(1).machine_name;
    let event = NodeEvent::new(twin.id, 1, None, "pending", "registered");
    let refused = a.insert_node(twin.clone(), token(2), vec![event], None).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "{refused:?}");
    assert_eq!(a.load_nodes().await.expect("load").len(), 1);
    assert!(a.node_events(twin.id, 10, None).await.expect("events").is_empty());
}

#[tokio::test]
async fn a_lost_database_is_a_storage_fault() {
    let Some(url) = fresh_database().await else { return };
    let a = router(&url).await;
    insert(&a, &node(1)).await;
    assert_eq!(a.storage_faults(), 0);

    // The connection of a write killed by the server while the write waits for a row lock: the write fails as a
    // fault and is counted, and the next write succeeds on a fresh connection.
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut lock = admin.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE")
        .bind(node(1).id.to_string())
        .execute(&mut *lock)
        .await
        .expect("lock the row");
    let writer = {
        let a = a.clone();
        tokio::spawn(async move { a.update_admin_fields(&node(1)).await })
    };
    let mut url_conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut url_conn)
        .await
        .expect("terminate the waiting write");
        if killed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the write never waited for the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = writer.await.expect("task").expect_err("the write's connection was killed");
    assert!(err.fault().is_some(), "{err:#}");
    assert_eq!(a.storage_faults(), 1);
    lock.rollback().await.expect("rollback");
    a.update_admin_fields(&node(1)).await.expect("the next write succeeds");
    let faults = 1;

    // A closed store answers every call with a fault.
    a.close().await;
    let err = a.count_users().await.expect_err("closed");
    assert!(err.fault().is_some(), "{err:#}");
    assert_eq!(a.storage_faults(), faults + 1);
}

#[tokio::test]
async fn migrations_run_once_when_routers_start_together() {
    let Some(url) = fresh_database().await else { return };
    let opened = futures_util::future::join_all((0..4).map(|_| PgStore::open(&url))).await;
    for store in &opened {
        assert!(store.is_ok(), "{:?}", store.as_ref().err());
    }
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(&mut conn).await.expect("count");
    assert_eq!(applied, super::MIGRATOR.iter().count() as i64);
}

#[tokio::test]
async fn migrate_copies_every_table_once_and_routers_pick_the_nodes_up() {
    use crate::model::audit::AuditEvent;
    use crate::model::fleet_event::FleetEvent;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{ApiKeyRow, NewNode, migrate};

    let Some(url) = fresh_database().await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("router.db");
    let sqlite: Store = Arc::new(SqliteStore::open(&path).await.expect("sqlite"));
    let user = UserRow { username: "admin".into(), password_hash: "$argon2".into(), role: Role::Admin, created_at: 7 };
    sqlite.insert_user(&user).await.expect("user");
    sqlite.insert_session(TokenHash::of("session"), "admin", 8, i64::MAX).await.expect("session");
    let key = ApiKeyRow {
        id: Uuid::new_v4(),
        name: "ci".into(),
        role: Role::Viewer,
        scope: crate::model::auth::Scope::Inference,
        created_by: "admin".into(),
        created_at: 9,
        limits: crate::model::tenant::Limits { requests_per_minute: Some(60), ..Default::default() },
        weight: 3,
    };
    sqlite.insert_api_key(&key, TokenHash::of("key")).await.expect("key");
    let mut approved = node(1);
    approved.status = NodeStatus::Online;
    approved.approved_at = Some(approved.registered_at + 5);
    approved.approved_by = Some("admin".into());
    approved.cordoned = true;
    approved.last_seen_at = Some(approved.registered_at + 9);
    approved.figures = Some(PackedFigures::from_stored("[0.5,0.25,3,[]]".into()));
    let events = |n: &Node| vec![NodeEvent::new(n.id, n.registered_at, None, "pending", "registered")];
    let fleet = vec![
        NewNode { node: approved.clone(), token: Some(token(1)), events: events(&approved) },
        NewNode { node: node(2), token: None, events: events(&node(2)) },
    ];
    sqlite.import_nodes(&fleet).await.expect("nodes");
    // More than a page of the copy.
    let audit: Vec<AuditEvent> = (0..2_500)
        .map(|n| AuditEvent {
            at: 11 + n,
            actor: "admin".into(),
            client: Some("127.0.0.1".into()),
            action: "node.approve".into(),
            target: Some(approved.id.to_string()),
            outcome: "success".into(),
        })
        .collect();
    sqlite.insert_audit(&audit).await.expect("audit");
    sqlite
        .insert_fleet_event(&FleetEvent {
            id: 0,
            at: 12,
            kind: "mass_silence".into(),
            message: "mass silence".into(),
            nodes_affected: 2,
            nodes_live: 3,
            resolved_at: None,
            resolved_by: None,
            resolution: None,
        })
        .await
        .expect("fleet event");
    sqlite
        .insert_join_token(&JoinToken {
            id: Uuid::new_v4(),
            name: "rack".into(),
            hash: TokenHash::of("join"),
            created_by: "admin".into(),
            created_at: 13,
            expires_at: 14,
            max_uses: Some(2),
            uses: 1,
            auto_approve: true,
            tags: vec!["a".into()],
            revoked_at: None,
        })
        .await
        .expect("join token");
    // Usage: 2,500 requests over two days and two principals, streamed ones with a time to first token; more than a
    // page of the raw rows' copy.
    let usage: Vec<crate::model::usage::UsageRecord> = (0..2_500i64)
        .map(|i| crate::model::usage::UsageRecord {
            at: 1_767_225_600_000 + i * 69_000,
            principal: if i % 3 == 0 { "key:a".into() } else { "user:admin".into() },
            principal_name: if i % 3 == 0 { "a".into() } else { "admin".into() },
            model: if i % 2 == 0 { "m".into() } else { "n".into() },
            node: (i % 5 != 0).then_some(approved.id),
            status: if i % 5 == 0 { 429 } else { 200 },
            tokens: Some(crate::model::usage::Tokens { prompt: 10, completion: 2 }),
            ttft_ms: (i % 2 == 0).then_some(25),
            duration_ms: 40,
            retries: 0,
            stream: i % 2 == 0,
        })
        .collect();
    sqlite.insert_usage(&usage).await.expect("usage");
    sqlite.close().await;

    let first = migrate::copy(&path, &url).await.expect("migrate");
    assert!(first.len() >= 9, "every table: {first:?}");
    for table in &first {
        assert_eq!(table.added, table.rows, "{table:?}");
    }
    let count = |name: &str| first.iter().find(|t| t.table == name).map(|t| t.rows);
    assert_eq!((count("nodes"), count("node_tokens"), count("node_events")), (Some(2), Some(1), Some(2)));
    assert_eq!((count("users"), count("sessions"), count("api_keys")), (Some(1), Some(1), Some(1)));
    assert_eq!((count("join_tokens"), count("audit_events"), count("fleet_events")), (Some(1), Some(2_500), Some(1)));
    assert_eq!((count("usage_requests"), count("usage_principals")), (Some(2_500), Some(2)));
    assert_eq!((count("usage_day"), count("usage_model_day"), count("usage_node_day")), (Some(8), Some(4), Some(4)));
    let second = migrate::copy(&path, &url).await.expect("migrate again");
    for (table, again) in first.iter().zip(&second) {
        assert_eq!((again.table, again.rows, again.added), (table.table, table.rows, 0), "a second run adds nothing");
    }

    let pg = router(&url).await;
    let all_days = crate::model::usage::SeriesQuery {
        from: 0,
        to: i64::MAX / 2,
        step: crate::model::usage::Step::Day,
        group_by: Some(crate::model::usage::GroupBy::Principal),
        principal: None,
        model: None,
    };
    let copied_sums: u64 = pg.usage_series(&all_days).await.expect("series").iter().map(|b| b.sums.requests).sum();
    assert_eq!(copied_sums, 2_500);
    let bins = pg.first_token_bins(0, i64::MAX / 2).await.expect("bins");
    assert_eq!(bins.iter().map(|(_, _, n)| n).sum::<u64>(), 1_250);
    let mut nodes = pg.load_nodes().await.expect("load");
    nodes.sort_by_key(|(node, _)| node.id);
    let (copied, copied_token) = &nodes[0];
    assert_eq!(*copied_token, Some(token(1)));
    assert_eq!(NodeLists::of(copied), NodeLists::of(&approved));
    assert_eq!(
        (copied.status, copied.approved_at, copied.last_seen_at, copied.cordoned),
        (approved.status, approved.approved_at, approved.last_seen_at, true)
    );
    assert_eq!(copied.figures, approved.figures);
    assert_eq!(nodes[1].1, None);
    let changes = shared(&pg).node_changes(0).await.expect("changes");
    assert_eq!(changes.nodes.len(), 2, "copied nodes are changes the routers read");
    assert!(pg.principal(TokenHash::of("session"), 10).await.expect("principal").is_some());
    assert!(pg.principal(TokenHash::of("key"), 10).await.expect("principal").is_some());
    assert_eq!(pg.fleet_events(10).await.expect("fleet").len(), 1);
    assert_eq!(pg.join_tokens().await.expect("join tokens")[0].uses, 1);
    // The copied ids stay, and new rows get ids after them.
    let next = pg.insert_fleet_event(&pg.fleet_events(10).await.expect("fleet")[0]).await.expect("fleet event");
    assert!(next > 1);
    let history = pg.node_events(approved.id, 10, None).await.expect("events");
    assert_eq!(history.len(), 1);
    let page = crate::store::AuditQuery { limit: 3_000, before: None, actor: None, action: None };
    let copied_audit = pg.audit_events(page).await.expect("audit");
    assert_eq!(copied_audit.len(), 2_500);
    assert_eq!(copied_audit.last().map(|a| (a.id, a.event.at)), Some((1, 11)), "ids and times as they were");
}

#[tokio::test]
async fn migrate_fails_naming_the_table_whose_rows_did_not_all_arrive_and_keeps_nothing() {
    use crate::store::sqlite::SqliteStore;
    use crate::store::{ApiKeyRow, migrate};

    let Some(url) = fresh_database().await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("router.db");
    let sqlite: Store = Arc::new(SqliteStore::open(&path).await.expect("sqlite"));
    let user = UserRow { username: "admin".into(), password_hash: "$argon2".into(), role: Role::Admin, created_at: 7 };
    sqlite.insert_user(&user).await.expect("user");
    let key = ApiKeyRow {
        id: Uuid::new_v4(),
        name: "ci".into(),
        role: Role::Viewer,
        scope: crate::model::auth::Scope::Admin,
        created_by: "admin".into(),
        created_at: 9,
        limits: crate::model::tenant::Limits { requests_per_minute: Some(60), ..Default::default() },
        weight: 3,
    };
    sqlite.insert_api_key(&key, TokenHash::of("key")).await.expect("key");
    sqlite.close().await;

    // PostgreSQL already has another key with the same secret: the copy's row is left out as a conflict.
    let pg = router(&url).await;
    pg.insert_api_key(&ApiKeyRow { id: Uuid::new_v4(), ..key.clone() }, TokenHash::of("key")).await.expect("key");
    let err = migrate::copy(&path, &url).await.expect_err("a row did not arrive");
    assert!(format!("{err:#}").contains("api_keys"), "{err:#}");
    assert_eq!(pg.count_users().await.expect("users"), 0, "the copy was undone whole");
}
