//! The open-loop runs every scenario of `bench proxy` is made of: where requests go, the pacer that hands them
//! out at their due instants, the workers that send them, and the alternation of direct and routed slices.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{LEAD, REQUEST_TIMEOUT, request_body};
use crate::http::encode_request;
use crate::sse::{Exchange, StreamClient};
use crate::standin::monotonic_ns;

/// Where requests go, and each one serialized once: `[non-streaming, streaming]` of each prompt, for the router and
/// for each stand-in.
pub(super) struct Targets {
    pub(super) router: SocketAddr,
    pub(super) standins: Vec<SocketAddr>,
    pub(super) routed: Vec<[Vec<u8>; 2]>,
    pub(super) direct: Vec<Vec<[Vec<u8>; 2]>>,
}

impl Targets {
    pub(super) fn new(router: SocketAddr, standins: &[SocketAddr], prompts: usize) -> Arc<Targets> {
        let encode = |addr: SocketAddr| {
            (0..prompts.max(1))
                .map(|prompt| {
                    [false, true].map(|stream| {
                        encode_request(
                            "POST",
                            "/v1/chat/completions",
                            &addr.to_string(),
                            &[("Content-Type", "application/json"), ("Accept", "*/*")],
                            &request_body(stream, prompt),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        Arc::new(Targets {
            router,
            standins: standins.to_vec(),
            routed: encode(router),
            direct: standins.iter().map(|&addr| encode(addr)).collect(),
        })
    }

    /// Request `i`'s bytes, `[non-streaming, streaming]`: the prompts in turn.
    pub(super) fn request(&self, to: To, i: u64) -> &[Vec<u8>; 2] {
        let each = match to {
            To::Routed => &self.routed,
            To::Direct(k) => &self.direct[k],
        };
        &each[(i % each.len() as u64) as usize]
    }

    /// One request of each kind, direct to every stand-in and through the router, must succeed before measuring.
    pub(super) async fn check(&self) -> anyhow::Result<()> {
        for stream in [false, true] {
            for (addr, request) in std::iter::once((self.router, &self.routed[0]))
                .chain(self.standins.iter().copied().zip(self.direct.iter().map(|prompts| &prompts[0])))
            {
                let exchange = StreamClient::new(addr).send(&request[usize::from(stream)], stream).await?;
                if exchange.status != 200 || (stream && !exchange.done) {
                    bail!(
                        "a {} request to {addr} answered HTTP {} (done: {})",
                        if stream { "streamed" } else { "non-streaming" },
                        exchange.status,
                        exchange.done
                    );
                }
            }
        }
        Ok(())
    }
}

/// Where request *i* of a run goes and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Job {
    pub(super) to: To,
    pub(super) stream: bool,
    /// Counted in the figures (not a warm-up).
    pub(super) measured: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum To {
    /// Straight to stand-in *k*.
    Direct(usize),
    Routed,
}

/// One request of a run, as sent and answered.
pub(super) struct Record {
    pub(super) job: Job,
    /// When it was due, on [`monotonic_ns`].
    pub(super) due_ns: u64,
    /// When it was sent.
    pub(super) sent_ns: u64,
    pub(super) outcome: Result<Exchange, String>,
}

/// A run in progress: the pacer thread hands out due requests to the workers.
pub(super) struct Running {
    pub(super) start_ns: u64,
    workers: JoinSet<Vec<Record>>,
    pacer: std::thread::JoinHandle<()>,
}

/// Starts an open-loop run of `count` requests at `rate`, what each one is given by `plan`, over `connections`
/// workers (each one request at a time, on its own connections).
pub(super) fn start_run(
    targets: &Arc<Targets>,
    rate: f64,
    count: u64,
    connections: usize,
    plan: Arc<dyn Fn(u64) -> Job + Send + Sync>,
) -> anyhow::Result<Running> {
    let period_ns = 1e9 / rate;
    let start_ns = monotonic_ns() + u64::try_from(LEAD.as_nanos()).unwrap_or(0);
    let due = move |i: u64| start_ns + (i as f64 * period_ns) as u64;
    let gate = Arc::new(Semaphore::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        let (targets, gate, next, plan) = (targets.clone(), gate.clone(), next.clone(), plan.clone());
        workers.spawn(async move {
            let mut routed = StreamClient::new(targets.router);
            let mut direct: Vec<StreamClient> = targets.standins.iter().map(|&addr| StreamClient::new(addr)).collect();
            let mut records = Vec::new();
            loop {
                match gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let job = plan(i);
                let request = &targets.request(job.to, i)[usize::from(job.stream)];
                let client = match job.to {
                    To::Routed => &mut routed,
                    To::Direct(k) => &mut direct[k],
                };
                let sent_ns = monotonic_ns();
                let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, client.send(request, job.stream)).await {
                    Ok(Ok(exchange)) => Ok(exchange),
                    Ok(Err(err)) => Err(err.label()),
                    Err(_) => {
                        client.disconnect();
                        Err("timeout".to_owned())
                    }
                };
                records.push(Record { job, due_ns: due(i), sent_ns, outcome });
            }
            records
        });
    }
    let pacer = pace(count, due, gate, connections)?;
    Ok(Running { start_ns, workers, pacer })
}

/// Starts the pacer of an open-loop run: a thread that hands `gate` one permit at each of the `count` due instants
/// (`due(i)` on [`monotonic_ns`]), however the answers go, then one for each of the `workers` to find the run over.
pub(crate) fn pace(
    count: u64,
    due: impl Fn(u64) -> u64 + Send + 'static,
    gate: Arc<Semaphore>,
    workers: usize,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pacer".to_owned())
        .spawn(move || {
            for i in 0..count {
                let now = monotonic_ns();
                let at = due(i);
                if at > now {
                    std::thread::sleep(Duration::from_nanos(at - now));
                }
                gate.add_permits(1);
            }
            gate.add_permits(workers);
        })
        .context("starting the pacer thread")
}

impl Running {
    pub(super) async fn finish(mut self) -> anyhow::Result<Vec<Record>> {
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

/// Slices of a run that alternates direct and routed traffic: a warm-up pair, then `pairs` measured pairs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Alternation {
    pub(super) slice_secs: f64,
    /// Requests in one slice.
    per_slice: u64,
    pub(super) pairs: u64,
    nodes: usize,
    stream: bool,
}

impl Alternation {
    pub(super) fn new(rate: f64, secs: f64, slice_secs: f64, nodes: usize, stream: bool) -> Self {
        let pairs = (secs / slice_secs).round().max(1.0) as u64;
        let per_slice = (rate * slice_secs).round().max(1.0) as u64;
        Alternation { slice_secs, per_slice, pairs, nodes, stream }
    }

    pub(super) fn count(&self) -> u64 {
        self.per_slice * 2 * (self.pairs + 1)
    }

    pub(super) fn measured_secs_per_side(&self) -> f64 {
        self.slice_secs * self.pairs as f64
    }

    /// Even slices go direct (to the stand-ins in turn), odd ones through the router; the first two are a warm-up.
    pub(super) fn job(&self, i: u64) -> Job {
        let slice = i / self.per_slice;
        let to = if slice.is_multiple_of(2) { To::Direct((i % self.nodes as u64) as usize) } else { To::Routed };
        Job { to, stream: self.stream, measured: slice >= 2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_routed_alternate_by_slice_after_a_warm_up_pair() {
        let plan = Alternation::new(100.0, 2.0, 0.5, 3, false);
        assert_eq!((plan.pairs, plan.count(), plan.measured_secs_per_side()), (4, 500, 2.0));
        let jobs: Vec<Job> = (0..plan.count()).map(|i| plan.job(i)).collect();
        assert_eq!(jobs[0], Job { to: To::Direct(0), stream: false, measured: false });
        assert_eq!(jobs[50], Job { to: To::Routed, stream: false, measured: false });
        assert_eq!(jobs[100], Job { to: To::Direct(1), stream: false, measured: true });
        assert_eq!(jobs[101].to, To::Direct(2));
        assert_eq!(jobs[150], Job { to: To::Routed, stream: false, measured: true });
        let measured = |routed: bool| jobs.iter().filter(|j| j.measured && (j.to == To::Routed) == routed).count();
        assert_eq!((measured(false), measured(true)), (200, 200));
    }
}
