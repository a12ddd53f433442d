//! `bench proxy`: what the router's `/v1` proxy adds (SPEC §8), measured against the same stand-in runtimes called
//! directly in the same run.
//!
//! `--nodes` stand-ins (see [`crate::standin`]) are registered as nodes at 127.0.0.1 and approved; they keep
//! heartbeating all along, so they stay online. The router runs with `--inference-auth none`. Then, in order:
//!
//! - **completions**: non-streaming 1 KiB requests offered at `--rate`, on a schedule (open loop): request *i* is
//!   due at *i* / rate whatever the answers before it did, and its latency runs from that due instant to the end of
//!   its answer, so a stall shows in every request it delays. Direct and routed traffic alternate in slices of
//!   `--slice-secs`, so both see the same machine; the first pair of slices is a warm-up.
//! - **streams**: streams of `--chunks` events started at `--stream-rate`, alternating the same way: time to the
//!   first event (from the due instant), and for every event the time from the stand-in's write to the client's
//!   read, with the events that came late or in one read with the next.
//! - **failover**: `--failover-rate` requests per second through the router, `--stream-share` of them streams;
//!   at `--kill-at-secs` the first stand-in dies (listener and connections reset) while its node keeps
//!   heartbeating, so only the router's retries and ejection stand between the clients and errors.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router_protocol::{REGISTER_PATH, RegisterRequest};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use crate::cli::{ProxyArgs, Scenario};
use crate::fleet::{self, NodeCredentials};
use crate::http::{Client, encode_request};
use crate::procfs;
use crate::router::RouterSpec;
use crate::sse::{Event, Exchange, StreamClient};
use crate::standin::{self, Behaviour, StandIns, instant_at, monotonic_ns};
use crate::stats::{Added, ErrorCounts, LatencySummary};

/// The model every stand-in serves and every request names.
pub const MODEL: &str = fleet::MODELS[0];

/// Size of a non-streaming request's body.
const REQUEST_BYTES: usize = 1024;

/// Longest a request may take before it is abandoned and counted as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often every node heartbeats during the run.
pub(crate) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// Time from setting up a run's schedule to its first due request.
const LEAD: Duration = Duration::from_millis(50);

/// Where the router is and how to act as its administrator.
#[derive(Debug, Clone)]
pub struct RouterAt {
    pub addr: SocketAddr,
    pub admin_password: String,
    /// The router's process, for its CPU and memory; `None` when it runs inside this process.
    pub pid: Option<u32>,
}

/// What `bench proxy` reports.
#[derive(Debug, Serialize)]
pub struct ProxyReport {
    pub nodes: usize,
    pub completions: Option<CompletionsReport>,
    pub streams: Option<StreamsReport>,
    pub failover: Option<FailoverReport>,
    /// Heartbeats of the stand-ins' nodes that did not get 200 during the run.
    pub heartbeat_errors: u64,
    /// Answers the stand-ins wrote, direct and routed, checks and warm-ups included.
    pub standin_completions: u64,
    pub standin_streams: u64,
    pub router_rss_mb: Option<f64>,
    pub router_peak_rss_mb: Option<f64>,
    pub setup_secs: f64,
}

/// One side (direct or routed) of the completions scenario.
#[derive(Debug, Serialize)]
pub struct Side {
    pub requests: u64,
    pub ok: u64,
    pub errors: ErrorCounts,
    /// From the due instant to the end of the answer, successes only.
    pub latency: LatencySummary,
}

#[derive(Debug, Serialize)]
pub struct CompletionsReport {
    pub rate_rps: f64,
    pub secs_per_side: f64,
    pub request_bytes: usize,
    pub answer_bytes: usize,
    pub direct: Side,
    pub routed: Side,
    /// Routed minus direct.
    pub added: Added,
    /// How late the bench sent requests after their due instant (both sides): its own share of the latency.
    pub send_lag: LatencySummary,
    /// The router's CPU during the routed slices, in cores.
    pub router_cpu_cores: Option<f64>,
    /// The bench's CPU (client and stand-ins) over the whole scenario, in cores.
    pub bench_cpu_cores: f64,
}

/// One side of the streams scenario.
#[derive(Debug, Serialize)]
pub struct StreamSide {
    pub streams: u64,
    /// Streams with every event and `[DONE]`.
    pub ok: u64,
    pub errors: ErrorCounts,
    /// From the due instant to the first event.
    pub first_chunk: LatencySummary,
    /// For every event, from the stand-in's write to the client's read.
    pub chunk_delay: LatencySummary,
    pub chunks: u64,
    /// Events whose delay was over `late_ms`.
    pub late_chunks: u64,
    /// Events that arrived in one read with the next one although they were written a gap apart or more: held
    /// back until the next came.
    pub coalesced_chunks: u64,
}

#[derive(Debug, Serialize)]
pub struct StreamsReport {
    pub stream_rate: f64,
    pub secs_per_side: f64,
    pub chunks_per_stream: usize,
    pub chunk_gap_ms: f64,
    pub late_ms: f64,
    pub direct: StreamSide,
    pub routed: StreamSide,
    /// Time to first event, routed minus direct.
    pub added_first_chunk: Added,
    /// Event delay, routed minus direct.
    pub added_chunk_delay: Added,
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub rate_rps: f64,
    pub secs: f64,
    pub kill_at_secs: f64,
    pub stream_share: f64,
    pub killed_node: Uuid,
    pub requests: u64,
    pub ok: u64,
    pub error_total: u64,
    /// Errors as a percentage of requests.
    pub error_pct: f64,
    pub errors: ErrorCounts,
    /// Errors of requests due before the kill (in flight on the stand-in when it died, or about to be).
    pub errors_before_kill: u64,
    /// Errors of requests due more than a second after the kill.
    pub errors_after_first_second: u64,
    /// Errors by second of the scenario, by the due instant of the request.
    pub errors_by_second: Vec<u64>,
    /// Latency of the successful non-streaming requests, from the due instant.
    pub latency: LatencySummary,
    /// Latency of the successful non-streaming requests due in the second after the kill.
    pub latency_after_kill: LatencySummary,
    /// The killed node's `routing` figures as the router shows them at the end.
    pub killed_node_routing: Option<serde_json::Value>,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &ProxyArgs) -> anyhow::Result<ProxyReport> {
    let mut spec = spec.clone();
    spec.extra_args.extend(["--inference-auth", "none"].map(str::to_owned));
    let standins = StandIns::start(args.nodes, behaviour(args))?;
    let router = spec.start().await?;
    let measured = async {
        router.wait_ready().await?;
        let at = RouterAt { addr: router.addr, admin_password: spec.admin_password.clone(), pid: Some(router.pid) };
        measure(&at, &standins, args).await
    }
    .await;
    let stopped = router.stop().await;
    let report = measured?;
    stopped?;
    Ok(report)
}

/// How the stand-ins answer, from the command line.
pub fn behaviour(args: &ProxyArgs) -> Behaviour {
    Behaviour { model: MODEL.to_owned(), chunks: args.chunks, gap: Duration::from_secs_f64(args.chunk_gap_ms / 1000.0) }
}

/// Registers the stand-ins with the router at `at`, keeps them heartbeating, and runs the scenarios of `args`.
pub async fn measure(at: &RouterAt, standins: &StandIns, args: &ProxyArgs) -> anyhow::Result<ProxyReport> {
    let started = Instant::now();
    let host = at.addr.to_string();
    eprintln!("registering {} stand-in runtimes as nodes...", standins.addrs().len());
    let nodes = register(at.addr, &host, standins.addrs()).await?;
    let session = fleet::login(at.addr, &host, &at.admin_password).await?;
    fleet::approve_nodes(at.addr, &host, &session, &nodes, 16).await?;
    let heartbeat_errors = Arc::new(AtomicU64::new(0));
    let heartbeats = keep_heartbeating(at.addr, &host, &nodes, heartbeat_errors.clone())?;
    let targets = Targets::new(at.addr, standins.addrs());
    let result = async {
        targets.check().await?;
        let setup_secs = started.elapsed().as_secs_f64();
        let mut report = ProxyReport {
            nodes: nodes.len(),
            completions: None,
            streams: None,
            failover: None,
            heartbeat_errors: 0,
            standin_completions: 0,
            standin_streams: 0,
            router_rss_mb: None,
            router_peak_rss_mb: None,
            setup_secs,
        };
        for scenario in &args.scenarios {
            match scenario {
                Scenario::Completions => report.completions = Some(completions(at, &targets, args).await?),
                Scenario::Streams => report.streams = Some(streams(&targets, args).await?),
                Scenario::Failover => {
                    let killed = &nodes[0];
                    let failover = failover(&targets, standins, args, killed.id).await?;
                    let routing = node_routing(at.addr, &host, &session, killed.id).await.ok();
                    report.failover = Some(FailoverReport { killed_node_routing: routing, ..failover });
                }
            }
        }
        anyhow::Ok(report)
    }
    .await;
    heartbeats.abort();
    let mut report = result?;
    report.heartbeat_errors = heartbeat_errors.load(Ordering::Relaxed);
    report.standin_completions = standins.served().completions.load(Ordering::Relaxed);
    report.standin_streams = standins.served().streams.load(Ordering::Relaxed);
    if let Some(pid) = at.pid {
        let memory = procfs::memory(pid)?;
        report.router_rss_mb = Some(memory.rss_mb());
        report.router_peak_rss_mb = Some(memory.peak_mb());
    }
    Ok(report)
}

/// Registers one node per stand-in: at 127.0.0.1, its runtime port the stand-in's, the fleet's models ready.
pub(crate) async fn register(
    addr: SocketAddr,
    host: &str,
    standins: &[SocketAddr],
) -> anyhow::Result<Vec<NodeCredentials>> {
    let requests = standins
        .iter()
        .enumerate()
        .map(|(i, standin)| {
            let models: Vec<String> = fleet::MODELS.iter().map(|m| (*m).to_owned()).collect();
            let body = serde_json::to_vec(&RegisterRequest {
                machine_name: format!("stand-in-{i:03}"),
                ip_address: Some(Ipv4Addr::LOCALHOST.to_string()),
                runtime_port: i64::from(standin.port()),
                runtime_version: "stand-in".to_owned(),
                gpu_devices: Some(fleet::gpu_devices()),
                supported_runtimes: Some(vec!["vllm".to_owned()]),
                loaded_models: Some(models.clone()),
                ready_models: Some(models),
                tags: Some(fleet::tags(i)),
            })?;
            Ok(encode_request("POST", REGISTER_PATH, host, &[("Content-Type", "application/json")], &body))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outcomes = fleet::send_all(addr, Arc::new(requests), 4).await;
    let mut errors = ErrorCounts::default();
    let mut nodes = Vec::with_capacity(standins.len());
    for sent in &outcomes {
        if fleet::tally(sent, 201, &mut errors)
            && let Ok((_, body)) = &sent.result
        {
            let answer: llm_router_protocol::RegisterResponse =
                serde_json::from_slice(body).context("parsing a registration answer")?;
            nodes.push(NodeCredentials { id: answer.node_id, token: answer.node_token });
        }
    }
    if errors.total() > 0 {
        bail!("{} of {} registrations failed: {}", errors.total(), standins.len(), errors.line());
    }
    Ok(nodes)
}

/// Sends every node's heartbeat (its models ready) every second until aborted; counts the ones not answered 200.
pub(crate) fn keep_heartbeating(
    addr: SocketAddr,
    host: &str,
    nodes: &[NodeCredentials],
    errors: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let requests = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| Ok(fleet::heartbeat_request(host, node, &fleet::heartbeat_body(i, node.id)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(tokio::spawn(async move {
        let mut client = Client::new(addr);
        let mut ticks = tokio::time::interval(HEARTBEAT_PERIOD);
        loop {
            ticks.tick().await;
            for request in &requests {
                if !matches!(client.send(request).await, Ok(answer) if answer.status == 200) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }))
}

/// The killed node's `routing` figures, from `GET /v0/nodes/{id}`.
async fn node_routing(addr: SocketAddr, host: &str, session: &str, id: Uuid) -> anyhow::Result<serde_json::Value> {
    let bearer = format!("Bearer {session}");
    let path = format!("{REGISTER_PATH}/{id}");
    let mut client = Client::new(addr);
    let answer = client.send(&encode_request("GET", &path, host, &[("Authorization", &bearer)], b"")).await?;
    if answer.status != 200 {
        bail!("GET {path} answered HTTP {}", answer.status);
    }
    let node: serde_json::Value = serde_json::from_slice(client.body())?;
    Ok(node["routing"].clone())
}

/// A chat completion request of about [`REQUEST_BYTES`], streamed or not.
pub fn request_body(stream: bool) -> Vec<u8> {
    let body = |content: &str| {
        let mut request = serde_json::json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": content},
            ],
            "max_tokens": 200,
            "temperature": 0.7,
        });
        if stream {
            request["stream"] = serde_json::Value::Bool(true);
        }
        request.to_string()
    };
    let bare = body("").len();
    body(&"lorem ipsum ".repeat(REQUEST_BYTES.saturating_sub(bare) / 12)).into_bytes()
}

/// Where requests go, and each one serialized once: `[non-streaming, streaming]` for the router and for each
/// stand-in.
struct Targets {
    router: SocketAddr,
    standins: Vec<SocketAddr>,
    routed: [Vec<u8>; 2],
    direct: Vec<[Vec<u8>; 2]>,
}

impl Targets {
    fn new(router: SocketAddr, standins: &[SocketAddr]) -> Arc<Targets> {
        let encode = |addr: SocketAddr| {
            [false, true].map(|stream| {
                let body = request_body(stream);
                encode_request(
                    "POST",
                    "/v1/chat/completions",
                    &addr.to_string(),
                    &[("Content-Type", "application/json"), ("Accept", "*/*")],
                    &body,
                )
            })
        };
        Arc::new(Targets {
            router,
            standins: standins.to_vec(),
            routed: encode(router),
            direct: standins.iter().map(|&addr| encode(addr)).collect(),
        })
    }

    /// One request of each kind, direct to every stand-in and through the router, must succeed before measuring.
    async fn check(&self) -> anyhow::Result<()> {
        for stream in [false, true] {
            for (addr, request) in std::iter::once((self.router, &self.routed))
                .chain(self.standins.iter().copied().zip(self.direct.iter()))
            {
                let exchange = StreamClient::new(addr).send(&request[usize::from(stream)], stream).await?;
                if exchange.status != 200 || (stream && !exchange.done) {
                    bail!(
                        "a {} request to {addr} answered HTTP {} (done: {})",
                        if stream { "streamed" } else { "non-streaming" },
                        exchange.status,
                        exchange.done
                    );
                }
            }
        }
        Ok(())
    }
}

/// Where request *i* of a run goes and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    to: To,
    stream: bool,
    /// Counted in the figures (not a warm-up).
    measured: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// Straight to stand-in *k*.
    Direct(usize),
    Routed,
}

/// One request of a run, as sent and answered.
struct Record {
    job: Job,
    /// When it was due, on [`monotonic_ns`].
    due_ns: u64,
    /// When it was sent.
    sent_ns: u64,
    outcome: Result<Exchange, String>,
}

/// A run in progress: the pacer thread hands out due requests to the workers.
struct Running {
    start_ns: u64,
    workers: JoinSet<Vec<Record>>,
    pacer: std::thread::JoinHandle<()>,
}

/// Starts an open-loop run of `count` requests at `rate`, what each one is given by `plan`, over `connections`
/// workers (each one request at a time, on its own connections).
fn start_run(
    targets: &Arc<Targets>,
    rate: f64,
    count: u64,
    connections: usize,
    plan: Arc<dyn Fn(u64) -> Job + Send + Sync>,
) -> anyhow::Result<Running> {
    let period_ns = 1e9 / rate;
    let start_ns = monotonic_ns() + u64::try_from(LEAD.as_nanos()).unwrap_or(0);
    let due = move |i: u64| start_ns + (i as f64 * period_ns) as u64;
    let gate = Arc::new(Semaphore::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        let (targets, gate, next, plan) = (targets.clone(), gate.clone(), next.clone(), plan.clone());
        workers.spawn(async move {
            let mut routed = StreamClient::new(targets.router);
            let mut direct: Vec<StreamClient> = targets.standins.iter().map(|&addr| StreamClient::new(addr)).collect();
            let mut records = Vec::new();
            loop {
                match gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let job = plan(i);
                let (client, request) = match job.to {
                    To::Routed => (&mut routed, &targets.routed[usize::from(job.stream)]),
                    To::Direct(k) => (&mut direct[k], &targets.direct[k][usize::from(job.stream)]),
                };
                let sent_ns = monotonic_ns();
                let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, client.send(request, job.stream)).await {
                    Ok(Ok(exchange)) => Ok(exchange),
                    Ok(Err(err)) => Err(err.label()),
                    Err(_) => {
                        client.disconnect();
                        Err("timeout".to_owned())
                    }
                };
                records.push(Record { job, due_ns: due(i), sent_ns, outcome });
            }
            records
        });
    }
    let pacer_gate = gate.clone();
    let pacer = std::thread::Builder::new()
        .name("pacer".to_owned())
        .spawn(move || {
            for i in 0..count {
                let now = monotonic_ns();
                let at = due(i);
                if at > now {
                    std::thread::sleep(Duration::from_nanos(at - now));
                }
                pacer_gate.add_permits(1);
            }
            // Wakes every worker to find the run over.
            pacer_gate.add_permits(connections);
        })
        .context("starting the pacer thread")?;
    Ok(Running { start_ns, workers, pacer })
}

impl Running {
    async fn finish(mut self) -> anyhow::Result<Vec<Record>> {
        let mut records = Vec::new();
        while let Some(done) = self.workers.join_next().await {
            records.extend(done.context("a request worker failed")?);
        }
        if self.pacer.join().is_err() {
            bail!("the pacer thread panicked");
        }
        Ok(records)
    }
}

/// Slices of a run that alternates direct and routed traffic: a warm-up pair, then `pairs` measured pairs.
#[derive(Debug, Clone, Copy)]
struct Alternation {
    slice_secs: f64,
    /// Requests in one slice.
    per_slice: u64,
    pairs: u64,
    nodes: usize,
    stream: bool,
}

impl Alternation {
    fn new(rate: f64, secs: f64, slice_secs: f64, nodes: usize, stream: bool) -> Self {
        let pairs = (secs / slice_secs).round().max(1.0) as u64;
        let per_slice = (rate * slice_secs).round().max(1.0) as u64;
        Alternation { slice_secs, per_slice, pairs, nodes, stream }
    }

    fn count(&self) -> u64 {
        self.per_slice * 2 * (self.pairs + 1)
    }

    fn measured_secs_per_side(&self) -> f64 {
        self.slice_secs * self.pairs as f64
    }

    /// Even slices go direct (to the stand-ins in turn), odd ones through the router; the first two are a warm-up.
    fn job(&self, i: u64) -> Job {
        let slice = i / self.per_slice;
        let to = if slice.is_multiple_of(2) { To::Direct((i % self.nodes as u64) as usize) } else { To::Routed };
        Job { to, stream: self.stream, measured: slice >= 2 }
    }
}

async fn completions(at: &RouterAt, targets: &Arc<Targets>, args: &ProxyArgs) -> anyhow::Result<CompletionsReport> {
    let plan = Alternation::new(args.rate, args.secs, args.slice_secs, targets.standins.len(), false);
    eprintln!(
        "completions: {} requests/s offered, {:.1} s direct and {:.1} s routed in slices of {:.1} s (after a warm-up pair)...",
        args.rate,
        plan.measured_secs_per_side(),
        plan.measured_secs_per_side(),
        args.slice_secs
    );
    let cpu_from = (at.pid.map(|pid| procfs::cpu_seconds(Some(pid))).transpose()?, procfs::cpu_seconds(None)?);
    let wall = Instant::now();
    let running = start_run(targets, args.rate, plan.count(), args.connections, Arc::new(move |i| plan.job(i)))?;
    let records = running.finish().await?;
    let wall = wall.elapsed().as_secs_f64();
    let cpu_to = (at.pid.map(|pid| procfs::cpu_seconds(Some(pid))).transpose()?, procfs::cpu_seconds(None)?);
    let expected = standin::completion_body(MODEL).len();
    let side = |routed: bool| {
        let mut result =
            Side { requests: 0, ok: 0, errors: ErrorCounts::default(), latency: LatencySummary::from_nanos(vec![]) };
        let mut latencies = Vec::new();
        for record in records.iter().filter(|r| r.job.measured && (r.job.to == To::Routed) == routed) {
            result.requests += 1;
            match &record.outcome {
                Ok(exchange) if exchange.status == 200 && exchange.body_len == expected => {
                    result.ok += 1;
                    latencies.push(exchange.end_ns.saturating_sub(record.due_ns));
                }
                Ok(exchange) if exchange.status == 200 => result.errors.add("answer of the wrong length"),
                Ok(exchange) => result.errors.add(format!("HTTP {}", exchange.status)),
                Err(label) => result.errors.add(label.clone()),
            }
        }
        result.latency = LatencySummary::from_nanos(latencies);
        result
    };
    let (direct, routed) = (side(false), side(true));
    let send_lag = LatencySummary::from_nanos(
        records.iter().filter(|r| r.job.measured).map(|r| r.sent_ns.saturating_sub(r.due_ns)).collect(),
    );
    // Routed slices are half of the run's slices, warm-up included.
    let routed_secs = plan.slice_secs * (plan.pairs + 1) as f64;
    Ok(CompletionsReport {
        rate_rps: args.rate,
        secs_per_side: plan.measured_secs_per_side(),
        request_bytes: targets.routed[0].len(),
        answer_bytes: expected,
        added: Added::between(&direct.latency, &routed.latency),
        direct,
        routed,
        send_lag,
        router_cpu_cores: cpu_from.0.zip(cpu_to.0).map(|(from, to)| (to - from) / routed_secs),
        bench_cpu_cores: (cpu_to.1 - cpu_from.1) / wall,
    })
}

/// Events of `events` that a reader would call held back: read in one read with the next event although the next
/// was written at least half a gap later.
pub fn coalesced(events: &[Event], gap_ns: u64) -> u64 {
    events
        .windows(2)
        .filter(|pair| {
            let (a, b) = (pair[0], pair[1]);
            a.read == b.read && a.sent_ns.zip(b.sent_ns).is_some_and(|(sa, sb)| sb.saturating_sub(sa) >= gap_ns / 2)
        })
        .count() as u64
}

async fn streams(targets: &Arc<Targets>, args: &ProxyArgs) -> anyhow::Result<StreamsReport> {
    let plan = Alternation::new(args.stream_rate, args.stream_secs, args.slice_secs, targets.standins.len(), true);
    eprintln!(
        "streams: {} streams/s of {} events {} ms apart, {:.1} s direct and {:.1} s routed...",
        args.stream_rate,
        args.chunks,
        args.chunk_gap_ms,
        plan.measured_secs_per_side(),
        plan.measured_secs_per_side()
    );
    let running = start_run(targets, args.stream_rate, plan.count(), args.connections, Arc::new(move |i| plan.job(i)))?;
    let records = running.finish().await?;
    let gap_ns = (args.chunk_gap_ms * 1e6) as u64;
    let late_ns = (args.late_ms * 1e6) as u64;
    let side = |routed: bool| {
        let mut first = Vec::new();
        let mut delays = Vec::new();
        let mut side = StreamSide {
            streams: 0,
            ok: 0,
            errors: ErrorCounts::default(),
            first_chunk: LatencySummary::from_nanos(vec![]),
            chunk_delay: LatencySummary::from_nanos(vec![]),
            chunks: 0,
            late_chunks: 0,
            coalesced_chunks: 0,
        };
        for record in records.iter().filter(|r| r.job.measured && (r.job.to == To::Routed) == routed) {
            side.streams += 1;
            let exchange = match &record.outcome {
                Ok(exchange) if exchange.status == 200 => exchange,
                Ok(exchange) => {
                    side.errors.add(format!("HTTP {}", exchange.status));
                    continue;
                }
                Err(label) => {
                    side.errors.add(label.clone());
                    continue;
                }
            };
            if let Some(event) = exchange.events.first() {
                first.push(event.recv_ns.saturating_sub(record.due_ns));
            }
            for event in &exchange.events {
                let delay = event.sent_ns.map_or(0, |sent| event.recv_ns.saturating_sub(sent));
                side.late_chunks += u64::from(delay > late_ns);
                delays.push(delay);
            }
            side.chunks += exchange.events.len() as u64;
            side.coalesced_chunks += coalesced(&exchange.events, gap_ns);
            if exchange.done && exchange.events.len() == args.chunks {
                side.ok += 1;
            } else {
                side.errors.add("incomplete stream");
            }
        }
        side.first_chunk = LatencySummary::from_nanos(first);
        side.chunk_delay = LatencySummary::from_nanos(delays);
        side
    };
    let (direct, routed) = (side(false), side(true));
    Ok(StreamsReport {
        stream_rate: args.stream_rate,
        secs_per_side: plan.measured_secs_per_side(),
        chunks_per_stream: args.chunks,
        chunk_gap_ms: args.chunk_gap_ms,
        late_ms: args.late_ms,
        added_first_chunk: Added::between(&direct.first_chunk, &routed.first_chunk),
        added_chunk_delay: Added::between(&direct.chunk_delay, &routed.chunk_delay),
        direct,
        routed,
    })
}

/// Whether request `i` of the failover run is a stream: `share` of them, spread evenly.
fn is_stream(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

async fn failover(
    targets: &Arc<Targets>,
    standins: &StandIns,
    args: &ProxyArgs,
    killed_node: Uuid,
) -> anyhow::Result<FailoverReport> {
    eprintln!(
        "failover: {} requests/s through the router ({:.0} % streams) for {:.1} s, one stand-in killed at {:.1} s...",
        args.failover_rate,
        args.stream_share * 100.0,
        args.failover_secs,
        args.kill_at_secs
    );
    let share = args.stream_share;
    let count = (args.failover_rate * args.failover_secs).round() as u64;
    let plan = move |i| Job { to: To::Routed, stream: is_stream(i, share), measured: true };
    let running = start_run(targets, args.failover_rate, count, args.connections, Arc::new(plan))?;
    let kill_due = running.start_ns + (args.kill_at_secs * 1e9) as u64;
    tokio::time::sleep_until(instant_at(kill_due).into()).await;
    standins.kill(0);
    let kill_ns = monotonic_ns();
    let start_ns = running.start_ns;
    let records = running.finish().await?;

    let mut errors = ErrorCounts::default();
    let mut ok = 0;
    let (mut before_kill, mut after_first_second) = (0, 0);
    let mut by_second = vec![0; args.failover_secs.ceil() as usize];
    let (mut latencies, mut after_kill) = (Vec::new(), Vec::new());
    for record in &records {
        let failure = match &record.outcome {
            Ok(exchange) if exchange.status != 200 => Some(format!("HTTP {}", exchange.status)),
            Ok(exchange) if record.job.stream && !(exchange.done && exchange.events.len() == args.chunks) => {
                Some("stream cut".to_owned())
            }
            Ok(exchange) => {
                ok += 1;
                if !record.job.stream {
                    let latency = exchange.end_ns.saturating_sub(record.due_ns);
                    latencies.push(latency);
                    if (kill_ns..kill_ns + 1_000_000_000).contains(&record.due_ns) {
                        after_kill.push(latency);
                    }
                }
                None
            }
            Err(label) => Some(label.clone()),
        };
        if let Some(failure) = failure {
            errors.add(failure);
            before_kill += u64::from(record.due_ns < kill_ns);
            after_first_second += u64::from(record.due_ns >= kill_ns + 1_000_000_000);
            let second = (record.due_ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
            if let Some(slot) = by_second.get_mut(second) {
                *slot += 1;
            }
        }
    }
    let requests = records.len() as u64;
    Ok(FailoverReport {
        rate_rps: args.failover_rate,
        secs: args.failover_secs,
        kill_at_secs: args.kill_at_secs,
        stream_share: share,
        killed_node,
        requests,
        ok,
        error_total: errors.total(),
        error_pct: if requests == 0 { 0.0 } else { errors.total() as f64 * 100.0 / requests as f64 },
        errors,
        errors_before_kill: before_kill,
        errors_after_first_second: after_first_second,
        errors_by_second: by_second,
        latency: LatencySummary::from_nanos(latencies),
        latency_after_kill: LatencySummary::from_nanos(after_kill),
        killed_node_routing: None,
    })
}

/// The report for people.
pub fn print(report: &ProxyReport) {
    println!("proxy: {} stand-in runtimes as nodes, direct and through the router in the same run", report.nodes);
    if let Some(c) = &report.completions {
        println!(
            "  completions  {} requests/s offered, {:.1} s per side, {} B requests, {} B answers",
            c.rate_rps, c.secs_per_side, c.request_bytes, c.answer_bytes
        );
        for (name, side) in [("direct", &c.direct), ("routed", &c.routed)] {
            println!("    {name:<10} {}", side.latency.line());
            println!("    {:<10} {} requests, {} ok, errors: {}", "", side.requests, side.ok, side.errors.line());
        }
        println!("    added      {}   (SPEC: p50 < 0.3 ms, p99 < 1 ms)", c.added.line());
        println!(
            "    send lag   p50 {:.3} ms   p99 {:.3} ms (the bench's own lateness)",
            c.send_lag.p50_ms, c.send_lag.p99_ms
        );
        let router = c.router_cpu_cores.map_or_else(|| "n/a".to_owned(), |cores| format!("{cores:.2} cores"));
        println!("    CPU        router {router} while routing, bench {:.2} cores", c.bench_cpu_cores);
    }
    if let Some(s) = &report.streams {
        println!(
            "  streams      {} streams/s of {} events {} ms apart, {:.1} s per side",
            s.stream_rate, s.chunks_per_stream, s.chunk_gap_ms, s.secs_per_side
        );
        for (name, side) in [("direct", &s.direct), ("routed", &s.routed)] {
            println!("    {name:<10} first event {}", side.first_chunk.line());
            println!("    {:<10} event delay {}", "", side.chunk_delay.line());
            println!(
                "    {:<10} {} streams, {} ok, errors: {}; {} events, {} over {} ms, {} held back to the next",
                "",
                side.streams,
                side.ok,
                side.errors.line(),
                side.chunks,
                side.late_chunks,
                s.late_ms,
                side.coalesced_chunks
            );
        }
        println!("    added      first event {}   (SPEC: p99 < 1 ms)", s.added_first_chunk.line());
        println!("    added      event delay {}", s.added_chunk_delay.line());
    }
    if let Some(f) = &report.failover {
        println!(
            "  failover     {} requests/s through the router for {:.1} s, {:.0} % streams, stand-in of node {} killed at {:.1} s",
            f.rate_rps,
            f.secs,
            f.stream_share * 100.0,
            f.killed_node,
            f.kill_at_secs
        );
        println!(
            "    errors     {} of {} ({:.3} %; SPEC: ≤ 0.1 %): {}",
            f.error_total,
            f.requests,
            f.error_pct,
            f.errors.line()
        );
        println!(
            "    when       {} due before the kill, {} due more than 1 s after it (SPEC: none); by second: {:?}",
            f.errors_before_kill, f.errors_after_first_second, f.errors_by_second
        );
        println!("    latency    {}", f.latency.line());
        println!("    after kill {}", f.latency_after_kill.line());
        if let Some(routing) = &f.killed_node_routing {
            println!("    killed node's routing: {routing}");
        }
    }
    println!(
        "  stand-ins    answered {} completions and {} streams in all; heartbeats: {} errors",
        report.standin_completions, report.standin_streams, report.heartbeat_errors
    );
    if let (Some(rss), Some(peak)) = (report.router_rss_mb, report.router_peak_rss_mb) {
        println!("  router RSS   {rss:.1} MB (peak {peak:.1} MB)");
    }
    println!("  setup        {:.2} s", report.setup_secs);
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Mode};
    use crate::standin::wants_stream;

    fn args(line: &str) -> ProxyArgs {
        let cli = Cli::try_parse_from(["bench", "proxy"].into_iter().chain(line.split_whitespace())).expect("args");
        let Mode::Proxy(args) = cli.mode else { panic!("proxy expected") };
        args
    }

    #[test]
    fn requests_are_a_kibibyte_of_json_naming_the_model() {
        for stream in [false, true] {
            let body = request_body(stream);
            assert!((REQUEST_BYTES - 16..=REQUEST_BYTES + 16).contains(&body.len()), "{}", body.len());
            let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(json["model"], MODEL);
            assert_eq!(wants_stream(&body), stream);
        }
    }

    #[test]
    fn direct_and_routed_alternate_by_slice_after_a_warm_up_pair() {
        let plan = Alternation::new(100.0, 2.0, 0.5, 3, false);
        assert_eq!((plan.pairs, plan.count(), plan.measured_secs_per_side()), (4, 500, 2.0));
        let jobs: Vec<Job> = (0..plan.count()).map(|i| plan.job(i)).collect();
        assert_eq!(jobs[0], Job { to: To::Direct(0), stream: false, measured: false });
        assert_eq!(jobs[50], Job { to: To::Routed, stream: false, measured: false });
        assert_eq!(jobs[100], Job { to: To::Direct(1), stream: false, measured: true });
        assert_eq!(jobs[101].to, To::Direct(2));
        assert_eq!(jobs[150], Job { to: To::Routed, stream: false, measured: true });
        let measured = |routed: bool| jobs.iter().filter(|j| j.measured && (j.to == To::Routed) == routed).count();
        assert_eq!((measured(false), measured(true)), (200, 200));
    }

    #[test]
    fn the_stream_share_is_spread_evenly() {
        let streams: Vec<u64> = (0..1000).filter(|&i| is_stream(i, 0.1)).collect();
        assert_eq!(streams.len(), 100);
        assert!(streams.windows(2).all(|w| w[1] - w[0] == 10));
        assert!((0..100).all(|i| !is_stream(i, 0.0)));
        assert!((0..100).all(|i| is_stream(i, 1.0)));
    }

    /// Every scenario, briefly, against a router running in this process: every direct and routed request is
    /// answered in full, and once a second has passed since the kill no request fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_of_every_scenario_against_the_router() {
        use llm_router::app::App;
        use llm_router::clock::SystemClock;
        use llm_router::config::{InferenceAuth, Settings};

        let dir = tempfile::tempdir().expect("temporary directory");
        let password = "proxy-bench-password".to_owned();
        let settings = Settings {
            admin_password: Some(password.clone()),
            reachability_check: false,
            inference_auth: InferenceAuth::None,
            registration_rate: 0,
            max_pending: 0,
            ..Settings::new(dir.path().to_owned())
        };
        let app = App::build(settings, Arc::new(SystemClock)).await.expect("router builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));

        let args = args(
            "--nodes 4 --rate 500 --secs 0.1 --slice-secs 0.1 --stream-rate 40 --stream-secs 0.1 --chunks 5 \
             --failover-rate 400 --failover-secs 1.6 --kill-at-secs 0.3 --stream-share 0.2 --connections 16",
        );
        let standins = StandIns::start(args.nodes, behaviour(&args)).expect("stand-ins");
        let at = RouterAt { addr, admin_password: password, pid: None };
        let report = measure(&at, &standins, &args).await.expect("the run completes");

        let completions = report.completions.expect("completions ran");
        for side in [&completions.direct, &completions.routed] {
            assert_eq!(side.requests, 50);
            assert_eq!((side.ok, side.errors.total()), (50, 0), "{:?}", side.errors);
        }
        let streams = report.streams.expect("streams ran");
        for side in [&streams.direct, &streams.routed] {
            assert_eq!(side.streams, 4);
            assert_eq!((side.ok, side.errors.total()), (4, 0), "{:?}", side.errors);
            assert_eq!(side.chunks, 20);
            assert_eq!(side.chunk_delay.samples, 20);
        }
        let failover = report.failover.expect("failover ran");
        assert_eq!(failover.requests, 640);
        assert_eq!(failover.ok + failover.error_total, failover.requests);
        assert_eq!(failover.errors_after_first_second, 0, "{:?}", failover.errors_by_second);
        let routing = failover.killed_node_routing.expect("the killed node's routing");
        assert!(routing["failures_total"].as_u64().is_some_and(|n| n >= 1), "{routing}");
        assert_eq!(report.heartbeat_errors, 0);

        let _ = stop.send(());
        server.await.expect("server task").expect("router stops cleanly");
    }
}
