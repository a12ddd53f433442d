//! GPU health (SPEC §10): what a heartbeat's GPU figures reveal. A registered GPU that is missing, a GPU fault
//! (uncorrectable ECC errors, a critical XID) or a GPU too hot is a *condition*; any condition makes a live node
//! `degraded`, and it leaves that status when a heartbeat shows none.

use std::fmt::Write;

use llm_router_protocol::{GpuDevice, GpuMetrics};

/// XID errors after which a GPU is not trusted with work (the agent reports the same list): 48 (double-bit ECC
/// error), 61 and 62 (internal micro-controller breakpoint, halt), 63 and 64 (ECC page retirement or row remapping
/// recorded, or failed), 74 (NVLink error), 79 (fallen off the bus), 92 (high single-bit ECC rate), 94 and 95
/// (contained, uncontained ECC error), 119 and 120 (GSP timeout, GSP error), 140 (unrecovered ECC error), 154 (GPU
/// recovery action: reset or reboot needed).
pub const CRITICAL_XIDS: [u32; 14] = [48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140, 154];

/// Highest GPU temperature before `gpu_overheat`, unless `--gpu-max-temp-c` says otherwise.
pub const DEFAULT_GPU_MAX_TEMP_C: f64 = 90.0;

/// One reason a node is `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// A GPU the node registered (by UUID, or by count when UUIDs are unknown) is absent from its heartbeat.
    GpuMissing,
    /// A GPU reports uncorrectable ECC errors since the driver loaded, or a critical XID.
    GpuFault,
    /// A GPU is at or above the temperature limit.
    GpuOverheat,
}

impl Condition {
    pub const ALL: [Condition; 3] = [Condition::GpuMissing, Condition::GpuFault, Condition::GpuOverheat];

    pub fn as_str(self) -> &'static str {
        match self {
            Condition::GpuMissing => "gpu_missing",
            Condition::GpuFault => "gpu_fault",
            Condition::GpuOverheat => "gpu_overheat",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Condition::GpuMissing => 1,
            Condition::GpuFault => 2,
            Condition::GpuOverheat => 4,
        }
    }
}

/// A node's conditions, as a set (one byte per node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conditions(u8);

impl Conditions {
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, condition: Condition) -> bool {
        self.0 & condition.bit() != 0
    }

    pub fn insert(&mut self, condition: Condition) {
        self.0 |= condition.bit();
    }

    /// The conditions, in a fixed order.
    pub fn iter(self) -> impl Iterator<Item = Condition> {
        Condition::ALL.into_iter().filter(move |condition| self.contains(*condition))
    }

    /// `gpu_missing,gpu_fault`, as stored; `None` when there is none.
    pub fn encode(self) -> Option<String> {
        (!self.is_empty()).then(|| self.iter().map(Condition::as_str).collect::<Vec<_>>().join(","))
    }

    /// Reads [`Conditions::encode`]'s text; names it does not know are skipped.
    pub fn decode(text: &str) -> Self {
        let mut conditions = Conditions::default();
        for name in text.split(',') {
            if let Some(condition) = Condition::ALL.into_iter().find(|c| c.as_str() == name.trim()) {
                conditions.insert(condition);
            }
        }
        conditions
    }
}

/// What one heartbeat's GPU figures say: the conditions, and a sentence naming the GPUs behind them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Findings {
    pub conditions: Conditions,
    pub detail: String,
}

/// Judges a heartbeat's GPU figures against what the node registered. A heartbeat without any GPU figure says
/// nothing about the GPUs (the agent could not read them): no condition.
pub fn assess(registered: &[GpuDevice], gpus: &[GpuMetrics], max_temp_c: f64) -> Findings {
    let mut findings = Findings::default();
    if gpus.is_empty() {
        return findings;
    }
    let mut notes: Vec<String> = Vec::new();

    let registered_uuids: Vec<&str> =
        registered.iter().filter_map(|device| device.uuids.as_ref()).flatten().map(String::as_str).collect();
    let reported_uuids: Vec<&str> = gpus.iter().filter_map(|gpu| gpu.uuid.as_deref()).collect();
    if !registered_uuids.is_empty() && !reported_uuids.is_empty() {
        let missing: Vec<&str> =
            registered_uuids.iter().copied().filter(|uuid| !reported_uuids.contains(uuid)).collect();
        if !missing.is_empty() {
            findings.conditions.insert(Condition::GpuMissing);
            notes.push(format!("missing {}", missing.join(", ")));
        }
    } else {
        let expected: i64 = registered.iter().map(|device| device.count.max(0)).sum();
        let reported = i64::try_from(gpus.len()).unwrap_or(i64::MAX);
        if reported < expected {
            findings.conditions.insert(Condition::GpuMissing);
            notes.push(format!("{reported} of {expected} GPUs reported"));
        }
    }

    for gpu in gpus {
        if let Some(xid) = gpu.xid.filter(|xid| CRITICAL_XIDS.contains(xid)) {
            findings.conditions.insert(Condition::GpuFault);
            notes.push(format!("GPU {}: XID {xid}", gpu.index));
        }
        if let Some(errors) = gpu.ecc_uncorrected.filter(|errors| *errors > 0) {
            findings.conditions.insert(Condition::GpuFault);
            notes.push(format!("GPU {}: {errors} uncorrectable ECC errors", gpu.index));
        }
        if let Some(temperature) = gpu.temperature_c.filter(|t| *t >= max_temp_c) {
            findings.conditions.insert(Condition::GpuOverheat);
            let mut note = format!("GPU {}: ", gpu.index);
            let _ = write!(note, "{temperature:.0} °C (limit {max_temp_c:.0} °C)");
            notes.push(note);
        }
    }
    findings.detail = notes.join("; ");
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(count: i64, uuids: Option<&[&str]>) -> GpuDevice {
        GpuDevice {
            model: "NVIDIA H100 80GB HBM3".into(),
            count,
            memory_bytes: None,
            uuids: uuids.map(|u| u.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn gpu(index: u32, uuid: Option<&str>) -> GpuMetrics {
        GpuMetrics { index, uuid: uuid.map(str::to_owned), temperature_c: Some(60.0), ..GpuMetrics::default() }
    }

    #[test]
    fn healthy_gpus_raise_nothing_and_no_figures_say_nothing() {
        let registered = [device(2, Some(&["GPU-a", "GPU-b"]))];
        let healthy = assess(&registered, &[gpu(0, Some("GPU-a")), gpu(1, Some("GPU-b"))], 90.0);
        assert!(healthy.conditions.is_empty(), "{healthy:?}");
        assert!(assess(&registered, &[], 90.0).conditions.is_empty());
    }

    #[test]
    fn a_gpu_is_missing_by_uuid_or_by_count() {
        let by_uuid = assess(&[device(2, Some(&["GPU-a", "GPU-b"]))], &[gpu(0, Some("GPU-a"))], 90.0);
        assert_eq!(by_uuid.conditions.encode().as_deref(), Some("gpu_missing"));
        assert!(by_uuid.detail.contains("GPU-b"), "{}", by_uuid.detail);
        // A swapped GPU (new UUID, same count) is missing too: the registered one is gone.
        let swapped = assess(&[device(1, Some(&["GPU-a"]))], &[gpu(0, Some("GPU-z"))], 90.0);
        assert!(swapped.conditions.contains(Condition::GpuMissing));
        let by_count = assess(&[device(4, None)], &[gpu(0, None), gpu(1, None), gpu(2, None)], 90.0);
        assert!(by_count.conditions.contains(Condition::GpuMissing));
        assert!(by_count.detail.contains("3 of 4"), "{}", by_count.detail);
        assert!(assess(&[device(2, None)], &[gpu(0, None), gpu(1, None)], 90.0).conditions.is_empty());
    }

    #[test]
    fn faults_are_critical_xids_and_uncorrectable_ecc_errors() {
        let registered = [device(1, None)];
        let xid = GpuMetrics { xid: Some(79), ..gpu(0, None) };
        let found = assess(&registered, &[xid], 90.0);
        assert_eq!(found.conditions.encode().as_deref(), Some("gpu_fault"));
        assert_eq!(found.detail, "GPU 0: XID 79");
        let harmless = GpuMetrics { xid: Some(13), ..gpu(0, None) };
        assert!(assess(&registered, &[harmless], 90.0).conditions.is_empty(), "XID 13 is not critical");
        let ecc = GpuMetrics { ecc_uncorrected: Some(2), ..gpu(0, None) };
        assert!(assess(&registered, &[ecc], 90.0).conditions.contains(Condition::GpuFault));
        let clean = GpuMetrics { ecc_uncorrected: Some(0), ..gpu(0, None) };
        assert!(assess(&registered, &[clean], 90.0).conditions.is_empty());
    }

    #[test]
    fn overheat_is_at_or_above_the_limit() {
        let registered = [device(1, None)];
        let hot = GpuMetrics { temperature_c: Some(90.0), ..gpu(0, None) };
        let found = assess(&registered, std::slice::from_ref(&hot), 90.0);
        assert_eq!(found.conditions.encode().as_deref(), Some("gpu_overheat"));
        assert_eq!(found.detail, "GPU 0: 90 °C (limit 90 °C)");
        assert!(assess(&registered, &[hot], 95.0).conditions.is_empty());
    }

    #[test]
    fn conditions_survive_their_stored_form() {
        let mut all = Conditions::default();
        for condition in Condition::ALL {
            all.insert(condition);
        }
        assert_eq!(all.encode().as_deref(), Some("gpu_missing,gpu_fault,gpu_overheat"));
        assert_eq!(Conditions::decode("gpu_missing,gpu_fault,gpu_overheat"), all);
        assert_eq!(Conditions::decode("gpu_fault,something_new"), {
            let mut fault = Conditions::default();
            fault.insert(Condition::GpuFault);
            fault
        });
        assert_eq!(Conditions::default().encode(), None);
    }
}
