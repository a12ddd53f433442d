//! The queue of requests waiting for a node with room (SPEC §8, §14): how many wait, in which order each model's
//! waiters are served (`fair.rs`), and the hand-off of a place that frees up to the one waiter whose turn it is.
//!
//! A waiter holds a [`Ticket`]: its place in its model's order and a waker of its own. Only the waiter first in that
//! order looks for a node. When a place frees up on a node (a request on it ends; the node comes back, is uncordoned
//! or gets a higher limit), the first waiter of each of the node's models is woken, and no other. A waiter that takes
//! a place leaves the order, its tenant charged a turn, and wakes the next first one, for whom there may be room as
//! well; a waiter that looks and finds every node full (a request that was not queued took the place first) stays
//! first. The waker keeps a wake-up that comes while nobody waits on it, so a place that frees while the first waiter
//! is between two looks is not lost: its next wait ends at once. A waiter that gives up (its wait ran out, its client
//! left) drops its ticket, which takes it out of the order, and wakes the next first one if it was first.
//!
//! One case keeps a place idle for a while: a retried request that is first but may not use the node with room (it
//! failed there) holds the others back until a place frees up on another node, which, those being full, is the next
//! request on them to end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::fair::{Fair, WaiterId};
use crate::config::QueueOrder;
use crate::model::tenant::Tenant;

/// Requests waiting for a node with room, by model, each model's in the order they are to be served.
#[derive(Default)]
pub struct Queue {
    waiting: AtomicUsize,
    /// Set once at start; fair until then.
    order: OnceLock<QueueOrder>,
    /// Models with waiters, and their order; a model's entry goes when its last waiter does.
    models: Mutex<HashMap<Arc<str>, Fair<Arc<Notify>>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("waiting", &self.len()).finish_non_exhaustive()
    }
}

impl Queue {
    /// Sets the order waiters are served in; the first call counts.
    pub fn set_order(&self, order: QueueOrder) {
        let _ = self.order.set(order);
    }

    /// The order waiters are served in.
    pub fn order(&self) -> QueueOrder {
        self.order.get().copied().unwrap_or_default()
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn models(&self) -> MutexGuard<'_, HashMap<Arc<str>, Fair<Arc<Notify>>>> {
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests wait for `model`; free of any lock while none waits at all.
    pub fn has_waiters(&self, model: &str) -> bool {
        !self.is_empty() && self.models().contains_key(model)
    }

    /// Takes a place in `model`'s queue for a request of `tenant`, unless `max` requests already wait in all.
    pub fn join(&self, model: &str, tenant: &Tenant, max: usize) -> Option<Ticket<'_>> {
        self.waiting.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
        let wake = Arc::new(Notify::new());
        let (model, id) = {
            let mut models = self.models();
            let model = match models.get_key_value(model) {
                Some((name, _)) => name.clone(),
                None => Arc::from(model),
            };
            let fair = models.entry(model.clone()).or_insert_with(|| Fair::new(self.order()));
            (model, fair.join(&tenant.id, tenant.weight, wake.clone()))
        };
        // Pairs with the fence of a request that ends (`Target::wake_queued`): either the waiter's first look sees
        // the place that request freed, or the request sees the waiter and wakes the first one.
        fence(Ordering::SeqCst);
        Some(Ticket { queue: self, model, tenant: tenant.id.clone(), id, wake, served: false })
    }

    /// Wakes the first waiter for `model`: a node with it may have room.
    pub(super) fn wake_first(&self, model: &str) {
        if let Some((_, wake)) = self.models().get(model).and_then(Fair::first) {
            wake.notify_one();
        }
    }

    /// Takes a waiter out of its model's order; wakes the next first one when it was first or took a place (there may
    /// be room for the next one too).
    fn remove(&self, ticket: &Ticket<'_>) {
        let mut models = self.models();
        let Some(fair) = models.get_mut(&ticket.model) else { return };
        let was_first = fair.first().is_some_and(|(id, _)| id == ticket.id);
        if ticket.served {
            fair.serve(&ticket.tenant, ticket.id);
        } else {
            fair.leave(&ticket.tenant, ticket.id);
        }
        if fair.is_empty() {
            // Nobody is held back any more: the model's order starts afresh next time.
            models.remove(&ticket.model);
        } else if (was_first || ticket.served)
            && let Some((_, next)) = fair.first()
        {
            next.notify_one();
        }
    }
}

/// A request's place in the [`Queue`], given up when dropped.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a Queue,
    model: Arc<str>,
    tenant: Arc<str>,
    id: WaiterId,
    wake: Arc<Notify>,
    /// It took a place on a node: its tenant is charged a turn as it leaves.
    served: bool,
}

impl Ticket<'_> {
    /// Whether it is this request's turn: it is first in its model's order.
    pub fn is_first(&self) -> bool {
        let models = self.queue.models();
        models.get(&self.model).and_then(Fair::first).is_some_and(|(id, _)| id == self.id)
    }

    /// Completes when this request may have its turn: it became first, or a place freed up while it was first
    /// (also when that happened before this call).
    pub fn woken(&self) -> Notified<'_> {
        self.wake.notified()
    }

    /// The request took a place on a node: it leaves the queue, its tenant charged a turn, and the next one is woken.
    pub fn served(mut self) {
        self.served = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.remove(self);
        self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use llm_router_protocol::NodeStatus;
    use uuid::Uuid;

    use super::*;
    use crate::model::node::Node;
    use crate::routing::{InFlight, NoNode, Routing};

    fn tenant(name: &str) -> Tenant {
        Tenant { id: Arc::from(name), name: Arc::from(name), weight: 1 }
    }

    /// A routing table with one node serving `m`, at most `limit` requests at once.
    fn limited(limit: u32) -> Routing {
        let routing = Routing::default();
        let node = Node {
            id: Uuid::from_u128(1),
            status: NodeStatus::Online,
            ready_models: vec!["m".to_owned()],
            max_concurrency: Some(limit),
            ..Node::example()
        };
        routing.update(&node);
        routing
    }

    fn woken(ticket: &Ticket<'_>) -> bool {
        ticket.woken().now_or_never().is_some()
    }

    /// What a queued request does when woken: looks for a node if it is first, and leaves served if it got one.
    fn look<'a>(routing: &Routing, ticket: Ticket<'a>) -> Result<InFlight, (Ticket<'a>, Option<NoNode>)> {
        if !ticket.is_first() {
            return Err((ticket, None));
        }
        match routing.pick("m", &[], 0) {
            Ok(flight) => {
                ticket.served();
                Ok(flight)
            }
            Err(no) => Err((ticket, Some(no))),
        }
    }

    #[test]
    fn a_freed_place_wakes_only_the_waiter_whose_turn_it_is_who_stays_first_until_it_gets_one() {
        let routing = limited(1);
        let queue = routing.queue();
        let held = routing.pick("m", &[], 0).expect("the one place");
        let a1 = queue.join("m", &tenant("a"), 10).expect("a place in the queue");
        let a2 = queue.join("m", &tenant("a"), 10).expect("a place in the queue");
        assert!(a1.is_first() && !a2.is_first(), "first come within a tenant");
        assert!(!woken(&a1) && !woken(&a2), "nothing freed yet");

        // The place frees up: a1's turn. It takes the place; its tenant is charged.
        drop(held);
        assert!(woken(&a1) && !woken(&a2));
        let held = look(&routing, a1).expect("a1 gets the place");
        assert!(woken(&a2), "a2 is first now, woken to look: there may be room for it too");
        let (a2, no) = look(&routing, a2).expect_err("there is not");
        assert_eq!(no, Some(NoNode::AtCapacity));

        // b starts waiting after a2, but a was served last: b goes first.
        let b1 = queue.join("m", &tenant("b"), 10).expect("a place in the queue");
        assert!(b1.is_first() && !a2.is_first());
        drop(held);
        assert!(woken(&b1) && !woken(&a2), "only the waiter whose turn it is");

        // A request that was not queued takes the place before b1 looks: b1 finds none and stays first.
        let barged = routing.pick("m", &[], 0).expect("the freed place");
        let (b1, no) = look(&routing, b1).expect_err("full again");
        assert_eq!(no, Some(NoNode::AtCapacity));
        assert!(b1.is_first());
        drop(barged);
        assert!(woken(&b1), "the next place wakes it again");
        // A place that frees while b1 is between two looks is not lost: the wake-up waits for its next wait.
        let held = routing.pick("m", &[], 0).expect("taken");
        drop(held);
        let b1_next = b1.woken();
        assert!(b1_next.now_or_never().is_some());

        // b1 gives up (its client left): a2 is first, and woken to look.
        drop(b1);
        assert!(a2.is_first() && woken(&a2));
        assert_eq!(queue.len(), 1);
        let held = look(&routing, a2).expect("a2 gets the place");
        assert!(queue.is_empty() && !queue.has_waiters("m"));
        assert!(queue.models().is_empty(), "nothing is left of the waiters");
        drop(held);
    }

    #[test]
    fn a_waiter_that_takes_a_place_wakes_the_next_so_every_free_place_is_filled() {
        let routing = limited(3);
        let queue = routing.queue();
        let held: Vec<InFlight> = (0..3).map(|_| routing.pick("m", &[], 0).expect("a place")).collect();
        let tickets: Vec<Ticket<'_>> = (0..3).map(|_| queue.join("m", &tenant("a"), 10).expect("queued")).collect();
        let mut tickets = tickets.into_iter();
        let (first, second, third) =
            (tickets.next().expect("1"), tickets.next().expect("2"), tickets.next().expect("3"));
        // The node gets a higher limit... here, two requests end at once; only the first waiter is woken.
        drop(held);
        assert!(woken(&first) && !woken(&second) && !woken(&third));
        let _one = look(&routing, first).expect("a place");
        assert!(woken(&second) && !woken(&third), "the first one served wakes the next");
        let _two = look(&routing, second).expect("a place");
        assert!(woken(&third));
        let _three = look(&routing, third).expect("a place");
        assert!(queue.is_empty());
    }

    #[test]
    fn the_queue_holds_at_most_max_and_each_model_keeps_its_own_order() {
        let routing = limited(1);
        let queue = routing.queue();
        let m = queue.join("m", &tenant("a"), 2).expect("first");
        let other = queue.join("other", &tenant("a"), 2).expect("second");
        assert!(queue.join("m", &tenant("b"), 2).is_none(), "two wait in all");
        assert!(m.is_first() && other.is_first(), "one order per model");
        assert!(queue.has_waiters("m") && queue.has_waiters("other") && !queue.has_waiters("third"));
        drop(other);
        assert!(!queue.has_waiters("other"));
        assert!(queue.join("m", &tenant("b"), 2).is_some(), "room again");
    }

    #[test]
    fn in_arrival_order_the_oldest_waiter_goes_next_whoever_it_belongs_to() {
        let routing = limited(1);
        let queue = routing.queue();
        queue.set_order(QueueOrder::Arrival);
        let held = routing.pick("m", &[], 0).expect("the one place");
        let a1 = queue.join("m", &tenant("a"), 10).expect("queued");
        let a2 = queue.join("m", &tenant("a"), 10).expect("queued");
        drop(held);
        let held = look(&routing, a1).expect("a1's turn");
        let b1 = queue.join("m", &tenant("b"), 10).expect("queued");
        assert!(a2.is_first() && !b1.is_first(), "a2 came first");
        drop((held, a2, b1));
    }
}
