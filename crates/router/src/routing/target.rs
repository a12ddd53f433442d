//! One node as routing sees it (SPEC §8, §13): its address, its requests in flight and in its runtime's queue, its
//! limit, and passive health with ejection; and the guard that counts a request in flight.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use super::affinity;
use super::queue::Queue;
use crate::clock::Millis;
use crate::revision::Revisions;

/// Consecutive failures that eject a node from routing.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// The first ejection's length; each further one while failures continue doubles it, up to [`MAX_EJECTION_MS`].
pub const FIRST_EJECTION_MS: i64 = 5_000;
pub const MAX_EJECTION_MS: i64 = 60_000;
/// `ejected_until` while the one trial request after an ejection is under way.
pub(super) const TRIAL: i64 = i64::MAX;

/// One node as routing sees it: where it is and how it is doing.
#[derive(Debug)]
pub struct Target {
    pub node_id: Uuid,
    /// What the cache-aware choice ranks it by, for every key: its id, hashed once.
    pub(super) rank_seed: u64,
    /// Requests its runtime reports waiting in its own queue (SPEC §13): load this router cannot see.
    pub(super) waiting: AtomicU32,
    pub(super) addr: RwLock<SocketAddr>,
    pub(super) in_flight: AtomicU32,
    pub(super) requests_total: AtomicU64,
    pub(super) failures_total: AtomicU64,
    /// Failures since the last success.
    pub(super) consecutive_failures: AtomicU32,
    /// Until when it gets no request (ms since the epoch; 0: not ejected).
    pub(super) ejected_until: AtomicI64,
    /// Ejections since the last success: the next one lasts `FIRST_EJECTION_MS << ejections`.
    pub(super) ejections: AtomicU32,
    /// Most requests in flight at once (`max_concurrency`; 0: no limit).
    pub(super) limit: AtomicU32,
    /// Cordoned by an administrator: listed under its models (they are known, the node just takes no new request).
    pub(super) cordoned: AtomicBool,
    /// The models it is listed under, to wake the requests queued for them when it has room again.
    pub(super) models: RwLock<Box<[Arc<str>]>>,
    pub(super) queue: Arc<Queue>,
    /// The fleet revision of the latest change of its figures (SPEC §12), so that a client asking what changed
    /// learns of a request starting or ending.
    pub(super) changed: AtomicI64,
    pub(super) revisions: Arc<Revisions>,
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
    pub(super) fn new(node_id: Uuid, addr: SocketAddr, queue: Arc<Queue>, revisions: Arc<Revisions>) -> Self {
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
    pub(super) fn stamp(&self) {
        self.changed.store(self.revisions.next(), Ordering::Release);
    }

    /// Whether it can take one more request under its `max_concurrency`.
    pub(super) fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.in_flight() < limit
    }

    /// Counts a request in flight, unless that would exceed its `max_concurrency` (another request may have taken
    /// the last place since [`Target::has_room`]).
    pub(super) fn try_start(self: &Arc<Self>) -> Option<InFlight> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return Some(InFlight::start(self.clone()));
        }
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).ok()?;
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        self.stamp();
        Some(InFlight(self.clone()))
    }

    /// Wakes the first request queued for each of its models: it has room again. Each waiter that takes a place
    /// wakes the next, so a node with several free places fills them all.
    pub(super) fn wake_queued(&self) {
        // Pairs with the fence of a request joining the queue (`Queue::join`): either this sees it waiting, or its
        // first look sees the room.
        fence(Ordering::SeqCst);
        if self.queue.is_empty() {
            return;
        }
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        for model in models.iter() {
            self.queue.wake_first(model);
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
    pub(super) fn load(&self) -> u32 {
        self.in_flight().saturating_add(self.waiting.load(Ordering::Relaxed))
    }

    pub(super) fn ejected_at(&self, now: Millis) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    pub(super) fn is_cordoned(&self) -> bool {
        self.cordoned.load(Ordering::Relaxed)
    }

    /// Claims the one trial request of a node whose ejection has ended (half-open): true for the one caller that
    /// gets it. Until the trial's outcome the node counts as ejected for everyone else.
    pub(super) fn claim_trial(&self, now: Millis) -> bool {
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
    pub(super) fn start(target: Arc<Target>) -> Self {
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
            self.0.wake_queued();
        }
    }
}
