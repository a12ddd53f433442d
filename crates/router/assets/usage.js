// The Usage page (SPEC §14): the fleet's last hour (requests/s, time to first token, tokens/s); requests, errors
// and tokens over a chosen period, for administrators split by key or user, model or node, with the top consumers;
// and each API key's limits with what it used of them. Refreshed every 15 s while the page is shown and the tab is
// visible, and not at all otherwise.

import { refresher } from './refresh.js';
import { $, el, rebuild, setText, setTitle, toggleClass } from './dom.js';
import { formatCount, formatMs, formatRate, formatTime } from './format.js';
import { api, ApiError, serverNow, Unreachable } from './api.js';
import { isAdmin, state } from './state.js';
import { showSignin } from './session.js';
import { meter, setMeter } from './rows.js';
import { COLORS, PALETTE, TimeChart } from './charts.js';

const REFRESH_MS = 15_000;
const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const STEPS = { minute: MINUTE, hour: HOUR, day: DAY };

/** The periods offered: how many buckets of which step, the current one last. */
const PERIODS = {
  hour: { buckets: 60, step: 'minute', label: 'the last hour' },
  day: { buckets: 24, step: 'hour', label: 'the last 24 hours' },
  week: { buckets: 7 * 24, step: 'hour', label: 'the last 7 days' },
  month: { buckets: 30, step: 'day', label: 'the last 30 days' },
};
const SPLITS = { principal: 'key or user', model: 'model', node: 'node' };
/** Groups drawn as series of their own; the others are drawn together. */
const TOP = 8;
/** Rows of the top consumers table. */
const TOP_ROWS = 20;
/** A key's limits: the limit, what `used` calls its use, and how the page names it. */
const LIMITS = [
  ['requests_per_minute', 'requests_this_minute', 'requests/min'],
  ['tokens_per_minute', 'tokens_this_minute', 'tokens/min'],
  ['tokens_per_day', 'tokens_today', 'tokens today'],
  ['tokens_per_month', 'tokens_this_month', 'tokens this month'],
];

const usage = { period: 'day', split: 'principal', loads: 0, session: null, charts: null };

const timeOf = {
  minute: new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' }),
  hour: new Intl.DateTimeFormat(undefined, { weekday: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' }),
  day: new Intl.DateTimeFormat(undefined, { weekday: 'short', day: 'numeric', month: 'short', timeZone: 'UTC' }),
};
const stampOf = (step) => (seconds) => timeOf[step].format(new Date(seconds * 1000));

function charts() {
  if (!usage.charts) {
    const minute = stampOf('minute');
    usage.charts = {
      requests: new TimeChart($('chart-requests'), { stamp: minute }),
      errors: new TimeChart($('chart-errors'), { stamp: minute }),
      tokens: new TimeChart($('chart-tokens'), { stamp: minute }),
      liveRequests: new TimeChart($('chart-live-requests'), { height: 140, counts: false, stamp: minute, rest: 'Last 5 min' }),
      liveTtft: new TimeChart($('chart-live-ttft'), { height: 140, stamp: minute, rest: 'Latest' }),
      liveTokens: new TimeChart($('chart-live-tokens'), { height: 140, counts: false, stamp: minute, rest: 'Last 5 min' }),
    };
  }
  return usage.charts;
}

const shown = () => Boolean(state.user) && !$('view-usage').hidden;
const refresh = refresher(() => load(), shown, REFRESH_MS);

/** The page is shown: its figures now, and every REFRESH_MS while it stays shown. */
export function showUsage() {
  if (usage.session !== state.session) {
    // Another user signed in: nothing of the previous one's page stays.
    usage.session = state.session;
    $('usage-top-rows').replaceChildren();
    $('usage-limit-rows').replaceChildren();
    delete $('usage-top-rows').dataset.sig;
    delete $('usage-limit-rows').dataset.sig;
  }
  renderPickers();
  load();
  refresh.start();
}

/** The page is left: no more requests for it. */
export function hideUsage() {
  refresh.stop();
}

function renderPickers() {
  for (const button of $('usage-period').querySelectorAll('[data-period]')) {
    button.setAttribute('aria-pressed', String(button.dataset.period === usage.period));
  }
  $('usage-split').value = usage.split;
}

$('usage-period').addEventListener('click', (event) => {
  const button = event.target.closest('[data-period]');
  if (!button || button.dataset.period === usage.period) return;
  usage.period = button.dataset.period;
  renderPickers();
  load();
});

$('usage-split').addEventListener('change', () => {
  usage.split = $('usage-split').value;
  load();
});

/** What to ask for: whole buckets, the current one last; by node is kept by the hour at the finest. */
function periodQuery() {
  const period = PERIODS[usage.period];
  const split = isAdmin() ? usage.split : null;
  const step = split === 'node' && period.step === 'minute' ? 'hour' : period.step;
  const size = STEPS[step];
  // In coarser buckets, one more: the period then starts inside the first.
  const buckets = step === period.step ? period.buckets : Math.ceil((period.buckets * STEPS[period.step]) / size) + 1;
  const from = Math.floor(serverNow() / size) * size - (buckets - 1) * size;
  const params = new URLSearchParams({ from: new Date(from).toISOString(), step });
  if (split) params.set('group_by', split);
  return { params, step, split, label: period.label };
}

async function load() {
  const order = ++usage.loads;
  const session = state.session;
  const query = periodQuery();
  const admin = isAdmin();
  try {
    const [period, live, keys] = await Promise.all([
      api('GET', `/v0/usage?${query.params}`),
      api('GET', '/v0/usage/live'),
      admin ? api('GET', '/v0/api-keys') : null,
    ]);
    if (order !== usage.loads || session !== state.session || !shown()) return;
    $('usage-error').hidden = true;
    renderPeriod(period, query);
    renderLive(live);
    if (admin) renderLimits(keys);
  } catch (err) {
    if (session !== state.session || order !== usage.loads) return;
    if (err instanceof ApiError && err.status === 401) {
      showSignin('Your session has ended; sign in again.');
    } else if (!(err instanceof Unreachable)) {
      // The fleet's own refresh says when the router cannot be reached; anything else is said here.
      $('usage-error').hidden = false;
      setText($('usage-error'), `Usage could not be loaded: ${err.message}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A period.

/** The buckets' times (seconds, for uPlot), and a column of figures per bucket from sparse points. */
function buckets(view, step) {
  const size = STEPS[step];
  const start = Date.parse(view.from);
  const count = Math.max(1, Math.ceil((Date.parse(view.to) - start) / size));
  const xs = Array.from({ length: count }, (_, i) => (start + i * size) / 1000);
  const column = (points, pick) => {
    const values = new Array(count).fill(0);
    for (const point of points) {
      const i = Math.round((Date.parse(point.at) - start) / size);
      if (i >= 0 && i < count) values[i] += pick(point);
    }
    return values;
  };
  return { xs, column };
}

const requests = (s) => s.requests;
const failures = (s) => s.errors + s.rejected;
const tokens = (s) => s.prompt_tokens + s.completion_tokens;

function renderPeriod(view, query) {
  const { totals } = view;
  setText($('usage-total-requests'), formatCount(totals.requests));
  setText($('usage-total-errors'), formatCount(totals.errors));
  setText($('usage-total-rejected'), formatCount(totals.rejected));
  setText($('usage-total-prompt'), formatCount(totals.prompt_tokens));
  setText($('usage-total-completion'), formatCount(totals.completion_tokens));
  setText($('usage-total-unknown'), formatCount(totals.unknown_usage));
  setText($('usage-total-duration'), totals.requests ? formatMs(Math.round(totals.duration_ms / totals.requests)) : '–');
  setText($('usage-period-note'), `${query.label}, per ${query.step}`);

  const { xs, column } = buckets(view, query.step);
  const all = charts();
  for (const chart of [all.requests, all.errors, all.tokens]) chart.options.stamp = stampOf(query.step);
  const groups = view.groups;
  $('chart-errors-card').hidden = !groups;
  if (!groups) {
    setText($('chart-requests-title'), 'Requests');
    setText($('chart-tokens-title'), 'Tokens');
    all.requests.update(xs, [
      { label: 'Requests', color: COLORS.requests, fill: true, values: column(view.series, requests), legend: formatCount(totals.requests) },
      { label: 'Errors', color: COLORS.errors, values: column(view.series, (s) => s.errors), legend: formatCount(totals.errors) },
      { label: 'Rejected', color: COLORS.rejected, values: column(view.series, (s) => s.rejected), legend: formatCount(totals.rejected) },
    ]);
    all.tokens.update(xs, [
      { label: 'Prompt', color: COLORS.prompt, fill: true, values: column(view.series, (s) => s.prompt_tokens), legend: formatCount(totals.prompt_tokens) },
      { label: 'Completion', color: COLORS.completion, fill: true, values: column(view.series, (s) => s.completion_tokens), legend: formatCount(totals.completion_tokens) },
    ]);
  } else {
    const by = SPLITS[query.split];
    setText($('chart-requests-title'), `Requests by ${by}`);
    setText($('chart-errors-title'), `Errors and rejections by ${by}`);
    setText($('chart-tokens-title'), `Tokens by ${by}`);
    all.requests.update(xs, splitSeries(groups, column, requests));
    all.errors.update(xs, splitSeries(groups, column, failures));
    all.tokens.update(xs, splitSeries(groups, column, tokens));
  }
  renderTop(groups, query.split);
}

/** One series per group of the top TOP (the router sends the largest first), and one for all the others. */
function splitSeries(groups, column, pick) {
  const series = groups.slice(0, TOP).map((group, i) => ({
    label: group.name,
    color: PALETTE[i % PALETTE.length],
    values: column(group.series, pick),
    legend: formatCount(pick(group.totals)),
  }));
  const others = groups.slice(TOP);
  if (others.length) {
    const values = column(others.flatMap((group) => group.series), pick);
    series.push({
      label: `${others.length} others`,
      color: COLORS.other,
      values,
      legend: formatCount(values.reduce((a, b) => a + b, 0)),
    });
  }
  return series;
}

function renderTop(groups, split) {
  const section = $('usage-top');
  section.hidden = !groups;
  if (!groups) return;
  setText($('usage-top-name'), { principal: 'Key or user', model: 'Model', node: 'Node' }[split]);
  const shownGroups = groups.slice(0, TOP_ROWS);
  $('usage-top-empty').hidden = groups.length > 0;
  setText($('usage-top-more'), groups.length > TOP_ROWS ? `and ${groups.length - TOP_ROWS} more` : '');
  const body = $('usage-top-rows');
  rebuild(body, JSON.stringify([split, shownGroups.map((g) => [g.key, g.name, g.totals])]), () =>
    shownGroups.map((group) => el('tr', { dataset: { key: group.key } },
      el('td', { className: 'col-name', title: group.key }, group.name),
      el('td', { className: 'num col-requests' }, formatCount(group.totals.requests)),
      el('td', { className: 'num' }, formatCount(group.totals.prompt_tokens)),
      el('td', { className: 'num' }, formatCount(group.totals.completion_tokens)),
      el('td', { className: 'num col-errors' }, formatCount(group.totals.errors)),
      el('td', { className: 'num' }, formatCount(group.totals.rejected)))));
}

// ---------------------------------------------------------------------------------------------------------------
// The last hour.

/** Figures per second of each minute; the current minute over the seconds it has had (at least 15, so that its
 * first request does not show as a burst). */
function perSecond(minutes, pick) {
  const last = minutes.length - 1;
  const elapsed = Math.min(60, Math.max(15, (serverNow() - Date.parse(minutes[last].at)) / 1000));
  return minutes.map((m, i) => pick(m) / (i === last ? elapsed : 60));
}

/** The mean rate over the last five minutes, the current one as far as it went. */
function recentRate(minutes, pick) {
  const recent = minutes.slice(-5);
  const seconds = (serverNow() - Date.parse(recent[0].at)) / 1000;
  const sum = recent.reduce((total, m) => total + pick(m), 0);
  return seconds > 0 ? sum / seconds : 0;
}

function renderLive(minutes) {
  if (!minutes.length) return;
  const all = charts();
  const xs = minutes.map((m) => Date.parse(m.at) / 1000);
  const rps = recentRate(minutes, (m) => m.requests);
  const tps = recentRate(minutes, (m) => m.tokens);
  const timed = minutes.filter((m) => m.ttft_p50_ms !== null);
  const latest = timed.at(-1) ?? null;
  setText($('usage-live-rps'), formatRate(rps));
  setText($('usage-live-tps'), formatRate(tps));
  setText($('usage-live-p50'), formatMs(latest?.ttft_p50_ms));
  setText($('usage-live-p99'), formatMs(latest?.ttft_p99_ms));
  setTitle($('usage-live-ttft'), latest ? `Streamed requests of the minute from ${formatTime(latest.at)}` : 'No streamed request in the last hour');
  setText($('usage-live-requests'), formatCount(minutes.reduce((sum, m) => sum + m.requests, 0)));
  const errors = minutes.reduce((sum, m) => sum + m.errors, 0);
  setText($('usage-live-errors'), formatCount(errors));
  toggleClass($('usage-live-errors'), 'figure-bad', errors > 0);

  all.liveRequests.update(xs, [
    { label: 'Requests/s', color: COLORS.requests, fill: true, values: perSecond(minutes, (m) => m.requests), legend: formatRate(rps) },
    { label: 'Errors/s', color: COLORS.errors, values: perSecond(minutes, (m) => m.errors), legend: formatRate(recentRate(minutes, (m) => m.errors)) },
  ]);
  all.liveTtft.update(xs, [
    { label: 'p50 ms', color: COLORS.p50, gaps: true, values: minutes.map((m) => m.ttft_p50_ms), legend: formatMs(latest?.ttft_p50_ms) },
    { label: 'p99 ms', color: COLORS.p99, gaps: true, values: minutes.map((m) => m.ttft_p99_ms), legend: formatMs(latest?.ttft_p99_ms) },
  ]);
  all.liveTokens.update(xs, [
    { label: 'Tokens/s', color: COLORS.completion, fill: true, values: perSecond(minutes, (m) => m.tokens), legend: formatRate(tps) },
  ]);
}

// ---------------------------------------------------------------------------------------------------------------
// Limits.

function renderLimits(keys) {
  const limited = keys
    .map((key) => ({ key, lines: LIMITS.filter(([limit]) => typeof key.limits?.[limit] === 'number') }))
    .filter(({ lines }) => lines.length > 0);
  $('usage-limits-empty').hidden = limited.length > 0;
  const body = $('usage-limit-rows');
  const sig = JSON.stringify(limited.map(({ key, lines }) => [key.id, key.name, lines.map(([l]) => l)]));
  const lastKey = limited.at(-1)?.key.id;
  rebuild(body, sig, () => limited.flatMap(({ key, lines }) => lines.map(([limit], i) => el('tr',
    { dataset: { key: key.id, limit } },
    i === 0
      ? el('td', { className: `col-name${key.id === lastKey ? ' is-last' : ''}`, rowSpan: lines.length, title: key.id }, key.name)
      : null,
    el('td', { className: 'limit-name' }),
    el('td', { className: 'num limit-used' }),
    el('td', { className: 'limit-meter' }, meter().root)))));
  // The figures change on every refresh; the rows only when the keys or their limits do.
  for (const { key, lines } of limited) {
    for (const [limit, use, label] of lines) {
      const row = body.querySelector(`tr[data-key="${key.id}"][data-limit="${limit}"]`);
      if (!row) continue;
      const cap = key.limits[limit];
      const used = key.used?.[use] ?? 0;
      setText(row.querySelector('.limit-name'), label);
      setText(row.querySelector('.limit-used'), `${formatCount(used)} of ${formatCount(cap)}`);
      const root = row.querySelector('.meter');
      setMeter({ root, fill: root.querySelector('.meter-fill'), value: root.querySelector('.meter-value') },
        cap > 0 ? (100 * used) / cap : 100);
    }
  }
}
