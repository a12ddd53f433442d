//! The SQLite backend of [`Storage`]: one file, embedded, no setup.
//!
//! Writes go through one connection, so SQLite never has to arbitrate between writers and a burst of registrations
//! queues in order instead of failing with `SQLITE_BUSY`; reads use a small pool of their own (WAL lets them run
//! beside the writer).
//!
//! Every write is one transaction on the writer connection (`Writer`, through `write_tx!` or a group commit). A write that fails (full disk, I/O error) is undone whole and reported as a [`StorageFault`]; the
//! writer connection is then closed and a fresh one opened for the next write, so a connection whose transaction
//! SQLite already rolled back on its own can never make a later write join a transaction that is never committed.
//!
//! Files: `writer.rs` (the writer connection), `load.rs` (start-up), `commit.rs` (group commits of registrations
//! and of status transitions), `nodes.rs` (node writes and events), `lists.rs` (the one writer of a node's lists),
//! `auth.rs` (users, sessions, keys), `enrollment.rs` (join tokens), `audit.rs` (the audit log), `fleet.rs` (fleet
//! events).
//!
//! [`StorageFault`]: crate::store::StorageFault

mod audit;
mod auth;
mod commit;
mod enrollment;
mod file;
mod fleet;
pub(in crate::store) mod lists;
mod load;
mod nodes;
mod writer;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::{Principal, TokenHash};
use crate::model::enrollment::{JoinToken, JoinUse};
use crate::model::fleet::FleetEvent;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::store::{
    ApiKeyRow, AuditQuery, Availability, DeleteUserError, Figures, InsertError, NewNode, NodeBatches, Storage,
    StoreResult, StoredNode, UserRow,
};
use writer::{Writer, WriterPool, classify, write_tx};

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
    async fn writer(&self) -> anyhow::Result<Writer> {
        Writer::acquire(&self.writer).await
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
    pub async fn checkpoint(&self) -> anyhow::Result<Option<i64>> {
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

/// Every answer of the store has its storage errors marked [`crate::store::StorageFault`], reads included.
macro_rules! classified {
    ($body:expr) => {
        Box::pin(async move { $body.await.map_err(classify) })
    };
}

impl Storage for SqliteStore {
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>> {
        classified!(load::load_nodes(&self.reader))
    }

    fn node_batches(&self) -> StoreResult<'_, NodeBatches> {
        classified!(load::node_batches(&self.reader))
    }

    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> BoxFuture<'_, Result<(), InsertError>> {
        Box::pin(commit::insert_node(&self.inserts, node, token, events, join))
    }

    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>> {
        classified!(self.import_nodes(nodes))
    }

    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> BoxFuture<'a, Result<(), InsertError>> {
        Box::pin(async move {
            self.reregister_node(node, token, now, events, join).await.map_err(|err| match err {
                InsertError::Other(err) => InsertError::Other(classify(err)),
                refused => refused,
            })
        })
    }

    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        classified!(commit::record_transition(&self.transitions, node, event))
    }

    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()> {
        classified!(self.update_admin_fields(node))
    }

    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        classified!(self.delete_node(id, event))
    }

    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()> {
        classified!(self.flush_figures(batch))
    }

    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>> {
        classified!(self.node_events(id, limit, before))
    }

    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        classified!(self.prune_events(cutoff))
    }

    fn insert_fleet_event<'a>(&'a self, event: &'a FleetEvent) -> StoreResult<'a, i64> {
        classified!(self.insert_fleet_event(event))
    }

    fn resolve_fleet_event<'a>(
        &'a self,
        id: i64,
        at: Millis,
        by: Option<&'a str>,
        resolution: &'a str,
    ) -> StoreResult<'a, bool> {
        classified!(self.resolve_fleet_event(id, at, by, resolution))
    }

    fn grow_fleet_event<'a>(
        &'a self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &'a str,
    ) -> StoreResult<'a, bool> {
        classified!(self.grow_fleet_event(id, nodes_affected, nodes_live, message))
    }

    fn fleet_events(&self, limit: u32) -> StoreResult<'_, Vec<FleetEvent>> {
        classified!(self.fleet_events(limit))
    }

    fn count_users(&self) -> StoreResult<'_, i64> {
        classified!(self.count_users())
    }

    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool> {
        classified!(self.insert_user(user))
    }

    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>> {
        classified!(self.user(username))
    }

    fn users(&self) -> StoreResult<'_, Vec<UserRow>> {
        classified!(self.users())
    }

    fn delete_user<'a>(&'a self, username: &'a str) -> BoxFuture<'a, Result<(), DeleteUserError>> {
        Box::pin(async move {
            self.delete_user(username).await.map_err(|err| match err {
                DeleteUserError::Other(err) => DeleteUserError::Other(classify(err)),
                refused => refused,
            })
        })
    }

    fn insert_session<'a>(
        &'a self,
        hash: TokenHash,
        username: &'a str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<'a, ()> {
        classified!(self.insert_session(hash, username, now, expires_at))
    }

    fn delete_session(&self, hash: TokenHash) -> StoreResult<'_, ()> {
        classified!(self.delete_session(hash))
    }

    fn principal(&self, hash: TokenHash, now: Millis) -> StoreResult<'_, Option<Principal>> {
        classified!(self.principal(hash, now))
    }

    fn insert_api_key<'a>(&'a self, key: &'a ApiKeyRow, hash: TokenHash) -> StoreResult<'a, ()> {
        classified!(self.insert_api_key(key, hash))
    }

    fn api_keys(&self) -> StoreResult<'_, Vec<ApiKeyRow>> {
        classified!(self.api_keys())
    }

    fn delete_api_key(&self, id: Uuid) -> StoreResult<'_, bool> {
        classified!(self.delete_api_key(id))
    }

    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()> {
        classified!(self.insert_join_token(token))
    }

    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>> {
        classified!(self.join_tokens())
    }

    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>> {
        classified!(self.join_token(hash))
    }

    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool> {
        classified!(self.revoke_join_token(id, at))
    }

    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()> {
        classified!(self.insert_audit(events))
    }

    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>> {
        classified!(self.audit_events(page))
    }

    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        classified!(self.prune_audit(cutoff))
    }

    fn upkeep(&self) -> StoreResult<'_, ()> {
        classified!(async {
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
