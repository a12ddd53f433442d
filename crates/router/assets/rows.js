// One row of the fleet table, and the pieces it shares with the detail view: meters, status badges, routing flags
// and the action buttons.

import { el, rebuild, setText, setTitle, toggleClass } from './dom.js';
import {
  address,
  formatAgo,
  formatBytes,
  formatPercent,
  formatTime,
  gpuFigures,
  nodeName,
  plural,
  shortModel,
} from './format.js';
import { serverNow } from './api.js';
import { isAdmin, state } from './state.js';
import { approve, cordon, remove } from './actions.js';
import { openDetail } from './detail.js';

export function meter() {
  const fill = el('span', { className: 'meter-fill' });
  const value = el('span', { className: 'meter-value' });
  const root = el('div', { className: 'meter' }, el('span', { className: 'meter-track' }, fill), value);
  return { root, fill, value };
}

export function setMeter(m, percent) {
  const known = typeof percent === 'number';
  setText(m.value, formatPercent(percent));
  const width = known ? `${Math.min(100, Math.max(0, percent)).toFixed(0)}%` : '0%';
  // A CSSOM property, not a style attribute: allowed by the page's `style-src 'self'` policy.
  if (m.fill.style.width !== width) m.fill.style.width = width;
  toggleClass(m.root, 'meter-none', !known);
  toggleClass(m.root, 'meter-warm', known && percent >= 70 && percent < 90);
  toggleClass(m.root, 'meter-hot', known && percent >= 90);
}

export function badge(status) {
  return el('span', { className: `badge badge-${status}` }, el('span', { className: 'badge-dot' }), status);
}

export function setBadge(node, status) {
  if (node.dataset.status === status) return;
  node.dataset.status = status;
  node.className = `badge badge-${status}`;
  node.replaceChildren(el('span', { className: 'badge-dot' }), status);
}

export function createRow(id) {
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
  view.queue = el('div', { className: 'sub queue' });
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
    el('td', { className: 'col-num col-flight' }, view.flight, view.queue),
    el('td', { className: 'col-seen' }, view.seen),
    isAdmin() ? el('td', { className: 'col-actions' }, view.actions) : null);
  view.tr.addEventListener('click', (event) => {
    if (event.target.closest('button, a, input')) return;
    openDetail(id);
  });
  return view;
}

export function updateRow(view, node) {
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
  const load = metrics?.load;
  setText(view.queue, load ? queueText(load) : '');
  setTitle(view.queue, load ? `The runtime reports: ${runtimeLoadText(load)}` : '');

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
export function ejectedUntil(node) {
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

/** What the node's runtime reports of its own load (SPEC §13): running and waiting requests, KV cache in use. */
export function runtimeLoadText(load) {
  if (!load) return 'Not reported';
  const count = (n) => (n ?? '–');
  const cache = load.kv_cache_usage == null ? '–' : formatPercent(load.kv_cache_usage * 100);
  return `${count(load.running)} running, ${count(load.waiting)} waiting · ${cache}`;
}

/** The runtime's queue and KV cache use, short, for the fleet table. */
function queueText(load) {
  const parts = [];
  if (load.waiting != null) parts.push(`queue ${load.waiting}`);
  if (load.kv_cache_usage != null) parts.push(`KV ${formatPercent(load.kv_cache_usage * 100)}`);
  return parts.join(' · ');
}

/** Requests in flight, out of the node's limit when it has one. */
export function flightText(node) {
  const limit = node.max_concurrency;
  return limit ? `${node.routing.in_flight} / ${limit}` : String(node.routing.in_flight);
}

export function updateSeen(view) {
  const node = view.node;
  if (!node) return;
  setText(view.seen, formatAgo(node.last_seen_at));
  setTitle(view.seen, node.last_seen_at ? formatTime(node.last_seen_at) : 'No heartbeat received yet');
}

/** Approve (pending only), Cordon or Uncordon (approved nodes) and Delete buttons; rebuilt only when the node's
 * status or cordon changes, so focus stays. */
export function updateActions(container, node, where) {
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
