//! GPU detection through NVML, the NVIDIA driver's management library.
//!
//! The library (`libnvidia-ml.so.1`) is loaded when the agent starts, not linked, so the agent builds and runs on
//! machines without an NVIDIA driver: there [`NvmlSource::init`] fails and detection moves on to `nvidia-smi`.
//!
//! Critical XID errors are events, not figures: [`NvmlSource::watch_xids`] starts a thread that waits on an NVML
//! event set registered for them on every GPU and remembers, per GPU, the most recent one of [`CRITICAL_XIDS`]
//! (crate::gpu::CRITICAL_XIDS); every sample then carries it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use super::{GpuSample, SourceError, is_critical_xid, throttle_reason_names};

/// Name of this detection path, for logs and errors.
pub const NAME: &str = "NVML";

/// An initialised NVML library.
pub struct NvmlSource {
    nvml: Nvml,
    /// GPU index → the most recent critical XID seen on it, filled by the watcher thread.
    xids: Arc<Mutex<HashMap<u32, u32>>>,
}

impl NvmlSource {
    /// Load and initialise the driver's library.
    pub fn init() -> Result<Self, SourceError> {
        match Nvml::init() {
            Ok(nvml) => Ok(NvmlSource { nvml, xids: Arc::default() }),
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
                uuid: device.uuid().ok().filter(|u| !u.trim().is_empty()),
                // Fails when ECC is off or the GPU has none: the figure is then left out.
                ecc_uncorrected: device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
                xid: self.xids.lock().unwrap_or_else(PoisonError::into_inner).get(&index).copied(),
                power_watts: device.power_usage().ok().map(|milliwatts| f64::from(milliwatts) / 1000.0),
                throttle_reasons: device.current_throttle_reasons().ok().map(|r| throttle_reason_names(r.bits())),
            });
        }
        Ok(gpus)
    }

    /// Start the thread that records critical XID errors for [`NvmlSource::sample`]. GPUs that cannot deliver XID
    /// events are skipped; without any, the thread ends and samples carry no `xid`.
    pub fn watch_xids(&self) {
        let xids = Arc::clone(&self.xids);
        let started = std::thread::Builder::new().name("nvml-xid".into()).spawn(move || {
            if let Err(e) = watch(&xids) {
                tracing::warn!(error = %e, "critical XID errors cannot be watched; heartbeats will carry no xid");
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "the XID watcher thread could not start");
        }
    }
}

/// Wait for critical XID events on every GPU that can deliver them, forever. The event set borrows its library,
/// so the thread opens its own (NVML counts its initialisations).
#[cfg(target_os = "linux")]
fn watch(xids: &Mutex<HashMap<u32, u32>>) -> Result<(), NvmlError> {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;

    let nvml = Nvml::init()?;
    let mut set = nvml.create_event_set()?;
    let mut watched = Vec::new();
    for index in 0..nvml.device_count()? {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        if !device.supported_event_types().is_ok_and(|types| types.contains(EventTypes::CRITICAL_XID_ERROR)) {
            continue;
        }
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => {
                watched.push(index);
                set
            }
            // A failed registration frees the set: start a new one with the GPUs registered so far.
            Err(e) => {
                tracing::debug!(index, error = %e.error, "NVML cannot deliver XID events for a GPU");
                let mut fresh = nvml.create_event_set()?;
                for &done in &watched {
                    fresh = nvml
                        .device_by_index(done)?
                        .register_events(EventTypes::CRITICAL_XID_ERROR, fresh)
                        .map_err(|e| e.error)?;
                }
                fresh
            }
        };
    }
    if watched.is_empty() {
        return Err(NvmlError::NotSupported);
    }
    tracing::debug!(gpus = ?watched, "watching for critical XID errors");
    loop {
        match set.wait(60_000) {
            Ok(event) => {
                let (Ok(index), Some(XidError::Value(xid))) = (event.device.index(), event.event_data) else {
                    continue;
                };
                let Ok(xid) = u32::try_from(xid) else { continue };
                if is_critical_xid(xid) {
                    tracing::warn!(gpu = index, xid, "critical XID error");
                    xids.lock().unwrap_or_else(PoisonError::into_inner).insert(index, xid);
                } else {
                    tracing::debug!(gpu = index, xid, "XID error");
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn watch(_: &Mutex<HashMap<u32, u32>>) -> Result<(), NvmlError> {
    Err(NvmlError::NotSupported)
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
