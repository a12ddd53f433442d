//! `bench startup`: how long the router takes to start on a database that already holds a large fleet, and how much
//! memory it holds once it serves (SPEC §7: 100,000 nodes, under 2 s, under 300 MB).
//!
//! The database is built once: a first start creates the schema, the router is stopped, and the nodes are written
//! directly with SQL. Each run then starts the router on it and times spawn → `GET /healthz` answers 200.

use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::StartupArgs;
use crate::fleet;
use crate::router::RouterSpec;
use crate::seed::{self, FleetKind, StatusMix};
use crate::stats::median;

/// One start of the router.
#[derive(Debug, Clone, Serialize)]
pub struct StartupRun {
    /// From spawn to the listening line on stdout.
    pub listening_secs: f64,
    /// From spawn to the first 200 from `GET /healthz`.
    pub healthz_secs: f64,
    /// Resident memory right after that 200.
    pub rss_mb: f64,
}

/// What `bench startup` reports.
#[derive(Debug, Serialize)]
pub struct StartupReport {
    pub nodes: usize,
    pub online: usize,
    pub offline: usize,
    pub pending: usize,
    /// Whether the nodes carry the figures of a last heartbeat.
    pub with_metrics: bool,
    /// The first start, on an empty data directory (schema, first administrator): a baseline for the runs.
    pub empty_listening_secs: f64,
    pub seed_secs: f64,
    pub database_mb: f64,
    pub runs: Vec<StartupRun>,
    pub median_healthz_secs: f64,
    pub median_rss_mb: f64,
    /// What `GET /v0/nodes` listed after the first start.
    pub listed_nodes: usize,
}

/// Runs the whole mode: build the database, then start the router `--runs` times.
pub async fn run(spec: &RouterSpec, args: &StartupArgs) -> anyhow::Result<StartupReport> {
    eprintln!("creating the schema with a first start...");
    let first = spec.start().await?;
    let empty_listening_secs = first.listening_after.as_secs_f64();
    first.wait_ready().await?;
    first.stop().await.context("stopping the router after the first start")?;

    let db_path = spec.data_dir.join("router.db");
    eprintln!("writing {} nodes into {}...", args.nodes, db_path.display());
    let started = Instant::now();
    let StatusMix { online, offline, pending } =
        seed::seed(&db_path, FleetKind::Mixed, args.nodes, !args.no_metrics).await?;
    let seed_secs = started.elapsed().as_secs_f64();
    let database_mb = database_size(&spec.data_dir)? as f64 / 1e6;

    let mut runs = Vec::new();
    let mut listed_nodes = 0;
    for run in 1..=args.runs {
        let router = spec.start().await?;
        let host = router.host();
        let measured = match router.wait_ready().await {
            Ok(healthz) => router.memory().map(|memory| StartupRun {
                listening_secs: router.listening_after.as_secs_f64(),
                healthz_secs: healthz.as_secs_f64(),
                rss_mb: memory.rss_mb(),
            }),
            Err(err) => Err(err),
        };
        let listed = match (&measured, run) {
            (Ok(_), 1) => Some(list_nodes(spec, router.addr, &host).await),
            _ => None,
        };
        router.stop().await?;
        let measured = measured?;
        eprintln!(
            "run {run}: healthz after {:.3} s (listening after {:.3} s), RSS {:.1} MB",
            measured.healthz_secs, measured.listening_secs, measured.rss_mb
        );
        runs.push(measured);
        if let Some(listed) = listed {
            listed_nodes = listed?;
            if listed_nodes != args.nodes {
                bail!("GET /v0/nodes listed {listed_nodes} nodes; the database holds {}", args.nodes);
            }
        }
    }
    let healthz: Vec<f64> = runs.iter().map(|r| r.healthz_secs).collect();
    let rss: Vec<f64> = runs.iter().map(|r| r.rss_mb).collect();
    Ok(StartupReport {
        nodes: args.nodes,
        online,
        offline,
        pending,
        with_metrics: !args.no_metrics,
        empty_listening_secs,
        seed_secs,
        database_mb,
        median_healthz_secs: median(&healthz).unwrap_or_default(),
        median_rss_mb: median(&rss).unwrap_or_default(),
        runs,
        listed_nodes,
    })
}

async fn list_nodes(spec: &RouterSpec, addr: std::net::SocketAddr, host: &str) -> anyhow::Result<usize> {
    let session = fleet::login(addr, host, &spec.admin_password).await?;
    fleet::count_nodes(addr, host, &session).await
}

/// Bytes of the database with its WAL files.
fn database_size(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in ["router.db", "router.db-wal", "router.db-shm"] {
        match std::fs::metadata(dir.join(name)) {
            Ok(meta) => total += meta.len(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("reading the size of {name}")),
        }
    }
    Ok(total)
}

/// The report for people.
pub fn print(report: &StartupReport) {
    println!(
        "startup: {} nodes ({} online, {} offline, {} pending, {}), database {:.1} MB, written in {:.1} s",
        report.nodes,
        report.online,
        report.offline,
        report.pending,
        if report.with_metrics { "with heartbeat figures" } else { "without heartbeat figures" },
        report.database_mb,
        report.seed_secs
    );
    println!("  baseline     empty data directory: listening after {:.3} s", report.empty_listening_secs);
    for (i, run) in report.runs.iter().enumerate() {
        println!(
            "  run {}        healthz after {:.3} s (listening after {:.3} s), RSS {:.1} MB",
            i + 1,
            run.healthz_secs,
            run.listening_secs,
            run.rss_mb
        );
    }
    println!("  median       healthz after {:.3} s, RSS {:.1} MB", report.median_healthz_secs, report.median_rss_mb);
    println!("  GET /v0/nodes listed {} nodes", report.listed_nodes);
}
