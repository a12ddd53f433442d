//! Registration (SPEC §2.1 step 3 onwards): a new node, a token rotation, or the takeover of an imported node; and
//! the pending cap's reservations.

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use super::index::Slot;
use super::{Registry, RegistryError, RegistryResult, state};
use crate::auth::token::{NewToken, TokenKind};
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::{JoinToken, JoinUse};
use crate::model::input::Registration;
use crate::model::node::{Node, NodeEvent};
use crate::store::StoreError;

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

impl Registry {
    /// Decides what a registration will do (SPEC §2.1 step 3), or answers 409.
    pub fn plan_registration(&self, reg: &Registration, presented: Option<&str>) -> RegistryResult<RegistrationPlan> {
        let index = self.read();
        let Some(&id) = index.by_key.get(&(reg.machine_name.clone(), reg.runtime_port)) else {
            return Ok(RegistrationPlan::Create);
        };
        let slot = index.nodes.get(&id).cloned();
        drop(index);
        let token = slot.map(|slot| slot.lock().token);
        match token {
            Some(None) => Ok(RegistrationPlan::TakeOver(id)),
            Some(Some(stored)) if presented.is_some_and(|p| TokenHash::of(p) == stored) => {
                Ok(RegistrationPlan::Rotate(id, stored))
            }
            _ => Err(node_exists(&reg.machine_name, reg.runtime_port, id)),
        }
    }

    /// Carries out a planned registration; `loaded_models` already holds what the probe found when needed.
    /// A usable `join` token (checked by the caller) adds its tags, records its name, approves the node when it
    /// auto-approves, and has its use counted with the node; a token rotation does not use it.
    pub async fn register(
        &self,
        reg: Registration,
        plan: RegistrationPlan,
        join: Option<&JoinToken>,
    ) -> RegistryResult<Registered> {
        match plan {
            RegistrationPlan::Create => self.create(reg, join).await,
            RegistrationPlan::Rotate(id, presented) => self.reregister(id, reg, Some(presented), None).await,
            RegistrationPlan::TakeOver(id) => self.reregister(id, reg, None, join).await,
        }
    }

    async fn create(&self, reg: Registration, join: Option<&JoinToken>) -> RegistryResult<Registered> {
        let now = self.clock.now_ms();
        let mut node = Node {
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
            figures: None,
            registered_at: now,
            approved_at: None,
            approved_by: None,
            join_token: None,
            cordoned: false,
            max_concurrency: None,
            conditions: Default::default(),
            last_seen_at: None,
        };
        let token = NewToken::generate(TokenKind::Node);
        let mut events = vec![NodeEvent::new(node.id, now, None, NodeStatus::Pending.as_str(), "registered")];
        events.extend(admit(&mut node, join, now));
        let join_use = join.map(|join| JoinUse { token_id: join.id, name: join.name.clone(), at: now });
        match self.store.insert_node(node.clone(), token.hash(), events, join_use).await {
            Ok(()) => {}
            Err(StoreError::Duplicate) => {
                // Another registration of the same machine and port won the race, perhaps through another router
                // sharing the database: read its changes now, to name the node that is there.
                if self.store.shared().is_some()
                    && let Err(err) = self.follow_nodes().await
                {
                    tracing::warn!(error = %format!("{err:#}"), "reading other routers' node changes failed");
                }
                let id = self.read().by_key.get(&(node.machine_name.clone(), node.runtime_port)).copied();
                return Err(node_exists(&node.machine_name, node.runtime_port, id.unwrap_or(node.id)));
            }
            Err(StoreError::JoinToken(why)) => return Err(RegistryError::JoinTokenInvalid(why)),
            Err(err) => return Err(RegistryError::Store(err)),
        }
        self.metrics.transition(NodeStatus::Pending);
        if node.status != NodeStatus::Pending {
            self.metrics.transition(node.status);
        }
        let (id, status) = (node.id, node.status);
        let mut index = self.write();
        // With a shared database, the follower of other routers' changes may have read this node back and added it
        // already (and counted it as pending): it is replaced by the same node, and counted once.
        if !index.nodes.contains_key(&id) {
            self.pending.added(status);
        }
        index.by_key.insert((node.machine_name.clone(), node.runtime_port), id);
        index.by_token.insert(token.hash(), id);
        self.routing.update(&node);
        index.nodes.insert(id, Slot::new(node, Some(token.hash()), now, self.revisions.next()));
        drop(index);
        Ok(Registered { node_id: id, token, status, created: true })
    }

    /// Token rotation (`presented` is the hash of the node's token the caller showed) or takeover of an imported
    /// node that has no token (`presented == None`).
    async fn reregister(
        &self,
        id: Uuid,
        reg: Registration,
        presented: Option<TokenHash>,
        join: Option<&JoinToken>,
    ) -> RegistryResult<Registered> {
        let takeover = presented.is_none();
        let slot = self.slot(id)?;
        let _writing = slot.transition.lock().await;
        let now = self.clock.now_ms();
        let (updated, old_token, events) = {
            let state = slot.lock();
            if state.deleted {
                return Err(RegistryError::DeletedMeanwhile(id));
            }
            // The plan was made without the lock: check it still holds. Of concurrent rotations with the same token,
            // the first to get here replaces it; the others present a token that is no longer the node's.
            if state.token != presented {
                return Err(node_exists(&reg.machine_name, reg.runtime_port, id));
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
            let mut events = Vec::new();
            if takeover {
                events.push(NodeEvent::new(
                    id,
                    now,
                    Some(node.status),
                    NodeStatus::Pending.as_str(),
                    "imported node taken over by a new registration; approval needed",
                ));
                node.status = NodeStatus::Pending;
                node.approved_at = None;
                node.approved_by = None;
                events.extend(admit(&mut node, join, now));
            }
            (node, state.token, events)
        };
        let token = NewToken::generate(TokenKind::Node);
        let join_use = join.map(|join| JoinUse { token_id: join.id, name: join.name.clone(), at: now });
        match self.store.reregister_node(&updated, token.hash(), now, &events, join_use.as_ref()).await {
            Ok(()) => {}
            Err(StoreError::JoinToken(why)) => return Err(RegistryError::JoinTokenInvalid(why)),
            Err(StoreError::Duplicate) => return Err(node_exists(&updated.machine_name, updated.runtime_port, id)),
            Err(err) => return Err(RegistryError::Store(err)),
        }
        for event in events.iter().filter_map(|event| event.to.parse::<NodeStatus>().ok()) {
            self.metrics.transition(event);
        }
        let status = updated.status;
        {
            let mut state = slot.edit(&self.revisions);
            self.routing.update(&updated);
            self.pending.moved(state.node.status, updated.status);
            state.node = updated;
            state.searchable();
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
}

/// Applies a join token to a node being registered `pending`: its tags are added, its name recorded, and when it
/// auto-approves the node is approved by that rule. Returns the approval's event, if any.
fn admit(node: &mut Node, join: Option<&JoinToken>, now: Millis) -> Option<NodeEvent> {
    let join = join?;
    for tag in &join.tags {
        if !node.tags.contains(tag) {
            node.tags.push(tag.clone());
        }
    }
    node.join_token = Some(join.name.clone());
    if !join.auto_approve {
        return None;
    }
    let to = state::after_approval(node.status, &node.ready_models, node.conditions)?;
    let actor = join.actor();
    let reason = format!("approved by join token `{}`", join.name);
    let event = NodeEvent::new(node.id, now, Some(node.status), to.as_str(), reason).by(Some(&actor));
    node.status = to;
    node.approved_at = Some(now);
    node.approved_by = Some(actor);
    Some(event)
}

fn node_exists(machine_name: &str, port: u16, id: Uuid) -> RegistryError {
    RegistryError::NodeExists { machine_name: machine_name.to_owned(), port, id }
}
