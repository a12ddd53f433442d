//! A node as the router knows it, and the figures of its latest heartbeat.

use llm_router_protocol::{GpuDevice, GpuMetrics, NodeStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::{Millis, rfc3339};

/// Everything the router keeps about one node, token excepted.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: Uuid,
    pub machine_name: String,
    pub ip_address: String,
    pub runtime_port: u16,
    pub runtime_version: String,
    pub status: NodeStatus,
    pub display_name: Option<String>,
    pub notes: Option<String>,
    pub gpu_devices: Vec<GpuDevice>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
    pub tags: Vec<String>,
    /// The latest heartbeat's figures, packed: encoded once when they arrive, stored as they are, and decoded only
    /// when shown.
    pub metrics: Option<PackedMetrics>,
    pub registered_at: Millis,
    pub approved_at: Option<Millis>,
    pub approved_by: Option<String>,
    pub last_seen_at: Option<Millis>,
}

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
            let gpus =
                gpus.into_iter()
                    .map(|(index, model, utilization, memory_used_bytes, memory_total_bytes, temperature_c)| {
                        GpuMetrics { index, model, utilization, memory_used_bytes, memory_total_bytes, temperature_c }
                    })
                    .collect();
            return Some(NodeMetrics { cpu_usage, memory_usage, gpus, active_requests });
        }
        serde_json::from_str(&self.0).ok()
    }
}

/// The node as the admin API shows it (SPEC §3): times as RFC 3339 UTC, never a token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: Uuid,
    pub machine_name: String,
    pub ip_address: String,
    pub runtime_port: u16,
    pub runtime_version: String,
    pub status: NodeStatus,
    pub display_name: Option<String>,
    pub notes: Option<String>,
    pub gpu_devices: Vec<GpuDevice>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
    pub tags: Vec<String>,
    pub metrics: Option<NodeMetrics>,
    pub registered_at: String,
    pub approved_at: Option<String>,
    pub approved_by: Option<String>,
    pub last_seen_at: Option<String>,
}

impl From<&Node> for NodeView {
    fn from(node: &Node) -> Self {
        NodeView {
            id: node.id,
            machine_name: node.machine_name.clone(),
            ip_address: node.ip_address.clone(),
            runtime_port: node.runtime_port,
            runtime_version: node.runtime_version.clone(),
            status: node.status,
            display_name: node.display_name.clone(),
            notes: node.notes.clone(),
            gpu_devices: node.gpu_devices.clone(),
            supported_runtimes: node.supported_runtimes.clone(),
            loaded_models: node.loaded_models.clone(),
            ready_models: node.ready_models.clone(),
            tags: node.tags.clone(),
            metrics: node.metrics.as_ref().and_then(PackedMetrics::unpack),
            registered_at: rfc3339(node.registered_at),
            approved_at: node.approved_at.map(rfc3339),
            approved_by: node.approved_by.clone(),
            last_seen_at: node.last_seen_at.map(rfc3339),
        }
    }
}

/// One row of a node's history (SPEC §2.3): every transition, with who or what caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEvent {
    pub node_id: Uuid,
    pub at: Millis,
    /// `None` for the registration that created the node.
    pub from: Option<NodeStatus>,
    /// A status, or `deleted`.
    pub to: String,
    pub reason: String,
    /// The user who acted, when a person did.
    pub actor: Option<String>,
}

impl NodeEvent {
    pub fn new(node_id: Uuid, at: Millis, from: Option<NodeStatus>, to: &str, reason: impl Into<String>) -> Self {
        NodeEvent { node_id, at, from, to: to.to_owned(), reason: reason.into(), actor: None }
    }

    pub fn by(mut self, actor: Option<&str>) -> Self {
        self.actor = actor.map(str::to_owned);
        self
    }
}

/// The event as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeEventView {
    pub id: i64,
    pub node_id: Uuid,
    pub at: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub actor: Option<String>,
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
                },
                GpuMetrics {
                    index: 1,
                    model: None,
                    utilization: None,
                    memory_used_bytes: None,
                    memory_total_bytes: None,
                    temperature_c: None,
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
