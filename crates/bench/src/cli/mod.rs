//! Command line of `bench`: the global options, the modes, and their arguments; those of the modes that run the
//! router in front of runtimes are in `runtimes`.

use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

mod runtimes;
mod tenants;

pub use runtimes::{AffinityArgs, BalanceArgs, BodiesArgs, FairnessArgs, ProbeArgs, ProxyArgs, Scenario};
pub use tenants::{LimitsArgs, UsageArgs};

/// Load and start-up benchmarks of llm-router. Every mode starts the real router binary on a fresh temporary data
/// directory and stops it at the end.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,

    /// The router binary. Default: the `llm-router` beside this executable (same target directory and profile).
    #[arg(long, global = true)]
    pub router_bin: Option<PathBuf>,

    /// Print the results as one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Keep the router's data directory at the end (its path is printed on stderr), e.g. to inspect a seeded
    /// database.
    #[arg(long, global = true)]
    pub keep_data: bool,

    /// Worker threads of the load generator. It shares the machine's cores with the router.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub client_threads: u16,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Register and approve a fleet, then drive heartbeats at it and report throughput and latency.
    Heartbeat(HeartbeatArgs),
    /// Every node of a fleet changes status together (registering -> online -> offline -> online) while it
    /// heartbeats: heartbeat latency during the storms and the time until every change is durable.
    Storm(StormArgs),
    /// Build a database with a large fleet, then time router start-ups on it.
    Startup(StartupArgs),
    /// Time registrations (reachability check off).
    Register(RegisterArgs),
    /// Point registrations at hostile runtimes (reachability check on): a 1 GiB model list, a lying length, 200,000
    /// models; report the answers and the router's peak memory.
    Probe(ProbeArgs),
    /// Send wrong-password sign-ins from parallel attackers while timing a legitimate sign-in; report the router's
    /// peak memory.
    Logins(LoginsArgs),
    /// Hold many half-open connections against a router under a low open-file limit and time `GET /healthz` on
    /// fresh connections meanwhile.
    Connections(ConnectionsArgs),
    /// Measure what the router's /v1 proxy adds, against stand-in runtimes called directly in the same run:
    /// non-streaming latency, streamed events, and a runtime killed under load.
    Proxy(ProxyArgs),
    /// Several routers on one PostgreSQL database in front of stand-in runtimes: how streams spread over the
    /// nodes, and how many each node answers at once, when every router counts only its own requests.
    Balance(BalanceArgs),
    /// Cache-aware routing against least-loaded (SPEC §13) on stand-in runtimes that keep a prefix cache: time to
    /// first token, requests completed, spread and cache hits of shared, fresh and hot-prefix workloads.
    Affinity(AffinityArgs),
    /// The queue's fair share (SPEC §14) against first-come order: one node at its `max_concurrency`, one API key
    /// keeping requests waiting, another sending one at a time; how long the latter's requests wait.
    Fairness(FairnessArgs),
    /// A burst of large `/v1` request bodies at once: the router's memory during the burst and after it.
    Bodies(BodiesArgs),
    /// A month of a busy fleet's usage (100 million requests) written into a fresh database as the router leaves it
    /// (roll-ups of the period, raw rows of the last days): its storage, and how fast the router answers 30-day
    /// usage queries and the dashboard's last hour on it (SPEC §14).
    Usage(UsageArgs),
    /// One API key's `requests_per_minute` held by several routers sharing a PostgreSQL database (or one on SQLite),
    /// offered 2-3 times the limit: requests admitted and refused per calendar minute, against SPEC §14's bound.
    Limits(LimitsArgs),
    /// The placer's decision of deployments (SPEC §15) at fleet scale, on the router library alone: the first pass,
    /// a pass that changes nothing, a pass after failures.
    Placement(PlacementArgs),
    /// Write a fleet of approved nodes with heartbeat figures (and one in 1000 pending) into a data directory, for a
    /// router to be started on later. Node i's id and token are derived from i, for `bench pulse`.
    Seed(SeedArgs),
    /// Heartbeat as every node of a fleet written by `bench seed`, to a router already running on it: one heartbeat
    /// per node per interval, spread evenly, with figures that change from one to the next.
    Pulse(PulseArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PlacementArgs {
    /// Nodes in the fleet, all approved.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub nodes: usize,
    /// Of those, nodes whose agents run `--manage-runtimes`.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub managed: usize,
    /// Deployments.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub deployments: usize,
    /// Replicas of each.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub replicas: u32,
    /// Times to measure each pass; the medians are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000).map(|n| n as usize))]
    pub runs: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// The router's data directory (created if missing); the nodes go into its `router.db`. No router may be
    /// running on it.
    #[arg(long)]
    pub data_dir: PathBuf,

    /// Nodes to write.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub nodes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct PulseArgs {
    /// The router, as `http://IP:PORT` (what it prints after "llm-router listening on").
    #[arg(long)]
    pub url: String,

    /// Nodes of the seeded fleet to heartbeat as: 0 to N - 1 (`--nodes` of `bench seed`, or fewer).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub nodes: usize,

    /// Seconds between two heartbeats of one node (the router asks for 10).
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub interval_secs: f64,

    /// Seconds to run; it also stops, and reports, on SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Stop once every node has sent this many heartbeats (or earlier, at `--secs`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub rounds: Option<usize>,

    /// Persistent connections, each heartbeating for its share of the nodes in turn.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub connections: usize,

    /// Seconds between two progress lines on stderr.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub progress_secs: f64,
}

#[derive(Debug, Clone, Args)]
pub struct HeartbeatArgs {
    /// Nodes to register, approve and heartbeat for.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub nodes: usize,

    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Unmeasured seconds before the measured window.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_secs)]
    pub warmup_secs: f64,

    /// Persistent connections, each sending heartbeats back-to-back for its share of the nodes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize),
          conflicts_with = "connection_per_node")]
    pub connections: usize,

    /// One persistent connection per node instead, as a real fleet connects.
    #[arg(long)]
    pub connection_per_node: bool,

    /// Heartbeats per second per node, on a schedule; default: as fast as answers come.
    #[arg(long, value_parser = positive_rate)]
    pub rate_per_node_hz: Option<f64>,

    /// Registrations and approvals in flight at once while setting up the fleet.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024).map(|n| n as usize))]
    pub setup_concurrency: usize,

    /// Routers sharing one PostgreSQL database (SPEC §11); the connections are spread over them in turn. More
    /// than one needs --postgres.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16).map(|n| n as usize))]
    pub routers: usize,

    /// A PostgreSQL server to run the routers on (`postgres://user@host:port/db` of a user that may create
    /// databases, e.g. what `scripts/postgres.sh start DIR` prints): the bench creates a fresh database on it and
    /// drops it at the end. Default: SQLite in the data directory.
    #[arg(long)]
    pub postgres: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Nodes to register and approve; all of them change status in each storm.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub nodes: usize,

    /// Seconds of heartbeats measured from the start of each storm.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Persistent connections, each sending heartbeats back-to-back for its share of the nodes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub connections: usize,

    /// Registrations, approvals and setup heartbeats in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024).map(|n| n as usize))]
    pub setup_concurrency: usize,
}

#[derive(Debug, Clone, Args)]
pub struct StartupArgs {
    /// Nodes written into the database.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000).map(|n| n as usize))]
    pub nodes: usize,

    /// Router starts to time; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100).map(|n| n as usize))]
    pub runs: usize,

    /// Leave the figures of a last heartbeat (CPU, memory, 8 GPUs) out of every node, to see what they cost.
    #[arg(long)]
    pub no_metrics: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// Registrations to send.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub count: usize,

    /// Registrations in flight at once, each on its own keep-alive connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024).map(|n| n as usize))]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Args)]
pub struct LoginsArgs {
    /// Attackers, each on its own keep-alive connection sending wrong passwords back-to-back.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096).map(|n| n as usize))]
    pub attackers: usize,

    /// Seconds the attack lasts.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Milliseconds between two sign-ins of the legitimate user.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub pause_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// Half-open connections to hold: TCP connected, part of a request's headers sent, never finished.
    #[arg(long, default_value_t = 1100, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub half_open: usize,

    /// Open-file limit the router runs under, soft and hard.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=1_048_576))]
    pub open_file_limit: u64,

    /// `GET /healthz` requests to time, one after another, each on a fresh connection.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub requests: usize,

    /// Reopen every half-open connection the router closes, at once, so that the router stays at its cap.
    #[arg(long)]
    pub reopen: bool,
}

fn parse_secs(text: &str, allow_zero: bool) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !value.is_finite() || value < 0.0 || (value == 0.0 && !allow_zero) || value > 86_400.0 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(value)
}

fn positive_secs(text: &str) -> Result<f64, String> {
    parse_secs(text, false)
}

fn non_negative_secs(text: &str) -> Result<f64, String> {
    parse_secs(text, true)
}

fn positive_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a rate in Hz"))?;
    if !value.is_finite() || value <= 0.0 || value > 1e6 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(value)
}

fn positive_ms(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of milliseconds"))?;
    if !value.is_finite() || value <= 0.0 || value > 60_000.0 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(value)
}

fn share(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a share"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("`{text}` is not between 0 and 1"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.split_whitespace()))
    }

    #[test]
    fn the_documented_commands_parse() {
        Cli::command().debug_assert();
        let cli = parse("heartbeat --nodes 10000 --secs 10 --connections 64").expect("parse");
        let Mode::Heartbeat(args) = cli.mode else { panic!("heartbeat expected") };
        assert_eq!((args.nodes, args.connections, args.secs, args.warmup_secs), (10_000, 64, 10.0, 1.0));
        let cli = parse("heartbeat --nodes 10000 --secs 10 --connection-per-node --json").expect("parse");
        assert!(cli.json);
        assert!(matches!(cli.mode, Mode::Heartbeat(HeartbeatArgs { connection_per_node: true, .. })));
        let cli = parse("startup --nodes 100000").expect("parse");
        assert!(matches!(cli.mode, Mode::Startup(StartupArgs { nodes: 100_000, runs: 3, no_metrics: false })));
        let cli = parse("register --count 2000 --concurrency 16").expect("parse");
        assert!(matches!(cli.mode, Mode::Register(RegisterArgs { count: 2000, concurrency: 16 })));
        let cli = parse("probe --registrations 32").expect("parse");
        assert!(matches!(cli.mode, Mode::Probe(ProbeArgs { registrations: 32, stream_mib: 1024, models: 200_000 })));
        let cli = parse("logins --attackers 32 --secs 10").expect("parse");
        assert!(matches!(cli.mode, Mode::Logins(LoginsArgs { attackers: 32, secs: 10.0, pause_ms: 100 })));
        let cli = parse("connections").expect("parse");
        assert!(matches!(
            cli.mode,
            Mode::Connections(ConnectionsArgs { half_open: 1100, open_file_limit: 1024, requests: 200, reopen: false })
        ));
        let cli = parse("connections --half-open 5000 --open-file-limit 4096 --reopen").expect("parse");
        assert!(matches!(cli.mode, Mode::Connections(ConnectionsArgs { half_open: 5000, reopen: true, .. })));
        let cli = parse("proxy").expect("parse");
        let Mode::Proxy(args) = cli.mode else { panic!("proxy expected") };
        assert_eq!(
            (args.nodes, args.rate, args.stream_rate, args.chunks, args.failover_rate),
            (10, 5000.0, 100.0, 100, 1000.0)
        );
        assert_eq!(args.scenarios, [Scenario::Completions, Scenario::Streams, Scenario::Failover]);
        let cli = parse("proxy --scenarios failover,completions --chunk-gap-ms 2.5").expect("parse");
        let Mode::Proxy(args) = cli.mode else { panic!("proxy expected") };
        assert_eq!(args.scenarios, [Scenario::Failover, Scenario::Completions]);
        assert_eq!(args.chunk_gap_ms, 2.5);
        let cli = parse("seed --data-dir /tmp/fleet --nodes 100000").expect("parse");
        let Mode::Seed(args) = cli.mode else { panic!("seed expected") };
        assert_eq!((args.data_dir, args.nodes), (PathBuf::from("/tmp/fleet"), 100_000));
        let cli =
            parse("pulse --url http://127.0.0.1:8080 --nodes 100000 --interval-secs 10 --secs 600").expect("parse");
        let Mode::Pulse(args) = cli.mode else { panic!("pulse expected") };
        assert_eq!(
            (args.url.as_str(), args.nodes, args.interval_secs, args.secs),
            ("http://127.0.0.1:8080", 100_000, 10.0, 600.0)
        );
        assert_eq!((args.connections, args.progress_secs, args.rounds), (64, 10.0, None));
        let cli = parse("fairness").expect("parse");
        let Mode::Fairness(args) = cli.mode else { panic!("fairness expected") };
        assert_eq!((args.service_ms, args.max_concurrency, args.backlog, args.requests), (20.0, 2, 50, 100));
        let cli = parse("fairness --orders arrival --requests 10").expect("parse");
        let Mode::Fairness(args) = cli.mode else { panic!("fairness expected") };
        assert_eq!((args.orders.as_slice(), args.requests), ([llm_router::config::QueueOrder::Arrival].as_slice(), 10));
    }

    #[test]
    fn rejects_contradictions_and_nonsense() {
        assert!(parse("heartbeat --connections 8 --connection-per-node").is_err());
        assert!(parse("heartbeat --nodes 0").is_err());
        assert!(parse("heartbeat --secs 0").is_err());
        assert!(parse("heartbeat --secs nan").is_err());
        assert!(parse("heartbeat --rate-per-node-hz -1").is_err());
        assert!(parse("startup --runs 0").is_err());
        assert!(parse("probe --registrations 0").is_err());
        assert!(parse("logins --attackers 0").is_err());
        assert!(parse("connections --half-open 0").is_err());
        assert!(parse("connections --open-file-limit 10").is_err());
        assert!(parse("proxy --nodes 2").is_err());
        assert!(parse("proxy --stream-share 1.5").is_err());
        assert!(parse("proxy --chunk-gap-ms 0").is_err());
        assert!(parse("proxy --scenarios nonsense").is_err());
        assert!(parse("fairness --orders random").is_err());
        assert!(parse("fairness --backlog 0").is_err());
        assert!(parse("seed --nodes 10").is_err(), "seed needs a data directory");
        assert!(parse("seed --data-dir d --nodes 0").is_err());
        assert!(parse("pulse --nodes 10").is_err(), "pulse needs the router's address");
        assert!(parse("pulse --url http://127.0.0.1:1 --interval-secs 0").is_err());
    }

    #[test]
    fn usage_limits_and_the_proxy_with_limits_parse() {
        let cli = parse("usage --postgres postgres://u@h/db --raw-days 1 --explain").expect("parse");
        let Mode::Usage(args) = cli.mode else { panic!("usage expected") };
        assert_eq!((args.postgres.as_deref(), args.raw_days(), args.explain), (Some("postgres://u@h/db"), 1, true));
        let cli = parse("limits --postgres postgres://u@h/db").expect("parse");
        let Mode::Limits(args) = cli.mode else { panic!("limits expected") };
        assert_eq!((args.routers(), args.rpm, args.minutes, args.offered), (2, 600, 3, 2.5));
        let cli = parse("limits --rpm 60 --minutes 1").expect("parse");
        let Mode::Limits(args) = cli.mode else { panic!("limits expected") };
        assert_eq!((args.routers(), args.rpm, args.minutes), (1, 60, 1));
        assert!(parse("limits --rpm 0").is_err());
        assert!(parse("limits --offered 0").is_err());
        assert!(parse("usage --days 0").is_err());
        let cli = parse("proxy --scenarios completions --limits").expect("parse");
        let Mode::Proxy(args) = cli.mode else { panic!("proxy expected") };
        assert!(args.limits);
        assert!(!matches!(parse("proxy").expect("parse").mode, Mode::Proxy(ProxyArgs { limits: true, .. })));
    }

    #[test]
    fn several_routers_on_postgres() {
        let cli = Cli::try_parse_from(["bench", "heartbeat", "--routers", "2", "--postgres", "postgres://u@h/db"])
            .expect("parse");
        let Mode::Heartbeat(args) = cli.mode else { panic!("not heartbeat") };
        assert_eq!((args.routers, args.postgres.as_deref()), (2, Some("postgres://u@h/db")));
        assert!(Cli::try_parse_from(["bench", "heartbeat", "--routers", "0"]).is_err());
        assert!(Cli::try_parse_from(["bench", "balance"]).is_err(), "balance needs a PostgreSQL server");
        let cli =
            Cli::try_parse_from(["bench", "balance", "--postgres", "postgres://u@h/db", "--max-concurrency", "2"])
                .expect("parse");
        let Mode::Balance(args) = cli.mode else { panic!("not balance") };
        assert_eq!((args.routers, args.nodes, args.max_concurrency), (2, 4, Some(2)));
    }
}
