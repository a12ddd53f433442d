//! `/v0/api-keys`: credentials for scripts and automation, shown once and stored hashed.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::{AdminUser, ClientAddr};
use super::json::JsonBody;
use crate::auth::credentials::{Actor, CreatedKey};
use crate::clock::rfc3339;
use crate::error::ApiResult;
use crate::model::auth::{Role, Scope};
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
}

impl From<ApiKeyRow> for ApiKeyView {
    fn from(key: ApiKeyRow) -> Self {
        ApiKeyView {
            id: key.id,
            name: key.name,
            role: key.role,
            scope: key.scope,
            created_by: key.created_by,
            created_at: rfc3339(key.created_at),
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
    Ok(Json(state.credentials.api_keys().await?.into_iter().map(ApiKeyView::from).collect()))
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
    let CreatedKey { row, key } = state.credentials.create_api_key(actor, &body.name, body.role, body.scope).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id: row.id,
            name: row.name,
            role: row.role,
            scope: row.scope,
            key: key.into_plaintext(),
            created_at: rfc3339(row.created_at),
        }),
    ))
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
