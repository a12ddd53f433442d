//! What the agent tells the router: the registration body (configured values first, then what the runtime
//! revealed) and each heartbeat's figures (host, GPUs, the runtime's models and its own load), logging only what
//! changed.

use llm_router_protocol::{HeartbeatRequest, RegisterRequest, RuntimeLoad};
use sysinfo::System;

use super::Agent;
use crate::config::Config;
use crate::gpu::{self, GpuSample};
use crate::identity::Identity;
use crate::runtime::Runtime;
use crate::runtime::load::{LoadProbe, combine};

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

impl Agent {
    pub(super) async fn registration_request(&mut self) -> RegisterRequest {
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
        build_registration(&self.config, &gpus, models, detected, &self.managed_runtimes)
    }

    pub(super) async fn heartbeat_request(&mut self, identity: &Identity) -> HeartbeatRequest {
        let gpus = match self.gpus.sample().await {
            Ok(sample) => {
                if self.gpu_error.take().is_some() {
                    tracing::info!(source = self.gpus.name(), "GPU figures readable again");
                }
                self.remember_gpus(&sample);
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
        let mut models = self.models().await;
        let replicas = self.deployments.as_ref().map(|deployments| {
            for model in deployments.ready_models() {
                if !models.contains(&model) {
                    models.push(model);
                }
            }
            deployments.reports()
        });
        // A runtime that did not answer for its models is not asked for its metrics: that would only add a timeout.
        let own = match self.runtime_state {
            Some(Ok(_)) => self.runtime_load.sample(&self.runtime).await,
            _ => None,
        };
        let load = combine(own.into_iter().chain(self.replica_loads().await));
        HeartbeatRequest {
            node_id: identity.node_id,
            cpu_usage,
            memory_usage,
            gpus,
            loaded_models: Some(models.clone()),
            ready_models: Some(models),
            active_requests: None,
            load,
            replicas,
        }
    }

    /// The load of each ready replica's runtime that reports one (SPEC §13): the node's requests are theirs too.
    async fn replica_loads(&mut self) -> Vec<RuntimeLoad> {
        let Some(deployments) = &self.deployments else { return Vec::new() };
        let ports = deployments.ready_ports();
        self.replica_load.retain(|port, _| ports.contains(port));
        let mut loads = Vec::new();
        for port in ports {
            if !self.replica_load.contains_key(&port) {
                let Ok(url) = reqwest::Url::parse(&format!("http://127.0.0.1:{port}")) else { continue };
                let Ok(runtime) = Runtime::new(url, self.config.runtime_timeout) else { continue };
                self.replica_load.insert(port, (runtime, LoadProbe::new()));
            }
            if let Some((runtime, probe)) = self.replica_load.get_mut(&port)
                && let Some(load) = probe.sample(runtime).await
            {
                loads.push(load);
            }
        }
        loads
    }

    /// Keeps `sample` as the last known GPUs, and gives it to the deployments that choose GPUs for replicas.
    fn remember_gpus(&mut self, sample: &[GpuSample]) {
        self.last_gpus = sample.to_vec();
        if let Some(deployments) = &self.deployments {
            deployments.gpus_sampled(sample);
        }
    }

    /// The GPUs now, or the last known ones if they cannot be read this time.
    async fn sample_gpus(&mut self) -> Vec<GpuSample> {
        match self.gpus.sample().await {
            Ok(sample) if !sample.is_empty() => {
                self.remember_gpus(&sample);
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

/// The registration body: configured values win over what the runtime revealed; `managed_runtimes` are added.
pub fn build_registration(
    config: &Config,
    gpus: &[GpuSample],
    models: Vec<String>,
    detected: Option<crate::runtime::DetectedRuntime>,
    managed_runtimes: &[String],
) -> RegisterRequest {
    let mut supported_runtimes = if config.supported_runtimes.is_empty() {
        detected.as_ref().map(|d| vec![d.kind.to_owned()])
    } else {
        Some(config.supported_runtimes.clone())
    };
    // The runtimes the agent starts itself for deployments (`managed:llama_cpp`), where the placer looks.
    for name in managed_runtimes {
        let list = supported_runtimes.get_or_insert_with(Vec::new);
        if !list.contains(name) {
            list.push(name.clone());
        }
    }
    let runtime_version = config
        .runtime_version
        .clone()
        .or_else(|| detected.and_then(|d| d.version))
        .unwrap_or_else(|| "unknown".to_owned());
    RegisterRequest {
        machine_name: config.machine_name.clone(),
        ip_address: config.ip.map(|ip| ip.to_string()),
        runtime_port: i64::from(config.announced_port),
        runtime_version,
        gpu_devices: Some(gpu::group_devices(gpus)),
        supported_runtimes,
        loaded_models: Some(models.clone()),
        ready_models: Some(models),
        tags: (!config.tags.is_empty()).then(|| config.tags.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use crate::runtime::{DetectedRuntime, VLLM};
    use clap::Parser;

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
        let request = build_registration(&config(&[]), &gpus(), vec!["m".into()], Some(detected), &[]);
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
        let request = build_registration(&configured, &gpus(), vec![], Some(detected), &[]);
        assert_eq!(request.supported_runtimes, Some(vec!["llama_cpp".to_owned(), "ollama".to_owned()]));
        assert_eq!(request.runtime_version, "b4100");
        assert_eq!(request.tags, Some(vec!["a".to_owned()]));
        assert_eq!(request.ip_address.as_deref(), Some("10.1.2.3"));

        let request = build_registration(&config(&[]), &gpus(), vec![], None, &[]);
        assert_eq!(request.runtime_version, "unknown");
        assert_eq!(request.supported_runtimes, None);
    }

    #[test]
    fn managed_runtimes_are_announced_with_the_forwarding_port() {
        let managed = vec!["managed:llama_cpp".to_owned(), "managed:vllm".to_owned()];
        let config = config(&["--manage-runtimes", "--serve-port", "9100"]);
        let detected = DetectedRuntime { kind: VLLM, version: None };
        let request = build_registration(&config, &gpus(), vec![], Some(detected), &managed);
        assert_eq!(request.runtime_port, 9100);
        assert_eq!(
            request.supported_runtimes,
            Some(vec!["vllm".to_owned(), "managed:llama_cpp".to_owned(), "managed:vllm".to_owned()])
        );
        let request = build_registration(&config, &gpus(), vec![], None, &managed[..1]);
        assert_eq!(request.supported_runtimes, Some(vec!["managed:llama_cpp".to_owned()]));
    }
}
