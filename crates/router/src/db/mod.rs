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

/// Handle to the database: one writer connection and a pool of readers.
#[derive(Debug, Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("opening database {}", path.display()))?;
        MIGRATOR.run(&writer).await.with_context(|| format!("applying migrations to {}", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("opening database {} for reading", path.display()))?;
        Ok(Store { writer, reader })
    }

    /// Closes both pools, waiting for queued writes to finish.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}
