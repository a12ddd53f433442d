//! Whether the database server can be reached, as the store last found (SPEC §11, a router cut off from its
//! database). A call that fails on a lost or refused connection makes the store suspect the server: a probe tries to
//! connect at once, on a connection of its own. When it cannot, the server is unreachable, the log says so once, and
//! from then on every call fails at once as [`StorageFault::Unreachable`] instead of waiting for the pool to give
//! up, while the probe tries again every [`PROBE_EVERY`]; the first try that connects makes the server reachable
//! again. One connection lost while the server is up (a killed backend) costs that call only. Meanwhile the router
//! routes from memory and takes heartbeats.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Notify, watch};

use crate::store::StorageFault;

/// How often an unreachable server is tried again.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long one try may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The server's reachability, shared by the store and its probe.
#[derive(Debug, Default)]
pub(super) struct Reach {
    unreachable: AtomicBool,
    /// Wakes the probe: a call failed on its connection.
    suspect: Notify,
    /// What made the store suspect the server, for the log.
    cause: Mutex<String>,
}

impl Reach {
    /// The fault of every call while the server is unreachable.
    pub(super) fn gate(&self) -> Result<(), StorageFault> {
        if self.unreachable.load(Ordering::Relaxed) { Err(StorageFault::Unreachable) } else { Ok(()) }
    }

    pub(super) fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::Relaxed)
    }

    /// A call failed on its connection: the probe finds out at once whether the server is still there.
    pub(super) fn suspect(&self, cause: &dyn std::fmt::Display) {
        if self.reachable() {
            *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = cause.to_string();
            self.suspect.notify_one();
        }
    }

    /// Tries to connect when the server is suspected, and every [`PROBE_EVERY`] while it is unreachable, until
    /// `stop`.
    pub(super) fn probe(self: Arc<Self>, options: PgConnectOptions, mut stop: watch::Receiver<bool>) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = self.suspect.notified() => {}
                    _ = stop.changed() => return,
                }
                if connects(&options).await {
                    continue;
                }
                let since = Instant::now();
                self.unreachable.store(true, Ordering::Relaxed);
                tracing::error!(
                    cause = %self.cause.lock().unwrap_or_else(|p| p.into_inner()),
                    "the database is unreachable: routing goes on from memory, heartbeats are taken, and whatever \
                     needs the database is refused at once (503 storage_unavailable) until it is back"
                );
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(PROBE_EVERY) => {}
                        _ = stop.changed() => return,
                    }
                    if connects(&options).await {
                        break;
                    }
                }
                self.unreachable.store(false, Ordering::Relaxed);
                tracing::warn!(after_secs = since.elapsed().as_secs_f64(), "the database is reachable again");
            }
        });
    }
}

/// Whether a connection to the server can be made now.
async fn connects(options: &PgConnectOptions) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        _ => false,
    }
}
