//! Builds the application from [`Settings`] and serves it on a bound listener until a shutdown future fires.
//!
//! Tests call [`App::build`] with a temporary data directory and their own clock, bind `127.0.0.1:0`, and pass
//! their own shutdown; the binary goes through [`run`].
//!
//! This file is the wiring: settings → store → registry → routes, and the serve loop. The chores of a start (data
//! directory, legacy import, first administrator, signals) are in `start.rs`; the background tasks in `tasks.rs`.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::auth::credentials::Credentials;
use crate::auth::password::Hasher;
use crate::clock::{Clock, SystemClock};
use crate::config::{InferenceAuth, ServeArgs, Settings};
use crate::deploy::Deployments;
use crate::legacy;
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::proxy::{Proxy, ProxySettings};
use crate::rate_limit::bodies::BodyBudget;
use crate::registry::Registry;
use crate::registry::admission::Admission;
use crate::routes;
use crate::server;
use crate::state::{AppInner, AppState};
use crate::store::Store;
use crate::store::postgres;
use crate::store::sqlite::SqliteStore;
use crate::tls::Tls;
use crate::usage::Ledger;

mod start;
mod tasks;

use start::{
    check_database_file, create_first_admin, ensure_writable_dir, import_legacy, log_open_file_limit, mark_initialised,
    reload_on_hangup, shutdown_signal,
};
pub use tasks::{prune_events, prune_usage};

/// The start of the line `llm-router serve` prints on stdout once it listens, followed by its URL
/// (`http://ADDR` or `https://ADDR`): what scripts, tests and benchmarks wait for.
pub const LISTENING_ON: &str = "llm-router listening on ";

/// A built application, ready to serve.
pub struct App {
    pub state: AppState,
}

impl App {
    /// Creates the data directory and database, applies migrations, creates the first administrator when there
    /// is no user, and loads the registry.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
        // The process's TLS provider (ring), for every rustls user in it; a second app in one process (tests) finds
        // it installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // An unreadable certificate stops the start before anything is written.
        let tls = settings.tls.as_ref().map(|files| Tls::load(&files.cert, &files.key)).transpose()?.map(Arc::new);
        ensure_writable_dir(&settings.data_dir)?;
        // A corrupt legacy file stops the start before the database is created.
        let legacy = legacy::read(&settings.data_dir, clock.now_ms())?;
        let store: Store = match &settings.database_url {
            Some(url) => postgres::open(url).await?,
            None => {
                let initialised = check_database_file(&settings)?;
                let store = Arc::new(SqliteStore::open(&settings.database_path()).await?);
                if !initialised {
                    mark_initialised(&settings, clock.now_ms())?;
                }
                store
            }
        };
        if let Some(legacy) = legacy {
            import_legacy(&store, &legacy, clock.now_ms()).await?;
        }
        let offline_after_ms = i64::try_from(settings.offline_after.as_millis()).unwrap_or(i64::MAX);
        let metrics = Arc::new(Metrics::default());
        let hasher = Hasher::new(settings.hash_workers, settings.hash_queue, settings.hash_wait, metrics.clone())?;
        let audit = AuditLog::start(store.clone(), clock.clone(), metrics.clone());
        let credentials = Credentials::new(
            store.clone(),
            clock.clone(),
            metrics.clone(),
            audit.clone(),
            hasher,
            settings.session_ttl,
            settings.credential_grace,
        );
        create_first_admin(&credentials, &settings).await?;
        credentials.load_policies().await?;
        metrics.inference.per_key.store(settings.metrics_per_key, std::sync::atomic::Ordering::Relaxed);
        let ledger = Ledger::new(credentials.limiter().clone(), metrics.clone());
        let registry = Registry::load(store.clone(), clock.clone(), offline_after_ms, metrics.clone())
            .await?
            .with_gpu_max_temp_c(settings.gpu_max_temp_c);
        let deployments = Deployments::load(store.clone(), clock.clone()).await?;
        let prober = Prober::new(settings.reachability_timeout)?;
        if !settings.reachability_check {
            tracing::warn!(
                "the registration reachability check is OFF: nodes are accepted without probing their runtime"
            );
        }
        tracing::info!(nodes = registry.len(), db = %store.describe(), "registry loaded");
        registry.routing().set_choice(settings.routing);
        registry.routing().queue().set_order(settings.queue_order);
        tracing::info!(
            policy = settings.routing.policy.as_str(),
            prefix_bytes = settings.routing.prefix_bytes,
            load_factor = settings.routing.load_factor,
            queue_order = settings.queue_order.as_str(),
            "inference routing"
        );
        let admission = Admission::new(
            settings.registration_mode,
            settings.registration_rate,
            settings.max_pending,
            store.clone(),
            clock.clone(),
            metrics.clone(),
            audit.clone(),
        );
        let body_budget = BodyBudget::new(settings.max_body_memory);
        let router_id = uuid::Uuid::new_v4().simple().to_string();
        let proxy = Proxy::new(
            ProxySettings {
                header_timeout: settings.upstream_header_timeout,
                max_retries: settings.max_retries,
                max_queued: settings.max_queued,
                queue_timeout: settings.queue_timeout,
                idle_timeout: settings.upstream_idle_timeout,
            },
            &router_id[..12],
        );
        if settings.inference_auth == InferenceAuth::None {
            tracing::warn!("--inference-auth none: anyone who reaches the router may use /v1 without an API key");
        }
        Ok(App {
            state: Arc::new(AppInner {
                settings,
                store,
                registry,
                clock,
                prober,
                metrics,
                admission,
                audit,
                tls,
                proxy,
                ledger,
                deployments,
                credentials,
                body_budget,
                listening: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Serves on `listener` until `shutdown` completes, then writes the last heartbeat figures and closes the
    /// database. The offline sweep, the figure flush, checkpoints, event pruning and pending expiry run in the
    /// background meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state;
        if let Ok(addr) = listener.local_addr() {
            let _ = state.listening.set(addr);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let background = tasks::spawn(&state, &stop_rx);
        let max_connections = server::connection_cap(state.settings.max_connections);
        let limits = server::Limits {
            max_connections,
            max_per_source: state
                .settings
                .max_connections_per_source
                .unwrap_or_else(|| server::default_max_per_source(max_connections)),
            exempt: state.settings.trusted_proxies.clone(),
            header_timeout: state.settings.header_timeout,
            idle_timeout: state.settings.idle_timeout,
            write_timeout: state.settings.write_timeout,
            tls: state.tls.clone(),
        };
        let served =
            server::serve(listener, routes::router(state.clone()), limits, state.metrics.clone(), shutdown).await;
        let _ = stop_tx.send(true);
        for task in background {
            let _ = task.await;
        }
        if let Err(err) = state.registry.flush().await {
            tracing::error!(error = ?err, "writing the last heartbeat figures failed");
        }
        if let Err(err) = state.ledger.flush(&state.store, false).await {
            tracing::error!(error = ?err, "writing the last usage records failed");
        }
        if let Err(err) = state.deployments.flush().await {
            tracing::error!(error = ?err, "writing the last replica reports failed");
        }
        state.audit.flush().await;
        state.store.close().await;
        served.context("serving HTTP")
    }
}

/// What `llm-router serve` does: bind, open, serve until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let settings = args.into_settings()?;
    log_open_file_limit(&server::raise_open_file_limit(), settings.max_connections);
    // Bind first: a port in use ends the start before the data directory or database is touched.
    let listener = server::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let app = App::build(settings, Arc::new(SystemClock)).await?;
    let shutdown = shutdown_signal()?;
    let addr = listener.local_addr()?;
    let scheme = match &app.state.tls {
        Some(tls) => {
            reload_on_hangup(tls.clone())?;
            "https"
        }
        None => {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "serving plain HTTP on a non-loopback address: node tokens, passwords and session cookies cross \
                     the network in clear text; give --tls-cert and --tls-key to serve HTTPS"
                );
            }
            "http"
        }
    };
    println!("{LISTENING_ON}{scheme}://{addr}");
    app.serve(listener, shutdown).await
}
