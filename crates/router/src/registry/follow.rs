//! Following the other routers of a shared database (SPEC §11): the nodes they add, change and delete, the
//! heartbeats they receive, and the tokens they issue.
//!
//! Every router keeps the whole fleet in memory and answers from it, as with SQLite; what another router commits
//! reaches this one through [`SharedStorage::node_changes`] and [`SharedStorage::seen_changes`], read when the
//! database signals a change and at least every [`FOLLOW_INTERVAL`]. A row is applied only when its revision is
//! newer than the one memory was last read from, so a late read never undoes a later change; this router's own
//! writes come back too and change nothing.
//!
//! Heartbeat figures other routers received move a node's last-seen time and its silence forward, so the one
//! router that decides offline transitions (the holder of the sweep lease) decides from the latest time any router
//! saw. Their clocks are assumed to agree (NTP).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use uuid::Uuid;

use super::index::{NodeHandle, Slot};
use super::{Registry, RegistryError, RegistryResult};
use crate::metrics::Metrics;
use crate::model::auth::TokenHash;
use crate::store::{NodeChanges, SeenChanges, SharedNode, StorageFault, Store};

/// Where the reads of other routers' changes stand (cursors of [`SharedStorage`]), and whether this router decides
/// offline transitions.
#[derive(Debug)]
pub(super) struct Following {
    nodes: AtomicI64,
    seen: AtomicI64,
    /// Always with SQLite; with a shared database, while this router holds the sweep lease (SPEC §11).
    leads: AtomicBool,
}

impl Following {
    /// Node changes are read from `cursor` on (the load read the rest); figures from the start, so none of those
    /// written since the load is missed.
    pub(super) fn start_at(cursor: i64, leads: bool) -> Self {
        Following { nodes: AtomicI64::new(cursor), seen: AtomicI64::new(0), leads: AtomicBool::new(leads) }
    }

    /// Whether this router decides offline transitions now: takes the sweep lease, or checks it still holds it,
    /// when the database is shared; always with SQLite. A lease that cannot be checked is not held.
    pub(super) async fn lead(&self, store: &Store, metrics: &Metrics) -> bool {
        let Some(shared) = store.shared() else { return true };
        let leads = match shared.hold_sweep_lease().await {
            Ok(leads) => leads,
            Err(err) => {
                if err.fault() != Some(StorageFault::Unreachable) {
                    tracing::warn!(error = %format!("{err:#}"), "cannot check the sweep lease; deciding nothing");
                }
                false
            }
        };
        if self.leads.swap(leads, Ordering::SeqCst) != leads {
            if leads {
                tracing::info!("this router holds the sweep lease: it decides offline transitions");
            } else {
                tracing::warn!("this router lost the sweep lease: another router decides offline transitions");
            }
        }
        metrics.sweep_lease.set(u64::from(leads));
        leads
    }

    /// Whether this router decided offline transitions at its latest sweep.
    pub(super) fn leads(&self) -> bool {
        self.leads.load(Ordering::SeqCst)
    }
}

/// Longest time between two reads of the changes, whatever the signals: what heals a lost notification.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

impl Registry {
    /// The node whose token this is, looked up in the database when memory does not know it (a node registered
    /// through another router, or a token rotated there) before it is called unknown.
    pub async fn authenticate(&self, token: &str) -> RegistryResult<NodeHandle> {
        let known = self.authenticate_known(token);
        let (Err(RegistryError::UnknownToken), Some(shared)) = (&known, self.store.shared()) else {
            return known;
        };
        match shared.node_by_token(TokenHash::of(token)).await? {
            Some(row) => {
                self.apply_node(row);
                self.authenticate_known(token)
            }
            None => known,
        }
    }

    /// Whether this router decided offline transitions at its latest sweep.
    pub fn leads(&self) -> bool {
        self.following.leads()
    }

    /// Reads and applies the node changes since the previous read (at start: every node). Returns how many rows
    /// were read. Called by the follower task, and by a registration refused as a duplicate; two reads at once at
    /// worst move the cursor back, so that some changes are read again.
    pub async fn follow_nodes(&self) -> anyhow::Result<usize> {
        let Some(shared) = self.store.shared() else { return Ok(0) };
        let NodeChanges { nodes, deleted, cursor } =
            shared.node_changes(self.following.nodes.load(Ordering::SeqCst)).await?;
        let read = nodes.len() + deleted.len();
        for row in nodes {
            self.apply_node(row);
        }
        for id in deleted {
            self.forget(id);
        }
        self.following.nodes.store(cursor, Ordering::SeqCst);
        Ok(read)
    }

    /// Reads and applies the heartbeat figures other routers wrote since the previous read. Returns how many.
    pub async fn follow_seen(&self) -> anyhow::Result<usize> {
        let Some(shared) = self.store.shared() else { return Ok(0) };
        let SeenChanges { seen, cursor } = shared.seen_changes(self.following.seen.load(Ordering::SeqCst)).await?;
        let read = seen.len();
        self.following.seen.store(cursor, Ordering::SeqCst);
        let index = self.read();
        for seen in seen {
            let Some(slot) = index.nodes.get(&seen.node_id) else { continue };
            let mut state = slot.bookkeeping();
            if state.node.last_seen_at.is_none_or(|at| at < seen.last_seen_at) {
                state.changed = self.revisions.next();
                state.node.last_seen_at = Some(seen.last_seen_at);
                state.node.figures = seen.figures;
            }
            state.alive_since = state.alive_since.max(seen.last_seen_at);
        }
        Ok(read)
    }

    /// Puts a node as another router stored it into memory, unless memory holds a newer revision.
    fn apply_node(&self, row: SharedNode) {
        let SharedNode { mut node, token, revision } = row;
        let id = node.id;
        let existing = self.read().nodes.get(&id).cloned();
        let Some(slot) = existing else {
            let status = node.status;
            let slot = Slot::new(node, token, self.clock.now_ms(), self.revisions.next());
            let mut index = self.write();
            let own = self.store.shared().is_some_and(|shared| shared.written_revision(id) >= revision);
            if own || index.nodes.contains_key(&id) {
                // This router's own registration, which adds the node itself, or added meanwhile.
                return;
            }
            {
                let mut state = slot.bookkeeping();
                state.revision = revision;
                index.by_key.insert((state.node.machine_name.clone(), state.node.runtime_port), id);
                if let Some(token) = token {
                    index.by_token.insert(token, id);
                }
                self.routing.update(&state.node);
            }
            index.nodes.insert(id, slot);
            self.pending.added(status);
            return;
        };
        let old_token = {
            let mut state = slot.bookkeeping();
            // Under the node's lock, where this router applies its own writes after recording their revision: a
            // row no newer than this router's own latest write is that write or older, and memory holds it.
            let written = self.store.shared().map_or(0, |shared| shared.written_revision(id));
            if state.deleted || revision <= state.revision.max(written) {
                return;
            }
            // Figures and models this router received and has not written yet are newer than the row.
            if state.node.last_seen_at > node.last_seen_at {
                node.last_seen_at = state.node.last_seen_at;
                node.figures = state.node.figures.take();
            }
            if state.models_dirty {
                node.loaded_models = std::mem::take(&mut state.node.loaded_models);
                node.ready_models = std::mem::take(&mut state.node.ready_models);
            }
            let since = node.last_seen_at.into_iter().chain(node.approved_at).max().unwrap_or(state.alive_since);
            state.alive_since = state.alive_since.max(since);
            self.pending.moved(state.node.status, node.status);
            let old_token = std::mem::replace(&mut state.token, token);
            state.node = node;
            state.searchable();
            state.revision = revision;
            state.changed = self.revisions.next();
            self.routing.update(&state.node);
            old_token
        };
        if old_token != token {
            let mut index = self.write();
            if let Some(old) = old_token
                && index.by_token.get(&old) == Some(&id)
            {
                index.by_token.remove(&old);
            }
            if let Some(token) = token {
                index.by_token.insert(token, id);
            }
        }
    }

    /// Drops a node another router deleted: its token stops working here too.
    fn forget(&self, id: Uuid) {
        let Some(slot) = self.read().nodes.get(&id).cloned() else { return };
        self.drop_node(&slot);
    }
}
