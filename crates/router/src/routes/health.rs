//! Liveness (`GET /healthz`) and node heartbeats (`POST /v0/health`, SPEC §2.2).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use llm_router_protocol::{ErrorBody, HeartbeatRequest, HeartbeatResponse};
use serde::Deserialize;
use serde_json::json;

use super::extract::NodeAuth;
use super::json::JsonBody;
use crate::error::ApiResult;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::Availability;
use crate::validate;

/// What `/healthz` may be asked to require: `?require=changes` answers 503 unless the router can take changes.
#[derive(Debug, Deserialize)]
pub struct HealthQuery {
    require: Option<String>,
}

/// Liveness, and what the router can do now: it answers 200 as long as the process serves HTTP, and says whether
/// its database is `available`, `unreachable` (a PostgreSQL outage: the router routes inference requests from
/// memory and takes heartbeats, and refuses what needs the database) or `lost` (the SQLite file was deleted or
/// replaced: no change is taken until a restart). A load balancer that must send only to routers that take changes
/// asks `?require=changes`, answered 503 when they cannot.
pub async fn healthz(State(state): State<AppState>, Query(query): Query<HealthQuery>) -> Response {
    let database = state.store.availability();
    let changes = database == Availability::Available;
    let body = json!({
        "status": if changes { "ok" } else { "degraded" },
        "database": database.as_str(),
        "routes_inference": true,
        "accepts_changes": changes,
    });
    let status = match query.require.as_deref() {
        Some("changes") if !changes => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (status, Json(body)).into_response()
}

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
    JsonBody(body): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let heartbeat = validate::heartbeat(body)?;
    let status = state.registry.heartbeat(&node, heartbeat).await?;
    Metrics::inc(&state.metrics.heartbeats);
    Ok(Json(HeartbeatResponse { status, heartbeat_interval_secs: state.settings.heartbeat_interval.as_secs() }))
}
