//! The audit log (SPEC §9): every admin action, every sign-in success and failure, every throttling decision, with
//! actor, client address, action, target and outcome.
//!
//! Recording never makes the caller wait for a disk write: events go into a bounded queue and a task writes them in
//! batches, one transaction each. A flood of failed sign-ins therefore costs the router queue slots, not writes one
//! by one; when the queue (10,000 events) is full, further events are dropped and counted
//! (`llm_router_audit_dropped_total`). Reading the log first waits for what is queued, so a reader sees every event
//! recorded before its request.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::model::audit::AuditEvent;
use crate::store::Store;

/// Events waiting to be written, at most.
const QUEUE: usize = 10_000;
/// Events per transaction, at most.
const BATCH: usize = 1_000;

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Refused by a limit before being tried (a throttled sign-in, a rate-limited registration).
    Throttled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Throttled => "throttled",
        }
    }
}

enum Message {
    Event(AuditEvent),
    /// Answered once every event queued before it is written (or failed to be).
    Flush(oneshot::Sender<()>),
}

/// The audit log's queue; a clone records into the same queue.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Message>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Starts the task that writes queued events to `store`; it ends when the log is dropped.
    pub fn start(store: Store, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> AuditLog {
        let (queue, messages) = mpsc::channel(QUEUE);
        tokio::spawn(write(store, messages));
        AuditLog { queue, clock, metrics }
    }

    /// Records that `actor`, from `client`, did `action` to `target`, with `outcome`.
    pub fn record(&self, actor: &str, client: Option<IpAddr>, action: &str, target: Option<String>, outcome: Outcome) {
        let event = AuditEvent {
            at: self.clock.now_ms(),
            actor: bounded(actor),
            client: client.map(|ip| ip.to_string()),
            action: action.to_owned(),
            target: target.as_deref().map(bounded),
            outcome: outcome.as_str().to_owned(),
        };
        if self.queue.try_send(Message::Event(event)).is_err() {
            Metrics::inc(&self.metrics.audit_dropped);
        }
    }

    /// Waits until every event recorded so far has been written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// Longest actor or target kept, in characters: a sign-in may name any username, and the log must stay small.
const MAX_TEXT_CHARS: usize = 256;

fn bounded(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

async fn write(store: Store, mut messages: mpsc::Receiver<Message>) {
    let mut received = Vec::with_capacity(BATCH);
    while messages.recv_many(&mut received, BATCH).await > 0 {
        let mut events = Vec::with_capacity(received.len());
        let mut flushes = Vec::new();
        for message in received.drain(..) {
            match message {
                Message::Event(event) => events.push(event),
                Message::Flush(done) => flushes.push(done),
            }
        }
        if !events.is_empty()
            && let Err(err) = store.insert_audit(&events).await
        {
            tracing::error!(error = %format!("{err:#}"), lost = events.len(), "writing audit events failed");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}
