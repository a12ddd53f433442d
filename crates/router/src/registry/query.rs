//! The fleet as a client asks for it at scale (SPEC §12): filtered, searched, sorted and paged in memory, what
//! changed since a revision (deletions included), and the summary of the whole fleet.
//!
//! Cost: one pass over the fleet with a short per-node lock to filter and take each match's sort key; the page is
//! then selected in linear time (`select_nth_unstable`) and only its nodes are sorted and shown. 100,000 nodes take
//! milliseconds, and nothing here holds a lock shared by all nodes while a view is built.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use llm_router_protocol::NodeStatus;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::index::{Slot, SlotState};
use super::{Registry, RegistryError, RegistryResult};
use crate::model::node::Node;

/// Deletions remembered for `changed_since`; a client asking from before the oldest one forgotten lists again.
const DELETIONS_KEPT: usize = 10_000;

/// How much earlier than asked a router that shares its database answers a `changed_since` it did not give itself
/// (three seconds of revisions): a change another router made reaches this one within a second or two (SPEC §11)
/// and is stamped on arrival, so a client whose requests go to the routers in turn is sent such a change twice
/// rather than never.
const SHARED_LAG_REVISIONS: i64 = 3_000_000;

/// Revisions this router answered with lately, remembered to tell its own from another router's.
const ISSUED_KEPT: usize = 16_384;

/// The nodes deleted lately, with their revisions, and the revisions this router gave out.
#[derive(Debug)]
pub(crate) struct Deletions {
    recent: VecDeque<(i64, Uuid)>,
    /// The oldest revision `changed_since` may name: the router's start, or the latest deletion forgotten.
    horizon: i64,
    issued: HashSet<i64>,
    issued_order: VecDeque<i64>,
}

impl Deletions {
    pub(crate) fn since(horizon: i64) -> Self {
        Deletions { recent: VecDeque::new(), horizon, issued: HashSet::new(), issued_order: VecDeque::new() }
    }

    fn issue(&mut self, revision: i64) {
        if self.issued.insert(revision) {
            self.issued_order.push_back(revision);
            if self.issued_order.len() > ISSUED_KEPT
                && let Some(old) = self.issued_order.pop_front()
            {
                self.issued.remove(&old);
            }
        }
    }
}

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
        let name = || state.sort_name.clone();
        match key {
            SortKey::Registered => Position::Registered(node.registered_at, node.id),
            SortKey::Name => Position::Name(name(), node.id),
            SortKey::Status => Position::Status(status_rank(node.status), name(), node.id),
            SortKey::LastSeen => Position::LastSeen(node.last_seen_at, node.id),
            SortKey::Gpus => Position::Gpus(gpu_count(node), node.id),
        }
    }
}

/// A name as it sorts: in lower case, with its runs of digits as numbers, so that plain byte order is the natural
/// order (`gpu-2` before `gpu-10`). Shared with the node's slot, which keeps it ready (see [`sort_name`]): a pass over
/// the fleet copies no name, and compares names as bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameKey(Arc<str>);

impl Serialize for NameKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NameKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|name| NameKey(name.into()))
    }
}

/// The name a node is sorted by: its display name, or its machine name, in lower case, each run of digits written
/// as its count of significant digits, then those digits. A count below 9 is one character, `0` to `8`; from 9 on
/// it is `9` and one more character (`0` + count, at most 79), so a longer number sorts after a shorter one, and
/// numbers of one length by their digits. The counts are ASCII digits, as the digits they stand for, so a number
/// sorts against other characters as its first digit did. Leading zeros do not count: `node-007` sorts with
/// `node-7`, and the node id decides between them.
pub(super) fn sort_name(node: &Node) -> NameKey {
    let name = node.display_name.as_deref().unwrap_or(&node.machine_name);
    // The common, ASCII name is lowered as the key is built; only other names take Unicode's rules first.
    let lowered;
    let name = if name.is_ascii() {
        name
    } else {
        lowered = name.to_lowercase();
        &lowered
    };
    let bytes = name.as_bytes();
    let mut key = String::with_capacity(name.len() + 4);
    let mut at = 0;
    while at < bytes.len() {
        let digit = bytes[at].is_ascii_digit();
        let end = bytes[at..].iter().position(|b| b.is_ascii_digit() != digit).map_or(bytes.len(), |n| at + n);
        if digit {
            let digits = name[at..end].trim_start_matches('0');
            let count = digits.len().min(79) as u8;
            if count >= 9 {
                key.push('9');
            }
            key.push(char::from(b'0' + count));
            key.push_str(digits);
        } else {
            push_lower(&mut key, &name[at..end]);
        }
        at = end;
    }
    NameKey(key.into())
}

/// Appends `text` in lower case: ASCII in place, other text by Unicode's rules.
fn push_lower(out: &mut String, text: &str) {
    if text.is_ascii() {
        let start = out.len();
        out.push_str(text);
        out[start..].make_ascii_lowercase();
    } else {
        out.push_str(&text.to_lowercase());
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

/// What a search looks through for a node, in lower case, one field a line: machine and display name, address,
/// tags, ready and loaded models. Kept ready in the node's slot, so a search over the fleet is a substring search per
/// node and allocates nothing.
pub(super) fn search_text(node: &Node) -> Box<str> {
    let fields = [node.machine_name.as_str(), node.display_name.as_deref().unwrap_or(""), node.ip_address.as_str()];
    let lists = [&node.tags, &node.ready_models, &node.loaded_models].into_iter().flatten().map(String::as_str);
    let fields = || fields.into_iter().chain(lists.clone());
    // Exactly the size of ASCII text: one allocation, kept as it is.
    let mut text = String::with_capacity(fields().map(|field| field.len() + 1).sum());
    for field in fields() {
        push_lower(&mut text, field);
        text.push('\n');
    }
    text.into_boxed_str()
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
            state.search_text.contains(word.as_str())
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
        let since = query.changed_since.map(|since| self.changes_after(since)).transpose()?;
        let revision = self.answer_revision();
        let deleted = since.map(|since| self.deleted_after(since)).unwrap_or_default();
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

    /// The revision of node `id` now; 0 when it is gone.
    pub fn revision_of(&self, id: Uuid) -> i64 {
        self.slot(id).map(|slot| self.changed(&slot.lock())).unwrap_or(0)
    }

    /// The whole fleet's counts.
    pub fn summary(&self) -> FleetSummary {
        let mut summary = FleetSummary { revision: self.answer_revision(), ..FleetSummary::default() };
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

    /// The revision an answer gives the client to ask `changed_since` with next time: the newest, remembered as
    /// this router's own when the database is shared.
    fn answer_revision(&self) -> i64 {
        let now = self.revisions.now();
        if self.store.shared().is_some() {
            self.deletions.lock().unwrap_or_else(|p| p.into_inner()).issue(now);
        }
        now
    }

    /// The revision after which changes are sent to a client asking `changed_since=since`: `since` itself, or,
    /// with a shared database, [`SHARED_LAG_REVISIONS`] earlier when another router gave it. `RevisionExpired`
    /// when this router cannot tell what changed since.
    fn changes_after(&self, since: i64) -> RegistryResult<i64> {
        let newest = self.revisions.now();
        let deletions = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        let shared = self.store.shared().is_some();
        // Another router's revision may be a little ahead of this one's: their counters meet the clock once a second.
        let ahead = if shared { SHARED_LAG_REVISIONS } else { 0 };
        if since < deletions.horizon || since > newest.saturating_add(ahead) {
            return Err(RegistryError::RevisionExpired { since, oldest: deletions.horizon, newest });
        }
        if !shared || deletions.issued.contains(&since) {
            return Ok(since);
        }
        Ok((since.min(newest) - SHARED_LAG_REVISIONS).max(deletions.horizon))
    }

    /// The nodes deleted after revision `after`.
    fn deleted_after(&self, after: i64) -> Vec<Uuid> {
        let deletions = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        deletions.recent.iter().filter(|(at, _)| *at > after).map(|(_, id)| *id).collect()
    }

    /// Notes that node `id` was deleted, for `changed_since`.
    pub(super) fn note_deletion(&self, id: Uuid) {
        let mut deletions = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        deletions.recent.push_back((self.revisions.next(), id));
        while deletions.recent.len() > DELETIONS_KEPT {
            if let Some((at, _)) = deletions.recent.pop_front() {
                deletions.horizon = deletions.horizon.max(at);
            }
        }
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

    fn named(name: &str) -> Node {
        Node { machine_name: name.to_owned(), ..Node::example() }
    }

    #[test]
    fn names_sort_with_digits_as_numbers() {
        let mut names = vec![
            "gpu-10",
            "GPU-2",
            "gpu-1",
            "gpu-02b",
            "a",
            "gpu-",
            "gpu-100",
            "gpu-a",
            "gpu-9",
            "x12345678901",
            "x9999999999",
            "x0",
            "x",
            "gpu-1-2",
            "gpu-1-10",
        ];
        names.sort_by_key(|name| sort_name(&named(name)));
        let expected = [
            "a",
            "gpu-",
            "gpu-1",
            "gpu-1-2",
            "gpu-1-10",
            "GPU-2",
            "gpu-02b",
            "gpu-9",
            "gpu-10",
            "gpu-100",
            "gpu-a",
            "x",
            "x0",
            "x9999999999",
            "x12345678901",
        ];
        assert_eq!(names, expected);
        assert_eq!(sort_name(&named("node-007")), sort_name(&named("node-7")));
        let display = Node { display_name: Some("Über 3".to_owned()), ..named("z") };
        assert_eq!(&*sort_name(&display).0, "über 13");
    }

    #[test]
    fn sorts_parse_with_their_direction() {
        assert_eq!("-last_seen".parse::<Sort>(), Ok(Sort { key: SortKey::LastSeen, descending: true }));
        assert_eq!("name".parse::<Sort>(), Ok(Sort { key: SortKey::Name, descending: false }));
        assert!("--name".parse::<Sort>().is_err());
        assert!("size".parse::<Sort>().expect_err("unknown").contains("last_seen"));
    }

    #[test]
    fn a_search_looks_through_names_address_tags_and_models_in_lower_case() {
        let node = Node {
            machine_name: "GPU-H100-07".to_owned(),
            display_name: Some("Rechenknoten Über".to_owned()),
            loaded_models: vec!["Qwen/Qwen2.5-72B".to_owned()],
            tags: vec!["Rack-B".to_owned()],
            ..Node::example()
        };
        let text = search_text(&node);
        for word in ["h100-07", "über", "rack-b", "qwen2.5", "10.0.0.1"] {
            assert!(text.contains(word), "{word} in {text:?}");
        }
        assert!(!text.contains("a100"));
        assert!(may_be_in_an_id("0f3c-9a") && !may_be_in_an_id("gpu"));
    }
}
