//! Deployments (SPEC §15): an administrator asks for a model on the fleet; the router places its replicas on nodes
//! whose agents start runtimes (`managed:<runtime>`), tells each node its assignments in the heartbeat's answer, and
//! shows what the nodes report of them. Placement passes are run by the test, not left to the background task, so
//! that each step is decided when the test says.

use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::helpers::*;

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn spec(name: &str, replicas: u32) -> Value {
    json!({
        "name": name,
        "model": "tiny-llama",
        "source": "http://models.example/tiny.gguf",
        "sha256": SHA,
        "runtime": "llama_cpp",
        "args": ["--n_ctx", "512"],
        "replicas": replicas,
        "gpu_memory_bytes": 1_000_000_000u64,
    })
}

async fn call(app: &TestApp, method: Method, path: &str, body: Option<&Value>) -> Response {
    let admin = app.admin_token().await;
    let mut request = app.request(method, path).bearer_auth(&admin);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.expect("send")
}

async fn create(app: &TestApp, body: &Value) -> Value {
    let answer = call(app, Method::POST, "/v0/deployments", Some(body)).await;
    assert_eq!(answer.status(), 201, "creating a deployment");
    crate::helpers::body(answer).await
}

async fn get(app: &TestApp, key: &str) -> Value {
    let answer = call(app, Method::GET, &format!("/v0/deployments/{key}"), None).await;
    assert_eq!(answer.status(), 200, "reading deployment {key}");
    crate::helpers::body(answer).await
}

/// Registers and approves a node whose agent starts llama.cpp (two GPUs, as `registration` says).
async fn managed_node(app: &TestApp, name: &str, tags: &[&str]) -> TestNode {
    let mut registration = registration(name, 8090);
    registration["supported_runtimes"] = json!(["managed:llama_cpp"]);
    registration["tags"] = json!(tags);
    let answer = app.register(&registration).await;
    assert_eq!(answer.status(), 201, "registering {name}");
    let answer = crate::helpers::body(answer).await;
    let node = TestNode {
        id: answer["node_id"].as_str().expect("id").to_owned(),
        token: answer["node_token"].as_str().expect("token").to_owned(),
    };
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    node
}

/// A heartbeat of a managed agent: `free` bytes of GPU memory free over its two GPUs, the ready models, the
/// replicas it reports.
/// Returns the answer's assignments.
async fn beat(app: &TestApp, node: &TestNode, free: u64, ready: &[&str], replicas: Value) -> Vec<Value> {
    let body = json!({
        "node_id": node.id,
        "gpus": [
            {"index": 0, "memory_total_bytes": 24_000_000_000u64, "memory_used_bytes": 24_000_000_000u64 - free / 2},
            {"index": 1, "memory_total_bytes": 24_000_000_000u64, "memory_used_bytes": 24_000_000_000u64 - (free - free / 2)},
        ],
        "ready_models": ready,
        "loaded_models": ready,
        "replicas": replicas,
    });
    let answer = app.heartbeat_body(&node.token, &body).await;
    assert_eq!(answer.status(), 200, "heartbeat of {}", node.id);
    crate::helpers::body(answer).await["assignments"].as_array().expect("assignments").clone()
}

async fn place(app: &TestApp) -> usize {
    app.state.deployments.place(&app.state.registry).await.expect("placement")
}

fn nodes_of(deployment: &Value) -> Vec<Option<String>> {
    deployment["replica_states"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["node_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn an_admin_creates_reads_changes_and_deletes_a_deployment_audited() {
    let app = TestApp::spawn().await;
    let created = create(&app, &spec("tiny", 1)).await;
    assert_eq!(created["name"], "tiny");
    assert_eq!(created["model"], "tiny-llama");
    assert_eq!(created["runtime"], "llama_cpp");
    assert_eq!(created["revision"], 1);
    assert_eq!(created["ready_replicas"], 0);
    let replicas = created["replica_states"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["state"], "pending");
    assert_eq!(replicas[0]["node_id"], Value::Null);
    assert_eq!(replicas[0]["reason"], "no node can take it: no node is approved yet");

    let id = created["id"].as_str().expect("id");
    assert_eq!(get(&app, "tiny").await["id"], id, "found by name");
    assert_eq!(get(&app, id).await["name"], "tiny", "and by id");
    let listed = crate::helpers::body(call(&app, Method::GET, "/v0/deployments", None).await).await;
    assert_eq!(listed["deployments"].as_array().expect("list").len(), 1);

    // Scaling keeps the revision; new args make a new one.
    let scaled = call(&app, Method::PATCH, "/v0/deployments/tiny", Some(&json!({"replicas": 3}))).await;
    let scaled = crate::helpers::body(scaled).await;
    assert_eq!((scaled["replicas"].clone(), scaled["revision"].clone()), (json!(3), json!(1)));
    assert_eq!(scaled["replica_states"].as_array().expect("replicas").len(), 3);
    let args = json!({"args": ["-c", "1024"]});
    let edited = call(&app, Method::PATCH, &format!("/v0/deployments/{id}"), Some(&args)).await;
    let edited = crate::helpers::body(edited).await;
    assert_eq!((edited["args"].clone(), edited["revision"].clone()), (json!(["-c", "1024"]), json!(2)));
    // A new URL needs its hash again.
    let new_source = json!({"source": "https://x.example/b"});
    let no_hash = call(&app, Method::PATCH, "/v0/deployments/tiny", Some(&new_source)).await;
    let message = assert_error(no_hash, 400, "invalid_request").await;
    assert!(message.contains("sha256"), "{message}");
    assert_eq!(get(&app, "tiny").await["source"], "http://models.example/tiny.gguf", "nothing changed");

    let taken = call(&app, Method::POST, "/v0/deployments", Some(&spec("tiny", 1))).await;
    assert_error(taken, 409, "conflict").await;

    assert_eq!(call(&app, Method::DELETE, "/v0/deployments/tiny", None).await.status(), 204);
    assert_error(call(&app, Method::GET, "/v0/deployments/tiny", None).await, 404, "not_found").await;
    assert_error(call(&app, Method::DELETE, &format!("/v0/deployments/{id}"), None).await, 404, "not_found").await;

    app.state.audit.flush().await;
    let admin = app.admin_token().await;
    let audit = app.request(Method::GET, "/v0/audit?limit=100").bearer_auth(&admin).send().await;
    let audit = crate::helpers::body(audit.expect("audit")).await;
    let mut actions: Vec<(String, String)> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["action"].as_str().is_some_and(|a| a.starts_with("deployment.")))
        .map(|e| (e["action"].as_str().unwrap_or("").to_owned(), e["outcome"].as_str().unwrap_or("").to_owned()))
        .collect();
    actions.reverse();
    let expected = [
        ("deployment.create", "success"),
        ("deployment.update", "success"),
        ("deployment.update", "success"),
        ("deployment.update", "failure"),
        ("deployment.create", "failure"),
        ("deployment.delete", "success"),
        ("deployment.delete", "failure"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, o)| ((*a).to_owned(), (*o).to_owned())).collect();
    assert_eq!(actions, expected);
}

#[tokio::test]
async fn bad_deployments_are_refused_with_the_field_named_and_viewers_only_read() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({"sha256": null}), "sha256"),
        (json!({"sha256": "12ab"}), "sha256"),
        (json!({"source": "ftp://x/y"}), "source"),
        (json!({"source": "file://relative.gguf"}), "source"),
        (json!({"replicas": 1001}), "replicas"),
        (json!({"gpu_memory_bytes": 0}), "gpu_memory_bytes"),
        (json!({"max_concurrency": 0}), "max_concurrency"),
        (json!({"model": ""}), "model"),
        (json!({"name": " "}), "name"),
        (json!({"name": "0b9c6a56-2c39-4c1e-9a53-1f0f7d3c1a11"}), "name"),
        (json!({"args": ["ok", "bad\u{1}"]}), "args[1]"),
        (json!({"node_selector": {"tags": [""]}}), "node_selector.tags[0]"),
    ];
    for (change, field) in cases {
        let mut body = spec("bad", 1);
        for (key, value) in change.as_object().expect("object") {
            body[key] = value.clone();
        }
        let message =
            assert_error(call(&app, Method::POST, "/v0/deployments", Some(&body)).await, 400, "invalid_request").await;
        assert!(message.contains(field), "{field}: {message}");
    }
    let mut unknown_runtime = spec("bad", 1);
    unknown_runtime["runtime"] = json!("tgi");
    assert_error(call(&app, Method::POST, "/v0/deployments", Some(&unknown_runtime)).await, 400, "invalid_request")
        .await;
    let listed = crate::helpers::body(call(&app, Method::GET, "/v0/deployments", None).await).await;
    assert_eq!(listed["deployments"], json!([]), "nothing was created");

    create(&app, &spec("tiny", 1)).await;
    let viewer = app.user_token("watcher", "viewer").await;
    let read = app.request(Method::GET, "/v0/deployments/tiny").bearer_auth(&viewer).send().await.expect("get");
    assert_eq!(read.status(), 200);
    for (method, path) in [
        (Method::POST, "/v0/deployments"),
        (Method::PATCH, "/v0/deployments/tiny"),
        (Method::DELETE, "/v0/deployments/tiny"),
    ] {
        let refused = app.request(method, path).bearer_auth(&viewer).json(&spec("x", 1)).send().await.expect("send");
        assert_error(refused, 403, "forbidden").await;
    }
    let anonymous = app.request(Method::GET, "/v0/deployments").send().await.expect("get");
    assert_error(anonymous, 401, "unauthorized").await;
}

#[tokio::test]
async fn replicas_spread_over_managed_nodes_and_the_heartbeat_answers_their_assignments() {
    let app = TestApp::spawn().await;
    let a = managed_node(&app, "gpu-a", &["eu"]).await;
    let b = managed_node(&app, "gpu-b", &["eu"]).await;
    let plain = app.register_node("plain").await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &plain.id).await.status(), 200);
    // Free memory: a has more, so the first replica goes there.
    assert!(beat(&app, &a, 20_000_000_000, &[], json!([])).await.is_empty());
    assert!(beat(&app, &b, 10_000_000_000, &[], json!([])).await.is_empty());
    // A node whose agent starts no runtime sends no `replicas` and is answered no assignments.
    let answer = app.heartbeat(&plain, &[]).await;
    assert_eq!(crate::helpers::body(answer).await.get("assignments"), None);

    let created = create(&app, &spec("tiny", 3)).await;
    let nodes = nodes_of(&created);
    assert_eq!(nodes, vec![Some(a.id.clone()), Some(b.id.clone()), None], "placed at once, one per node");
    let third = &created["replica_states"][2];
    assert_eq!(third["state"], "pending");
    assert_eq!(
        third["reason"],
        "no node can take it: of 3 nodes, 1 without an agent that starts llama_cpp (llm-node --manage-runtimes); \
         2 running a replica of it already"
    );
    assert_eq!(created["replica_states"][0]["node_name"], "gpu-a");

    let assigned = beat(&app, &a, 20_000_000_000, &[], json!([])).await;
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0]["deployment_id"], created["id"]);
    assert_eq!(assigned[0]["revision"], 1);
    assert_eq!(assigned[0]["model"], "tiny-llama");
    assert_eq!(assigned[0]["source"], "http://models.example/tiny.gguf");
    assert_eq!(assigned[0]["sha256"], SHA);
    assert_eq!(assigned[0]["runtime"], "llama_cpp");
    assert_eq!(assigned[0]["args"], json!(["--n_ctx", "512"]));
    assert_eq!(assigned[0]["gpu_memory_bytes"], 1_000_000_000u64, "the agent picks GPUs with this much free");
    let waiting = get(&app, "tiny").await;
    assert_eq!(waiting["replica_states"][0]["reason"], "placed; waiting for the node's agent to take it up");

    // The agent downloads, starts, serves: each report shows, and a ready replica's model brings the node online.
    let id = created["id"].clone();
    let report = |state: &str, extra: Value| {
        let mut report = json!({"deployment_id": id, "revision": 1, "state": state, "restarts": 0});
        for (key, value) in extra.as_object().expect("object") {
            report[key] = value.clone();
        }
        json!([report])
    };
    beat(&app, &a, 20_000_000_000, &[], report("downloading", json!({"bytes_done": 100, "bytes_total": 400}))).await;
    let downloading = &get(&app, "tiny").await["replica_states"][0];
    assert_eq!((downloading["state"].clone(), downloading["bytes_done"].clone()), (json!("downloading"), json!(100)));
    assert_eq!(downloading["bytes_total"], 400);
    let ready =
        report("ready", json!({"port": 41001, "pid": 4242, "download_ms": 900, "start_ms": 2100, "gpus": [1, 0, 1]}));
    beat(&app, &a, 19_000_000_000, &["tiny-llama"], ready).await;
    let deployment = get(&app, "tiny").await;
    assert_eq!(deployment["ready_replicas"], 1);
    let replica = &deployment["replica_states"][0];
    assert_eq!((replica["state"].clone(), replica["port"].clone()), (json!("ready"), json!(41001)));
    assert_eq!((replica["download_ms"].clone(), replica["start_ms"].clone()), (json!(900), json!(2100)));
    assert_eq!(replica["gpus"], json!([0, 1]), "the GPUs its runtime sees, once each");
    assert_eq!(downloading["gpus"], Value::Null, "none before the runtime starts");
    assert!(replica["ready_at"].is_string());
    assert_eq!(app.status_of(&a.id).await, "online");

    // What was reported is written behind, and read back as it was.
    app.state.deployments.flush().await.expect("flush");
    let (_, stored) = app.state.store.deployments().await.expect("read back");
    let stored = stored.iter().find(|r| r.slot == 0).expect("slot 0");
    assert_eq!(stored.report.port, Some(41001));
    assert_eq!(stored.report.gpus, Some(vec![0, 1]));
    assert_eq!(stored.report.state.as_str(), "ready");

    // Scaling down removes the highest slots: b is no longer assigned anything.
    let scaled = call(&app, Method::PATCH, "/v0/deployments/tiny", Some(&json!({"replicas": 1}))).await;
    assert_eq!(scaled.status(), 200);
    assert!(beat(&app, &b, 10_000_000_000, &[], json!([])).await.is_empty());
    assert_eq!(beat(&app, &a, 19_000_000_000, &["tiny-llama"], json!([])).await.len(), 1);
    // Deleted: nobody runs it.
    assert_eq!(call(&app, Method::DELETE, "/v0/deployments/tiny", None).await.status(), 204);
    assert!(beat(&app, &a, 19_000_000_000, &[], json!([])).await.is_empty());
}

#[tokio::test]
async fn a_replica_whose_node_goes_offline_or_degraded_is_placed_elsewhere() {
    let app = TestApp::spawn().await;
    let a = managed_node(&app, "gpu-a", &[]).await;
    let b = managed_node(&app, "gpu-b", &[]).await;
    beat(&app, &a, 20_000_000_000, &[], json!([])).await;
    beat(&app, &b, 10_000_000_000, &[], json!([])).await;
    let created = create(&app, &spec("tiny", 1)).await;
    assert_eq!(nodes_of(&created), vec![Some(a.id.clone())]);

    // a falls silent: once offline, its replica goes to b, which hears of it at its next heartbeat.
    let offline_after = app.settings.offline_after.as_millis() as i64;
    for _ in 0..4 {
        app.advance_and_sweep(offline_after / 4).await;
        beat(&app, &b, 10_000_000_000, &[], json!([])).await;
    }
    app.advance_and_sweep(offline_after / 4).await;
    assert_eq!(app.status_of(&a.id).await, "offline");
    assert_eq!(place(&app).await, 1);
    assert_eq!(nodes_of(&get(&app, "tiny").await), vec![Some(b.id.clone())]);
    assert_eq!(beat(&app, &b, 10_000_000_000, &[], json!([])).await.len(), 1);

    // b reports a GPU too hot: degraded, and with a back as the only other node, the replica returns there.
    beat(&app, &a, 20_000_000_000, &[], json!([])).await;
    let hot = json!({
        "node_id": b.id,
        "gpus": [
            {"index": 0, "memory_total_bytes": 24_000_000_000u64, "memory_used_bytes": 0, "temperature_c": 99.0},
            {"index": 1, "memory_total_bytes": 24_000_000_000u64, "memory_used_bytes": 0},
        ],
        "replicas": [],
    });
    assert_eq!(app.heartbeat_body(&b.token, &hot).await.status(), 200);
    assert_eq!(app.status_of(&b.id).await, "degraded");
    assert_eq!(place(&app).await, 1);
    assert_eq!(nodes_of(&get(&app, "tiny").await), vec![Some(a.id.clone())]);
}

#[tokio::test]
async fn placement_follows_the_selector_and_the_memory_asked_and_survives_a_restart() {
    let app = TestApp::spawn().await;
    let small = managed_node(&app, "small", &["a100"]).await;
    let other = managed_node(&app, "other", &["l4"]).await;
    beat(&app, &small, 500_000_000, &[], json!([])).await;
    beat(&app, &other, 20_000_000_000, &[], json!([])).await;
    let mut body = spec("big", 1);
    body["node_selector"] = json!({"tags": ["a100"]});
    let created = create(&app, &body).await;
    assert_eq!(nodes_of(&created), vec![None]);
    assert_eq!(
        created["replica_states"][0]["reason"],
        "no node can take it: of 2 nodes, 1 without the tags a100; 1 with less than 1000000000 bytes of GPU memory free"
    );
    // More memory frees up on the matching node: the next pass places the replica there.
    beat(&app, &small, 2_000_000_000, &[], json!([])).await;
    assert_eq!(place(&app).await, 1);
    assert_eq!(nodes_of(&get(&app, "big").await), vec![Some(small.id.clone())]);

    // A second pass changes nothing; the selector changed to another tag moves the replica.
    assert_eq!(place(&app).await, 0);
    let selector = json!({"node_selector": {"tags": ["l4"]}});
    let moved = call(&app, Method::PATCH, "/v0/deployments/big", Some(&selector)).await;
    let moved = crate::helpers::body(moved).await;
    assert_eq!(nodes_of(&moved), vec![Some(other.id.clone())]);
    assert_eq!(moved["revision"], 1, "where replicas run is not a new revision");

    let app = app.restart(0).await;
    let again = get(&app, "big").await;
    assert_eq!(nodes_of(&again), vec![Some(other.id.clone())]);
    assert_eq!(again["node_selector"], json!({"tags": ["l4"]}));
    assert_eq!(beat(&app, &other, 20_000_000_000, &[], json!([])).await.len(), 1, "assignments survive a restart");
}

#[tokio::test]
async fn a_heartbeat_with_bad_replica_reports_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let node = managed_node(&app, "gpu-a", &[]).await;
    let bad = json!({"node_id": node.id, "replicas": [{"deployment_id": "x", "revision": 1, "state": "ready"}]});
    assert_error(app.heartbeat_body(&node.token, &bad).await, 400, "invalid_request").await;
    let id = uuid::Uuid::new_v4();
    let zero = json!({"node_id": node.id, "replicas": [{"deployment_id": id, "revision": 0, "state": "ready"}]});
    let message = assert_error(app.heartbeat_body(&node.token, &zero).await, 400, "invalid_request").await;
    assert!(message.contains("replicas[0].revision"), "{message}");
    let far = json!({"node_id": node.id, "replicas": [{"deployment_id": id, "revision": 1, "state": "ready", "gpus": [0, 1024]}]});
    let message = assert_error(app.heartbeat_body(&node.token, &far).await, 400, "invalid_request").await;
    assert!(message.contains("replicas[0].gpus"), "{message}");
    let many: Vec<Value> = (0..257).map(|_| json!({"deployment_id": id, "revision": 1, "state": "pending"})).collect();
    let message = assert_error(
        app.heartbeat_body(&node.token, &json!({"node_id": node.id, "replicas": many})).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(message.contains("replicas"), "{message}");
    // A report of a deployment the router does not know is ignored.
    let unknown = json!([{"deployment_id": id, "revision": 3, "state": "ready", "restarts": 0}]);
    assert!(beat(&app, &node, 1_000, &[], unknown).await.is_empty());
}

#[tokio::test]
async fn an_agent_waiting_on_its_assignments_hears_of_a_placement_at_once() {
    let app = TestApp::spawn().await;
    let node = managed_node(&app, "gpu-a", &[]).await;
    beat(&app, &node, 20_000_000_000, &[], json!([])).await;
    let poll = |query: String| {
        app.request(Method::GET, &format!("/v0/assignments{query}")).header("X-Node-Token", &node.token).send()
    };
    let first = crate::helpers::body(poll(String::new()).await.expect("poll")).await;
    assert_eq!(first["assignments"], json!([]));
    let known = first["fingerprint"].as_str().expect("fingerprint").to_owned();
    // Nothing changed: answered after the wait, with the same fingerprint.
    let same = crate::helpers::body(poll(format!("?known={known}&wait_secs=0")).await.expect("poll")).await;
    assert_eq!(same["fingerprint"], known.as_str());

    let waiting = tokio::spawn(poll(format!("?known={known}&wait_secs=30")));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the agent waits while nothing changes");
    let started = std::time::Instant::now();
    create(&app, &spec("tiny", 1)).await;
    let answer = waiting.await.expect("task").expect("poll");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered when the placement happened");
    let answer = crate::helpers::body(answer).await;
    assert_eq!(answer["assignments"][0]["model"], "tiny-llama");
    assert_ne!(answer["fingerprint"], known.as_str());

    assert_error(poll("?wait_secs=61".into()).await.expect("poll"), 400, "invalid_request").await;
    let anonymous = app.request(Method::GET, "/v0/assignments").send().await.expect("poll");
    assert_error(anonymous, 401, "unauthorized").await;
}
