//! Rows of `audit_events`: appended in batches, read in pages, pruned by age.

use sqlx::QueryBuilder;
use sqlx::sqlite::Sqlite;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::store::{AuditQuery, rows};

impl SqliteStore {
    pub(super) async fn insert_audit(&self, events: &[AuditEvent]) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            // Seven values each, well under SQLite's limit of 32,766.
            for chunk in events.chunks(4_000) {
                let mut insert = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO audit_events (at, actor, client, action, target, outcome) ",
                );
                insert.push_values(chunk, |mut row, event| {
                    row.push_bind(event.at)
                        .push_bind(event.actor.as_str())
                        .push_bind(event.client.as_deref())
                        .push_bind(event.action.as_str())
                        .push_bind(event.target.as_deref())
                        .push_bind(event.outcome.as_str());
                });
                insert.build().execute(&mut *tx).await?;
            }
            anyhow::Ok(())
        })
    }

    pub(super) async fn audit_events(&self, page: AuditQuery<'_>) -> anyhow::Result<Vec<RecordedAudit>> {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT id, at, actor, client, action, target, outcome FROM audit_events WHERE id < ",
        );
        query.push_bind(page.before.unwrap_or(i64::MAX));
        if let Some(actor) = page.actor {
            query.push(" AND actor = ").push_bind(actor);
        }
        if let Some(action) = page.action {
            query.push(" AND action = ").push_bind(action);
        }
        query.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(page.limit));
        let rows = query.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::audit_event).collect()
    }

    pub(super) async fn prune_audit(&self, cutoff: Millis) -> anyhow::Result<u64> {
        self.prune_before("audit_events", cutoff).await
    }
}
