//! The fleet's revisions (SPEC §12): a number that rises with every change a node's JSON shows, so that a client
//! asks "what changed since revision R" instead of downloading the fleet again.
//!
//! A revision is about the microseconds since the Unix epoch when the change was noted: the counter moves by one per
//! change and is pulled up to the clock by every offline sweep (at least once a second). Fewer than a million changes
//! a second keep it near the clock, so revisions of routers sharing a database (SPEC §11) are comparable to within
//! their clocks' agreement, and a router that restarts goes on above the revisions it gave before.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::clock::Millis;

/// The revision counter of one router.
#[derive(Debug)]
pub struct Revisions {
    last: AtomicI64,
}

impl Default for Revisions {
    /// A counter starting at 0, for tests of parts that stamp revisions.
    fn default() -> Self {
        Revisions { last: AtomicI64::new(0) }
    }
}

impl Revisions {
    /// A counter starting at the clock's `now`.
    pub fn starting_at(now: Millis) -> Self {
        Revisions { last: AtomicI64::new(at(now)) }
    }

    /// A new revision, above every one given before: the stamp of one change.
    pub fn next(&self) -> i64 {
        self.last.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The latest revision given.
    pub fn now(&self) -> i64 {
        self.last.load(Ordering::Acquire)
    }

    /// Pulls the counter up to the clock's `now` (never down).
    pub fn align(&self, now: Millis) {
        self.last.fetch_max(at(now), Ordering::AcqRel);
    }
}

/// The revision of the clock time `now`.
pub fn at(now: Millis) -> i64 {
    now.saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_rise_by_change_and_follow_the_clock_never_back() {
        let revisions = Revisions::starting_at(1_000);
        assert_eq!(revisions.now(), 1_000_000);
        assert_eq!(revisions.next(), 1_000_001);
        assert_eq!(revisions.next(), 1_000_002);
        revisions.align(2_000);
        assert_eq!(revisions.now(), 2_000_000);
        revisions.align(1_500);
        assert_eq!(revisions.next(), 2_000_001, "a clock that went back does not move revisions back");
    }
}
