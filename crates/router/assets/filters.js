// The fleet's counts, the status filter, the search and the order of the table.

import { $, el, rebuild, setText, toggleClass } from './dom.js';
import { plural } from './format.js';
import { state } from './state.js';
import { load } from './live.js';

const STATUSES = ['pending', 'online', 'registering', 'degraded', 'offline'];

export function renderSummary() {
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
