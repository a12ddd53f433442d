//! `/v0/fleet/events`: fleet-level events (SPEC §10), e.g. a mass silence; listed for viewers, dismissed by an
//! administrator.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::audit;
use super::extract::{AdminUser, ClientAddr, Viewer};
use super::query::ApiQuery;
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiResult, bad_request};
use crate::model::fleet_event::FleetEvent;
use crate::state::AppState;
use llm_router_protocol::ErrorBody;

/// Query of `GET /v0/fleet/events`.
#[derive(Debug, Deserialize)]
pub struct FleetEventParams {
    limit: Option<u32>,
}

/// A fleet event as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FleetEventView {
    id: i64,
    at: String,
    /// `mass_silence`: more than half of the live nodes (at least 10) went offline in one sweep.
    kind: String,
    /// E.g. `mass silence: 15 of 20 nodes`.
    message: String,
    nodes_affected: u64,
    nodes_live: u64,
    /// Absent while the event lasts; set when its nodes came back or an administrator dismissed it.
    resolved_at: Option<String>,
    resolved_by: Option<String>,
    /// `nodes returned`, `dismissed` or `superseded` (a later mass silence).
    resolution: Option<String>,
}

impl From<FleetEvent> for FleetEventView {
    fn from(event: FleetEvent) -> Self {
        FleetEventView {
            id: event.id,
            at: rfc3339(event.at),
            kind: event.kind,
            message: event.message,
            nodes_affected: event.nodes_affected,
            nodes_live: event.nodes_live,
            resolved_at: event.resolved_at.map(rfc3339),
            resolved_by: event.resolved_by,
            resolution: event.resolution,
        }
    }
}

/// Most events in one answer.
const MAX_EVENTS: u32 = 100;

/// Fleet events, newest first (viewer)
///
/// What happened to the fleet as a whole: a mass silence is recorded when one offline sweep marks more than half of
/// the live nodes (and at least 10) offline, a network or router problem rather than that many broken machines.
/// An event without `resolved_at` lasts.
#[utoipa::path(get, path = "/v0/fleet/events", tag = "fleet", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Events (default 20)")),
    responses(
        (status = 200, description = "Events, newest first", body = Vec<FleetEventView>),
        (status = 400, description = "`limit` out of range", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody)
    ))]
pub async fn list(
    State(state): State<AppState>,
    _viewer: Viewer,
    ApiQuery(params): ApiQuery<FleetEventParams>,
) -> ApiResult<Json<Vec<FleetEventView>>> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=MAX_EVENTS).contains(&limit) {
        return Err(bad_request(format!("`limit` must be between 1 and {MAX_EVENTS}.")));
    }
    let events = state.store.fleet_events(limit).await?;
    Ok(Json(events.into_iter().map(FleetEventView::from).collect()))
}

/// Dismisses a fleet event (admin)
///
/// Ends the event (the dashboard's banner goes, `llm_router_mass_silence` drops to 0) without waiting for the nodes
/// to come back. Answers 404 when there is no such event or it has ended already.
#[utoipa::path(post, path = "/v0/fleet/events/{id}/dismiss", tag = "fleet", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The event's id")),
    responses(
        (status = 204, description = "Dismissed"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such event, or it has ended already", body = ErrorBody)
    ))]
pub async fn dismiss(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    let result = async {
        // An id that is no number is no event: 404 like any other unknown id.
        let missing = || ApiError::NotFound(format!("No fleet event {id} that still lasts."));
        let event = id.parse::<i64>().map_err(|_| missing())?;
        if state.registry.dismiss_fleet_event(event, &admin.name).await? {
            Ok(axum::http::StatusCode::NO_CONTENT)
        } else {
            Err(missing())
        }
    }
    .await;
    audit::log_result(&state, &admin.name, client, "fleet_event.dismiss", &id, &result);
    result
}
