//! Deployments (SPEC §15): a model the router places on nodes whose agents run it, and where each replica stands.

use llm_router_protocol::{Assignment, ReplicaState, RuntimeKind};
use uuid::Uuid;

use crate::clock::Millis;

/// What an administrator asked for: a model, where it comes from, how to run it, how many replicas, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    /// The name clients use on `/v1`.
    pub model: String,
    /// `file:///path/on/the/node`, or an `http(s)://` URL.
    pub source: String,
    /// Lowercase hex; required for a URL.
    pub sha256: Option<String>,
    pub runtime: RuntimeKind,
    pub args: Vec<String>,
    pub replicas: u32,
    /// Free GPU memory a node must have for a replica, when set.
    pub gpu_memory_bytes: Option<u64>,
    /// Tags a node must all have.
    pub selector_tags: Vec<String>,
    pub max_concurrency: Option<u32>,
}

impl DeploymentSpec {
    /// Whether going from `self` to `next` changes what a replica runs, and so makes a new revision. Scaling and
    /// the placement's constraints do not: the replicas that run stay as they are.
    pub fn runs_differently(&self, next: &DeploymentSpec) -> bool {
        self.model != next.model
            || self.source != next.source
            || self.sha256 != next.sha256
            || self.runtime != next.runtime
            || self.args != next.args
            || self.max_concurrency != next.max_concurrency
    }
}

/// A deployment as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub id: Uuid,
    /// Unique among deployments; what the API and the dashboard show.
    pub name: String,
    pub spec: DeploymentSpec,
    /// Rises with every change of what a replica runs ([`DeploymentSpec::runs_differently`]); 1 at creation.
    pub revision: i64,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl Deployment {
    /// What a node assigned one of its replicas is told to run.
    pub fn assignment(&self) -> Assignment {
        let spec = &self.spec;
        Assignment {
            deployment_id: self.id,
            revision: self.revision,
            model: spec.model.clone(),
            source: spec.source.clone(),
            sha256: spec.sha256.clone(),
            runtime: spec.runtime,
            args: spec.args.clone(),
            max_concurrency: spec.max_concurrency,
            gpu_memory_bytes: spec.gpu_memory_bytes,
        }
    }
}

/// One replica of a deployment: its place (`slot` 0, 1, … below `replicas`), its node once placed, and what the
/// node's agent last reported of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub deployment_id: Uuid,
    pub slot: u32,
    /// `None`: pending, for [`Replica::reason`].
    pub node_id: Option<Uuid>,
    pub placed_at: Option<Millis>,
    pub report: ReplicaStatus,
}

/// Where a replica stands, as its node's agent reported it (or, unplaced, why it waits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub state: ReplicaState,
    /// The revision the node runs (0: none reported yet).
    pub revision: i64,
    pub reason: Option<String>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub download_ms: Option<u64>,
    pub start_ms: Option<u64>,
    /// The GPUs of its node its runtime was started on (their heartbeat indices), when the agent chose some.
    pub gpus: Option<Vec<u32>>,
    /// When this router first saw it ready at its current placement.
    pub ready_at: Option<Millis>,
    /// When the report last changed.
    pub updated_at: Millis,
}

impl ReplicaStatus {
    /// A replica waiting: for a node, or for its node's agent to take it up.
    pub fn pending(reason: impl Into<String>, at: Millis) -> Self {
        ReplicaStatus {
            state: ReplicaState::Pending,
            revision: 0,
            reason: Some(reason.into()),
            bytes_done: None,
            bytes_total: None,
            port: None,
            pid: None,
            restarts: 0,
            download_ms: None,
            start_ms: None,
            gpus: None,
            ready_at: None,
            updated_at: at,
        }
    }

    /// Whether `other` says the same as this but for when it was said (`updated_at`): no write is needed for it.
    pub fn same_as(&self, other: &ReplicaStatus) -> bool {
        ReplicaStatus { updated_at: other.updated_at, ..self.clone() } == *other
    }
}

/// The reason of a replica placed on a node whose agent has not reported it yet.
pub const AWAITING_AGENT: &str = "placed; waiting for the node's agent to take it up";
