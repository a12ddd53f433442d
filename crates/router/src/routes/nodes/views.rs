//! How nodes and their events look in the admin API (SPEC §3): times as RFC 3339 UTC, figures unpacked, never a
//! token.

use llm_router_protocol::{GpuDevice, NodeStatus};
use serde::Serialize;
use uuid::Uuid;

use crate::clock::{Millis, rfc3339};
use crate::model::figures::{NodeFigures, PackedFigures};
use crate::model::node::{Node, RecordedEvent};
use crate::routing::{RouteFigures, Routing};

/// The node as the admin API shows it (SPEC §3): times as RFC 3339 UTC, never a token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: Uuid,
    pub machine_name: String,
    pub ip_address: String,
    pub runtime_port: u16,
    pub runtime_version: String,
    pub status: NodeStatus,
    /// What the latest heartbeat revealed about the GPUs (`gpu_missing`, `gpu_fault`, `gpu_overheat`); any makes a
    /// live node `degraded`. Empty when healthy.
    pub conditions: Vec<String>,
    pub display_name: Option<String>,
    pub notes: Option<String>,
    pub gpu_devices: Vec<GpuDevice>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
    pub tags: Vec<String>,
    pub metrics: Option<NodeFigures>,
    pub registered_at: String,
    pub approved_at: Option<String>,
    pub approved_by: Option<String>,
    /// The name of the join token the node registered with, if any.
    pub joined_with: Option<String>,
    /// False while an administrator has cordoned the node: it gets no new inference request.
    pub schedulable: bool,
    /// Most inference requests in flight at once through this router; `null`: no limit.
    pub max_concurrency: Option<u32>,
    /// How inference traffic through this router is going on the node.
    pub routing: RoutingView,
    pub last_seen_at: Option<String>,
    /// Rises whenever anything this object shows changes (a heartbeat, the status, an edit, the routing figures):
    /// `GET /v0/nodes?changed_since=` sends the nodes whose revision is above the one given (SPEC §12).
    pub revision: i64,
}

/// A node's inference traffic through this router (SPEC §8). Counted since the router started.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RoutingView {
    /// Requests whose answer has not ended yet (streams included). Draining a node: cordon it, wait for 0.
    pub in_flight: u32,
    /// Requests sent to the node, retries included.
    pub requests_total: u64,
    /// Tries that failed: no connection, no headers in time, 502/503/504, a stream cut short.
    pub failures_total: u64,
    /// Until when the node gets no request after failures (passive health); `null` when it is not ejected.
    pub ejected_until: Option<String>,
}

impl RoutingView {
    fn of(figures: Option<RouteFigures>) -> Self {
        let figures = figures.unwrap_or_default();
        RoutingView {
            in_flight: figures.in_flight,
            requests_total: figures.requests_total,
            failures_total: figures.failures_total,
            ejected_until: figures.ejected_until.map(rfc3339),
        }
    }
}

impl NodeView {
    /// The node at `revision`, with its routing figures at `now`.
    pub fn new(node: &Node, revision: i64, routing: &Routing, now: Millis) -> Self {
        NodeView {
            id: node.id,
            machine_name: node.machine_name.clone(),
            ip_address: node.ip_address.clone(),
            runtime_port: node.runtime_port,
            runtime_version: node.runtime_version.clone(),
            status: node.status,
            conditions: node.conditions.iter().map(|condition| condition.as_str().to_owned()).collect(),
            display_name: node.display_name.clone(),
            notes: node.notes.clone(),
            gpu_devices: node.gpu_devices.clone(),
            supported_runtimes: node.supported_runtimes.clone(),
            loaded_models: node.loaded_models.clone(),
            ready_models: node.ready_models.clone(),
            tags: node.tags.clone(),
            metrics: node.figures.as_ref().and_then(PackedFigures::unpack),
            registered_at: rfc3339(node.registered_at),
            approved_at: node.approved_at.map(rfc3339),
            approved_by: node.approved_by.clone(),
            joined_with: node.join_token.clone(),
            schedulable: !node.cordoned,
            max_concurrency: node.max_concurrency,
            routing: RoutingView::of(routing.figures(node.id, now)),
            last_seen_at: node.last_seen_at.map(rfc3339),
            revision,
        }
    }
}

/// An event as the admin API shows it.
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

impl From<RecordedEvent> for NodeEventView {
    fn from(recorded: RecordedEvent) -> Self {
        let RecordedEvent { id, event } = recorded;
        NodeEventView {
            id,
            node_id: event.node_id,
            at: rfc3339(event.at),
            from: event.from.map(|status| status.as_str().to_owned()),
            to: event.to,
            reason: event.reason,
            actor: event.actor,
        }
    }
}
