//! The OpenAI-compatible front door (SPEC §8): requests go to an online node with the model ready, byte for byte,
//! streams chunk by chunk; failures before the first byte are retried elsewhere, failing nodes are ejected, a client
//! that leaves cancels the upstream request. The nodes are stand-in runtimes that can be told to fail, hang or stream
//! on command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use llm_router::config::QueueOrder;

use crate::helpers::*;

/// A stand-in inference runtime.
pub struct Runtime {
    pub addr: SocketAddr,
    pub shared: Arc<RuntimeState>,
}

#[derive(Default)]
pub struct RuntimeState {
    /// Answer this status to completions (0: a normal answer).
    status: AtomicU16,
    /// Never answer a completion.
    pub hang: AtomicBool,
    /// Break a streamed answer off after its first chunk, as a crashing runtime does.
    reset_mid_stream: AtomicBool,
    /// Completions received.
    pub received: AtomicUsize,
    /// The last body received, as bytes.
    last_body: std::sync::Mutex<Vec<u8>>,
    /// The `Authorization` header of the last request, if any.
    last_auth: std::sync::Mutex<Option<String>>,
    /// The `Via` header of the last request, if any.
    pub last_via: std::sync::Mutex<Option<String>>,
    /// A streamed answer sends its next chunk each time this is notified.
    next_chunk: Notify,
    /// Set when a streamed answer's receiver went away.
    pub cancelled: AtomicBool,
    cancelled_seen: Notify,
    /// Stream 64 KiB events without end, as fast as they are taken, until the receiver goes away.
    pub flood: AtomicBool,
    /// Send a streamed answer's headers, then nothing.
    pub silent_after_headers: AtomicBool,
    /// Hold every completion until `release` lets one go.
    hold: AtomicBool,
    release: Notify,
    /// The `user` of every completion received, in order.
    users: std::sync::Mutex<Vec<String>>,
    name: std::sync::Mutex<String>,
}

impl Runtime {
    pub async fn start(name: &str, models: &[&str]) -> Runtime {
        let shared = Arc::new(RuntimeState::default());
        *shared.name.lock().expect("lock") = name.to_owned();
        let models: Vec<Value> = models.iter().map(|m| json!({"id": m, "object": "model"})).collect();
        let list = json!({"object": "list", "data": models});
        let app = axum::Router::new()
            .route("/v1/models", get(move || async move { axum::Json(list.clone()) }))
            .route("/v1/chat/completions", post(completion))
            .route("/v1/embeddings", post(completion))
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Runtime { addr, shared }
    }
}

async fn completion(State(shared): State<Arc<RuntimeState>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.received.fetch_add(1, Ordering::SeqCst);
    *shared.last_body.lock().expect("lock") = body.to_vec();
    *shared.last_auth.lock().expect("lock") =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    *shared.last_via.lock().expect("lock") = headers.get(header::VIA).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(user) = serde_json::from_slice::<Value>(&body).ok().and_then(|b| b["user"].as_str().map(str::to_owned))
    {
        shared.users.lock().expect("lock").push(user);
    }
    if shared.hold.load(Ordering::SeqCst) {
        shared.release.notified().await;
    }
    if shared.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let status = shared.status.load(Ordering::SeqCst);
    if status != 0 {
        return (StatusCode::from_u16(status).expect("status"), "failing on purpose").into_response();
    }
    let request: Value = serde_json::from_slice(&body).expect("JSON");
    let name = shared.name.lock().expect("lock").clone();
    if request["stream"] == true && shared.silent_after_headers.load(Ordering::SeqCst) {
        let silence = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(silence))
            .expect("response");
    }
    if request["stream"] == true && shared.flood.load(Ordering::SeqCst) {
        let (chunks, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let state = shared.clone();
        tokio::spawn(async move {
            let event = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024)));
            while chunks.send(Ok(event.clone())).await.is_ok() {}
            state.cancelled.store(true, Ordering::SeqCst);
            state.cancelled_seen.notify_one();
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(tokio_stream_from(receiver)))
            .expect("response");
    }
    if request["stream"] == true {
        let (chunks, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let state = shared.clone();
        tokio::spawn(async move {
            for i in 0..3 {
                tokio::select! {
                    () = state.next_chunk.notified() => {}
                    () = chunks.closed() => {
                        state.cancelled.store(true, Ordering::SeqCst);
                        state.cancelled_seen.notify_one();
                        return;
                    }
                }
                if i == 1 && state.reset_mid_stream.load(Ordering::SeqCst) {
                    let _ = chunks.send(Err(std::io::Error::other("the runtime crashed"))).await;
                    return;
                }
                let chunk = format!("data: {{\"node\":\"{name}\",\"chunk\":{i}}}\n\n");
                if chunks.send(Ok(Bytes::from(chunk))).await.is_err() {
                    state.cancelled.store(true, Ordering::SeqCst);
                    state.cancelled_seen.notify_one();
                    return;
                }
            }
            state.next_chunk.notified().await;
            let _ = chunks.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
        });
        let stream = tokio_stream_from(receiver);
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(stream))
            .expect("response");
    }
    axum::Json(json!({"object": "chat.completion", "model": request["model"], "node": name})).into_response()
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// Registers, approves and heartbeats a node whose runtime is `runtime`, with `models` ready.
pub async fn online_node(app: &TestApp, name: &str, runtime: &Runtime, models: &[&str]) -> String {
    let node = app.register_node_at(name, runtime.addr.port()).await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    assert_eq!(app.heartbeat(&node, models).await.status(), 200);
    assert_eq!(app.status_of(&node.id).await, "online");
    node.id
}

pub async fn chat(app: &TestApp, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut call = app.request(Method::POST, "/v1/chat/completions").json(body);
    if let Some(key) = key {
        call = call.bearer_auth(key);
    }
    call.send().await.expect("chat")
}

pub async fn openai_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let body = body(response).await;
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string(), "{body}");
    body
}

#[tokio::test]
async fn a_request_goes_byte_for_byte_to_an_online_node_with_the_model_and_says_which() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let b = Runtime::start("b", &["other"]).await;
    let a_id = online_node(&app, "gpu-a", &a, &["m"]).await;
    online_node(&app, "gpu-b", &b, &["other"]).await;
    let key = app.admin_token().await;
    // Odd spacing and an unknown field: the router reads `model` and passes the bytes on unchanged.
    let raw = r#"{"model":"m",  "messages":[{"role":"user","content":"hi"}], "x_custom": {"kept": true}}"#;
    let answer = app
        .request(Method::POST, "/v1/chat/completions")
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .expect("chat");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-llm-router-node"], a_id.as_str());
    assert_eq!(body(answer).await["node"], "a");
    assert_eq!(a.shared.last_body.lock().expect("lock").as_slice(), raw.as_bytes());
    assert_eq!(*a.shared.last_auth.lock().expect("lock"), None, "the client's credential is not passed on");
    assert_eq!(b.shared.received.load(Ordering::SeqCst), 0);

    let models = body(app.request(Method::GET, "/v1/models").bearer_auth(&key).send().await.expect("models")).await;
    let ids: Vec<&str> =
        models["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().expect("id")).collect();
    assert_eq!(ids, vec!["m", "other"]);
    let one = app.request(Method::GET, "/v1/models/m").bearer_auth(&key).send().await.expect("model");
    assert_eq!(body(one).await["object"], "model");
}

#[tokio::test]
async fn errors_have_openai_shape_and_keys_are_required() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    online_node(&app, "gpu-a", &a, &["m"]).await;
    openai_error(chat(&app, None, &json!({"model": "m"})).await, 401, "invalid_api_key").await;
    openai_error(chat(&app, Some("llmk_wrong"), &json!({"model": "m"})).await, 401, "invalid_api_key").await;
    let key = app.admin_token().await;
    openai_error(chat(&app, Some(&key), &json!({"model": "nope"})).await, 404, "model_not_found").await;
    openai_error(chat(&app, Some(&key), &json!({"messages": []})).await, 400, "invalid_request").await;
    let missing = app.request(Method::GET, "/v1/models/nope").bearer_auth(&key).send().await.expect("model");
    openai_error(missing, 404, "model_not_found").await;
    assert_eq!(a.shared.received.load(Ordering::SeqCst), 0, "nothing reached the node");
}

#[tokio::test]
async fn inference_auth_none_opens_v1_and_nothing_else() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.inference_auth = llm_router::config::InferenceAuth::None;
    })
    .await;
    let a = Runtime::start("a", &["m"]).await;
    online_node(&app, "gpu-a", &a, &["m"]).await;
    assert_eq!(chat(&app, None, &json!({"model": "m"})).await.status(), 200);
    assert_eq!(app.request(Method::GET, "/v0/nodes").send().await.expect("nodes").status(), 401);
}

#[tokio::test]
async fn a_failing_node_is_retried_elsewhere_and_ejected_after_three_failures() {
    let app = TestApp::spawn().await;
    let bad = Runtime::start("bad", &["m"]).await;
    let good = Runtime::start("good", &["m"]).await;
    let bad_id = online_node(&app, "gpu-bad", &bad, &["m"]).await;
    let good_id = online_node(&app, "gpu-good", &good, &["m"]).await;
    bad.shared.status.store(503, Ordering::SeqCst);
    let key = app.admin_token().await;
    // A request without a prompt goes to the less loaded of two idle nodes drawn at random: send until the third
    // failure (a bound only a broken draw reaches), then as many again, none of which may reach the ejected node.
    let mut sent = 0;
    while bad.shared.received.load(Ordering::SeqCst) < 3 && sent < 200 {
        let answer = chat(&app, Some(&key), &json!({"model": "m"})).await;
        assert_eq!(answer.status(), 200, "a 503 before the first byte is retried on the other node");
        assert_eq!(answer.headers()["x-llm-router-node"], good_id.as_str());
        sent += 1;
    }
    for _ in 0..sent.max(12) {
        let answer = chat(&app, Some(&key), &json!({"model": "m"})).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-llm-router-node"], good_id.as_str());
    }
    let routing = app.state.registry.routing();
    let figures = routing.figures(bad_id.parse().expect("uuid"), app.clock_ms()).expect("figures");
    assert_eq!(bad.shared.received.load(Ordering::SeqCst), 3, "ejected after three failures, then left alone");
    assert_eq!(figures.failures_total, 3);
    assert!(figures.ejected_until.is_some_and(|until| until == app.clock_ms() + 5_000), "{figures:?}");

    // After the ejection, one trial: it succeeds, and the node takes traffic again.
    bad.shared.status.store(0, Ordering::SeqCst);
    app.clock.advance_ms(5_000);
    let mut served_by_bad = 0;
    for _ in 0..20 {
        let answer = chat(&app, Some(&key), &json!({"model": "m"})).await;
        assert_eq!(answer.status(), 200);
        served_by_bad += usize::from(answer.headers()["x-llm-router-node"] == bad_id.as_str());
    }
    assert!(served_by_bad > 0, "restored after a successful trial");

    // Every node failing: the client gets 503 no_available_node with Retry-After.
    bad.shared.status.store(502, Ordering::SeqCst);
    good.shared.status.store(502, Ordering::SeqCst);
    let answer = chat(&app, Some(&key), &json!({"model": "m"})).await;
    assert!(answer.headers().contains_key("retry-after"));
    openai_error(answer, 503, "no_available_node").await;
}

#[tokio::test]
async fn a_node_that_sends_no_headers_in_time_is_retried_elsewhere() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.upstream_header_timeout = Duration::from_millis(300);
    })
    .await;
    let slow = Runtime::start("slow", &["m"]).await;
    let fine = Runtime::start("fine", &["m"]).await;
    online_node(&app, "gpu-slow", &slow, &["m"]).await;
    let fine_id = online_node(&app, "gpu-fine", &fine, &["m"]).await;
    slow.shared.hang.store(true, Ordering::SeqCst);
    let key = app.admin_token().await;
    for _ in 0..4 {
        let answer = chat(&app, Some(&key), &json!({"model": "m"})).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-llm-router-node"], fine_id.as_str());
    }
}

#[tokio::test]
async fn a_stream_passes_chunk_by_chunk_is_counted_in_flight_and_a_client_that_leaves_cancels_it() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let id: uuid::Uuid = online_node(&app, "gpu-a", &a, &["m"]).await.parse().expect("uuid");
    let key = app.admin_token().await;
    let in_flight = || app.state.registry.routing().figures(id, app.clock_ms()).expect("figures").in_flight;

    let answer = chat(&app, Some(&key), &json!({"model": "m", "stream": true})).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let mut answer = answer;
    // Each chunk reaches the client before the runtime has written the next one: nothing is held back.
    for i in 0..3 {
        a.shared.next_chunk.notify_one();
        let chunk = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("in time");
        let chunk = chunk.expect("bytes").expect("a chunk");
        assert!(String::from_utf8_lossy(&chunk).contains(&format!("\"chunk\":{i}")), "{chunk:?}");
        assert_eq!(in_flight(), 1, "in flight while the stream is open");
    }
    a.shared.next_chunk.notify_one();
    let rest = answer.bytes().await.expect("the rest");
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    assert_eq!(in_flight(), 0, "no longer in flight once the body ended");

    // A client that leaves mid-stream: the runtime sees its stream go away.
    let mut answer = chat(&app, Some(&key), &json!({"model": "m", "stream": true})).await;
    a.shared.next_chunk.notify_one();
    let first = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("first chunk");
    assert!(first.expect("ok").is_some());
    drop(answer);
    // The runtime learns of it when it writes next: keep it writing until it sees its stream closed.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !a.shared.cancelled.load(Ordering::SeqCst) {
            a.shared.next_chunk.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(50), a.shared.cancelled_seen.notified()).await;
        }
    })
    .await
    .expect("the runtime saw the client leave");
    tokio::time::timeout(Duration::from_secs(5), async {
        while in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("not in flight once the client left");
}

#[tokio::test]
async fn offline_and_deleted_nodes_leave_routing() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let id = online_node(&app, "gpu-a", &a, &["m"]).await;
    let key = app.admin_token().await;
    assert_eq!(chat(&app, Some(&key), &json!({"model": "m"})).await.status(), 200);
    app.advance_and_sweep(31_000).await;
    assert_eq!(app.status_of(&id).await, "offline");
    openai_error(chat(&app, Some(&key), &json!({"model": "m"})).await, 404, "model_not_found").await;
    let models = body(app.request(Method::GET, "/v1/models").bearer_auth(&key).send().await.expect("models")).await;
    assert_eq!(models["data"], json!([]));
}

#[tokio::test]
async fn a_cordoned_node_gets_no_new_request_and_uncordoning_restores_it() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let b = Runtime::start("b", &["m"]).await;
    let a_id = online_node(&app, "gpu-a", &a, &["m"]).await;
    let b_id = online_node(&app, "gpu-b", &b, &["m"]).await;
    let admin = app.admin_token().await;
    let viewer = app.user_token("watcher", "viewer").await;
    let refused = app.request(Method::POST, &format!("/v0/nodes/{a_id}/cordon")).bearer_auth(&viewer).send().await;
    assert_error(refused.expect("cordon"), 403, "forbidden").await;

    let cordoned = app.request(Method::POST, &format!("/v0/nodes/{a_id}/cordon")).bearer_auth(&admin).send().await;
    let cordoned = body(cordoned.expect("cordon")).await;
    assert_eq!(cordoned["schedulable"], false);
    assert_eq!(cordoned["status"], "online", "cordoning changes routing, not the status");
    for _ in 0..10 {
        let answer = chat(&app, Some(&admin), &json!({"model": "m"})).await;
        assert_eq!(answer.headers()["x-llm-router-node"], b_id.as_str());
    }
    assert_eq!(a.shared.received.load(Ordering::SeqCst), 0);
    let events = app.events(&a_id).await;
    assert_eq!(events[0]["reason"], "cordoned: no new requests");
    assert_eq!(events[0]["actor"], "admin");

    // Every node with the model cordoned: the model is known, no node takes it now (503, not 404), and it leaves
    // the model list.
    let b_cordon = app.request(Method::POST, &format!("/v0/nodes/{b_id}/cordon")).bearer_auth(&admin).send().await;
    assert_eq!(b_cordon.expect("cordon").status(), 200);
    let refused = chat(&app, Some(&admin), &json!({"model": "m"})).await;
    assert!(refused.headers().contains_key("retry-after"));
    openai_error(refused, 503, "no_available_node").await;
    let models = app.request(Method::GET, "/v1/models").bearer_auth(&admin).send().await.expect("models");
    assert_eq!(body(models).await["data"], json!([]));
    let b_back = app.request(Method::POST, &format!("/v0/nodes/{b_id}/uncordon")).bearer_auth(&admin).send().await;
    assert_eq!(b_back.expect("uncordon").status(), 200);
    assert_eq!(chat(&app, Some(&admin), &json!({"model": "m"})).await.headers()["x-llm-router-node"], b_id.as_str());

    // Persisted: a restart keeps it cordoned.
    let app = app.restart(0).await;
    assert_eq!(app.node(&a_id).await["schedulable"], false);
    let admin = app.admin_token().await;
    let node = app.request(Method::POST, &format!("/v0/nodes/{a_id}/uncordon")).bearer_auth(&admin).send().await;
    assert_eq!(body(node.expect("uncordon")).await["schedulable"], true);
    // Its heartbeat brings it back online after the restart's grace; it is routable again.
    let audit = app.request(Method::GET, "/v0/audit?action=node.cordon").bearer_auth(&admin).send().await;
    let audit = body(audit.expect("audit")).await;
    let targets: Vec<&str> =
        audit.as_array().expect("audit").iter().map(|e| e["target"].as_str().expect("target")).collect();
    assert_eq!(targets, vec![b_id.as_str(), a_id.as_str()], "newest first");
    assert!(app.state.registry.routing().figures(a_id.parse().expect("uuid"), app.clock_ms()).is_some());
}

#[tokio::test]
async fn an_inference_key_works_on_v1_only_and_keys_made_without_a_scope_reach_both() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    online_node(&app, "gpu-a", &a, &["m"]).await;
    let admin = app.admin_token().await;
    let create = |body: Value| app.request(Method::POST, "/v0/api-keys").bearer_auth(&admin).json(&body).send();

    let made = create(json!({"name": "chat-app", "scope": "inference"})).await.expect("create");
    assert_eq!(made.status(), 201);
    let made = body(made).await;
    assert_eq!(made["scope"], "inference");
    let inference = made["key"].as_str().expect("key").to_owned();
    assert_eq!(chat(&app, Some(&inference), &json!({"model": "m"})).await.status(), 200);
    let models = app.request(Method::GET, "/v1/models").bearer_auth(&inference).send().await.expect("models");
    assert_eq!(models.status(), 200);
    for (method, path) in [(Method::GET, "/v0/nodes"), (Method::GET, "/v0/api-keys"), (Method::POST, "/v0/api-keys")] {
        let refused = app.request(method, path).bearer_auth(&inference).json(&json!({"name": "x"})).send().await;
        let message = assert_error(refused.expect("refused"), 403, "forbidden").await;
        assert!(message.contains("/v1 only"), "{message}");
    }

    // Without a scope, a key is `admin`: the admin API and /v1.
    let plain = body(create(json!({"name": "ops"})).await.expect("create")).await;
    assert_eq!(plain["scope"], "admin");
    let plain = plain["key"].as_str().expect("key").to_owned();
    assert_eq!(chat(&app, Some(&plain), &json!({"model": "m"})).await.status(), 200);
    assert_eq!(app.request(Method::GET, "/v0/nodes").bearer_auth(&plain).send().await.expect("nodes").status(), 200);

    // A key stored before scopes existed (no `scope` written) is an admin key.
    let old = "llmk_an-old-key-from-before-scopes";
    let (id, hash) = (uuid::Uuid::new_v4().to_string(), llm_router::model::auth::TokenHash::of(old).to_hex());
    app.sql()
        .await
        .execute(
            "INSERT INTO api_keys (id, name, key_hash, role, created_by, created_at) \
             VALUES ($1, 'old', $2, 'admin', 'admin', 0)",
            &[&id, &hash],
        )
        .await;
    assert_eq!(app.request(Method::GET, "/v0/nodes").bearer_auth(old).send().await.expect("nodes").status(), 200);
    let listed = body(app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("list")).await;
    let mut scopes: Vec<(&str, &str)> = listed
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| (k["name"].as_str().expect("name"), k["scope"].as_str().expect("scope")))
        .collect();
    scopes.sort_unstable();
    assert_eq!(scopes, vec![("chat-app", "inference"), ("old", "admin"), ("ops", "admin")]);

    // A role means nothing to an inference key: asking for one is an error, and so is an unknown scope.
    for bad in [json!({"name": "x", "scope": "inference", "role": "admin"}), json!({"name": "x", "scope": "root"})] {
        assert_error(create(bad).await.expect("create"), 400, "invalid_request").await;
    }
    let count = body(app.request(Method::GET, "/v0/api-keys").bearer_auth(&admin).send().await.expect("list")).await;
    assert_eq!(count.as_array().expect("keys").len(), 3, "nothing was stored by the refused requests");

    // A revoked key stops working on /v1 at once, though /v1 had just accepted it.
    assert_eq!(chat(&app, Some(&inference), &json!({"model": "m"})).await.status(), 200);
    let id = made["id"].as_str().expect("id");
    let revoked = app.request(Method::DELETE, &format!("/v0/api-keys/{id}")).bearer_auth(&admin).send().await;
    assert_eq!(revoked.expect("revoke").status(), 204);
    openai_error(chat(&app, Some(&inference), &json!({"model": "m"})).await, 401, "invalid_api_key").await;
    // So does a session that signed out.
    let session = app.user_token("caller", "viewer").await;
    assert_eq!(chat(&app, Some(&session), &json!({"model": "m"})).await.status(), 200);
    let out = app.request(Method::POST, "/v0/auth/logout").bearer_auth(&session).send().await.expect("logout");
    assert_eq!(out.status(), 204);
    openai_error(chat(&app, Some(&session), &json!({"model": "m"})).await, 401, "invalid_api_key").await;
}

async fn patch_node(app: &TestApp, id: &str, body: &Value) -> reqwest::Response {
    let admin = app.admin_token().await;
    app.request(Method::PATCH, &format!("/v0/nodes/{id}")).bearer_auth(&admin).json(body).send().await.expect("patch")
}

/// Holds a streamed answer open until its chunks are released.
async fn open_stream(app: &TestApp, key: &str) -> reqwest::Response {
    let answer = chat(app, Some(key), &json!({"model": "m", "stream": true})).await;
    assert_eq!(answer.status(), 200);
    answer
}

/// Lets the stand-in finish a stream opened by [`open_stream`] and reads it to the end.
async fn finish_stream(runtime: &Runtime, mut answer: reqwest::Response) {
    for _ in 0..3 {
        runtime.shared.next_chunk.notify_one();
        let chunk = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("in time");
        assert!(chunk.expect("bytes").is_some());
    }
    runtime.shared.next_chunk.notify_one();
    assert!(String::from_utf8_lossy(&answer.bytes().await.expect("the rest")).contains("[DONE]"));
}

#[tokio::test]
async fn max_concurrency_queues_requests_then_answers_429_when_the_queue_is_full_or_the_wait_runs_out() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.max_queued = 1;
        settings.queue_timeout = Duration::from_millis(300);
    })
    .await;
    let a = Runtime::start("a", &["m"]).await;
    let id = online_node(&app, "gpu-a", &a, &["m"]).await;
    let key = app.admin_token().await;

    for bad in [json!({"max_concurrency": 0}), json!({"max_concurrency": 100_001}), json!({"max_concurrency": -1})] {
        let refused = patch_node(&app, &id, &bad).await;
        let message = assert_error(refused, 400, "invalid_request").await;
        assert!(message.contains("max_concurrency"), "{message}");
    }
    assert_eq!(app.node(&id).await["max_concurrency"], Value::Null, "refused edits changed nothing");
    let limited = body(patch_node(&app, &id, &json!({"max_concurrency": 1})).await).await;
    assert_eq!(limited["max_concurrency"], 1);

    // The one place is taken by a stream; the next request waits in the queue.
    let held = open_stream(&app, &key).await;
    assert_eq!(app.node(&id).await["routing"]["in_flight"], 1);
    let queued = {
        let (url, key) = (app.url("/v1/chat/completions"), key.clone());
        tokio::spawn(async move {
            reqwest::Client::new().post(url).bearer_auth(key).json(&json!({"model": "m"})).send().await
        })
    };
    let routing = app.state.registry.routing().clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while routing.queue().len() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the request queued");
    assert_eq!(app.metric("llm_router_inference_queued").await, 1.0);
    // The queue holds one: the next request is refused at once.
    let refused = chat(&app, Some(&key), &json!({"model": "m"})).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    openai_error(refused, 429, "over_capacity").await;

    // The stream ends: the queued request takes the place and is answered.
    finish_stream(&a, held).await;
    let answered = queued.await.expect("task").expect("answer");
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.headers()["x-llm-router-node"], id.as_str());
    assert!(routing.queue().is_empty());

    // A wait that runs out is refused too, after the queue's timeout.
    let held = open_stream(&app, &key).await;
    let started = std::time::Instant::now();
    openai_error(chat(&app, Some(&key), &json!({"model": "m"})).await, 429, "over_capacity").await;
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());

    let node = app.node(&id).await;
    assert_eq!(
        node["routing"],
        json!({"in_flight": 1, "requests_total": 3, "failures_total": 0, "ejected_until": null}),
        "refused requests never reached the node"
    );
    // No limit: requests go through at once while the stream is still open.
    let unlimited = body(patch_node(&app, &id, &json!({"max_concurrency": null})).await).await;
    assert_eq!(unlimited["max_concurrency"], Value::Null);
    assert_eq!(chat(&app, Some(&key), &json!({"model": "m"})).await.status(), 200);
    finish_stream(&a, held).await;

    // The limit is kept across a restart.
    assert_eq!(patch_node(&app, &id, &json!({"max_concurrency": 8})).await.status(), 200);
    let app = app.restart(0).await;
    assert_eq!(app.node(&id).await["max_concurrency"], 8);
}

/// Makes an API key of the `inference` scope named `name`: a tenant of its own (SPEC §14).
async fn inference_key(app: &TestApp, name: &str) -> String {
    let admin = app.admin_token().await;
    let made = app
        .request(Method::POST, "/v0/api-keys")
        .bearer_auth(&admin)
        .json(&json!({"name": name, "scope": "inference"}))
        .send()
        .await
        .expect("create a key");
    assert_eq!(made.status(), 201);
    body(made).await["key"].as_str().expect("key").to_owned()
}

/// Waits, without sleeping, until `check` holds; fails the test after 5 s.
async fn until(what: &str, check: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !check() {
            tokio::task::yield_now().await;
        }
    });
    waited.await.unwrap_or_else(|_| panic!("{what}: not within 5 s"));
}

#[tokio::test]
async fn a_flood_from_one_key_holds_another_keys_request_back_by_one_turn_at_most_unless_the_order_is_arrival() {
    for order in [QueueOrder::Fair, QueueOrder::Arrival] {
        let app = TestApp::with_settings(Options::default(), |settings| settings.queue_order = order).await;
        let runtime = Runtime::start("a", &["m"]).await;
        let id = online_node(&app, "gpu-a", &runtime, &["m"]).await;
        assert_eq!(patch_node(&app, &id, &json!({"max_concurrency": 2})).await.status(), 200);
        let (batch, chat_key) = (inference_key(&app, "batch").await, inference_key(&app, "chat").await);
        let shared = runtime.shared.clone();
        shared.hold.store(true, Ordering::SeqCst);
        let users = || shared.users.lock().expect("lock").clone();
        let send = |key: &str, user: String| {
            let (url, key) = (app.url("/v1/chat/completions"), key.to_owned());
            tokio::spawn(async move {
                let request = json!({"model": "m", "user": user});
                reqwest::Client::new().post(url).bearer_auth(key).json(&request).send().await.expect("answer").status()
            })
        };

        // The batch key's first two requests take both places, its next ten wait; then one of the chat key's.
        let mut sent = vec![send(&batch, "held-0".to_owned()), send(&batch, "held-1".to_owned())];
        until("both places taken", || users().len() == 2).await;
        let routing = app.state.registry.routing().clone();
        for i in 0..11 {
            sent.push(if i < 10 { send(&batch, format!("batch-{i}")) } else { send(&chat_key, "chat".to_owned()) });
            until("the request queued", || routing.queue().len() == i + 1).await;
        }
        // The node lets one answer go at a time: each frees one place, which the queue's next request takes.
        for served in 1..=11 {
            shared.release.notify_one();
            until("the next queued request reached the node", || users().len() == 2 + served).await;
        }
        shared.hold.store(false, Ordering::SeqCst);
        shared.release.notify_one();
        shared.release.notify_one();
        for answer in sent {
            assert_eq!(answer.await.expect("task"), 200);
        }
        let served = users().split_off(2);
        let chat = served.iter().position(|user| user == "chat").expect("the chat key's request was served");
        let batch_order: Vec<String> = served.iter().filter(|user| *user != "chat").cloned().collect();
        assert_eq!(batch_order, (0..10).map(|i| format!("batch-{i}")).collect::<Vec<_>>(), "first come within a key");
        match order {
            // The batch key's first waiter had the same claim (neither key had been served from the queue), and came
            // first: one turn.
            QueueOrder::Fair => assert_eq!(chat, 1, "{served:?}"),
            QueueOrder::Arrival => assert_eq!(chat, 10, "behind every request that came before: {served:?}"),
        }
        assert!(routing.queue().is_empty());
    }
}

#[tokio::test]
async fn a_keys_weight_is_its_share_of_the_places_that_free_while_both_keys_wait() {
    let app = TestApp::spawn().await;
    let runtime = Runtime::start("a", &["m"]).await;
    let id = online_node(&app, "gpu-a", &runtime, &["m"]).await;
    assert_eq!(patch_node(&app, &id, &json!({"max_concurrency": 1})).await.status(), 200);
    let admin = app.admin_token().await;
    let made = app
        .request(Method::POST, "/v0/api-keys")
        .bearer_auth(&admin)
        .json(&json!({"name": "heavy", "scope": "inference", "weight": 3}))
        .send()
        .await
        .expect("create a key");
    assert_eq!(made.status(), 201);
    let heavy = body(made).await["key"].as_str().expect("key").to_owned();
    let light = inference_key(&app, "light").await;
    let shared = runtime.shared.clone();
    shared.hold.store(true, Ordering::SeqCst);
    let users = || shared.users.lock().expect("lock").clone();
    let send = |key: &str, user: String| {
        let (url, key) = (app.url("/v1/chat/completions"), key.to_owned());
        tokio::spawn(async move {
            let request = json!({"model": "m", "user": user});
            reqwest::Client::new().post(url).bearer_auth(key).json(&request).send().await.expect("answer").status()
        })
    };
    let mut sent = vec![send(&light, "held".to_owned())];
    until("the place taken", || users().len() == 1).await;
    let routing = app.state.registry.routing().clone();
    // Twelve of each wait, alternating.
    for i in 0..24 {
        sent.push(if i % 2 == 0 { send(&light, format!("light-{i}")) } else { send(&heavy, format!("heavy-{i}")) });
        until("the request queued", || routing.queue().len() == i + 1).await;
    }
    for served in 1..=24 {
        shared.release.notify_one();
        until("the next queued request reached the node", || users().len() == 1 + served).await;
    }
    shared.hold.store(false, Ordering::SeqCst);
    shared.release.notify_one();
    for answer in sent {
        assert_eq!(answer.await.expect("task"), 200);
    }
    let first: Vec<String> = users()[1..17].to_vec();
    let heavy_served = first.iter().filter(|user| user.starts_with("heavy")).count();
    // Weight 3 against 1: three of every four places while both wait.
    assert_eq!(heavy_served, 12, "{first:?}");
}

#[tokio::test]
async fn an_ejected_node_shows_until_when_in_its_json() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let id = online_node(&app, "gpu-a", &a, &["m"]).await;
    a.shared.status.store(502, Ordering::SeqCst);
    let key = app.admin_token().await;
    for _ in 0..3 {
        openai_error(chat(&app, Some(&key), &json!({"model": "m"})).await, 503, "no_available_node").await;
    }
    let node = app.node(&id).await;
    assert_eq!(node["routing"]["failures_total"], 3);
    assert_eq!(node["routing"]["requests_total"], 3);
    let until = node["routing"]["ejected_until"].as_str().expect("ejected");
    assert_eq!(until, llm_router::clock::rfc3339(app.clock_ms() + 5_000));
    assert_eq!(node["status"], "online", "ejection changes routing, not the status");
}

#[tokio::test]
async fn metrics_count_inference_per_model_never_per_node_nor_for_invented_models() {
    let app = TestApp::with_settings(Options::default(), |settings| settings.max_queued = 0).await;
    let bad = Runtime::start("bad", &["m"]).await;
    let good = Runtime::start("good", &["m"]).await;
    online_node(&app, "gpu-bad", &bad, &["m"]).await;
    let good_id = online_node(&app, "gpu-good", &good, &["m"]).await;
    let key = app.admin_token().await;
    bad.shared.status.store(503, Ordering::SeqCst);
    // Until `bad` is ejected some requests try it first and are retried on `good`. A request without a prompt goes
    // to the less loaded of two idle nodes drawn at random: at least 12 requests, and until bad's third failure.
    let mut sent = 0;
    while sent < 12 || (bad.shared.received.load(Ordering::SeqCst) < 3 && sent < 200) {
        assert_eq!(chat(&app, Some(&key), &json!({"model": "m"})).await.status(), 200);
        sent += 1;
    }
    good.shared.status.store(400, Ordering::SeqCst);
    assert_eq!(chat(&app, Some(&key), &json!({"model": "m"})).await.status(), 400, "a 400 is the answer");
    good.shared.status.store(0, Ordering::SeqCst);
    openai_error(chat(&app, Some(&key), &json!({"model": "invented"})).await, 404, "model_not_found").await;
    // At capacity with no queue: the router's own 429.
    assert_eq!(patch_node(&app, &good_id, &json!({"max_concurrency": 1})).await.status(), 200);
    let held = open_stream(&app, &key).await;
    openai_error(chat(&app, Some(&key), &json!({"model": "m"})).await, 429, "over_capacity").await;
    finish_stream(&good, held).await;

    let scraped = app.scrape().await;
    let answers = |class: &str| {
        scraped.value("llm_router_inference_requests_total", &[("model", "m"), ("class", class)]).unwrap_or(0.0)
    };
    assert_eq!(answers("2xx"), f64::from(sent + 1), "{sent} answers and one stream");
    assert_eq!(answers("4xx"), 2.0, "the node's 400 and the router's 429");
    assert_eq!(answers("5xx"), 0.0, "retried failures are not answers");
    let retries = scraped.value("llm_router_inference_retries_total", &[("model", "m")]).expect("retries");
    assert_eq!(retries, 3.0, "each of bad's three failures was retried on good");
    assert_eq!(scraped.value("llm_router_inference_ejections_total", &[("model", "m")]), Some(1.0));
    let headers = scraped.value("llm_router_inference_upstream_headers_seconds_count", &[("model", "m")]);
    assert_eq!(
        headers,
        Some(f64::from(sent + 5)),
        "every answer that came: {sent} + 2 from good, the three 503s of bad"
    );
    let first = scraped.value("llm_router_inference_first_byte_seconds_count", &[("model", "m")]);
    assert_eq!(first, Some(f64::from(sent + 2)), "every answer with a body");
    assert_eq!(scraped.value("llm_router_inference_queued", &[]), Some(0.0));
    assert!(
        scraped.samples.iter().all(|s| s.labels.get("model").is_none_or(|m| m == "m")),
        "no series for an invented model"
    );
    assert!(scraped.samples.iter().all(|s| !s.labels.contains_key("node")), "no series per node");
}

#[tokio::test]
async fn a_stream_cut_off_by_its_node_ends_for_the_client_and_counts_as_a_failure_without_a_retry() {
    let app = TestApp::spawn().await;
    let a = Runtime::start("a", &["m"]).await;
    let id = online_node(&app, "gpu-a", &a, &["m"]).await;
    let key = app.admin_token().await;
    a.shared.reset_mid_stream.store(true, Ordering::SeqCst);
    let mut answer = open_stream(&app, &key).await;
    a.shared.next_chunk.notify_one();
    let first = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("in time");
    assert!(String::from_utf8_lossy(&first.expect("first chunk").expect("bytes")).contains("\"chunk\":0"));
    a.shared.next_chunk.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("in time");
    assert!(rest.is_err(), "the client sees the stream break, not a clean end: {rest:?}");
    let node = app.node(&id).await;
    assert_eq!(node["routing"]["failures_total"], 1, "{node}");
    assert_eq!(node["routing"]["requests_total"], 1, "after the first byte nothing is retried");
    assert_eq!(node["routing"]["in_flight"], 0);
    assert_eq!(a.shared.received.load(Ordering::SeqCst), 1);
}
