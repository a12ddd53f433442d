//! `/v0/nodes`: registration by agents (SPEC §2.1) and the admin's view and actions (SPEC §3).

pub mod list;
pub mod views;

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llm_router_protocol::{JOIN_TOKEN_HEADER, NODE_TOKEN_HEADER, RegisterRequest, RegisterResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::audit;
use super::extract::ClientAddr;
use super::extract::{AdminUser, Viewer};
use super::json::JsonBody;
use super::paging;
use super::query::ApiQuery;
use crate::error::{ApiError, ApiResult, bad_request, not_found};
use crate::metrics::Metrics;
use crate::model::node::Node;
use crate::net::{self, client_addr};
use crate::registry::AdminEdit;
use crate::state::AppState;
use crate::store::EVENTS_PER_NODE;
use crate::validate::{self, Text};
use llm_router_protocol::ErrorBody;
use views::{NodeEventView, NodeView};

/// Register a node (an agent calls this)
///
/// The checks run in this order: body (400), GPU (403), uniqueness (409 or a token rotation with the node's own
/// `X-Node-Token`), the join token (401; required in `--registration-mode token`), the anonymous limits (429
/// `rate_limited` per client address, 429 `too_many_pending` at the pending cap; a token rotation or a valid join
/// token is not anonymous and skips them), reachability of `GET http://ip:port/v1/models` (422); then the node is
/// stored as pending, or approved at once by an auto-approving join token (201).
#[utoipa::path(post, path = "/v0/nodes", tag = "node agent", request_body = RegisterRequest,
    params(
        ("X-Node-Token" = Option<String>, Header, description = "The node's own token, to rotate it"),
        ("X-Join-Token" = Option<String>, Header, description = "A join token (`llmj_…`): its tags, no anonymous rate limit, approval by the token's rule")
    ),
    responses(
        (status = 201, description = "Registered as pending; the token is shown only now", body = RegisterResponse),
        (status = 200, description = "The node's own token was presented: token rotated, id and status kept", body = RegisterResponse),
        (status = 400, description = "Malformed body, a field out of range or with a control character, or an address that can never be a node's; the message names the field", body = ErrorBody),
        (status = 401, description = "No join token where the router requires one (`join_token_required`), or a join token that is unknown, expired, used up or revoked (`join_token_invalid`, the message says which)", body = ErrorBody),
        (status = 403, description = "No usable GPU (`gpu_required`)", body = ErrorBody),
        (status = 409, description = "A node with this machine name and runtime port exists", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "The node's runtime could not be reached, answered non-2xx (redirects included) or sent more than 1 MiB", body = ErrorBody),
        (status = 429, description = "Too many registrations from this address (`rate_limited`) or too many pending nodes (`too_many_pending`); see `Retry-After`", body = ErrorBody)
    ))]
pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let mut registration = validate::registration(body, peer.ip(), state.settings.allow_link_local_nodes)?;
    if let (Some(runtime), Some(listener)) = (registration.runtime_addr(), state.listening.get())
        && net::is_listener(runtime, *listener)
    {
        return Err(bad_request(format!(
            "`runtime_port`: {runtime} is this router's own listener, not an inference runtime; register the address \
             and port of the runtime on the node."
        )));
    }
    let from = client_addr(peer, &headers, &state.settings.trusted_proxies);
    let presented = headers.get(NODE_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let plan = state.registry.plan_registration(&registration, presented)?;
    let join_token = headers.get(JOIN_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let admitted = state.admission.admit(&state.registry, &plan, join_token, from).await?;
    if state.settings.reachability_check {
        let addr = registration
            .runtime_addr()
            .ok_or_else(|| bad_request(format!("`ip_address`: `{}` is not an IP address.", registration.ip_address)))?;
        let models = state.prober.models(addr).await.map_err(ApiError::NodeUnreachable)?;
        if !registration.loaded_models_given {
            registration.loaded_models = models;
        }
    }
    let done = state.registry.register(registration, plan, admitted.join.as_ref()).await?;
    Metrics::inc(&state.metrics.registrations);
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

/// One node
#[utoipa::path(get, path = "/v0/nodes/{id}", tag = "nodes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ))]
pub async fn get(State(state): State<AppState>, _viewer: Viewer, Path(id): Path<String>) -> ApiResult<Json<NodeView>> {
    let (routing, now) = (state.registry.routing(), state.clock.now_ms());
    Ok(Json(state.registry.view(node_id(&id)?, |node, revision| NodeView::new(node, revision, routing, now))?))
}

/// Approve a pending node (admin)
#[utoipa::path(post, path = "/v0/nodes/{id}/approve", tag = "nodes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 200, description = "Approved: now `online` or `registering`", body = NodeView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node is not pending (`not_pending`)", body = ErrorBody)
    ))]
pub async fn approve(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let approved = async { Ok(state.registry.approve(node_id(&id)?, &admin.name).await?) }.await;
    audit::log_result(&state, &admin.name, client, "node.approve", &id, &approved);
    let node = approved?;
    Metrics::inc(&state.metrics.approvals);
    Ok(Json(view(&state, &node)))
}

/// Cordon a node (admin): it gets no new inference request; requests in flight finish
#[utoipa::path(post, path = "/v0/nodes/{id}/cordon", tag = "nodes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 200, description = "Cordoned (`schedulable` false)", body = NodeView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ))]
pub async fn cordon(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    set_cordon(&state, &admin.name, client, &id, true).await
}

/// Uncordon a node (admin): it takes inference requests again
#[utoipa::path(post, path = "/v0/nodes/{id}/uncordon", tag = "nodes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 200, description = "Uncordoned (`schedulable` true)", body = NodeView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ))]
pub async fn uncordon(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    set_cordon(&state, &admin.name, client, &id, false).await
}

async fn set_cordon(
    state: &AppState,
    admin: &str,
    client: std::net::IpAddr,
    id: &str,
    cordoned: bool,
) -> ApiResult<Json<NodeView>> {
    let changed = async { Ok(state.registry.cordon(node_id(id)?, cordoned, admin).await?) }.await;
    let action = if cordoned { "node.cordon" } else { "node.uncordon" };
    audit::log_result(state, admin, client, action, id, &changed);
    Ok(Json(view(state, &changed?)))
}

/// Body of `PATCH /v0/nodes/{id}`: absent fields stay as they are; `null` or "" clears a text field.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NodePatch {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 255)]
    display_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 4096)]
    notes: Option<Option<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    /// Most inference requests in flight at once on this node through this router (1 to 100,000); `null` removes
    /// the limit. When every node with a model is at its limit, requests wait in the router's queue.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 100_000)]
    max_concurrency: Option<Option<u32>>,
}

/// Most `max_concurrency` an administrator may set.
pub const MAX_CONCURRENCY_LIMIT: u32 = 100_000;

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(de: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(de).map(Some)
}

/// Edit a node's display name, notes, tags or `max_concurrency` (admin)
#[utoipa::path(patch, path = "/v0/nodes/{id}", tag = "nodes", security(("bearer" = [])), request_body = NodePatch,
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 200, description = "The node after the edit", body = NodeView),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody)
    ))]
pub async fn update(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<NodePatch>,
) -> ApiResult<Json<NodeView>> {
    let updated = async {
        let node = node_id(&id)?;
        let display_name =
            patch.display_name.map(|v| validate::optional_text("display_name", v, 255, Text::Line)).transpose()?;
        // Notes are typed in a text area: line breaks and tabs are part of them.
        let notes = patch.notes.map(|v| validate::optional_text("notes", v, 4096, Text::Lines)).transpose()?;
        let tags = patch.tags.map(|tags| validate::list("tags", Some(tags))).transpose()?;
        let max_concurrency = match patch.max_concurrency {
            Some(Some(limit)) if !(1..=MAX_CONCURRENCY_LIMIT).contains(&limit) => {
                return Err(bad_request(format!(
                    "`max_concurrency` must be between 1 and {MAX_CONCURRENCY_LIMIT}, or null for no limit."
                )));
            }
            other => other,
        };
        let edit = AdminEdit { display_name, notes, tags, max_concurrency };
        Ok(state.registry.update(node, edit).await?)
    }
    .await;
    audit::log_result(&state, &admin.name, client, "node.update", &id, &updated);
    Ok(Json(view(&state, &updated?)))
}

/// Delete a node (admin); its token stops working at once
#[utoipa::path(delete, path = "/v0/nodes/{id}", tag = "nodes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id (UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ))]
pub async fn delete(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let deleted = async { Ok(state.registry.delete(node_id(&id)?, &admin.name).await?) }.await;
    audit::log_result(&state, &admin.name, client, "node.delete", &id, &deleted);
    deleted?;
    Metrics::inc(&state.metrics.deletions);
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /v0/nodes/{id}/events`.
#[derive(Debug, Deserialize)]
pub struct EventsParams {
    limit: Option<u32>,
    before: Option<i64>,
}

/// Events in one page when the caller names no `limit`.
const DEFAULT_EVENTS_PAGE: u32 = 100;

/// A node's transition history, newest first, paged
///
/// At most `limit` events (default 100, at most 1,000), older than the event whose id is `before`. When the page
/// is full, the `Link` header names the next page (`rel="next"`).
#[utoipa::path(get, path = "/v0/nodes/{id}/events", tag = "nodes", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "Node id (UUID)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Events per page (default 100)"),
        ("before" = Option<i64>, Query, minimum = 1, description = "Only events older than the event with this id (the `id` of the last event of the previous page)")
    ),
    responses(
        (status = 200, description = "Events, newest first", body = Vec<NodeEventView>,
            headers(("Link" = String, description = "`<…?limit=N&before=ID>; rel=\"next\"` when there may be more"))),
        (status = 400, description = "`limit` or `before` out of range", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ))]
pub async fn events(
    State(state): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<EventsParams>,
) -> ApiResult<Response> {
    let id = node_id(&id)?;
    let limit = paging::limit(params.limit, params.before, DEFAULT_EVENTS_PAGE, EVENTS_PER_NODE as u32)?;
    state.registry.view(id, |_, _| ())?;
    let events: Vec<NodeEventView> =
        state.store.node_events(id, limit, params.before).await?.into_iter().map(NodeEventView::from).collect();
    Ok(paging::answer(
        events,
        limit,
        |event| event.id,
        |last| format!("/v0/nodes/{id}/events?limit={limit}&before={last}"),
    ))
}

/// A path segment that is not a UUID names no node.
fn node_id(text: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| not_found(format!("No node with id `{text}` (node ids are UUIDs).")))
}

/// The node as the admin API shows it after a change, with its revision and routing figures now.
fn view(state: &AppState, node: &Node) -> NodeView {
    NodeView::new(node, state.registry.revision_of(node.id), state.registry.routing(), state.clock.now_ms())
}
