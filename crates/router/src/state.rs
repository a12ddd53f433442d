//! What every handler can reach: the application's parts, built once by `app.rs`.

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::auth::credentials::Credentials;
use crate::clock::Clock;
use crate::config::Settings;
use crate::deploy::Deployments;
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::proxy::Proxy;
use crate::rate_limit::bodies::BodyBudget;
use crate::registry::Registry;
use crate::registry::admission::Admission;
use crate::store::Store;
use crate::tls::Tls;
use crate::usage::Ledger;

/// The application's parts.
pub struct AppInner {
    pub settings: Settings,
    pub store: Store,
    pub registry: Registry,
    pub clock: Arc<dyn Clock>,
    pub prober: Prober,
    pub metrics: Arc<Metrics>,
    /// Users, sessions, API keys, and what a presented credential stands for.
    pub credentials: Credentials,
    /// Who may register a machine: join tokens, the anonymous limits.
    pub admission: Admission,
    /// Who did what: admin actions, sign-ins, throttling decisions.
    pub audit: AuditLog,
    /// The HTTPS certificate, when the router serves HTTPS; reloaded on SIGHUP.
    pub tls: Option<Arc<Tls>>,
    /// The pool of connections to the nodes' runtimes, for `/v1`.
    pub proxy: Proxy,
    /// Where each `/v1` request's usage is recorded and its tenant's limits held (SPEC §14).
    pub ledger: Arc<Ledger>,
    /// Deployments: what runs where, and what the nodes report of it (SPEC §15).
    pub deployments: Deployments,
    /// The bytes of request bodies held in memory at once, all requests together.
    pub body_budget: BodyBudget,
    /// The address this router listens on, once it does: a node may not be registered there.
    pub listening: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Shared handle to the application.
pub type AppState = Arc<AppInner>;
