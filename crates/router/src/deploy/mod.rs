//! Deployments (SPEC §15): what administrators asked for, where each replica goes, and what the nodes' agents report
//! of them.
//!
//! The service keeps the deployments and their replicas in memory (the book), and each node's assignments ready for
//! its heartbeat's answer. Changes go to the store first, then to memory. One router places at a time (the holder
//! of the sweep lease, [`Deployments::place`]); with PostgreSQL every router reads the book back every second
//! ([`Deployments::reload`]), so any of them answers a node's heartbeat with its assignments and the API with the
//! replicas' states. What a node reports is written behind, every half second, only when it changed.

mod place;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use llm_router_protocol::{Assignment, MANAGED_RUNTIME_PREFIX, ReplicaReport, ReplicaState, RuntimeKind};
use uuid::Uuid;

use crate::clock::{Clock, Millis};
use crate::model::deployment::{AWAITING_AGENT, Deployment, DeploymentSpec, Replica, ReplicaStatus};
use crate::model::node::Node;
use crate::registry::Registry;
use crate::store::{Store, StoreError};

pub use place::{Candidate, plan};

/// Why a deployment could not be changed as asked.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no such deployment")]
    NotFound,
    #[error("a deployment with this name exists already")]
    NameTaken,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for DeployError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Duplicate => DeployError::NameTaken,
            StoreError::NotFound => DeployError::NotFound,
            other => DeployError::Store(other),
        }
    }
}

/// A deployment with its replicas, by slot.
#[derive(Debug, Clone)]
pub struct DeploymentState {
    pub deployment: Deployment,
    pub replicas: Vec<Replica>,
}

#[derive(Debug, Default)]
struct Book {
    deployments: BTreeMap<Uuid, Deployment>,
    replicas: BTreeMap<(Uuid, u32), Replica>,
    /// Each node's assignments, as its heartbeat's answer gives them.
    by_node: HashMap<Uuid, Arc<[Assignment]>>,
    /// The replicas placed on each node, by (deployment, slot).
    slots: HashMap<Uuid, Vec<(Uuid, u32)>>,
}

impl Book {
    fn of(deployments: Vec<Deployment>, replicas: Vec<Replica>) -> Book {
        let mut book = Book {
            deployments: deployments.into_iter().map(|d| (d.id, d)).collect(),
            replicas: replicas.into_iter().map(|r| ((r.deployment_id, r.slot), r)).collect(),
            by_node: HashMap::new(),
            slots: HashMap::new(),
        };
        book.index();
        book
    }

    fn index(&mut self) {
        let mut by_node: HashMap<Uuid, Vec<Assignment>> = HashMap::new();
        let mut slots: HashMap<Uuid, Vec<(Uuid, u32)>> = HashMap::new();
        for replica in self.replicas.values() {
            if let (Some(node), Some(deployment)) = (replica.node_id, self.deployments.get(&replica.deployment_id))
                && replica.slot < deployment.spec.replicas
            {
                by_node.entry(node).or_default().push(deployment.assignment());
                slots.entry(node).or_default().push((replica.deployment_id, replica.slot));
            }
        }
        self.by_node = by_node.into_iter().map(|(node, list)| (node, list.into())).collect();
        self.slots = slots;
    }

    fn set(&mut self, replica: Replica) {
        self.replicas.insert((replica.deployment_id, replica.slot), replica);
    }
}

/// The deployments service.
pub struct Deployments {
    store: Store,
    clock: Arc<dyn Clock>,
    book: RwLock<Book>,
    /// Reports that changed since the last write, by (deployment, slot).
    unwritten: Mutex<BTreeMap<(Uuid, u32), Replica>>,
    /// Placement is one pass at a time.
    placing: tokio::sync::Mutex<()>,
    /// Bumped whenever some node's assignments change, for the agents waiting on them.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Deployments {
    /// The service, with what the store holds.
    pub async fn load(store: Store, clock: Arc<dyn Clock>) -> anyhow::Result<Deployments> {
        let (deployments, replicas) = store.deployments().await?;
        Ok(Deployments {
            store,
            clock,
            book: RwLock::new(Book::of(deployments, replicas)),
            unwritten: Mutex::new(BTreeMap::new()),
            placing: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Book> {
        self.book.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Book> {
        self.book.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every deployment with its replicas, by name.
    pub fn list(&self) -> Vec<DeploymentState> {
        let book = self.read();
        let mut list: Vec<DeploymentState> = book.deployments.values().map(|d| state_of(&book, d)).collect();
        list.sort_by(|a, b| a.deployment.name.cmp(&b.deployment.name));
        list
    }

    /// One deployment by id or name.
    pub fn get(&self, key: &str) -> Option<DeploymentState> {
        let book = self.read();
        let id = Uuid::parse_str(key).ok();
        book.deployments.values().find(|d| Some(d.id) == id || d.name == key).map(|d| state_of(&book, d))
    }

    /// Stores a new deployment (revision 1); its replicas are placed at the next pass.
    pub async fn create(&self, name: String, spec: DeploymentSpec, by: &str) -> Result<DeploymentState, DeployError> {
        let now = self.clock.now_ms();
        let deployment = Deployment {
            id: Uuid::new_v4(),
            name,
            spec,
            revision: 1,
            created_by: by.to_owned(),
            created_at: now,
            updated_at: now,
        };
        self.store.insert_deployment(&deployment).await?;
        let mut book = self.write();
        book.deployments.insert(deployment.id, deployment.clone());
        Ok(state_of(&book, &deployment))
    }

    /// Gives `current` (as read from this service) the spec `spec`. A change of what the replicas run makes a new
    /// revision, which the nodes roll to; lowering `replicas` removes the slots above.
    pub async fn update(&self, current: Deployment, spec: DeploymentSpec) -> Result<DeploymentState, DeployError> {
        let revision = if current.spec.runs_differently(&spec) { current.revision + 1 } else { current.revision };
        let after = Deployment { spec, revision, updated_at: self.clock.now_ms(), ..current };
        if !self.store.update_deployment(&after).await? {
            return Err(DeployError::NotFound);
        }
        let mut book = self.write();
        let slots = after.spec.replicas;
        book.replicas.retain(|(id, slot), _| *id != after.id || *slot < slots);
        book.deployments.insert(after.id, after.clone());
        self.reindex(&mut book);
        Ok(state_of(&book, &after))
    }

    /// Removes deployment `id`; the nodes stop its replicas at their next heartbeat.
    pub async fn delete(&self, id: Uuid) -> Result<(), DeployError> {
        if !self.store.delete_deployment(id).await? {
            return Err(DeployError::NotFound);
        }
        let mut book = self.write();
        book.deployments.remove(&id);
        book.replicas.retain(|(deployment, _), _| *deployment != id);
        self.reindex(&mut book);
        Ok(())
    }

    /// What node `id` should run, for its heartbeat's answer.
    pub fn assignments(&self, node: Uuid) -> Vec<Assignment> {
        self.read().by_node.get(&node).map(|list| list.to_vec()).unwrap_or_default()
    }

    /// Takes what node `node` reports of its replicas: the state of each replica placed there, written behind when
    /// it changed. A heartbeat that changes nothing takes only the read lock.
    pub fn report(&self, node: Uuid, reports: &[ReplicaReport]) {
        let now = self.clock.now_ms();
        let changed: Vec<Replica> = {
            let book = self.read();
            let Some(slots) = book.slots.get(&node) else { return };
            slots
                .iter()
                .filter_map(|key| {
                    let revision = book.deployments.get(&key.0)?.revision;
                    let replica = book.replicas.get(key)?;
                    let mine = reports.iter().filter(|r| r.deployment_id == key.0);
                    let next = status_of(&replica.report, revision, mine, now);
                    (!next.same_as(&replica.report)).then(|| Replica { report: next, ..replica.clone() })
                })
                .collect()
        };
        if changed.is_empty() {
            return;
        }
        {
            let mut book = self.write();
            for replica in &changed {
                // Still placed as it was read: a placement in between wins.
                let current = book.replicas.get(&(replica.deployment_id, replica.slot));
                if current.is_some_and(|c| c.node_id == replica.node_id && c.placed_at == replica.placed_at) {
                    book.set(replica.clone());
                }
            }
        }
        let mut unwritten = self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for replica in changed {
            unwritten.insert((replica.deployment_id, replica.slot), replica);
        }
    }

    /// Writes the reports that changed; on failure they are kept for the next try (newer ones replace them).
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let batch: Vec<Replica> = {
            let mut unwritten = self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::take(&mut *unwritten).into_values().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.report_replicas(&batch).await {
            let mut unwritten = self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for replica in batch {
                unwritten.entry((replica.deployment_id, replica.slot)).or_insert(replica);
            }
            return Err(err);
        }
        Ok(batch.len())
    }

    /// Reads the book back from a store other routers share, for what they changed (with SQLite, which this router
    /// alone writes, there is nothing to read). A report this router holds and has not written yet stays.
    pub async fn reload(&self) -> Result<(), StoreError> {
        if self.store.shared().is_none() {
            return Ok(());
        }
        let (deployments, replicas) = self.store.deployments().await?;
        let mut fresh = Book::of(deployments, replicas);
        {
            let unwritten = self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (key, mine) in unwritten.iter() {
                if let Some(stored) = fresh.replicas.get_mut(key)
                    && stored.node_id == mine.node_id
                    && stored.placed_at == mine.placed_at
                {
                    stored.report = mine.report.clone();
                }
            }
        }
        let mut book = self.write();
        let moved = book.by_node != fresh.by_node;
        *book = fresh;
        if moved {
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Rebuilds the nodes' assignments, and wakes the agents waiting when they changed.
    fn reindex(&self, book: &mut Book) {
        let before = std::mem::take(&mut book.by_node);
        book.index();
        if book.by_node != before {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Node `node`'s assignments and their fingerprint, once they differ from `known`, or after `wait`.
    pub async fn wait_for_change(
        &self,
        node: Uuid,
        known: Option<&str>,
        wait: std::time::Duration,
    ) -> (String, Vec<Assignment>) {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let assignments = self.assignments(node);
            let fingerprint = fingerprint(&assignments);
            if known != Some(fingerprint.as_str()) {
                return (fingerprint, assignments);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return (fingerprint, assignments),
            }
        }
    }

    /// One placement pass over the fleet as `registry` knows it: stores the replicas that move, then applies them.
    /// Returns how many changed. Only the router that decides offline transitions places (with SQLite, always):
    /// on the others this does nothing.
    pub async fn place(&self, registry: &Registry) -> Result<usize, StoreError> {
        if self.store.shared().is_some() && !registry.leads() {
            return Ok(0);
        }
        let _placing = self.placing.lock().await;
        if self.read().deployments.is_empty() {
            return Ok(0);
        }
        let mut nodes = Vec::new();
        let mut others = 0;
        registry.each_node(|node| match candidate(node) {
            Some(candidate) => nodes.push(candidate),
            None => others += usize::from(node.status.is_approved()),
        });
        let now = self.clock.now_ms();
        let changes = {
            let book = self.read();
            let deployments: Vec<Deployment> = book.deployments.values().cloned().collect();
            let replicas: Vec<Replica> = book.replicas.values().cloned().collect();
            plan(&deployments, &replicas, &nodes, others, now)
        };
        if changes.is_empty() {
            return Ok(0);
        }
        self.store.place_replicas(&changes).await?;
        let mut book = self.write();
        let count = changes.len();
        for replica in changes {
            let live = book.deployments.get(&replica.deployment_id).is_some_and(|d| replica.slot < d.spec.replicas);
            if live {
                book.set(replica);
            }
        }
        self.reindex(&mut book);
        Ok(count)
    }

    /// Replicas per state, for `/metrics`.
    pub fn counts(&self) -> HashMap<ReplicaState, usize> {
        let mut counts = HashMap::new();
        for replica in self.read().replicas.values() {
            *counts.entry(replica.report.state).or_default() += 1;
        }
        counts
    }
}

/// A short digest of a node's assignments: the same on every router for the same list.
fn fingerprint(assignments: &[Assignment]) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(assignments).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&json)[..12])
}

fn state_of(book: &Book, deployment: &Deployment) -> DeploymentState {
    let replicas = (0..deployment.spec.replicas)
        .map(|slot| {
            book.replicas.get(&(deployment.id, slot)).cloned().unwrap_or_else(|| Replica {
                deployment_id: deployment.id,
                slot,
                node_id: None,
                placed_at: None,
                report: ReplicaStatus::pending("waiting to be placed", deployment.updated_at),
            })
        })
        .collect();
    DeploymentState { deployment: deployment.clone(), replicas }
}

/// A replica's state from what its node reports: the report of the deployment's current revision, or else the
/// newest one the node runs (a replica of an older revision serves while the new one starts); none: waiting for the
/// agent.
fn status_of<'a>(
    previous: &ReplicaStatus,
    revision: i64,
    reports: impl Iterator<Item = &'a ReplicaReport>,
    now: Millis,
) -> ReplicaStatus {
    let reports: Vec<&ReplicaReport> = reports.collect();
    let current = reports.iter().find(|r| r.revision == revision).or_else(|| reports.iter().max_by_key(|r| r.revision));
    let Some(report) = current else {
        return ReplicaStatus { ready_at: None, ..ReplicaStatus::pending(AWAITING_AGENT, now) };
    };
    let ready = report.state == ReplicaState::Ready && report.revision == revision;
    let ready_at = match (ready, previous.ready_at) {
        (true, Some(at)) => Some(at),
        (true, None) => Some(now),
        (false, _) => None,
    };
    ReplicaStatus {
        state: report.state,
        revision: report.revision,
        reason: report.reason.clone(),
        bytes_done: report.bytes_done,
        bytes_total: report.bytes_total,
        port: report.port,
        pid: report.pid,
        restarts: report.restarts,
        download_ms: report.download_ms,
        start_ms: report.start_ms,
        gpus: report.gpus.clone(),
        ready_at,
        updated_at: now,
    }
}

/// An approved node as placement sees it; `None` for a node waiting for approval or whose agent starts no runtime.
fn candidate(node: &Node) -> Option<Candidate> {
    let runtimes: Vec<RuntimeKind> = node
        .supported_runtimes
        .iter()
        .filter_map(|name| name.strip_prefix(MANAGED_RUNTIME_PREFIX))
        .filter_map(|name| RuntimeKind::ALL.into_iter().find(|kind| kind.as_str() == name))
        .collect();
    if runtimes.is_empty() || !node.status.is_approved() {
        return None;
    }
    let mut free_per_gpu: Vec<u64> = node
        .figures
        .as_ref()
        .and_then(|f| f.unpack())
        .and_then(|figures| {
            figures
                .gpus
                .iter()
                .map(|gpu| Some(gpu.memory_total_bytes?.saturating_sub(gpu.memory_used_bytes.unwrap_or(0))))
                .collect()
        })
        .unwrap_or_default();
    free_per_gpu.sort_unstable_by(|a, b| b.cmp(a));
    Some(Candidate {
        id: node.id,
        status: node.status,
        cordoned: node.cordoned,
        runtimes,
        tags: node.tags.clone(),
        free_per_gpu,
    })
}
