//! `/v0/users`: administrators manage who may sign in.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::json::JsonBody;
use crate::app::AppState;
use crate::auth::{AdminUser, Role, password};
use crate::clock::rfc3339;
use crate::db::auth::{DeleteUserError, UserRow};
use crate::error::{ApiError, ApiResult, bad_request, not_found};

/// Shortest accepted password.
pub const MIN_PASSWORD_CHARS: usize = 8;

#[derive(Debug, Deserialize)]
pub struct CreateUser {
    username: String,
    password: String,
    role: Role,
}

#[derive(Debug, Serialize)]
pub struct UserListItem {
    username: String,
    role: Role,
    created_at: String,
}

impl From<UserRow> for UserListItem {
    fn from(user: UserRow) -> Self {
        UserListItem { username: user.username, role: user.role, created_at: rfc3339(user.created_at) }
    }
}

/// `GET /v0/users`
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<UserListItem>>> {
    Ok(Json(state.store.users().await?.into_iter().map(UserListItem::from).collect()))
}

/// `POST /v0/users`: 201 with the user; 409 when the name is taken.
pub async fn create(
    State(state): State<AppState>,
    _admin: AdminUser,
    JsonBody(body): JsonBody<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserListItem>)> {
    let valid_name = !body.username.is_empty()
        && body.username.len() <= 64
        && body.username.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
    if !valid_name {
        return Err(bad_request("`username` must be 1 to 64 characters of letters, digits, `.`, `_`, `-` or `@`."));
    }
    if body.password.chars().count() < MIN_PASSWORD_CHARS || body.password.len() > 1024 {
        return Err(bad_request(format!("`password` must be {MIN_PASSWORD_CHARS} to 1024 characters long.")));
    }
    let user = UserRow {
        username: body.username,
        password_hash: password::hash(body.password).await?,
        role: body.role,
        created_at: state.clock.now_ms(),
    };
    if !state.store.insert_user(&user).await? {
        return Err(ApiError::Conflict(format!("A user named `{}` already exists.", user.username)));
    }
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// `DELETE /v0/users/{username}`: also ends the user's sessions; the last administrator stays.
pub async fn delete(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    match state.store.delete_user(&username).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(DeleteUserError::NotFound) => Err(not_found(format!("No user named `{username}`."))),
        Err(DeleteUserError::LastAdmin) => Err(ApiError::Conflict(format!(
            "`{username}` is the last administrator; create another admin before deleting this one."
        ))),
        Err(DeleteUserError::Other(err)) => Err(err.into()),
    }
}
