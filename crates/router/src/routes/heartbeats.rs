//! Node heartbeats (`POST /v0/health`, SPEC §2.2): the hot path, an agent every few seconds.

use axum::Json;
use axum::extract::State;
use llm_router_protocol::{ErrorBody, HeartbeatRequest, HeartbeatResponse};

use super::extract::NodeAuth;
use super::json::JsonBody;
use crate::error::ApiResult;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::validate;

/// Heartbeat with metrics (an agent calls this)
///
/// Records the figures with the router's own clock and answers the node's status after this heartbeat.
#[utoipa::path(post, path = "/v0/health", tag = "node agent", request_body = HeartbeatRequest,
    params(("X-Node-Token" = String, Header, description = "The node's token")),
    responses(
        (status = 200, description = "Recorded", body = HeartbeatResponse),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "Missing or unknown token (a deleted node's token is unknown)", body = ErrorBody),
        (status = 403, description = "The token belongs to another node", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody)
    ))]
pub async fn heartbeat(
    State(state): State<AppState>,
    NodeAuth(node): NodeAuth,
    JsonBody(mut body): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    // An agent that starts runtimes for deployments (SPEC §15) reports its replicas and is answered its assignments.
    let replicas = body.replicas.take().map(validate::replica_reports).transpose()?;
    let heartbeat = validate::heartbeat(body)?;
    let status = state.registry.heartbeat(&node, heartbeat).await?;
    Metrics::inc(&state.metrics.heartbeats);
    let assignments = replicas.map(|replicas| {
        state.deployments.report(node.id(), &replicas);
        state.deployments.assignments(node.id())
    });
    Ok(Json(HeartbeatResponse {
        status,
        heartbeat_interval_secs: state.settings.heartbeat_interval.as_secs(),
        assignments,
    }))
}
