//! Writes the requests' records in batches, off the request path (SPEC §14): a finished request is pushed onto a
//! list in memory; every [`FLUSH_INTERVAL`] the list is taken and written in one transaction, with what it adds to
//! the roll-ups. So the records on disk are at most a flush (and its write) behind: a router killed outright loses
//! at most that last part of a second. A batch whose write failed is kept and written with the next; while the
//! storage is down, at most [`MAX_PENDING`] records wait, and what comes beyond is counted as lost, not kept.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::model::usage::UsageRecord;
use crate::store::{Store, StoreError};

/// How often the records are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Most records waiting to be written; beyond, new ones are lost (and counted).
pub const MAX_PENDING: usize = 200_000;

/// Records waiting to be written, and how many were lost.
#[derive(Default)]
pub struct Recorder {
    pending: Mutex<Vec<UsageRecord>>,
    /// One write at a time, in order.
    writing: tokio::sync::Mutex<()>,
    lost: AtomicU64,
    written: AtomicU64,
}

impl Recorder {
    /// Takes in a finished request's record.
    pub fn record(&self, record: UsageRecord) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_PENDING {
            pending.push(record);
        } else {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records lost since the start because too many waited.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Records written since the start.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Writes what waits; returns how many records. On failure the records wait for the next flush.
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().await;
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return Ok(0);
        }
        match store.insert_usage(&batch).await {
            Ok(()) => {
                self.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            Err(err) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let newer = std::mem::replace(&mut *pending, batch);
                pending.extend(newer);
                if pending.len() > MAX_PENDING {
                    let over = pending.len() - MAX_PENDING;
                    pending.truncate(MAX_PENDING);
                    self.lost.fetch_add(over as u64, Ordering::Relaxed);
                }
                Err(err)
            }
        }
    }
}
