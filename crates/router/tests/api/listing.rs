//! The node API at fleet scale (SPEC §12), held against its written contract: `GET /v0/nodes` with search, tags,
//! sorting, paging and `changed_since`; `GET /v0/nodes/summary`; compressed answers. Everything goes through HTTP,
//! so the same tests run on SQLite and on PostgreSQL. The clock is the harness' manual one: no test sleeps.

use std::io::Read;

use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::helpers::{START_MS, TestApp, TestNode, assert_error, body, registration};

// ---- Requests ----------------------------------------------------------------------------------------------------

/// `text` percent-encoded for a query string: every byte but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `/v0/nodes` with `params` as its query string, in order (a key may repeat).
fn nodes_path(params: &[(&str, &str)]) -> String {
    let pairs: Vec<String> = params.iter().map(|(key, value)| format!("{key}={}", encode(value))).collect();
    if pairs.is_empty() { "/v0/nodes".to_owned() } else { format!("/v0/nodes?{}", pairs.join("&")) }
}

async fn list(app: &TestApp, token: &str, params: &[(&str, &str)]) -> Response {
    app.request(Method::GET, &nodes_path(params)).bearer_auth(token).send().await.expect("list nodes")
}

/// The answer to `params`, which must be the plain JSON array of node objects.
async fn array(app: &TestApp, token: &str, params: &[(&str, &str)]) -> Value {
    let response = list(app, token, params).await;
    assert_eq!(response.status(), 200, "{params:?}");
    let answer = body(response).await;
    assert!(answer.is_array(), "{params:?} answers the array, not {answer}");
    answer
}

/// The answer to `params`, which must be the envelope; checks the fields every envelope has.
async fn envelope(app: &TestApp, token: &str, params: &[(&str, &str)]) -> Value {
    let response = list(app, token, params).await;
    assert_eq!(response.status(), 200, "{params:?}");
    let answer = body(response).await;
    let fleet_revision = revision(&answer);
    let nodes = answer["nodes"].as_array().unwrap_or_else(|| panic!("{params:?}: no `nodes` array in {answer}"));
    for node in nodes {
        assert!(revision(node) <= fleet_revision, "a node's revision is at most the answer's: {answer}");
    }
    assert!(answer["total"].is_u64(), "{params:?}: {answer}");
    assert!(answer["next_cursor"].is_null() || answer["next_cursor"].is_string(), "{params:?}: {answer}");
    assert!(answer["deleted"].is_array(), "{params:?}: {answer}");
    answer
}

/// Asserts that `params` are refused with 400 and the router's usual error body; returns the message.
async fn refused(app: &TestApp, token: &str, params: &[(&str, &str)]) -> String {
    assert_error(list(app, token, params).await, 400, "invalid_request").await
}

async fn summary(app: &TestApp, token: &str) -> Value {
    let response = app.request(Method::GET, "/v0/nodes/summary").bearer_auth(token).send().await.expect("summary");
    assert_eq!(response.status(), 200);
    body(response).await
}

/// The `revision` of an answer or a node object, which must be an integer.
fn revision(value: &Value) -> i64 {
    value["revision"].as_i64().unwrap_or_else(|| panic!("no integer `revision` in {value}"))
}

/// The ids of an array of node objects, in order.
fn ids(nodes: &Value) -> Vec<String> {
    let nodes = nodes.as_array().unwrap_or_else(|| panic!("not an array: {nodes}"));
    nodes.iter().map(|node| node["id"].as_str().expect("id").to_owned()).collect()
}

fn ids_of(nodes: &[&TestNode]) -> Vec<String> {
    nodes.iter().map(|node| node.id.clone()).collect()
}

/// `ids` in id order: how ties are broken.
fn by_id(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn reversed(mut ids: Vec<String>) -> Vec<String> {
    ids.reverse();
    ids
}

/// Follows `next_cursor` with pages of `limit`, from `cursor` or from the first page, checking each envelope;
/// returns the pages.
async fn walk(
    app: &TestApp,
    token: &str,
    params: &[(&str, &str)],
    limit: usize,
    mut cursor: Option<String>,
) -> Vec<Value> {
    let limit_text = limit.to_string();
    let mut pages = Vec::new();
    loop {
        let page = {
            let mut query = params.to_vec();
            query.push(("limit", &limit_text));
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor));
            }
            envelope(app, token, &query).await
        };
        let page_ids = ids(&page["nodes"]);
        assert_eq!(page["ids"], json!(page_ids), "without changed_since, `ids` are the page's nodes: {page}");
        assert_eq!(page["deleted"], json!([]), "without changed_since, no deletions: {page}");
        assert!(page_ids.len() <= limit, "{page}");
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_some() {
            assert_eq!(page_ids.len(), limit, "a page that more nodes follow is full: {page}");
        }
        pages.push(page);
        assert!(pages.len() <= 1_000, "the walk does not end");
        if cursor.is_none() {
            return pages;
        }
    }
}

/// The ids of every page, in the order visited.
fn visited(pages: &[Value]) -> Vec<String> {
    pages.iter().flat_map(|page| ids(&page["nodes"])).collect()
}

// ---- Fleets --------------------------------------------------------------------------------------------------------

/// A registration of `name` (runtime on port 8000, tag `rack-a`) with `gpus` GPUs in one group.
fn node_body(name: &str, gpus: u32) -> Value {
    let mut request = registration(name, 8000);
    request["gpu_devices"] = json!([{"model": "NVIDIA L4", "count": gpus}]);
    request
}

async fn register(app: &TestApp, request: &Value) -> TestNode {
    let response = app.register(request).await;
    assert_eq!(response.status(), 201, "registering {request}");
    let answer = body(response).await;
    TestNode {
        id: answer["node_id"].as_str().expect("id").to_owned(),
        token: answer["node_token"].as_str().expect("token").to_owned(),
    }
}

/// Registers `names` (two GPUs each) a second apart, so that their registration times differ.
async fn register_named(app: &TestApp, names: &[&str]) -> Vec<TestNode> {
    let mut nodes = Vec::with_capacity(names.len());
    for name in names {
        nodes.push(register(app, &node_body(name, 2)).await);
        app.clock.advance_ms(1_000);
    }
    nodes
}

async fn beat(app: &TestApp, node: &TestNode, ready: &[&str]) -> Value {
    let response = app.heartbeat(node, ready).await;
    assert_eq!(response.status(), 200);
    body(response).await
}

/// An admin action on a node that answers the node object.
async fn act(app: &TestApp, admin: &str, method: Method, path: String, changes: Option<Value>) -> Value {
    let mut request = app.request(method, &path).bearer_auth(admin);
    if let Some(changes) = changes {
        request = request.json(&changes);
    }
    let response = request.send().await.expect("admin action");
    assert_eq!(response.status(), 200, "{path}");
    body(response).await
}

async fn approve(app: &TestApp, admin: &str, node: &TestNode) -> Value {
    act(app, admin, Method::POST, format!("/v0/nodes/{}/approve", node.id), None).await
}

async fn cordon(app: &TestApp, admin: &str, node: &TestNode, on: bool) -> Value {
    let action = if on { "cordon" } else { "uncordon" };
    act(app, admin, Method::POST, format!("/v0/nodes/{}/{action}", node.id), None).await
}

async fn patch(app: &TestApp, admin: &str, node: &TestNode, changes: Value) -> Value {
    act(app, admin, Method::PATCH, format!("/v0/nodes/{}", node.id), Some(changes)).await
}

async fn delete(app: &TestApp, admin: &str, node: &TestNode) {
    let path = format!("/v0/nodes/{}", node.id);
    let response = app.request(Method::DELETE, &path).bearer_auth(admin).send().await.expect("delete");
    assert_eq!(response.status(), 204);
}

/// One node or two in each status, with known GPU counts (21 in all, 10 on online nodes) and one cordoned.
struct StatusFleet {
    pending_a: TestNode,
    pending_b: TestNode,
    degraded: TestNode,
    offline: TestNode,
    registering: TestNode,
    online_a: TestNode,
    online_b: TestNode,
}

impl StatusFleet {
    async fn build(app: &TestApp, admin: &str) -> StatusFleet {
        // First, so that the silence that makes it offline touches no other node.
        let offline = register(app, &node_body("off-1", 4)).await;
        approve(app, admin, &offline).await;
        assert_eq!(beat(app, &offline, &["m"]).await["status"], "online");
        assert_eq!(app.advance_and_sweep(31_000).await, 1);

        // Two GPU groups: the count is their sum, 8.
        let mut eight = node_body("on-b", 0);
        eight["gpu_devices"] = json!([{"model": "NVIDIA H100", "count": 4}, {"model": "NVIDIA L4", "count": 4}]);
        let online_b = register(app, &eight).await;
        let online_a = register(app, &node_body("on-a", 2)).await;
        for node in [&online_b, &online_a] {
            approve(app, admin, node).await;
            assert_eq!(beat(app, node, &["m"]).await["status"], "online");
        }
        assert_eq!(cordon(app, admin, &online_a, true).await["schedulable"], false);

        // Two NVIDIA L4s, one of them reporting a critical XID (SPEC §10).
        let degraded = register(app, &node_body("deg-1", 2)).await;
        approve(app, admin, &degraded).await;
        let gpu = |index: u32, xid: Option<u32>| {
            let mut gpu = json!({"index": index, "model": "NVIDIA L4", "temperature_c": 55.0, "utilization": 40.0});
            if let Some(xid) = xid {
                gpu["xid"] = json!(xid);
            }
            gpu
        };
        let faulty = json!({"node_id": degraded.id, "ready_models": ["m"], "gpus": [gpu(0, None), gpu(1, Some(79))]});
        let answer = app.heartbeat_body(&degraded.token, &faulty).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(body(answer).await["status"], "degraded");

        let registering = register(app, &node_body("reg-1", 1)).await;
        assert_eq!(approve(app, admin, &registering).await["status"], "registering");

        // Registered b before a: the status sort orders them by name.
        let pending_b = register(app, &node_body("pend-b", 3)).await;
        let pending_a = register(app, &node_body("pend-a", 1)).await;

        let fleet = StatusFleet { pending_a, pending_b, degraded, offline, registering, online_a, online_b };
        for (node, status) in fleet.by_status().into_iter().zip(STATUS_ORDER) {
            assert_eq!(app.status_of(&node.id).await, status, "the fleet is built as intended");
        }
        fleet
    }

    /// In the order `sort=status` gives.
    fn by_status(&self) -> Vec<&TestNode> {
        vec![
            &self.pending_a,
            &self.pending_b,
            &self.degraded,
            &self.offline,
            &self.registering,
            &self.online_a,
            &self.online_b,
        ]
    }
}

/// The statuses of [`StatusFleet::by_status`].
const STATUS_ORDER: [&str; 7] = ["pending", "pending", "degraded", "offline", "registering", "online", "online"];

// ---- The array, as before ------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_bare_list_is_still_the_whole_array_oldest_registration_first() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-c", "gpu-a", "gpu-b"]).await;
    let [c, a, b] = [&nodes[0], &nodes[1], &nodes[2]];
    approve(&app, &admin, a).await;

    let all = array(&app, &admin, &[]).await;
    assert_eq!(ids(&all), ids_of(&[c, a, b]), "oldest registration first, not by name");
    for node in all.as_array().expect("array") {
        assert!(node["revision"].is_i64(), "every node object has its revision: {node}");
        assert!(node["machine_name"].is_string() && node["gpu_devices"].is_array(), "{node}");
    }
    assert_eq!(ids(&array(&app, &admin, &[("sort", "registered")]).await), ids(&all), "the default sort");

    let pending = array(&app, &admin, &[("status", "pending")]).await;
    assert_eq!(ids(&pending), ids_of(&[c, b]));
    assert_eq!(ids(&array(&app, &admin, &[("status", "registering")]).await), ids_of(&[a]));
    assert_eq!(array(&app, &admin, &[("status", "online")]).await, json!([]));

    // Search, tags and sort alone answer the array too.
    for params in [[("q", "gpu")], [("tag", "rack-a")], [("sort", "name")]] {
        assert_eq!(array(&app, &admin, &params).await.as_array().expect("array").len(), 3, "{params:?}");
    }
    let message = refused(&app, &admin, &[("status", "sleeping")]).await;
    assert!(message.contains("status"), "{message}");
}

// ---- Search and tags -----------------------------------------------------------------------------------------------

#[tokio::test]
async fn search_matches_every_word_against_names_addresses_ids_tags_and_models() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;

    let mut request = node_body("GPU-Alpha-01", 2);
    request["ip_address"] = json!("10.0.0.11");
    request["tags"] = json!(["rack-a", "h100"]);
    let alpha = register(&app, &request).await;
    app.clock.advance_ms(1_000);
    let mut request = node_body("gpu-beta-02", 2);
    request["ip_address"] = json!("10.0.0.22");
    request["tags"] = json!(["rack-b"]);
    request["loaded_models"] = json!(["mistral-7b"]);
    let beta = register(&app, &request).await;
    app.clock.advance_ms(1_000);
    let mut request = node_body("worker-gamma", 2);
    request["ip_address"] = json!("192.168.7.33");
    request["tags"] = json!(["rack-a"]);
    let gamma = register(&app, &request).await;

    beat(&app, &alpha, &["qwen2-72b"]).await;
    assert_eq!(app.node(&alpha.id).await["ready_models"], json!(["qwen2-72b"]));
    assert_eq!(app.node(&beta.id).await["loaded_models"], json!(["mistral-7b"]));
    assert_eq!(patch(&app, &admin, &gamma, json!({"display_name": "Spare Box"})).await["display_name"], "Spare Box");

    let id_part = gamma.id[..13].to_owned();
    let id_part_upper = id_part.to_uppercase();
    let cases: [(&str, Vec<&TestNode>); 20] = [
        ("alpha", vec![&alpha]),
        ("ALPHA-01", vec![&alpha]),
        ("gpu-", vec![&alpha, &beta]),
        ("spare", vec![&gamma]),
        ("RACK-B", vec![&beta]),
        ("h100", vec![&alpha]),
        ("192.168", vec![&gamma]),
        ("10.0.0.22", vec![&beta]),
        ("10.0.0", vec![&alpha, &beta]),
        ("QWEN2", vec![&alpha]),
        ("Mistral-7B", vec![&beta]),
        (id_part.as_str(), vec![&gamma]),
        (id_part_upper.as_str(), vec![&gamma]),
        ("rack-a qwen", vec![&alpha]),
        ("  rack-a   GAMMA ", vec![&gamma]),
        ("gpu- 10.0.0.22", vec![&beta]),
        ("rack-a mistral", vec![]),
        ("no-such-thing", vec![]),
        ("   ", vec![&alpha, &beta, &gamma]),
        ("", vec![&alpha, &beta, &gamma]),
    ];
    for (q, expected) in cases {
        let found = array(&app, &admin, &[("q", q)]).await;
        assert_eq!(ids(&found), ids_of(&expected), "q={q:?}");
    }

    // With a sort, a status, and paged.
    assert_eq!(ids(&array(&app, &admin, &[("q", "rack-a"), ("sort", "-registered")]).await), ids_of(&[&gamma, &alpha]));
    assert_eq!(array(&app, &admin, &[("q", "rack-a"), ("status", "online")]).await, json!([]));
    let page = envelope(&app, &admin, &[("q", "rack-a"), ("limit", "1")]).await;
    assert_eq!(ids(&page["nodes"]), ids_of(&[&alpha]));
    assert_eq!(page["total"], 2, "total counts the matches, not the fleet");
    assert!(page["next_cursor"].is_string());

    // 256 characters are a search; 257 are refused.
    assert_eq!(array(&app, &admin, &[("q", &"x".repeat(256))]).await, json!([]));
    let message = refused(&app, &admin, &[("q", &"x".repeat(257))]).await;
    assert!(message.contains('q'), "{message}");
}

#[tokio::test]
async fn tags_match_exactly_and_every_one_given() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let mut nodes = Vec::new();
    for (name, tags) in [
        ("alpha", json!(["rack-a", "h100"])),
        ("beta", json!(["rack-b"])),
        ("gamma", json!(["rack-a"])),
        ("delta", json!(["Rack-A"])),
    ] {
        let mut request = node_body(name, 2);
        request["tags"] = tags;
        nodes.push(register(&app, &request).await);
        app.clock.advance_ms(1_000);
    }
    let [alpha, beta, gamma, delta] = [&nodes[0], &nodes[1], &nodes[2], &nodes[3]];

    let cases = [
        (vec![("tag", "rack-a")], vec![alpha, gamma]),
        (vec![("tag", "Rack-A")], vec![delta]),
        (vec![("tag", "rack")], vec![]),
        (vec![("tag", "rack-a"), ("tag", "h100")], vec![alpha]),
        (vec![("tag", "h100"), ("tag", "rack-a")], vec![alpha]),
        (vec![("tag", "rack-a"), ("tag", "rack-b")], vec![]),
        (vec![("tag", "rack-a"), ("q", "gamma")], vec![gamma]),
    ];
    for (params, expected) in cases {
        assert_eq!(ids(&array(&app, &admin, &params).await), ids_of(&expected), "{params:?}");
    }
    let page = envelope(&app, &admin, &[("tag", "rack-a"), ("limit", "10")]).await;
    assert_eq!(page["total"], 2);
    assert_eq!(ids(&page["nodes"]), ids_of(&[alpha, gamma]));

    // An edit of the tags is searched at once.
    patch(&app, &admin, beta, json!({"tags": ["rack-a"]})).await;
    assert_eq!(ids(&array(&app, &admin, &[("tag", "rack-a")]).await), ids_of(&[alpha, beta, gamma]));
    assert_eq!(array(&app, &admin, &[("tag", "rack-b")]).await, json!([]));
}

// ---- Sorting -------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn each_sort_key_orders_the_fleet_ties_by_id_and_a_minus_reverses_it() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let mut nodes = Vec::new();
    for (name, port, gpus) in [
        ("gpu-10", 8000, 4),
        ("gpu-2", 8000, 1),
        ("GPU-1", 8000, 8),
        ("Zeta-1", 8000, 2),
        ("gpu-3", 8000, 4),
        ("gpu-2", 8001, 16),
        ("Gpu-20", 8000, 2),
    ] {
        let mut request = node_body(name, gpus);
        request["runtime_port"] = json!(port);
        nodes.push(register(&app, &request).await);
        app.clock.advance_ms(1_000);
    }
    let r: Vec<&TestNode> = nodes.iter().collect();
    // The display name, when set, is the name.
    patch(&app, &admin, r[4], json!({"display_name": "aaa-spare"})).await;
    // Seen in this order, a second apart; r1, r4 and r6 never.
    for node in [r[2], r[0], r[5], r[3]] {
        beat(&app, node, &["m"]).await;
        app.clock.advance_ms(1_000);
    }
    let id = |i: usize| r[i].id.clone();
    let tie = |a: usize, b: usize| by_id(vec![id(a), id(b)]);

    let name: Vec<String> = [vec![id(4), id(2)], tie(1, 5), vec![id(0), id(6), id(3)]].concat();
    let gpus: Vec<String> = [vec![id(1)], tie(3, 6), tie(0, 4), vec![id(2), id(5)]].concat();
    let never_seen = by_id(vec![id(1), id(4), id(6)]);
    let last_seen: Vec<String> = [never_seen, vec![id(2), id(0), id(5), id(3)]].concat();
    let registered: Vec<String> = (0..7).map(id).collect();

    for (key, expected) in [("name", name), ("gpus", gpus), ("last_seen", last_seen), ("registered", registered)] {
        assert_eq!(ids(&array(&app, &admin, &[("sort", key)]).await), expected, "sort={key}");
        let descending = format!("-{key}");
        let answer = array(&app, &admin, &[("sort", &descending)]).await;
        assert_eq!(ids(&answer), reversed(expected), "sort={descending}");
    }
}

#[tokio::test]
async fn the_status_sort_puts_pending_first_then_orders_by_name() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let fleet = StatusFleet::build(&app, &admin).await;
    let expected = ids_of(&fleet.by_status());

    let sorted = array(&app, &admin, &[("sort", "status")]).await;
    assert_eq!(ids(&sorted), expected);
    let statuses: Vec<&str> =
        sorted.as_array().expect("array").iter().map(|node| node["status"].as_str().expect("status")).collect();
    assert_eq!(statuses, STATUS_ORDER);
    assert_eq!(ids(&array(&app, &admin, &[("sort", "-status")]).await), reversed(expected.clone()));
    let pages = walk(&app, &admin, &[("sort", "status")], 2, None).await;
    assert_eq!(visited(&pages), expected);
}

#[tokio::test]
async fn unknown_sorts_and_out_of_range_parameters_are_refused() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    register_named(&app, &["gpu-a", "gpu-b"]).await;

    for sort in ["color", "--name", "name,gpus", "+name"] {
        let message = refused(&app, &admin, &[("sort", sort)]).await;
        assert!(message.contains("sort"), "{message}");
    }
    for limit in ["0", "1001", "-1", "ten", "1.5"] {
        let message = refused(&app, &admin, &[("limit", limit)]).await;
        assert!(message.contains("limit"), "{message}");
    }
    for offset in ["-1", "x"] {
        refused(&app, &admin, &[("offset", offset)]).await;
    }
    for since in ["-1", "abc", "1.5"] {
        refused(&app, &admin, &[("changed_since", since)]).await;
    }
    // The bounds themselves are accepted.
    assert_eq!(ids(&envelope(&app, &admin, &[("limit", "1")]).await["nodes"]).len(), 1);
    assert_eq!(ids(&envelope(&app, &admin, &[("limit", "1000")]).await["nodes"]).len(), 2);
    assert_eq!(envelope(&app, &admin, &[("offset", "0")]).await["total"], 2);
}

// ---- Paging --------------------------------------------------------------------------------------------------------

/// `node-1` to `node-10`, registered out of order a second apart with 1 to 3 GPUs; half of them seen.
async fn numbered_fleet(app: &TestApp) -> Vec<TestNode> {
    let mut by_number: Vec<Option<TestNode>> = vec![None; 11];
    for number in [7, 3, 10, 1, 9, 5, 2, 8, 4, 6] {
        by_number[number] = Some(register(app, &node_body(&format!("node-{number}"), number as u32 % 3 + 1)).await);
        app.clock.advance_ms(1_000);
    }
    let nodes: Vec<TestNode> = by_number.into_iter().flatten().collect();
    for number in [4, 9, 1, 6, 2] {
        beat(app, &nodes[number - 1], &["m"]).await;
        app.clock.advance_ms(1_000);
    }
    nodes
}

#[tokio::test]
async fn cursor_paging_visits_every_matching_node_once_in_order() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = numbered_fleet(&app).await;
    let by_name: Vec<String> = nodes.iter().map(|node| node.id.clone()).collect();
    assert_eq!(ids(&array(&app, &admin, &[("sort", "name")]).await), by_name, "node-2 before node-10");

    for sort in ["registered", "name", "-name", "gpus", "-gpus", "last_seen", "-last_seen", "status"] {
        let full = ids(&array(&app, &admin, &[("sort", sort)]).await);
        for limit in [1, 3, 4, 10, 11] {
            let pages = walk(&app, &admin, &[("sort", sort)], limit, None).await;
            assert_eq!(visited(&pages), full, "sort={sort} by {limit}");
            assert_eq!(pages.len(), full.len().div_ceil(limit), "sort={sort} by {limit}: no empty last page");
            for page in &pages {
                assert_eq!(page["total"], 10, "sort={sort} by {limit}");
            }
        }
    }

    // Filtered walks count and visit the matches only.
    for node in [&nodes[0], &nodes[4], &nodes[7]] {
        approve(&app, &admin, node).await;
    }
    let pending = ids(&array(&app, &admin, &[("status", "pending"), ("sort", "name")]).await);
    assert_eq!(pending.len(), 7);
    let pages = walk(&app, &admin, &[("status", "pending"), ("sort", "name")], 2, None).await;
    assert_eq!(visited(&pages), pending);
    assert!(pages.iter().all(|page| page["total"] == 7));
    let pages = walk(&app, &admin, &[("q", "node-1"), ("sort", "-name")], 1, None).await;
    assert_eq!(visited(&pages), vec![nodes[9].id.clone(), nodes[0].id.clone()], "node-10, then node-1");
    assert!(pages.iter().all(|page| page["total"] == 2));
}

#[tokio::test]
async fn nodes_deleted_or_added_between_pages_do_not_break_the_walk() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = numbered_fleet(&app).await;
    let number = |n: usize| nodes[n - 1].id.clone();

    let first = envelope(&app, &admin, &[("sort", "name"), ("limit", "3")]).await;
    assert_eq!(ids(&first["nodes"]), vec![number(1), number(2), number(3)]);
    let cursor = first["next_cursor"].as_str().expect("more follow").to_owned();

    // The last node of the page (where the cursor points) and one further on go; one node comes before the
    // cursor's place, one after it.
    delete(&app, &admin, &nodes[2]).await;
    delete(&app, &admin, &nodes[6]).await;
    register(&app, &node_body("node-0", 1)).await;
    let eleven = register(&app, &node_body("node-11", 1)).await;

    let rest = walk(&app, &admin, &[("sort", "name")], 3, Some(cursor)).await;
    let expected = vec![number(4), number(5), number(6), number(8), number(9), number(10), eleven.id.clone()];
    assert_eq!(visited(&rest), expected, "the walk goes on after node-3, without node-7, with node-11");
    assert_eq!(rest.len(), 3);
    assert!(rest.iter().all(|page| page["total"] == 10), "8 left, 2 added");
}

#[tokio::test]
async fn cursors_belong_to_their_sort_and_exclude_an_offset() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-c", "gpu-a", "gpu-b"]).await;

    let first = envelope(&app, &admin, &[("sort", "name"), ("limit", "1")]).await;
    assert_eq!(ids(&first["nodes"]), vec![nodes[1].id.clone()]);
    let cursor = first["next_cursor"].as_str().expect("more follow").to_owned();

    for other in [vec![("sort", "gpus")], vec![("sort", "-name")], vec![("sort", "registered")], vec![]] {
        let mut params = other.clone();
        params.extend([("cursor", cursor.as_str()), ("limit", "1")]);
        refused(&app, &admin, &params).await;
    }
    refused(&app, &admin, &[("sort", "name"), ("cursor", &cursor), ("offset", "1"), ("limit", "1")]).await;
    for garbage in ["garbage", "AAAA", "eyJ4IjoxfQ", "%%%", &format!("{cursor}x")] {
        refused(&app, &admin, &[("sort", "name"), ("cursor", garbage), ("limit", "1")]).await;
    }

    // The cursor itself works with its sort; without a limit, the page is up to 100 nodes.
    let second = envelope(&app, &admin, &[("sort", "name"), ("cursor", &cursor), ("limit", "1")]).await;
    assert_eq!(ids(&second["nodes"]), vec![nodes[2].id.clone()]);
    let rest = envelope(&app, &admin, &[("sort", "name"), ("cursor", &cursor)]).await;
    assert_eq!(ids(&rest["nodes"]), vec![nodes[2].id.clone(), nodes[0].id.clone()]);
    assert_eq!(rest["ids"], json!(ids(&rest["nodes"])));
    assert!(rest["next_cursor"].is_null());
}

#[tokio::test]
async fn offset_and_limit_give_the_slice_of_the_sorted_list() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    numbered_fleet(&app).await;
    let full = ids(&array(&app, &admin, &[("sort", "-gpus")]).await);
    let n = full.len();

    for (offset, limit) in [(0, 1), (0, 10), (2, 3), (5, 5), (7, 3), (9, 1), (9, 4), (10, 2), (100, 2)] {
        let (offset_text, limit_text) = (offset.to_string(), limit.to_string());
        let params = [("sort", "-gpus"), ("offset", offset_text.as_str()), ("limit", limit_text.as_str())];
        let page = envelope(&app, &admin, &params).await;
        let slice = full[offset.min(n)..(offset + limit).min(n)].to_vec();
        assert_eq!(ids(&page["nodes"]), slice, "offset {offset}, limit {limit}");
        assert_eq!(page["ids"], json!(slice));
        assert_eq!(page["total"], n);
        assert_eq!(page["next_cursor"].is_null(), offset + limit >= n, "offset {offset}, limit {limit}: {page}");
        // The next page of an offset page follows on.
        if let Some(cursor) = page["next_cursor"].as_str() {
            let next = envelope(&app, &admin, &[("sort", "-gpus"), ("cursor", cursor), ("limit", &limit_text)]).await;
            let after = full[offset + limit..(offset + 2 * limit).min(n)].to_vec();
            assert_eq!(ids(&next["nodes"]), after, "after offset {offset}, limit {limit}");
        }
    }
    // Without a limit: the rest, up to 100.
    let rest = envelope(&app, &admin, &[("sort", "-gpus"), ("offset", "4")]).await;
    assert_eq!(ids(&rest["nodes"]), full[4..].to_vec());
    assert!(rest["next_cursor"].is_null());
}

// ---- changed_since and revisions -----------------------------------------------------------------------------------

#[tokio::test]
async fn changed_since_with_no_change_sends_no_node_yet_still_the_page_ids() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a", "gpu-b", "gpu-c"]).await;
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];

    let listed = envelope(&app, &admin, &[("limit", "1000")]).await;
    assert_eq!(ids(&listed["nodes"]), ids_of(&[a, b, c]));
    assert!(listed["next_cursor"].is_null());
    let since = revision(&listed);
    let since_text = since.to_string();

    let unchanged = envelope(&app, &admin, &[("changed_since", &since_text)]).await;
    assert_eq!(unchanged["nodes"], json!([]), "{unchanged}");
    assert_eq!(unchanged["deleted"], json!([]));
    assert_eq!(unchanged["total"], 3, "the nodes matching, changed or not");
    assert!(unchanged["ids"].is_null(), "not paged, no ids: {unchanged}");
    assert!(unchanged["next_cursor"].is_null());
    assert!(revision(&unchanged) >= since);

    let first = envelope(&app, &admin, &[("changed_since", &since_text), ("limit", "2")]).await;
    assert_eq!(first["nodes"], json!([]));
    assert_eq!(first["ids"], json!(ids_of(&[a, b])), "the page's ids, changed or not");
    assert_eq!(first["total"], 3);
    let cursor = first["next_cursor"].as_str().expect("more follow").to_owned();
    let second = envelope(&app, &admin, &[("changed_since", &since_text), ("limit", "2"), ("cursor", &cursor)]).await;
    assert_eq!(second["nodes"], json!([]));
    assert_eq!(second["ids"], json!(ids_of(&[c])));
    assert!(second["next_cursor"].is_null());

    // A heartbeat of c: c alone comes back, on its own page only.
    let before = revision(&app.node(&c.id).await);
    beat(&app, c, &["m"]).await;
    let changed = envelope(&app, &admin, &[("changed_since", &since_text)]).await;
    assert_eq!(ids(&changed["nodes"]), ids_of(&[c]));
    assert!(revision(&changed["nodes"][0]) > since.max(before), "{changed}");
    assert!(revision(&changed) >= revision(&changed["nodes"][0]));
    let first = envelope(&app, &admin, &[("changed_since", &since_text), ("limit", "2")]).await;
    assert_eq!(first["nodes"], json!([]));
    assert_eq!(first["ids"], json!(ids_of(&[a, b])));
    let cursor = first["next_cursor"].as_str().expect("more follow").to_owned();
    let second = envelope(&app, &admin, &[("changed_since", &since_text), ("limit", "2"), ("cursor", &cursor)]).await;
    assert_eq!(ids(&second["nodes"]), ids_of(&[c]));
    assert_eq!(second["ids"], json!(ids_of(&[c])));

    // The answer's revision is the next starting point: nothing since.
    let latest = revision(&changed).to_string();
    assert_eq!(envelope(&app, &admin, &[("changed_since", &latest)]).await["nodes"], json!([]));
}

#[tokio::test]
async fn changed_since_sends_the_node_a_heartbeat_approval_cordon_or_edit_changed() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a", "gpu-b", "gpu-c"]).await;
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    let mut since = revision(&envelope(&app, &admin, &[("limit", "1000")]).await);

    // Each change in turn; only its node comes back, with a higher revision.
    for step in ["heartbeat", "approve", "cordon", "patch", "uncordon"] {
        let (node, before) = match step {
            "heartbeat" => (a, beat(&app, a, &["m"]).await),
            "approve" => (b, approve(&app, &admin, b).await),
            "cordon" => (b, cordon(&app, &admin, b, true).await),
            "patch" => (c, patch(&app, &admin, c, json!({"notes": "fan noise"})).await),
            _ => (b, cordon(&app, &admin, b, false).await),
        };
        let since_text = since.to_string();
        let changed = envelope(&app, &admin, &[("changed_since", &since_text)]).await;
        assert_eq!(ids(&changed["nodes"]), ids_of(&[node]), "after the {step}: {changed}");
        let shown = &changed["nodes"][0];
        assert!(revision(shown) > since, "after the {step}: {shown}");
        if step != "heartbeat" {
            // Admin actions answer the node, with its new revision.
            assert!(revision(&before) > since, "the {step} answer: {before}");
            assert!(revision(shown) >= revision(&before), "{step}");
        }
        match step {
            "approve" => assert_eq!(shown["status"], "registering"),
            "cordon" => assert_eq!(shown["schedulable"], false),
            "patch" => assert_eq!(shown["notes"], "fan noise"),
            "uncordon" => assert_eq!(shown["schedulable"], true),
            _ => assert!(shown["last_seen_at"].is_string()),
        }
        since = revision(&changed);
    }
}

#[tokio::test]
async fn changed_since_names_every_node_deleted_since_whatever_the_filter() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a", "gpu-b", "gpu-c", "gpu-d"]).await;
    let [a, b, c, d] = [&nodes[0], &nodes[1], &nodes[2], &nodes[3]];
    let since = revision(&envelope(&app, &admin, &[("limit", "1000")]).await).to_string();

    delete(&app, &admin, d).await;
    let after = envelope(&app, &admin, &[("changed_since", &since)]).await;
    assert_eq!(after["nodes"], json!([]));
    assert_eq!(after["deleted"], json!([d.id]));
    assert_eq!(after["total"], 3);
    let filtered = envelope(&app, &admin, &[("changed_since", &since), ("q", "gpu-a")]).await;
    assert_eq!(filtered["deleted"], json!([d.id]), "deletions whatever the filter");
    let filtered = envelope(&app, &admin, &[("changed_since", &since), ("status", "online")]).await;
    assert_eq!(filtered["deleted"], json!([d.id]));
    let paged = envelope(&app, &admin, &[("changed_since", &since), ("limit", "1")]).await;
    assert_eq!(paged["deleted"], json!([d.id]));
    assert_eq!(paged["ids"], json!([a.id]));

    // Nothing deleted after the answer's own revision.
    let latest = revision(&after).to_string();
    assert_eq!(envelope(&app, &admin, &[("changed_since", &latest)]).await["deleted"], json!([]));

    delete(&app, &admin, b).await;
    beat(&app, a, &["m"]).await;
    let later = envelope(&app, &admin, &[("changed_since", &since)]).await;
    assert_eq!(ids(&later["nodes"]), ids_of(&[a]));
    let deleted: Vec<String> =
        later["deleted"].as_array().expect("deleted").iter().map(|id| id.as_str().expect("id").to_owned()).collect();
    assert_eq!(by_id(deleted), by_id(ids_of(&[b, d])));
    let since_latest = envelope(&app, &admin, &[("changed_since", &latest)]).await;
    assert_eq!(since_latest["deleted"], json!([b.id]));

    // Without changed_since, no deletions are listed.
    let page = envelope(&app, &admin, &[("limit", "10")]).await;
    assert_eq!(page["deleted"], json!([]));
    assert_eq!(page["ids"], json!(ids_of(&[a, c])));
}

#[tokio::test]
async fn a_revision_the_router_cannot_answer_from_is_gone() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    register_named(&app, &["gpu-a"]).await;
    let now = revision(&envelope(&app, &admin, &[("limit", "10")]).await);

    let future = (now + 1_000_000_000_000).to_string();
    let before_start = ((START_MS - 3_600_000) * 1_000).to_string();
    for since in [future.as_str(), "0", "1", before_start.as_str(), "9223372036854775807"] {
        assert_error(list(&app, &admin, &[("changed_since", since)]).await, 410, "revision_expired").await;
        let paged = list(&app, &admin, &[("changed_since", since), ("limit", "5")]).await;
        assert_error(paged, 410, "revision_expired").await;
    }
    // The client lists again, and goes on from there.
    let again = envelope(&app, &admin, &[("limit", "10")]).await;
    let since = revision(&again).to_string();
    assert_eq!(envelope(&app, &admin, &[("changed_since", &since)]).await["nodes"], json!([]));
}

#[tokio::test]
async fn a_node_revision_shows_everywhere_and_rises_with_every_change() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a"]).await;
    let node = &nodes[0];

    let first = revision(&app.node(&node.id).await);
    assert_eq!(revision(&array(&app, &admin, &[]).await[0]), first, "the array shows the same revision");
    assert_eq!(revision(&array(&app, &admin, &[]).await[0]), first, "reading changes nothing");

    beat(&app, node, &[]).await;
    let beaten = revision(&app.node(&node.id).await);
    assert!(beaten > first, "a heartbeat: {beaten} > {first}");
    beat(&app, node, &["m"]).await;
    let again = revision(&app.node(&node.id).await);
    assert!(again > beaten, "another heartbeat: {again} > {beaten}");

    let approved = revision(&approve(&app, &admin, node).await);
    assert!(approved > again);
    let cordoned = revision(&cordon(&app, &admin, node, true).await);
    assert!(cordoned > approved);
    let patched = revision(&patch(&app, &admin, node, json!({"display_name": "Rack A / 1"})).await);
    assert!(patched > cordoned);
    assert_eq!(revision(&app.node(&node.id).await), patched);

    // Going offline is a change too.
    app.advance_and_sweep(31_000).await;
    assert_eq!(app.status_of(&node.id).await, "offline");
    assert!(revision(&app.node(&node.id).await) > patched);
}

// ---- Summary -------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_summary_counts_the_whole_fleet_exactly() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let fleet = StatusFleet::build(&app, &admin).await;
    let listed = revision(&envelope(&app, &admin, &[("limit", "1")]).await);

    let counts = summary(&app, &admin).await;
    assert_eq!(counts["total"], 7);
    assert_eq!(
        counts["by_status"],
        json!({"pending": 2, "registering": 1, "online": 2, "degraded": 1, "offline": 1}),
        "{counts}"
    );
    assert_eq!(counts["pending"], 2);
    assert_eq!(counts["gpus"], json!({"total": 21, "online": 10}), "sums of gpu_devices[].count");
    assert_eq!(counts["cordoned"], 1);
    assert!(revision(&counts) >= listed);

    // It follows the fleet.
    approve(&app, &admin, &fleet.pending_a).await;
    assert_eq!(beat(&app, &fleet.pending_a, &["m"]).await["status"], "online");
    delete(&app, &admin, &fleet.online_b).await;
    cordon(&app, &admin, &fleet.online_a, false).await;
    let counts = summary(&app, &admin).await;
    assert_eq!(counts["total"], 6);
    assert_eq!(
        counts["by_status"],
        json!({"pending": 1, "registering": 1, "online": 2, "degraded": 1, "offline": 1}),
        "{counts}"
    );
    assert_eq!(counts["pending"], 1);
    assert_eq!(counts["gpus"], json!({"total": 13, "online": 3}));
    assert_eq!(counts["cordoned"], 0);

    // Whatever a page shows.
    assert_eq!(envelope(&app, &admin, &[("status", "degraded"), ("limit", "1")]).await["total"], 1);
    assert_eq!(summary(&app, &admin).await["total"], 6);
}

// ---- Who may read --------------------------------------------------------------------------------------------------

#[tokio::test]
async fn viewers_list_page_and_read_the_summary_and_nobody_else_does() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a", "gpu-b", "gpu-c"]).await;
    let viewer = app.user_token("watcher", "viewer").await;

    let pages = walk(&app, &viewer, &[("sort", "name"), ("q", "gpu")], 2, None).await;
    assert_eq!(visited(&pages), ids_of(&nodes.iter().collect::<Vec<_>>()));
    let since = revision(&pages[0]).to_string();
    beat(&app, &nodes[1], &["m"]).await;
    let changed = envelope(&app, &viewer, &[("changed_since", &since)]).await;
    assert_eq!(ids(&changed["nodes"]), vec![nodes[1].id.clone()]);
    assert_eq!(summary(&app, &viewer).await["total"], 3);
    assert_eq!(summary(&app, &admin).await["total"], 3);

    let cursor = pages[0]["next_cursor"].as_str().expect("a second page").to_owned();
    let guarded = [
        nodes_path(&[("limit", "5")]),
        nodes_path(&[("sort", "name"), ("q", "gpu"), ("tag", "rack-a")]),
        nodes_path(&[("changed_since", &since)]),
        nodes_path(&[("sort", "name"), ("q", "gpu"), ("cursor", &cursor), ("limit", "2")]),
        nodes_path(&[("offset", "1")]),
        "/v0/nodes/summary".to_owned(),
    ];
    for path in &guarded {
        let anonymous = app.request(Method::GET, path).send().await.expect("anonymous");
        assert_error(anonymous, 401, "unauthorized").await;
        let forged = app.request(Method::GET, path).bearer_auth("not-a-credential").send().await.expect("forged");
        assert_error(forged, 401, "unauthorized").await;
    }
}

// ---- Compression ---------------------------------------------------------------------------------------------------

/// What the router sent, byte for byte: the test client decompresses nothing.
struct Raw {
    status: u16,
    encoding: Option<String>,
    vary: String,
    bytes: Vec<u8>,
}

impl Raw {
    /// The body, decompressed as its `Content-Encoding` says.
    fn decoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.encoding.as_deref() {
            None => out.clone_from(&self.bytes),
            Some("gzip") => {
                flate2::read::GzDecoder::new(&self.bytes[..]).read_to_end(&mut out).expect("gzip");
            }
            Some("br") => {
                brotli::Decompressor::new(&self.bytes[..], 4096).read_to_end(&mut out).expect("brotli");
            }
            Some(other) => panic!("unexpected Content-Encoding {other}"),
        }
        out
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.decoded()).unwrap_or_else(|err| panic!("not JSON once decoded: {err}"))
    }
}

async fn fetch(app: &TestApp, path: &str, token: Option<&str>, accept: Option<&str>) -> Raw {
    let mut request = app.request(Method::GET, path);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(accept) = accept {
        request = request.header(ACCEPT_ENCODING, accept);
    }
    let response = request.send().await.expect("fetch");
    let header = |name: reqwest::header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let (encoding, vary) = (header(CONTENT_ENCODING), header(VARY).unwrap_or_default());
    Raw { status: response.status().as_u16(), encoding, vary, bytes: response.bytes().await.expect("bytes").to_vec() }
}

/// Asserts that `path` is sent compressed with `encoding` when asked, and that it decodes to `plain`'s body.
async fn assert_compressed(app: &TestApp, path: &str, token: Option<&str>, encoding: &str) -> Raw {
    let packed = fetch(app, path, token, Some(encoding)).await;
    assert_eq!(packed.status, 200, "{path}");
    assert_eq!(packed.encoding.as_deref(), Some(encoding), "{path} with Accept-Encoding: {encoding}");
    assert!(packed.vary.to_ascii_lowercase().contains("accept-encoding"), "{path}: Vary: {}", packed.vary);
    packed
}

fn without_revision(mut answer: Value) -> Value {
    if let Some(object) = answer.as_object_mut() {
        object.remove("revision");
    }
    answer
}

#[tokio::test]
async fn json_answers_are_compressed_with_gzip_or_brotli_when_asked_and_only_then() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    register_named(&app, &["gpu-a", "gpu-b", "gpu-c"]).await;

    for path in ["/v0/nodes", "/v0/nodes?sort=name&limit=2"] {
        let plain = fetch(&app, path, Some(&admin), None).await;
        assert_eq!(plain.status, 200, "{path}");
        assert_eq!(plain.encoding, None, "{path}: not compressed without Accept-Encoding");
        let expected: Value = serde_json::from_slice(&plain.bytes).expect("plain JSON");
        for encoding in ["gzip", "br"] {
            let packed = assert_compressed(&app, path, Some(&admin), encoding).await;
            assert!(serde_json::from_slice::<Value>(&packed.bytes).is_err(), "{path}: {encoding} bytes, not JSON");
            let decoded = packed.json();
            if path == "/v0/nodes" {
                assert_eq!(decoded, expected, "{path} with {encoding}");
            } else {
                // The fleet's revision may have moved on with the clock in between; nothing else.
                assert_eq!(without_revision(decoded), without_revision(expected.clone()), "{path} with {encoding}");
            }
        }
    }
    // A short answer (the summary, under 512 bytes) is sent as it is: compressing it would save nothing.
    let summary = fetch(&app, "/v0/nodes/summary", Some(&admin), Some("gzip, br")).await;
    assert_eq!(summary.status, 200);
    assert!(summary.bytes.len() < 512, "{} bytes", summary.bytes.len());
    assert_eq!(summary.encoding, None, "the summary is short");
    assert_eq!(summary.json()["total"], 3);
    // An error answer is JSON too.
    let refused = fetch(&app, "/v0/nodes?sort=color", Some(&admin), Some("gzip")).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn dashboard_files_and_metrics_are_compressed_and_the_inference_api_is_not() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let nodes = register_named(&app, &["gpu-a"]).await;
    let node = &nodes[0];
    approve(&app, &admin, node).await;
    let model = "a-model-with-a-name-long-enough-to-be-worth-compressing";
    assert_eq!(beat(&app, node, &[model]).await["status"], "online");

    for (path, encoding) in [
        ("/dashboard/app.js", "gzip"),
        ("/dashboard/app.js", "br"),
        ("/dashboard/style.css", "gzip"),
        ("/dashboard", "br"),
    ] {
        let plain = fetch(&app, path, None, None).await;
        assert_eq!(plain.status, 200, "{path}");
        assert_eq!(plain.encoding, None, "{path}");
        let packed = assert_compressed(&app, path, None, encoding).await;
        assert_ne!(packed.bytes, plain.bytes);
        assert_eq!(packed.decoded(), plain.bytes, "{path} with {encoding}");
    }
    let metrics = assert_compressed(&app, "/metrics", None, "gzip").await;
    let text = String::from_utf8(metrics.decoded()).expect("metrics text");
    assert!(text.contains("llm_router_nodes"), "{text}");

    for encoding in ["gzip", "br", "gzip, br"] {
        let models = fetch(&app, "/v1/models", Some(&admin), Some(encoding)).await;
        assert_eq!(models.status, 200);
        assert_eq!(models.encoding, None, "/v1 is not compressed by the router ({encoding})");
        let listed: Value = serde_json::from_slice(&models.bytes).expect("plain JSON");
        assert_eq!(listed["data"][0]["id"], model);
    }
}

// ---- At scale ------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn three_hundred_nodes_page_by_fifty_each_exactly_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let mut by_number = vec![String::new(); 300];
    // node-0 to node-299 in a scrambled order (7 and 300 are coprime).
    for k in 0..300 {
        let number = k * 7 % 300;
        by_number[number] = register(&app, &node_body(&format!("node-{number}"), 2)).await.id;
    }

    let pages = walk(&app, &admin, &[("sort", "name")], 50, None).await;
    assert_eq!(pages.len(), 6);
    for page in &pages {
        assert_eq!(page["total"], 300);
        assert_eq!(page["nodes"].as_array().expect("nodes").len(), 50);
    }
    assert_eq!(visited(&pages), by_number, "natural order: node-9 before node-10, every node once");
    let pages = walk(&app, &admin, &[("sort", "-name")], 50, None).await;
    assert_eq!(visited(&pages), reversed(by_number.clone()));
    // Every node has two GPUs: the order is the ids', across page boundaries.
    let pages = walk(&app, &admin, &[("sort", "gpus")], 50, None).await;
    assert_eq!(visited(&pages), by_id(by_number.clone()));

    // Offset pages, and the default page size of 100.
    let last = envelope(&app, &admin, &[("sort", "name"), ("offset", "250"), ("limit", "50")]).await;
    assert_eq!(ids(&last["nodes"]), by_number[250..].to_vec());
    assert!(last["next_cursor"].is_null());
    let all = ids(&array(&app, &admin, &[]).await);
    assert_eq!(by_id(all.clone()), by_id(by_number.clone()));
    let first = envelope(&app, &admin, &[("offset", "0")]).await;
    assert_eq!(ids(&first["nodes"]), all[..100].to_vec());
    assert!(first["next_cursor"].is_string());

    let counts = summary(&app, &admin).await;
    assert_eq!(counts["total"], 300);
    assert_eq!(counts["pending"], 300);
    assert_eq!(counts["gpus"], json!({"total": 600, "online": 0}));
}
