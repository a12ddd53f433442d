//! The fleet as a client asks for it at scale (SPEC §12): filtered, searched, sorted and paged in memory, what
//! changed since a revision (deletions included), and the summary of the whole fleet.
//!
//! Cost: one pass over the fleet with a short per-node lock to filter and take each match's sort key; the page is
//! then selected in linear time (`select_nth_unstable`) and only its nodes are sorted and shown. 100,000 nodes take
//! milliseconds, and nothing here holds a lock shared by all nodes while a view is built.

use std::sync::Arc;

use llm_router_protocol::NodeStatus;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::index::{Slot, SlotState};
use super::{Registry, RegistryResult};
use crate::model::node::Node;

pub use super::search::NameKey;

/// Which nodes, in which order, which part.
#[derive(Debug, Clone, Default)]
pub struct NodeQuery {
    pub status: Option<NodeStatus>,
    /// Search words, lower case: a node matches when each is part of one of its names, address, id, tags or models.
    pub words: Vec<String>,
    /// Tags the node must all carry.
    pub tags: Vec<String>,
    pub sort: Sort,
    pub page: Page,
    /// Only the nodes changed after this revision (and the deletions after it).
    pub changed_since: Option<i64>,
}

/// An order of nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

/// What nodes are ordered by; ties are broken by id, so every order is total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    /// Oldest registration first.
    #[default]
    Registered,
    /// Display name, or machine name, case-insensitively, digits as numbers (`gpu-2` before `gpu-10`).
    Name,
    /// Pending, degraded, offline, registering, online (what needs a person first); then by name.
    Status,
    /// Never seen first, then the oldest heartbeat.
    LastSeen,
    /// Fewest GPUs first.
    Gpus,
}

impl SortKey {
    pub const ALL: [SortKey; 5] =
        [SortKey::Registered, SortKey::Name, SortKey::Status, SortKey::LastSeen, SortKey::Gpus];

    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Registered => "registered",
            SortKey::Name => "name",
            SortKey::Status => "status",
            SortKey::LastSeen => "last_seen",
            SortKey::Gpus => "gpus",
        }
    }
}

impl std::str::FromStr for Sort {
    type Err = String;

    /// `name`, `-name` (descending), ...
    fn from_str(text: &str) -> Result<Self, String> {
        let (descending, name) = match text.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, text),
        };
        let key = SortKey::ALL.into_iter().find(|key| key.as_str() == name).ok_or_else(|| {
            let known: Vec<&str> = SortKey::ALL.iter().map(|key| key.as_str()).collect();
            format!("unknown sort `{text}`; one of {}, each reversed by a leading `-`", known.join(", "))
        })?;
        Ok(Sort { key, descending })
    }
}

/// Which part of the ordered matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Page {
    /// Every match.
    #[default]
    All,
    /// `limit` matches from position `offset`.
    Offset { offset: usize, limit: usize },
    /// `limit` matches after the node at `after` (keyset paging).
    After { after: Position, limit: usize },
}

/// Where a node stands in an order: its sort key and id. A cursor is one, as the previous page's last node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Registered(i64, Uuid),
    Name(NameKey, Uuid),
    Status(u8, NameKey, Uuid),
    LastSeen(Option<i64>, Uuid),
    Gpus(i64, Uuid),
}

impl Position {
    /// The sort this position belongs to.
    pub fn key(&self) -> SortKey {
        match self {
            Position::Registered(..) => SortKey::Registered,
            Position::Name(..) => SortKey::Name,
            Position::Status(..) => SortKey::Status,
            Position::LastSeen(..) => SortKey::LastSeen,
            Position::Gpus(..) => SortKey::Gpus,
        }
    }

    fn of(key: SortKey, state: &SlotState) -> Position {
        let node = &state.node;
        let name = || state.search.sort_name.clone();
        match key {
            SortKey::Registered => Position::Registered(node.registered_at, node.id),
            SortKey::Name => Position::Name(name(), node.id),
            SortKey::Status => Position::Status(status_rank(node.status), name(), node.id),
            SortKey::LastSeen => Position::LastSeen(node.last_seen_at, node.id),
            SortKey::Gpus => Position::Gpus(gpu_count(node), node.id),
        }
    }
}

/// Where a status stands in the `status` order: what needs a person first.
fn status_rank(status: NodeStatus) -> u8 {
    match status {
        NodeStatus::Pending => 0,
        NodeStatus::Degraded => 1,
        NodeStatus::Offline => 2,
        NodeStatus::Registering => 3,
        NodeStatus::Online => 4,
    }
}

/// The GPUs a node registered.
pub fn gpu_count(node: &Node) -> i64 {
    node.gpu_devices.iter().map(|device| device.count).sum()
}

/// Whether `word` could be part of a node id: hexadecimal digits and hyphens only.
fn may_be_in_an_id(word: &str) -> bool {
    word.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl NodeQuery {
    fn matches(&self, state: &SlotState) -> bool {
        let node = &state.node;
        if self.status.is_some_and(|status| status != node.status) {
            return false;
        }
        if !self.tags.iter().all(|tag| node.tags.contains(tag)) {
            return false;
        }
        self.words.iter().all(|word| {
            let mut id = uuid::Uuid::encode_buffer();
            state.search.text.contains(word.as_str())
                || may_be_in_an_id(word) && node.id.hyphenated().encode_lower(&mut id).contains(word.as_str())
        })
    }
}

/// One answer to a [`NodeQuery`].
#[derive(Debug)]
pub struct NodePage<T> {
    /// The page's nodes, in order, as `view` showed them; with `changed_since`, only those changed since.
    pub nodes: Vec<T>,
    /// The ids of the whole page, in order.
    pub ids: Vec<Uuid>,
    /// Nodes matching the filter, on every page.
    pub total: usize,
    /// The last node's position when more matches follow the page.
    pub next: Option<Position>,
    /// The fleet's revision as of this answer: what to ask `changed_since` next time.
    pub revision: i64,
    /// With `changed_since`: the nodes deleted since.
    pub deleted: Vec<Uuid>,
}

/// Counts of the whole fleet (SPEC §12), exact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSummary {
    pub total: usize,
    pub pending: usize,
    pub registering: usize,
    pub online: usize,
    pub degraded: usize,
    pub offline: usize,
    pub gpus: u64,
    /// GPUs of the nodes online.
    pub gpus_online: u64,
    pub cordoned: usize,
    pub revision: i64,
}

impl Registry {
    /// The nodes `query` asks for, as `view` shows each (with its revision). `RevisionExpired` when
    /// `changed_since` is older than this router remembers or newer than its revisions.
    pub fn query<T>(&self, query: &NodeQuery, view: impl Fn(&Node, i64) -> T) -> RegistryResult<NodePage<T>> {
        // Told before this answer's revision is remembered as given here; read before the pass: a change stamped
        // during it is above and is sent again next time, never lost.
        let since = query.changed_since.map(|since| self.changes.changes_after(since)).transpose()?;
        let revision = self.changes.answer_revision();
        let deleted = since.map(|since| self.changes.deleted_after(since)).unwrap_or_default();
        let mut matches: Vec<(Position, Arc<Slot>)> = self
            .read()
            .nodes
            .values()
            .filter_map(|slot| {
                let state = slot.lock();
                (!state.deleted && query.matches(&state)).then(|| (Position::of(query.sort.key, &state), slot.clone()))
            })
            .collect();
        let total = matches.len();
        let descending = query.sort.descending;
        let order = |a: &(Position, Arc<Slot>), b: &(Position, Arc<Slot>)| {
            if descending { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) }
        };
        let (start, limit) = match &query.page {
            Page::All => (0, total),
            Page::Offset { offset, limit } => ((*offset).min(total), *limit),
            Page::After { after, limit } => {
                matches.retain(|(position, _)| if descending { position < after } else { position > after });
                (0, *limit)
            }
        };
        // The page is what stands between the `start`-th and the `end`-th match in order: two selections in linear
        // time, then a sort of the page alone.
        let end = start.saturating_add(limit).min(matches.len());
        let follows = end < matches.len();
        if follows && end > 0 {
            matches.select_nth_unstable_by(end - 1, order);
            matches.truncate(end);
        }
        if start > 0 && start < matches.len() {
            matches.select_nth_unstable_by(start, order);
        }
        let mut page = matches.split_off(start.min(matches.len()));
        page.sort_unstable_by(order);
        let next = follows.then(|| page.last().map(|(position, _)| position.clone())).flatten();
        let ids = page.iter().map(|(position, _)| position_id(position)).collect();
        let nodes = page
            .iter()
            .filter_map(|(_, slot)| {
                let state = slot.lock();
                let changed = self.changed(&state);
                let wanted = !state.deleted && since.is_none_or(|since| changed > since);
                wanted.then(|| view(&state.node, changed))
            })
            .collect();
        Ok(NodePage { nodes, ids, total, next, revision, deleted })
    }

    /// One node as `view` shows it, with its revision.
    pub fn view<T>(&self, id: Uuid, view: impl FnOnce(&Node, i64) -> T) -> RegistryResult<T> {
        let slot = self.slot(id)?;
        let state = slot.lock();
        Ok(view(&state.node, self.changed(&state)))
    }

    /// Calls `f` with every node, one at a time under its own lock: keep `f` short.
    pub fn each_node(&self, mut f: impl FnMut(&Node)) {
        for slot in self.read().nodes.values() {
            let state = slot.lock();
            if !state.deleted {
                f(&state.node);
            }
        }
    }

    /// The revision of node `id` now; 0 when it is gone.
    pub fn revision_of(&self, id: Uuid) -> i64 {
        self.slot(id).map(|slot| self.changed(&slot.lock())).unwrap_or(0)
    }

    /// The whole fleet's counts.
    pub fn summary(&self) -> FleetSummary {
        let mut summary = FleetSummary { revision: self.changes.answer_revision(), ..FleetSummary::default() };
        for slot in self.read().nodes.values() {
            let state = slot.lock();
            let node = &state.node;
            let gpus = u64::try_from(gpu_count(node)).unwrap_or(0);
            summary.total += 1;
            summary.gpus += gpus;
            summary.cordoned += usize::from(node.cordoned);
            match node.status {
                NodeStatus::Pending => summary.pending += 1,
                NodeStatus::Registering => summary.registering += 1,
                NodeStatus::Online => {
                    summary.online += 1;
                    summary.gpus_online += gpus;
                }
                NodeStatus::Degraded => summary.degraded += 1,
                NodeStatus::Offline => summary.offline += 1,
            }
        }
        summary
    }

    /// A node's revision: the latest change of its state or of its routing figures.
    fn changed(&self, state: &SlotState) -> i64 {
        let routed = self.routing.figures(state.node.id, 0).map_or(0, |figures| figures.changed);
        state.changed.max(routed)
    }
}

fn position_id(position: &Position) -> Uuid {
    match position {
        Position::Registered(_, id)
        | Position::Name(_, id)
        | Position::Status(_, _, id)
        | Position::LastSeen(_, id)
        | Position::Gpus(_, id) => *id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_parse_with_their_direction() {
        assert_eq!("-last_seen".parse::<Sort>(), Ok(Sort { key: SortKey::LastSeen, descending: true }));
        assert_eq!("name".parse::<Sort>(), Ok(Sort { key: SortKey::Name, descending: false }));
        assert!("--name".parse::<Sort>().is_err());
        assert!("size".parse::<Sort>().expect_err("unknown").contains("last_seen"));
    }

    #[test]
    fn only_hexadecimal_digits_and_hyphens_may_be_in_an_id() {
        assert!(may_be_in_an_id("0f3c-9a") && !may_be_in_an_id("gpu"));
    }
}
