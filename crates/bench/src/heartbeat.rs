//! `bench heartbeat`: a fleet of approved nodes heartbeating as fast as the router answers (SPEC §7: 10,000 nodes,
//! at least 40,000 heartbeats/s, p99 under 10 ms).
//!
//! Requests are serialized once, before the clock starts. Each connection sends its next request as soon as the
//! previous answer is in (closed loop), or on a fixed schedule with `--rate-per-node-hz`. The first second is a
//! warm-up whose requests are not counted.
//!
//! With `--routers N --postgres URL`, N routers share one fresh PostgreSQL database (SPEC §11: two routers, at
//! least 20,000 heartbeats/s in total at 10,000 nodes, p99 under 20 ms): the fleet registers and is approved on the
//! first, and connection k heartbeats to router k mod N, so every router serves nodes registered on another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::cli::HeartbeatArgs;
use crate::fleet;
use crate::http::Client;
use crate::postgres;
use crate::procfs;
use crate::router::{Router, RouterSpec};
use crate::stats::{ErrorCounts, LatencySummary};

/// How long past the end of the window a request may still take before it is abandoned and counted as a timeout.
const GRACE: Duration = Duration::from_secs(5);

/// Connections opened at the same time while setting up.
const CONNECT_CONCURRENCY: usize = 256;

/// What `bench heartbeat` reports.
#[derive(Debug, Serialize)]
pub struct HeartbeatReport {
    pub mode: &'static str,
    /// Routers heartbeated to, sharing one database when more than one.
    pub routers: usize,
    /// `sqlite` or `postgres`.
    pub database: &'static str,
    pub nodes: usize,
    pub connections: usize,
    /// Heartbeats per second each node aims at; absent: back-to-back.
    pub rate_per_node_hz: Option<f64>,
    pub warmup_secs: f64,
    pub measured_secs: f64,
    /// Requests started in the measured window, failed ones included.
    pub requests: u64,
    pub ok: u64,
    /// Successful heartbeats per second.
    pub throughput_rps: f64,
    pub latency: LatencySummary,
    pub error_total: u64,
    pub errors: ErrorCounts,
    /// Of the first router.
    pub router_rss_mb: f64,
    pub router_peak_rss_mb: f64,
    /// CPU the routers (all together) and the bench used during the measured window, in cores (1.0 = one core busy).
    pub router_cpu_cores: f64,
    pub bench_cpu_cores: f64,
    pub register_secs: f64,
    pub approve_secs: f64,
}

/// Runs the whole mode against the routers started from `spec` (one, or `--routers` on one PostgreSQL database).
pub async fn run(spec: &RouterSpec, args: &HeartbeatArgs) -> anyhow::Result<HeartbeatReport> {
    if args.routers > 1 && args.postgres.is_none() {
        anyhow::bail!("--routers {} needs --postgres: routers share a PostgreSQL database, not SQLite", args.routers);
    }
    let database = match &args.postgres {
        Some(server) => Some(postgres::Database::create(server).await?),
        None => None,
    };
    let started = start_routers(spec, args.routers, database.as_ref().map(|db| db.url.as_str())).await;
    let report = match &started {
        Ok(routers) => drive(spec, routers, args).await,
        Err(_) => Err(anyhow::anyhow!("the routers did not start")),
    };
    finish_routers(started, database, report).await
}

/// Stops the routers [`start_routers`] started and removes their database, then gives what their run gave: its error
/// first, a router that did not stop cleanly next.
pub(crate) async fn finish_routers<T>(
    started: anyhow::Result<Vec<Router>>,
    database: Option<postgres::Database>,
    report: anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut stopped = Ok(());
    for router in started? {
        stopped = stopped.and(router.stop().await);
    }
    if let Some(database) = database {
        database.remove().await?;
    }
    let report = report?;
    stopped?;
    Ok(report)
}

/// Starts `count` routers from `spec`, each with a data directory of its own, on `database_url` when given; the
/// first applies the migrations before the others start.
pub(crate) async fn start_routers(
    spec: &RouterSpec,
    count: usize,
    database_url: Option<&str>,
) -> anyhow::Result<Vec<Router>> {
    let mut routers = Vec::with_capacity(count);
    for k in 0..count {
        let mut spec = spec.clone();
        if count > 1 {
            spec.data_dir = spec.data_dir.join(format!("router-{k}"));
        }
        if let Some(url) = database_url {
            spec.extra_args.extend(["--database-url".to_owned(), url.to_owned()]);
        }
        let router = spec.start().await?;
        router.wait_ready().await?;
        routers.push(router);
    }
    Ok(routers)
}

async fn drive(spec: &RouterSpec, routers: &[Router], args: &HeartbeatArgs) -> anyhow::Result<HeartbeatReport> {
    let router = &routers[0];
    let host = router.host();
    let started = Instant::now();
    eprintln!("registering {} nodes ({} at a time)...", args.nodes, args.setup_concurrency);
    let nodes = fleet::register_nodes(router.addr, &host, args.nodes, args.setup_concurrency, true).await?;
    let register_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let session = fleet::login(router.addr, &host, &spec.admin_password).await?;
    eprintln!("approving {} nodes...", nodes.len());
    fleet::approve_nodes(router.addr, &host, &session, &nodes, args.setup_concurrency).await?;
    let approve_secs = started.elapsed().as_secs_f64();

    let requests = Arc::new(
        nodes
            .iter()
            .enumerate()
            .map(|(i, node)| Ok(fleet::heartbeat_request(&host, node, &fleet::heartbeat_body(i, node.id)?)))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let connections = if args.connection_per_node { nodes.len() } else { args.connections.min(nodes.len()) };
    eprintln!("opening {connections} connections to {} router(s)...", routers.len());
    // Connection k goes to router k mod N.
    let mut to_each = Vec::with_capacity(routers.len());
    for (r, router) in routers.iter().enumerate() {
        let count = (r..connections).step_by(routers.len()).count();
        to_each.push(connect_all(router.addr, count).await?.into_iter());
    }
    let clients: Vec<Client> = (0..connections).filter_map(|k| to_each[k % routers.len()].next()).collect();

    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.secs);
    let start = Instant::now();
    let window = Window { start, measure_from: start + warmup, until: start + warmup + measured };
    // Each connection's share of the nodes, round-robin: connection k sends for nodes k, k + C, k + 2C, ...
    let mut workers = JoinSet::new();
    for (k, client) in clients.into_iter().enumerate() {
        let share: Vec<usize> = (k..nodes.len()).step_by(connections).collect();
        let pace = args.rate_per_node_hz.map(|hz| {
            let period = Duration::from_secs_f64(1.0 / (hz * share.len() as f64));
            // Spread the first ticks over one period so connections do not fire in step.
            (period, period.mul_f64(k as f64 / connections as f64))
        });
        workers.spawn(worker(client, requests.clone(), share, window, pace));
    }
    eprintln!(
        "heartbeating: {:.1} s warm-up, then {:.1} s measured over {connections} connections...",
        args.warmup_secs, args.secs
    );

    let routers_cpu = || routers.iter().map(Router::cpu_seconds).sum::<anyhow::Result<f64>>();
    tokio::time::sleep_until(window.measure_from.into()).await;
    let cpu_from = (routers_cpu()?, procfs::cpu_seconds(None)?);
    tokio::time::sleep_until(window.until.into()).await;
    let cpu_to = (routers_cpu()?, procfs::cpu_seconds(None)?);

    let mut latencies = Vec::new();
    let mut ok = 0;
    let mut errors = ErrorCounts::default();
    while let Some(done) = workers.join_next().await {
        let done = done.context("a heartbeat worker failed")?;
        latencies.extend(done.latencies);
        ok += done.ok;
        errors.merge(done.errors);
    }
    let memory = router.memory()?;
    let secs = measured.as_secs_f64();
    Ok(HeartbeatReport {
        mode: if args.connection_per_node { "connection-per-node" } else { "shared-connections" },
        routers: routers.len(),
        database: if args.postgres.is_some() { "postgres" } else { "sqlite" },
        nodes: nodes.len(),
        connections,
        rate_per_node_hz: args.rate_per_node_hz,
        warmup_secs: args.warmup_secs,
        measured_secs: secs,
        requests: ok + errors.total(),
        ok,
        throughput_rps: ok as f64 / secs,
        latency: LatencySummary::from_nanos(latencies),
        error_total: errors.total(),
        errors,
        router_rss_mb: memory.rss_mb(),
        router_peak_rss_mb: memory.peak_mb(),
        router_cpu_cores: (cpu_to.0 - cpu_from.0) / secs,
        bench_cpu_cores: (cpu_to.1 - cpu_from.1) / secs,
        register_secs,
        approve_secs,
    })
}

/// Opens `count` keep-alive connections, a bounded number at a time so the listen backlog never overflows.
pub(crate) async fn connect_all(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Client>> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut pending = JoinSet::new();
    for k in 0..count {
        let gate = gate.clone();
        pending.spawn(async move {
            let _permit = gate.acquire_owned().await;
            (k, Client::connect(addr).await)
        });
    }
    let mut clients = Vec::with_capacity(count);
    while let Some(done) = pending.join_next().await {
        let (k, client) = done.context("a connect task failed")?;
        clients.push((k, client.with_context(|| format!("opening connection {} of {count}", k + 1))?));
    }
    clients.sort_unstable_by_key(|(k, _)| *k);
    Ok(clients.into_iter().map(|(_, client)| client).collect())
}

/// When requests count: started at or after `measure_from` and before `until`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) start: Instant,
    pub(crate) measure_from: Instant,
    pub(crate) until: Instant,
}

/// What one connection saw in the measured window.
pub(crate) struct WorkerResult {
    pub(crate) latencies: Vec<u64>,
    /// When each of `latencies` was sent, in milliseconds from the window's start.
    pub(crate) sent_ms: Vec<u32>,
    pub(crate) ok: u64,
    pub(crate) errors: ErrorCounts,
}

/// Sends the heartbeats of `share` in turn on one connection until the window ends. `pace`: (period, offset of the
/// first tick); `None`: back-to-back.
pub(crate) async fn worker(
    mut client: Client,
    requests: Arc<Vec<Vec<u8>>>,
    share: Vec<usize>,
    window: Window,
    pace: Option<(Duration, Duration)>,
) -> WorkerResult {
    let mut result = WorkerResult { latencies: Vec::new(), sent_ms: Vec::new(), ok: 0, errors: ErrorCounts::default() };
    let mut ticker = pace.map(|(period, offset)| {
        let mut ticker = tokio::time::interval_at((window.start + offset).into(), period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    // One timer for the whole run rather than one per request.
    let hard_stop = tokio::time::sleep_until((window.until + GRACE).into());
    tokio::pin!(hard_stop);
    let mut next = 0;
    loop {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let sent_at = Instant::now();
        if sent_at >= window.until {
            break;
        }
        let request = &requests[share[next]];
        next = (next + 1) % share.len();
        let outcome = tokio::select! {
            biased;
            outcome = client.send(request) => Some(outcome),
            () = &mut hard_stop => None,
        };
        let latency = sent_at.elapsed();
        let measured = sent_at >= window.measure_from;
        match outcome {
            Some(Ok(answer)) if answer.status == 200 => {
                if measured {
                    result.ok += 1;
                    result.latencies.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                    result.sent_ms.push(u32::try_from((sent_at - window.start).as_millis()).unwrap_or(u32::MAX));
                }
            }
            Some(Ok(answer)) => {
                if measured {
                    result.errors.add(format!("HTTP {}", answer.status));
                }
            }
            Some(Err(err)) => {
                if measured {
                    result.errors.add(err.label());
                }
                // The client reconnects on the next request; do not spin if the router is gone.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None => {
                result.errors.add("timeout");
                break;
            }
        }
    }
    result
}

/// The report for people.
pub fn print(report: &HeartbeatReport) {
    let pace = report.rate_per_node_hz.map_or_else(|| "back-to-back".to_owned(), |hz| format!("{hz} Hz per node"));
    println!(
        "heartbeat ({}): {} nodes over {} connections to {} router(s) on {}, {pace}, {:.1} s measured after {:.1} s \
         warm-up",
        report.mode,
        report.nodes,
        report.connections,
        report.routers,
        report.database,
        report.measured_secs,
        report.warmup_secs
    );
    println!("  requests     {} ({} ok, {} errors)", report.requests, report.ok, report.error_total);
    println!("  throughput   {:.0} heartbeats/s", report.throughput_rps);
    println!("  latency      {}", report.latency.line());
    println!("  errors       {}", report.errors.line());
    println!("  router RSS   {:.1} MB (peak {:.1} MB)", report.router_rss_mb, report.router_peak_rss_mb);
    println!("  CPU          router {:.2} cores, bench {:.2} cores", report.router_cpu_cores, report.bench_cpu_cores);
    println!("  setup        registered in {:.1} s, approved in {:.1} s", report.register_secs, report.approve_secs);
}
