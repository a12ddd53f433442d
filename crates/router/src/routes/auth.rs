//! `/v0/auth`: sign in, sign out, who am I.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::{SESSION_COOKIE, Viewer};
use super::json::JsonBody;
use crate::auth::credentials::Session;
use crate::config::Settings;
use crate::error::ApiResult;
use crate::model::auth::Role;
use crate::net::client_addr;
use crate::state::AppState;
use llm_router_protocol::ErrorBody;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoginRequest {
    username: String,
    password: String,
}

/// A user as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    pub username: String,
    pub role: Role,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LoginResponse {
    token: String,
    user: UserView,
}

/// Sign in
///
/// Answers a session token and sets it as an HttpOnly, SameSite=Strict cookie for the dashboard. After 5 wrong
/// passwords within 15 minutes for one username from one address, that pair is refused for a while (429
/// `login_throttled`, growing to 15 minutes; unknown usernames alike); a burst of sign-ins beyond what the
/// password hashing pool takes is refused with 429 `hashing_busy`. Both carry `Retry-After`.
#[utoipa::path(post, path = "/v0/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = LoginResponse),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 429, description = "Too many failures for this username from this address (`login_throttled`), or too many sign-ins at once (`hashing_busy`); see `Retry-After`", body = ErrorBody)
    ))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LoginRequest>,
) -> ApiResult<Response> {
    let from = client_addr(peer, &headers, &state.settings.trusted_proxies);
    let Session { token, user, ttl } = state.credentials.sign_in(&body.username, body.password, from).await?;
    let cookie = session_cookie(&state.settings, token.plaintext(), ttl.as_secs());
    let body =
        LoginResponse { token: token.into_plaintext(), user: UserView { username: user.username, role: user.role } };
    let mut response = Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// Sign out: ends the session (an API key is revoked only by deleting it)
#[utoipa::path(post, path = "/v0/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Cookie request without X-Requested-With", body = ErrorBody)
    ))]
pub async fn logout(State(state): State<AppState>, Viewer(principal): Viewer) -> ApiResult<Response> {
    state.credentials.sign_out(&principal).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&session_cookie(&state.settings, "", 0)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// The session cookie's `Set-Cookie` value; `Secure` when users reach the router over HTTPS (`--public-url`), so the
/// browser never sends the session over plain HTTP.
fn session_cookie(settings: &Settings, value: &str, max_age_secs: u64) -> String {
    let secure =
        if settings.public_url.as_deref().is_some_and(|url| url.starts_with("https://")) { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_secs}{secure}")
}

/// Who is signed in
#[utoipa::path(get, path = "/v0/auth/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The signed-in user", body = UserView),
        (status = 401, description = "No valid credential", body = ErrorBody)
    ))]
pub async fn me(Viewer(principal): Viewer) -> Json<UserView> {
    Json(UserView { username: principal.name, role: principal.role })
}
