// Helpers shared by the end-to-end scripts: reserved ports, child processes with their logs, waiting
// for a server, Debian's Chromium, and signing in through the OpenID Connect provider's forms.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

/**
 * `count` ports nobody else listens on, held open until `release()` — call it right before the
 * processes that listen on them start. Held, they can neither be picked twice nor be taken by a
 * server of the test that listens on port 0 meanwhile (the OpenID Connect provider, a key-set
 * double): a process told a port another one holds fails to start while the other answers for it.
 */
export async function reservePorts(count) {
  const probes = [];
  for (let i = 0; i < count; i += 1) {
    const probe = net.createServer();
    await new Promise((resolve, reject) => {
      probe.on('error', reject);
      probe.listen(0, '127.0.0.1', resolve);
    });
    probes.push(probe);
  }
  return {
    ports: probes.map((probe) => probe.address().port),
    release: () => Promise.all(probes.map((probe) => new Promise((resolve) => probe.close(resolve)))),
  };
}

/**
 * Waits until `predicate(arg)`, run in `page`, is true: polled from here for up to `timeout` ms.
 * Not `page.waitForFunction`: after its first try that polls inside the page by evaluating a
 * string, which the portal's Content Security Policy (no `unsafe-eval`) refuses.
 */
export async function waitInPage(page, predicate, arg, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await page.evaluate(predicate, arg)) return;
    if (Date.now() > deadline) throw new Error(`waited ${timeout} ms in vain for: ${predicate}`);
    await page.waitForTimeout(100);
  }
}

/** Child processes started from `bin`, with their output kept for a failure report. */
export class Processes {
  constructor(bin) {
    this.bin = bin;
    this.children = [];
    this.logs = [];
  }

  start(name, file, args, env = {}) {
    const child = spawn(path.join(this.bin, file), args, {
      env: { ...process.env, RUST_LOG: 'info,sqlx=warn', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const lines = [];
    this.logs.push([name, lines]);
    child.stdout.on('data', (data) => lines.push(String(data)));
    child.stderr.on('data', (data) => lines.push(String(data)));
    child.on('error', (error) => lines.push(`cannot start ${file}: ${error}`));
    this.children.push(child);
    return child;
  }

  stop() {
    for (const child of this.children) child.kill('SIGTERM');
  }

  /** The tail of each process's output, for a failure report. */
  report() {
    return this.logs.map(([name, lines]) => `--- ${name} ---\n${lines.join('').slice(-4000)}`).join('\n');
  }
}

/** Waits until something answers at `url`. */
export async function waitFor(url, what) {
  for (let i = 0; i < 150; i += 1) {
    try {
      await fetch(url);
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  throw new Error(`${what} did not start at ${url}`);
}

/** Debian's Chromium, headless (never a downloaded browser). */
export function launchChromium() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run'],
  });
}

/**
 * A function that opens a fresh browser context signed in as a login through the provider's
 * development login form and consent step. Page errors and console errors on the portal (other
 * than the intended 401/403/422) are added to `failures`.
 */
export function signInWith(browser, portal, failures) {
  return async function signIn(login) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: portal });
    const page = await context.newPage();
    page.on('pageerror', (error) => failures.push(`${login}: page error: ${error}`));
    page.on('console', (message) => {
      if (message.type() === 'error' && page.url().startsWith(portal)
        && !/status of (401|403|422)/.test(message.text())) {
        failures.push(`${login}: console: ${message.text()}`);
      }
    });
    // Through the header's "Sign in" link, clicked once the wasm app runs: the server's redirect
    // to the provider must reach the browser, not the client-side router (which would show
    // "Page not found" for /auth/sign-in).
    await page.goto(portal, { waitUntil: 'networkidle' });
    await page.waitForSelector('html[data-hydrated]', { state: 'attached', timeout: 15000 });
    await page.click('header a:text-is("Sign in")');
    await page.waitForSelector('input[name=login]');
    await page.fill('input[name=login]', login);
    await page.fill('input[name=password]', 'any password: the development login form');
    await page.click('button[type=submit]');
    // The consent step, then back to the portal.
    await page.waitForSelector('input[name=prompt][value=consent]', { state: 'attached' });
    await Promise.all([
      page.waitForURL((url) => url.href.startsWith(portal)),
      page.click('button[type=submit]'),
    ]);
    await page.waitForLoadState('networkidle');
    return page;
  };
}

/**
 * Clicks the link `selector` once the wasm app runs and returns the text of the file it downloads.
 * Fails (a timeout) when the click does not download: e.g. when the client-side router takes a
 * link to a route of the server's and shows "Page not found" instead.
 */
export async function downloadByClick(page, selector) {
  await page.waitForSelector('html[data-hydrated]', { state: 'attached', timeout: 15000 });
  const [download] = await Promise.all([
    page.waitForEvent('download', { timeout: 10000 }),
    page.click(selector),
  ]);
  const file = await download.path();
  return readFile(file, 'utf8');
}
