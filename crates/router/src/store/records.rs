//! The records the store takes and gives back, beside the domain types of `model/`: what a stored node carries (its
//! token), what a batch of figures holds, users and keys as stored, pages, and what other routers changed.

use uuid::Uuid;

use super::StoreError;
use crate::clock::Millis;
use crate::model::auth::{Revoked, Role, Scope, TokenHash};
use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent, NodeLists};

/// A node as stored, with the hash of its token (imported nodes have none).
pub type StoredNode = (Node, Option<TokenHash>);

/// A node to add as it is, with its token (if any) and its history so far: an import, or a seeded fleet.
#[derive(Debug, Clone)]
pub struct NewNode {
    pub node: Node,
    pub token: Option<TokenHash>,
    pub events: Vec<NodeEvent>,
}

/// Heartbeat figures written behind, in batches.
#[derive(Debug, Clone)]
pub struct Figures {
    pub node_id: Uuid,
    pub last_seen_at: Millis,
    pub figures: Option<PackedFigures>,
    /// The node's lists, present only when its models changed since the last write.
    pub lists: Option<NodeLists>,
}

/// A user as stored.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub created_at: Millis,
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub created_by: String,
    pub created_at: Millis,
    /// What the key may use (SPEC §14).
    pub limits: crate::model::tenant::Limits,
    /// Its share of the queue's free places (1–100).
    pub weight: u32,
}

/// Which page of the audit log to read.
#[derive(Debug, Clone, Copy)]
pub struct AuditQuery<'a> {
    pub limit: u32,
    pub before: Option<i64>,
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
}

/// Every node, in batches, as the store reads them ([`Storage::node_batches`]).
pub struct NodeBatches {
    batches: tokio::sync::mpsc::Receiver<Result<Vec<StoredNode>, StoreError>>,
    /// The tasks that read them: one that ended without sending all it read (a panic) is an error, not a fleet
    /// silently loaded in part.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeBatches {
    pub fn new(
        batches: tokio::sync::mpsc::Receiver<Result<Vec<StoredNode>, StoreError>>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        NodeBatches { batches, readers }
    }

    /// The next batch; `None` once every node was read. An error ends the reading.
    pub async fn next(&mut self) -> Option<Result<Vec<StoredNode>, StoreError>> {
        if let Some(batch) = self.batches.recv().await {
            return Some(batch);
        }
        for reader in self.readers.drain(..) {
            if let Err(err) = reader.await {
                return Some(Err(StoreError::Other(anyhow::anyhow!("reading the nodes failed: {err}"))));
            }
        }
        None
    }
}

/// A node as read back for another router: with its token and the revision of its row, which grows by one with
/// every change of the node other than its heartbeat figures.
#[derive(Debug, Clone)]
pub struct SharedNode {
    pub node: Node,
    pub token: Option<TokenHash>,
    pub revision: i64,
}

/// The nodes changed or deleted since a cursor, and the cursor to read the next changes from.
#[derive(Debug, Clone, Default)]
pub struct NodeChanges {
    pub nodes: Vec<SharedNode>,
    pub deleted: Vec<Uuid>,
    pub cursor: i64,
}

/// A node's latest heartbeat as another router wrote it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub node_id: Uuid,
    pub last_seen_at: Millis,
    pub figures: Option<PackedFigures>,
}

/// The heartbeat figures other routers wrote since a cursor, and the cursor to read the next from.
#[derive(Debug, Clone, Default)]
pub struct SeenChanges {
    pub seen: Vec<Seen>,
    pub cursor: i64,
}

/// What woke a router: another router (or this one) committed a change.
#[derive(Debug, Default)]
pub struct ChangeSignals {
    /// A node was added, changed (status, approval, cordon, fields, lists, token) or deleted.
    pub nodes: tokio::sync::Notify,
    /// A credential stopped being valid: an API key revoked, a session ended, a user deleted; what, in
    /// [`ChangeSignals::take_revoked`].
    pub credentials: tokio::sync::Notify,
    /// The revocations announced since the last take; `None` in the list for one that could not be read, which
    /// means every remembered credential must be forgotten.
    revoked: std::sync::Mutex<Vec<Option<Revoked>>>,
}

impl ChangeSignals {
    /// Records an announced revocation (`None`: unreadable) and wakes whoever follows them.
    pub fn revoke(&self, revoked: Option<Revoked>) {
        self.revoked.lock().unwrap_or_else(|p| p.into_inner()).push(revoked);
        self.credentials.notify_one();
    }

    /// The revocations announced since the last call.
    pub fn take_revoked(&self) -> Vec<Option<Revoked>> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
