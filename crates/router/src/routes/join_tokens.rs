//! `/v0/join-tokens`: enrollment an operator controls (SPEC §9). A token is shown once and stored hashed; it admits
//! machines until it expires, is used up or is revoked, with its tags and, when it says so, approved by that rule.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::audit;
use super::extract::{AdminUser, ClientAddr};
use super::json::JsonBody;
use crate::auth::token::{NewToken, TokenKind};
use crate::clock::rfc3339;
use crate::error::{ApiResult, bad_request, not_found};
use crate::model::enrollment::{JoinToken, Unusable};
use crate::state::AppState;
use crate::validate;
use llm_router_protocol::ErrorBody;

/// How long a join token lives when the request does not say: a day.
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 86_400;
/// The longest a join token may live: 30 days. A token that never expires is a standing invitation.
pub const MAX_EXPIRES_IN_SECS: u64 = 30 * 86_400;
/// The most machines one token may admit, when limited.
pub const MAX_USES: u32 = 1_000_000;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// Seconds until it expires: default 86,400 (a day), at most 2,592,000 (30 days).
    #[schema(minimum = 1, maximum = 2592000)]
    expires_in_secs: Option<u64>,
    /// How many machines may join with it; unlimited until it expires when absent.
    #[schema(minimum = 1, maximum = 1000000)]
    max_uses: Option<u32>,
    /// Whether machines that join with it are approved at once (default false: they wait as pending).
    #[serde(default)]
    auto_approve: bool,
    /// Tags every machine that joins with it gets, besides its own.
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// A join token as listed: never the token itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JoinTokenView {
    id: Uuid,
    name: String,
    created_by: String,
    created_at: String,
    expires_at: String,
    max_uses: Option<u32>,
    uses: u32,
    auto_approve: bool,
    tags: Vec<String>,
    revoked_at: Option<String>,
    /// `active`, `expired`, `used_up` or `revoked`.
    state: &'static str,
}

/// A token just created: the only answer that carries it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedJoinToken {
    #[serde(flatten)]
    view: JoinTokenView,
    /// The token itself (`llmj_…`), for `llm-node --join-token`: shown in this answer only.
    token: String,
}

impl JoinTokenView {
    fn of(token: JoinToken, now: i64) -> Self {
        let state = match token.check(now) {
            Ok(()) => "active",
            Err(Unusable::Expired) => "expired",
            Err(Unusable::UsedUp) => "used_up",
            Err(Unusable::Revoked | Unusable::Unknown) => "revoked",
        };
        JoinTokenView {
            id: token.id,
            name: token.name,
            created_by: token.created_by,
            created_at: rfc3339(token.created_at),
            expires_at: rfc3339(token.expires_at),
            max_uses: token.max_uses,
            uses: token.uses,
            auto_approve: token.auto_approve,
            tags: token.tags,
            revoked_at: token.revoked_at.map(rfc3339),
            state,
        }
    }
}

/// List join tokens (admin), newest first; never shows a token
#[utoipa::path(get, path = "/v0/join-tokens", tag = "join tokens", security(("bearer" = [])),
    responses(
        (status = 200, description = "All join tokens, with uses and expiry", body = Vec<JoinTokenView>),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Vec<JoinTokenView>>> {
    let now = state.clock.now_ms();
    Ok(Json(state.store.join_tokens().await?.into_iter().map(|token| JoinTokenView::of(token, now)).collect()))
}

/// Create a join token (admin); the token is shown only in this answer
#[utoipa::path(post, path = "/v0/join-tokens", tag = "join tokens", security(("bearer" = [])),
    request_body = CreateJoinToken,
    responses(
        (status = 201, description = "Created", body = CreatedJoinToken),
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
    JsonBody(body): JsonBody<CreateJoinToken>,
) -> ApiResult<(StatusCode, Json<CreatedJoinToken>)> {
    let actor = admin.name.clone();
    let target: String = body.name.clone();
    let result: ApiResult<(StatusCode, Json<CreatedJoinToken>)> = async {
        let name = validate::name(&body.name)?;
        let expires_in = body.expires_in_secs.unwrap_or(DEFAULT_EXPIRES_IN_SECS);
        if !(1..=MAX_EXPIRES_IN_SECS).contains(&expires_in) {
            return Err(bad_request(format!(
                "`expires_in_secs` must be 1 to {MAX_EXPIRES_IN_SECS} (30 days), not {expires_in}."
            )));
        }
        if let Some(max_uses) = body.max_uses.filter(|n| !(1..=MAX_USES).contains(n)) {
            return Err(bad_request(format!("`max_uses` must be 1 to {MAX_USES}, not {max_uses}.")));
        }
        let tags = body.tags.map(|tags| validate::list("tags", Some(tags))).transpose()?.unwrap_or_default();
        let secret = NewToken::generate(TokenKind::Join);
        let now = state.clock.now_ms();
        let token = JoinToken {
            id: Uuid::new_v4(),
            name,
            hash: secret.hash(),
            created_by: admin.name,
            created_at: now,
            expires_at: now + i64::try_from(expires_in * 1000).unwrap_or(i64::MAX),
            max_uses: body.max_uses,
            uses: 0,
            auto_approve: body.auto_approve,
            tags,
            revoked_at: None,
        };
        state.store.insert_join_token(&token).await?;
        Ok((
            StatusCode::CREATED,
            Json(CreatedJoinToken { view: JoinTokenView::of(token, now), token: secret.into_plaintext() }),
        ))
    }
    .await;
    audit::log_result(&state, &actor, client, "join_token.create", &target, &result);
    result
}

/// Revoke a join token (admin); machines that already joined stay
#[utoipa::path(delete, path = "/v0/join-tokens/{id}", tag = "join tokens", security(("bearer" = [])),
    params(("id" = String, Path, description = "Join token id (UUID)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 404, description = "No such join token", body = ErrorBody)
    ))]
pub async fn revoke(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let actor = admin.name.clone();
    let target: String = id.clone();
    let result: ApiResult<StatusCode> = async {
        let missing = || not_found(format!("No join token with id `{id}`."));
        let token_id = Uuid::parse_str(&id).map_err(|_| missing())?;
        if state.store.revoke_join_token(token_id, state.clock.now_ms()).await? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(missing())
        }
    }
    .await;
    audit::log_result(&state, &actor, client, "join_token.revoke", &target, &result);
    result
}
