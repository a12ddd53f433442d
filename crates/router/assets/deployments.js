// The Deployments page (SPEC §15): the models the router places on nodes whose agents start runtimes themselves,
// each with its replicas' nodes and states and a download's progress; administrators create, scale, edit and
// delete them. Refreshed every 3 s while the page is shown and the tab is visible, and not at all otherwise.
//
// A refresh updates the page in place: each deployment's card is built once and its figures set as text, so a field
// being typed in keeps its focus and its text, and an open edit form is left as the operator has it.

import { refresher } from './refresh.js';
import { $, el, rebuild, renderKv, setText } from './dom.js';
import { formatBytes, formatMs, formatTime, plural } from './format.js';
import { api, ApiError, Unreachable } from './api.js';
import { isAdmin, state } from './state.js';
import { confirmDialog, toast } from './feedback.js';
import { showSignin } from './session.js';
import { actionFailed } from './actions.js';

const REFRESH_MS = 3000;
const GiB = 1024 ** 3;
/** A replica's state -> the colour of its badge, as the fleet colours the like node status. */
const STATE_BADGES = { pending: 'pending', downloading: 'registering', starting: 'registering', ready: 'online', failed: 'offline' };
const RUNTIMES = { llama_cpp: 'llama.cpp', vllm: 'vLLM' };

const deploy = { loads: 0, session: null, cards: new Map() };

const shown = () => Boolean(state.user) && !$('view-deployments').hidden;
const refresh = refresher(() => load(), shown, REFRESH_MS);

/** The page is shown: the deployments now, and every REFRESH_MS while it stays shown. */
export function showDeployments() {
  if (deploy.session !== state.session) {
    // Another user signed in: nothing of the previous one's page stays.
    deploy.session = state.session;
    deploy.cards = new Map();
    $('deploy-list').replaceChildren();
    $('deploy-form').reset();
    $('deploy-new').open = false;
    $('deploy-load-error').hidden = true;
    $('deploy-empty').hidden = true;
  }
  $('deploy-new').hidden = !isAdmin();
  $('deploy-readonly').hidden = isAdmin();
  load();
  refresh.start();
}

/** The page is left: no more requests for it. */
export function hideDeployments() {
  refresh.stop();
}

async function load() {
  const order = ++deploy.loads;
  const session = state.session;
  try {
    const { deployments } = await api('GET', '/v0/deployments');
    // An answer that a later load, or a change made here, overtook is dropped.
    if (order !== deploy.loads || session !== state.session || !shown()) return;
    $('deploy-load-error').hidden = true;
    render(deployments);
  } catch (err) {
    if (session !== state.session || order !== deploy.loads) return;
    if (err instanceof ApiError && err.status === 401) {
      showSignin('Your session has ended; sign in again.');
    } else if (!(err instanceof Unreachable)) {
      // The fleet's own refresh says when the router cannot be reached; anything else is said here.
      $('deploy-load-error').hidden = false;
      setText($('deploy-load-error'), `Deployments could not be loaded: ${err.message}`);
    }
  }
}

/** The cards in the router's order (by name); a card is moved only to make room for a new one. */
function render(deployments) {
  const list = $('deploy-list');
  const ids = new Set(deployments.map((d) => d.id));
  for (const [id, card] of deploy.cards) {
    if (!ids.has(id)) {
      card.root.remove();
      deploy.cards.delete(id);
    }
  }
  deployments.forEach((deployment, i) => {
    let card = deploy.cards.get(deployment.id);
    if (!card) {
      card = createCard(deployment);
      deploy.cards.set(deployment.id, card);
    }
    if (list.children[i] !== card.root) list.insertBefore(card.root, list.children[i] ?? null);
    updateCard(card, deployment);
  });
  $('deploy-empty').hidden = deployments.length > 0;
}

// ---------------------------------------------------------------------------------------------------------------
// One deployment.

function createCard(deployment) {
  const card = { current: deployment };
  card.name = el('h2', { className: 'deploy-name' });
  card.model = el('span', { className: 'model' });
  card.runtime = el('span', { className: 'tag deploy-runtime' });
  card.revision = el('span', { className: 'deploy-revision' });
  card.ready = el('span', { className: 'badge deploy-ready' });
  card.spec = el('dl', { className: 'kv deploy-spec' });
  card.error = el('p', { className: 'form-error deploy-error', role: 'alert', hidden: true });
  card.replicas = el('tbody', { className: 'replica-rows' });
  card.none = el('p', { className: 'muted table-note' }, 'Scaled to zero: no replica runs.');
  const head = el('header', { className: 'deploy-head' },
    el('div', { className: 'deploy-title' }, card.name, el('div', { className: 'sub' }, card.model, card.runtime, card.revision)),
    card.ready);
  card.root = el('article', { className: 'deployment', dataset: { deploymentId: deployment.id } },
    head,
    card.spec,
    card.error,
    el('table', { className: 'mini replicas' },
      el('thead', {}, el('tr', {},
        el('th', { className: 'num' }, 'Slot'), el('th', {}, 'Node'), el('th', {}, 'State'), el('th', {}, 'Download'),
        el('th', { className: 'num' }, 'Restarts'), el('th', {}, 'Details'))),
      card.replicas),
    card.none);
  if (isAdmin()) addControls(card, head);
  return card;
}

function updateCard(card, d) {
  card.current = d;
  setText(card.name, d.name);
  setText(card.model, d.model);
  card.model.title = `Clients ask for “${d.model}” on /v1`;
  setText(card.runtime, RUNTIMES[d.runtime] ?? d.runtime);
  setText(card.revision, `revision ${d.revision}`);
  // While a change rolls out, the old runtimes serve until the new ones are ready: say so.
  const rolling = d.serving_replicas > d.ready_replicas ? ` · ${d.serving_replicas} serving` : '';
  setText(card.ready, `${d.ready_replicas} / ${d.replicas} ready${rolling}`);
  const serving = Math.max(d.ready_replicas, d.serving_replicas);
  const health = d.replicas === 0 ? 'deleted' : d.ready_replicas >= d.replicas ? 'online' : serving > 0 ? 'degraded' : 'pending';
  const readyClass = `badge deploy-ready badge-${health}`;
  if (card.ready.className !== readyClass) card.ready.className = readyClass;
  renderKv(card.spec, [
    ['Source', d.source, 'mono'],
    ['SHA-256', d.sha256 ?? '–', 'mono'],
    ['Arguments', d.args.length ? d.args.join(' ') : '–', 'mono'],
    ['GPU memory', d.gpu_memory_bytes ? `${formatBytes(d.gpu_memory_bytes)} per replica, on GPUs the agent picks` : 'any (every GPU of the node)'],
    ['Node tags', d.node_selector.tags.join(', ') || 'any node'],
    ['Max concurrency', d.max_concurrency ?? 'the runtime’s default'],
    ['Created', `${formatTime(d.created_at)} by ${d.created_by}`],
  ]);
  card.none.hidden = d.replica_states.length > 0;
  // A replica's row is built again when something shown in it changes (not for every heartbeat's timestamp).
  const shownFields = d.replica_states.map(({ updated_at: _, placed_at: __, ...shown }) => shown);
  rebuild(card.replicas, JSON.stringify([d.revision, shownFields]), () => d.replica_states.map((r) => replicaRow(d, r)));
  if (card.scale && document.activeElement !== card.scale && !card.scale.dataset.dirty) {
    card.scale.value = String(d.replicas);
  }
}

function replicaRow(d, r) {
  const node = r.node_id
    ? el('a', { className: 'node-link', href: `#/nodes/${r.node_id}`, title: r.node_id }, r.node_name ?? r.node_id)
    : el('span', { className: 'muted' }, 'not placed');
  return el('tr', { className: `replica replica-${r.state}`, dataset: { slot: String(r.slot) } },
    el('td', { className: 'num' }, String(r.slot)),
    el('td', { className: 'replica-node' }, node),
    el('td', { className: 'replica-state' },
      el('span', { className: `badge badge-${STATE_BADGES[r.state] ?? 'deleted'}` }, el('span', { className: 'badge-dot' }), r.state)),
    el('td', { className: 'replica-download' }, download(r)),
    el('td', { className: 'num replica-restarts' }, String(r.restarts)),
    el('td', { className: 'replica-details' }, details(d, r)));
}

/** While downloading: a bar and `42% · 1.7 GiB of 4.0 GiB`; once done, how long it took. */
function download(r) {
  if (r.state === 'downloading') {
    const total = r.bytes_total;
    const done = r.bytes_done ?? 0;
    if (!total) return el('span', { className: 'progress' }, el('progress', { 'aria-label': 'Downloaded' }), `${formatBytes(done)} so far`);
    const percent = Math.min(100, Math.floor((100 * done) / total));
    return el('span', { className: 'progress' },
      el('progress', { max: total, value: done, 'aria-label': 'Downloaded' }),
      `${percent}% · ${formatBytes(done)} of ${formatBytes(total)}`);
  }
  if (typeof r.download_ms === 'number' && r.state !== 'pending') {
    return el('span', { className: 'muted' }, r.download_ms === 0 ? 'cached' : `in ${formatMs(r.download_ms)}`);
  }
  return el('span', { className: 'muted' }, '–');
}

/** Why it waits or failed; the GPUs its runtime sees and where it serves once ready; the revision it runs while a
 *  change rolls. */
function details(d, r) {
  const parts = [];
  if (r.reason) parts.push(r.reason);
  else if (r.state === 'ready') {
    if (r.gpus?.length) parts.push(`${r.gpus.length === 1 ? 'GPU' : 'GPUs'} ${r.gpus.join(', ')}`);
    if (r.port) parts.push(`port ${r.port}`);
    if (typeof r.start_ms === 'number') parts.push(`started in ${formatMs(r.start_ms)}`);
  } else if (r.state === 'starting') parts.push('the runtime loads the model');
  if (r.revision > 0 && r.revision !== d.revision) parts.push(`runs revision ${r.revision}`);
  return parts.join(' · ');
}

// ---------------------------------------------------------------------------------------------------------------
// What an administrator does to one: scale, edit, delete.

function addControls(card, head) {
  card.scale = el('input', {
    className: 'deploy-scale-input', type: 'number', min: 0, max: 1000, step: 1, inputMode: 'numeric',
    'aria-label': 'Replicas',
  });
  card.scale.addEventListener('input', () => {
    card.scale.dataset.dirty = 'true';
  });
  const apply = el('button', { type: 'submit', className: 'btn btn-small act-scale' }, 'Scale');
  const scale = el('form', { className: 'deploy-scale', noValidate: true }, el('span', { className: 'muted small' }, 'Replicas'), card.scale, apply);
  scale.addEventListener('submit', (event) => {
    event.preventDefault();
    scaleTo(card, apply);
  });
  const edit = el('button', { type: 'button', className: 'btn btn-small act-edit', 'aria-expanded': 'false' }, 'Edit');
  const remove = el('button', { type: 'button', className: 'btn btn-small btn-danger-ghost act-delete' }, 'Delete');
  remove.addEventListener('click', () => deleteDeployment(card));
  head.append(el('div', { className: 'deploy-actions' }, scale, edit, remove));

  card.editArgs = el('input', { className: 'edit-args', autocomplete: 'off', placeholder: 'none' });
  card.editSource = el('input', { className: 'edit-source', autocomplete: 'off' });
  card.editSha = el('input', { className: 'edit-sha256', autocomplete: 'off', maxLength: 64, placeholder: 'required with a URL' });
  for (const input of [card.editArgs, card.editSource, card.editSha]) input.spellcheck = false;
  const save = el('button', { type: 'submit', className: 'btn btn-primary btn-small act-save' }, 'Save');
  const cancel = el('button', { type: 'button', className: 'btn btn-small act-cancel' }, 'Cancel');
  card.editForm = el('form', { className: 'deploy-edit', noValidate: true, hidden: true },
    el('label', { className: 'field field-wide' }, el('span', {}, 'Runtime arguments ', el('span', { className: 'muted' }, '(split on spaces)')), card.editArgs),
    el('label', { className: 'field field-wide' }, el('span', {}, 'Source'), card.editSource),
    el('label', { className: 'field field-wide' }, el('span', {}, 'SHA-256 ', el('span', { className: 'muted' }, '(again with a new URL)')), card.editSha),
    el('div', { className: 'form-row' }, save, cancel,
      el('span', { className: 'muted small' }, 'A change of arguments or source is a new revision: each replica is replaced once the new one is ready.')));
  card.spec.after(card.editForm);
  edit.addEventListener('click', () => {
    if (card.editForm.hidden) openEdit(card, edit);
    else closeEdit(card, edit);
  });
  cancel.addEventListener('click', () => closeEdit(card, edit));
  card.editForm.addEventListener('submit', (event) => {
    event.preventDefault();
    saveEdit(card, save, edit);
  });
}

function openEdit(card, button) {
  const d = card.current;
  card.editArgs.value = d.args.join(' ');
  card.editSource.value = d.source;
  card.editSha.value = d.sha256 ?? '';
  card.editForm.hidden = false;
  button.setAttribute('aria-expanded', 'true');
  card.editArgs.focus();
}

function closeEdit(card, button) {
  card.editForm.hidden = true;
  card.error.hidden = true;
  button.setAttribute('aria-expanded', 'false');
}

/** Arguments as typed: split on whitespace (an argument with a space in it is set through the API). */
function splitArgs(text) {
  return text.split(/\s+/).filter(Boolean);
}

async function scaleTo(card, button) {
  const replicas = Number(card.scale.value);
  if (card.scale.value.trim() === '' || !Number.isInteger(replicas) || replicas < 0) {
    showError(card.error, 'Replicas: a whole number, 0 or more.');
    return;
  }
  const updated = await change(card, { replicas }, button, 'Scaling');
  if (!updated) return;
  delete card.scale.dataset.dirty;
  card.scale.value = String(updated.replicas);
  toast(`Scaled “${updated.name}” to ${plural(updated.replicas, 'replica', 'replicas')}.`, 'success');
}

async function saveEdit(card, button, toggle) {
  const d = card.current;
  const body = {};
  const args = splitArgs(card.editArgs.value);
  if (JSON.stringify(args) !== JSON.stringify(d.args)) body.args = args;
  const source = card.editSource.value.trim();
  const sha256 = card.editSha.value.trim();
  if (source !== d.source) {
    // A new source comes with its own hash: the router keeps none of the old one's.
    body.source = source;
    if (sha256) body.sha256 = sha256;
  } else if (sha256.toLowerCase() !== (d.sha256 ?? '')) {
    body.sha256 = sha256;
  }
  if (Object.keys(body).length === 0) {
    closeEdit(card, toggle);
    return;
  }
  const updated = await change(card, body, button, 'Saving');
  if (!updated) return;
  closeEdit(card, toggle);
  toast(`Saved “${updated.name}”: revision ${updated.revision}.`, 'success');
}

/** PATCHes the deployment; its answer is shown at once. Answers the deployment, or null when the router refused
 * (its message is shown on the card). */
async function change(card, body, button, what) {
  card.error.hidden = true;
  button.disabled = true;
  try {
    const updated = await api('PATCH', `/v0/deployments/${encodeURIComponent(card.current.id)}`, body);
    // A list asked for before this change is older than its answer.
    deploy.loads += 1;
    updateCard(card, updated);
    return updated;
  } catch (err) {
    failed(card.error, what, err);
    return null;
  } finally {
    button.disabled = false;
    load();
  }
}

async function deleteDeployment(card) {
  const d = card.current;
  const ok = await confirmDialog({
    title: `Delete deployment “${d.name}”?`,
    text: `Its ${plural(d.replica_states.length, 'replica stops', 'replicas stop')} at the nodes' next heartbeat; ` +
      `requests for ${d.model} then go only to nodes that serve it otherwise.`,
    confirm: 'Delete deployment',
  });
  if (!ok) return;
  try {
    await api('DELETE', `/v0/deployments/${encodeURIComponent(d.id)}`);
    deploy.loads += 1;
    card.root.remove();
    deploy.cards.delete(d.id);
    $('deploy-empty').hidden = deploy.cards.size > 0;
    toast(`Deleted “${d.name}”.`, 'success');
  } catch (err) {
    failed(card.error, 'Deletion', err);
  }
  load();
}

function showError(node, message) {
  node.hidden = false;
  setText(node, message);
}

/** The router's refusal is shown where the operator acted; an ended session or a lost router as everywhere else. */
function failed(node, what, err) {
  if (err instanceof ApiError && err.status !== 401) showError(node, err.message);
  else actionFailed(what, err);
}

// ---------------------------------------------------------------------------------------------------------------
// Create.

$('deploy-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const error = $('deploy-form-error');
  error.hidden = true;
  const value = (id) => $(id).value.trim();
  const body = {
    name: value('deploy-name'),
    model: value('deploy-model'),
    source: value('deploy-source'),
    runtime: $('deploy-runtime').value,
    args: splitArgs($('deploy-args').value),
    replicas: Number(value('deploy-replicas')),
  };
  if (value('deploy-replicas') === '' || !Number.isInteger(body.replicas) || body.replicas < 0) {
    showError(error, 'Replicas: a whole number, 0 or more.');
    return;
  }
  if (value('deploy-sha256')) body.sha256 = value('deploy-sha256');
  if (value('deploy-gpu-memory')) {
    const gib = Number(value('deploy-gpu-memory'));
    if (!(gib > 0)) {
      showError(error, 'GPU memory: a number of GiB above 0, or empty for any.');
      return;
    }
    body.gpu_memory_bytes = Math.round(gib * GiB);
  }
  const tags = value('deploy-tags').split(',').map((tag) => tag.trim()).filter(Boolean);
  if (tags.length) body.node_selector = { tags };
  if (value('deploy-max-concurrency')) {
    body.max_concurrency = Number(value('deploy-max-concurrency'));
    if (!Number.isInteger(body.max_concurrency) || body.max_concurrency < 1) {
      showError(error, 'Max concurrency: a whole number, 1 or more, or empty for the runtime’s default.');
      return;
    }
  }
  const button = $('deploy-create');
  button.disabled = true;
  try {
    const created = await api('POST', '/v0/deployments', body);
    $('deploy-form').reset();
    $('deploy-new').open = false;
    deploy.loads += 1;
    toast(`Created “${created.name}”: ${plural(created.replicas, 'replica', 'replicas')} of ${created.model}.`, 'success');
  } catch (err) {
    failed(error, 'Creating the deployment', err);
  } finally {
    button.disabled = false;
  }
  load();
});

$('deploy-form').addEventListener('reset', () => {
  $('deploy-form-error').hidden = true;
});
