//! Command line and environment configuration (SPEC §3.1). Every setting is a flag and an environment variable;
//! flags win.
//!
//! This file holds the command line (`serve`, `migrate`) and its resolution into [`Settings`]; the settings
//! themselves, with their defaults, are in `settings.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::net::Cidr;
use crate::validate;

mod settings;

pub use settings::{InferenceAuth, QueueOrder, RegistrationMode, RoutingChoice, RoutingPolicy, Settings, TlsFiles};

/// Central router of a GPU inference fleet.
#[derive(Debug, Parser)]
#[command(name = "llm-router", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server: node API, admin API, dashboard.
    Serve(Box<ServeArgs>),
    /// Copy everything from a SQLite database to a PostgreSQL one (SPEC §11): nodes, lists, tokens, users, keys,
    /// sessions, events, join tokens and the audit log; verified by counts; running it again adds nothing.
    Migrate(MigrateArgs),
}

/// Settings of `llm-router migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The SQLite database file to copy from (`router.db` in a data directory; stop its router first). It is
    /// brought to the current schema, as a start of the router would, and otherwise only read.
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL database to copy into (`postgres://…`); its migrations are applied first.
    #[arg(long)]
    pub to: String,
}

/// Settings of `llm-router serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "LLM_ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Directory of the database (`router.db`); created if missing. Default: ~/.llm-router
    #[arg(long, env = "LLM_ROUTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// The database: absent, SQLite in the data directory; `postgres://user:password@host/db`, a PostgreSQL
    /// database that any number of routers may share (SPEC §11).
    #[arg(long, env = "LLM_ROUTER_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Interval the router asks agents to heartbeat at, in seconds.
    #[arg(long, env = "LLM_ROUTER_HEARTBEAT_INTERVAL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval_secs: u64,

    /// An approved node silent for this long is marked offline, in seconds.
    #[arg(long, env = "LLM_ROUTER_OFFLINE_AFTER_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub offline_after_secs: u64,

    /// How long the registration reachability probe waits for the node's runtime, in milliseconds.
    #[arg(long, env = "LLM_ROUTER_REACHABILITY_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub reachability_timeout_ms: u64,

    /// Skip the registration reachability probe (development only; logged as a warning at start).
    #[arg(long, env = "LLM_ROUTER_NO_REACHABILITY_CHECK", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub no_reachability_check: bool,

    /// Username of the administrator created on first start.
    #[arg(long, env = "LLM_ROUTER_ADMIN_USERNAME", default_value = "admin")]
    pub admin_username: String,

    /// Password of the administrator created on first start (at least 12 characters); generated and printed once
    /// when absent.
    #[arg(long, env = "LLM_ROUTER_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// The router's address as users reach it (e.g. `https://router.example`); an `https://` URL makes the session
    /// cookie `Secure`.
    #[arg(long, env = "LLM_ROUTER_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM), read again on SIGHUP; needs --tls-key.
    #[arg(long, env = "LLM_ROUTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM), read again on SIGHUP.
    #[arg(long, env = "LLM_ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Days node events are kept (each node also keeps at most its newest 1,000).
    #[arg(long, env = "LLM_ROUTER_EVENT_RETENTION_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub event_retention_days: u64,

    /// Days the per-minute, per-hour and per-day sums of `/v1` usage are kept (SPEC §14).
    #[arg(long, env = "LLM_ROUTER_USAGE_RETENTION_DAYS", default_value_t = 400,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub usage_retention_days: u64,

    /// Days each `/v1` request's own record is kept (`GET /v0/usage/requests`).
    #[arg(long, env = "LLM_ROUTER_REQUEST_LOG_DAYS", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub request_log_days: u64,

    /// `/metrics` also counts tokens per API key and user (`llm_router_principal_tokens_total`): one series per
    /// principal, so off by default.
    #[arg(long, env = "LLM_ROUTER_METRICS_PER_KEY")]
    pub metrics_per_key: bool,

    /// Anonymous registrations per minute and source address (bursts of twice that); 0 turns the limit off.
    #[arg(long, env = "LLM_ROUTER_REGISTRATION_RATE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub registration_rate: u32,

    /// `open`: any machine may register (and waits as pending); `token`: a registration needs a join token
    /// (`X-Join-Token`), except a node's own token rotation.
    #[arg(long, env = "LLM_ROUTER_REGISTRATION_MODE", value_enum, default_value_t = RegistrationMode::Open)]
    pub registration_mode: RegistrationMode,

    /// `key`: `/v1` needs an API key (`Authorization: Bearer`); `none`: `/v1` is open, for trusted networks.
    #[arg(long, env = "LLM_ROUTER_INFERENCE_AUTH", value_enum, default_value_t = InferenceAuth::Key)]
    pub inference_auth: InferenceAuth,

    /// `cache-aware`: requests that share a prompt prefix (or an `x-session-id`) go to the same node while its load
    /// allows, so its runtime's prefix cache is reused (SPEC §13); `least-loaded`: the less loaded of two nodes at
    /// random, for runtimes without a prefix cache.
    #[arg(long, env = "LLM_ROUTER_ROUTING_POLICY", value_enum, default_value_t = RoutingPolicy::CacheAware)]
    pub routing_policy: RoutingPolicy,

    /// Bytes at the start of a prompt that count for its prefix (cache-aware routing).
    #[arg(long, env = "LLM_ROUTER_PREFIX_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(64..=16 * 1024 * 1024))]
    pub prefix_bytes: u64,

    /// A prefix's node is passed over when it would carry more than this times the mean load of the model's nodes
    /// (cache-aware routing; 1.0 spreads at once, larger values keep prefixes on their node longer).
    #[arg(long, env = "LLM_ROUTER_AFFINITY_LOAD_FACTOR", default_value_t = 1.25, value_parser = load_factor)]
    pub affinity_load_factor: f64,

    /// Seconds a node has to send an answer's headers before the request is retried on another node.
    #[arg(long, env = "LLM_ROUTER_UPSTREAM_HEADER_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upstream_header_timeout_secs: u64,

    /// Further nodes an inference request is tried on when one fails before its first byte.
    #[arg(long, env = "LLM_ROUTER_MAX_RETRIES", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=10))]
    pub max_retries: u32,

    /// Inference requests that may wait, in all, while every node with their model is at its `max_concurrency`;
    /// more are answered 429.
    #[arg(long, env = "LLM_ROUTER_MAX_QUEUED", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_queued: u64,

    /// Longest wait of a queued inference request before it is answered 429, in milliseconds.
    #[arg(long, env = "LLM_ROUTER_QUEUE_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub queue_timeout_ms: u64,

    /// Which queued inference request takes a place that frees up: `fair`, the waiting tenant (API key or user) that
    /// has had the least weighted service lately, so a flood from one cannot hold the others back (SPEC §14);
    /// `arrival`, first come, first served, whoever the requests belong to.
    #[arg(long, env = "LLM_ROUTER_QUEUE_ORDER", value_enum, default_value_t = QueueOrder::Fair)]
    pub queue_order: QueueOrder,

    /// A GPU at or above this temperature (°C) makes its node `degraded` (`gpu_overheat`).
    #[arg(long, env = "LLM_ROUTER_GPU_MAX_TEMP_C", default_value_t = 90,
          value_parser = clap::value_parser!(u16).range(30..=150))]
    pub gpu_max_temp_c: u16,

    /// Most pending nodes in all; 0 = no cap.
    #[arg(long, env = "LLM_ROUTER_MAX_PENDING", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub max_pending: u64,

    /// Pending nodes that never heartbeat for this many hours are removed.
    #[arg(long, env = "LLM_ROUTER_PENDING_TTL_HOURS", default_value_t = 72,
          value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub pending_ttl_hours: u64,

    /// Proxies whose `X-Forwarded-For` is believed, as a comma-separated CIDR list (e.g. `10.0.0.0/8,::1/128`).
    #[arg(long, env = "LLM_ROUTER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,

    /// Accept nodes at link-local addresses (169.254.0.0/16, fe80::/10, cloud metadata); refused by default.
    #[arg(long, env = "LLM_ROUTER_ALLOW_LINK_LOCAL_NODES", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub allow_link_local_nodes: bool,

    /// Most open client connections. Default: the open-file limit less a reserve for the database and probes.
    #[arg(long, env = "LLM_ROUTER_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub max_connections: Option<u64>,

    /// Most open connections one client address (an IPv6 /64) may hold; trusted proxies are exempt. Default: half of
    /// --max-connections; 0: no per-address share.
    #[arg(long, env = "LLM_ROUTER_MAX_CONNECTIONS_PER_SOURCE",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_source: Option<u64>,

    /// Seconds a client may leave an answer unread (its socket full) before its connection is closed; a streamed
    /// answer's upstream request ends with it.
    #[arg(long, env = "LLM_ROUTER_WRITE_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_timeout_secs: u64,

    /// Megabytes of request bodies the router holds in memory at once, all requests together; a request whose body
    /// would pass it is answered 503 with Retry-After.
    #[arg(long, env = "LLM_ROUTER_MAX_BODY_MEMORY_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(64..=1_048_576))]
    pub max_body_memory_mb: u64,

    /// Seconds a node may stay silent in the middle of an answer's body before the answer is ended and counted as
    /// the node's failure.
    #[arg(long, env = "LLM_ROUTER_UPSTREAM_IDLE_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upstream_idle_timeout_secs: u64,

    /// Seconds a credential (API key, session) this router accepted is still accepted while its database is
    /// unreachable, counted from the last time the database confirmed it; 0: none is.
    #[arg(long, env = "LLM_ROUTER_CREDENTIAL_GRACE_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub credential_grace_secs: u64,

    /// Seconds a client has to send a request's headers before the connection is closed.
    #[arg(long, env = "LLM_ROUTER_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub header_timeout_secs: u64,

    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, env = "LLM_ROUTER_IDLE_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_secs: u64,

    /// Seconds a client has to send a request's body once its headers are in; past it the request is answered 408
    /// and the connection closed.
    #[arg(long, env = "LLM_ROUTER_BODY_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub body_timeout_secs: u64,
}

fn parse_public_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| "must start with http:// or https://".to_owned())?;
    if rest.is_empty() || rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must name a host".to_owned());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

impl ServeArgs {
    /// Resolves defaults that depend on the environment (the home directory).
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => {
                let home = std::env::var_os("HOME")
                    .ok_or_else(|| anyhow::anyhow!("HOME is not set: pass --data-dir or LLM_ROUTER_DATA_DIR"))?;
                PathBuf::from(home).join(".llm-router")
            }
        };
        if self.admin_username.trim().is_empty() {
            anyhow::bail!("LLM_ROUTER_ADMIN_USERNAME must not be blank");
        }
        // Checked on every start, before anything is written, though only a first start uses it: a weak password
        // in the environment is worth hearing about even when the administrator already exists.
        if let Some(problem) =
            self.admin_password.as_deref().filter(|p| !p.is_empty()).and_then(validate::password_problem)
        {
            anyhow::bail!(
                "LLM_ROUTER_ADMIN_PASSWORD (--admin-password) {problem}; choose a longer one, or leave it unset to \
                 have one generated"
            );
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            anyhow::bail!(
                "LLM_ROUTER_DATABASE_URL (--database-url) must be a postgres:// URL; leave it unset for SQLite"
            );
        }
        Ok(Settings {
            database_url: self.database_url,
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            offline_after: Duration::from_secs(self.offline_after_secs),
            reachability_timeout: Duration::from_millis(self.reachability_timeout_ms),
            reachability_check: !self.no_reachability_check,
            admin_username: self.admin_username,
            admin_password: self.admin_password,
            public_url: self.public_url,
            tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles { cert, key }),
            event_retention: Duration::from_secs(self.event_retention_days * 86_400),
            usage_retention: Duration::from_secs(self.usage_retention_days * 86_400),
            request_log: Duration::from_secs(self.request_log_days * 86_400),
            metrics_per_key: self.metrics_per_key,
            registration_rate: self.registration_rate,
            max_pending: self.max_pending,
            registration_mode: self.registration_mode,
            inference_auth: self.inference_auth,
            upstream_header_timeout: Duration::from_secs(self.upstream_header_timeout_secs),
            max_retries: self.max_retries,
            max_queued: usize::try_from(self.max_queued).unwrap_or(usize::MAX),
            gpu_max_temp_c: f64::from(self.gpu_max_temp_c),
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            queue_order: self.queue_order,
            pending_ttl: Duration::from_secs(self.pending_ttl_hours * 3600),
            trusted_proxies: self.trusted_proxies,
            allow_link_local_nodes: self.allow_link_local_nodes,
            max_connections: self.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            max_connections_per_source: self
                .max_connections_per_source
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            max_body_memory: usize::try_from(self.max_body_memory_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX),
            upstream_idle_timeout: Duration::from_secs(self.upstream_idle_timeout_secs),
            credential_grace: Duration::from_secs(self.credential_grace_secs),
            routing: RoutingChoice {
                policy: self.routing_policy,
                prefix_bytes: usize::try_from(self.prefix_bytes).unwrap_or(usize::MAX),
                load_factor: self.affinity_load_factor,
            },
            ..Settings::new(data_dir)
        })
    }
}

/// `--affinity-load-factor`: a number from 1 to 100.
fn load_factor(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(factor) if (1.0..=100.0).contains(&factor) => Ok(factor),
        _ => Err(format!("`{text}` is not a load factor: a number from 1 to 100, such as 1.25")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("llm-router").chain(args.iter().copied()))
    }

    fn serve(args: &[&str]) -> ServeArgs {
        match parse(args).expect("parse").command {
            Command::Serve(args) => *args,
            Command::Migrate(_) => panic!("not serve"),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let args = serve(&["serve", "--data-dir", "/tmp/x"]);
        assert_eq!(args.listen, "0.0.0.0:8080".parse().expect("addr"));
        let settings = args.into_settings().expect("settings");
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(settings.offline_after, Duration::from_secs(30));
        assert_eq!(settings.reachability_timeout, Duration::from_millis(3000));
        assert!(settings.reachability_check);
        assert_eq!(settings.database_path(), PathBuf::from("/tmp/x/router.db"));
        assert_eq!(settings.database_url, None, "SQLite unless a database URL is given");
        assert_eq!(
            settings.routing,
            RoutingChoice { policy: RoutingPolicy::CacheAware, prefix_bytes: 65536, load_factor: 1.25 }
        );
        assert_eq!(settings.queue_order, QueueOrder::Fair, "fair share unless asked otherwise");
    }

    #[test]
    fn the_queue_order_parses_and_an_unknown_one_stops_the_start() {
        let settings = serve(&["serve", "--data-dir", "/tmp/x", "--queue-order", "arrival"]).into_settings();
        assert_eq!(settings.expect("arrival").queue_order, QueueOrder::Arrival);
        let unknown = parse(&["serve", "--queue-order", "random"]).expect_err("unknown").to_string();
        assert!(unknown.contains("fair") && unknown.contains("arrival"), "{unknown}");
    }

    #[test]
    fn the_routing_policy_and_its_settings_parse_and_an_unknown_one_stops_the_start() {
        let args = ["serve", "--data-dir", "/tmp/x", "--routing-policy", "least-loaded", "--prefix-bytes", "4096"];
        let settings = serve(&[&args[..], &["--affinity-load-factor", "2"]].concat()).into_settings().expect("ok");
        assert_eq!(
            settings.routing,
            RoutingChoice { policy: RoutingPolicy::LeastLoaded, prefix_bytes: 4096, load_factor: 2.0 }
        );
        let unknown = parse(&["serve", "--routing-policy", "random"]).expect_err("unknown").to_string();
        assert!(unknown.contains("cache-aware") && unknown.contains("least-loaded"), "{unknown}");
        let factor = parse(&["serve", "--affinity-load-factor", "0.5"]).expect_err("below 1").to_string();
        assert!(factor.contains("from 1 to 100"), "{factor}");
        assert!(parse(&["serve", "--prefix-bytes", "0"]).is_err());
    }

    #[test]
    fn a_database_url_must_be_postgres() {
        let url = "postgres://router:secret@db.example/fleet";
        let settings = serve(&["serve", "--data-dir", "/tmp/x", "--database-url", url]).into_settings();
        assert_eq!(settings.expect("postgres").database_url.as_deref(), Some(url));
        let err = serve(&["serve", "--data-dir", "/tmp/x", "--database-url", "mysql://x/y"]).into_settings();
        assert!(err.expect_err("mysql").to_string().contains("postgres://"));
        let Command::Migrate(args) =
            parse(&["migrate", "--from", "/tmp/x/router.db", "--to", url]).expect("parse").command
        else {
            panic!("not migrate")
        };
        assert_eq!((args.from.as_path(), args.to.as_str()), (std::path::Path::new("/tmp/x/router.db"), url));
    }

    #[test]
    fn rejects_unparsable_values() {
        assert!(parse(&["serve", "--listen", "nowhere"]).is_err());
        assert!(parse(&["serve", "--heartbeat-interval-secs", "0"]).is_err());
        assert!(parse(&["serve", "--offline-after-secs", "soon"]).is_err());
    }

    #[test]
    fn parses_the_hardening_settings() {
        let args = serve(&[
            "serve",
            "--data-dir",
            "/tmp/x",
            "--trusted-proxies",
            "10.0.0.0/8,::1/128",
            "--public-url",
            "https://router.example/",
            "--registration-rate",
            "0",
        ]);
        let settings = args.into_settings().expect("settings");
        assert_eq!(settings.trusted_proxies.len(), 2);
        assert_eq!(settings.public_url.as_deref(), Some("https://router.example"));
        assert_eq!(settings.registration_rate, 0);
        assert_eq!(settings.max_pending, 1000);
        assert_eq!(settings.event_retention, Duration::from_secs(30 * 86_400));
        assert!(parse(&["serve", "--trusted-proxies", "10.0.0.0/33"]).is_err());
        assert!(parse(&["serve", "--public-url", "ftp://x"]).is_err());
    }

    #[test]
    fn a_short_admin_password_is_a_configuration_error() {
        let settings =
            |password: &str| serve(&["serve", "--data-dir", "/tmp/x", "--admin-password", password]).into_settings();
        let err = settings("12345678").expect_err("short").to_string();
        assert!(err.contains("LLM_ROUTER_ADMIN_PASSWORD") && err.contains("at least 12"), "{err}");
        assert!(settings("twelve-chars").is_ok());
    }
}
