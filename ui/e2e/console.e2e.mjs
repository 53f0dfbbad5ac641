// End-to-end test of the web console in a real headless Chromium against a
// real Skyvisor (started by the Rust system test `webui::`, which passes
// what it made through the environment). One story, in order: what a
// member, a viewer and a user whose token is revoked see and can do.
//
//   SV_URL               the server (e.g. http://127.0.0.1:7791)
//   SV_PROJECT           the project the tokens below act in
//   SV_MEMBER_TOKEN      a member of SV_PROJECT (its only project)
//   SV_VIEWER_TOKEN      a viewer of SV_PROJECT
//   SV_REVOCABLE_TOKEN   another member token, revoked midway
//   SV_REVOCABLE_ID      its id (to revoke it)
//   SV_ADMIN_TOKEN       a cluster admin (revokes; takes the screenshots)
//   SV_OTHER_INSTANCE    an instance of another project, never to be seen
//   SV_SHOTS             optional: a directory for screenshots of the main pages
//   SV_CHROMIUM          optional: the browser (default /usr/bin/chromium)
import { env, launch, log, waitFor as waitOn } from './lib.mjs';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const URL = env('SV_URL');
const PROJECT = env('SV_PROJECT');
const MEMBER = env('SV_MEMBER_TOKEN');
const VIEWER = env('SV_VIEWER_TOKEN');
const REVOCABLE = env('SV_REVOCABLE_TOKEN');
const REVOCABLE_ID = env('SV_REVOCABLE_ID');
const ADMIN = env('SV_ADMIN_TOKEN');
const OTHER = env('SV_OTHER_INSTANCE');
const SHOTS = process.env.SV_SHOTS;
const VM = 'ui-vm';
// Guests boot under TCG emulation on a busy machine: generous deadlines.
const BOOT = 240_000;
const STEP = 60_000;


/** A direct API call (not through the page), to compare and to set up. */
async function api(method, path, token, body) {
  const r = await fetch(URL + path, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      'x-skyvisor-project': PROJECT,
      ...(body ? { 'content-type': 'application/json' } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, json, text };
}

const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
const page = await context.newPage();
page.setDefaultTimeout(STEP);
const consoleErrors = [];
page.on('pageerror', (e) => consoleErrors.push(String(e)));

async function signIn(token) {
  await page.getByTestId('signin-token').fill(token);
  await page.getByTestId('signin-button').click();
  await page.getByTestId('sign-out').waitFor();
}

async function signOut() {
  await page.getByTestId('sign-out').click();
  await page.getByTestId('signin-token').waitFor();
}

async function shot(name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`) });
}

async function rowState(name) {
  return page.getByTestId(`instance-row-${name}`).getByTestId('instance-state').getAttribute('data-state');
}

/** Waits until the page shows no loading state (the event stream stays
 * open, so the network is never idle). */
async function settled() {
  // Polled from here: the page's CSP (rightly) forbids the eval that
  // page.waitForFunction needs.
  await waitFor('the page to finish loading', () => page.evaluate(() => {
    const main = document.querySelector('main');
    return !!main && !main.querySelector('[aria-busy="true"]') && !/Loading/.test(main.innerText);
  }));
}

const waitFor = (what, check, timeout = STEP) => waitOn(page, what, check, timeout);

try {
  // --- Sign in: a bad token is refused in the API's words. ---
  log('sign-in page');
  await page.goto(`${URL}/ui/`);
  await page.getByTestId('signin-token').fill('svt_nosuch_secret');
  await page.getByTestId('signin-button').click();
  const refused = await api('GET', '/v1/whoami', 'svt_nosuch_secret');
  assert.equal(refused.status, 401);
  await page.getByTestId('error-text').filter({ hasText: refused.json.error.message }).waitFor();
  await shot('sign-in');

  log('signing in as a member');
  await signIn(MEMBER);
  await page.getByTestId('instances-table').waitFor();
  const projects = await page.getByTestId('project-switcher').locator('option').allTextContents();
  assert.ok(projects.some((p) => p.includes(PROJECT)), `the switcher offers ${PROJECT}: ${projects}`);
  assert.equal(projects.length, 1, `a member of one project sees only it: ${projects}`);

  // --- Create a VM; it appears and turns running through the event stream. ---
  log('creating a VM');
  await page.getByTestId('create-instance').click();
  const dialog = page.getByTestId('create-instance-dialog');
  await dialog.getByTestId('create-name').fill(VM);
  await dialog.getByTestId('create-type').selectOption('nano');
  await dialog.getByTestId('create-image').selectOption('debian-busybox');
  await dialog.getByTestId('dialog-submit').click();
  await page.getByTestId(`instance-row-${VM}`).waitFor();
  await waitFor(`${VM} running in the list`, async () => (await rowState(VM)) === 'running', BOOT);
  log('running');
  await shot('instances');
  await page.setViewportSize({ width: 375, height: 800 });
  await shot('instances-phone');
  await page.setViewportSize({ width: 1280, height: 860 });
  assert.equal(await page.getByTestId(`instance-row-${OTHER}`).count(), 0, 'another project\'s instance is listed');

  // --- The same name again: the API's conflict, shown in the dialog. ---
  await page.getByTestId('create-instance').click();
  await dialog.getByTestId('create-name').fill(VM);
  await dialog.getByTestId('create-type').selectOption('nano');
  await dialog.getByTestId('create-image').selectOption('debian-busybox');
  await dialog.getByTestId('dialog-submit').click();
  const conflict = await api('POST', '/v1/instances', MEMBER, { name: VM, instance_type: 'nano', image: 'debian-busybox' });
  assert.equal(conflict.status, 409, conflict.text);
  await dialog.getByTestId('error-text').filter({ hasText: conflict.json.error.message }).waitFor();
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'hidden' });

  // --- Its console: the boot output, and keystrokes reach the guest. ---
  log('console');
  await page.getByTestId(`instance-row-${VM}`).getByRole('link', { name: VM }).click();
  await page.getByTestId('tab-console').click();
  const terminal = page.getByTestId('console-terminal');
  await waitFor('the boot output in the console', async () =>
    (await terminal.innerText()).includes(`SKYVISOR-GUEST-READY name=${VM}`), BOOT);
  await terminal.click();
  await page.keyboard.type('typed-into-the-console-4242');
  // The guest's terminal echoes what it received on its serial port.
  await waitFor('the echo of typed input', async () =>
    (await terminal.innerText()).includes('typed-into-the-console-4242'));
  await shot('console');

  // --- A snapshot. ---
  log('snapshot');
  await page.getByTestId('instance-action-snapshot').click();
  const snapDialog = page.getByTestId('snapshot-dialog');
  await snapDialog.getByTestId('snapshot-name').fill('before-stop');
  await snapDialog.getByTestId('dialog-submit').click();
  await page.getByTestId('tab-snapshots').click();
  const snapRow = page.getByTestId('snapshot-row-before-stop');
  await waitFor('the snapshot ready', async () =>
    (await snapRow.getByTestId('snapshot-state').innerText()).trim() === 'ready', BOOT);
  await shot('snapshots');
  const snaps = await api('GET', `/v1/instances/${VM}/snapshots`, MEMBER);
  assert.ok(JSON.stringify(snaps.json).includes('before-stop'), snaps.text);

  // --- Restore it, then clone it into a new VM (and delete the clone). ---
  log('restore');
  await snapRow.getByTestId('snapshot-restore').click();
  await page.getByTestId('confirm-button').click();
  await waitFor(`${VM} restored from the snapshot`, async () => {
    const v = (await api('GET', `/v1/instances/${VM}`, MEMBER)).json;
    return v?.status?.restored_from?.includes('before-stop') && v.status.phase === 'running';
  }, BOOT);
  log('clone');
  await snapRow.getByTestId('snapshot-clone').click();
  const cloneDialog = page.getByTestId('create-instance-dialog');
  await cloneDialog.getByTestId('create-name').fill('ui-clone');
  await cloneDialog.getByTestId('dialog-submit').click();
  await waitFor('the clone running, on its own page', async () =>
    page.url().includes('#/instances/ui-clone') &&
    (await page.getByTestId('instance-state').first().innerText()).trim() === 'running', BOOT);
  const clone = (await api('GET', '/v1/instances/ui-clone', MEMBER)).json;
  assert.ok(clone?.status?.restored_from?.includes('before-stop'), JSON.stringify(clone?.status));
  assert.notEqual(clone.spec.id, (await api('GET', `/v1/instances/${VM}`, MEMBER)).json.spec.id);
  await page.getByTestId('instance-action-delete').click();
  await page.getByTestId('confirm-button').click();
  await waitFor('the clone gone', async () => (await api('GET', '/v1/instances/ui-clone', MEMBER)).status === 404, BOOT);
  await page.goto(`${URL}/ui/#/instances/${VM}/overview`);
  await page.getByTestId('instance-action-stop').waitFor();

  // --- Metrics over the last hour (a point every 15 s). ---
  log('metrics');
  await page.getByTestId('tab-metrics').click();
  await waitFor('a metrics chart with points', async () =>
    (await page.getByTestId('instance-metrics').locator('svg polyline').count()) > 0, 120_000);
  await shot('metrics');

  // --- Stop. ---
  log('stop');
  await page.getByTestId('tab-overview').click();
  await page.getByTestId('instance-action-stop').click();
  const confirmStop = page.getByTestId('confirm-button');
  if (await confirmStop.isVisible().catch(() => false)) await confirmStop.click();
  await waitFor(`${VM} stopped`, async () =>
    (await page.getByTestId('instance-state').first().innerText()).trim() === 'stopped', BOOT);
  const stopped = await api('GET', `/v1/instances/${VM}`, MEMBER);
  assert.equal(stopped.json.status.phase, 'stopped', stopped.text);

  // --- Resize while stopped. ---
  log('resize');
  await page.getByTestId('instance-action-resize').click();
  const resizeDialog = page.getByTestId('resize-dialog');
  await resizeDialog.getByTestId('resize-type').selectOption('micro');
  await resizeDialog.getByTestId('dialog-submit').click();
  await waitFor(`${VM} resized to micro`, async () =>
    (await api('GET', `/v1/instances/${VM}`, MEMBER)).json?.spec?.instance_type === 'micro');

  // --- The events feed: what happened, and what happens next, live. ---
  log('events');
  await page.getByTestId('nav-events').click();
  const feed = page.getByTestId('events-table');
  await feed.getByTestId('event-row').filter({ hasText: 'stop-requested' }).filter({ hasText: VM }).first().waitFor();
  const startedRows = () => feed.getByTestId('event-row').filter({ hasText: 'start-requested' }).filter({ hasText: VM }).count();
  const before = await startedRows();
  const startCall = await api('POST', `/v1/instances/${VM}/start`, MEMBER);
  assert.ok(startCall.status < 300, startCall.text);
  await waitFor('the start request in the feed without a reload', async () => (await startedRows()) > before);

  // --- A volume: a bad size refused in the API's words at the field, then made and deleted. ---
  log('volume');
  await page.getByTestId('nav-volumes').click();
  await page.getByTestId('create-volume').click();
  const volDialog = page.getByTestId('create-volume-dialog');
  await volDialog.getByLabel('Name').fill('ui-vol');
  await volDialog.getByLabel('Size (GiB)').fill('0.0001');
  await volDialog.getByTestId('dialog-submit').click();
  const badSize = await api('POST', '/v1/volumes', MEMBER, { name: 'ui-vol', size_bytes: 0 });
  assert.equal(badSize.status, 400, badSize.text);
  await volDialog.getByText(badSize.json.error.message).first().waitFor();
  assert.equal(await volDialog.getByLabel('Size (GiB)').getAttribute('aria-invalid'), 'true');
  await volDialog.getByLabel('Size (GiB)').fill('0.0625');
  await volDialog.getByTestId('dialog-submit').click();
  const volRow = page.getByTestId('volume-row-ui-vol');
  await volRow.waitFor();
  await waitFor('the volume available', async () => (await api('GET', '/v1/volumes/ui-vol', MEMBER)).json?.status?.phase === 'available', BOOT);
  // Its replicas' health, as the list shows it.
  await waitFor('the volume healthy in the list', async () =>
    (await volRow.getByTestId('volume-health').innerText()).trim() === 'healthy');
  await volRow.getByRole('button', { name: 'Delete' }).click();
  await page.getByTestId('confirm-button').click();
  await waitFor('the volume gone', async () => (await api('GET', '/v1/volumes/ui-vol', MEMBER)).status === 404, BOOT);
  await waitFor('the volume gone from the list', async () => (await volRow.count()) === 0);

  // --- A viewer: no buttons that change anything, and a crafted request is refused anyway. ---
  log('viewer');
  await signOut();
  await signIn(VIEWER);
  await page.goto(`${URL}/ui/#/instances`);
  await page.getByTestId(`instance-row-${VM}`).waitFor();
  assert.equal(await page.getByTestId('create-instance').count(), 0, 'a viewer is offered create');
  await page.getByTestId(`instance-row-${VM}`).getByRole('link', { name: VM }).click();
  await page.getByTestId('tab-overview').waitFor();
  for (const action of ['start', 'stop', 'reboot', 'resize', 'delete', 'snapshot', 'migrate']) {
    assert.equal(await page.getByTestId(`instance-action-${action}`).count(), 0, `a viewer is offered ${action}`);
  }
  const crafted = await page.evaluate(async ({ token, project, name }) => {
    const r = await fetch('/v1/instances/' + name + '/start', {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'x-skyvisor-project': project },
    });
    return { status: r.status, body: await r.json() };
  }, { token: VIEWER, project: PROJECT, name: VM });
  assert.equal(crafted.status, 403, JSON.stringify(crafted));
  assert.match(crafted.body.error.message, /member|role/);

  // --- A token revoked while in use: back to sign-in, then back to the same page. ---
  log('revoked token');
  await signOut();
  await signIn(REVOCABLE);
  await page.goto(`${URL}/ui/#/instances/${VM}/snapshots`);
  await page.getByTestId('snapshot-row-before-stop').waitFor();
  const revoked = await api('DELETE', `/v1/tokens/${REVOCABLE_ID}`, ADMIN);
  assert.ok(revoked.status < 300, revoked.text);
  // Any call now is 401: the next action the user takes.
  await page.getByTestId('tab-overview').click();
  await page.getByTestId('signin-token').waitFor();
  assert.ok(page.url().endsWith(`#/instances/${VM}/overview`) || page.url().includes(`#/instances/${VM}`),
    `the page is kept: ${page.url()}`);
  await signIn(MEMBER);
  await page.getByTestId('instance-action-delete').waitFor();
  assert.ok(page.url().includes(`#/instances/${VM}`), `back on the page: ${page.url()}`);

  // --- Delete, with confirmation. ---
  log('delete');
  await page.getByTestId('instance-action-delete').click();
  await page.getByTestId('confirm-button').click();
  await page.goto(`${URL}/ui/#/instances`);
  await waitFor(`${VM} gone from the list`, async () =>
    (await page.getByTestId(`instance-row-${VM}`).count()) === 0, BOOT);
  await waitFor(`${VM} gone from the API`, async () =>
    (await api('GET', `/v1/instances/${VM}`, MEMBER)).status === 404, BOOT);

  // --- Another project's objects never appear, anywhere the member looks. ---
  log('isolation');
  for (const route of ['instances', 'events', 'volumes', 'networks', 'security-groups']) {
    await page.goto(`${URL}/ui/#/${route}`);
    await page.getByTestId('sign-out').waitFor();
    await settled();
    const text = await page.locator('main').innerText();
    assert.ok(!text.includes(OTHER), `${route} shows ${OTHER}`);
  }

  // --- A cluster admin's host actions: cordon and uncordon. ---
  log('hosts');
  await signOut();
  await signIn(ADMIN);
  await page.goto(`${URL}/ui/#/hosts`);
  const hostState = page.getByTestId('host-state').first();
  await page.getByTestId('host-action-cordon').first().click();
  await waitFor('the host cordoned', async () => (await hostState.innerText()).includes('cordoned'));
  await page.getByTestId('host-action-uncordon').first().click();
  await waitFor('the host ready again', async () => (await hostState.innerText()).includes('ready'));

  // --- Screenshots of the main pages, as the cluster admin. ---
  if (SHOTS) {
    log('screenshots');
    for (const route of ['hosts', 'events', 'volumes', 'usage', 'images']) {
      await page.goto(`${URL}/ui/#/${route}`);
      await page.getByTestId(`nav-${route}`).waitFor();
      await settled();
      await shot(route);
    }
  }

  assert.deepEqual(consoleErrors, [], 'uncaught errors in the page');
  log('all steps passed');
} catch (e) {
  if (SHOTS) await shot('failure').catch(() => {});
  console.error(`FAILED at ${page.url()}:`, e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
