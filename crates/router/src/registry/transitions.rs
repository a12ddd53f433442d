//! Where a node changes state: heartbeats (SPEC §2.2), approval, the offline sweep, an administrator's edits and
//! deletion, and the expiry of silent pending nodes (SPEC §9). Each decision is taken under the node's own lock
//! and committed to the store before memory changes.

use std::sync::Arc;

use futures_util::StreamExt;
use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use super::commit::{Committed, Decision};
use super::index::{NodeHandle, Slot, SlotState};
use super::{Registry, RegistryError, RegistryResult, state};
use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::figures::PackedFigures;
use crate::model::health;
use crate::model::input::Heartbeat;
use crate::model::node::{Node, NodeEvent};
use crate::store::StoreError;

/// Transitions the offline sweep has in flight at once: enough to fill a group commit of the store.
const SWEEP_CONCURRENCY: usize = 512;

impl Registry {
    /// Applies a heartbeat of the node whose token the caller presented (SPEC §2.2): `TokenOfAnotherNode` when the
    /// body names another node, `UnknownToken` when the token stopped being the node's meanwhile.
    pub async fn heartbeat(&self, node: &NodeHandle, hb: Heartbeat) -> RegistryResult<NodeStatus> {
        if node.id != hb.node_id {
            return Err(RegistryError::TokenOfAnotherNode(hb.node_id));
        }
        let slot = &node.slot;
        // Packed once here, kept and stored as it is, unpacked only when shown.
        let figures = PackedFigures::pack(&hb.figures);
        let waiting = hb.figures.load.and_then(|load| load.waiting).unwrap_or(0);
        let now = self.clock.now_ms();
        let findings;
        {
            let mut state = slot.edit(&self.revisions);
            if state.deleted || state.token != Some(node.token) {
                return Err(RegistryError::UnknownToken);
            }
            findings = health::assess(&state.node.gpu_devices, &hb.figures.gpus, self.gpu_max_temp_c);
            let models_changed =
                state.node.loaded_models != hb.loaded_models || state.node.ready_models != hb.ready_models;
            state.node.figures = Some(figures);
            state.node.last_seen_at = Some(now);
            state.alive_since = now;
            if models_changed {
                state.node.loaded_models = hb.loaded_models;
                state.node.ready_models = hb.ready_models;
                state.searchable();
                state.models_dirty = true;
                self.routing.update(&state.node);
            }
            if waiting != 0 || state.waiting != 0 {
                state.waiting = waiting;
                self.routing.report_waiting(node.id, waiting);
            }
            self.figures.mark(&mut state, now);
            let next = state::after_heartbeat(state.node.status, &state.node.ready_models, findings.conditions);
            if next == state.node.status {
                // Which conditions keep a degraded node degraded may change; it stays degraded either way.
                if next == NodeStatus::Degraded {
                    state.node.conditions = findings.conditions;
                }
                return Ok(next);
            }
        }
        let committed = self
            .commit(slot, |state, now| {
                let node = &state.node;
                let to = state::after_heartbeat(node.status, &node.ready_models, findings.conditions);
                if to == node.status {
                    return Ok(Decision::Keep);
                }
                let reason = state::heartbeat_reason(node.status, node.conditions, to, &findings);
                let event = NodeEvent::new(node.id, now, Some(node.status), to.as_str(), reason);
                let mut node = node.clone();
                node.status = to;
                node.conditions = findings.conditions;
                Ok(Decision::Record(node, event))
            })
            .await?;
        if committed == Committed::Gone {
            return Err(RegistryError::UnknownToken);
        }
        Ok(node.slot.lock().node.status)
    }

    /// Approves a pending node (SPEC §2.3) by `by`; `NotPending` otherwise. Returns the node as approved.
    pub async fn approve(&self, id: Uuid, by: &str) -> RegistryResult<Node> {
        self.decide(id, |state, now| {
            let Some(to) = state::after_approval(state.node.status, &state.node.ready_models, state.node.conditions)
            else {
                return Err(RegistryError::NotPending { id, status: state.node.status });
            };
            let mut node = state.node.clone();
            let event = NodeEvent::new(id, now, Some(node.status), to.as_str(), "approved").by(Some(by));
            node.status = to;
            node.approved_at = Some(now);
            node.approved_by = Some(by.to_owned());
            Ok(Decision::Record(node, event))
        })
        .await
    }

    /// Cordons a node (`cordoned`: no new inference request goes to it; requests in flight finish) or uncordons
    /// it, by `by`, with an event. Returns the node after; cordoning a cordoned node changes nothing.
    pub async fn cordon(&self, id: Uuid, cordoned: bool, by: &str) -> RegistryResult<Node> {
        self.decide(id, |state, now| {
            if state.node.cordoned == cordoned {
                return Ok(Decision::Keep);
            }
            let mut node = state.node.clone();
            let reason = if cordoned { "cordoned: no new requests" } else { "uncordoned: takes requests again" };
            let event = NodeEvent::new(id, now, Some(node.status), node.status.as_str(), reason).by(Some(by));
            node.cordoned = cordoned;
            Ok(Decision::Record(node, event))
        })
        .await
    }

    /// Updates the fields an administrator owns. Returns the node after the edit.
    pub async fn update(&self, id: Uuid, edit: AdminEdit) -> RegistryResult<Node> {
        let AdminEdit { display_name, notes, tags, max_concurrency } = edit;
        self.decide(id, |state, _| {
            let mut node = state.node.clone();
            if let Some(display_name) = display_name {
                node.display_name = display_name;
            }
            if let Some(notes) = notes {
                node.notes = notes;
            }
            if let Some(tags) = tags {
                node.tags = tags;
            }
            if let Some(max_concurrency) = max_concurrency {
                node.max_concurrency = max_concurrency;
            }
            Ok(Decision::Edit(node))
        })
        .await
    }

    /// An administrator's decision about node `id`, committed; the node after it. `NotFound` when there is no such
    /// node, or it was deleted meanwhile.
    async fn decide(
        &self,
        id: Uuid,
        decide: impl FnOnce(&SlotState, Millis) -> RegistryResult<Decision>,
    ) -> RegistryResult<Node> {
        let slot = self.slot(id)?;
        match self.commit(&slot, decide).await? {
            Committed::Gone | Committed::Removed => Err(RegistryError::NotFound(id)),
            Committed::Kept | Committed::Changed => Ok(slot.lock().node.clone()),
        }
    }

    /// Marks offline every live node silent for `offline_after` (SPEC §2.3). Returns how many went offline.
    ///
    /// A sweep that ran more than `offline_after / 2` late marks none: every live node gets a fresh grace period
    /// (SPEC §10). One that brings the nodes marked offline within `offline_after / 2` to more than half of the live
    /// nodes (at least ten) records a mass silence.
    ///
    /// Cost: one pass over the in-memory map with a short per-node lock, no database read; only nodes that change
    /// are written.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let _sweeping = self.sweeps.running.lock().await;
        let now = self.clock.now_ms();
        self.revisions.align(now);
        if self.grace_after_stall(now) || !self.following.lead(&self.store, &self.metrics).await {
            return Ok(0);
        }
        self.sweeps.settle(now, |id| self.is_offline(id)).await?;
        let limit = self.offline_after_ms;
        let mut live = 0;
        let candidates: Vec<Arc<Slot>> = self
            .read()
            .nodes
            .values()
            .filter(|slot| {
                let state = slot.lock();
                live += usize::from(state::is_live(state.node.status));
                state::goes_offline(state.node.status, now - state.alive_since, limit)
            })
            .cloned()
            .collect();
        let mut offline = Vec::new();
        let reason = format!("no heartbeat for {} s", limit / 1000);
        // Many at a time, so that the store commits them in groups rather than one durable commit each.
        let mut changes = futures_util::stream::iter(candidates)
            .map(|slot| async {
                let committed = self
                    .commit(&slot, |state, now| {
                        if !state::goes_offline(state.node.status, now - state.alive_since, limit) {
                            return Ok(Decision::Keep);
                        }
                        let mut node = state.node.clone();
                        let event =
                            NodeEvent::new(node.id, now, Some(node.status), NodeStatus::Offline.as_str(), &*reason);
                        node.status = NodeStatus::Offline;
                        Ok(Decision::Record(node, event))
                    })
                    .await;
                (slot, committed)
            })
            .buffer_unordered(SWEEP_CONCURRENCY);
        let mut failed = None;
        while let Some((slot, committed)) = changes.next().await {
            match committed {
                Ok(Committed::Changed) => offline.push(slot.lock().node.id),
                Ok(_) => {}
                Err(err) => failed = Some(err),
            }
        }
        drop(changes);
        if let Some(err) = failed {
            // Those marked are reported with the error: the next sweep retries the others.
            self.sweeps.report(now, &offline, live - offline.len(), |id| self.is_offline(id)).await?;
            return Err(err.into());
        }
        let changed = offline.len();
        self.sweeps.report(now, &offline, live - changed, |id| self.is_offline(id)).await?;
        Ok(changed)
    }

    /// Deletes a node by `by`; its token stops working as soon as this returns.
    pub async fn delete(&self, id: Uuid, by: &str) -> RegistryResult<()> {
        let slot = self.slot(id)?;
        let committed = self
            .commit(&slot, |state, now| {
                let reason = "deleted by an administrator";
                Ok(Decision::Remove(NodeEvent::new(id, now, Some(state.node.status), "deleted", reason).by(Some(by))))
            })
            .await?;
        if committed != Committed::Removed {
            return Err(RegistryError::NotFound(id));
        }
        Ok(())
    }

    /// Removes every pending node silent for `ttl_ms` (SPEC §9), each with an event and like a deletion: its
    /// token stops working and its name and port are free again. Silence counts from the latest of its last
    /// heartbeat, its registration and the router's start, as offline detection does. Returns how many went.
    ///
    /// Cost: one pass over the in-memory map with a short per-node lock; only expired nodes are written.
    pub async fn expire_pending(&self, ttl_ms: i64) -> anyhow::Result<usize> {
        // One router decides, as for offline transitions.
        if !self.leads() {
            return Ok(0);
        }
        let now = self.clock.now_ms();
        let expired = |state: &SlotState, now: Millis| {
            state.node.status == NodeStatus::Pending && now - state.alive_since >= ttl_ms
        };
        let candidates: Vec<(Uuid, Arc<Slot>)> = self
            .read()
            .nodes
            .iter()
            .filter(|(_, slot)| expired(&slot.lock(), now))
            .map(|(id, slot)| (*id, slot.clone()))
            .collect();
        let reason = format!("pending for {} h without a heartbeat; removed", ttl_ms / 3_600_000);
        let mut removed = 0;
        for (id, slot) in candidates {
            // Decided again under the node's lock: a heartbeat or an approval may have come meanwhile.
            let committed = self
                .commit(&slot, |state, now| {
                    Ok(match expired(state, now) {
                        true => {
                            Decision::Remove(NodeEvent::new(id, now, Some(NodeStatus::Pending), "deleted", &*reason))
                        }
                        false => Decision::Keep,
                    })
                })
                .await?;
            if committed == Committed::Removed {
                removed += 1;
                Metrics::inc(&self.metrics.pending_expired);
            }
        }
        Ok(removed)
    }
}

impl Registry {
    /// Notes that a sweep runs at `now`; when it runs more than `offline_after / 2` later than due after the
    /// previous one, gives every live node a fresh grace period (its silence counts from `now`) and returns true.
    fn grace_after_stall(&self, now: Millis) -> bool {
        let Some(late) = self.sweeps.stalled(now) else { return false };
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

    /// Dismisses fleet event `id` by administrator `by`. Returns false when there is no such event or it was
    /// resolved already.
    pub async fn dismiss_fleet_event(&self, id: i64, by: &str) -> Result<bool, StoreError> {
        self.sweeps.dismiss(id, self.clock.now_ms(), by).await
    }
}

/// The fields of a node an administrator owns (`PATCH /v0/nodes/{id}`); `None` leaves a field as it is, `Some(None)`
/// clears it.
#[derive(Debug, Default)]
pub struct AdminEdit {
    pub display_name: Option<Option<String>>,
    pub notes: Option<Option<String>>,
    pub tags: Option<Vec<String>>,
    pub max_concurrency: Option<Option<u32>>,
}
