//! HTTP routes, one module per resource. Handlers are short: they extract, call the registry or the store, and
//! answer; statuses are chosen in [`crate::error`].
//!
//! Every `/v0` route is added through [`Api`], which also records it, so a test can hold the list of routes
//! against the generated OpenAPI document and fail when one lacks the other.

pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod body;
pub mod dashboard;
pub mod deployments;
pub mod extract;
pub mod fleet_events;
pub mod heartbeats;
pub mod inference;
pub mod join_tokens;
pub mod json;
pub mod liveness;
pub mod nodes;
pub mod openapi;
pub mod paging;
pub mod query;
pub mod usage;
pub mod users;

use std::any::Any;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get, on, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::error::{ApiError, error_response};
use crate::metrics;
use crate::state::AppState;

/// The `/v0` API under construction, and the (method, path) pairs added so far.
struct Api {
    router: Router<AppState>,
    endpoints: Vec<(Method, &'static str)>,
}

impl Api {
    fn new() -> Self {
        Api { router: Router::new(), endpoints: Vec::new() }
    }

    /// Adds a route whose answers are compressed for a client that accepts it (SPEC §12).
    fn add<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).unwrap_or(MethodFilter::GET);
        self.route(method, path, on(filter, handler).layer(compression()))
    }

    /// Adds the heartbeat's route, the hot path: its answer is a few dozen bytes, and the compression layer's
    /// wrapping alone costs a measurable share of 50,000 heartbeats a second.
    fn add_hot<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).unwrap_or(MethodFilter::GET);
        self.route(method, path, on(filter, handler))
    }

    fn route(mut self, method: Method, path: &'static str, route: MethodRouter<AppState>) -> Self {
        self.router = self.router.route(path, route);
        self.endpoints.push((method, path));
        self
    }
}

fn api() -> Api {
    Api::new()
        .add(Method::POST, "/v0/nodes", nodes::register)
        .add(Method::GET, "/v0/nodes", nodes::list::list)
        .add(Method::GET, "/v0/nodes/summary", nodes::list::summary)
        .add(Method::GET, "/v0/nodes/{id}", nodes::get)
        .add(Method::PATCH, "/v0/nodes/{id}", nodes::update)
        .add(Method::DELETE, "/v0/nodes/{id}", nodes::delete)
        .add(Method::POST, "/v0/nodes/{id}/approve", nodes::approve)
        .add(Method::POST, "/v0/nodes/{id}/cordon", nodes::cordon)
        .add(Method::POST, "/v0/nodes/{id}/uncordon", nodes::uncordon)
        .add(Method::GET, "/v0/nodes/{id}/events", nodes::events)
        .add_hot(Method::POST, "/v0/health", heartbeats::heartbeat)
        .add(Method::GET, "/v0/assignments", heartbeats::assignments)
        .add(Method::POST, "/v0/auth/login", auth::login)
        .add(Method::POST, "/v0/auth/logout", auth::logout)
        .add(Method::GET, "/v0/auth/me", auth::me)
        .add(Method::GET, "/v0/users", users::list)
        .add(Method::POST, "/v0/users", users::create)
        .add(Method::PATCH, "/v0/users/{username}", users::update)
        .add(Method::DELETE, "/v0/users/{username}", users::delete)
        .add(Method::GET, "/v0/usage", usage::usage)
        .add(Method::GET, "/v0/usage/requests", usage::requests)
        .add(Method::GET, "/v0/usage/live", usage::live)
        .add(Method::GET, "/v0/api-keys", api_keys::list)
        .add(Method::POST, "/v0/api-keys", api_keys::create)
        .add(Method::PATCH, "/v0/api-keys/{id}", api_keys::update)
        .add(Method::DELETE, "/v0/api-keys/{id}", api_keys::delete)
        .add(Method::GET, "/v0/join-tokens", join_tokens::list)
        .add(Method::POST, "/v0/join-tokens", join_tokens::create)
        .add(Method::DELETE, "/v0/join-tokens/{id}", join_tokens::revoke)
        .add(Method::GET, "/v0/deployments", deployments::list)
        .add(Method::POST, "/v0/deployments", deployments::create)
        .add(Method::GET, "/v0/deployments/{id}", deployments::get)
        .add(Method::PATCH, "/v0/deployments/{id}", deployments::update)
        .add(Method::DELETE, "/v0/deployments/{id}", deployments::delete)
        .add(Method::GET, "/v0/audit", audit::list)
        .add(Method::GET, "/v0/fleet/events", fleet_events::list)
        .add(Method::POST, "/v0/fleet/events/{id}/dismiss", fleet_events::dismiss)
        .add(Method::GET, "/v0/openapi.json", openapi::document)
}

/// Every `/v0` route as (method, path), paths in OpenAPI's `{param}` form.
pub fn endpoints() -> Vec<(Method, &'static str)> {
    api().endpoints
}

/// The whole HTTP surface of the router.
pub fn router(state: AppState) -> Router {
    // The API (but the heartbeat), the dashboard and /metrics are compressed for a client that accepts it
    // (SPEC §12); /v1 is not: the runtime's bytes pass as they came, and a stream is never held back to fill a
    // compressor's block.
    api()
        .router
        .route("/", get(dashboard::home))
        .route("/dashboard", get(dashboard::index).layer(compression()))
        .route("/dashboard/{file}", get(dashboard::asset).layer(compression()))
        .route("/metrics", get(prometheus).layer(compression()))
        .route("/healthz", get(liveness::healthz))
        .route("/v1/chat/completions", post(inference::forward))
        .route("/v1/completions", post(inference::forward))
        .route("/v1/embeddings", post(inference::forward))
        .route("/v1/models", get(inference::models))
        .route("/v1/models/{id}", get(inference::model))
        .route_layer(middleware::from_fn_with_state(state.clone(), measure))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(json::MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(panicked))
        // Outermost, so that every answer carries it: handlers, errors, fallbacks, panics, assets, /metrics.
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .with_state(state)
}

/// gzip or brotli (quality 4, as on-the-fly web servers use) for answers over [`COMPRESS_ABOVE_BYTES`]: a page of
/// nodes shrinks about tenfold, while a heartbeat's short answer is sent as it is, at no cost to the hot path.
fn compression() -> CompressionLayer<impl Predicate> {
    let worth_it = SizeAbove::new(COMPRESS_ABOVE_BYTES)
        .and(NotForContentType::GRPC)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::SSE);
    CompressionLayer::new().compress_when(worth_it)
}

/// Answers at most this long are not compressed.
pub const COMPRESS_ABOVE_BYTES: u64 = 512;

/// Records the latency and status of every request to a matched route.
async fn measure(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    if let Some(route) = route {
        state.metrics.request(method.as_str(), route.as_str(), response.status().as_u16(), started.elapsed());
    }
    response
}

/// `GET /metrics`: the OpenMetrics text format, without authentication, for scrapers.
async fn prometheus(State(state): State<AppState>) -> Response {
    state.metrics.inference.queued.set(state.registry.routing().queue().len() as u64);
    state.metrics.set_replicas(&state.deployments.counts());
    let text = state.metrics.render(&state.registry.counts(), state.store.storage_faults(), state.store.availability());
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    response
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
