// The join tokens page: create a token (shown once), list and revoke them.

import { $, el, setText } from './dom.js';
import { formatTime } from './format.js';
import { api, ApiError } from './api.js';
import { confirmDialog, toast } from './feedback.js';
import { actionFailed } from './actions.js';

const TOKEN_STATES = { active: 'online', expired: 'offline', used_up: 'registering', revoked: 'deleted' };

export async function loadTokens() {
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
