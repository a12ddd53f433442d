//! The in-memory index of the fleet: nodes by id, by machine name and port, and by token hash; each node in its own
//! slot with its own locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::node::Node;

#[derive(Default)]
pub(super) struct Index {
    pub(super) nodes: HashMap<Uuid, Arc<Slot>>,
    pub(super) by_key: HashMap<(String, u16), Uuid>,
    pub(super) by_token: HashMap<TokenHash, Uuid>,
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
    pub(super) deleted: bool,
    /// The revision of the node's row this state was last read from, when the database is shared (SPEC §11): a
    /// row read back is applied only when newer. 0 for a node loaded at start-up or written by this router.
    pub(super) revision: i64,
}

impl Slot {
    /// A slot for a node loaded or just stored; its silence counts from `now` at the earliest.
    pub(super) fn new(node: Node, token: Option<TokenHash>, now: Millis) -> Arc<Slot> {
        let alive_since = node.last_seen_at.unwrap_or(now).max(now);
        Arc::new(Slot {
            state: Mutex::new(SlotState {
                node,
                token,
                alive_since,
                figures_dirty: false,
                models_dirty: false,
                deleted: false,
                revision: 0,
            }),
            transition: tokio::sync::Mutex::new(()),
        })
    }

    /// The node's state, under its lock; never held across an await.
    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A poisoned node lock means a panic mid-update of plain data; the data is still consistent enough to serve.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A node whose token a request presented: the proof, checked once, that the caller is that node's agent.
pub struct NodeHandle {
    pub(super) id: Uuid,
    pub(super) token: TokenHash,
    pub(super) slot: Arc<Slot>,
}
