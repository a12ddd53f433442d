//! The PostgreSQL backend of [`Storage`], which any number of routers may share (SPEC §11); also
//! [`SharedStorage`]: what a router reads to follow the changes of the others.
//!
//! Every write is one transaction from a pool of connections; PostgreSQL commits concurrent transactions together,
//! so registrations and status changes that arrive together share their durable flushes without a queue of ours. A
//! failed write is undone whole (the transaction is dropped, so rolled back) and an error of the database itself
//! (connection lost or refused, disk full, shutdown) is marked [`StorageFault`].
//!
//! Files: `nodes.rs` (nodes, tokens, events, heartbeat figures), `shared.rs` (reading other routers' changes, the
//! sweep lease, notifications), `auth.rs` (users, sessions, keys), `records.rs` (join tokens, the audit log, fleet
//! events); `tests.rs` (what only this backend does, on a real server: `LLM_ROUTER_TEST_POSTGRES`).
//!
//! [`StorageFault`]: crate::store::StorageFault

mod auth;
mod nodes;
mod reach;
mod records;
mod shared;

use std::any::Any;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::{Principal, TokenHash};
use crate::model::enrollment::{JoinToken, JoinUse};
use crate::model::fleet::FleetEvent;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::store::{
    ApiKeyRow, AuditQuery, Availability, ChangeSignals, DeleteUserError, Figures, InsertError, NewNode, SharedStorage,
    Storage, StorageFault, Store, StoreResult, StoredNode, UserRow, fault_of, mark,
};

/// Migrations, embedded in the binary and applied at start-up (under PostgreSQL's advisory lock, so routers that
/// start together apply them once).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-postgres");

/// Connections of the pool: writes of concurrent requests, reads of the dashboard and of other routers' changes.
const POOL_SIZE: u32 = 16;

/// How long a write waits for a connection, and a new connection for the server, before it fails as a fault. Once
/// a call has found the server unreachable, the next ones fail at once ([`reach`]); this bounds the wait of those
/// already under way.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens the PostgreSQL database at `url` as the router's store.
pub async fn open(url: &str) -> anyhow::Result<Store> {
    Ok(Arc::new(PgStore::open(url).await?))
}

/// A pool on the database at `url` with the migrations applied: for `llm-router migrate`.
pub(in crate::store) async fn migrated_pool(url: &str) -> anyhow::Result<PgPool> {
    let redacted = redact(url);
    let options = PgConnectOptions::from_str(url).with_context(|| format!("reading the database URL {redacted}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {redacted}"))?;
    MIGRATOR.run(&pool).await.with_context(|| format!("applying migrations to {redacted}"))?;
    Ok(pool)
}

pub(in crate::store) use nodes::copy_node;

/// Handle to the database.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    options: PgConnectOptions,
    /// Writes that failed on a storage fault, for `/metrics`.
    faults: AtomicU64,
    /// This router, as the writer of heartbeat figures (`nodes.seen_by`).
    me: String,
    /// The connection holding the sweep lease, while this router holds it.
    lease: tokio::sync::Mutex<Option<shared::Lease>>,
    signals: Arc<ChangeSignals>,
    /// The revision each node's row got from this router's latest write of it.
    written: std::sync::Mutex<std::collections::HashMap<Uuid, i64>>,
    /// Stops the listener of notifications.
    stop: tokio::sync::watch::Sender<bool>,
    /// The URL without its password.
    redacted: String,
    /// Whether the server can be reached.
    reach: Arc<reach::Reach>,
}

impl PgStore {
    /// Connects to `url` and applies pending migrations.
    pub async fn open(url: &str) -> anyhow::Result<PgStore> {
        let redacted = redact(url);
        let options =
            PgConnectOptions::from_str(url).with_context(|| format!("reading the database URL {redacted}"))?;
        let options = options.application_name("llm-router");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("connecting to {redacted}"))?;
        MIGRATOR.run(&pool).await.with_context(|| format!("applying migrations to {redacted}"))?;
        let signals = Arc::new(ChangeSignals::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let reach = Arc::new(reach::Reach::default());
        shared::listen(pool.clone(), signals.clone(), reach.clone(), stopped.clone()).await?;
        reach.clone().probe(options.clone(), stopped);
        Ok(PgStore {
            pool,
            options,
            faults: AtomicU64::new(0),
            me: Uuid::new_v4().to_string(),
            lease: tokio::sync::Mutex::new(None),
            signals,
            written: std::sync::Mutex::default(),
            stop,
            redacted,
            reach,
        })
    }

    /// Marks an error as a fault when the database itself failed, and counts it; a lost or refused connection marks
    /// the server unreachable.
    fn fault(&self, err: anyhow::Error) -> anyhow::Error {
        let err = classify(err);
        match fault_of(&err) {
            Some(StorageFault::Unreachable) => {
                self.reach.suspect(&err);
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        err
    }

    fn settle<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        result.map_err(|err| self.fault(err))
    }

    /// Fails at once while the server is unreachable; then runs `call` and settles its answer.
    async fn gated<T>(&self, call: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        self.reach.gate()?;
        self.settle(call.await)
    }
}

/// The fault of an error of the database itself, as opposed to a refused statement (a constraint, a bug): a lost,
/// refused or timed-out connection is [`StorageFault::Unreachable`]; a full disk, an I/O error, a read-only database
/// [`StorageFault::Failed`].
fn storage_fault(err: &sqlx::Error) -> Option<StorageFault> {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Connection exceptions (08) and operator intervention: shutdown (57P01-57P03); insufficient resources
            // such as a full disk (53), system errors such as I/O (58), a read-only transaction (25006).
            if code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03") {
                Some(StorageFault::Unreachable)
            } else if code.starts_with("53") || code.starts_with("58") || code == "25006" {
                Some(StorageFault::Failed)
            } else {
                None
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Some(StorageFault::Unreachable),
        _ => None,
    }
}

/// Marks `err` as a [`StorageFault`] when a storage error is among its causes.
fn classify(err: anyhow::Error) -> anyhow::Error {
    let fault = err.chain().filter_map(|cause| cause.downcast_ref::<sqlx::Error>()).find_map(storage_fault);
    match fault {
        Some(fault) => mark(err, fault),
        None => err,
    }
}

/// `url` without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// `url` naming database `name` instead of its own, query string kept: for the tools that make a database of their
/// own on a server (the benchmarks, the tests).
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = url.split_once('?').map_or((url, None), |(base, query)| (base, Some(query)));
    let authority_at = base.find("://").context("not a postgres:// URL")? + 3;
    let path_at = base[authority_at..].find('/').map_or(base.len(), |i| authority_at + i);
    let mut named = format!("{}/{name}", &base[..path_at]);
    if let Some(query) = query {
        named.push('?');
        named.push_str(query);
    }
    Ok(named)
}

/// Every answer of the store has its storage errors marked [`StorageFault`] and counted, reads included; while the
/// server is unreachable, every call fails at once.
macro_rules! settled {
    ($self:ident, $body:expr) => {
        Box::pin($self.gated($body))
    };
}

/// The same for the answers whose refusals are errors of their own.
async fn settle_insert(
    store: &PgStore,
    call: impl std::future::Future<Output = Result<(), InsertError>>,
) -> Result<(), InsertError> {
    store.reach.gate().map_err(|fault| InsertError::Other(fault.into()))?;
    match call.await {
        Err(InsertError::Other(err)) => Err(InsertError::Other(store.fault(err))),
        other => other,
    }
}

impl Storage for PgStore {
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>> {
        settled!(self, self.load_nodes())
    }

    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> BoxFuture<'_, Result<(), InsertError>> {
        Box::pin(async move { settle_insert(self, self.insert_node(&node, token, &events, join.as_ref())).await })
    }

    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>> {
        settled!(self, self.import_nodes(nodes))
    }

    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> BoxFuture<'a, Result<(), InsertError>> {
        Box::pin(settle_insert(self, self.reregister_node(node, token, now, events, join)))
    }

    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        settled!(self, self.record_transition(node, event))
    }

    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()> {
        settled!(self, self.update_admin_fields(node))
    }

    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        settled!(self, self.delete_node(id, event))
    }

    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()> {
        settled!(self, self.flush_figures(batch))
    }

    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>> {
        settled!(self, self.node_events(id, limit, before))
    }

    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        settled!(self, self.prune_events(cutoff))
    }

    fn insert_fleet_event<'a>(&'a self, event: &'a FleetEvent) -> StoreResult<'a, i64> {
        settled!(self, self.insert_fleet_event(event))
    }

    fn resolve_fleet_event<'a>(
        &'a self,
        id: i64,
        at: Millis,
        by: Option<&'a str>,
        resolution: &'a str,
    ) -> StoreResult<'a, bool> {
        settled!(self, self.resolve_fleet_event(id, at, by, resolution))
    }

    fn grow_fleet_event<'a>(
        &'a self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &'a str,
    ) -> StoreResult<'a, bool> {
        settled!(self, self.grow_fleet_event(id, nodes_affected, nodes_live, message))
    }

    fn fleet_events(&self, limit: u32) -> StoreResult<'_, Vec<FleetEvent>> {
        settled!(self, self.fleet_events(limit))
    }

    fn count_users(&self) -> StoreResult<'_, i64> {
        settled!(self, self.count_users())
    }

    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool> {
        settled!(self, self.insert_user(user))
    }

    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>> {
        settled!(self, self.user(username))
    }

    fn users(&self) -> StoreResult<'_, Vec<UserRow>> {
        settled!(self, self.users())
    }

    fn delete_user<'a>(&'a self, username: &'a str) -> BoxFuture<'a, Result<(), DeleteUserError>> {
        Box::pin(async move {
            self.reach.gate().map_err(|fault| DeleteUserError::Other(fault.into()))?;
            match self.delete_user(username).await {
                Err(DeleteUserError::Other(err)) => Err(DeleteUserError::Other(self.fault(err))),
                other => other,
            }
        })
    }

    fn insert_session<'a>(
        &'a self,
        hash: TokenHash,
        username: &'a str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<'a, ()> {
        settled!(self, self.insert_session(hash, username, now, expires_at))
    }

    fn delete_session(&self, hash: TokenHash) -> StoreResult<'_, ()> {
        settled!(self, self.delete_session(hash))
    }

    fn principal(&self, hash: TokenHash, now: Millis) -> StoreResult<'_, Option<Principal>> {
        settled!(self, self.principal(hash, now))
    }

    fn insert_api_key<'a>(&'a self, key: &'a ApiKeyRow, hash: TokenHash) -> StoreResult<'a, ()> {
        settled!(self, self.insert_api_key(key, hash))
    }

    fn api_keys(&self) -> StoreResult<'_, Vec<ApiKeyRow>> {
        settled!(self, self.api_keys())
    }

    fn delete_api_key(&self, id: Uuid) -> StoreResult<'_, bool> {
        settled!(self, self.delete_api_key(id))
    }

    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()> {
        settled!(self, self.insert_join_token(token))
    }

    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>> {
        settled!(self, self.join_tokens())
    }

    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>> {
        settled!(self, self.join_token(hash))
    }

    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool> {
        settled!(self, self.revoke_join_token(id, at))
    }

    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()> {
        settled!(self, self.insert_audit(events))
    }

    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>> {
        settled!(self, self.audit_events(page))
    }

    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        settled!(self, self.prune_before("audit_events", cutoff))
    }

    fn upkeep(&self) -> StoreResult<'_, ()> {
        // PostgreSQL keeps its own house (autovacuum, checkpoints).
        Box::pin(async { Ok(()) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.stop.send(true);
            if let Some(lease) = self.lease.lock().await.take() {
                lease.close().await;
            }
            self.pool.close().await;
        })
    }

    fn storage_faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    fn availability(&self) -> Availability {
        if self.reach.reachable() { Availability::Available } else { Availability::Unreachable }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn shared(&self) -> Option<&dyn SharedStorage> {
        Some(self)
    }

    fn describe(&self) -> String {
        self.redacted.clone()
    }
}

#[cfg(test)]
mod tests;
