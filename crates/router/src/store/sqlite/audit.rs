//! [`AuditStore`] on SQLite: the audit log appended in batches, read in pages, pruned by age.

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::store::sql::sqlite as sql;
use crate::store::{AuditQuery, AuditStore, StoreResult};

impl AuditStore for SqliteStore {
    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_audit(tx, events)) })
    }

    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>> {
        Box::pin(async move { sql::audit_events(&mut *self.reader().await?, page).await })
    }

    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        Box::pin(self.prune_before("audit_events", cutoff))
    }
}
