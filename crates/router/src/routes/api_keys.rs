//! `/v0/api-keys`: credentials for scripts and automation, shown once and stored hashed.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::{AdminUser, ClientAddr};
use super::json::JsonBody;
use crate::auth::credentials::{Actor, CreatedKey, KeyPolicy};
use crate::clock::rfc3339;
use crate::error::ApiResult;
use crate::model::auth::{Role, Scope};
use crate::model::tenant::Limits;
use crate::state::AppState;
use crate::store::ApiKeyRow;
use llm_router_protocol::ErrorBody;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateApiKey {
    name: String,
    /// What the key may do on the admin API. Defaults to `admin`; a `viewer` key can only read. Not for an
    /// `inference` key, which has no access to the admin API.
    #[serde(default)]
    role: Option<Role>,
    /// Where the key works. Defaults to `admin`: the admin API (as its role allows) and `/v1`. An `inference` key
    /// works on `/v1` only: the key to hand to applications.
    #[serde(default)]
    scope: Option<Scope>,
    /// What the key may use (SPEC §14); each limit is optional.
    #[serde(default)]
    limits: Option<Limits>,
    /// The key's share of free places when requests wait for capacity: 1–100, default 1.
    #[serde(default)]
    weight: Option<u32>,
}

/// `PATCH /v0/api-keys/{id}`: what to change; a field left out stays as it is.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateApiKey {
    /// The key's limits, replaced whole; `null` removes them all.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Limits>)]
    limits: Option<Option<Limits>>,
    #[serde(default)]
    weight: Option<u32>,
}

/// A field that may be given as `null`: `Some(None)`, against `None` when left out.
pub(super) fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// What a key or user has used of its limits now (SPEC §14), as this router counts it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitUse {
    requests_this_minute: u64,
    tokens_this_minute: u64,
    tokens_today: u64,
    tokens_this_month: u64,
}

impl LimitUse {
    pub fn of(state: &AppState, tenant: &str) -> Option<LimitUse> {
        let [requests_this_minute, tokens_this_minute, tokens_today, tokens_this_month] =
            state.credentials.limiter().used(tenant)?;
        Some(LimitUse { requests_this_minute, tokens_this_minute, tokens_today, tokens_this_month })
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    id: Uuid,
    name: String,
    /// What the key may do on the admin API (`viewer`, unused, for an `inference` key).
    role: Role,
    scope: Scope,
    created_by: String,
    created_at: String,
    limits: Limits,
    weight: u32,
    /// What the key has used of its limits; absent for a key without limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    used: Option<LimitUse>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    id: Uuid,
    name: String,
    role: Role,
    scope: Scope,
    /// The key itself: shown in this answer only.
    key: String,
    created_at: String,
    limits: Limits,
    weight: u32,
}

impl ApiKeyView {
    fn of(state: &AppState, key: ApiKeyRow) -> Self {
        let used = if key.limits.is_empty() { None } else { LimitUse::of(state, &format!("key:{}", key.id)) };
        ApiKeyView {
            id: key.id,
            name: key.name,
            role: key.role,
            scope: key.scope,
            created_by: key.created_by,
            created_at: rfc3339(key.created_at),
            limits: key.limits,
            weight: key.weight,
            used,
        }
    }
}

/// List API keys (admin); never shows a key
#[utoipa::path(get, path = "/v0/api-keys", tag = "api keys", security(("bearer" = [])),
    responses(
        (status = 200, description = "All keys, without the secrets", body = Vec<ApiKeyView>),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<ApiKeyView>>> {
    let keys = state.credentials.api_keys().await?;
    Ok(Json(keys.into_iter().map(|key| ApiKeyView::of(&state, key)).collect()))
}

/// Create an API key (admin); the key is shown only in this answer
#[utoipa::path(post, path = "/v0/api-keys", tag = "api keys", security(("bearer" = [])), request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created", body = CreatedApiKey),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody)
    ))]
pub async fn create(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let actor = Actor { name: &admin.name, client };
    let policy = KeyPolicy { limits: Some(body.limits), weight: body.weight };
    let CreatedKey { row, key } =
        state.credentials.create_api_key(actor, &body.name, body.role, body.scope, policy).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id: row.id,
            name: row.name,
            role: row.role,
            scope: row.scope,
            key: key.into_plaintext(),
            created_at: rfc3339(row.created_at),
            limits: row.limits,
            weight: row.weight,
        }),
    ))
}

/// Change an API key's limits or weight (admin); applied at once
#[utoipa::path(patch, path = "/v0/api-keys/{id}", tag = "api keys", security(("bearer" = [])), request_body = UpdateApiKey,
    params(("id" = String, Path, description = "Key id (UUID)")),
    responses(
        (status = 200, description = "The key as changed", body = ApiKeyView),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody)
    ))]
pub async fn update(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateApiKey>,
) -> ApiResult<Json<ApiKeyView>> {
    let policy = KeyPolicy { limits: body.limits, weight: body.weight };
    let row = state.credentials.update_api_key(Actor { name: &admin.name, client }, &id, policy).await?;
    Ok(Json(ApiKeyView::of(&state, row)))
}

/// Revoke an API key (admin); it stops working at once
#[utoipa::path(delete, path = "/v0/api-keys/{id}", tag = "api keys", security(("bearer" = [])),
    params(("id" = String, Path, description = "Key id (UUID)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody)
    ))]
pub async fn delete(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.credentials.delete_api_key(Actor { name: &admin.name, client }, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
