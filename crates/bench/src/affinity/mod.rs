//! `bench affinity`: cache-aware routing against least-loaded (SPEC §13), on stand-in runtimes that keep a prefix
//! cache, both policies in the same run on the same stand-ins.
//!
//! `--nodes` stand-ins (see `runtime`) are started once. For each policy a router is started with
//! `--routing-policy`, the stand-ins are registered and approved, and they heartbeat every second with their own
//! queue and cache use as `load`. Then each workload of `--workloads` (see `workload`) runs on emptied caches: an
//! open-loop schedule at its rate, `--warmup-secs` unmeasured then `--secs` measured, each request's time to first
//! token counted from its due instant, and the answers drained. With `--postgres`, two routers on one fresh
//! database then share the `shared` workload, requests alternating between them, under cache-aware routing.
//!
//! What is compared is SPEC §13's list: the P90 time to first token of each workload under both policies, the
//! requests completed, how the requests spread over the stand-ins, and the share of prompt tokens the stand-ins
//! found cached.

mod runtime;
mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use llm_router_protocol::HeartbeatRequest;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::balance::wait_for_model;
use crate::cli::AffinityArgs;
use crate::fleet::{self, NodeCredentials};
use crate::heartbeat::start_routers;
use crate::http::{Client, encode_request};
use crate::postgres;
use crate::proxy::{self, HEARTBEAT_PERIOD, MODEL};
use crate::router::{Router, RouterSpec};
use crate::stats::{self, ErrorCounts, LatencySummary};

pub use runtime::{CachedRuntimes, Model};
pub use workload::Workload;
use workload::{Prompts, Record};

/// What `bench affinity` reports.
#[derive(Debug, Serialize)]
pub struct AffinityReport {
    pub nodes: usize,
    pub slots: usize,
    pub prefill_tokens_per_sec: f64,
    pub cache_tokens: u64,
    pub phases: Vec<Phase>,
    /// SPEC §13's figures, from the phases.
    pub checks: Vec<Check>,
}

/// One workload under one policy.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub workload: Workload,
    pub policy: &'static str,
    pub routers: usize,
    pub rate: f64,
    /// Requests due in the measured window.
    pub measured: u64,
    /// Of those, answered in full.
    pub ok: u64,
    /// Of those, answered in full before the last one was due.
    pub completed_in_window: u64,
    pub errors: ErrorCounts,
    /// From each measured request's due instant to its first event.
    pub ttft: LatencySummary,
    /// Prompt tokens the stand-ins found cached, over all they were sent (warm-up included).
    pub hit_rate: f64,
    /// Requests each stand-in answered (warm-up included).
    pub answered: Vec<u64>,
    /// Most answered by one stand-in over least answered by one.
    pub spread: f64,
    /// The router's `llm_router_inference_routed_total` by `how` (summed over routers).
    pub routed: BTreeMap<String, u64>,
}

/// One of SPEC §13's figures: what was measured, the bound, and whether it held.
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub measured: String,
    pub bound: String,
    pub holds: bool,
}

const POLICIES: [&str; 2] = ["least-loaded", "cache-aware"];

/// Runs the whole mode.
pub async fn run(spec: &RouterSpec, args: &AffinityArgs) -> anyhow::Result<AffinityReport> {
    let runtimes = Arc::new(CachedRuntimes::start(args.nodes, model(args))?);
    let prefixes = Prompts::system_prompts(args.prefixes, args.prefix_tokens);
    let mut phases = Vec::new();
    for policy in POLICIES {
        let mut spec = spec.clone();
        spec.data_dir = spec.data_dir.join(policy);
        spec.extra_args.extend(["--inference-auth", "none", "--routing-policy", policy].map(str::to_owned));
        let routers = start_routers(&spec, 1, None).await?;
        let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.addr).collect();
        let measured =
            measure(&addrs, &spec.admin_password, &runtimes, args, &prefixes, policy, &args.workloads, &[1]).await;
        stop_all(routers).await?;
        phases.extend(measured?);
    }
    if let Some(server) = &args.postgres {
        let database = postgres::Database::create(server).await?;
        let mut spec = spec.clone();
        spec.data_dir = spec.data_dir.join("postgres");
        spec.extra_args.extend(["--inference-auth", "none", "--routing-policy", "cache-aware"].map(str::to_owned));
        let measured = async {
            let routers = start_routers(&spec, 2, Some(&database.url)).await?;
            let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.addr).collect();
            let (password, shared) = (&spec.admin_password, [Workload::Shared]);
            let measured = measure(&addrs, password, &runtimes, args, &prefixes, "cache-aware", &shared, &[1, 2]).await;
            stop_all(routers).await?;
            measured
        }
        .await;
        database.remove().await?;
        phases.extend(measured?);
    }
    let checks = checks(&phases);
    Ok(AffinityReport {
        nodes: args.nodes,
        slots: args.slots,
        prefill_tokens_per_sec: args.prefill_tokens_per_sec,
        cache_tokens: args.cache_tokens,
        phases,
        checks,
    })
}

/// How the stand-ins compute and answer, from the command line.
fn model(args: &AffinityArgs) -> Model {
    Model {
        name: MODEL.to_owned(),
        slots: args.slots,
        prefill_tokens_per_sec: args.prefill_tokens_per_sec,
        cache_tokens: args.cache_tokens,
        chunks: args.chunks,
        chunk_gap: Duration::from_secs_f64(args.chunk_gap_ms / 1000.0),
    }
}

async fn stop_all(routers: Vec<Router>) -> anyhow::Result<()> {
    let mut stopped = Ok(());
    for router in routers {
        stopped = stopped.and(router.stop().await);
    }
    stopped
}

/// Registers the stand-ins on the first router, keeps them heartbeating there, and runs each of `workloads`
/// through the first router, then through the first two, ... for each count in `fanouts`.
#[allow(clippy::too_many_arguments)]
async fn measure(
    routers: &[SocketAddr],
    admin_password: &str,
    runtimes: &Arc<CachedRuntimes>,
    args: &AffinityArgs,
    prefixes: &[String],
    policy: &'static str,
    workloads: &[Workload],
    fanouts: &[usize],
) -> anyhow::Result<Vec<Phase>> {
    let first = routers[0];
    let host = first.to_string();
    let nodes = proxy::register(first, &host, runtimes.addrs()).await?;
    let session = fleet::login(first, &host, admin_password).await?;
    fleet::approve_nodes(first, &host, &session, &nodes, 16).await?;
    let heartbeat_errors = Arc::new(AtomicU64::new(0));
    let heartbeats = heartbeat_with_load(first, &host, &nodes, runtimes.clone(), heartbeat_errors.clone());
    let result = async {
        for &router in routers {
            wait_for_model(router).await?;
        }
        let mut phases = Vec::new();
        for &workload in workloads {
            for &fanout in fanouts {
                let addrs = &routers[..fanout.min(routers.len())];
                phases.push(run_phase(addrs, runtimes, args, prefixes, policy, workload).await?);
            }
        }
        anyhow::Ok(phases)
    }
    .await;
    heartbeats.abort();
    let phases = result?;
    let errors = heartbeat_errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} heartbeats were not answered 200");
    }
    Ok(phases)
}

/// Runs `workload` on emptied caches through `routers`, requests alternating between them.
async fn run_phase(
    routers: &[SocketAddr],
    runtimes: &CachedRuntimes,
    args: &AffinityArgs,
    prefixes: &[String],
    policy: &'static str,
    workload: Workload,
) -> anyhow::Result<Phase> {
    let before = routed(routers).await?;
    runtimes.reset();
    let (rate, secs) = match workload {
        Workload::Fresh => (args.fresh_rate, args.fresh_secs),
        Workload::Shared | Workload::Hot => (args.rate, args.secs),
    };
    eprintln!("{policy}, {} router(s): {} at {rate}/s for {secs:.0} s...", routers.len(), workload.name());
    let prompts = Arc::new(Prompts {
        workload,
        prefixes: prefixes.to_vec(),
        question_tokens: args.question_tokens,
        fresh_tokens: args.fresh_tokens,
        hot_share: args.hot_share,
        seed: args.seed,
    });
    let count = (rate * (args.warmup_secs + secs)).round() as u64;
    let (start_ns, records) = workload::run(routers, rate, count, args.connections, prompts).await?;
    let after = routed(routers).await?;
    let window = Window {
        from_ns: start_ns + (args.warmup_secs * 1e9) as u64,
        to_ns: start_ns + ((args.warmup_secs + secs) * 1e9) as u64,
    };
    Ok(phase(workload, policy, routers.len(), rate, &records, window, runtimes, before, after))
}

/// The measured part of a run, on the stand-ins' clock.
#[derive(Debug, Clone, Copy)]
struct Window {
    from_ns: u64,
    to_ns: u64,
}

#[allow(clippy::too_many_arguments)]
fn phase(
    workload: Workload,
    policy: &'static str,
    routers: usize,
    rate: f64,
    records: &[Record],
    window: Window,
    runtimes: &CachedRuntimes,
    before: BTreeMap<String, u64>,
    after: BTreeMap<String, u64>,
) -> Phase {
    let measured: Vec<&Record> =
        records.iter().filter(|r| (window.from_ns..window.to_ns).contains(&r.due_ns)).collect();
    let mut errors = ErrorCounts::default();
    let mut ttft = Vec::new();
    let mut completed_in_window = 0;
    for record in &measured {
        match (&record.outcome, record.first_ns) {
            (Ok(()), Some(first)) => {
                ttft.push(first.saturating_sub(record.due_ns));
                if record.end_ns <= window.to_ns {
                    completed_in_window += 1;
                }
            }
            (Err(kind), _) => errors.add(kind.clone()),
            (Ok(()), None) => errors.add("no event"),
        }
    }
    let answered: Vec<u64> =
        (0..runtimes.addrs().len()).map(|i| runtimes.counters(i).answered.load(Ordering::Relaxed)).collect();
    let (prompt, cached) = (0..runtimes.addrs().len()).fold((0u64, 0u64), |(p, c), i| {
        let counters = runtimes.counters(i);
        (p + counters.prompt_tokens.load(Ordering::Relaxed), c + counters.cached_tokens.load(Ordering::Relaxed))
    });
    let routed = after.iter().map(|(how, n)| (how.clone(), n - before.get(how).copied().unwrap_or(0))).collect();
    Phase {
        workload,
        policy,
        routers,
        rate,
        measured: measured.len() as u64,
        ok: ttft.len() as u64,
        completed_in_window,
        errors,
        ttft: LatencySummary::from_nanos(ttft),
        hit_rate: if prompt == 0 { 0.0 } else { cached as f64 / prompt as f64 },
        spread: stats::spread(&answered),
        answered,
        routed,
    }
}

/// `llm_router_inference_routed_total` of the model, by `how`, summed over the routers.
async fn routed(routers: &[SocketAddr]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for &addr in routers {
        let mut client = Client::new(addr);
        let answer = client.send(&encode_request("GET", "/metrics", &addr.to_string(), &[], b"")).await?;
        if answer.status != 200 {
            bail!("GET /metrics answered HTTP {}", answer.status);
        }
        let text = String::from_utf8_lossy(client.body()).into_owned();
        for (how, n) in routed_counts(&text) {
            *counts.entry(how).or_insert(0) += n;
        }
    }
    Ok(counts)
}

/// Reads `llm_router_inference_routed_total{model="…",how="…"} N` lines of the bench's model.
fn routed_counts(text: &str) -> Vec<(String, u64)> {
    let model = format!("model=\"{MODEL}\"");
    text.lines()
        .filter(|line| line.starts_with("llm_router_inference_routed_total{") && line.contains(&model))
        .filter_map(|line| {
            let how = line.split("how=\"").nth(1)?.split('"').next()?.to_owned();
            let n = line.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((how, n))
        })
        .collect()
}

/// Sends every node's heartbeat, with its stand-in's `load` as it is at that moment, every second until aborted;
/// counts the ones not answered 200.
fn heartbeat_with_load(
    addr: SocketAddr,
    host: &str,
    nodes: &[NodeCredentials],
    runtimes: Arc<CachedRuntimes>,
    errors: Arc<AtomicU64>,
) -> JoinHandle<()> {
    let (host, nodes) = (host.to_owned(), nodes.to_vec());
    tokio::spawn(async move {
        let mut client = Client::new(addr);
        let mut ticks = tokio::time::interval(HEARTBEAT_PERIOD);
        loop {
            ticks.tick().await;
            for (i, node) in nodes.iter().enumerate() {
                let heartbeat = HeartbeatRequest { load: Some(runtimes.load(i)), ..fleet::heartbeat(i, node.id) };
                let sent = match serde_json::to_vec(&heartbeat) {
                    Ok(body) => client.send(&fleet::heartbeat_request(&host, node, &body)).await.ok(),
                    Err(_) => None,
                };
                if sent.is_none_or(|answer| answer.status != 200) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// SPEC §13's figures, for the workloads that ran under both policies.
fn checks(phases: &[Phase]) -> Vec<Check> {
    let find = |workload: Workload, policy: &str, routers: usize| {
        phases.iter().find(|p| p.workload == workload && p.policy == policy && p.routers == routers)
    };
    let mut checks = Vec::new();
    let pair = |workload| Some((find(workload, "least-loaded", 1)?, find(workload, "cache-aware", 1)?));
    if let Some((least, aware)) = pair(Workload::Shared) {
        let ratio = least.ttft.p90_ms / aware.ttft.p90_ms.max(f64::MIN_POSITIVE);
        checks.push(Check {
            what: "shared prefixes: P90 time to first token, least-loaded over cache-aware".to_owned(),
            measured: format!("{:.1} ms / {:.1} ms = {ratio:.1}x", least.ttft.p90_ms, aware.ttft.p90_ms),
            bound: ">= 5x".to_owned(),
            holds: ratio >= 5.0,
        });
        checks.push(Check {
            what: "shared prefixes: requests completed in the window, cache-aware against least-loaded".to_owned(),
            measured: format!("{} against {}", aware.completed_in_window, least.completed_in_window),
            bound: "no fewer".to_owned(),
            holds: aware.completed_in_window >= least.completed_in_window && aware.ok >= least.ok,
        });
    }
    if let Some((least, aware)) = pair(Workload::Fresh) {
        let ratio = aware.ttft.p90_ms / least.ttft.p90_ms.max(f64::MIN_POSITIVE);
        checks.push(Check {
            what: "fresh prompts: P90 time to first token, cache-aware over least-loaded".to_owned(),
            measured: format!("{:.1} ms / {:.1} ms = {ratio:.3}", aware.ttft.p90_ms, least.ttft.p90_ms),
            bound: "<= 1.10".to_owned(),
            holds: ratio <= 1.10,
        });
        checks.push(Check {
            what: "fresh prompts: requests per stand-in, most over least, cache-aware".to_owned(),
            measured: format!("{:.3} ({:?})", aware.spread, aware.answered),
            bound: "<= 1.2".to_owned(),
            holds: aware.spread <= 1.2,
        });
    }
    if let Some((least, aware)) = pair(Workload::Hot) {
        checks.push(Check {
            what: "one hot prefix: P90 time to first token, cache-aware against least-loaded".to_owned(),
            measured: format!("{:.1} ms against {:.1} ms", aware.ttft.p90_ms, least.ttft.p90_ms),
            bound: "no worse".to_owned(),
            holds: aware.ttft.p90_ms <= least.ttft.p90_ms,
        });
    }
    // The one-router figure it is compared with ran on the same routers and nodes, just before.
    if let Some(at) = phases.iter().position(|p| p.routers == 2)
        && let Some(one) = at.checked_sub(1).map(|before| &phases[before])
    {
        let two = &phases[at];
        let points = (one.hit_rate - two.hit_rate).abs() * 100.0;
        checks.push(Check {
            what: "shared prefixes: cache hit rate, two routers on PostgreSQL against one of them alone".to_owned(),
            measured: format!(
                "{:.1} % against {:.1} % ({points:.1} points)",
                two.hit_rate * 100.0,
                one.hit_rate * 100.0
            ),
            bound: "within 3 points".to_owned(),
            holds: points <= 3.0,
        });
    }
    checks
}

/// The report for people.
pub fn print(report: &AffinityReport) {
    println!(
        "affinity: {} stand-ins, {} slots each, prefill {:.0} tokens/s per slot, cache {} tokens each",
        report.nodes, report.slots, report.prefill_tokens_per_sec, report.cache_tokens
    );
    for phase in &report.phases {
        println!(
            "  {:<7} {:<13} {} router{} at {}/s: {} measured, {} ok ({} in the window), errors: {}",
            phase.workload.name(),
            phase.policy,
            phase.routers,
            if phase.routers == 1 { "" } else { "s" },
            phase.rate,
            phase.measured,
            phase.ok,
            phase.completed_in_window,
            phase.errors.line()
        );
        println!("          time to first token {}", phase.ttft.line());
        println!(
            "          cache hits {:.1} % of prompt tokens; answered {:?} (most / least {:.2}); routed {:?}",
            phase.hit_rate * 100.0,
            phase.answered,
            phase.spread,
            phase.routed
        );
    }
    for check in &report.checks {
        let verdict = if check.holds { "holds" } else { "FAILS" };
        println!("  {verdict:<5} {}: {} (bound {})", check.what, check.measured, check.bound);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Mode};
    use crate::router::InProcess;

    fn args(line: &str) -> AffinityArgs {
        let cli = Cli::try_parse_from(["bench", "affinity"].into_iter().chain(line.split_whitespace())).expect("args");
        let Mode::Affinity(args) = cli.mode else { panic!("affinity expected") };
        args
    }

    /// The shared workload, briefly and well below the stand-ins' capacity, through a least-loaded router and a
    /// cache-aware one: every request is answered; under cache-aware routing each prefix stays on its node, so the
    /// stand-ins find far more of the prompts cached, and the router counts its choices as affinity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_aware_routing_finds_the_prompts_cached_where_least_loaded_does_not() {
        use llm_router::config::RoutingPolicy;

        let args = args(
            "--nodes 3 --slots 4 --prefill-tokens-per-sec 400000 --cache-tokens 1792 --chunks 2 --chunk-gap-ms 1 \
             --prefixes 12 --prefix-tokens 256 --question-tokens 16 --rate 150 --secs 1.5 --warmup-secs 0.5 \
             --connections 32",
        );
        let runtimes = Arc::new(CachedRuntimes::start(args.nodes, model(&args)).expect("stand-ins"));
        let prefixes = Prompts::system_prompts(args.prefixes, args.prefix_tokens);
        let mut phases = Vec::new();
        for (name, policy) in [("least-loaded", RoutingPolicy::LeastLoaded), ("cache-aware", RoutingPolicy::CacheAware)]
        {
            let router = InProcess::start(policy).await;
            let password = &router.admin_password;
            let measured =
                measure(&[router.addr], password, &runtimes, &args, &prefixes, name, &[Workload::Shared], &[1]).await;
            router.stop().await;
            phases.extend(measured.expect("the run completes"));
        }
        let [least, aware] = [&phases[0], &phases[1]];
        for phase in [least, aware] {
            assert_eq!((phase.measured, phase.ok, phase.errors.total()), (225, 225, 0), "{phase:?}");
            // Every request, warm-up included, was answered by a stand-in, and counted by the router.
            assert_eq!(phase.answered.iter().sum::<u64>(), 300, "{phase:?}");
            assert_eq!(phase.routed.values().sum::<u64>(), 300, "{phase:?}");
        }
        assert_eq!(least.routed.get("least_loaded"), Some(&300));
        assert!(aware.routed.get("affinity").is_some_and(|&n| n >= 240), "{:?}", aware.routed);
        // Each stand-in's cache holds about six of the twelve prefixes: least-loaded sends every prefix everywhere,
        // cache-aware each to one node (four on average).
        eprintln!("hit rates: least-loaded {:.3}, cache-aware {:.3}", least.hit_rate, aware.hit_rate);
        assert!(least.hit_rate < aware.hit_rate - 0.2, "{least:?} against {aware:?}");
        let checks = checks(&phases);
        assert_eq!(checks.len(), 2, "P90 and completed, for the shared workload: {checks:?}");
    }

    #[test]
    fn reads_the_routed_counts_of_the_model() {
        let text = format!(
            "# TYPE llm_router_inference_routed counter\n\
             llm_router_inference_routed_total{{model=\"{MODEL}\",how=\"affinity\"}} 12\n\
             llm_router_inference_routed_total{{model=\"other\",how=\"affinity\"}} 5\n\
             llm_router_inference_routed_total{{model=\"{MODEL}\",how=\"spilled\"}} 3\n"
        );
        assert_eq!(routed_counts(&text), vec![("affinity".to_owned(), 12), ("spilled".to_owned(), 3)]);
    }
}
