//! A node as the router knows it, and the figures of its latest heartbeat.

use llm_router_protocol::{GpuDevice, GpuMetrics, NodeStatus};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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
    /// The latest heartbeat's figures ([`NodeMetrics`]) as JSON: encoded once when they arrive, then stored and
    /// shown as they are. Compact in memory, and a start-up loads them without decoding.
    pub metrics: Option<Box<RawValue>>,
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
    #[schema(value_type = Option<NodeMetrics>)]
    pub metrics: Option<Box<RawValue>>,
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
            metrics: node.metrics.clone(),
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
