//! The router's own HTTP/1.1 accept loop (SPEC §9 "Bounded work for strangers"): every connection is bounded in
//! time and in number, so idle or half-open sockets from strangers can neither exhaust the open-file limit nor keep a
//! new client from being served.
//!
//! - **Header timeout.** A connection has `header_timeout` to send a request's complete headers, counted from the
//!   accept for the first request and from its first byte for every later one.
//! - **Idle timeout.** A keep-alive connection that sends nothing for `idle_timeout` after an answer is closed.
//! - **Cap.** At most `max_connections` are open. A new connection at the cap closes one that is not busy with a
//!   request, and is served at once: first those still sending headers, then idle keep-alive ones, then those whose
//!   request body is slow to arrive or whose handler waits on the client's say-so (a parked long poll, see
//!   [`Connection::park`]), the longest waiting first. Only when every connection is busy (the router
//!   works on its request or writes its answer) is the new one answered `503 overloaded` and closed.
//! - **Share.** One source address (an IPv6 /64) holds at most `max_per_source` connections, unless it is a trusted
//!   proxy: a new one beyond that closes the same source's longest waiting connection that is not busy, or is
//!   answered `503` when all of them are busy. One address sending slowly can thus never take every connection.
//! - **Write timeout.** A client that leaves its answer unread (its socket full) for `write_timeout` loses its
//!   connection; the answer is dropped, and with it a streamed answer's upstream request.
//!
//! hyper's own `header_read_timeout` is off: in hyper 1.x it is re-armed as soon as a keep-alive connection goes idle,
//! so it would also close idle connections after the header timeout and make a longer idle timeout impossible.
//! Instead each connection publishes its phase in one atomic word (phase and since when, on a coarse clock), written
//! only by its own task: a relaxed store when a request's first byte arrives, when its headers are complete, when
//! the handler waits for body bytes not yet sent (and when they come), and when its answer has been written. A
//! per-connection timer reads the word when it fires, and the accept loop reads all words only when a new connection
//! arrives at the cap.
//!
//! The parts: `phase.rs`, a connection's phase word and the coarse clock it is stamped with; `tracked.rs`, the
//! socket, service and body wrappers that keep the word up to date; `conn.rs`, one connection's task and the deadlines
//! its timer decides; `table.rs`, the open connections that the cap, the per-source share, eviction, the `503` and
//! the stop act on.

mod conn;
mod phase;
mod table;
mod tracked;

pub use tracked::{Connection, Parked};

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use hyper::server::conn::http1;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::net::{Cidr, limit_key};
use crate::tls::Tls;
use phase::CoarseClock;
use table::{Shared, Table};

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
pub const CLOCK_TICK: Duration = Duration::from_millis(100);

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
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// Most connections one source address (an IPv6 /64) may hold at once; 0: no share.
    pub max_per_source: usize,
    /// Sources that hold any number (`--trusted-proxies`: a load balancer carries many clients).
    pub exempt: Vec<Cidr>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a client may leave an answer unread (its socket full) before the connection is closed.
    pub write_timeout: Duration,
    /// Serve HTTPS with this certificate: the handshake counts toward the header timeout.
    pub tls: Option<Arc<Tls>>,
}

impl Limits {
    /// The key a connection from `ip` counts under for the per-source share; `None` when it counts against none.
    fn share_of(&self, ip: IpAddr) -> Option<IpAddr> {
        let exempt = self.max_per_source == 0 || self.exempt.iter().any(|cidr| cidr.contains(ip));
        (!exempt).then(|| limit_key(ip))
    }
}

/// The default share of the connection cap one source may hold: half of it, so that one address can never take
/// every connection, however slowly it sends.
pub fn default_max_per_source(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
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
        table: Mutex::new(Table::new()),
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
                    // Every write goes out at once: a streamed answer's events must not wait for the client's
                    // acknowledgement of the previous one (Nagle's algorithm).
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %err, "cannot disable Nagle's algorithm on a client connection");
                    }
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
}
