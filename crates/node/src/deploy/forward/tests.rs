//! The forwarding port between two in-test upstreams: a replica and the node's own runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::*;

/// Fixed routes: model → port.
struct Table(HashMap<String, u16>);

impl Routes for Table {
    fn port_for(&self, model: &str) -> Option<u16> {
        self.0.get(model).copied()
    }
    fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self.0.keys().cloned().collect();
        models.sort();
        models
    }
}

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// An upstream that answers `{"upstream": name, "path": …}` (and `x-upstream: name`), lists `own-model` on
/// `GET /v1/models`, and streams two SSE events on `/stream`, the second only once `gate` is notified.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<Notify>,
}

async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Notify::new());
    let (log, open) = (seen.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (log, open) = (log.clone(), open.clone());
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 8192];
                let split = loop {
                    if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&data[..split]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while data.len() < split + length {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                }
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                log.lock().expect("lock").push(Seen { head: head.clone(), body: data[split..split + length].to_vec() });
                if path == "/stream" {
                    let start = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\
                                 connection: close\r\n\r\n";
                    let _ = stream.write_all(start.as_bytes()).await;
                    let _ = stream.write_all(b"b\r\ndata: one\n\n\r\n").await;
                    let _ = stream.flush().await;
                    open.notified().await;
                    let _ = stream.write_all(b"b\r\ndata: two\n\n\r\n0\r\n\r\n").await;
                    return;
                }
                let body = if path == "/v1/models" {
                    r#"{"object":"list","data":[{"id":"own-model"},{"id":"replica-model"}]}"#.to_owned()
                } else {
                    serde_json::json!({"upstream": name, "path": path}).to_string()
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-upstream: {name}\r\nkeep-alive: timeout=5\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Upstream { port, seen, gate }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The forwarding port with `replica-model` on `replica` and the own runtime on `own_port`; its base URL.
async fn forwarding(routes: HashMap<String, u16>, own_port: u16) -> String {
    let own = Runtime::new(format!("http://127.0.0.1:{own_port}").parse().expect("url"), Duration::from_secs(2))
        .expect("runtime client");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(Arc::new(Forwarder::new(Table(routes), own)).serve(listener));
    url
}

fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn requests_go_by_model_and_everything_else_to_the_own_runtime() {
    let (replica, own) = (upstream("replica").await, upstream("own").await);
    let url = forwarding(HashMap::from([("replica-model".to_owned(), replica.port)]), own.port).await;
    let http = reqwest::Client::new();

    let answer =
        http.post(format!("{url}/v1/chat/completions")).json(&chat("replica-model")).send().await.expect("send");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-upstream"], "replica");
    assert!(answer.headers().get("keep-alive").is_none(), "hop-by-hop header passed on");
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["path"], "/v1/chat/completions");
    let seen = replica.seen.lock().expect("lock")[0].clone();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&seen.body).expect("json"), chat("replica-model"));
    assert!(seen.head.to_ascii_lowercase().contains(&format!("host: 127.0.0.1:{}", replica.port)), "{}", seen.head);

    for request in [
        http.post(format!("{url}/v1/chat/completions")).json(&chat("other-model")),
        http.post(format!("{url}/v1/completions")).body("not json"),
        http.get(format!("{url}/metrics?x=1")),
        http.get(format!("{url}/health")),
    ] {
        let answer = request.send().await.expect("send");
        assert_eq!(answer.headers()["x-upstream"], "own");
    }
    let paths: Vec<String> = own
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.head.split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect();
    assert_eq!(paths, ["/v1/chat/completions", "/v1/completions", "/metrics?x=1", "/health"]);
    assert_eq!(replica.seen.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn an_answer_streams_through_event_by_event() {
    let (replica, own) = (upstream("replica").await, upstream("own").await);
    let url = forwarding(HashMap::from([("replica-model".to_owned(), replica.port)]), own.port).await;
    let mut answer = reqwest::Client::new()
        .post(format!("{url}/stream"))
        .json(&serde_json::json!({"model": "replica-model", "stream": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    // The first event arrives while the upstream holds the second back.
    let first = tokio::time::timeout(Duration::from_secs(5), answer.chunk()).await.expect("first event in time");
    assert_eq!(first.expect("chunk").expect("some").as_ref(), b"data: one\n\n");
    replica.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = answer.chunk().await.expect("chunk") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: two\n\n");
}

#[tokio::test]
async fn models_are_the_union_and_answered_with_nothing_behind() {
    let own = upstream("own").await;
    let routes = HashMap::from([("replica-model".to_owned(), 1), ("another".to_owned(), 2)]);
    let url = forwarding(routes, own.port).await;
    let body: serde_json::Value =
        reqwest::get(format!("{url}/v1/models")).await.expect("send").json().await.expect("json");
    let ids: Vec<&str> = body["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["another", "replica-model", "own-model"]);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "llm-node");

    // No replica and no own runtime: still 200, the router's registration probe reads it.
    let url = forwarding(HashMap::new(), closed_port()).await;
    let answer = reqwest::get(format!("{url}/v1/models")).await.expect("send");
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body, serde_json::json!({"object": "list", "data": []}));
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_a_huge_body_a_413() {
    let url = forwarding(HashMap::from([("gone".to_owned(), closed_port())]), closed_port()).await;
    for model in ["gone", "unknown"] {
        let answer = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat(model))
            .send()
            .await
            .expect("send");
        assert_eq!(answer.status(), 502);
        let body: serde_json::Value = answer.json().await.expect("json");
        assert_eq!(body["error"]["code"], "upstream_unavailable");
        assert!(body["error"]["message"].as_str().expect("message").contains("did not answer"), "{body}");
    }

    // A body announced over the limit is refused before it is read.
    let mut stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 512];
    let n =
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await.expect("in time").expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

#[test]
fn hop_by_hop_headers_are_dropped_and_the_model_read() {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
    headers.insert("x-private", HeaderValue::from_static("1"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let kept = strip_hop_by_hop(headers);
    let mut names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["authorization", "content-type"]);

    assert_eq!(model_of(br#"{"model":"m","messages":[]}"#).as_deref(), Some("m"));
    assert_eq!(model_of(br#"{"messages":[]}"#), None);
    assert_eq!(model_of(br#"{"model":3}"#), None);
    assert_eq!(model_of(b"not json"), None);
    assert_eq!(model_of(b""), None);
}
