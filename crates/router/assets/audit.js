// The audit log page, filtered by actor and action, loaded 50 events at a time.

import { $, el } from './dom.js';
import { formatTime } from './format.js';
import { api } from './api.js';
import { actionFailed } from './actions.js';

const audit = { before: null, filter: '' };

export async function loadAudit(more) {
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
