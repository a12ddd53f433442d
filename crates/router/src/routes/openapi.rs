//! `GET /v0/openapi.json`: the API contract, generated from the handlers' annotations and the wire types.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use llm_router_protocol::{
    Assignment, AssignmentsAnswer, ErrorBody, ErrorDetail, GpuDevice, GpuMetrics, HeartbeatRequest, HeartbeatResponse,
    NodeStatus, RegisterRequest, RegisterResponse, ReplicaReport, ReplicaState, RuntimeKind, RuntimeLoad,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::fleet_events::FleetEventView;
use super::nodes::list::{FleetSummaryView, GpuCounts, NodeList, NodePage, StatusCounts};
use super::nodes::views::{NodeEventView, NodeView, RoutingView};
use super::{api_keys, audit, auth, deployments, fleet_events, heartbeats, join_tokens, nodes, usage, users};
use crate::model::auth::{Role, Scope};
use crate::model::figures::NodeFigures;

#[derive(OpenApi)]
#[openapi(
    info(title = "llm-router", description = "Node self-registration, heartbeats and fleet administration. Every error is `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        nodes::register, nodes::list::list, nodes::list::summary, nodes::get, nodes::update, nodes::delete, nodes::approve, nodes::cordon, nodes::uncordon, nodes::events,
        heartbeats::heartbeat, heartbeats::assignments,
        auth::login, auth::logout, auth::me,
        users::list, users::create, users::update, users::delete,
        api_keys::list, api_keys::create, api_keys::update, api_keys::delete,
        usage::usage, usage::requests, usage::live,
        join_tokens::list, join_tokens::create, join_tokens::revoke,
        deployments::list, deployments::create, deployments::get, deployments::update, deployments::delete,
        audit::list,
        fleet_events::list, fleet_events::dismiss,
        document,
    ),
    components(schemas(
        Assignment, AssignmentsAnswer, ErrorBody, ErrorDetail, GpuDevice, GpuMetrics, HeartbeatRequest, HeartbeatResponse, NodeStatus, RuntimeLoad,
        RegisterRequest, RegisterResponse, NodeView, RoutingView, NodeFigures, NodeEventView, Role, Scope,
        FleetEventView, NodeList, NodePage, FleetSummaryView, StatusCounts, GpuCounts, Assignment, ReplicaReport,
        ReplicaState, RuntimeKind, AssignmentsAnswer,
    )),
    modifiers(&Security),
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "node_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(llm_router_protocol::NODE_TOKEN_HEADER))),
        );
    }
}

/// The generated document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document
#[utoipa::path(get, path = "/v0/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
pub async fn document() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| openapi().to_json().unwrap_or_else(|_| "{}".to_owned()));
    let mut response = json.clone().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
