// The pages other than the fleet, chosen by the address: deployments and usage (everyone), join tokens and the
// audit log (administrators).

import { $ } from './dom.js';
import { isAdmin, state } from './state.js';
import { closeDetail } from './detail.js';
import { loadTokens } from './join-tokens.js';
import { loadAudit } from './audit.js';
import { hideUsage, showUsage } from './usage.js';
import { hideDeployments, showDeployments } from './deployments.js';

/** Address -> page, and whether only administrators see it. */
const PAGES = {
  '#/deployments': { name: 'deployments', admin: false },
  '#/usage': { name: 'usage', admin: false },
  '#/join-tokens': { name: 'join-tokens', admin: true },
  '#/audit': { name: 'audit', admin: true },
};
const VIEWS = {
  nodes: 'view-nodes',
  deployments: 'view-deployments',
  usage: 'view-usage',
  'join-tokens': 'view-join-tokens',
  audit: 'view-audit',
};
const LINKS = {
  nodes: 'nav-nodes',
  deployments: 'nav-deployments',
  usage: 'nav-usage',
  'join-tokens': 'nav-join-tokens',
  audit: 'nav-audit',
};

/** Shows the page the address names; the fleet for anything else (and for a page the user may not see). */
export function route() {
  const wanted = PAGES[location.hash];
  const page = wanted && (!wanted.admin || isAdmin()) ? wanted.name : 'nodes';
  for (const [name, id] of Object.entries(VIEWS)) $(id).hidden = page !== name;
  for (const [name, id] of Object.entries(LINKS)) {
    if (page === name) $(id).setAttribute('aria-current', 'page');
    else $(id).removeAttribute('aria-current');
  }
  if (page !== 'nodes' && state.detailId) closeDetail();
  if (page === 'deployments') showDeployments();
  else hideDeployments();
  if (page === 'usage') showUsage();
  else hideUsage();
  if (page === 'join-tokens') loadTokens();
  if (page === 'audit') loadAudit(false);
}
