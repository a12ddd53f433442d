//! The extractors that guard handlers: a handler that takes [`AdminUser`], [`Viewer`] or [`NodeAuth`] cannot forget
//! the check.
//!
//! A person's credential is a bearer token (session token or API key) or the dashboard's HttpOnly session cookie. A
//! cookie is sent by the browser on its own, so unsafe methods authenticated by cookie must also carry an
//! `X-Requested-With` header, which a cross-site form cannot set and a cross-site script cannot send without a CORS
//! grant the router never gives. A node's agent presents its node token in `X-Node-Token`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{Method, header};
use llm_router_protocol::NODE_TOKEN_HEADER;

use crate::error::{ApiError, forbidden, unauthorized};
use crate::model::auth::{Principal, Role, Scope, TokenHash};
use crate::net::client_addr;
use crate::registry::NodeHandle;
use crate::state::AppState;

/// Name of the dashboard's session cookie.
pub const SESSION_COOKIE: &str = "llm_router_session";

/// Any signed-in user: viewer or admin.
#[derive(Debug, Clone)]
pub struct Viewer(pub Principal);

/// A signed-in administrator.
#[derive(Debug, Clone)]
pub struct AdminUser(pub Principal);

/// Where the credential of a request came from.
enum Credential {
    Bearer(String),
    Cookie(String),
}

fn credential(parts: &Parts) -> Result<Option<Credential>, ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| unauthorized("The Authorization header is not valid text."))?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("Use `Authorization: Bearer <session token or API key>`."))?;
        return Ok(Some(Credential::Bearer(token.to_owned())));
    }
    for value in parts.headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=')
                && name == SESSION_COOKIE
                && !value.is_empty()
            {
                return Ok(Some(Credential::Cookie(value.to_owned())));
            }
        }
    }
    Ok(None)
}

/// Resolves the request's credential to a principal, or answers 401. A credential the database confirmed within
/// the last second is taken from memory; while the database is unreachable, one it confirmed within the grace period
/// is too ([`crate::auth::cache`]).
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    Ok(state.credentials.principal(credential_hash(parts)?).await?)
}

/// The hash of the credential the request presents (401 when none; 403 for a cookie on an unsafe method without
/// `X-Requested-With`).
pub fn credential_hash(parts: &Parts) -> Result<TokenHash, ApiError> {
    let credential = credential(parts)?.ok_or_else(|| {
        unauthorized("Sign in first: send `Authorization: Bearer <token>` (POST /v0/auth/login gives one).")
    })?;
    let secret = match credential {
        Credential::Bearer(secret) => secret,
        Credential::Cookie(secret) => {
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if !safe && !parts.headers.contains_key("x-requested-with") {
                return Err(forbidden(
                    "Requests authenticated by the session cookie must carry an X-Requested-With header.",
                ));
            }
            secret
        }
    };
    Ok(TokenHash::of(&secret))
}

/// Resolves the request's credential to a principal allowed on the admin API: 403 for an `inference` key.
async fn authenticate_admin_api(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    let principal = authenticate(parts, state).await?;
    if principal.scope != Scope::Admin {
        return Err(forbidden(format!(
            "`{}` is an API key of scope `{}`: it works on /v1 only.",
            principal.name,
            principal.scope.as_str()
        )));
    }
    Ok(principal)
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate_admin_api(parts, state).await.map(Viewer)
    }
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let principal = authenticate_admin_api(parts, state).await?;
        if principal.role != Role::Admin {
            return Err(forbidden(format!(
                "`{}` is a {}; this action needs the admin role.",
                principal.name, principal.role
            )));
        }
        Ok(AdminUser(principal))
    }
}

/// A node's agent, by the node token it presented in `X-Node-Token`: 401 when the header is missing or the token
/// belongs to no node.
pub struct NodeAuth(pub NodeHandle);

impl FromRequestParts<AppState> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(NODE_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| unauthorized(format!("Send the node's token in the {NODE_TOKEN_HEADER} header.")))?;
        Ok(NodeAuth(state.registry.authenticate(token).await?))
    }
}

/// The client's address: the TCP peer, or the left-most untrusted `X-Forwarded-For` address behind a trusted proxy.
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer)
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no peer address on the request")))?;
        Ok(ClientAddr(client_addr(peer, &parts.headers, &state.settings.trusted_proxies)))
    }
}
