//! The JSON body extractor every handler uses: checks the content type, reads the body through the one body reader
//! ([`super::body`]: size limit, deadline, memory budget), and names the field that failed to parse — all as SPEC
//! §2 errors rather than the framework's plain-text rejections.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use super::body;
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
        let declared = body::declared_length(req.headers());
        let held = body::read(state, req.into_body(), declared, MAX_BODY_BYTES).await?;
        parse(&held.bytes).map(JsonBody)
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
