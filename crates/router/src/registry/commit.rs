//! The one path by which a decision about a stored node is made, persisted and applied: under the node's
//! transition lock, a decision sees the node as it is and says what it becomes; that is committed to the store, and
//! only then to memory, where the fields decisions own are copied back and everything that follows from them is kept
//! in step (the pending count, the status metrics, the search keys, the routing index, the node's revision). Approval,
//! cordon, status transitions, an administrator's edit and deletion all go through [`Registry::commit`].

use llm_router_protocol::NodeStatus;

use super::index::{Slot, SlotState};
use super::{Registry, RegistryResult};
use crate::clock::Millis;
use crate::model::node::{Node, NodeEvent};

/// What a decision, seeing the node under its lock, asks for.
pub(super) enum Decision {
    /// Nothing changes.
    Keep,
    /// The node becomes this (its status, approval, cordon or conditions), recorded with this event.
    Record(Node, NodeEvent),
    /// The fields an administrator owns become these.
    Edit(Node),
    /// The node goes, with the event of its deletion.
    Remove(NodeEvent),
}

/// What became of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
    /// The node was deleted before the decision could be made.
    Gone,
    /// The decision changed nothing.
    Kept,
    Changed,
    Removed,
}

impl Registry {
    /// Decides about the node of `slot` with `decide` (which sees its state and the time of the decision, and may
    /// refuse), persists the decision, then applies it to memory. Concurrent decisions about one node are
    /// serialised; a heartbeat that arrived meanwhile is seen by the decision.
    pub(super) async fn commit(
        &self,
        slot: &Slot,
        decide: impl FnOnce(&SlotState, Millis) -> RegistryResult<Decision>,
    ) -> RegistryResult<Committed> {
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (id, from, decision) = {
            let state = slot.lock();
            if state.deleted {
                return Ok(Committed::Gone);
            }
            (state.node.id, state.node.status, decide(&state, now)?)
        };
        match decision {
            Decision::Keep => return Ok(Committed::Kept),
            Decision::Record(node, event) => {
                self.store.record_transition(&node, &event).await?;
                self.apply(slot, from, node, now);
            }
            Decision::Edit(node) => {
                self.store.update_admin_fields(&node).await?;
                self.apply(slot, from, node, now);
            }
            Decision::Remove(event) => {
                self.store.delete_node(id, &event).await?;
                self.drop_node(slot);
                return Ok(Committed::Removed);
            }
        }
        Ok(Committed::Changed)
    }

    /// Copies the fields decisions own from `decided` into memory, stamped with a new revision. A node that leaves
    /// `pending` (its approval) starts its first silence `now`. The status change is counted as this router's
    /// decision, from the status it was decided on (`from`): on a shared database, the follower may have applied
    /// the row this router just wrote before this does.
    fn apply(&self, slot: &Slot, from: NodeStatus, decided: Node, now: Millis) {
        let mut state = slot.edit(&self.revisions);
        let before = state.node.status;
        if decided.status != from {
            self.metrics.transition(decided.status);
        }
        if decided.status != before {
            self.pending.moved(before, decided.status);
            if before == NodeStatus::Pending {
                state.alive_since = now;
            }
        }
        let renamed = state.node.display_name != decided.display_name || state.node.tags != decided.tags;
        let node = &mut state.node;
        node.status = decided.status;
        node.conditions = decided.conditions;
        node.approved_at = decided.approved_at;
        node.approved_by = decided.approved_by;
        node.cordoned = decided.cordoned;
        node.display_name = decided.display_name;
        node.notes = decided.notes;
        node.tags = decided.tags;
        node.max_concurrency = decided.max_concurrency;
        if renamed {
            state.searchable();
        }
        self.routing.update(&state.node);
    }

    /// Takes a node out of memory, deleted here or by another router: its token stops working, its name and port
    /// are free, the change log notes it.
    pub(super) fn drop_node(&self, slot: &Slot) {
        let (id, key, token) = {
            let mut state = slot.bookkeeping();
            if state.deleted {
                return;
            }
            state.deleted = true;
            self.pending.moved(state.node.status, NodeStatus::Offline);
            self.changes.deleted(state.node.id);
            (state.node.id, (state.node.machine_name.clone(), state.node.runtime_port), state.token)
        };
        let mut index = self.write();
        if index.nodes.get(&id).is_some_and(|held| std::ptr::eq(&**held, slot)) {
            index.nodes.remove(&id);
        }
        self.routing.remove(id);
        if index.by_key.get(&key) == Some(&id) {
            index.by_key.remove(&key);
        }
        if let Some(token) = token
            && index.by_token.get(&token) == Some(&id)
        {
            index.by_token.remove(&token);
        }
    }
}
