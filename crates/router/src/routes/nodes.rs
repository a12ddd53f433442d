//! `/v0/nodes`: registration by agents (SPEC §2.1) and the admin's view and actions (SPEC §3).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use llm_router_protocol::{NODE_TOKEN_HEADER, NodeStatus, RegisterRequest, RegisterResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::json::JsonBody;
use crate::app::AppState;
use crate::auth::{AdminUser, Viewer};
use crate::error::{ApiError, ApiResult, bad_request, not_found};
use crate::registry::node::{NodeEventView, NodeView};
use crate::registry::validate;

/// `POST /v0/nodes`: the steps of SPEC §2.1, in order.
pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let mut registration = validate::registration(body, peer.ip())?;
    let presented = headers.get(NODE_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let plan = state.registry.plan_registration(&registration, presented)?;
    if state.settings.reachability_check {
        let models = state.prober.models(registration.runtime_addr()?).await.map_err(ApiError::NodeUnreachable)?;
        if !registration.loaded_models_given {
            registration.loaded_models = models;
        }
    }
    let done = state.registry.register(registration, plan).await?;
    let status = if done.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        Json(RegisterResponse {
            node_id: done.node_id,
            node_token: done.token.into_plaintext(),
            status: done.status,
            heartbeat_interval_secs: state.settings.heartbeat_interval.as_secs(),
        }),
    ))
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
}

/// `GET /v0/nodes[?status=...]`
pub async fn list(
    State(state): State<AppState>,
    _viewer: Viewer,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Json<Vec<NodeView>>> {
    let Query(params) = params.map_err(|err| bad_request(format!("Bad query string: {err}.")))?;
    let status = params
        .status
        .map(|s| s.parse::<NodeStatus>())
        .transpose()
        .map_err(|err| bad_request(format!("`status`: {err}.")))?;
    Ok(Json(state.registry.list(status)))
}

/// `GET /v0/nodes/{id}`
pub async fn get(State(state): State<AppState>, _viewer: Viewer, Path(id): Path<String>) -> ApiResult<Json<NodeView>> {
    Ok(Json(state.registry.get(node_id(&id)?)?))
}

/// `POST /v0/nodes/{id}/approve`
pub async fn approve(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    Ok(Json(state.registry.approve(node_id(&id)?, &admin.name).await?))
}

/// Body of `PATCH /v0/nodes/{id}`: absent fields stay as they are; `null` or "" clears a text field.
#[derive(Debug, Deserialize)]
pub struct NodePatch {
    #[serde(default, deserialize_with = "present")]
    display_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    notes: Option<Option<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(de).map(Some)
}

/// `PATCH /v0/nodes/{id}`
pub async fn update(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<NodePatch>,
) -> ApiResult<Json<NodeView>> {
    let id = node_id(&id)?;
    let display_name = patch.display_name.map(|v| validate::optional_text("display_name", v, 255)).transpose()?;
    let notes = patch.notes.map(|v| validate::optional_text("notes", v, 4096)).transpose()?;
    let tags = patch.tags.map(|tags| validate::list("tags", Some(tags))).transpose()?;
    Ok(Json(state.registry.update(id, display_name, notes, tags).await?))
}

/// `DELETE /v0/nodes/{id}`: the node's token stops working at once.
pub async fn delete(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.registry.delete(node_id(&id)?, &admin.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v0/nodes/{id}/events`: newest first.
pub async fn events(
    State(state): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<NodeEventView>>> {
    let id = node_id(&id)?;
    state.registry.get(id)?;
    Ok(Json(state.store.node_events(id).await?))
}

/// A path segment that is not a UUID names no node.
fn node_id(text: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| not_found(format!("No node with id `{text}` (node ids are UUIDs).")))
}
