//! The in-memory view of the fleet and every change of a node's state.
//!
//! The registry is loaded from the store at start-up and kept in step with it: every decision (registration,
//! approval, status change, deletion) is committed to the store *before* memory changes and before the caller is
//! answered. Heartbeat figures are the exception: they update memory at once and are written behind in batches by
//! [`Registry::flush`], so a crash loses at most the last batch of figures, never a node, a token or a status.
//!
//! Locking: a short-lived map lock finds a node; each node has its own state mutex (never held across an await)
//! and its own async `transition` lock, which serialises the writes of *that* node. No lock shared by all nodes is
//! ever held across a database write.
//!
//! Every change of a node's decision fields goes through one commit path (`commit.rs`): lock the node, skip it if
//! deleted, let the change decide on a copy, persist, then apply the copy and update the indexes, counts and change
//! log. The parts that own state of their own are types of their own.
//!
//! Files: `index.rs` (the maps and a node's slot), `search.rs` (the keys a node is sorted and searched by),
//! `query.rs` (listing, filtering and paging), `register.rs` (registration), `admission.rs` (who may register:
//! join tokens and throttles), `commit.rs` (the commit path), `transitions.rs` (heartbeats, approval, cordon,
//! edits, deletion, the offline sweep, pending expiry), `pending.rs` (the cap on pending nodes), `changes.rs` (the
//! change log with deletions), `figures.rs` (the write-behind of heartbeat figures), `silences.rs` (the router's own
//! stalls and mass silences, SPEC §10), `follow.rs` (following changes made by other routers on a shared
//! database), `state.rs` (the state machine as pure functions). The registry answers [`RegistryError`], never an
//! HTTP status.

pub mod admission;
mod changes;
mod commit;
mod figures;
mod follow;
mod index;
mod pending;
pub mod query;
mod register;
mod search;
mod silences;
pub mod state;
mod transitions;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::model::auth::TokenHash;
use crate::model::enrollment::Unusable;
use crate::model::health;
use crate::model::node::Node;
use crate::revision::Revisions;
use crate::routing::Routing;
use crate::store::{Store, StoreError};
use changes::ChangeLog;
use figures::WriteBehind;
use follow::Following;
use index::{Index, Slot};
use pending::PendingCount;
use silences::Sweeps;

pub use follow::FOLLOW_INTERVAL;
pub use index::NodeHandle;
pub use pending::PendingReservation;
pub use register::{Registered, RegistrationPlan};
pub use transitions::AdminEdit;

/// Why the registry refused or could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("No node with id {0}.")]
    NotFound(Uuid),
    /// The node went while a re-registration of it was under way.
    #[error("Node {0} was deleted meanwhile; register again.")]
    DeletedMeanwhile(Uuid),
    /// A node token that belongs to no node (a deleted node's token is unknown).
    #[error("Unknown node token: the node may have been deleted. Register again to get a new token.")]
    UnknownToken,
    /// A valid node token, presented for another node than its own.
    #[error("This token belongs to another node, not to {0}; use the token issued to this node.")]
    TokenOfAnotherNode(Uuid),
    #[error(
        "A node named `{machine_name}` with runtime port {port} is already registered (id {id}). If this machine \
         lost its token, an administrator deletes the old node (DELETE /v0/nodes/{id}) and the agent registers anew."
    )]
    NodeExists { machine_name: String, port: u16, id: Uuid },
    #[error("Node {id} is {status}, not pending; only pending nodes can be approved.")]
    NotPending { id: Uuid, status: NodeStatus },
    /// A registration without a join token where the router requires one.
    #[error("{}", admission::join_token_required())]
    JoinTokenRequired,
    /// A registration refused by a limit; `code` names it (`rate_limited`, `too_many_pending`,
    /// `join_token_throttled`).
    #[error("{message}")]
    Limited { code: &'static str, message: String, retry_after_secs: u64 },
    /// The registration's join token is unknown, or stopped being usable before the node was stored.
    #[error("{}", join_token_problem(*.0))]
    JoinTokenInvalid(Unusable),
    /// `changed_since` names a revision this router cannot answer from: older than its memory of deletions (it
    /// restarted, or many nodes were deleted since) or newer than its own revisions.
    #[error(
        "Revision {since} cannot be answered by this router (it answers from {oldest} to {newest}): list the nodes \
         again without `changed_since`."
    )]
    RevisionExpired { since: i64, oldest: i64, newest: i64 },
    /// The store failed; nothing was changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a join token cannot be used, as a sentence for the caller.
pub fn join_token_problem(why: Unusable) -> &'static str {
    match why {
        Unusable::Unknown => "The join token is unknown; ask an administrator for a join token (POST /v0/join-tokens).",
        Unusable::Expired => "The join token has expired; ask an administrator for a new one.",
        Unusable::UsedUp => "The join token has been used up (its `max_uses` machines joined); ask for a new one.",
        Unusable::Revoked => "The join token has been revoked; ask an administrator for a new one.",
    }
}

/// The result of a registry operation.
pub type RegistryResult<T> = Result<T, RegistryError>;

/// The fleet, in memory, backed by the store.
pub struct Registry {
    store: Store,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    offline_after_ms: i64,
    /// A GPU at or above this temperature is `gpu_overheat` (`--gpu-max-temp-c`).
    gpu_max_temp_c: f64,
    index: RwLock<Index>,
    /// Where traffic may go: kept in step with every change of a node's status, ready models or address.
    routing: Arc<Routing>,
    /// Stamps every change of what a node's JSON shows (SPEC §12).
    revisions: Arc<Revisions>,
    /// What `changed_since` is answered from: deletions, revisions given out.
    changes: ChangeLog,
    /// Pending nodes and places reserved under the pending cap.
    pending: PendingCount,
    /// Nodes whose figures wait to be written.
    figures: WriteBehind,
    /// When the offline sweep last ran, and the fleet's mass silences (SPEC §10).
    sweeps: Sweeps,
    /// Where the reads of other routers' changes stand, and whether this router leads (SPEC §11).
    following: Following,
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
        let pending = PendingCount::default();
        let revisions = Arc::new(Revisions::starting_at(now));
        let routing = Arc::new(Routing::new(revisions.clone()));
        let mut offline = HashSet::new();
        let mut add = |node: Node, token: Option<TokenHash>, revision: i64| {
            routing.update(&node);
            pending.added(node.status);
            if node.status == NodeStatus::Offline {
                offline.insert(node.id);
            }
            let slot = Slot::new(node, token, now, revisions.now());
            slot.bookkeeping().revision = revision;
            index.add(slot);
        };
        // With a shared database, the first read of the changes is the load: every node with its revision, and the
        // cursor the follower goes on from.
        let following = match store.shared() {
            Some(shared) => {
                let changes = shared.node_changes(0).await?;
                for row in changes.nodes {
                    add(row.node, row.token, row.revision);
                }
                Following::start_at(changes.cursor, false)
            }
            // Built as the batches come, so the fleet is never held twice.
            None => {
                let mut batches = store.node_batches().await?;
                while let Some(batch) = batches.next().await {
                    for (node, token) in batch? {
                        add(node, token, 0);
                    }
                }
                Following::start_at(0, true)
            }
        };
        metrics.sweep_lease.set(u64::from(following.leads()));
        let sweeps = Sweeps::load(store.clone(), metrics.clone(), offline_after_ms, now, offline).await?;
        Ok(Registry {
            changes: ChangeLog::new(revisions.clone(), store.shared().is_some()),
            store,
            clock,
            metrics,
            offline_after_ms,
            gpu_max_temp_c: health::DEFAULT_GPU_MAX_TEMP_C,
            index: RwLock::new(index),
            routing,
            revisions,
            pending,
            figures: WriteBehind::default(),
            sweeps,
            following,
        })
    }

    /// Sets the temperature at which a GPU is `gpu_overheat` (SPEC §10).
    pub fn with_gpu_max_temp_c(mut self, celsius: f64) -> Self {
        self.gpu_max_temp_c = celsius;
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot(&self, id: Uuid) -> RegistryResult<Arc<Slot>> {
        self.read().nodes.get(&id).cloned().ok_or(RegistryError::NotFound(id))
    }

    /// The node whose token this is, by memory alone (see [`Registry::authenticate`]).
    fn authenticate_known(&self, token: &str) -> RegistryResult<NodeHandle> {
        let token = TokenHash::of(token);
        let index = self.read();
        let id = *index.by_token.get(&token).ok_or(RegistryError::UnknownToken)?;
        let slot = index.nodes.get(&id).cloned().ok_or(RegistryError::UnknownToken)?;
        Ok(NodeHandle { id, token, slot })
    }

    /// The routing index of the fleet.
    pub fn routing(&self) -> &Arc<Routing> {
        &self.routing
    }

    /// Number of nodes known.
    pub fn len(&self) -> usize {
        self.read().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pending nodes now.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Admits one registration that may add a pending node while fewer than `cap` are pending or admitted
    /// (`cap` 0: no cap); `None` when the cap is reached. Hold the reservation until the registration is settled.
    pub fn reserve_pending(&self, cap: u64) -> Option<PendingReservation<'_>> {
        self.pending.reserve(cap)
    }

    /// Whether node `id` is offline now (false when it is gone).
    fn is_offline(&self, id: &Uuid) -> bool {
        self.read().nodes.get(id).is_some_and(|slot| slot.lock().node.status == NodeStatus::Offline)
    }

    /// Counts of nodes by status.
    pub fn counts(&self) -> HashMap<NodeStatus, usize> {
        let mut counts = HashMap::new();
        for slot in self.read().nodes.values() {
            *counts.entry(slot.lock().node.status).or_insert(0) += 1;
        }
        counts
    }
}
