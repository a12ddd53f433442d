//! The scenarios of `bench proxy`: completions and streams, direct and routed in alternating slices, and failover
//! with one stand-in killed mid-run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use uuid::Uuid;

use super::run::{Alternation, Job, Targets, To, start_run};
use super::{CompletionsReport, FailoverReport, MODEL, RouterAt, Side, StreamSide, StreamsReport};
use crate::cli::ProxyArgs;
use crate::procfs;
use crate::sse::Event;
use crate::standin::{self, StandIns, instant_at, monotonic_ns};
use crate::stats::{Added, ErrorCounts, LatencySummary};

pub(super) async fn completions(
    at: &RouterAt,
    targets: &Arc<Targets>,
    args: &ProxyArgs,
) -> anyhow::Result<CompletionsReport> {
    let plan = Alternation::new(args.rate, args.secs, args.slice_secs, targets.standins.len(), false);
    eprintln!(
        "completions: {} requests/s offered, {:.1} s direct and {:.1} s routed in slices of {:.1} s (after a warm-up pair)...",
        args.rate,
        plan.measured_secs_per_side(),
        plan.measured_secs_per_side(),
        args.slice_secs
    );
    let cpu_from = (at.pid.map(|pid| procfs::cpu_seconds(Some(pid))).transpose()?, procfs::cpu_seconds(None)?);
    let wall = Instant::now();
    let running = start_run(targets, args.rate, plan.count(), args.connections, Arc::new(move |i| plan.job(i)))?;
    let records = running.finish().await?;
    let wall = wall.elapsed().as_secs_f64();
    let cpu_to = (at.pid.map(|pid| procfs::cpu_seconds(Some(pid))).transpose()?, procfs::cpu_seconds(None)?);
    let expected = standin::completion_body(MODEL).len();
    let side = |routed: bool| {
        let mut result =
            Side { requests: 0, ok: 0, errors: ErrorCounts::default(), latency: LatencySummary::from_nanos(vec![]) };
        let mut latencies = Vec::new();
        for record in records.iter().filter(|r| r.job.measured && (r.job.to == To::Routed) == routed) {
            result.requests += 1;
            match &record.outcome {
                Ok(exchange) if exchange.status == 200 && exchange.body_len == expected => {
                    result.ok += 1;
                    latencies.push(exchange.end_ns.saturating_sub(record.due_ns));
                }
                Ok(exchange) if exchange.status == 200 => result.errors.add("answer of the wrong length"),
                Ok(exchange) => result.errors.add(format!("HTTP {}", exchange.status)),
                Err(label) => result.errors.add(label.clone()),
            }
        }
        result.latency = LatencySummary::from_nanos(latencies);
        result
    };
    let (direct, routed) = (side(false), side(true));
    let send_lag = LatencySummary::from_nanos(
        records.iter().filter(|r| r.job.measured).map(|r| r.sent_ns.saturating_sub(r.due_ns)).collect(),
    );
    // Routed slices are half of the run's slices, warm-up included.
    let routed_secs = plan.slice_secs * (plan.pairs + 1) as f64;
    Ok(CompletionsReport {
        rate_rps: args.rate,
        secs_per_side: plan.measured_secs_per_side(),
        request_bytes: targets.routed[0][0].len(),
        answer_bytes: expected,
        added: Added::between(&direct.latency, &routed.latency),
        direct,
        routed,
        send_lag,
        router_cpu_cores: cpu_from.0.zip(cpu_to.0).map(|(from, to)| (to - from) / routed_secs),
        bench_cpu_cores: (cpu_to.1 - cpu_from.1) / wall,
    })
}

/// Events of `events` that a reader would call held back: read in one read with the next event although the next
/// was written at least half a gap later.
pub fn coalesced(events: &[Event], gap_ns: u64) -> u64 {
    events
        .windows(2)
        .filter(|pair| {
            let (a, b) = (pair[0], pair[1]);
            a.read == b.read && a.sent_ns.zip(b.sent_ns).is_some_and(|(sa, sb)| sb.saturating_sub(sa) >= gap_ns / 2)
        })
        .count() as u64
}

pub(super) async fn streams(targets: &Arc<Targets>, args: &ProxyArgs) -> anyhow::Result<StreamsReport> {
    let plan = Alternation::new(args.stream_rate, args.stream_secs, args.slice_secs, targets.standins.len(), true);
    eprintln!(
        "streams: {} streams/s of {} events {} ms apart, {:.1} s direct and {:.1} s routed...",
        args.stream_rate,
        args.chunks,
        args.chunk_gap_ms,
        plan.measured_secs_per_side(),
        plan.measured_secs_per_side()
    );
    let running = start_run(targets, args.stream_rate, plan.count(), args.connections, Arc::new(move |i| plan.job(i)))?;
    let records = running.finish().await?;
    let gap_ns = (args.chunk_gap_ms * 1e6) as u64;
    let late_ns = (args.late_ms * 1e6) as u64;
    let side = |routed: bool| {
        let mut first = Vec::new();
        let mut delays = Vec::new();
        let mut side = StreamSide {
            streams: 0,
            ok: 0,
            errors: ErrorCounts::default(),
            first_chunk: LatencySummary::from_nanos(vec![]),
            chunk_delay: LatencySummary::from_nanos(vec![]),
            chunks: 0,
            late_chunks: 0,
            coalesced_chunks: 0,
        };
        for record in records.iter().filter(|r| r.job.measured && (r.job.to == To::Routed) == routed) {
            side.streams += 1;
            let exchange = match &record.outcome {
                Ok(exchange) if exchange.status == 200 => exchange,
                Ok(exchange) => {
                    side.errors.add(format!("HTTP {}", exchange.status));
                    continue;
                }
                Err(label) => {
                    side.errors.add(label.clone());
                    continue;
                }
            };
            if let Some(event) = exchange.events.first() {
                first.push(event.recv_ns.saturating_sub(record.due_ns));
            }
            for event in &exchange.events {
                let delay = event.sent_ns.map_or(0, |sent| event.recv_ns.saturating_sub(sent));
                side.late_chunks += u64::from(delay > late_ns);
                delays.push(delay);
            }
            side.chunks += exchange.events.len() as u64;
            side.coalesced_chunks += coalesced(&exchange.events, gap_ns);
            if exchange.done && exchange.events.len() == args.chunks {
                side.ok += 1;
            } else {
                side.errors.add("incomplete stream");
            }
        }
        side.first_chunk = LatencySummary::from_nanos(first);
        side.chunk_delay = LatencySummary::from_nanos(delays);
        side
    };
    let (direct, routed) = (side(false), side(true));
    Ok(StreamsReport {
        stream_rate: args.stream_rate,
        secs_per_side: plan.measured_secs_per_side(),
        chunks_per_stream: args.chunks,
        chunk_gap_ms: args.chunk_gap_ms,
        late_ms: args.late_ms,
        added_first_chunk: Added::between(&direct.first_chunk, &routed.first_chunk),
        added_chunk_delay: Added::between(&direct.chunk_delay, &routed.chunk_delay),
        direct,
        routed,
    })
}

/// Whether request `i` of the failover run is a stream: `share` of them, spread evenly.
fn is_stream(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

pub(super) async fn failover(
    targets: &Arc<Targets>,
    standins: &StandIns,
    args: &ProxyArgs,
    nodes: &[Uuid],
) -> anyhow::Result<FailoverReport> {
    eprintln!(
        "failover: {} requests/s through the router ({:.0} % streams) for {:.1} s, one stand-in killed at {:.1} s...",
        args.failover_rate,
        args.stream_share * 100.0,
        args.failover_secs,
        args.kill_at_secs
    );
    let share = args.stream_share;
    let count = (args.failover_rate * args.failover_secs).round() as u64;
    let plan = move |i| Job { to: To::Routed, stream: is_stream(i, share), measured: true };
    let answered =
        || -> Vec<u64> { standins.served().each.iter().map(|l| l.answered.load(Ordering::Relaxed)).collect() };
    let before = answered();
    let running = start_run(targets, args.failover_rate, count, args.connections, Arc::new(plan))?;
    let kill_due = running.start_ns + (args.kill_at_secs * 1e9) as u64;
    tokio::time::sleep_until(instant_at(kill_due).into()).await;
    // The stand-in that answered most of this run: under cache-aware routing one body's requests go to the node its
    // prefix ranks first (and spill from there), so the node killed is one that carries the traffic.
    let busiest = answered().iter().zip(&before).map(|(now, then)| now - then).enumerate().max_by_key(|(_, n)| *n);
    let killed = busiest.map_or(0, |(i, _)| i);
    standins.kill(killed);
    let killed_node = nodes.get(killed).copied().unwrap_or_default();
    let kill_ns = monotonic_ns();
    let start_ns = running.start_ns;
    let records = running.finish().await?;

    let mut errors = ErrorCounts::default();
    let mut ok = 0;
    let (mut before_kill, mut after_first_second) = (0, 0);
    let mut by_second = vec![0; args.failover_secs.ceil() as usize];
    let (mut latencies, mut after_kill) = (Vec::new(), Vec::new());
    for record in &records {
        let failure = match &record.outcome {
            Ok(exchange) if exchange.status != 200 => Some(format!("HTTP {}", exchange.status)),
            Ok(exchange) if record.job.stream && !(exchange.done && exchange.events.len() == args.chunks) => {
                Some("stream cut".to_owned())
            }
            Ok(exchange) => {
                ok += 1;
                if !record.job.stream {
                    let latency = exchange.end_ns.saturating_sub(record.due_ns);
                    latencies.push(latency);
                    if (kill_ns..kill_ns + 1_000_000_000).contains(&record.due_ns) {
                        after_kill.push(latency);
                    }
                }
                None
            }
            Err(label) => Some(label.clone()),
        };
        if let Some(failure) = failure {
            errors.add(failure);
            before_kill += u64::from(record.due_ns < kill_ns);
            after_first_second += u64::from(record.due_ns >= kill_ns + 1_000_000_000);
            let second = (record.due_ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
            if let Some(slot) = by_second.get_mut(second) {
                *slot += 1;
            }
        }
    }
    let requests = records.len() as u64;
    Ok(FailoverReport {
        rate_rps: args.failover_rate,
        secs: args.failover_secs,
        kill_at_secs: args.kill_at_secs,
        stream_share: share,
        killed_node,
        requests,
        ok,
        error_total: errors.total(),
        error_pct: if requests == 0 { 0.0 } else { errors.total() as f64 * 100.0 / requests as f64 },
        errors,
        errors_before_kill: before_kill,
        errors_after_first_second: after_first_second,
        errors_by_second: by_second,
        latency: LatencySummary::from_nanos(latencies),
        latency_after_kill: LatencySummary::from_nanos(after_kill),
        killed_node_routing: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_share_is_spread_evenly() {
        let streams: Vec<u64> = (0..1000).filter(|&i| is_stream(i, 0.1)).collect();
        assert_eq!(streams.len(), 100);
        assert!(streams.windows(2).all(|w| w[1] - w[0] == 10));
        assert!((0..100).all(|i| !is_stream(i, 0.0)));
        assert!((0..100).all(|i| is_stream(i, 1.0)));
    }
}
