//! The memory budget of request bodies (`--max-body-memory-mb`): every body the router reads whole counts against
//! one budget for as long as its bytes are held, so the bytes of bodies in memory at once are bounded for the whole
//! router, not only per request. A body that would pass the budget is refused at once (its client is told to come
//! back); nothing waits for room, so a burst of large bodies never queues up memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is kept in units of this many bytes (a semaphore's permits are counted in `u32`).
const UNIT: usize = 1024;

/// The bytes of request bodies the router may hold at once.
pub struct BodyBudget {
    units: Arc<Semaphore>,
    total_units: usize,
}

/// Bytes of the budget held for one body; given back when dropped.
pub struct BodyLease {
    permit: Option<OwnedSemaphorePermit>,
    units: usize,
}

impl BodyBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: usize) -> Self {
        let total_units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget { units: Arc::new(Semaphore::new(total_units)), total_units }
    }

    /// A lease of `bytes`, or `None` when the budget has no room for them now.
    pub fn take(&self, bytes: usize) -> Option<BodyLease> {
        let mut lease = BodyLease { permit: None, units: 0 };
        self.grow(&mut lease, bytes).then_some(lease)
    }

    /// Grows `lease` to cover `bytes` in all; `false` (the lease unchanged) when the budget has no room.
    pub fn grow(&self, lease: &mut BodyLease, bytes: usize) -> bool {
        let wanted = bytes.div_ceil(UNIT);
        if wanted <= lease.units {
            return true;
        }
        let more = u32::try_from(wanted - lease.units).unwrap_or(u32::MAX);
        let Ok(permit) = self.units.clone().try_acquire_many_owned(more) else { return false };
        lease.units = wanted;
        match &mut lease.permit {
            Some(held) => held.merge(permit),
            None => lease.permit = Some(permit),
        }
        true
    }

    /// Bytes held by bodies now.
    pub fn in_use(&self) -> usize {
        (self.total_units - self.units.available_permits()) * UNIT
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.total_units * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_bounded_in_total_and_given_back_when_dropped() {
        let budget = BodyBudget::new(100 * UNIT);
        let first = budget.take(60 * UNIT).expect("room for the first");
        assert_eq!(budget.in_use(), 60 * UNIT);
        assert!(budget.take(41 * UNIT).is_none(), "over the budget");
        let mut second = budget.take(40 * UNIT).expect("exactly the rest");
        assert!(!budget.grow(&mut second, 41 * UNIT), "no room to grow");
        drop(first);
        assert_eq!(budget.in_use(), 40 * UNIT);
        assert!(budget.grow(&mut second, 90 * UNIT));
        assert!(budget.grow(&mut second, 10 * UNIT), "a lease never shrinks by growing");
        assert_eq!(budget.in_use(), 90 * UNIT);
        drop(second);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn bytes_are_counted_in_whole_units() {
        let budget = BodyBudget::new(2 * UNIT);
        let lease = budget.take(1).expect("one byte");
        assert_eq!(budget.in_use(), UNIT);
        assert!(budget.take(UNIT + 1).is_none());
        drop(lease);
        let empty = budget.take(0).expect("an empty body");
        assert_eq!(budget.in_use(), 0);
        drop(empty);
        assert_eq!(budget.total(), 2 * UNIT);
    }
}
