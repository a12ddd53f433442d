// llm-router dashboard: sign in, watch the fleet, approve pending nodes (SPEC §6).
//
// Plain ES module, no framework, no build step. Two rules hold everywhere in this file:
// - Every string that comes from the router (node names, notes, tags, models, messages) reaches the page as text:
//   through textContent, Element.append(string) or a property such as title. Markup is never parsed from data.
// - The credential is the router's HttpOnly session cookie. The page never sees, stores or sends a token itself;
//   every request is same-origin and carries X-Requested-With, which the router demands of cookie-authenticated
//   writes.

const REFRESH_MS = 2000;
const REQUESTED_WITH = 'llm-router-dashboard';
/** The table is windowed (SPEC §12): only the rows on screen, and a few around them, are in the page. */
const ROW_HEIGHT = 58;
const OVERSCAN_ROWS = 6;
/** Most rows in one request (the router's limit). */
const MAX_PAGE = 1000;
/** Pending first (they wait for a person), then the nodes that need a look, then the healthy ones. */
const STATUS_ORDER = { pending: 0, degraded: 1, offline: 2, registering: 3, online: 4 };
const STATUSES = ['pending', 'online', 'registering', 'degraded', 'offline'];
const NODE_HASH = /^#\/nodes\/([0-9a-fA-F-]{36})$/;

const $ = (id) => document.getElementById(id);

// The edit form is taken out of the page for viewers (not merely hidden), so it is held here.
const editForm = $('edit-form');
const editName = $('edit-display-name');
const editNotes = $('edit-notes');
const editTags = $('edit-tags');
const editSave = $('edit-save');
const editReset = $('edit-reset');
const editStatus = $('edit-status');
const editHome = $('detail-labels');

// ---------------------------------------------------------------------------------------------------------------
// DOM helpers: text only.

/** Creates an element. `props` sets properties (className, title, type...) or, for aria-* and role, attributes;
 * children are elements or strings, and strings become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (key.startsWith('aria-') || key === 'role') node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/** Sets an element's text only when it changed, so a refresh does not disturb a selection or repaint. */
function setText(node, text) {
  const value = text ?? '';
  if (node.textContent !== value) node.textContent = value;
}

function setTitle(node, title) {
  const value = title ?? '';
  if (node.title !== value) node.title = value;
}

function toggleClass(node, name, on) {
  if (node.classList.contains(name) !== Boolean(on)) node.classList.toggle(name, Boolean(on));
}

/** Replaces a container's children only when `signature` differs from the last one built. */
function rebuild(container, signature, build) {
  if (container.dataset.sig === signature) return;
  container.dataset.sig = signature;
  container.replaceChildren(...[build()].flat().filter(Boolean));
}

// ---------------------------------------------------------------------------------------------------------------
// Formatting.

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value >= 100 || Number.isInteger(value) ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** `474 / 640 GiB`: both figures in the unit of the total. */
function formatUsage(used, total) {
  const [value, unit] = formatBytes(total).split(' ');
  const scale = Number(total) / Number(value);
  const usedValue = Number(used) / scale;
  const digits = usedValue >= 100 || Number.isInteger(usedValue) || usedValue === 0 ? 0 : 1;
  return `${usedValue.toFixed(digits)} / ${value} ${unit}`;
}

/** The table shows `H100 80GB HBM3`: the vendor prefix repeats on every row; the detail view keeps it. */
function shortModel(model) {
  return model.replace(/^NVIDIA\s+/i, '');
}

function formatPercent(value) {
  return value === null || value === undefined ? '–' : `${Math.round(value)}%`;
}

function formatAgo(iso) {
  if (!iso) return 'never';
  const seconds = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
  if (seconds < 3) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

function formatTime(iso) {
  return iso ? dateFormat.format(new Date(iso)) : '';
}

function nodeName(node) {
  return node.display_name || node.machine_name;
}

function address(node) {
  return node.ip_address.includes(':') ? `[${node.ip_address}]:${node.runtime_port}` : `${node.ip_address}:${node.runtime_port}`;
}

function gpuCount(node) {
  return node.gpu_devices.reduce((sum, device) => sum + device.count, 0);
}

/** The fleet-table summary of a node's heartbeat GPUs: mean utilisation and memory used / total. */
function gpuFigures(node) {
  const gpus = node.metrics?.gpus ?? [];
  const utils = gpus.map((g) => g.utilization).filter((u) => typeof u === 'number');
  const used = gpus.reduce((sum, g) => sum + (g.memory_used_bytes ?? 0), 0);
  const total = gpus.reduce((sum, g) => sum + (g.memory_total_bytes ?? 0), 0);
  return {
    util: utils.length ? utils.reduce((a, b) => a + b, 0) / utils.length : null,
    memory: total > 0 ? formatUsage(used, total) : '',
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The router's API.

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

class Unreachable extends Error {}

/** Offset between the router's clock and this browser's, from the Date header, so "12 s ago" is right even when
 * the operator's laptop clock is off. Differences under two seconds are the header's rounding and are ignored. */
let clockSkew = 0;

function serverNow() {
  return Date.now() + clockSkew;
}

async function api(method, path, body) {
  const init = {
    method,
    credentials: 'same-origin',
    cache: 'no-store',
    headers: { 'X-Requested-With': REQUESTED_WITH, Accept: 'application/json' },
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  let text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (err) {
    throw new Unreachable(err instanceof Error ? err.message : String(err));
  }
  const date = Date.parse(response.headers.get('Date') ?? '');
  if (!Number.isNaN(date)) {
    const skew = date - Date.now();
    clockSkew = Math.abs(skew) > 2000 ? skew : 0;
  }
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    // A proxy in front of a stopped router answers 502-504 without our JSON error body.
    if (response.status >= 502 && response.status <= 504 && !data?.error) {
      throw new Unreachable(`the gateway answered ${response.status}`);
    }
    throw new ApiError(
      response.status,
      data?.error?.code ?? `http_${response.status}`,
      data?.error?.message ?? `The router answered ${response.status} ${response.statusText}.`,
    );
  }
  return data;
}

// ---------------------------------------------------------------------------------------------------------------
// State.

const state = {
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

function emptyPage() {
  return { key: null, offset: 0, limit: 0, ids: [], total: 0, revision: null };
}

const isAdmin = () => state.user?.role === 'admin';

// ---------------------------------------------------------------------------------------------------------------
// Screens.

function show(screen) {
  $('boot').hidden = true;
  $('signin').hidden = screen !== 'signin';
  $('app').hidden = screen !== 'app';
}

function showSignin(note) {
  state.session += 1;
  state.user = null;
  clearTimeout(state.timer);
  resetFleet();
  setBanner(null);
  const noteEl = $('signin-note');
  noteEl.hidden = !note;
  setText(noteEl, note);
  $('signin-error').hidden = true;
  $('signin-password').value = '';
  show('signin');
  document.title = 'Sign in · llm-router';
  $('signin-username').focus();
}

function showApp(user) {
  state.session += 1;
  state.user = { username: user.username, role: user.role };
  resetFleet();
  setText($('user-name'), user.username);
  const role = $('user-role');
  setText(role, user.role);
  role.className = `role role-${user.role === 'admin' ? 'admin' : 'viewer'}`;
  $('readonly-note').hidden = isAdmin();
  if (isAdmin()) editHome.before(editForm);
  else editForm.remove();
  document.body.classList.toggle('is-admin', isAdmin());
  setText($('empty-command'), `LLM_ROUTER_URL=${location.origin} \\\n  LLM_NODE_RUNTIME_URL=http://127.0.0.1:8000 \\\n  llm-node`);
  show('app');
  document.title = 'llm-router';
  route();
  const session = state.session;
  const match = NODE_HASH.exec(location.hash);
  if (match) openDetail(match[1]);
  else refresh();
  schedule(session);
}

function resetFleet() {
  state.page = emptyPage();
  state.nodes = new Map();
  state.summary = null;
  state.rows = new Map();
  state.loaded = false;
  state.detailId = null;
  state.detail = null;
  state.events = [];
  state.eventsFor = null;
  state.lastOk = 0;
  state.unreachable = false;
  showSilence(null);
  $('node-rows').replaceChildren();
  setSpacer($('pad-top'), 0);
  setSpacer($('pad-bottom'), 0);
  $('detail').hidden = true;
  $('pending-callout').hidden = true;
  $('empty').hidden = true;
  $('table-wrap').hidden = false;
  const form = editForm;
  delete form.dataset.base;
  delete form.dataset.node;
}

async function boot() {
  try {
    const user = await api('GET', '/v0/auth/me');
    showApp(user);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showSignin();
    } else if (err instanceof Unreachable) {
      setBanner('The router cannot be reached. Retrying…');
      setTimeout(boot, REFRESH_MS);
    } else {
      showSignin(err.message);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sign in and out.

$('signin-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const username = $('signin-username').value.trim();
  const password = $('signin-password').value;
  const error = $('signin-error');
  if (!username || !password) {
    error.hidden = false;
    setText(error, 'Enter your username and password.');
    return;
  }
  const button = $('signin-submit');
  button.disabled = true;
  setText(button, 'Signing in…');
  try {
    // The answer also carries a bearer token for API clients; the page ignores it and keeps only the cookie.
    const { user } = await api('POST', '/v0/auth/login', { username, password });
    $('signin-password').value = '';
    showApp(user);
  } catch (err) {
    error.hidden = false;
    setText(error, err instanceof Unreachable ? 'The router cannot be reached; try again in a moment.' : err.message);
    $('signin-password').select();
  } finally {
    button.disabled = false;
    setText(button, 'Sign in');
  }
});

$('signout').addEventListener('click', async () => {
  try {
    await api('POST', '/v0/auth/logout');
  } catch (err) {
    // A session that already ended is signed out all the same.
    if (!(err instanceof ApiError && err.status === 401)) {
      toast(`Sign-out failed: ${err.message}`, 'error');
      return;
    }
  }
  history.replaceState(null, '', location.pathname);
  showSignin();
});

// ---------------------------------------------------------------------------------------------------------------
// Live refresh.

function schedule(session) {
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
async function refresh() {
  if (state.inflight) return state.inflight;
  state.inflight = load();
  try {
    await state.inflight;
  } finally {
    state.inflight = null;
  }
}

/** What the table shows: a change of any of these is another list. */
function queryKey() {
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

/** The rows on screen now: `first` to `last` (excluded), by the table's scroll position. */
function visibleRange() {
  const wrap = $('table-wrap');
  const head = $('nodes').tHead?.offsetHeight ?? 0;
  const top = Math.max(0, wrap.scrollTop - head);
  const height = wrap.clientHeight || window.innerHeight;
  const first = Math.floor(top / state.rowHeight);
  return { first, last: first + Math.ceil(height / state.rowHeight) + 1 };
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
async function load({ rowsOnly = false } = {}) {
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
function ensureRows() {
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

/** The banner of a mass silence (SPEC §10) while the latest fleet event is one that lasts. */
function showSilence(event) {
  const lasting = event && event.kind === 'mass_silence' && !event.resolved_at ? event : null;
  state.silence = lasting;
  $('fleet-banner').hidden = !lasting;
  if (lasting) {
    const at = new Date(lasting.at).toLocaleTimeString();
    setText($('fleet-banner-text'), `Mass silence: ${lasting.nodes_affected} of ${lasting.nodes_live} nodes went `
      + `offline at once at ${at}. A network or router problem is likelier than ${lasting.nodes_affected} broken machines.`);
  }
}

$('fleet-banner-dismiss').addEventListener('click', async () => {
  const silence = state.silence;
  if (!silence) return;
  try {
    await api('POST', `/v0/fleet/events/${encodeURIComponent(silence.id)}/dismiss`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) {
      toast(`Dismissing failed: ${err.message}`, 'error');
      return;
    }
  }
  state.mutations += 1;
  showSilence(null);
  load();
});

function setBanner(text) {
  const banner = $('banner');
  banner.hidden = !text;
  toggleClass(document.body, 'has-banner', Boolean(text));
  setText($('banner-text'), text);
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

// ---------------------------------------------------------------------------------------------------------------
// The fleet table.

function render() {
  renderSummary();
  renderWindow();
  const node = detailNode();
  $('detail').hidden = !node;
  if (node) renderDetail(node);
}

/** The rows on screen and a few around them; spacers above and below stand for the others, so the scroll bar is
 * the fleet's. A row not loaded yet shows as loading until its page arrives. */
function renderWindow() {
  const { offset, ids, total } = state.page;
  const { first, last } = visibleRange();
  const from = Math.max(0, Math.min(first - OVERSCAN_ROWS, total));
  const to = Math.max(from, Math.min(last + OVERSCAN_ROWS, total));
  const tbody = $('node-rows');
  const wanted = [];
  let missing = false;
  for (let i = from; i < to; i += 1) {
    const id = i >= offset && i < offset + ids.length ? ids[i - offset] : null;
    const node = id && state.nodes.get(id);
    if (node) {
      wanted.push(node);
    } else {
      wanted.push(null);
      missing = true;
    }
  }
  const keep = new Set(wanted.filter(Boolean).map((node) => node.id));
  for (const [id, view] of state.rows) {
    if (!keep.has(id)) {
      view.tr.remove();
      state.rows.delete(id);
    }
  }
  let cursor = tbody.firstElementChild;
  for (const node of wanted) {
    let tr;
    if (node) {
      let view = state.rows.get(node.id);
      if (!view) {
        view = createRow(node.id);
        state.rows.set(node.id, view);
      }
      if (view.node !== node) updateRow(view, node);
      tr = view.tr;
    } else {
      tr = cursor?.classList.contains('loading-row') ? cursor : loadingRow();
    }
    if (tr === cursor) {
      cursor = cursor.nextElementSibling;
    } else {
      tbody.insertBefore(tr, cursor);
    }
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }
  setSpacer($('pad-top'), from * state.rowHeight);
  setSpacer($('pad-bottom'), (total - to) * state.rowHeight);
  measureRows();

  const empty = state.loaded && state.summary?.total === 0;
  $('empty').hidden = !empty;
  $('table-wrap').hidden = empty;
  $('no-match').hidden = empty || !state.loaded || total > 0 || state.page.key !== queryKey();
  if (missing) ensureRows();
}

function loadingRow() {
  const cell = el('td', { colSpan: 12 }, el('span', { className: 'loading-bar' }));
  cell.style.height = `${state.rowHeight}px`;
  return el('tr', { className: 'loading-row', 'aria-hidden': 'true' }, cell);
}

function setSpacer(tbody, height) {
  let cell = tbody.firstElementChild?.firstElementChild;
  if (!cell) {
    cell = el('td', { colSpan: 12 });
    tbody.replaceChildren(el('tr', {}, cell));
  }
  const value = `${Math.max(0, Math.round(height))}px`;
  if (cell.style.height !== value) cell.style.height = value;
}

/** Takes the height rows really have (fonts differ) for the spacers, once it settles. */
function measureRows() {
  const row = $('node-rows').querySelector('tr.node-row');
  if (!row) return;
  const height = row.getBoundingClientRect().height;
  if (height > 0 && Math.abs(height - state.rowHeight) > 0.5) {
    state.rowHeight = height;
    requestAnimationFrame(renderWindow);
  }
}

$('table-wrap').addEventListener('scroll', () => {
  if (state.scrollFrame) return;
  state.scrollFrame = requestAnimationFrame(() => {
    state.scrollFrame = 0;
    renderWindow();
    ensureRows();
  });
}, { passive: true });

window.addEventListener('resize', () => {
  if (state.user) renderWindow();
});

function renderSummary() {
  const summary = state.summary;
  const counts = summary ? { all: summary.total, ...summary.by_status } : {};
  const pending = summary?.pending ?? 0;
  $('pending-callout').hidden = pending === 0;
  setText($('pending-count'), String(pending));
  setText($('pending-label'), pending === 1 ? 'node is' : 'nodes are');
  document.title = pending > 0 ? `(${pending}) llm-router` : 'llm-router';

  const filter = $('status-filter');
  rebuild(filter, 'buttons', () => ['all', ...STATUSES].map((status) =>
    el('button', {
      type: 'button',
      className: `seg seg-${status}`,
      dataset: { status },
      onclick: () => setFilter(status),
    }, status === 'all' ? 'All' : status[0].toUpperCase() + status.slice(1), el('span', { className: 'seg-count' }))));
  for (const button of filter.children) {
    const status = button.dataset.status;
    setText(button.querySelector('.seg-count'), String(counts[status] ?? 0));
    toggleClass(button, 'seg-zero', !counts[status]);
    button.setAttribute('aria-pressed', String(state.filter === status));
  }

  setText($('fleet-summary'), summary
    ? `${plural(summary.total, 'node', 'nodes')} · ${summary.gpus.online} of ${plural(summary.gpus.total, 'GPU', 'GPUs')} online` +
      (summary.by_status.degraded ? ` · ${summary.by_status.degraded} degraded` : '')
    : '');
}

/** Another filter, search or order: the table starts at its top, and the router is asked at once; while it is
 * asked, further keystrokes wait and go together in one request when the answer comes, so fast typing never
 * queues a request per key. */
function requery() {
  $('table-wrap').scrollTop = 0;
  renderSummary();
  if (state.requerying) {
    state.requeryAgain = true;
    return;
  }
  state.requerying = true;
  (async () => {
    try {
      do {
        state.requeryAgain = false;
        await load({ rowsOnly: true });
      } while (state.requeryAgain);
    } finally {
      state.requerying = false;
    }
  })();
}

function setFilter(status) {
  state.filter = status;
  requery();
}

$('search').addEventListener('input', (event) => {
  state.search = event.target.value;
  requery();
});

$('sort').addEventListener('change', (event) => {
  state.sort = event.target.value;
  requery();
});

$('clear-filter').addEventListener('click', () => {
  state.filter = 'all';
  state.search = '';
  $('search').value = '';
  requery();
});

$('show-pending').addEventListener('click', () => setFilter('pending'));

function meter() {
  const fill = el('span', { className: 'meter-fill' });
  const value = el('span', { className: 'meter-value' });
  const root = el('div', { className: 'meter' }, el('span', { className: 'meter-track' }, fill), value);
  return { root, fill, value };
}

function setMeter(m, percent) {
  const known = typeof percent === 'number';
  setText(m.value, formatPercent(percent));
  const width = known ? `${Math.min(100, Math.max(0, percent)).toFixed(0)}%` : '0%';
  // A CSSOM property, not a style attribute: allowed by the page's `style-src 'self'` policy.
  if (m.fill.style.width !== width) m.fill.style.width = width;
  toggleClass(m.root, 'meter-none', !known);
  toggleClass(m.root, 'meter-warm', known && percent >= 70 && percent < 90);
  toggleClass(m.root, 'meter-hot', known && percent >= 90);
}

function badge(status) {
  return el('span', { className: `badge badge-${status}` }, el('span', { className: 'badge-dot' }), status);
}

function setBadge(node, status) {
  if (node.dataset.status === status) return;
  node.dataset.status = status;
  node.className = `badge badge-${status}`;
  node.replaceChildren(el('span', { className: 'badge-dot' }), status);
}

function createRow(id) {
  const view = { id };
  view.status = el('span', { className: 'badge' });
  view.flags = el('div', { className: 'flags' });
  view.name = el('button', { type: 'button', className: 'name-link', onclick: () => openDetail(id) });
  view.nameSub = el('div', { className: 'sub' });
  view.address = el('span', { className: 'mono' });
  view.gpus = el('div', { className: 'gpus' });
  view.gpusSub = el('div', { className: 'sub' });
  view.runtime = el('div');
  view.runtimeSub = el('div', { className: 'sub' });
  view.models = el('div', { className: 'models' });
  view.cpu = meter();
  view.mem = meter();
  view.gpu = meter();
  view.gpuSub = el('div', { className: 'sub' });
  view.flight = el('span', { className: 'flight' });
  view.seen = el('span', { className: 'seen' });
  view.actions = el('div', { className: 'row-actions' });
  view.tr = el('tr', { className: 'node-row', dataset: { nodeId: id } },
    el('td', { className: 'col-status' }, view.status, view.flags),
    el('td', { className: 'col-name' }, view.name, view.nameSub),
    el('td', { className: 'col-addr' }, view.address),
    el('td', { className: 'col-gpus' }, view.gpus, view.gpusSub),
    el('td', { className: 'col-runtime' }, view.runtime, view.runtimeSub),
    el('td', { className: 'col-models' }, view.models),
    el('td', { className: 'col-num col-cpu' }, view.cpu.root),
    el('td', { className: 'col-num col-mem' }, view.mem.root),
    el('td', { className: 'col-num col-gpu' }, view.gpu.root, view.gpuSub),
    el('td', { className: 'col-num col-flight' }, view.flight),
    el('td', { className: 'col-seen' }, view.seen),
    isAdmin() ? el('td', { className: 'col-actions' }, view.actions) : null);
  view.tr.addEventListener('click', (event) => {
    if (event.target.closest('button, a, input')) return;
    openDetail(id);
  });
  return view;
}

function updateRow(view, node) {
  view.node = node;
  toggleClass(view.tr, 'is-pending', node.status === 'pending');
  toggleClass(view.tr, 'is-offline', node.status === 'offline');
  toggleClass(view.tr, 'is-selected', state.detailId === node.id);
  setBadge(view.status, node.status);
  const ejected = ejectedUntil(node);
  rebuild(view.flags, JSON.stringify([node.schedulable, ejected, node.conditions]), () => routingFlags(node, ejected));

  setText(view.name, nodeName(node));
  setTitle(view.name, `Show details of ${nodeName(node)}`);
  rebuild(view.nameSub, JSON.stringify([node.display_name ? node.machine_name : '', node.tags]), () => [
    node.display_name ? el('span', { className: 'mono machine' }, node.machine_name) : null,
    ...node.tags.map((tag) => el('span', { className: 'tag' }, tag)),
  ]);

  setText(view.address, address(node));

  const devices = node.gpu_devices;
  setText(view.gpus, devices.map((d) => `${d.count} × ${shortModel(d.model)}`).join(', '));
  setTitle(view.gpus, devices.map((d) => `${d.count} × ${d.model}`).join('\n'));
  setText(view.gpusSub, devices
    .filter((d) => d.memory_bytes)
    .map((d) => `${formatBytes(d.memory_bytes)} each`)
    .join(', '));

  setText(view.runtime, node.runtime_version);
  setTitle(view.runtime, node.runtime_version);
  setText(view.runtimeSub, node.supported_runtimes.join(', '));

  rebuild(view.models, JSON.stringify([node.ready_models, node.loaded_models.length]), () => {
    const ready = node.ready_models;
    if (ready.length === 0) {
      const loaded = node.loaded_models.length;
      return el('span', { className: 'muted' }, loaded ? `${loaded} loaded, none ready` : '–');
    }
    return [
      el('span', { className: 'model', title: ready.join('\n') }, ready[0]),
      ready.length > 1 ? el('span', { className: 'more', title: ready.slice(1).join('\n') }, `+${ready.length - 1}`) : null,
    ];
  });

  const metrics = node.metrics;
  setMeter(view.cpu, metrics?.cpu_usage);
  setMeter(view.mem, metrics?.memory_usage);
  const gpu = gpuFigures(node);
  setMeter(view.gpu, gpu.util);
  setText(view.gpuSub, gpu.memory);

  setText(view.flight, flightText(node));
  setTitle(view.flight, `${plural(node.routing.requests_total, 'request', 'requests')} through this router, ` +
    `${node.routing.failures_total} failed`);

  updateSeen(view);
  if (isAdmin()) updateActions(view.actions, node, 'row');
}

/** What each GPU condition means (SPEC §10); the node's history names the GPUs. */
const CONDITION_TITLES = {
  gpu_missing: 'A GPU the node registered is missing from its heartbeats (fallen off the bus, or removed)',
  gpu_fault: 'A GPU reports uncorrectable ECC errors or a critical XID error',
  gpu_overheat: 'A GPU is at or above the temperature limit',
};

/** The end of a running ejection from routing, or null. */
function ejectedUntil(node) {
  const until = node.routing?.ejected_until;
  return until && Date.parse(until) > serverNow() ? until : null;
}

/** Badges beside the status for what keeps a node from inference traffic: cordoned by an administrator, ejected
 * after failures. */
function routingFlags(node, ejected) {
  return [
    ...(node.conditions ?? []).map((condition) => el('span', {
      className: 'badge badge-condition',
      title: CONDITION_TITLES[condition] ?? condition,
    }, condition.replace('_', ' '))),
    node.schedulable ? null : el('span', {
      className: 'badge badge-cordoned',
      title: 'Cordoned: gets no new inference request; requests in flight finish',
    }, 'cordoned'),
    ejected ? el('span', {
      className: 'badge badge-ejected',
      title: `Ejected from routing after failures until ${formatTime(ejected)}`,
    }, 'ejected') : null,
  ];
}

/** Requests in flight, out of the node's limit when it has one. */
function flightText(node) {
  const limit = node.max_concurrency;
  return limit ? `${node.routing.in_flight} / ${limit}` : String(node.routing.in_flight);
}

function updateSeen(view) {
  const node = view.node;
  if (!node) return;
  setText(view.seen, formatAgo(node.last_seen_at));
  setTitle(view.seen, node.last_seen_at ? formatTime(node.last_seen_at) : 'No heartbeat received yet');
}

/** Approve (pending only), Cordon or Uncordon (approved nodes) and Delete buttons; rebuilt only when the node's
 * status or cordon changes, so focus stays. */
function updateActions(container, node, where) {
  rebuild(container, `${node.id}:${node.status}:${node.schedulable}`, () => [
    node.status === 'pending'
      ? el('button', {
          type: 'button',
          className: 'btn btn-primary btn-small act-approve',
          onclick: (event) => approve(node.id, event.currentTarget),
        }, 'Approve')
      : el('button', {
          type: 'button',
          className: `btn btn-small ${node.schedulable ? 'act-cordon' : 'act-uncordon'}`,
          title: node.schedulable
            ? 'Stop sending new inference requests to this node; requests in flight finish'
            : 'Send inference requests to this node again',
          onclick: (event) => cordon(node.id, node.schedulable, event.currentTarget),
        }, node.schedulable ? 'Cordon' : 'Uncordon'),
    el('button', {
      type: 'button',
      className: `btn btn-small btn-danger-ghost act-delete`,
      title: 'Delete this node and revoke its token',
      onclick: () => remove(node.id),
    }, where === 'row' ? 'Delete' : 'Delete node'),
  ]);
}

// ---------------------------------------------------------------------------------------------------------------
// Actions.

/** A node shown here: on a row of the table or in the detail view. */
function nodeById(id) {
  return state.nodes.get(id) ?? (state.detail?.id === id ? state.detail : null);
}

/** The open node as last heard of: from its own request or from the table's, whichever is newer. */
function detailNode() {
  const id = state.detailId;
  if (!id) return null;
  const own = state.detail?.id === id ? state.detail : null;
  const row = state.nodes.get(id);
  if (!own) return row ?? null;
  return row && row.revision > own.revision ? row : own;
}

async function approve(id, button) {
  const node = nodeById(id);
  if (!node) return;
  if (button) {
    button.disabled = true;
    setText(button, 'Approving…');
  }
  try {
    const updated = await api('POST', `/v0/nodes/${encodeURIComponent(id)}/approve`);
    applyNode(updated);
    toast(`Approved ${nodeName(updated)}: now ${updated.status}.`, 'success');
  } catch (err) {
    actionFailed('Approval', err);
    if (button?.isConnected) {
      button.disabled = false;
      setText(button, 'Approve');
    }
  }
  load();
}

async function cordon(id, on, button) {
  const node = nodeById(id);
  if (!node) return;
  const label = on ? 'Cordon' : 'Uncordon';
  if (button) {
    button.disabled = true;
    setText(button, on ? 'Cordoning…' : 'Uncordoning…');
  }
  try {
    const updated = await api('POST', `/v0/nodes/${encodeURIComponent(id)}/${on ? 'cordon' : 'uncordon'}`);
    applyNode(updated);
    toast(on
      ? `Cordoned ${nodeName(updated)}: no new requests; ${updated.routing.in_flight} still in flight.`
      : `Uncordoned ${nodeName(updated)}: it takes requests again.`, 'success');
  } catch (err) {
    actionFailed(label, err);
    if (button?.isConnected) {
      button.disabled = false;
      setText(button, label);
    }
  }
  load();
}

async function remove(id) {
  const node = nodeById(id);
  if (!node) return;
  const ok = await confirmDialog({
    title: `Delete ${nodeName(node)}?`,
    text: `${node.machine_name} (${address(node)}) leaves the fleet and its token stops working at once. ` +
      'If its agent is still running, it registers again and waits here as pending.',
    confirm: 'Delete node',
  });
  if (!ok) return;
  try {
    await api('DELETE', `/v0/nodes/${encodeURIComponent(id)}`);
    state.mutations += 1;
    state.nodes.delete(id);
    state.page = { ...state.page, ids: state.page.ids.filter((other) => other !== id), total: Math.max(0, state.page.total - 1) };
    if (state.detailId === id) closeDetail();
    render();
    toast(`Deleted ${nodeName(node)}.`, 'success');
  } catch (err) {
    actionFailed('Deletion', err);
  }
  load();
}

/** Puts a node the router just answered with into the page, ahead of the next refresh. */
function applyNode(node) {
  state.mutations += 1;
  if (state.nodes.has(node.id)) state.nodes.set(node.id, node);
  if (state.detailId === node.id) {
    state.detail = node;
    state.eventsFor = null;
  }
  render();
}

function actionFailed(what, err) {
  if (err instanceof ApiError && err.status === 401) {
    showSignin('Your session has ended; sign in again.');
    return;
  }
  const reason = err instanceof Unreachable ? 'the router cannot be reached.' : err.message;
  toast(`${what} failed: ${reason}`, 'error');
}

function confirmDialog({ title, text, confirm }) {
  const dialog = $('confirm');
  setText($('confirm-title'), title);
  setText($('confirm-text'), text);
  setText($('confirm-ok'), confirm);
  dialog.returnValue = '';
  dialog.showModal();
  $('confirm-cancel').focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'confirm'), { once: true });
  });
}

$('confirm-ok').addEventListener('click', () => $('confirm').close('confirm'));
$('confirm-cancel').addEventListener('click', () => $('confirm').close('cancel'));

function toast(message, kind = 'info') {
  const item = el('div', { className: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  $('toasts').append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

// ---------------------------------------------------------------------------------------------------------------
// The detail view.

/** Opens a node's detail view: at once from the table's row, or once the router answered for a node off screen
 * (a link to `#/nodes/{id}`). */
function openDetail(id) {
  const changed = state.detailId !== id;
  state.detailId = id;
  if (changed) {
    state.detail = null;
    state.events = [];
    state.eventsFor = null;
    $('detail-events').replaceChildren();
    delete $('detail-events').dataset.sig;
    delete editStatus.dataset.kind;
    setText(editStatus, '');
  }
  if (location.hash !== `#/nodes/${id}`) history.replaceState(null, '', `#/nodes/${id}`);
  render();
  if (changed) {
    $('detail-body').scrollTop = 0;
    $('detail-close').focus();
    load();
  }
}

function closeDetail() {
  const id = state.detailId;
  state.detailId = null;
  state.detail = null;
  $('detail').hidden = true;
  if (NODE_HASH.test(location.hash)) history.replaceState(null, '', location.pathname + location.search);
  const view = id && state.rows.get(id);
  if (view) toggleClass(view.tr, 'is-selected', false);
}

$('detail-close').addEventListener('click', closeDetail);

document.addEventListener('keydown', (event) => {
  if (!state.user || $('confirm').open) return;
  const typing = event.target.closest?.('input, textarea, select');
  if (event.key === 'Escape' && state.detailId && !typing) closeDetail();
  if (event.key === '/' && !typing) {
    event.preventDefault();
    $('search').focus();
  }
});

window.addEventListener('hashchange', () => {
  route();
  const match = NODE_HASH.exec(location.hash);
  if (match) openDetail(match[1]);
  else if (state.detailId) closeDetail();
});

function renderDetail(node) {
  setText($('detail-title'), nodeName(node));
  setText($('detail-sub'), node.display_name ? node.machine_name : node.id);
  setBadge($('detail-status'), node.status);
  const actions = $('detail-actions');
  actions.hidden = !isAdmin();
  if (isAdmin()) updateActions(actions, node, 'detail');
  renderOverview(node);
  renderGpus(node);
  renderModels(node);
  renderLabels(node);
  renderEvents();
}

function renderOverview(node) {
  const rows = [
    ['Machine name', node.machine_name, 'mono'],
    ['Address', address(node), 'mono'],
    ['Runtime', node.runtime_version],
    ['Supported runtimes', node.supported_runtimes.join(', ') || '–'],
    ['Registered', `${formatTime(node.registered_at)} (${formatAgo(node.registered_at)})`],
    ['Approved', node.approved_at
      ? `${formatTime(node.approved_at)}${node.approved_by ? ` by ${node.approved_by}` : ''}`
      : 'Not yet: waiting for an administrator'],
    ['Last seen', node.last_seen_at ? `${formatAgo(node.last_seen_at)} (${formatTime(node.last_seen_at)})` : 'No heartbeat yet'],
    ['CPU · memory', node.metrics
      ? `${formatPercent(node.metrics.cpu_usage)} · ${formatPercent(node.metrics.memory_usage)}`
      : '–'],
    ['Active requests', node.metrics?.active_requests ?? '–'],
    ['Routing', routingText(node)],
    ['In flight here', `${flightText(node)}${node.max_concurrency ? '' : ' (no limit)'}`],
    ['Requests here', `${node.routing.requests_total} (${node.routing.failures_total} failed)`],
    ['Joined with', node.joined_with ? `join token “${node.joined_with}”` : '–'],
    ['Node id', node.id, 'mono'],
  ];
  renderKv($('detail-overview'), rows);
}

/** Whether inference traffic goes to the node, and if not, why. */
function routingText(node) {
  const ejected = ejectedUntil(node);
  if (node.status === 'degraded') return `Degraded (${(node.conditions ?? []).join(', ')}): no requests`;
  if (!node.schedulable) return 'Cordoned: no new requests';
  if (ejected) return `Ejected after failures until ${formatTime(ejected)}`;
  if (node.status !== 'online') return `Not routed while ${node.status}`;
  return node.ready_models.length ? 'Takes requests' : 'No model ready';
}

/** A definition list whose values are updated in place (a selection in it survives the once-a-second tick). */
function renderKv(list, rows) {
  const labels = rows.map(([label]) => label).join('\n');
  if (list.dataset.labels !== labels) {
    list.dataset.labels = labels;
    list.replaceChildren(...rows.flatMap(([label, , cls]) => [el('dt', {}, label), el('dd', { className: cls ?? '' })]));
  }
  rows.forEach(([, value], i) => setText(list.children[i * 2 + 1], String(value)));
}

function renderGpus(node) {
  const gpus = node.metrics?.gpus ?? [];
  rebuild($('detail-gpus'), JSON.stringify([node.gpu_devices, gpus]), () => {
    const devices = el('ul', { className: 'device-list' }, node.gpu_devices.map((d) =>
      el('li', {}, el('strong', {}, `${d.count} ×`), ` ${d.model}`,
        d.memory_bytes ? el('span', { className: 'muted' }, ` · ${formatBytes(d.memory_bytes)} each`) : null)));
    if (gpus.length === 0) {
      return [devices, el('p', { className: 'muted small' }, 'No GPU figures yet: they arrive with the first heartbeat.')];
    }
    const table = el('table', { className: 'mini' },
      el('thead', {}, el('tr', {}, ['GPU', 'Model', 'Utilisation', 'Memory', 'Temp.'].map((h) => el('th', {}, h)))),
      el('tbody', {}, gpus.map((g) => {
        const m = meter();
        setMeter(m, g.utilization);
        return el('tr', {},
          el('td', { className: 'mono' }, `#${g.index}`),
          el('td', {}, g.model ?? '–'),
          el('td', {}, m.root),
          el('td', { className: 'num' }, g.memory_total_bytes
            ? formatUsage(g.memory_used_bytes ?? 0, g.memory_total_bytes)
            : '–'),
          el('td', { className: 'num' }, typeof g.temperature_c === 'number' ? `${Math.round(g.temperature_c)} °C` : '–'));
      })));
    return [devices, table];
  });
}

function renderModels(node) {
  rebuild($('detail-models'), JSON.stringify([node.ready_models, node.loaded_models]), () => {
    const notReady = node.loaded_models.filter((m) => !node.ready_models.includes(m));
    const list = (models, cls) => el('ul', { className: 'chips' }, models.map((m) => el('li', { className: cls }, m)));
    return [
      el('p', { className: 'label' }, `Ready (${node.ready_models.length})`),
      node.ready_models.length ? list(node.ready_models, 'model') : el('p', { className: 'muted small' }, 'None ready.'),
      notReady.length ? el('p', { className: 'label' }, `Loaded, not ready (${notReady.length})`) : null,
      notReady.length ? list(notReady, 'model model-idle') : null,
    ];
  });
}

// The edit form. An edit in progress is never overwritten by a refresh: the form is refilled from the router only
// while what it shows is still what the router last said (not dirty), and always when another node is opened.

function labelsOf(node) {
  return { display_name: node.display_name ?? '', notes: node.notes ?? '', tags: node.tags.join(', ') };
}

function formValues() {
  return { display_name: editName.value, notes: editNotes.value, tags: editTags.value };
}

function formDirty() {
  const form = editForm;
  return form.dataset.base !== undefined && form.dataset.base !== JSON.stringify(formValues());
}

function fillForm(node) {
  const values = labelsOf(node);
  const form = editForm;
  form.dataset.base = JSON.stringify(values);
  form.dataset.node = node.id;
  for (const [field, input] of [['display_name', editName], ['notes', editNotes], ['tags', editTags]]) {
    if (input.value !== values[field]) input.value = values[field];
  }
  updateFormState();
}

function updateFormState() {
  const dirty = formDirty();
  editSave.disabled = !dirty;
  editReset.hidden = !dirty;
  const status = editStatus;
  if (dirty) setText(status, 'Unsaved changes');
  else if (status.dataset.kind !== 'saved') setText(status, '');
  toggleClass(status, 'is-dirty', dirty);
}

function renderLabels(node) {
  const form = editForm;
  const labels = $('detail-labels');
  form.hidden = !isAdmin();
  labels.hidden = isAdmin();
  if (isAdmin()) {
    if (form.dataset.node !== node.id || !formDirty()) fillForm(node);
    return;
  }
  const rows = [
    ['Display name', node.display_name || '–'],
    ['Notes', node.notes || '–'],
    ['Tags', node.tags.join(', ') || '–'],
  ];
  renderKv(labels, rows.map(([label, value]) => [label, value, 'prewrap']));
}

editForm.addEventListener('input', () => {
  delete editStatus.dataset.kind;
  updateFormState();
});

editReset.addEventListener('click', () => {
  const node = detailNode();
  if (node) fillForm(node);
});

editForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const id = editForm.dataset.node;
  if (!id || !formDirty()) return;
  const values = formValues();
  const body = {
    display_name: values.display_name.trim(),
    notes: values.notes.trim(),
    tags: values.tags.split(',').map((t) => t.trim()).filter(Boolean),
  };
  const save = editSave;
  const status = editStatus;
  save.disabled = true;
  setText(status, 'Saving…');
  try {
    const updated = await api('PATCH', `/v0/nodes/${encodeURIComponent(id)}`, body);
    fillForm(updated);
    status.dataset.kind = 'saved';
    setText(status, 'Saved');
    applyNode(updated);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showSignin('Your session has ended; sign in again.');
      return;
    }
    setText(status, err instanceof Unreachable ? 'Not saved: the router cannot be reached.' : `Not saved: ${err.message}`);
    save.disabled = false;
  }
});

function renderEvents() {
  const list = $('detail-events');
  if (state.eventsFor !== state.detailId) {
    if (!list.dataset.sig) setText(list, 'Loading…');
    return;
  }
  const events = state.events;
  rebuild(list, events.map((e) => e.id).join(',') || 'none', () => {
    if (events.length === 0) return el('li', { className: 'muted small' }, 'No events recorded.');
    return events.map((event) => el('li', { className: `event event-to-${event.to}` },
      el('div', { className: 'event-line' },
        event.from ? badge(event.from) : null,
        event.from ? el('span', { className: 'arrow', 'aria-label': 'to' }, '→') : null,
        STATUS_ORDER[event.to] !== undefined ? badge(event.to) : el('span', { className: 'badge badge-deleted' }, event.to),
        el('span', { className: 'event-reason' }, event.reason),
        event.actor ? el('span', { className: 'event-actor' }, `by ${event.actor}`) : null),
      el('time', { className: 'event-time', dateTime: event.at, title: event.at }, formatTime(event.at))));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Pages of administrators: join tokens and the audit log.

const PAGES = { '#/join-tokens': 'join-tokens', '#/audit': 'audit' };

/** Shows the page the address names; the fleet for anything else (and for a viewer). */
function route() {
  const page = isAdmin() ? (PAGES[location.hash] ?? 'nodes') : 'nodes';
  $('view-nodes').hidden = page !== 'nodes';
  $('view-join-tokens').hidden = page !== 'join-tokens';
  $('view-audit').hidden = page !== 'audit';
  for (const [id, name] of [['nav-nodes', 'nodes'], ['nav-join-tokens', 'join-tokens'], ['nav-audit', 'audit']]) {
    if (page === name) $(id).setAttribute('aria-current', 'page');
    else $(id).removeAttribute('aria-current');
  }
  if (page !== 'nodes' && state.detailId) closeDetail();
  if (page === 'join-tokens') loadTokens();
  if (page === 'audit') loadAudit(false);
}

const TOKEN_STATES = { active: 'online', expired: 'offline', used_up: 'registering', revoked: 'deleted' };

async function loadTokens() {
  try {
    renderTokens(await api('GET', '/v0/join-tokens'));
  } catch (err) {
    actionFailed('Loading join tokens', err);
  }
}

function renderTokens(tokens) {
  $('tokens-empty').hidden = tokens.length > 0;
  $('token-rows').replaceChildren(...tokens.map((token) => {
    const revoke = token.state === 'active'
      ? el('button', { type: 'button', className: 'btn btn-small btn-danger-ghost act-revoke' }, 'Revoke')
      : null;
    revoke?.addEventListener('click', () => revokeToken(token));
    return el('tr', { dataset: { tokenId: token.id } },
      el('td', { className: 'col-name' }, token.name),
      el('td', {}, el('span', { className: `badge badge-${TOKEN_STATES[token.state] ?? 'deleted'}` },
        el('span', { className: 'badge-dot' }), token.state.replace('_', ' '))),
      el('td', { className: 'num col-uses' }, `${token.uses} / ${token.max_uses ?? '∞'}`),
      el('td', {}, formatTime(token.expires_at)),
      el('td', {}, token.auto_approve ? 'yes' : 'no'),
      el('td', {}, token.tags.join(', ') || '–'),
      el('td', {}, token.created_by),
      el('td', { className: 'col-actions' }, revoke));
  }));
}

$('token-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const error = $('token-error');
  error.hidden = true;
  const maxUses = $('token-max-uses').value.trim();
  const body = {
    name: $('token-name').value.trim(),
    expires_in_secs: Number($('token-expires').value),
    auto_approve: $('token-auto-approve').checked,
    tags: $('token-tags').value.split(',').map((tag) => tag.trim()).filter(Boolean),
  };
  if (maxUses) body.max_uses = Number(maxUses);
  const button = $('token-create');
  button.disabled = true;
  try {
    const created = await api('POST', '/v0/join-tokens', body);
    setText($('token-created-name'), `“${created.name}”`);
    setText($('token-secret'), created.token);
    setText($('token-command'), `LLM_ROUTER_URL=${location.origin} \\\n  LLM_NODE_JOIN_TOKEN=${created.token} \\\n  LLM_NODE_RUNTIME_URL=http://127.0.0.1:8000 \\\n  llm-node`);
    $('token-created').hidden = false;
    $('token-form').reset();
    await loadTokens();
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) {
      error.hidden = false;
      setText(error, err.message);
    } else {
      actionFailed('Creating the join token', err);
    }
  } finally {
    button.disabled = false;
  }
});

$('token-dismiss').addEventListener('click', () => {
  // The token is gone from the page for good: it was shown once.
  setText($('token-secret'), '');
  setText($('token-command'), '');
  $('token-created').hidden = true;
});

async function revokeToken(token) {
  const ok = await confirmDialog({
    title: `Revoke join token “${token.name}”?`,
    text: 'No machine can join with it any more. Machines that already joined stay in the fleet.',
    confirm: 'Revoke token',
  });
  if (!ok) return;
  try {
    await api('DELETE', `/v0/join-tokens/${encodeURIComponent(token.id)}`);
    toast(`Revoked “${token.name}”.`, 'success');
  } catch (err) {
    actionFailed('Revoking', err);
  }
  loadTokens();
}

const audit = { before: null, filter: '' };

async function loadAudit(more) {
  const params = new URLSearchParams({ limit: '50' });
  const actor = $('audit-actor').value.trim();
  const action = $('audit-action').value;
  if (actor) params.set('actor', actor);
  if (action) params.set('action', action);
  const filter = params.toString();
  if (!more || audit.filter !== filter) audit.before = null;
  if (audit.before) params.set('before', String(audit.before));
  try {
    const events = await api('GET', `/v0/audit?${params}`);
    const rows = events.map((event) => el('tr', { className: `audit-${event.outcome}` },
      el('td', { title: event.at }, formatTime(event.at)),
      el('td', { className: 'mono' }, event.actor),
      el('td', { className: 'mono' }, event.client ?? '–'),
      el('td', { className: 'mono' }, event.action),
      el('td', { className: 'mono' }, event.target ?? '–'),
      el('td', {}, el('span', { className: `outcome outcome-${event.outcome}` }, event.outcome))));
    if (more && audit.filter === filter) $('audit-rows').append(...rows);
    else $('audit-rows').replaceChildren(...rows);
    audit.filter = filter;
    audit.before = events.length === 50 ? events[events.length - 1].id : null;
    $('audit-more').hidden = audit.before === null;
    $('audit-empty').hidden = $('audit-rows').children.length > 0;
  } catch (err) {
    actionFailed('Loading the audit log', err);
  }
}

$('audit-filter').addEventListener('submit', (event) => {
  event.preventDefault();
  loadAudit(false);
});
$('audit-more').addEventListener('click', () => loadAudit(true));

boot();
