//! `GET /v0/nodes` and `GET /v0/nodes/summary`: the fleet as a dashboard or a script asks for it at any size
//! (SPEC §12). Filters, search and sort run in the router's memory; pages come by position (`offset`, for a
//! windowed table) or after a cursor (`cursor`, stable while nodes come and go); `changed_since` sends only what
//! changed since an earlier answer.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use llm_router_protocol::{ErrorBody, NodeStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::views::NodeView;
use crate::error::{ApiResult, bad_request};
use crate::registry::query::{FleetSummary, NodeQuery, Page, Position, Sort};
use crate::routes::extract::Viewer;
use crate::state::AppState;

/// Most nodes in one page.
pub const MAX_PAGE: usize = 1000;
/// Nodes in a page when `offset` or `cursor` is given without `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// Longest search text, in characters.
pub const MAX_SEARCH_CHARS: usize = 256;
/// Most `tag` parameters in one query.
pub const MAX_TAGS: usize = 16;

/// The answer of `GET /v0/nodes`: the array of nodes, or, when a page or the changes were asked for, the envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum NodeList {
    /// Without `limit`, `offset`, `cursor` and `changed_since`: every matching node, in order.
    All(Vec<NodeView>),
    /// With any of them: a page.
    Page(NodePage),
}

/// A page of nodes (SPEC §12).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodePage {
    /// The page's nodes, in order; with `changed_since`, only those whose `revision` is above it.
    pub nodes: Vec<NodeView>,
    /// Only when paged (`limit`, `offset` or `cursor`): the ids of the whole page, in order, the unchanged ones
    /// left out of `nodes` included. A client holding the page learns its order and membership from these alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<Uuid>>,
    /// Nodes matching the filter and search, on all pages.
    pub total: usize,
    /// The fleet's revision as of this answer: the `changed_since` of the next question.
    pub revision: i64,
    /// Pass as `cursor` for the page after this one (same filter and sort); `null` on the last page.
    pub next_cursor: Option<String>,
    /// With `changed_since`: the ids of the nodes deleted since, whatever the filter; otherwise empty.
    pub deleted: Vec<Uuid>,
}

/// Counts of the whole fleet (SPEC §12), exact whatever a page shows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FleetSummaryView {
    pub total: usize,
    pub by_status: StatusCounts,
    /// Nodes waiting for an administrator's approval (the same as `by_status.pending`).
    pub pending: usize,
    pub gpus: GpuCounts,
    /// Nodes an administrator cordoned.
    pub cordoned: usize,
    /// The fleet's revision as of this answer.
    pub revision: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusCounts {
    pub pending: usize,
    pub registering: usize,
    pub online: usize,
    pub degraded: usize,
    pub offline: usize,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GpuCounts {
    /// GPUs the nodes registered.
    pub total: u64,
    /// GPUs of the nodes `online`.
    pub online: u64,
}

impl From<FleetSummary> for FleetSummaryView {
    fn from(s: FleetSummary) -> Self {
        FleetSummaryView {
            total: s.total,
            by_status: StatusCounts {
                pending: s.pending,
                registering: s.registering,
                online: s.online,
                degraded: s.degraded,
                offline: s.offline,
            },
            pending: s.pending,
            gpus: GpuCounts { total: s.gpus, online: s.gpus_online },
            cordoned: s.cordoned,
            revision: s.revision,
        }
    }
}

/// A cursor: the sort it was made for and the last node's place in it. Sent as hexadecimal JSON, so it is opaque
/// to clients and safe in a query string.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    sort: String,
    after: Position,
}

fn encode_cursor(sort: &str, after: Position) -> String {
    let json = serde_json::to_vec(&Cursor { sort: sort.to_owned(), after }).unwrap_or_default();
    hex::encode(json)
}

/// What the query string asked for, checked.
struct Asked {
    query: NodeQuery,
    /// The sort as named, to make and check cursors.
    sort: String,
    /// Whether the answer is the envelope.
    envelope: bool,
    paged: bool,
}

/// Reads `GET /v0/nodes`' query string: 400 with the parameter named for anything out of place.
fn asked(raw: Option<&str>) -> ApiResult<Asked> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|err| bad_request(format!("Bad query string: {err}.")))?;
    let mut query = NodeQuery::default();
    let mut sort = None;
    let (mut search, mut limit, mut offset, mut cursor) = (None, None, None, None);
    let once = |slot: &mut Option<String>, name: &str, value: String| {
        if slot.replace(value).is_some() {
            return Err(bad_request(format!("`{name}` is given twice.")));
        }
        Ok(())
    };
    let mut status = None;
    let mut changed_since = None;
    for (name, value) in pairs {
        match name.as_str() {
            "status" => once(&mut status, "status", value)?,
            "q" => once(&mut search, "q", value)?,
            "sort" => once(&mut sort, "sort", value)?,
            "limit" => once(&mut limit, "limit", value)?,
            "offset" => once(&mut offset, "offset", value)?,
            "cursor" => once(&mut cursor, "cursor", value)?,
            "changed_since" => once(&mut changed_since, "changed_since", value)?,
            "tag" => {
                if query.tags.len() == MAX_TAGS {
                    return Err(bad_request(format!("At most {MAX_TAGS} `tag` parameters.")));
                }
                query.tags.push(value);
            }
            // Unknown parameters are ignored, as everywhere in the API.
            _ => {}
        }
    }
    query.status =
        status.map(|s| s.parse::<NodeStatus>()).transpose().map_err(|err| bad_request(format!("`status`: {err}.")))?;
    if let Some(search) = search {
        if search.chars().count() > MAX_SEARCH_CHARS {
            return Err(bad_request(format!("`q` is longer than {MAX_SEARCH_CHARS} characters.")));
        }
        query.words = search.split_whitespace().map(str::to_lowercase).collect();
    }
    let sort_name = sort.unwrap_or_else(|| "registered".to_owned());
    query.sort = sort_name.parse::<Sort>().map_err(|err| bad_request(format!("`sort`: {err}.")))?;
    let number = |name: &str, value: Option<String>, max: u64| -> ApiResult<Option<u64>> {
        value
            .map(|v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| bad_request(format!("`{name}` must be a whole number from 0 to {max}.")))
            })
            .transpose()
    };
    let limit = number("limit", limit, MAX_PAGE as u64)?;
    if limit == Some(0) {
        return Err(bad_request(format!("`limit` must be 1 to {MAX_PAGE}.")));
    }
    let offset = number("offset", offset, u32::MAX as u64)?;
    query.changed_since = number("changed_since", changed_since, i64::MAX as u64)?.map(|n| n as i64);
    let paged = limit.is_some() || offset.is_some() || cursor.is_some();
    let limit = limit.map_or(DEFAULT_PAGE, |n| n as usize);
    query.page = match (offset, cursor) {
        (Some(_), Some(_)) => return Err(bad_request("Give `offset` or `cursor`, not both.")),
        (None, Some(cursor)) => {
            let invalid =
                || bad_request("`cursor` is not one this router gave; use `next_cursor` of the previous page.");
            let bytes = hex::decode(cursor.as_bytes()).map_err(|_| invalid())?;
            let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
            if cursor.sort != sort_name || cursor.after.key() != query.sort.key {
                return Err(bad_request(format!(
                    "`cursor` was made for `sort={}`; give the same sort, or start again without a cursor.",
                    cursor.sort
                )));
            }
            Page::After { after: cursor.after, limit }
        }
        (Some(offset), None) => Page::Offset { offset: offset as usize, limit },
        (None, None) if paged => Page::Offset { offset: 0, limit },
        (None, None) => Page::All,
    };
    let envelope = paged || query.changed_since.is_some();
    Ok(Asked { query, sort: sort_name, envelope, paged })
}

/// List nodes: filter, search, sort, pages and changes
///
/// Without parameters, every node, oldest registration first, as an array. `status`, `q`, `tag` and `sort` filter
/// and order the array. With `limit`, `offset`, `cursor` or `changed_since`, the answer is a page (an object, see
/// `NodePage`). A windowed view asks `offset` and `limit` for the rows on screen, and every few seconds the same
/// with `changed_since` (the previous answer's `revision`): only the rows that changed come back, with the page's
/// `ids` in order.
#[utoipa::path(get, path = "/v0/nodes", tag = "nodes", security(("bearer" = [])),
    params(
        ("status" = Option<NodeStatus>, Query, description = "Only nodes of this status"),
        ("q" = Option<String>, Query, max_length = 256, description = "Search: every word (case-insensitive) is part of the node's machine or display name, address, id, a tag or a model"),
        ("tag" = Option<Vec<String>>, Query, explode = true, description = "Only nodes with this tag; repeat for several (all must match)"),
        ("sort" = Option<String>, Query, description = "`registered` (default), `name` (natural order), `status` (pending, degraded, offline, registering, online), `last_seen` or `gpus`; a leading `-` reverses"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Nodes per page; asks for a page (default 100 when `offset` or `cursor` is given)"),
        ("offset" = Option<u32>, Query, description = "Skip this many matching nodes (positional paging)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page, with the same `sort`"),
        ("changed_since" = Option<i64>, Query, minimum = 0, description = "A `revision` of an earlier answer: only nodes changed since, and the nodes deleted since")
    ),
    responses(
        (status = 200, description = "The nodes: an array, or a page when `limit`, `offset`, `cursor` or `changed_since` is given", body = NodeList),
        (status = 400, description = "A parameter out of place; the message names it", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody),
        (status = 410, description = "`changed_since` is older than the router remembers (it restarted, or many nodes were deleted since) or newer than its revisions (`revision_expired`): list again without it", body = ErrorBody)
    ))]
pub async fn list(State(state): State<AppState>, _viewer: Viewer, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let asked = asked(raw.as_deref())?;
    let (routing, now) = (state.registry.routing(), state.clock.now_ms());
    let page = state.registry.query(&asked.query, |node, revision| NodeView::new(node, revision, routing, now))?;
    if !asked.envelope {
        return Ok(Json(page.nodes).into_response());
    }
    Ok(Json(NodePage {
        nodes: page.nodes,
        ids: asked.paged.then_some(page.ids),
        total: page.total,
        revision: page.revision,
        next_cursor: page.next.map(|after| encode_cursor(&asked.sort, after)),
        deleted: page.deleted,
    })
    .into_response())
}

/// Counts of the whole fleet: by status, GPUs, pending
#[utoipa::path(get, path = "/v0/nodes/summary", tag = "nodes", security(("bearer" = [])),
    responses(
        (status = 200, description = "The fleet's counts, exact", body = FleetSummaryView),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential's role may not do this", body = ErrorBody)
    ))]
pub async fn summary(State(state): State<AppState>, _viewer: Viewer) -> Json<FleetSummaryView> {
    Json(state.registry.summary().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::query::SortKey;

    #[test]
    fn query_strings_are_read_strictly() {
        let full = asked_ok(Some("q=GPU%20h100&tag=a&tag=b&sort=-name&limit=5&offset=10"));
        assert_eq!(full.query.words, ["gpu", "h100"]);
        assert_eq!(full.query.tags, ["a", "b"]);
        assert_eq!(full.query.sort, Sort { key: SortKey::Name, descending: true });
        assert_eq!(full.query.page, Page::Offset { offset: 10, limit: 5 });
        assert!(full.envelope && full.paged);

        let bare = asked_ok(None);
        assert!(!bare.envelope && bare.query.page == Page::All);
        assert!(asked_ok(Some("changed_since=5")).envelope);
        assert!(!asked_ok(Some("changed_since=5")).paged);
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "offset=-1",
            "sort=size",
            "status=gone",
            "limit=1&limit=2",
            "changed_since=-3",
            "cursor=zz",
            "cursor=00&offset=1",
        ] {
            assert!(asked(Some(bad)).is_err(), "{bad} is refused");
        }
        assert!(asked(Some(&format!("q={}", "x".repeat(257)))).is_err());
    }

    #[test]
    fn a_cursor_holds_only_for_its_own_sort() {
        let after = Position::Gpus(8, Uuid::nil());
        let cursor = encode_cursor("-gpus", after.clone());
        let back = asked_ok(Some(&format!("sort=-gpus&cursor={cursor}")));
        assert_eq!(back.query.page, Page::After { after, limit: DEFAULT_PAGE });
        assert!(asked(Some(&format!("sort=gpus&cursor={cursor}"))).is_err(), "the other direction");
        assert!(asked(Some(&format!("cursor={cursor}"))).is_err(), "the default sort");
    }

    fn asked_ok(raw: Option<&str>) -> Asked {
        asked(raw).unwrap_or_else(|err| panic!("{raw:?}: {err}"))
    }
}
