//! `/v0/users`: administrators manage who may sign in.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::api_keys::LimitUse;
use super::extract::{AdminUser, ClientAddr};
use super::json::JsonBody;
use crate::auth::credentials::Actor;
use crate::clock::rfc3339;
use crate::error::ApiResult;
use crate::model::auth::Role;
use crate::model::tenant::Limits;
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
    /// What the user's own `/v1` requests (signed in, not through a key) may use (SPEC §14).
    limits: Limits,
    /// What the user has used of its limits; absent without limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    used: Option<LimitUse>,
}

impl UserListItem {
    fn of(state: &AppState, user: UserRow) -> Self {
        let tenant = format!("user:{}", user.username);
        let limits = state.credentials.limiter().limits(&tenant);
        let used = if limits.is_empty() { None } else { LimitUse::of(state, &tenant) };
        UserListItem { username: user.username, role: user.role, created_at: rfc3339(user.created_at), limits, used }
    }
}

/// `PATCH /v0/users/{username}`: the user's limits, replaced whole (`null`: none).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    limits: Option<Limits>,
}

/// List users (admin)
#[utoipa::path(get, path = "/v0/users", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "All users", body = Vec<UserListItem>),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<UserListItem>>> {
    let users = state.credentials.users().await?;
    Ok(Json(users.into_iter().map(|user| UserListItem::of(&state, user)).collect()))
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
    Ok((StatusCode::CREATED, Json(UserListItem::of(&state, user))))
}

/// Set a user's limits (admin); applied at once
#[utoipa::path(patch, path = "/v0/users/{username}", tag = "users", security(("bearer" = [])), request_body = UpdateUser,
    params(("username" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "The user as changed", body = UserListItem),
        (status = 400, description = "Malformed body or a field out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody)
    ))]
pub async fn update(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(username): Path<String>,
    JsonBody(body): JsonBody<UpdateUser>,
) -> ApiResult<Json<UserListItem>> {
    let actor = Actor { name: &admin.name, client };
    state.credentials.set_user_limits(actor, &username, body.limits).await?;
    let user = state.credentials.users().await?.into_iter().find(|u| u.username == username);
    let user = user.ok_or_else(|| crate::error::not_found(format!("No user named `{username}`.")))?;
    Ok(Json(UserListItem::of(&state, user)))
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
