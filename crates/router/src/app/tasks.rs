//! The background work of a serving app: the offline sweep, the write-behind of heartbeat figures, event pruning,
//! storage upkeep, pending expiry and, with a shared database, following the other routers; each runs on its own
//! period until the stop.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::registry::FOLLOW_INTERVAL;
use crate::state::{AppInner, AppState};
use crate::store::Availability;
use crate::usage::{FLUSH_INTERVAL, REFRESH_INTERVAL};

/// Starts the background work, each on its own period until `stop` turns true.
pub(super) fn spawn(state: &AppState, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut background = vec![
        spawn_every(state, state.settings.sweep_interval(), stop, |state| async move {
            let started = std::time::Instant::now();
            if let Err(err) = state.registry.sweep().await {
                background_failure(&state, "offline sweep failed", &format!("{err:#}"));
            }
            state.metrics.sweep_seconds.observe(started.elapsed().as_secs_f64());
        }),
        spawn_every(state, state.settings.flush_interval, stop, |state| async move {
            if let Err(err) = state.registry.flush().await {
                background_failure(&state, "writing heartbeat figures failed; will retry", &format!("{err:#}"));
            }
        }),
        spawn_every(state, EVENT_PRUNE_INTERVAL, stop, |state| async move {
            match prune_events(&state).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed node events past the retention period"),
                Err(err) => {
                    background_failure(&state, "removing old node events failed; will retry", &format!("{err:#}"))
                }
            }
        }),
        spawn_every(state, UPKEEP_INTERVAL, stop, |state| async move {
            if let Err(err) = state.store.upkeep().await {
                background_failure(&state, "storage upkeep (checkpoint) failed; will retry", &format!("{err:#}"));
            }
        }),
        spawn_every(state, state.settings.pending_expiry_interval(), stop, |state| async move {
            let ttl_ms = i64::try_from(state.settings.pending_ttl.as_millis()).unwrap_or(i64::MAX);
            match state.registry.expire_pending(ttl_ms).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed pending nodes that never heartbeat"),
                Err(err) => {
                    background_failure(&state, "removing expired pending nodes failed; will retry", &format!("{err:#}"))
                }
            }
        }),
        usage(state, stop),
        deployments(state, stop),
        spawn_every(state, USAGE_PRUNE_INTERVAL, stop, |state| async move {
            match prune_usage(&state).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed usage records and sums past their retention"),
                Err(err) => {
                    background_failure(&state, "removing old usage records failed; will retry", &format!("{err:#}"))
                }
            }
        }),
    ];
    if state.store.shared().is_some() {
        background.extend(follow_other_routers(state, stop));
    }
    background
}

/// Removes node events and audit events older than the retention period (`--event-retention-days`); returns how
/// many.
pub async fn prune_events(state: &AppInner) -> anyhow::Result<u64> {
    let retention = i64::try_from(state.settings.event_retention.as_millis()).unwrap_or(i64::MAX);
    let cutoff = state.clock.now_ms().saturating_sub(retention);
    Ok(state.store.prune_events(cutoff).await? + state.store.prune_audit(cutoff).await?)
}

/// Writes the usage records every [`FLUSH_INTERVAL`]; every [`REFRESH_INTERVAL`] also reads back what tenants with
/// limits have spent, and every key's and user's limits (other routers may have changed them).
fn usage(state: &AppState, stop: &watch::Receiver<bool>) -> JoinHandle<()> {
    let every_refresh = (REFRESH_INTERVAL.as_millis() / FLUSH_INTERVAL.as_millis()).max(1) as u64;
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    spawn_every(state, FLUSH_INTERVAL, stop, move |state| {
        let tick = ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let refresh = tick.is_multiple_of(every_refresh);
            if let Err(err) = state.ledger.flush(&state.store, refresh).await {
                background_failure(&state, "writing usage records failed; will retry", &format!("{err:#}"));
            }
            if refresh && let Err(err) = state.credentials.load_policies().await {
                background_failure(&state, "reading keys' limits failed; will retry", &format!("{err:#}"));
            }
        }
    })
}

/// Every [`DEPLOY_FLUSH_INTERVAL`] writes what nodes reported of their replicas; every [`DEPLOY_PLACE_INTERVAL`]
/// reads the deployments back (with PostgreSQL, what other routers changed) and places the replicas that need a node
/// (SPEC §15; only the router that holds the sweep lease places).
fn deployments(state: &AppState, stop: &watch::Receiver<bool>) -> JoinHandle<()> {
    let every_place = (DEPLOY_PLACE_INTERVAL.as_millis() / DEPLOY_FLUSH_INTERVAL.as_millis()).max(1) as u64;
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    spawn_every(state, DEPLOY_FLUSH_INTERVAL, stop, move |state| {
        let tick = ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            if let Err(err) = state.deployments.flush().await {
                background_failure(&state, "writing replica reports failed; will retry", &format!("{err:#}"));
            }
            if !tick.is_multiple_of(every_place) {
                return;
            }
            if let Err(err) = state.deployments.reload().await {
                background_failure(&state, "reading deployments failed; will retry", &format!("{err:#}"));
                return;
            }
            if let Err(err) = state.deployments.place(&state.registry).await {
                background_failure(&state, "placing replicas failed; will retry", &format!("{err:#}"));
            }
        }
    })
}

/// How often what nodes report of their replicas is written, and how often replicas are placed.
pub const DEPLOY_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
pub const DEPLOY_PLACE_INTERVAL: Duration = Duration::from_secs(1);

/// Removes request records older than `--request-log-days` and usage sums older than `--usage-retention-days`;
/// returns how many rows.
pub async fn prune_usage(state: &AppInner) -> anyhow::Result<u64> {
    let now = state.clock.now_ms();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let requests_before = now.saturating_sub(ms(state.settings.request_log));
    let rollups_before = now.saturating_sub(ms(state.settings.usage_retention));
    Ok(state.store.prune_usage(requests_before, rollups_before).await?)
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

/// How often the storage's upkeep runs: for SQLite, the write-ahead log is copied into the database in the
/// background (a passive checkpoint, beside the writer), often enough that the checkpoint a write does when the log
/// is over its limit finds little to copy.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);

/// How often usage past its retention is removed (also once at start).
const USAGE_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// How often node events past the retention period are removed (also once at start).
const EVENT_PRUNE_INTERVAL: Duration = Duration::from_secs(600);
