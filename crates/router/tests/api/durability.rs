//! Durability under faults (SPEC §9): a write the database cannot make is a 503 for that request only, nothing of
//! it stays in memory, no acknowledged node is lost, and the router recovers by itself when space returns. The
//! database is made "full" with SQLite's `max_page_count`, which is what a full disk looks like to SQLite.

use std::collections::BTreeSet;

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use llm_router::store::sqlite::SqliteStore;

use crate::helpers::*;

/// The SQLite store under the app, for its fault-injection seams (the tests that use them run on SQLite only).
fn sqlite(app: &TestApp) -> &SqliteStore {
    app.state.store.as_any().downcast_ref::<SqliteStore>().expect("the router runs on SQLite")
}

/// Lets the database grow by `extra` pages from its current size.
async fn fill_up(app: &TestApp, extra: u64) {
    let pages = sqlite(app).page_count().await.expect("page count");
    sqlite(app).limit_pages(Some(pages + extra)).await.expect("limit pages");
}

async fn make_room(app: &TestApp) {
    sqlite(app).limit_pages(None).await.expect("lift the page limit");
}

/// Names of every node the router shows.
async fn machine_names(app: &TestApp) -> BTreeSet<String> {
    app.nodes().await.iter().map(|node| node["machine_name"].as_str().expect("name").to_owned()).collect()
}

/// Registers `names` all at once (so they share group commits); returns the names answered 201 and 503.
async fn register_together(app: &TestApp, names: &[String]) -> (Vec<String>, Vec<String>) {
    let bodies: Vec<Value> = names.iter().map(|name| registration(name, 8000)).collect();
    let answers = join_all(bodies.iter().map(|body| app.register(body))).await;
    let (mut created, mut refused) = (Vec::new(), Vec::new());
    for (name, response) in names.iter().zip(answers) {
        match response.status().as_u16() {
            201 => created.push(name.clone()),
            503 => {
                assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
                assert_error(response, 503, "storage_unavailable").await;
                refused.push(name.clone());
            }
            other => panic!("registering {name}: unexpected {other}: {}", response.text().await.unwrap_or_default()),
        }
    }
    (created, refused)
}

#[tokio::test]
async fn a_full_database_refuses_writes_with_503_and_loses_no_acknowledged_node() {
    if !on_sqlite() {
        return; // A full disk is made with SQLite's page limit; this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let mut acknowledged = BTreeSet::new();
    let mut refused = BTreeSet::new();
    fill_up(&app, 8).await;
    // Rounds of concurrent registrations until the database is full: each round shares group commits.
    for round in 0..200 {
        let names: Vec<String> = (0..16).map(|i| format!("full-{round}-{i}")).collect();
        let (created, failed) = register_together(&app, &names).await;
        acknowledged.extend(created);
        let full = !failed.is_empty();
        refused.extend(failed);
        if full && refused.len() >= 32 {
            break;
        }
    }
    assert!(!refused.is_empty(), "the database never filled up");
    assert!(!acknowledged.is_empty(), "nothing fitted before the database filled up");
    let metrics = app.request(Method::GET, "/metrics").send().await.expect("metrics").text().await.expect("text");
    let faults: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("llm_router_storage_errors_total "))
        .and_then(|value| value.parse().ok())
        .expect("llm_router_storage_errors_total");
    assert!(faults > 0, "storage faults are counted");

    // Nothing of a refused registration stays in memory: the router shows exactly what it acknowledged.
    assert_eq!(machine_names(&app).await, acknowledged);

    // Sign-ins while the database is full either work or say so: never a token that does not work. (The database
    // may not grow at all now; sessions fill what room its pages have left, then fail.)
    fill_up(&app, 0).await;
    let mut logins_refused = 0;
    for _ in 0..300 {
        if logins_refused == 3 {
            break;
        }
        let response = app.login("admin", ADMIN_PASSWORD).await;
        if response.status() == 503 {
            assert_error(response, 503, "storage_unavailable").await;
            logins_refused += 1;
            continue;
        }
        assert_eq!(response.status(), 200);
        let token = body(response).await["token"].as_str().expect("token").to_owned();
        let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&token).send().await.expect("me");
        assert_eq!(me.status(), 200, "a sign-in answered 200 with a token that does not work");
    }
    assert!(logins_refused > 0, "no sign-in met the full database");

    // Space returns: the router writes again by itself, without a restart.
    make_room(&app).await;
    let later: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    let (created, failed) = register_together(&app, &later).await;
    assert!(failed.is_empty(), "registrations still fail after space returned: {failed:?}");
    acknowledged.extend(created);
    let token = app.admin_token().await;
    let me = app.request(Method::GET, "/v0/auth/me").bearer_auth(&token).send().await.expect("me");
    assert_eq!(me.status(), 200);

    // After a restart, every acknowledged node is there and no refused one is.
    let app = app.restart(0).await;
    assert_eq!(machine_names(&app).await, acknowledged);
    assert!(refused.iter().all(|name| !acknowledged.contains(name)));
}

#[tokio::test]
async fn a_failed_approval_changes_nothing_and_succeeds_once_space_returns() {
    if !on_sqlite() {
        return; // A full disk is made with SQLite's page limit; this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes: Vec<TestNode> = {
        let mut nodes = Vec::new();
        for i in 0..300 {
            nodes.push(app.register_node(&format!("approve-{i}")).await);
        }
        nodes
    };
    fill_up(&app, 0).await;
    let mut approved = 0;
    let mut refused = Vec::new();
    for node in &nodes {
        let response = app.approve(&admin, &node.id).await;
        match response.status().as_u16() {
            200 => approved += 1,
            503 => {
                assert_error(response, 503, "storage_unavailable").await;
                refused.push(node.clone());
            }
            other => panic!("approve: unexpected {other}"),
        }
    }
    assert!(!refused.is_empty(), "no approval met the full database");
    for node in &refused {
        let shown = body(app.get_node(&admin, &node.id).await).await;
        assert_eq!(shown["status"], "pending", "a refused approval changed the node in memory");
    }
    make_room(&app).await;
    let response = app.approve(&admin, &refused[0].id).await;
    assert_eq!(response.status(), 200);
    let app = app.restart(0).await;
    assert_eq!(app.status_of(&refused[0].id).await, "registering");
    for node in &refused[1..] {
        assert_eq!(app.status_of(&node.id).await, "pending");
    }
    let stored_approved = app.nodes().await.iter().filter(|node| node["status"] == "registering").count();
    assert_eq!(stored_approved, approved + 1);
}

#[tokio::test]
async fn concurrent_token_rotations_have_exactly_one_winner() {
    let app = TestApp::spawn().await;
    let node = app.register_node("rotating").await;
    let request = registration("rotating", 8000);
    let answers = join_all(
        (0..8)
            .map(|_| app.request(Method::POST, "/v0/nodes").header("X-Node-Token", &node.token).json(&request).send()),
    )
    .await;
    let mut winners = Vec::new();
    for response in answers {
        let response = response.expect("rotate");
        match response.status().as_u16() {
            200 => winners.push(body(response).await["node_token"].as_str().expect("token").to_owned()),
            409 => {
                assert_error(response, 409, "node_exists").await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation wins");
    let heartbeat = json!({"node_id": node.id, "cpu_usage": 1.0});
    assert_eq!(app.heartbeat_body(&winners[0], &heartbeat).await.status(), 200, "the winner's token works");
    assert_eq!(app.heartbeat_body(&node.token, &heartbeat).await.status(), 401, "the old token is revoked");
}

async fn events_page(app: &TestApp, admin: &str, id: &str, query: &str) -> reqwest::Response {
    app.request(Method::GET, &format!("/v0/nodes/{id}/events{query}")).bearer_auth(admin).send().await.expect("events")
}

#[tokio::test]
async fn events_are_paged_newest_first() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("paged").await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    for i in 0..5 {
        let ready: &[&str] = if i % 2 == 0 { &["m"] } else { &[] };
        assert_eq!(app.heartbeat(&node, ready).await.status(), 200);
    }
    // registered, approved, then five flips: seven events.
    let all = app.events(&node.id).await;
    assert_eq!(all.len(), 7);

    let first = events_page(&app, &admin, &node.id, "?limit=3").await;
    assert_eq!(first.status(), 200);
    let link = first.headers().get("link").and_then(|v| v.to_str().ok()).expect("Link to the next page").to_owned();
    let page: Vec<Value> = body(first).await.as_array().expect("array").clone();
    assert_eq!(page, all[..3]);
    let before = page[2]["id"].as_i64().expect("id");
    assert_eq!(link, format!("</v0/nodes/{}/events?limit=3&before={before}>; rel=\"next\"", node.id));

    let second = events_page(&app, &admin, &node.id, &format!("?limit=3&before={before}")).await;
    let page: Vec<Value> = body(second).await.as_array().expect("array").clone();
    assert_eq!(page, all[3..6]);
    let last = events_page(&app, &admin, &node.id, &format!("?limit=3&before={}", all[5]["id"])).await;
    assert!(last.headers().get("link").is_none(), "a short page is the last");
    assert_eq!(body(last).await.as_array().expect("array").as_slice(), &all[6..]);

    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?before=0", "?before=-3"] {
        assert_error(events_page(&app, &admin, &node.id, bad).await, 400, "invalid_request").await;
    }
}

#[tokio::test]
async fn a_flapping_node_keeps_only_its_newest_thousand_events() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let node = app.register_node("flapping").await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    for i in 0..1010 {
        let ready: &[&str] = if i % 2 == 0 { &["m"] } else { &[] };
        assert_eq!(app.heartbeat(&node, ready).await.status(), 200);
    }
    let db = app.sql().await;
    let (kept, newest_reason): (i64, String) = db
        .fetch_one(
            "SELECT COUNT(*), (SELECT reason FROM node_events WHERE node_id = $1 ORDER BY id DESC LIMIT 1) \
             FROM node_events WHERE node_id = $1",
            &[&node.id],
        )
        .await;
    assert_eq!(kept, 1000);
    assert_eq!(newest_reason, "heartbeat reports no ready model", "the newest event is kept");
    let (registered,): (i64,) = db
        .fetch_one("SELECT COUNT(*) FROM node_events WHERE node_id = $1 AND reason = 'registered'", &[&node.id])
        .await;
    assert_eq!(registered, 0, "the oldest events went first");
}

#[tokio::test]
async fn events_past_the_retention_period_are_removed() {
    let app = TestApp::spawn().await;
    let old = app.register_node("old").await;
    app.clock.advance_ms(29 * 86_400_000);
    let young = app.register_node("young").await;
    assert_eq!(llm_router::app::prune_events(&app.state).await.expect("prune"), 0);
    app.clock.advance_ms(2 * 86_400_000);
    // Day 31: the first node's registration is past the default 30 days, the second's is not.
    assert_eq!(llm_router::app::prune_events(&app.state).await.expect("prune"), 1);
    assert!(app.events(&old.id).await.is_empty());
    assert_eq!(app.events(&young.id).await.len(), 1);
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &old.id).await.status(), 200, "the node itself stays");
}

#[tokio::test]
async fn writes_keep_the_write_ahead_log_bounded() {
    if !on_sqlite() {
        return; // SQLite's write-ahead log; this runs in the SQLite pass.
    }
    // 1,280 pending nodes: over the default cap on pending nodes.
    let app = TestApp::with_settings(Options::default(), |settings| settings.max_pending = 0).await;
    let wal = app.data_dir().join("router.db-wal");
    let limit = 1024 * 1024;
    sqlite(&app).limit_log(limit).await.expect("limit the log");
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
    if !on_sqlite() {
        return; // A reader holding SQLite's write-ahead log; this runs in the SQLite pass.
    }
    let app = TestApp::with_settings(Options::default(), |settings| settings.max_pending = 0).await;
    sqlite(&app).limit_log(256 * 1024).await.expect("limit the log");
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
    if !on_sqlite() {
        return; // The database file in the data directory, and its marker; this runs in the SQLite pass.
    }
    let mut app = TestApp::spawn().await;
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

/// Approved nodes, each `registering` (approved without a ready model).
async fn registering_fleet(app: &TestApp, prefix: &str, n: usize) -> Vec<TestNode> {
    let admin = app.admin_token().await;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let node = app.register_node(&format!("{prefix}-{i}")).await;
        assert_eq!(body(app.approve(&admin, &node.id).await).await["status"], "registering");
        nodes.push(node);
    }
    nodes
}

#[tokio::test]
async fn status_changes_that_arrive_together_are_all_durable_when_answered() {
    let app = TestApp::spawn().await;
    let nodes = registering_fleet(&app, "together", 40).await;
    let answers = join_all(nodes.iter().map(|node| app.heartbeat(node, &["m"]))).await;
    for response in answers {
        assert_eq!(body(response).await["status"], "online");
    }
    // Read back from the database, not from memory.
    let db = app.sql().await;
    let (online,): (i64,) = db.fetch_one("SELECT COUNT(*) FROM nodes WHERE status = 'online'", &[]).await;
    assert_eq!(online, 40);
    let (events,): (i64,) = db.fetch_one("SELECT COUNT(*) FROM node_events WHERE to_status = 'online'", &[]).await;
    assert_eq!(events, 40);
}

#[tokio::test]
async fn status_changes_that_meet_a_full_database_are_refused_and_change_nothing() {
    if !on_sqlite() {
        return; // A full disk is made with SQLite's page limit; this runs in the SQLite pass.
    }
    let app = TestApp::spawn().await;
    let nodes = registering_fleet(&app, "full", 200).await;
    // Signed in before: a sign-in needs a write too.
    let admin = app.admin_token().await;
    fill_up(&app, 0).await;
    let answers = join_all(nodes.iter().map(|node| app.heartbeat(node, &["m"]))).await;
    let mut refused = Vec::new();
    let mut online = Vec::new();
    for (node, response) in nodes.iter().zip(answers) {
        match response.status().as_u16() {
            200 => {
                assert_eq!(body(response).await["status"], "online");
                online.push(node.clone());
            }
            503 => {
                assert_error(response, 503, "storage_unavailable").await;
                refused.push(node.clone());
            }
            other => panic!("heartbeat on a full database: unexpected {other}"),
        }
    }
    assert!(!refused.is_empty(), "no status change met the full database");
    for node in &refused {
        let shown = body(app.get_node(&admin, &node.id).await).await;
        assert_eq!(shown["status"], "registering", "a refused change reached memory");
    }
    make_room(&app).await;
    let app = app.restart(0).await;
    // What was answered is what was kept.
    for node in &online {
        assert_eq!(app.status_of(&node.id).await, "online");
    }
    for node in &refused {
        assert_eq!(app.status_of(&node.id).await, "registering");
        assert_eq!(body(app.heartbeat(node, &["m"]).await).await["status"], "online");
    }
}
