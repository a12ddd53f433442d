//! The one error type of the HTTP boundary.
//!
//! Every failure a handler can meet becomes an [`ApiError`]; this module alone decides which HTTP status and which
//! `code` a client sees, and renders it in either shape: the admin API's `{"error": {"code", "message"}}` (SPEC §2),
//! or, wrapped in [`OpenAi`], OpenAI's `{"error": {"message", "type", "param", "code"}}` for `/v1` (SPEC §8), so
//! OpenAI's SDKs show it. Internal failures are logged with their cause chain and answered with a generic body, so
//! no database detail leaks to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use llm_router_protocol::{ErrorBody, ErrorDetail};

use crate::auth::credentials::AuthError;
use crate::auth::password::{BUSY_RETRY_AFTER_SECS, HashError};
use crate::deploy::DeployError;
use crate::model::cut;
use crate::registry::{RegistryError, join_token_problem};
use crate::store::{StorageFault, StoreError};
use crate::validate::Invalid;

/// A failure answered to the client as `{"error": {"code", "message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    GpuRequired(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    InvalidCredentials(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NodeExists(String),
    #[error("{0}")]
    NotPending(String),
    /// A registration without a join token where the router requires one.
    #[error("{0}")]
    JoinTokenRequired(String),
    /// A join token that is unknown, expired, used up or revoked; the message says which.
    #[error("{0}")]
    JoinTokenInvalid(String),
    #[error("{0}")]
    Conflict(String),
    /// A `changed_since` the router cannot answer from: list again.
    #[error("{0}")]
    RevisionExpired(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NodeUnreachable(String),
    /// Too many requests of one kind; the client may try again after `retry_after_secs`. `code` names the limit
    /// (`rate_limited`, `too_many_pending`, `login_throttled`, ...).
    #[error("{message}")]
    TooManyRequests { code: &'static str, message: String, retry_after_secs: u64 },
    /// A write to the database failed (disk full, I/O error): nothing of the request was kept.
    #[error("{0}")]
    StorageUnavailable(String),
    /// Every connection the router may hold is busy with a request: the new one is answered and closed.
    #[error("{0}")]
    Overloaded(String),
    /// The request's body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// `/v1`: no node that can take traffic serves this model.
    #[error("{0}")]
    ModelNotFound(String),
    /// `/v1`: nodes serve the model, but none can take the request now.
    #[error("{0}")]
    NoAvailableNode(String),
    /// `/v1`: every node of the model is at its `max_concurrency`, and the queue is full or the wait ran out.
    #[error("{0}")]
    OverCapacity(String),
    /// `/v1`: no credential, or one the router does not accept.
    #[error("{0}")]
    InvalidApiKey(String),
    /// `/v1`: the request has passed through this router before (a node registered at a router's address).
    #[error("{0}")]
    LoopDetected(String),
    #[error("internal error")]
    Internal(anyhow::Error),
}

impl ApiError {
    /// The HTTP status and wire code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::GpuRequired(_) => (StatusCode::FORBIDDEN, "gpu_required"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidCredentials(_) => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NodeExists(_) => (StatusCode::CONFLICT, "node_exists"),
            ApiError::NotPending(_) => (StatusCode::CONFLICT, "not_pending"),
            ApiError::JoinTokenRequired(_) => (StatusCode::UNAUTHORIZED, "join_token_required"),
            ApiError::JoinTokenInvalid(_) => (StatusCode::UNAUTHORIZED, "join_token_invalid"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RevisionExpired(_) => (StatusCode::GONE, "revision_expired"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::NodeUnreachable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "node_unreachable"),
            ApiError::TooManyRequests { code, .. } => (StatusCode::TOO_MANY_REQUESTS, *code),
            ApiError::StorageUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            ApiError::NoAvailableNode(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_available_node"),
            ApiError::OverCapacity(_) => (StatusCode::TOO_MANY_REQUESTS, "over_capacity"),
            ApiError::InvalidApiKey(_) => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            ApiError::LoopDetected(_) => (StatusCode::LOOP_DETECTED, "loop_detected"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// Seconds a client should wait before trying again, sent as `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::TooManyRequests { retry_after_secs, .. } => Some((*retry_after_secs).max(1)),
            ApiError::StorageUnavailable(_) => Some(STORAGE_RETRY_AFTER_SECS),
            ApiError::Overloaded(_) => Some(OVERLOADED_RETRY_AFTER_SECS),
            ApiError::NoAvailableNode(_) => Some(NO_NODE_RETRY_AFTER_SECS),
            ApiError::OverCapacity(_) => Some(OVER_CAPACITY_RETRY_AFTER_SECS),
            _ => None,
        }
    }
}

/// The longest error message answered, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// How long a client is asked to wait after a failed write.
pub const STORAGE_RETRY_AFTER_SECS: u64 = 5;

/// How long a client is asked to wait when every connection was busy: requests are short, a slot frees soon.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

/// How long a `/v1` client is asked to wait when no node can take its request now.
pub const NO_NODE_RETRY_AFTER_SECS: u64 = 2;

/// How long a `/v1` client is asked to wait when the nodes of its model are all at capacity.
pub const OVER_CAPACITY_RETRY_AFTER_SECS: u64 = 1;

/// Shorthand constructors, so handlers read as sentences.
pub fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(message.into())
}

pub fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::NotFound(message.into())
}

pub fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::Unauthorized(message.into())
}

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::Forbidden(message.into())
}

/// Builds the JSON error answer for a status and code; also used for failures outside handlers (panics, fallbacks).
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody { error: ErrorDetail { code: code.to_owned(), message: message.into() } };
    (status, Json(body)).into_response()
}

impl ApiError {
    /// The message a client sees: internal failures are logged here and answered with a generic sentence, and no
    /// message is longer than [`MAX_MESSAGE_CHARS`], whatever input a parser's error repeated.
    fn client_message(&self) -> String {
        match self {
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                "The router hit an internal error; the request was not applied. Try again, and check the router's log if it persists.".to_owned()
            }
            other => cut(&other.to_string(), MAX_MESSAGE_CHARS).into_owned(),
        }
    }

    fn with_retry_after(&self, mut response: Response) -> Response {
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let response = error_response(status, code, self.client_message());
        self.with_retry_after(response)
    }
}

/// An [`ApiError`] answered in OpenAI's shape, for `/v1`: the same status and code, with OpenAI's error `type`.
#[derive(Debug)]
pub struct OpenAi(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAi {
    fn from(err: E) -> Self {
        OpenAi(err.into())
    }
}

impl IntoResponse for OpenAi {
    fn into_response(self) -> Response {
        let OpenAi(err) = self;
        let (status, code) = err.status_and_code();
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = serde_json::json!({
            "error": {"message": err.client_message(), "type": kind, "param": null, "code": code}
        });
        err.with_retry_after((status, Json(body)).into_response())
    }
}

impl From<StoreError> for ApiError {
    /// A storage fault is the client's 503 with `Retry-After`, saying whose fault; a refusal the caller did not
    /// expect is a conflict or a miss; anything else is a 500.
    fn from(err: StoreError) -> Self {
        let fault = match err {
            StoreError::Fault { fault, ref cause } => {
                match fault {
                    StorageFault::Failed => tracing::warn!(error = %cause, "a request failed on a storage fault"),
                    StorageFault::Unreachable => {
                        tracing::debug!(error = %cause, "a request needed the database, which is unreachable")
                    }
                    StorageFault::Lost => {}
                }
                fault
            }
            StoreError::Duplicate => return ApiError::Conflict("A row with this name is stored already.".to_owned()),
            StoreError::JoinToken(why) => return ApiError::JoinTokenInvalid(join_token_problem(why).to_owned()),
            StoreError::NotFound => return ApiError::NotFound("No such item.".to_owned()),
            StoreError::LastAdmin => {
                return ApiError::Conflict("The last administrator cannot be deleted.".to_owned());
            }
            StoreError::Other(err) => return ApiError::Internal(err),
        };
        let message = match fault {
            StorageFault::Failed => {
                "The router could not store this change (its disk may be full or failing); nothing of it was \
                 applied. Try again shortly."
            }
            StorageFault::Unreachable => {
                "The router cannot reach its database now; it still routes inference requests, but nothing that \
                 needs the database can be done. Try again shortly."
            }
            StorageFault::Lost => {
                "The router's database file was deleted or replaced while it ran: it takes no change until it is \
                 restarted on a restored database; nothing of this request was applied."
            }
        };
        ApiError::StorageUnavailable(message.to_owned())
    }
}

impl From<anyhow::Error> for ApiError {
    /// A store error carried inside is answered as itself; anything else is a 500.
    fn from(err: anyhow::Error) -> Self {
        match err.downcast::<StoreError>() {
            Ok(err) => err.into(),
            Err(err) => ApiError::Internal(err),
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(err: DeployError) -> Self {
        match err {
            DeployError::NotFound => ApiError::NotFound("No such deployment.".to_owned()),
            DeployError::NameTaken => ApiError::Conflict("A deployment with this name exists already.".to_owned()),
            DeployError::Store(err) => err.into(),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(err: Invalid) -> Self {
        match err {
            Invalid::Field(message) => ApiError::InvalidRequest(message),
            Invalid::GpuRequired(message) => ApiError::GpuRequired(message),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        let message = err.to_string();
        match err {
            RegistryError::NotFound(_) | RegistryError::DeletedMeanwhile(_) => ApiError::NotFound(message),
            RegistryError::UnknownToken => ApiError::Unauthorized(message),
            RegistryError::TokenOfAnotherNode(_) => ApiError::Forbidden(message),
            RegistryError::NodeExists { .. } => ApiError::NodeExists(message),
            RegistryError::NotPending { .. } => ApiError::NotPending(message),
            RegistryError::JoinTokenInvalid(_) => ApiError::JoinTokenInvalid(message),
            RegistryError::JoinTokenRequired => ApiError::JoinTokenRequired(message),
            RegistryError::Limited { code, message, retry_after_secs } => {
                ApiError::TooManyRequests { code, message, retry_after_secs }
            }
            RegistryError::RevisionExpired { .. } => ApiError::RevisionExpired(message),
            RegistryError::Store(err) => err.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        match err {
            AuthError::Invalid(invalid) => invalid.into(),
            AuthError::UnknownCredential => ApiError::Unauthorized(message),
            AuthError::WrongPassword => ApiError::InvalidCredentials(message),
            AuthError::Throttled { retry_after_secs } => {
                ApiError::TooManyRequests { code: "login_throttled", message, retry_after_secs }
            }
            AuthError::UsernameTaken(_) | AuthError::LastAdmin(_) => ApiError::Conflict(message),
            AuthError::NoSuchUser(_) | AuthError::NoSuchKey(_) => ApiError::NotFound(message),
            AuthError::RoleWithoutAdminScope => ApiError::InvalidRequest(message),
            AuthError::Hash(err) => err.into(),
            AuthError::Store(err) => err.into(),
        }
    }
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> Self {
        match err {
            HashError::Busy => ApiError::TooManyRequests {
                code: "hashing_busy",
                message: err.to_string(),
                retry_after_secs: BUSY_RETRY_AFTER_SECS,
            },
            HashError::Failed(err) => err.into(),
        }
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
