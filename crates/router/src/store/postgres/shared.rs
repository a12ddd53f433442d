//! What a router reads to follow the others (SPEC §11): the nodes changed or deleted, and the heartbeat figures
//! written, since a cursor; a node by its token; the sweep lease; and the notifications that say when to read.
//!
//! **Cursors.** Each change stamps its row with its transaction id (`changed_xid`, `seen_xid`, `deleted_xid`). A read
//! takes, in the same snapshot, every row stamped at or after the cursor and the snapshot's `xmin` (the oldest
//! transaction still running, or the next one to start) as the next cursor. A transaction that had not committed
//! when the snapshot was taken has an id at or after that `xmin`, so the next read finds its rows whatever order
//! transactions commit in: no change is missed, and a few are read twice (the registry applies a row only when its
//! revision is newer).
//!
//! **The lease.** `pg_try_advisory_lock` on a connection of its own: held as long as that connection lives.
//! PostgreSQL releases it when the holder stops or its connection breaks (a killed process at once; a machine that
//! vanished once the server's TCP keepalives give up, set here to about 11 s).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::PgStore;
use super::auth::CREDENTIALS_CHANNEL;
use super::node_rows::{NODES_CHANNEL, node_columns, node_from_row};
use super::reach::Reach;
use crate::clock::Millis;
use crate::model::auth::{Revoked, TokenHash};
use crate::model::figures::PackedFigures;
use crate::store::{
    ChangeSignals, NodeChanges, Seen, SeenChanges, SharedNode, SharedStorage, StorageFault, StoreError, StoreResult,
};

/// The advisory lock key of the sweep lease ("llm-rout" in ASCII).
const SWEEP_LEASE_KEY: i64 = 0x6c6c_6d2d_726f_7574;

/// Longest a check of the lease may take: a holder that cannot reach the database within it gives the lease up.
const LEASE_CHECK: Duration = Duration::from_secs(2);

/// The snapshot's `xmin`, as a cursor.
const SNAPSHOT_XMIN: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// The connection of the sweep lease, and whether it holds the lock.
#[derive(Debug)]
pub(super) struct Lease {
    conn: PgConnection,
    held: bool,
}

impl Lease {
    /// Closes the connection, releasing the lock.
    pub(super) async fn close(self) {
        let _ = tokio::time::timeout(LEASE_CHECK, self.conn.close()).await;
    }
}

impl PgStore {
    async fn node_changes(&self, cursor: i64) -> Result<NodeChanges, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let next: i64 = sqlx::query_scalar(SNAPSHOT_XMIN).fetch_one(&mut *tx).await?;
        let sql = format!(
            "SELECT {} FROM nodes n LEFT JOIN node_tokens t ON t.node_id = n.id WHERE n.changed_xid >= $1::text::xid8",
            node_columns()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cursor.to_string()).fetch_all(&mut *tx).await?;
        let nodes = rows.iter().map(node_from_row).collect::<anyhow::Result<Vec<_>>>()?;
        let deleted: Vec<String> =
            sqlx::query_scalar("SELECT id FROM node_deletions WHERE deleted_xid >= $1::text::xid8")
                .bind(cursor.to_string())
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let deleted = deleted.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
        Ok(NodeChanges { nodes, deleted, cursor: next })
    }

    async fn seen_changes(&self, cursor: i64) -> Result<SeenChanges, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let next: i64 = sqlx::query_scalar(SNAPSHOT_XMIN).fetch_one(&mut *tx).await?;
        let rows = sqlx::query(
            "SELECT id, last_seen_at, metrics FROM nodes \
             WHERE seen_xid >= $1::text::xid8 AND seen_by IS DISTINCT FROM $2 AND last_seen_at IS NOT NULL",
        )
        .bind(cursor.to_string())
        .bind(&self.me)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let seen = rows
            .iter()
            .map(|row| {
                let id: &str = row.try_get(0)?;
                let metrics: Option<String> = row.try_get(2)?;
                Ok(Seen {
                    node_id: Uuid::parse_str(id)?,
                    last_seen_at: row.try_get(1)?,
                    figures: metrics.map(PackedFigures::from_stored),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SeenChanges { seen, cursor: next })
    }

    async fn node_by_token(&self, hash: TokenHash) -> Result<Option<SharedNode>, StoreError> {
        let sql = format!(
            "SELECT {} FROM node_tokens t JOIN nodes n ON n.id = t.node_id WHERE t.token_hash = $1",
            node_columns()
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(hash.to_hex()).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(node_from_row).transpose()?)
    }

    async fn hold_sweep_lease(&self) -> Result<bool, StoreError> {
        let mut lease = self.lease.lock().await;
        if lease.is_none() {
            let conn = tokio::time::timeout(LEASE_CHECK, PgConnection::connect_with(&self.options))
                .await
                .map_err(|_| lease_timeout("connecting for the sweep lease timed out"))??;
            *lease = Some(Lease { conn, held: false });
        }
        let Some(current) = lease.as_mut() else { return Ok(false) };
        let checked = tokio::time::timeout(LEASE_CHECK, async {
            if current.held {
                sqlx::query("SELECT 1").execute(&mut current.conn).await?;
                return Ok(true);
            }
            let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SWEEP_LEASE_KEY)
                .fetch_one(&mut current.conn)
                .await?;
            if taken {
                // Server-side keepalives, so that the lock of a holder whose machine vanished is released.
                sqlx::raw_sql(
                    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
                )
                .execute(&mut current.conn)
                .await?;
            }
            Ok::<_, StoreError>(taken)
        })
        .await;
        let failure = match checked {
            Ok(Ok(held)) => {
                current.held = held;
                return Ok(held);
            }
            Ok(Err(err)) => err,
            Err(_) => lease_timeout("checking the sweep lease timed out"),
        };
        // Dropping the connection releases the lock, if the server still thought it held.
        if let Some(old) = lease.take() {
            old.close().await;
        }
        Err(failure)
    }
}

/// A lease check that did not answer in time: the database is as good as unreachable to this router.
fn lease_timeout(what: &str) -> StoreError {
    StoreError::Fault { fault: StorageFault::Unreachable, cause: what.to_owned() }
}

impl SharedStorage for PgStore {
    fn node_changes(&self, cursor: i64) -> StoreResult<'_, NodeChanges> {
        Box::pin(self.gated(self.node_changes(cursor)))
    }

    fn seen_changes(&self, cursor: i64) -> StoreResult<'_, SeenChanges> {
        Box::pin(self.gated(self.seen_changes(cursor)))
    }

    fn node_by_token(&self, hash: TokenHash) -> StoreResult<'_, Option<SharedNode>> {
        Box::pin(self.gated(self.node_by_token(hash)))
    }

    fn hold_sweep_lease(&self) -> StoreResult<'_, bool> {
        Box::pin(self.gated(self.hold_sweep_lease()))
    }

    fn written_revision(&self, id: Uuid) -> i64 {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied().unwrap_or(0)
    }

    fn signals(&self) -> &ChangeSignals {
        &self.signals
    }

    fn claim_requests<'a>(&'a self, principal: &'a str, minute: Millis, want: u64, limit: u64) -> StoreResult<'a, u64> {
        Box::pin(self.gated(self.claim_requests(principal, minute, want, limit)))
    }
}

/// Starts listening for the routers' notifications; each wakes the matching signal. A listener that lost its
/// connection reconnects by itself, and wakes both signals then, since notifications may have been missed.
pub(super) async fn listen(
    pool: PgPool,
    signals: Arc<ChangeSignals>,
    reach: Arc<Reach>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen_all([NODES_CHANNEL, CREDENTIALS_CHANNEL]).await?;
    tokio::spawn(relay(listener, signals, reach, stop));
    Ok(())
}

fn relay(
    mut listener: PgListener,
    signals: Arc<ChangeSignals>,
    reach: Arc<Reach>,
    mut stop: watch::Receiver<bool>,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = stop.changed() => return,
            };
            match received {
                Ok(Some(notification)) if notification.channel() == CREDENTIALS_CHANNEL => {
                    signals.revoke(Revoked::decode(notification.payload()));
                }
                Ok(Some(_)) => signals.nodes.notify_one(),
                Ok(None) => {
                    // Changes may have been missed meanwhile: reading them again heals that. A credential is checked
                    // with the database again within a second of its use anyway, whenever the database answers.
                    tracing::warn!("the database connection for notifications was lost; reconnecting");
                    signals.nodes.notify_one();
                }
                Err(err) => {
                    if reach.reachable() {
                        tracing::warn!(error = %err, "listening for other routers' changes failed; will retry");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                    // Reconnecting waits for the pool to give up while the server is down: wait for the probe.
                    while !reach.reachable() {
                        tokio::select! {
                            _ = tokio::time::sleep(super::reach::PROBE_EVERY) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
    })
}
