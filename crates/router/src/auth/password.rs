//! Argon2id password hashing. Hashing is deliberately slow, so it runs on the blocking pool, never on the async
//! workers that serve heartbeats.
//!
//! Each hash also holds 19 MiB of memory while it runs, so requests hash through a [`Hasher`]: a few hashes at a
//! time, a short queue behind them, and a `429` beyond it. A burst of sign-ins then costs a bounded amount of
//! memory and CPU, and waits its turn or is told to come back, instead of growing the router by 19 MiB per caller.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Most hashes at a time by default, whatever the core count: each holds 19 MiB while it runs.
pub const MAX_DEFAULT_WORKERS: usize = 8;

/// Seconds a caller refused by a full pool is asked to wait.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The bounded pool every password hash of a request goes through.
pub struct Hasher {
    permits: Semaphore,
    workers: usize,
    /// Callers waiting for a permit now.
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
    metrics: Arc<Metrics>,
}

/// The right to run one hash; the next caller in the queue gets it when this is dropped.
pub struct HashPermit<'a> {
    _permit: SemaphorePermit<'a>,
}

/// Decrements the waiting count however the wait ends (permit, timeout, or the request going away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hasher {
    /// A pool running `workers` hashes at a time (0: one per core, at most [`MAX_DEFAULT_WORKERS`]), with at most
    /// `max_waiting` callers queued behind them, each for at most `max_wait`.
    pub fn new(workers: usize, max_waiting: usize, max_wait: Duration, metrics: Arc<Metrics>) -> Self {
        let workers = if workers == 0 { default_workers() } else { workers };
        Hasher {
            permits: Semaphore::new(workers),
            workers,
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
            metrics,
        }
    }

    /// Hashes at a time.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Callers waiting for a permit now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for a permit in the queue, or answers `429 hashing_busy` when the queue is full or the wait too long.
    pub async fn permit(&self) -> Result<HashPermit<'_>, ApiError> {
        // The semaphore is fair: with callers queued, no permit is free, so this never jumps the queue.
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(HashPermit { _permit: permit });
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            return Err(self.busy());
        }
        let permit = tokio::time::timeout(self.max_wait, self.permits.acquire()).await;
        drop(waiting);
        match permit {
            Ok(Ok(permit)) => Ok(HashPermit { _permit: permit }),
            _ => Err(self.busy()),
        }
    }

    fn busy(&self) -> ApiError {
        Metrics::inc(&self.metrics.hashes_refused);
        ApiError::TooManyRequests {
            code: "hashing_busy",
            message: "The router is checking as many passwords as it can at once; try again in a moment.".to_owned(),
            retry_after_secs: BUSY_RETRY_AFTER_SECS,
        }
    }

    /// Hashes a password into a PHC string, in turn with every other hash.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let _permit = self.permit().await?;
        Ok(hash(password).await?)
    }

    /// Checks a password against a stored PHC string, in turn with every other hash.
    pub async fn verify(&self, password: String, phc: String) -> Result<bool, ApiError> {
        let _permit = self.permit().await?;
        Ok(verify(password, phc).await?)
    }
}

/// One per core, at most [`MAX_DEFAULT_WORKERS`].
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).min(MAX_DEFAULT_WORKERS)
}

/// Hashes a password into a PHC string (`$argon2id$...`).
pub async fn hash(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash_blocking(&password)).await?
}

/// Checks a password against a stored PHC string; a malformed stored hash counts as a mismatch.
pub async fn verify(password: String, phc: String) -> anyhow::Result<bool> {
    Ok(tokio::task::spawn_blocking(move || verify_blocking(&password, &phc)).await?)
}

fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let hashed = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing a password failed: {e}"))?;
    Ok(hashed.to_string())
}

fn verify_blocking(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A strong password for the first administrator when none was configured.
pub fn generate() -> String {
    let bytes: [u8; 18] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_with_argon2id_and_verifies() {
        let phc = hash("correct horse".to_owned()).await.expect("hash");
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify("correct horse".to_owned(), phc.clone()).await.expect("verify"));
        assert!(!verify("wrong horse".to_owned(), phc).await.expect("verify"));
        assert!(!verify("x".to_owned(), "not a hash".to_owned()).await.expect("verify"));
    }

    fn pool(workers: usize, max_waiting: usize, max_wait: Duration) -> (Hasher, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (Hasher::new(workers, max_waiting, max_wait, metrics.clone()), metrics)
    }

    fn assert_busy(result: Result<HashPermit<'_>, ApiError>) {
        match result {
            Err(ApiError::TooManyRequests { code: "hashing_busy", retry_after_secs, .. }) => {
                assert_eq!(retry_after_secs, BUSY_RETRY_AFTER_SECS);
            }
            Err(other) => panic!("expected hashing_busy, got {other:?}"),
            Ok(_) => panic!("expected hashing_busy, got a permit"),
        }
    }

    #[tokio::test]
    async fn a_full_pool_with_no_queue_refuses_at_once() {
        let (hasher, metrics) = pool(1, 0, Duration::from_secs(60));
        let held = hasher.permit().await.expect("the only permit");
        assert_busy(hasher.permit().await);
        assert_eq!(metrics.hashes_refused.load(Ordering::Relaxed), 1);
        drop(held);
        assert!(hasher.permit().await.is_ok(), "the permit is free again");
    }

    #[tokio::test]
    async fn queued_callers_get_the_permit_in_turn_or_give_up_after_the_wait() {
        let (hasher, metrics) = pool(1, 1, Duration::from_millis(50));
        let held = hasher.permit().await.expect("the only permit");
        // One caller may wait; it gives up after 50 ms, and the queue is free again.
        assert_busy(hasher.permit().await);
        assert_eq!(hasher.waiting.load(Ordering::Relaxed), 0);
        let (waiter, second) = tokio::join!(hasher.permit(), async {
            tokio::task::yield_now().await;
            // The queue's one place is taken by `waiter`.
            let refused = hasher.permit().await;
            drop(held);
            refused
        });
        assert!(waiter.is_ok(), "the queued caller got the permit once it was released");
        assert_busy(second);
        assert_eq!(metrics.hashes_refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_default_pool_is_one_hash_per_core_within_the_memory_cap() {
        let (hasher, _) = pool(0, 4, Duration::from_secs(1));
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(hasher.workers(), cores.min(MAX_DEFAULT_WORKERS));
        assert!(hasher.workers() >= 1);
    }

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 36);
        assert_ne!(a, b);
    }
}
