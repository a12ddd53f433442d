//! `bench balance`: how inference traffic spreads over the nodes when several routers share one PostgreSQL database
//! (SPEC §11 with §8). Each router counts only the requests it has in flight, so a node's `max_concurrency` holds
//! per router, and each balances its own requests; this measures what that adds up to.
//!
//! `--nodes` stand-in runtimes are registered and approved on the first router, with `max_concurrency` set; they
//! keep heartbeating to it, and the other routers learn of them from the database. Then `--clients` clients, client
//! k on router k mod `--routers`, each stream chat completions back to back for `--secs`. Every stand-in counts the
//! answers it gave and the most it gave at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::BalanceArgs;
use crate::fleet;
use crate::heartbeat::{finish_routers, start_routers};
use crate::http::{Client, encode_request};
use crate::postgres;
use crate::proxy::{self, MODEL};
use crate::router::{Router, RouterSpec};
use crate::sse::StreamClient;
use crate::standin::{Behaviour, StandIns};
use crate::stats::{self, ErrorCounts};

/// Longest wait for every router to list the model after the fleet is approved.
const FOLLOW_DEADLINE: Duration = Duration::from_secs(10);

/// What `bench balance` reports.
#[derive(Debug, Serialize)]
pub struct BalanceReport {
    pub routers: usize,
    pub nodes: usize,
    /// The `max_concurrency` of every node; absent: none.
    pub max_concurrency: Option<u32>,
    pub clients: usize,
    pub measured_secs: f64,
    /// Seconds from the approvals on the first router until every router listed the model.
    pub follow_secs: f64,
    pub streams_ok: u64,
    pub errors: ErrorCounts,
    /// Streams each node answered, in registration order.
    pub answered: Vec<u64>,
    /// The most streams each node answered at once.
    pub peak_in_flight: Vec<u64>,
    /// Most answered by one node over least answered by one node (1.0: perfectly even).
    pub spread: f64,
}

/// Runs the whole mode.
pub async fn run(spec: &RouterSpec, args: &BalanceArgs) -> anyhow::Result<BalanceReport> {
    let database = postgres::Database::create(&args.postgres).await?;
    let mut spec = spec.clone();
    spec.extra_args.extend(["--inference-auth", "none"].map(str::to_owned));
    let behaviour = Behaviour {
        model: MODEL.to_owned(),
        chunks: args.chunks,
        gap: Duration::from_secs_f64(args.chunk_gap_ms / 1000.0),
    };
    let standins = StandIns::start(args.nodes, behaviour)?;
    let started = start_routers(&spec, args.routers, Some(&database.url)).await;
    let report = match &started {
        Ok(routers) => drive(&spec, routers, &standins, args).await,
        Err(_) => Err(anyhow::anyhow!("the routers did not start")),
    };
    finish_routers(started, Some(database), report).await
}

async fn drive(
    spec: &RouterSpec,
    routers: &[Router],
    standins: &StandIns,
    args: &BalanceArgs,
) -> anyhow::Result<BalanceReport> {
    let first = &routers[0];
    let host = first.host();
    let nodes = proxy::register(first.addr, &host, standins.addrs()).await?;
    let session = fleet::login(first.addr, &host, &spec.admin_password).await?;
    fleet::approve_nodes(first.addr, &host, &session, &nodes, 16).await?;
    let approved_at = Instant::now();
    if let Some(limit) = args.max_concurrency {
        let bearer = format!("Bearer {session}");
        let body = serde_json::json!({ "max_concurrency": limit }).to_string();
        let mut client = Client::new(first.addr);
        for node in &nodes {
            let path = format!("/v0/nodes/{}", node.id);
            let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
            let answer = client.send(&encode_request("PATCH", &path, &host, &headers, body.as_bytes())).await?;
            if answer.status != 200 {
                bail!("PATCH {path} answered HTTP {}", answer.status);
            }
        }
    }
    let heartbeat_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let heartbeats = proxy::keep_heartbeating(first.addr, &host, &nodes, heartbeat_errors)?;
    let result = async {
        for router in routers {
            wait_for_model(router.addr).await?;
        }
        let follow_secs = approved_at.elapsed().as_secs_f64();
        eprintln!(
            "{} clients streaming over {} routers to {} nodes for {:.1} s...",
            args.clients,
            routers.len(),
            nodes.len(),
            args.secs
        );
        let until = Instant::now() + Duration::from_secs_f64(args.secs);
        let request = encode_request(
            "POST",
            "/v1/chat/completions",
            &host,
            &[("Content-Type", "application/json")],
            &proxy::request_body(true, 0),
        );
        let request = Arc::new(request);
        let mut clients = JoinSet::new();
        for k in 0..args.clients {
            let addr = routers[k % routers.len()].addr;
            let request = request.clone();
            clients.spawn(async move {
                let mut client = StreamClient::new(addr);
                let (mut ok, mut errors) = (0u64, ErrorCounts::default());
                while Instant::now() < until {
                    match client.send(&request, false).await {
                        Ok(exchange) if exchange.status == 200 => ok += 1,
                        Ok(exchange) => {
                            errors.add(format!("HTTP {}", exchange.status));
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(err) => {
                            errors.add(err.label());
                            client.disconnect();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (ok, errors)
            });
        }
        let (mut streams_ok, mut errors) = (0, ErrorCounts::default());
        while let Some(done) = clients.join_next().await {
            let (ok, more) = done.context("a client task failed")?;
            streams_ok += ok;
            errors.merge(more);
        }
        let served = standins.served();
        let answered: Vec<u64> = served.each.iter().map(|load| load.answered.load(Ordering::Relaxed)).collect();
        let peak_in_flight: Vec<u64> = served.each.iter().map(|load| load.peak.load(Ordering::Relaxed)).collect();
        anyhow::Ok(BalanceReport {
            routers: routers.len(),
            nodes: nodes.len(),
            max_concurrency: args.max_concurrency,
            clients: args.clients,
            measured_secs: args.secs,
            follow_secs,
            streams_ok,
            errors,
            spread: stats::spread(&answered),
            answered,
            peak_in_flight,
        })
    }
    .await;
    heartbeats.abort();
    result
}

/// Polls the router at `addr`'s `GET /v1/models` until it lists the model the stand-ins serve.
pub(crate) async fn wait_for_model(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + FOLLOW_DEADLINE;
    let request = encode_request("GET", "/v1/models", &addr.to_string(), &[], b"");
    let mut client = Client::new(addr);
    loop {
        let answer = client.send(&request).await?;
        if answer.status == 200 && String::from_utf8_lossy(client.body()).contains(MODEL) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("router {addr} did not list {MODEL} within {FOLLOW_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The report for people.
pub fn print(report: &BalanceReport) {
    let limit = report.max_concurrency.map_or_else(|| "no limit".to_owned(), |n| format!("max_concurrency {n}"));
    println!(
        "balance: {} routers on one PostgreSQL database, {} nodes ({limit}), {} clients, {:.1} s",
        report.routers, report.nodes, report.clients, report.measured_secs
    );
    println!("  follow       every router listed the model {:.2} s after the approvals", report.follow_secs);
    println!("  streams      {} ok, errors: {}", report.streams_ok, report.errors.line());
    println!("  answered     {:?} (most / least {:.2})", report.answered, report.spread);
    println!("  peak at once {:?}", report.peak_in_flight);
}
