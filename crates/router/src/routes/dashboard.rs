//! `/dashboard`: the web UI, served from files embedded in the binary (no build step, no files on disk).
//!
//! Every answer carries a strict Content-Security-Policy: scripts and styles come from the router itself only, so
//! a node-provided string that slipped into the page as markup still could not run.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::error::ApiError;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// One embedded file: its name under `/dashboard/`, its content type, and its text from `crates/router/assets`.
macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        ($name, $content_type, include_str!(concat!("../../assets/", $name)))
    };
}

/// The embedded files: name, content type, text. `app.js` is the page's script; it imports the other modules
/// (`./dom.js`...), which the browser asks for as `/dashboard/<name>.js`.
const ASSETS: &[(&str, &str, &str)] = &[
    asset!("index.html", HTML),
    asset!("style.css", CSS),
    asset!("uplot.min.css", CSS),
    asset!("app.js", JS),
    asset!("actions.js", JS),
    asset!("api.js", JS),
    asset!("audit.js", JS),
    asset!("charts.js", JS),
    asset!("deployments.js", JS),
    asset!("detail.js", JS),
    asset!("dom.js", JS),
    asset!("feedback.js", JS),
    asset!("filters.js", JS),
    asset!("fleet-events.js", JS),
    asset!("format.js", JS),
    asset!("join-tokens.js", JS),
    asset!("labels.js", JS),
    asset!("live.js", JS),
    asset!("pages.js", JS),
    asset!("refresh.js", JS),
    asset!("rows.js", JS),
    asset!("session.js", JS),
    asset!("state.js", JS),
    asset!("table.js", JS),
    asset!("uplot.esm.js", JS),
    asset!("usage.js", JS),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /dashboard`: the page itself.
pub async fn index() -> Response {
    asset_response("index.html").unwrap_or_else(|err| err.into_response())
}

/// `GET /dashboard/{file}`: a script module, the stylesheet or the page.
pub async fn asset(Path(file): Path<String>) -> Response {
    asset_response(&file).unwrap_or_else(|err| err.into_response())
}

/// `GET /`: the dashboard is the home page.
pub async fn home() -> Redirect {
    Redirect::temporary("/dashboard")
}

fn asset_response(name: &str) -> Result<Response, ApiError> {
    let (_, content_type, text) = ASSETS
        .iter()
        .find(|(file, _, _)| *file == name)
        .ok_or_else(|| ApiError::NotFound(format!("The dashboard has no file `{name}`.")))?;
    let mut response = (StatusCode::OK, *text).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
