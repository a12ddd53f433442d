//! The chores of a start, around the wiring of `app.rs`: the data directory and its database file, the import of
//! a legacy `nodes.json`, the first administrator, the open-file limit, and the signal handlers (SIGHUP reloads the
//! certificate; SIGINT and SIGTERM shut down).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;

use crate::auth::credentials::{Credentials, FirstAdmin};
use crate::clock::Millis;
use crate::config::Settings;
use crate::legacy::LegacyFile;
use crate::server;
use crate::store::{NewNode, Store};
use crate::tls::Tls;

pub(super) async fn import_legacy(store: &Store, legacy: &LegacyFile, now: Millis) -> anyhow::Result<()> {
    for skipped in &legacy.skipped {
        tracing::warn!("nodes.json: not imported: {skipped}");
    }
    let nodes: Vec<NewNode> = legacy
        .nodes
        .iter()
        .map(|node| NewNode { node: node.clone(), token: None, events: vec![LegacyFile::event(node, now)] })
        .collect();
    let added = store.import_nodes(&nodes).await.context("importing nodes.json")?;
    tracing::info!(
        imported = added.len(),
        already_present = nodes.len() - added.len(),
        skipped = legacy.skipped.len(),
        "nodes.json imported; the agents of these nodes register again and an administrator approves them"
    );
    legacy.mark_migrated()
}

/// The file that records that the data directory holds a database.
const INITIALISED_MARKER: &str = "initialised";

/// Returns whether the data directory was initialised before. A database file that is missing or empty (0 bytes)
/// in an initialised directory is a fault (a truncated or lost file), not a fresh install: creating a new, empty
/// fleet over it would hide the loss, so the start stops.
pub(super) fn check_database_file(settings: &Settings) -> anyhow::Result<bool> {
    let marker = settings.data_dir.join(INITIALISED_MARKER);
    let database = settings.database_path();
    let size = std::fs::metadata(&database).map(|meta| meta.len()).ok();
    if !marker.exists() {
        return Ok(size.is_some_and(|size| size > 0));
    }
    match size {
        Some(size) if size > 0 => Ok(true),
        found => anyhow::bail!(
            "the database {} is {} although this data directory was initialised ({} exists): it was truncated or \
             lost. Restore it from a backup (see docs/operations.md, Backups); to start afresh with an empty fleet \
             instead, remove {}",
            database.display(),
            if found.is_some() { "empty (0 bytes)" } else { "missing" },
            marker.display(),
            marker.display()
        ),
    }
}

/// Records that the data directory holds a database, once it has been created.
pub(super) fn mark_initialised(settings: &Settings, now: Millis) -> anyhow::Result<()> {
    let marker = settings.data_dir.join(INITIALISED_MARKER);
    let text = format!(
        "llm-router: router.db in this directory was created on {}. While this file exists, a missing or empty \
         router.db stops the start instead of creating an empty one.\n",
        crate::clock::rfc3339(now)
    );
    std::fs::write(&marker, text).with_context(|| format!("cannot write {}", marker.display()))
}

pub(super) fn ensure_writable_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("data directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Creates the first administrator when there is no user yet (SPEC §9): with `LLM_ROUTER_ADMIN_PASSWORD`, or a
/// generated password printed once on the console.
pub(super) async fn create_first_admin(credentials: &Credentials, settings: &Settings) -> anyhow::Result<()> {
    let created = credentials.ensure_first_admin(&settings.admin_username, settings.admin_password.as_deref()).await?;
    match created {
        // Printed once, on the console, and never again: it is not stored anywhere in clear.
        Some(FirstAdmin { username, password: Some(password) }) => println!(
            "llm-router created administrator `{username}` with password: {password}\n(shown only now; set LLM_ROUTER_ADMIN_PASSWORD to choose it)"
        ),
        Some(FirstAdmin { username, password: None }) => {
            tracing::info!(%username, "created administrator from LLM_ROUTER_ADMIN_PASSWORD")
        }
        None => {}
    }
    Ok(())
}

/// Logs the open-file limits and the connection cap they give; warns when a configured cap exceeds what they allow.
pub(super) fn log_open_file_limit(limit: &server::OpenFileLimit, configured: Option<usize>) {
    let show = |value: Option<u64>| value.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    let derived = server::default_max_connections(limit.soft);
    let max_connections = configured.unwrap_or(derived);
    if let Some(error) = &limit.error {
        tracing::warn!(soft = %show(limit.soft), hard = %show(limit.hard), %error, "cannot raise the open-file limit");
    }
    tracing::info!(
        soft_before = %show(limit.soft_before),
        soft = %show(limit.soft),
        hard = %show(limit.hard),
        max_connections,
        "open-file limit"
    );
    if max_connections > derived {
        tracing::warn!(
            max_connections,
            open_file_limit = %show(limit.soft),
            "--max-connections exceeds what the open-file limit allows ({derived}); accepts may fail with too many open files"
        );
    }
}

/// Reads the certificate files again on every SIGHUP; a failed reload keeps the certificate in use.
pub(super) fn reload_on_hangup(tls: Arc<Tls>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded; new connections get it"),
                Err(err) => tracing::error!(
                    error = %format!("{err:#}"),
                    "TLS certificate not reloaded; the one in use stays"
                ),
            }
        }
    });
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is first
/// polled, so a signal that arrives right after the start is a clean shutdown.
pub(super) fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
