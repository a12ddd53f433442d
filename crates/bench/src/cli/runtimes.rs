//! Arguments of the modes that run the router in front of runtimes, stand-in or hostile: `bodies`, `balance`,
//! `probe`, `proxy`, `affinity` and `fairness`.

use clap::Args;
use clap::builder::TypedValueParser;
use llm_router::config::QueueOrder;

use super::{non_negative_secs, positive_ms, positive_rate, positive_secs, share};
use crate::affinity::Workload;

#[derive(Debug, Clone, Args)]
pub struct BodiesArgs {
    /// Clients sending at once, each on its own connection.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1024).map(|n| n as usize))]
    pub clients: usize,

    /// Bodies each client sends, one after another.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000).map(|n| n as usize))]
    pub rounds: usize,

    /// Bytes of each body (the router's `/v1` limit is 32 MiB).
    #[arg(long, default_value_t = 33_000_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000_000).map(|n| n as usize))]
    pub body_bytes: usize,

    /// Seconds to wait after the burst before reading the router's memory again.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub settle_secs: f64,
}

#[derive(Debug, Clone, Args)]
pub struct BalanceArgs {
    /// A PostgreSQL server (what `scripts/postgres.sh start DIR` prints); the bench makes a fresh database on it.
    #[arg(long)]
    pub postgres: String,

    /// Routers sharing the database.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16).map(|n| n as usize))]
    pub routers: usize,

    /// Stand-in runtimes, each registered as a node.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000).map(|n| n as usize))]
    pub nodes: usize,

    /// `max_concurrency` of every node; absent: no limit.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrency: Option<u32>,

    /// Clients streaming back to back; client k uses router k mod --routers.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000).map(|n| n as usize))]
    pub clients: usize,

    /// Measured seconds.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Events of a stream, before `[DONE]`.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub chunks: usize,

    /// Milliseconds between two events of a stream.
    #[arg(long, default_value_t = 5.0, value_parser = positive_ms)]
    pub chunk_gap_ms: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Registrations per hostile runtime, all in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024).map(|n| n as usize))]
    pub registrations: usize,

    /// Size of the streamed model list, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub stream_mib: u64,

    /// Models the listing runtime lists.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub models: usize,
}

/// A scenario of `bench proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Non-streaming 1 KiB requests at `--rate`, direct and routed.
    Completions,
    /// Streams of `--chunks` events at `--stream-rate`, direct and routed.
    Streams,
    /// `--failover-rate` through the router while one stand-in is killed.
    Failover,
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Stand-in runtimes, each registered as a node.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=1000).map(|n| n as usize))]
    pub nodes: usize,

    /// Scenarios to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Scenario::Completions, Scenario::Streams, Scenario::Failover])]
    pub scenarios: Vec<Scenario>,

    /// Non-streaming requests per second offered (open loop: sent on schedule, whatever the answers do).
    #[arg(long, default_value_t = 5000.0, value_parser = positive_rate)]
    pub rate: f64,

    /// Measured seconds of non-streaming requests, for each of direct and routed.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Streams started per second (open loop).
    #[arg(long, default_value_t = 100.0, value_parser = positive_rate)]
    pub stream_rate: f64,

    /// Measured seconds of streams, for each of direct and routed.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub stream_secs: f64,

    /// Events of a stream, before `[DONE]`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub chunks: usize,

    /// Milliseconds between two events of a stream.
    #[arg(long, default_value_t = 1.0, value_parser = positive_ms)]
    pub chunk_gap_ms: f64,

    /// An event that takes longer than this from the stand-in's write to the client's read counts as late, in
    /// milliseconds.
    #[arg(long, default_value_t = 0.5, value_parser = positive_ms)]
    pub late_ms: f64,

    /// Requests per second through the router in the failover scenario.
    #[arg(long, default_value_t = 1000.0, value_parser = positive_rate)]
    pub failover_rate: f64,

    /// Seconds the failover scenario lasts.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub failover_secs: f64,

    /// Second of the failover scenario at which one stand-in is killed.
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_secs)]
    pub kill_at_secs: f64,

    /// Share of the failover scenario's requests that are streams (0 to 1).
    #[arg(long, default_value_t = 0.1, value_parser = share)]
    pub stream_share: f64,

    /// Direct and routed traffic alternate in slices of this many seconds, so that both see the same machine;
    /// the first pair of slices is a warm-up.
    #[arg(long, default_value_t = 1.0, value_parser = positive_secs)]
    pub slice_secs: f64,

    /// Distinct system prompts the requests carry in turn (one to the router and one to each stand-in alike), so
    /// that cache-aware routing spreads them as it spreads conversations; 1 sends one body over and over.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub prompts: usize,

    /// Requests in flight at most, each on its own keep-alive connection (one to the router and one to each
    /// stand-in per worker).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096).map(|n| n as usize))]
    pub connections: usize,

    /// The router requires API keys (`--inference-auth key` instead of `none`): the bench makes an inference key
    /// with limits no run reaches (requests_per_minute 100,000,000, tokens_per_minute 10^12) and every routed request
    /// carries it, so each one passes the limiter and its answer carries the `x-ratelimit-*` headers (SPEC §14: with
    /// recording and limits on, §8's figures hold).
    #[arg(long)]
    pub limits: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AffinityArgs {
    /// Stand-in runtimes with a prefix cache, each registered as a node.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=1000).map(|n| n as usize))]
    pub nodes: usize,

    /// Requests each stand-in computes at once; the others wait in its queue.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000).map(|n| n as usize))]
    pub slots: usize,

    /// Prompt tokens one slot computes per second (what it did not find cached).
    #[arg(long, default_value_t = 50_000.0, value_parser = positive_rate)]
    pub prefill_tokens_per_sec: f64,

    /// Tokens each stand-in's prefix cache holds (in blocks of 16; least recently used out first).
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(16..=1_000_000_000))]
    pub cache_tokens: u64,

    /// Events streamed after the prompt is computed.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000).map(|n| n as usize))]
    pub chunks: usize,

    /// Milliseconds between two events.
    #[arg(long, default_value_t = 5.0, value_parser = positive_ms)]
    pub chunk_gap_ms: f64,

    /// Workloads to run under each policy, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Shared, Workload::Fresh, Workload::Hot])]
    pub workloads: Vec<Workload>,

    /// System prompts of the `shared` and `hot` workloads.
    #[arg(long, default_value_t = 36, value_parser = clap::value_parser!(u64).range(2..=100_000).map(|n| n as usize))]
    pub prefixes: usize,

    /// Tokens of each system prompt.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub prefix_tokens: usize,

    /// Tokens of the question after a system prompt, fresh in every request.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub question_tokens: usize,

    /// Tokens of a prompt of the `fresh` workload.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub fresh_tokens: usize,

    /// Share of the `hot` workload's requests that carry its first system prompt (0 to 1).
    #[arg(long, default_value_t = 0.6, value_parser = share)]
    pub hot_share: f64,

    /// Requests per second of the `shared` and `hot` workloads (open loop).
    #[arg(long, default_value_t = 600.0, value_parser = positive_rate)]
    pub rate: f64,

    /// Measured seconds of the `shared` and `hot` workloads.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub secs: f64,

    /// Requests per second of the `fresh` workload.
    #[arg(long, default_value_t = 400.0, value_parser = positive_rate)]
    pub fresh_rate: f64,

    /// Measured seconds of the `fresh` workload (enough requests for the spread over the stand-ins to mean
    /// something).
    #[arg(long, default_value_t = 15.0, value_parser = positive_secs)]
    pub fresh_secs: f64,

    /// Unmeasured seconds at the start of every workload, while the caches fill.
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_secs)]
    pub warmup_secs: f64,

    /// Requests in flight at most, each on its own keep-alive connection.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536).map(|n| n as usize))]
    pub connections: usize,

    /// Seed of the questions and of which prompt each request carries.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// A PostgreSQL server (what `scripts/postgres.sh start DIR` prints): two routers on a fresh database on it then
    /// share the `shared` workload under cache-aware routing.
    #[arg(long)]
    pub postgres: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FairnessArgs {
    /// Milliseconds the stand-in takes to answer each chat completion: the service time waits are counted in.
    #[arg(long, default_value_t = 20.0, value_parser = positive_ms)]
    pub service_ms: f64,

    /// `max_concurrency` of the one node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_concurrency: u32,

    /// Requests the flood key keeps waiting in the router's queue.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000).map(|n| n as usize))]
    pub backlog: usize,

    /// Requests the single key sends, one after the other, under each order.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub requests: usize,

    /// Orders of the queue to run, in this order (`--queue-order` of the router).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [QueueOrder::Fair, QueueOrder::Arrival])]
    pub orders: Vec<QueueOrder>,
}
