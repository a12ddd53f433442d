// llm-router dashboard: sign in, watch the fleet, approve pending nodes (SPEC §6).
//
// Plain ES modules, no framework, no build step: this one starts the page, and imports every other module so that
// the browser fetches them all at once rather than one import after another. Two rules hold in every module:
// - Every string that comes from the router (node names, notes, tags, models, messages) reaches the page as text:
//   through textContent, Element.append(string) or a property such as title. Markup is never parsed from data.
// - The credential is the router's HttpOnly session cookie. The page never sees, stores or sends a token itself;
//   every request is same-origin and carries X-Requested-With, which the router demands of cookie-authenticated
//   writes.
//
// The modules, each served as /dashboard/<name>.js:
// - dom.js: creating elements and setting text (only when it changed);
// - format.js: figures, times and node fields as the page shows them;
// - api.js: requests to the router, its errors, and its clock;
// - state.js: the page's state, shared by the others;
// - feedback.js: the banner, toasts and the confirmation dialog;
// - session.js: boot, sign in and out, and the screens;
// - live.js: the refresh every few seconds and the once-a-second tick;
// - fleet-events.js: the banner of a mass silence;
// - table.js: the windowed fleet table; rows.js: one row of it (and the meters, badges and buttons that the detail
//   view shares); filters.js: the fleet's counts, the status filter, the search and the order;
// - actions.js: approve, cordon and uncordon, delete;
// - detail.js: the detail view of a node; labels.js: its labels and their edit form;
// - pages.js: the pages other than the fleet, by address; deployments.js and usage.js (everyone), join-tokens.js
//   and audit.js (administrators): those pages;
// - charts.js: the usage page's time-series charts, drawn by uPlot (uplot.esm.js, vendored unmodified).
//
// The modules import one another in cycles (the table renders the detail view, whose actions reload the table...).
// That is safe because top-level code uses only dom.js and state.js, which import nothing: it looks elements up and
// adds listeners, and the functions it imports from the others run later, once every module is evaluated.

import { boot } from './session.js';
import './dom.js';
import './format.js';
import './api.js';
import './state.js';
import './feedback.js';
import './live.js';
import './fleet-events.js';
import './table.js';
import './filters.js';
import './rows.js';
import './actions.js';
import './detail.js';
import './labels.js';
import './pages.js';
import './refresh.js';
import './deployments.js';
import './join-tokens.js';
import './audit.js';
import './usage.js';
import './charts.js';
import './uplot.esm.js';

boot();
