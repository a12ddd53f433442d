//! The SQLite backend of [`Storage`]: one file, embedded, no setup.
//!
//! Writes go through one connection, so SQLite never has to arbitrate between writers and a burst of registrations
//! queues in order instead of failing with `SQLITE_BUSY`; reads use a small pool of their own (WAL lets them run
//! beside the writer).
//!
//! Every write is one transaction on the writer connection (`Writer`, through `write_tx!` or a group commit). A
//! write that fails (full disk, I/O error) is undone whole and reported as a [`StoreError::Fault`]; the writer
//! connection is then closed and a fresh one opened for the next write, so a connection whose transaction SQLite
//! already rolled back on its own can never make a later write join a transaction that is never committed.
//!
//! Each file implements its part of the contract for this backend, with no layer in between: `nodes.rs`
//! ([`NodeStore`](crate::store::NodeStore): node writes and events, with `load.rs` for start-up, `commit.rs` for the
//! group commits of registrations and status changes, `lists.rs` the one writer of a node's lists), `auth.rs`
//! (users, sessions, keys), `enrollment.rs` (join tokens), `audit.rs` (the audit log), `fleet_events.rs`. `writer.rs`
//! is the writer connection, `file.rs` the watch on the database file; the statements both backends share are in
//! `store/sql.rs`.

mod audit;
mod auth;
mod commit;
mod deployments;
mod enrollment;
mod file;
mod fleet_events;
pub(in crate::store) mod lists;
mod load;
mod nodes;
mod usage;
mod writer;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::store::{Availability, Storage, StoreError, StoreResult};
use writer::{Writer, WriterPool, write_tx};

/// Migrations, embedded in the binary and applied at start-up.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Size of the write-ahead log above which the writer, after its commit, checkpoints and starts the log over, so
/// that no write load can grow it without bound (SPEC §9: under 64 MiB). Also SQLite's `journal_size_limit`: when
/// the log starts over, a file larger than this is cut back to it, so the file stays about this size and is reused
/// in place (cheaper to write and sync than a file that grows).
pub const WAL_LIMIT_BYTES: u64 = 40 * 1024 * 1024;

/// How long a connection waits for a lock held by another before its statement fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle to the database: one writer connection, a pool of readers, and a connection that checkpoints.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: WriterPool,
    reader: SqlitePool,
    checkpointer: SqlitePool,
    /// Registrations waiting for the next group commit.
    inserts: tokio::sync::mpsc::Sender<commit::InsertJob>,
    /// Status transitions waiting for the next group commit.
    transitions: tokio::sync::mpsc::Sender<commit::TransitionJob>,
    /// Largest database size in pages the writer may reach (0: SQLite's own limit). Set by tests to make the
    /// database "full" without filling a disk; applied to every writer connection, including reopened ones.
    page_limit: Arc<AtomicU64>,
    /// The database file.
    path: Arc<PathBuf>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> anyhow::Result<SqliteStore> {
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
        let file = Arc::new(file::FileWatch::new(path, std::path::Path::new(&wal), reader.clone()));
        let writer = WriterPool {
            pool: writer,
            faults: Arc::new(AtomicU64::new(0)),
            wal: Arc::new(PathBuf::from(wal)),
            wal_limit: Arc::new(AtomicU64::new(WAL_LIMIT_BYTES)),
            wal_retry_at: Arc::new(Mutex::new(None)),
            checkpointing: Arc::new(tokio::sync::Mutex::new(())),
            file,
        };
        tokio::spawn(commit::group_commits(writer.clone(), jobs));
        let (transitions, jobs) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(commit::transition_commits(writer.clone(), jobs));
        Ok(SqliteStore {
            writer,
            reader,
            checkpointer,
            inserts,
            transitions,
            page_limit,
            path: Arc::new(path.to_owned()),
        })
    }

    /// The writer connection, for one write transaction (see [`write_tx!`], which wraps this).
    async fn writer(&self) -> Result<Writer, StoreError> {
        Writer::acquire(&self.writer).await
    }

    /// A reader connection, beside the writer.
    async fn reader(&self) -> Result<PoolConnection<Sqlite>, StoreError> {
        Ok(self.reader.acquire().await?)
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
    /// the log is over its limit has little left to copy. Skipped while the writer checkpoints. Returns the log's
    /// size in pages, when it ran.
    pub async fn checkpoint(&self) -> Result<Option<i64>, StoreError> {
        let Ok(_checkpointing) = self.writer.checkpointing.try_lock() else { return Ok(None) };
        let (_busy, log_pages, _copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&self.checkpointer).await?;
        Ok(Some(log_pages))
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

impl Storage for SqliteStore {
    fn upkeep(&self) -> StoreResult<'_, ()> {
        Box::pin(async {
            self.writer.file.check()?;
            self.checkpoint().await.map(|_| ())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }

    fn storage_faults(&self) -> u64 {
        self.writer.faults.load(Ordering::Relaxed)
    }

    fn availability(&self) -> Availability {
        match self.writer.file.gate() {
            Ok(()) => Availability::Available,
            Err(_) => Availability::Lost,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
