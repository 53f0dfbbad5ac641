// What the end-to-end stories share: their settings from the environment,
// the browser, a log with times, and polling with a deadline.
import { chromium } from 'playwright-core';

/** The environment variable `name`; an error naming it if it is unset. */
export function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

/** Debian's headless Chromium (SV_CHROMIUM overrides). */
export function launch() {
  return chromium.launch({
    executablePath: process.env.SV_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
}

const started = Date.now();

/** Prints `msg` with the seconds since the story began. */
export function log(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
}

/** Polls `check` until it returns a truthy value (returned) or `timeout`
 * ms pass (an error naming `what`). Not page.waitForFunction: the page's
 * CSP (rightly) forbids the eval it needs. */
export async function waitFor(page, what, check, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await check().catch(() => undefined);
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout / 1000}s waiting for ${what}`);
    await page.waitForTimeout(250);
  }
}
