// The fleet table, windowed (SPEC §12): only the rows on screen, and a few around them, are in the page.

import { $, el } from './dom.js';
import { detailNode, state } from './state.js';
import { ensureRows, queryKey } from './live.js';
import { renderSummary } from './filters.js';
import { createRow, updateRow } from './rows.js';
import { renderDetail } from './detail.js';

/** Rows kept in the page above and below the ones on screen. */
const OVERSCAN_ROWS = 6;

export function render() {
  renderSummary();
  renderWindow();
  const node = detailNode();
  $('detail').hidden = !node;
  if (node) renderDetail(node);
}

/** The rows on screen and a few around them; spacers above and below stand for the others, so the scroll bar is
 * the fleet's. A row not loaded yet shows as loading until its page arrives. */
/** The rows on screen now: `first` to `last` (excluded), by the table's scroll position. */
export function visibleRange() {
  const wrap = $('table-wrap');
  const head = $('nodes').tHead?.offsetHeight ?? 0;
  const top = Math.max(0, wrap.scrollTop - head);
  const height = wrap.clientHeight || window.innerHeight;
  const first = Math.floor(top / state.rowHeight);
  return { first, last: first + Math.ceil(height / state.rowHeight) + 1 };
}

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

export function setSpacer(tbody, height) {
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
