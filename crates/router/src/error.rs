//! The one error type of the HTTP boundary.
//!
//! Every failure a handler can meet becomes an [`ApiError`]; this module alone decides which HTTP status and which
//! `code` a client sees. Internal failures are logged with their cause chain and answered with a generic body, so no
//! database detail leaks to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use llm_router_protocol::{ErrorBody, ErrorDetail};

use crate::auth::password::{BUSY_RETRY_AFTER_SECS, HashError};
use crate::registry::RegistryError;
use crate::store;
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
            _ => None,
        }
    }
}

/// How long a client is asked to wait after a failed write.
pub const STORAGE_RETRY_AFTER_SECS: u64 = 5;

/// How long a client is asked to wait when every connection was busy: requests are short, a slot frees soon.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                "The router hit an internal error; the request was not applied. Try again, and check the router's log if it persists.".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = error_response(status, code, message);
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<anyhow::Error> for ApiError {
    /// A storage fault is the client's 503 with `Retry-After`; anything else is a 500.
    fn from(err: anyhow::Error) -> Self {
        if store::is_fault(&err) {
            tracing::warn!(error = %format!("{err:#}"), "a request failed on a storage fault");
            return ApiError::StorageUnavailable(
                "The router could not store this change (its disk may be full or failing); nothing of it was \
                 applied. Try again shortly."
                    .to_owned(),
            );
        }
        ApiError::Internal(err)
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
            RegistryError::RevisionExpired { .. } => ApiError::RevisionExpired(message),
            RegistryError::Store(err) => err.into(),
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
