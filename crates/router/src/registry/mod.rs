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
//! Files: `index.rs` (the maps and a node's slot), `register.rs` (registration), `transitions.rs` (heartbeats,
//! approval, the offline sweep, edits, deletion, pending expiry), `fleet.rs` (the router's own stalls and mass
//! silences, SPEC §10), `figures.rs` (the write-behind of figures), `state.rs` (the state machine as pure
//! functions). The registry answers [`RegistryError`], never an HTTP status.

pub mod admission;
mod figures;
mod fleet;
mod index;
pub mod query;
mod register;
mod shared;
pub mod state;
mod transitions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use crate::clock::{Clock, Millis};
use crate::metrics::Metrics;
use crate::model::auth::TokenHash;
use crate::model::enrollment::Unusable;
use crate::model::health;
use crate::model::node::Node;
use crate::revision::Revisions;
use crate::routing::Routing;
use crate::store::{Store, StoreError};
use index::{Index, Slot};

pub use index::NodeHandle;
pub use register::{PendingReservation, Registered, RegistrationPlan};
pub use shared::FOLLOW_INTERVAL;
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
    offline_after_ms: i64,
    index: RwLock<Index>,
    /// Nodes whose figures changed since the last flush, and when the oldest of those figures arrived.
    dirty: Mutex<(Vec<Uuid>, Option<Millis>)>,
    metrics: Arc<Metrics>,
    /// Pending nodes, kept in step with every change to or from `pending`, so the pending cap costs no scan.
    pending: AtomicUsize,
    /// Registrations admitted under the pending cap and not yet settled.
    reserved: AtomicUsize,
    /// Where traffic may go: kept in step with every change of a node's status, ready models or address.
    routing: Arc<Routing>,
    /// When the offline sweep last ran, by the router's clock: a sweep that finds it ran late gives every live
    /// node a fresh grace period (SPEC §10).
    last_sweep_at: AtomicI64,
    /// Held for a whole sweep, so two sweeps never decide on the same silence.
    sweeping: tokio::sync::Mutex<()>,
    /// The mass silence not yet resolved, if any, and the nodes the latest sweeps marked offline.
    mass_silence: Mutex<fleet::Silences>,
    /// A GPU at or above this temperature is `gpu_overheat` (`--gpu-max-temp-c`).
    gpu_max_temp_c: f64,
    /// Whether this router decides offline transitions and pending expiry: always with SQLite; with a shared
    /// database, while it holds the sweep lease (SPEC §11).
    leads: AtomicBool,
    /// Where the reads of other routers' changes stand.
    follow_cursors: shared::FollowCursors,
    /// Stamps every change of what a node's JSON shows (SPEC §12).
    revisions: Arc<Revisions>,
    /// The nodes deleted lately, for `changed_since`.
    deletions: Mutex<query::Deletions>,
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
        let revisions = Arc::new(Revisions::starting_at(now));
        let routing = Arc::new(Routing::new(revisions.clone()));
        // With a shared database, the first read of the changes is the load: every node with its revision, and the
        // cursor the follower goes on from.
        let follow_cursors = shared::FollowCursors::default();
        let mut add = |node: Node, token: Option<TokenHash>, revision: i64| {
            routing.update(&node);
            let id = node.id;
            pending += usize::from(node.status == NodeStatus::Pending);
            index.by_key.insert((node.machine_name.clone(), node.runtime_port), id);
            if let Some(token) = token {
                index.by_token.insert(token, id);
            }
            let slot = Slot::new(node, token, now, revisions.now());
            slot.bookkeeping().revision = revision;
            index.nodes.insert(id, slot);
        };
        match store.shared() {
            Some(shared) => {
                let changes = shared.node_changes(0).await?;
                follow_cursors.start_at(changes.cursor);
                for row in changes.nodes {
                    add(row.node, row.token, row.revision);
                }
            }
            // Built as the batches come, so the fleet is never held twice.
            None => {
                let mut batches = store.node_batches().await?;
                while let Some(batch) = batches.next().await {
                    for (node, token) in batch? {
                        add(node, token, 0);
                    }
                }
            }
        }
        let mass_silence = fleet::unresolved(&store, &index).await?;
        metrics.mass_silence.set(u64::from(mass_silence.lasting.is_some()));
        let leads = store.shared().is_none();
        metrics.sweep_lease.set(u64::from(leads));
        Ok(Registry {
            store,
            clock,
            offline_after_ms,
            index: RwLock::new(index),
            dirty: Mutex::new((Vec::new(), None)),
            metrics,
            pending: AtomicUsize::new(pending),
            reserved: AtomicUsize::new(0),
            routing,
            last_sweep_at: AtomicI64::new(now),
            sweeping: tokio::sync::Mutex::new(()),
            mass_silence: Mutex::new(mass_silence),
            gpu_max_temp_c: health::DEFAULT_GPU_MAX_TEMP_C,
            leads: AtomicBool::new(leads),
            follow_cursors,
            deletions: Mutex::new(query::Deletions::since(revisions.now())),
            revisions,
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

    /// Keeps the count of pending nodes in step with a node's change of status from `from` to `to`; called under
    /// the node's lock, with the status memory held, so a change applied twice (by this router and by the reading
    /// of its own write back from a shared database) counts once.
    fn count_pending(&self, from: NodeStatus, to: NodeStatus) {
        match (from == NodeStatus::Pending, to == NodeStatus::Pending) {
            (true, false) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
            }
            (false, true) => {
                self.pending.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Pending nodes now.
    pub fn pending_count(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
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
