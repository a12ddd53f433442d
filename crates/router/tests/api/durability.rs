//! Durability under faults (SPEC §9), on either backend: a write the database cannot make is a 503 for that request
//! only, nothing of it stays in memory, no acknowledged node is lost, and the router recovers by itself when space
//! returns. The database is made "full" as each backend reports a full disk: SQLite with its page limit
//! (`max_page_count`, SQLITE_FULL), PostgreSQL with a trigger on every table that raises its own `disk_full` error
//! (SQLSTATE 53100) once a budget of write transactions is spent.

use std::collections::BTreeSet;

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// Makes the database full, but for `room`: SQLite's may grow by `room` pages, PostgreSQL's take `room` more
/// transactions that insert or update rows. Every write beyond fails as on a full disk, until [`make_room`].
async fn fill_up(app: &TestApp, room: u64) {
    let Some(database) = &app.postgres else {
        let store = app.sqlite_store();
        let pages = store.page_count().await.expect("page count");
        store.limit_pages(Some(pages + room)).await.expect("limit pages");
        return;
    };
    let pool = database.pool().await;
    // A descending sequence counts the room left: it is not rolled back with a refused write, as a full disk stays
    // full, and takes no lock that writers would queue on. A transaction takes one unit of room at its first row and
    // marks itself admitted (a setting local to the transaction), so that its other rows fit too: counted in rows,
    // concurrent transactions would share the room out and all fail part-way, where on a disk some fit.
    let statements = [
        "CREATE SEQUENCE IF NOT EXISTS test_room INCREMENT BY -1 MINVALUE -1000000000 MAXVALUE 1000000000".to_owned(),
        format!("SELECT setval('test_room', {room}, false)"),
        "CREATE OR REPLACE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF current_setting('test.admitted', true) IS DISTINCT FROM 'yes' THEN \
             IF nextval('test_room') <= 0 THEN \
               RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; \
             END IF; \
             PERFORM set_config('test.admitted', 'yes', true); \
           END IF; \
           RETURN NEW; \
         END $$"
            .to_owned(),
        "DO $$ DECLARE t text; BEGIN \
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() \
                    AND tablename <> '_sqlx_migrations' LOOP \
             EXECUTE format('CREATE OR REPLACE TRIGGER test_disk_full BEFORE INSERT OR UPDATE ON %I \
                             FOR EACH ROW EXECUTE FUNCTION test_disk_full()', t); \
           END LOOP; \
         END $$"
            .to_owned(),
    ];
    for statement in statements {
        sqlx::query(sqlx::AssertSqlSafe(statement.as_str())).execute(&pool).await.expect(&statement);
    }
    pool.close().await;
}

/// Space returns: every write fits again.
async fn make_room(app: &TestApp) {
    let Some(database) = &app.postgres else {
        app.sqlite_store().limit_pages(None).await.expect("lift the page limit");
        return;
    };
    let pool = database.pool().await;
    sqlx::query(
        "DO $$ DECLARE t text; BEGIN \
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() LOOP \
             EXECUTE format('DROP TRIGGER IF EXISTS test_disk_full ON %I', t); \
           END LOOP; \
         END $$",
    )
    .execute(&pool)
    .await
    .expect("drop the triggers");
    pool.close().await;
}

/// Names of every node the router shows to `admin`, a session taken before the database filled up (a sign-in is a
/// write).
async fn machine_names(app: &TestApp, admin: &str) -> BTreeSet<String> {
    let listed = app.request(Method::GET, "/v0/nodes").bearer_auth(admin).send().await.expect("list");
    assert_eq!(listed.status(), 200);
    body(listed)
        .await
        .as_array()
        .expect("array")
        .iter()
        .map(|node| node["machine_name"].as_str().expect("name").to_owned())
        .collect()
}

/// Every node's status by its id, in one listing.
async fn statuses(app: &TestApp) -> std::collections::HashMap<String, String> {
    let nodes = app.nodes().await;
    nodes
        .iter()
        .map(|node| (node["id"].as_str().expect("id").to_owned(), node["status"].as_str().expect("status").to_owned()))
        .collect()
}

/// Registers `names` all at once (so they share group commits); returns the names answered 201 and 503.
pub async fn register_together(app: &TestApp, names: &[String]) -> (Vec<String>, Vec<String>) {
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
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
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
    assert_eq!(machine_names(&app, &admin).await, acknowledged);

    // Sign-ins while the database is full either work or say so: never a token that does not work. (No room is left
    // now: on SQLite sessions fill what room its pages still have, then fail; on PostgreSQL every one fails.)
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
    assert_eq!(machine_names(&app, &app.admin_token().await).await, acknowledged);
    assert!(refused.iter().all(|name| !acknowledged.contains(name)));
}

#[tokio::test]
async fn a_failed_approval_changes_nothing_and_succeeds_once_space_returns() {
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
    let stored = statuses(&app).await;
    assert_eq!(stored[&refused[0].id], "registering");
    for node in &refused[1..] {
        assert_eq!(stored[&node.id], "pending");
    }
    let stored_approved = stored.values().filter(|status| *status == "registering").count();
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
    let stored = statuses(&app).await;
    for node in &online {
        assert_eq!(stored[&node.id], "online");
    }
    for node in &refused {
        assert_eq!(stored[&node.id], "registering");
        assert_eq!(body(app.heartbeat(node, &["m"]).await).await["status"], "online");
    }
}
