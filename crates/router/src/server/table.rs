//! The open connections, as the accept loop sees them: the table that the cap and the per-source share are counted
//! on, the choice of the connection that makes room for a new one, the `503` and the linger of a connection there
//! is no room for, and the stop that waits for every connection to close. Locked by the accept loop and by each
//! connection as it closes; never on the request path.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use hyper::server::conn::http1;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use super::conn::connection;
use super::phase::{CoarseClock, ConnState, Phase};
use super::{LINGER, LINGER_MAX_BYTES, Limits, MAX_LINGERING};
use crate::metrics::Metrics;

/// Why a connection task ends early.
#[derive(Debug, Clone, Copy)]
pub(super) enum Close {
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
    pub(super) fn remove(&self, id: u64) {
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
