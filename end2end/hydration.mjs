// Opens the running portal in Debian's Chromium, signs in with the dev sign-in, creates a
// subscription through the hydrated form (the one-time key appears without a page load only when
// the wasm app runs), copies the key, and takes a 1280 px screenshot of each page. Fails on any
// page error or console error (a Content-Security-Policy violation is one).
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const base = process.env.PORTAL_URL ?? 'http://127.0.0.1:3000';
const shots = process.env.SCREENSHOTS ?? '../target/end2end';
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run'],
});
const failures = [];

/** The shown key once it is another than `previous` (the page's CSP allows no eval, so no
 * waitForFunction): polled for up to 10 s. */
async function keyOtherThan(page, previous) {
  for (let i = 0; i < 100; i++) {
    const shown = (await page.textContent('[data-testid=issued-key]'))?.trim() ?? '';
    if (shown && shown !== previous) return shown;
    await page.waitForTimeout(100);
  }
  throw new Error(`the key shown stayed ${previous}`);
}
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: base });
  const page = await context.newPage();
  page.on('pageerror', (error) => failures.push(`page error: ${error}`));
  page.on('console', (message) => {
    if (message.type() === 'error') failures.push(`console: ${message.text()}`);
  });

  await page.goto(base, { waitUntil: 'networkidle' });
  const banner = await page.textContent('.banner-warn');
  if (!banner?.includes('Development sign-in is enabled')) failures.push('no dev sign-in banner');
  await page.selectOption('select[name=role]', 'Admin');
  await Promise.all([page.waitForURL(`${base}/`), page.click('text=Dev sign-in')]);
  await page.waitForLoadState('networkidle');
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  await page.goto(`${base}/subscriptions`, { waitUntil: 'networkidle' });
  let navigated = false;
  page.on('framenavigated', () => { navigated = true; });
  const firstId = `e2e-${Date.now()}`;
  await page.fill('input[name=id]', firstId);
  await page.fill('input[name=display_name]', 'End-to-end <b>team</b>');
  await page.click('text=Create and show key');
  const key = await page.waitForSelector('[data-testid=issued-key]', { timeout: 10000 });
  const text = (await key.textContent())?.trim() ?? '';
  if (!text.startsWith('ghk_')) failures.push(`unexpected key text ${text}`);
  if (navigated) failures.push('the form caused a page load: the app did not hydrate');
  await page.click('button:has-text("Copy")');
  await page.waitForSelector('button:has-text("Copied")', { timeout: 5000 });
  const copied = await page.evaluate(() => navigator.clipboard.readText()).catch(() => null);
  if (copied !== null && copied !== text) failures.push('the clipboard does not hold the key');
  const row = await page.textContent('table');
  if (!row?.includes('End-to-end <b>team</b>')) failures.push('the new row is missing or not escaped');
  await page.screenshot({ path: `${shots}/subscriptions.png`, fullPage: true });

  // The key shown is the one of the action that answered last: rotate the first subscription's
  // key, then create a second subscription, and the second one's key is shown.
  await page.click(`tr:has(code:text-is("${firstId}")) button:has-text("Rotate key")`);
  const rotated = await keyOtherThan(page, text);
  const secondId = `e2e-b-${Date.now()}`;
  await page.fill('input[name=id]', secondId);
  await page.fill('input[name=display_name]', 'Second team');
  await page.click('text=Create and show key');
  const second = await keyOtherThan(page, rotated);
  const callout = (await page.textContent('.callout-success')) ?? '';
  if (!callout.includes(secondId)) failures.push(`after a rotation and a creation the key shown is not the new subscription's: ${callout}`);
  if (!second.startsWith('ghk_') || second === rotated || second === text) failures.push('the second subscription\'s key is not a new key');

  for (const name of ['gateways', 'activity']) {
    await page.goto(`${base}/${name}`, { waitUntil: 'networkidle' });
    await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  }
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/subscriptions`, { waitUntil: 'networkidle' });
  await page.screenshot({ path: `${shots}/subscriptions-phone.png`, fullPage: true });
} catch (error) {
  failures.push(String(error));
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(failures.join('\n'));
  process.exit(1);
}
console.log(`hydration check passed; screenshots in ${shots}`);
