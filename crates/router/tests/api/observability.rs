//! The generated OpenAPI document and the Prometheus metrics.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::Value;

use crate::exposition;
use crate::helpers::*;

#[tokio::test]
async fn the_openapi_document_has_exactly_the_v0_routes() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/v0/openapi.json").send().await.expect("get");
    assert_eq!(response.status(), 200);
    let doc = body(response).await;
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().expect("operations").keys().map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = llm_router::routes::endpoints()
        .into_iter()
        .map(|(method, path)| (method.as_str().to_owned(), path.to_owned()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes without an OpenAPI entry: {undocumented:?}");
    assert!(unrouted.is_empty(), "OpenAPI entries without a route: {unrouted:?}");
    assert!(routed.len() >= 18, "{routed:?}");
}

#[tokio::test]
async fn every_documented_operation_has_schemas_and_the_error_shape() {
    let doc: Value =
        serde_json::from_str(&llm_router::routes::openapi::openapi().to_json().expect("json")).expect("doc");
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["error"]));
    let detail = &doc["components"]["schemas"]["ErrorDetail"];
    assert!(detail["properties"]["code"].is_object() && detail["properties"]["message"].is_object());
    for (path, operations) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let responses = operation["responses"].as_object().expect("responses");
            assert!(responses.keys().any(|code| code.starts_with('2')), "{method} {path}: no success answer");
            if path == "/v0/openapi.json" {
                continue;
            }
            for (code, response) in responses.iter().filter(|(code, _)| code.starts_with('4')) {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {code}");
            }
            if ["post", "patch"].contains(&method.as_str()) && operation.get("requestBody").is_some() {
                let body = &operation["requestBody"]["content"]["application/json"]["schema"];
                assert!(body.is_object(), "{method} {path}: request body without schema");
            }
        }
    }
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let a = app.register_node("gpu-a").await;
    let b = app.register_node("gpu-b").await;
    for _ in 0..3 {
        assert_eq!(app.heartbeat(&a, &["m"]).await.status(), 200);
    }
    assert_eq!(app.heartbeat_body("llmn_bogus", &serde_json::json!({"node_id": a.id})).await.status(), 401);
    assert_eq!(app.approve(&admin, &a.id).await.status(), 200);
    let deleted = app.request(Method::DELETE, &format!("/v0/nodes/{}", b.id)).bearer_auth(&admin).send().await;
    assert_eq!(deleted.expect("delete").status(), 204);
    assert_eq!(app.state.registry.flush().await.expect("flush"), 1);

    let response = app.request(Method::GET, "/metrics").send().await.expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("type").to_owned();
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let text = response.text().await.expect("text");
    let scraped = exposition::parse(&text).unwrap_or_else(|error| panic!("{error} in:\n{text}"));
    let value = |name: &str, labels: &[(&str, &str)]| {
        scraped.value(name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    for (family, kind) in [
        ("llm_router_registrations", "counter"),
        ("llm_router_nodes", "gauge"),
        ("llm_router_http_requests", "counter"),
        ("llm_router_http_request_duration_seconds", "histogram"),
    ] {
        assert_eq!(scraped.types.get(family).map(String::as_str), Some(kind), "{family}");
    }
    assert_eq!(value("llm_router_registrations_total", &[]), 2.0);
    assert_eq!(value("llm_router_heartbeats_total", &[]), 3.0);
    assert_eq!(value("llm_router_approvals_total", &[]), 1.0);
    assert_eq!(value("llm_router_deletions_total", &[]), 1.0);
    assert_eq!(value("llm_router_nodes", &[("status", "online")]), 1.0);
    assert_eq!(value("llm_router_nodes", &[("status", "pending")]), 0.0);
    assert_eq!(value("llm_router_status_changes_total", &[("to", "pending")]), 2.0);
    assert_eq!(value("llm_router_status_changes_total", &[("to", "online")]), 1.0);
    let health = |status| [("method", "POST"), ("route", "/v0/health"), ("status", status)];
    assert_eq!(value("llm_router_http_requests_total", &health("200")), 3.0);
    assert_eq!(value("llm_router_http_requests_total", &health("401")), 1.0);
    let route = |route| [("method", "POST"), ("route", route)];
    assert_eq!(value("llm_router_http_request_duration_seconds_count", &route("/v0/health")), 4.0);
    assert_eq!(value("llm_router_http_request_duration_seconds_count", &route("/v0/nodes/{id}/approve")), 1.0);
    let inf = [("method", "POST"), ("route", "/v0/health"), ("le", "+Inf")];
    assert_eq!(value("llm_router_http_request_duration_seconds_bucket", &inf), 4.0);
    assert_eq!(value("llm_router_flush_batch_size_count", &[]), 1.0);
    assert_eq!(value("llm_router_flush_batch_size_sum", &[]), 1.0);
    assert_eq!(value("llm_router_flush_lag_seconds_count", &[]), 1.0);
}
