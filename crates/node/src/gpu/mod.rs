//! GPU detection and sampling.
//!
//! Two sources can report NVIDIA GPUs: NVML, the driver's library loaded at run time ([`nvml`]), and the
//! `nvidia-smi` command ([`nvidia_smi`]). [`detect`] picks the first that finds a GPU (or only the one asked for) and
//! returns a [`GpuProbe`] that is sampled again for every heartbeat. Both produce the same [`GpuSample`] per GPU,
//! which is turned into the registration's GPU groups ([`group_devices`]) and the heartbeat's figures
//! ([`to_metrics`]).
//!
//! Besides load and memory, each sample carries the GPU's health where the source can tell (SPEC §10): its uuid,
//! the volatile count of uncorrectable ECC errors, the power draw, the active clock throttle reasons and, from NVML
//! only, the most recent critical XID error seen since the agent started ([`CRITICAL_XIDS`]).

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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub model: String,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// Percent, 0..=100.
    pub utilization: Option<f64>,
    pub temperature_c: Option<f64>,
    /// The driver's UUID, e.g. `GPU-5d2c…`.
    pub uuid: Option<String>,
    /// Uncorrectable ECC errors since the driver loaded (volatile count); absent when ECC is off or unsupported.
    pub ecc_uncorrected: Option<u64>,
    /// The most recent critical XID error seen since the agent started (NVML only).
    pub xid: Option<u32>,
    pub power_watts: Option<f64>,
    /// Names of the active clock throttle reasons ([`throttle_reason_names`]).
    pub throttle_reasons: Option<Vec<String>>,
}

/// XID errors that mean the GPU itself is in trouble, as opposed to XIDs an application's own fault causes (13, 31,
/// 43…): 48 double-bit ECC error, 61/62 internal micro-controller breakpoint/halt, 63/64 ECC page retirement or row
/// remapping event/failure, 74 NVLink error, 79 fallen off the bus, 92 high single-bit ECC error rate, 94/95
/// contained/uncontained ECC error, 119/120 GSP timeout/error, 140 unrecovered ECC error, 154 the driver asks for a
/// GPU reset or a reboot.
pub const CRITICAL_XIDS: [u32; 14] = [48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140, 154];

/// Whether `xid` is one of [`CRITICAL_XIDS`].
pub fn is_critical_xid(xid: u32) -> bool {
    CRITICAL_XIDS.contains(&xid)
}

/// The clock throttle reasons of the driver's bitmask (NVML's `nvmlClocksThrottleReason*`, which `nvidia-smi`
/// prints as `clocks_throttle_reasons.active`), with the names the heartbeat uses.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake"),
    (0x100, "display_clock_setting"),
];

/// The names of the reasons set in `mask`, in bit order; bits this agent does not know read as one `other`.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    let mut names: Vec<String> =
        THROTTLE_REASONS.iter().filter(|(bit, _)| mask & bit != 0).map(|(_, name)| (*name).to_owned()).collect();
    let known = THROTTLE_REASONS.iter().fold(0, |all, (bit, _)| all | bit);
    if mask & !known != 0 {
        names.push("other".to_owned());
    }
    names
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
            Ok((source, sample)) => {
                source.watch_xids();
                return Ok((GpuProbe::Nvml(Arc::new(source)), sample));
            }
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

/// Group identical GPUs (same model and memory) for the registration, in the order they were first seen. A group
/// carries its GPUs' uuids when every one of them has one.
pub fn group_devices(samples: &[GpuSample]) -> Vec<GpuDevice> {
    let mut groups: Vec<(GpuDevice, Vec<Option<String>>)> = Vec::new();
    for gpu in samples {
        match groups.iter_mut().find(|(g, _)| g.model == gpu.model && g.memory_bytes == gpu.memory_total_bytes) {
            Some((group, uuids)) => {
                group.count += 1;
                uuids.push(gpu.uuid.clone());
            }
            None => groups.push((
                GpuDevice { model: gpu.model.clone(), count: 1, memory_bytes: gpu.memory_total_bytes, uuids: None },
                vec![gpu.uuid.clone()],
            )),
        }
    }
    groups.into_iter().map(|(group, uuids)| GpuDevice { uuids: uuids.into_iter().collect(), ..group }).collect()
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
            uuid: gpu.uuid.clone(),
            ecc_uncorrected: gpu.ecc_uncorrected,
            xid: gpu.xid,
            power_watts: gpu.power_watts,
            throttle_reasons: gpu.throttle_reasons.clone(),
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
            ..GpuSample::default()
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
    fn a_group_carries_uuids_only_when_every_gpu_has_one() {
        let with = |index, uuid: &str| GpuSample { uuid: Some(uuid.into()), ..gpu(index, "A", Some(80)) };
        let groups = group_devices(&[with(0, "GPU-a"), with(1, "GPU-b"), gpu(2, "B", None), with(3, "GPU-c")]);
        assert_eq!(groups[0].uuids, Some(vec!["GPU-a".into(), "GPU-b".into(), "GPU-c".into()]));
        assert_eq!(groups[0].count, 3);
        assert_eq!(groups[1].uuids, None);
        let groups = group_devices(&[with(0, "GPU-a"), gpu(1, "A", Some(80))]);
        assert_eq!(groups[0].uuids, None, "one GPU without a uuid leaves the group's out");
    }

    #[test]
    fn metrics_carry_every_figure() {
        let sample = GpuSample {
            uuid: Some("GPU-1".into()),
            ecc_uncorrected: Some(0),
            xid: Some(79),
            power_watts: Some(301.5),
            throttle_reasons: Some(vec!["sw_power_cap".into()]),
            ..gpu(3, "X", Some(80))
        };
        assert_eq!(
            to_metrics(&[sample]),
            vec![GpuMetrics {
                index: 3,
                model: Some("X".into()),
                utilization: Some(50.0),
                memory_used_bytes: Some(1),
                memory_total_bytes: Some(80),
                temperature_c: Some(40.0),
                uuid: Some("GPU-1".into()),
                ecc_uncorrected: Some(0),
                xid: Some(79),
                power_watts: Some(301.5),
                throttle_reasons: Some(vec!["sw_power_cap".into()]),
            }]
        );
    }

    #[test]
    fn throttle_reasons_are_named_by_bit() {
        assert_eq!(throttle_reason_names(0), Vec::<String>::new());
        assert_eq!(throttle_reason_names(0x4 | 0x8), vec!["sw_power_cap", "hw_slowdown"]);
        assert_eq!(
            throttle_reason_names(0x20 | 0x40 | 0x80),
            vec!["sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake"]
        );
        assert_eq!(throttle_reason_names(0x1 | 0x1000), vec!["gpu_idle", "other"]);
    }

    #[test]
    fn critical_xids_are_the_hardware_ones() {
        for xid in [48, 62, 63, 64, 74, 79, 92, 94, 95] {
            assert!(is_critical_xid(xid), "{xid}");
        }
        for xid in [13, 31, 43, 0] {
            assert!(!is_critical_xid(xid), "{xid}");
        }
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
