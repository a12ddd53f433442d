//! Cache-aware routing (SPEC §13) through the router: requests that share a long prefix go to one node, sessions
//! follow their node, a node whose runtime reports a queue is passed over, and `/metrics` counts how each request's
//! node was chosen. The nodes are stand-in runtimes that say who answered.

use std::collections::{HashMap, HashSet};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::inference::{Runtime, online_node};

/// A chat request whose system prompt is `system`, long enough to be worth caching, and a question.
fn chat_body(system: &str, question: &str) -> Value {
    json!({"model": "m", "messages": [
        {"role": "system", "content": format!("{system} {}", "Answer from the manual only. ".repeat(60))},
        {"role": "user", "content": question},
    ]})
}

/// Sends `body` (with `session`, if any) and answers the id of the node that served it.
async fn served_by(app: &TestApp, key: &str, body: &Value, session: Option<&str>) -> String {
    let mut call = app.request(Method::POST, "/v1/chat/completions").bearer_auth(key).json(body);
    if let Some(session) = session {
        call = call.header("x-session-id", session);
    }
    let answer = call.send().await.expect("chat");
    assert_eq!(answer.status(), 200);
    answer.headers()["x-llm-router-node"].to_str().expect("node").to_owned()
}

/// Three online nodes serving `m`, and their runtimes.
async fn three_nodes(app: &TestApp) -> (Vec<String>, Vec<Runtime>) {
    let mut ids = Vec::new();
    let mut runtimes = Vec::new();
    for name in ["a", "b", "c"] {
        let runtime = Runtime::start(name, &["m"]).await;
        ids.push(online_node(app, &format!("gpu-{name}"), &runtime, &["m"]).await);
        runtimes.push(runtime);
    }
    (ids, runtimes)
}

#[tokio::test]
async fn a_shared_prefix_stays_on_one_node_and_different_prefixes_spread() {
    let app = TestApp::spawn().await;
    let (ids, _runtimes) = three_nodes(&app).await;
    let key = app.admin_token().await;
    // The first request of a prefix goes where any would (no node holds it yet); the next ones to its node.
    let mut nodes = HashSet::new();
    for question in 0..12 {
        let node =
            served_by(&app, &key, &chat_body("You are the support desk of ACME.", &format!("Q{question}")), None).await;
        if question > 0 {
            nodes.insert(node);
        }
    }
    assert_eq!(nodes.len(), 1, "one prefix, one node: {nodes:?}");

    let mut per_node: HashMap<String, u32> = HashMap::new();
    for prompt in 0..30 {
        let body = chat_body(&format!("You are assistant number {prompt}."), "Hi");
        served_by(&app, &key, &body, None).await;
        *per_node.entry(served_by(&app, &key, &body, None).await).or_default() += 1;
    }
    assert_eq!(per_node.len(), ids.len(), "thirty prefixes reach every node: {per_node:?}");

    let scraped = app.scrape().await;
    let routed = |how: &str| scraped.value("llm_router_inference_routed_total", &[("model", "m"), ("how", how)]);
    assert_eq!(routed("affinity"), Some(41.0), "sequential requests never exceed the load bound");
    assert_eq!(routed("new_prefix"), Some(31.0), "the first request of each prefix");
    assert_eq!(routed("spilled"), Some(0.0));
    assert_eq!(routed("no_prefix"), Some(0.0));
}

#[tokio::test]
async fn a_session_follows_its_node_whatever_its_prompts() {
    let app = TestApp::spawn().await;
    three_nodes(&app).await;
    let key = app.admin_token().await;
    let mut by_session: HashMap<String, HashSet<String>> = HashMap::new();
    for session in 0..6 {
        for turn in 0..4 {
            let body =
                json!({"model": "m", "messages": [{"role": "user", "content": format!("turn {turn} {session}")}]});
            let id = format!("session-{session}");
            let node = served_by(&app, &key, &body, Some(&id)).await;
            by_session.entry(id).or_default().insert(node);
        }
    }
    for (session, nodes) in &by_session {
        assert_eq!(nodes.len(), 1, "{session} moved: {nodes:?}");
    }
}

#[tokio::test]
async fn a_node_whose_runtime_reports_a_queue_is_passed_over_until_it_drains() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let b = Runtime::start("b", &["m"]).await;
    let key = app.admin_token().await;
    let mut nodes = Vec::new();
    for (name, runtime) in [("gpu-a", &a), ("gpu-b", &b)] {
        let node = app.register_node_at(name, runtime.addr.port()).await;
        assert_eq!(app.approve(&key, &node.id).await.status(), 200);
        assert_eq!(app.heartbeat(&node, &["m"]).await.status(), 200);
        nodes.push(node);
    }
    let body = chat_body("You review pull requests.", "Is this fine?");
    // The prefix's first request goes where any would; the second to the node its key ranks first.
    served_by(&app, &key, &body, None).await;
    let first = served_by(&app, &key, &body, None).await;
    let (busy, idle) = if first == nodes[0].id { (&nodes[0], &nodes[1]) } else { (&nodes[1], &nodes[0]) };
    let beat = |waiting: u32| {
        json!({"node_id": busy.id, "ready_models": ["m"],
               "load": {"running": 4, "waiting": waiting, "kv_cache_usage": 0.93}})
    };
    assert_eq!(app.heartbeat_body(&busy.token, &beat(10)).await.status(), 200);
    let shown = app.node(&busy.id).await;
    assert_eq!(shown["metrics"]["load"], json!({"running": 4, "waiting": 10, "kv_cache_usage": 0.93}));
    assert_eq!(served_by(&app, &key, &body, None).await, idle.id, "ten waiting there: the prefix spills");
    assert_eq!(app.heartbeat_body(&busy.token, &beat(0)).await.status(), 200);
    assert_eq!(served_by(&app, &key, &body, None).await, busy.id, "drained: the prefix comes back");
    let spilled = app.scrape().await.value("llm_router_inference_routed_total", &[("model", "m"), ("how", "spilled")]);
    assert_eq!(spilled, Some(1.0));
}

#[tokio::test]
async fn a_heartbeat_load_out_of_bounds_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let node = app.register_node("gpu-load").await;
    let body = json!({"node_id": node.id, "load": {"kv_cache_usage": 1.5}});
    let answer = app.heartbeat_body(&node.token, &body).await;
    let message = assert_error(answer, 400, "invalid_request").await;
    assert!(message.contains("load.kv_cache_usage"), "{message}");
    assert!(app.node(&node.id).await["metrics"].is_null(), "nothing of the refused heartbeat was kept");
}

#[tokio::test]
async fn least_loaded_ignores_prefixes_and_counts_its_choices() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.routing.policy = llm_router::config::RoutingPolicy::LeastLoaded;
    })
    .await;
    let (ids, _runtimes) = three_nodes(&app).await;
    let key = app.admin_token().await;
    let mut nodes = HashSet::new();
    for question in 0..30 {
        nodes.insert(served_by(&app, &key, &chat_body("One shared prompt.", &format!("Q{question}")), None).await);
    }
    assert!(nodes.len() > 1, "one prefix, spread over the nodes at random: {nodes:?} of {ids:?}");
    let scraped = app.scrape().await;
    let routed = |how: &str| scraped.value("llm_router_inference_routed_total", &[("model", "m"), ("how", how)]);
    assert_eq!(routed("least_loaded"), Some(30.0));
    assert_eq!(routed("affinity"), Some(0.0));
}
