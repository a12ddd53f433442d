//! [`FleetEventStore`] on SQLite: fleet-level events (SPEC §10), few and small.

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::fleet_event::FleetEvent;
use crate::store::sql::sqlite as sql;
use crate::store::{FleetEventStore, StoreResult};

impl FleetEventStore for SqliteStore {
    fn insert_fleet_event<'a>(&'a self, event: &'a FleetEvent) -> StoreResult<'a, i64> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_fleet_event(tx, event)) })
    }

    fn resolve_fleet_event<'a>(
        &'a self,
        id: i64,
        at: Millis,
        by: Option<&'a str>,
        resolution: &'a str,
    ) -> StoreResult<'a, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::resolve_fleet_event(tx, id, at, by, resolution)) })
    }

    fn grow_fleet_event<'a>(
        &'a self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &'a str,
    ) -> StoreResult<'a, bool> {
        Box::pin(
            async move { write_tx!(self, |tx| sql::grow_fleet_event(tx, id, nodes_affected, nodes_live, message)) },
        )
    }

    fn fleet_events(&self, limit: u32) -> StoreResult<'_, Vec<FleetEvent>> {
        Box::pin(async move { sql::fleet_events(&mut *self.reader().await?, limit).await })
    }
}
