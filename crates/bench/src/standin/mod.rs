//! Stand-in inference runtimes for `bench proxy`: HTTP/1.1 keep-alive servers on 127.0.0.1 that answer
//! `POST /v1/chat/completions` as fast as a socket allows, so that what a measurement sees is the router, not the
//! runtime.
//!
//! A non-streaming request gets a chat completion of about 1 KiB, written with one call. A request with
//! `"stream": true` gets an event stream: `--chunks` events `data: {...}\n\n`, the first at once and the next ones
//! `--chunk-gap-ms` apart, then `data: [DONE]\n\n`; each event carries the instant it was written
//! (`"sent_ns"`, on the process-wide clock of [`monotonic_ns`]), so a client in the same process can tell how long
//! each event took to reach it. `GET /v1/models` lists the one model every stand-in serves.
//!
//! The stand-ins run on a thread of their own (one single-threaded async runtime for all of them), as a runtime is
//! a process of its own: the client's scheduling does not delay them, nor theirs the client. Any one of them can be
//! killed: its listener and every open connection are closed abruptly (a reset, not an orderly close), as when the
//! runtime process dies.
//!
//! This module holds the stand-ins' lifecycle and connection handling; the bytes on the wire (request parsing,
//! answer writing) are in `wire`.

mod wire;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

pub use wire::{
    Ask, RequestHead, STREAM_HEAD, completion_body, parse_request_head, push_done, push_event, push_usage, response,
    wants_stream, wants_usage,
};
// The tests of the modes that count usage compare it with what the stand-ins report.
#[cfg(test)]
pub use wire::PROMPT_TOKENS;
use wire::{MAX_BODY_BYTES, MAX_HEAD_BYTES};

/// Nanoseconds since the first call in this process, on the monotonic clock: the one clock stand-ins and clients
/// share to time each event of a stream from its write to its read.
pub fn monotonic_ns() -> u64 {
    u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The [`Instant`] of a [`monotonic_ns`] reading.
pub fn instant_at(ns: u64) -> Instant {
    origin() + Duration::from_nanos(ns)
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// How the stand-ins answer.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// The model named in answers and listed by `GET /v1/models`.
    pub model: String,
    /// Events of a streamed answer, before `[DONE]`.
    pub chunks: usize,
    /// Time between two events of a streamed answer.
    pub gap: Duration,
}

/// Requests the stand-ins answered, over all of them, and the load of each.
#[derive(Debug, Default)]
pub struct Served {
    pub completions: AtomicU64,
    pub streams: AtomicU64,
    /// Stand-in by stand-in, in the order of [`StandIns::addrs`].
    pub each: Vec<Load>,
}

/// The chat completions one stand-in answered and is answering.
#[derive(Debug, Default)]
pub struct Load {
    pub answered: AtomicU64,
    pub in_flight: AtomicU64,
    /// Most answers under way at once.
    pub peak: AtomicU64,
}

impl Load {
    /// Counts an answer as under way until the guard drops.
    fn begin(&self) -> impl Drop + '_ {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        struct Ends<'a>(&'a Load);
        impl Drop for Ends<'_> {
            fn drop(&mut self) {
                self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.0.answered.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ends(self)
    }
}

/// A set of running stand-ins; dropping it stops them all.
pub struct StandIns {
    servers: Servers,
    kills: Vec<watch::Sender<bool>>,
    served: Arc<Served>,
}

/// Listeners on 127.0.0.1, each served by a task on one single-threaded runtime that runs on a thread of its own, as
/// a runtime is a process of its own: the client's scheduling does not delay them, nor theirs the client. Dropping
/// it stops the runtime and its tasks.
pub struct Servers {
    addrs: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    /// Binds `count` listeners, each on a port of its own, and spawns `serve(i, listener)` for each on the thread
    /// `name`.
    pub fn start<F, Fut>(count: usize, name: &str, mut serve: F) -> anyhow::Result<Servers>
    where
        F: FnMut(usize, TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        monotonic_ns();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the stand-ins' runtime")?;
        let mut addrs = Vec::with_capacity(count);
        for i in 0..count {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a stand-in")?;
            listener.set_nonblocking(true)?;
            addrs.push(listener.local_addr()?);
            let listener = {
                let _entered = runtime.enter();
                TcpListener::from_std(listener)?
            };
            runtime.spawn(serve(i, listener));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .context("starting the stand-ins' thread")?;
        Ok(Servers { addrs, stop: Some(stop), thread: Some(thread) })
    }

    /// Where each one listens.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl StandIns {
    /// Binds `count` stand-ins on 127.0.0.1, each on a port of its own, and starts serving.
    pub fn start(count: usize, behaviour: Behaviour) -> anyhow::Result<StandIns> {
        let behaviour = Arc::new(Prepared::new(behaviour));
        let served = Arc::new(Served { each: (0..count).map(|_| Load::default()).collect(), ..Served::default() });
        let mut kills = Vec::with_capacity(count);
        let servers = Servers::start(count, "stand-ins", |i, listener| {
            let (kill, killed) = watch::channel(false);
            kills.push(kill);
            accept(listener, behaviour.clone(), served.clone(), i, killed)
        })?;
        Ok(StandIns { servers, kills, served })
    }

    /// Where each stand-in listens.
    pub fn addrs(&self) -> &[SocketAddr] {
        self.servers.addrs()
    }

    /// Requests answered so far.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// Kills stand-in `i`: its listener closes (connections are refused from now on) and every connection it has
    /// open is reset, mid-answer or idle.
    pub fn kill(&self, i: usize) {
        if let Some(kill) = self.kills.get(i) {
            let _ = kill.send(true);
        }
    }
}

impl Drop for StandIns {
    fn drop(&mut self) {
        // The connections reset before the runtime stops (`servers` drops after this).
        for kill in &self.kills {
            let _ = kill.send(true);
        }
    }
}

/// What every answer shares, serialized once.
struct Prepared {
    behaviour: Behaviour,
    /// The whole non-streaming answer: head and body.
    completion: Vec<u8>,
    /// The whole `GET /v1/models` answer.
    models: Vec<u8>,
}

impl Prepared {
    fn new(behaviour: Behaviour) -> Self {
        let body = completion_body(&behaviour.model);
        let completion = response(200, "application/json", &body);
        let list = serde_json::json!({"object": "list", "data": [{"id": behaviour.model, "object": "model"}]});
        let models = response(200, "application/json", list.to_string().as_bytes());
        Prepared { behaviour, completion, models }
    }
}

async fn accept(
    listener: TcpListener,
    behaviour: Arc<Prepared>,
    served: Arc<Served>,
    i: usize,
    mut killed: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = killed.wait_for(|k| *k) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        // Closing with a zero linger resets the connection: how a dead process's sockets end.
        if stream.set_nodelay(true).is_err() || stream.set_zero_linger().is_err() {
            continue;
        }
        let (behaviour, served, mut killed) = (behaviour.clone(), served.clone(), killed.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = killed.wait_for(|k| *k) => {}
                _ = serve(stream, &behaviour, &served, i) => {}
            }
        });
    }
}

/// Serves one connection until the peer closes it or breaks the protocol.
async fn serve(mut stream: TcpStream, prepared: &Prepared, served: &Served, i: usize) {
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    let mut out = Vec::with_capacity(4096);
    loop {
        let Some(head) = read_request(&mut stream, &mut buf, &mut filled).await else { return };
        let total = head.head_len + head.body_len;
        let ask = if head.post_completions {
            let body = &buf[head.head_len..total];
            if wants_stream(body) { Ask::Stream { usage: wants_usage(body) } } else { Ask::Completion }
        } else if head.get_models {
            Ask::Models
        } else {
            Ask::NotFound
        };
        buf.copy_within(total..filled, 0);
        filled -= total;
        let written = match ask {
            Ask::Completion => {
                served.completions.fetch_add(1, Ordering::Relaxed);
                let _load = served.each.get(i).map(Load::begin);
                stream.write_all(&prepared.completion).await
            }
            Ask::Models => stream.write_all(&prepared.models).await,
            Ask::NotFound => stream.write_all(&response(404, "application/json", b"{\"error\":\"not found\"}")).await,
            Ask::Stream { usage } => {
                served.streams.fetch_add(1, Ordering::Relaxed);
                let _load = served.each.get(i).map(Load::begin);
                write_stream(&mut stream, &prepared.behaviour, usage, &mut out).await
            }
        };
        if written.is_err() {
            return;
        }
    }
}

/// Reads the next request of a keep-alive connection, head and body, to the start of `buf` (`filled` bytes of it
/// read so far, the next request's first bytes included); `None` at the end of the connection or for a request a
/// stand-in does not take.
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize) -> Option<RequestHead> {
    let head = loop {
        match parse_request_head(&buf[..*filled]) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(_) => return None,
        }
        if !read_more(stream, buf, filled).await {
            return None;
        }
    };
    let total = head.head_len + head.body_len;
    if buf.len() < total {
        buf.resize(total, 0);
    }
    while *filled < total {
        if !read_more(stream, buf, filled).await {
            return None;
        }
    }
    Some(head)
}

/// Reads more of a request; `false` at the end of the connection or on an error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize) -> bool {
    if *filled == buf.len() {
        if buf.len() >= MAX_HEAD_BYTES + MAX_BODY_BYTES {
            return false;
        }
        buf.resize(buf.len() * 2, 0);
    }
    match stream.read(&mut buf[*filled..]).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            *filled += n;
            true
        }
    }
}

/// Writes a streamed answer: the head with the first event at once, then one event per gap, each written with one
/// call and stamped just before it, then `[DONE]` and the end of the body. With `usage` (the request asked for it,
/// as the router does for every stream it counts), as OpenAI does: `"usage":null` in every event, and after the
/// last one an event with no choices and the answer's usage, written with `[DONE]`.
async fn write_stream(
    stream: &mut TcpStream,
    behaviour: &Behaviour,
    usage: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    // An interval of zero would panic; the timer's resolution (a millisecond) is the shortest real gap anyway.
    let gap = behaviour.gap.max(Duration::from_micros(1));
    // The first event goes with the head, without waiting for a timer: a timer due now fires at its next tick.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + gap, gap);
    // A late tick must not be made up with events back to back: that would be the stand-in coalescing them.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    out.clear();
    out.extend_from_slice(STREAM_HEAD);
    for index in 0..behaviour.chunks {
        if index > 0 {
            ticks.tick().await;
        }
        push_event(out, &behaviour.model, index, monotonic_ns(), usage);
        stream.write_all(out).await?;
        out.clear();
    }
    if usage {
        push_usage(out, &behaviour.model, behaviour.chunks, monotonic_ns());
    }
    push_done(out);
    stream.write_all(out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::encode_request;
    use crate::sse::{Parsed, Step, StreamClient, chunk_step, parse_event};

    fn standins(count: usize, chunks: usize) -> StandIns {
        let behaviour = Behaviour { model: "m".to_owned(), chunks, gap: Duration::from_millis(1) };
        StandIns::start(count, behaviour).expect("stand-ins start")
    }

    fn chat(addr: SocketAddr, body: &str) -> Vec<u8> {
        encode_request(
            "POST",
            "/v1/chat/completions",
            &addr.to_string(),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// The stream on the wire: the head, one chunk per event in order, `[DONE]`, the end of the body; the
    /// connection stays open for the next request.
    #[tokio::test]
    async fn streams_every_event_in_its_own_chunk_then_done_on_a_keep_alive_connection() {
        let standins = standins(1, 5);
        let addr = standins.addrs()[0];
        let mut raw = TcpStream::connect(addr).await.expect("connect");
        raw.write_all(&chat(addr, r#"{"model":"m","stream":true}"#)).await.expect("write");
        let mut wire = Vec::new();
        let mut buf = [0u8; 4096];
        while !wire.ends_with(b"data: [DONE]\n\n\r\n0\r\n\r\n") {
            let n = raw.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the end of the stream");
            wire.extend_from_slice(&buf[..n]);
        }
        assert!(wire.starts_with(STREAM_HEAD));
        let mut rest = &wire[STREAM_HEAD.len()..];
        let mut sent = Vec::new();
        let mut done = false;
        while let Some(step) = chunk_step(rest).expect("valid chunked body") {
            match step {
                Step::Data { start, len, next } => {
                    assert!(!done, "nothing after [DONE]");
                    let event = &rest[start..start + len];
                    assert!(event.ends_with(b"\n\n"));
                    match parse_event(&event[..len - 2]) {
                        Parsed::Data(Some(ns)) => sent.push(ns),
                        Parsed::Done => done = true,
                        other => panic!("unexpected event {other:?}"),
                    }
                    rest = &rest[next..];
                }
                Step::End { next } => {
                    assert_eq!(next, rest.len());
                    rest = &[];
                    break;
                }
            }
        }
        assert!(rest.is_empty() && done);
        assert_eq!(sent.len(), 5);
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "stamped in order: {sent:?}");

        // The same connection takes a non-streaming request next.
        raw.write_all(&chat(addr, r#"{"model":"m"}"#)).await.expect("write");
        let mut answer = Vec::new();
        while crate::http::parse_head(&answer)
            .expect("head")
            .is_none_or(|h| answer.len() < h.len + completion_body("m").len())
        {
            let n = raw.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.ends_with(&completion_body("m")));
        assert_eq!(standins.served().streams.load(Ordering::Relaxed), 1);
        assert_eq!(standins.served().completions.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_stream_client_times_every_event() {
        let standins = standins(2, 20);
        let addr = standins.addrs()[1];
        let mut client = StreamClient::new(addr);
        let before = monotonic_ns();
        let exchange = client.send(&chat(addr, r#"{"model":"m","stream": true}"#), true).await.expect("stream");
        assert_eq!(exchange.status, 200);
        assert!(exchange.done);
        assert_eq!(exchange.events.len(), 20);
        for event in &exchange.events {
            let sent = event.sent_ns.expect("stamped");
            assert!(before <= sent && sent <= event.recv_ns && event.recv_ns <= exchange.end_ns);
        }
        assert!(exchange.events.windows(2).all(|w| w[0].read <= w[1].read && w[0].sent_ns < w[1].sent_ns));
        let plain = client.send(&chat(addr, r#"{"model":"m"}"#), false).await.expect("completion");
        assert_eq!((plain.status, plain.body_len, plain.events.len()), (200, completion_body("m").len(), 0));
        let missing = encode_request("GET", "/nope", "h", &[], b"");
        assert_eq!(client.send(&missing, false).await.expect("404").status, 404);
    }

    /// Asked for usage, the stream ends as OpenAI's does: an event with the usage and no choices before `[DONE]`.
    #[tokio::test]
    async fn a_stream_that_asks_for_usage_ends_with_it() {
        let standins = standins(1, 4);
        let addr = standins.addrs()[0];
        let mut raw = TcpStream::connect(addr).await.expect("connect");
        let body = r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#;
        raw.write_all(&chat(addr, body)).await.expect("write");
        let mut wire = Vec::new();
        let mut buf = [0u8; 4096];
        while !wire.ends_with(b"data: [DONE]\n\n\r\n0\r\n\r\n") {
            let n = raw.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the end of the stream");
            wire.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(wire).expect("text");
        assert_eq!(text.matches("\"usage\":null").count(), 4, "{text}");
        assert_eq!(text.matches("\"choices\":[],\"usage\":{\"prompt_tokens\":256,\"completion_tokens\":4,").count(), 1);
        let usage_at = text.find("\"choices\":[]").expect("the usage event");
        assert!(
            usage_at > text.rfind("token 3 ").expect("the last event") && usage_at < text.find("[DONE]").expect("done")
        );
    }

    /// A killed stand-in resets the connections it had open and refuses new ones, as a dead process does.
    #[tokio::test]
    async fn a_killed_stand_in_resets_its_connections_and_refuses_new_ones() {
        let standins = standins(2, 3);
        let (dead, alive) = (standins.addrs()[0], standins.addrs()[1]);
        let mut client = StreamClient::new(dead);
        assert_eq!(client.send(&chat(dead, r#"{"model":"m"}"#), false).await.expect("before").status, 200);
        let mut idle = TcpStream::connect(dead).await.expect("connect");
        idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 4096];
        assert!(idle.read(&mut buf).await.expect("answer") > 0);

        standins.kill(0);
        let err = idle.read(&mut buf).await.expect_err("the connection is reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        // The listener closes on the stand-ins' thread; wait for that, not for a fixed time.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(dead).await {
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ if Instant::now() > deadline => panic!("the killed stand-in still accepts connections"),
                _ => tokio::task::yield_now().await,
            }
        }
        assert!(client.send(&chat(dead, r#"{"model":"m"}"#), false).await.is_err());
        let mut other = StreamClient::new(alive);
        assert_eq!(other.send(&chat(alive, r#"{"model":"m"}"#), false).await.expect("alive").status, 200);
    }
}
