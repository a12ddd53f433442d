//! The writer connection: one write transaction at a time, undone whole and reported as a [`StoreError`] when it
//! fails, and the write-ahead log kept bounded after each commit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Connection, Transaction};

use super::BUSY_TIMEOUT;
use super::file::FileWatch;
use crate::store::StoreError;

/// How long the writer's checkpoint waits for readers to leave the write-ahead log, and how long it then leaves the
/// log alone when they did not: a reader that stays (an online backup holds one for its whole copy) must not make
/// every write wait.
const CHECKPOINT_READER_WAIT: Duration = Duration::from_millis(200);
const CHECKPOINT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The writer connection's pool (of one), with what every write needs beside it.
#[derive(Debug, Clone)]
pub(super) struct WriterPool {
    pub(super) pool: SqlitePool,
    /// Writes that failed on a storage fault, for `/metrics`.
    pub(super) faults: Arc<AtomicU64>,
    /// The write-ahead log's file, and the size over which a write starts it over.
    pub(super) wal: Arc<PathBuf>,
    pub(super) wal_limit: Arc<AtomicU64>,
    /// Before this instant the writer does not try to start the log over again (readers kept it from it).
    pub(super) wal_retry_at: Arc<Mutex<Option<Instant>>>,
    /// Held by whichever checkpoint runs, the background passive one or the writer's: SQLite runs one checkpoint at
    /// a time, and the writer's must not mistake the other for a reader that stays.
    pub(super) checkpointing: Arc<tokio::sync::Mutex<()>>,
    /// The database file as opened: a write to a file deleted or replaced meanwhile is refused.
    pub(super) file: Arc<FileWatch>,
}

/// The writer connection, held for one write transaction.
///
/// A failed write must not leave the connection behind: SQLite may already have rolled the transaction back by
/// itself (a full disk does), and a connection whose idea of the transaction differs from SQLite's would let the
/// next write join a transaction that is never committed. [`Writer::finish`] therefore closes the connection after
/// any failure; the pool opens a fresh one for the next write, so writes work again by themselves once the fault is
/// gone.
pub(super) struct Writer {
    conn: PoolConnection<Sqlite>,
    shared: WriterPool,
}

impl Writer {
    /// Waits for the writer connection of `pool` (a pool of one).
    pub(super) async fn acquire(pool: &WriterPool) -> Result<Writer, StoreError> {
        if let Err(lost) = pool.file.gate() {
            pool.faults.fetch_add(1, Ordering::Relaxed);
            return Err(lost.into());
        }
        let conn = pool.pool.acquire().await.map_err(|err| {
            pool.faults.fetch_add(1, Ordering::Relaxed);
            StoreError::from(err)
        })?;
        Ok(Writer { conn, shared: pool.clone() })
    }

    /// Starts the transaction, once the database file is seen to be the one opened.
    pub(super) async fn begin(&mut self) -> Result<Transaction<'_, Sqlite>, StoreError> {
        self.shared.file.check()?;
        Ok(self.conn.begin().await?)
    }

    /// Settles a write: on success the connection goes back to the pool. A refusal (a duplicate, the last
    /// administrator…) was undone with its transaction and keeps the connection; on any other failure the
    /// connection is closed, and a storage fault is counted.
    pub(super) async fn finish<T>(mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        // A commit to a file deleted or replaced meanwhile is as good as lost: not acknowledged.
        let result = result.and_then(|value| self.shared.file.check().map(|()| value).map_err(StoreError::from));
        match result {
            Ok(value) => {
                self.keep_log_bounded().await;
                Ok(value)
            }
            Err(
                err @ (StoreError::Duplicate | StoreError::JoinToken(_) | StoreError::NotFound | StoreError::LastAdmin),
            ) => Err(err),
            Err(err) if err.fault() == Some(crate::store::StorageFault::Lost) => {
                self.shared.faults.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
            Err(err) => {
                if err.fault().is_some() {
                    self.shared.faults.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(error = %err, "a database write failed and was undone; the writer connection is reopened for the next write");
                if let Err(close) = self.conn.close().await {
                    tracing::debug!(error = %close, "closing the writer connection after a failed write");
                }
                Err(err)
            }
        }
    }
}

impl Writer {
    /// After a commit, starts the write-ahead log over when it has grown past its limit.
    ///
    /// A writer that never pauses keeps appending while the background passive checkpoint copies, so the log is
    /// never wholly copied and SQLite never starts it over: it would grow without bound. Here the writer itself,
    /// between two transactions, copies the rest of the log into the database and waits for readers to leave it
    /// (SQLite's RESTART checkpoint), so the next write starts the log from its beginning, and `journal_size_limit`
    /// cuts the file back to the limit. That next write waits for the copy, which is short since the passive
    /// checkpoints did most of it. The write before is committed whatever happens here, so a failed checkpoint is
    /// only logged (and retried after the next write).
    async fn keep_log_bounded(&mut self) {
        let size = std::fs::metadata(&*self.shared.wal).map(|meta| meta.len()).unwrap_or(0);
        if size <= self.shared.wal_limit.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        {
            let mut retry_at = self.shared.wal_retry_at.lock().unwrap_or_else(|p| p.into_inner());
            if retry_at.is_some_and(|at| now < at) {
                return;
            }
            *retry_at = None;
        }
        // A background checkpoint under way finishes first (it copies what this one would).
        let _checkpointing = self.shared.checkpointing.lock().await;
        // Readers are waited for briefly, not for the connection's usual busy timeout.
        let wait = |timeout: Duration| format!("PRAGMA busy_timeout = {}", timeout.as_millis());
        let checkpoint = async {
            sqlx::query(sqlx::AssertSqlSafe(wait(CHECKPOINT_READER_WAIT))).execute(&mut *self.conn).await?;
            let result =
                sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(RESTART)").fetch_one(&mut *self.conn).await;
            sqlx::query(sqlx::AssertSqlSafe(wait(BUSY_TIMEOUT))).execute(&mut *self.conn).await?;
            result
        };
        let busy = match checkpoint.await {
            Ok((0, _, _)) => false,
            Ok((_, log_pages, copied)) => {
                tracing::debug!(log_pages, copied, "readers kept the write-ahead log from starting over; will retry");
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, size, "checkpointing the write-ahead log failed; will retry");
                true
            }
        };
        if busy {
            *self.shared.wal_retry_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + CHECKPOINT_RETRY_AFTER);
        }
    }
}

/// Runs the statements of `$body` (an async block using `$tx: &mut SqliteConnection`, answering
/// `Result<_, StoreError>`) in one write transaction.
macro_rules! write_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut writer = $store.writer().await?;
        let result: Result<_, $crate::store::StoreError> = async {
            let mut transaction = writer.begin().await?;
            let $tx: &mut sqlx::SqliteConnection = &mut transaction;
            let value = $body.await?;
            transaction.commit().await?;
            Ok(value)
        }
        .await;
        writer.finish(result).await
    }};
}
pub(super) use write_tx;
