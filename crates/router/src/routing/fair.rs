//! The order of the requests waiting for one model (SPEC §14, "Fair share"): which of them takes the next place that
//! frees up on a node at its `max_concurrency`.
//!
//! Waiters are grouped by tenant, first come first served within a tenant. Across tenants the order is start-time
//! fair queuing (Goyal, Vin and Cheng, 1996), on whole requests: each tenant carries a *tag*, the virtual time at
//! which its next request may start, and the waiting tenant with the smallest tag goes next (the older head wins a
//! tie). Serving a tenant's request moves the queue's virtual time up to that tenant's tag and the tag one turn
//! further, a turn being `TURN / weight`: a tenant of weight 3 gets three requests through for one of a tenant of
//! weight 1 while both wait. A tenant that starts waiting again after having none waiting has its tag raised to the
//! virtual time, so time spent idle is not banked as credit; a tenant served ahead of the others keeps its lead (its
//! tag stays ahead of the virtual time) until the others catch up, even if it stops waiting in between.
//!
//! Hence the bound of SPEC §14: a tenant's request that starts waiting has a tag no later than the virtual time, and
//! every tenant that was served has a tag at or past it, so a flood of requests from another tenant delays it by at
//! most one turn (ties go to the older head, which may be one of the flood's, once).
//!
//! Requests are whole units of service, not tokens: the router cannot know a request's cost before it is answered,
//! and a place on a node is what the queue hands out. State lasts as long as the model has waiters: once none wait,
//! nobody was held back, and the model's queue is dropped with its tags (so "lately" is the current stretch of
//! waiting, and the tags never grow without bound).
//!
//! `arrival` order is the same structure with turns that cost nothing: every tag stays 0 and the oldest head, that
//! is the oldest waiter, goes next.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::QueueOrder;
use crate::model::tenant::MAX_WEIGHT;

/// The virtual time a turn of a tenant of weight 1 takes; a turn of weight w takes `TURN / w`. Divisible by every
/// weight up to 16; the rounding of the others drifts by at most one turn in 7,000. 2^64 / TURN is 2.5e13 turns of
/// weight 1 in one stretch of waiting before the tags saturate (and then the order is first come).
const TURN: u64 = 720_720;

/// The waiting requests of one model, in the order they are to be served. `W` is what wakes a waiter.
#[derive(Debug)]
pub struct Fair<W> {
    order: QueueOrder,
    /// The tag of the latest tenant served: where a tenant that starts waiting again begins.
    virtual_time: u64,
    /// The arrival number of the next waiter; waiters are known by it.
    next: u64,
    /// Tenants with waiters, and tenants without that are ahead of the virtual time (they keep their lead).
    shares: HashMap<Arc<str>, Share<W>>,
    /// The tenants with waiters, by (tag, their oldest waiter's arrival): the first goes next.
    ready: BTreeSet<(u64, u64, Arc<str>)>,
    /// The tenants without waiters that are ahead of the virtual time, by tag: forgotten once it reaches them.
    ahead: BTreeSet<(u64, Arc<str>)>,
    waiting: usize,
}

/// One tenant's place in the fair order.
#[derive(Debug)]
struct Share<W> {
    tag: u64,
    weight: u32,
    /// Its waiters by arrival.
    waiters: BTreeMap<u64, W>,
}

impl<W> Share<W> {
    fn head(&self) -> Option<u64> {
        self.waiters.first_key_value().map(|(&id, _)| id)
    }
}

/// A waiter's number in a [`Fair`] queue.
pub type WaiterId = u64;

impl<W> Fair<W> {
    pub fn new(order: QueueOrder) -> Self {
        Fair {
            order,
            virtual_time: 0,
            next: 0,
            shares: HashMap::new(),
            ready: BTreeSet::new(),
            ahead: BTreeSet::new(),
            waiting: 0,
        }
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Adds a waiter of `tenant`, whose weight is `weight` (clamped to 1–[`MAX_WEIGHT`]); `wake` is kept with it.
    pub fn join(&mut self, tenant: &Arc<str>, weight: u32, wake: W) -> WaiterId {
        let id = self.next;
        self.next += 1;
        self.waiting += 1;
        let weight = weight.clamp(1, MAX_WEIGHT);
        let virtual_time = self.virtual_time;
        let share = self.shares.entry(tenant.clone()).or_insert_with(|| Share {
            tag: virtual_time,
            weight,
            waiters: BTreeMap::new(),
        });
        share.weight = weight;
        if share.waiters.is_empty() {
            // Back after a while with nothing waiting: no credit for the time away, and no longer merely ahead.
            self.ahead.remove(&(share.tag, tenant.clone()));
            share.tag = share.tag.max(virtual_time);
            self.ready.insert((share.tag, id, tenant.clone()));
        }
        share.waiters.insert(id, wake);
        id
    }

    /// The waiter to go next, and what wakes it.
    pub fn first(&self) -> Option<(WaiterId, &W)> {
        let (_, id, tenant) = self.ready.first()?;
        let wake = self.shares.get(tenant)?.waiters.get(id)?;
        Some((*id, wake))
    }

    /// Removes a waiter that took a place on a node: its tenant is charged a turn. Returns its `wake`, or `None` when
    /// it was not waiting.
    pub fn serve(&mut self, tenant: &str, id: WaiterId) -> Option<W> {
        self.take(tenant, id, true)
    }

    /// Removes a waiter that gave up (its wait ran out, its client left, no node can take it): its tenant is not
    /// charged. Returns its `wake`, or `None` when it was not waiting.
    pub fn leave(&mut self, tenant: &str, id: WaiterId) -> Option<W> {
        self.take(tenant, id, false)
    }

    fn take(&mut self, tenant: &str, id: WaiterId, charge: bool) -> Option<W> {
        let name = self.shares.get_key_value(tenant)?.0.clone();
        let share = self.shares.get_mut(tenant)?;
        let head = share.head()?;
        let wake = share.waiters.remove(&id)?;
        self.waiting -= 1;
        if head == id || charge {
            self.ready.remove(&(share.tag, head, name.clone()));
        }
        if charge {
            self.virtual_time = self.virtual_time.max(share.tag);
            share.tag = share.tag.saturating_add(turn(self.order, share.weight));
        }
        match share.head() {
            Some(next) if head == id || charge => {
                self.ready.insert((share.tag, next, name));
            }
            Some(_) => {}
            None if share.tag > self.virtual_time => {
                self.ahead.insert((share.tag, name));
            }
            None => {
                self.shares.remove(tenant);
            }
        }
        if charge {
            // The virtual time moved on: tenants it caught up with have no lead left to remember.
            while let Some((tag, _)) = self.ahead.first()
                && *tag <= self.virtual_time
            {
                if let Some((_, name)) = self.ahead.pop_first() {
                    self.shares.remove(&name);
                }
            }
        }
        Some(wake)
    }
}

/// The virtual time one request of a tenant of `weight` takes.
fn turn(order: QueueOrder, weight: u32) -> u64 {
    match order {
        QueueOrder::Fair => TURN / u64::from(weight.max(1)),
        QueueOrder::Arrival => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// Serves the first waiter, as a place freeing up does; returns its tenant.
    fn serve_first(fair: &mut Fair<Arc<str>>) -> Arc<str> {
        let (id, tenant) = fair.first().map(|(id, tenant)| (id, tenant.clone())).expect("someone waits");
        fair.serve(&tenant, id).expect("the first waiter");
        tenant
    }

    fn join(fair: &mut Fair<Arc<str>>, name: &str, weight: u32) -> WaiterId {
        let tenant = tenant(name);
        fair.join(&tenant, weight, tenant.clone())
    }

    #[test]
    fn a_flood_of_one_tenant_delays_another_tenants_request_by_at_most_one_turn() {
        let mut fair = Fair::new(QueueOrder::Fair);
        for _ in 0..50 {
            join(&mut fair, "a", 1);
        }
        // The flood keeps 50 waiting: each of a's served is replaced at once.
        for _ in 0..3 {
            assert_eq!(&*serve_first(&mut fair), "a");
            join(&mut fair, "a", 1);
        }
        // b sends one request at a time, the next as soon as the one before is served.
        for round in 0..20 {
            join(&mut fair, "b", 1);
            let mut turns = 0;
            while &*serve_first(&mut fair) != "b" {
                turns += 1;
                join(&mut fair, "a", 1);
            }
            assert!(turns <= 1, "round {round}: b waited {turns} turns");
        }
        assert_eq!(fair.waiting, 50);
    }

    #[test]
    fn a_single_request_goes_next_even_against_the_heaviest_flood() {
        let mut fair = Fair::new(QueueOrder::Fair);
        for _ in 0..100 {
            join(&mut fair, "a", MAX_WEIGHT);
        }
        serve_first(&mut fair);
        join(&mut fair, "b", 1);
        assert_eq!(&*serve_first(&mut fair), "b", "a was served last: its tag is ahead of b's");
    }

    #[test]
    fn backlogged_tenants_share_the_places_by_weight() {
        let mut fair = Fair::new(QueueOrder::Fair);
        for _ in 0..400 {
            join(&mut fair, "heavy", 3);
            join(&mut fair, "light", 1);
        }
        let mut served = HashMap::<String, usize>::new();
        for _ in 0..400 {
            *served.entry(serve_first(&mut fair).to_string()).or_default() += 1;
        }
        assert_eq!((served["heavy"], served["light"]), (300, 100), "3:1");
        // Out-of-range weights are clamped: 0 counts as 1, 1000 as 100.
        let mut fair = Fair::new(QueueOrder::Fair);
        for _ in 0..202 {
            join(&mut fair, "zero", 0);
            join(&mut fair, "huge", 1000);
        }
        let zero = (0..202).filter(|_| &*serve_first(&mut fair) == "zero").count();
        assert_eq!(zero, 2, "1:100");
    }

    #[test]
    fn a_tenant_back_from_idle_gets_no_credit_for_the_time_away() {
        let mut fair = Fair::new(QueueOrder::Fair);
        join(&mut fair, "b", 1);
        for _ in 0..100 {
            join(&mut fair, "a", 1);
        }
        assert_eq!(&*serve_first(&mut fair), "b");
        // a alone for 60 turns, while b has nothing waiting.
        for _ in 0..60 {
            assert_eq!(&*serve_first(&mut fair), "a");
        }
        for _ in 0..10 {
            join(&mut fair, "b", 1);
        }
        // b takes turns with a, not ten in a row for the 60 it missed.
        let order: String = (0..8).map(|_| serve_first(&mut fair).to_string()).collect();
        assert!(order == "babababa" || order == "abababab", "{order}");
    }

    #[test]
    fn a_tenant_served_ahead_keeps_its_lead_while_it_stops_waiting_then_is_forgotten() {
        let mut fair = Fair::new(QueueOrder::Fair);
        for _ in 0..3 {
            join(&mut fair, "a", 1);
        }
        join(&mut fair, "b", 1);
        join(&mut fair, "b", 1);
        join(&mut fair, "c", 1);
        // a, b, c, a, b: each tenant served in turn; a's last waiter then leaves.
        let order: String = (0..5).map(|_| serve_first(&mut fair).to_string()).collect();
        assert_eq!(order, "abcab");
        let (id, _) = fair.first().expect("a's last");
        assert!(fair.leave("a", id).is_some());
        assert!(fair.is_empty());
        // Nobody waits, but a and b, a turn ahead of c, are remembered; the virtual time has caught up with c.
        let mut remembered: Vec<&str> = fair.shares.keys().map(|name| &**name).collect();
        remembered.sort();
        assert_eq!(remembered, ["a", "b"]);
        join(&mut fair, "c", 1);
        join(&mut fair, "b", 1);
        assert_eq!(&*serve_first(&mut fair), "c", "b keeps its lead over c");
        assert_eq!(&*serve_first(&mut fair), "b");
        // The virtual time has caught up with a and c; b, just served, is a turn ahead again.
        assert_eq!(fair.shares.keys().map(|name| &**name).collect::<Vec<_>>(), ["b"]);
        assert!(fair.ready.is_empty() && fair.ahead.len() == 1, "{fair:?}");
    }

    #[test]
    fn waiters_that_leave_are_removed_and_the_next_goes_first() {
        let mut fair = Fair::new(QueueOrder::Fair);
        let a1 = join(&mut fair, "a", 1);
        let a2 = join(&mut fair, "a", 1);
        let b1 = join(&mut fair, "b", 1);
        assert_eq!(fair.first().map(|(id, _)| id), Some(a1));
        assert!(fair.leave("a", a2).is_some(), "from the middle");
        assert!(fair.leave("a", a2).is_none(), "only once");
        assert!(fair.leave("b", a1).is_none(), "under its own tenant only");
        assert_eq!(fair.first().map(|(id, _)| id), Some(a1));
        assert!(fair.leave("a", a1).is_some(), "the first");
        assert_eq!(fair.first().map(|(id, _)| id), Some(b1));
        assert!(fair.leave("b", b1).is_some());
        assert_eq!((fair.waiting, fair.first().map(|(id, _)| id)), (0, None));
        assert!(fair.shares.is_empty() && fair.ready.is_empty() && fair.ahead.is_empty(), "{fair:?}");
    }

    #[test]
    fn arrival_order_is_first_come_first_served_across_tenants() {
        let mut fair = Fair::new(QueueOrder::Arrival);
        for name in ["a", "a", "a", "b", "a", "c", "b"] {
            join(&mut fair, name, if name == "c" { 100 } else { 1 });
        }
        let order: String = (0..7).map(|_| serve_first(&mut fair).to_string()).collect();
        assert_eq!(order, "aaabacb");
        assert!(fair.shares.is_empty(), "{fair:?}");
    }
}
