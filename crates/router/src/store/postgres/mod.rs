//! The PostgreSQL backend of [`Storage`], which any number of routers may share (SPEC §11); also
//! [`SharedStorage`]: what a router reads to follow the changes of the others.
//!
//! Every write is one transaction from a pool of connections; PostgreSQL commits concurrent transactions together,
//! so registrations and status changes that arrive together share their durable flushes without a queue of ours. A
//! failed write is undone whole (the transaction is dropped, so rolled back) and an error of the database itself
//! (connection lost or refused, disk full, shutdown) is a [`StoreError::Fault`]. Every call goes through
//! [`PgStore::gated`], which fails at once while the server is unreachable (`reach.rs`).
//!
//! Each file implements its part of the contract for this backend, with no layer in between: `nodes.rs`
//! ([`NodeStore`](crate::store::NodeStore): nodes, tokens, events, heartbeat figures) with `node_rows.rs` (the
//! statements on a node's rows that it and `shared.rs` use), `auth.rs` (users, sessions, keys), `records.rs` (join
//! tokens, the audit log, fleet events), `shared.rs` ([`SharedStorage`]: other routers' changes, the sweep lease,
//! notifications); `tests.rs` (what only this backend does, on a real server: `LLM_ROUTER_TEST_POSTGRES`). The
//! statements both backends share are in `store/sql.rs`.

mod auth;
mod deployments;
mod node_rows;
mod nodes;
mod reach;
mod records;
mod shared;
mod usage;

use std::any::Any;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::store::{Availability, ChangeSignals, SharedStorage, Storage, StorageFault, Store, StoreError, StoreResult};

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

pub(in crate::store) use node_rows::copy_node;

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

    /// Counts a storage fault; a lost or refused connection makes the store suspect the server.
    fn note(&self, err: &StoreError) {
        match err.fault() {
            Some(StorageFault::Unreachable) => {
                self.reach.suspect(err);
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// Fails at once while the server is unreachable; then runs `call`, noting its fault if it has one.
    async fn gated<T>(&self, call: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.reach.gate()?;
        call.await.inspect_err(|err| self.note(err))
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

/// The variable naming the PostgreSQL server this crate's tests make their databases on; `scripts/test.sh` starts a
/// throw-away server and sets it.
const TEST_SERVER_VAR: &str = "LLM_ROUTER_TEST_POSTGRES";

/// The PostgreSQL server this crate's tests make their databases on (`LLM_ROUTER_TEST_POSTGRES`), when it is set.
#[doc(hidden)]
pub fn test_server_url() -> Option<String> {
    std::env::var(TEST_SERVER_VAR).ok().filter(|url| !url.is_empty())
}

/// [`test_server_url`], for a test that needs a PostgreSQL server; without one, `None`, for the test to return on:
/// this crate's tests, unit and API, decide here whether a test without its server is skipped or fails. Skipped
/// with a line on stderr, so that `cargo test` runs on a machine without PostgreSQL; but under CI (`CI` set, as CI
/// services set it), where a skipped test would pass unnoticed, it fails for the same reason.
#[doc(hidden)]
pub fn test_server() -> Option<String> {
    use std::io::Write;
    if let Some(url) = test_server_url() {
        return Some(url);
    }
    // libtest runs each test on a thread named after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let reason = format!("needs a PostgreSQL server ({TEST_SERVER_VAR} unset; scripts/test.sh starts one)");
    if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
        panic!("{test}: {reason}; not skipped under CI (CI is set)");
    }
    // Straight to the process's stderr: libtest keeps what a passing test prints with `eprintln!` to itself.
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {reason}");
    None
}

impl Storage for PgStore {
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
