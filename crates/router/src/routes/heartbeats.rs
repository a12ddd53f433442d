//! Node heartbeats (`POST /v0/health`, SPEC §2.2): the hot path, an agent every few seconds.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use std::time::Duration;

use llm_router_protocol::{AssignmentsAnswer, ErrorBody, HeartbeatRequest, HeartbeatResponse};

use super::extract::NodeAuth;
use super::json::JsonBody;
use super::query::ApiQuery;
use crate::error::{ApiResult, bad_request};
use crate::metrics::Metrics;
use crate::server::Connection;
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

/// `GET /v0/assignments`: what to wait on.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AssignmentsQuery {
    /// The fingerprint of the assignments the agent holds; absent: answer at once.
    known: Option<String>,
    /// How long to wait for a change, 0–60 s (default 30).
    wait_secs: Option<u64>,
}

/// Wait for this node's assignments to change (an agent with `--manage-runtimes` calls this)
///
/// Answers at once when the node's assignments differ from the ones `known` fingerprints, else as soon as they
/// change, or after `wait_secs` with the same ones: so an agent learns of a deployment placed on its node in
/// milliseconds, not at its next heartbeat.
#[utoipa::path(get, path = "/v0/assignments", tag = "node agent", params(AssignmentsQuery,
        ("X-Node-Token" = String, Header, description = "The node's token")),
    responses(
        (status = 200, description = "The node's assignments", body = AssignmentsAnswer),
        (status = 400, description = "A parameter out of range", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody)
    ))]
pub async fn assignments(
    State(state): State<AppState>,
    NodeAuth(node): NodeAuth,
    connection: Option<Extension<Connection>>,
    ApiQuery(query): ApiQuery<AssignmentsQuery>,
) -> ApiResult<Json<AssignmentsAnswer>> {
    let wait = query.wait_secs.unwrap_or(DEFAULT_WAIT_SECS);
    if wait > MAX_WAIT_SECS {
        return Err(bad_request(format!("`wait_secs` must be 0 to {MAX_WAIT_SECS}, not {wait}.")));
    }
    // Every managed node holds one of these open: at the connection cap, a waiting one makes room for a new client
    // (its agent asks again, and heartbeats meanwhile) rather than counting as busy.
    let _parked = connection.map(|Extension(connection)| connection.park());
    let _counted = Waiting::new(&state.metrics.assignment_waits);
    let (fingerprint, assignments) =
        state.deployments.wait_for_change(node.id(), query.known.as_deref(), Duration::from_secs(wait)).await;
    Ok(Json(AssignmentsAnswer { fingerprint, assignments }))
}

/// Counts one agent waiting on its assignments while it lives.
struct Waiting<'a>(&'a crate::metrics::Level);

impl<'a> Waiting<'a> {
    fn new(level: &'a crate::metrics::Level) -> Self {
        level.inc();
        Waiting(level)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const DEFAULT_WAIT_SECS: u64 = 30;
const MAX_WAIT_SECS: u64 = 60;
