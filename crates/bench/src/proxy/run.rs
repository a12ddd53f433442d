//! The open-loop runs (`crate::openloop`) every scenario of `bench proxy` is made of: where requests go, the workers
//! that send them, and the alternation of direct and routed slices.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::bail;

use super::{REQUEST_TIMEOUT, request_body};
use crate::http::encode_request;
use crate::openloop;
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
    /// `key`: the API key every routed request carries (`Authorization: Bearer`); direct ones carry none.
    pub(super) fn new(router: SocketAddr, standins: &[SocketAddr], prompts: usize, key: Option<&str>) -> Arc<Targets> {
        let encode = |addr: SocketAddr, key: Option<&str>| {
            let bearer = key.map(|key| format!("Bearer {key}"));
            let mut headers = vec![("Content-Type", "application/json"), ("Accept", "*/*")];
            if let Some(bearer) = &bearer {
                headers.push(("Authorization", bearer.as_str()));
            }
            (0..prompts.max(1))
                .map(|prompt| {
                    [false, true].map(|stream| {
                        encode_request(
                            "POST",
                            "/v1/chat/completions",
                            &addr.to_string(),
                            &headers,
                            &request_body(stream, prompt),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        Arc::new(Targets {
            router,
            standins: standins.to_vec(),
            routed: encode(router, key),
            direct: standins.iter().map(|&addr| encode(addr, None)).collect(),
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

/// A run in progress.
pub(super) type Running = openloop::Run<Record>;

/// Starts an open-loop run of `count` requests at `rate`, what each one is given by `plan`, over `connections`
/// workers (each one request at a time, on its own connections).
pub(super) fn start_run(
    targets: &Arc<Targets>,
    rate: f64,
    count: u64,
    connections: usize,
    plan: Arc<dyn Fn(u64) -> Job + Send + Sync>,
) -> anyhow::Result<Running> {
    openloop::start(rate, count, connections, |schedule| {
        let (targets, plan) = (targets.clone(), plan.clone());
        async move {
            let mut routed = StreamClient::new(targets.router);
            let mut direct: Vec<StreamClient> = targets.standins.iter().map(|&addr| StreamClient::new(addr)).collect();
            let mut records = Vec::new();
            while let Some(i) = schedule.next().await {
                let job = plan(i);
                let request = &targets.request(job.to, i)[usize::from(job.stream)];
                let client = match job.to {
                    To::Routed => &mut routed,
                    To::Direct(k) => &mut direct[k],
                };
                let sent_ns = monotonic_ns();
                let outcome = client.send_within(request, job.stream, REQUEST_TIMEOUT).await;
                records.push(Record { job, due_ns: schedule.due(i), sent_ns, outcome });
            }
            records
        }
    })
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
