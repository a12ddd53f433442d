// Pages of administrators: join tokens and the audit log, chosen by the address.

import { $ } from './dom.js';
import { isAdmin, state } from './state.js';
import { closeDetail } from './detail.js';
import { loadTokens } from './join-tokens.js';
import { loadAudit } from './audit.js';

const PAGES = { '#/join-tokens': 'join-tokens', '#/audit': 'audit' };

/** Shows the page the address names; the fleet for anything else (and for a viewer). */
export function route() {
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
