//! A node as the router knows it, its lists, and the events of its history.

use llm_router_protocol::{GpuDevice, NodeStatus};
use uuid::Uuid;

use super::figures::PackedFigures;
use super::health::Conditions;
use crate::clock::Millis;

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
    pub figures: Option<PackedFigures>,
    pub registered_at: Millis,
    pub approved_at: Option<Millis>,
    pub approved_by: Option<String>,
    /// The name of the join token the node registered with, if any.
    pub join_token: Option<String>,
    /// Cordoned by an administrator: no new inference request goes to it (SPEC §8).
    pub cordoned: bool,
    /// Most inference requests in flight at once through this router, when an administrator set a limit.
    pub max_concurrency: Option<u32>,
    /// What its latest heartbeat revealed about its GPUs (SPEC §10); any makes a live node `degraded`.
    pub conditions: Conditions,
    pub last_seen_at: Option<Millis>,
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

/// An event as stored, with the id that orders a node's history and pages through it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub id: i64,
    pub event: NodeEvent,
}

/// Every list of a node, as one value: what a node's child rows hold, and what is written whenever one changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLists {
    pub gpu_devices: Vec<GpuDevice>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
    pub tags: Vec<String>,
}

impl NodeLists {
    pub fn of(node: &Node) -> Self {
        NodeLists {
            gpu_devices: node.gpu_devices.clone(),
            supported_runtimes: node.supported_runtimes.clone(),
            loaded_models: node.loaded_models.clone(),
            ready_models: node.ready_models.clone(),
            tags: node.tags.clone(),
        }
    }

    /// Puts these lists on `node`, replacing its own.
    pub fn apply_to(self, node: &mut Node) {
        node.gpu_devices = self.gpu_devices;
        node.supported_runtimes = self.supported_runtimes;
        node.loaded_models = self.loaded_models;
        node.ready_models = self.ready_models;
        node.tags = self.tags;
    }
}

#[cfg(test)]
impl Node {
    /// An online node with plain values and empty lists, for a test to change what it is about.
    pub fn example() -> Node {
        Node {
            id: Uuid::nil(),
            machine_name: "gpu".into(),
            ip_address: "10.0.0.1".into(),
            runtime_port: 8000,
            runtime_version: "test".into(),
            status: NodeStatus::Online,
            display_name: None,
            notes: None,
            gpu_devices: Vec::new(),
            supported_runtimes: Vec::new(),
            loaded_models: Vec::new(),
            ready_models: Vec::new(),
            tags: Vec::new(),
            figures: None,
            registered_at: 0,
            approved_at: None,
            approved_by: None,
            join_token: None,
            cordoned: false,
            max_concurrency: None,
            conditions: Default::default(),
            last_seen_at: None,
        }
    }
}
