//! Which node serves a request (SPEC §8, §13): candidates by model; among them, the node the request's prefix or
//! session ranks first within a load bound (`cache-aware`, in `affinity.rs`, keyed by `prefix.rs`) or the less
//! loaded of two at random (`least-loaded`); passive health with ejection (`target.rs`); the queue of requests
//! waiting for room (`queue.rs`), served in the tenants' fair order (`fair.rs`).
//!
//! The registry tells the routing table of every change that matters (a node turning online or leaving it, its ready
//! models, its address): [`Routing::update`], [`Routing::remove`]. A request finds its candidates through the table
//! by model, so selection costs O(candidates), never a scan of the fleet; the counters of a node are atomics, shared
//! by every request to it.
//!
//! Capacity: a node may have a `max_concurrency`. When every candidate for a model is at its limit, a request waits
//! in a bounded queue ([`Queue`]); when a request on a node with that model ends, the waiter whose turn it is is
//! woken: by default the first of the tenant with the least weighted service lately (SPEC §14), else the oldest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::node::Node;
use crate::revision::Revisions;

mod affinity;
mod fair;
pub mod prefix;
mod queue;
mod seen;
mod target;

pub use affinity::{Choice, Outcome, Policy};
pub use queue::{Queue, Ticket};
pub use target::{EJECT_AFTER_FAILURES, FIRST_EJECTION_MS, InFlight, MAX_EJECTION_MS, RouteFigures, Target};

/// Why no node was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoNode {
    /// No node that can take traffic has this model ready.
    UnknownModel,
    /// Nodes have it, but none can take this request now (cordoned, ejected, or all already tried).
    Unavailable,
    /// Nodes that could take it are all at their `max_concurrency`: the request may wait in the queue.
    AtCapacity,
}

/// The routing table: who can take traffic, by id and by ready model.
#[derive(Default)]
struct Table {
    /// Every node that took traffic or can; each knows the models it is listed under (none when it cannot take
    /// traffic now: its figures outlive a trip offline).
    targets: HashMap<Uuid, Arc<Target>>,
    /// Routable nodes by ready model.
    by_model: HashMap<Arc<str>, Vec<Arc<Target>>>,
}

/// Routing over the fleet: its table and its queue.
#[derive(Default)]
pub struct Routing {
    table: RwLock<Table>,
    /// The policy and its settings, set once at start (the default until then).
    choice: OnceLock<Choice>,
    queue: Arc<Queue>,
    /// Stamps the changes of the nodes' figures.
    revisions: Arc<Revisions>,
    /// The prefixes routed lately.
    seen: seen::Seen,
}

impl Routing {
    /// An empty table whose figure changes are stamped by `revisions`.
    pub fn new(revisions: Arc<Revisions>) -> Self {
        Routing {
            table: RwLock::default(),
            choice: OnceLock::new(),
            queue: Arc::default(),
            revisions,
            seen: seen::Seen::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The requests waiting for a node with room.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Takes in a node as it is now: routable (online, with its ready models) or not.
    pub fn update(&self, node: &Node) {
        if let Some(target) = self.update_table(node) {
            // It may have room for queued requests now (online again, uncordoned, a higher limit).
            target.wake_queued();
        }
    }

    /// Updates the table; returns the node's target when it is routable.
    fn update_table(&self, node: &Node) -> Option<Arc<Target>> {
        let addr = node.ip_address.parse().ok().map(|ip| SocketAddr::new(ip, node.runtime_port));
        // A cordoned node stays listed under its models (a request for them is 503, not 404) but is never picked.
        let routable = node.status == NodeStatus::Online && addr.is_some();
        let mut table = self.write();
        let target = match (table.targets.get(&node.id), addr) {
            (Some(target), Some(addr)) => {
                *target.addr.write().unwrap_or_else(|p| p.into_inner()) = addr;
                target.clone()
            }
            (Some(target), None) => target.clone(),
            // A node that cannot take traffic gets its counters only once it can.
            (None, Some(_)) if !routable => return None,
            (None, Some(addr)) => {
                let target = Arc::new(Target::new(node.id, addr, self.queue.clone(), self.revisions.clone()));
                table.targets.insert(node.id, target.clone());
                target
            }
            (None, None) => return None,
        };
        target.limit.store(node.max_concurrency.unwrap_or(0), Ordering::Relaxed);
        target.cordoned.store(node.cordoned, Ordering::Relaxed);
        let wanted: &[String] = if routable { &node.ready_models } else { &[] };
        let same = {
            let listed = target.models.read().unwrap_or_else(|p| p.into_inner());
            listed.len() == wanted.len() && listed.iter().zip(wanted).all(|(a, b)| **a == **b)
        };
        if same {
            return (routable && !node.cordoned).then_some(target);
        }
        unlist(&mut table, node.id);
        // Model names are shared by every node that has the model, not copied per node.
        let mut interned = Vec::with_capacity(wanted.len());
        for model in wanted {
            let name = match table.by_model.get_key_value(model.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(model.as_str()),
            };
            table.by_model.entry(name.clone()).or_default().push(target.clone());
            interned.push(name);
        }
        *target.models.write().unwrap_or_else(|p| p.into_inner()) = interned.into_boxed_slice();
        (routable && !node.cordoned).then_some(target)
    }

    /// Takes in the requests a node's runtime reports waiting in its own queue (SPEC §13).
    pub fn report_waiting(&self, id: Uuid, waiting: u32) {
        if let Some(target) = self.read().targets.get(&id) {
            target.waiting.store(waiting, Ordering::Relaxed);
            target.stamp();
        }
    }

    /// Forgets a deleted node.
    pub fn remove(&self, id: Uuid) {
        let mut table = self.write();
        unlist(&mut table, id);
        table.targets.remove(&id);
    }

    /// The routing figures of a node, when routing has seen it.
    pub fn figures(&self, id: Uuid, now: Millis) -> Option<RouteFigures> {
        self.read().targets.get(&id).map(|target| target.figures(now))
    }

    /// Whether some routable node has `model` ready (cordoned or not): a name routing knows.
    pub fn knows(&self, model: &str) -> bool {
        self.read().by_model.contains_key(model)
    }

    /// Every model some routable, uncordoned node has ready, in name order.
    pub fn models(&self) -> Vec<String> {
        let table = self.read();
        let mut models: Vec<String> = table
            .by_model
            .iter()
            .filter(|(_, targets)| targets.iter().any(|target| !target.is_cordoned()))
            .map(|(name, _)| name.to_string())
            .collect();
        models.sort();
        models
    }

    /// Sets the policy and its settings; the first call counts.
    pub fn set_choice(&self, choice: Choice) {
        let _ = self.choice.set(choice);
    }

    /// The policy and its settings.
    pub fn choice(&self) -> Choice {
        self.choice.get().copied().unwrap_or_default()
    }

    /// Whether a request with the prefix of `key` was routed lately (remembering it): the first request of a prefix
    /// goes where a request without one would, the next ones to the node the key ranks first.
    pub fn seen_prefix(&self, key: u64) -> bool {
        self.seen.seen(key)
    }

    /// Picks a node for `model` as [`Routing::pick_keyed`] does for a request without a prefix.
    pub fn pick(&self, model: &str, tried: &[Uuid], now: Millis) -> Result<InFlight, NoNode> {
        self.pick_keyed(model, tried, now, Affinity::None).map(|(flight, _)| flight)
    }

    /// Picks a node for `model` among those not cordoned, not ejected at `now`, not in `tried` and below their
    /// `max_concurrency`: by the key of its prefix or session under the cache-aware policy (SPEC §13), else of two
    /// chosen at random the less loaded. The pick is counted in flight until the returned guard is dropped.
    pub fn pick_keyed(
        &self,
        model: &str,
        tried: &[Uuid],
        now: Millis,
        affinity: Affinity,
    ) -> Result<(InFlight, Outcome), NoNode> {
        let table = self.read();
        let all = table.by_model.get(model).ok_or(NoNode::UnknownModel)?;
        // A node whose ejection has ended gets one trial request before any other traffic.
        let trial =
            |t: &&Arc<Target>| !tried.contains(&t.node_id) && !t.is_cordoned() && t.has_room() && t.claim_trial(now);
        if let Some(trial) = all.iter().find(trial) {
            return Ok((InFlight::start(trial.clone()), Outcome::Trial));
        }
        let choice = self.choice();
        // Another request may take the last place of the chosen node first: then choose again.
        for _ in 0..4 {
            let (target, outcome) = match (choice.policy, affinity) {
                (Policy::LeastLoaded, _) => (choose(all, tried, now)?, Outcome::LeastLoaded),
                (Policy::CacheAware, Affinity::Key(key)) => keyed(all, tried, now, key, choice.load_factor)?,
                (Policy::CacheAware, Affinity::NewPrefix) => (choose(all, tried, now)?, Outcome::NewPrefix),
                (Policy::CacheAware, Affinity::None) => (choose(all, tried, now)?, Outcome::NoPrefix),
            };
            if let Some(flight) = target.try_start() {
                return Ok((flight, outcome));
            }
        }
        Err(NoNode::AtCapacity)
    }
}

/// What a request's prefix or session asks of the cache-aware choice (SPEC §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Nothing to follow: no prefix or session (embeddings, bodies without text).
    None,
    /// A key to follow: a session's, or that of a prefix routed here before.
    Key(u64),
    /// A prefix this router has not routed lately: no node holds it yet.
    NewPrefix,
}

/// The node a key ranks first within the load bound, among those that can take a request now.
fn keyed<'a>(
    all: &'a [Arc<Target>],
    tried: &[Uuid],
    now: Millis,
    key: u64,
    load_factor: f64,
) -> Result<(&'a Arc<Target>, Outcome), NoNode> {
    let usable = |target: &Target| affinity::usable(target, tried, now);
    match affinity::choose(all, usable, key, load_factor) {
        Some(chosen) => Ok(chosen),
        None if all.iter().any(|target| usable(target)) => Err(NoNode::AtCapacity),
        None => Err(NoNode::Unavailable),
    }
}

/// Of two nodes chosen at random among those that can take a request now, the one with the lower load.
fn choose<'a>(all: &'a [Arc<Target>], tried: &[Uuid], now: Millis) -> Result<&'a Arc<Target>, NoNode> {
    let usable = |target: &&Arc<Target>| affinity::usable(target, tried, now);
    let eligible = |target: &&Arc<Target>| usable(target) && target.has_room();
    let count = all.iter().filter(eligible).count();
    let chosen = match count {
        0 if all.iter().any(|target| usable(&target)) => return Err(NoNode::AtCapacity),
        0 => return Err(NoNode::Unavailable),
        1 => all.iter().find(eligible),
        _ => {
            let a = rand::random_range(0..count);
            let mut b = rand::random_range(0..count - 1);
            if b >= a {
                b += 1;
            }
            let mut candidates = all.iter().filter(eligible);
            let (first, second) = if a < b { (a, b) } else { (b, a) };
            let x = candidates.nth(first);
            let y = candidates.nth(second - first - 1);
            // `a` was drawn first: it wins a tie, so idle nodes share sequential traffic instead of the first listed
            // taking it all.
            let (drawn, other) = if a < b { (x, y) } else { (y, x) };
            match (drawn, other) {
                (Some(drawn), Some(other)) => Some(if other.load() < drawn.load() { other } else { drawn }),
                (x, y) => x.or(y),
            }
        }
    };
    chosen.ok_or(NoNode::Unavailable)
}

fn unlist(table: &mut Table, id: Uuid) {
    let Some(target) = table.targets.get(&id) else { return };
    let models = std::mem::take(&mut *target.models.write().unwrap_or_else(|p| p.into_inner()));
    for model in models.iter() {
        if let Some(targets) = table.by_model.get_mut(model) {
            targets.retain(|target| target.node_id != id);
            if targets.is_empty() {
                table.by_model.remove(model);
            }
        }
    }
}

#[cfg(test)]
mod tests;
