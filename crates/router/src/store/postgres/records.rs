//! [`EnrollmentStore`], [`AuditStore`] and [`FleetEventStore`] on PostgreSQL: join tokens, the audit log and fleet
//! events, with the statements of `store/sql.rs`.

use uuid::Uuid;

use super::PgStore;
use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinToken;
use crate::model::fleet_event::FleetEvent;
use crate::store::sql::postgres as sql;
use crate::store::{AuditQuery, AuditStore, EnrollmentStore, FleetEventStore, StoreResult};

impl EnrollmentStore for PgStore {
    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move { sql::insert_join_token(&mut *self.pool.acquire().await?, token).await }))
    }

    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>> {
        Box::pin(self.gated(async move { sql::join_tokens(&mut *self.pool.acquire().await?).await }))
    }

    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>> {
        Box::pin(self.gated(async move { sql::join_token(&mut *self.pool.acquire().await?, hash).await }))
    }

    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool> {
        Box::pin(self.gated(async move { sql::revoke_join_token(&mut *self.pool.acquire().await?, id, at).await }))
    }
}

impl AuditStore for PgStore {
    fn insert_audit<'a>(&'a self, events: &'a [AuditEvent]) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::insert_audit(&mut tx, events).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn audit_events<'a>(&'a self, page: AuditQuery<'a>) -> StoreResult<'a, Vec<RecordedAudit>> {
        Box::pin(self.gated(async move { sql::audit_events(&mut *self.pool.acquire().await?, page).await }))
    }

    fn prune_audit(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        Box::pin(self.gated(self.prune_before("audit_events", cutoff)))
    }
}

impl FleetEventStore for PgStore {
    fn insert_fleet_event<'a>(&'a self, event: &'a FleetEvent) -> StoreResult<'a, i64> {
        Box::pin(self.gated(async move { sql::insert_fleet_event(&mut *self.pool.acquire().await?, event).await }))
    }

    fn resolve_fleet_event<'a>(
        &'a self,
        id: i64,
        at: Millis,
        by: Option<&'a str>,
        resolution: &'a str,
    ) -> StoreResult<'a, bool> {
        Box::pin(self.gated(async move {
            sql::resolve_fleet_event(&mut *self.pool.acquire().await?, id, at, by, resolution).await
        }))
    }

    fn grow_fleet_event<'a>(
        &'a self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &'a str,
    ) -> StoreResult<'a, bool> {
        Box::pin(self.gated(async move {
            sql::grow_fleet_event(&mut *self.pool.acquire().await?, id, nodes_affected, nodes_live, message).await
        }))
    }

    fn fleet_events(&self, limit: u32) -> StoreResult<'_, Vec<FleetEvent>> {
        Box::pin(self.gated(async move { sql::fleet_events(&mut *self.pool.acquire().await?, limit).await }))
    }
}
