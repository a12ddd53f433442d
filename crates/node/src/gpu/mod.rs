//! GPU detection and sampling.
//!
//! Two sources can report NVIDIA GPUs: NVML, the driver's library loaded at run time ([`nvml`]), and the
//! `nvidia-smi` command ([`nvidia_smi`]). [`detect`] picks the first that finds a GPU (or only the one asked for) and
//! returns a [`GpuProbe`] that is sampled again for every heartbeat. Both produce the same [`GpuSample`] per GPU,
//! which is turned into the registration's GPU groups ([`group_devices`]) and the heartbeat's figures
//! ([`to_metrics`]).

pub mod nvidia_smi;
pub mod nvml;

use std::fmt;
use std::sync::Arc;

use clap::ValueEnum;
use llm_router_protocol::{GpuDevice, GpuMetrics};

/// Which detection paths to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Detection {
    /// NVML first, then `nvidia-smi`.
    Auto,
    /// NVML only (the driver's `libnvidia-ml.so.1`).
    Nvml,
    /// The `nvidia-smi` command only (found on `PATH`).
    NvidiaSmi,
}

/// The figures of one GPU at one moment. Every figure a driver may not report is optional.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub model: String,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// Percent, 0..=100.
    pub utilization: Option<f64>,
    pub temperature_c: Option<f64>,
}

/// Why one detection path found no GPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The path is not usable on this machine (library or command missing, driver not loaded).
    #[error("{0}")]
    Unavailable(String),
    /// The path works but lists no GPU.
    #[error("it lists no GPU")]
    NoDevices,
    /// The path answered something that could not be read.
    #[error("{0}")]
    Invalid(String),
}

/// No detection path found a GPU. The message names every path tried and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoGpuFound {
    /// (path, reason) for every path tried, in order.
    pub attempts: Vec<(&'static str, SourceError)>,
}

impl fmt::Display for NoGpuFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no GPU was found; a node needs at least one GPU to register. Tried: ")?;
        for (i, (path, reason)) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{path}: {reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoGpuFound {}

/// A working GPU source, sampled for every heartbeat.
#[derive(Clone)]
pub enum GpuProbe {
    Nvml(Arc<nvml::NvmlSource>),
    NvidiaSmi(nvidia_smi::NvidiaSmi),
}

impl fmt::Debug for GpuProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl GpuProbe {
    /// Name of the detection path, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            GpuProbe::Nvml(_) => nvml::NAME,
            GpuProbe::NvidiaSmi(_) => nvidia_smi::NAME,
        }
    }

    /// Read the current figures of every GPU.
    pub async fn sample(&self) -> Result<Vec<GpuSample>, SourceError> {
        match self {
            GpuProbe::Nvml(source) => {
                let source = Arc::clone(source);
                // NVML calls block in the driver; keep them off the async workers.
                tokio::task::spawn_blocking(move || source.sample())
                    .await
                    .map_err(|e| SourceError::Invalid(format!("NVML query did not finish: {e}")))?
            }
            GpuProbe::NvidiaSmi(smi) => smi.sample().await,
        }
    }
}

/// Find the GPUs of this machine through the paths `mode` allows, first success wins.
///
/// Returns the probe and its first sample, which is never empty.
pub async fn detect(mode: Detection) -> Result<(GpuProbe, Vec<GpuSample>), NoGpuFound> {
    let mut attempts = Vec::new();
    if matches!(mode, Detection::Auto | Detection::Nvml) {
        let found = tokio::task::spawn_blocking(|| {
            let source = nvml::NvmlSource::init()?;
            let sample = source.sample()?;
            Ok::<_, SourceError>((source, sample))
        })
        .await
        .unwrap_or_else(|e| Err(SourceError::Invalid(format!("NVML start-up did not finish: {e}"))));
        match found {
            Ok((_, sample)) if sample.is_empty() => attempts.push((nvml::NAME, SourceError::NoDevices)),
            Ok((source, sample)) => return Ok((GpuProbe::Nvml(Arc::new(source)), sample)),
            Err(e) => attempts.push((nvml::NAME, e)),
        }
    }
    if matches!(mode, Detection::Auto | Detection::NvidiaSmi) {
        let smi = nvidia_smi::NvidiaSmi::default();
        match smi.sample().await {
            Ok(sample) if sample.is_empty() => attempts.push((nvidia_smi::NAME, SourceError::NoDevices)),
            Ok(sample) => return Ok((GpuProbe::NvidiaSmi(smi), sample)),
            Err(e) => attempts.push((nvidia_smi::NAME, e)),
        }
    }
    Err(NoGpuFound { attempts })
}

/// Group identical GPUs (same model and memory) for the registration, in the order they were first seen.
pub fn group_devices(samples: &[GpuSample]) -> Vec<GpuDevice> {
    let mut groups: Vec<GpuDevice> = Vec::new();
    for gpu in samples {
        match groups.iter_mut().find(|g| g.model == gpu.model && g.memory_bytes == gpu.memory_total_bytes) {
            Some(group) => group.count += 1,
            None => groups.push(GpuDevice {
                model: gpu.model.clone(),
                count: 1,
                memory_bytes: gpu.memory_total_bytes,
                uuids: None,
            }),
        }
    }
    groups
}

/// The heartbeat's per-GPU figures.
pub fn to_metrics(samples: &[GpuSample]) -> Vec<GpuMetrics> {
    samples
        .iter()
        .map(|gpu| GpuMetrics {
            index: gpu.index,
            model: Some(gpu.model.clone()),
            utilization: gpu.utilization,
            memory_used_bytes: gpu.memory_used_bytes,
            memory_total_bytes: gpu.memory_total_bytes,
            temperature_c: gpu.temperature_c,
            ..GpuMetrics::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, model: &str, memory: Option<u64>) -> GpuSample {
        GpuSample {
            index,
            model: model.into(),
            memory_total_bytes: memory,
            memory_used_bytes: Some(1),
            utilization: Some(50.0),
            temperature_c: Some(40.0),
        }
    }

    #[test]
    fn identical_gpus_form_one_group_in_first_seen_order() {
        let samples = [
            gpu(0, "NVIDIA A100-SXM4-80GB", Some(80)),
            gpu(1, "NVIDIA H100 80GB HBM3", Some(81)),
            gpu(2, "NVIDIA A100-SXM4-80GB", Some(80)),
            gpu(3, "NVIDIA A100-SXM4-80GB", Some(40)),
        ];
        let groups = group_devices(&samples);
        assert_eq!(
            groups,
            vec![
                GpuDevice { model: "NVIDIA A100-SXM4-80GB".into(), count: 2, memory_bytes: Some(80), uuids: None },
                GpuDevice { model: "NVIDIA H100 80GB HBM3".into(), count: 1, memory_bytes: Some(81), uuids: None },
                GpuDevice { model: "NVIDIA A100-SXM4-80GB".into(), count: 1, memory_bytes: Some(40), uuids: None },
            ]
        );
    }

    #[test]
    fn metrics_carry_every_figure() {
        let metrics = to_metrics(&[gpu(3, "X", Some(80))]);
        assert_eq!(
            metrics,
            vec![GpuMetrics {
                index: 3,
                model: Some("X".into()),
                utilization: Some(50.0),
                memory_used_bytes: Some(1),
                memory_total_bytes: Some(80),
                temperature_c: Some(40.0),
                ..GpuMetrics::default()
            }]
        );
    }

    #[test]
    fn no_gpu_message_names_every_path() {
        let err = NoGpuFound {
            attempts: vec![
                (nvml::NAME, SourceError::Unavailable("libnvidia-ml.so.1 not found".into())),
                (nvidia_smi::NAME, SourceError::NoDevices),
            ],
        };
        let text = err.to_string();
        assert!(text.starts_with("no GPU was found"), "{text}");
        assert!(text.contains("NVML: libnvidia-ml.so.1 not found"), "{text}");
        assert!(text.contains("nvidia-smi: it lists no GPU"), "{text}");
    }
}
