// Live refresh: the router is polled every REFRESH_MS for the rows on screen, the summary, the fleet's banner and
// the open node; answers that a newer one or a change made here overtook are dropped. Relative times move on once a
// second without a request.

import { $, setText, setTitle, toggleClass } from './dom.js';
import { formatAgo } from './format.js';
import { api, ApiError, clockSkew, Unreachable } from './api.js';
import { detailNode, REFRESH_MS, state } from './state.js';
import { setBanner, toast } from './feedback.js';
import { showSignin } from './session.js';
import { showSilence } from './fleet-events.js';
import { render, visibleRange } from './table.js';
import { updateSeen } from './rows.js';
import { closeDetail, renderOverview } from './detail.js';

/** Most rows in one request (the router's limit). */
const MAX_PAGE = 1000;

export function schedule(session) {
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    if (session !== state.session) return;
    if (!document.hidden) await refresh();
    if (session === state.session) schedule(session);
  }, REFRESH_MS);
}

document.addEventListener('visibilitychange', () => {
  if (!document.hidden && state.user) refresh();
});

/** The timer's refresh: the rows on screen, the summary and the open node. One at a time; a refresh asked for by
 * the operator (a search, a scroll) does not wait for it. */
export async function refresh() {
  if (state.inflight) return state.inflight;
  state.inflight = load();
  try {
    await state.inflight;
  } finally {
    state.inflight = null;
  }
}

/** What the table shows: a change of any of these is another list. */
export function queryKey() {
  return JSON.stringify([state.filter, state.search.trim(), state.sort]);
}

function pageUrl(offset, limit, since) {
  const params = new URLSearchParams({ sort: state.sort, offset: String(offset), limit: String(limit) });
  if (state.filter !== 'all') params.set('status', state.filter);
  const search = state.search.trim();
  if (search) params.set('q', search);
  if (since !== null) params.set('changed_since', String(since));
  return `/v0/nodes?${params}`;
}

/** What to ask the router for: the rows on screen and a screenful either side. */
function wantedRange() {
  const { first, last } = visibleRange();
  const span = last - first;
  const from = Math.max(0, first - span);
  return { from, limit: Math.min(MAX_PAGE, span * 3) };
}

/** One page of rows: only what changed since the page shown, when the same page is asked again; the whole page
 * when something on it is not known here (a node that moved into it) or the router cannot answer the changes. */
async function fetchPage(from, limit, since) {
  if (since !== null) {
    try {
      const page = await api('GET', pageUrl(from, limit, since));
      const sent = new Set(page.nodes.map((node) => node.id));
      if (page.ids.every((id) => sent.has(id) || state.nodes.has(id))) return { ...page, delta: true };
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 410)) throw err;
    }
  }
  return { ...(await api('GET', pageUrl(from, limit, null))), delta: false };
}

/** The open node and, when it changed, its history; `node` null when it is gone. */
async function fetchDetail() {
  const id = state.detailId;
  if (!id) return null;
  const node = await api('GET', `/v0/nodes/${encodeURIComponent(id)}`).catch((err) => {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  });
  const known = state.detail?.id === id && state.eventsFor === id ? state.detail.revision : null;
  const events = node && node.revision !== known
    ? await api('GET', `/v0/nodes/${encodeURIComponent(id)}/events`).catch((err) => {
        if (err instanceof ApiError && err.status === 404) return [];
        throw err;
      })
    : null;
  return { id, node, events };
}

/** Loads the rows on screen and, unless `rowsOnly` (a keystroke, a scroll), the summary, the fleet's banner and
 * the open node. */
export async function load({ rowsOnly = false } = {}) {
  const session = state.session;
  const mutations = state.mutations;
  const key = queryKey();
  const order = ++state.loads;
  const { from, limit } = wantedRange();
  const same = state.page.key === key && state.page.offset === from && state.page.limit === limit;
  try {
    const [page, summary, fleetEvents, detail] = await Promise.all([
      fetchPage(from, limit, same ? state.page.revision : null),
      rowsOnly ? state.summary : api('GET', '/v0/nodes/summary'),
      // A router without fleet events (or a failure here) must not keep the fleet from showing.
      rowsOnly ? null : api('GET', '/v0/fleet/events?limit=1').catch((err) => {
        if (err instanceof ApiError && err.status !== 401) return [];
        throw err;
      }),
      rowsOnly ? null : fetchDetail(),
    ]);
    // Dropped: another session, a change made here since, a newer answer shown, or another filter asked since.
    if (session !== state.session || mutations !== state.mutations || order < state.shown || key !== queryKey()) {
      return;
    }
    state.shown = order;
    state.lastOk = Date.now();
    setUnreachable(false);
    const nodes = new Map();
    for (const node of page.nodes) nodes.set(node.id, node);
    for (const id of page.ids) {
      if (!nodes.has(id) && page.delta) nodes.set(id, state.nodes.get(id));
    }
    state.nodes = nodes;
    state.page = { key, offset: from, limit, ids: page.ids, total: page.total, revision: page.revision };
    state.summary = summary;
    state.loaded = true;
    if (fleetEvents) showSilence(fleetEvents[0]);
    if (detail && detail.id === state.detailId) {
      if (!detail.node) {
        toast('The node you were looking at has been deleted.', 'info');
        closeDetail();
      } else {
        state.detail = detail.node;
        if (detail.events) {
          state.events = detail.events;
          state.eventsFor = detail.id;
        }
      }
    }
    render();
  } catch (err) {
    if (session !== state.session) return;
    if (err instanceof ApiError && err.status === 401) {
      showSignin('Your session has ended; sign in again.');
    } else if (err instanceof Unreachable) {
      setUnreachable(true);
    } else {
      setBanner(`The router answered with an error: ${err.message}`);
    }
  }
}

/** Loads the rows on screen soon, unless what is on screen is loaded already; scrolling loads once it pauses. */
export function ensureRows() {
  const { first, last } = visibleRange();
  const { offset, ids, total, key } = state.page;
  const end = Math.min(last, total);
  if (key === queryKey() && first >= offset && end <= offset + ids.length) return;
  clearTimeout(state.fetchTimer);
  state.fetchTimer = setTimeout(() => load({ rowsOnly: true }), 60);
}

function setUnreachable(on) {
  state.unreachable = on;
  toggleClass(document.body, 'is-stale', on);
  toggleClass($('live'), 'live-down', on);
  if (on) {
    setBanner(`The router cannot be reached at ${location.host}. Retrying every ${REFRESH_MS / 1000} s…`);
  } else {
    setBanner(null);
  }
  tick();
}

/** Once a second: relative times move on without a request. */
function tick() {
  if (!state.user) return;
  for (const view of state.rows.values()) updateSeen(view);
  const node = detailNode();
  if (node) renderOverview(node);
  const live = $('live-text');
  if (state.unreachable) {
    setText(live, state.lastOk ? `Offline · data from ${formatAgo(new Date(state.lastOk + clockSkew).toISOString())}` : 'Offline');
  } else {
    setText(live, 'Live');
  }
  setTitle($('live'), state.lastOk ? `Last update ${new Date(state.lastOk).toLocaleTimeString()}` : '');
}

setInterval(tick, 1000);
