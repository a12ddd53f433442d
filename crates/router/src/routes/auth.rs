//! `/v0/auth`: sign in, sign out, who am I.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::{SESSION_COOKIE, Viewer};
use super::json::JsonBody;
use crate::audit::Outcome;
use crate::auth::password::{HashError, UNKNOWN_USER_HASH};
use crate::auth::token::{NewToken, TokenKind};
use crate::config::Settings;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::model::auth::{Revoked, Role};
use crate::net::client_addr;
use crate::state::AppState;
use crate::validate::{self, Text};
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

/// The audit log's name for a sign-in.
const LOGIN: &str = "auth.login";

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
    validate::text("username", &body.username, Text::Line)?;
    let from = client_addr(peer, &headers, &state.settings.trusted_proxies);
    // Refused before any lookup or hash: a locked pair costs the router nothing.
    let attempt = state.login_throttle.begin(&body.username, from, state.clock.now_ms()).map_err(|throttled| {
        Metrics::inc(&state.metrics.logins_throttled);
        state.audit.record(&body.username, Some(from), LOGIN, None, Outcome::Throttled);
        ApiError::TooManyRequests {
            code: "login_throttled",
            message: format!(
                "Too many failed sign-ins for this username from this address; try again in {} s.",
                throttled.retry_after_secs
            ),
            retry_after_secs: throttled.retry_after_secs,
        }
    })?;
    let user = state.store.user(&body.username).await?;
    // An unknown username is checked against a real hash too, so it costs the same time as a wrong password.
    let stored = user.as_ref().map_or_else(|| UNKNOWN_USER_HASH.to_owned(), |u| u.password_hash.clone());
    let matches = state.hasher.verify(body.password, stored, from).await.inspect_err(|err| {
        if matches!(err, HashError::Busy) {
            state.audit.record(&body.username, Some(from), LOGIN, None, Outcome::Throttled);
        }
    })?;
    let user = match user {
        Some(user) if matches => {
            attempt.succeeded();
            user
        }
        _ => {
            attempt.failed(state.clock.now_ms());
            state.audit.record(&body.username, Some(from), LOGIN, None, Outcome::Failure);
            return Err(ApiError::InvalidCredentials("Wrong username or password.".to_owned()));
        }
    };
    let token = NewToken::generate(TokenKind::Session);
    let now = state.clock.now_ms();
    let ttl = state.settings.session_ttl;
    let expires = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
    state.store.insert_session(token.hash(), &user.username, now, expires).await?;
    state.audit.record(&user.username, Some(from), LOGIN, None, Outcome::Success);
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
    if let Some(session) = principal.session {
        state.store.delete_session(session).await?;
        state.credentials.revoke(&Revoked::Session(session));
    }
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
