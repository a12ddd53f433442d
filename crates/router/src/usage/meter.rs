//! A request's meter: what the [`Ledger`] is told of a request once it is over. It is made when the request's model
//! is known, learns the node, the status and the retries from the proxy, reads the answer as it passes, and reports
//! when it is dropped: after the answer's last byte, when the client left, or with a refusal.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Bytes;
use uuid::Uuid;

use super::Ledger;
use super::scan::{JsonScan, StreamScan};
use crate::clock::Millis;
use crate::model::tenant::Tenant;
use crate::model::usage::UsageRecord;

/// Status recorded for an answer the client left before its end (nginx's "client closed request").
pub const CLIENT_LEFT: u16 = 499;

/// How a streamed request's usage is had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// Not a stream: the usage is in the answer's JSON.
    NotStreamed,
    /// The client asked for usage itself: it is read as the stream passes, which passes unchanged.
    Asked,
    /// The router asked for it: read, and the usage-only event left out of what the client receives.
    Added,
}

/// The meter of one request.
pub struct Meter {
    ledger: Arc<Ledger>,
    tenant: Tenant,
    model: Arc<str>,
    at: Millis,
    arrived: Instant,
    node: Option<Uuid>,
    /// The status the client got; `None` until known.
    status: Option<u16>,
    retries: u8,
    ttft_ms: Option<u32>,
    scan: Scan,
    /// The answer's body reached its end.
    ended: bool,
    stream: bool,
}

enum Scan {
    None,
    Json(JsonScan),
    Stream(StreamScan),
}

impl Meter {
    /// The meter of a request for `model` that arrived at `at` (`arrived` on the monotonic clock); `stream`: the
    /// client asked for an event stream.
    pub fn new(ledger: Arc<Ledger>, tenant: Tenant, model: &str, stream: bool, at: Millis, arrived: Instant) -> Meter {
        Meter {
            ledger,
            tenant,
            model: Arc::from(model),
            at,
            arrived,
            node: None,
            status: None,
            retries: 0,
            ttft_ms: None,
            scan: Scan::None,
            ended: false,
            stream,
        }
    }

    /// The tenant the request is counted to.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The request was refused with `status` before any node answered.
    pub fn refused(mut self, status: u16, tried: usize) {
        self.status = Some(status);
        self.retries = u8::try_from(tried.saturating_sub(1)).unwrap_or(u8::MAX);
    }

    /// A node answered with `status` after `retries` failed tries; its answer is read as `usage` says.
    pub fn answered(&mut self, node: Uuid, status: u16, retries: usize, usage: StreamUsage) {
        self.node = Some(node);
        self.status = Some(status);
        self.retries = u8::try_from(retries).unwrap_or(u8::MAX);
        self.scan = match (status, usage) {
            (200..=299, StreamUsage::NotStreamed) => Scan::Json(JsonScan::default()),
            (200..=299, StreamUsage::Asked) => Scan::Stream(StreamScan::new(false)),
            (200..=299, StreamUsage::Added) => Scan::Stream(StreamScan::new(true)),
            _ => Scan::None,
        };
    }

    /// Whether the answer is passed on event by event (with what the router added left out) rather than as it comes.
    pub fn rewrites(&self) -> bool {
        matches!(&self.scan, Scan::Stream(scan) if scan.strips())
    }

    /// Reads a chunk of the answer; returns what the client is to receive of it: the chunk itself, unless the meter
    /// rewrites the stream.
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        if self.ttft_ms.is_none() && !chunk.is_empty() && matches!(self.scan, Scan::Stream(_)) {
            self.ttft_ms = Some(u32::try_from(self.arrived.elapsed().as_millis()).unwrap_or(u32::MAX));
        }
        match &mut self.scan {
            Scan::None => chunk,
            Scan::Json(scan) => {
                scan.feed(&chunk);
                chunk
            }
            Scan::Stream(scan) if scan.strips() => {
                let mut out = Vec::new();
                scan.feed(&chunk, &mut out);
                Bytes::from(out)
            }
            Scan::Stream(scan) => {
                scan.feed(&chunk, &mut Vec::new());
                chunk
            }
        }
    }

    /// The answer's body ended; returns what is still held for the client.
    pub fn end(&mut self) -> Bytes {
        self.ended = true;
        let mut out = Vec::new();
        if let Scan::Stream(scan) = &mut self.scan {
            scan.finish(&mut out);
        }
        Bytes::from(out)
    }

    /// The answer broke off: recorded as a failure of the node.
    pub fn broke(&mut self) {
        self.status = Some(502);
        self.ended = true;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A stream whose end marker passed is whole, even if the client closed before the runtime's last byte.
        let whole = self.ended || matches!(&self.scan, Scan::Stream(scan) if scan.done());
        let status = match self.status {
            Some(status) if whole || self.node.is_none() => status,
            // An answer whose body never reached its end: the client left.
            Some(_) | None => CLIENT_LEFT,
        };
        let tokens = match &self.scan {
            Scan::None => None,
            Scan::Json(scan) => scan.tokens(),
            Scan::Stream(scan) => scan.tokens(),
        };
        let record = UsageRecord {
            at: self.at,
            principal: self.tenant.id.clone(),
            principal_name: self.tenant.name.clone(),
            model: self.model.clone(),
            node: self.node,
            status,
            tokens,
            ttft_ms: self.ttft_ms,
            duration_ms: u32::try_from(self.arrived.elapsed().as_millis()).unwrap_or(u32::MAX),
            retries: self.retries,
            stream: self.stream,
        };
        self.ledger.report(record);
    }
}
