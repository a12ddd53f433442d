//! The inference proxy (SPEC §8): forwards an OpenAI-compatible request to a node chosen by routing, over a
//! keep-alive pool, byte for byte, and streams the answer back as it comes: each chunk of an event stream leaves
//! the router as soon as it arrives. A failure before the answer's headers (refused or reset connection, no headers
//! in time, 502/503/504) is retried on another node; after that, nothing is retried. The request stays counted in
//! flight on its node until the answer's body has ended or the client has gone; a client that leaves drops the
//! upstream connection, so the runtime stops generating.
//!
//! When every node with the model is at its `max_concurrency`, a request waits in the routing queue (at most
//! `max_queued` of them, each for at most `queue_timeout`) until one has room and it is its turn (its tenant's fair
//! share, SPEC §14); otherwise it is refused as over capacity.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use uuid::Uuid;

use crate::clock::Clock;
use crate::metrics::{InferenceMetrics, ModelMetrics};
use crate::model::tenant::Tenant;
use crate::routing::{Affinity, InFlight, NoNode, Outcome, Routing, Target};
use crate::usage::{Meter, StreamUsage};

/// Header naming the node that served a request.
pub const NODE_HEADER: &str = "x-llm-router-node";

/// How long a connection to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The first queued request of a model looks again this often even when nothing woke it: an ejection that ended
/// frees a node without any request ending.
const QUEUE_RECHECK: Duration = Duration::from_millis(250);

/// How requests are forwarded: timeouts, retries, the queue.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// How long a node may take to send an answer's headers.
    pub header_timeout: Duration,
    /// Further nodes a request is tried on after a failure before its first byte.
    pub max_retries: u32,
    /// Requests that may wait for a node with room, in all.
    pub max_queued: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Longest silence of a node in the middle of an answer's body.
    pub idle_timeout: Duration,
}

/// The pool of connections to the nodes' runtimes.
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    settings: ProxySettings,
    via: Via,
}

/// A request to forward: the client's method, path, headers and body, and the model it names.
pub struct Outbound<'a> {
    pub method: Method,
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub model: &'a str,
    /// What its prefix or session asks of the choice (SPEC §13).
    pub affinity: Affinity,
    /// What the request is counted as (SPEC §14), and how its answer's usage is had.
    pub meter: Meter,
    pub usage: StreamUsage,
    pub body: Bytes,
}

/// Why a request was not forwarded.
#[derive(Debug)]
pub enum ProxyError {
    /// No node that can take traffic has the model ready.
    UnknownModel,
    /// Nodes have the model, but none could take the request (ejected, or every try failed).
    NoNode { tried: usize },
    /// Every node with the model is at its `max_concurrency`, and the queue is full or the wait ran out.
    OverCapacity,
    /// This router forwarded the request before: it came back through a node registered at a router's address.
    Loop,
}

impl Proxy {
    /// The pool of a router known by `router_id`, unique to each running router (its mark in `Via`).
    pub fn new(settings: ProxySettings, router_id: &str) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        Proxy { client, settings, via: Via::new(router_id) }
    }

    /// A node for `model`, waiting in the queue while every one is at its `max_concurrency`, until it is the turn of
    /// this request of `tenant`.
    async fn pick(
        &self,
        routing: &Routing,
        clock: &Arc<dyn Clock>,
        model: &str,
        affinity: Affinity,
        tenant: &Tenant,
        tried: &[Uuid],
    ) -> Result<(InFlight, Outcome), Result<NoNode, ProxyError>> {
        let queue = routing.queue();
        // While others wait for the model, a request that arrives queues behind them: a place that frees up goes to
        // the one whose turn it is, not to whoever asks first. While nobody waits, this costs one atomic load.
        if !queue.has_waiters(model) {
            match routing.pick_keyed(model, tried, clock.now_ms(), affinity) {
                Err(NoNode::AtCapacity) => {}
                other => return other.map_err(Ok),
            }
        }
        let ticket = queue.join(model, tenant, self.settings.max_queued).ok_or(Err(ProxyError::OverCapacity))?;
        let deadline = tokio::time::Instant::now() + self.settings.queue_timeout;
        loop {
            // Only the first in the queue's order looks; a place that frees up while it is between two looks leaves
            // it a wake-up, so its next wait ends at once.
            if ticket.is_first() {
                match routing.pick_keyed(model, tried, clock.now_ms(), affinity) {
                    Ok(picked) => {
                        ticket.served();
                        return Ok(picked);
                    }
                    Err(NoNode::AtCapacity) => {}
                    Err(other) => return Err(Ok(other)),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Err(ProxyError::OverCapacity));
            }
            let _ = tokio::time::timeout((deadline - now).min(QUEUE_RECHECK), ticket.woken()).await;
        }
    }

    /// Forwards `request` to a node that has its model ready, and counts it in the model's figures.
    pub async fn forward(
        &self,
        routing: &Routing,
        clock: &Arc<dyn Clock>,
        metrics: &InferenceMetrics,
        request: Outbound<'_>,
    ) -> Result<Response<Body>, (ProxyError, Meter)> {
        let arrived = Instant::now();
        let Outbound { method, path_and_query, headers, model, affinity, mut meter, usage, body } = request;
        let Some(via) = self.via.pass_on(headers) else { return Err((ProxyError::Loop, meter)) };
        let tenant = meter.tenant().clone();
        let mut tried: Vec<Uuid> = Vec::new();
        // Taken once the model is known to routing: an unknown name gets no series.
        let mut figures: Option<Arc<ModelMetrics>> = None;
        for _ in 0..=self.settings.max_retries {
            let (flight, how) = match self.pick(routing, clock, model, affinity, &tenant, &tried).await {
                Ok(picked) => picked,
                Err(Ok(NoNode::UnknownModel)) if tried.is_empty() => return Err((ProxyError::UnknownModel, meter)),
                Err(Err(refused)) => {
                    metrics.model(model).answered(StatusCode::TOO_MANY_REQUESTS.as_u16());
                    return Err((refused, meter));
                }
                Err(Ok(_)) => break,
            };
            let figures = figures.get_or_insert_with(|| metrics.model(model));
            if !tried.is_empty() {
                figures.retries.inc();
            }
            figures.routed(how.as_str());
            let target = flight.target().clone();
            tried.push(target.node_id);
            let request = upstream_request(&method, &target, path_and_query, headers, &via, body.clone());
            let sent = Instant::now();
            let answer = tokio::time::timeout(self.settings.header_timeout, self.client.request(request)).await;
            if let Ok(Ok(_)) = &answer {
                figures.upstream_headers.observe(sent.elapsed().as_secs_f64());
            }
            let failure = match answer {
                Ok(Ok(response)) if !retryable(response.status()) => {
                    target.succeeded();
                    figures.answered(response.status().as_u16());
                    meter.answered(target.node_id, response.status().as_u16(), tried.len() - 1, usage);
                    let watch = Watch {
                        figures: figures.clone(),
                        arrived,
                        clock: clock.clone(),
                        idle_timeout: self.settings.idle_timeout,
                    };
                    return Ok(downstream_response(response, flight, watch, meter));
                }
                Ok(Ok(response)) => format!("the node answered {}", response.status()),
                Ok(Err(err)) => format!("forwarding to the node failed: {err}"),
                Err(_) => "the node sent no headers in time".to_owned(),
            };
            tracing::debug!(node = %target.node_id, %failure, "retrying on another node");
            if target.failed(clock.now_ms()) {
                figures.ejections.inc();
                tracing::warn!(node = %target.node_id, %failure, "node ejected from routing after failures");
            }
        }
        metrics.model(model).answered(StatusCode::SERVICE_UNAVAILABLE.as_u16());
        Err((ProxyError::NoNode { tried: tried.len() }, meter))
    }
}

/// Upstream answers worth a try on another node: the node (or a proxy before it) could not serve.
fn retryable(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// Request headers passed on: what describes the body and what the client accepts; never the client's credential.
const PASSED_ON: [HeaderName; 3] = [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT];

fn upstream_request(
    method: &Method,
    target: &Target,
    path_and_query: &str,
    headers: &HeaderMap,
    via: &HeaderValue,
    body: Bytes,
) -> Request<Body> {
    let mut request = Request::new(Body::from(body));
    *request.method_mut() = method.clone();
    *request.uri_mut() = format!("http://{}{}", target.addr(), path_and_query).parse().unwrap_or_default();
    for name in PASSED_ON {
        if let Some(value) = headers.get(&name) {
            request.headers_mut().insert(name, value.clone());
        }
    }
    request.headers_mut().insert(header::VIA, via.clone());
    request
}

/// Response headers not passed back: they describe the upstream connection, not the answer.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(name.as_str(), "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade")
}

/// What an answer's body reports to on its way: the model's figures, when its request arrived, the clock of
/// ejections; and how long the node may stay silent mid-answer.
struct Watch {
    figures: Arc<ModelMetrics>,
    arrived: Instant,
    clock: Arc<dyn Clock>,
    idle_timeout: Duration,
}

fn downstream_response(response: Response<Incoming>, flight: InFlight, watch: Watch, meter: Meter) -> Response<Body> {
    let (parts, incoming) = response.into_parts();
    let node = flight.target().node_id;
    // A stream the meter rewrites has another length than the node's.
    let rewritten = meter.rewrites();
    let body = Routed {
        incoming,
        flight,
        failed: false,
        first_byte: false,
        watch,
        silence: None,
        progressed: false,
        meter,
        ended: false,
    };
    let mut answer = Response::new(Body::new(body));
    *answer.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !(hop_by_hop(name) || rewritten && name == header::CONTENT_LENGTH) {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(&node.to_string()) {
        answer.headers_mut().insert(NODE_HEADER, value);
    }
    answer
}

/// An answer's body on its way to the client, frame by frame: counted in flight on its node until it ends or is
/// dropped (the client left); a body that breaks off, or whose node stays silent for the idle timeout, ends and
/// counts as a failure of the node. Its first byte is timed.
struct Routed {
    incoming: Incoming,
    flight: InFlight,
    failed: bool,
    first_byte: bool,
    watch: Watch,
    /// The end of the node's allowed silence, armed the first time the body waits for the node.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the silence was last armed.
    progressed: bool,
    /// Reads the answer's usage (and, for a stream whose usage the router asked for, passes it on without it).
    meter: Meter,
    /// The node's body has ended and what the meter held is passed on.
    ended: bool,
}

impl Drop for Routed {
    fn drop(&mut self) {
        // A body of known length is not polled past its last byte: its end is known all the same.
        if !self.ended && !self.failed && hyper::body::Body::is_end_stream(&self.incoming) {
            self.ended = true;
            self.meter.end();
        }
    }
}

/// Why an answer's body ended early.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("the node sent nothing for {0:?} in the middle of its answer")]
    Silent(Duration),
}

impl Routed {
    fn fail(&mut self) {
        if !self.failed {
            self.failed = true;
            if self.flight.target().failed(self.watch.clock.now_ms()) {
                self.watch.figures.ejections.inc();
            }
        }
    }

    /// Whether the node has been silent for the idle timeout, while the body waits for it.
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.watch.idle_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let progressed = std::mem::take(&mut self.progressed);
        let silence = self.silence.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if progressed {
            silence.as_mut().reset(deadline);
        }
        silence.as_mut().poll(cx).is_ready()
    }
}

impl hyper::body::Body for Routed {
    type Data = Bytes;
    type Error = Broken;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.incoming).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.progressed = true;
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let data = self.meter.pass(data);
                            if data.is_empty() {
                                // Held by the meter until its event ends.
                                continue;
                            }
                            if !self.first_byte {
                                self.first_byte = true;
                                self.watch.figures.first_byte.observe(self.watch.arrived.elapsed().as_secs_f64());
                            }
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(err))) => {
                    self.fail();
                    self.meter.broke();
                    return Poll::Ready(Some(Err(Broken::Upstream(err))));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.meter.end();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Pending if self.silent_too_long(cx) => {
                    self.fail();
                    self.meter.broke();
                    tracing::warn!(node = %self.flight.target().node_id, "a node went silent in the middle of an answer");
                    return Poll::Ready(Some(Err(Broken::Silent(self.watch.idle_timeout))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.incoming.is_end_stream() && !self.meter.rewrites())
    }

    fn size_hint(&self) -> SizeHint {
        if self.meter.rewrites() { SizeHint::default() } else { self.incoming.size_hint() }
    }
}

/// This router's mark in the `Via` header of what it forwards (RFC 9110 §7.6.3), by which it knows a request that
/// comes back to it: a node registered at a router's own address would otherwise send each request round and round
/// until the connections run out.
pub struct Via {
    /// `1.1 llm-router-<id>`: the entry this router appends.
    entry: HeaderValue,
    /// `llm-router-<id>`: what marks a request this router forwarded before.
    name: String,
}

impl Via {
    /// The mark of a router known by `id` (unique to each running router).
    pub fn new(id: &str) -> Via {
        let name = format!("llm-router-{id}");
        let entry = HeaderValue::from_str(&format!("1.1 {name}")).unwrap_or(HeaderValue::from_static("1.1 llm-router"));
        Via { entry, name }
    }

    /// The `Via` to send upstream (the client's entries, then this router's), or `None` when this router forwarded
    /// the request before.
    pub fn pass_on(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut chain = Vec::new();
        for value in headers.get_all(header::VIA) {
            // An entry that is not text cannot be this router's: it is left out.
            let Ok(text) = value.to_str() else { continue };
            if text.split(',').any(|entry| entry.split_whitespace().nth(1) == Some(self.name.as_str())) {
                return None;
            }
            chain.push(text);
        }
        if chain.is_empty() {
            return Some(self.entry.clone());
        }
        chain.push(self.entry.to_str().unwrap_or_default());
        HeaderValue::from_str(&chain.join(", ")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_marks_what_this_router_forwarded() {
        let via = Via::new("a1");
        let mut headers = HeaderMap::new();
        assert_eq!(via.pass_on(&headers).expect("fresh"), "1.1 llm-router-a1");
        headers.insert(header::VIA, HeaderValue::from_static("1.1 proxy.example, 1.1 llm-router-b2"));
        assert_eq!(
            via.pass_on(&headers).expect("another router"),
            "1.1 proxy.example, 1.1 llm-router-b2, 1.1 llm-router-a1"
        );
        headers.append(header::VIA, HeaderValue::from_static("1.1 llm-router-a1"));
        assert!(via.pass_on(&headers).is_none(), "its own mark: a loop");
        let mut similar = HeaderMap::new();
        similar.insert(header::VIA, HeaderValue::from_static("1.1 llm-router-a12"));
        assert!(via.pass_on(&similar).is_some(), "another router whose id begins alike");
    }
}
