//! The JSON body extractor every handler uses: checks the content type, limits the size, and names the field that
//! failed to parse — all as SPEC §2 errors rather than the framework's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, bad_request};
use crate::state::AppState;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "Send the body as JSON with `Content-Type: application/json`.".to_owned(),
            ));
        }
        // A body that trickles in would hold its connection busy (and so out of reach of the connection cap's
        // eviction) for as long as the client likes: it gets a deadline.
        let limit = state.settings.body_timeout;
        let read = tokio::time::timeout(limit, Bytes::from_request(req, state)).await.map_err(|_| {
            ApiError::RequestTimeout(format!(
                "The body did not arrive within {} s of the headers; send it whole, promptly.",
                limit.as_secs_f64()
            ))
        })?;
        let bytes = read.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("The body is larger than the limit of {MAX_BODY_BYTES} bytes."))
            } else {
                bad_request(format!("The body could not be read: {rejection}."))
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses JSON, naming the path of the offending field on failure. The common, valid case takes the plain parser;
/// only a body that fails is parsed a second time with path tracking, to build the message.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(_) => Err(describe::<T>(bytes)),
    }
}

fn describe<T: DeserializeOwned>(bytes: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if matches!(path.as_str(), "." | "?" | "") {
                bad_request(format!("The body is not valid JSON for this endpoint: {inner}."))
            } else {
                bad_request(format!("`{path}`: {inner}."))
            }
        }
        Ok(_) => match de.end() {
            Err(err) => bad_request(format!("Trailing characters after the JSON body: {err}.")),
            Ok(()) => bad_request("The body is not valid JSON for this endpoint."),
        },
    }
}
