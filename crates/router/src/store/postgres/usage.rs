//! [`UsageStore`] on PostgreSQL: request records and their roll-ups, written in batches by each router's recorder;
//! and the shared claims on a principal's requests per minute (SPEC §14), by which routers hold one limit together.

use sqlx::Row;

use super::PgStore;
use crate::clock::Millis;
use crate::model::usage::{RecordedRequest, RequestQuery, SeriesQuery, Step, UsageBucket, UsageRecord};
use crate::store::usage_sql::{all_rollups, postgres as sql};
use crate::store::{StoreError, StoreResult, UsageStore};

/// Claims of minutes older than this are removed as new ones are made.
const CLAIMS_KEPT_MS: Millis = 10 * 60_000;

impl UsageStore for PgStore {
    fn insert_usage<'a>(&'a self, batch: &'a [UsageRecord]) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::insert_usage(&mut tx, batch).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn usage_series<'a>(&'a self, query: &'a SeriesQuery) -> StoreResult<'a, Vec<UsageBucket>> {
        Box::pin(self.gated(async move { sql::usage_series(&mut *self.pool.acquire().await?, query).await }))
    }

    fn usage_requests<'a>(&'a self, query: &'a RequestQuery) -> StoreResult<'a, Vec<RecordedRequest>> {
        Box::pin(self.gated(async move { sql::usage_requests(&mut *self.pool.acquire().await?, query).await }))
    }

    fn spent_since(&self, step: Step, since: Millis) -> StoreResult<'_, Vec<(String, u64, u64)>> {
        let table = crate::store::usage_sql::principal_table(step);
        Box::pin(self.gated(async move { sql::spent_since(&mut *self.pool.acquire().await?, table, since).await }))
    }

    fn principal_names(&self) -> StoreResult<'_, Vec<(String, String)>> {
        Box::pin(self.gated(async move { sql::principal_names(&mut *self.pool.acquire().await?).await }))
    }

    fn first_token_bins(&self, from: Millis, to: Millis) -> StoreResult<'_, Vec<(Millis, u32, u64)>> {
        Box::pin(self.gated(async move { sql::first_token_bins(&mut *self.pool.acquire().await?, from, to).await }))
    }

    fn prune_usage(&self, requests_before: Millis, rollups_before: Millis) -> StoreResult<'_, u64> {
        Box::pin(self.gated(async move {
            let mut removed = self.prune_before("usage_requests", requests_before).await?;
            for table in all_rollups() {
                loop {
                    let batch = sql::prune_rollup(&mut *self.pool.acquire().await?, table, rollups_before).await?;
                    removed += batch;
                    if batch == 0 {
                        break;
                    }
                }
            }
            Ok(removed)
        }))
    }
}

impl PgStore {
    /// See [`crate::store::SharedStorage::claim_requests`]: the minute's row is locked while the grant is decided,
    /// so routers claiming at once are served one after another and never grant more than `limit` between them.
    pub(super) async fn claim_requests(
        &self,
        principal: &str,
        minute: Millis,
        want: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO limit_windows (principal, minute, requests) VALUES ($1, $2, 0) \
             ON CONFLICT (principal, minute) DO NOTHING",
        )
        .bind(principal)
        .bind(minute)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT requests FROM limit_windows WHERE principal = $1 AND minute = $2 FOR UPDATE")
            .bind(principal)
            .bind(minute)
            .fetch_one(&mut *tx)
            .await?;
        let claimed = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
        let granted = want.min(limit.saturating_sub(claimed));
        if granted > 0 {
            sqlx::query("UPDATE limit_windows SET requests = requests + $3 WHERE principal = $1 AND minute = $2")
                .bind(principal)
                .bind(minute)
                .bind(count(granted))
                .execute(&mut *tx)
                .await?;
        }
        if claimed == 0 {
            // The first claim of a minute clears the old ones.
            sqlx::query("DELETE FROM limit_windows WHERE minute < $1")
                .bind(minute - CLAIMS_KEPT_MS)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(granted)
    }
}
