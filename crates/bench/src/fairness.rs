//! `bench fairness`: the queue's fair share across tenants (SPEC §14, "Figures") against first-come order, on one
//! stand-in node at its `max_concurrency`.
//!
//! One stand-in runtime of its own (below: every chat completion takes `--service-ms`, however many come at once)
//! is started once. For each order of `--orders` a router is started with `--queue-order`; the stand-in is
//! registered, approved and heartbeating as a node with `max_concurrency` `--max-concurrency` (default 2), and two
//! API keys, two tenants, are made:
//!
//! - the *flood* key keeps `--backlog` requests (default 50) waiting at all times: `--backlog` + `--max-concurrency`
//!   senders in a closed loop, each sending its next request as soon as its answer is in;
//! - once the router's queue holds `--backlog` requests, the *single* key sends `--requests` requests one after the
//!   other, each as soon as the one before is answered.
//!
//! A single-key request's *wait* is its time to answer less the service time, counted in service times. SPEC §14:
//! p99 ≤ 2 service times in fair order; first-come order gives about `--backlog` / `--max-concurrency` (25).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router::config::QueueOrder;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::affinity::Check;
use crate::cli::FairnessArgs;
use crate::fleet;
use crate::http::{Client, encode_request};
use crate::proxy::{self, MODEL};
use crate::router::RouterSpec;
use crate::standin::{Servers, completion_body, read_request, response};
use crate::stats::{ErrorCounts, LatencySummary};

/// Longest wait for the node to take traffic, and for the flood to fill the queue.
const SETUP_DEADLINE: Duration = Duration::from_secs(10);

/// What `bench fairness` reports.
#[derive(Debug, Serialize)]
pub struct FairnessReport {
    pub service_ms: f64,
    pub max_concurrency: u32,
    pub backlog: usize,
    pub requests: usize,
    pub runs: Vec<OrderRun>,
    /// SPEC §14's figure, from the fair run.
    pub checks: Vec<Check>,
}

/// One order of the queue.
#[derive(Debug, Clone, Serialize)]
pub struct OrderRun {
    pub order: &'static str,
    /// Of the single key's requests, answered 200.
    pub ok: u64,
    pub errors: ErrorCounts,
    /// The single key's waits: time to answer less the service time.
    pub wait: LatencySummary,
    pub wait_p50_services: f64,
    pub wait_p99_services: f64,
    pub wait_max_services: f64,
    /// The flood key's requests answered 200 while the single key sent (and until its senders stopped).
    pub flood_ok: u64,
    pub flood_errors: ErrorCounts,
    /// The router's queue as read before each of the single key's requests: least and mean.
    pub queued_min: u64,
    pub queued_mean: f64,
    /// The most chat completions the stand-in answered at once.
    pub node_peak: u64,
}

/// Runs the whole mode.
pub async fn run(spec: &RouterSpec, args: &FairnessArgs) -> anyhow::Result<FairnessReport> {
    let standin = SlowStandIn::start(service(args))?;
    let mut runs = Vec::new();
    for &order in &args.orders {
        let mut spec = spec.clone();
        spec.data_dir = spec.data_dir.join(order.as_str());
        spec.extra_args.extend(["--queue-order", order.as_str()].map(str::to_owned));
        let router = spec.start().await?;
        let measured = async {
            router.wait_ready().await?;
            measure(router.addr, &spec.admin_password, &standin, args, order).await
        }
        .await;
        let stopped = router.stop().await;
        runs.push(measured?);
        stopped?;
    }
    let checks = checks(&runs);
    Ok(FairnessReport {
        service_ms: args.service_ms,
        max_concurrency: args.max_concurrency,
        backlog: args.backlog,
        requests: args.requests,
        runs,
        checks,
    })
}

fn service(args: &FairnessArgs) -> Duration {
    Duration::from_secs_f64(args.service_ms / 1000.0)
}

/// Registers the stand-in with the router at `addr` (whose administrator's password is `password`), makes the two
/// keys, and runs the flood and the single key's requests.
pub async fn measure(
    addr: SocketAddr,
    password: &str,
    standin: &SlowStandIn,
    args: &FairnessArgs,
    order: QueueOrder,
) -> anyhow::Result<OrderRun> {
    let host = addr.to_string();
    let nodes = proxy::register(addr, &host, standin.addrs()).await?;
    let session = fleet::login(addr, &host, password).await?;
    fleet::approve_nodes(addr, &host, &session, &nodes, 4).await?;
    let mut admin = Admin { client: Client::new(addr), host: host.clone(), bearer: format!("Bearer {session}") };
    for node in &nodes {
        let limit = serde_json::json!({ "max_concurrency": args.max_concurrency });
        admin.send("PATCH", &format!("/v0/nodes/{}", node.id), &limit).await?;
    }
    let heartbeat_errors = Arc::new(AtomicU64::new(0));
    let heartbeats = proxy::keep_heartbeating(addr, &host, &nodes, heartbeat_errors.clone())?;
    let result = async {
        let flood_key = admin.make_key("flood").await?;
        let single_key = admin.make_key("single").await?;
        let single = chat_request(&host, &single_key);
        wait_for_answer(addr, &single).await?;
        standin.reset();
        eprintln!(
            "{}: the flood key keeps {} requests waiting, the single key sends {} one at a time...",
            order.as_str(),
            args.backlog,
            args.requests
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flood =
            start_flood(addr, chat_request(&host, &flood_key), args.backlog + args.max_concurrency as usize, &stop);
        let measured = async {
            let mut metrics = Client::new(addr);
            let deadline = Instant::now() + SETUP_DEADLINE;
            while queued(&mut metrics, &host).await? < args.backlog as u64 {
                if Instant::now() > deadline {
                    bail!("the flood did not fill the queue with {} requests within {SETUP_DEADLINE:?}", args.backlog);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            single_key_requests(addr, &host, &single, &mut metrics, args).await
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        let (flood_ok, flood_errors) = join_flood(flood).await?;
        let (waits, ok, errors, queue) = measured?;
        let service_ms = args.service_ms;
        let wait = LatencySummary::from_nanos(waits);
        anyhow::Ok(OrderRun {
            order: order.as_str(),
            ok,
            errors,
            wait_p50_services: wait.p50_ms / service_ms,
            wait_p99_services: wait.p99_ms / service_ms,
            wait_max_services: wait.max_ms / service_ms,
            wait,
            flood_ok,
            flood_errors,
            queued_min: queue.iter().copied().min().unwrap_or(0),
            queued_mean: queue.iter().sum::<u64>() as f64 / queue.len().max(1) as f64,
            node_peak: standin.peak.load(Ordering::Relaxed),
        })
    }
    .await;
    heartbeats.abort();
    let run = result?;
    let errors = heartbeat_errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} heartbeats were not answered 200");
    }
    Ok(run)
}

/// The administrator's side of the setup, on one connection.
struct Admin {
    client: Client,
    host: String,
    bearer: String,
}

impl Admin {
    async fn send(&mut self, method: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let headers = [("Authorization", self.bearer.as_str()), ("Content-Type", "application/json")];
        let request = encode_request(method, path, &self.host, &headers, body.to_string().as_bytes());
        let answer = self.client.send(&request).await.with_context(|| format!("{method} {path}"))?;
        if !(200..300).contains(&answer.status) {
            bail!("{method} {path} answered HTTP {}: {}", answer.status, String::from_utf8_lossy(self.client.body()));
        }
        serde_json::from_slice(self.client.body()).with_context(|| format!("parsing the answer to {method} {path}"))
    }

    /// An API key of the `inference` scope: a tenant of its own.
    async fn make_key(&mut self, name: &str) -> anyhow::Result<String> {
        let made = self.send("POST", "/v0/api-keys", &serde_json::json!({"name": name, "scope": "inference"})).await?;
        made["key"].as_str().map(str::to_owned).context("the new key's answer has no `key`")
    }
}

/// A non-streaming chat completion of about 1 KiB, sent with `key`.
fn chat_request(host: &str, key: &str) -> Vec<u8> {
    let bearer = format!("Bearer {key}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    encode_request("POST", "/v1/chat/completions", host, &headers, &proxy::request_body(false, 0))
}

/// Sends `request` until it is answered 200: the node takes traffic.
async fn wait_for_answer(addr: SocketAddr, request: &[u8]) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_DEADLINE;
    let mut client = Client::new(addr);
    loop {
        let answer = client.send(request).await?;
        if answer.status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the router did not answer a chat request 200 within {SETUP_DEADLINE:?} (last: HTTP {})",
                answer.status
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `senders` clients sending `request` back to back until `stop`; each returns its answers and errors.
fn start_flood(
    addr: SocketAddr,
    request: Vec<u8>,
    senders: usize,
    stop: &Arc<AtomicBool>,
) -> JoinSet<(u64, ErrorCounts)> {
    let request = Arc::new(request);
    let mut flood = JoinSet::new();
    for _ in 0..senders {
        let (request, stop) = (request.clone(), stop.clone());
        flood.spawn(async move {
            let mut client = Client::new(addr);
            let (mut ok, mut errors) = (0u64, ErrorCounts::default());
            while !stop.load(Ordering::Relaxed) {
                match client.send(&request).await {
                    Ok(answer) if answer.status == 200 => ok += 1,
                    Ok(answer) => {
                        errors.add(format!("HTTP {}", answer.status));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(err) => {
                        errors.add(err.label());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (ok, errors)
        });
    }
    flood
}

async fn join_flood(mut flood: JoinSet<(u64, ErrorCounts)>) -> anyhow::Result<(u64, ErrorCounts)> {
    let (mut ok, mut errors) = (0, ErrorCounts::default());
    while let Some(done) = flood.join_next().await {
        let (answered, more) = done.context("a flood sender failed")?;
        ok += answered;
        errors.merge(more);
    }
    Ok((ok, errors))
}

/// The single key's requests, one after the other: each one's wait in nanoseconds, the answers and errors, and the
/// router's queue as read before each.
async fn single_key_requests(
    addr: SocketAddr,
    host: &str,
    request: &[u8],
    metrics: &mut Client,
    args: &FairnessArgs,
) -> anyhow::Result<(Vec<u64>, u64, ErrorCounts, Vec<u64>)> {
    let service_ns = service(args).as_nanos() as u64;
    let mut client = Client::new(addr);
    let (mut waits, mut ok, mut errors, mut queue) = (Vec::new(), 0, ErrorCounts::default(), Vec::new());
    for _ in 0..args.requests {
        queue.push(queued(metrics, host).await?);
        let sent = Instant::now();
        match client.send(request).await {
            Ok(answer) if answer.status == 200 => {
                ok += 1;
                waits.push((sent.elapsed().as_nanos() as u64).saturating_sub(service_ns));
            }
            Ok(answer) => errors.add(format!("HTTP {}", answer.status)),
            Err(err) => errors.add(err.label()),
        }
    }
    Ok((waits, ok, errors, queue))
}

/// The router's `llm_router_inference_queued`: requests waiting now.
async fn queued(client: &mut Client, host: &str) -> anyhow::Result<u64> {
    let answer = client.send(&encode_request("GET", "/metrics", host, &[], b"")).await?;
    if answer.status != 200 {
        bail!("GET /metrics answered HTTP {}", answer.status);
    }
    let text = String::from_utf8_lossy(client.body());
    let value = text.lines().find_map(|line| line.strip_prefix("llm_router_inference_queued "));
    let value = value.context("/metrics has no llm_router_inference_queued")?;
    Ok(value.trim().parse::<f64>().context("llm_router_inference_queued is not a number")? as u64)
}

/// SPEC §14's figure, from the fair run; the arrival run is what it is compared with.
fn checks(runs: &[OrderRun]) -> Vec<Check> {
    let Some(fair) = runs.iter().find(|run| run.order == QueueOrder::Fair.as_str()) else { return Vec::new() };
    let compared = match runs.iter().find(|run| run.order == QueueOrder::Arrival.as_str()) {
        Some(arrival) => format!(" (arrival order: {:.2})", arrival.wait_p99_services),
        None => String::new(),
    };
    vec![Check {
        what: "fair order: the single key's p99 wait, in service times".to_owned(),
        measured: format!("{:.2}{compared}", fair.wait_p99_services),
        bound: "<= 2".to_owned(),
        holds: fair.wait_p99_services <= 2.0 && fair.errors.total() == 0,
    }]
}

/// The report for people.
pub fn print(report: &FairnessReport) {
    println!(
        "fairness: one stand-in node at max_concurrency {}, {} ms a request; the flood key keeps {} waiting, the \
         single key sends {} one at a time",
        report.max_concurrency, report.service_ms, report.backlog, report.requests
    );
    for run in &report.runs {
        println!(
            "  {:<8} single key: {} ok, errors: {}; wait p50 {:.2}, p99 {:.2}, max {:.2} service times",
            run.order,
            run.ok,
            run.errors.line(),
            run.wait_p50_services,
            run.wait_p99_services,
            run.wait_max_services
        );
        println!("           wait {}", run.wait.line());
        println!(
            "           flood key: {} ok, errors: {}; queue before each request {} at least, {:.1} on average; the \
             node answered {} at most at once",
            run.flood_ok,
            run.flood_errors.line(),
            run.queued_min,
            run.queued_mean,
            run.node_peak
        );
    }
    for check in &report.checks {
        let verdict = if check.holds { "holds" } else { "FAILS" };
        println!("  {verdict:<5} {}: {} (bound {})", check.what, check.measured, check.bound);
    }
}

/// A stand-in runtime whose every chat completion takes a fixed service time, on a thread of its own (see
/// [`Servers`]); it counts the completions it answers at once.
pub struct SlowStandIn {
    servers: Servers,
    in_flight: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

impl SlowStandIn {
    pub fn start(service: Duration) -> anyhow::Result<SlowStandIn> {
        let answer = Arc::new(response(200, "application/json", &completion_body(MODEL)));
        let (in_flight, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counters = (in_flight.clone(), peak.clone());
        let servers = Servers::start(1, "fairness-stand-in", move |_, listener| {
            accept(listener, service, answer.clone(), counters.clone())
        })?;
        Ok(SlowStandIn { servers, in_flight, peak })
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        self.servers.addrs()
    }

    /// Forgets the peak so far.
    fn reset(&self) {
        self.peak.store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

type Counters = (Arc<AtomicU64>, Arc<AtomicU64>);

async fn accept(listener: TcpListener, service: Duration, answer: Arc<Vec<u8>>, counters: Counters) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        if stream.set_nodelay(true).is_err() {
            continue;
        }
        let (answer, counters) = (answer.clone(), counters.clone());
        tokio::spawn(async move { serve(stream, service, &answer, &counters).await });
    }
}

/// Serves one keep-alive connection: a chat completion after the service time, anything else 404.
async fn serve(mut stream: TcpStream, service: Duration, answer: &[u8], (in_flight, peak): &Counters) {
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    while let Some(head) = read_request(&mut stream, &mut buf, &mut filled).await {
        let total = head.head_len + head.body_len;
        buf.copy_within(total..filled, 0);
        filled -= total;
        let written = if head.post_completions {
            let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now, Ordering::Relaxed);
            tokio::time::sleep(service).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            stream.write_all(answer).await
        } else {
            stream.write_all(&response(404, "application/json", b"{\"error\":\"not found\"}")).await
        };
        if written.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Mode};
    use crate::router::InProcess;

    fn args(line: &str) -> FairnessArgs {
        let cli = Cli::try_parse_from(["bench", "fairness"].into_iter().chain(line.split_whitespace())).expect("args");
        let Mode::Fairness(args) = cli.mode else { panic!("fairness expected") };
        args
    }

    /// A short run under both orders against a router in this process: every request is answered, the node never
    /// answers more than its limit at once, and the single key waits for a turn or so in fair order where arrival
    /// order makes it wait behind the whole flood.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fair_order_serves_the_single_key_within_a_turn_where_arrival_order_makes_it_wait_behind_the_flood() {
        use llm_router::config::InferenceAuth;

        let args = args("--service-ms 20 --backlog 20 --requests 12");
        assert_eq!(args.orders, [QueueOrder::Fair, QueueOrder::Arrival]);
        let standin = SlowStandIn::start(service(&args)).expect("the stand-in");
        let mut runs = Vec::new();
        for &order in &args.orders {
            let router = InProcess::start_with(|settings| {
                settings.inference_auth = InferenceAuth::Key;
                settings.queue_order = order;
            })
            .await;
            let run = measure(router.addr, &router.admin_password, &standin, &args, order).await;
            router.stop().await;
            runs.push(run.expect("the run completes"));
        }
        let [fair, arrival] = [&runs[0], &runs[1]];
        eprintln!("fair {fair:?}\narrival {arrival:?}");
        for run in [fair, arrival] {
            assert_eq!((run.ok, run.errors.total(), run.flood_errors.total()), (12, 0, 0), "{run:?}");
            assert!(run.flood_ok > 0 && run.node_peak <= 2, "{run:?}");
            assert!(run.queued_min >= 15, "the flood kept the queue full: {run:?}");
        }
        // About 10 service times behind the flood in arrival order (20 waiting, 2 at a time); a turn or less in fair
        // order. Bounds with room for a busy machine: the comparison, not the exact figure, is what this checks.
        assert!(arrival.wait_p50_services >= 5.0, "{arrival:?}");
        assert!(fair.wait_p99_services < arrival.wait_p50_services / 2.0, "{fair:?} against {arrival:?}");
        assert!(fair.wait_p50_services <= 2.0, "{fair:?}");
        assert_eq!(checks(&runs).len(), 1);
    }

    #[test]
    fn reads_the_queue_length_and_checks_the_fair_run() {
        let run = |order: QueueOrder, p99: f64| OrderRun {
            order: order.as_str(),
            ok: 10,
            errors: ErrorCounts::default(),
            wait: LatencySummary::from_nanos(vec![1]),
            wait_p50_services: p99 / 2.0,
            wait_p99_services: p99,
            wait_max_services: p99,
            flood_ok: 100,
            flood_errors: ErrorCounts::default(),
            queued_min: 50,
            queued_mean: 50.0,
            node_peak: 2,
        };
        let checks = checks(&[run(QueueOrder::Fair, 1.2), run(QueueOrder::Arrival, 25.3)]);
        assert_eq!(checks.len(), 1);
        assert!(checks[0].holds);
        assert_eq!(checks[0].measured, "1.20 (arrival order: 25.30)");
        assert!(!self::checks(&[run(QueueOrder::Fair, 2.5)])[0].holds);
        assert!(self::checks(&[run(QueueOrder::Arrival, 2.5)]).is_empty());
    }
}
