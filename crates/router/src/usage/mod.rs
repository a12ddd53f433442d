//! Tenants (SPEC §14): what each `/v1` request used, recorded off the request path; the limits held per key and per
//! user. The proxy knows none of this: a request carries a [`Meter`], which learns how the request went and reports
//! to the [`Ledger`] once, when the answer has ended, the client has left or the request was refused.
//!
//! - `scan.rs` reads the runtime's `usage` out of an answer as it passes (and leaves out what the router asked for);
//! - `meter.rs` is a request's meter;
//! - `recorder.rs` writes the records in batches, at most a second behind;
//! - `limits.rs` admits or refuses a request by its tenant's limits.

mod limits;
mod meter;
mod recorder;
pub mod scan;

use std::sync::Arc;

pub use limits::{Admitted, Limiter, Policy, Quota, REFRESH_INTERVAL, Refused};
pub use meter::{Meter, StreamUsage};
pub use recorder::{FLUSH_INTERVAL, Recorder};

use crate::metrics::InferenceMetrics;
use crate::model::usage::UsageRecord;

/// Where a request's meter reports: the recorder, the limits, the token counters of `/metrics`.
pub struct Ledger {
    pub recorder: Recorder,
    pub limiter: Arc<Limiter>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Ledger {
    pub fn new(limiter: Arc<Limiter>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Ledger> {
        Arc::new(Ledger { recorder: Recorder::default(), limiter, metrics })
    }

    /// Writes the records that wait, then reads back what every tenant with limits has spent: every
    /// [`recorder::FLUSH_INTERVAL`], the read every [`REFRESH_INTERVAL`].
    pub async fn flush(&self, store: &crate::store::Store, refresh: bool) -> Result<(), crate::store::StoreError> {
        let flushed = self.recorder.flush(store).await;
        let figures = self.inference();
        figures.usage_written.set(self.recorder.written());
        figures.usage_lost.set(self.recorder.lost());
        figures.usage_pending.set(self.recorder.pending() as u64);
        flushed?;
        if refresh {
            self.limiter.refresh().await?;
        }
        Ok(())
    }

    fn inference(&self) -> &InferenceMetrics {
        &self.metrics.inference
    }

    /// Takes in a finished request.
    fn report(&self, record: UsageRecord) {
        if let Some(tokens) = record.tokens {
            self.inference().tokens(&record.model, &record.principal, tokens);
            self.limiter.spend(&record.principal, tokens.total());
        }
        self.recorder.record(record);
    }
}
