// The page's state, shared by every module, and the constants more than one of them needs.

export const REFRESH_MS = 2000;
/** A row's height until the table has measured a real one (the table is windowed, SPEC §12: see table.js). */
const ROW_HEIGHT = 58;
export const NODE_HASH = /^#\/nodes\/([0-9a-fA-F-]{36})$/;

export const state = {
  user: null,
  /** Bumped on sign-in and sign-out: a refresh loop of an earlier session stops. */
  session: 0,
  /** The rows the router sent for the current filter, search and sort: `ids` in order from position `offset`
   * (`limit` asked), `total` matching, and the `revision` to ask what changed since. */
  page: emptyPage(),
  /** id -> node, for the ids of `page` only. */
  nodes: new Map(),
  /** GET /v0/nodes/summary: the whole fleet's counts. */
  summary: null,
  loaded: false,
  filter: 'all',
  search: '',
  sort: 'status',
  /** id -> row view (see createRow), for the rows in the page now. */
  rows: new Map(),
  rowHeight: ROW_HEIGHT,
  detailId: null,
  /** The open node as GET /v0/nodes/{id} last answered. */
  detail: null,
  events: [],
  eventsFor: null,
  /** Bumped by every change made here: a list fetched before it is stale and dropped. */
  mutations: 0,
  /** Loads of the table are numbered; an answer older than one already shown is dropped. */
  loads: 0,
  shown: 0,
  inflight: null,
  timer: null,
  fetchTimer: null,
  scrollFrame: 0,
  /** A load for another filter, search or order is under way; `requeryAgain`: another was asked for meanwhile. */
  requerying: false,
  requeryAgain: false,
  lastOk: 0,
  unreachable: false,
  /** The mass silence that lasts (GET /v0/fleet/events), or null. */
  silence: null,
};

export function emptyPage() {
  return { key: null, offset: 0, limit: 0, ids: [], total: 0, revision: null };
}

export const isAdmin = () => state.user?.role === 'admin';

/** A node shown here: on a row of the table or in the detail view. */
export function nodeById(id) {
  return state.nodes.get(id) ?? (state.detail?.id === id ? state.detail : null);
}

/** The open node as last heard of: from its own request or from the table's, whichever is newer. */
export function detailNode() {
  const id = state.detailId;
  if (!id) return null;
  const own = state.detail?.id === id ? state.detail : null;
  const row = state.nodes.get(id);
  if (!own) return row ?? null;
  return row && row.revision > own.revision ? row : own;
}
