//! `/v1`: the OpenAI-compatible front door (SPEC §8). Chat, completions and embeddings go to a node that has the
//! requested model ready; `/v1/models` lists what the fleet can serve now. Errors have OpenAI's shape
//! ([`OpenAi`]), so SDKs show them: `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
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
use crate::usage::{Admitted, Meter, Refused, StreamUsage};

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
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
}

/// How a request's usage is had (SPEC §14): from the answer's JSON, or from a stream, where the router asks the
/// runtime for usage when the client did not.
fn stream_usage(path: &str, stream: Option<&serde_json::Value>, options: Option<&RawValue>) -> StreamUsage {
    let streams = matches!(stream, Some(serde_json::Value::Bool(true)))
        && (path.ends_with("/chat/completions") || path.ends_with("/completions"));
    if !streams {
        return StreamUsage::NotStreamed;
    }
    #[derive(Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    let asked = options
        .and_then(|raw| serde_json::from_str::<Options>(raw.get()).ok())
        .is_some_and(|options| options.include_usage == Some(true));
    if asked { StreamUsage::Asked } else { StreamUsage::Added }
}

/// The body with `stream_options.include_usage` set: inserted after the opening brace when the client sent no
/// `stream_options` (the rest stays byte for byte), else the body re-encoded with the option merged into the
/// client's.
fn asking_for_usage(body: &[u8], has_options: bool) -> Result<Bytes, serde_json::Error> {
    const OPTION: &[u8] = br#""stream_options":{"include_usage":true}"#;
    if !has_options && let Some(open) = body.iter().position(|&b| b == b'{') {
        let rest = &body[open + 1..];
        let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = Vec::with_capacity(body.len() + OPTION.len() + 1);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(OPTION);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Ok(Bytes::from(out));
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
    let options = object.entry("stream_options").or_insert_with(|| json!({}));
    if !options.is_object() {
        *options = json!({});
    }
    if let Some(options) = options.as_object_mut() {
        options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    }
    Ok(Bytes::from(serde_json::to_vec(&object)?))
}

/// The `x-ratelimit-*` headers of an answer to a tenant with limits (OpenAI's names and formats).
fn rate_limit_headers(headers: &mut HeaderMap, admitted: &Admitted) {
    for (kind, quota) in [("requests", admitted.requests), ("tokens", admitted.tokens)] {
        let Some(quota) = quota else { continue };
        let values = [
            (format!("x-ratelimit-limit-{kind}"), quota.limit.to_string()),
            (format!("x-ratelimit-remaining-{kind}"), quota.remaining.to_string()),
            (format!("x-ratelimit-reset-{kind}"), reset_text(quota.reset_ms)),
        ];
        for (name, value) in values {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                headers.insert(name, value);
            }
        }
    }
}

/// A time to wait as OpenAI writes it: `250ms`, `12s`, `6m0s`, `5h12m0s`.
fn reset_text(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = (ms + 999) / 1000;
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// The model a request is recorded under when no node serves the model it names (SPEC §14).
pub const UNKNOWN_MODEL: &str = "(not served)";

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
    InferenceCaller(mut tenant): InferenceCaller,
    request: Request,
) -> Result<Response, OpenAi> {
    let arrived = Instant::now();
    let at = state.clock.now_ms();
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
    let usage = stream_usage(parts.uri.path(), peek.stream.as_ref(), peek.stream_options);
    let limiter = state.credentials.limiter();
    tenant.weight = limiter.weight(&tenant.id);
    let routing = state.registry.routing();
    // A name no node serves is recorded as such, not as the client wrote it: clients cannot fill the usage tables
    // with invented names.
    let counted = if routing.knows(&model) { model.as_str() } else { UNKNOWN_MODEL };
    let meter = Meter::new(state.ledger.clone(), tenant, counted, usage != StreamUsage::NotStreamed, at, arrived);
    let admitted = match limiter.admit(&meter.tenant().id).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            state.metrics.inference.rate_limited(refused.reason());
            let mut answer = OpenAi(limit_refusal(&refused)).into_response();
            rate_limit_headers(answer.headers_mut(), &limiter.peek(&meter.tenant().id));
            meter.refused(StatusCode::TOO_MANY_REQUESTS.as_u16(), 0);
            return Ok(answer);
        }
    };
    let body = match usage {
        StreamUsage::Added => asking_for_usage(&held.bytes, peek.stream_options.is_some())
            .map_err(|err| invalid(format!("The body is not valid JSON: {err}.")))?,
        _ => held.bytes.clone(),
    };
    let prompt = PromptPeek { messages: peek.messages, prompt: peek.prompt };
    let outbound = Outbound {
        method: parts.method,
        path_and_query: path,
        headers: &parts.headers,
        model: &model,
        affinity: affinity(routing, &parts.headers, &prompt),
        meter,
        usage,
        body,
    };
    let forwarded = state.proxy.forward(routing, &state.clock, &state.metrics.inference, outbound).await;
    // The body's bytes count against the memory budget until the answer has begun.
    drop(held);
    match forwarded {
        Ok(mut answer) => {
            rate_limit_headers(answer.headers_mut(), &admitted);
            Ok(answer)
        }
        Err((err, meter)) => {
            let tried = match err {
                ProxyError::NoNode { tried } => tried,
                _ => 0,
            };
            let err = refusal(&model, err);
            meter.refused(err.status_and_code().0.as_u16(), tried);
            let mut answer = OpenAi(err).into_response();
            rate_limit_headers(answer.headers_mut(), &admitted);
            Ok(answer)
        }
    }
}

/// The client's error for a request a limit refused: OpenAI's codes, `Retry-After` until the limit turns.
fn limit_refusal(refused: &Refused) -> ApiError {
    let retry_after_secs = |ms: i64| u64::try_from((ms + 999) / 1000).unwrap_or(1).max(1);
    match refused {
        Refused::RateLimit { limit, retry_after_ms } => ApiError::TooManyRequests {
            code: "rate_limit_exceeded",
            message: format!(
                "This key has used its {} for this minute; retry in {}.",
                limit.replace('_', " "),
                reset_text(*retry_after_ms)
            ),
            retry_after_secs: retry_after_secs(*retry_after_ms),
        },
        Refused::Quota { limit, retry_after_ms } => ApiError::TooManyRequests {
            code: "insufficient_quota",
            message: format!(
                "This key has spent its {}; it is available again in {} (when the period turns), or ask an \
                 administrator to raise it.",
                limit.replace('_', " "),
                reset_text(*retry_after_ms)
            ),
            retry_after_secs: retry_after_secs(*retry_after_ms),
        },
    }
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
