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
//! Logs say what changed (registered, status, router or runtime lost and back, models), not a line per heartbeat.
//! The waits are pure functions of a random number in `[0, 1)` so they are tested without sleeping.

use std::convert::Infallible;
use std::time::Duration;

use llm_router_protocol::{HeartbeatRequest, NodeStatus, RegisterRequest};
use sysinfo::System;

use crate::client::{Failure, RouterClient};
use crate::config::Config;
use crate::gpu::{self, GpuProbe, GpuSample};
use crate::identity::{Identity, IdentityError, IdentityStore};
use crate::runtime::Runtime;

/// The wait before retry number `attempt` (0 for the first) while the router is unreachable: `base · 2^attempt`,
/// capped at `cap`, then "equal jitter": a uniform pick in its upper half, so agents that lost the router together
/// do not come back in step, and the wait never drops to nothing.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exponential = base.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(cap);
    let half = exponential / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// The longest `Retry-After` the agent obeys; a larger one (a broken or hostile proxy) is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The wait after the router answered `Retry-After: retry_after`: at least that (capped at [`MAX_RETRY_AFTER`]),
/// plus up to 10 % jitter so that agents turned away together do not return together, and never less than the
/// `backoff` the failure count would give anyway.
pub fn retry_later_delay(retry_after: Duration, backoff: Duration, unit: f64) -> Duration {
    let asked = retry_after.min(MAX_RETRY_AFTER);
    let jittered = (asked + asked.mul_f64(0.1 * unit.clamp(0.0, 1.0))).min(MAX_RETRY_AFTER.max(asked));
    jittered.max(backoff)
}

/// The wait before the next heartbeat: the router's interval, ±10 %.
pub fn heartbeat_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// CPU and memory use of the machine.
pub struct HostMetrics {
    /// `None` where the system's figures cannot be read at all; heartbeats then go without them.
    system: Option<System>,
}

impl HostMetrics {
    pub fn new() -> Self {
        let system = match System::new() {
            Ok(mut system) => {
                // CPU use is a difference between two readings; this is the first.
                system.refresh_cpu_usage();
                Some(system)
            }
            Err(e) => {
                tracing::warn!(error = %e, "CPU and memory figures are unreadable; heartbeats go without them");
                None
            }
        };
        HostMetrics { system }
    }

    /// (CPU %, memory %), each 0..=100, `None` where the machine does not tell.
    pub fn sample(&mut self) -> (Option<f64>, Option<f64>) {
        let Some(system) = self.system.as_mut() else {
            return (None, None);
        };
        system.refresh_cpu_usage();
        system.refresh_memory();
        let cpu = f64::from(system.global_cpu_usage());
        let cpu = cpu.is_finite().then(|| cpu.clamp(0.0, 100.0));
        let total = system.total_memory();
        let memory = (total > 0).then(|| (system.used_memory() as f64 / total as f64 * 100.0).clamp(0.0, 100.0));
        (cpu, memory)
    }
}

impl Default for HostMetrics {
    fn default() -> Self {
        Self::new()
    }
}

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
            store,
            jitter: random_unit,
            last_gpus: first_sample,
            gpu_error: None,
            runtime_state: None,
            detected_runtime: None,
            router_down: false,
            last_refusal: None,
            status: None,
        }
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
        loop {
            let request = self.heartbeat_request(identity).await;
            let wait = match self.router.heartbeat(&identity.node_token, &request).await {
                Ok(answer) => {
                    self.router_reached();
                    self.last_refusal = None;
                    failures = 0;
                    self.note_status(answer.status);
                    heartbeat_delay(interval(answer.heartbeat_interval_secs), (self.jitter)())
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
            tokio::time::sleep(wait).await;
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

    async fn registration_request(&mut self) -> RegisterRequest {
        let gpus = self.sample_gpus().await;
        let models = self.models().await;
        let detected = self.runtime.detect().await;
        if self.detected_runtime.as_ref() != Some(&detected) {
            match &detected {
                Some(found) => tracing::info!(
                    runtime = found.kind,
                    version = found.version.as_deref().unwrap_or("unknown"),
                    "runtime identified"
                ),
                None => {
                    tracing::info!(url = %self.runtime.url(), "runtime not identified (not Ollama, vLLM, llama.cpp or llama-cpp-python)")
                }
            }
            self.detected_runtime = Some(detected.clone());
        }
        build_registration(&self.config, &gpus, models, detected)
    }

    async fn heartbeat_request(&mut self, identity: &Identity) -> HeartbeatRequest {
        let gpus = match self.gpus.sample().await {
            Ok(sample) => {
                if self.gpu_error.take().is_some() {
                    tracing::info!(source = self.gpus.name(), "GPU figures readable again");
                }
                self.last_gpus = sample.clone();
                Some(gpu::to_metrics(&sample))
            }
            Err(e) => {
                let text = e.to_string();
                if self.gpu_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(source = self.gpus.name(), cause = %text, "GPU figures unreadable; heartbeats go without them");
                    self.gpu_error = Some(text);
                }
                None
            }
        };
        let (cpu_usage, memory_usage) = self.host.sample();
        let models = self.models().await;
        HeartbeatRequest {
            node_id: identity.node_id,
            cpu_usage,
            memory_usage,
            gpus,
            loaded_models: Some(models.clone()),
            ready_models: Some(models),
            active_requests: None,
            load: None,
        }
    }

    /// The GPUs now, or the last known ones if they cannot be read this time.
    async fn sample_gpus(&mut self) -> Vec<GpuSample> {
        match self.gpus.sample().await {
            Ok(sample) if !sample.is_empty() => {
                self.last_gpus = sample.clone();
                sample
            }
            _ => self.last_gpus.clone(),
        }
    }

    /// The runtime's models; a runtime that is down or odd serves none.
    async fn models(&mut self) -> Vec<String> {
        let now = self.runtime.models().await.map_err(|e| e.to_string());
        let before = self.runtime_state.as_ref();
        match (&now, before) {
            (Err(why), Some(Ok(_)) | None) => {
                tracing::warn!(cause = %why, "runtime unreachable; reporting no models until it answers")
            }
            (Ok(models), Some(Err(_)) | None) => {
                tracing::info!(url = %self.runtime.url(), models = ?models, "runtime answers")
            }
            (Ok(models), Some(Ok(old))) if models != old => {
                tracing::info!(models = ?models, "runtime models changed")
            }
            _ => {}
        }
        let models = now.clone().unwrap_or_default();
        self.runtime_state = Some(now);
        models
    }
}

/// The registration body: configured values win over what the runtime revealed.
pub fn build_registration(
    config: &Config,
    gpus: &[GpuSample],
    models: Vec<String>,
    detected: Option<crate::runtime::DetectedRuntime>,
) -> RegisterRequest {
    let supported_runtimes = if config.supported_runtimes.is_empty() {
        detected.as_ref().map(|d| vec![d.kind.to_owned()])
    } else {
        Some(config.supported_runtimes.clone())
    };
    let runtime_version = config
        .runtime_version
        .clone()
        .or_else(|| detected.and_then(|d| d.version))
        .unwrap_or_else(|| "unknown".to_owned());
    RegisterRequest {
        machine_name: config.machine_name.clone(),
        ip_address: config.ip.map(|ip| ip.to_string()),
        runtime_port: i64::from(config.runtime_port),
        runtime_version,
        gpu_devices: Some(gpu::group_devices(gpus)),
        supported_runtimes,
        loaded_models: Some(models.clone()),
        ready_models: Some(models),
        tags: (!config.tags.is_empty()).then(|| config.tags.clone()),
    }
}

/// The router's interval, never below one second whatever it says.
fn interval(secs: u64) -> Duration {
    Duration::from_secs(secs.max(1))
}

fn random_unit() -> f64 {
    use rand::RngExt;
    rand::rng().random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use crate::runtime::{DetectedRuntime, VLLM};
    use clap::Parser;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_until_the_cap() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        // With the highest jitter the wait is the full exponential step.
        let waits: Vec<u64> = (0..9).map(|n| backoff_delay(n, base, cap, 1.0).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(u32::MAX, base, cap, 1.0), cap);
    }

    #[test]
    fn backoff_jitter_stays_in_the_upper_half() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff_delay(3, base, cap, 0.0), 400 * MS);
        assert_eq!(backoff_delay(3, base, cap, 0.5), 600 * MS);
        assert_eq!(backoff_delay(3, base, cap, 1.0), 800 * MS);
        // Out-of-range randomness is clamped rather than trusted.
        assert_eq!(backoff_delay(3, base, cap, 7.0), 800 * MS);
        assert_eq!(backoff_delay(3, base, cap, -1.0), 400 * MS);
        assert_eq!(backoff_delay(20, base, cap, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_is_waited_at_least_and_capped_at_fifteen_minutes() {
        let secs = Duration::from_secs;
        // The router's figure wins over a short backoff, with at most 10 % more.
        assert_eq!(retry_later_delay(secs(30), 100 * MS, 0.0), secs(30));
        assert_eq!(retry_later_delay(secs(30), 100 * MS, 1.0), secs(33));
        for unit in [0.0, 0.3, 0.99] {
            let wait = retry_later_delay(secs(600), secs(1), unit);
            assert!(wait >= secs(600) && wait <= secs(660), "{wait:?}");
        }
        // A longer backoff (many failures in a row) still applies.
        assert_eq!(retry_later_delay(secs(1), secs(45), 0.5), secs(45));
        // Absurd values are cut to 15 minutes, jitter included.
        assert_eq!(retry_later_delay(secs(86_400 * 365), secs(1), 1.0), MAX_RETRY_AFTER);
        assert_eq!(retry_later_delay(secs(14 * 60 + 59), secs(1), 1.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn heartbeat_jitter_is_ten_percent_either_way() {
        let interval = Duration::from_secs(10);
        assert_eq!(heartbeat_delay(interval, 0.0), Duration::from_secs(9));
        assert_eq!(heartbeat_delay(interval, 0.5), Duration::from_secs(10));
        assert_eq!(heartbeat_delay(interval, 1.0), Duration::from_secs(11));
        for unit in [0.0, 0.1, 0.33, 0.77, 0.999] {
            let wait = heartbeat_delay(interval, unit);
            assert!(wait >= Duration::from_secs(9) && wait <= Duration::from_secs(11), "{wait:?}");
        }
    }

    #[test]
    fn random_units_are_in_range() {
        for _ in 0..1000 {
            let unit = random_unit();
            assert!((0.0..1.0).contains(&unit), "{unit}");
        }
    }

    #[test]
    fn interval_is_never_zero() {
        assert_eq!(interval(0), Duration::from_secs(1));
        assert_eq!(interval(7), Duration::from_secs(7));
    }

    #[test]
    fn host_metrics_are_percentages() {
        let mut host = HostMetrics::new();
        let (cpu, memory) = host.sample();
        for value in [cpu, memory].into_iter().flatten() {
            assert!((0.0..=100.0).contains(&value), "{value}");
        }
        assert!(memory.is_some(), "Linux always tells its memory");
    }

    fn config(extra: &[&str]) -> Config {
        let mut args = vec!["llm-node", "--router-url", "http://r:8080", "--runtime-url", "http://127.0.0.1:8001"];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("flags").resolve(Some("gpu-01".into()), Some("/h".into())).expect("config")
    }

    fn gpus() -> Vec<GpuSample> {
        (0..2)
            .map(|index| GpuSample {
                index,
                model: "NVIDIA L4".into(),
                memory_total_bytes: Some(24 << 30),
                memory_used_bytes: None,
                utilization: None,
                temperature_c: None,
                ..GpuSample::default()
            })
            .collect()
    }

    #[test]
    fn registration_uses_what_the_runtime_reveals() {
        let detected = DetectedRuntime { kind: VLLM, version: Some("0.6.3".into()) };
        let request = build_registration(&config(&[]), &gpus(), vec!["m".into()], Some(detected));
        assert_eq!(request.machine_name, "gpu-01");
        assert_eq!(request.runtime_port, 8001);
        assert_eq!(request.ip_address, None);
        assert_eq!(request.runtime_version, "0.6.3");
        assert_eq!(request.supported_runtimes, Some(vec!["vllm".to_owned()]));
        assert_eq!(request.ready_models, Some(vec!["m".to_owned()]));
        assert_eq!(request.tags, None);
        let devices = request.gpu_devices.expect("gpus");
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].count, 2);
        assert_eq!(devices[0].memory_bytes, Some(24 << 30));
    }

    #[test]
    fn configured_runtime_facts_win_and_unknown_is_the_last_resort() {
        let detected = DetectedRuntime { kind: VLLM, version: Some("0.6.3".into()) };
        let configured = config(&[
            "--supported-runtimes",
            "llama_cpp,ollama",
            "--runtime-version",
            "b4100",
            "--tags",
            "a",
            "--ip",
            "10.1.2.3",
        ]);
        let request = build_registration(&configured, &gpus(), vec![], Some(detected));
        assert_eq!(request.supported_runtimes, Some(vec!["llama_cpp".to_owned(), "ollama".to_owned()]));
        assert_eq!(request.runtime_version, "b4100");
        assert_eq!(request.tags, Some(vec!["a".to_owned()]));
        assert_eq!(request.ip_address.as_deref(), Some("10.1.2.3"));

        let request = build_registration(&config(&[]), &gpus(), vec![], None);
        assert_eq!(request.runtime_version, "unknown");
        assert_eq!(request.supported_runtimes, None);
    }
}
