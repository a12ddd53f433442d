//! GPU detection through NVML, the NVIDIA driver's management library.
//!
//! The library (`libnvidia-ml.so.1`) is loaded when the agent starts, not linked, so the agent builds and runs on
//! machines without an NVIDIA driver: there [`NvmlSource::init`] fails and detection moves on to `nvidia-smi`.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;

use super::{GpuSample, SourceError};

/// Name of this detection path, for logs and errors.
pub const NAME: &str = "NVML";

/// An initialised NVML library.
pub struct NvmlSource {
    nvml: Nvml,
}

impl NvmlSource {
    /// Load and initialise the driver's library.
    pub fn init() -> Result<Self, SourceError> {
        match Nvml::init() {
            Ok(nvml) => Ok(NvmlSource { nvml }),
            Err(NvmlError::LibloadingError(e)) => Err(SourceError::Unavailable(format!(
                "the NVIDIA driver library libnvidia-ml.so.1 could not be loaded ({e})"
            ))),
            Err(e) => Err(SourceError::Unavailable(format!("the library did not start: {e}"))),
        }
    }

    /// Read the current figures of every GPU. A figure the GPU does not report is left out; a GPU whose name
    /// cannot be read is reported by its index.
    pub fn sample(&self) -> Result<Vec<GpuSample>, SourceError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| SourceError::Invalid(format!("the GPU count could not be read: {e}")))?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = match self.nvml.device_by_index(index) {
                Ok(device) => device,
                // A GPU that fell off the bus or is hidden from this container is skipped, not fatal.
                Err(e) => {
                    tracing::debug!(index, error = %e, "NVML could not open a GPU");
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            gpus.push(GpuSample {
                index,
                model: device.name().unwrap_or_else(|_| format!("NVIDIA GPU {index}")),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                utilization: device.utilization_rates().ok().map(|u| f64::from(u.gpu.min(100))),
                temperature_c: device.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
            });
        }
        Ok(gpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver, initialisation fails with a reason instead of panicking; on a machine
    /// with it, every GPU has a model name.
    #[test]
    fn init_either_fails_cleanly_or_lists_named_gpus() {
        match NvmlSource::init() {
            Err(SourceError::Unavailable(reason)) => assert!(!reason.is_empty()),
            Err(other) => panic!("unexpected error kind: {other:?}"),
            Ok(source) => {
                let gpus = source.sample().expect("sample");
                assert!(gpus.iter().all(|g| !g.model.is_empty()));
            }
        }
    }
}
