//! `/v1`: the OpenAI-compatible front door (SPEC §8). Chat, completions and embeddings go to a node that has the
//! requested model ready; `/v1/models` lists what the fleet can serve now. Errors have OpenAI's shape
//! ([`OpenAi`]), so SDKs show them: `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::body;
use super::extract::authenticate;
use crate::config::InferenceAuth;
use crate::error::{ApiError, OpenAi};
use crate::model::echo;
use crate::model::tenant::Tenant;
use crate::proxy::{Outbound, ProxyError};
use crate::routing::prefix::{self, PromptPeek};
use crate::routing::{Affinity, Policy, Routing};
use crate::state::AppState;

/// Largest inference request body: long prompts and embedding batches are larger than the admin API's bodies.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A caller allowed on `/v1`: any valid API key or session, or anyone with `--inference-auth none`; the tenant its
/// requests are counted to (SPEC §14).
pub struct InferenceCaller(pub Tenant);

impl FromRequestParts<AppState> for InferenceCaller {
    type Rejection = OpenAi;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.settings.inference_auth == InferenceAuth::None {
            return Ok(InferenceCaller(Tenant::anonymous()));
        }
        // Accepted credentials are remembered: an inference request does not read the database for its key, and a
        // router cut off from its database keeps serving the keys it knew.
        match authenticate(parts, state).await {
            Ok(principal) => Ok(InferenceCaller(Tenant::of(&principal))),
            Err(err) => {
                let (status, _) = err.status_and_code();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    Err(invalid_api_key())
                } else {
                    Err(OpenAi(err))
                }
            }
        }
    }
}

fn invalid_api_key() -> OpenAi {
    OpenAi(ApiError::InvalidApiKey(
        "Send an API key of this router: `Authorization: Bearer llmk_…` (POST /v0/api-keys).".to_owned(),
    ))
}

fn model_not_found(model: &str) -> OpenAi {
    OpenAi(ApiError::ModelNotFound(format!(
        "The model `{}` is not served by any node now; GET /v1/models lists those that are.",
        echo(model)
    )))
}

/// What the router reads of a request body: the model and the prompt's prefix (SPEC §13); nothing else is
/// interpreted, and the body is forwarded as it came.
#[derive(Deserialize)]
struct Peek<'a> {
    model: Option<serde_json::Value>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

/// The header whose value keeps a session's requests on one node (SPEC §13).
pub const SESSION_HEADER: &str = "x-session-id";

/// What places a request under the cache-aware policy (SPEC §13): its session's key, else its prefix's once the
/// prefix has been seen here before.
fn affinity(routing: &Routing, headers: &HeaderMap, prompt: &PromptPeek<'_>) -> Affinity {
    let choice = routing.choice();
    if choice.policy != Policy::CacheAware {
        return Affinity::None;
    }
    match headers.get(SESSION_HEADER).map(|value| value.as_bytes()).filter(|value| !value.is_empty()) {
        Some(session) => Affinity::Key(prefix::session_key(session)),
        None => match prefix::key(prompt, choice.prefix_bytes) {
            Some(key) if routing.seen_prefix(key) => Affinity::Key(key),
            Some(_) => Affinity::NewPrefix,
            None => Affinity::None,
        },
    }
}

/// Forwards a chat completion, completion or embedding request to a node with its model ready.
pub async fn forward(
    State(state): State<AppState>,
    InferenceCaller(tenant): InferenceCaller,
    request: Request,
) -> Result<Response, OpenAi> {
    let (parts, body) = request.into_parts();
    let json =
        parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(invalid("The body must be JSON (`Content-Type: application/json`)."));
    }
    let held = body::read(&state, body, body::declared_length(&parts.headers), MAX_BODY_BYTES).await?;
    let peek: Peek =
        serde_json::from_slice(&held.bytes).map_err(|err| invalid(format!("The body is not valid JSON: {err}.")))?;
    let model = match peek.model {
        Some(serde_json::Value::String(model)) if !model.is_empty() => model,
        _ => return Err(invalid("`model` is required: the id of a model (GET /v1/models lists them).")),
    };
    let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let routing = state.registry.routing();
    let prompt = PromptPeek { messages: peek.messages, prompt: peek.prompt };
    let outbound = Outbound {
        method: parts.method,
        path_and_query: path,
        headers: &parts.headers,
        model: &model,
        affinity: affinity(routing, &parts.headers, &prompt),
        tenant,
        body: held.bytes.clone(),
    };
    let forwarded = state.proxy.forward(routing, &state.clock, &state.metrics.inference, outbound).await;
    // The body's bytes count against the memory budget until the answer has begun.
    drop(held);
    forwarded.map_err(|err| OpenAi(refusal(&model, err)))
}

fn invalid(message: impl Into<String>) -> OpenAi {
    OpenAi(ApiError::InvalidRequest(message.into()))
}

/// The client's error for a request the proxy could not forward.
fn refusal(model: &str, err: ProxyError) -> ApiError {
    let model = echo(model);
    match err {
        ProxyError::UnknownModel => model_not_found(&model).0,
        ProxyError::NoNode { tried: 0 } => ApiError::NoAvailableNode(format!(
            "No node can take a request for `{model}` now (the nodes that have it are failing); retry shortly."
        )),
        ProxyError::NoNode { tried } => {
            ApiError::NoAvailableNode(format!("The request for `{model}` failed on {tried} node(s); retry shortly."))
        }
        ProxyError::OverCapacity => ApiError::OverCapacity(format!(
            "Every node serving `{model}` is at its concurrency limit and the queue is full or the wait ran out; \
             retry shortly."
        )),
        ProxyError::Loop => ApiError::LoopDetected(
            "This request has already passed through this router: a node is registered at the address of a router \
             (this one or one it forwards to). Delete that node and register the runtime's own address."
                .to_owned(),
        ),
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
) -> Result<Json<serde_json::Value>, OpenAi> {
    if state.registry.routing().models().contains(&id) {
        Ok(Json(model_object(&id)))
    } else {
        Err(model_not_found(&id))
    }
}

fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-router"})
}
