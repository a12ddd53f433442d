// The dashboard at fleet scale (SPEC §12), measured in a real headless Chromium against the real router binary.
//
// For each fleet size: `bench seed` writes that many approved nodes with GPU figures (one in 1000 pending) into a
// fresh data directory, the router starts on it, `bench pulse` heartbeats as every node once per 10 s, and a page
// signs in and is timed:
//   a. from the click on "Sign in" to the first rows of the node table;
//   b. from the last keystroke of a machine name typed into the search (a node far from the first screen) to a
//      table showing that node's row and no other;
//   c. from a click on the "Pending" status filter to a table of pending rows only, and from a change of `#sort`
//      (where the dashboard has one) to a table in another order;
//   d. bytes received by the page per 10 s of live updates (as sent: compressed where the answer is), measured
//      over --live-secs (30) so that a page polling every few seconds is not caught between two polls;
//   e. the longest main-thread task in that window (the browser reports tasks of 50 ms and more);
//   f. the JS heap after a garbage collection at the end of that window.
// Times are taken inside the page: from the `timeStamp` of the input or click event (when the browser received it)
// to the first frame drawn after the table reached the expected state, observed with a MutationObserver, so the
// round trips of the driver do not count. A step that does not finish within --timeout-secs is reported as over it
// and the run goes on with the steps that can still be measured.
//
// Usage (from tests/dashboard, after `cargo build --release -p llm-router -p bench`):
//   node bench.mjs --nodes 10000 [--nodes 100000 | --nodes 10000,100000] [--repeat 2] [--json FILE]
//                  [--timeout-secs 180] [--live-secs 30]
// Environment:
//   LLM_ROUTER_BIN  the router binary (default: ../../target/release/llm-router)
//   BENCH_BIN       the bench binary (default: ../../target/release/bench)
//   CHROMIUM_PATH   the browser (default: /usr/bin/chromium)

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const ROUTER_BIN = process.env.LLM_ROUTER_BIN ?? path.resolve(here, '../../target/release/llm-router');
const BENCH_BIN = process.env.BENCH_BIN ?? path.resolve(here, '../../target/release/bench');
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const ADMIN_PASSWORD = 'dashboard-bench-admin-password';
// Node i of the seeded fleet waits for approval when i is a multiple of this (`bench seed`, seed::PENDING_EVERY).
const PENDING_EVERY = 1000;
const HEARTBEAT_INTERVAL_SECS = 10;

const { values: options } = parseArgs({
  options: {
    nodes: { type: 'string', multiple: true, default: ['10000'] },
    repeat: { type: 'string', default: '1' },
    json: { type: 'string' },
    'timeout-secs': { type: 'string', default: '180' },
    // Longer than 10 s: a dashboard that polls every few seconds would otherwise be caught between polls.
    'live-secs': { type: 'string', default: '30' },
  },
});
const sizes = options.nodes.flatMap((text) => text.split(',')).map((text) => {
  const n = Number(text.replaceAll('_', ''));
  if (!Number.isInteger(n) || n < 2) throw new Error(`--nodes ${text}: a whole number of at least 2 is needed`);
  return n;
});
const repeat = Number(options.repeat);
const TIMEOUT_MS = Number(options['timeout-secs']) * 1000;
const LIVE_MS = Number(options['live-secs']) * 1000;
if (!(repeat >= 1 && TIMEOUT_MS > 0 && LIVE_MS > 0)) throw new Error('--repeat, --timeout-secs and --live-secs must be positive');

// ---------------------------------------------------------------------------------------------------------------
// The seeded fleet (crates/bench/src/seed.rs and fleet.rs).

const machineName = (i) => `gpu-node-${String(i).padStart(6, '0')}`;
const nodeId = (i) => `5eed0000-0000-4000-8000-${i.toString(16).padStart(12, '0')}`;

// ---------------------------------------------------------------------------------------------------------------
// Processes.

/** Runs a command to its end; answers its stdout. */
function runToEnd(command, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.once('error', (err) => reject(new Error(`cannot start ${command}: ${err.message}`)));
    child.once('exit', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`${command} exited with ${code}:\n${stderr}`))));
  });
}

/** The router's environment: the benchmark's administrator, and nothing else of the caller's LLM_ROUTER_*. */
function routerEnv() {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('LLM_ROUTER_')));
  return { ...env, LLM_ROUTER_ADMIN_USERNAME: 'admin', LLM_ROUTER_ADMIN_PASSWORD: ADMIN_PASSWORD, LLM_ROUTER_LOG: 'warn' };
}

async function startRouter(dataDir) {
  const started = performance.now();
  const child = spawn(
    ROUTER_BIN,
    ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--no-reachability-check'],
    { env: routerEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-20_000);
  });
  const base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the router did not listen within 120 s:\n${stderr}`)), 120_000);
    const lines = readline.createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      // The line the router prints once it listens: `llm_router::app::LISTENING_ON`, then the address.
      const match = /^llm-router listening on (http:\/\/127\.0\.0\.1:\d+)$/.exec(line);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${ROUTER_BIN}: ${err.message} (run \`cargo build --release -p llm-router -p bench\` first)`));
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the router exited with ${code} before listening:\n${stderr}`));
    });
  });
  // Serving once /healthz answers.
  for (;;) {
    const ok = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
    if (ok) break;
    if (child.exitCode !== null) throw new Error(`the router exited with ${child.exitCode}:\n${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return { child, base, startSecs: (performance.now() - started) / 1000, stderr: () => stderr };
}

/** `bench pulse` as every node of the fleet; stopped with SIGTERM, it prints its report as JSON. */
function startPulse(base, nodes) {
  const child = spawn(
    BENCH_BIN,
    ['pulse', '--url', base, '--nodes', String(nodes), '--interval-secs', String(HEARTBEAT_INTERVAL_SECS),
      '--secs', '86400', '--progress-secs', '10', '--json'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  const progress = [];
  child.stdout.on('data', (chunk) => { stdout += chunk; });
  readline.createInterface({ input: child.stderr }).on('line', (line) => progress.push(line));
  const exited = new Promise((resolve) => child.once('exit', resolve));
  return {
    child,
    progress,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      const code = await exited;
      try {
        return JSON.parse(stdout);
      } catch {
        return { error: `bench pulse exited with ${code}: ${progress.slice(-5).join(' / ')}` };
      }
    },
  };
}

/** Stops a child process and waits for it, killing it if it lingers. */
async function stopProcess(child, graceMs = 30_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

// ---------------------------------------------------------------------------------------------------------------
// Timing helpers.

class StepTimeout extends Error {}

/** `promise`, or a StepTimeout after `ms`. */
function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new StepTimeout(`${what}: no result within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const overTimeout = () => `> ${TIMEOUT_MS / 1000} s`;

// Installed in the page before each timed step: watches the table with a MutationObserver (rows added, removed,
// moved or given another node), and once the rows are in the state `done` names, records the start of the frame
// after next, i.e. once that state has been laid out and painted. `startEvent`: the event whose `timeStamp` starts
// the clock ('click' or 'input', on an element matching `startSelector`, and only when its value is `startValue`
// if given). A row's node is read from its `data-node-id`, whose last 12 hex digits are the node's number in the
// seeded fleet.
function armInPage({ key, done, startEvent, startSelector, startValue, args }) {
  const rows = () => [...document.querySelectorAll('#node-rows tr.node-row')];
  const numberOf = (row) => parseInt(row.dataset.nodeId.slice(-12), 16);
  const states = {
    nonempty: () => document.querySelector('#node-rows tr.node-row') !== null,
    onlyNode: () => {
      const all = rows();
      return all.length === 1 && all[0].dataset.nodeId === args.id;
    },
    onlyPending: () => {
      const all = rows();
      return all.length > 0 && all.every((row) => numberOf(row) % args.every === 0);
    },
    reordered: () => {
      const first = rows().slice(0, args.first.length).map((row) => row.dataset.nodeId);
      return first.length > 0 && first.join() !== args.first.join();
    },
  };
  const reachedState = states[done];
  const probe = { started: null, reached: null, painted: null };
  window.__bench ??= {};
  window.__bench[key] = probe;
  const check = () => {
    if (probe.started === null || probe.reached !== null || !reachedState()) return;
    probe.reached = performance.now();
    observer.disconnect();
    document.removeEventListener(startEvent, onStart, { capture: true });
    requestAnimationFrame(() => setTimeout(() => { probe.painted = performance.now(); }, 0));
  };
  const onStart = (event) => {
    if (!event.target.matches?.(startSelector)) return;
    if (startValue !== undefined && event.target.value !== startValue) return;
    probe.started = event.timeStamp;
    // In case the state is reached without a change to the table.
    setTimeout(check, 0);
  };
  document.addEventListener(startEvent, onStart, { capture: true });
  const observer = new MutationObserver(check);
  observer.observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ['data-node-id'] });
}

/**
 * Arms a probe, runs `act` (the clicks or keystrokes, with their own time limit), and answers the milliseconds from
 * the start event to the painted result, or throws a StepTimeout when that takes longer than the step's limit.
 */
async function timeStep(page, probe, act) {
  await within(page.evaluate(armInPage, probe), TIMEOUT_MS, `${probe.key}: arming`);
  await within(act(), TIMEOUT_MS, `${probe.key}: acting`);
  const handle = await within(page.waitForFunction(
    (k) => window.__bench?.[k]?.painted != null && window.__bench[k],
    probe.key,
    { timeout: TIMEOUT_MS, polling: 100 },
  ), TIMEOUT_MS + 5_000, probe.key);
  const result = await handle.jsonValue();
  return result.painted - result.started;
}

const rowIds = (page, count) =>
  page.evaluate((n) => [...document.querySelectorAll('#node-rows tr.node-row')].slice(0, n).map((r) => r.dataset.nodeId), count);
const rowCount = (page) => page.evaluate(() => document.querySelectorAll('#node-rows tr.node-row').length);

/** Waits until the table shows at least `count` rows (after a search or a filter is undone). */
async function waitForRows(page, count) {
  await page.waitForFunction(
    (n) => document.querySelectorAll('#node-rows tr.node-row').length >= n,
    count,
    { timeout: TIMEOUT_MS, polling: 250 },
  );
}

// ---------------------------------------------------------------------------------------------------------------
// One run.

async function measure(nodes) {
  const result = {
    nodes,
    pending: Math.ceil(nodes / PENDING_EVERY),
    date: new Date().toISOString(),
    figures: {},
    notes: [],
  };
  const note = (text) => {
    result.notes.push(text);
    console.error(`  note: ${text}`);
  };
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'llm-router-dashboard-bench-'));
  let router;
  let pulse;
  let browser;
  try {
    console.error(`seeding ${nodes} nodes...`);
    const seeded = JSON.parse(await runToEnd(BENCH_BIN, ['seed', '--data-dir', dataDir, '--nodes', String(nodes), '--json']));
    result.seed_secs = seeded.seed_secs;
    router = await startRouter(dataDir);
    result.router_start_secs = router.startSecs;
    console.error(`router at ${router.base}, started in ${router.startSecs.toFixed(1)} s; heartbeating...`);
    pulse = startPulse(router.base, nodes);
    const appJs = Buffer.from(await (await fetch(`${router.base}/dashboard/app.js`)).arrayBuffer());
    result.dashboard_app_js_sha256 = createHash('sha256').update(appJs).digest('hex');

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
    result.chromium = browser.version();
    const context = await browser.newContext({ viewport: { width: 1440, height: 860 }, colorScheme: 'light' });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    let crashed = false;
    page.on('crash', () => {
      crashed = true;
      note('the page crashed');
    });
    page.on('pageerror', (err) => note(`page error: ${err.message}`));

    // Every byte the page receives, by request, from now on.
    const cdp = await context.newCDPSession(page);
    const traffic = new NetworkTally();
    cdp.on('Network.requestWillBeSent', (e) => traffic.sent(e));
    cdp.on('Network.responseReceived', (e) => traffic.response(e));
    cdp.on('Network.dataReceived', (e) => traffic.data(e));
    cdp.on('Network.loadingFinished', (e) => traffic.finished(e));
    await cdp.send('Network.enable');
    await cdp.send('Performance.enable');

    await page.goto(`${router.base}/dashboard`);
    await page.locator('#signin').waitFor();
    await page.fill('#signin-username', 'admin');
    await page.fill('#signin-password', ADMIN_PASSWORD);

    // a. Sign in to the first rows.
    let signedIn = false;
    await step(result, 'signin_to_rows_ms', async () => {
      const ms = await timeStep(page, {
        key: 'signin', done: 'nonempty', startEvent: 'click', startSelector: '#signin-submit',
      }, () => page.click('#signin-submit'));
      signedIn = true;
      return ms;
    });

    // What the table holds at rest, to know when a search or a filter has been undone.
    let fullRows = 0;
    if (signedIn) {
      fullRows = await within(rowCount(page), TIMEOUT_MS, 'counting rows').catch(() => 0);
      result.rows_at_rest = fullRows;
    }

    // b. A search for a node that is not on the first screen: the last one of the fleet (the table lists pending
    // nodes first, then by name).
    const target = nodes - 1;
    if (signedIn) {
      await step(result, 'search_ms', async () => {
        await page.focus('#search');
        const ms = await timeStep(page, {
          key: 'search', done: 'onlyNode', startEvent: 'input', startSelector: '#search',
          startValue: machineName(target), args: { id: nodeId(target) },
        }, () => page.keyboard.type(machineName(target)));
        return ms;
      });
      await restore(result, 'clearing the search', async () => {
        await page.fill('#search', '');
        await waitForRows(page, fullRows);
      });
    } else {
      result.figures.search_ms = 'not measured';
    }

    // c. The "Pending" status filter, then a change of sort.
    if (signedIn) {
      await step(result, 'status_filter_ms', () => timeStep(page, {
        key: 'filter', done: 'onlyPending', startEvent: 'click',
        startSelector: '#status-filter [data-status="pending"], #status-filter [data-status="pending"] *',
        args: { every: PENDING_EVERY },
      }, () => page.click('#status-filter [data-status="pending"]')));
      await restore(result, 'showing every status again', async () => {
        await page.click('#status-filter [data-status="all"]');
        await waitForRows(page, fullRows);
      });

      const sort = await within(page.evaluate(() => {
        const select = document.querySelector('select#sort');
        return select ? { current: select.value, values: [...select.options].map((o) => o.value) } : null;
      }), TIMEOUT_MS, 'looking for #sort').catch(() => null);
      if (!sort) {
        result.figures.sort_ms = 'n/a';
        note('the dashboard has no <select id="sort">: no sort figure');
      } else {
        // Descending orders first: the most likely to change the first screen.
        const others = sort.values.filter((v) => v !== sort.current);
        const choice = others.find((v) => v.startsWith('-')) ?? others[0];
        if (choice === undefined) {
          result.figures.sort_ms = 'n/a';
          note('#sort offers a single order');
        } else {
          result.sort_to = choice;
          const first = await rowIds(page, 20);
          await step(result, 'sort_ms', () => timeStep(page, {
            key: 'sort', done: 'reordered', startEvent: 'input', startSelector: 'select#sort', args: { first },
          }, () => page.selectOption('select#sort', choice)));
          await restore(result, 'the original sort', async () => {
            await page.selectOption('select#sort', sort.current);
            await waitForRows(page, fullRows);
          });
        }
      }
    } else {
      result.figures.status_filter_ms = 'not measured';
      result.figures.sort_ms = 'not measured';
    }

    // d, e, f. The page left open while the fleet heartbeats.
    if (crashed) {
      for (const key of ['kb_per_10s', 'longest_task_ms', 'heap_mb']) result.figures[key] = 'not measured';
    } else {
      await live(page, cdp, traffic, result, note);
    }
    result.pulse_progress = pulse.progress.slice(-3);
  } finally {
    await browser?.close().catch(() => {});
    if (pulse) result.pulse = await pulse.stop();
    if (router) {
      await stopProcess(router.child);
      if (router.child.exitCode !== 0 && router.child.exitCode !== null) result.router_stderr = router.stderr().slice(-2000);
    }
    await rm(dataDir, { recursive: true, force: true });
  }
  return result;
}

/** Runs a timed step into `result.figures[key]`: milliseconds, or the timeout, or the error. */
async function step(result, key, run) {
  try {
    result.figures[key] = round(await within(run(), 3 * TIMEOUT_MS + 10_000, key));
    console.error(`  ${key}: ${result.figures[key]}`);
  } catch (err) {
    const timedOut = err instanceof StepTimeout || err?.name === 'TimeoutError';
    result.figures[key] = timedOut ? overTimeout() : `failed: ${String(err.message ?? err).split('\n')[0]}`;
    console.error(`  ${key}: ${result.figures[key]}`);
  }
}

/** Brings the page back to its resting state after a step; a failure is noted, and the run goes on. */
async function restore(result, what, run) {
  try {
    await within(run(), TIMEOUT_MS + 5_000, what);
  } catch (err) {
    result.notes.push(`${what}: ${String(err.message ?? err).split('\n')[0]}`);
  }
}

/** The live window: bytes received, the longest task, and the JS heap at its end. */
async function live(page, cdp, traffic, result, note) {
  const armed = await within(page.evaluate(() => {
    window.__benchLongest = 0;
    window.__benchLongTasks = 0;
    window.__benchLongObserver = new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        window.__benchLongTasks += 1;
        window.__benchLongest = Math.max(window.__benchLongest, entry.duration);
      }
    });
    window.__benchLongObserver.observe({ type: 'longtask' });
    return true;
  }), TIMEOUT_MS, 'installing the long-task observer').catch((err) => {
    note(`long tasks not observed: ${err.message}`);
    return false;
  });
  const from = Date.now();
  await new Promise((resolve) => setTimeout(resolve, LIVE_MS));
  const until = Date.now();
  const bytes = traffic.between(from, until);
  result.figures.kb_per_10s = round((bytes / 1000) * (10_000 / (until - from)));
  result.live_secs = (until - from) / 1000;
  result.live_requests = traffic.requestsBetween(from, until);

  if (armed) {
    try {
      const longest = await within(page.evaluate(() => {
        window.__benchLongObserver.takeRecords().forEach((entry) => {
          window.__benchLongTasks += 1;
          window.__benchLongest = Math.max(window.__benchLongest, entry.duration);
        });
        window.__benchLongObserver.disconnect();
        return { longest: window.__benchLongest, count: window.__benchLongTasks };
      }), TIMEOUT_MS, 'reading long tasks');
      result.figures.longest_task_ms = longest.count === 0 ? '< 50 ms' : round(longest.longest);
      result.long_tasks = longest.count;
    } catch (err) {
      result.figures.longest_task_ms = err instanceof StepTimeout ? overTimeout() : `failed: ${err.message}`;
    }
  } else {
    result.figures.longest_task_ms = 'not measured';
  }

  try {
    await within(cdp.send('HeapProfiler.collectGarbage'), TIMEOUT_MS, 'collecting garbage');
    const { metrics } = await within(cdp.send('Performance.getMetrics'), TIMEOUT_MS, 'reading the heap');
    const used = metrics.find((m) => m.name === 'JSHeapUsedSize')?.value;
    result.figures.heap_mb = used === undefined ? 'not reported' : round(used / 1e6);
    const nodesInDom = metrics.find((m) => m.name === 'Nodes')?.value;
    if (nodesInDom !== undefined) result.dom_nodes = nodesInDom;
  } catch (err) {
    result.figures.heap_mb = err instanceof StepTimeout ? overTimeout() : `failed: ${err.message}`;
  }
  for (const key of ['kb_per_10s', 'longest_task_ms', 'heap_mb']) console.error(`  ${key}: ${result.figures[key]}`);
}

/**
 * Bytes received per request, as sent on the wire (headers and body, compressed where the answer is), with the
 * time each part arrived: a chunk of a stream counts when it arrives, a whole answer when it is complete.
 */
class NetworkTally {
  constructor() {
    this.requests = new Map();
    this.arrivals = [];
    this.urls = new Map();
  }

  sent(event) {
    this.urls.set(event.requestId, `${event.request.method} ${new URL(event.request.url).pathname}`);
  }

  entry(id) {
    let entry = this.requests.get(id);
    if (!entry) {
      entry = { counted: 0 };
      this.requests.set(id, entry);
    }
    return entry;
  }

  add(id, bytes) {
    if (bytes > 0) {
      this.entry(id).counted += bytes;
      this.arrivals.push({ at: Date.now(), bytes, id });
    }
  }

  response(event) {
    // The head, for answers whose head is reported apart from the body.
    this.add(event.requestId, event.response?.encodedDataLength ?? 0);
  }

  data(event) {
    this.add(event.requestId, event.encodedDataLength ?? 0);
  }

  finished(event) {
    // The total as sent; whatever the chunks did not report arrives now.
    const entry = this.entry(event.requestId);
    this.add(event.requestId, Math.max(0, (event.encodedDataLength ?? 0) - entry.counted));
  }

  between(from, until) {
    return this.arrivals.filter((a) => a.at >= from && a.at < until).reduce((sum, a) => sum + a.bytes, 0);
  }

  requestsBetween(from, until) {
    const bytes = new Map();
    for (const a of this.arrivals.filter((x) => x.at >= from && x.at < until)) {
      bytes.set(a.id, (bytes.get(a.id) ?? 0) + a.bytes);
    }
    return [...bytes].map(([id, n]) => ({ url: this.urls.get(id) ?? id, bytes: n }));
  }
}

const round = (x) => Math.round(x * 10) / 10;

// ---------------------------------------------------------------------------------------------------------------
// The report.

const ROWS = [
  ['signin_to_rows_ms', 'a. sign in to first rows', 'ms'],
  ['search_ms', 'b. search keystroke to filtered rows', 'ms'],
  ['status_filter_ms', 'c. status filter to its rows', 'ms'],
  ['sort_ms', 'c. sort change to reordered rows', 'ms'],
  ['kb_per_10s', 'd. downloaded per 10 s live', 'KB'],
  ['longest_task_ms', 'e. longest main-thread task, live', 'ms'],
  ['heap_mb', 'f. JS heap after GC', 'MB'],
];

function printTable(runs) {
  const header = ['figure', ...runs.map((r) => `${r.nodes.toLocaleString('en-US')} nodes`)];
  const lines = ROWS.map(([key, label, unit]) => [
    label,
    ...runs.map((r) => {
      const value = r.figures[key];
      return typeof value === 'number' ? `${value.toLocaleString('en-US')} ${unit}` : String(value ?? '');
    }),
  ]);
  const widths = header.map((_, c) => Math.max(header[c].length, ...lines.map((line) => line[c].length)));
  const format = (cells) => cells.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join('  ');
  console.log(format(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const line of lines) console.log(format(line));
  for (const r of runs) {
    const pulse = r.pulse?.throughput_rps === undefined
      ? `pulse: ${r.pulse?.error ?? 'no report'}`
      : `pulse ${Math.round(r.pulse.throughput_rps)}/s of ${Math.round(r.pulse.offered_rps)}/s offered, ${r.pulse.error_total} errors`;
    console.log(`${r.nodes} nodes: ${r.rows_at_rest ?? '?'} rows in the table at rest, ${r.live_requests?.length ?? '?'} requests in ${r.live_secs ?? '?'} s live; ${pulse}`);
    for (const text of r.notes) console.log(`  note: ${text}`);
  }
}

const runs = [];
for (const nodes of sizes) {
  for (let k = 0; k < repeat; k += 1) {
    console.error(`\n== ${nodes} nodes, run ${k + 1} of ${repeat}`);
    try {
      runs.push(await measure(nodes));
    } catch (err) {
      console.error(`the run failed: ${err.stack ?? err}`);
      runs.push({ nodes, figures: {}, notes: [`the run failed: ${String(err.message ?? err).split('\n')[0]}`] });
    }
  }
}
console.log('');
printTable(runs);
if (options.json) {
  await writeFile(options.json, `${JSON.stringify({ runs }, null, 2)}\n`);
  console.error(`written: ${options.json}`);
}
