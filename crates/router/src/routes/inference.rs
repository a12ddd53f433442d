//! `/v1`: the OpenAI-compatible front door (SPEC §8). Chat, completions and embeddings go to a node that has the
//! requested model ready; `/v1/models` lists what the fleet can serve now. Errors have OpenAI's shape, so SDKs show
//! them: `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::extract::{authenticate, credential_hash};
use crate::config::InferenceAuth;
use crate::proxy::{Outbound, ProxyError};
use crate::state::AppState;

/// Largest inference request body: long prompts and embedding batches are larger than the admin API's bodies.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Seconds a client is asked to wait when no node can take its request now.
const NO_NODE_RETRY_AFTER_SECS: u64 = 2;

/// Seconds a client is asked to wait when the nodes of its model are all at capacity.
const OVER_CAPACITY_RETRY_AFTER_SECS: u64 = 1;

/// An error in OpenAI's shape.
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl OpenAiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        OpenAiError { status, kind, code, message: message.into(), retry_after: None }
    }

    fn invalid(message: impl Into<String>) -> Self {
        OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
    }

    fn model_not_found(model: &str) -> Self {
        OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` is not served by any node now; GET /v1/models lists those that are."),
        )
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A caller allowed on `/v1`: any valid API key or session, or anyone with `--inference-auth none`.
pub struct InferenceCaller;

impl FromRequestParts<AppState> for InferenceCaller {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.settings.inference_auth == InferenceAuth::None {
            return Ok(InferenceCaller);
        }
        // Accepted credentials are remembered briefly: an inference request does not read the database for its key.
        let hash = credential_hash(parts).map_err(|_| invalid_api_key())?;
        if state.inference_credentials.get(hash).is_some() {
            return Ok(InferenceCaller);
        }
        match authenticate(parts, state).await {
            Ok(principal) => {
                state.inference_credentials.put(hash, principal);
                Ok(InferenceCaller)
            }
            Err(err) => {
                let (status, _) = err.status_and_code();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    Err(invalid_api_key())
                } else {
                    Err(OpenAiError::new(status, "server_error", "unavailable", err.to_string()))
                }
            }
        }
    }
}

fn invalid_api_key() -> OpenAiError {
    OpenAiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_api_key",
        "Send an API key of this router: `Authorization: Bearer llmk_…` (POST /v0/api-keys).",
    )
}

/// What the router reads of a request body: the model, and nothing else is interpreted.
#[derive(Deserialize)]
struct Peek {
    model: Option<serde_json::Value>,
}

/// Forwards a chat completion, completion or embedding request to a node with its model ready.
pub async fn forward(State(state): State<AppState>, _caller: InferenceCaller, request: Request) -> Response {
    match forward_inner(&state, request).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn forward_inner(state: &AppState, request: Request) -> Result<Response, OpenAiError> {
    let (parts, body) = request.into_parts();
    let json =
        parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(OpenAiError::invalid("The body must be JSON (`Content-Type: application/json`)."));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| {
        OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("The body is over {} MiB.", MAX_BODY_BYTES / (1024 * 1024)),
        )
    })?;
    let peek: Peek = serde_json::from_slice(&bytes)
        .map_err(|err| OpenAiError::invalid(format!("The body is not valid JSON: {err}.")))?;
    let model = match peek.model {
        Some(serde_json::Value::String(model)) if !model.is_empty() => model,
        _ => return Err(OpenAiError::invalid("`model` is required: the id of a model (GET /v1/models lists them).")),
    };
    let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let routing = state.registry.routing();
    let outbound =
        Outbound { method: parts.method, path_and_query: path, headers: &parts.headers, model: &model, body: bytes };
    match state.proxy.forward(routing, &state.clock, &state.metrics.inference, outbound).await {
        Ok(response) => Ok(response),
        Err(ProxyError::UnknownModel) => Err(OpenAiError::model_not_found(&model)),
        Err(ProxyError::NoNode { tried }) => {
            let message = if tried == 0 {
                format!(
                    "No node can take a request for `{model}` now (the nodes that have it are failing); retry shortly."
                )
            } else {
                format!("The request for `{model}` failed on {tried} node(s); retry shortly.")
            };
            let mut err =
                OpenAiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_available_node", message);
            err.retry_after = Some(NO_NODE_RETRY_AFTER_SECS);
            Err(err)
        }
        Err(ProxyError::OverCapacity) => {
            let message = format!(
                "Every node serving `{model}` is at its concurrency limit and the queue is full or the wait ran out; \
                 retry shortly."
            );
            let mut err = OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "over_capacity", message);
            err.retry_after = Some(OVER_CAPACITY_RETRY_AFTER_SECS);
            Err(err)
        }
    }
}

/// The models some node can serve now, in OpenAI's list format.
pub async fn models(State(state): State<AppState>, _caller: InferenceCaller) -> Json<serde_json::Value> {
    let data: Vec<serde_json::Value> = state.registry.routing().models().iter().map(|id| model_object(id)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// One model, when some node can serve it now.
pub async fn model(
    State(state): State<AppState>,
    _caller: InferenceCaller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, OpenAiError> {
    if state.registry.routing().models().contains(&id) {
        Ok(Json(model_object(&id)))
    } else {
        Err(OpenAiError::model_not_found(&id))
    }
}

fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-router"})
}
