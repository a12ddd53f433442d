//! The HTTP server's bounds (SPEC §9): connection cap with eviction of idle and half-open connections, `503` when
//! every connection is busy, header and idle timeouts, graceful shutdown, and `nosniff` on every answer. The tests
//! speak raw HTTP/1.1 over TCP, since an HTTP client library never leaves a request half-sent.
//!
//! The tests of when a connection is served or closed run on tokio's paused clock ([`pause`]), which the router's
//! connection deadlines follow: "not before its deadline, and then" holds in that virtual time whatever the
//! machine's load, and no test waits for a deadline in real time.

use std::sync::atomic::Ordering;
use std::time::Duration;

use llm_router::server::CLOCK_TICK;
use tokio::time::Instant;

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::inference::{Runtime, online_node};

/// The most any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// A request whose headers never end.
const PARTIAL_HEADERS: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: router\r\nUser-Agent: slow";

pub const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: router\r\n\r\n";

/// A cap and timeouts; every connection of these tests comes from 127.0.0.1, so the per-source share is off here
/// (its own tests are in `misbehaving.rs`).
fn options(max_connections: usize, header_timeout: Duration, idle_timeout: Duration) -> Options {
    Options {
        max_connections: Some(max_connections),
        max_connections_per_source: Some(0),
        header_timeout,
        idle_timeout,
        ..Options::default()
    }
}

pub async fn connect(app: &TestApp) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(app.addr)).await.expect("connect in time").expect("connect")
}

pub async fn half_open(app: &TestApp) -> TcpStream {
    let mut stream = connect(app).await;
    stream.write_all(PARTIAL_HEADERS).await.expect("write partial headers");
    stream
}

/// One answer: its head (status line and headers, lower-cased names) and its body, read by `Content-Length`.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Reads one answer from `stream`; interim `100 Continue` heads are returned as answers of their own.
pub async fn read_answer(stream: &mut TcpStream) -> Answer {
    tokio::time::timeout(WAIT, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end].to_vec()).expect("UTF-8 head");
                let status: u16 = head[9..12].parse().expect("status code");
                let mut answer = Answer { status, head, body: Vec::new() };
                let length: usize = answer.header("content-length").map_or(0, |v| v.parse().expect("length"));
                while buf.len() < end + 4 + length {
                    let n = stream.read(&mut chunk).await.expect("read body");
                    assert!(n > 0, "connection closed inside a body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                answer.body = buf[end + 4..end + 4 + length].to_vec();
                return answer;
            }
            let n = stream.read(&mut chunk).await.expect("read head");
            assert!(n > 0, "connection closed before an answer: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("an answer in time")
}

/// Whether the router closed `stream` (end of file or reset) within `within`; `false` if it is still open then.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(within, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected bytes from the router: {:?}", String::from_utf8_lossy(&chunk[..n])),
        Err(_) => false,
    }
}

/// How early the router may close a connection for a deadline on its coarse clock: a tick of it, and a few
/// milliseconds for the rounding of its stamps and of timers to milliseconds.
const EARLY: Duration = CLOCK_TICK.saturating_add(Duration::from_millis(5));

/// Pauses tokio's clock for the rest of the test, once the router is up (its start waits on the database's own
/// threads, which a paused clock would not wait for). The router's connection timers, and the clock it stamps
/// connections with, are tokio's: from then on they move only while nothing in the test's runtime is ready to run,
/// straight to the next timer, so that a wait for a deadline takes no real time and the machine's load none of it.
fn pause() {
    tokio::time::pause();
}

/// Asserts that the router keeps `stream` open until `deadline` on tokio's clock, and closes it after, within
/// [`WAIT`]; returns when it closed.
async fn closed_after(stream: &mut TcpStream, deadline: Instant, what: &str) -> Instant {
    let open_for = deadline.saturating_duration_since(Instant::now());
    if !open_for.is_zero() {
        assert!(!closed_within(stream, open_for).await, "{what}: closed before its deadline");
    }
    assert!(closed_within(stream, WAIT).await, "{what}: not closed");
    Instant::now()
}

/// Waits, at most [`WAIT`], until the router counts `open` client connections.
pub async fn until_open(app: &TestApp, open: u64) {
    let started = Instant::now();
    while app.state.metrics.connections_open.get() != open {
        assert!(
            started.elapsed() < WAIT,
            "the router holds {} connections, not {open}",
            app.state.metrics.connections_open.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A keep-alive connection that has been answered once and is now idle.
async fn idle_keep_alive(app: &TestApp) -> TcpStream {
    let mut stream = connect(app).await;
    stream.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut stream).await.status, 200);
    stream
}

/// A registration whose headers are complete and whose body the router is waiting for: the `100 Continue` proves
/// the handler reads the body.
pub async fn awaiting_body(app: &TestApp, body: &[u8]) -> TcpStream {
    let mut stream = connect(app).await;
    let head = format!(
        "POST /v0/nodes HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    assert_eq!(read_answer(&mut stream).await.status, 100, "100 Continue");
    stream
}

#[tokio::test]
async fn at_the_cap_half_open_connections_make_room_oldest_first() {
    let app = TestApp::with(options(32, Duration::from_secs(60), Duration::from_secs(60))).await;
    pause();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(idle_keep_alive(&app).await);
    }
    let mut half = Vec::new();
    for _ in 0..28 {
        half.push(half_open(&app).await);
    }
    until_open(&app, 32).await;
    // Eight more than the cap, then a real client.
    for _ in 0..8 {
        half.push(half_open(&app).await);
    }
    // Served at once, not once a connection's header timeout (a minute) has made room: in virtual time, only the
    // exchange's few moments of waiting for the socket count, each a tick of the router's clock at most.
    let started = Instant::now();
    let mut fresh = connect(&app).await;
    fresh.write_all(HEALTHZ).await.expect("write");
    let answer = read_answer(&mut fresh).await;
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "/healthz took {:?}", started.elapsed());
    // The nine oldest half-open connections made room, and only they.
    for (i, stream) in half.iter_mut().take(9).enumerate() {
        assert!(closed_within(stream, WAIT).await, "half-open connection {i} should have been closed");
    }
    assert_eq!(app.state.metrics.connections_evicted.get(), 9);
    assert_eq!(app.state.metrics.connections_refused.get(), 0);
    // The older idle keep-alive connections were spared and still serve.
    for stream in &mut idle {
        stream.write_all(HEALTHZ).await.expect("write");
        assert_eq!(read_answer(stream).await.status, 200);
    }
}

#[tokio::test]
async fn at_the_cap_the_longest_idle_keep_alive_connection_makes_room() {
    let app = TestApp::with(options(16, Duration::from_secs(60), Duration::from_secs(60))).await;
    let mut idle = Vec::new();
    let mut second_answered = Instant::now();
    for i in 0..16 {
        if i == 15 {
            // The router stamps phases in milliseconds: let the last accept's stamp be later than the second
            // connection's, so that the first one, used again below, is strictly the more recent.
            while second_answered.elapsed() < Duration::from_millis(3) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        idle.push(idle_keep_alive(&app).await);
        if i == 1 {
            second_answered = Instant::now();
        }
    }
    until_open(&app, 16).await;
    // The first one is used again: it is no longer the one idle longest.
    idle[0].write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut idle[0]).await.status, 200);
    let mut fresh = connect(&app).await;
    fresh.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut fresh).await.status, 200);
    assert!(closed_within(&mut idle[1], WAIT).await, "the connection idle longest should have been closed");
    assert_eq!(app.state.metrics.connections_evicted.get(), 1);
    idle[0].write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut idle[0]).await.status, 200);
}

/// A chat completion sent on `stream`, which the router forwards to `runtime`, which never answers: the connection
/// is busy until the client leaves. Returns once the runtime has received it.
pub async fn busy(mut stream: TcpStream, runtime: &Runtime) -> TcpStream {
    let received = runtime.shared.received.load(Ordering::SeqCst);
    let body = br#"{"model": "m", "messages": []}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    within(WAIT, "the runtime receives the request", || async {
        runtime.shared.received.load(Ordering::SeqCst) > received
    })
    .await;
    stream
}

/// A router whose `/v1` is open, with a node whose runtime serves `m` and never answers.
async fn app_with_a_hanging_node(options: Options) -> (TestApp, Runtime) {
    let app = TestApp::with_settings(options, |settings| {
        settings.inference_auth = llm_router::config::InferenceAuth::None;
    })
    .await;
    let runtime = Runtime::start("hangs", &["m"]).await;
    runtime.shared.hang.store(true, Ordering::SeqCst);
    online_node(&app, "gpu-hangs", &runtime, &["m"]).await;
    (app, runtime)
}

#[tokio::test]
async fn when_every_connection_is_busy_a_new_one_gets_503_and_is_closed() {
    let (app, runtime) = app_with_a_hanging_node(options(16, Duration::from_secs(60), Duration::from_secs(60))).await;
    let mut busy_connections = Vec::new();
    for _ in 0..16 {
        busy_connections.push(busy(connect(&app).await, &runtime).await);
    }
    // The test client's own idle keep-alive connections made room for the busy ones.
    let evicted = app.state.metrics.connections_evicted.get();
    let mut refused = connect(&app).await;
    // A client that sends its request at once gets the answer all the same.
    refused.write_all(HEALTHZ).await.expect("write");
    let answer = read_answer(&mut refused).await;
    assert_eq!(answer.status, 503, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "overloaded");
    assert!(answer.json()["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
    assert!(closed_within(&mut refused, WAIT).await, "a refused connection is closed");
    assert_eq!(app.state.metrics.connections_refused.get(), 1);
    assert_eq!(app.state.metrics.connections_evicted.get(), evicted, "no busy connection was closed");

    // The busy requests were not disturbed; when one's client leaves, its place serves the next client.
    drop(busy_connections.swap_remove(0));
    until_open(&app, 15).await;
    let mut fresh = connect(&app).await;
    fresh.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut fresh).await.status, 200);
    assert_eq!(app.state.metrics.connections_evicted.get(), evicted);
}

#[tokio::test]
async fn connections_waiting_for_a_body_make_room_after_idle_ones() {
    let app = TestApp::with(options(16, Duration::from_secs(60), Duration::from_secs(60))).await;
    let body = serde_json::to_vec(&registration("gpu-slow", 8000)).expect("json");
    let mut waiting = Vec::new();
    for _ in 0..15 {
        waiting.push(awaiting_body(&app, &body).await);
    }
    let mut idle = idle_keep_alive(&app).await;
    until_open(&app, 16).await;
    // The idle keep-alive connection goes first, though it is the most recent.
    let mut first = connect(&app).await;
    first.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut first).await.status, 200);
    assert!(closed_within(&mut idle, WAIT).await, "the idle connection makes room first");
    drop(first);
    until_open(&app, 15).await;
    waiting.push(awaiting_body(&app, &body).await);
    // Then, with no idle connection left, the one whose body has been awaited longest.
    let mut second = connect(&app).await;
    second.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut second).await.status, 200);
    assert!(closed_within(&mut waiting[0], WAIT).await, "the oldest wait for a body makes room next");
    assert_eq!(app.state.metrics.connections_evicted.get(), 2);
    assert_eq!(app.state.metrics.connections_refused.get(), 0);
    // The others still get their answer once their body comes.
    drop(second);
    waiting[1].write_all(&body).await.expect("body");
    assert_eq!(read_answer(&mut waiting[1]).await.status, 201);
}

#[tokio::test]
async fn agents_waiting_on_their_assignments_make_room_at_the_cap_for_a_new_client() {
    let app = TestApp::with(options(16, Duration::from_secs(60), Duration::from_secs(60))).await;
    let node = app.register_node("gpu-managed").await;
    let poll = |known: &str| {
        format!(
            "GET /v0/assignments?known={known}&wait_secs=60 HTTP/1.1\r\nHost: router\r\nX-Node-Token: {}\r\n\r\n",
            node.token
        )
    };
    let mut first = connect(&app).await;
    first.write_all(poll("").as_bytes()).await.expect("write");
    let answer = read_answer(&mut first).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    let known = answer.json()["fingerprint"].as_str().expect("fingerprint").to_owned();
    drop(first);
    // Sixteen long polls, each waiting for a change that does not come, fill the cap; the test client's own idle
    // keep-alive connection (the registration's) makes room for the last of them.
    let evicted = app.state.metrics.connections_evicted.get();
    let mut waiting = Vec::new();
    for n in 1..=16 {
        let mut stream = connect(&app).await;
        stream.write_all(poll(&known).as_bytes()).await.expect("write");
        waiting.push(stream);
        // Each one waits in the handler before the next comes (one still sending headers would make room first).
        within(WAIT, "the long poll waits", || async { app.state.metrics.assignment_waits.get() == n }).await;
    }
    within(WAIT, "the idle connection makes room", || async {
        app.state.metrics.connections_evicted.get() == evicted + 1
    })
    .await;
    until_open(&app, 16).await;
    assert!(!closed_within(&mut waiting[15], Duration::from_millis(100)).await, "a long poll waits");
    let evicted = evicted + 1;
    // A new client is served, not refused: the poll that has waited longest makes room (its agent asks again).
    let mut client = connect(&app).await;
    client.write_all(HEALTHZ).await.expect("write");
    assert_eq!(read_answer(&mut client).await.status, 200);
    assert_eq!(app.state.metrics.connections_refused.get(), 0);
    assert_eq!(app.state.metrics.connections_evicted.get(), evicted + 1);
    let closed = {
        let mut closed = 0;
        for stream in &mut waiting {
            closed += usize::from(closed_within(stream, Duration::from_millis(50)).await);
        }
        closed
    };
    assert_eq!(closed, 1, "one long poll made room");
}

#[tokio::test]
async fn a_body_that_trickles_in_gets_408_and_frees_its_connection() {
    let app = TestApp::with(Options { body_timeout: Duration::from_millis(300), ..options(64, WAIT, WAIT) }).await;
    let body = serde_json::to_vec(&registration("gpu-slow-body", 8000)).expect("json");
    let mut slow = awaiting_body(&app, &body).await;
    slow.write_all(&body[..10]).await.expect("part of the body");
    let started = Instant::now();
    let answer = read_answer(&mut slow).await;
    assert_eq!(answer.status, 408, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "request_timeout");
    assert!(started.elapsed() >= Duration::from_millis(250), "answered before the deadline");
    assert!(closed_within(&mut slow, WAIT).await, "the connection is closed");
    assert!(app.nodes().await.is_empty(), "nothing was registered");
    // A body sent whole, promptly, is unaffected.
    let mut prompt = awaiting_body(&app, &body).await;
    prompt.write_all(&body).await.expect("body");
    assert_eq!(read_answer(&mut prompt).await.status, 201);
}

#[tokio::test]
async fn headers_must_arrive_within_the_header_timeout_on_every_request() {
    const HEADER_TIMEOUT: Duration = Duration::from_millis(300);
    let app = TestApp::with(options(64, HEADER_TIMEOUT, Duration::from_secs(60))).await;
    pause();
    // A first request that never completes its headers: timed from the accept.
    let connecting = Instant::now();
    let mut silent = half_open(&app).await;
    closed_after(&mut silent, connecting + HEADER_TIMEOUT - EARLY, "a half-open connection").await;
    assert_eq!(app.state.metrics.header_timeouts.get(), 1);
    // A later request on a keep-alive connection is held to the same timeout, though idling may last a minute: timed
    // from its first byte.
    let mut keep_alive = idle_keep_alive(&app).await;
    keep_alive.write_all(PARTIAL_HEADERS).await.expect("write partial headers");
    let started = Instant::now();
    let closed = closed_after(&mut keep_alive, started + HEADER_TIMEOUT - EARLY, "partial headers").await;
    assert!(closed - started < Duration::from_secs(2), "closed after {:?}", closed - started);
    assert_eq!(app.state.metrics.header_timeouts.get(), 2);
    assert_eq!(app.state.metrics.idle_timeouts.get(), 0);
    let metrics = app.request(Method::GET, "/metrics").send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("llm_router_http_connection_timeouts_total{kind=\"header\"} 2\n"), "{metrics}");
    assert!(metrics.contains("llm_router_http_connections_max 64\n"), "{metrics}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
    let app = TestApp::with(options(64, Duration::from_millis(300), IDLE_TIMEOUT)).await;
    pause();
    // Idle from its answer, on the router's coarse clock; the answer is after the request.
    let asked = Instant::now();
    let mut stream = idle_keep_alive(&app).await;
    // The idle timeout applies, not the shorter header timeout.
    closed_after(&mut stream, asked + IDLE_TIMEOUT - EARLY, "an idle connection").await;
    assert_eq!(app.state.metrics.idle_timeouts.get(), 1);
    assert_eq!(app.state.metrics.header_timeouts.get(), 0);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_requests_in_flight_finish() {
    let mut app = TestApp::spawn().await;
    let body = serde_json::to_vec(&registration("gpu-late", 8000)).expect("json");
    let mut in_flight = awaiting_body(&app, &body).await;
    let mut idle = idle_keep_alive(&app).await;
    let addr = app.addr;
    let stopping = tokio::spawn(async move {
        app.shutdown().await;
    });
    assert!(closed_within(&mut idle, WAIT).await, "idle connection not closed at shutdown");
    // No new connection is accepted.
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the router still accepts connections while stopping");
    assert!(!stopping.is_finished(), "the router stopped with a request in flight");
    in_flight.write_all(&body).await.expect("write body");
    let answer = read_answer(&mut in_flight).await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.header("connection"), Some("close"));
    tokio::time::timeout(WAIT, stopping).await.expect("stopped in time").expect("shutdown task");
}

#[tokio::test]
async fn every_answer_says_nosniff() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let answers = [
        app.request(Method::GET, "/healthz").send().await,
        app.request(Method::GET, "/metrics").send().await,
        app.request(Method::GET, "/dashboard").send().await,
        app.request(Method::GET, "/dashboard/app.js").send().await,
        app.request(Method::GET, "/dashboard/missing.js").send().await,
        app.request(Method::GET, "/v0/openapi.json").send().await,
        app.request(Method::GET, "/v0/nodes").bearer_auth(&token).send().await,
        app.request(Method::GET, "/v0/nodes").send().await,
        app.request(Method::GET, "/v0/nothing-here").send().await,
        app.request(Method::PUT, "/v0/nodes").send().await,
        app.request(Method::POST, "/v0/nodes").header("content-type", "application/json").body("{").send().await,
    ];
    let mut statuses = Vec::new();
    for answer in answers {
        let answer = answer.expect("send");
        statuses.push(answer.status().as_u16());
        assert_eq!(
            answer.headers().get("x-content-type-options").and_then(|v| v.to_str().ok()),
            Some("nosniff"),
            "{} lacks nosniff",
            answer.url()
        );
    }
    assert_eq!(statuses, [200, 200, 200, 200, 404, 200, 200, 401, 404, 405, 400]);
}
