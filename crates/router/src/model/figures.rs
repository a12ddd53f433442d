//! The figures of a node's latest heartbeat, and the one packed form in which they are kept and stored.

use llm_router_protocol::GpuMetrics;
use serde::{Deserialize, Serialize};

/// The figures of the latest heartbeat, replaced as a whole by each new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeMetrics {
    pub cpu_usage: Option<f64>,
    pub memory_usage: Option<f64>,
    pub gpus: Vec<GpuMetrics>,
    pub active_requests: Option<u64>,
}

/// Heartbeat figures in their stored form: positional JSON arrays, about half the size of [`NodeMetrics`]'s JSON
/// (which repeats every field name for every GPU). `[cpu, memory, active, [[index, model, utilization, used,
/// total, temperature], …]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMetrics(Box<str>);

type PackedGpu<S> = (u32, Option<S>, Option<f64>, Option<u64>, Option<u64>, Option<f64>);
type Packed<S> = (Option<f64>, Option<f64>, Option<u64>, Vec<PackedGpu<S>>);

impl PackedMetrics {
    pub fn pack(metrics: &NodeMetrics) -> Self {
        let gpus: Vec<PackedGpu<&str>> = metrics
            .gpus
            .iter()
            .map(|g| {
                (g.index, g.model.as_deref(), g.utilization, g.memory_used_bytes, g.memory_total_bytes, g.temperature_c)
            })
            .collect();
        let packed: Packed<&str> = (metrics.cpu_usage, metrics.memory_usage, metrics.active_requests, gpus);
        // Numbers, optional strings and arrays always encode.
        PackedMetrics(serde_json::to_string(&packed).unwrap_or_default().into_boxed_str())
    }

    /// As read from the database: decoded only when shown.
    pub fn from_stored(text: String) -> Self {
        PackedMetrics(text.into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The figures, or `None` when the stored text is neither the packed form nor a [`NodeMetrics`] object.
    pub fn unpack(&self) -> Option<NodeMetrics> {
        if let Ok((cpu_usage, memory_usage, active_requests, gpus)) = serde_json::from_str::<Packed<String>>(&self.0) {
            let gpus = gpus
                .into_iter()
                .map(|(index, model, utilization, memory_used_bytes, memory_total_bytes, temperature_c)| GpuMetrics {
                    index,
                    model,
                    utilization,
                    memory_used_bytes,
                    memory_total_bytes,
                    temperature_c,
                    ..GpuMetrics::default()
                })
                .collect();
            return Some(NodeMetrics { cpu_usage, memory_usage, gpus, active_requests });
        }
        serde_json::from_str(&self.0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> NodeMetrics {
        NodeMetrics {
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
                    ..GpuMetrics::default()
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
        }
    }

    #[test]
    fn packed_figures_round_trip_and_are_smaller() {
        let metrics = figures();
        let packed = PackedMetrics::pack(&metrics);
        assert_eq!(packed.unpack(), Some(metrics.clone()));
        let verbose = serde_json::to_string(&metrics).expect("json");
        assert!(packed.as_str().len() * 2 < verbose.len(), "{} vs {}", packed.as_str(), verbose);
    }

    #[test]
    fn stored_object_form_and_garbage_are_handled() {
        let verbose = serde_json::to_string(&figures()).expect("json");
        assert_eq!(PackedMetrics::from_stored(verbose).unpack(), Some(figures()));
        assert_eq!(PackedMetrics::from_stored("not json".into()).unpack(), None);
    }
}
