//! `/v0/api-keys`: credentials for scripts and automation, shown once and stored hashed.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::json::JsonBody;
use crate::app::AppState;
use crate::auth::token::{NewToken, TokenKind};
use crate::auth::{AdminUser, Role};
use crate::clock::rfc3339;
use crate::db::auth::ApiKeyRow;
use crate::error::{ApiResult, bad_request, not_found};

#[derive(Debug, Deserialize)]
pub struct CreateApiKey {
    name: String,
    /// Defaults to `admin`; a `viewer` key can only read.
    #[serde(default)]
    role: Option<Role>,
}

#[derive(Debug, Serialize)]
pub struct ApiKeyView {
    id: Uuid,
    name: String,
    role: Role,
    created_by: String,
    created_at: String,
}

#[derive(Debug, Serialize)]
pub struct CreatedApiKey {
    id: Uuid,
    name: String,
    role: Role,
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
            created_by: key.created_by,
            created_at: rfc3339(key.created_at),
        }
    }
}

/// `GET /v0/api-keys`: never shows a key.
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<ApiKeyView>>> {
    Ok(Json(state.store.api_keys().await?.into_iter().map(ApiKeyView::from).collect()))
}

/// `POST /v0/api-keys`: 201 with the key, shown only now.
pub async fn create(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 128 {
        return Err(bad_request("`name` must be 1 to 128 characters and not blank."));
    }
    let key = NewToken::generate(TokenKind::ApiKey);
    let row = ApiKeyRow {
        id: Uuid::new_v4(),
        name,
        role: body.role.unwrap_or(Role::Admin),
        created_by: admin.name,
        created_at: state.clock.now_ms(),
    };
    state.store.insert_api_key(&row, key.hash()).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id: row.id,
            name: row.name,
            role: row.role,
            key: key.into_plaintext(),
            created_at: rfc3339(row.created_at),
        }),
    ))
}

/// `DELETE /v0/api-keys/{id}`: the key stops working at once.
pub async fn delete(State(state): State<AppState>, _admin: AdminUser, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let missing = || not_found(format!("No API key with id `{id}`."));
    let key_id = Uuid::parse_str(&id).map_err(|_| missing())?;
    if state.store.delete_api_key(key_id).await? { Ok(StatusCode::NO_CONTENT) } else { Err(missing()) }
}
