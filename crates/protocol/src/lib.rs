//! Wire types shared by the router (`llm-router`) and the agent (`llm-node`).
//!
//! Every request and answer body of the node API (SPEC §2) is defined here once, so the two binaries can never
//! disagree on a field. Numbers that a client could send out of range (ports, counts) are typed wide enough that
//! the router can answer with a precise error instead of a generic parse failure.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Header that carries a node's token on node API calls.
pub const NODE_TOKEN_HEADER: &str = "X-Node-Token";

/// Header carrying a join token on `POST /v0/nodes` (SPEC §9): enrollment an operator controls.
pub const JOIN_TOKEN_HEADER: &str = "X-Join-Token";

/// Path of the registration endpoint.
pub const REGISTER_PATH: &str = "/v0/nodes";

/// Path of the heartbeat endpoint.
pub const HEARTBEAT_PATH: &str = "/v0/health";

/// Path where an agent that starts runtimes waits for its assignments to change (SPEC §15): `GET` with its node
/// token and `?known=<fingerprint>`; answered at once when its assignments differ from that, else when they change,
/// or after `wait_secs` (default 30, at most 60) with the same ones.
pub const ASSIGNMENTS_PATH: &str = "/v0/assignments";

/// The largest request count a heartbeat may carry (`active_requests`, and `load.running` and `load.waiting`): the
/// router refuses more, the agent bounds what its runtime reports to it.
pub const MAX_REQUEST_COUNT: u32 = 1_000_000;

/// Lifecycle state of a node (SPEC §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Registered, waiting for an administrator's approval.
    Pending,
    /// Approved, but its runtime reports no ready model yet.
    Registering,
    /// Approved and serving at least one ready model.
    Online,
    /// Approved and heartbeating, but a GPU is missing, faulty or too hot (SPEC §10): no inference traffic until the
    /// conditions clear.
    Degraded,
    /// Approved, but silent for longer than the router's `offline_after`.
    Offline,
}

impl NodeStatus {
    /// Every status, in the order the dashboard lists them.
    pub const ALL: [NodeStatus; 5] =
        [NodeStatus::Pending, NodeStatus::Registering, NodeStatus::Online, NodeStatus::Degraded, NodeStatus::Offline];

    /// The snake_case name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Pending => "pending",
            NodeStatus::Registering => "registering",
            NodeStatus::Online => "online",
            NodeStatus::Degraded => "degraded",
            NodeStatus::Offline => "offline",
        }
    }

    /// Whether an administrator has approved the node (every status but `pending`).
    pub fn is_approved(self) -> bool {
        self != NodeStatus::Pending
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name given is not one of the statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStatus(pub String);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown node status `{}` (expected pending, registering, online, degraded or offline)", self.0)
    }
}

impl std::error::Error for UnknownStatus {}

impl FromStr for NodeStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeStatus::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// One group of identical GPUs in a machine, as announced at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuDevice {
    /// Marketing name as the driver reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// How many GPUs of this model the machine has; must be at least 1.
    pub count: i64,
    /// Memory of one GPU of this group, in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The driver's UUIDs of the GPUs of this group (e.g. `GPU-5d2c…`), as many as `count`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuids: Option<Vec<String>>,
}

/// Body of `POST /v0/nodes` (SPEC §2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    pub machine_name: String,
    /// Advertised address; the router uses the TCP peer address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// Port of the node's OpenAI-compatible runtime, 1..=65535.
    pub runtime_port: i64,
    pub runtime_version: String,
    /// Absent or empty means the machine has no GPU, which the router refuses.
    #[serde(default)]
    pub gpu_devices: Option<Vec<GpuDevice>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_runtimes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// Answer to a successful registration (201, or 200 when a node rotated its own token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub node_id: Uuid,
    /// The node's secret; shown only in this answer.
    pub node_token: String,
    pub status: NodeStatus,
    pub heartbeat_interval_secs: u64,
}

/// Live figures of one GPU, sent with every heartbeat.
///
/// A figure the driver cannot give is left out, never sent as zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuMetrics {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Percent, 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    /// The driver's UUID of this GPU, e.g. `GPU-5d2c…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Uncorrectable ECC errors since the driver last loaded (the volatile count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    /// The most recent critical XID error seen since the agent started; absent when none was seen or the agent
    /// cannot watch for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    /// Power draw in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    /// The clock throttle reasons active now, as short snake_case names (`hw_slowdown`, `sw_thermal_slowdown`,
    /// `hw_power_brake`, `sw_power_cap`…); empty when the clocks run free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<Vec<String>>,
}

/// Body of `POST /v0/health` (SPEC §2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    pub node_id: Uuid,
    /// Percent, 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage: Option<f64>,
    /// Percent, 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_usage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<GpuMetrics>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_requests: Option<u64>,
    /// The runtime's own queue and KV cache, as its metrics report them (SPEC §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<RuntimeLoad>,
    /// The replicas the agent runs for deployments (SPEC §15): sent, possibly empty, by an agent started with
    /// `--manage-runtimes`, and only by one; the router answers such a heartbeat with the node's assignments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaReport>>,
}

/// What a node's runtime reports of its own load (SPEC §13): vLLM's, llama.cpp server's or SGLang's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuntimeLoad {
    /// Requests the runtime is computing now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    /// Requests waiting in the runtime's own queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u32>,
    /// The share of the KV cache in use, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// The node's status after this heartbeat.
    pub status: NodeStatus,
    pub heartbeat_interval_secs: u64,
    /// What the node should run (SPEC §15), whole: present in the answer to a heartbeat that carried `replicas`.
    /// A replica the agent runs that is not in it is stopped once a replica of the deployment's newer revision is
    /// ready, or at once when its deployment is not listed at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignments: Option<Vec<Assignment>>,
}

/// Answer of `GET /v0/assignments`: what the node should run, and a fingerprint of it to wait on next time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignmentsAnswer {
    /// Changes whenever the assignments do; opaque.
    pub fingerprint: String,
    pub assignments: Vec<Assignment>,
}

/// The prefix, in a node's `supported_runtimes`, of a runtime its agent starts itself for deployments (SPEC §15):
/// `managed:llama_cpp`, `managed:vllm`. The placer puts a deployment only on nodes that list its runtime so.
pub const MANAGED_RUNTIME_PREFIX: &str = "managed:";

/// A runtime the agent can start for a deployment (SPEC §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// llama.cpp's `llama-server`, or llama-cpp-python's server where that is what the node has (GGUF models).
    LlamaCpp,
    /// vLLM's `vllm serve`.
    Vllm,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 2] = [RuntimeKind::LlamaCpp, RuntimeKind::Vllm];

    /// The snake_case name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::LlamaCpp => "llama_cpp",
            RuntimeKind::Vllm => "vllm",
        }
    }

    /// How many GPUs one replica runs on, when the runtime decides it from its arguments: vLLM runs on its tensor-
    /// parallel size times its pipeline-parallel size (1 unless `--tensor-parallel-size`/`-tp` or
    /// `--pipeline-parallel-size`/`-pp` say otherwise). `None` for llama.cpp, which spreads a model's layers over
    /// whatever GPUs it is given.
    pub fn gpus_needed(self, args: &[String]) -> Option<u32> {
        match self {
            RuntimeKind::LlamaCpp => None,
            RuntimeKind::Vllm => {
                let size = |long: &str, short: &str| {
                    let mut value = None;
                    for (at, arg) in args.iter().enumerate() {
                        if let Some(given) = arg.strip_prefix(long).and_then(|rest| rest.strip_prefix('=')) {
                            value = Some(given);
                        } else if arg == long || arg == short {
                            value = args.get(at + 1).map(String::as_str);
                        }
                    }
                    value.and_then(|v| v.parse::<u32>().ok()).filter(|n| *n > 0).unwrap_or(1)
                };
                Some(size("--tensor-parallel-size", "-tp").saturating_mul(size("--pipeline-parallel-size", "-pp")))
            }
        }
    }

    /// How a node whose agent starts this runtime lists it in `supported_runtimes`: `managed:llama_cpp`.
    pub fn managed_name(self) -> String {
        format!("{MANAGED_RUNTIME_PREFIX}{}", self.as_str())
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One replica the router assigns to a node: what to run (SPEC §15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub deployment_id: Uuid,
    /// The deployment's revision: it rises when what a replica runs changes (source, runtime, args, limits).
    pub revision: i64,
    /// The name clients use on `/v1`; the runtime serves the model under it.
    pub model: String,
    /// `file:///path/on/the/node`, or an `http(s)://` URL to download.
    pub source: String,
    /// The model file's SHA-256, lowercase hex: required for a URL, checked for a file when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub runtime: RuntimeKind,
    /// Extra arguments for the runtime, after the ones the agent sets (model, host, port, served name).
    #[serde(default)]
    pub args: Vec<String>,
    /// Requests the runtime computes at once, when the deployment sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// The GPU memory one replica takes, when the deployment sets it: the agent then starts the runtime on GPUs of
    /// its own that have it free (`CUDA_VISIBLE_DEVICES`); without it, the runtime sees every GPU of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
}

/// Where a replica is on its way to serving (SPEC §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Not placed yet, or placed and not yet taken up by the node's agent.
    Pending,
    /// The agent is fetching the model into its cache.
    Downloading,
    /// The runtime is started and loading the model.
    Starting,
    /// The runtime serves the model.
    Ready,
    /// The download or the runtime failed; the agent tries again with backoff (`reason` says why).
    Failed,
}

impl ReplicaState {
    pub const ALL: [ReplicaState; 5] = [
        ReplicaState::Pending,
        ReplicaState::Downloading,
        ReplicaState::Starting,
        ReplicaState::Ready,
        ReplicaState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Downloading => "downloading",
            ReplicaState::Starting => "starting",
            ReplicaState::Ready => "ready",
            ReplicaState::Failed => "failed",
        }
    }
}

/// How one replica the agent runs is doing, in every heartbeat of an agent with `--manage-runtimes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicaReport {
    pub deployment_id: Uuid,
    /// The revision of the assignment this replica runs.
    pub revision: i64,
    pub state: ReplicaState,
    /// Why it failed (or, while pending, what it waits for), a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes of the model in the cache so far, while downloading (and once downloaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// The model's size, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// The local port the runtime listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The runtime's process id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Times the runtime was started again after it died.
    #[serde(default)]
    pub restarts: u32,
    /// How long the download took (0 when the model was in the cache or on the node), once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_ms: Option<u64>,
    /// How long the runtime's last start took, from spawning it to its serving the model, once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// The GPUs the runtime was started on, by their `index` in the heartbeat's `gpus`; absent when it sees every
    /// GPU of the node (the deployment asks for no GPU memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
}

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Machine-readable code and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// One entry of an OpenAI-compatible `GET /v1/models` answer; only `id` matters here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelEntry {
    pub id: String,
}

/// An OpenAI-compatible `GET /v1/models` answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelList {
    #[serde(default)]
    pub data: Vec<ModelEntry>,
}

impl ModelList {
    /// The model ids, in the runtime's order.
    pub fn ids(&self) -> Vec<String> {
        self.data.iter().map(|m| m.id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in NodeStatus::ALL {
            assert_eq!(status.as_str().parse::<NodeStatus>(), Ok(status));
            let json = serde_json::to_string(&status).expect("serialize");
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert!("Online".parse::<NodeStatus>().is_err());
    }

    #[test]
    fn register_request_accepts_minimal_body() {
        let body =
            r#"{"machine_name":"a","runtime_port":8000,"runtime_version":"1","gpu_devices":[{"model":"X","count":1}]}"#;
        let req: RegisterRequest = serde_json::from_str(body).expect("parse");
        assert_eq!(req.ip_address, None);
        assert_eq!(
            req.gpu_devices,
            Some(vec![GpuDevice { model: "X".into(), count: 1, memory_bytes: None, uuids: None }])
        );
    }

    #[test]
    fn model_list_ignores_extra_fields() {
        let body = r#"{"object":"list","data":[{"id":"m1","object":"model"},{"id":"m2"}]}"#;
        let list: ModelList = serde_json::from_str(body).expect("parse");
        assert_eq!(list.ids(), vec!["m1", "m2"]);
    }

    #[test]
    fn vllm_runs_on_its_tensor_times_pipeline_parallel_size_and_llama_cpp_on_any_number() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(RuntimeKind::LlamaCpp.gpus_needed(&args(&["--tensor-parallel-size", "4"])), None);
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&[]), Some(1));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["--max-model-len", "4096"])), Some(1));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["--tensor-parallel-size", "4"])), Some(4));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["-tp", "2", "-pp", "2"])), Some(4));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["--tensor-parallel-size=8"])), Some(8));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["-tp", "2", "--tensor-parallel-size=4"])), Some(4));
        // Not a number, zero, or the flag last: the runtime's own default.
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["-tp", "two"])), Some(1));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["-tp", "0"])), Some(1));
        assert_eq!(RuntimeKind::Vllm.gpus_needed(&args(&["-tp"])), Some(1));
    }
}
