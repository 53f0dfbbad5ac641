// End-to-end test of the web console when the server that served it dies:
// run by the Rust system test `webui::` on a cluster of two servers.
//
//   SV_URL         server 1: the page is loaded from it, then it is killed
//   SV_TOKEN       a cluster admin's token
//   SV_CHROMIUM    optional: the browser (default /usr/bin/chromium)
//
// Protocol with the test: this script prints READY-TO-KILL once the page
// knows the cluster's servers; the test kills server 1, creates the stopped
// VM `after-failover` through server 2 and writes `killed` on stdin.
import { env, launch, log, waitFor as waitOn } from './lib.mjs';
import assert from 'node:assert/strict';
import { createInterface } from 'node:readline';

const URL = env('SV_URL');
const TOKEN = env('SV_TOKEN');
const VM = 'after-failover';
const STEP = 60_000;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const browser = await launch();
const page = await browser.newPage();
page.setDefaultTimeout(STEP);
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e)));

const waitFor = (what, check, timeout = STEP) => waitOn(page, what, check, timeout);

const stored = (key) => page.evaluate((k) => localStorage.getItem(k), key);

try {
  await page.goto(`${URL}/ui/#/instances`);
  await page.getByTestId('signin-token').fill(TOKEN);
  await page.getByTestId('signin-button').click();
  await page.getByTestId('instances-table').waitFor();
  const servers = await waitFor('the page to learn the cluster\'s servers', async () => {
    const s = JSON.parse((await stored('skyvisor.servers')) || '[]');
    return s.length >= 2 ? s : undefined;
  });
  log(`the page knows ${servers.join(', ')}`);
  console.log('READY-TO-KILL');
  const answer = await lines.next();
  assert.equal(answer.value, 'killed', `unexpected word from the test: ${answer.value}`);

  // The VM made through server 2 appears: the event stream reconnected there.
  log('waiting for the new VM in the list');
  await page.getByTestId(`instance-row-${VM}`).waitFor({ timeout: 120_000 });
  const base = await stored('skyvisor.base');
  assert.ok(base && !URL.startsWith(base) && servers.includes(base), `the page now talks to another server: ${base}`);
  // And every call after it goes there: another page, then a change.
  // (By the hash: the page itself came from the dead server.)
  await page.evaluate(() => { window.location.hash = '#/hosts'; });
  await page.getByTestId('host-state').first().waitFor();
  await page.evaluate((vm) => { window.location.hash = `#/instances/${vm}`; }, VM);
  await page.getByTestId('instance-action-delete').click();
  await page.getByTestId('confirm-button').click();
  await page.evaluate(() => { window.location.hash = '#/instances'; });
  await waitFor(`${VM} gone`, async () => (await page.getByTestId(`instance-row-${VM}`).count()) === 0, 120_000);
  assert.equal(await page.getByTestId('reconnecting-banner').count(), 0, 'still reconnecting');
  assert.deepEqual(pageErrors, [], 'uncaught errors in the page');
  log('all steps passed');
} catch (e) {
  console.error(`FAILED at ${page.url()}:`, e);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
