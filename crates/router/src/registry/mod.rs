//! The in-memory view of the fleet and every change of a node's state.
//!
//! The registry is loaded from the database at start-up and kept in step with it: every decision (registration,
//! approval, status change, deletion) is committed to the database *before* memory changes and before the API
//! answers. Heartbeat figures are the exception: they update memory at once and are written behind in batches by
//! [`Registry::flush`], so a crash loses at most the last batch of figures, never a node, a token or a status.
//!
//! Locking: a short-lived map lock finds a node; each node has its own state mutex (never held across an await)
//! and its own async `transition` lock, which serialises the writes of *that* node. No lock shared by all nodes is
//! ever held across a database write.

pub mod node;
pub mod state;
pub mod validate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use crate::auth::token::{NewToken, TokenHash, TokenKind};
use crate::clock::{Clock, Millis};
use crate::db::Store;
use crate::db::nodes::{Figures, InsertError, NodeLists};
use crate::error::{ApiError, ApiResult, not_found};
use crate::metrics::Metrics;
use node::{Node, NodeEvent, NodeView};
use validate::{Heartbeat, Registration};

/// The fleet, in memory, backed by the store.
pub struct Registry {
    store: Store,
    clock: Arc<dyn Clock>,
    offline_after_ms: i64,
    index: RwLock<Index>,
    /// Nodes whose figures changed since the last flush, and when the oldest of those figures arrived.
    dirty: Mutex<(Vec<Uuid>, Option<Millis>)>,
    metrics: Arc<Metrics>,
    /// Pending nodes, kept in step with every change to or from `pending`, so the pending cap costs no scan.
    pending: AtomicUsize,
    /// Registrations admitted under the pending cap and not yet settled.
    reserved: AtomicUsize,
}

#[derive(Default)]
struct Index {
    nodes: HashMap<Uuid, Arc<Slot>>,
    by_key: HashMap<(String, u16), Uuid>,
    by_token: HashMap<TokenHash, Uuid>,
}

struct Slot {
    state: Mutex<SlotState>,
    /// Held while one of this node's decisions is written to the database.
    transition: tokio::sync::Mutex<()>,
}

struct SlotState {
    node: Node,
    token: Option<TokenHash>,
    /// Start of the current silence: the later of the last heartbeat, the approval and the router's start.
    alive_since: Millis,
    figures_dirty: bool,
    models_dirty: bool,
    deleted: bool,
}

/// How a registration was settled.
#[derive(Debug)]
pub struct Registered {
    pub node_id: Uuid,
    pub token: NewToken,
    pub status: NodeStatus,
    /// True for a new node or a takeover (201); false for a token rotation (200).
    pub created: bool,
}

/// What a registration must do, decided before the reachability probe.
pub enum RegistrationPlan {
    /// No node with this name and port: create one.
    Create,
    /// The caller presented this node's own token (its hash here): rotate it, keep id and status.
    Rotate(Uuid, TokenHash),
    /// The node was imported and has never had a token: take it over as pending.
    TakeOver(Uuid),
}

fn lock(slot: &Slot) -> MutexGuard<'_, SlotState> {
    // A poisoned node lock means a panic mid-update of plain data; the data is still consistent enough to serve.
    slot.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Registry {
    /// Loads every node from the store. Each approved node gets a full `offline_after` grace period from now.
    pub async fn load(
        store: Store,
        clock: Arc<dyn Clock>,
        offline_after_ms: i64,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Registry> {
        let now = clock.now_ms();
        let mut index = Index::default();
        let mut pending = 0;
        for (node, token) in store.load_nodes().await? {
            let id = node.id;
            pending += usize::from(node.status == NodeStatus::Pending);
            index.by_key.insert((node.machine_name.clone(), node.runtime_port), id);
            if let Some(token) = token {
                index.by_token.insert(token, id);
            }
            index.nodes.insert(id, new_slot(node, token, now));
        }
        Ok(Registry {
            store,
            clock,
            offline_after_ms,
            index: RwLock::new(index),
            dirty: Mutex::new((Vec::new(), None)),
            metrics,
            pending: AtomicUsize::new(pending),
            reserved: AtomicUsize::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot(&self, id: Uuid) -> Option<Arc<Slot>> {
        self.read().nodes.get(&id).cloned()
    }

    fn slot_or_404(&self, id: Uuid) -> ApiResult<Arc<Slot>> {
        self.slot(id).ok_or_else(|| not_found(format!("No node with id {id}.")))
    }

    /// Number of nodes known.
    pub fn len(&self) -> usize {
        self.read().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides what a registration will do (SPEC §2.1 step 3), or answers 409.
    pub fn plan_registration(&self, reg: &Registration, presented: Option<&str>) -> ApiResult<RegistrationPlan> {
        let index = self.read();
        let Some(&id) = index.by_key.get(&(reg.machine_name.clone(), reg.runtime_port)) else {
            return Ok(RegistrationPlan::Create);
        };
        let slot = index.nodes.get(&id).cloned();
        drop(index);
        let token = slot.map(|slot| lock(&slot).token);
        match token {
            Some(None) => Ok(RegistrationPlan::TakeOver(id)),
            Some(Some(stored)) if presented.is_some_and(|p| TokenHash::of(p) == stored) => {
                Ok(RegistrationPlan::Rotate(id, stored))
            }
            _ => Err(node_exists(reg, id)),
        }
    }

    /// Carries out a planned registration; `loaded_models` already holds what the probe found when needed.
    pub async fn register(&self, reg: Registration, plan: RegistrationPlan) -> ApiResult<Registered> {
        match plan {
            RegistrationPlan::Create => self.create(reg).await,
            RegistrationPlan::Rotate(id, presented) => self.reregister(id, reg, Some(presented)).await,
            RegistrationPlan::TakeOver(id) => self.reregister(id, reg, None).await,
        }
    }

    async fn create(&self, reg: Registration) -> ApiResult<Registered> {
        let now = self.clock.now_ms();
        let node = Node {
            id: Uuid::new_v4(),
            machine_name: reg.machine_name,
            ip_address: reg.ip_address,
            runtime_port: reg.runtime_port,
            runtime_version: reg.runtime_version,
            status: NodeStatus::Pending,
            display_name: None,
            notes: None,
            gpu_devices: reg.gpu_devices,
            supported_runtimes: reg.supported_runtimes,
            loaded_models: reg.loaded_models,
            ready_models: reg.ready_models,
            tags: reg.tags.unwrap_or_default(),
            metrics: None,
            registered_at: now,
            approved_at: None,
            approved_by: None,
            last_seen_at: None,
        };
        let token = NewToken::generate(TokenKind::Node);
        let event = NodeEvent::new(node.id, now, None, NodeStatus::Pending.as_str(), "registered");
        match self.store.insert_node(node.clone(), token.hash(), event).await {
            Ok(()) => {}
            Err(InsertError::Duplicate) => {
                // Another registration of the same machine and port won the race.
                let id = self.read().by_key.get(&(node.machine_name.clone(), node.runtime_port)).copied();
                return Err(ApiError::NodeExists(node_exists_message(
                    &node.machine_name,
                    node.runtime_port,
                    id.unwrap_or(node.id),
                )));
            }
            Err(InsertError::Other(err)) => return Err(err.into()),
        }
        self.metrics.transition(NodeStatus::Pending);
        self.pending.fetch_add(1, Ordering::Relaxed);
        let id = node.id;
        let mut index = self.write();
        index.by_key.insert((node.machine_name.clone(), node.runtime_port), id);
        index.by_token.insert(token.hash(), id);
        index.nodes.insert(id, new_slot(node, Some(token.hash()), now));
        drop(index);
        Ok(Registered { node_id: id, token, status: NodeStatus::Pending, created: true })
    }

    /// Token rotation (`presented` is the hash of the node's token the caller showed) or takeover of an imported
    /// node that has no token (`presented == None`).
    async fn reregister(&self, id: Uuid, reg: Registration, presented: Option<TokenHash>) -> ApiResult<Registered> {
        let takeover = presented.is_none();
        let slot = self.slot_or_404(id)?;
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, old_token, event) = {
            let state = lock(&slot);
            if state.deleted {
                return Err(not_found(format!("Node {id} was deleted meanwhile; register again.")));
            }
            // The plan was made without the lock: check it still holds. Of concurrent rotations with the same token,
            // the first to get here replaces it; the others present a token that is no longer the node's.
            if state.token != presented {
                return Err(node_exists(&reg, id));
            }
            let mut node = state.node.clone();
            node.ip_address = reg.ip_address;
            node.runtime_version = reg.runtime_version;
            node.gpu_devices = reg.gpu_devices;
            node.supported_runtimes = reg.supported_runtimes;
            node.loaded_models = reg.loaded_models;
            node.ready_models = reg.ready_models;
            if let Some(tags) = reg.tags {
                node.tags = tags;
            }
            let event = if takeover {
                let event = NodeEvent::new(
                    id,
                    now,
                    Some(node.status),
                    NodeStatus::Pending.as_str(),
                    "imported node taken over by a new registration; approval needed",
                );
                node.status = NodeStatus::Pending;
                node.approved_at = None;
                node.approved_by = None;
                Some(event)
            } else {
                None
            };
            (node, state.token, event)
        };
        let token = NewToken::generate(TokenKind::Node);
        self.store.reregister_node(&updated, token.hash(), now, event.as_ref()).await?;
        if let Some(event) = &event {
            self.metrics.transition(NodeStatus::Pending);
            if event.from != Some(NodeStatus::Pending) {
                self.pending.fetch_add(1, Ordering::Relaxed);
            }
        }
        let status = updated.status;
        {
            let mut state = lock(&slot);
            state.node = updated;
            state.token = Some(token.hash());
            state.models_dirty = false;
        }
        let mut index = self.write();
        if let Some(old) = old_token {
            index.by_token.remove(&old);
        }
        index.by_token.insert(token.hash(), id);
        drop(index);
        Ok(Registered { node_id: id, token, status, created: takeover })
    }

    /// Applies a heartbeat (SPEC §2.2): 401 for an unknown token, 403 for another node's token.
    pub async fn heartbeat(&self, token: &str, hb: Heartbeat) -> ApiResult<NodeStatus> {
        let hash = TokenHash::of(token);
        let (owner, slot) = {
            let index = self.read();
            let owner = *index.by_token.get(&hash).ok_or_else(unknown_token)?;
            (owner, index.nodes.get(&owner).cloned())
        };
        if owner != hb.node_id {
            return Err(ApiError::Forbidden(format!(
                "This token belongs to another node, not to {}; use the token issued to this node.",
                hb.node_id
            )));
        }
        let slot = slot.ok_or_else(unknown_token)?;
        let now = self.clock.now_ms();
        {
            let mut state = lock(&slot);
            if state.deleted || state.token != Some(hash) {
                return Err(unknown_token());
            }
            let models_changed =
                state.node.loaded_models != hb.loaded_models || state.node.ready_models != hb.ready_models;
            state.node.metrics = Some(hb.metrics);
            state.node.last_seen_at = Some(now);
            state.alive_since = now;
            if models_changed {
                state.node.loaded_models = hb.loaded_models;
                state.node.ready_models = hb.ready_models;
                state.models_dirty = true;
            }
            if !state.figures_dirty {
                state.figures_dirty = true;
                let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                dirty.0.push(owner);
                dirty.1.get_or_insert(now);
            }
            let next = state::after_heartbeat(state.node.status, &state.node.ready_models);
            if next == state.node.status {
                return Ok(next);
            }
        };
        self.transition(&slot, |state| {
            let node = &state.node;
            let to = state::after_heartbeat(node.status, &node.ready_models);
            let reason = match to {
                NodeStatus::Online => "heartbeat reports ready models",
                _ => "heartbeat reports no ready model",
            };
            (to != node.status).then(|| (to, reason.to_owned()))
        })
        .await
    }

    /// Approves a pending node (SPEC §2.3); 409 `not_pending` otherwise.
    pub async fn approve(&self, id: Uuid, by: &str) -> ApiResult<NodeView> {
        let slot = self.slot_or_404(id)?;
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, event) = {
            let state = lock(&slot);
            if state.deleted {
                return Err(not_found(format!("No node with id {id}.")));
            }
            let Some(to) = state::after_approval(state.node.status, &state.node.ready_models) else {
                return Err(ApiError::NotPending(format!(
                    "Node {id} is {}, not pending; only pending nodes can be approved.",
                    state.node.status
                )));
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
        self.pending.fetch_sub(1, Ordering::Relaxed);
        let mut state = lock(&slot);
        state.node.status = updated.status;
        state.node.approved_at = updated.approved_at;
        state.node.approved_by = updated.approved_by;
        state.alive_since = now;
        Ok(NodeView::from(&state.node))
    }

    /// Changes a node's status through `decide`, under the node's transition lock, persisting before applying.
    /// `decide` sees the node's state as it is under the lock, so a heartbeat that arrived meanwhile counts.
    async fn transition(
        &self,
        slot: &Slot,
        decide: impl Fn(&SlotState) -> Option<(NodeStatus, String)>,
    ) -> ApiResult<NodeStatus> {
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, event) = {
            let state = lock(slot);
            if state.deleted {
                return Err(unknown_token());
            }
            let Some((to, reason)) = decide(&state) else {
                return Ok(state.node.status);
            };
            let mut node = state.node.clone();
            let event = NodeEvent::new(node.id, now, Some(node.status), to.as_str(), reason);
            node.status = to;
            (node, event)
        };
        self.store.record_transition(&updated, &event).await?;
        self.metrics.transition(updated.status);
        lock(slot).node.status = updated.status;
        Ok(updated.status)
    }

    /// Marks offline every approved node silent for `offline_after` (SPEC §2.3). Returns how many went offline.
    ///
    /// Cost: one pass over the in-memory map with a short per-node lock, no database read; only nodes that change
    /// are written.
    pub async fn sweep(&self) -> ApiResult<usize> {
        let now = self.clock.now_ms();
        let limit = self.offline_after_ms;
        let candidates: Vec<Arc<Slot>> = self
            .read()
            .nodes
            .values()
            .filter(|slot| {
                let state = lock(slot);
                state::goes_offline(state.node.status, now - state.alive_since, limit)
            })
            .cloned()
            .collect();
        let mut changed = 0;
        let reason = format!("no heartbeat for {} s", limit / 1000);
        for slot in candidates {
            let status = self
                .transition(&slot, |state| {
                    let silent = self.clock.now_ms() - state.alive_since;
                    state::goes_offline(state.node.status, silent, limit).then(|| (NodeStatus::Offline, reason.clone()))
                })
                .await;
            match status {
                Ok(NodeStatus::Offline) => changed += 1,
                Ok(_) => {}
                Err(ApiError::Unauthorized(_)) => {} // deleted meanwhile
                Err(err) => return Err(err),
            }
        }
        Ok(changed)
    }

    /// Writes the figures of every heartbeat since the last flush, in one transaction. Returns the batch size.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let (ids, oldest) = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        if ids.is_empty() {
            return Ok(0);
        }
        let slots: Vec<(Uuid, Arc<Slot>)> = {
            let index = self.read();
            ids.iter().filter_map(|id| index.nodes.get(id).map(|slot| (*id, slot.clone()))).collect()
        };
        let mut batch = Vec::with_capacity(slots.len());
        for (id, slot) in &slots {
            let mut state = lock(slot);
            state.figures_dirty = false;
            if state.deleted {
                continue;
            }
            let lists = std::mem::take(&mut state.models_dirty).then(|| NodeLists::of(&state.node));
            batch.push(Figures {
                node_id: *id,
                last_seen_at: state.node.last_seen_at.unwrap_or(state.alive_since),
                metrics: state.node.metrics.clone(),
                lists,
            });
        }
        if let Err(err) = self.store.flush_figures(&batch).await {
            // Keep the figures for the next flush rather than lose them.
            for (id, slot) in &slots {
                let mut state = lock(slot);
                if batch.iter().any(|f| f.node_id == *id && f.lists.is_some()) {
                    state.models_dirty = true;
                }
                if !state.figures_dirty {
                    state.figures_dirty = true;
                    let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                    dirty.0.push(*id);
                    dirty.1 = match (dirty.1, oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            Metrics::inc(&self.metrics.flush_errors);
            return Err(err);
        }
        self.metrics.flush_batch_size.observe(batch.len() as f64);
        if let Some(oldest) = oldest {
            self.metrics.flush_lag_seconds.observe((self.clock.now_ms() - oldest).max(0) as f64 / 1000.0);
        }
        Ok(batch.len())
    }

    /// Updates the fields an administrator owns.
    pub async fn update(
        &self,
        id: Uuid,
        display_name: Option<Option<String>>,
        notes: Option<Option<String>>,
        tags: Option<Vec<String>>,
    ) -> ApiResult<NodeView> {
        let slot = self.slot_or_404(id)?;
        let _writing = slot.transition.lock().await;
        let updated = {
            let state = lock(&slot);
            if state.deleted {
                return Err(not_found(format!("No node with id {id}.")));
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
            node
        };
        self.store.update_admin_fields(&updated).await?;
        let mut state = lock(&slot);
        state.node.display_name = updated.display_name;
        state.node.notes = updated.notes;
        state.node.tags = updated.tags;
        Ok(NodeView::from(&state.node))
    }

    /// Deletes a node; its token stops working as soon as this returns.
    pub async fn delete(&self, id: Uuid, by: &str) -> ApiResult<()> {
        let slot = self.slot_or_404(id)?;
        let removed = self
            .remove(id, &slot, |state, now| {
                Some(
                    NodeEvent::new(id, now, Some(state.node.status), "deleted", "deleted by an administrator")
                        .by(Some(by)),
                )
            })
            .await?;
        if !removed {
            return Err(not_found(format!("No node with id {id}.")));
        }
        Ok(())
    }

    /// Removes every pending node silent for `ttl_ms` (SPEC §9), each with an event and like a deletion: its
    /// token stops working and its name and port are free again. Silence counts from the latest of its last
    /// heartbeat, its registration and the router's start, as offline detection does. Returns how many went.
    ///
    /// Cost: one pass over the in-memory map with a short per-node lock; only expired nodes are written.
    pub async fn expire_pending(&self, ttl_ms: i64) -> ApiResult<usize> {
        let now = self.clock.now_ms();
        let expired = |state: &SlotState, now: Millis| {
            state.node.status == NodeStatus::Pending && now - state.alive_since >= ttl_ms
        };
        let candidates: Vec<(Uuid, Arc<Slot>)> = self
            .read()
            .nodes
            .iter()
            .filter(|(_, slot)| expired(&lock(slot), now))
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
    ) -> ApiResult<bool> {
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (key, token, from, event) = {
            let state = lock(slot);
            if state.deleted {
                return Ok(false);
            }
            let Some(event) = decide(&state, now) else {
                return Ok(false);
            };
            ((state.node.machine_name.clone(), state.node.runtime_port), state.token, state.node.status, event)
        };
        self.store.delete_node(id, &event).await?;
        if from == NodeStatus::Pending {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        lock(slot).deleted = true;
        let mut index = self.write();
        index.nodes.remove(&id);
        if index.by_key.get(&key) == Some(&id) {
            index.by_key.remove(&key);
        }
        if let Some(token) = token {
            index.by_token.remove(&token);
        }
        Ok(true)
    }

    /// Pending nodes now.
    pub fn pending_count(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Admits one registration that may add a pending node while fewer than `cap` are pending or admitted
    /// (`cap` 0: no cap); `None` when the cap is reached. Hold the reservation until the registration is settled.
    pub fn reserve_pending(&self, cap: u64) -> Option<PendingReservation<'_>> {
        let reservation = PendingReservation(&self.reserved);
        let reserved = self.reserved.fetch_add(1, Ordering::AcqRel) + 1;
        // A registration that committed and still holds its reservation counts twice for a moment: the cap may
        // refuse one too many at its edge, never admit one too many.
        let taken = self.pending.load(Ordering::Acquire) + reserved;
        (cap == 0 || u64::try_from(taken).unwrap_or(u64::MAX) <= cap).then_some(reservation)
    }

    /// One node as the admin API shows it.
    pub fn get(&self, id: Uuid) -> ApiResult<NodeView> {
        let slot = self.slot_or_404(id)?;
        let state = lock(&slot);
        Ok(NodeView::from(&state.node))
    }

    /// All nodes, optionally of one status, oldest registration first.
    pub fn list(&self, status: Option<NodeStatus>) -> Vec<NodeView> {
        let slots: Vec<Arc<Slot>> = self.read().nodes.values().cloned().collect();
        let mut views: Vec<(i64, NodeView)> = slots
            .iter()
            .filter_map(|slot| {
                let state = lock(slot);
                let wanted = status.is_none_or(|s| s == state.node.status);
                wanted.then(|| (state.node.registered_at, NodeView::from(&state.node)))
            })
            .collect();
        views.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        views.into_iter().map(|(_, view)| view).collect()
    }

    /// Counts of nodes by status.
    pub fn counts(&self) -> HashMap<NodeStatus, usize> {
        let mut counts = HashMap::new();
        for slot in self.read().nodes.values() {
            *counts.entry(lock(slot).node.status).or_insert(0) += 1;
        }
        counts
    }
}

/// A place under the pending cap, held by a registration in progress; given back when dropped.
pub struct PendingReservation<'a>(&'a AtomicUsize);

impl Drop for PendingReservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn new_slot(node: Node, token: Option<TokenHash>, now: Millis) -> Arc<Slot> {
    let alive_since = node.last_seen_at.unwrap_or(now).max(now);
    Arc::new(Slot {
        state: Mutex::new(SlotState {
            node,
            token,
            alive_since,
            figures_dirty: false,
            models_dirty: false,
            deleted: false,
        }),
        transition: tokio::sync::Mutex::new(()),
    })
}

fn unknown_token() -> ApiError {
    ApiError::Unauthorized(
        "Unknown node token: the node may have been deleted. Register again to get a new token.".to_owned(),
    )
}

fn node_exists(reg: &Registration, id: Uuid) -> ApiError {
    ApiError::NodeExists(node_exists_message(&reg.machine_name, reg.runtime_port, id))
}

fn node_exists_message(machine_name: &str, port: u16, id: Uuid) -> String {
    format!(
        "A node named `{machine_name}` with runtime port {port} is already registered (id {id}). If this machine \
         lost its token, an administrator deletes the old node (DELETE /v0/nodes/{id}) and the agent registers anew."
    )
}
