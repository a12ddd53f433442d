//! What the store answers when it does not do what it was asked: [`StoreError`], which the layers above match on,
//! and the [`StorageFault`]s within it, decided here from the database's own error codes for both backends.

use crate::model::enrollment::Unusable;

/// What the storage could not do, by whose fault: nothing of the write was kept, and the same write may succeed once
/// the fault is gone (for [`StorageFault::Lost`], once the router is restarted on a restored database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StorageFault {
    /// The database refused or failed the write: its disk is full, an I/O error, it became read-only.
    #[error("the database could not be written (disk full or I/O error)")]
    Failed,
    /// The database cannot be reached: its server is down or the connection to it was lost.
    #[error("the database is unreachable")]
    Unreachable,
    /// The database file was deleted or replaced while the router ran: what is written to it now would be lost.
    #[error("the database file was deleted or replaced while the router ran")]
    Lost,
}

/// Why the store did not do what it was asked. Nothing of a write that fails was kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage itself failed (503 to a client); the cause for the log.
    #[error("{fault}: {cause}")]
    Fault { fault: StorageFault, cause: String },
    /// A row with this key is stored already: a node of this machine name and port, a username.
    #[error("a row with this key is stored already")]
    Duplicate,
    /// The join token stopped being usable before its use could be counted (used up by a racing registration,
    /// revoked, expired).
    #[error("the join token cannot be used: {0:?}")]
    JoinToken(Unusable),
    /// There is no such row.
    #[error("no such row")]
    NotFound,
    /// The last administrator cannot be deleted.
    #[error("the last administrator cannot be deleted")]
    LastAdmin,
    /// Anything else: a row the store cannot read, a refused statement. A bug, answered 500.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl StoreError {
    /// The storage fault this is, if it is one.
    pub fn fault(&self) -> Option<StorageFault> {
        match self {
            StoreError::Fault { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    /// The same error, for another caller of the same failed commit: a group commit answers each of its callers.
    pub fn for_another(&self) -> StoreError {
        match self {
            StoreError::Fault { fault, cause } => StoreError::Fault { fault: *fault, cause: cause.clone() },
            StoreError::Duplicate => StoreError::Duplicate,
            StoreError::JoinToken(why) => StoreError::JoinToken(*why),
            StoreError::NotFound => StoreError::NotFound,
            StoreError::LastAdmin => StoreError::LastAdmin,
            StoreError::Other(err) => StoreError::Other(anyhow::anyhow!("{err:#}")),
        }
    }

    /// A fault without a database error behind it (the gate of an unreachable server, a lost file).
    pub fn of(fault: StorageFault) -> StoreError {
        StoreError::Fault { fault, cause: fault.to_string() }
    }
}

impl From<StorageFault> for StoreError {
    fn from(fault: StorageFault) -> Self {
        StoreError::of(fault)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            return StoreError::Duplicate;
        }
        match storage_fault(&err) {
            Some(fault) => StoreError::Fault { fault, cause: err.to_string() },
            None => StoreError::Other(err.into()),
        }
    }
}

impl From<anyhow::Error> for StoreError {
    /// A row the store could not read, a value it could not encode: not the storage's fault.
    fn from(err: anyhow::Error) -> Self {
        StoreError::Other(err)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        StoreError::Other(err.into())
    }
}

/// The fault of an error of the database itself, as opposed to a refused statement (a constraint, a bug): a lost,
/// refused or timed-out connection is [`StorageFault::Unreachable`]; a full disk, an I/O error, a read-only or
/// locked database [`StorageFault::Failed`]. Each backend's codes are its own: SQLite's result codes, PostgreSQL's
/// SQLSTATEs.
fn storage_fault(err: &sqlx::Error) -> Option<StorageFault> {
    match err {
        sqlx::Error::Database(db) if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() => {
            let code = db.code().unwrap_or_default();
            // Connection exceptions (08) and operator intervention, a shutdown (57P01-57P03); insufficient
            // resources such as a full disk (53), system errors such as I/O (58), a read-only transaction (25006).
            if code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03") {
                Some(StorageFault::Unreachable)
            } else if code.starts_with("53") || code.starts_with("58") || code == "25006" {
                Some(StorageFault::Failed)
            } else {
                None
            }
        }
        sqlx::Error::Database(db) => {
            // SQLite's primary result codes: BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN,
            // PROTOCOL, NOTADB.
            let code = db.code().and_then(|code| code.parse::<i32>().ok()).unwrap_or(0);
            matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 15 | 26).then_some(StorageFault::Failed)
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
