//! HTTP routes, one module per resource. Handlers are short: they extract, call the registry or the store, and
//! answer; statuses are chosen in [`crate::error`].

pub mod api_keys;
pub mod auth;
pub mod dashboard;
pub mod health;
pub mod json;
pub mod nodes;
pub mod users;

use std::any::Any;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::routing::{delete, get, post};
use tower_http::catch_panic::CatchPanicLayer;

use crate::app::AppState;
use crate::error::{ApiError, error_response};

/// The whole HTTP surface of the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard::home))
        .route("/dashboard", get(dashboard::index))
        .route("/dashboard/{file}", get(dashboard::asset))
        .route("/healthz", get(health::healthz))
        .route("/v0/health", post(health::heartbeat))
        .route("/v0/nodes", post(nodes::register).get(nodes::list))
        .route("/v0/nodes/{id}", get(nodes::get).patch(nodes::update).delete(nodes::delete))
        .route("/v0/nodes/{id}/approve", post(nodes::approve))
        .route("/v0/nodes/{id}/events", get(nodes::events))
        .route("/v0/auth/login", post(auth::login))
        .route("/v0/auth/logout", post(auth::logout))
        .route("/v0/auth/me", get(auth::me))
        .route("/v0/users", get(users::list).post(users::create))
        .route("/v0/users/{username}", delete(users::delete))
        .route("/v0/api-keys", get(api_keys::list).post(api_keys::create))
        .route("/v0/api-keys/{id}", delete(api_keys::delete))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(json::MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(panicked))
        .with_state(state)
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("There is no route {}; see GET /v0/openapi.json for the API.", uri.path()))
}

async fn wrong_method(uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not support this HTTP method.", uri.path()))
}

fn panicked(_: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "The router hit an internal error; the request was not applied.",
    )
}
