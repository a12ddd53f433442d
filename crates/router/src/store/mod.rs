//! The storage seam: everything the registry and the handlers keep goes through [`Storage`], and all SQL lives
//! below this module, in one folder per backend ([`sqlite`] today). A second backend (PostgreSQL) implements the
//! same trait; nothing above it changes.
//!
//! The contract every backend keeps:
//! - a method returns only once its write is durable; a write that fails is undone whole and comes back as an error,
//!   marked [`StorageFault`] when the storage itself failed (full disk, I/O error, lost connection), so the caller
//!   answers 503 and nothing of the request is kept;
//! - a node's lists are written together with the copy read at start-up ([`Storage::load_nodes`] returns them);
//! - events are capped at [`EVENTS_PER_NODE`] per node.
//!
//! Methods return boxed futures so that the store can be held as `Arc<dyn Storage>`; none is on the heartbeat path,
//! whose figures are written behind in batches ([`Storage::flush_figures`]).
//!
//! A backend that several routers may share ([`postgres`]) also implements [`SharedStorage`]: what a router needs
//! to follow the changes the others make (SPEC §11).

pub mod migrate;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::any::Any;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::{Principal, Revoked, Role, Scope, TokenHash};
use crate::model::enrollment::{JoinToken, JoinUse, Unusable};
use crate::model::figures::PackedMetrics;
use crate::model::fleet::FleetEvent;
use crate::model::node::{Node, NodeEvent, NodeLists, RecordedEvent};

/// The storage the application holds.
pub type Store = Arc<dyn Storage>;

/// Most events kept per node (SPEC §9): a node's older events go as new ones are written.
pub const EVENTS_PER_NODE: i64 = 1000;

/// What the storage could not do, by whose fault: nothing of the write was kept, and the same write may succeed once
/// the fault is gone (for [`StorageFault::Lost`], once the router is restarted on a restored database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StorageFault {
    /// The database refused or failed the write: its disk is full, an I/O error, it became read-only.
    #[error("the database could not be written (disk full or I/O error)")]
    Failed,
    /// The database cannot be reached: its server is down or the connection to it was lost.
    #[error("the database is unreachable")]
    Unreachable,
    /// The database file was deleted or replaced while the router ran: what is written to it now would be lost.
    #[error("the database file was deleted or replaced while the router ran")]
    Lost,
}

/// Whether the storage can be used now, for `/healthz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// The database server cannot be reached; it is tried again in the background.
    Unreachable,
    /// The database file is gone; no write is taken until the router is restarted.
    Lost,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Unreachable => "unreachable",
            Availability::Lost => "lost",
        }
    }

    /// The fault every storage call answers in this state, if any.
    pub fn fault(self) -> Option<StorageFault> {
        match self {
            Availability::Available => None,
            Availability::Unreachable => Some(StorageFault::Unreachable),
            Availability::Lost => Some(StorageFault::Lost),
        }
    }
}

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
    pub metrics: Option<PackedMetrics>,
    /// The node's lists, present only when its models changed since the last write.
    pub lists: Option<NodeLists>,
}

/// Why a node was not stored.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("a node with this machine name and runtime port already exists")]
    Duplicate,
    /// The join token stopped being usable before its use could be counted (used up by a racing registration,
    /// revoked, expired): nothing was stored.
    #[error("the join token cannot be used: {0:?}")]
    JoinToken(Unusable),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
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
}

/// What can stop a user's deletion.
#[derive(Debug, thiserror::Error)]
pub enum DeleteUserError {
    #[error("no such user")]
    NotFound,
    #[error("the last administrator cannot be deleted")]
    LastAdmin,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Which page of the audit log to read.
#[derive(Debug, Clone, Copy)]
pub struct AuditQuery<'a> {
    pub limit: u32,
    pub before: Option<i64>,
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
}

/// A result of the store.
pub type StoreResult<'a, T> = BoxFuture<'a, anyhow::Result<T>>;

/// Every node, in batches, as the store reads them ([`Storage::node_batches`]).
pub struct NodeBatches {
    batches: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<StoredNode>>>,
    /// The tasks that read them: one that ended without sending all it read (a panic) is an error, not a fleet
    /// silently loaded in part.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeBatches {
    pub fn new(
        batches: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<StoredNode>>>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        NodeBatches { batches, readers }
    }

    /// The next batch; `None` once every node was read. An error ends the reading.
    pub async fn next(&mut self) -> Option<anyhow::Result<Vec<StoredNode>>> {
        if let Some(batch) = self.batches.recv().await {
            return Some(batch);
        }
        for reader in self.readers.drain(..) {
            if let Err(err) = reader.await {
                return Some(Err(anyhow::anyhow!("reading the nodes failed: {err}")));
            }
        }
        None
    }
}

/// Everything the router keeps, behind one narrow interface.
pub trait Storage: Send + Sync + 'static {
    // Nodes.

    /// Every node with its lists and token hash.
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>>;
    /// Every node with its lists and token hash, in batches as they are read: what start-up builds the registry
    /// from. By default [`Storage::load_nodes`] as one batch.
    fn node_batches(&self) -> StoreResult<'_, NodeBatches> {
        Box::pin(async move {
            let nodes = self.load_nodes().await?;
            let (sender, batches) = tokio::sync::mpsc::channel(1);
            let _ = sender.send(Ok(nodes)).await;
            Ok(NodeBatches::new(batches, Vec::new()))
        })
    }
    /// Stores a newly registered node, its token and its first events, counting the use of the join token it came
    /// with; returns once they are committed.
    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> BoxFuture<'_, Result<(), InsertError>>;
    /// Adds nodes as they are, in one transaction. A node whose id, or machine name and port, is already stored is
    /// left out, so a repeated import adds nothing. Returns the ids added.
    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>>;
    /// Rewrites a re-registered node's descriptive fields, lists, status and token, with its events, counting the
    /// use of the join token it came with.
    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> BoxFuture<'a, Result<(), InsertError>>;
    /// Persists a status change (and approval fields, and whether it is cordoned) together with its event.
    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()>;
    /// Persists the fields an administrator edits (display name, notes, tags).
    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()>;
    /// Removes a node with its lists and token; its events stay, plus `event` for the deletion.
    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()>;
    /// Writes a batch of heartbeat figures in one transaction; nodes deleted meanwhile are skipped.
    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()>;
    /// A page of a node's history, newest first: at most `limit` events older than the event `before`.
    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>>;
    /// Removes events recorded before `cutoff`, in bounded batches; returns how many.
    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64>;

    // Fleet events (SPEC §10).

    /// Records a fleet-level event; returns its id.
    fn insert_fleet_event<'a>(&'a self, event: &'a FleetEvent) -> StoreResult<'a, i64>;
    /// Marks a fleet event resolved at `at`, by `by` when a person did; `false` when there is no such event or it
    /// was resolved already.
    fn resolve_fleet_event<'a>(
        &'a self,
        id: i64,
        at: Millis,
        by: Option<&'a str>,
        resolution: &'a str,
    ) -> StoreResult<'a, bool>;
    /// Counts `nodes_affected` of `nodes_live` nodes, with its `message`, in a fleet event that lasts (a mass
    /// silence that grew); `false` when there is no such event or it was resolved already.
    fn grow_fleet_event<'a>(
        &'a self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &'a str,
    ) -> StoreResult<'a, bool>;
    /// The latest `limit` fleet events, newest first.
    fn fleet_events(&self, limit: u32) -> StoreResult<'_, Vec<FleetEvent>>;

    // Users, sessions and API keys.

    fn count_users(&self) -> StoreResult<'_, i64>;
    /// Inserts a user; `false` when the name is taken.
    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool>;
    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>>;
    fn users(&self) -> StoreResult<'_, Vec<UserRow>>;
    /// Deletes a user and their sessions, refusing to remove the last administrator.
    fn delete_user<'a>(&'a self, username: &'a str) -> BoxFuture<'a, Result<(), DeleteUserError>>;
    /// Stores a session (and drops the expired ones).
    fn insert_session<'a>(
        &'a self,
        hash: TokenHash,
        username: &'a str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<'a, ()>;
    fn delete_session(&self, hash: TokenHash) -> StoreResult<'_, ()>;
    /// The signed-in user behind a session token or API key, if it is valid now.
    fn principal(&self, hash: TokenHash, now: Millis) -> StoreResult<'_, Option<Principal>>;
    fn insert_api_key<'a>(&'a self, key: &'a ApiKeyRow, hash: TokenHash) -> StoreResult<'a, ()>;
    fn api_keys(&self) -> StoreResult<'_, Vec<ApiKeyRow>>;
    /// Revokes an API key; `false` when there was none with this id.
    fn delete_api_key(&self, id: Uuid) -> StoreResult<'_, bool>;

    // Join tokens and the audit log.

    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()>;
    /// Every join token, newest first.
    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>>;
    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>>;
    /// Revokes a join token at `at`; `false` when there is none with this id. Nodes that joined with it stay.
    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool>;
    /// Appends events to the audit log, in one transaction.
    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()>;
    /// A page of the audit log, newest first: at most `limit` events older than the event `before`, of one actor
    /// or action when given.
    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>>;
    /// Removes audit events recorded before `cutoff`, in bounded batches; returns how many.
    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64>;

    // The storage itself.

    /// Periodic upkeep between writes (SQLite: a passive checkpoint of the write-ahead log), every 250 ms.
    fn upkeep(&self) -> StoreResult<'_, ()>;
    /// Finishes queued writes and closes the storage.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// Writes that failed on a storage fault since the start, for `/metrics`.
    fn storage_faults(&self) -> u64;
    /// Whether the storage can be used now.
    fn availability(&self) -> Availability;
    /// The backend itself, for its own test seams.
    fn as_any(&self) -> &dyn Any;
    /// The shared side of a backend other routers may use too; `None` for SQLite, which one router owns.
    fn shared(&self) -> Option<&dyn SharedStorage> {
        None
    }
    /// Where the data is, for the start-up log (a path, or a URL without its password).
    fn describe(&self) -> String;
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
    pub metrics: Option<PackedMetrics>,
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

/// A storage any number of routers share (SPEC §11). Cursors are opaque to the caller: start from 0, then pass
/// back what the last call returned. A change is never missed between two calls; one may come back twice.
pub trait SharedStorage: Send + Sync + 'static {
    /// Nodes changed or deleted (by any router, this one included) since `cursor`.
    fn node_changes(&self, cursor: i64) -> StoreResult<'_, NodeChanges>;
    /// Heartbeat figures written by *other* routers since `cursor`.
    fn seen_changes(&self, cursor: i64) -> StoreResult<'_, SeenChanges>;
    /// The node this token belongs to, as stored now: for a node registered through another router.
    fn node_by_token(&self, hash: TokenHash) -> StoreResult<'_, Option<SharedNode>>;
    /// Takes the lease on offline decisions, or checks it is still held: `true` while this router holds it. One
    /// router holds it at a time; it passes to another when its holder stops or loses its connection.
    fn hold_sweep_lease(&self) -> StoreResult<'_, bool>;
    /// The revision this router's own latest write of node `id` gave its row (0: none; `i64::MAX` once this router
    /// deleted it). A row read back with a revision no newer is this router's own write, or older: memory already
    /// holds it or something newer.
    fn written_revision(&self, id: Uuid) -> i64;
    /// Notified whenever a router commits a change (PostgreSQL `LISTEN/NOTIFY`); a lost notification is healed by
    /// the periodic reads of the changes.
    fn signals(&self) -> &ChangeSignals;
}

/// True when a [`StorageFault`] is among the causes of `err`.
pub fn is_fault(err: &anyhow::Error) -> bool {
    fault_of(err).is_some()
}

/// The [`StorageFault`] among the causes of `err`, if any.
pub fn fault_of(err: &anyhow::Error) -> Option<StorageFault> {
    // Through every layer of context added on the way up.
    err.downcast_ref::<StorageFault>().copied()
}

/// `err` marked as `fault`, unless it already carries a fault.
pub fn mark(err: anyhow::Error, fault: StorageFault) -> anyhow::Error {
    if fault_of(&err).is_some() { err } else { err.context(fault) }
}
