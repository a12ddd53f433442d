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
use std::sync::atomic::Ordering;

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use super::index::Index;
use super::{Registry, state};
use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::fleet::{FleetEvent, MASS_SILENCE};
use crate::store::Store;

/// A mass silence not yet resolved: its fleet event and the nodes it took offline.
#[derive(Debug)]
pub(super) struct MassSilence {
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
pub(super) struct Silences {
    /// The mass silence that lasts, if any.
    pub(super) lasting: Option<MassSilence>,
    /// Nodes marked offline by the sweeps of the last `offline_after / 2` and not yet part of a mass silence, with
    /// when.
    recent: VecDeque<(Millis, Uuid)>,
}

/// The latest mass silence, when it is unresolved, as the store has it at start-up. Which nodes it took offline is
/// not stored; those offline now stand for them.
pub(super) async fn unresolved(store: &Store, index: &Index) -> anyhow::Result<Silences> {
    let latest = store.fleet_events(1).await?.into_iter().next();
    let Some(event) = latest.filter(|event| event.kind == MASS_SILENCE && event.resolved_at.is_none()) else {
        return Ok(Silences::default());
    };
    let nodes = index
        .nodes
        .iter()
        .filter(|(_, slot)| slot.lock().node.status == NodeStatus::Offline)
        .map(|(id, _)| *id)
        .collect();
    let lasting =
        MassSilence { id: event.id, nodes, started: event.at, affected: event.nodes_affected, live: event.nodes_live };
    Ok(Silences { lasting: Some(lasting), recent: VecDeque::new() })
}

/// How many of the latest fleet events a router with a shared database looks through for the dismissal, made
/// through another router, of the mass silence it holds.
const FLEET_EVENTS_LOOKED_AT: u32 = 50;

impl Registry {
    /// The sweep's interval, as the router schedules it: a tenth of `offline_after`, between 100 ms and 1 s.
    fn sweep_interval_ms(&self) -> i64 {
        (self.offline_after_ms / 10).clamp(100, 1000)
    }

    /// Notes that a sweep runs at `now`; when it runs more than `offline_after / 2` later than due after the
    /// previous one, gives every live node a fresh grace period (its silence counts from `now`) and returns true.
    pub(super) fn grace_after_stall(&self, now: Millis) -> bool {
        let previous = self.last_sweep_at.swap(now, Ordering::SeqCst);
        let late = now - previous - self.sweep_interval_ms();
        if late <= self.offline_after_ms / 2 {
            return false;
        }
        let mut live = 0;
        for slot in self.read().nodes.values() {
            let mut state = slot.bookkeeping();
            if state::is_live(state.node.status) {
                state.alive_since = state.alive_since.max(now);
                live += 1;
            }
        }
        tracing::warn!(
            late_ms = late,
            live_nodes = live,
            "the offline sweep ran late (the router was paused or stopped, or its clock jumped): every live node \
             gets a fresh grace period before any is marked offline"
        );
        true
    }

    /// Records a mass silence when the nodes this sweep marked offline (`offline`, at `now`), with those marked
    /// within `offline_after / 2` before and still offline, are one; `live` nodes are left. While one lasts, nodes
    /// going offline within `offline_after` of its start join it instead.
    pub(super) async fn report_silence(&self, now: Millis, offline: &[Uuid], live: usize) -> anyhow::Result<()> {
        let window = self.offline_after_ms / 2;
        let silence = {
            let mut guard = self.mass_silence.lock().unwrap_or_else(|p| p.into_inner());
            let silences = &mut *guard;
            let recent = &mut silences.recent;
            while recent.front().is_some_and(|(at, _)| now - at > window) {
                recent.pop_front();
            }
            if offline.is_empty() {
                return Ok(());
            }
            recent.extend(offline.iter().map(|id| (now, *id)));
            let index = self.read();
            recent.retain(|(_, id)| {
                index.nodes.get(id).is_some_and(|slot| slot.lock().node.status == NodeStatus::Offline)
            });
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
                if !crate::model::fleet::is_mass_silence(recent.len(), live + recent.len()) {
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
        let previous = self.mass_silence.lock().unwrap_or_else(|p| p.into_inner()).lasting.take();
        if let Some(previous) = previous {
            self.store.resolve_fleet_event(previous.id, event.at, None, "superseded").await?;
        }
        event.id = self.store.insert_fleet_event(&event).await?;
        tracing::warn!(
            offline = silent.len(),
            live = live + silent.len(),
            "{message}: a network or router problem rather than that many broken machines"
        );
        self.mass_silence.lock().unwrap_or_else(|p| p.into_inner()).lasting = Some(MassSilence {
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

    /// Resolves the unresolved mass silence once none of its nodes is offline any more (back, or deleted).
    pub(super) async fn settle_silence(&self) -> anyhow::Result<()> {
        let id = {
            let guard = self.mass_silence.lock().unwrap_or_else(|p| p.into_inner());
            let Some(silence) = guard.lasting.as_ref() else { return Ok(()) };
            let index = self.read();
            let still_offline = silence
                .nodes
                .iter()
                .any(|id| index.nodes.get(id).is_some_and(|slot| slot.lock().node.status == NodeStatus::Offline));
            if !still_offline {
                Some(silence.id)
            } else if self.store.shared().is_some() {
                None
            } else {
                return Ok(());
            }
        };
        let Some(id) = id else {
            // An administrator may have dismissed it through another router sharing the database.
            let lasting = self.mass_silence.lock().unwrap_or_else(|p| p.into_inner()).lasting.as_ref().map(|s| s.id);
            let Some(id) = lasting else { return Ok(()) };
            let events = self.store.fleet_events(FLEET_EVENTS_LOOKED_AT).await?;
            if events.iter().any(|event| event.id == id && event.resolved_at.is_some()) {
                self.clear_silence(id);
            }
            return Ok(());
        };
        self.store.resolve_fleet_event(id, self.clock.now_ms(), None, "nodes returned").await?;
        self.clear_silence(id);
        Ok(())
    }

    /// Dismisses fleet event `id` by administrator `by`. Returns false when there is no such event or it was
    /// resolved already.
    pub async fn dismiss_fleet_event(&self, id: i64, by: &str) -> anyhow::Result<bool> {
        let dismissed = self.store.resolve_fleet_event(id, self.clock.now_ms(), Some(by), "dismissed").await?;
        if dismissed {
            self.clear_silence(id);
        }
        Ok(dismissed)
    }

    fn clear_silence(&self, id: i64) {
        let mut guard = self.mass_silence.lock().unwrap_or_else(|p| p.into_inner());
        if guard.lasting.as_ref().is_some_and(|silence| silence.id == id) {
            guard.lasting = None;
            self.metrics.mass_silence.set(0);
        }
    }
}
