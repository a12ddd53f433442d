//! `/v0/deployments` (SPEC §15): a model the router places on nodes whose agents start it, with its replicas' states.
//! Administrators create, change and delete (audited as `deployment.create`, `deployment.update`,
//! `deployment.delete`); viewers read.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use llm_router_protocol::{ErrorBody, ReplicaState, RuntimeKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::audit;
use super::extract::{AdminUser, ClientAddr, Viewer};
use super::json::JsonBody;
use crate::clock::rfc3339;
use crate::deploy::DeploymentState;
use crate::error::{ApiResult, bad_request, not_found};
use crate::model::deployment::{Deployment, DeploymentSpec, Replica};
use crate::state::AppState;
use crate::validate;

/// Where replicas may go: nodes with every one of these tags.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSelector {
    #[serde(default)]
    tags: Vec<String>,
}

/// `POST /v0/deployments`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    /// Unique among deployments, 1–128 characters.
    name: String,
    /// The model name clients use on `/v1`.
    model: String,
    /// `file:///path/on/the/node`, or an `http://` or `https://` URL of the model file.
    source: String,
    /// The file's SHA-256 (64 hex digits): required with a URL.
    #[serde(default)]
    sha256: Option<String>,
    runtime: RuntimeKind,
    /// Extra arguments for the runtime.
    #[serde(default)]
    args: Vec<String>,
    /// How many replicas, 0–1000; at most one per node.
    #[schema(minimum = 0, maximum = 1000)]
    replicas: u32,
    /// Free GPU memory a node must have for a replica.
    #[serde(default)]
    gpu_memory_bytes: Option<u64>,
    #[serde(default)]
    node_selector: Option<NodeSelector>,
    /// Requests a replica's runtime computes at once (llama.cpp's `--parallel`, vLLM's `--max-num-seqs`).
    #[serde(default)]
    max_concurrency: Option<u32>,
}

/// `PATCH /v0/deployments/{id}`: a field left out stays as it is. A change of `model`, `source`, `sha256`,
/// `runtime`, `args` or `max_concurrency` makes a new revision, which every replica rolls to (the new one ready
/// before the old one stops); `replicas`, `gpu_memory_bytes` and `node_selector` only move or add replicas.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDeployment {
    #[serde(default)]
    model: Option<String>,
    /// A new source needs its own `sha256` when it is a URL.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    runtime: Option<RuntimeKind>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000)]
    replicas: Option<u32>,
    /// `null` removes the requirement.
    #[serde(default, deserialize_with = "super::api_keys::present")]
    #[schema(value_type = Option<u64>)]
    gpu_memory_bytes: Option<Option<u64>>,
    #[serde(default)]
    node_selector: Option<NodeSelector>,
    /// `null` removes the limit.
    #[serde(default, deserialize_with = "super::api_keys::present")]
    #[schema(value_type = Option<u32>)]
    max_concurrency: Option<Option<u32>>,
}

/// A deployment as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentView {
    id: Uuid,
    name: String,
    model: String,
    source: String,
    sha256: Option<String>,
    runtime: RuntimeKind,
    args: Vec<String>,
    /// Replicas asked for.
    replicas: u32,
    gpu_memory_bytes: Option<u64>,
    node_selector: NodeSelector,
    max_concurrency: Option<u32>,
    /// Rises with every change of what a replica runs.
    revision: i64,
    created_by: String,
    created_at: String,
    updated_at: String,
    /// Replicas ready at the current revision.
    ready_replicas: u32,
    /// Replicas serving the model, at any revision: while a change rolls out, the old runtime serves until the new
    /// one is ready.
    serving_replicas: u32,
    /// One entry per replica, by slot.
    replica_states: Vec<ReplicaView>,
}

/// Where one replica is and how it stands.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReplicaView {
    slot: u32,
    /// The node it is placed on; `null` while pending for a node.
    node_id: Option<Uuid>,
    /// That node's display name, or its machine name.
    node_name: Option<String>,
    state: ReplicaState,
    /// The revision the node runs (0: none yet).
    revision: i64,
    /// Why it is pending or failed.
    reason: Option<String>,
    bytes_done: Option<u64>,
    bytes_total: Option<u64>,
    /// The local port its runtime listens on, on its node.
    port: Option<u16>,
    pid: Option<u32>,
    /// Times its runtime was started again after it died.
    restarts: u32,
    download_ms: Option<u64>,
    start_ms: Option<u64>,
    /// The GPUs of its node its runtime runs on, by their index in the node's GPU figures; `null` when the
    /// deployment asks for no GPU memory (the runtime sees every GPU of the node).
    gpus: Option<Vec<u32>>,
    placed_at: Option<String>,
    ready_at: Option<String>,
    updated_at: String,
}

impl DeploymentView {
    fn of(state: &AppState, DeploymentState { deployment, replicas }: DeploymentState) -> Self {
        let Deployment { id, name, spec, revision, created_by, created_at, updated_at } = deployment;
        let ready_replicas =
            replicas.iter().filter(|r| r.report.state == ReplicaState::Ready && r.report.revision == revision).count()
                as u32;
        let serving_replicas = replicas.iter().filter(|r| r.report.state == ReplicaState::Ready).count() as u32;
        DeploymentView {
            id,
            name,
            model: spec.model,
            source: spec.source,
            sha256: spec.sha256,
            runtime: spec.runtime,
            args: spec.args,
            replicas: spec.replicas,
            gpu_memory_bytes: spec.gpu_memory_bytes,
            node_selector: NodeSelector { tags: spec.selector_tags },
            max_concurrency: spec.max_concurrency,
            revision,
            created_by,
            created_at: rfc3339(created_at),
            updated_at: rfc3339(updated_at),
            ready_replicas,
            serving_replicas,
            replica_states: replicas.into_iter().map(|replica| ReplicaView::of(state, replica)).collect(),
        }
    }
}

impl ReplicaView {
    fn of(state: &AppState, replica: Replica) -> Self {
        let node_name = replica.node_id.and_then(|id| {
            state
                .registry
                .view(id, |node, _| node.display_name.clone().unwrap_or_else(|| node.machine_name.clone()))
                .ok()
        });
        let report = replica.report;
        ReplicaView {
            slot: replica.slot,
            node_id: replica.node_id,
            node_name,
            state: report.state,
            revision: report.revision,
            reason: report.reason,
            bytes_done: report.bytes_done,
            bytes_total: report.bytes_total,
            port: report.port,
            pid: report.pid,
            restarts: report.restarts,
            download_ms: report.download_ms,
            start_ms: report.start_ms,
            gpus: report.gpus,
            placed_at: replica.placed_at.map(rfc3339),
            ready_at: report.ready_at.map(rfc3339),
            updated_at: rfc3339(report.updated_at),
        }
    }
}

/// `{"deployments": […]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentList {
    deployments: Vec<DeploymentView>,
}

/// List deployments, by name, with each replica's node and state
#[utoipa::path(get, path = "/v0/deployments", tag = "deployments", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every deployment", body = DeploymentList),
        (status = 401, description = "No valid credential", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _viewer: Viewer) -> Json<DeploymentList> {
    let deployments = state.deployments.list().into_iter().map(|d| DeploymentView::of(&state, d)).collect();
    Json(DeploymentList { deployments })
}

/// One deployment, by id or name
#[utoipa::path(get, path = "/v0/deployments/{id}", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Deployment id (UUID) or name")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody)
    ))]
pub async fn get(
    State(state): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<DeploymentView>> {
    let found = state.deployments.get(&id).ok_or_else(|| missing(&id))?;
    Ok(Json(DeploymentView::of(&state, found)))
}

fn missing(id: &str) -> crate::error::ApiError {
    not_found(format!("No deployment with id or name `{}`.", crate::model::echo(id)))
}

/// Create a deployment (admin): its replicas are placed at once where nodes can take them
#[utoipa::path(post, path = "/v0/deployments", tag = "deployments", security(("bearer" = [])),
    request_body = CreateDeployment,
    responses(
        (status = 201, description = "Created", body = DeploymentView),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 409, description = "A deployment with this name exists", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The change could not be stored", body = ErrorBody)
    ))]
pub async fn create(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<CreateDeployment>,
) -> ApiResult<(StatusCode, Json<DeploymentView>)> {
    let target = crate::model::echo(&body.name).into_owned();
    let result: ApiResult<(StatusCode, Json<DeploymentView>)> = async {
        let name = validate::name(&body.name)?;
        if Uuid::parse_str(&name).is_ok() {
            return Err(bad_request("`name` must not be a UUID: deployments are found by id or by name."));
        }
        let spec = validate::deployment(DeploymentSpec {
            model: body.model,
            source: body.source,
            sha256: body.sha256,
            runtime: body.runtime,
            args: body.args,
            replicas: body.replicas,
            gpu_memory_bytes: body.gpu_memory_bytes,
            selector_tags: body.node_selector.unwrap_or_default().tags,
            max_concurrency: body.max_concurrency,
        })?;
        let created = state.deployments.create(name, spec, &admin.name).await?;
        let placed = place_now(&state, created).await;
        Ok((StatusCode::CREATED, Json(DeploymentView::of(&state, placed))))
    }
    .await;
    audit::log_result(&state, &admin.name, client, "deployment.create", &target, &result);
    result
}

/// Places what the change to `changed` calls for at once, on the router that places (the others' changes are
/// placed within a second); the deployment as it stands then.
async fn place_now(state: &AppState, changed: DeploymentState) -> DeploymentState {
    if let Err(err) = state.deployments.place(&state.registry).await {
        tracing::warn!(error = %format!("{err:#}"), "placing replicas failed; the next pass tries again");
    }
    state.deployments.get(&changed.deployment.id.to_string()).unwrap_or(changed)
}

/// Change a deployment (admin): scale, new args or source (a new revision, rolled over its replicas), placement
#[utoipa::path(patch, path = "/v0/deployments/{id}", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Deployment id (UUID) or name")),
    request_body = UpdateDeployment,
    responses(
        (status = 200, description = "Changed", body = DeploymentView),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The change could not be stored", body = ErrorBody)
    ))]
pub async fn update(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateDeployment>,
) -> ApiResult<Json<DeploymentView>> {
    let target = crate::model::echo(&id).into_owned();
    let result: ApiResult<Json<DeploymentView>> = async {
        let current = state.deployments.get(&id).ok_or_else(|| missing(&id))?.deployment;
        let spec = next_spec(&current.spec, body)?;
        let changed = state.deployments.update(current, spec).await?;
        Ok(Json(DeploymentView::of(&state, place_now(&state, changed).await)))
    }
    .await;
    audit::log_result(&state, &admin.name, client, "deployment.update", &target, &result);
    result
}

/// The spec after `change`, checked whole.
fn next_spec(current: &DeploymentSpec, change: UpdateDeployment) -> ApiResult<DeploymentSpec> {
    let new_source = change.source.is_some();
    let fields = DeploymentSpec {
        model: change.model.unwrap_or_else(|| current.model.clone()),
        source: change.source.unwrap_or_else(|| current.source.clone()),
        // A new source comes with its own hash, or none (a file on the node).
        sha256: if new_source || change.sha256.is_some() { change.sha256 } else { current.sha256.clone() },
        runtime: change.runtime.unwrap_or(current.runtime),
        args: change.args.unwrap_or_else(|| current.args.clone()),
        replicas: change.replicas.unwrap_or(current.replicas),
        gpu_memory_bytes: change.gpu_memory_bytes.unwrap_or(current.gpu_memory_bytes),
        selector_tags: change.node_selector.map_or_else(|| current.selector_tags.clone(), |s| s.tags),
        max_concurrency: change.max_concurrency.unwrap_or(current.max_concurrency),
    };
    Ok(validate::deployment(fields)?)
}

/// Delete a deployment (admin): the nodes stop its replicas at their next heartbeat
#[utoipa::path(delete, path = "/v0/deployments/{id}", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Deployment id (UUID) or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 503, description = "The change could not be stored", body = ErrorBody)
    ))]
pub async fn delete(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let target = crate::model::echo(&id).into_owned();
    let result: ApiResult<StatusCode> = async {
        let found = state.deployments.get(&id).ok_or_else(|| missing(&id))?;
        state.deployments.delete(found.deployment.id).await?;
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    audit::log_result(&state, &admin.name, client, "deployment.delete", &target, &result);
    result
}
