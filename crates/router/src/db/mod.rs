//! SQL only. The rest of the router talks to the database through [`Store`], a narrow seam: a second backend
//! (PostgreSQL) would implement the same methods without touching handlers or the registry.
//!
//! Writes go through one connection, so SQLite never has to arbitrate between writers and a burst of registrations
//! queues in order instead of failing with `SQLITE_BUSY`; reads use a small pool of their own (WAL lets them run
//! beside the writer).

pub mod auth;
pub mod nodes;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Migrations, embedded in the binary and applied at start-up.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the database: one writer connection, a pool of readers, and a connection that checkpoints.
#[derive(Debug, Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    checkpointer: SqlitePool,
    /// Registrations waiting for the next group commit.
    inserts: tokio::sync::mpsc::Sender<nodes::InsertJob>,
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
            .busy_timeout(Duration::from_secs(10));
        // The writer never checkpoints: copying the write-ahead log into the database happens beside it
        // (`checkpoint`), so no registration waits for a checkpoint's copy and fsync.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
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
        tokio::spawn(nodes::group_commits(writer.clone(), jobs));
        Ok(Store { writer, reader, checkpointer, inserts })
    }

    /// Copies what it can of the write-ahead log into the database without waiting for readers or the writer
    /// (SQLite's passive checkpoint). Run every second in the background; returns the log's size in pages.
    pub async fn checkpoint(&self) -> anyhow::Result<i64> {
        let (_busy, log_pages, _copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&self.checkpointer).await?;
        Ok(log_pages)
    }

    /// Checkpoints fully and closes every pool, waiting for queued writes to finish.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.checkpointer).await {
            tracing::warn!(error = %err, "final checkpoint failed; the write-ahead log is applied at the next start");
        }
        self.checkpointer.close().await;
    }
}
