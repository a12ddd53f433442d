//! The storage contract: everything the registry and the handlers keep goes through [`Storage`], and all SQL lives
//! below this module, in one folder per backend: [`sqlite`] (embedded, the default) and [`postgres`] (shared by any
//! number of routers, SPEC §11). Nothing above this module knows which one it holds.
//!
//! The contract every backend keeps:
//! - a method returns only once its write is durable; a write that fails is undone whole and comes back as a
//!   [`StoreError`]: [`StoreError::Fault`] when the storage itself failed (full disk, I/O error, unreachable server,
//!   lost file), so the caller answers 503 and nothing of the request is kept;
//! - a node's lists are written together with the copy read at start-up ([`NodeStore::load_nodes`] returns them);
//! - events are capped at [`EVENTS_PER_NODE`] per node.
//!
//! The contract is one trait per area, each implemented by each backend in the file of that area, with no layer in
//! between: [`NodeStore`], [`FleetEventStore`], [`AccountStore`], [`EnrollmentStore`], [`AuditStore`],
//! [`UsageStore`], [`DeploymentStore`]; [`Storage`]
//! is all of them and the storage's own upkeep. Statements that both backends run as they are (`$1`, `$2`… for
//! parameters, which SQLite reads too) are written once, in [`sql`]. Methods return boxed futures so that the store
//! can be held as `Arc<dyn Storage>`; none is on the heartbeat path, whose figures are written behind in batches
//! ([`NodeStore::flush_figures`]).
//!
//! A backend that several routers may share ([`postgres`]) also implements [`SharedStorage`]: what a router needs
//! to follow the changes the others make.

pub mod deploy_sql;
mod error;
pub mod migrate;
pub mod postgres;
mod records;
mod rows;
mod sql;
pub mod sqlite;
pub mod usage_sql;

use std::any::Any;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::{Principal, TokenHash};
use crate::model::deployment::{Deployment, Replica};
use crate::model::enrollment::{JoinToken, JoinUse};
use crate::model::fleet_event::FleetEvent;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::model::tenant::Limits;
use crate::model::usage::{RecordedRequest, RequestQuery, SeriesQuery, UsageBucket, UsageRecord};

pub use error::{StorageFault, StoreError};
pub use records::{
    ApiKeyRow, AuditQuery, ChangeSignals, Figures, NewNode, NodeBatches, NodeChanges, Seen, SeenChanges, SharedNode,
    StoredNode, UserRow,
};

/// The storage the application holds.
pub type Store = Arc<dyn Storage>;

/// Most events kept per node (SPEC §9): a node's older events go as new ones are written.
pub const EVENTS_PER_NODE: i64 = 1000;

/// A result of the store.
pub type StoreResult<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

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
}

/// Nodes: the fleet as stored, its decisions, its figures written behind, its history.
pub trait NodeStore: Send + Sync {
    /// Every node with its lists and token hash.
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>>;
    /// Every node with its lists and token hash, in batches as they are read: what start-up builds the registry
    /// from. By default [`NodeStore::load_nodes`] as one batch.
    fn node_batches(&self) -> StoreResult<'_, NodeBatches> {
        Box::pin(async move {
            let nodes = self.load_nodes().await?;
            let (sender, batches) = tokio::sync::mpsc::channel(1);
            let _ = sender.send(Ok(nodes)).await;
            Ok(NodeBatches::new(batches, Vec::new()))
        })
    }
    /// Stores a newly registered node, its token and its first events, counting the use of the join token it came
    /// with; returns once they are committed. [`StoreError::Duplicate`]: its machine name and port are taken;
    /// [`StoreError::JoinToken`]: the token stopped being usable.
    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> StoreResult<'_, ()>;
    /// Adds nodes as they are, in one transaction. A node whose id, or machine name and port, is already stored is
    /// left out, so a repeated import adds nothing. Returns the ids added.
    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>>;
    /// Rewrites a re-registered node's descriptive fields, lists, status and token, with its events, counting the
    /// use of the join token it came with (errors as for [`NodeStore::insert_node`]).
    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> StoreResult<'a, ()>;
    /// Persists a status change (and approval fields, and whether it is cordoned) together with its event.
    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()>;
    /// Persists the fields an administrator edits (display name, notes, tags, concurrency limit).
    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()>;
    /// Removes a node with its lists and token; its events stay, plus `event` for the deletion.
    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()>;
    /// Writes a batch of heartbeat figures; nodes deleted meanwhile are skipped.
    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()>;
    /// A page of a node's history, newest first: at most `limit` events older than the event `before`.
    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>>;
    /// Removes events recorded before `cutoff`, in bounded batches; returns how many.
    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64>;
}

/// Fleet-level events (SPEC §10).
pub trait FleetEventStore: Send + Sync {
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
}

/// Users, sessions and API keys.
pub trait AccountStore: Send + Sync {
    fn count_users(&self) -> StoreResult<'_, i64>;
    /// Inserts a user; `false` when the name is taken.
    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool>;
    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>>;
    fn users(&self) -> StoreResult<'_, Vec<UserRow>>;
    /// Deletes a user and their sessions. [`StoreError::NotFound`]: no such user; [`StoreError::LastAdmin`]: the
    /// last administrator stays.
    fn delete_user<'a>(&'a self, username: &'a str) -> StoreResult<'a, ()>;
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
    /// Sets an API key's limits and weight; `false` when there is no key with this id.
    fn set_key_policy<'a>(&'a self, id: Uuid, limits: &'a Limits, weight: u32) -> StoreResult<'a, bool>;
    /// Sets a user's limits; `false` when there is no such user.
    fn set_user_limits<'a>(&'a self, username: &'a str, limits: &'a Limits) -> StoreResult<'a, bool>;
    /// Every key and user with limits or a weight other than 1: (tenant id, limits, weight).
    fn policies(&self) -> StoreResult<'_, Vec<(String, Limits, u32)>>;
}

/// Join tokens (SPEC §9).
pub trait EnrollmentStore: Send + Sync {
    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()>;
    /// Every join token, newest first.
    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>>;
    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>>;
    /// Revokes a join token at `at`; `false` when there is none with this id. Nodes that joined with it stay.
    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool>;
}

/// The audit log (SPEC §9).
pub trait AuditStore: Send + Sync {
    /// Appends events to the audit log, in one transaction.
    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()>;
    /// A page of the audit log, newest first: at most `limit` events older than the event `before`, of one actor
    /// or action when given.
    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>>;
    /// Removes audit events recorded before `cutoff`, in bounded batches; returns how many.
    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64>;
}

/// What each `/v1` request used (SPEC §14): its record, the roll-ups that sum the records, their pruning.
pub trait UsageStore: Send + Sync {
    /// Writes a batch of records with what they add to the roll-ups and the names of their principals, in one
    /// transaction.
    fn insert_usage<'a>(&'a self, batch: &'a [UsageRecord]) -> StoreResult<'a, ()>;
    /// The buckets of a series, oldest first, from the coarsest roll-up that answers it.
    fn usage_series<'a>(&'a self, query: &'a SeriesQuery) -> StoreResult<'a, Vec<UsageBucket>>;
    /// A page of the recorded requests, newest first.
    fn usage_requests<'a>(&'a self, query: &'a RequestQuery) -> StoreResult<'a, Vec<RecordedRequest>>;
    /// Per principal: requests and tokens recorded since `since`, summed from the roll-up of `step` (whose buckets
    /// `since` must start).
    fn spent_since(&self, step: crate::model::usage::Step, since: Millis) -> StoreResult<'_, Vec<(String, u64, u64)>>;
    /// The names of the principals seen: (id, name).
    fn principal_names(&self) -> StoreResult<'_, Vec<(String, String)>>;
    /// The streamed requests' time to first token, counted per minute from `from` to `to` in the bins of
    /// [`usage_sql::ttft_bin`]: (minute, bin, count).
    fn first_token_bins(&self, from: Millis, to: Millis) -> StoreResult<'_, Vec<(Millis, u32, u64)>>;
    /// Removes request records before `requests_before` and roll-up buckets before `rollups_before`, in bounded
    /// transactions; returns how many rows.
    fn prune_usage(&self, requests_before: Millis, rollups_before: Millis) -> StoreResult<'_, u64>;
}

/// Deployments (SPEC §15): what administrators asked for, and where each replica is and stands.
pub trait DeploymentStore: Send + Sync {
    /// Every deployment, by name, and every replica row.
    fn deployments(&self) -> StoreResult<'_, (Vec<Deployment>, Vec<Replica>)>;
    /// Stores a new deployment; [`StoreError::Duplicate`] when its name is taken.
    fn insert_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, ()>;
    /// Rewrites a deployment, and removes its replicas past a lowered count; `false` when there is none with its id;
    /// [`StoreError::Duplicate`] when its new name is taken.
    fn update_deployment<'a>(&'a self, deployment: &'a Deployment) -> StoreResult<'a, bool>;
    /// Removes a deployment and its replicas; `false` when there was none with this id.
    fn delete_deployment(&self, id: Uuid) -> StoreResult<'_, bool>;
    /// Writes replica rows whole, as the placer decided them, in one transaction; rows of deployments deleted or
    /// scaled below them meanwhile are left out.
    fn place_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()>;
    /// Writes what nodes reported of their replicas, in one transaction, each only while it is still placed on the
    /// node that reported it (the same node, placed at the same time).
    fn report_replicas<'a>(&'a self, replicas: &'a [Replica]) -> StoreResult<'a, ()>;
}

/// Everything the router keeps, and the storage's own upkeep.
pub trait Storage:
    NodeStore
    + FleetEventStore
    + AccountStore
    + EnrollmentStore
    + AuditStore
    + UsageStore
    + DeploymentStore
    + Send
    + Sync
    + 'static
{
    /// Periodic upkeep between writes (SQLite: a passive checkpoint of the write-ahead log, and a look at the
    /// file), every 250 ms.
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
    /// Claims up to `want` of `principal`'s requests of the minute starting `minute`, of `limit` in all among every
    /// router; returns how many were granted (0 once the minute's limit is reached). Claims of minutes long past are
    /// removed on the way.
    fn claim_requests<'a>(&'a self, principal: &'a str, minute: Millis, want: u64, limit: u64) -> StoreResult<'a, u64>;
}
