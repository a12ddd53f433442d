//! The in-memory index of the fleet: nodes by id, by machine name and port, and by token hash; each node in its own
//! slot with its own locks.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use super::search::SearchKeys;
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::node::Node;
use crate::revision::Revisions;

#[derive(Default)]
pub(super) struct Index {
    pub(super) nodes: HashMap<Uuid, Arc<Slot>>,
    pub(super) by_key: HashMap<(String, u16), Uuid>,
    pub(super) by_token: HashMap<TokenHash, Uuid>,
}

impl Index {
    /// Adds a node's slot under its id, its machine name and port, and its token.
    pub(super) fn add(&mut self, slot: Arc<Slot>) {
        let (id, key, token) = {
            let state = slot.lock();
            (state.node.id, (state.node.machine_name.clone(), state.node.runtime_port), state.token)
        };
        self.by_key.insert(key, id);
        if let Some(token) = token {
            self.by_token.insert(token, id);
        }
        self.nodes.insert(id, slot);
    }
}

pub(super) struct Slot {
    state: Mutex<SlotState>,
    /// Held while one of this node's decisions is written to the database.
    pub(super) transition: tokio::sync::Mutex<()>,
}

pub(super) struct SlotState {
    pub(super) node: Node,
    pub(super) token: Option<TokenHash>,
    /// Start of the current silence: the later of the last heartbeat, the approval and the router's start.
    pub(super) alive_since: Millis,
    pub(super) figures_dirty: bool,
    pub(super) models_dirty: bool,
    /// Its runtime's queue (SPEC §13), as routing last heard it: routing is told at each heartbeat while it is not
    /// empty (a target made since starts at none) and once when it empties.
    pub(super) waiting: u32,
    pub(super) deleted: bool,
    /// The revision of the node's row this state was last read from, when the database is shared (SPEC §11): a
    /// row read back is applied only when newer. 0 for a node loaded at start-up or written by this router.
    pub(super) revision: i64,
    /// The fleet revision (SPEC §12) of the latest change of what the node's JSON shows: stamped by every
    /// [`Slot::edit`], so `changed_since` finds it.
    pub(super) changed: i64,
    /// The name lists sort it by and the text a search looks through, kept ready: made with the node and again by
    /// [`SlotState::searchable`] wherever a name, the address, tags or models may change.
    pub(super) search: SearchKeys,
}

impl SlotState {
    /// Makes the node's sort name and search text again, after a change of its names, tags or models.
    pub(super) fn searchable(&mut self) {
        self.search = SearchKeys::of(&self.node);
    }
}

impl Slot {
    /// A slot for a node loaded or just stored, changed at revision `changed`; its silence counts from `now` at the
    /// earliest.
    pub(super) fn new(node: Node, token: Option<TokenHash>, now: Millis, changed: i64) -> Arc<Slot> {
        let alive_since = node.last_seen_at.unwrap_or(now).max(now);
        let search = SearchKeys::of(&node);
        Arc::new(Slot {
            state: Mutex::new(SlotState {
                node,
                token,
                alive_since,
                figures_dirty: false,
                models_dirty: false,
                waiting: 0,
                deleted: false,
                revision: 0,
                changed,
                search,
            }),
            transition: tokio::sync::Mutex::new(()),
        })
    }

    /// The node's state, under its lock, to read; never held across an await.
    pub(super) fn lock(&self) -> SlotRead<'_> {
        SlotRead(self.guard())
    }

    /// The node's state, under its lock, to change what its JSON shows: the change is stamped with a new revision
    /// when the guard drops, before the lock is released.
    pub(super) fn edit<'a>(&'a self, revisions: &'a Revisions) -> SlotEdit<'a> {
        SlotEdit { state: self.guard(), revisions }
    }

    /// The node's state, under its lock, to change the registry's own bookkeeping of it (what is dirty, when its
    /// silence began, which row revision it was read from): nothing its JSON shows, so no new revision.
    pub(super) fn bookkeeping(&self) -> MutexGuard<'_, SlotState> {
        self.guard()
    }

    fn guard(&self) -> MutexGuard<'_, SlotState> {
        // A poisoned node lock means a panic mid-update of plain data; the data is still consistent enough to serve.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A node's state, locked to read.
pub(super) struct SlotRead<'a>(MutexGuard<'a, SlotState>);

impl Deref for SlotRead<'_> {
    type Target = SlotState;

    fn deref(&self) -> &SlotState {
        &self.0
    }
}

/// A node's state, locked to change; stamps the change's revision on drop.
pub(super) struct SlotEdit<'a> {
    state: MutexGuard<'a, SlotState>,
    revisions: &'a Revisions,
}

impl Deref for SlotEdit<'_> {
    type Target = SlotState;

    fn deref(&self) -> &SlotState {
        &self.state
    }
}

impl DerefMut for SlotEdit<'_> {
    fn deref_mut(&mut self) -> &mut SlotState {
        &mut self.state
    }
}

impl Drop for SlotEdit<'_> {
    fn drop(&mut self) {
        self.state.changed = self.revisions.next();
    }
}

/// A node whose token a request presented: the proof, checked once, that the caller is that node's agent.
pub struct NodeHandle {
    pub(super) id: Uuid,
    pub(super) token: TokenHash,
    pub(super) slot: Arc<Slot>,
}

impl NodeHandle {
    /// The node's id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}
