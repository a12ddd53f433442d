//! The router's own HTTP/1.1 accept loop (SPEC §9 "Bounded work for strangers"): every connection is bounded in
//! time and in number, so idle or half-open sockets from strangers can neither exhaust the open-file limit nor keep a
//! new client from being served.
//!
//! - **Header timeout.** A connection has `header_timeout` to send a request's complete headers, counted from the
//!   accept for the first request and from its first byte for every later one.
//! - **Idle timeout.** A keep-alive connection that sends nothing for `idle_timeout` after an answer is closed.
//! - **Cap.** At most `max_connections` are open. A new connection at the cap closes one that is not busy with a
//!   request, and is served at once: first those still sending headers, then idle keep-alive ones, the longest
//!   waiting first. Only when every connection is busy (headers complete, answer not fully written) is the new one
//!   answered `503 overloaded` and closed.
//!
//! hyper's own `header_read_timeout` is off: in hyper 1.x it is re-armed as soon as a keep-alive connection goes idle,
//! so it would also close idle connections after the header timeout and make a longer idle timeout impossible.
//! Instead each connection publishes its phase in one atomic word (phase and since when, on a coarse clock), written
//! only by its own task: a relaxed store when a request's first byte arrives, when its headers are complete and
//! when its answer has been written. A per-connection timer reads the word when it fires, and the accept loop reads
//! all words only when a new connection arrives at the cap.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, header};
use axum::response::IntoResponse;
use axum::routing::future::RouteFuture;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, oneshot};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Open files kept for everything that is not a client connection, whatever the limit: the listener, the runtime,
/// the database (writer, readers, checkpointer, each with its WAL and shared-memory files), logs, and the
/// connections being answered 503.
const FIXED_RESERVE: u64 = 64;

/// One more open file in this many is kept for the reachability probe's connections.
const PROBE_RESERVE_DIVISOR: u64 = 16;

/// The smallest cap the default derivation gives, however low the open-file limit.
pub const MIN_CONNECTIONS: usize = 16;

/// The open-file limit assumed when the kernel reports none.
const UNLIMITED_OPEN_FILES: u64 = 1 << 20;

/// How often the coarse clock that stamps connection phases advances. Timeouts fire at most this much early.
const CLOCK_TICK: Duration = Duration::from_millis(100);

/// Back-off after an accept error, doubling up to the maximum while errors repeat.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A repeated warning (accept errors, refusals) is logged at most once per this period, with a count of the rest.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Connections answered 503 that may wait for the client to read the answer; beyond this they are closed at once.
const MAX_LINGERING: usize = 32;

/// How long a connection answered 503 may wait for the client to read the answer and close.
const LINGER: Duration = Duration::from_secs(2);

/// Bytes of a refused client's request read and dropped while lingering.
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// Connections the kernel may queue for the accept loop (capped by `net.core.somaxconn`). The default of 128 is
/// overrun by a burst of connects, and every connect beyond it waits for a SYN retransmission, one second or more.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener on `addr` with a deep accept queue.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restart may reuse the port while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The bounds of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The open-file limits of this process around [`raise_open_file_limit`]; `None` is unlimited.
#[derive(Debug, Clone)]
pub struct OpenFileLimit {
    pub soft_before: Option<u64>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
    /// Why the soft limit could not be raised, if it could not.
    pub error: Option<String>,
}

/// Raises the soft open-file limit to the hard one, so the connection cap can be as high as the system allows.
pub fn raise_open_file_limit() -> OpenFileLimit {
    let limit = getrlimit(Resource::Nofile);
    let mut result =
        OpenFileLimit { soft_before: limit.current, soft: limit.current, hard: limit.maximum, error: None };
    // An unlimited hard limit cannot be the soft one for open files; the kernel's usual ceiling can.
    let target = limit.maximum.unwrap_or(UNLIMITED_OPEN_FILES);
    if limit.current.is_some_and(|current| current < target) {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum }) {
            Ok(()) => result.soft = Some(target),
            Err(err) => result.error = Some(err.to_string()),
        }
    }
    result
}

/// The connection cap: `configured`, or else derived from the current soft open-file limit.
pub fn connection_cap(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| default_max_connections(getrlimit(Resource::Nofile).current))
}

/// The default cap for a soft open-file limit (`None`: unlimited): the limit less a reserve of 64 files plus one in
/// 16 for the database, the probe client and logs; at least [`MIN_CONNECTIONS`].
pub fn default_max_connections(open_file_limit: Option<u64>) -> usize {
    let limit = open_file_limit.unwrap_or(UNLIMITED_OPEN_FILES);
    let reserve = FIXED_RESERVE + limit / PROBE_RESERVE_DIVISOR;
    usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX).max(MIN_CONNECTIONS)
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops accepting, closes the
/// connections that are not busy, lets the requests in flight finish, and returns once every connection is closed.
/// Handlers see the peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let overloaded = overloaded_answer().await;
    let mut builder = http1::Builder::new();
    // Header and idle timeouts are the connection task's, see the module documentation.
    builder.header_read_timeout(None).keep_alive(true);
    metrics.connections_max.set(limits.max_connections as u64);
    let shared = Arc::new(Shared {
        limits,
        metrics,
        router,
        builder,
        clock: Arc::new(CoarseClock::new()),
        table: Mutex::new(Table { next_id: 0, open: HashMap::new(), draining: false }),
        drained: Notify::new(),
        overloaded,
        lingering: Arc::new(AtomicUsize::new(0)),
    });
    let mut shutdown = pin!(shutdown);
    let mut ticker = tokio::time::interval(CLOCK_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut accept_errors = RateLimitedLog::default();
    let mut refusals = RateLimitedLog::default();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = ticker.tick() => shared.clock.tick(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    shared.clock.tick();
                    if !Shared::admit(&shared, stream, peer) && refusals.due() {
                        tracing::warn!(
                            max_connections = shared.limits.max_connections,
                            suppressed = refusals.take_suppressed(),
                            "every client connection is busy with a request: answering new ones 503"
                        );
                    }
                }
                // The client gave up before the accept: nothing to do on the router's side.
                Err(err) if is_connection_error(&err) => {}
                Err(err) => {
                    if accept_errors.due() {
                        tracing::error!(
                            error = %err,
                            suppressed = accept_errors.take_suppressed(),
                            "accepting a connection failed; backing off"
                        );
                    }
                    if is_out_of_files(&err) {
                        // A file for the waiting client, at the expense of a connection that does nothing.
                        shared.evict_one();
                    }
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
        }
    }
    drop(listener);
    shared.drain().await;
    Ok(())
}

/// The `503 overloaded` answer, serialized once: it is written straight to the socket of a connection that gets no
/// task of its own.
async fn overloaded_answer() -> Bytes {
    let response = ApiError::Overloaded(
        "The router is busy with as many connections as it may hold; try again in a moment.".to_owned(),
    )
    .into_response();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let reason = parts.status.canonical_reason().unwrap_or("Service Unavailable");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).into_bytes();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::CONNECTION {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if !parts.headers.contains_key(header::X_CONTENT_TYPE_OPTIONS) {
        out.extend_from_slice(b"x-content-type-options: nosniff\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// Accept errors that concern one client only (it reset or aborted before the accept).
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// `EMFILE` or `ENFILE`: the process or the system is out of file descriptors.
fn is_out_of_files(err: &io::Error) -> bool {
    let code = err.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error()) || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// A warning that repeats is logged at most once per [`LOG_PERIOD`], with the number of occurrences left out.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Whether to log this occurrence; counts it as suppressed otherwise.
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < LOG_PERIOD) {
            self.suppressed += 1;
            return false;
        }
        self.last = Some(now);
        true
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// Milliseconds since the server started, advanced every [`CLOCK_TICK`] and on every accept, so the request path
/// stamps phases with one relaxed load instead of reading the system clock.
struct CoarseClock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl CoarseClock {
    fn new() -> Self {
        CoarseClock { epoch: Instant::now(), now_ms: AtomicU64::new(0) }
    }

    fn tick(&self) {
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
enum Phase {
    /// Receiving a request's headers (or nothing yet, right after the accept).
    Headers = 0,
    /// Between an answer and the first byte of the next request.
    Idle = 1,
    /// Headers complete, answer not fully written.
    Busy = 2,
}

const PHASE_BITS: u32 = 2;
const PHASE_MASK: u64 = (1 << PHASE_BITS) - 1;

/// The phase word of one connection; written only by the connection's own task.
struct ConnState {
    word: AtomicU64,
    clock: Arc<CoarseClock>,
}

impl ConnState {
    fn new(clock: Arc<CoarseClock>) -> Self {
        let word = AtomicU64::new(pack(Phase::Headers, clock.coarse_ms()));
        ConnState { word, clock }
    }

    fn get(&self) -> (Phase, u64) {
        let word = self.word.load(Ordering::Relaxed);
        let phase = match word & PHASE_MASK {
            0 => Phase::Headers,
            1 => Phase::Idle,
            _ => Phase::Busy,
        };
        (phase, word >> PHASE_BITS)
    }

    fn set(&self, phase: Phase) {
        self.word.store(pack(phase, self.clock.coarse_ms()), Ordering::Relaxed);
    }

    /// Bytes arrived: on an idle connection they start the next request, and its header timeout.
    fn received(&self) {
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
}

struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    /// Set once the server stops: the last connection to close wakes [`Shared::drain`].
    draining: bool,
}

/// What the accept loop and every connection task share.
struct Shared {
    limits: Limits,
    metrics: Arc<Metrics>,
    router: Router,
    builder: http1::Builder,
    clock: Arc<CoarseClock>,
    table: Mutex<Table>,
    drained: Notify,
    overloaded: Bytes,
    lingering: Arc<AtomicUsize>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serves a new connection, making room at the cap; answers it 503 and returns false when every connection is
    /// busy.
    fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) -> bool {
        let mut table = shared.table();
        if table.open.len() >= shared.limits.max_connections && !shared.evict_locked(&mut table) {
            drop(table);
            shared.refuse(stream);
            return false;
        }
        let id = table.next_id;
        table.next_id += 1;
        let state = Arc::new(ConnState::new(shared.clock.clone()));
        let (close, closed) = oneshot::channel();
        table.open.insert(id, Entry { state: state.clone(), close: Some(close) });
        shared.metrics.connections_open.set(table.open.len() as u64);
        drop(table);
        tokio::spawn(connection(shared.clone(), id, state, stream, peer, closed));
        true
    }

    /// Closes one connection that is not busy, if there is one.
    fn evict_one(&self) -> bool {
        let mut table = self.table();
        self.evict_locked(&mut table)
    }

    /// Closes the connection that has waited longest, those still sending headers before idle keep-alive ones.
    fn evict_locked(&self, table: &mut Table) -> bool {
        let victim = table
            .open
            .iter()
            .filter_map(|(id, entry)| {
                let (phase, since) = entry.state.get();
                (phase != Phase::Busy).then_some((phase == Phase::Idle, since, *id))
            })
            .min();
        let Some((_, _, id)) = victim else { return false };
        if let Some(mut entry) = table.open.remove(&id)
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
        table.open.remove(&id);
        self.metrics.connections_open.set(table.open.len() as u64);
        if table.draining && table.open.is_empty() {
            self.drained.notify_one();
        }
    }

    /// Tells every connection the server stops and waits until all are closed.
    async fn drain(&self) {
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
    /// Look again at this time (milliseconds on the server's clock).
    RecheckAt(u64),
}

/// Decides on a connection in `phase` since `since_ms`, at `now_ms`.
///
/// An idle connection is looked at again at least every header timeout, so that a request that starts on it (which
/// does not wake the timer) is held to its header timeout exactly: it started after the previous look, so its
/// deadline is still ahead at the next one.
fn verdict(phase: Phase, since_ms: u64, now_ms: u64, limits: &Limits) -> Verdict {
    let header_ms = millis(limits.header_timeout);
    let idle_ms = millis(limits.idle_timeout);
    match phase {
        Phase::Busy => Verdict::RecheckAt(now_ms.saturating_add(header_ms.min(idle_ms))),
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
    let io = TokioIo::new(TrackedIo { stream, state: state.clone() });
    let service = ConnService { router: shared.router.clone(), state: state.clone(), peer };
    let mut conn = pin!(shared.builder.serve_connection(io, service));
    let (_, accepted_ms) = state.get();
    let first_deadline = accepted_ms.saturating_add(millis(shared.limits.header_timeout));
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
                        if state.get().0 != Phase::Busy {
                            break;
                        }
                        // Finish the request in flight, then close.
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            () = &mut timer => {
                let (phase, since) = state.get();
                match verdict(phase, since, shared.clock.precise_ms(), &shared.limits) {
                    Verdict::HeaderTimeout => {
                        Metrics::inc(&shared.metrics.header_timeouts);
                        break;
                    }
                    Verdict::IdleTimeout => {
                        Metrics::inc(&shared.metrics.idle_timeouts);
                        break;
                    }
                    Verdict::RecheckAt(at) => timer.as_mut().reset(shared.clock.instant(at).into()),
                }
            }
        }
    }
    shared.remove(id);
}

/// The client's socket; bytes read from it may start a request on an idle connection.
struct TrackedIo {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.received();
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router, as one connection's hyper service: marks the connection busy for each request and gives handlers
/// the peer address.
struct ConnService {
    router: Router,
    state: Arc<ConnState>,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, mut request: Request<Incoming>) -> Answering {
        self.state.set(Phase::Busy);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let future = tower::Service::call(&mut self.router.clone(), request);
        Answering { future, state: Some(self.state.clone()) }
    }
}

/// The router's answer on its way; its body marks the connection idle once written.
struct Answering {
    future: RouteFuture<Infallible>,
    state: Option<Arc<ConnState>>,
}

impl Future for Answering {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Ok(response) = ready!(Pin::new(&mut this.future).poll(cx));
        let written = this.state.take().map(AnswerWritten);
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _written: written })))
    }
}

/// Marks the connection idle when dropped: hyper drops an answer's body once it has taken its last frame.
struct AnswerWritten(Arc<ConnState>);

impl Drop for AnswerWritten {
    fn drop(&mut self) {
        self.0.set(Phase::Idle);
    }
}

/// An answer's body, unchanged, with the mark that the answer is written.
struct TrackedBody {
    body: Body,
    _written: Option<AnswerWritten>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_a_reserve_below_the_open_file_limit() {
        // 1,024 less 64 and 1,024 / 16.
        assert_eq!(default_max_connections(Some(1024)), 896);
        assert_eq!(default_max_connections(Some(65_536)), 65_536 - 64 - 4096);
        // Enough for 10,000 connections under a 20,000 limit.
        assert_eq!(default_max_connections(Some(20_000)), 20_000 - 64 - 1250);
        // A tiny limit still allows a few connections; an unlimited one is taken as 2^20.
        assert_eq!(default_max_connections(Some(50)), MIN_CONNECTIONS);
        assert_eq!(default_max_connections(None), (1 << 20) - 64 - (1 << 16));
        assert_eq!(connection_cap(Some(32)), 32);
    }

    #[test]
    fn timeouts_follow_the_phase() {
        let limits = Limits {
            max_connections: 32,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        };
        // Headers: 10 s from the accept or the request's first byte.
        assert_eq!(verdict(Phase::Headers, 1_000, 5_000, &limits), Verdict::RecheckAt(11_000));
        assert_eq!(verdict(Phase::Headers, 1_000, 11_000, &limits), Verdict::HeaderTimeout);
        // Idle: closed after 60 s, looked at every 10 s meanwhile.
        assert_eq!(verdict(Phase::Idle, 1_000, 2_000, &limits), Verdict::RecheckAt(12_000));
        assert_eq!(verdict(Phase::Idle, 1_000, 55_000, &limits), Verdict::RecheckAt(61_000));
        assert_eq!(verdict(Phase::Idle, 1_000, 61_000, &limits), Verdict::IdleTimeout);
        // Busy: never timed out, looked at again later.
        assert_eq!(verdict(Phase::Busy, 1_000, 500_000, &limits), Verdict::RecheckAt(510_000));
    }

    #[test]
    fn a_phase_word_keeps_phase_and_time() {
        let clock = Arc::new(CoarseClock::new());
        clock.now_ms.store(12_345, Ordering::Relaxed);
        let state = ConnState::new(clock.clone());
        assert_eq!(state.get(), (Phase::Headers, 12_345));
        state.set(Phase::Busy);
        assert_eq!(state.get().0, Phase::Busy);
        // Bytes during a request do not restart anything.
        state.received();
        assert_eq!(state.get().0, Phase::Busy);
        clock.now_ms.store(20_000, Ordering::Relaxed);
        state.set(Phase::Idle);
        assert_eq!(state.get(), (Phase::Idle, 20_000));
        clock.now_ms.store(25_000, Ordering::Relaxed);
        state.received();
        assert_eq!(state.get(), (Phase::Headers, 25_000));
    }
}
