//! `bench connections`: strangers holding connections open (SPEC §9: 1,100 half-open connections under a 1,024
//! open-file limit must not delay `GET /healthz` on a fresh connection by more than a second).
//!
//! The router runs under `--open-file-limit` (soft and hard, so it cannot raise it). The bench opens `--half-open`
//! connections that each send part of a request's headers and then nothing, and keeps them while it times
//! `--requests` `GET /healthz`, one after another, each on a fresh connection (connect included). With `--reopen`,
//! every half-open connection the router closes is opened again at once, so the router stays at its cap throughout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;

use crate::cli::ConnectionsArgs;
use crate::http::{Client, encode_request};
use crate::router::{Router, RouterSpec};
use crate::stats::{ErrorCounts, LatencySummary};

/// What a half-open connection sends: a request line and one header, never the empty line that ends the headers.
const PARTIAL_HEADERS: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: router\r\nUser-Agent: half-open";

/// How long one timed request may take before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// After this many timeouts in a row the router is taken as not answering, and the measurement ends.
const GIVE_UP_AFTER_TIMEOUTS: usize = 5;

/// How long opening the half-open connections may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Wait before an attacker whose connect failed tries again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// What `bench connections` reports.
#[derive(Debug, Serialize)]
pub struct ConnectionsReport {
    pub open_file_limit: u64,
    pub half_open: usize,
    pub reopen: bool,
    /// The router's cap on open connections, from `/metrics` before the half-open connections; absent when the
    /// router does not report one.
    pub router_max_connections: Option<u64>,
    /// Half-open connections the bench held when the timing started and when it ended.
    pub half_open_held_at_start: u64,
    pub half_open_held_at_end: u64,
    /// Half-open connections the router closed, from the bench's side, setup included.
    pub half_open_closed: u64,
    /// Failed connects of the half-open connections, by kind.
    pub half_open_connect_errors: ErrorCounts,
    pub requests: usize,
    pub ok: u64,
    /// `GET /healthz` on a fresh connection, connect included.
    pub latency: LatencySummary,
    pub error_total: u64,
    pub errors: ErrorCounts,
    /// The measurement ended early: the router stopped answering.
    pub gave_up: bool,
    /// The router's own counts at the end, from `/metrics`, when it answered.
    pub router_connections_open: Option<u64>,
    pub router_evicted_total: Option<u64>,
    pub router_refused_total: Option<u64>,
    /// Resident memory while the half-open connections are held.
    pub router_rss_mb: f64,
}

/// Runs the whole mode against a router started from `spec`, under the open-file limit of `args`.
pub async fn run(spec: &RouterSpec, args: &ConnectionsArgs) -> anyhow::Result<ConnectionsReport> {
    let spec = RouterSpec { open_file_limit: Some(args.open_file_limit), ..spec.clone() };
    let router = spec.start().await?;
    let report = drive(&router, args).await;
    let stopped = router.stop().await;
    let report = report?;
    stopped?;
    Ok(report)
}

/// The half-open connections' shared tallies.
#[derive(Default)]
struct Tally {
    held: AtomicU64,
    closed: AtomicU64,
    connect_errors: Mutex<ErrorCounts>,
}

async fn drive(router: &Router, args: &ConnectionsArgs) -> anyhow::Result<ConnectionsReport> {
    router.wait_ready().await?;
    let router_max_connections = router_metrics(router.addr, &router.host())
        .await
        .and_then(|text| metric(&text, "llm_router_http_connections_max"));
    eprintln!(
        "router under an open-file limit of {}; cap {}; opening {} half-open connections...",
        args.open_file_limit,
        router_max_connections.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        args.half_open
    );
    let tally = Arc::new(Tally::default());
    let (stop, stopped) = watch::channel(false);
    let mut attackers = JoinSet::new();
    for _ in 0..args.half_open {
        attackers.spawn(attacker(router.addr, args.reopen, tally.clone(), stopped.clone()));
    }
    let setup_started = Instant::now();
    while tally.held.load(Ordering::Relaxed) + tally.closed.load(Ordering::Relaxed) < args.half_open as u64 {
        if setup_started.elapsed() > SETUP_TIMEOUT {
            bail!(
                "only {} of {} half-open connections opened within {SETUP_TIMEOUT:?}",
                tally.held.load(Ordering::Relaxed),
                args.half_open
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let half_open_held_at_start = tally.held.load(Ordering::Relaxed);
    eprintln!(
        "holding {half_open_held_at_start} half-open connections; timing {} GET /healthz on fresh connections...",
        args.requests
    );

    // On a thread and runtime of its own: the attackers' tasks must not delay the timed requests on the bench side.
    let (addr, host, requests) = (router.addr, router.host(), args.requests);
    let timed = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        anyhow::Ok(runtime.block_on(time_healthz(addr, &host, requests)))
    })
    .await??;
    let half_open_held_at_end = tally.held.load(Ordering::Relaxed);
    let memory = router.memory()?;
    let end_metrics = router_metrics(router.addr, &router.host()).await;
    let _ = stop.send(true);
    while attackers.join_next().await.is_some() {}
    let half_open_connect_errors = tally.connect_errors.lock().await.clone();
    let Timed { latencies, errors, gave_up } = timed;
    let ok = latencies.len() as u64;
    let end = |name: &str| end_metrics.as_deref().and_then(|text| metric(text, name));
    Ok(ConnectionsReport {
        open_file_limit: args.open_file_limit,
        half_open: args.half_open,
        reopen: args.reopen,
        router_max_connections,
        half_open_held_at_start,
        half_open_held_at_end,
        half_open_closed: tally.closed.load(Ordering::Relaxed),
        half_open_connect_errors,
        requests: args.requests,
        ok,
        latency: LatencySummary::from_nanos(latencies),
        error_total: errors.total(),
        errors,
        gave_up,
        router_connections_open: end("llm_router_http_connections_open"),
        router_evicted_total: end("llm_router_http_connections_evicted_total"),
        router_refused_total: end("llm_router_http_connections_refused_total"),
        router_rss_mb: memory.rss_mb(),
    })
}

/// The timed requests' outcome.
struct Timed {
    /// Of the requests answered 200, in nanoseconds.
    latencies: Vec<u64>,
    errors: ErrorCounts,
    gave_up: bool,
}

/// Times `requests` `GET /healthz`, one after another, each on a fresh connection.
async fn time_healthz(addr: SocketAddr, host: &str, requests: usize) -> Timed {
    let request = encode_request("GET", "/healthz", host, &[], b"");
    let mut timed = Timed { latencies: Vec::with_capacity(requests), errors: ErrorCounts::default(), gave_up: false };
    let mut timeouts_in_a_row = 0;
    for _ in 0..requests {
        let started = Instant::now();
        let mut client = Client::new(addr);
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.send(&request)).await;
        if answer.is_ok() {
            timeouts_in_a_row = 0;
        }
        match answer {
            Ok(Ok(answer)) if answer.status == 200 => {
                timed.latencies.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            Ok(Ok(answer)) => timed.errors.add(format!("HTTP {}", answer.status)),
            Ok(Err(err)) => timed.errors.add(err.label()),
            Err(_) => {
                timeouts_in_a_row += 1;
                timed.errors.add("timeout");
                if timeouts_in_a_row == GIVE_UP_AFTER_TIMEOUTS {
                    eprintln!("{GIVE_UP_AFTER_TIMEOUTS} timeouts in a row: the router does not answer; giving up");
                    timed.gave_up = true;
                    break;
                }
            }
        }
    }
    timed
}

/// Holds one half-open connection until the router closes it (then, with `reopen`, opens another) or the bench
/// stops.
async fn attacker(addr: SocketAddr, reopen: bool, tally: Arc<Tally>, mut stop: watch::Receiver<bool>) {
    loop {
        let opened = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(PARTIAL_HEADERS).await?;
            std::io::Result::Ok(stream)
        };
        let mut stream = tokio::select! {
            opened = opened => match opened {
                Ok(stream) => stream,
                Err(err) => {
                    tally.connect_errors.lock().await.add(format!("{:?}", err.kind()));
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(RECONNECT_PAUSE) => continue,
                    }
                }
            },
            _ = stop.changed() => return,
        };
        tally.held.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 512];
        let closed = tokio::select! {
            // Whatever the router sends or however it closes, the connection is over for the attacker.
            _ = stream.read(&mut buf) => true,
            _ = stop.changed() => false,
        };
        tally.held.fetch_sub(1, Ordering::Relaxed);
        if !closed {
            return;
        }
        tally.closed.fetch_add(1, Ordering::Relaxed);
        if !reopen {
            // Keep the task until the end so the bench's count of opened connections stays right.
            let _ = stop.changed().await;
            return;
        }
    }
}

/// The router's `/metrics` text, on a fresh connection; `None` when it does not answer 200 in time.
async fn router_metrics(addr: SocketAddr, host: &str) -> Option<String> {
    let mut client = Client::new(addr);
    let request = encode_request("GET", "/metrics", host, &[], b"");
    match tokio::time::timeout(REQUEST_TIMEOUT, client.send(&request)).await {
        Ok(Ok(answer)) if answer.status == 200 => Some(String::from_utf8_lossy(client.body()).into_owned()),
        _ => None,
    }
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The report for people.
pub fn print(report: &ConnectionsReport) {
    let show = |value: Option<u64>| value.map_or_else(|| "n/a".to_owned(), |n| n.to_string());
    println!(
        "connections: {} half-open connections{} against a router under an open-file limit of {}",
        report.half_open,
        if report.reopen { ", reopened when closed" } else { "" },
        report.open_file_limit
    );
    println!("  router cap   {} connections", show(report.router_max_connections));
    println!(
        "  half-open    held {} at start, {} at end; {} closed by the router; connect errors: {}",
        report.half_open_held_at_start,
        report.half_open_held_at_end,
        report.half_open_closed,
        report.half_open_connect_errors.line()
    );
    println!(
        "  /healthz     {} of {} answered 200{}",
        report.ok,
        report.requests,
        if report.gave_up { " (gave up: the router stopped answering)" } else { "" }
    );
    println!("  latency      {}", report.latency.line());
    println!("  errors       {}", report.errors.line());
    println!(
        "  router       {} open, {} evicted, {} refused (from /metrics at the end)",
        show(report.router_connections_open),
        show(report.router_evicted_total),
        show(report.router_refused_total)
    );
    println!("  router RSS   {:.1} MB", report.router_rss_mb);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_metrics() {
        let text = "# HELP llm_router_http_connections_max The cap.\n# TYPE llm_router_http_connections_max gauge\n\
                    llm_router_http_connections_max 896\nllm_router_http_connections_max_other 3\n\
                    llm_router_http_connections_open 12\n";
        assert_eq!(metric(text, "llm_router_http_connections_max"), Some(896));
        assert_eq!(metric(text, "llm_router_http_connections_open"), Some(12));
        assert_eq!(metric(text, "llm_router_http_connections_evicted_total"), None);
    }
}
