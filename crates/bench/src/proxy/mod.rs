//! `bench proxy`: what the router's `/v1` proxy adds (SPEC §8), measured against the same stand-in runtimes called
//! directly in the same run.
//!
//! `--nodes` stand-ins (see [`crate::standin`]) are registered as nodes at 127.0.0.1 and approved; they keep
//! heartbeating all along, so they stay online. The router runs with `--inference-auth none`; with `--limits`, with
//! `--inference-auth key`, and every routed request carries an API key whose limits no run reaches, so that each
//! one passes the limiter (SPEC §14). Then, in order:
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
//!
//! This module holds the mode's entry and its setup (stand-ins registered, approved and heartbeating); the open-loop
//! runs are in `run`, the scenarios in `scenarios`, and the report and its printing in `report`.

mod report;
mod run;
mod scenarios;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router_protocol::{REGISTER_PATH, RegisterRequest};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cli::{ProxyArgs, Scenario};
use crate::fleet::{self, NodeCredentials};
use crate::http::{Client, encode_request};
use crate::procfs;
use crate::router::RouterSpec;
use crate::standin::{Behaviour, StandIns};
use crate::stats::ErrorCounts;

pub use report::{CompletionsReport, FailoverReport, ProxyReport, Side, StreamSide, StreamsReport, print};
use run::Targets;
// The stream client's tests check what it reads against this.
#[cfg(test)]
pub use scenarios::coalesced;
use scenarios::{completions, failover, streams};

/// The model every stand-in serves and every request names.
pub const MODEL: &str = fleet::MODELS[0];

/// Size of a non-streaming request's body.
const REQUEST_BYTES: usize = 1024;

/// Longest a request may take before it is abandoned and counted as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often every node heartbeats during the run.
pub(crate) const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// Where the router is and how to act as its administrator.
#[derive(Debug, Clone)]
pub struct RouterAt {
    pub addr: SocketAddr,
    pub admin_password: String,
    /// The router's process, for its CPU and memory; `None` when it runs inside this process.
    pub pid: Option<u32>,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &ProxyArgs) -> anyhow::Result<ProxyReport> {
    let mut spec = spec.clone();
    let auth = if args.limits { "key" } else { "none" };
    spec.extra_args.extend(["--inference-auth", auth].map(str::to_owned));
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
    let key = match args.limits {
        true => Some(fleet::create_api_key(at.addr, &host, &session, "bench-proxy", generous_limits()).await?),
        false => None,
    };
    let targets = Targets::new(at.addr, standins.addrs(), args.prompts, key.as_deref());
    let result = async {
        targets.check().await?;
        if key.is_some() {
            check_rate_limit_headers(at.addr, &targets.routed[0][0]).await?;
        }
        let setup_secs = started.elapsed().as_secs_f64();
        let mut report = ProxyReport {
            nodes: nodes.len(),
            limits: key.is_some(),
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
                    let ids: Vec<Uuid> = nodes.iter().map(|node| node.id).collect();
                    let failover = failover(&targets, standins, args, &ids).await?;
                    let routing = node_routing(at.addr, &host, &session, failover.killed_node).await.ok();
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

/// Limits that no run of the bench reaches, so that every request passes the limiter and none is refused.
fn generous_limits() -> serde_json::Value {
    serde_json::json!({"requests_per_minute": 100_000_000u64, "tokens_per_minute": 1_000_000_000_000u64})
}

/// A routed request answered 200 carries the key's `x-ratelimit-*` headers: the limiter saw it.
async fn check_rate_limit_headers(addr: SocketAddr, request: &[u8]) -> anyhow::Result<()> {
    let mut client = Client::new(addr).keeping_heads();
    let answer = client.send(request).await?;
    for name in ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens"] {
        if answer.status != 200 || client.header(name).is_none() {
            bail!("a routed request with the limited key answered HTTP {} without {name}", answer.status);
        }
    }
    Ok(())
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

/// A chat completion request of about [`REQUEST_BYTES`], streamed or not; its system prompt is the `prompt`th of
/// `--prompts`, so that under cache-aware routing the bench's requests spread over the nodes as many conversations
/// do, where one body sent over and over would all go to one node.
pub fn request_body(stream: bool, prompt: usize) -> Vec<u8> {
    let body = |content: &str| {
        let mut request = serde_json::json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": format!("You are assistant {prompt:04}, a helpful one.")},
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
            let body = request_body(stream, 7);
            assert!((REQUEST_BYTES - 16..=REQUEST_BYTES + 16).contains(&body.len()), "{}", body.len());
            let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(json["model"], MODEL);
            assert_eq!(wants_stream(&body), stream);
        }
    }

    /// Every scenario, briefly, against a router running in this process: every direct and routed request is
    /// answered in full, and once a second has passed since the kill no request fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_of_every_scenario_against_the_router() {
        let router = crate::router::InProcess::start(llm_router::config::RoutingPolicy::CacheAware).await;

        let args = args(
            "--nodes 4 --rate 500 --secs 0.1 --slice-secs 0.1 --stream-rate 40 --stream-secs 0.1 --chunks 5 \
             --failover-rate 400 --failover-secs 1.6 --kill-at-secs 0.3 --stream-share 0.2 --connections 16",
        );
        let standins = StandIns::start(args.nodes, behaviour(&args)).expect("stand-ins");
        let at = RouterAt { addr: router.addr, admin_password: router.admin_password.clone(), pid: None };
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

        router.stop().await;
    }

    /// With `--limits`, every routed request carries a key with limits and passes them; the router counts every
    /// routed request's tokens to it, streams included (the stand-ins answer `include_usage` as OpenAI does, and the
    /// router removes what it asked for, so the client reads the same events as directly).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routed_requests_carry_a_limited_key_and_every_one_is_counted_with_its_tokens() {
        use llm_router::config::InferenceAuth;

        let router =
            crate::router::InProcess::start_with(|settings| settings.inference_auth = InferenceAuth::Key).await;
        let args = args(
            "--limits --nodes 3 --scenarios completions,streams --rate 400 --secs 0.1 --slice-secs 0.1 \
             --stream-rate 40 --stream-secs 0.1 --chunks 5 --connections 8",
        );
        assert!(args.limits);
        let standins = StandIns::start(args.nodes, behaviour(&args)).expect("stand-ins");
        let at = RouterAt { addr: router.addr, admin_password: router.admin_password.clone(), pid: None };
        let report = measure(&at, &standins, &args).await.expect("the run completes");
        assert!(report.limits);
        let completions = report.completions.expect("completions ran");
        assert_eq!((completions.routed.ok, completions.routed.errors.total()), (40, 0), "{:?}", completions.routed);
        let streams = report.streams.expect("streams ran");
        for side in [&streams.direct, &streams.routed] {
            assert_eq!((side.ok, side.errors.total(), side.chunks), (4, 0, 20), "the same events either way");
        }

        // Routed: 40 + 40 warm-up completions, 4 + 4 streams, and the checks' two and one; all of them the key's.
        let host = router.addr.to_string();
        let session = fleet::login(router.addr, &host, &router.admin_password).await.expect("login");
        let bearer = format!("Bearer {session}");
        let usage =
            encode_request("GET", "/v0/usage?step=day&group_by=principal", &host, &[("Authorization", &bearer)], b"");
        let mut client = Client::new(router.addr);
        let deadline = Instant::now() + Duration::from_secs(5);
        let totals = loop {
            assert_eq!(client.send(&usage).await.expect("usage").status, 200);
            let view: serde_json::Value = serde_json::from_slice(client.body()).expect("JSON");
            if view["totals"]["requests"] == 91 || Instant::now() > deadline {
                break view;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(totals["totals"]["requests"], 91, "{totals}");
        assert_eq!(totals["totals"]["unknown_usage"], 0, "streams report usage too: {totals}");
        assert_eq!(totals["totals"]["prompt_tokens"], 91 * crate::standin::PROMPT_TOKENS, "{totals}");
        assert_eq!(totals["groups"][0]["name"], "bench-proxy");
        router.stop().await;
    }
}
