//! The agent loop (SPEC §5): register when the machine has no identity, then heartbeat at the router's interval
//! with ±10 % jitter, forever.
//!
//! What each answer of the router leads to:
//! - no answer or a server error: retry with exponential backoff and jitter, capped ([`backoff_delay`]);
//! - 401: the router no longer knows the token (node deleted): forget the identity and register anew;
//! - 403, 409, 422 and other refusals: one log line saying why, then a slow retry; the agent never exits over it;
//! - 429 or 503 with `Retry-After` (rate limited, too many pending nodes, storage unavailable): wait at least that
//!   long ([`retry_later_delay`]), registering and heartbeating alike.
//!
//! With `--manage-runtimes`, each heartbeat also reports the replicas the agent runs, each answer's assignments are
//! handed to [`Deployments::reconcile`], and a replica's change of state brings the next heartbeat forward.
//!
//! Logs say what changed (registered, status, router or runtime lost and back, models), not a line per heartbeat.
//! The waits are pure functions of a random number in `[0, 1)` so they are tested without sleeping.
//!
//! This file holds the loop and how it answers the router; the waits are in `waits.rs`, what the agent sends
//! (registration, heartbeat figures) in `report.rs`.

use std::convert::Infallible;
use std::time::Duration;

use llm_router_protocol::NodeStatus;

use crate::client::{Failure, RouterClient};
use crate::config::Config;
use crate::deploy::Deployments;
use crate::gpu::{GpuProbe, GpuSample};
use crate::identity::{Identity, IdentityError, IdentityStore};
use crate::runtime::Runtime;
use crate::runtime::load::LoadProbe;

/// The shortest time between two heartbeats sent early because a replica changed state.
pub const EARLY_HEARTBEAT_GAP: Duration = Duration::from_millis(500);

mod report;
mod waits;

pub use report::{HostMetrics, build_registration};
pub use waits::{MAX_RETRY_AFTER, backoff_delay, heartbeat_delay, retry_later_delay};
use waits::{interval, random_unit};

/// A fatal error of the loop: the agent cannot go on without an operator.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The running agent and what it remembers between heartbeats to log only changes.
pub struct Agent {
    config: Config,
    router: RouterClient,
    runtime: Runtime,
    gpus: GpuProbe,
    host: HostMetrics,
    runtime_load: LoadProbe,
    /// The ready replicas' runtimes and their load probes, by local port.
    replica_load: std::collections::HashMap<u16, (Runtime, LoadProbe)>,
    store: IdentityStore,
    /// A uniform random number in `[0, 1)`, for jitter.
    jitter: fn() -> f64,

    last_gpus: Vec<GpuSample>,
    gpu_error: Option<String>,
    runtime_state: Option<Result<Vec<String>, String>>,
    detected_runtime: Option<Option<crate::runtime::DetectedRuntime>>,
    router_down: bool,
    last_refusal: Option<(u16, String)>,
    status: Option<NodeStatus>,

    /// The replicas the agent runs, with `--manage-runtimes` (SPEC §15).
    deployments: Option<Deployments>,
    /// `managed:<runtime>` for each runtime the agent can start, added to `supported_runtimes`.
    managed_runtimes: Vec<String>,
}

impl Agent {
    /// An agent for a machine whose GPUs were found by `gpus` (first sample `first_sample`).
    pub fn new(
        config: Config,
        router: RouterClient,
        runtime: Runtime,
        gpus: GpuProbe,
        first_sample: Vec<GpuSample>,
    ) -> Self {
        let store = IdentityStore::new(config.state_dir.clone());
        Agent {
            config,
            router,
            runtime,
            gpus,
            host: HostMetrics::new(),
            runtime_load: LoadProbe::new(),
            replica_load: std::collections::HashMap::new(),
            store,
            jitter: random_unit,
            last_gpus: first_sample,
            gpu_error: None,
            runtime_state: None,
            detected_runtime: None,
            router_down: false,
            last_refusal: None,
            status: None,
            deployments: None,
            managed_runtimes: Vec::new(),
        }
    }

    /// The agent of a node that runs deployments: its heartbeats report the replicas, and the router's answers
    /// say which to run.
    pub fn with_deployments(mut self, deployments: Deployments, managed_runtimes: Vec<String>) -> Self {
        deployments.gpus_sampled(&self.last_gpus);
        self.deployments = Some(deployments);
        self.managed_runtimes = managed_runtimes;
        self
    }

    /// Run until a fatal error; cancel the future to stop (every await point is a safe place to stop).
    pub async fn run(mut self) -> Result<Infallible, AgentError> {
        let mut identity = self.store.load()?;
        match &identity {
            Some(found) => tracing::info!(
                node_id = %found.node_id,
                file = %self.store.path().display(),
                "reusing the stored node identity"
            ),
            None => {
                self.store.ensure_writable()?;
                tracing::info!(
                    router = %self.router.url(),
                    "no stored node identity; registering with the router"
                )
            }
        }
        loop {
            let current = match identity.take() {
                Some(found) => found,
                None => self.register().await?,
            };
            self.heartbeat_until_revoked(&current).await?;
            // The router no longer knows the token: the identity is gone for good.
            self.store.clear()?;
            self.status = None;
        }
    }

    /// Register until the router accepts, then store the identity.
    async fn register(&mut self) -> Result<Identity, AgentError> {
        let mut failures: u32 = 0;
        loop {
            let request = self.registration_request().await;
            match self.router.register(&request, None).await {
                Ok(answer) => {
                    self.router_reached();
                    self.last_refusal = None;
                    let identity = Identity { node_id: answer.node_id, node_token: answer.node_token };
                    self.store.save(&identity)?;
                    let gpus: Vec<String> =
                        request.gpu_devices.iter().flatten().map(|g| format!("{} × {}", g.count, g.model)).collect();
                    tracing::info!(
                        node_id = %identity.node_id,
                        status = %answer.status,
                        gpus = %gpus.join(", "),
                        "registered with the router{}",
                        if answer.status == NodeStatus::Pending {
                            "; waiting for an administrator to approve the node"
                        } else {
                            ""
                        }
                    );
                    self.status = Some(answer.status);
                    return Ok(identity);
                }
                Err(failure) => {
                    let wait = self.on_failure(&failure, failures);
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Heartbeat until the router answers 401. The first heartbeat goes out at once.
    async fn heartbeat_until_revoked(&mut self, identity: &Identity) -> Result<(), AgentError> {
        let mut failures: u32 = 0;
        // Between heartbeats, the agent that runs deployments waits on the router for its assignments to change.
        let _following = self.deployments.clone().map(|deployments| {
            let backoff = (self.config.backoff_base, self.config.backoff_max);
            Following(tokio::spawn(follow_assignments(
                self.router.clone(),
                identity.node_token.clone(),
                deployments,
                backoff,
            )))
        });
        loop {
            let request = self.heartbeat_request(identity).await;
            let wait = match self.router.heartbeat(&identity.node_token, &request).await {
                Ok(answer) => {
                    self.router_reached();
                    self.last_refusal = None;
                    failures = 0;
                    self.note_status(answer.status);
                    // An answer without assignments (an older router) leaves what runs as it is.
                    if let (Some(deployments), Some(assignments)) = (&self.deployments, answer.assignments) {
                        deployments.reconcile(assignments);
                    }
                    let wait = heartbeat_delay(interval(answer.heartbeat_interval_secs), (self.jitter)());
                    self.pause(wait).await;
                    continue;
                }
                Err(Failure::Unauthorized(why)) => {
                    tracing::warn!(
                        node_id = %identity.node_id,
                        reason = %why,
                        "the router no longer knows this node (deleted by an administrator?); forgetting its \
                         identity and registering anew"
                    );
                    return Ok(());
                }
                Err(failure) => {
                    let wait = self.on_failure(&failure, failures);
                    failures = failures.saturating_add(1);
                    wait
                }
            };
            // After a failure the wait is a backoff or the router's Retry-After: no early heartbeat.
            tokio::time::sleep(wait).await;
        }
    }

    /// Wait `wait` before the next heartbeat, or less when a replica changed state (ready, failed…): the router
    /// learns of it at once. Early heartbeats are at least [`EARLY_HEARTBEAT_GAP`] apart.
    async fn pause(&self, wait: Duration) {
        let Some(deployments) = &self.deployments else {
            return tokio::time::sleep(wait).await;
        };
        let gap = EARLY_HEARTBEAT_GAP.min(wait);
        tokio::time::sleep(gap).await;
        tokio::select! {
            () = tokio::time::sleep(wait - gap) => {}
            () = deployments.changed() => {}
        }
    }

    /// Log a failed call (only when something changed) and say how long to wait before the next try.
    fn on_failure(&mut self, failure: &Failure, failures: u32) -> Duration {
        match failure {
            Failure::Unreachable(why) => {
                if !self.router_down {
                    self.router_down = true;
                    tracing::warn!(
                        router = %self.router.url(),
                        cause = %why,
                        "router unreachable; retrying with backoff until it answers"
                    );
                } else {
                    tracing::debug!(cause = %why, "router still unreachable");
                }
                backoff_delay(failures, self.config.backoff_base, self.config.backoff_max, (self.jitter)())
            }
            Failure::Refused { status, code, message } => {
                self.router_reached();
                let key = (*status, code.clone());
                if self.last_refusal.as_ref() != Some(&key) {
                    tracing::error!(
                        status = *status,
                        code = %code,
                        retry_in_secs = self.config.refused_retry.as_secs_f64(),
                        "the router refused this node: {message}"
                    );
                    self.last_refusal = Some(key);
                } else {
                    tracing::debug!(status = *status, code = %code, "the router still refuses this node");
                }
                self.config.refused_retry
            }
            Failure::RetryLater { status, code, message, retry_after } => {
                self.router_reached();
                let backoff =
                    backoff_delay(failures, self.config.backoff_base, self.config.backoff_max, (self.jitter)());
                let wait = retry_later_delay(*retry_after, backoff, (self.jitter)());
                let key = (*status, code.clone());
                if self.last_refusal.as_ref() != Some(&key) {
                    tracing::warn!(
                        status = *status,
                        code = %code,
                        retry_in_secs = wait.as_secs_f64(),
                        "the router asks to come back later: {message}"
                    );
                    self.last_refusal = Some(key);
                } else {
                    tracing::debug!(status = *status, code = %code, "the router still asks to come back later");
                }
                wait
            }
            Failure::Unauthorized(why) => {
                // Only registration gets here (it sends no node token): the router wants a join token
                // (`--join-token`), or the one given is unknown, expired, used up or revoked.
                self.router_reached();
                tracing::error!(cause = %why, "the router refused the registration: check --join-token");
                self.config.refused_retry
            }
        }
    }

    fn router_reached(&mut self) {
        if self.router_down {
            self.router_down = false;
            tracing::info!(router = %self.router.url(), "router reachable again");
        }
    }

    fn note_status(&mut self, status: NodeStatus) {
        if self.status != Some(status) {
            match self.status {
                Some(before) => tracing::info!(from = %before, to = %status, "node status changed"),
                None => tracing::info!(status = %status, "node status"),
            }
            self.status = Some(status);
        }
    }
}

/// How long one wait on the router for the node's assignments lasts.
const ASSIGNMENTS_WAIT: Duration = Duration::from_secs(25);

/// The task of [`follow_assignments`], stopped when the heartbeats that started it stop.
struct Following(tokio::task::JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits on the router (`GET /v0/assignments`) for the node's assignments to change and hands each change to the
/// deployments at once (SPEC §15), so that a replica placed on the node starts in milliseconds, not at the next
/// heartbeat. The heartbeats' answers carry the same assignments: this only brings them sooner. Ends on 401 (the
/// heartbeats re-register) or 404 (a router without the endpoint); after any other failure, tries again after the
/// agent's own backoff (`backoff`: its base and cap), with jitter.
async fn follow_assignments(
    router: RouterClient,
    token: String,
    deployments: crate::deploy::Deployments,
    (base, cap): (Duration, Duration),
) {
    let mut known: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        match router.assignments(&token, known.as_deref(), ASSIGNMENTS_WAIT).await {
            Ok(answer) => {
                failures = 0;
                if known.as_deref() != Some(answer.fingerprint.as_str()) {
                    deployments.reconcile(answer.assignments);
                    known = Some(answer.fingerprint);
                }
            }
            Err(Failure::Unauthorized(_)) | Err(Failure::Refused { status: 404, .. }) => return,
            Err(failure) => {
                tracing::debug!(error = %failure, "waiting for assignments failed; trying again");
                tokio::time::sleep(backoff_delay(failures, base, cap, random_unit())).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}
