//! Where a node changes state: heartbeats (SPEC §2.2), approval, the offline sweep, an administrator's edits and
//! deletion, and the expiry of silent pending nodes (SPEC §9). Each decision is taken under the node's own lock
//! and committed to the store before memory changes.

use std::sync::Arc;

use futures_util::StreamExt;
use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use super::index::{NodeHandle, Slot, SlotState};
use super::{Registry, RegistryError, RegistryResult, state};
use crate::clock::Millis;
use crate::metrics::Metrics;
use crate::model::figures::PackedMetrics;
use crate::model::health::{self, Condition, Conditions};
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
        let metrics = PackedMetrics::pack(&hb.metrics);
        let now = self.clock.now_ms();
        let findings;
        {
            let mut state = slot.edit(&self.revisions);
            if state.deleted || state.token != Some(node.token) {
                return Err(RegistryError::UnknownToken);
            }
            findings = health::assess(&state.node.gpu_devices, &hb.metrics.gpus, self.gpu_max_temp_c);
            let models_changed =
                state.node.loaded_models != hb.loaded_models || state.node.ready_models != hb.ready_models;
            state.node.metrics = Some(metrics);
            state.node.last_seen_at = Some(now);
            state.alive_since = now;
            if models_changed {
                state.node.loaded_models = hb.loaded_models;
                state.node.ready_models = hb.ready_models;
                state.searchable();
                state.models_dirty = true;
                self.routing.update(&state.node);
            }
            self.mark_figures_dirty(&mut state, now);
            let next = state::after_heartbeat(state.node.status, &state.node.ready_models, findings.conditions);
            if next == state.node.status {
                // Which conditions keep a degraded node degraded may change; it stays degraded either way.
                if next == NodeStatus::Degraded {
                    state.node.conditions = findings.conditions;
                }
                return Ok(next);
            }
        }
        let status = self
            .transition_with(slot, Some(findings.conditions), |state| {
                let node = &state.node;
                let to = state::after_heartbeat(node.status, &node.ready_models, findings.conditions);
                if to == node.status {
                    return None;
                }
                let names: Vec<&str> = findings.conditions.iter().map(Condition::as_str).collect();
                let reason = match to {
                    NodeStatus::Degraded => format!("{}: {}", names.join(", "), findings.detail),
                    NodeStatus::Online if node.status == NodeStatus::Degraded => {
                        "GPU conditions cleared; heartbeat reports ready models".to_owned()
                    }
                    NodeStatus::Online => "heartbeat reports ready models".to_owned(),
                    _ if node.status == NodeStatus::Degraded => {
                        "GPU conditions cleared; heartbeat reports no ready model".to_owned()
                    }
                    _ => "heartbeat reports no ready model".to_owned(),
                };
                Some((to, reason))
            })
            .await?;
        status.ok_or(RegistryError::UnknownToken)
    }

    /// Approves a pending node (SPEC §2.3) by `by`; `NotPending` otherwise. Returns the node as approved.
    pub async fn approve(&self, id: Uuid, by: &str) -> RegistryResult<Node> {
        let slot = self.slot(id)?;
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, event) = {
            let state = slot.lock();
            if state.deleted {
                return Err(RegistryError::NotFound(id));
            }
            let Some(to) = state::after_approval(state.node.status, &state.node.ready_models, state.node.conditions)
            else {
                return Err(RegistryError::NotPending { id, status: state.node.status });
            };
            let mut node = state.node.clone();
            let event = NodeEvent::new(id, now, Some(node.status), to.as_str(), "approved").by(Some(by));
            node.status = to;
            node.approved_at = Some(now);
            node.approved_by = Some(by.to_owned());
            (node, event)
        };
        self.store.record_transition(&updated, &event).await?;
        self.metrics.transition(updated.status);
        let mut state = slot.edit(&self.revisions);
        self.count_pending(state.node.status, updated.status);
        state.node.status = updated.status;
        state.node.approved_at = updated.approved_at;
        state.node.approved_by = updated.approved_by;
        state.alive_since = now;
        self.routing.update(&state.node);
        Ok(state.node.clone())
    }

    /// Cordons a node (`cordoned`: no new inference request goes to it; requests in flight finish) or uncordons
    /// it, by `by`, with an event. Returns the node after; cordoning a cordoned node changes nothing.
    pub async fn cordon(&self, id: Uuid, cordoned: bool, by: &str) -> RegistryResult<Node> {
        let slot = self.slot(id)?;
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, event) = {
            let state = slot.lock();
            if state.deleted {
                return Err(RegistryError::NotFound(id));
            }
            if state.node.cordoned == cordoned {
                return Ok(state.node.clone());
            }
            let mut node = state.node.clone();
            let reason = if cordoned { "cordoned: no new requests" } else { "uncordoned: takes requests again" };
            let event = NodeEvent::new(id, now, Some(node.status), node.status.as_str(), reason).by(Some(by));
            node.cordoned = cordoned;
            (node, event)
        };
        self.store.record_transition(&updated, &event).await?;
        let mut state = slot.edit(&self.revisions);
        state.node.cordoned = cordoned;
        self.routing.update(&state.node);
        Ok(state.node.clone())
    }

    /// Changes a node's status through `decide`, under the node's transition lock, persisting before applying.
    /// `decide` sees the node's state as it is under the lock, so a heartbeat that arrived meanwhile counts.
    /// Returns the node's status after, or `None` when the node was deleted meanwhile.
    async fn transition(
        &self,
        slot: &Slot,
        decide: impl Fn(&SlotState) -> Option<(NodeStatus, String)>,
    ) -> Result<Option<NodeStatus>, StoreError> {
        self.transition_with(slot, None, decide).await
    }

    /// [`Registry::transition`], which also sets the node's GPU conditions (when given) with the new status.
    async fn transition_with(
        &self,
        slot: &Slot,
        conditions: Option<Conditions>,
        decide: impl Fn(&SlotState) -> Option<(NodeStatus, String)>,
    ) -> Result<Option<NodeStatus>, StoreError> {
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, event) = {
            let state = slot.lock();
            if state.deleted {
                return Ok(None);
            }
            let Some((to, reason)) = decide(&state) else {
                return Ok(Some(state.node.status));
            };
            let mut node = state.node.clone();
            let event = NodeEvent::new(node.id, now, Some(node.status), to.as_str(), reason);
            node.status = to;
            if let Some(conditions) = conditions {
                node.conditions = conditions;
            }
            (node, event)
        };
        self.store.record_transition(&updated, &event).await?;
        self.metrics.transition(updated.status);
        let mut state = slot.edit(&self.revisions);
        state.node.status = updated.status;
        state.node.conditions = updated.conditions;
        self.routing.update(&state.node);
        drop(state);
        Ok(Some(updated.status))
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
        let _sweeping = self.sweeping.lock().await;
        let now = self.clock.now_ms();
        self.revisions.align(now);
        if self.grace_after_stall(now) || !self.lead().await {
            return Ok(0);
        }
        self.settle_silence().await?;
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
                let status = self
                    .transition(&slot, |state| {
                        let silent = self.clock.now_ms() - state.alive_since;
                        state::goes_offline(state.node.status, silent, limit)
                            .then(|| (NodeStatus::Offline, reason.clone()))
                    })
                    .await;
                (slot, status)
            })
            .buffer_unordered(SWEEP_CONCURRENCY);
        let mut failed = None;
        while let Some((slot, status)) = changes.next().await {
            match status {
                // `None`: deleted meanwhile.
                Ok(Some(NodeStatus::Offline)) => offline.push(slot.lock().node.id),
                Ok(_) => {}
                Err(err) => failed = Some(err),
            }
        }
        drop(changes);
        if let Some(err) = failed {
            // Those marked are reported with the error: the next sweep retries the others.
            self.report_silence(now, &offline, live - offline.len()).await?;
            return Err(err.into());
        }
        let changed = offline.len();
        self.report_silence(now, &offline, live - changed).await?;
        Ok(changed)
    }

    /// Updates the fields an administrator owns. Returns the node after the edit.
    pub async fn update(&self, id: Uuid, edit: AdminEdit) -> RegistryResult<Node> {
        let AdminEdit { display_name, notes, tags, max_concurrency } = edit;
        let slot = self.slot(id)?;
        let _writing = slot.transition.lock().await;
        let updated = {
            let state = slot.lock();
            if state.deleted {
                return Err(RegistryError::NotFound(id));
            }
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
            node
        };
        self.store.update_admin_fields(&updated).await?;
        let mut state = slot.edit(&self.revisions);
        state.node.display_name = updated.display_name;
        state.node.notes = updated.notes;
        state.node.tags = updated.tags;
        state.searchable();
        state.node.max_concurrency = updated.max_concurrency;
        self.routing.update(&state.node);
        Ok(state.node.clone())
    }

    /// Deletes a node by `by`; its token stops working as soon as this returns.
    pub async fn delete(&self, id: Uuid, by: &str) -> RegistryResult<()> {
        let slot = self.slot(id)?;
        let removed = self
            .remove(id, &slot, |state, now| {
                Some(
                    NodeEvent::new(id, now, Some(state.node.status), "deleted", "deleted by an administrator")
                        .by(Some(by)),
                )
            })
            .await?;
        if !removed {
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
            let gone = self
                .remove(id, &slot, |state, now| {
                    expired(state, now).then(|| NodeEvent::new(id, now, Some(NodeStatus::Pending), "deleted", &*reason))
                })
                .await?;
            if gone {
                removed += 1;
                Metrics::inc(&self.metrics.pending_expired);
            }
        }
        Ok(removed)
    }

    /// Removes a node when `decide`, seeing its state under the node's lock, gives the event to record. Returns
    /// whether it was removed (false: already deleted, or `decide` said no).
    async fn remove(
        &self,
        id: Uuid,
        slot: &Slot,
        decide: impl Fn(&SlotState, Millis) -> Option<NodeEvent>,
    ) -> Result<bool, StoreError> {
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (key, token, event) = {
            let state = slot.lock();
            if state.deleted {
                return Ok(false);
            }
            let Some(event) = decide(&state, now) else {
                return Ok(false);
            };
            ((state.node.machine_name.clone(), state.node.runtime_port), state.token, event)
        };
        self.store.delete_node(id, &event).await?;
        {
            let mut state = slot.bookkeeping();
            if !state.deleted {
                state.deleted = true;
                self.count_pending(state.node.status, NodeStatus::Offline);
                self.note_deletion(id);
            }
        }
        let mut index = self.write();
        index.nodes.remove(&id);
        self.routing.remove(id);
        if index.by_key.get(&key) == Some(&id) {
            index.by_key.remove(&key);
        }
        if let Some(token) = token {
            index.by_token.remove(&token);
        }
        Ok(true)
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
