//! Clients and nodes that misbehave (SPEC §9): `/v1` bodies under the body deadline, slow bodies that must never
//! cost heartbeats, one address's share of the connections, the memory budget of request bodies, a client that
//! stops reading, a node that goes silent mid-answer, a request that loops through the router, a registration at
//! the router's own address, and input echoed back cut short. Raw HTTP/1.1 over TCP where a client library would
//! never misbehave as needed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llm_router::config::InferenceAuth;
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::connections::{
    HEALTHZ, WAIT, awaiting_body, busy, closed_within, connect, half_open, read_answer, until_open,
};
use crate::helpers::*;
use crate::inference::{Runtime, chat, online_node, openai_error};

/// A router whose `/v1` needs no key (`--inference-auth none`), as on the trusted network of the reports.
async fn open_router(options: Options) -> TestApp {
    TestApp::with_settings(options, |settings| settings.inference_auth = InferenceAuth::None).await
}

/// The head of a chat completion whose body is `length` bytes long.
fn chat_head(length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// A chat completion whose headers are complete and whose body the router waits for (its `100 Continue` came).
async fn chat_awaiting_body(app: &TestApp, length: usize) -> TcpStream {
    let mut stream = connect(app).await;
    stream.write_all(chat_head(length).as_bytes()).await.expect("head");
    assert_eq!(read_answer(&mut stream).await.status, 100, "100 Continue");
    stream
}

/// A connection from another loopback address than the tests' 127.0.0.1.
async fn connect_from(app: &TestApp, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source.parse().expect("address"), 0)).expect("bind the source address");
    tokio::time::timeout(WAIT, socket.connect(app.addr)).await.expect("connect in time").expect("connect")
}

#[tokio::test]
async fn a_v1_body_that_trickles_or_stops_gets_408_in_openai_shape() {
    let app = open_router(Options { body_timeout: Duration::from_millis(300), ..Options::default() }).await;
    for sent in [&b"{\"model\""[..], &b""[..]] {
        let mut stream = chat_awaiting_body(&app, 1000).await;
        stream.write_all(sent).await.expect("part of the body");
        let started = Instant::now();
        let answer = read_answer(&mut stream).await;
        assert_eq!(answer.status, 408, "{}", answer.head);
        let error = &answer.json()["error"];
        assert_eq!(error["code"], "request_timeout", "{error}");
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert!(started.elapsed() >= Duration::from_millis(250), "answered before the deadline");
        assert!(started.elapsed() < Duration::from_secs(3), "answered long after the deadline");
        assert!(closed_within(&mut stream, WAIT).await, "the connection is closed");
    }
}

#[tokio::test]
async fn slow_bodies_never_cost_heartbeats_sign_ins_or_healthz() {
    let app = open_router(Options { max_connections: Some(16), ..Options::default() }).await;
    let node = app.register_node("gpu-a").await;
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut stream = chat_awaiting_body(&app, 1000).await;
        stream.write_all(b"{").await.expect("one byte");
        slow.push(stream);
    }
    // One address holds at most half of the connections: the newer slow bodies pushed out its older ones.
    until_open(&app, 8).await;
    let started = Instant::now();
    assert_eq!(app.heartbeat(&node, &[]).await.status(), 200);
    assert_eq!(app.login("admin", ADMIN_PASSWORD).await.status(), 200);
    assert_eq!(app.request(Method::GET, "/healthz").send().await.expect("healthz").status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(app.state.metrics.connections_refused.get(), 0, "no client was turned away");
    assert!(app.state.metrics.connections_evicted.get() >= 1, "slow bodies made room");
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_the_connections() {
    let app = open_router(Options { max_connections: Some(32), ..Options::default() }).await;
    let runtime = Runtime::start("hangs", &["m"]).await;
    runtime.shared.hang.store(true, Ordering::SeqCst);
    online_node(&app, "gpu-hangs", &runtime, &["m"]).await;
    // Half of 32: sixteen connections of 127.0.0.1, all busy.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(busy(connect(&app).await, &runtime).await);
    }
    // A seventeenth from the same address is turned away, though the router has room.
    let mut refused = connect(&app).await;
    refused.write_all(HEALTHZ).await.expect("write");
    let answer = read_answer(&mut refused).await;
    assert_eq!(answer.status, 503, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "overloaded");
    assert_eq!(app.state.metrics.connections_source_capped.get(), 1);
    // Another address is served.
    let mut other = connect_from(&app, "127.0.0.2").await;
    other.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut other).await.status, 200);
    // A connection of the capped address that is not busy makes room for its own next one.
    drop(held.pop());
    until_open(&app, 16).await;
    let mut slow = half_open(&app).await;
    let mut next = connect(&app).await;
    next.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut next).await.status, 200);
    assert!(closed_within(&mut slow, WAIT).await, "its own half-open connection made room");
    assert_eq!(app.state.metrics.connections_source_capped.get(), 1);
}

#[tokio::test]
async fn a_trusted_proxy_holds_any_number_of_connections() {
    let app = TestApp::with_settings(Options { max_connections: Some(32), ..Options::default() }, |settings| {
        settings.inference_auth = InferenceAuth::None;
        settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let body = serde_json::to_vec(&registration("gpu-slow", 8000)).expect("json");
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(awaiting_body(&app, &body).await);
    }
    until_open(&app, 24).await;
    assert_eq!(app.state.metrics.connections_evicted.get(), 0);
    assert_eq!(app.state.metrics.connections_source_capped.get(), 0);
}

#[tokio::test]
async fn request_bodies_held_at_once_stay_within_the_memory_budget() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.inference_auth = InferenceAuth::None;
        settings.max_body_memory = 2 * 1024 * 1024;
    })
    .await;
    let runtime = Runtime::start("a", &["m"]).await;
    online_node(&app, "gpu-a", &runtime, &["m"]).await;
    // Under the stand-in runtime's own limit of 2 MB.
    let padding = "x".repeat(1536 * 1024);
    let body = serde_json::to_vec(&json!({"model": "m", "messages": [], "padding": padding})).expect("json");
    // The first body's declared length is held for it while it arrives.
    let mut first = chat_awaiting_body(&app, body.len()).await;
    first.write_all(&body[..1000]).await.expect("part of the body");
    within(WAIT, "the first body holds its share of the budget", || async {
        app.state.body_budget.in_use() >= body.len()
    })
    .await;
    // A second one does not fit: 503 at once, in OpenAI's shape, with Retry-After.
    let refused = app
        .request(Method::POST, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let error = openai_error(refused, 503, "overloaded").await;
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("--max-body-memory-mb")), "{error}");
    // So does an admin API body.
    let big_patch = json!({"notes": "n".repeat(900 * 1024)});
    let admin = app.admin_token().await;
    let response = app
        .request(Method::PATCH, "/v0/nodes/00000000-0000-0000-0000-000000000000")
        .bearer_auth(&admin)
        .json(&big_patch)
        .send()
        .await
        .expect("patch");
    assert_error(response, 503, "overloaded").await;
    // The first ends normally, and gives its share back.
    first.write_all(&body[1000..]).await.expect("the rest");
    assert_eq!(read_answer(&mut first).await.status, 200);
    within(WAIT, "the budget is free again", || async { app.state.body_budget.in_use() == 0 }).await;
    let again = app
        .request(Method::POST, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), 200);
    assert_eq!(runtime.shared.received.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_loses_it_and_the_node_stops_generating() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.inference_auth = InferenceAuth::None;
        settings.write_timeout = Duration::from_millis(500);
        settings.header_timeout = Duration::from_millis(500);
    })
    .await;
    let runtime = Runtime::start("floods", &["m"]).await;
    runtime.shared.flood.store(true, Ordering::SeqCst);
    let id = online_node(&app, "gpu-floods", &runtime, &["m"]).await;
    let body = br#"{"model": "m", "stream": true, "messages": []}"#;
    let mut stream = connect(&app).await;
    let head = chat_head(body.len()).replace("Expect: 100-continue\r\n", "");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(body).await.expect("body");
    // The client reads nothing at all from now on.
    within(Duration::from_secs(20), "the router ends the stream the client does not read", || async {
        runtime.shared.cancelled.load(Ordering::SeqCst)
    })
    .await;
    assert_eq!(app.state.metrics.write_timeouts.get(), 1);
    within(WAIT, "the node no longer counts the request in flight", || async {
        app.node(&id).await["routing"]["in_flight"] == 0
    })
    .await;
    drop(stream);
}

#[tokio::test]
async fn a_node_silent_in_the_middle_of_an_answer_ends_it_and_counts_a_failure() {
    let app = TestApp::with_settings(Options::default(), |settings| {
        settings.inference_auth = InferenceAuth::None;
        settings.upstream_idle_timeout = Duration::from_millis(400);
    })
    .await;
    let runtime = Runtime::start("silent", &["m"]).await;
    runtime.shared.silent_after_headers.store(true, Ordering::SeqCst);
    let id = online_node(&app, "gpu-silent", &runtime, &["m"]).await;
    let answer = chat(&app, None, &json!({"model": "m", "stream": true, "messages": []})).await;
    assert_eq!(answer.status(), 200, "the headers came");
    let started = Instant::now();
    let body = tokio::time::timeout(WAIT, answer.bytes()).await.expect("the answer ends");
    assert!(body.is_err(), "the answer is cut off, not completed");
    assert!(started.elapsed() >= Duration::from_millis(300), "ended before the idle timeout");
    let node = app.node(&id).await;
    assert_eq!(node["routing"]["failures_total"], 1, "{node}");
    assert_eq!(node["routing"]["in_flight"], 0, "{node}");
}

#[tokio::test]
async fn a_request_that_comes_back_through_the_router_is_refused_as_a_loop() {
    let a = open_router(Options::default()).await;
    let b = open_router(Options::default()).await;
    // Each router has a node registered at the other router's address: a request goes round.
    online_node_at(&a, "points-at-b", b.addr.port()).await;
    online_node_at(&b, "points-at-a", a.addr.port()).await;
    let answer = chat(&a, None, &json!({"model": "m", "messages": []})).await;
    let error = openai_error(answer, 508, "loop_detected").await;
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("router")), "{error}");
    // A request that does not loop carries the router's mark on to the node.
    let runtime = Runtime::start("a", &["n"]).await;
    online_node(&a, "gpu-a", &runtime, &["n"]).await;
    assert_eq!(chat(&a, None, &json!({"model": "n", "messages": []})).await.status(), 200);
    let via = runtime.shared.last_via.lock().expect("lock").clone().expect("a Via header");
    assert!(via.starts_with("1.1 llm-router-"), "{via}");
}

/// A node serving `m` whose runtime port is `port` on 127.0.0.1, approved and heartbeating.
async fn online_node_at(app: &TestApp, name: &str, port: u16) {
    let node = app.register_node_at(name, port).await;
    let admin = app.admin_token().await;
    assert_eq!(app.approve(&admin, &node.id).await.status(), 200);
    assert_eq!(app.heartbeat(&node, &["m"]).await.status(), 200);
}

#[tokio::test]
async fn a_node_cannot_be_registered_at_the_routers_own_listener() {
    let app = TestApp::spawn().await;
    let response = app.register(&registration("gpu-self", app.addr.port())).await;
    let message = assert_error(response, 400, "invalid_request").await;
    assert!(message.contains("runtime_port") && message.contains("own listener"), "{message}");
    // Without an address, the router takes the peer's: the same.
    let mut request = registration("gpu-self", app.addr.port());
    request.as_object_mut().expect("object").remove("ip_address");
    assert_error(app.register(&request).await, 400, "invalid_request").await;
    assert!(app.nodes().await.is_empty());
    // Another port of the same machine is a runtime like any other.
    assert_eq!(app.register(&registration("gpu-self", app.addr.port().wrapping_add(1))).await.status(), 201);
}

#[tokio::test]
async fn input_echoed_back_is_cut_short() {
    let app = open_router(Options::default()).await;
    let long = "m".repeat(1_000_000);
    let answer = chat(&app, None, &json!({"model": long, "messages": []})).await;
    let error = openai_error(answer, 404, "model_not_found").await;
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.len() < 500, "{} bytes", message.len());
    assert!(message.contains("mmmm…"), "{message}");
    let path = format!("/v1/models/{}", "x".repeat(6000));
    let answer = app.request(Method::GET, &path).send().await.expect("model");
    let error = openai_error(answer, 404, "model_not_found").await;
    assert!(error.to_string().len() < 600, "{error}");
    // An admin API body whose value a parser's error would repeat.
    let mut request = registration("gpu-a", 8000);
    request["ip_address"] = json!("9".repeat(800_000));
    let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
    assert!(message.len() <= 1100, "{} bytes", message.len());
    request["ip_address"] = json!(1);
    request["runtime_port"] = json!("8".repeat(800_000));
    let message = assert_error(app.register(&request).await, 400, "invalid_request").await;
    assert!(message.len() <= 1100, "{} bytes", message.len());
}
