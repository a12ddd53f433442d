//! The database file the router opened, watched. Deleted or replaced under a running router (an `rm`, a `mv` of
//! another file over it), the file the router writes to is no longer the one a restart opens: every write from then
//! on would be acknowledged and lost. So the writer looks at the file before it begins a transaction and after it
//! commits one, and the upkeep every 250 ms: once the database file or its write-ahead log is not the one opened
//! (another inode, or gone), the store is lost: every write is refused as [`StorageFault::Lost`] (503 to clients),
//! reads and routing go on from the open file, and the router says so loudly, in the log, `/healthz` and
//! `/metrics`. It also writes what the open file holds to `router.db.recovered` beside it (SQLite's `VACUUM INTO`,
//! a consistent copy with the write-ahead log's commits), so that nothing it acknowledged is lost: the operator
//! moves that file to `router.db` and starts the router again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::sqlite::SqlitePool;

use crate::store::StorageFault;

/// A file's identity: device and inode.
type Identity = (u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    std::fs::metadata(path).ok().map(|meta| (meta.dev(), meta.ino()))
}

/// The database file and its write-ahead log as opened, and whether they are gone.
#[derive(Debug)]
pub(super) struct FileWatch {
    db: PathBuf,
    wal: PathBuf,
    opened: (Option<Identity>, Option<Identity>),
    lost: AtomicBool,
    /// A connection to the open file, for the copy of what it holds.
    reader: SqlitePool,
}

impl FileWatch {
    /// Watches `db` (and its `-wal`) as they are now: call once the store has opened them.
    pub(super) fn new(db: &Path, wal: &Path, reader: SqlitePool) -> FileWatch {
        let opened = (identity(db), identity(wal));
        FileWatch { db: db.to_owned(), wal: wal.to_owned(), opened, lost: AtomicBool::new(false), reader }
    }

    /// The fault of every write once the file is gone.
    pub(super) fn gate(&self) -> Result<(), StorageFault> {
        if self.lost.load(Ordering::Relaxed) { Err(StorageFault::Lost) } else { Ok(()) }
    }

    /// Looks at the files again: `Err(Lost)` when they are not the ones opened (now or before).
    pub(super) fn check(&self) -> Result<(), StorageFault> {
        self.gate()?;
        let (db, wal) = self.opened;
        let current = identity(&self.db) == db && (wal.is_none() || identity(&self.wal) == wal);
        if current {
            return Ok(());
        }
        if !self.lost.swap(true, Ordering::Relaxed) {
            self.report();
        }
        Err(StorageFault::Lost)
    }

    /// Says loudly what happened, and copies what the open file holds beside it.
    fn report(&self) {
        let recovered = recovered_path(&self.db);
        tracing::error!(
            database = %self.db.display(),
            "THE DATABASE FILE WAS DELETED OR REPLACED while the router ran: every write is refused from now on \
             (503 storage_unavailable), so that none is acknowledged and lost; reads and routing go on. The router \
             copies what it holds to {}; move that file to {} and restart the router",
            recovered.display(),
            self.db.display()
        );
        let (reader, db) = (self.reader.clone(), self.db.clone());
        tokio::spawn(async move {
            match copy_out(&reader, &recovered).await {
                Ok(()) => tracing::error!(
                    copy = %recovered.display(),
                    "the database as this router held it is in {}: stop the router, move it to {}, and start again",
                    recovered.display(),
                    db.display()
                ),
                Err(err) => tracing::error!(
                    error = %format!("{err:#}"),
                    "copying the database out failed; restore {} from a backup before restarting",
                    db.display()
                ),
            }
        });
    }
}

/// Where the copy of a lost database goes: `router.db.recovered`, or with a number when that exists.
fn recovered_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".recovered");
    let first = PathBuf::from(&name);
    (1..)
        .map(|n| if n == 1 { first.clone() } else { PathBuf::from(format!("{}.{n}", first.display())) })
        .find(|path| !path.exists())
        .unwrap_or(first)
}

/// Writes a consistent copy of the open database (its write-ahead log included) to `to`.
async fn copy_out(reader: &SqlitePool, to: &Path) -> anyhow::Result<()> {
    let target = to.to_str().ok_or_else(|| anyhow::anyhow!("the path {} is not UTF-8", to.display()))?;
    sqlx::query("VACUUM INTO ?").bind(target).execute(reader).await?;
    Ok(())
}
