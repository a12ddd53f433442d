//! `/v0/usage`: who used what (SPEC §14). Series and totals from the roll-ups, split by principal, model or node
//! (administrators; viewers see the fleet's totals and series only), as JSON or CSV; each request's own record,
//! paged (administrators); and the fleet's last hour for the dashboard.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::extract::{AdminUser, Viewer};
use super::paging;
use super::query::ApiQuery;
use crate::clock::{Millis, rfc3339};
use crate::error::{ApiResult, bad_request, forbidden};
use crate::model::auth::Role;
use crate::model::usage::{GroupBy, RecordedRequest, RequestQuery, SeriesQuery, Step, UsageBucket, UsageSums};
use crate::state::AppState;
use crate::store::usage_sql::ttft_bin_top;
use llm_router_protocol::ErrorBody;

/// Most buckets one series may have.
pub const MAX_BUCKETS: i64 = 10_000;

/// Query of `GET /v0/usage`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Start (RFC 3339; default: a day before `to`).
    from: Option<String>,
    /// End, exclusive (RFC 3339; default: now).
    to: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    step: Option<Step>,
    /// `principal`, `model` or `node` (administrators only).
    group_by: Option<GroupBy>,
    /// Only this principal (`key:<id>`, `user:<name>`, `anonymous`; administrators only).
    principal: Option<String>,
    /// Only this model.
    model: Option<String>,
}

/// One bucket of a series.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Point {
    at: String,
    #[serde(flatten)]
    sums: UsageSums,
}

/// One group's totals and series.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Group {
    /// The principal's id, the model, or the node's id.
    key: String,
    /// What a person reads: the key's or user's name, the model, the node's name.
    name: String,
    totals: UsageSums,
    series: Vec<Point>,
}

/// `GET /v0/usage`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageView {
    from: String,
    to: String,
    step: Step,
    group_by: Option<GroupBy>,
    /// Everything in the period.
    totals: UsageSums,
    /// The whole fleet's series: buckets with no request are left out.
    series: Vec<Point>,
    /// Per group, largest first by tokens, then requests (when grouped).
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<Vec<Group>>,
}

fn parse_time(field: &str, text: &str) -> ApiResult<Millis> {
    let at = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| bad_request(format!("`{field}` must be a time in RFC 3339, such as 2026-12-01T00:00:00Z.")))?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad_request(format!("`{field}` is out of range.")))
}

/// Usage over a period: totals and series, split by principal, model or node
///
/// Sums come from the per-minute, per-hour or per-day roll-ups; `group_by=node` is kept by hour and day only.
/// Viewers see the fleet's totals and series; splitting and `principal` are for administrators. With
/// `Accept: text/csv` the answer is CSV: one line per bucket and group.
#[utoipa::path(get, path = "/v0/usage", tag = "usage", security(("bearer" = [])), params(UsageParams),
    responses(
        (status = 200, description = "Totals and series", body = UsageView),
        (status = 400, description = "A parameter out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Splitting by principal, model or node, or one principal, is for administrators", body = ErrorBody)
    ))]
pub async fn usage(
    State(state): State<AppState>,
    Viewer(viewer): Viewer,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> ApiResult<Response> {
    if viewer.role != Role::Admin && (params.group_by.is_some() || params.principal.is_some()) {
        return Err(forbidden("Usage by principal, model or node is for administrators; viewers see the totals."));
    }
    let step = params.step.unwrap_or(Step::Hour);
    let to = match &params.to {
        Some(text) => parse_time("to", text)?,
        // Exclusive: what was recorded at this very millisecond counts.
        None => state.clock.now_ms() + 1,
    };
    let from = match &params.from {
        Some(text) => parse_time("from", text)?,
        None => to - 86_400_000,
    };
    if from >= to {
        return Err(bad_request("`from` must be before `to`."));
    }
    if (to - step.floor(from)) / step.millis() > MAX_BUCKETS {
        return Err(bad_request(format!(
            "That is more than {MAX_BUCKETS} buckets of a {}: ask for a shorter period or a larger `step`.",
            step.as_str()
        )));
    }
    if params.group_by == Some(GroupBy::Node) {
        if step == Step::Minute {
            return Err(bad_request("Usage by node is kept by hour and day: use `step=hour` or `step=day`."));
        }
        if params.principal.is_some() {
            return Err(bad_request("Usage by node is kept without principals: leave out `principal`."));
        }
    }
    let query = SeriesQuery {
        from,
        to,
        step,
        group_by: params.group_by,
        principal: params.principal.clone(),
        model: params.model.clone(),
    };
    let buckets = state.store.usage_series(&query).await?;
    let names = match params.group_by {
        Some(GroupBy::Principal) => state.store.principal_names().await?.into_iter().collect(),
        Some(GroupBy::Node) => node_names(&state, &buckets),
        _ => HashMap::new(),
    };
    let view = build(&query, buckets, &names);
    if wants_csv(&headers) {
        return Ok(csv(&view));
    }
    Ok(Json(view).into_response())
}

fn node_names(state: &AppState, buckets: &[UsageBucket]) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for bucket in buckets {
        let Some(key) = &bucket.group else { continue };
        if names.contains_key(key) {
            continue;
        }
        let name = Uuid::parse_str(key)
            .ok()
            .and_then(|id| {
                state
                    .registry
                    .view(id, |node, _| node.display_name.clone().unwrap_or_else(|| node.machine_name.clone()))
                    .ok()
            })
            .unwrap_or_else(|| key.clone());
        names.insert(key.clone(), name);
    }
    names
}

/// The answer from the buckets: the fleet's series and totals, and each group's.
fn build(query: &SeriesQuery, buckets: Vec<UsageBucket>, names: &HashMap<String, String>) -> UsageView {
    let mut totals = UsageSums::default();
    let mut fleet: BTreeMap<Millis, UsageSums> = BTreeMap::new();
    let mut groups: BTreeMap<String, (UsageSums, Vec<Point>)> = BTreeMap::new();
    for bucket in buckets {
        totals.add(&bucket.sums);
        fleet.entry(bucket.at).or_default().add(&bucket.sums);
        if let Some(key) = bucket.group {
            let group = groups.entry(key).or_default();
            group.0.add(&bucket.sums);
            group.1.push(Point { at: rfc3339(bucket.at), sums: bucket.sums });
        }
    }
    let groups = query.group_by.map(|_| {
        let mut groups: Vec<Group> = groups
            .into_iter()
            .map(|(key, (totals, series))| Group {
                name: names.get(&key).cloned().unwrap_or_else(|| key.clone()),
                key,
                totals,
                series,
            })
            .collect();
        groups.sort_by(|a, b| {
            (b.totals.tokens(), b.totals.requests).cmp(&(a.totals.tokens(), a.totals.requests)).then(a.key.cmp(&b.key))
        });
        groups
    });
    UsageView {
        from: rfc3339(query.step.floor(query.from)),
        to: rfc3339(query.to),
        step: query.step,
        group_by: query.group_by,
        totals,
        series: fleet.into_iter().map(|(at, sums)| Point { at: rfc3339(at), sums }).collect(),
        groups,
    }
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|kind| kind.split(';').next().is_some_and(|k| k.trim() == "text/csv")))
}

/// A CSV field: quoted when it holds a comma, a quote or a line break; a leading `=`, `+`, `-` or `@` is prefixed
/// with `'` so a spreadsheet does not read a key's name as a formula.
fn field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) { format!("'{text}") } else { text.to_owned() };
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text }
}

fn csv(view: &UsageView) -> Response {
    let mut out = String::from(
        "at,group,name,requests,errors,rejected,prompt_tokens,completion_tokens,unknown_usage,duration_ms\n",
    );
    let mut line = |at: &str, key: &str, name: &str, s: &UsageSums| {
        let sums: Vec<String> = s.columns().iter().map(u64::to_string).collect();
        out.push_str(&format!("{at},{},{},{}\n", field(key), field(name), sums.join(",")));
    };
    match &view.groups {
        Some(groups) => {
            for group in groups {
                for point in &group.series {
                    line(&point.at, &group.key, &group.name, &point.sums);
                }
            }
        }
        None => {
            for point in &view.series {
                line(&point.at, "", "", &point.sums);
            }
        }
    }
    let mut response = out.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    response
}

/// Query of `GET /v0/usage/requests`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RequestParams {
    /// Most records (default 100, at most 1,000).
    limit: Option<u32>,
    /// Only records older than the record with this id (the next page).
    before: Option<i64>,
    from: Option<String>,
    to: Option<String>,
    principal: Option<String>,
    model: Option<String>,
    node: Option<Uuid>,
}

/// One request as recorded.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequestView {
    id: i64,
    at: String,
    principal: String,
    principal_name: String,
    model: String,
    node: Option<Uuid>,
    status: u16,
    /// `null` when the runtime reported no usage.
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// Time to the first byte of a streamed answer.
    ttft_ms: Option<u32>,
    duration_ms: u32,
    retries: u8,
    stream: bool,
}

impl From<RecordedRequest> for RequestView {
    fn from(recorded: RecordedRequest) -> Self {
        let RecordedRequest { id, record: r } = recorded;
        RequestView {
            id,
            at: rfc3339(r.at),
            principal: r.principal.to_string(),
            principal_name: r.principal_name.to_string(),
            model: r.model.to_string(),
            node: r.node,
            status: r.status,
            prompt_tokens: r.tokens.map(|t| t.prompt),
            completion_tokens: r.tokens.map(|t| t.completion),
            ttft_ms: r.ttft_ms,
            duration_ms: r.duration_ms,
            retries: r.retries,
            stream: r.stream,
        }
    }
}

/// Each `/v1` request as recorded, newest first, paged (admin)
///
/// Kept `--request-log-days`. A full page carries `Link: <…>; rel="next"`.
#[utoipa::path(get, path = "/v0/usage/requests", tag = "usage", security(("bearer" = [])), params(RequestParams),
    responses(
        (status = 200, description = "A page of records, newest first", body = Vec<RequestView>),
        (status = 400, description = "A parameter out of range; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn requests(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): ApiQuery<RequestParams>,
) -> ApiResult<Response> {
    let limit = paging::limit(params.limit, params.before, 100, 1000)?;
    let query = RequestQuery {
        limit,
        before: params.before,
        from: params.from.as_deref().map(|t| parse_time("from", t)).transpose()?,
        to: params.to.as_deref().map(|t| parse_time("to", t)).transpose()?,
        principal: params.principal.clone(),
        model: params.model.clone(),
        node: params.node,
    };
    let page: Vec<RequestView> = state.store.usage_requests(&query).await?.into_iter().map(RequestView::from).collect();
    let filters: Vec<(&str, String)> = [
        ("from", params.from),
        ("to", params.to),
        ("principal", params.principal),
        ("model", params.model),
        ("node", params.node.map(|n| n.to_string())),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name, value?)))
    .collect();
    Ok(paging::answer(
        page,
        limit,
        |r| r.id,
        |last| {
            let mut query = serde_urlencoded::to_string(&filters).unwrap_or_default();
            if !query.is_empty() {
                query.push('&');
            }
            format!("/v0/usage/requests?{query}limit={limit}&before={last}")
        },
    ))
}

/// One minute of the fleet's last hour.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LiveMinute {
    at: String,
    requests: u64,
    errors: u64,
    tokens: u64,
    /// Time to first token of the minute's streamed requests (percentiles, as the top of a bin 25 % wide; `null`
    /// without any).
    ttft_p50_ms: Option<u32>,
    ttft_p99_ms: Option<u32>,
}

/// The fleet's last hour (viewer): per minute, requests, errors, tokens and time to first token
#[utoipa::path(get, path = "/v0/usage/live", tag = "usage", security(("bearer" = [])),
    responses(
        (status = 200, description = "The last 60 minutes, oldest first", body = Vec<LiveMinute>),
        (status = 401, description = "No valid credential", body = ErrorBody)
    ))]
pub async fn live(State(state): State<AppState>, _viewer: Viewer) -> ApiResult<Json<Vec<LiveMinute>>> {
    let now = state.clock.now_ms();
    let to = Step::Minute.floor(now) + 60_000;
    let from = to - 60 * 60_000;
    let query = SeriesQuery { from, to, step: Step::Minute, group_by: None, principal: None, model: None };
    let sums: HashMap<Millis, UsageSums> =
        state.store.usage_series(&query).await?.into_iter().map(|b| (b.at, b.sums)).collect();
    let mut bins: HashMap<Millis, Vec<(u32, u64)>> = HashMap::new();
    for (at, bin, n) in state.store.first_token_bins(from, to).await? {
        bins.entry(at).or_default().push((bin, n));
    }
    let minutes = (0..60)
        .map(|i| {
            let at = from + i * 60_000;
            let s = sums.get(&at).copied().unwrap_or_default();
            let bins = bins.remove(&at).unwrap_or_default();
            LiveMinute {
                at: rfc3339(at),
                requests: s.requests,
                errors: s.errors,
                tokens: s.tokens(),
                ttft_p50_ms: percentile(&bins, 0.5),
                ttft_p99_ms: percentile(&bins, 0.99),
            }
        })
        .collect();
    Ok(Json(minutes))
}

/// The `q` quantile of times counted in bins (in bin order): the top of the bin it falls in, so within 25 % above
/// the time itself; `None` without any.
fn percentile(bins: &[(u32, u64)], q: f64) -> Option<u32> {
    let total: u64 = bins.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (bin, n) in bins {
        seen += n;
        if seen >= rank {
            return Some(ttft_bin_top(*bin));
        }
    }
    bins.last().map(|(bin, _)| ttft_bin_top(*bin))
}
