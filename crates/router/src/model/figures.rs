//! The figures of a node's latest heartbeat, and the one packed form in which they are kept and stored.

use std::fmt;

use llm_router_protocol::{GpuMetrics, RuntimeLoad};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// The figures of the latest heartbeat, replaced as a whole by each new one.
///
/// The API calls them the node's `metrics`, its schema `NodeMetrics`; in the code they are figures, so that
/// "metrics" means the router's own Prometheus metrics alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = NodeMetrics)]
pub struct NodeFigures {
    pub cpu_usage: Option<f64>,
    pub memory_usage: Option<f64>,
    pub gpus: Vec<GpuMetrics>,
    pub active_requests: Option<u64>,
    /// The runtime's own queue and KV cache use (SPEC §13), when the agent could read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<RuntimeLoad>,
}

/// Heartbeat figures in their stored form: positional JSON arrays, about half the size of [`NodeFigures`]'s JSON
/// (which repeats every field name for every GPU). `[cpu, memory, active, [[index, model, utilization, used,
/// total, temperature, uuid, ecc_uncorrected, xid, power_watts, throttle_reasons], …], [running, waiting,
/// kv_cache_usage]]`, each GPU's array cut after its last figure from `uuid` on, so GPUs without health figures (and
/// rows stored before there were any) keep the six-entry form; the runtime's load comes last, only when reported.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedFigures(Box<str>);

type Packed<G> = (Option<f64>, Option<f64>, Option<u64>, Vec<G>);
type PackedWithLoad<G> = (Option<f64>, Option<f64>, Option<u64>, Vec<G>, PackedLoad);
/// The runtime's load, positional: `[running, waiting, kv_cache_usage]`.
type PackedLoad = (Option<u32>, Option<u32>, Option<f64>);

/// One GPU's figures, written as a positional array.
struct PackGpu<'a>(&'a GpuMetrics);

/// One GPU's figures, read from a positional array of six or more entries.
struct UnpackGpu(GpuMetrics);

/// Entries of a packed GPU that are always written.
const PACKED_GPU_HEAD: usize = 6;

impl Serialize for PackGpu<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let g = self.0;
        let tail = [
            g.uuid.is_some(),
            g.ecc_uncorrected.is_some(),
            g.xid.is_some(),
            g.power_watts.is_some(),
            g.throttle_reasons.is_some(),
        ];
        let tail_len = tail.iter().rposition(|present| *present).map_or(0, |last| last + 1);
        let mut seq = serializer.serialize_seq(Some(PACKED_GPU_HEAD + tail_len))?;
        seq.serialize_element(&g.index)?;
        seq.serialize_element(&g.model)?;
        seq.serialize_element(&g.utilization)?;
        seq.serialize_element(&g.memory_used_bytes)?;
        seq.serialize_element(&g.memory_total_bytes)?;
        seq.serialize_element(&g.temperature_c)?;
        if tail_len > 0 {
            seq.serialize_element(&g.uuid)?;
        }
        if tail_len > 1 {
            seq.serialize_element(&g.ecc_uncorrected)?;
        }
        if tail_len > 2 {
            seq.serialize_element(&g.xid)?;
        }
        if tail_len > 3 {
            seq.serialize_element(&g.power_watts)?;
        }
        if tail_len > 4 {
            seq.serialize_element(&g.throttle_reasons)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for UnpackGpu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GpuVisitor;

        impl<'de> Visitor<'de> for GpuVisitor {
            type Value = UnpackGpu;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a packed GPU: an array of at least six figures")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UnpackGpu, A::Error> {
                let missing = |i| de::Error::invalid_length(i, &"at least six figures");
                let index = seq.next_element()?.ok_or_else(|| missing(0))?;
                let model = seq.next_element()?.ok_or_else(|| missing(1))?;
                let utilization = seq.next_element()?.ok_or_else(|| missing(2))?;
                let memory_used_bytes = seq.next_element()?.ok_or_else(|| missing(3))?;
                let memory_total_bytes = seq.next_element()?.ok_or_else(|| missing(4))?;
                let temperature_c = seq.next_element()?.ok_or_else(|| missing(5))?;
                let uuid = seq.next_element()?.flatten();
                let ecc_uncorrected = seq.next_element()?.flatten();
                let xid = seq.next_element()?.flatten();
                let power_watts = seq.next_element()?.flatten();
                let throttle_reasons = seq.next_element()?.flatten();
                // Figures a later version may append are skipped.
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(UnpackGpu(GpuMetrics {
                    index,
                    model,
                    utilization,
                    memory_used_bytes,
                    memory_total_bytes,
                    temperature_c,
                    uuid,
                    ecc_uncorrected,
                    xid,
                    power_watts,
                    throttle_reasons,
                }))
            }
        }

        deserializer.deserialize_seq(GpuVisitor)
    }
}

impl PackedFigures {
    pub fn pack(metrics: &NodeFigures) -> Self {
        let gpus: Vec<PackGpu<'_>> = metrics.gpus.iter().map(PackGpu).collect();
        let (cpu, memory, active) = (metrics.cpu_usage, metrics.memory_usage, metrics.active_requests);
        // Numbers, optional strings and arrays always encode.
        let text = match metrics.load {
            None => serde_json::to_string::<Packed<PackGpu<'_>>>(&(cpu, memory, active, gpus)),
            Some(load) => serde_json::to_string::<PackedWithLoad<PackGpu<'_>>>(&(
                cpu,
                memory,
                active,
                gpus,
                (load.running, load.waiting, load.kv_cache_usage),
            )),
        };
        PackedFigures(text.unwrap_or_default().into_boxed_str())
    }

    /// As read from the database: decoded only when shown.
    pub fn from_stored(text: String) -> Self {
        PackedFigures(text.into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The figures, or `None` when the stored text is neither the packed form nor a [`NodeFigures`] object.
    pub fn unpack(&self) -> Option<NodeFigures> {
        let unpack_gpus = |gpus: Vec<UnpackGpu>| gpus.into_iter().map(|UnpackGpu(gpu)| gpu).collect();
        if let Ok((cpu_usage, memory_usage, active_requests, gpus)) = serde_json::from_str::<Packed<UnpackGpu>>(&self.0)
        {
            return Some(NodeFigures { cpu_usage, memory_usage, gpus: unpack_gpus(gpus), active_requests, load: None });
        }
        if let Ok((cpu_usage, memory_usage, active_requests, gpus, (running, waiting, kv_cache_usage))) =
            serde_json::from_str::<PackedWithLoad<UnpackGpu>>(&self.0)
        {
            let load = Some(RuntimeLoad { running, waiting, kv_cache_usage });
            return Some(NodeFigures { cpu_usage, memory_usage, gpus: unpack_gpus(gpus), active_requests, load });
        }
        serde_json::from_str(&self.0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> NodeFigures {
        NodeFigures {
            cpu_usage: Some(12.5),
            memory_usage: None,
            gpus: vec![
                GpuMetrics {
                    index: 0,
                    model: Some("NVIDIA H100 80GB HBM3".into()),
                    utilization: Some(97.0),
                    memory_used_bytes: Some(1 << 30),
                    memory_total_bytes: Some(80 << 30),
                    temperature_c: Some(71.5),
                    uuid: Some("GPU-5d2c0e8a-6f35-4b6e-9a0c-3f1e2d4c5b6a".into()),
                    ecc_uncorrected: Some(2),
                    xid: Some(79),
                    power_watts: Some(312.5),
                    throttle_reasons: Some(vec!["sw_power_cap".into(), "hw_slowdown".into()]),
                },
                GpuMetrics {
                    index: 1,
                    model: None,
                    utilization: None,
                    memory_used_bytes: None,
                    memory_total_bytes: None,
                    temperature_c: None,
                    ..GpuMetrics::default()
                },
            ],
            active_requests: Some(3),
            load: None,
        }
    }

    #[test]
    fn the_runtime_load_is_packed_last_only_when_reported() {
        let mut metrics = figures();
        let without = PackedFigures::pack(&metrics);
        metrics.load = Some(RuntimeLoad { running: Some(2), waiting: Some(5), kv_cache_usage: Some(0.75) });
        let with = PackedFigures::pack(&metrics);
        assert!(with.as_str().ends_with(",[2,5,0.75]]"), "{}", with.as_str());
        assert!(with.as_str().starts_with(&without.as_str()[..without.as_str().len() - 1]));
        assert_eq!(with.unpack(), Some(metrics.clone()));
        metrics.load = Some(RuntimeLoad { running: None, waiting: Some(1), kv_cache_usage: None });
        assert_eq!(PackedFigures::pack(&metrics).unpack(), Some(metrics));
    }

    #[test]
    fn packed_figures_round_trip_and_are_smaller() {
        let metrics = figures();
        let packed = PackedFigures::pack(&metrics);
        assert_eq!(packed.unpack(), Some(metrics.clone()));
        let verbose = serde_json::to_string(&metrics).expect("json");
        assert!(packed.as_str().len() * 3 < verbose.len() * 2, "{} vs {}", packed.as_str(), verbose);
        // The usual heartbeat: every GPU with its six base figures.
        let gpu = GpuMetrics {
            uuid: None,
            ecc_uncorrected: None,
            xid: None,
            power_watts: None,
            throttle_reasons: None,
            ..metrics.gpus[0].clone()
        };
        let usual = NodeFigures { gpus: vec![gpu; 8], ..metrics };
        let (packed, verbose) = (PackedFigures::pack(&usual), serde_json::to_string(&usual).expect("json"));
        assert!(packed.as_str().len() * 2 < verbose.len(), "{} vs {}", packed.as_str(), verbose);
    }

    #[test]
    fn stored_object_form_and_garbage_are_handled() {
        let verbose = serde_json::to_string(&figures()).expect("json");
        assert_eq!(PackedFigures::from_stored(verbose).unpack(), Some(figures()));
        assert_eq!(PackedFigures::from_stored("not json".into()).unpack(), None);
    }

    #[test]
    fn gpus_without_health_figures_keep_the_six_entry_form() {
        let metrics = NodeFigures {
            cpu_usage: None,
            memory_usage: None,
            gpus: vec![
                GpuMetrics { index: 0, temperature_c: Some(40.0), ..GpuMetrics::default() },
                GpuMetrics { index: 1, ecc_uncorrected: Some(0), ..GpuMetrics::default() },
            ],
            active_requests: None,
            load: None,
        };
        let packed = PackedFigures::pack(&metrics);
        assert_eq!(
            packed.as_str(),
            "[null,null,null,[[0,null,null,null,null,40.0],[1,null,null,null,null,null,null,0]]]"
        );
        assert_eq!(packed.unpack(), Some(metrics));
        // As stored before GPUs had health figures.
        let old = PackedFigures::from_stored("[1.0,2.0,3,[[0,\"X\",50.0,1,2,40.0]]]".into());
        let gpu = &old.unpack().expect("old form").gpus[0];
        assert_eq!((gpu.model.as_deref(), gpu.uuid.as_deref(), gpu.throttle_reasons.as_ref()), (Some("X"), None, None));
    }
}
