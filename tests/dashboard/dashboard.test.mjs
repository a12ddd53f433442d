// End-to-end tests of the dashboard (SPEC §6) in a real headless Chromium against the real router binary.
//
// The router is started here with a fresh data directory; nodes are registered and heartbeat through the node API
// exactly as an agent would. Every wait is an auto-waiting locator or a polled condition, never a fixed sleep.
//
// Environment:
//   LLM_ROUTER_BIN         the router binary (default: ../../target/debug/llm-router)
//   CHROMIUM_PATH          the browser (default: /usr/bin/chromium, Debian's `chromium` package)
//   DASHBOARD_SCREENSHOTS  a folder: when set, the sign-in page, the node table, the detail view and the other pages
//                          are saved there

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const ROUTER_BIN = process.env.LLM_ROUTER_BIN ?? path.resolve(here, '../../target/debug/llm-router');
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const SCREENSHOTS = process.env.DASHBOARD_SCREENSHOTS ? path.resolve(process.env.DASHBOARD_SCREENSHOTS) : null;
const ADMIN_PASSWORD = 'dashboard-test-admin-password';
const VIEWER_PASSWORD = 'dashboard-test-viewer-password';
const XSS_NAME = '<img src=x onerror=alert(1)>';
const GiB = 1024 ** 3;
const ASSETS = path.resolve(here, '../../crates/router/assets');

// ---------------------------------------------------------------------------------------------------------------
// The router and its API.

let router;
let base;
let dataDir;
let adminToken;

async function startRouter(extraArgs = []) {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'llm-router-dashboard-'));
  const child = spawn(
    ROUTER_BIN,
    ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--no-reachability-check', ...extraArgs],
    {
      env: {
        ...process.env,
        LLM_ROUTER_ADMIN_USERNAME: 'admin',
        LLM_ROUTER_ADMIN_PASSWORD: ADMIN_PASSWORD,
        LLM_ROUTER_LOG: 'warn',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the router did not start within 20 s:\n${stderr}`)), 20_000);
    const lines = readline.createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      // The line the router prints once it listens: `llm_router::app::LISTENING_ON`, then the address.
      const match = /^llm-router listening on http:\/\/127\.0\.0\.1:(\d+)$/.exec(line);
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${ROUTER_BIN}: ${err.message} (run \`cargo build -p llm-router\` first)`));
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the router exited with ${code} before listening:\n${stderr}`));
    });
  });
  return { child, port };
}

/** One API call; answers `{ status, body }`. */
/** Stops a router started by `startRouter` (SIGTERM, SIGKILL after 5 s) and removes its data directory. */
async function stopRouter(router, dataDir) {
  if (router && router.exitCode === null) {
    const exited = new Promise((resolve) => router.once('exit', resolve));
    router.kill('SIGTERM');
    const timer = setTimeout(() => router.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(timer);
  }
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
}

async function call(method, urlPath, { token, nodeToken, body } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (nodeToken) headers['X-Node-Token'] = nodeToken;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(base + urlPath, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function expectStatus(promise, status) {
  const answer = await promise;
  assert.equal(answer.status, status, `expected ${status}, got ${answer.status}: ${JSON.stringify(answer.body)}`);
  return answer.body;
}

/** Registers a node as its agent would; answers `{ id, token, ...spec }`. */
async function registerNode(spec) {
  const body = await expectStatus(call('POST', '/v0/nodes', {
    body: {
      machine_name: spec.machine_name,
      ip_address: spec.ip_address,
      runtime_port: spec.runtime_port ?? 8000,
      runtime_version: spec.runtime_version ?? 'vLLM 0.6.3',
      gpu_devices: spec.gpu_devices,
      supported_runtimes: spec.supported_runtimes ?? ['vllm'],
      ready_models: spec.ready_models ?? [],
      loaded_models: spec.loaded_models ?? spec.ready_models ?? [],
      tags: spec.tags ?? [],
    },
  }), 201);
  assert.equal(body.status, 'pending');
  return { ...spec, id: body.node_id, token: body.node_token };
}

/** Sends a heartbeat with plausible figures for every GPU of the node. */
async function heartbeat(node, { cpu = 20, memory = 40, util = 50, ready = node.ready_models ?? [], firstGpu = {}, load } = {}) {
  const gpus = [];
  for (const device of node.gpu_devices) {
    for (let i = 0; i < device.count; i += 1) {
      const total = device.memory_bytes ?? 24 * GiB;
      gpus.push({
        index: gpus.length,
        model: device.model,
        utilization: Math.max(0, Math.min(100, util + ((gpus.length * 7) % 11) - 5)),
        memory_used_bytes: Math.round(total * Math.min(0.95, util / 100 + 0.1)),
        memory_total_bytes: total,
        temperature_c: 40 + util / 3,
        ...(gpus.length === 0 ? firstGpu : {}),
      });
    }
  }
  return expectStatus(call('POST', '/v0/health', {
    nodeToken: node.token,
    body: {
      node_id: node.id,
      cpu_usage: cpu,
      memory_usage: memory,
      gpus,
      ready_models: ready,
      loaded_models: node.loaded_models ?? ready,
      active_requests: Math.round(util / 10),
      ...(load ? { load } : {}),
    },
  }), 200);
}

// ---------------------------------------------------------------------------------------------------------------
// The browser.

let browser;
let context;
let page;
const dialogs = [];
const problems = [];

async function newPage(ctx) {
  const p = await ctx.newPage();
  p.setDefaultTimeout(10_000);
  p.on('dialog', (dialog) => {
    dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  p.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  p.on('console', (msg) => {
    const text = msg.text();
    // Failed requests are logged as console errors on purpose in some tests (403, aborted fetches); a CSP
    // violation, an exception or a module of the script that failed to load never is.
    if (/Content Security Policy|Refused to|Uncaught|Failed to load module script/i.test(text)) {
      problems.push(`console: ${text}`);
    }
  });
  return p;
}

/** Headless Chromium for a block of tests of its own. */
async function launchChromium() {
  return chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu'] });
}

/** Keeps every CSP violation of the page in `window.cspViolations`, for a test to read. */
async function recordCspViolations(p) {
  await p.addInitScript(() => {
    window.cspViolations = [];
    document.addEventListener('securitypolicyviolation', (event) => {
      window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI} ${event.sourceFile}:${event.lineNumber}`);
    });
  });
}

async function screenshot(p, name, options = {}) {
  if (!SCREENSHOTS) return;
  await mkdir(SCREENSHOTS, { recursive: true });
  await p.screenshot({ path: path.join(SCREENSHOTS, name), ...options });
}

/** The script's files: app.js and the modules it imports, as they are in the repository. */
async function scriptModules() {
  return (await readdir(ASSETS)).filter((file) => file.endsWith('.js')).sort();
}

const row = (p, node) => p.locator(`#node-rows tr[data-node-id="${node.id}"]`);

async function signIn(p, username, password) {
  await p.goto(`${base}/dashboard`);
  await p.locator('#signin').waitFor();
  await p.fill('#signin-username', username);
  await p.fill('#signin-password', password);
  await p.click('#signin-submit');
  await p.locator('#app').waitFor();
}

// ---------------------------------------------------------------------------------------------------------------
// The fleet used by the tests.

const H100 = { model: 'NVIDIA H100 80GB HBM3', count: 8, memory_bytes: 80 * GiB };
const fleet = {
  h100: {
    machine_name: 'gpu-h100-07', ip_address: '10.20.0.17', runtime_version: 'vLLM 0.6.3',
    gpu_devices: [H100], ready_models: ['meta-llama/Llama-3.1-70B-Instruct'], tags: ['rack-b'],
  },
  l40s: {
    machine_name: 'gpu-l40s-02', ip_address: '10.20.0.32', runtime_port: 11434, runtime_version: 'ollama 0.3.14',
    supported_runtimes: ['ollama'],
    gpu_devices: [{ model: 'NVIDIA L40S', count: 4, memory_bytes: 48 * GiB }],
  },
  a100a: {
    machine_name: 'gpu-a100-01', ip_address: '10.20.0.11', runtime_version: 'vLLM 0.6.3',
    gpu_devices: [{ model: 'NVIDIA A100-SXM4-80GB', count: 8, memory_bytes: 80 * GiB }],
    ready_models: ['Qwen/Qwen2.5-72B-Instruct', 'meta-llama/Llama-3.1-8B-Instruct'], tags: ['prod', 'rack-a'],
  },
  a100b: {
    machine_name: 'gpu-a100-02', ip_address: '10.20.0.12', runtime_version: 'vLLM 0.6.3',
    gpu_devices: [{ model: 'NVIDIA A100-SXM4-80GB', count: 8, memory_bytes: 80 * GiB }],
    ready_models: ['Qwen/Qwen2.5-72B-Instruct'], tags: ['prod', 'rack-a'],
  },
  rtx: {
    machine_name: 'lab-rtx4090', ip_address: '192.168.7.40', runtime_port: 8080, runtime_version: 'llama.cpp b4273',
    supported_runtimes: ['llama_cpp'],
    gpu_devices: [{ model: 'NVIDIA GeForce RTX 4090', count: 2, memory_bytes: 24 * GiB }],
    loaded_models: ['qwen2.5-coder-32b-q4_k_m'],
  },
};
const nodes = {};

// ---------------------------------------------------------------------------------------------------------------

describe('dashboard', { timeout: 120_000 }, () => {
  before(async () => {
    const started = await startRouter();
    router = started.child;
    base = `http://127.0.0.1:${started.port}`;
    const login = await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'admin', password: ADMIN_PASSWORD } }), 200);
    adminToken = login.token;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
    context = await browser.newContext({ viewport: { width: 1440, height: 860 }, colorScheme: 'light' });
    page = await newPage(context);
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await stopRouter(router, dataDir);
  });

  test('the page is served with a strict CSP and contains no way to inject markup', async () => {
    const response = await fetch(`${base}/dashboard`);
    assert.equal(response.status, 200);
    const csp = response.headers.get('content-security-policy');
    assert.match(csp, /script-src 'self'/);
    assert.match(csp, /style-src 'self'/);
    const html = await response.text();
    assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>/i, 'no inline script');
    assert.doesNotMatch(html, /\sstyle=/i, 'no inline style attribute');
    assert.equal((await fetch(`${base}/dashboard/style.css`)).status, 200, 'style.css');
    // The script is app.js and the ES modules it imports: each is served as JavaScript, as it is on disk.
    const modules = await scriptModules();
    assert.ok(modules.includes('app.js') && modules.length > 1, modules.join(' '));
    for (const file of modules) {
      const served = await fetch(`${base}/dashboard/${file}`);
      assert.equal(served.status, 200, file);
      assert.equal(served.headers.get('content-type'), 'text/javascript; charset=utf-8', file);
      assert.match(served.headers.get('content-security-policy'), /script-src 'self'/, file);
      const js = await readFile(path.join(ASSETS, file), 'utf8');
      assert.equal(await served.text(), js, `the binary embeds the current ${file}`);
      assert.doesNotMatch(js, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|localStorage|sessionStorage/, file);
    }
  });

  test('the page loads every module of its script from the router, and they run', async () => {
    const p = await newPage(context);
    const scripts = new Map();
    p.on('response', (response) => {
      const { pathname } = new URL(response.url());
      if (pathname.endsWith('.js')) scripts.set(pathname, [response.status(), response.headers()['content-type']]);
    });
    await p.goto(`${base}/dashboard`);
    // The sign-in screen shows once the modules are evaluated and boot() asked who is signed in.
    await p.locator('#signin').waitFor();
    const modules = await scriptModules();
    assert.deepEqual([...scripts.keys()].sort(), modules.map((file) => `/dashboard/${file}`).sort());
    for (const [pathname, [status, type]] of scripts) {
      assert.equal(status, 200, pathname);
      assert.equal(type, 'text/javascript; charset=utf-8', pathname);
    }
    await p.close();
  });

  test('sign in: a wrong password is refused, the right one shows the empty fleet with agent instructions', async () => {
    let loginToken = null;
    page.on('response', async (response) => {
      if (response.url().endsWith('/v0/auth/login') && response.status() === 200) {
        loginToken = (await response.json()).token;
      }
    });
    await page.goto(`${base}/dashboard`);
    await page.locator('#signin').waitFor();
    await screenshot(page, 'signin.png');

    await page.fill('#signin-username', 'admin');
    await page.fill('#signin-password', 'not-the-password');
    await page.click('#signin-submit');
    await page.locator('#signin-error', { hasText: 'Wrong username or password' }).waitFor();
    assert.equal(await page.locator('#app').isHidden(), true);

    await page.fill('#signin-password', ADMIN_PASSWORD);
    await page.click('#signin-submit');
    await page.locator('#app').waitFor();
    assert.equal(await page.textContent('#user-name'), 'admin');
    assert.equal(await page.textContent('#user-role'), 'admin');

    await page.locator('#empty').waitFor();
    const command = await page.textContent('#empty-command');
    assert.match(command, /llm-node/);
    assert.ok(command.includes(`LLM_ROUTER_URL=${base}`), command);

    // The session lives in an HttpOnly cookie only: nothing readable by the page holds the token.
    assert.ok(loginToken, 'the login answer was seen');
    const exposed = await page.evaluate(() => ({
      cookie: document.cookie,
      local: JSON.stringify({ ...localStorage }),
      session: JSON.stringify({ ...sessionStorage }),
      html: document.documentElement.outerHTML,
    }));
    assert.equal(exposed.cookie, '');
    assert.equal(exposed.local, '{}');
    assert.equal(exposed.session, '{}');
    assert.ok(!exposed.html.includes(loginToken), 'the token is not in the page');
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === 'llm_router_session');
    assert.ok(session?.httpOnly, 'HttpOnly session cookie');
    assert.equal(session.sameSite, 'Strict');
  });

  test('registered nodes appear live: pending first, highlighted and counted, with their figures', async () => {
    for (const [key, spec] of Object.entries(fleet)) nodes[key] = await registerNode(spec);
    const figures = {
      h100: { cpu: 37, memory: 52, util: 64 },
      l40s: { cpu: 3, memory: 11, util: 0 },
      a100a: { cpu: 58, memory: 71, util: 88 },
      a100b: { cpu: 44, memory: 63, util: 97 },
      rtx: { cpu: 12, memory: 35, util: 8 },
    };
    for (const [key, node] of Object.entries(nodes)) await heartbeat(node, figures[key]);
    for (const key of ['a100a', 'a100b', 'rtx']) {
      await expectStatus(call('POST', `/v0/nodes/${nodes[key].id}/approve`, { token: adminToken }), 200);
    }

    // No reload: the page finds the nodes by itself.
    await row(page, nodes.rtx).locator('.badge', { hasText: 'registering' }).waitFor();
    await row(page, nodes.a100b).locator('.badge', { hasText: 'online' }).waitFor();
    await page.locator('#pending-count', { hasText: '2' }).waitFor();
    assert.equal(await page.locator('#empty').isHidden(), true);

    const h100 = row(page, nodes.h100);
    await h100.locator('.badge', { hasText: 'pending' }).waitFor();
    assert.match(await h100.getAttribute('class'), /is-pending/);
    const order = await page.$$eval('#node-rows tr', (rows) => rows.map((r) => r.querySelector('.badge').textContent));
    assert.deepEqual(order.slice(0, 2), ['pending', 'pending'], `pending first: ${order}`);
    assert.equal(order.length, 5);

    assert.equal(await h100.locator('.name-link').textContent(), 'gpu-h100-07');
    assert.equal(await h100.locator('.col-addr').textContent(), '10.20.0.17:8000');
    assert.equal(await h100.locator('.gpus').textContent(), '8 × H100 80GB HBM3');
    assert.equal(await h100.locator('.gpus').getAttribute('title'), '8 × NVIDIA H100 80GB HBM3');
    assert.match(await h100.locator('.col-gpus').textContent(), /80 GiB each/);
    assert.match(await h100.locator('.col-runtime').textContent(), /vLLM 0\.6\.3/);
    assert.match(await h100.locator('.col-models').textContent(), /Llama-3\.1-70B-Instruct/);
    assert.equal(await h100.locator('.col-cpu .meter-value').textContent(), '37%');
    assert.equal(await h100.locator('.col-mem .meter-value').textContent(), '52%');
    assert.match(await h100.locator('.col-gpu .meter-value').textContent(), /^\d+%$/);
    assert.match(await h100.locator('.col-gpu .sub').textContent(), /^\d+(\.\d)? \/ 640 GiB$/);
    assert.match(await h100.locator('.col-seen').textContent(), /^(just now|\d+ s ago)$/);
    assert.match(await row(page, nodes.a100a).locator('.col-models').textContent(), /\+1/);
    assert.match(await row(page, nodes.a100a).locator('.col-name').textContent(), /prod/);
    assert.match(await row(page, nodes.rtx).locator('.col-models').textContent(), /1 loaded, none ready/);
    assert.equal(await page.locator('#node-rows .act-approve').count(), 2, 'Approve only on pending nodes');
    await screenshot(page, 'nodes.png');
  });

  test('filter by status and search by name', async () => {
    await page.click('#status-filter [data-status="pending"]');
    await page.waitForFunction(() => document.querySelectorAll('#node-rows tr').length === 2);
    assert.equal(await row(page, nodes.a100a).count(), 0);

    await page.click('#status-filter [data-status="all"]');
    await page.fill('#search', 'a100');
    // The pending filter also showed two rows: wait for the search's own.
    await row(page, nodes.a100b).waitFor();
    await page.waitForFunction(() => document.querySelectorAll('#node-rows tr').length === 2);
    assert.equal(await row(page, nodes.a100a).count(), 1);
    assert.equal(await row(page, nodes.h100).count(), 0);

    await page.fill('#search', 'no-such-node');
    await page.locator('#no-match').waitFor();
    await page.click('#clear-filter');
    await page.waitForFunction(() => document.querySelectorAll('#node-rows tr').length === 5);
    assert.equal(await page.inputValue('#search'), '');
  });

  test('Approve turns a pending node online, or registering when it has no ready model', async () => {
    await row(page, nodes.h100).locator('.act-approve').click();
    await row(page, nodes.h100).locator('.badge', { hasText: 'online' }).waitFor();
    await page.locator('#pending-count', { hasText: '1' }).waitFor();
    assert.equal(await row(page, nodes.h100).locator('.act-approve').count(), 0);
    const h100 = await expectStatus(call('GET', `/v0/nodes/${nodes.h100.id}`, { token: adminToken }), 200);
    assert.equal(h100.status, 'online');
    assert.equal(h100.approved_by, 'admin');

    await row(page, nodes.l40s).locator('.act-approve').click();
    await row(page, nodes.l40s).locator('.badge', { hasText: 'registering' }).waitFor();
    await page.locator('#pending-callout').waitFor({ state: 'hidden' });
  });

  test('the detail view shows the history with who approved, and live refreshes keep it, focus and an edit', async () => {
    const h100 = row(page, nodes.h100);
    await h100.locator('.name-link').click();
    await page.locator('#detail').waitFor();
    assert.equal(await page.textContent('#detail-title'), 'gpu-h100-07');
    const approved = page.locator('#detail-events .event', { hasText: 'approved' });
    await approved.waitFor();
    assert.match(await approved.textContent(), /pending.*online.*approved.*by admin/s);
    await page.locator('#detail-events .event', { hasText: 'registered' }).waitFor();
    assert.match(await page.textContent('#detail-overview'), /by admin/);
    assert.match(await page.textContent('#detail-gpus'), /#7/);

    // An edit in progress, then a heartbeat with new figures: the table updates in place around it.
    await page.evaluate((id) => {
      window.keptRow = document.querySelector(`#node-rows tr[data-node-id="${id}"]`);
    }, nodes.h100.id);
    await page.fill('#edit-display-name', 'Inference H100 #7');
    await page.fill('#edit-notes', 'Rack B, slot 7. Owner: platform team.');
    await page.focus('#edit-notes');
    assert.match(await page.textContent('#detail-overview'), /Runtime queue · KV cache\s*Not reported/);
    await heartbeat(nodes.h100, { cpu: 91, memory: 77, util: 99, load: { running: 6, waiting: 3, kv_cache_usage: 0.875 } });
    await h100.locator('.col-cpu .meter-value', { hasText: '91%' }).waitFor();
    await page.locator('#detail-overview', { hasText: '91%' }).waitFor();
    // The runtime's own queue and KV cache use (SPEC §13), as its agent reported them.
    await page.locator('#detail-overview', { hasText: '6 running, 3 waiting · 88%' }).waitFor();
    // And in the fleet table, under the requests in flight.
    assert.equal(await h100.locator('.col-flight .queue').textContent(), 'queue 3 · KV 88%');
    assert.equal(await h100.locator('.col-flight .queue').getAttribute('title'),
      'The runtime reports: 6 running, 3 waiting · 88%');
    const kept = await page.evaluate((id) => ({
      sameRow: window.keptRow === document.querySelector(`#node-rows tr[data-node-id="${id}"]`),
      focused: document.activeElement?.id,
      name: document.getElementById('edit-display-name').value,
      notes: document.getElementById('edit-notes').value,
    }), nodes.h100.id);
    assert.deepEqual(kept, {
      sameRow: true,
      focused: 'edit-notes',
      name: 'Inference H100 #7',
      notes: 'Rack B, slot 7. Owner: platform team.',
    });
    assert.equal(await page.locator('#detail').isVisible(), true);
    assert.match(await h100.getAttribute('class'), /is-selected/);

    await page.fill('#edit-tags', 'rack-b, inference');
    await page.click('#edit-save');
    await page.locator('#edit-status', { hasText: 'Saved' }).waitFor();
    await h100.locator('.name-link', { hasText: 'Inference H100 #7' }).waitFor();
    await page.locator('#detail-title', { hasText: 'Inference H100 #7' }).waitFor();
    const saved = await expectStatus(call('GET', `/v0/nodes/${nodes.h100.id}`, { token: adminToken }), 200);
    assert.equal(saved.display_name, 'Inference H100 #7');
    assert.equal(saved.notes, 'Rack B, slot 7. Owner: platform team.');
    assert.deepEqual(saved.tags, ['rack-b', 'inference']);
    await heartbeat(nodes.h100, { cpu: 41, memory: 55, util: 72 });
    await h100.locator('.col-cpu .meter-value', { hasText: '41%' }).waitFor();
    if (SCREENSHOTS) {
      await page.$eval('#detail-body', (body) => { body.scrollTop = 0; });
      await page.waitForFunction(() => document.querySelectorAll('.toast').length === 0);
      await screenshot(page, 'detail.png');
    }

    await page.click('#detail-close');
    await page.locator('#detail').waitFor({ state: 'hidden' });
  });

  test('a node name with markup is shown as text and runs nothing', async () => {
    nodes.xss = await registerNode({
      machine_name: XSS_NAME,
      ip_address: '10.99.0.1',
      runtime_version: '<b>1.0</b>',
      gpu_devices: [{ model: '<svg onload=alert(2)>', count: 1 }],
      ready_models: ['<script>alert(3)</script>'],
      tags: ['<i>tag</i>'],
    });
    await expectStatus(call('PATCH', `/v0/nodes/${nodes.xss.id}`, {
      token: adminToken,
      body: { notes: '<img src=x onerror=alert(4)>' },
    }), 200);
    const xss = row(page, nodes.xss);
    await xss.waitFor();
    assert.equal(await xss.locator('.name-link').textContent(), XSS_NAME);
    assert.equal(await xss.locator('.gpus').textContent(), '1 × <svg onload=alert(2)>');
    assert.match(await xss.locator('.col-models').textContent(), /<script>alert\(3\)<\/script>/);
    await xss.locator('.name-link').click();
    await page.locator('#detail-title', { hasText: XSS_NAME }).waitFor();
    assert.equal(await page.inputValue('#edit-notes'), '<img src=x onerror=alert(4)>');
    assert.equal(await page.locator('#app img, #app svg, #app script, #app b, #app i').count(), 0);
    assert.deepEqual(dialogs, [], 'no dialog fired');
    await page.click('#detail-close');
  });

  test('Delete asks for confirmation; Cancel keeps the node, confirming removes it', async () => {
    const xss = row(page, nodes.xss);
    await xss.locator('.act-delete').click();
    await page.locator('#confirm').waitFor();
    assert.match(await page.textContent('#confirm-title'), /Delete <img src=x onerror=alert\(1\)>\?/);
    await page.click('#confirm-cancel');
    await page.locator('#confirm').waitFor({ state: 'hidden' });
    await expectStatus(call('GET', `/v0/nodes/${nodes.xss.id}`, { token: adminToken }), 200);
    assert.equal(await xss.count(), 1);

    await xss.locator('.act-delete').click();
    await page.locator('#confirm').waitFor();
    await page.click('#confirm-ok');
    await xss.waitFor({ state: 'detached' });
    await expectStatus(call('GET', `/v0/nodes/${nodes.xss.id}`, { token: adminToken }), 404);
    // The deleted node's token no longer works.
    await expectStatus(call('POST', '/v0/health', { nodeToken: nodes.xss.token, body: { node_id: nodes.xss.id } }), 401);
    assert.deepEqual(dialogs, [], 'the confirmation is the page\'s own dialog, not window.confirm');
  });

  test('a viewer sees the fleet but no Approve, Delete or edit controls, and the API refuses with 403', async () => {
    await expectStatus(call('POST', '/v0/users', {
      token: adminToken,
      body: { username: 'viewer', password: VIEWER_PASSWORD, role: 'viewer' },
    }), 201);
    const pending = await registerNode({
      machine_name: 'gpu-new-01', ip_address: '10.20.0.50',
      gpu_devices: [{ model: 'NVIDIA H100 80GB HBM3', count: 1, memory_bytes: 80 * GiB }],
    });
    // A short window, so the page scrolls: a live refresh must keep the scroll position.
    const viewerContext = await browser.newContext({ viewport: { width: 1440, height: 420 } });
    try {
      const viewer = await newPage(viewerContext);
      await signIn(viewer, 'viewer', VIEWER_PASSWORD);
      assert.equal(await viewer.textContent('#user-role'), 'viewer');
      await row(viewer, pending).locator('.badge', { hasText: 'pending' }).waitFor();
      await viewer.locator('#readonly-note').waitFor();
      assert.equal(await viewer.locator('#node-rows tr').count(), 6);
      assert.equal(await viewer.locator('.act-approve, .act-delete').count(), 0);
      assert.ok(await viewer.locator('#nav-usage').isVisible(), 'the Usage page is for viewers too');
      assert.ok(await viewer.locator('#nav-join-tokens').isHidden(), 'no Join tokens page for a viewer');
      assert.ok(await viewer.locator('#nav-audit').isHidden(), 'no Audit page for a viewer');
      assert.equal(await viewer.locator('#node-rows button', { hasText: /Approve|Delete/ }).count(), 0);

      const scrolled = await viewer.evaluate(() => {
        window.scrollTo(0, document.documentElement.scrollHeight);
        return window.scrollY;
      });
      assert.ok(scrolled > 0, 'the page scrolls');
      await heartbeat(nodes.a100a, { cpu: 66, memory: 71, util: 88 });
      await row(viewer, nodes.a100a).locator('.col-cpu .meter-value', { hasText: '66%' }).waitFor();
      assert.equal(await viewer.evaluate(() => window.scrollY), scrolled, 'the refresh kept the scroll position');

      await row(viewer, nodes.h100).locator('.name-link').click();
      await viewer.locator('#detail-labels', { hasText: 'Rack B, slot 7' }).waitFor();
      assert.equal(await viewer.locator('#edit-form, #detail input, #detail textarea').count(), 0, 'no edit form');
      assert.equal(await viewer.locator('#detail button', { hasText: /Approve|Delete|Save/ }).count(), 0);
      await viewer.locator('#detail-events .event', { hasText: 'by admin' }).waitFor();

      const refused = await viewer.evaluate(async (id) => {
        const response = await fetch(`/v0/nodes/${id}/approve`, {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'X-Requested-With': 'llm-router-dashboard' },
        });
        return { status: response.status, body: await response.json() };
      }, pending.id);
      assert.equal(refused.status, 403);
      assert.equal(refused.body.error.code, 'forbidden');
      const still = await expectStatus(call('GET', `/v0/nodes/${pending.id}`, { token: adminToken }), 200);
      assert.equal(still.status, 'pending');
    } finally {
      await viewerContext.close();
    }

    // The admin's page found the new node too; it also needs the header for a cookie-authenticated write.
    await row(page, pending).locator('.act-approve').waitFor();
    const withoutHeader = await page.evaluate(async (id) => {
      const response = await fetch(`/v0/nodes/${id}/approve`, { method: 'POST', credentials: 'same-origin' });
      return response.status;
    }, pending.id);
    assert.equal(withoutHeader, 403);
  });

  test('Join tokens: create one, see it once with the agent command, a machine joins with it, revoke it', async () => {
    await page.goto(`${base}/dashboard#/join-tokens`);
    await page.locator('#view-join-tokens').waitFor();
    assert.equal(await page.locator('#nav-join-tokens').getAttribute('aria-current'), 'page');
    assert.ok(await page.locator('#view-nodes').isHidden(), 'the fleet is not on this page');
    await page.fill('#token-name', 'rack 9');
    await page.selectOption('#token-expires', '3600');
    await page.fill('#token-max-uses', '2');
    await page.fill('#token-tags', 'rack-9, batch-2');
    await page.check('#token-auto-approve');
    await page.click('#token-create');
    await page.locator('#token-created').waitFor();
    const secret = (await page.textContent('#token-secret')).trim();
    assert.match(secret, /^llmj_[0-9a-f]{64}$/);
    const command = await page.textContent('#token-command');
    assert.ok(command.includes(`LLM_NODE_JOIN_TOKEN=${secret}`) && command.includes(`LLM_ROUTER_URL=${base}`), command);
    const listed = page.locator('#token-rows tr', { hasText: 'rack 9' });
    await listed.locator('.col-uses', { hasText: '0 / 2' }).waitFor();
    await listed.locator('.badge', { hasText: 'active' }).waitFor();
    assert.ok(!(await page.textContent('#token-rows')).includes(secret), 'the list never shows the token');
    await page.click('#token-dismiss');
    assert.equal(await page.textContent('#token-secret'), '', 'gone from the page once dismissed');

    // A machine joins with it: approved by the token's rule, and the node shows the token it joined with.
    const joined = await expectStatus(fetch(`${base}/v0/nodes`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Join-Token': secret },
      body: JSON.stringify({
        machine_name: 'gpu-joined-01', ip_address: '10.20.0.90', runtime_port: 8000, runtime_version: 'vLLM 0.6.3',
        gpu_devices: [{ model: 'NVIDIA L4', count: 1 }], ready_models: ['tiny'],
      }),
    }).then(async (r) => ({ status: r.status, body: await r.json() })), 201);
    assert.equal(joined.status, 'online');
    await page.reload();
    await listed.locator('.col-uses', { hasText: '1 / 2' }).waitFor();
    await page.click('#nav-nodes');
    await page.locator('#view-nodes').waitFor();
    await row(page, { id: joined.node_id }).locator('.name-link').click();
    await page.locator('#detail-overview', { hasText: 'join token “rack 9”' }).waitFor();
    await page.locator('#detail-events .event', { hasText: 'by join-token:rack 9' }).waitFor();

    await page.click('#nav-join-tokens');
    await listed.locator('.act-revoke').click();
    await page.locator('#confirm[open]').waitFor();
    await page.click('#confirm-ok');
    await listed.locator('.badge', { hasText: 'revoked' }).waitFor();
    assert.equal(await listed.locator('.act-revoke').count(), 0);
    const refused = await fetch(`${base}/v0/nodes`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Join-Token': secret },
      body: JSON.stringify({
        machine_name: 'gpu-joined-02', ip_address: '10.20.0.91', runtime_port: 8000, runtime_version: 'vLLM 0.6.3',
        gpu_devices: [{ model: 'NVIDIA L4', count: 1 }],
      }),
    });
    assert.equal(refused.status, 401);
    await screenshot(page, 'join-tokens.png');
  });

  test('Audit: sign-ins and admin actions are listed newest first and filtered by actor and action', async () => {
    await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'mallory', password: 'not the password' } }), 401);
    await page.click('#nav-audit');
    await page.locator('#view-audit').waitFor();
    await page.locator('#audit-rows tr', { hasText: 'join_token.revoke' }).first().waitFor();
    const first = await page.locator('#audit-rows tr').first().textContent();
    assert.match(first, /mallory.*auth\.login.*failure/s, 'the newest event first');
    await page.fill('#audit-actor', 'mallory');
    await page.click('#audit-apply');
    // The filtered page replaces the table: wait for it, not for a row the unfiltered table already had.
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#audit-rows tr')];
      return rows.length === 1 && rows[0].textContent.includes('mallory');
    });
    await page.fill('#audit-actor', '');
    await page.selectOption('#audit-action', 'join_token.create');
    await page.click('#audit-apply');
    await page.waitForFunction(() => {
      const actions = [...document.querySelectorAll('#audit-rows tr td:nth-child(4)')].map((td) => td.textContent);
      return actions.length > 0 && actions.every((a) => a === 'join_token.create');
    });
    await page.locator('#audit-rows tr', { hasText: 'rack 9' }).waitFor();
    await screenshot(page, 'audit.png');
    await page.click('#nav-nodes');
    await page.locator('#view-nodes').waitFor();
  });

  test('Cordon and Uncordon from the table; a stream in flight through the router is shown on its node', async () => {
    // A runtime that holds a streamed answer open until told to finish it.
    let finish;
    const finished = new Promise((resolve) => {
      finish = resolve;
    });
    const runtime = http.createServer(async (request, response) => {
      for await (const _ of request);
      response.writeHead(200, { 'Content-Type': 'text/event-stream' });
      response.write('data: {"choices":[{"delta":{"content":"hi"}}]}\n\n');
      await finished;
      response.end('data: [DONE]\n\n');
    });
    await new Promise((resolve) => runtime.listen(0, '127.0.0.1', resolve));
    const model = 'stand-in/streaming-model';
    const node = await registerNode({
      machine_name: 'gpu-stream-01', ip_address: '127.0.0.1', runtime_port: runtime.address().port,
      gpu_devices: [H100], ready_models: [model],
    });
    try {
      await expectStatus(call('POST', `/v0/nodes/${node.id}/approve`, { token: adminToken }), 200);
      await heartbeat(node);
      const line = row(page, node);
      await line.locator('.badge', { hasText: 'online' }).waitFor();
      const flight = () => line.locator('.col-flight').textContent();
      assert.equal(await flight(), '0');

      const stream = await fetch(`${base}/v1/chat/completions`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${adminToken}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ model, stream: true, messages: [{ role: 'user', content: 'hello' }] }),
      });
      assert.equal(stream.status, 200);
      assert.equal(stream.headers.get('x-llm-router-node'), node.id);
      const reader = stream.body.getReader();
      const first = await reader.read();
      assert.match(new TextDecoder().decode(first.value), /"content":"hi"/);
      await page.waitForFunction((id) =>
        document.querySelector(`#node-rows tr[data-node-id="${id}"] .col-flight`)?.textContent === '1', node.id);

      // Cordon: the badge appears, new requests are refused, the stream in flight goes on.
      await line.locator('.act-cordon').click();
      await line.locator('.badge-cordoned', { hasText: 'cordoned' }).waitFor();
      await line.locator('.act-uncordon').waitFor();
      await screenshot(page, 'cordoned.png');
      const cordoned = await expectStatus(call('GET', `/v0/nodes/${node.id}`, { token: adminToken }), 200);
      assert.equal(cordoned.schedulable, false);
      assert.equal(cordoned.routing.in_flight, 1);
      const refused = await call('POST', '/v1/chat/completions', { token: adminToken, body: { model } });
      assert.equal(refused.status, 503);
      assert.equal(refused.body.error.code, 'no_available_node');
      await line.locator('.name-link').click();
      await page.locator('#detail-overview', { hasText: 'Cordoned: no new requests' }).waitFor();
      await page.click('#detail-close');

      await line.locator('.act-uncordon').click();
      await line.locator('.badge-cordoned').waitFor({ state: 'detached' });
      const back = await expectStatus(call('GET', `/v0/nodes/${node.id}`, { token: adminToken }), 200);
      assert.equal(back.schedulable, true);

      finish();
      let rest = '';
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
        rest += new TextDecoder().decode(chunk.value);
      }
      assert.match(rest, /\[DONE\]/);
      await page.waitForFunction((id) =>
        document.querySelector(`#node-rows tr[data-node-id="${id}"] .col-flight`)?.textContent === '0', node.id);
      assert.match(await line.locator('.col-flight span').getAttribute('title'), /^1 request through this router, 0 failed$/);
    } finally {
      finish();
      runtime.close();
      await expectStatus(call('DELETE', `/v0/nodes/${node.id}`, { token: adminToken }), 204);
    }
  });

  test('a GPU fault shows the node degraded with its condition, counted and filtered, until it clears', async () => {
    const line = row(page, nodes.a100b);
    await heartbeat(nodes.a100b, { cpu: 44, memory: 63, util: 97, firstGpu: { xid: 79 } });
    await line.locator('.badge-degraded', { hasText: 'degraded' }).waitFor();
    await line.locator('.badge-condition', { hasText: 'gpu fault' }).waitFor();
    assert.match(await page.textContent('#fleet-summary'), /· 1 degraded$/);
    await page.click('#status-filter [data-status="degraded"]');
    await page.waitForFunction(() => document.querySelectorAll('#node-rows tr').length === 1);
    assert.equal(await line.count(), 1);
    await line.locator('.name-link').click();
    await page.locator('#detail-events .event', { hasText: 'gpu_fault: GPU 0: XID 79' }).waitFor();
    assert.match(await page.textContent('#detail-overview'), /Degraded \(gpu_fault\): no requests/);
    await page.click('#detail-close');
    await page.click('#status-filter [data-status="all"]');

    await heartbeat(nodes.a100b, { cpu: 44, memory: 63, util: 97 });
    await line.locator('.badge-online', { hasText: 'online' }).waitFor();
    assert.equal(await line.locator('.badge-condition').count(), 0);
    assert.doesNotMatch(await page.textContent('#fleet-summary'), /degraded/);
  });

  test('a banner says when the router cannot be reached, and goes when it answers again', async () => {
    const isList = (url) => new URL(url).pathname === '/v0/nodes';
    await page.route(isList, (route) => route.abort('connectionrefused'));
    await page.locator('#banner', { hasText: 'cannot be reached' }).waitFor();
    assert.match(await page.textContent('#live'), /Offline/);
    assert.equal(await row(page, nodes.h100).count(), 1, 'the last known fleet stays on screen');
    await page.unroute(isList);
    await page.locator('#banner').waitFor({ state: 'hidden' });
    assert.equal(await page.textContent('#live-text'), 'Live');
  });

  test('sign out ends the session', async () => {
    await page.click('#signout');
    await page.locator('#signin').waitFor();
    assert.equal(await page.locator('#node-rows tr').count(), 0);
    const me = await page.evaluate(async () => (await fetch('/v0/auth/me', { credentials: 'same-origin' })).status);
    assert.equal(me, 401);
    await page.reload();
    await page.locator('#signin').waitFor();
  });

  test('no page error and no CSP violation happened', () => {
    assert.deepEqual(problems, []);
    assert.deepEqual(dialogs, []);
  });
});

// A mass silence needs nodes to go quiet, which with the router's real clock takes `offline_after`: this router
// marks a node offline after 3 s (long enough that a busy test machine's late sweep, which grants live nodes a new
// grace period past half of it, does not split one silence in two), and has a fleet of its own.
describe('dashboard: a mass silence', { timeout: 60_000 }, () => {
  const quiet = [];
  let silenceBrowser;
  let p;

  before(async () => {
    const started = await startRouter(['--offline-after-secs', '3', '--registration-rate', '0']);
    router = started.child;
    base = `http://127.0.0.1:${started.port}`;
    const login = await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'admin', password: ADMIN_PASSWORD } }), 200);
    adminToken = login.token;
    for (let i = 0; i < 12; i += 1) {
      const node = await registerNode({
        machine_name: `rack-c-${String(i).padStart(2, '0')}`, ip_address: `10.30.0.${i + 1}`,
        gpu_devices: [{ model: 'NVIDIA L4', count: 1, memory_bytes: 24 * GiB }], ready_models: ['m'],
      });
      await expectStatus(call('POST', `/v0/nodes/${node.id}/approve`, { token: adminToken }), 200);
      quiet.push(node);
    }
    silenceBrowser = await launchChromium();
    p = await newPage(await silenceBrowser.newContext({ viewport: { width: 1440, height: 860 } }));
    await signIn(p, 'admin', ADMIN_PASSWORD);
  });

  after(async () => {
    await silenceBrowser?.close().catch(() => {});
    await stopRouter(router, dataDir);
  });

  /** Heartbeats every node of this fleet together. */
  const heartbeatAll = () => Promise.all(quiet.map((node) => heartbeat(node, { ready: ['m'] })));

  /** Every node of this fleet online, then silent until the router marks them all offline at once. */
  async function silenceAll() {
    for (const answer of await heartbeatAll()) assert.equal(answer.status, 'online');
    for (;;) {
      const listed = await expectStatus(call('GET', '/v0/nodes', { token: adminToken }), 200);
      if (listed.every((node) => node.status === 'offline')) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  test('a banner says that most of the fleet went silent at once, until the nodes come back', async () => {
    await silenceAll();
    await p.locator('#fleet-banner', { hasText: 'Mass silence: 12 of 12 nodes' }).waitFor();
    assert.match(await p.textContent('#fleet-banner'), /network or router problem/);
    // The nodes come back and stay: they heartbeat more often than the router's 3 s offline_after.
    let back = true;
    const keepAlive = (async () => {
      while (back) {
        await heartbeatAll();
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    })();
    await p.locator('#fleet-banner').waitFor({ state: 'hidden' });
    back = false;
    await keepAlive;
    const [event] = await expectStatus(call('GET', '/v0/fleet/events', { token: adminToken }), 200);
    assert.equal(event.resolution, 'nodes returned');
  });

  test('an administrator dismisses the banner', async () => {
    await silenceAll();
    await p.locator('#fleet-banner', { hasText: 'Mass silence: 12 of 12 nodes' }).waitFor();
    await p.click('#fleet-banner-dismiss');
    await p.locator('#fleet-banner').waitFor({ state: 'hidden' });
    const [event] = await expectStatus(call('GET', '/v0/fleet/events', { token: adminToken }), 200);
    assert.equal(event.resolution, 'dismissed');
    assert.equal(event.resolved_by, 'admin');
    // Still gone after the next refreshes, though the nodes are still offline.
    await p.reload();
    await p.locator('#app').waitFor();
    await p.locator('#node-rows tr').first().waitFor();
    assert.equal(await p.locator('#fleet-banner').isHidden(), true);
    assert.deepEqual(problems, []);
  });
});

describe('dashboard: a fleet larger than the screen', { timeout: 120_000 }, () => {
  const FLEET = 400;
  const names = [];
  const ids = new Map();
  let bigBrowser;
  let p;
  /** Every answer of GET /v0/nodes the page received: its query and how many nodes and ids it carried. */
  const lists = [];

  before(async () => {
    const started = await startRouter(['--registration-rate', '0', '--max-pending', '0']);
    router = started.child;
    base = `http://127.0.0.1:${started.port}`;
    const login = await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'admin', password: ADMIN_PASSWORD } }), 200);
    adminToken = login.token;
    // Registered in a shuffled order, so that the table's order (by name, digits as numbers) is the router's doing.
    const order = [...Array(FLEET).keys()].sort((a, b) => ((a * 7919) % FLEET) - ((b * 7919) % FLEET));
    for (let start = 0; start < order.length; start += 50) {
      await Promise.all(order.slice(start, start + 50).map(async (i) => {
        const node = await registerNode({
          machine_name: `fleet-${i}`, ip_address: `10.40.${Math.floor(i / 250)}.${(i % 250) + 1}`,
          gpu_devices: [{ model: 'NVIDIA L4', count: 1 + (i % 4), memory_bytes: 24 * GiB }], ready_models: ['m'],
          tags: i % 2 ? ['odd'] : ['even'],
        });
        ids.set(i, node);
      }));
    }
    for (let i = 0; i < FLEET; i += 1) names.push(`fleet-${i}`);
    bigBrowser = await launchChromium();
    p = await newPage(await bigBrowser.newContext({ viewport: { width: 1440, height: 860 } }));
    p.on('response', async (response) => {
      const url = new URL(response.url());
      if (url.pathname !== '/v0/nodes' || response.status() !== 200) return;
      const body = await response.json().catch(() => null);
      if (body) lists.push({ params: url.searchParams, nodes: body.nodes?.length, ids: body.ids?.length, encoding: response.headers()['content-encoding'] });
    });
    await signIn(p, 'admin', ADMIN_PASSWORD);
  });

  after(async () => {
    await bigBrowser?.close().catch(() => {});
    await stopRouter(router, dataDir);
  });

  const rowCount = () => p.locator('#node-rows tr.node-row').count();

  test('only the rows on screen are in the page; the counts are the whole fleet\'s', async () => {
    await p.locator('#node-rows tr.node-row').first().waitFor();
    await p.locator('#status-filter [data-status="all"] .seg-count', { hasText: String(FLEET) }).waitFor();
    assert.equal(await p.textContent('#status-filter [data-status="pending"] .seg-count'), String(FLEET));
    assert.equal(await p.textContent('#pending-count'), String(FLEET));
    assert.match(await p.textContent('#fleet-summary'), new RegExp(`^${FLEET} nodes · 0 of 1000 GPUs online`));
    const rows = await rowCount();
    assert.ok(rows > 5 && rows < 60, `a screenful of rows, not the fleet: ${rows}`);
    // The table's scroll height stands for the whole fleet.
    const { scroll, client } = await p.$eval('#table-wrap', (wrap) => ({ scroll: wrap.scrollHeight, client: wrap.clientHeight }));
    assert.ok(scroll > (FLEET - 5) * 40, `scroll height ${scroll} for ${FLEET} rows`);
    assert.ok(client < scroll / 5);
    // Asked for a page, compressed.
    const first = lists.find((list) => list.params.has('limit'));
    assert.ok(first, 'the page asked for a page of nodes');
    assert.ok(Number(first.params.get('limit')) < 200, `limit ${first.params.get('limit')}`);
    assert.match(first.encoding ?? '', /^(br|gzip)$/);
  });

  test('scrolling reaches the last node, in the router\'s order', async () => {
    await p.selectOption('#sort', 'name');
    await row(p, ids.get(0)).waitFor();
    await row(p, ids.get(1)).waitFor();
    assert.equal(await row(p, ids.get(FLEET - 1)).count(), 0, 'the last node is off screen');
    await p.$eval('#table-wrap', (wrap) => { wrap.scrollTop = wrap.scrollHeight; });
    await row(p, ids.get(FLEET - 1)).waitFor();
    await p.waitForFunction(() => document.querySelectorAll('#node-rows tr.loading-row').length === 0);
    const shown = await p.$$eval('#node-rows tr.node-row .name-link', (links) => links.map((link) => link.textContent));
    assert.equal(shown.at(-1), names.at(-1));
    // Digits as numbers: fleet-398 before fleet-399, and nothing between.
    assert.deepEqual(shown.slice(-2), names.slice(-2));
    assert.equal(await row(p, ids.get(0)).count(), 0, 'the first rows left the page');
    assert.ok(await rowCount() < 60);
    // The last row is inside the scrolled box, not under its edge.
    const visible = await p.$eval(`#node-rows tr[data-node-id="${ids.get(FLEET - 1).id}"]`, (tr) => {
      const box = document.getElementById('table-wrap').getBoundingClientRect();
      const rect = tr.getBoundingClientRect();
      return { ok: rect.bottom <= box.bottom + 1 && rect.top >= box.top, rect: [rect.top, rect.bottom], box: [box.top, box.bottom], client: document.getElementById("table-wrap").clientHeight, h: rect.height };
    });
    assert.ok(visible.ok, JSON.stringify(visible));
  });

  test('a search finds a node that was off screen, and the live refresh sends only what changed', async () => {
    await p.$eval('#table-wrap', (wrap) => { wrap.scrollTop = 0; });
    await row(p, ids.get(0)).waitFor();
    const far = ids.get(277);
    assert.equal(await row(p, far).count(), 0, 'off screen');
    await p.keyboard.press('/');
    await p.keyboard.type('fleet-277');
    await row(p, far).waitFor();
    await p.waitForFunction(() => document.querySelectorAll('#node-rows tr.node-row').length === 1);

    // Live: a heartbeat of the node on screen shows without a reload; the refresh asks for the changes only.
    const asked = lists.length;
    await heartbeat(far, { cpu: 73, ready: ['m'] });
    await row(p, far).locator('.col-cpu .meter-value', { hasText: '73%' }).waitFor();
    const changes = () => lists.slice(asked).filter((list) => list.params.has('changed_since'));
    for (let tries = 0; changes().length < 2 && tries < 100; tries += 1) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const since = changes();
    assert.ok(since.length >= 2, 'the refresh asks what changed since');
    assert.ok(since.every((list) => list.ids <= 1 && list.nodes <= 1), JSON.stringify(since.map((l) => [l.ids, l.nodes])));

    await p.fill('#search', '');
    await p.locator('#node-rows tr.node-row').nth(5).waitFor();
  });

  test('filter and sort come from the router: odd tags, most GPUs first', async () => {
    await p.fill('#search', 'odd');
    await p.selectOption('#sort', '-gpus');
    await p.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#node-rows tr.node-row')];
      return rows.length > 5 && rows.every((row) => /4 × L4/.test(row.querySelector('.gpus').textContent));
    });
    // i % 4 === 3 are the odd nodes with 4 GPUs: 100 of them, then those with 2.
    await p.$eval('#table-wrap', (wrap) => { wrap.scrollTop = wrap.scrollHeight; });
    await p.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#node-rows tr.node-row')];
      return rows.length > 0 && /2 × L4/.test(rows.at(-1).querySelector('.gpus').textContent);
    });
    await p.fill('#search', '');
    await p.selectOption('#sort', 'status');
    assert.deepEqual(problems, []);
  });
});

// The usage page (SPEC §14). A router of its own, so that every count is this test's: a stand-in runtime that
// reports its usage, two inference keys (one with limits) sending requests through /v1, then the page as an
// administrator and as a viewer.
describe('dashboard: usage', { timeout: 120_000 }, () => {
  const MODEL = 'stand-in/usage-model';
  const USAGE = { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15 };
  const keys = {};
  let usageBrowser;
  let runtime;
  let p;
  /** The UTC minute of team-search's requests (null if they straddled two): its requests/min count turns with it. */
  let requestMinute;

  /** A chat completion through the router with `key`. */
  const chat = (key, extra = {}) => fetch(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key.key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hello' }], ...extra }),
  });

  /** The legend of a chart: [label, value] per series, the time (or "Total") first. */
  const legend = (page, chart) => page.$$eval(`#${chart} .u-legend .u-series`, (rows) =>
    rows.map((row) => [row.querySelector('.u-label')?.textContent ?? '', row.querySelector('.u-value')?.textContent ?? '']));

  /** The rows of a table body, as the text of their cells. */
  const cells = (page, body) => page.$$eval(`#${body} tr`, (rows) =>
    rows.map((row) => [...row.querySelectorAll('td')].map((td) => td.textContent)));

  before(async () => {
    runtime = http.createServer(async (request, response) => {
      let text = '';
      for await (const chunk of request) text += chunk;
      const asked = JSON.parse(text || '{}');
      const id = 'chatcmpl-usage';
      if (asked.stream) {
        response.writeHead(200, { 'Content-Type': 'text/event-stream' });
        const chunk = { id, object: 'chat.completion.chunk', model: MODEL, choices: [{ index: 0, delta: { content: 'hi' } }] };
        response.write(`data: ${JSON.stringify(chunk)}\n\n`);
        if (asked.stream_options?.include_usage) {
          response.write(`data: ${JSON.stringify({ id, object: 'chat.completion.chunk', model: MODEL, choices: [], usage: USAGE })}\n\n`);
        }
        response.end('data: [DONE]\n\n');
        return;
      }
      response.writeHead(200, { 'Content-Type': 'application/json' });
      response.end(JSON.stringify({
        id, object: 'chat.completion', created: Math.floor(Date.now() / 1000), model: MODEL,
        choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }],
        usage: USAGE,
      }));
    });
    await new Promise((resolve) => runtime.listen(0, '127.0.0.1', resolve));

    const started = await startRouter();
    router = started.child;
    base = `http://127.0.0.1:${started.port}`;
    const login = await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'admin', password: ADMIN_PASSWORD } }), 200);
    adminToken = login.token;
    const node = await registerNode({
      machine_name: 'gpu-usage-01', ip_address: '127.0.0.1', runtime_port: runtime.address().port,
      gpu_devices: [H100], ready_models: [MODEL],
    });
    await expectStatus(call('POST', `/v0/nodes/${node.id}/approve`, { token: adminToken }), 200);
    await heartbeat(node);
    keys.search = await expectStatus(call('POST', '/v0/api-keys', {
      token: adminToken,
      body: { name: 'team-search', scope: 'inference', limits: { requests_per_minute: 60, tokens_per_day: 100000 } },
    }), 201);
    keys.batch = await expectStatus(call('POST', '/v0/api-keys', {
      token: adminToken, body: { name: 'batch-jobs', scope: 'inference' },
    }), 201);
    await expectStatus(call('POST', '/v0/users', {
      token: adminToken, body: { username: 'viewer', password: VIEWER_PASSWORD, role: 'viewer' },
    }), 201);

    // team-search: two answers and a stream (45 tokens); batch-jobs: one answer (15 tokens) and an unknown model.
    requestMinute = Math.floor(Date.now() / 60_000);
    for (let i = 0; i < 2; i += 1) {
      const answer = await chat(keys.search);
      assert.equal(answer.status, 200);
      assert.deepEqual((await answer.json()).usage, USAGE);
    }
    const stream = await chat(keys.search, { stream: true });
    assert.equal(stream.status, 200);
    assert.match(await stream.text(), /\[DONE\]/);
    assert.equal((await chat(keys.batch)).status, 200);
    assert.equal((await chat(keys.batch, { model: 'stand-in/no-such-model' })).status, 404);
    if (Math.floor(Date.now() / 60_000) !== requestMinute) requestMinute = null;

    // Records are written in batches within a second: wait until the router counts all five.
    const deadline = Date.now() + 10_000;
    for (;;) {
      const seen = await expectStatus(call('GET', '/v0/usage?group_by=principal', { token: adminToken }), 200);
      if (seen.totals.requests === 5 && seen.totals.completion_tokens === 12) break;
      assert.ok(Date.now() < deadline, `the router recorded ${JSON.stringify(seen.totals)}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }

    usageBrowser = await launchChromium();
    p = await newPage(await usageBrowser.newContext({ viewport: { width: 1440, height: 860 }, locale: 'en-US', colorScheme: 'light' }));
    // uPlot styles its elements through the CSSOM, which `style-src 'self'` allows: any violation is recorded here.
    await recordCspViolations(p);
  });

  after(async () => {
    await usageBrowser?.close().catch(() => {});
    runtime?.close();
    await stopRouter(router, dataDir);
  });

  test('an administrator sees requests, errors and tokens by key, the top consumers, the limits and the last hour', async () => {
    await signIn(p, 'admin', ADMIN_PASSWORD);
    await p.click('#nav-usage');
    await p.locator('#view-usage').waitFor();
    assert.equal(await p.locator('#nav-usage').getAttribute('aria-current'), 'page');
    assert.ok(await p.locator('#view-nodes').isHidden(), 'the fleet is not on this page');

    // The period's totals, and the charts drawn by uPlot: one series per key, each key's total in the legend.
    await p.locator('#usage-total-requests', { hasText: '5' }).waitFor();
    assert.equal(await p.textContent('#usage-total-rejected'), '1');
    assert.equal(await p.textContent('#usage-total-errors'), '0');
    assert.equal(await p.textContent('#usage-total-prompt'), '48');
    assert.equal(await p.textContent('#usage-total-completion'), '12');
    assert.equal(await p.textContent('#usage-period-note'), 'the last 24 hours, per hour');
    for (const chart of ['chart-requests', 'chart-errors', 'chart-tokens', 'chart-live-requests', 'chart-live-ttft', 'chart-live-tokens']) {
      await p.locator(`#${chart} .uplot canvas`).first().waitFor();
    }
    assert.equal(await p.textContent('#chart-requests-title'), 'Requests by key or user');
    assert.deepEqual(await legend(p, 'chart-requests'), [['', 'Total'], ['team-search', '3'], ['batch-jobs', '2']]);
    assert.deepEqual(await legend(p, 'chart-errors'), [['', 'Total'], ['team-search', '0'], ['batch-jobs', '1']]);
    assert.deepEqual(await legend(p, 'chart-tokens'), [['', 'Total'], ['team-search', '45'], ['batch-jobs', '15']]);
    // The chart holds the period's 24 hourly buckets, the requests in the current one.
    const drawn = await p.locator('#chart-requests .uplot canvas').evaluate((canvas) => canvas.width > 0 && canvas.height > 0);
    assert.ok(drawn, 'the canvas has a size');

    // Top consumers: the keys, largest first.
    assert.deepEqual(await cells(p, 'usage-top-rows'), [
      ['team-search', '3', '36', '9', '0', '0'],
      ['batch-jobs', '2', '12', '3', '0', '1'],
    ]);

    // Limits: the key with limits only, and what it used of them.
    assert.deepEqual(await p.$$eval('#usage-limit-rows td.col-name', (tds) => tds.map((td) => td.textContent)), ['team-search']);
    const limit = (name) => p.locator(`#usage-limit-rows tr[data-limit="${name}"]`);
    assert.equal(await limit('requests_per_minute').locator('.limit-name').textContent(), 'requests/min');
    const perMinute = await limit('requests_per_minute').locator('.limit-used').textContent();
    // The count turns with the UTC minute: exactly 3 unless the minute changed since the requests.
    if (Math.floor(Date.now() / 60_000) === requestMinute) assert.equal(perMinute, '3 of 60');
    else assert.match(perMinute, /^[0-3] of 60$/);
    assert.equal(await limit('tokens_per_day').locator('.limit-name').textContent(), 'tokens today');
    assert.equal(await limit('tokens_per_day').locator('.limit-used').textContent(), '45 of 100,000');
    assert.equal(await limit('tokens_per_day').locator('.meter-value').textContent(), '0%');

    // The last hour: the five requests, a rate above zero, the stream's time to first token.
    assert.equal(await p.textContent('#usage-live-requests'), '5');
    assert.ok(Number(await p.textContent('#usage-live-rps')) > 0, await p.textContent('#usage-live-rps'));
    assert.ok(Number(await p.textContent('#usage-live-tps')) > 0, await p.textContent('#usage-live-tps'));
    assert.match(await p.textContent('#usage-live-p50'), /^\d[\d,]* ms$/);
    const live = await legend(p, 'chart-live-requests');
    assert.deepEqual(live.map(([label]) => label), ['', 'Requests/s', 'Errors/s']);
    await screenshot(p, 'usage.png', { fullPage: true });

    // Over a chart, the legend shows the bucket under the pointer instead of the totals.
    const over = p.locator('#chart-requests .u-over');
    const box = await over.boundingBox();
    await p.mouse.move(box.x + box.width - 2, box.y + box.height / 2);
    await p.waitForFunction(() => document.querySelector('#chart-requests .u-legend .u-series .u-value')?.textContent !== 'Total');
    assert.deepEqual((await legend(p, 'chart-requests')).slice(1), [['team-search', '3'], ['batch-jobs', '2']]);
    await p.mouse.move(0, 0);
    await p.waitForFunction(() => document.querySelector('#chart-requests .u-legend .u-series .u-value')?.textContent === 'Total');

    // Another period, and the same usage by model and by node.
    await p.click('#usage-period [data-period="hour"]');
    await p.locator('#usage-period-note', { hasText: 'the last hour, per minute' }).waitFor();
    assert.equal(await p.getAttribute('#usage-period [data-period="hour"]', 'aria-pressed'), 'true');
    assert.deepEqual(await legend(p, 'chart-requests'), [['', 'Total'], ['team-search', '3'], ['batch-jobs', '2']]);
    await p.selectOption('#usage-split', 'model');
    await p.locator('#usage-top-rows tr', { hasText: MODEL }).waitFor();
    assert.equal(await p.textContent('#usage-top-name'), 'Model');
    assert.deepEqual((await cells(p, 'usage-top-rows'))[0], [MODEL, '4', '48', '12', '0', '0']);
    assert.equal(await p.textContent('#chart-tokens-title'), 'Tokens by model');
    await p.selectOption('#usage-split', 'node');
    await p.locator('#usage-top-rows tr', { hasText: 'gpu-usage-01' }).waitFor();
    // Usage by node is kept by the hour: the last hour is shown per hour.
    assert.equal(await p.textContent('#usage-period-note'), 'the last hour, per hour');
    assert.deepEqual((await cells(p, 'usage-top-rows'))[0], ['gpu-usage-01', '4', '48', '12', '0', '0']);
    await p.selectOption('#usage-split', 'principal');
    await p.click('#usage-period [data-period="day"]');
    await p.locator('#usage-period-note', { hasText: 'the last 24 hours, per hour' }).waitFor();
  });

  test('a viewer sees the fleet\'s totals and last hour, but no split, top consumers or limits', async () => {
    const ctx = await usageBrowser.newContext({ viewport: { width: 1440, height: 860 }, locale: 'en-US' });
    try {
      const viewer = await newPage(ctx);
      const refused = [];
      viewer.on('response', (response) => {
        if (response.status() === 403) refused.push(response.url());
      });
      await signIn(viewer, 'viewer', VIEWER_PASSWORD);
      assert.ok(await viewer.locator('#nav-usage').isVisible());
      await viewer.click('#nav-usage');
      await viewer.locator('#usage-total-requests', { hasText: '5' }).waitFor();
      await viewer.locator('#chart-requests .uplot canvas').first().waitFor();
      assert.equal(await viewer.textContent('#chart-requests-title'), 'Requests');
      assert.deepEqual(await legend(viewer, 'chart-requests'), [['', 'Total'], ['Requests', '5'], ['Errors', '0'], ['Rejected', '1']]);
      assert.deepEqual(await legend(viewer, 'chart-tokens'), [['', 'Total'], ['Prompt', '48'], ['Completion', '12']]);
      assert.equal(await viewer.textContent('#usage-live-requests'), '5');
      assert.ok(await viewer.locator('#usage-split').isHidden(), 'no "by" picker');
      assert.ok(await viewer.locator('#usage-top').isHidden(), 'no top consumers');
      assert.ok(await viewer.locator('#usage-limits').isHidden(), 'no limits');
      assert.ok(await viewer.locator('#chart-errors-card').isHidden());
      assert.equal(await viewer.locator('#usage-top-rows tr, #usage-limit-rows tr').count(), 0);
      // The period picker is theirs too.
      await viewer.click('#usage-period [data-period="week"]');
      await viewer.locator('#usage-period-note', { hasText: 'the last 7 days, per hour' }).waitFor();
      assert.deepEqual(await legend(viewer, 'chart-requests'), [['', 'Total'], ['Requests', '5'], ['Errors', '0'], ['Rejected', '1']]);
      assert.deepEqual(refused, [], 'the page asks a viewer only for what a viewer may see');
    } finally {
      await ctx.close();
    }
  });

  test('no page error and no CSP violation happened on the usage page', async () => {
    assert.deepEqual(await p.evaluate(() => window.cspViolations), []);
    assert.deepEqual(problems, []);
  });
});

describe('dashboard: deployments', { timeout: 120_000 }, () => {
  const NAME = 'qwen-coder';
  const MODEL = 'qwen2.5-coder-7b';
  const SOURCE = 'https://models.example/qwen2.5-coder-7b-q4_k_m.gguf';
  const SHA256 = 'ab'.repeat(32);
  const managed = {};
  let deployBrowser;
  let p;
  let deployment;

  /** A heartbeat of an agent started with --manage-runtimes: its replicas' states; answers the assignments. */
  async function agentBeat(node, replicas, ready = []) {
    const answer = await expectStatus(call('POST', '/v0/health', {
      nodeToken: node.token,
      body: { node_id: node.id, cpu_usage: 10, memory_usage: 30, ready_models: ready, loaded_models: ready, replicas },
    }), 200);
    assert.ok(Array.isArray(answer.assignments), JSON.stringify(answer));
    return answer.assignments;
  }

  /** A node registered through the API whose agent starts llama.cpp itself, approved. */
  async function managedNode(machineName, ip) {
    const node = await registerNode({
      machine_name: machineName, ip_address: ip, runtime_version: 'llm-node managed',
      supported_runtimes: ['managed:llama_cpp'], gpu_devices: [{ ...H100, count: 1 }],
    });
    await expectStatus(call('POST', `/v0/nodes/${node.id}/approve`, { token: adminToken }), 200);
    await agentBeat(node, []);
    return node;
  }

  const card = (page, name) => page.locator('article.deployment', { has: page.locator('.deploy-name', { hasText: new RegExp(`^${name}$`) }) });
  const replica = (page, slot) => card(page, NAME).locator(`tr.replica[data-slot="${slot}"]`);
  const report = (state, extra = {}) => ({ deployment_id: deployment.id, revision: 1, state, restarts: 0, ...extra });

  before(async () => {
    const started = await startRouter();
    router = started.child;
    base = `http://127.0.0.1:${started.port}`;
    const login = await expectStatus(call('POST', '/v0/auth/login', { body: { username: 'admin', password: ADMIN_PASSWORD } }), 200);
    adminToken = login.token;
    await expectStatus(call('POST', '/v0/users', {
      token: adminToken, body: { username: 'viewer', password: VIEWER_PASSWORD, role: 'viewer' },
    }), 201);
    managed.one = await managedNode('gpu-managed-01', '10.30.0.1');

    deployBrowser = await launchChromium();
    p = await newPage(await deployBrowser.newContext({ viewport: { width: 1440, height: 900 }, locale: 'en-US', colorScheme: 'light' }));
    await recordCspViolations(p);
  });

  after(async () => {
    await deployBrowser?.close().catch(() => {});
    await stopRouter(router, dataDir);
  });

  test('an administrator creates a deployment from the form; its replica is placed on the managed node', async () => {
    await signIn(p, 'admin', ADMIN_PASSWORD);
    await p.click('#nav-deployments');
    await p.locator('#view-deployments').waitFor();
    assert.equal(await p.locator('#nav-deployments').getAttribute('aria-current'), 'page');
    await p.locator('#deploy-empty').waitFor();
    assert.ok(await p.locator('#deploy-readonly').isHidden());

    assert.ok(await p.locator('#deploy-form').isHidden(), 'the form opens on demand');
    await p.click('#deploy-new > summary');
    await p.fill('#deploy-name', NAME);
    await p.fill('#deploy-model', MODEL);
    await p.fill('#deploy-source', SOURCE);
    await p.fill('#deploy-sha256', SHA256.toUpperCase());
    await p.selectOption('#deploy-runtime', 'llama_cpp');
    await p.fill('#deploy-args', '  --ctx-size 4096\t--flash-attn ');
    await p.fill('#deploy-replicas', '1');
    await p.fill('#deploy-gpu-memory', '');
    await p.fill('#deploy-tags', '');
    await p.click('#deploy-create');

    const created = card(p, NAME);
    await replica(p, 0).locator('.replica-node', { hasText: 'gpu-managed-01' }).waitFor();
    await replica(p, 0).locator('.badge', { hasText: 'pending' }).waitFor();
    assert.ok(await p.locator('#deploy-empty').isHidden());
    assert.equal(await p.inputValue('#deploy-name'), '', 'the form is cleared once created');
    assert.ok(await p.locator('#deploy-form').isHidden(), 'and closed');
    deployment = await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 200);
    assert.equal(deployment.model, MODEL);
    assert.equal(deployment.runtime, 'llama_cpp');
    assert.equal(deployment.sha256, SHA256);
    assert.deepEqual(deployment.args, ['--ctx-size', '4096', '--flash-attn'], 'the arguments are split on whitespace');
    assert.equal(deployment.gpu_memory_bytes, null);
    assert.equal(await created.getAttribute('data-deployment-id'), deployment.id);
    assert.equal(await created.locator('.model').textContent(), MODEL);
    assert.equal(await created.locator('.deploy-runtime').textContent(), 'llama.cpp');
    assert.equal(await created.locator('.deploy-revision').textContent(), 'revision 1');
    assert.equal(await created.locator('.deploy-ready').textContent(), '0 / 1 ready');
    assert.equal(await replica(p, 0).locator('.replica-details').textContent(), deployment.replica_states[0].reason ?? '');
    assert.match(await created.locator('.deploy-spec').textContent(), /--ctx-size 4096 --flash-attn/);
  });

  test('the agent\'s heartbeats show the download\'s progress, then the replica ready; a refresh keeps what is typed', async () => {
    // The operator types in the form meanwhile: the refreshes that show the progress must leave it alone.
    await p.click('#deploy-new > summary');
    await p.click('#deploy-name');
    await p.keyboard.type('half-typed');
    const assignments = await agentBeat(managed.one, [report('downloading', { bytes_done: 1.5 * GiB, bytes_total: 4 * GiB })]);
    assert.deepEqual(assignments.map((a) => [a.deployment_id, a.revision, a.model, a.source]), [[deployment.id, 1, MODEL, SOURCE]]);
    await replica(p, 0).locator('.badge', { hasText: 'downloading' }).waitFor();
    assert.equal(await replica(p, 0).locator('.replica-download').textContent(), '37% · 1.5 GiB of 4 GiB');
    const bar = await replica(p, 0).locator('progress').evaluate((node) => [node.value, node.max]);
    assert.deepEqual(bar, [1.5 * GiB, 4 * GiB]);

    await agentBeat(managed.one, [report('downloading', { bytes_done: 3 * GiB, bytes_total: 4 * GiB })]);
    await replica(p, 0).locator('.replica-download', { hasText: '75% · 3 GiB of 4 GiB' }).waitFor();
    await agentBeat(managed.one, [report('ready', {
      bytes_done: 4 * GiB, bytes_total: 4 * GiB, port: 41001, pid: 4242, download_ms: 5200, start_ms: 1800, gpus: [0, 1],
    })], [MODEL]);
    await card(p, NAME).locator('.deploy-ready', { hasText: '1 / 1 ready' }).waitFor();
    await replica(p, 0).locator('.badge', { hasText: 'ready' }).waitFor();
    assert.equal(await replica(p, 0).locator('.replica-details').textContent(), 'GPUs 0, 1 · port 41001 · started in 1,800 ms');
    assert.equal(await replica(p, 0).locator('.replica-download').textContent(), 'in 5,200 ms');
    assert.equal(await replica(p, 0).locator('.replica-restarts').textContent(), '0');

    assert.equal(await p.evaluate(() => document.activeElement?.id), 'deploy-name', 'the focus stayed in the form');
    assert.equal(await p.inputValue('#deploy-name'), 'half-typed');
    await p.fill('#deploy-name', '');
  });

  test('a bad form shows the router\'s message and creates nothing', async () => {
    const expected = await expectStatus(call('POST', '/v0/deployments', {
      token: adminToken, body: { name: 'no-hash', model: 'm', source: 'https://models.example/m.gguf', runtime: 'llama_cpp', replicas: 1 },
    }), 400);
    await p.fill('#deploy-name', 'no-hash');
    await p.fill('#deploy-model', 'm');
    await p.fill('#deploy-source', 'https://models.example/m.gguf');
    await p.click('#deploy-create');
    await p.locator('#deploy-form-error').waitFor();
    assert.equal(await p.textContent('#deploy-form-error'), expected.error.message);
    assert.match(expected.error.message, /sha256/);
    assert.equal(await p.inputValue('#deploy-source'), 'https://models.example/m.gguf', 'what was typed stays to be fixed');

    // A name that is taken: the 409's message.
    await p.fill('#deploy-name', NAME);
    await p.fill('#deploy-sha256', SHA256);
    await p.click('#deploy-create');
    await p.locator('#deploy-form-error', { hasText: /exists|taken|already/i }).waitFor();

    const { deployments } = await expectStatus(call('GET', '/v0/deployments', { token: adminToken }), 200);
    assert.deepEqual(deployments.map((d) => d.name), [NAME]);
    assert.equal(await p.locator('article.deployment').count(), 1);
    await p.locator('#deploy-form').evaluate((form) => form.reset());
    assert.ok(await p.locator('#deploy-form-error').isHidden(), 'a reset form shows no error');
    await p.click('#deploy-new > summary');
    await p.locator('#deploy-form').waitFor({ state: 'hidden' });
  });

  test('scale to 2: the second replica waits, pending with the reason, until another node can take it', async () => {
    const scale = card(p, NAME).locator('.deploy-scale-input');
    assert.equal(await scale.inputValue(), '1');
    await scale.fill('2');
    await card(p, NAME).locator('.act-scale').click();
    await replica(p, 1).locator('.badge', { hasText: 'pending' }).waitFor();
    await card(p, NAME).locator('.deploy-ready', { hasText: '1 / 2 ready' }).waitFor();
    const seen = await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 200);
    assert.equal(seen.replicas, 2);
    const reason = seen.replica_states[1].reason;
    assert.match(reason, /no node can take it/);
    await replica(p, 1).locator('.replica-details', { hasText: reason }).waitFor();
    assert.equal(await replica(p, 1).locator('.replica-node').textContent(), 'not placed');
    assert.equal(await scale.inputValue(), '2');

    // A second managed node joins: the replica goes there, and its download shows.
    managed.two = await managedNode('gpu-managed-02', '10.30.0.2');
    await replica(p, 1).locator('.replica-node', { hasText: 'gpu-managed-02' }).waitFor();
    await agentBeat(managed.two, [report('downloading', { bytes_done: 2.5 * GiB, bytes_total: 4 * GiB })]);
    await replica(p, 1).locator('.replica-download', { hasText: '62% · 2.5 GiB of 4 GiB' }).waitFor();
    await agentBeat(managed.one, [report('ready', { port: 41001, start_ms: 1800, download_ms: 5200 })], [MODEL]);
    await screenshot(p, 'deployments.png', { fullPage: true });
  });

  test('edit: new arguments are revision 2; a new URL without its sha256 is refused with the router\'s message', async () => {
    const c = card(p, NAME);
    await c.locator('.act-edit').click();
    await c.locator('.deploy-edit').waitFor();
    assert.equal(await c.locator('.edit-args').inputValue(), '--ctx-size 4096 --flash-attn');
    assert.equal(await c.locator('.edit-source').inputValue(), SOURCE);
    await c.locator('.edit-args').fill('--ctx-size 8192  --flash-attn');
    // A refresh while the form is open leaves it as typed.
    await agentBeat(managed.two, [report('downloading', { bytes_done: 3.5 * GiB, bytes_total: 4 * GiB })]);
    await replica(p, 1).locator('.replica-download', { hasText: '87%' }).waitFor();
    assert.equal(await c.locator('.edit-args').inputValue(), '--ctx-size 8192  --flash-attn');
    await c.locator('.act-save').click();
    await c.locator('.deploy-revision', { hasText: 'revision 2' }).waitFor();
    assert.ok(await c.locator('.deploy-edit').isHidden());
    const changed = await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 200);
    assert.deepEqual(changed.args, ['--ctx-size', '8192', '--flash-attn']);
    assert.equal(changed.revision, 2);
    // The ready replica runs revision 1 until the agent rolls it.
    await replica(p, 0).locator('.replica-details', { hasText: 'runs revision 1' }).waitFor();
    const assignments = await agentBeat(managed.one, [report('ready', { port: 41001 })], [MODEL]);
    assert.deepEqual(assignments.map((a) => [a.revision, a.args]), [[2, ['--ctx-size', '8192', '--flash-attn']]]);

    await c.locator('.act-edit').click();
    await c.locator('.edit-source').fill('https://models.example/qwen2.5-coder-7b-q8_0.gguf');
    await c.locator('.edit-sha256').fill('');
    await c.locator('.act-save').click();
    await c.locator('.deploy-error', { hasText: /sha256/ }).waitFor();
    assert.equal((await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 200)).revision, 2);
    await c.locator('.edit-sha256').fill('cd'.repeat(32));
    await c.locator('.act-save').click();
    await c.locator('.deploy-revision', { hasText: 'revision 3' }).waitFor();
    assert.ok(await c.locator('.deploy-error').isHidden());
    const moved = await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 200);
    assert.equal(moved.source, 'https://models.example/qwen2.5-coder-7b-q8_0.gguf');
    assert.equal(moved.sha256, 'cd'.repeat(32));
  });

  test('a deployment name with markup is shown as text and runs nothing', async () => {
    await expectStatus(call('POST', '/v0/deployments', {
      token: adminToken,
      body: {
        name: XSS_NAME, model: '<b>bold</b>', source: 'file:///models/<i>x</i>.gguf', runtime: 'vllm',
        args: ['<script>alert(3)</script>'], replicas: 0, node_selector: { tags: ['<svg onload=alert(2)>'] },
      },
    }), 201);
    const xss = card(p, XSS_NAME.replace(/[()]/g, '\\$&'));
    await xss.waitFor();
    assert.equal(await xss.locator('.deploy-name').textContent(), XSS_NAME);
    assert.equal(await xss.locator('.model').textContent(), '<b>bold</b>');
    assert.match(await xss.locator('.deploy-spec').textContent(), /<script>alert\(3\)<\/script>/);
    assert.equal(await xss.locator('.deploy-ready').textContent(), '0 / 0 ready');
    assert.equal(await p.locator('#view-deployments img, #view-deployments svg, #view-deployments script, #view-deployments b, #view-deployments i').count(), 0);
    assert.deepEqual(dialogs, [], 'no dialog fired');

    // Delete asks first, the name as text in the question.
    await xss.locator('.act-delete').click();
    await p.locator('#confirm').waitFor();
    assert.equal(await p.textContent('#confirm-title'), `Delete deployment “${XSS_NAME}”?`);
    await p.click('#confirm-cancel');
    await p.locator('#confirm').waitFor({ state: 'hidden' });
    assert.equal(await xss.count(), 1);
    await xss.locator('.act-delete').click();
    await p.click('#confirm-ok');
    await xss.waitFor({ state: 'detached' });
    assert.deepEqual((await expectStatus(call('GET', '/v0/deployments', { token: adminToken }), 200)).deployments.map((d) => d.name), [NAME]);
  });

  test('a viewer sees the deployments and their replicas, but no create, scale, edit or delete controls', async () => {
    const ctx = await deployBrowser.newContext({ viewport: { width: 1440, height: 900 }, locale: 'en-US' });
    try {
      const viewer = await newPage(ctx);
      await signIn(viewer, 'viewer', VIEWER_PASSWORD);
      assert.ok(await viewer.locator('#nav-deployments').isVisible());
      await viewer.click('#nav-deployments');
      await viewer.locator('tr.replica[data-slot="1"] .replica-node', { hasText: 'gpu-managed-02' }).waitFor();
      assert.equal(await card(viewer, NAME).locator('.deploy-revision').textContent(), 'revision 3');
      await viewer.locator('#deploy-readonly').waitFor();
      assert.ok(await viewer.locator('#deploy-new').isHidden(), 'no create form');
      assert.equal(await viewer.locator('.act-scale, .act-edit, .act-delete, .deploy-scale-input, .deploy-edit').count(), 0);
      const refused = await viewer.evaluate(async (id) => {
        const response = await fetch(`/v0/deployments/${id}`, {
          method: 'PATCH',
          credentials: 'same-origin',
          headers: { 'X-Requested-With': 'llm-router-dashboard', 'Content-Type': 'application/json' },
          body: JSON.stringify({ replicas: 5 }),
        });
        return response.status;
      }, deployment.id);
      assert.equal(refused, 403);
    } finally {
      await ctx.close();
    }
  });

  test('Delete asks for confirmation; confirming removes the deployment and the nodes\' assignments', async () => {
    const c = card(p, NAME);
    await c.locator('.act-delete').click();
    await p.locator('#confirm').waitFor();
    assert.match(await p.textContent('#confirm-text'), /2 replicas stop/);
    await p.click('#confirm-ok');
    await c.waitFor({ state: 'detached' });
    await p.locator('#deploy-empty').waitFor();
    await expectStatus(call('GET', `/v0/deployments/${NAME}`, { token: adminToken }), 404);
    assert.deepEqual(await agentBeat(managed.one, []), []);
    assert.deepEqual(await agentBeat(managed.two, []), []);
  });

  test('no page error and no CSP violation happened on the deployments page', async () => {
    assert.deepEqual(await p.evaluate(() => window.cspViolations), []);
    assert.deepEqual(problems, []);
  });
});
