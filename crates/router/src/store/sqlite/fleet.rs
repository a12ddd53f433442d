//! Rows of `fleet_events`: fleet-level events (SPEC §10), few and small.

use sqlx::Row;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::fleet::FleetEvent;
use crate::store::rows;

impl SqliteStore {
    pub(super) async fn insert_fleet_event(&self, event: &FleetEvent) -> anyhow::Result<i64> {
        write_tx!(self, |tx| async {
            let row = sqlx::query(
                "INSERT INTO fleet_events (at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, \
                 resolution) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(event.at)
            .bind(&event.kind)
            .bind(&event.message)
            .bind(i64::try_from(event.nodes_affected).unwrap_or(i64::MAX))
            .bind(i64::try_from(event.nodes_live).unwrap_or(i64::MAX))
            .bind(event.resolved_at)
            .bind(&event.resolved_by)
            .bind(&event.resolution)
            .fetch_one(&mut *tx)
            .await?;
            anyhow::Ok(row.try_get::<i64, _>(0)?)
        })
    }

    pub(super) async fn resolve_fleet_event(
        &self,
        id: i64,
        at: Millis,
        by: Option<&str>,
        resolution: &str,
    ) -> anyhow::Result<bool> {
        write_tx!(self, |tx| async {
            let done = sqlx::query(
                "UPDATE fleet_events SET resolved_at = ?, resolved_by = ?, resolution = ? \
                 WHERE id = ? AND resolved_at IS NULL",
            )
            .bind(at)
            .bind(by)
            .bind(resolution)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            anyhow::Ok(done.rows_affected() > 0)
        })
    }

    pub(super) async fn grow_fleet_event(
        &self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &str,
    ) -> anyhow::Result<bool> {
        write_tx!(self, |tx| async {
            let done = sqlx::query(
                "UPDATE fleet_events SET nodes_affected = ?, nodes_live = ?, message = ? \
                 WHERE id = ? AND resolved_at IS NULL",
            )
            .bind(i64::try_from(nodes_affected).unwrap_or(i64::MAX))
            .bind(i64::try_from(nodes_live).unwrap_or(i64::MAX))
            .bind(message)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            anyhow::Ok(done.rows_affected() > 0)
        })
    }

    pub(super) async fn fleet_events(&self, limit: u32) -> anyhow::Result<Vec<FleetEvent>> {
        let rows = sqlx::query(
            "SELECT id, at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, resolution \
             FROM fleet_events ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::fleet_event).collect()
    }
}
