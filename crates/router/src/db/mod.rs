//! SQL only. The rest of the router talks to the database through [`Store`], a narrow seam: a second backend
//! (PostgreSQL) would implement the same methods without touching handlers or the registry.
//!
//! Writes go through one connection, so SQLite never has to arbitrate between writers and a burst of registrations
//! queues in order instead of failing with `SQLITE_BUSY`; reads use a small pool of their own (WAL lets them run
//! beside the writer).
//!
//! Every write is one transaction on the writer connection (`Writer`, through `write_tx!` or the group commit of
//! registrations). A write that fails (full disk, I/O error) is undone whole and reported as a [`StorageFault`]; the
//! writer connection is then closed and a fresh one opened for the next write, so a connection whose transaction
//! SQLite already rolled back on its own can never make a later write join a transaction that is never committed.

pub mod auth;
pub mod nodes;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Transaction};

/// Migrations, embedded in the binary and applied at start-up.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Size of the write-ahead log above which the writer, after its commit, checkpoints and starts the log over, so
/// that no write load can grow it without bound (SPEC §9: under 64 MiB). Also SQLite's `journal_size_limit`: when
/// the log starts over, a file larger than this is cut back to it, so the file stays about this size and is reused
/// in place (cheaper to write and sync than a file that grows).
pub const WAL_LIMIT_BYTES: u64 = 40 * 1024 * 1024;

/// How long a connection waits for a lock held by another before its statement fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the writer's checkpoint waits for readers to leave the write-ahead log, and how long it then leaves the
/// log alone when they did not: a reader that stays (an online backup holds one for its whole copy) must not make
/// every write wait.
const CHECKPOINT_READER_WAIT: Duration = Duration::from_millis(200);
const CHECKPOINT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A write the database could not make: the disk is full, an I/O error, the database file became unwritable or the
/// writer connection was lost. Nothing of the write was kept; the same write may succeed once the fault is gone.
#[derive(Debug, thiserror::Error)]
#[error("the database could not be written (disk full or I/O error)")]
pub struct StorageFault;

/// True for errors of the storage itself, as opposed to a refused statement (a constraint, a bug).
fn is_fault(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|code| code.parse::<i32>().ok()).unwrap_or(0);
            // Primary result codes: BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL,
            // NOTADB.
            matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 15 | 26)
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Marks `err` as a [`StorageFault`] when a storage error is among its causes.
pub(crate) fn classify(err: anyhow::Error) -> anyhow::Error {
    let fault = err.chain().filter_map(|cause| cause.downcast_ref::<sqlx::Error>()).any(is_fault);
    if fault && err.downcast_ref::<StorageFault>().is_none() { err.context(StorageFault) } else { err }
}

/// Handle to the database: one writer connection, a pool of readers, and a connection that checkpoints.
#[derive(Debug, Clone)]
pub struct Store {
    writer: WriterPool,
    reader: SqlitePool,
    checkpointer: SqlitePool,
    /// Registrations waiting for the next group commit.
    inserts: tokio::sync::mpsc::Sender<nodes::InsertJob>,
    /// Largest database size in pages the writer may reach (0: SQLite's own limit). Set by tests to make the
    /// database "full" without filling a disk; applied to every writer connection, including reopened ones.
    page_limit: Arc<AtomicU64>,
}

/// The writer connection's pool (of one), with what every write needs beside it.
#[derive(Debug, Clone)]
pub(crate) struct WriterPool {
    pool: SqlitePool,
    /// Writes that failed on a storage fault, for `/metrics`.
    faults: Arc<AtomicU64>,
    /// The write-ahead log's file, and the size over which a write starts it over.
    wal: Arc<PathBuf>,
    wal_limit: Arc<AtomicU64>,
    /// Before this instant the writer does not try to start the log over again (readers kept it from it).
    wal_retry_at: Arc<Mutex<Option<Instant>>>,
}

impl Store {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Store> {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .context("building SQLite options")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed registration or status change survives power loss, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // The writer does not checkpoint on its own schedule: copying the write-ahead log into the database happens
        // beside it (`checkpoint`), so registrations do not wait for a checkpoint's copy and fsync; only when the log
        // passes its limit does the writer checkpoint, between two transactions (`Writer::keep_log_bounded`).
        let options = options.pragma("journal_size_limit", WAL_LIMIT_BYTES.to_string());
        let page_limit = Arc::new(AtomicU64::new(0));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect({
                let page_limit = page_limit.clone();
                move |conn, _| {
                    let limit = page_limit.load(Ordering::Relaxed);
                    Box::pin(async move {
                        if limit > 0 {
                            sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {limit}")))
                                .execute(conn)
                                .await?;
                        }
                        Ok(())
                    })
                }
            })
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .with_context(|| format!("opening database {}", path.display()))?;
        MIGRATOR.run(&writer).await.with_context(|| format!("applying migrations to {}", path.display()))?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("opening database {} for checkpoints", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("opening database {} for reading", path.display()))?;
        let (inserts, jobs) = tokio::sync::mpsc::channel(1024);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let writer = WriterPool {
            pool: writer,
            faults: Arc::new(AtomicU64::new(0)),
            wal: Arc::new(PathBuf::from(wal)),
            wal_limit: Arc::new(AtomicU64::new(WAL_LIMIT_BYTES)),
            wal_retry_at: Arc::new(Mutex::new(None)),
        };
        tokio::spawn(nodes::group_commits(writer.clone(), jobs));
        Ok(Store { writer, reader, checkpointer, inserts, page_limit })
    }

    /// The writer connection, for one write transaction (see [`write_tx!`], which wraps this).
    pub(crate) async fn writer(&self) -> anyhow::Result<Writer> {
        Writer::acquire(&self.writer).await
    }

    /// The counter of writes that failed on a storage fault.
    pub fn fault_counter(&self) -> Arc<AtomicU64> {
        self.writer.faults.clone()
    }

    /// Sets the size of the write-ahead log over which a write starts it over (default [`WAL_LIMIT_BYTES`]).
    #[doc(hidden)]
    pub async fn limit_log(&self, bytes: u64) -> anyhow::Result<()> {
        self.writer.wal_limit.store(bytes, Ordering::Relaxed);
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA journal_size_limit = {bytes}")))
            .execute(&self.writer.pool)
            .await?;
        Ok(())
    }

    /// Makes the database refuse to grow past `pages` pages, as a full disk would (`None`: no limit). For tests of
    /// the router's behaviour under storage faults.
    #[doc(hidden)]
    pub async fn limit_pages(&self, pages: Option<u64>) -> anyhow::Result<()> {
        // SQLite's own maximum, which is what "no limit" means to it.
        let limit = pages.unwrap_or(4_294_967_294);
        self.page_limit.store(limit, Ordering::Relaxed);
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {limit}"))).execute(&self.writer.pool).await?;
        Ok(())
    }

    /// The database's size in pages, as the writer sees it.
    #[doc(hidden)]
    pub async fn page_count(&self) -> anyhow::Result<u64> {
        let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count").fetch_one(&self.writer.pool).await?;
        Ok(u64::try_from(pages).unwrap_or(0))
    }

    /// Copies what it can of the write-ahead log into the database without waiting for readers or the writer
    /// (SQLite's passive checkpoint). Run every 250 ms in the background, so that the checkpoint a write does when
    /// the log is over its limit has little left to copy; returns the log's size in pages.
    pub async fn checkpoint(&self) -> anyhow::Result<i64> {
        let (_busy, log_pages, _copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&self.checkpointer).await?;
        Ok(log_pages)
    }

    /// Checkpoints fully and closes every pool, waiting for queued writes to finish.
    pub async fn close(&self) {
        self.writer.pool.close().await;
        self.reader.close().await;
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.checkpointer).await {
            tracing::warn!(error = %err, "final checkpoint failed; the write-ahead log is applied at the next start");
        }
        self.checkpointer.close().await;
    }
}

/// The writer connection, held for one write transaction.
///
/// A failed write must not leave the connection behind: SQLite may already have rolled the transaction back by
/// itself (a full disk does), and a connection whose idea of the transaction differs from SQLite's would let the
/// next write join a transaction that is never committed. [`Writer::finish`] therefore closes the connection after
/// any failure; the pool opens a fresh one for the next write, so writes work again by themselves once the fault is
/// gone.
pub(crate) struct Writer {
    conn: PoolConnection<Sqlite>,
    shared: WriterPool,
}

impl Writer {
    /// Waits for the writer connection of `pool` (a pool of one).
    pub(crate) async fn acquire(pool: &WriterPool) -> anyhow::Result<Writer> {
        let conn = pool.pool.acquire().await.map_err(|err| {
            pool.faults.fetch_add(1, Ordering::Relaxed);
            classify(err.into())
        })?;
        Ok(Writer { conn, shared: pool.clone() })
    }

    /// Starts the transaction.
    pub(crate) async fn begin(&mut self) -> Result<Transaction<'_, Sqlite>, sqlx::Error> {
        self.conn.begin().await
    }

    /// Settles a write: on success the connection goes back to the pool; on failure it is closed, and a storage
    /// error comes back marked as [`StorageFault`].
    pub(crate) async fn finish<T>(mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(value) => {
                self.keep_log_bounded().await;
                Ok(value)
            }
            Err(err) => {
                let err = classify(err);
                if err.downcast_ref::<StorageFault>().is_some() {
                    self.shared.faults.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(error = %format!("{err:#}"), "a database write failed and was undone; the writer connection is reopened for the next write");
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

/// Runs the statements of `$body` (an async block using `$tx: &mut SqliteConnection`) in one write transaction.
macro_rules! write_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut writer = $store.writer().await?;
        let result: anyhow::Result<_> = async {
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
pub(crate) use write_tx;
