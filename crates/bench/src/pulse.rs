//! `bench pulse`: the live traffic of a fleet written by `bench seed`, sent to a router already running on it, for
//! as long as something else measures (the dashboard benchmark, `tests/dashboard/bench.mjs`).
//!
//! Node i heartbeats with the id and token of [`seed::node_id`] and [`seed::node_token`], once per
//! `--interval-secs`, without registering. The fleet's heartbeats are spread evenly over the interval (100,000 nodes
//! every 10 s: one every 0.1 ms), and each one carries figures that differ from the node's previous ones, so a page
//! that shows the fleet always has changes to show.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::cli::PulseArgs;
use crate::fleet::{self, NodeCredentials};
use crate::heartbeat::connect_all;
use crate::http::Client;
use crate::seed;
use crate::stats::{ErrorCounts, LatencySummary};

/// What `bench pulse` reports when it stops.
#[derive(Debug, Serialize)]
pub struct PulseReport {
    pub nodes: usize,
    pub connections: usize,
    pub interval_secs: f64,
    /// Heartbeats per second the schedule asks for: nodes / interval.
    pub offered_rps: f64,
    /// From the first scheduled heartbeat to the stop.
    pub secs: f64,
    pub sent: u64,
    pub ok: u64,
    /// Successful heartbeats per second.
    pub throughput_rps: f64,
    pub latency: LatencySummary,
    pub error_total: u64,
    pub errors: ErrorCounts,
}

/// The router's address from `http://IP:PORT` (a trailing `/` allowed): the bench's client speaks plain HTTP to an
/// address, without name resolution.
pub fn parse_url(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("http://").with_context(|| format!("`{url}` is not an http:// URL"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    authority.parse().with_context(|| format!("`{url}` is not http://IP:PORT"))
}

/// Counts shared by the workers, for the progress lines.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// What one connection saw.
struct WorkerResult {
    latencies: Vec<u64>,
    ok: u64,
    errors: ErrorCounts,
}

/// Heartbeats until `--secs` have passed, `--rounds` are sent or `stop` completes, printing a progress line on
/// stderr every `--progress-secs`.
pub async fn run(args: &PulseArgs, stop: impl Future<Output = ()>) -> anyhow::Result<PulseReport> {
    let addr = parse_url(&args.url)?;
    let host: Arc<str> = addr.to_string().into();
    let connections = args.connections.min(args.nodes);
    let clients = connect_all(addr, connections).await?;
    let interval = Duration::from_secs_f64(args.interval_secs);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.secs);
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = Arc::new(Progress::default());
    let mut workers = JoinSet::new();
    for (k, client) in clients.into_iter().enumerate() {
        // Connection k heartbeats for nodes k, k + C, k + 2C... in turn; the connections' first heartbeats are
        // spread over one period so that the fleet's are evenly spaced.
        let share: Vec<usize> = (k..args.nodes).step_by(connections).collect();
        let period = interval.div_f64(share.len() as f64);
        let first = start + period.mul_f64(k as f64 / connections as f64);
        let schedule = Schedule { first, period, until, count: args.rounds.map(|rounds| rounds * share.len()) };
        workers.spawn(worker(client, host.clone(), share, schedule, stop_rx.clone(), progress.clone()));
    }
    eprintln!(
        "pulse: {} nodes heartbeating every {} s ({:.0} heartbeats/s) over {connections} connections to {addr}",
        args.nodes,
        args.interval_secs,
        args.nodes as f64 / args.interval_secs
    );

    let reporter = tokio::spawn(report_progress(progress.clone(), Duration::from_secs_f64(args.progress_secs)));
    let deadline = tokio::time::sleep_until(until.into());
    tokio::pin!(deadline, stop);
    let mut stopped_at = None;
    let mut latencies = Vec::new();
    let mut ok = 0;
    let mut errors = ErrorCounts::default();
    loop {
        tokio::select! {
            done = workers.join_next() => {
                let Some(done) = done else { break };
                let done = done.context("a heartbeat worker failed")??;
                latencies.extend(done.latencies);
                ok += done.ok;
                errors.merge(done.errors);
            }
            () = &mut deadline, if stopped_at.is_none() => {
                stopped_at = Some(Instant::now());
                let _ = stop_tx.send(true);
            }
            () = &mut stop, if stopped_at.is_none() => {
                stopped_at = Some(Instant::now());
                let _ = stop_tx.send(true);
            }
        }
    }
    reporter.abort();
    let secs = stopped_at.unwrap_or_else(Instant::now).duration_since(start).as_secs_f64();
    Ok(PulseReport {
        nodes: args.nodes,
        connections,
        interval_secs: args.interval_secs,
        offered_rps: args.nodes as f64 / args.interval_secs,
        secs,
        sent: ok + errors.total(),
        ok,
        throughput_rps: ok as f64 / secs,
        latency: LatencySummary::from_nanos(latencies),
        error_total: errors.total(),
        errors,
    })
}

/// When one connection sends: at `first`, then every `period`, until `until` or `count` heartbeats are sent.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    first: Instant,
    period: Duration,
    until: Instant,
    count: Option<usize>,
}

async fn worker(
    mut client: Client,
    host: Arc<str>,
    share: Vec<usize>,
    schedule: Schedule,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> anyhow::Result<WorkerResult> {
    let mut result = WorkerResult { latencies: Vec::new(), ok: 0, errors: ErrorCounts::default() };
    let mut ticker = tokio::time::interval_at(schedule.first.into(), schedule.period);
    // Behind schedule (a busy machine), the next heartbeat goes at once and the schedule shifts: the node's
    // interval stretches rather than heartbeats bunching up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next = 0;
    let mut round = 0;
    let mut sent = 0;
    loop {
        if schedule.count.is_some_and(|count| sent >= count) {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = ticker.tick() => {}
        }
        if Instant::now() >= schedule.until {
            break;
        }
        let i = share[next];
        next += 1;
        if next == share.len() {
            next = 0;
            round += 1;
        }
        let node = NodeCredentials { id: seed::node_id(i), token: seed::node_token(i) };
        let request = fleet::heartbeat_request(&host, &node, &fleet::heartbeat_body(figures_of(i, round), node.id)?);
        let sent_at = Instant::now();
        sent += 1;
        let outcome = tokio::select! {
            biased;
            outcome = client.send(&request) => outcome,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        match outcome {
            Ok(answer) if answer.status == 200 => {
                result.ok += 1;
                result.latencies.push(u64::try_from(sent_at.elapsed().as_nanos()).unwrap_or(u64::MAX));
                progress.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(answer) => {
                result.errors.add(format!("HTTP {}", answer.status));
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                result.errors.add(err.label());
                progress.errors.fetch_add(1, Ordering::Relaxed);
                // The client reconnects on the next request; do not spin if the router is gone.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    Ok(result)
}

/// Which simulated node's figures node `i` sends in its heartbeat number `round`: another one each time, so CPU,
/// memory, GPU load and temperature move from one heartbeat to the next.
fn figures_of(i: usize, round: usize) -> usize {
    i.wrapping_add(round.wrapping_mul(7))
}

async fn report_progress(progress: Arc<Progress>, every: Duration) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval_at((started + every).into(), every);
    let (mut ok_before, mut errors_before) = (0, 0);
    loop {
        ticker.tick().await;
        let (ok, errors) = (progress.ok.load(Ordering::Relaxed), progress.errors.load(Ordering::Relaxed));
        eprintln!(
            "pulse: {:.0} s: {:.0} heartbeats/s over the last {:.0} s, {} errors",
            started.elapsed().as_secs_f64(),
            (ok - ok_before) as f64 / every.as_secs_f64(),
            every.as_secs_f64(),
            errors - errors_before
        );
        (ok_before, errors_before) = (ok, errors);
    }
}

/// The report for people.
pub fn print(report: &PulseReport) {
    println!(
        "pulse: {} nodes every {} s ({:.0} heartbeats/s offered) over {} connections, {:.1} s",
        report.nodes, report.interval_secs, report.offered_rps, report.connections, report.secs
    );
    println!("  heartbeats   {} ({} ok, {} errors)", report.sent, report.ok, report.error_total);
    println!("  throughput   {:.0} heartbeats/s", report.throughput_rps);
    println!("  latency      {}", report.latency.line());
    println!("  errors       {}", report.errors.line());
}

#[cfg(test)]
mod tests {
    use llm_router::app::App;
    use llm_router::clock::SystemClock;
    use llm_router::config::Settings;
    use llm_router_protocol::NodeStatus;

    use super::*;
    use crate::seed::{FleetKind, StatusMix};

    #[test]
    fn the_url_is_an_address() {
        assert_eq!(parse_url("http://127.0.0.1:8080").expect("url"), "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(parse_url("http://[::1]:80/").expect("url"), "[::1]:80".parse().expect("addr"));
        assert!(parse_url("https://127.0.0.1:8080").is_err());
        assert!(parse_url("http://localhost:8080").is_err());
        assert!(parse_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn figures_change_from_one_heartbeat_to_the_next() {
        let id = seed::node_id(5);
        let bodies: Vec<Vec<u8>> =
            (0..3).map(|round| fleet::heartbeat_body(figures_of(5, round), id).expect("body")).collect();
        assert_ne!(bodies[0], bodies[1]);
        assert_ne!(bodies[1], bodies[2]);
    }

    /// A fleet seeded into a data directory, a router started on it, and the pulse: every heartbeat is accepted,
    /// by the seeded ids and tokens alone, and the nodes stay as seeded (online, and pending).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_router_started_on_a_seeded_fleet_accepts_its_heartbeats() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let count = 2003;
        let seeded = seed::seed(&dir.path().join("router.db"), FleetKind::Approved, count, true).await.expect("seed");
        assert_eq!(seeded, StatusMix { online: 2000, offline: 0, pending: 3 });

        let settings = Settings {
            admin_password: Some("pulse-test-password".to_owned()),
            reachability_check: false,
            ..Settings::new(dir.path().to_owned())
        };
        let app = App::build(settings, Arc::new(SystemClock)).await.expect("the router starts on the seeded fleet");
        let state = app.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));

        // Every node twice, every 0.1 s (or as fast as the machine goes, if slower).
        let args = PulseArgs {
            url,
            nodes: count,
            interval_secs: 0.1,
            secs: 600.0,
            rounds: Some(2),
            connections: 8,
            progress_secs: 60.0,
        };
        let pulse_started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .expect("clock");
        let report = run(&args, std::future::pending()).await.expect("the pulse runs");
        assert_eq!(report.error_total, 0, "{:?}", report.errors);
        assert_eq!(report.ok, 2 * count as u64, "two rounds of heartbeats");

        let everyone = llm_router::registry::query::NodeQuery::default();
        let nodes = state
            .registry
            .query(&everyone, |node, _| (node.status, node.last_seen_at.unwrap_or_default()))
            .expect("the fleet")
            .nodes;
        assert_eq!(nodes.len(), count);
        assert!(nodes.iter().all(|(_, seen)| *seen >= pulse_started), "every node was heard from");
        let statuses: Vec<NodeStatus> = nodes.iter().map(|(status, _)| *status).collect();
        assert_eq!(statuses.iter().filter(|s| **s == NodeStatus::Pending).count(), 3);
        assert_eq!(statuses.iter().filter(|s| **s == NodeStatus::Online).count(), 2000);

        let _ = stop.send(());
        server.await.expect("server task").expect("router stops cleanly");
    }
}
