//! Builds the application from [`Settings`] and serves it on a bound listener until a shutdown future fires.
//!
//! Tests call [`App::build`] with a temporary data directory and their own clock, bind `127.0.0.1:0`, and pass
//! their own shutdown; the binary goes through [`run`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::auth::credentials::{Credentials, FirstAdmin};
use crate::auth::password::Hasher;
use crate::clock::{Clock, Millis, SystemClock};
use crate::config::{InferenceAuth, ServeArgs, Settings};
use crate::legacy::{self, LegacyFile};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::proxy::{Proxy, ProxySettings};
use crate::rate_limit::bodies::BodyBudget;
use crate::registry::admission::Admission;
use crate::registry::{FOLLOW_INTERVAL, Registry};
use crate::routes;
use crate::server;
use crate::state::{AppInner, AppState};
use crate::store::postgres;
use crate::store::sqlite::SqliteStore;
use crate::store::{Availability, NewNode, Store};
use crate::tls::Tls;

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
        let registry = Registry::load(store.clone(), clock.clone(), offline_after_ms, metrics.clone())
            .await?
            .with_gpu_max_temp_c(settings.gpu_max_temp_c);
        let prober = Prober::new(settings.reachability_timeout)?;
        if !settings.reachability_check {
            tracing::warn!(
                "the registration reachability check is OFF: nodes are accepted without probing their runtime"
            );
        }
        tracing::info!(nodes = registry.len(), db = %store.describe(), "registry loaded");
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
        // The background work, each on its own period until the stop.
        let mut background = vec![
            spawn_every(&state, state.settings.sweep_interval(), &stop_rx, |state| async move {
                let started = std::time::Instant::now();
                if let Err(err) = state.registry.sweep().await {
                    background_failure(&state, "offline sweep failed", &format!("{err:#}"));
                }
                state.metrics.sweep_seconds.observe(started.elapsed().as_secs_f64());
            }),
            spawn_every(&state, state.settings.flush_interval, &stop_rx, |state| async move {
                if let Err(err) = state.registry.flush().await {
                    background_failure(&state, "writing heartbeat figures failed; will retry", &format!("{err:#}"));
                }
            }),
            spawn_every(&state, EVENT_PRUNE_INTERVAL, &stop_rx, |state| async move {
                match prune_events(&state).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed node events past the retention period"),
                    Err(err) => {
                        background_failure(&state, "removing old node events failed; will retry", &format!("{err:#}"))
                    }
                }
            }),
            spawn_every(&state, UPKEEP_INTERVAL, &stop_rx, |state| async move {
                if let Err(err) = state.store.upkeep().await {
                    background_failure(&state, "storage upkeep (checkpoint) failed; will retry", &format!("{err:#}"));
                }
            }),
            spawn_every(&state, state.settings.pending_expiry_interval(), &stop_rx, |state| async move {
                let ttl_ms = i64::try_from(state.settings.pending_ttl.as_millis()).unwrap_or(i64::MAX);
                match state.registry.expire_pending(ttl_ms).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed pending nodes that never heartbeat"),
                    Err(err) => background_failure(
                        &state,
                        "removing expired pending nodes failed; will retry",
                        &format!("{err:#}"),
                    ),
                }
            }),
        ];
        if state.store.shared().is_some() {
            background.extend(follow_other_routers(&state, &stop_rx));
        }
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
        state.audit.flush().await;
        state.store.close().await;
        served.context("serving HTTP")
    }
}

/// Removes node events and audit events older than the retention period (`--event-retention-days`); returns how
/// many.
pub async fn prune_events(state: &AppInner) -> anyhow::Result<u64> {
    let retention = i64::try_from(state.settings.event_retention.as_millis()).unwrap_or(i64::MAX);
    let cutoff = state.clock.now_ms().saturating_sub(retention);
    Ok(state.store.prune_events(cutoff).await? + state.store.prune_audit(cutoff).await?)
}

/// The tasks that keep this router in step with the others sharing its database (SPEC §11): node changes, read
/// when the database signals one and at least every [`FOLLOW_INTERVAL`]; heartbeat figures other routers received,
/// every [`FOLLOW_INTERVAL`]; and revoked credentials, forgotten as soon as announced.
fn follow_other_routers(state: &AppState, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let nodes = {
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let Some(shared) = state.store.shared() else { return };
            loop {
                if let Err(err) = state.registry.follow_nodes().await {
                    background_failure(
                        &state,
                        "reading other routers' node changes failed; will retry",
                        &format!("{err:#}"),
                    );
                }
                tokio::select! {
                    _ = shared.signals().nodes.notified() => {}
                    _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let seen = spawn_every(state, FOLLOW_INTERVAL, stop, |state| async move {
        if let Err(err) = state.registry.follow_seen().await {
            background_failure(&state, "reading other routers' heartbeats failed; will retry", &format!("{err:#}"));
        }
    });
    let credentials = {
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let Some(shared) = state.store.shared() else { return };
            loop {
                tokio::select! {
                    _ = shared.signals().credentials.notified() => {
                        for revoked in shared.signals().take_revoked() {
                            state.credentials.announced(revoked);
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        })
    };
    vec![nodes, seen, credentials]
}

/// Logs a background task's failure: as a warning, or, while the database is unreachable or lost (which the store
/// has said once, loudly), at debug level, so that the log is not one line per task per second of an outage.
fn background_failure(state: &AppInner, what: &str, error: &str) {
    if state.store.availability() == Availability::Available {
        tracing::warn!(%error, "{what}");
    } else {
        tracing::debug!(%error, "{what}");
    }
}

/// Spawns `tick(state)` every `period` until `stop` turns true.
fn spawn_every<F, Fut>(state: &AppState, period: Duration, stop: &watch::Receiver<bool>, tick: F) -> JoinHandle<()>
where
    F: Fn(AppState) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let state = state.clone();
    tokio::spawn(every(period, stop.clone(), move || tick(state.clone())))
}

/// Runs `tick` every `period` until `stop` turns true.
async fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, tick: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => tick().await,
            _ = stop.changed() => return,
        }
    }
}

async fn import_legacy(store: &Store, legacy: &LegacyFile, now: Millis) -> anyhow::Result<()> {
    for skipped in &legacy.skipped {
        tracing::warn!("nodes.json: not imported: {skipped}");
    }
    let nodes: Vec<NewNode> = legacy
        .nodes
        .iter()
        .map(|node| NewNode { node: node.clone(), token: None, events: vec![LegacyFile::event(node, now)] })
        .collect();
    let added = store.import_nodes(&nodes).await.context("importing nodes.json")?;
    tracing::info!(
        imported = added.len(),
        already_present = nodes.len() - added.len(),
        skipped = legacy.skipped.len(),
        "nodes.json imported; the agents of these nodes register again and an administrator approves them"
    );
    legacy.mark_migrated()
}

/// How often the storage's upkeep runs: for SQLite, the write-ahead log is copied into the database in the
/// background (a passive checkpoint, beside the writer), often enough that the checkpoint a write does when the log
/// is over its limit finds little to copy.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);

/// How often node events past the retention period are removed (also once at start).
const EVENT_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// The file that records that the data directory holds a database.
const INITIALISED_MARKER: &str = "initialised";

/// Returns whether the data directory was initialised before. A database file that is missing or empty (0 bytes)
/// in an initialised directory is a fault (a truncated or lost file), not a fresh install: creating a new, empty
/// fleet over it would hide the loss, so the start stops.
fn check_database_file(settings: &Settings) -> anyhow::Result<bool> {
    let marker = settings.data_dir.join(INITIALISED_MARKER);
    let database = settings.database_path();
    let size = std::fs::metadata(&database).map(|meta| meta.len()).ok();
    if !marker.exists() {
        return Ok(size.is_some_and(|size| size > 0));
    }
    match size {
        Some(size) if size > 0 => Ok(true),
        found => anyhow::bail!(
            "the database {} is {} although this data directory was initialised ({} exists): it was truncated or \
             lost. Restore it from a backup (see docs/operations.md, Backups); to start afresh with an empty fleet \
             instead, remove {}",
            database.display(),
            if found.is_some() { "empty (0 bytes)" } else { "missing" },
            marker.display(),
            marker.display()
        ),
    }
}

/// Records that the data directory holds a database, once it has been created.
fn mark_initialised(settings: &Settings, now: Millis) -> anyhow::Result<()> {
    let marker = settings.data_dir.join(INITIALISED_MARKER);
    let text = format!(
        "llm-router: router.db in this directory was created on {}. While this file exists, a missing or empty \
         router.db stops the start instead of creating an empty one.\n",
        crate::clock::rfc3339(now)
    );
    std::fs::write(&marker, text).with_context(|| format!("cannot write {}", marker.display()))
}

fn ensure_writable_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("data directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Creates the first administrator when there is no user yet (SPEC §9): with `LLM_ROUTER_ADMIN_PASSWORD`, or a
/// generated password printed once on the console.
async fn create_first_admin(credentials: &Credentials, settings: &Settings) -> anyhow::Result<()> {
    let created = credentials.ensure_first_admin(&settings.admin_username, settings.admin_password.as_deref()).await?;
    match created {
        // Printed once, on the console, and never again: it is not stored anywhere in clear.
        Some(FirstAdmin { username, password: Some(password) }) => println!(
            "llm-router created administrator `{username}` with password: {password}\n(shown only now; set LLM_ROUTER_ADMIN_PASSWORD to choose it)"
        ),
        Some(FirstAdmin { username, password: None }) => {
            tracing::info!(%username, "created administrator from LLM_ROUTER_ADMIN_PASSWORD")
        }
        None => {}
    }
    Ok(())
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

/// Logs the open-file limits and the connection cap they give; warns when a configured cap exceeds what they allow.
fn log_open_file_limit(limit: &server::OpenFileLimit, configured: Option<usize>) {
    let show = |value: Option<u64>| value.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    let derived = server::default_max_connections(limit.soft);
    let max_connections = configured.unwrap_or(derived);
    if let Some(error) = &limit.error {
        tracing::warn!(soft = %show(limit.soft), hard = %show(limit.hard), %error, "cannot raise the open-file limit");
    }
    tracing::info!(
        soft_before = %show(limit.soft_before),
        soft = %show(limit.soft),
        hard = %show(limit.hard),
        max_connections,
        "open-file limit"
    );
    if max_connections > derived {
        tracing::warn!(
            max_connections,
            open_file_limit = %show(limit.soft),
            "--max-connections exceeds what the open-file limit allows ({derived}); accepts may fail with too many open files"
        );
    }
}

/// Reads the certificate files again on every SIGHUP; a failed reload keeps the certificate in use.
fn reload_on_hangup(tls: Arc<Tls>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded; new connections get it"),
                Err(err) => tracing::error!(
                    error = %format!("{err:#}"),
                    "TLS certificate not reloaded; the one in use stays"
                ),
            }
        }
    });
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is first
/// polled, so a signal that arrives right after the start is a clean shutdown.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
