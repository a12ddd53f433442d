// Screens and the session: boot, sign in, sign out, and what signing in or out resets.

import { $, setText } from './dom.js';
import { api, ApiError, Unreachable } from './api.js';
import { emptyPage, isAdmin, NODE_HASH, REFRESH_MS, state } from './state.js';
import { setBanner, toast } from './feedback.js';
import { refresh, schedule } from './live.js';
import { showSilence } from './fleet-events.js';
import { setSpacer } from './table.js';
import { openDetail } from './detail.js';
import { editForm, editHome } from './labels.js';
import { route } from './pages.js';

function show(screen) {
  $('boot').hidden = true;
  $('signin').hidden = screen !== 'signin';
  $('app').hidden = screen !== 'app';
}

export function showSignin(note) {
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

export async function boot() {
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
