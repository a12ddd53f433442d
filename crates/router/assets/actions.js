// What an administrator does to a node: approve, cordon or uncordon, delete; and how a failed action is reported.

import { setText } from './dom.js';
import { address, nodeName } from './format.js';
import { api, ApiError, Unreachable } from './api.js';
import { nodeById, state } from './state.js';
import { confirmDialog, toast } from './feedback.js';
import { showSignin } from './session.js';
import { load } from './live.js';
import { render } from './table.js';
import { closeDetail } from './detail.js';

export async function approve(id, button) {
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

export async function cordon(id, on, button) {
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

export async function remove(id) {
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
export function applyNode(node) {
  state.mutations += 1;
  if (state.nodes.has(node.id)) state.nodes.set(node.id, node);
  if (state.detailId === node.id) {
    state.detail = node;
    state.eventsFor = null;
  }
  render();
}

export function actionFailed(what, err) {
  if (err instanceof ApiError && err.status === 401) {
    showSignin('Your session has ended; sign in again.');
    return;
  }
  const reason = err instanceof Unreachable ? 'the router cannot be reached.' : err.message;
  toast(`${what} failed: ${reason}`, 'error');
}
