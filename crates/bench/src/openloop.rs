//! Open-loop runs: `count` requests at a fixed rate, request *i* due at *i* / rate whatever the answers before it
//! did, handed out by a pacer thread to workers that each send one request at a time. A request's latency is counted
//! from its due instant, so a stall shows in every request it delays. `bench proxy` and `bench affinity` are made of
//! such runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::standin::monotonic_ns;

/// Time from setting up a run's schedule to its first due request.
const LEAD: Duration = Duration::from_millis(50);

/// When each request of a run is due, and which one a worker sends next.
pub struct Schedule {
    start_ns: u64,
    period_ns: f64,
    count: u64,
    gate: Semaphore,
    next: AtomicU64,
}

impl Schedule {
    /// When request `i` is due, on [`monotonic_ns`].
    pub fn due(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * self.period_ns) as u64
    }

    /// The next request, once it is due; `None` when the run is over.
    pub async fn next(&self) -> Option<u64> {
        self.gate.acquire().await.ok()?.forget();
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.count).then_some(i)
    }
}

/// A run in progress.
pub struct Run<R> {
    /// When its first request is due.
    pub start_ns: u64,
    workers: JoinSet<Vec<R>>,
    pacer: std::thread::JoinHandle<()>,
}

/// Starts a run of `count` requests at `rate` over `workers` tasks, each `work(schedule)`: sending the requests
/// [`Schedule::next`] gives it and returning what it recorded.
pub fn start<R, F, Fut>(rate: f64, count: u64, workers: usize, work: F) -> anyhow::Result<Run<R>>
where
    R: Send + 'static,
    F: Fn(Arc<Schedule>) -> Fut,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let schedule = Arc::new(Schedule {
        start_ns: monotonic_ns() + u64::try_from(LEAD.as_nanos()).unwrap_or(0),
        period_ns: 1e9 / rate,
        count,
        gate: Semaphore::new(0),
        next: AtomicU64::new(0),
    });
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        tasks.spawn(work(schedule.clone()));
    }
    let pacing = schedule.clone();
    let pacer = std::thread::Builder::new()
        .name("pacer".to_owned())
        .spawn(move || {
            for i in 0..count {
                let now = monotonic_ns();
                let at = pacing.due(i);
                if at > now {
                    std::thread::sleep(Duration::from_nanos(at - now));
                }
                pacing.gate.add_permits(1);
            }
            // Wakes every worker to find the run over.
            pacing.gate.add_permits(workers);
        })
        .context("starting the pacer thread")?;
    Ok(Run { start_ns: schedule.start_ns, workers: tasks, pacer })
}

impl<R: 'static> Run<R> {
    /// Waits for every request of the run; what the workers recorded.
    pub async fn finish(mut self) -> anyhow::Result<Vec<R>> {
        let mut records = Vec::new();
        while let Some(done) = self.workers.join_next().await {
            records.extend(done.context("a request worker failed")?);
        }
        if self.pacer.join().is_err() {
            bail!("the pacer thread panicked");
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request is handed out once, in order of its due instant, and none before it is due.
    #[tokio::test]
    async fn every_request_is_handed_out_once_and_not_before_it_is_due() {
        let run = start(2000.0, 50, 3, |schedule| async move {
            let mut seen = Vec::new();
            while let Some(i) = schedule.next().await {
                seen.push((i, schedule.due(i), monotonic_ns()));
            }
            seen
        })
        .expect("start");
        let start_ns = run.start_ns;
        let mut seen = run.finish().await.expect("finish");
        seen.sort_unstable();
        assert_eq!(seen.iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
        assert_eq!(seen[0].1, start_ns);
        assert_eq!(seen[10].1, start_ns + 5_000_000, "due at i / rate");
        assert!(seen.iter().all(|(_, due, at)| at >= due), "handed out before it was due");
    }
}
