//! `bench register`: registration latency with the reachability probe off (SPEC §7: p99 under 20 ms). Every
//! registration is a committed transaction, so this measures the router's write path, not the network to nodes.
//! It also samples the size of the router's write-ahead log while it runs (SPEC §9: under 64 MiB after 20,000
//! registrations).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::RegisterArgs;
use crate::fleet;
use crate::router::RouterSpec;
use crate::stats::{ErrorCounts, LatencySummary};

/// What `bench register` reports.
#[derive(Debug, Serialize)]
pub struct RegisterReport {
    pub count: usize,
    pub concurrency: usize,
    pub ok: u64,
    pub elapsed_secs: f64,
    /// Successful registrations per second.
    pub throughput_rps: f64,
    pub latency: LatencySummary,
    pub error_total: u64,
    pub errors: ErrorCounts,
    pub router_rss_mb: f64,
    /// Largest size of `router.db-wal` seen while registering (sampled every 50 ms), and its size at the end.
    pub wal_max_mb: f64,
    pub wal_end_mb: f64,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &RegisterArgs) -> anyhow::Result<RegisterReport> {
    // On an early return the router is dropped, which kills it.
    let router = spec.start().await?;
    router.wait_ready().await?;
    let host = router.host();
    let requests = Arc::new(fleet::registration_requests(&host, args.count, true)?);
    eprintln!("registering {} nodes, {} at a time...", args.count, args.concurrency);
    let wal = spec.data_dir.join("router.db-wal");
    let (stop_sampling, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn({
        let wal = wal.clone();
        async move {
            let mut largest = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = tick.tick() => largest = largest.max(file_size(&wal)),
                    _ = &mut stopped => return largest.max(file_size(&wal)),
                }
            }
        }
    });
    let started = Instant::now();
    let outcomes = fleet::send_all(router.addr, requests, args.concurrency).await;
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_sampling.send(());
    let wal_max = sampler.await?;
    let wal_end = file_size(&wal);
    let memory = router.memory();
    router.stop().await?;
    let memory = memory?;

    let mut errors = ErrorCounts::default();
    let mut latencies = Vec::with_capacity(outcomes.len());
    for sent in &outcomes {
        if fleet::tally(sent, 201, &mut errors) {
            latencies.push(u64::try_from(sent.latency.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    let ok = latencies.len() as u64;
    Ok(RegisterReport {
        count: args.count,
        concurrency: args.concurrency,
        ok,
        elapsed_secs: elapsed,
        throughput_rps: ok as f64 / elapsed,
        latency: LatencySummary::from_nanos(latencies),
        error_total: errors.total(),
        errors,
        router_rss_mb: memory.rss_mb(),
        wal_max_mb: wal_max as f64 / 1e6,
        wal_end_mb: wal_end as f64 / 1e6,
    })
}

/// Size of a file in bytes; 0 when it does not exist (SQLite removes the log at a clean stop).
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

/// The report for people.
pub fn print(report: &RegisterReport) {
    println!("register: {} registrations, {} at a time, reachability check off", report.count, report.concurrency);
    println!(
        "  ok           {} in {:.2} s ({:.0} registrations/s)",
        report.ok, report.elapsed_secs, report.throughput_rps
    );
    println!("  latency      {}", report.latency.line());
    println!("  errors       {}", report.errors.line());
    println!("  router RSS   {:.1} MB", report.router_rss_mb);
    println!(
        "  WAL          largest {:.1} MB while registering, {:.1} MB at the end",
        report.wal_max_mb, report.wal_end_mb
    );
}
