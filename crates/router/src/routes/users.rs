//! `/v0/users`: administrators manage who may sign in.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::extract::{AdminUser, ClientAddr};
use super::json::JsonBody;
use crate::auth::credentials::Actor;
use crate::clock::rfc3339;
use crate::error::ApiResult;
use crate::model::auth::Role;
use crate::state::AppState;
use crate::store::UserRow;
use llm_router_protocol::ErrorBody;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateUser {
    username: String,
    password: String,
    role: Role,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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

/// List users (admin)
#[utoipa::path(get, path = "/v0/users", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "All users", body = Vec<UserListItem>),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<UserListItem>>> {
    Ok(Json(state.credentials.users().await?.into_iter().map(UserListItem::from).collect()))
}

/// Create a user (admin); the password is stored as an Argon2id hash
#[utoipa::path(post, path = "/v0/users", tag = "users", security(("bearer" = [])), request_body = CreateUser,
    responses(
        (status = 201, description = "Created", body = UserListItem),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 409, description = "The username is taken", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 429, description = "Too many password hashes at once (`hashing_busy`); see `Retry-After`", body = ErrorBody)
    ))]
pub async fn create(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserListItem>)> {
    let actor = Actor { name: &admin.name, client };
    let user = state.credentials.create_user(actor, body.username, body.password, body.role).await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// Delete a user (admin); ends their sessions
#[utoipa::path(delete, path = "/v0/users/{username}", tag = "users", security(("bearer" = [])),
    params(("username" = String, Path, description = "The user")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 409, description = "The last administrator cannot be deleted", body = ErrorBody)
    ))]
pub async fn delete(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    state.credentials.delete_user(Actor { name: &admin.name, client }, &username).await?;
    Ok(StatusCode::NO_CONTENT)
}
