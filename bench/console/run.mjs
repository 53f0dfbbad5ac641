#!/usr/bin/env node
// Web console benchmark: a real headless Chromium against the control plane
// of `cluster-scale --serve-console` (in-process server on the embedded
// store, simulated hosts, 1,000 stopped VMs). See README.md.
//
//   node bench/console/run.mjs --bin target/release/cluster-scale [--rounds 5]
//       [--warmup 1] [--hosts 40] [--vms 1000] [--idle 10] [--out FILE.json]
//   node bench/console/run.mjs --url URL --token TOKEN ...   (a running server)
//
// Per round (a fresh browser context each: cold HTTP cache, empty storage,
// the token put in localStorage before the page's scripts run):
//   - the bare API call first (the baseline): GET /v1/instances?limit=1000
//     from node, the page size the console uses;
//   - navigation to /ui/#/instances, timed inside the page from navigation
//     start: first contentful paint, the last VM's row in the DOM, the frame
//     after it, and "interactive": the search box is given a name at once
//     (in the first task after the rows appear) and the time until that row
//     is the only one left (and the frame after it);
//   - bytes (CDP Network.loadingFinished encodedDataLength: on the wire,
//     headers included) and requests until interactive;
//   - calls made while the page idles (--idle seconds);
//   - one VM started through the API (POST .../start from the page's
//     context, so every time is on one clock) and the time until its row's
//     state changes, with the started event's time and the console's
//     refetch of the one object in between.
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpus, loadavg } from 'node:os';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../..');
const { chromium } = await import(join(root, 'ui/node_modules/playwright-core/index.mjs'));

const opts = {
  bin: join(root, 'target/release/cluster-scale'),
  rounds: 5, warmup: 1, hosts: 40, vms: 1000, idle: 10, out: null, url: null, token: null,
  project: 'default', trace: 0, last: null, chromium: process.env.SV_CHROMIUM || '/usr/bin/chromium', baselineCalls: 5,
};
{
  const a = process.argv.slice(2);
  for (let i = 0; i < a.length; i++) {
    const k = a[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(k in opts)) { console.error(`unknown argument ${a[i]}`); process.exit(2); }
    const v = a[++i];
    opts[k] = typeof opts[k] === 'number' ? Number(v) : v;
  }
}

const t0 = Date.now();
const log = (m) => console.error(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pad = (n) => `vm-${String(n).padStart(5, '0')}`;

// ---- the server ----
let server = null;
let info;
if (opts.url) {
  info = { url: opts.url, token: opts.token, project: opts.project, vms: opts.vms, last: pad(opts.vms - 1) };
} else {
  log(`starting ${opts.bin} --serve-console (${opts.hosts} hosts, ${opts.vms} VMs)`);
  server = spawn(opts.bin, ['--store', 'embedded', '--hosts', String(opts.hosts), '--vms', String(opts.vms), '--serve-console'],
    { stdio: ['pipe', 'pipe', 'inherit'] });
  info = await new Promise((res, rej) => {
    let buf = '';
    server.stdout.on('data', (d) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) { try { res(JSON.parse(buf.slice(0, nl))); } catch (e) { rej(e); } }
    });
    server.on('exit', (c) => rej(new Error(`cluster-scale exited (${c}) before it was ready`)));
  });
  log(`server ready: ${info.url}, ${info.vms} VMs (${info.reported} reported) on ${info.hosts} hosts`);
}
// The row whose appearance means "the list is shown" (default: the last VM).
if (opts.last) info.last = opts.last;
async function stopServer() {
  if (!server || server.exitCode != null) return;
  const exited = new Promise((r) => server.on('exit', r));
  server.stdin.end();
  const t = setTimeout(() => server.kill('SIGTERM'), 15000);
  await exited;
  clearTimeout(t);
}
process.on('SIGINT', async () => { await stopServer(); process.exit(130); });

const H = { authorization: `Bearer ${info.token}`, 'x-skyvisor-project': info.project, accept: 'application/json' };
const LIST = '/v1/instances?limit=1000';

// ---- the baseline: the bare list call ----
async function bareList() {
  const s = performance.now();
  const r = await fetch(info.url + LIST, { headers: H });
  const text = await r.text();
  const e = performance.now();
  const items = JSON.parse(text);
  return { ms: e - s, parseMs: performance.now() - e, bytes: Buffer.byteLength(text), count: items.length, encoding: r.headers.get('content-encoding') };
}

async function api(method, path, body) {
  const r = await fetch(info.url + path, { method, headers: { ...H, ...(body ? { 'content-type': 'application/json' } : {}) }, body: body ? JSON.stringify(body) : undefined });
  const text = await r.text();
  return { status: r.status, json: text ? JSON.parse(text) : null };
}

// ---- the page ----
function classify(url) {
  const u = new URL(url);
  const p = u.pathname;
  if (p.startsWith('/ui')) return 'assets';
  if (p === '/v1/instances') return 'list';
  if (p.startsWith('/v1/instances/')) return 'item';
  if (p === '/v1/top/instances') return 'top';
  if (p === '/v1/events/stream') return 'stream';
  return 'api-other';
}

// Runs in the page before its own scripts.
function initScript(cfg) {
  if (location.pathname.startsWith('/ui')) { try { localStorage.setItem('skyvisor.token', cfg.token); } catch { /* */ } }
  const b = window.__bench = { longTasks: [], changes: [] };
  const obs = (type, fn) => { try { new PerformanceObserver((l) => l.getEntries().forEach(fn)).observe({ type, buffered: true }); } catch { /* */ } };
  obs('longtask', (e) => b.longTasks.push([e.startTime, e.duration]));
  obs('largest-contentful-paint', (e) => { b.lcp = e.startTime; });
  obs('paint', (e) => { if (e.name === 'first-contentful-paint') b.fcp = e.startTime; });
  const afterFrame = (key) => requestAnimationFrame(() => { b[`${key}Frame`] = performance.now(); setTimeout(() => { b[`${key}Painted`] = performance.now(); }, 0); });
  const rows = () => document.querySelectorAll('tr[data-testid^="instance-row-"]');
  const lastSel = `[data-testid="instance-row-${cfg.last}"]`;
  const probe = () => {
    const input = document.querySelector('[data-testid="instance-search"]');
    b.typeAt = performance.now();
    input.value = cfg.target;
    input.dispatchEvent(new Event('input', { bubbles: true }));
    const alone = () => { const r = rows(); return r.length === 1 && r[0].dataset.testid === `instance-row-${cfg.target}`; };
    const done = () => { b.filtered = performance.now(); afterFrame('filtered'); };
    if (alone()) { done(); return; }
    const mo = new MutationObserver(() => { if (alone()) { mo.disconnect(); done(); } });
    mo.observe(document.body, { childList: true, subtree: true });
  };
  const mo = new MutationObserver(() => {
    // The list is shown: every row, or its first page and the line that
    // says how many more there are.
    const shown = document.querySelector(lastSel) || document.querySelector('[data-testid="instances-more"]');
    if (b.rowsInDom || !shown) return;
    mo.disconnect();
    b.rowsInDom = performance.now();
    b.rowCount = rows().length;
    b.rowNodes = document.getElementsByTagName('*').length;
    afterFrame('rows');
    setTimeout(probe, 0);
  });
  mo.observe(document, { childList: true, subtree: true });
}

// Self time per trace event name on the page's renderer main thread
// (complete events nested by time), from navigation to interactive.
function traceSummary(buf) {
  const j = JSON.parse(buf.toString());
  const evs = Array.isArray(j) ? j : j.traceEvents;
  const mains = new Set(evs.filter((e) => e.ph === 'M' && e.name === 'thread_name' && e.args.name === 'CrRendererMain').map((e) => `${e.pid}:${e.tid}`));
  const by = new Map();
  for (const e of evs) {
    const k = `${e.pid}:${e.tid}`;
    if (!mains.has(k) || e.ph !== 'X' || e.dur == null) continue;
    if (!by.has(k)) by.set(k, []);
    by.get(k).push(e);
  }
  let best = null;
  for (const [k, list] of by) {
    // The page's thread: the one that laid the table out.
    const top = list.filter((e) => e.name === 'Layout').reduce((s, e) => s + e.dur, 0);
    if (!best || top > best.top) best = { k, list, top };
  }
  if (!best) return null;
  const list = best.list.sort((a, b) => a.ts - b.ts || b.dur - a.dur);
  const self = new Map();
  const stack = [];
  for (const e of list) {
    while (stack.length && stack[stack.length - 1].ts + stack[stack.length - 1].dur <= e.ts) stack.pop();
    const parent = stack[stack.length - 1];
    if (parent) self.set(parent.name, (self.get(parent.name) || 0) - Math.min(e.dur, parent.ts + parent.dur - e.ts));
    self.set(e.name, (self.get(e.name) || 0) + e.dur);
    stack.push(e);
  }
  return { layoutMs: best.top / 1000, busyMs: best.list.filter((e) => e.name === 'RunTask').reduce((s, e) => s + e.dur, 0) / 1000, selfMs: Object.fromEntries([...self].map(([n, us]) => [n, us / 1000]).filter(([, ms]) => ms >= 1).sort((a, b) => b[1] - a[1])) };
}

async function pageRound(browser, round, trace = false) {
  const target = pad(Math.floor(info.vms / 2));
  // Among the first rows (the list renders its first 100 at once).
  const changed = pad(1 + round);
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  await context.addInitScript(initScript, { token: info.token, last: info.last, target });
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  const reqs = new Map();
  cdp.on('Network.requestWillBeSent', (e) => reqs.set(e.requestId, { url: e.request.url, method: e.request.method, kind: classify(e.request.url), ts: e.timestamp, bytes: 0, done: false }));
  cdp.on('Network.responseReceived', (e) => { const r = reqs.get(e.requestId); if (r) { r.status = e.response.status; r.encoding = e.response.headers['content-encoding'] || e.response.headers['Content-Encoding'] || null; } });
  cdp.on('Network.dataReceived', (e) => { const r = reqs.get(e.requestId); if (r) r.streamed = (r.streamed || 0) + e.encodedDataLength; });
  cdp.on('Network.loadingFinished', (e) => { const r = reqs.get(e.requestId); if (r) { r.bytes = e.encodedDataLength; r.done = true; } });
  await cdp.send('Network.enable');
  await cdp.send('Performance.enable');

  if (trace) await browser.startTracing(page, { categories: ['devtools.timeline', 'disabled-by-default-devtools.timeline', 'v8.execute', 'toplevel', 'v8'] });
  await page.goto(`${info.url}/ui/#/instances`, { waitUntil: 'commit' });
  // (waitForFunction's polling evaluates strings, which the console's CSP forbids.)
  for (const until = Date.now() + 120000; ;) {
    if (await page.evaluate(() => !!(window.__bench && window.__bench.filteredPainted))) break;
    if (Date.now() > until) throw new Error('the list did not become interactive within 120 s');
    await sleep(100);
  }
  if (trace) {
    const summary = traceSummary(await browser.stopTracing());
    const w = await page.evaluate(() => ({ interactive: window.__bench.filteredPainted, rows: window.__bench.rowsPainted, longTasks: window.__bench.longTasks }));
    await context.close();
    return { ...summary, ...w };
  }
  const perf = Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((m) => [m.name, m.value]));
  // Everything on the wire until interactive (the event stream: what came so far).
  const loadReqs = [...reqs.values()];
  const wire = (r) => (r.done ? r.bytes : (r.streamed || 0));
  const byKind = {};
  for (const r of loadReqs) byKind[r.kind] = (byKind[r.kind] || 0) + wire(r);
  const load = {
    requests: loadReqs.length,
    bytes: loadReqs.reduce((s, r) => s + wire(r), 0),
    byKind,
    listCalls: loadReqs.filter((r) => r.kind === 'list').length,
    listEncoding: (loadReqs.find((r) => r.kind === 'list') || {}).encoding || null,
    urls: loadReqs.map((r) => `${r.method} ${new URL(r.url).pathname}${new URL(r.url).search} ${wire(r)}${r.encoding ? ` ${r.encoding}` : ''}`),
  };
  const b = await page.evaluate((list) => {
    const w = window.__bench;
    const nav = performance.getEntriesByType('navigation')[0];
    const res = (pred) => performance.getEntriesByType('resource').filter((e) => pred(new URL(e.name)))
      .map((e) => ({ start: e.startTime, end: e.responseEnd, ttfb: e.responseStart }));
    return {
      ...w, longTasks: w.longTasks.slice(),
      html: nav && nav.responseEnd, domContentLoaded: nav && nav.domContentLoadedEventEnd,
      appJs: res((u) => u.pathname.endsWith('/assets/app.js'))[0],
      whoami: res((u) => u.pathname === '/v1/whoami')[0],
      projects: res((u) => u.pathname === '/v1/projects')[0],
      list: res((u) => u.pathname + u.search === list)[0],
      top: res((u) => u.pathname === '/v1/top/instances')[0],
      nodes: w.rowNodes,
    };
  }, LIST);
  const before = (t) => b.longTasks.filter(([s]) => s < t);

  // Back to the full list.
  const restoreMs = await page.evaluate(() => new Promise((res) => {
    const input = document.querySelector('[data-testid="instance-search"]');
    const s = performance.now();
    input.value = '';
    input.dispatchEvent(new Event('input', { bubbles: true }));
    const mo = new MutationObserver(() => {
      if (document.querySelectorAll('tr[data-testid^="instance-row-"]').length > 1) { mo.disconnect(); requestAnimationFrame(() => setTimeout(() => res(performance.now() - s), 0)); }
    });
    mo.observe(document.body, { childList: true, subtree: true });
  }));

  // Idle: what the page calls by itself.
  const idleFrom = new Set(reqs.keys());
  const ltFrom = (await page.evaluate(() => window.__bench.longTasks.length));
  await sleep(opts.idle * 1000);
  const idleReqs = [...reqs.entries()].filter(([id]) => !idleFrom.has(id)).map(([, r]) => r);
  const idleLong = (await page.evaluate(() => window.__bench.longTasks.slice()))
    .slice(ltFrom);
  const idle = {
    seconds: opts.idle,
    byKind: idleReqs.reduce((m, r) => ({ ...m, [r.kind]: (m[r.kind] || 0) + 1 }), {}),
    bytes: idleReqs.reduce((s, r) => s + wire(r), 0),
    longTasks: idleLong.length,
    longTaskMs: idleLong.reduce((s, [, d]) => s + d, 0),
  };

  // A change through the API, seen in the row.
  const change = await page.evaluate(({ name, token, project }) => new Promise((res) => {
    const sel = `[data-testid="instance-row-${name}"] [data-testid="instance-state"]`;
    const state = () => { const c = document.querySelector(sel); return c && c.dataset.state; };
    const out = { name, before: state(), changes: [], timeOrigin: performance.timeOrigin };
    let last = out.before;
    const finish = (why) => { mo.disconnect(); clearTimeout(t); out.why = why; res(out); };
    const mo = new MutationObserver(() => {
      const s = state();
      if (s !== last) { last = s; out.changes.push([s, performance.now()]); if (s === 'running' || s === 'failed') finish('final'); }
    });
    mo.observe(document.querySelector('[data-testid="instances-table"]'), { childList: true, subtree: true, attributes: true, attributeFilter: ['data-state'] });
    const t = setTimeout(() => finish('timeout'), 30000);
    out.t0 = performance.now();
    fetch(`/v1/instances/${name}/start`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'x-skyvisor-project': project } })
      .then((r) => { out.status = r.status; out.tResp = performance.now(); });
  }), { name: changed, token: info.token, project: info.project });
  await sleep(300); // let a trailing refetch land in the resource timing buffer
  change.refetches = await page.evaluate(({ name, t0 }) => performance.getEntriesByType('resource')
    .filter((e) => new URL(e.name).pathname === `/v1/instances/${name}` && e.startTime >= t0)
    .map((e) => [e.startTime, e.responseEnd]), { name: changed, t0: change.t0 });
  const ev = await api('GET', `/v1/events?instance=${changed}&limit=20`);
  const evs = Array.isArray(ev.json) ? ev.json : (ev.json && (ev.json.items || ev.json.events)) || [];
  change.events = evs.map((e) => [e.kind, Date.parse(e.at) - change.timeOrigin]).filter(([, at]) => at >= change.t0 - 50);
  await api('POST', `/v1/instances/${changed}/stop`, { force: true });

  await context.close();
  return { b, perf, load, idle, restoreMs, change, before };
}

// ---- rounds ----
const machine = { nproc: cpus().length, loadavg: loadavg(), started: new Date().toISOString() };
const browser = await chromium.launch({ executablePath: opts.chromium, args: ['--no-sandbox'], headless: true });
const rounds = [];
let traced = null;
try {
  await bareList(); // connection and server caches warm
  for (let i = 0; i < opts.warmup + opts.rounds; i++) {
    const warm = i < opts.warmup;
    const base = [];
    for (let k = 0; k < opts.baselineCalls; k++) base.push(await bareList());
    const p = await pageRound(browser, i);
    const { b, load, change } = p;
    const first = change.changes[0];
    const started = change.events.find(([k]) => k === 'started' || k === 'failed');
    const lastRefetch = change.refetches[change.refetches.length - 1];
    const r = {
      round: warm ? `warmup ${i + 1}` : i - opts.warmup + 1,
      warmup: warm,
      baselineMs: median(base.map((x) => x.ms)),
      baselineParseMs: median(base.map((x) => x.parseMs)),
      baselineBytes: base[0].bytes,
      baselineEncoding: base[0].encoding,
      baselineCount: base[0].count,
      fcp: b.fcp, lcp: b.lcp, html: b.html, domContentLoaded: b.domContentLoaded,
      appJsEnd: b.appJs && b.appJs.end,
      whoamiStart: b.whoami && b.whoami.start, whoamiEnd: b.whoami && b.whoami.end,
      projectsEnd: b.projects && b.projects.end,
      listStart: b.list && b.list.start, listTtfb: b.list && b.list.ttfb, listEnd: b.list && b.list.end,
      listInPageMs: b.list && b.list.end - b.list.start,
      rowsInDom: b.rowsInDom, rowsPainted: b.rowsPainted, rowCount: b.rowCount,
      renderMs: b.list && b.rowsInDom - b.list.end,
      listToPainted: b.list && b.rowsPainted - b.list.end,
      listToInteractive: b.list && b.filteredPainted - b.list.end,
      interactive: b.filteredPainted, filterMs: b.filteredPainted - b.typeAt,
      typeDelayMs: b.typeAt - b.rowsInDom,
      restoreMs: p.restoreMs,
      longTasksToInteractive: p.before(b.filteredPainted).length,
      longTaskMsToInteractive: p.before(b.filteredPainted).reduce((s, [, d]) => s + d, 0),
      longestTaskMs: Math.max(0, ...p.before(b.filteredPainted).map(([, d]) => d)),
      scriptMs: p.perf.ScriptDuration * 1000, layoutMs: p.perf.LayoutDuration * 1000,
      styleMs: p.perf.RecalcStyleDuration * 1000, taskMs: p.perf.TaskDuration * 1000,
      heapMiB: p.perf.JSHeapUsedSize / 1048576, domNodes: b.nodes,
      loadBytes: load.bytes, loadRequests: load.requests, loadByKind: load.byKind,
      listCallsLoad: load.listCalls, listEncoding: load.listEncoding, loadUrls: load.urls,
      idle: p.idle,
      changeName: change.name, changeStatus: change.status, changeWhy: change.why,
      changePostMs: change.tResp - change.t0,
      changeStates: change.changes.map(([s, t]) => `${s}@${(t - change.t0).toFixed(0)}`),
      changeVisibleMs: first ? first[1] - change.t0 : null,
      changeFinalMs: change.changes.length ? change.changes[change.changes.length - 1][1] - change.t0 : null,
      changeEvents: change.events.map(([k, t]) => `${k}@${(t - change.t0).toFixed(0)}`),
      changeRefetches: change.refetches.map(([s, e]) => `${(s - change.t0).toFixed(0)}-${(e - change.t0).toFixed(0)}`),
      // The console's part: from the agent's started event (its clock, ms)
      // to the row, and from the last refetch's answer to the row.
      eventToRowMs: started && first ? change.changes[change.changes.length - 1][1] - change.t0 - (started[1] - change.t0) : null,
      refetchToRowMs: lastRefetch && change.changes.length ? change.changes[change.changes.length - 1][1] - lastRefetch[1] : null,
    };
    r.interactiveRatio = r.interactive / r.baselineMs;
    r.rowsRatio = r.rowsPainted / r.baselineMs;
    rounds.push(r);
    log(`round ${r.round}: list ${r.baselineMs.toFixed(1)} ms bare; rows ${r.rowsPainted.toFixed(0)} ms, interactive ${r.interactive.toFixed(0)} ms (${r.interactiveRatio.toFixed(1)}x), ${load.requests} requests ${(load.bytes / 1024).toFixed(0)} KiB, list calls ${load.listCalls}, idle ${JSON.stringify(p.idle.byKind)}, change ${r.changeStates.join(' ')} events ${r.changeEvents.join(' ')} refetches ${r.changeRefetches.join(' ')}`);
  }
  if (opts.trace) {
    const t = await pageRound(browser, 99, true);
    traced = t;
    log(`traced round: interactive ${t.interactive.toFixed(0)} ms, main thread busy ${t.busyMs.toFixed(0)} ms; self time: ${Object.entries(t.selfMs).slice(0, 15).map(([n, ms]) => `${n} ${ms.toFixed(0)}`).join(', ')}`);
  }
} finally {
  await browser.close();
  await stopServer();
}

function median(xs) { const s = xs.filter((x) => x != null && !Number.isNaN(x)).sort((a, b) => a - b); if (!s.length) return null; const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; }

// ---- summary ----
const measured = rounds.filter((r) => !r.warmup);
const fields = [
  ['bare GET /v1/instances?limit=1000 (node fetch, body read) ms', 'baselineMs'],
  ['  JSON.parse of it in node ms', 'baselineParseMs'],
  ['first contentful paint ms', 'fcp'],
  ['index.html loaded ms', 'html'],
  ['app.js loaded ms', 'appJsEnd'],
  ['GET /v1/whoami start ms', 'whoamiStart'],
  ['GET /v1/whoami end ms', 'whoamiEnd'],
  ['GET /v1/projects end ms', 'projectsEnd'],
  ['GET /v1/instances start ms', 'listStart'],
  ['GET /v1/instances end ms', 'listEnd'],
  ['  list call as seen by the page ms', 'listInPageMs'],
  ['list response → list rows in DOM ms', 'renderMs'],
  ['list response → rows painted ms', 'listToPainted'],
  ['list response → interactive ms', 'listToInteractive'],
  ['list rows in DOM ms', 'rowsInDom'],
  ['list rows painted (frame after) ms', 'rowsPainted'],
  ['largest contentful paint ms', 'lcp'],
  ['search typed after rows ms', 'typeDelayMs'],
  ['filter to one row (typed → painted) ms', 'filterMs'],
  ['interactive (filtered row alone, painted) ms', 'interactive'],
  ['interactive ÷ bare list call', 'interactiveRatio'],
  ['rows painted ÷ bare list call', 'rowsRatio'],
  ['clear search → list rows painted ms', 'restoreMs'],
  ['long tasks until interactive', 'longTasksToInteractive'],
  ['long-task time until interactive ms', 'longTaskMsToInteractive'],
  ['longest task until interactive ms', 'longestTaskMs'],
  ['CDP ScriptDuration at interactive ms', 'scriptMs'],
  ['CDP LayoutDuration at interactive ms', 'layoutMs'],
  ['CDP RecalcStyleDuration at interactive ms', 'styleMs'],
  ['CDP TaskDuration at interactive ms', 'taskMs'],
  ['JS heap used MiB', 'heapMiB'],
  ['DOM elements with the list shown', 'domNodes'],
  ['requests until interactive', 'loadRequests'],
  ['bytes on the wire until interactive KiB', 'loadBytes', (x) => x / 1024],
  ['  of which the console (assets) KiB', null, (r) => (r.loadByKind.assets || 0) / 1024],
  ['  of which GET /v1/instances KiB', null, (r) => (r.loadByKind.list || 0) / 1024],
  ['  of which other API calls KiB', null, (r) => ((r.loadByKind['api-other'] || 0) + (r.loadByKind.top || 0) + (r.loadByKind.stream || 0)) / 1024],
  ['bare list response body KiB', 'baselineBytes', (x) => x / 1024],
  ['GET /v1/instances calls until interactive', 'listCallsLoad'],
  [`GET /v1/instances calls while idle (${opts.idle} s)`, null, (r) => r.idle.byKind.list || 0],
  [`GET /v1/instances/{name} calls while idle (${opts.idle} s)`, null, (r) => r.idle.byKind.item || 0],
  [`GET /v1/top/instances calls while idle (${opts.idle} s)`, null, (r) => r.idle.byKind.top || 0],
  [`other calls while idle (${opts.idle} s)`, null, (r) => (r.idle.byKind['api-other'] || 0) + (r.idle.byKind.assets || 0) + (r.idle.byKind.stream || 0)],
  [`long-task time while idle (${opts.idle} s) ms`, null, (r) => r.idle.longTaskMs],
  ['start VM: POST answered ms', 'changePostMs'],
  ['start VM: row state changed ms (from POST)', 'changeVisibleMs'],
  ['start VM: row final state ms (from POST)', 'changeFinalMs'],
  ['start VM: agent event → row ms', 'eventToRowMs'],
  ['start VM: last refetch answered → row ms', 'refetchToRowMs'],
];
const f1 = (x) => (x == null || !Number.isFinite(x) ? '–' : Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(1));
const lines = ['| measure | median | min – max |', '|---|---:|---:|'];
const summary = {};
for (const [label, key, fn] of fields) {
  const xs = measured.map((r) => (key ? (fn ? fn(r[key]) : r[key]) : fn(r))).filter((x) => x != null && Number.isFinite(x));
  const s = { median: median(xs), min: xs.length ? Math.min(...xs) : null, max: xs.length ? Math.max(...xs) : null };
  summary[label] = s;
  lines.push(`| ${label} | ${f1(s.median)} | ${f1(s.min)} – ${f1(s.max)} |`);
}
const table = lines.join('\n');
console.log(`\n${measured.length} rounds (+${opts.warmup} warm-up), ${info.vms} VMs, ${info.hosts || '?'} hosts; machine: ${machine.nproc} CPUs, load ${machine.loadavg.map((x) => x.toFixed(2)).join(' ')}\n`);
console.log(table);
console.log(`\nfirst load requests (round 1): ${(measured[0] || rounds[0]).loadUrls.join('; ')}`);
console.log(`change (per round): ${measured.map((r) => `${r.changeName} ${r.changeStatus} [${r.changeStates.join(' ')}] events [${r.changeEvents.join(' ')}] refetches [${r.changeRefetches.join(' ')}]`).join('\n  ')}`);
if (opts.out) writeFileSync(opts.out, JSON.stringify({ opts: { ...opts, token: undefined }, machine, info: { ...info, token: undefined }, summary, traced, rounds }, null, 2));
