//! Liveness (`GET /healthz`): whether the process serves, and what it can do now.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::query::ApiQuery;
use crate::state::AppState;
use crate::store::Availability;

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
pub async fn healthz(State(state): State<AppState>, ApiQuery(query): ApiQuery<HealthQuery>) -> Response {
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
