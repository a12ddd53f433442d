//! The resolved settings the app is built from ([`Settings`], with the documented defaults), and the choices they
//! hold (TLS files, who may register, who may call `/v1`). `config.rs` fills them from the command line.

use std::path::PathBuf;
use std::time::Duration;

use crate::net::Cidr;

/// The files of the router's TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who may call the inference API (`/v1`, SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InferenceAuth {
    /// An API key (either scope) or a session.
    Key,
    /// Anyone who reaches the router: for trusted networks; a warning is logged at start.
    None,
}

/// How a node is chosen among those that can serve a request (`--routing-policy`, SPEC §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RoutingPolicy {
    /// Affinity by prompt prefix or `x-session-id`, with bounded load: the node most likely to hold the prompt in
    /// its KV cache.
    #[default]
    CacheAware,
    /// Of two candidates at random, the less loaded (SPEC §8): for runtimes without a prefix cache.
    LeastLoaded,
}

impl RoutingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPolicy::CacheAware => "cache-aware",
            RoutingPolicy::LeastLoaded => "least-loaded",
        }
    }
}

/// The policy of the routing choice and its settings (SPEC §13).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingChoice {
    pub policy: RoutingPolicy,
    /// Bytes of a prompt that count for its prefix.
    pub prefix_bytes: usize,
    /// A node is passed over when it would carry more than this times the candidates' mean load.
    pub load_factor: f64,
}

impl Default for RoutingChoice {
    fn default() -> Self {
        RoutingChoice { policy: RoutingPolicy::CacheAware, prefix_bytes: 65536, load_factor: 1.25 }
    }
}

/// Which waiting request takes a place that frees up on a node at its `max_concurrency` (`--queue-order`, SPEC §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueOrder {
    /// Weighted fair queuing: the waiting tenant that has had the least weighted service lately goes next, so one
    /// tenant's flood of requests cannot hold another's back by more than a turn.
    #[default]
    Fair,
    /// First come, first served, whoever the requests belong to.
    Arrival,
}

impl QueueOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueOrder::Fair => "fair",
            QueueOrder::Arrival => "arrival",
        }
    }
}

/// Who may register (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RegistrationMode {
    /// Any machine; without a join token it waits as pending.
    Open,
    /// Only with a join token (or a node's own token, to rotate it).
    Token,
}

/// The resolved settings the app is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// A `postgres://` URL: PostgreSQL, shared with other routers. `None`: SQLite in `data_dir`.
    pub database_url: Option<String>,
    pub heartbeat_interval: Duration,
    pub offline_after: Duration,
    pub reachability_timeout: Duration,
    pub reachability_check: bool,
    pub admin_username: String,
    pub admin_password: Option<String>,
    /// How often heartbeat figures are written behind to the database.
    pub flush_interval: Duration,
    /// How long a dashboard or API session lasts.
    pub session_ttl: Duration,
    /// The router's public address; `https://` makes the session cookie `Secure`.
    pub public_url: Option<String>,
    /// Certificate chain and private key of HTTPS; plain HTTP when absent.
    pub tls: Option<TlsFiles>,
    /// How long node events are kept.
    pub event_retention: Duration,
    /// How long the sums of `/v1` usage are kept.
    pub usage_retention: Duration,
    /// How long each `/v1` request's record is kept.
    pub request_log: Duration,
    /// Token series per principal on `/metrics`.
    pub metrics_per_key: bool,
    /// Anonymous registrations per minute and source address; 0 = no limit.
    pub registration_rate: u32,
    /// Most pending nodes in all; 0 = no cap.
    pub max_pending: u64,
    pub registration_mode: RegistrationMode,
    pub inference_auth: InferenceAuth,
    pub upstream_header_timeout: Duration,
    pub max_retries: u32,
    /// Inference requests that may wait for a node below its `max_concurrency`; more are answered 429.
    pub max_queued: usize,
    /// Longest wait of a queued inference request.
    pub queue_timeout: Duration,
    /// Which queued inference request goes next: the tenants' fair share, or first come.
    pub queue_order: QueueOrder,
    /// A GPU at or above this temperature (°C) is `gpu_overheat`.
    pub gpu_max_temp_c: f64,
    /// Pending nodes silent this long are removed.
    pub pending_ttl: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Password hashes at a time; 0 = one per core, at most 8 (each holds 19 MiB while it runs).
    pub hash_workers: usize,
    /// Callers that may wait for a password hash beyond those running; more are answered 429.
    pub hash_queue: usize,
    /// Longest wait for a password hash before the caller is answered 429.
    pub hash_wait: Duration,
    /// Accept nodes at link-local addresses.
    pub allow_link_local_nodes: bool,
    /// Most open client connections; `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection stays open.
    pub idle_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in.
    pub body_timeout: Duration,
    /// Most open connections one client address may hold; `None`: half of the cap; 0: no share.
    pub max_connections_per_source: Option<usize>,
    /// Time a client may leave an answer unread.
    pub write_timeout: Duration,
    /// Bytes of request bodies held in memory at once, all requests together.
    pub max_body_memory: usize,
    /// Time a node may stay silent in the middle of an answer's body.
    pub upstream_idle_timeout: Duration,
    /// How long a credential confirmed by the database is still accepted while the database is unreachable.
    pub credential_grace: Duration,
    /// How `/v1` chooses among the nodes that can serve a request.
    pub routing: RoutingChoice,
}

impl Settings {
    /// Settings with the documented defaults, for a given data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Settings {
            data_dir,
            database_url: None,
            heartbeat_interval: Duration::from_secs(10),
            offline_after: Duration::from_secs(30),
            reachability_timeout: Duration::from_millis(3000),
            reachability_check: true,
            admin_username: "admin".to_owned(),
            admin_password: None,
            flush_interval: Duration::from_secs(1),
            session_ttl: Duration::from_secs(12 * 3600),
            public_url: None,
            tls: None,
            event_retention: Duration::from_secs(30 * 86_400),
            usage_retention: Duration::from_secs(400 * 86_400),
            request_log: Duration::from_secs(7 * 86_400),
            metrics_per_key: false,
            registration_rate: 10,
            max_pending: 1000,
            registration_mode: RegistrationMode::Open,
            inference_auth: InferenceAuth::Key,
            upstream_header_timeout: Duration::from_secs(300),
            max_retries: 2,
            max_queued: 1024,
            gpu_max_temp_c: crate::model::health::DEFAULT_GPU_MAX_TEMP_C,
            queue_timeout: Duration::from_secs(30),
            queue_order: QueueOrder::Fair,
            pending_ttl: Duration::from_secs(72 * 3600),
            trusted_proxies: Vec::new(),
            hash_workers: 0,
            hash_queue: 64,
            hash_wait: Duration::from_secs(2),
            allow_link_local_nodes: false,
            max_connections: None,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections_per_source: None,
            write_timeout: Duration::from_secs(60),
            max_body_memory: 256 * 1024 * 1024,
            upstream_idle_timeout: Duration::from_secs(300),
            credential_grace: Duration::from_secs(900),
            routing: RoutingChoice::default(),
        }
    }

    /// The database file inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("router.db")
    }

    /// How often pending nodes are checked against `pending_ttl`: a hundredth of it, between 1 s and 1 min.
    pub fn pending_expiry_interval(&self) -> Duration {
        (self.pending_ttl / 100).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// How often the offline sweep runs: a tenth of `offline_after`, between 100 ms and 1 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.offline_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_expiry_runs_often_enough_for_its_ttl() {
        let mut settings = Settings::new(PathBuf::from("/tmp"));
        assert_eq!(settings.pending_expiry_interval(), Duration::from_secs(60), "72 h: every minute");
        settings.pending_ttl = Duration::from_secs(100);
        assert_eq!(settings.pending_expiry_interval(), Duration::from_secs(1));
        settings.pending_ttl = Duration::from_secs(3600);
        assert_eq!(settings.pending_expiry_interval(), Duration::from_secs(36));
    }

    #[test]
    fn sweep_interval_scales_with_offline_after() {
        let mut settings = Settings::new(PathBuf::from("/tmp"));
        assert_eq!(settings.sweep_interval(), Duration::from_secs(1));
        settings.offline_after = Duration::from_secs(2);
        assert_eq!(settings.sweep_interval(), Duration::from_millis(200));
    }
}
