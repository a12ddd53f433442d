//! [`UsageStore`] on SQLite: request records and their roll-ups, written in batches by the recorder.

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::usage::{RecordedRequest, RequestQuery, SeriesQuery, Step, UsageBucket, UsageRecord};
use crate::store::usage_sql::{all_rollups, sqlite as sql};
use crate::store::{StoreResult, UsageStore};

impl UsageStore for SqliteStore {
    fn insert_usage<'a>(&'a self, batch: &'a [UsageRecord]) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_usage(tx, batch)) })
    }

    fn usage_series<'a>(&'a self, query: &'a SeriesQuery) -> StoreResult<'a, Vec<UsageBucket>> {
        Box::pin(async move { sql::usage_series(&mut *self.reader().await?, query).await })
    }

    fn usage_requests<'a>(&'a self, query: &'a RequestQuery) -> StoreResult<'a, Vec<RecordedRequest>> {
        Box::pin(async move { sql::usage_requests(&mut *self.reader().await?, query).await })
    }

    fn spent_since(&self, step: Step, since: Millis) -> StoreResult<'_, Vec<(String, u64, u64)>> {
        let table = crate::store::usage_sql::principal_table(step);
        Box::pin(async move { sql::spent_since(&mut *self.reader().await?, table, since).await })
    }

    fn principal_names(&self) -> StoreResult<'_, Vec<(String, String)>> {
        Box::pin(async move { sql::principal_names(&mut *self.reader().await?).await })
    }

    fn first_token_bins(&self, from: Millis, to: Millis) -> StoreResult<'_, Vec<(Millis, u32, u64)>> {
        Box::pin(async move { sql::first_token_bins(&mut *self.reader().await?, from, to).await })
    }

    fn prune_usage(&self, requests_before: Millis, rollups_before: Millis) -> StoreResult<'_, u64> {
        Box::pin(async move {
            let mut removed = self.prune_before("usage_requests", requests_before).await?;
            for table in all_rollups() {
                loop {
                    let batch = write_tx!(self, |tx| sql::prune_rollup(tx, table, rollups_before))?;
                    removed += batch;
                    if batch == 0 {
                        break;
                    }
                }
            }
            Ok(removed)
        })
    }
}
