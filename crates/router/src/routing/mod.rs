//! Which node serves a request (SPEC §8): candidates by model, least in flight with two random choices, passive
//! health with ejection.
//!
//! The registry tells the routing table of every change that matters (a node turning online or leaving it, its ready
//! models, its address): [`Routing::update`], [`Routing::remove`]. A request finds its candidates through the table
//! by model, so selection costs O(candidates), never a scan of the fleet; the counters of a node are atomics, shared
//! by every request to it.
//!
//! Capacity: a node may have a `max_concurrency`. When every candidate for a model is at its limit, a request waits
//! in a bounded queue ([`Queue`]) and is woken when a request on a node with that model ends; waiters of one model
//! are woken in the order they came.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use llm_router_protocol::NodeStatus;
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::node::Node;
use crate::revision::Revisions;

mod affinity;
pub mod prefix;
mod queue;

pub use affinity::{Choice, Outcome, Policy};
pub use queue::{Place, Queue};

/// Consecutive failures that eject a node from routing.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// The first ejection's length; each further one while failures continue doubles it, up to [`MAX_EJECTION_MS`].
pub const FIRST_EJECTION_MS: i64 = 5_000;
pub const MAX_EJECTION_MS: i64 = 60_000;
/// `ejected_until` while the one trial request after an ejection is under way.
const TRIAL: i64 = i64::MAX;

/// One node as routing sees it: where it is and how it is doing.
#[derive(Debug)]
pub struct Target {
    pub node_id: Uuid,
    /// What the cache-aware choice ranks it by, for every key: its id, hashed once.
    rank_seed: u64,
    /// Requests its runtime reports waiting in its own queue (SPEC §13): load this router cannot see.
    waiting: AtomicU32,
    addr: RwLock<SocketAddr>,
    in_flight: AtomicU32,
    requests_total: AtomicU64,
    failures_total: AtomicU64,
    /// Failures since the last success.
    consecutive_failures: AtomicU32,
    /// Until when it gets no request (ms since the epoch; 0: not ejected).
    ejected_until: AtomicI64,
    /// Ejections since the last success: the next one lasts `FIRST_EJECTION_MS << ejections`.
    ejections: AtomicU32,
    /// Most requests in flight at once (`max_concurrency`; 0: no limit).
    limit: AtomicU32,
    /// Cordoned by an administrator: listed under its models (they are known, the node just takes no new request).
    cordoned: AtomicBool,
    /// The models it is listed under, to wake the requests queued for them when it has room again.
    models: RwLock<Box<[Arc<str>]>>,
    queue: Arc<Queue>,
    /// The fleet revision of the latest change of its figures (SPEC §12), so that a client asking what changed
    /// learns of a request starting or ending.
    changed: AtomicI64,
    revisions: Arc<Revisions>,
}

/// The figures of a node's routing, as the node JSON shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteFigures {
    pub in_flight: u32,
    pub requests_total: u64,
    pub failures_total: u64,
    /// `None` when not ejected at `now`.
    pub ejected_until: Option<Millis>,
    /// The fleet revision of their latest change.
    pub changed: i64,
}

impl Target {
    fn new(node_id: Uuid, addr: SocketAddr, queue: Arc<Queue>, revisions: Arc<Revisions>) -> Self {
        Target {
            node_id,
            rank_seed: affinity::rank_seed(node_id),
            waiting: AtomicU32::new(0),
            addr: RwLock::new(addr),
            in_flight: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicI64::new(0),
            ejections: AtomicU32::new(0),
            limit: AtomicU32::new(0),
            cordoned: AtomicBool::new(false),
            models: RwLock::new(Box::new([])),
            queue,
            changed: AtomicI64::new(revisions.next()),
            revisions,
        }
    }

    /// Notes that its figures changed.
    fn stamp(&self) {
        self.changed.store(self.revisions.next(), Ordering::Release);
    }

    /// Whether it can take one more request under its `max_concurrency`.
    fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.in_flight() < limit
    }

    /// Counts a request in flight, unless that would exceed its `max_concurrency` (another request may have taken
    /// the last place since [`Target::has_room`]).
    fn try_start(self: &Arc<Self>) -> Option<InFlight> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return Some(InFlight::start(self.clone()));
        }
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).ok()?;
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        self.stamp();
        Some(InFlight(self.clone()))
    }

    /// Wakes requests queued for its models: it has room again.
    fn wake_queued(&self, everyone: bool) {
        if self.queue.is_empty() {
            return;
        }
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        for model in models.iter() {
            if let Some(waker) = self.queue.existing_waker(model) {
                if everyone { waker.notify_waiters() } else { waker.notify_one() }
            }
        }
    }

    /// Where requests to this node go: `http://{ip}:{runtime_port}`.
    pub fn addr(&self) -> SocketAddr {
        *self.addr.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Its load as the choice weighs it: requests in flight through this router, and those its runtime reports
    /// waiting.
    fn load(&self) -> u32 {
        self.in_flight().saturating_add(self.waiting.load(Ordering::Relaxed))
    }

    fn ejected_at(&self, now: Millis) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    fn is_cordoned(&self) -> bool {
        self.cordoned.load(Ordering::Relaxed)
    }

    /// Claims the one trial request of a node whose ejection has ended (half-open): true for the one caller that
    /// gets it. Until the trial's outcome the node counts as ejected for everyone else.
    fn claim_trial(&self, now: Millis) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0
            && until <= now
            && self.ejected_until.compare_exchange(until, TRIAL, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// An answer came back (the upstream answered with something other than 502/503/504): the node is healthy, and
    /// an ejected one is restored.
    pub fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        if self.ejected_until.swap(0, Ordering::Relaxed) != 0 {
            self.stamp();
        }
    }

    /// A failure (connection refused or reset, timeout, 502/503/504, a stream cut): ejects the node after
    /// [`EJECT_AFTER_FAILURES`] in a row, and again at once when the trial after an ejection fails. Returns whether
    /// this failure ejected it.
    pub fn failed(&self, now: Millis) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        self.stamp();
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let ejections = self.ejections.load(Ordering::Relaxed);
        // After an ejection the next request is a trial (half-open): its failure ejects again, for longer.
        if failures < EJECT_AFTER_FAILURES && ejections == 0 {
            return false;
        }
        let length = (FIRST_EJECTION_MS << ejections.min(16)).min(MAX_EJECTION_MS);
        self.ejected_until.store(now + length, Ordering::Relaxed);
        self.ejections.store(ejections.saturating_add(1), Ordering::Relaxed);
        self.stamp();
        true
    }

    pub fn figures(&self, now: Millis) -> RouteFigures {
        let until = self.ejected_until.load(Ordering::Relaxed);
        RouteFigures {
            in_flight: self.in_flight(),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            failures_total: self.failures_total.load(Ordering::Relaxed),
            ejected_until: (until > now && until != TRIAL).then_some(until),
            changed: self.changed.load(Ordering::Acquire),
        }
    }
}

/// A request in flight on a node, counted until it is dropped: when the answer's body has ended or the client left.
#[derive(Debug)]
pub struct InFlight(Arc<Target>);

impl InFlight {
    fn start(target: Arc<Target>) -> Self {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        target.requests_total.fetch_add(1, Ordering::Relaxed);
        target.stamp();
        InFlight(target)
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.stamp();
        if self.0.limit.load(Ordering::Relaxed) != 0 {
            self.0.wake_queued(false);
        }
    }
}

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
}

impl Routing {
    /// An empty table whose figure changes are stamped by `revisions`.
    pub fn new(revisions: Arc<Revisions>) -> Self {
        Routing { table: RwLock::default(), choice: OnceLock::new(), queue: Arc::default(), revisions }
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
            target.wake_queued(true);
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

    /// Picks a node for `model` as [`Routing::pick_keyed`] does for a request without a prefix.
    pub fn pick(&self, model: &str, tried: &[Uuid], now: Millis) -> Result<InFlight, NoNode> {
        self.pick_keyed(model, tried, now, None).map(|(flight, _)| flight)
    }

    /// Picks a node for `model` among those not cordoned, not ejected at `now`, not in `tried` and below their
    /// `max_concurrency`: by the key of its prefix or session under the cache-aware policy (SPEC §13), else of two
    /// chosen at random the less loaded. The pick is counted in flight until the returned guard is dropped.
    pub fn pick_keyed(
        &self,
        model: &str,
        tried: &[Uuid],
        now: Millis,
        key: Option<u64>,
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
        let key = key.filter(|_| choice.policy == Policy::CacheAware);
        // Another request may take the last place of the chosen node first: then choose again.
        for _ in 0..4 {
            let (target, outcome) = match key {
                Some(key) => keyed(all, tried, now, key, choice.load_factor)?,
                None => {
                    let outcome =
                        if choice.policy == Policy::LeastLoaded { Outcome::LeastLoaded } else { Outcome::NoPrefix };
                    (choose(all, tried, now)?, outcome)
                }
            };
            if let Some(flight) = target.try_start() {
                return Ok((flight, outcome));
            }
        }
        Err(NoNode::AtCapacity)
    }
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
            match (x, y) {
                (Some(x), Some(y)) => Some(if y.load() < x.load() { y } else { x }),
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
