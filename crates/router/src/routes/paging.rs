//! Pages of a history, newest first (node events, the audit log): `?limit=` and `?before=<id>` in, and a `Link`
//! header naming the next page out.

use axum::Json;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{ApiResult, bad_request};

/// The checked `limit` (default `default`, at most `max`) of a page; `before` must name an id.
pub fn limit(limit: Option<u32>, before: Option<i64>, default: u32, max: u32) -> ApiResult<u32> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(bad_request(format!("`limit` must be 1 to {max}.")));
    }
    if before.is_some_and(|before| before < 1) {
        return Err(bad_request("`before` must be the id of an event (a positive integer)."));
    }
    Ok(limit)
}

/// The page as JSON; when it is full, `Link: <next(last id)>; rel="next"`.
pub fn answer<T: Serialize>(
    items: Vec<T>,
    limit: u32,
    id: impl Fn(&T) -> i64,
    next: impl Fn(i64) -> String,
) -> Response {
    let last = (items.len() == limit as usize).then(|| items.last().map(&id)).flatten();
    let mut response = Json(items).into_response();
    if let Some(last) = last
        && let Ok(link) = HeaderValue::from_str(&format!("<{}>; rel=\"next\"", next(last)))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}
