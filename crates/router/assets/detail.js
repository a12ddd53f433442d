// The detail view of one node: opened from the table or by a `#/nodes/{id}` address.

import { $, el, rebuild, renderKv, setText, toggleClass } from './dom.js';
import { address, formatAgo, formatBytes, formatPercent, formatTime, formatUsage, nodeName } from './format.js';
import { isAdmin, NODE_HASH, state } from './state.js';
import { load } from './live.js';
import { render } from './table.js';
import {
  badge, ejectedUntil, flightText, meter, runtimeLoadText, setBadge, setMeter, updateActions,
} from './rows.js';
import { editStatus, renderLabels } from './labels.js';
import { route } from './pages.js';

/** Pending first (they wait for a person), then the nodes that need a look, then the healthy ones. */
const STATUS_ORDER = { pending: 0, degraded: 1, offline: 2, registering: 3, online: 4 };

/** Opens a node's detail view: at once from the table's row, or once the router answered for a node off screen
 * (a link to `#/nodes/{id}`). */
export function openDetail(id) {
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

export function closeDetail() {
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

export function renderDetail(node) {
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

export function renderOverview(node) {
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
    ['Runtime queue · KV cache', runtimeLoadText(node.metrics?.load)],
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
