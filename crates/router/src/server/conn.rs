//! One client connection: its phase word (what it is doing, since when), the table of open connections that the
//! cap and the timeouts act on, and the I/O and service wrappers that keep the phase word up to date.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use crate::metrics::Metrics;

use super::tracked::{ConnService, TrackedIo};
use super::{LINGER, LINGER_MAX_BYTES, Limits, MAX_LINGERING};
use crate::tls::ClientStream;

/// Milliseconds since the server started, advanced every [`CLOCK_TICK`] and on every accept, so the request path
/// stamps phases with one relaxed load instead of reading the system clock.
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

    fn precise_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant(&self, ms: u64) -> Instant {
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
    fn new(clock: Arc<CoarseClock>) -> Self {
        let now = clock.coarse_ms();
        let word = AtomicU64::new(pack(Phase::Headers, now));
        ConnState { word, request_ms: AtomicU64::new(now), write_blocked: AtomicU64::new(0), clock }
    }

    fn get(&self) -> (Phase, u64) {
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
    fn blocked_since(&self) -> Option<u64> {
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

/// Why a connection task ends early.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// Closed to make room for a new connection at the cap.
    Evict,
    /// The server stops: close now unless a request is in flight.
    Shutdown,
}

/// One open connection, as the accept loop sees it.
struct Entry {
    state: Arc<ConnState>,
    close: Option<oneshot::Sender<Close>>,
    /// The source address it counts against, unless its source is exempt from the per-source share.
    source: Option<IpAddr>,
}

pub(super) struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    /// Open connections by source address (IPv6 by /64), for those that count against a share.
    by_source: HashMap<IpAddr, usize>,
    /// Set once the server stops: the last connection to close wakes [`Shared::drain`].
    draining: bool,
}

impl Table {
    pub(super) fn new() -> Self {
        Table { next_id: 0, open: HashMap::new(), by_source: HashMap::new(), draining: false }
    }

    fn insert(&mut self, entry: Entry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(source) = entry.source {
            *self.by_source.entry(source).or_insert(0) += 1;
        }
        self.open.insert(id, entry);
        id
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(source) = entry.source
            && let Some(count) = self.by_source.get_mut(&source)
        {
            *count -= 1;
            if *count == 0 {
                self.by_source.remove(&source);
            }
        }
        Some(entry)
    }

    fn held_by(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).copied().unwrap_or(0)
    }
}

/// What the accept loop and every connection task share.
pub(super) struct Shared {
    pub(super) limits: Limits,
    pub(super) metrics: Arc<Metrics>,
    pub(super) router: Router,
    pub(super) builder: http1::Builder,
    pub(super) clock: Arc<CoarseClock>,
    pub(super) table: Mutex<Table>,
    pub(super) drained: Notify,
    pub(super) overloaded: Bytes,
    pub(super) lingering: Arc<AtomicUsize>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serves a new connection, making room at the cap; answers it 503 and returns false when every connection is
    /// busy, or when its source holds its share of the connections and every one of them is busy.
    pub(super) fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) -> bool {
        let source = shared.limits.share_of(peer.ip());
        let mut table = shared.table();
        if let Some(source) = source
            && table.held_by(source) >= shared.limits.max_per_source
            && !shared.evict_locked(&mut table, Some(source))
        {
            drop(table);
            Metrics::inc(&shared.metrics.connections_source_capped);
            shared.refuse(stream);
            return false;
        }
        if table.open.len() >= shared.limits.max_connections && !shared.evict_locked(&mut table, None) {
            drop(table);
            shared.refuse(stream);
            return false;
        }
        let state = Arc::new(ConnState::new(shared.clock.clone()));
        let (close, closed) = oneshot::channel();
        let id = table.insert(Entry { state: state.clone(), close: Some(close), source });
        shared.metrics.connections_open.set(table.open.len() as u64);
        drop(table);
        tokio::spawn(connection(shared.clone(), id, state, stream, peer, closed));
        true
    }

    /// Closes one connection that is not busy, if there is one.
    pub(super) fn evict_one(&self) -> bool {
        let mut table = self.table();
        self.evict_locked(&mut table, None)
    }

    /// Closes the connection that has waited longest (of `source`'s, when given): those still sending headers
    /// first, then idle keep-alive ones, then those whose body is slow to come. A connection busy with a request
    /// the router works on is never closed.
    fn evict_locked(&self, table: &mut Table, source: Option<IpAddr>) -> bool {
        let victim = table
            .open
            .iter()
            .filter(|(_, entry)| source.is_none() || entry.source == source)
            .filter_map(|(id, entry)| {
                let (phase, since) = entry.state.get();
                let rank = match phase {
                    Phase::Headers => 0,
                    Phase::Idle => 1,
                    Phase::Body => 2,
                    Phase::Busy => return None,
                };
                Some((rank, since, *id))
            })
            .min();
        let Some((_, _, id)) = victim else { return false };
        if let Some(mut entry) = table.remove(id)
            && let Some(close) = entry.close.take()
        {
            let _ = close.send(Close::Evict);
        }
        self.metrics.connections_open.set(table.open.len() as u64);
        Metrics::inc(&self.metrics.connections_evicted);
        true
    }

    /// Answers `503 overloaded` and closes, after letting the client read the answer for a moment.
    fn refuse(&self, stream: TcpStream) {
        Metrics::inc(&self.metrics.connections_refused);
        if self.limits.tls.is_some() {
            // A plain-text answer means nothing to a TLS client, and a handshake is work the router has no room
            // for: the connection is closed.
            return;
        }
        let answer = self.overloaded.clone();
        if self.lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            self.lingering.fetch_sub(1, Ordering::Relaxed);
            // A fresh socket's send buffer takes the few hundred bytes at once.
            let _ = stream.try_write(&answer);
            return;
        }
        let slot = LingerSlot(self.lingering.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(LINGER, linger(stream, answer)).await;
        });
    }

    /// Forgets a closed connection.
    fn remove(&self, id: u64) {
        let mut table = self.table();
        table.remove(id);
        self.metrics.connections_open.set(table.open.len() as u64);
        if table.draining && table.open.is_empty() {
            self.drained.notify_one();
        }
    }

    /// Tells every connection the server stops and waits until all are closed.
    pub(super) async fn drain(&self) {
        {
            let mut table = self.table();
            table.draining = true;
            for entry in table.open.values_mut() {
                if let Some(close) = entry.close.take() {
                    let _ = close.send(Close::Shutdown);
                }
            }
        }
        loop {
            // A notification between the check and the wait is kept as a permit.
            if self.table().open.is_empty() {
                return;
            }
            self.drained.notified().await;
        }
    }
}

/// Counts a lingering refused connection for as long as it lives.
struct LingerSlot(Arc<AtomicUsize>);

impl Drop for LingerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes `answer`, ends the sending side, and reads what the client still sends until it closes: closing a socket
/// with unread input resets the connection, and the client could lose the answer with it.
async fn linger(mut stream: TcpStream, answer: Bytes) -> io::Result<()> {
    let mut written = 0;
    while written < answer.len() {
        stream.writable().await?;
        match stream.try_write(&answer[written..]) {
            Ok(n) => written += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await?;
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < LINGER_MAX_BYTES {
        stream.readable().await?;
        match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// What a connection's timer decides when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    HeaderTimeout,
    IdleTimeout,
    /// The client has not read the answer for the write timeout.
    WriteTimeout,
    /// Look again at this time (milliseconds on the server's clock).
    RecheckAt(u64),
}

/// Decides on a connection in `phase` since `since_ms`, whose writes have been blocked since `blocked_ms` (if they
/// are), at `now_ms`.
///
/// An idle connection is looked at again at least every header timeout, so that a request that starts on it (which
/// does not wake the timer) is held to its header timeout exactly: it started after the previous look, so its
/// deadline is still ahead at the next one. A busy one is looked at as often, and at the end of its write timeout
/// once the client stopped reading.
fn verdict(phase: Phase, since_ms: u64, blocked_ms: Option<u64>, now_ms: u64, limits: &Limits) -> Verdict {
    let header_ms = millis(limits.header_timeout);
    let idle_ms = millis(limits.idle_timeout);
    let write_ms = millis(limits.write_timeout);
    match phase {
        Phase::Busy | Phase::Body => {
            let look = now_ms.saturating_add(header_ms.min(idle_ms).min(write_ms));
            match blocked_ms {
                Some(blocked) if now_ms >= blocked.saturating_add(write_ms) => Verdict::WriteTimeout,
                Some(blocked) => Verdict::RecheckAt(look.min(blocked.saturating_add(write_ms))),
                None => Verdict::RecheckAt(look),
            }
        }
        Phase::Headers => {
            let deadline = since_ms.saturating_add(header_ms);
            if now_ms >= deadline { Verdict::HeaderTimeout } else { Verdict::RecheckAt(deadline) }
        }
        Phase::Idle => {
            let deadline = since_ms.saturating_add(idle_ms);
            if now_ms >= deadline {
                Verdict::IdleTimeout
            } else {
                Verdict::RecheckAt(deadline.min(now_ms.saturating_add(header_ms)))
            }
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Serves one connection until the client closes it, a timeout closes it, it is evicted, or the server stops.
async fn connection(
    shared: Arc<Shared>,
    id: u64,
    state: Arc<ConnState>,
    stream: TcpStream,
    peer: SocketAddr,
    mut closed: oneshot::Receiver<Close>,
) {
    let (_, accepted_ms) = state.get();
    let first_deadline = accepted_ms.saturating_add(millis(shared.limits.header_timeout));
    let stream = match &shared.limits.tls {
        None => ClientStream::Plain(stream),
        // The handshake counts toward the first request's header timeout, and the connection can be evicted
        // meanwhile like one still sending headers.
        Some(tls) => {
            let handshake =
                tokio::time::timeout_at(shared.clock.instant(first_deadline).into(), tls.acceptor().accept(stream));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(stream)) => ClientStream::Tls(Box::new(stream)),
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        shared.remove(id);
                        return;
                    }
                    Err(_) => {
                        Metrics::inc(&shared.metrics.header_timeouts);
                        shared.remove(id);
                        return;
                    }
                },
                _ = &mut closed => {
                    shared.remove(id);
                    return;
                }
            }
        }
    };
    let io = TokioIo::new(TrackedIo { stream, state: state.clone() });
    let service = ConnService { router: shared.router.clone(), state: state.clone(), peer };
    let mut conn = pin!(shared.builder.serve_connection(io, service));
    let mut timer = pin!(tokio::time::sleep_until(shared.clock.instant(first_deadline).into()));
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            served = conn.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                break;
            }
            close = &mut closed, if !closing => {
                closing = true;
                match close {
                    Ok(Close::Evict) => break,
                    Ok(Close::Shutdown) | Err(_) => {
                        if matches!(state.get().0, Phase::Headers | Phase::Idle) {
                            break;
                        }
                        // Finish the request in flight, then close.
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            () = &mut timer => {
                let (phase, since) = state.get();
                match verdict(phase, since, state.blocked_since(), shared.clock.precise_ms(), &shared.limits) {
                    Verdict::HeaderTimeout => {
                        Metrics::inc(&shared.metrics.header_timeouts);
                        break;
                    }
                    Verdict::IdleTimeout => {
                        Metrics::inc(&shared.metrics.idle_timeouts);
                        break;
                    }
                    Verdict::WriteTimeout => {
                        // Closing drops the answer, and with it the upstream request of a streamed answer.
                        Metrics::inc(&shared.metrics.write_timeouts);
                        tracing::debug!(%peer, "closing a connection whose client stopped reading its answer");
                        break;
                    }
                    Verdict::RecheckAt(at) => timer.as_mut().reset(shared.clock.instant(at).into()),
                }
            }
        }
    }
    shared.remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 32,
            max_per_source: 16,
            exempt: Vec::new(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    #[test]
    fn timeouts_follow_the_phase() {
        let limits = limits();
        // Headers: 10 s from the accept or the request's first byte.
        assert_eq!(verdict(Phase::Headers, 1_000, None, 5_000, &limits), Verdict::RecheckAt(11_000));
        assert_eq!(verdict(Phase::Headers, 1_000, None, 11_000, &limits), Verdict::HeaderTimeout);
        // Idle: closed after 60 s, looked at every 10 s meanwhile.
        assert_eq!(verdict(Phase::Idle, 1_000, None, 2_000, &limits), Verdict::RecheckAt(12_000));
        assert_eq!(verdict(Phase::Idle, 1_000, None, 55_000, &limits), Verdict::RecheckAt(61_000));
        assert_eq!(verdict(Phase::Idle, 1_000, None, 61_000, &limits), Verdict::IdleTimeout);
        // Busy, or waiting for a body: no timeout while the client reads what it is sent.
        assert_eq!(verdict(Phase::Busy, 1_000, None, 500_000, &limits), Verdict::RecheckAt(510_000));
        assert_eq!(verdict(Phase::Body, 1_000, None, 500_000, &limits), Verdict::RecheckAt(510_000));
        // A client that stopped reading: closed 30 s after the first write that found its socket full.
        assert_eq!(verdict(Phase::Busy, 1_000, Some(495_000), 500_000, &limits), Verdict::RecheckAt(510_000));
        assert_eq!(verdict(Phase::Busy, 1_000, Some(475_000), 500_000, &limits), Verdict::RecheckAt(505_000));
        assert_eq!(verdict(Phase::Busy, 1_000, Some(470_000), 500_000, &limits), Verdict::WriteTimeout);
    }

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
