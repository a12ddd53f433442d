//! What `bench proxy` reports: the figures of each scenario, and their printing for people.

use serde::Serialize;
use uuid::Uuid;

use crate::stats::{Added, ErrorCounts, LatencySummary};

/// What `bench proxy` reports.
#[derive(Debug, Serialize)]
pub struct ProxyReport {
    pub nodes: usize,
    /// Routed requests carried an API key with limits (`--limits`); otherwise `/v1` was open.
    pub limits: bool,
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

/// The report for people.
pub fn print(report: &ProxyReport) {
    println!("proxy: {} stand-in runtimes as nodes, direct and through the router in the same run", report.nodes);
    if report.limits {
        println!("  every routed request carries an API key with limits (its answers carry x-ratelimit-*)");
    }
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
