//! `bench storm`: every node of a fleet changes status at the same moment (SPEC §10, transition storms), while the
//! fleet heartbeats as in `bench heartbeat`.
//!
//! The router runs with `--offline-after-secs` 15 (longer than the setup of 10,000 nodes takes). The nodes register
//! with their models loaded but none ready, and are approved: every node is `registering`. Then three storms follow:
//! 1. `registering → online`: right after the last approval, as a fleet that an operator has just approved comes
//!    up, heartbeats with ready models start back-to-back; each node's first one flips it. The router has just
//!    committed 20,000 registrations and approvals, and its first write-behind of figures holds every node's
//!    figures and new model lists;
//! 2. `online → offline`: the heartbeats stop; the sweep marks every node offline once silent for 15 s;
//! 3. `offline → online`: the heartbeats start again.
//!
//! For storms 1 and 3 it reports the heartbeats' throughput, latency and errors over the first `--secs`, and for
//! every storm the time until the last node's new status is durable: the router changes a node's status in memory
//! only after the change is committed, so the counts of `llm_router_nodes` in `/metrics`, polled every 20 ms, read
//! the durable state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::StormArgs;
use crate::fleet;
use crate::heartbeat::{Window, connect_all, worker};
use crate::http::{Client, encode_request};
use crate::router::{Router, RouterSpec};
use crate::stats::{ErrorCounts, LatencySummary};

/// The router's `offline_after` in this mode, in seconds.
const OFFLINE_AFTER_SECS: u64 = 15;

/// What `bench storm` reports.
#[derive(Debug, Serialize)]
pub struct StormReport {
    pub nodes: usize,
    pub connections: usize,
    pub measured_secs: f64,
    pub to_online: Storm,
    /// Seconds from the last heartbeat until every node is durably offline (the silence itself is 15 s of it).
    pub to_offline_secs: f64,
    pub back_online: Storm,
}

/// One storm driven by heartbeats.
#[derive(Debug, Serialize)]
pub struct Storm {
    /// Seconds from the first heartbeat until every node's new status is durable.
    pub durable_secs: f64,
    pub ok: u64,
    pub throughput_rps: f64,
    pub latency: LatencySummary,
    /// The same, second by second: the storm itself is the first second or two, diluted in the whole window.
    pub by_second: Vec<LatencySummary>,
    pub error_total: u64,
    pub errors: ErrorCounts,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &StormArgs) -> anyhow::Result<StormReport> {
    let mut spec = spec.clone();
    spec.extra_args.extend(["--offline-after-secs".to_owned(), OFFLINE_AFTER_SECS.to_string()]);
    let router = spec.start().await?;
    let report = drive(&spec, &router, args).await;
    let stopped = router.stop().await;
    let report = report?;
    stopped?;
    Ok(report)
}

async fn drive(spec: &RouterSpec, router: &Router, args: &StormArgs) -> anyhow::Result<StormReport> {
    router.wait_ready().await?;
    let host = router.host();
    eprintln!("registering {} nodes...", args.nodes);
    let nodes = fleet::register_nodes(router.addr, &host, args.nodes, args.setup_concurrency, false).await?;
    let ready = Arc::new(
        nodes
            .iter()
            .enumerate()
            .map(|(i, node)| Ok(fleet::heartbeat_request(&host, node, &fleet::heartbeat_body(i, node.id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let mut metrics = Metrics::connect(router.addr, &host).await?;
    let connections = args.connections.min(nodes.len());
    let session = fleet::login(router.addr, &host, &spec.admin_password).await?;
    eprintln!("approving {} nodes...", nodes.len());
    fleet::approve_nodes(router.addr, &host, &session, &nodes, args.setup_concurrency).await?;
    metrics.wait_for("registering", nodes.len(), Duration::from_secs(120)).await?;
    eprintln!("storm 1: registering -> online, right after the approvals...");
    let to_online = storm(router.addr, &ready, connections, args.secs, &mut metrics).await?;
    eprintln!("storm 2: silence, online -> offline...");
    let silent_from = Instant::now();
    metrics.wait_for("offline", nodes.len(), Duration::from_secs(120)).await?;
    let to_offline_secs = silent_from.elapsed().as_secs_f64();
    eprintln!("storm 3: offline -> online...");
    let back_online = storm(router.addr, &ready, connections, args.secs, &mut metrics).await?;
    Ok(StormReport {
        nodes: nodes.len(),
        connections,
        measured_secs: args.secs,
        to_online,
        to_offline_secs,
        back_online,
    })
}

/// Heartbeats with ready models for `secs` over `connections`, from now; meanwhile, when every node is online.
async fn storm(
    addr: SocketAddr,
    requests: &Arc<Vec<Vec<u8>>>,
    connections: usize,
    secs: f64,
    metrics: &mut Metrics,
) -> anyhow::Result<Storm> {
    let clients = connect_all(addr, connections).await?;
    let start = Instant::now();
    let window = Window { start, measure_from: start, until: start + Duration::from_secs_f64(secs) };
    let mut workers = JoinSet::new();
    for (k, client) in clients.into_iter().enumerate() {
        let share: Vec<usize> = (k..requests.len()).step_by(connections).collect();
        workers.spawn(worker(client, requests.clone(), share, window, None));
    }
    metrics.wait_for("online", requests.len(), Duration::from_secs(120)).await?;
    let durable_secs = start.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut by_second: Vec<Vec<u64>> = vec![Vec::new(); secs.ceil() as usize];
    let mut ok = 0;
    let mut errors = ErrorCounts::default();
    while let Some(done) = workers.join_next().await {
        let done = done.context("a heartbeat worker failed")?;
        for (latency, sent_ms) in done.latencies.iter().zip(&done.sent_ms) {
            if let Some(second) = by_second.get_mut(*sent_ms as usize / 1000) {
                second.push(*latency);
            }
        }
        latencies.extend(done.latencies);
        ok += done.ok;
        errors.merge(done.errors);
    }
    Ok(Storm {
        durable_secs,
        ok,
        throughput_rps: ok as f64 / secs,
        latency: LatencySummary::from_nanos(latencies),
        by_second: by_second.into_iter().map(LatencySummary::from_nanos).collect(),
        error_total: errors.total(),
        errors,
    })
}

/// Reads the node counts by status from `/metrics`.
struct Metrics {
    client: Client,
    request: Vec<u8>,
}

impl Metrics {
    async fn connect(addr: SocketAddr, host: &str) -> anyhow::Result<Metrics> {
        let client = Client::connect(addr).await.context("connecting for /metrics")?;
        Ok(Metrics { client, request: encode_request("GET", "/metrics", host, &[], b"") })
    }

    /// Nodes of `status` now.
    async fn count(&mut self, status: &str) -> anyhow::Result<usize> {
        let answer =
            self.client.send(&self.request).await.map_err(|err| anyhow::anyhow!("/metrics: {}", err.label()))?;
        anyhow::ensure!(answer.status == 200, "/metrics answered {}", answer.status);
        let text = std::str::from_utf8(self.client.body()).context("/metrics is not UTF-8")?;
        let prefix = format!("llm_router_nodes{{status=\"{status}\"}} ");
        let line = text.lines().find_map(|line| line.strip_prefix(&prefix)).context("no node count in /metrics")?;
        Ok(line.trim().parse()?)
    }

    /// Polls every 20 ms until `n` nodes are of `status`.
    async fn wait_for(&mut self, status: &str, n: usize, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            if self.count(status).await? >= n {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < until, "fewer than {n} nodes {status} after {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The report for people.
pub fn print(report: &StormReport) {
    println!(
        "storm: {} nodes over {} connections, {:.1} s of back-to-back heartbeats per storm",
        report.nodes, report.connections, report.measured_secs
    );
    for (name, storm) in [("registering -> online", &report.to_online), ("offline -> online", &report.back_online)] {
        println!("  {name}: every node durable after {:.2} s", storm.durable_secs);
        println!(
            "    throughput   {:.0} heartbeats/s ({} ok, {} errors)",
            storm.throughput_rps, storm.ok, storm.error_total
        );
        println!("    latency      {}", storm.latency.line());
        for (second, latency) in storm.by_second.iter().enumerate().take(3) {
            println!(
                "      second {}   p99 {:.3} ms   max {:.3} ms   ({} heartbeats)",
                second + 1,
                latency.p99_ms,
                latency.max_ms,
                latency.samples
            );
        }
        println!("    errors       {}", storm.errors.line());
    }
    println!(
        "  online -> offline: every node durable {:.2} s after the last heartbeat ({} s of it silence)",
        report.to_offline_secs, OFFLINE_AFTER_SECS
    );
}
