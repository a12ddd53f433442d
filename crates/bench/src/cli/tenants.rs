//! Arguments of the modes that measure tenants' usage and limits (SPEC §14): `usage` and `limits`.

use clap::Args;
use clap::builder::TypedValueParser;

use super::share;

#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// A PostgreSQL server (what `scripts/postgres.sh start DIR` prints): the state is written into a fresh database
    /// on it, dropped at the end. Default: SQLite in a temporary data directory.
    #[arg(long)]
    pub postgres: Option<String>,

    /// Requests the fleet recorded over the period.
    #[arg(long, default_value_t = 100_000_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000_000))]
    pub requests: u64,

    /// Days of the period, ending now; the usage queries ask for all of it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=400))]
    pub days: u32,

    /// API keys sending the requests, the k-th a share proportional to 1/k.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub principals: usize,

    /// Models; each API key uses one to three of them.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000).map(|n| n as usize))]
    pub models: usize,

    /// Nodes; node i serves model i mod --models (so at least as many as models).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub nodes: usize,

    /// Days the router keeps raw request rows (its `--request-log-days`): the state holds the raw rows of the last
    /// this many days, and roll-ups for the whole period.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(0..=400))]
    pub request_log_days: u32,

    /// Days of raw rows actually written (default: --request-log-days). Fewer saves time: the days between are
    /// summed into the roll-ups like the older ones (the queries read the same), and the raw rows' storage is
    /// extrapolated to --request-log-days from what the written ones take.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=400))]
    pub raw_days: Option<u32>,

    /// Records per `insert_usage` call while writing raw rows.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub batch: usize,

    /// Timed calls of each query, after the warm-ups.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub calls: usize,

    /// Untimed calls of each query first.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=1_000).map(|n| n as usize))]
    pub warmups: usize,

    /// Router starts on the database, each timing every query.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100).map(|n| n as usize))]
    pub runs: usize,

    /// Also print each query's plan (SQLite's `EXPLAIN QUERY PLAN`, PostgreSQL's `EXPLAIN (ANALYZE, BUFFERS)`) and
    /// time its statement alone, without the router.
    #[arg(long)]
    pub explain: bool,

    /// Seed of the workload's draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Leave the PostgreSQL database in place at the end and print its URL, to query it (drop it yourself). The
    /// SQLite file stays with the global --keep-data.
    #[arg(long, requires = "postgres")]
    pub keep_database: bool,
}

impl UsageArgs {
    /// The days of raw rows written.
    pub fn raw_days(&self) -> u32 {
        self.raw_days.unwrap_or(self.request_log_days).min(self.request_log_days).min(self.days)
    }
}

#[derive(Debug, Clone, Args)]
pub struct LimitsArgs {
    /// A PostgreSQL server (what `scripts/postgres.sh start DIR` prints): the routers share a fresh database on it,
    /// dropped at the end. Without it: one router on SQLite.
    #[arg(long)]
    pub postgres: Option<String>,

    /// Routers sharing the database (default: 2 on PostgreSQL, 1 on SQLite; more than one needs --postgres).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16).map(|n| n as usize))]
    pub routers: Option<usize>,

    /// The key's `requests_per_minute`.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rpm: u64,

    /// Whole minutes (UTC) measured; the run starts when the next minute begins.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1_440))]
    pub minutes: u64,

    /// Requests offered per minute in total, as a multiple of --rpm, sent on a schedule to the routers in turn.
    #[arg(long, default_value_t = 2.5, value_parser = offered)]
    pub offered: f64,

    /// Share of --rpm by which a minute's admitted requests may exceed it, besides one per router (SPEC §14).
    #[arg(long, default_value_t = 0.02, value_parser = share)]
    pub tolerance: f64,
}

impl LimitsArgs {
    pub fn routers(&self) -> usize {
        self.routers.unwrap_or(if self.postgres.is_some() { 2 } else { 1 })
    }
}

fn offered(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if !value.is_finite() || value <= 0.0 || value > 1_000.0 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(value)
}
