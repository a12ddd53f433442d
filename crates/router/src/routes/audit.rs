//! `/v0/audit`: the audit log, newest first, paged, filtered by actor or action (admin); and the one helper handlers
//! record their actions with.

use std::net::IpAddr;

use axum::extract::State;

use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::extract::AdminUser;
use super::paging;
use super::query::ApiQuery;
use crate::audit::Outcome;
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::model::audit::RecordedAudit;
use crate::state::AppState;
use crate::store::AuditQuery;
use llm_router_protocol::ErrorBody;

/// Records an action of `actor` from `client` on `target`, ended as `result` says: success, throttled (a 429) or
/// failure.
pub fn log_result<T>(state: &AppState, actor: &str, client: IpAddr, action: &str, target: &str, result: &ApiResult<T>) {
    let outcome = match result {
        Ok(_) => Outcome::Success,
        Err(ApiError::TooManyRequests { .. }) => Outcome::Throttled,
        Err(_) => Outcome::Failure,
    };
    state.audit.record(actor, Some(client), action, Some(target.to_owned()), outcome);
}

/// Query of `GET /v0/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditParams {
    limit: Option<u32>,
    before: Option<i64>,
    actor: Option<String>,
    action: Option<String>,
}

/// An audit event as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEventView {
    id: i64,
    at: String,
    actor: String,
    client: Option<String>,
    action: String,
    target: Option<String>,
    /// `success`, `failure` or `throttled`.
    outcome: String,
}

impl From<RecordedAudit> for AuditEventView {
    fn from(recorded: RecordedAudit) -> Self {
        let RecordedAudit { id, event } = recorded;
        AuditEventView {
            id,
            at: rfc3339(event.at),
            actor: event.actor,
            client: event.client,
            action: event.action,
            target: event.target,
            outcome: event.outcome,
        }
    }
}

/// Most events in one page.
const MAX_PAGE: u32 = 1000;
/// Events in one page when the caller names no `limit`.
const DEFAULT_PAGE: u32 = 100;

/// The audit log, newest first, paged (admin)
///
/// Admin actions (`node.approve`, `node.delete`, `node.update`, `user.create`, `user.delete`, `api_key.create`,
/// `api_key.delete`, `join_token.create`, `join_token.revoke`), sign-ins (`auth.login`) and throttling decisions
/// (`auth.login` and `node.register` with outcome `throttled`). At most `limit` events older than the event `before`,
/// of one `actor` or `action` when given; a full page carries `Link: <…>; rel="next"`.
#[utoipa::path(get, path = "/v0/audit", tag = "audit", security(("bearer" = [])),
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Events per page (default 100)"),
        ("before" = Option<i64>, Query, minimum = 1, description = "Only events older than the event with this id"),
        ("actor" = Option<String>, Query, description = "Only events of this actor"),
        ("action" = Option<String>, Query, description = "Only events of this action")
    ),
    responses(
        (status = 200, description = "Events, newest first", body = Vec<AuditEventView>,
            headers(("Link" = String, description = "`<…>; rel=\"next\"` when there may be more"))),
        (status = 400, description = "`limit` or `before` out of range", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn list(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> ApiResult<Response> {
    let limit = paging::limit(params.limit, params.before, DEFAULT_PAGE, MAX_PAGE)?;
    // Every event recorded before this request is in the page.
    state.audit.flush().await;
    let page =
        AuditQuery { limit, before: params.before, actor: params.actor.as_deref(), action: params.action.as_deref() };
    let events: Vec<AuditEventView> =
        state.store.audit_events(page).await?.into_iter().map(AuditEventView::from).collect();
    Ok(paging::answer(
        events,
        limit,
        |event| event.id,
        |last| {
            let mut link = format!("/v0/audit?limit={limit}&before={last}");
            for (name, value) in [("actor", &params.actor), ("action", &params.action)] {
                if let Some(value) = value {
                    link.push_str(&format!("&{name}={}", percent_encode(value)));
                }
            }
            link
        },
    ))
}

/// Percent-encodes everything but unreserved characters, for a query value.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
