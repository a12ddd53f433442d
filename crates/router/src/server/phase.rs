//! What one connection is doing and since when: its phase word, which only the connection's own task writes (with
//! relaxed stores, on the request path: a first byte, complete headers, a wait for body bytes, an answer written),
//! and which its timer and the accept loop's eviction read; when its writes began to find the client's socket full
//! (the write timeout); and the coarse clock both are stamped with. Apart from the table of connections and the
//! connection task, since this is the one part every read, write and answer of every connection touches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Milliseconds since the server started, advanced every [`CLOCK_TICK`](super::CLOCK_TICK) and on every accept, so
/// the request path stamps phases with one relaxed load instead of reading the system clock.
///
/// Read from tokio's clock, which the connection timers sleep on too: outside tests it is the system's monotonic
/// clock, and tests that pause tokio's time (its `test-util`) move the deadlines of every connection with it.
pub(super) struct CoarseClock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl CoarseClock {
    pub(super) fn new() -> Self {
        CoarseClock { epoch: Instant::now(), now_ms: AtomicU64::new(0) }
    }

    pub(super) fn tick(&self) {
        self.now_ms.store(self.precise_ms(), Ordering::Relaxed);
    }

    fn coarse_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    pub(super) fn precise_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

/// What a connection is doing, in the low bits of its phase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Receiving a request's headers (or nothing yet, right after the accept).
    Headers = 0,
    /// Between an answer and the first byte of the next request.
    Idle = 1,
    /// Headers complete, answer not fully written.
    Busy = 2,
    /// Headers complete, and the handler waits for the client to send more of the body: the client, not the
    /// router, holds the connection up, so it can make room at the cap like one still sending headers.
    Body = 3,
}

const PHASE_BITS: u32 = 2;
const PHASE_MASK: u64 = (1 << PHASE_BITS) - 1;

/// The phase word of one connection; written only by the connection's own task.
pub(super) struct ConnState {
    word: AtomicU64,
    /// When the current request's headers were complete: a connection waiting for a body counts from then.
    request_ms: AtomicU64,
    /// When a write to the client last found its socket full, plus one; 0 while writes go through.
    write_blocked: AtomicU64,
    clock: Arc<CoarseClock>,
}

impl ConnState {
    pub(super) fn new(clock: Arc<CoarseClock>) -> Self {
        let now = clock.coarse_ms();
        let word = AtomicU64::new(pack(Phase::Headers, now));
        ConnState { word, request_ms: AtomicU64::new(now), write_blocked: AtomicU64::new(0), clock }
    }

    pub(super) fn get(&self) -> (Phase, u64) {
        let word = self.word.load(Ordering::Relaxed);
        let phase = match word & PHASE_MASK {
            0 => Phase::Headers,
            1 => Phase::Idle,
            2 => Phase::Busy,
            _ => Phase::Body,
        };
        (phase, word >> PHASE_BITS)
    }

    pub(super) fn set(&self, phase: Phase) {
        self.word.store(pack(phase, self.clock.coarse_ms()), Ordering::Relaxed);
    }

    /// A request's headers are complete: the connection is busy with it.
    pub(super) fn request_started(&self) {
        let now = self.clock.coarse_ms();
        self.request_ms.store(now, Ordering::Relaxed);
        self.word.store(pack(Phase::Busy, now), Ordering::Relaxed);
    }

    /// The handler waits for body bytes the client has not sent yet.
    pub(super) fn waiting_for_body(&self) {
        if self.word.load(Ordering::Relaxed) & PHASE_MASK == Phase::Busy as u64 {
            let since = self.request_ms.load(Ordering::Relaxed);
            self.word.store(pack(Phase::Body, since), Ordering::Relaxed);
        }
    }

    /// The handler waits on the client's say-so (a long poll the client asked for): from now on the connection
    /// counts as waiting for its client, like one whose body is slow to come.
    pub(super) fn parked(&self) {
        if self.word.load(Ordering::Relaxed) & PHASE_MASK == Phase::Busy as u64 {
            self.word.store(pack(Phase::Body, self.clock.coarse_ms()), Ordering::Relaxed);
        }
    }

    /// Body bytes arrived (or the body ended): the router works on the request again.
    pub(super) fn body_arrived(&self) {
        let word = self.word.load(Ordering::Relaxed);
        if word & PHASE_MASK == Phase::Body as u64 {
            self.word.store((word & !PHASE_MASK) | Phase::Busy as u64, Ordering::Relaxed);
        }
    }

    /// A write found the client's socket full (the client does not read): the write timeout runs from the first
    /// such write until one goes through.
    pub(super) fn write_blocked(&self) {
        if self.write_blocked.load(Ordering::Relaxed) == 0 {
            self.write_blocked.store(self.clock.coarse_ms() + 1, Ordering::Relaxed);
        }
    }

    /// A write went through.
    pub(super) fn write_progressed(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// Since when writes to the client have been blocked, if they are.
    pub(super) fn blocked_since(&self) -> Option<u64> {
        self.write_blocked.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Bytes arrived: on an idle connection they start the next request, and its header timeout.
    pub(super) fn received(&self) {
        if self.word.load(Ordering::Relaxed) & PHASE_MASK == Phase::Idle as u64 {
            self.set(Phase::Headers);
        }
    }
}

fn pack(phase: Phase, since_ms: u64) -> u64 {
    (since_ms << PHASE_BITS) | phase as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_word_keeps_phase_and_time() {
        let clock = Arc::new(CoarseClock::new());
        clock.now_ms.store(12_345, Ordering::Relaxed);
        let state = ConnState::new(clock.clone());
        assert_eq!(state.get(), (Phase::Headers, 12_345));
        clock.now_ms.store(13_000, Ordering::Relaxed);
        state.request_started();
        assert_eq!(state.get(), (Phase::Busy, 13_000));
        // Bytes during a request do not restart anything.
        state.received();
        assert_eq!(state.get().0, Phase::Busy);
        // Waiting for a body counts from the request's start, however often it waits.
        clock.now_ms.store(14_000, Ordering::Relaxed);
        state.waiting_for_body();
        assert_eq!(state.get(), (Phase::Body, 13_000));
        state.body_arrived();
        assert_eq!(state.get(), (Phase::Busy, 13_000));
        state.waiting_for_body();
        assert_eq!(state.get(), (Phase::Body, 13_000));
        state.body_arrived();
        clock.now_ms.store(20_000, Ordering::Relaxed);
        state.set(Phase::Idle);
        assert_eq!(state.get(), (Phase::Idle, 20_000));
        // A body read outside a request (there is none) changes nothing.
        state.waiting_for_body();
        assert_eq!(state.get().0, Phase::Idle);
        clock.now_ms.store(25_000, Ordering::Relaxed);
        state.received();
        assert_eq!(state.get(), (Phase::Headers, 25_000));
    }

    #[test]
    fn blocked_writes_are_timed_from_the_first() {
        let clock = Arc::new(CoarseClock::new());
        let state = ConnState::new(clock.clone());
        assert_eq!(state.blocked_since(), None);
        clock.now_ms.store(5_000, Ordering::Relaxed);
        state.write_blocked();
        clock.now_ms.store(6_000, Ordering::Relaxed);
        state.write_blocked();
        assert_eq!(state.blocked_since(), Some(5_000));
        state.write_progressed();
        assert_eq!(state.blocked_since(), None);
        // At the clock's very start too.
        clock.now_ms.store(0, Ordering::Relaxed);
        state.write_blocked();
        assert_eq!(state.blocked_since(), Some(0));
    }
}
