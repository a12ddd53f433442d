//! The pending cap's count (SPEC §9): pending nodes, kept in step with every change to or from `pending` so the cap
//! costs no scan, and the registrations admitted under it and not yet settled.

use std::sync::atomic::{AtomicUsize, Ordering};

use llm_router_protocol::NodeStatus;

/// Pending nodes and reserved places.
#[derive(Debug, Default)]
pub(super) struct PendingCount {
    pending: AtomicUsize,
    reserved: AtomicUsize,
}

impl PendingCount {
    /// Keeps the count in step with a node's change of status from `from` to `to`; called under the node's lock, so
    /// a change applied twice (by this router and by the reading of its own write back from a shared database)
    /// counts once. A node that goes is counted as going `offline`.
    pub(super) fn moved(&self, from: NodeStatus, to: NodeStatus) {
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

    /// Counts a node added with `status`.
    pub(super) fn added(&self, status: NodeStatus) {
        if status == NodeStatus::Pending {
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pending nodes now.
    pub(super) fn len(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Admits one registration that may add a pending node while fewer than `cap` are pending or admitted (`cap` 0:
    /// no cap); `None` when the cap is reached. Hold the reservation until the registration is settled.
    pub(super) fn reserve(&self, cap: u64) -> Option<PendingReservation<'_>> {
        let reservation = PendingReservation(&self.reserved);
        let reserved = self.reserved.fetch_add(1, Ordering::AcqRel) + 1;
        // A registration that committed and still holds its reservation counts twice for a moment: the cap may
        // refuse one too many at its edge, never admit one too many.
        let taken = self.pending.load(Ordering::Acquire) + reserved;
        (cap == 0 || u64::try_from(taken).unwrap_or(u64::MAX) <= cap).then_some(reservation)
    }
}

/// A place under the pending cap, held by a registration in progress; given back when dropped.
pub struct PendingReservation<'a>(&'a AtomicUsize);

impl Drop for PendingReservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
