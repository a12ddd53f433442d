//! Liveness (`GET /healthz`) and node heartbeats (`POST /v0/health`, SPEC §2.2).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use llm_router_protocol::{HeartbeatRequest, HeartbeatResponse, NODE_TOKEN_HEADER};
use serde_json::{Value, json};

use super::json::JsonBody;
use crate::app::AppState;
use crate::error::{ApiResult, unauthorized};
use crate::registry::validate;

/// Answers as long as the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Records a heartbeat and answers the node's status after it.
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let token = headers
        .get(NODE_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| unauthorized(format!("Send the node's token in the {NODE_TOKEN_HEADER} header.")))?;
    let heartbeat = validate::heartbeat(body)?;
    let status = state.registry.heartbeat(token, heartbeat).await?;
    Ok(Json(HeartbeatResponse { status, heartbeat_interval_secs: state.settings.heartbeat_interval.as_secs() }))
}
