//! `/dashboard`: the web UI, served from files embedded in the binary (no build step, no files on disk).
//!
//! Every answer carries a strict Content-Security-Policy: scripts and styles come from the router itself only, so
//! a node-provided string that slipped into the page as markup still could not run.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::error::ApiError;

/// The embedded files: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../../assets/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../assets/app.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../../assets/style.css")),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /dashboard`: the page itself.
pub async fn index() -> Response {
    asset_response("index.html").unwrap_or_else(|err| err.into_response())
}

/// `GET /dashboard/{file}`: a script, stylesheet or the page.
pub async fn asset(Path(file): Path<String>) -> Response {
    asset_response(&file).unwrap_or_else(|err| err.into_response())
}

/// `GET /`: the dashboard is the home page.
pub async fn home() -> Redirect {
    Redirect::temporary("/dashboard")
}

fn asset_response(name: &str) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(file, _, _)| *file == name)
        .ok_or_else(|| ApiError::NotFound(format!("The dashboard has no file `{name}`.")))?;
    let mut response = (StatusCode::OK, *bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
