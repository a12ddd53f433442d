//! One connection's task: serves the connection with hyper until the client closes it, one of its deadlines passes,
//! the table evicts it or the server stops. The deadlines (header, idle and write timeouts) are decided by
//! [`verdict`] from the connection's phase word when its one timer fires, so that the request path never touches a
//! timer: it only stamps the word.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::Limits;
use super::phase::{ConnState, Phase};
use super::table::{Close, Shared};
use super::tracked::{ConnService, TrackedIo};
use crate::metrics::Metrics;
use crate::tls::ClientStream;

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
pub(super) async fn connection(
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
                tokio::time::timeout_at(shared.clock.instant(first_deadline), tls.acceptor().accept(stream));
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
    let mut timer = pin!(tokio::time::sleep_until(shared.clock.instant(first_deadline)));
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
                    Verdict::RecheckAt(at) => timer.as_mut().reset(shared.clock.instant(at)),
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
}
