//! The router's own stalls and mass silences (SPEC §10): silence that is the router's or the network's fault, not
//! the nodes'.
//!
//! A sweep that runs more than half of `offline_after` late (the router was paused, stopped or its clock jumped)
//! gives every live node a fresh grace period instead of judging silence it did not watch.
//!
//! A mass silence is more than half of the live nodes (and at least ten) going offline together. Together means
//! within `offline_after / 2`, not in one sweep: agents heartbeat every few seconds (10 s by default) at their own
//! phase, so when a network partition silences them all at once, their silences pass `offline_after` spread over a
//! heartbeat interval, a sweep or ten apart. The sweep that completes one records one fleet event, raises
//! `llm_router_mass_silence` and lets the dashboard show a banner, until the nodes come back or an administrator
//! dismisses it. The event completes when more than half have gone; the rest of the same silence (nodes going
//! offline within `offline_after` of its first) join it, so that the event counts the whole of it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::fleet_event::{FleetEvent, MASS_SILENCE, is_mass_silence};
use crate::store::{Store, StoreError};

/// A mass silence not yet resolved: its fleet event and the nodes it took offline.
#[derive(Debug)]
struct MassSilence {
    id: i64,
    nodes: HashSet<Uuid>,
    /// When its first node went offline: nodes going offline up to `offline_after` later join it.
    started: Millis,
    /// As in its fleet event: the nodes it took offline, and the live nodes before it.
    affected: u64,
    live: u64,
}

/// What a sweep's silences amount to.
enum Silence {
    /// A mass silence, made of these nodes, with `live` nodes left; it started at `started`.
    New { nodes: Vec<Uuid>, live: usize, started: Millis },
    /// The lasting mass silence `id` now counts `affected` of `live` nodes.
    Grown { id: i64, affected: u64, live: u64 },
}

/// What the sweeps know of silences across the fleet.
#[derive(Debug, Default)]
struct Silences {
    /// The mass silence that lasts, if any.
    lasting: Option<MassSilence>,
    /// Nodes marked offline by the sweeps of the last `offline_after / 2` and not yet part of a mass silence, with
    /// when.
    recent: VecDeque<(Millis, Uuid)>,
}

/// How many of the latest fleet events a router with a shared database looks through for the dismissal, made
/// through another router, of the mass silence it holds.
const FLEET_EVENTS_LOOKED_AT: u32 = 50;

/// The offline sweeps' watch over the fleet's silences: when the sweep last ran, and the mass silences.
pub(super) struct Sweeps {
    offline_after_ms: i64,
    /// When the sweep last ran, by the router's clock.
    last_at: AtomicI64,
    /// Held for a whole sweep, so two sweeps never decide on the same silence.
    pub(super) running: tokio::sync::Mutex<()>,
    silences: Mutex<Silences>,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Sweeps {
    /// The watch at start-up (`now`): the latest mass silence, when it is unresolved, as the store has it. Which
    /// nodes it took offline is not stored; those offline now (`offline`) stand for them.
    pub(super) async fn load(
        store: Store,
        metrics: Arc<Metrics>,
        offline_after_ms: i64,
        now: Millis,
        offline: HashSet<Uuid>,
    ) -> Result<Sweeps, StoreError> {
        let latest = store.fleet_events(1).await?.into_iter().next();
        let lasting =
            latest.filter(|event| event.kind == MASS_SILENCE && event.resolved_at.is_none()).map(|event| MassSilence {
                id: event.id,
                nodes: offline,
                started: event.at,
                affected: event.nodes_affected,
                live: event.nodes_live,
            });
        metrics.mass_silence.set(u64::from(lasting.is_some()));
        Ok(Sweeps {
            offline_after_ms,
            last_at: AtomicI64::new(now),
            running: tokio::sync::Mutex::new(()),
            silences: Mutex::new(Silences { lasting, recent: VecDeque::new() }),
            store,
            metrics,
        })
    }

    fn silences(&self) -> MutexGuard<'_, Silences> {
        self.silences.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sweep's interval, as the router schedules it: a tenth of `offline_after`, between 100 ms and 1 s.
    fn interval_ms(&self) -> i64 {
        (self.offline_after_ms / 10).clamp(100, 1000)
    }

    /// Notes that a sweep runs at `now`; answers how late it runs when that is more than `offline_after / 2` later
    /// than due after the previous one: the router did not watch the silence meanwhile.
    pub(super) fn stalled(&self, now: Millis) -> Option<i64> {
        let previous = self.last_at.swap(now, Ordering::SeqCst);
        let late = now - previous - self.interval_ms();
        (late > self.offline_after_ms / 2).then_some(late)
    }

    /// Records a mass silence when the nodes this sweep marked offline (`offline`, at `now`), with those marked
    /// within `offline_after / 2` before and still offline, are one; `live` nodes are left. While one lasts, nodes
    /// going offline within `offline_after` of its start join it instead.
    pub(super) async fn report(
        &self,
        now: Millis,
        offline: &[Uuid],
        live: usize,
        still_offline: impl Fn(&Uuid) -> bool,
    ) -> Result<(), StoreError> {
        let window = self.offline_after_ms / 2;
        let silence = {
            let mut guard = self.silences();
            let silences = &mut *guard;
            let recent = &mut silences.recent;
            while recent.front().is_some_and(|(at, _)| now - at > window) {
                recent.pop_front();
            }
            if offline.is_empty() {
                return Ok(());
            }
            recent.extend(offline.iter().map(|id| (now, *id)));
            recent.retain(|(_, id)| still_offline(id));
            let burst = self.offline_after_ms;
            if let Some(lasting) = silences.lasting.as_mut().filter(|lasting| now - lasting.started <= burst) {
                if recent.is_empty() {
                    return Ok(());
                }
                let joined = recent.len();
                lasting.nodes.extend(recent.drain(..).map(|(_, id)| id));
                lasting.affected += joined as u64;
                lasting.live = lasting.live.max(lasting.affected);
                Silence::Grown { id: lasting.id, affected: lasting.affected, live: lasting.live }
            } else {
                if !is_mass_silence(recent.len(), live + recent.len()) {
                    return Ok(());
                }
                let started = recent.front().map_or(now, |(at, _)| *at);
                Silence::New { nodes: recent.drain(..).map(|(_, id)| id).collect(), live, started }
            }
        };
        let (silent, live, started) = match silence {
            Silence::Grown { id, affected, live } => {
                let message = format!("mass silence: {affected} of {live} nodes");
                self.store.grow_fleet_event(id, affected, live, &message).await?;
                tracing::warn!(offline = affected, live, "{message}: more nodes of the same silence went offline");
                return Ok(());
            }
            Silence::New { nodes, live, started } => (nodes, live, started),
        };
        let message = format!("mass silence: {} of {} nodes", silent.len(), live + silent.len());
        let mut event = FleetEvent {
            id: 0,
            at: now,
            kind: MASS_SILENCE.to_owned(),
            message: message.clone(),
            nodes_affected: silent.len() as u64,
            nodes_live: (live + silent.len()) as u64,
            resolved_at: None,
            resolved_by: None,
            resolution: None,
        };
        // A mass silence that lasts is superseded: the banner shows the latest.
        let previous = self.silences().lasting.take();
        if let Some(previous) = previous {
            self.store.resolve_fleet_event(previous.id, event.at, None, "superseded").await?;
        }
        event.id = self.store.insert_fleet_event(&event).await?;
        tracing::warn!(
            offline = silent.len(),
            live = live + silent.len(),
            "{message}: a network or router problem rather than that many broken machines"
        );
        self.silences().lasting = Some(MassSilence {
            id: event.id,
            nodes: silent.into_iter().collect(),
            started,
            affected: event.nodes_affected,
            live: event.nodes_live,
        });
        Metrics::inc(&self.metrics.mass_silences);
        self.metrics.mass_silence.set(1);
        Ok(())
    }

    /// Resolves the unresolved mass silence at `now` once none of its nodes is offline any more (back, or deleted).
    pub(super) async fn settle(&self, now: Millis, still_offline: impl Fn(&Uuid) -> bool) -> Result<(), StoreError> {
        let id = {
            let guard = self.silences();
            let Some(silence) = guard.lasting.as_ref() else { return Ok(()) };
            if !silence.nodes.iter().any(&still_offline) {
                Some(silence.id)
            } else if self.store.shared().is_some() {
                None
            } else {
                return Ok(());
            }
        };
        let Some(id) = id else {
            // An administrator may have dismissed it through another router sharing the database.
            let lasting = self.silences().lasting.as_ref().map(|s| s.id);
            let Some(id) = lasting else { return Ok(()) };
            let events = self.store.fleet_events(FLEET_EVENTS_LOOKED_AT).await?;
            if events.iter().any(|event| event.id == id && event.resolved_at.is_some()) {
                self.clear(id);
            }
            return Ok(());
        };
        self.store.resolve_fleet_event(id, now, None, "nodes returned").await?;
        self.clear(id);
        Ok(())
    }

    /// Dismisses fleet event `id` by administrator `by` at `now`. Returns false when there is no such event or it
    /// was resolved already.
    pub(super) async fn dismiss(&self, id: i64, now: Millis, by: &str) -> Result<bool, StoreError> {
        let dismissed = self.store.resolve_fleet_event(id, now, Some(by), "dismissed").await?;
        if dismissed {
            self.clear(id);
        }
        Ok(dismissed)
    }

    fn clear(&self, id: i64) {
        let mut guard = self.silences();
        if guard.lasting.as_ref().is_some_and(|silence| silence.id == id) {
            guard.lasting = None;
            self.metrics.mass_silence.set(0);
        }
    }
}
