//! Argon2id password hashing through a bounded pool.
//!
//! Each hash is deliberately slow and fills 19 MiB of memory, so hashes never run on the async workers that serve
//! heartbeats, nor one per caller: they run on a few threads of their own (about one per core), each of which
//! allocates its Argon2 memory once and reuses it for every hash. In front of them, a short queue; beyond it a
//! `429`. A burst of sign-ins therefore waits its turn or is told to come back, and the router's memory stays what
//! those threads hold, whatever the number of callers. (Allocating the 19 MiB per hash instead leaves the C
//! allocator keeping tens of MiB per thread that ever hashed, which is how parallel wrong-password sign-ins once
//! grew the router to gigabytes.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, anyhow};
use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};

use crate::metrics::Metrics;

/// Why a password could not be hashed or checked.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The pool and its queue are full, or the wait was too long: the caller should come back shortly.
    #[error("The router is checking as many passwords as it can at once; try again in a moment.")]
    Busy,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Most hashes at a time by default, whatever the core count: each worker holds 19 MiB.
pub const MAX_DEFAULT_WORKERS: usize = 8;

/// Seconds a caller refused by a full pool is asked to wait.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The largest Argon2 memory a stored hash may ask for (64 MiB); a hash asking more never verifies, rather than
/// letting one row of the database make every worker hold that much.
const MAX_BLOCKS: usize = 64 * 1024;

/// Work for a hashing thread, given that thread's Argon2 memory.
type Job = Box<dyn FnOnce(&mut Memory) + Send>;

/// The Argon2 memory of one hashing thread, allocated on first use and reused.
pub struct Memory(Vec<Block>);

impl Memory {
    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.0.len() < count {
            self.0.resize(count, Block::new());
        }
        &mut self.0[..count]
    }
}

/// The bounded pool every password hash goes through.
pub struct Hasher {
    permits: Semaphore,
    workers: usize,
    /// Callers waiting for a permit now.
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Callers waiting now, by client address (IPv6 by /64): no address may hold more than a share of the queue.
    waiting_by_source: Mutex<HashMap<IpAddr, usize>>,
    max_wait: Duration,
    metrics: Arc<Metrics>,
    /// To the hashing threads; they stop when it is dropped with the pool.
    jobs: mpsc::Sender<Job>,
}

/// The right to run one hash; the next caller in the queue gets it when this is dropped.
pub struct HashPermit<'a> {
    _permit: SemaphorePermit<'a>,
}

/// Decrements the waiting counts however the wait ends (permit, timeout, or the request going away).
struct Waiting<'a> {
    hasher: &'a Hasher,
    source: Option<IpAddr>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.hasher.waiting.fetch_sub(1, Ordering::Relaxed);
        if let Some(source) = self.source {
            let mut by_source = self.hasher.sources();
            if let Some(count) = by_source.get_mut(&source) {
                *count -= 1;
                if *count == 0 {
                    by_source.remove(&source);
                }
            }
        }
    }
}

/// The share of the queue one client address may hold: a quarter, at least one place.
pub fn max_waiting_per_source(max_waiting: usize) -> usize {
    (max_waiting / 4).max(1)
}

impl Hasher {
    /// A pool of `workers` hashing threads (0: one per core, at most [`MAX_DEFAULT_WORKERS`]), with at most
    /// `max_waiting` callers queued behind them, each for at most `max_wait`.
    pub fn new(workers: usize, max_waiting: usize, max_wait: Duration, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let workers = if workers == 0 { default_workers() } else { workers };
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..workers {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("password-hash".to_owned())
                .spawn(move || work(&queue))
                .context("starting a password hashing thread")?;
        }
        Ok(Hasher {
            permits: Semaphore::new(workers),
            workers,
            waiting: AtomicUsize::new(0),
            max_waiting,
            waiting_by_source: Mutex::new(HashMap::new()),
            max_wait,
            metrics,
            jobs,
        })
    }

    /// Hashes at a time.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Callers waiting for a permit now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.waiting_by_source.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a permit in the queue, or refuses ([`HashError::Busy`], a 429 to the client) when the queue is
    /// full, when `source` (the client's address, if a client asks) holds its share of it, or when the wait is too
    /// long.
    pub async fn permit(&self, source: Option<IpAddr>) -> Result<HashPermit<'_>, HashError> {
        // The semaphore is fair: with callers queued, no permit is free, so this never jumps the queue.
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(HashPermit { _permit: permit });
        }
        let source = source.map(crate::net::limit_key);
        if let Some(source) = source {
            let mut by_source = self.sources();
            let held = by_source.entry(source).or_insert(0);
            if *held >= max_waiting_per_source(self.max_waiting) {
                if *held == 0 {
                    by_source.remove(&source);
                }
                drop(by_source);
                return Err(self.busy());
            }
            *held += 1;
        }
        let waiting = Waiting { hasher: self, source };
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

    fn busy(&self) -> HashError {
        Metrics::inc(&self.metrics.hashes_refused);
        HashError::Busy
    }

    /// Runs `work` on a hashing thread once a permit is free.
    async fn run<T: Send + 'static>(
        &self,
        source: Option<IpAddr>,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self.permit(source).await?;
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move |memory| {
                let _ = done.send(work(memory));
            }))
            .map_err(|_| anyhow!("the password hashing threads have stopped"))?;
        Ok(answer.await.map_err(|_| anyhow!("a password hash failed on its thread"))?)
    }

    /// Hashes a password into a PHC string (`$argon2id$...`), in turn with every other hash.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        Ok(self.run(None, move |memory| hash_with(memory, &password)).await??)
    }

    /// Checks a password a client at `source` sent against a stored PHC string, in turn with every other hash; a
    /// malformed stored hash counts as a mismatch.
    pub async fn verify(&self, password: String, phc: String, source: IpAddr) -> Result<bool, HashError> {
        self.run(Some(source), move |memory| verify_with(memory, &password, &phc)).await
    }
}

/// A hashing thread: runs jobs until the pool is dropped. A job that panics loses its answer (the caller gets an
/// internal error), not the thread. Its Argon2 memory is given back after [`KEEP_MEMORY_IDLE`] without a job.
fn work(queue: &Mutex<mpsc::Receiver<Job>>) {
    let mut memory = Memory(Vec::new());
    loop {
        let job = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv_timeout(KEEP_MEMORY_IDLE);
        let job = match job {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                memory = Memory(Vec::new());
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let run = std::panic::AssertUnwindSafe(|| job(&mut memory));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!("a password hash panicked");
        }
    }
}

/// How long a hashing thread keeps its Argon2 memory after its last hash: a router that has no sign-in to check
/// holds none of it.
const KEEP_MEMORY_IDLE: Duration = Duration::from_secs(60);

/// The stored hash a sign-in with an unknown username is checked against, so that it costs what a wrong password
/// costs and the answer does not tell which names exist: a hash of a random password nobody kept, with the
/// parameters of every new hash (a test holds them equal). A constant, rather than a hash made at every start,
/// which took a hashing thread's 19 MiB and tens of milliseconds of each start.
pub const UNKNOWN_USER_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$qHP8N5lYSQpb2m1fKXR/pw$IJ/V+eoXD+Fm/MaLLgdtFf1g6zKJ3NPLgtzwiQG5BvM";

/// One per core, at most [`MAX_DEFAULT_WORKERS`].
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).min(MAX_DEFAULT_WORKERS)
}

/// Argon2id with the crate's default parameters (19 MiB, 2 passes, 1 lane) and a fresh 16-byte salt.
fn hash_with(memory: &mut Memory, password: &str) -> anyhow::Result<String> {
    let params = Params::default();
    let (algorithm, version) = (Algorithm::Argon2id, Version::V0x13);
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    Argon2::new(algorithm, version, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, memory.blocks(params.block_count()))
        .map_err(|e| anyhow!("hashing a password failed: {e}"))?;
    let phc = PasswordHash {
        algorithm: algorithm.ident(),
        version: Some(version.into()),
        params: ParamsString::try_from(&params).map_err(|e| anyhow!("encoding Argon2 parameters: {e}"))?,
        salt: Some(Salt::new(&salt).map_err(|e| anyhow!("encoding a salt: {e}"))?),
        hash: Some(Output::new(&out).map_err(|e| anyhow!("encoding a hash: {e}"))?),
    };
    Ok(phc.to_string())
}

/// Recomputes the hash of `password` with the algorithm, version, parameters and salt stored in `phc`, and compares
/// it with the stored one in constant time.
fn verify_with(memory: &mut Memory, password: &str, phc: &str) -> bool {
    let Ok(stored) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else { return false };
    let Ok(params) = Params::try_from(&stored) else { return false };
    let Ok(algorithm) = Algorithm::try_from(stored.algorithm.as_str()) else { return false };
    let version = match stored.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    if params.block_count() > MAX_BLOCKS {
        tracing::warn!(kib = params.block_count(), "a stored password hash asks for more memory than allowed");
        return false;
    }
    let mut buffer = [0u8; Output::MAX_LENGTH];
    let Some(out) = buffer.get_mut(..expected.len()) else { return false };
    let blocks = memory.blocks(params.block_count());
    if Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut *out, blocks)
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(out).is_ok_and(|computed| computed == *expected)
}

/// A strong password for the first administrator when none was configured.
pub fn generate() -> String {
    let bytes: [u8; 18] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{PasswordHasher, PasswordVerifier};

    fn client() -> IpAddr {
        IpAddr::from([198, 51, 100, 7])
    }

    fn pool(workers: usize, max_waiting: usize, max_wait: Duration) -> (Hasher, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (Hasher::new(workers, max_waiting, max_wait, metrics.clone()).expect("pool"), metrics)
    }

    #[tokio::test]
    async fn hashes_with_argon2id_and_verifies() {
        let (hasher, _) = pool(1, 4, Duration::from_secs(60));
        let phc = hasher.hash("correct horse".to_owned()).await.expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(hasher.verify("correct horse".to_owned(), phc.clone(), client()).await.expect("verify"));
        assert!(!hasher.verify("wrong horse".to_owned(), phc.clone(), client()).await.expect("verify"));
        assert!(!hasher.verify("x".to_owned(), "not a hash".to_owned(), client()).await.expect("verify"));
        let other = hasher.hash("correct horse".to_owned()).await.expect("hash");
        assert_ne!(phc, other, "every hash has its own salt");
    }

    #[tokio::test]
    async fn reused_memory_agrees_with_the_reference_implementation() {
        // Hashes stored before the pool existed, and hashes with other parameters, verify; ours verify elsewhere.
        let (hasher, _) = pool(1, 4, Duration::from_secs(60));
        let reference = Argon2::default().hash_password(b"stored before").expect("hash").to_string();
        let small =
            Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(4096, 3, 2, Some(24)).expect("params"))
                .hash_password(b"other parameters")
                .expect("hash")
                .to_string();
        for _ in 0..2 {
            assert!(hasher.verify("stored before".to_owned(), reference.clone(), client()).await.expect("verify"));
            assert!(hasher.verify("other parameters".to_owned(), small.clone(), client()).await.expect("verify"));
            assert!(!hasher.verify("other parameters!".to_owned(), small.clone(), client()).await.expect("verify"));
        }
        let ours = hasher.hash("made here".to_owned()).await.expect("hash");
        let parsed = PasswordHash::new(&ours).expect("PHC string");
        assert!(Argon2::default().verify_password(b"made here", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"made there", &parsed).is_err());
    }

    #[tokio::test]
    async fn a_stored_hash_asking_for_too_much_memory_never_verifies() {
        let (hasher, _) = pool(1, 4, Duration::from_secs(60));
        let m_cost = u32::try_from(MAX_BLOCKS + 4).expect("m");
        let greedy = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(m_cost, 1, 1, None).expect("params"))
            .hash_password(b"right password")
            .expect("hash")
            .to_string();
        assert!(!hasher.verify("right password".to_owned(), greedy, client()).await.expect("verify"));
    }

    fn assert_busy(result: Result<HashPermit<'_>, HashError>) {
        match result {
            Err(HashError::Busy) => {}
            Err(other) => panic!("expected hashing_busy, got {other:?}"),
            Ok(_) => panic!("expected hashing_busy, got a permit"),
        }
    }

    #[tokio::test]
    async fn a_full_pool_with_no_queue_refuses_at_once() {
        let (hasher, metrics) = pool(1, 0, Duration::from_secs(60));
        let held = hasher.permit(None).await.expect("the only permit");
        assert_busy(hasher.permit(None).await);
        assert!(matches!(hasher.verify("x".to_owned(), "y".to_owned(), client()).await, Err(HashError::Busy)));
        assert_eq!(metrics.hashes_refused.get(), 2);
        drop(held);
        assert!(hasher.permit(None).await.is_ok(), "the permit is free again");
    }

    #[tokio::test]
    async fn queued_callers_get_the_permit_in_turn_or_give_up_after_the_wait() {
        let (hasher, metrics) = pool(1, 1, Duration::from_millis(50));
        let held = hasher.permit(None).await.expect("the only permit");
        // One caller may wait; it gives up after 50 ms, and the queue is free again.
        assert_busy(hasher.permit(None).await);
        assert_eq!(hasher.waiting(), 0);
        let (waiter, second) = tokio::join!(hasher.permit(None), async {
            tokio::task::yield_now().await;
            // The queue's one place is taken by `waiter`.
            let refused = hasher.permit(None).await;
            drop(held);
            refused
        });
        assert!(waiter.is_ok(), "the queued caller got the permit once it was released");
        assert_busy(second);
        assert_eq!(metrics.hashes_refused.get(), 2);
    }

    /// `permit`, polled once: the caller takes its place in the queue and keeps it while the future is kept.
    async fn queued<'a>(
        permit: impl Future<Output = Result<HashPermit<'a>, HashError>> + 'a,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<HashPermit<'a>, HashError>> + 'a>> {
        let mut permit = Box::pin(permit);
        assert!(tokio::time::timeout(Duration::ZERO, permit.as_mut()).await.is_err(), "waits in the queue");
        permit
    }

    #[tokio::test]
    async fn one_address_holds_at_most_a_quarter_of_the_queue() {
        let (hasher, metrics) = pool(1, 8, Duration::from_secs(60));
        let held = hasher.permit(None).await.expect("the only permit");
        let attacker = IpAddr::from([203, 0, 113, 9]);
        let a = queued(hasher.permit(Some(attacker))).await;
        let b = queued(hasher.permit(Some(attacker))).await;
        // Two places of eight are the attacker's share: a third is refused at once.
        assert_busy(hasher.permit(Some(attacker)).await);
        assert_eq!(metrics.hashes_refused.get(), 1);
        // Another address still finds a place.
        let other = queued(hasher.permit(Some(client()))).await;
        assert_eq!(hasher.waiting(), 3);
        drop((a, b, other, held));
        assert_eq!(hasher.waiting(), 0);
        assert!(hasher.sources().is_empty(), "the table of waiting addresses empties");
        assert_eq!(max_waiting_per_source(64), 16);
        assert_eq!(max_waiting_per_source(2), 1);
    }

    #[tokio::test]
    async fn the_unknown_user_hash_costs_what_a_new_hash_costs() {
        let stored = PasswordHash::new(UNKNOWN_USER_HASH).expect("a PHC string");
        let params = Params::try_from(&stored).expect("parameters");
        let default = Params::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
        let (hasher, _) = pool(1, 4, Duration::from_secs(60));
        let ours = hasher.hash("anything".to_owned()).await.expect("hash");
        let ours = PasswordHash::new(&ours).expect("PHC");
        assert_eq!((ours.algorithm, ours.version), (stored.algorithm, stored.version));
        assert!(
            !hasher
                .verify("admin-password-1".to_owned(), UNKNOWN_USER_HASH.to_owned(), client())
                .await
                .expect("verify")
        );
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
