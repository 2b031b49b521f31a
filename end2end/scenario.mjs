// The end-to-end scenario, against real processes: the OpenID Connect provider (oidc-provider,
// started here), gatehouse-simulator, gatehouse-gateway (started empty at version 0) and
// gatehouse-portal (OpenID Connect sign-in, no development sign-in), driven in Debian's Chromium.
//
// An admin signs in, creates a backend pool, a subscription (copying its key), an access rule for
// an Entra group and one for the subscription; the key works at the gateway for the granted
// deployment and gets 403 for another; the admin revokes it and the next call gets 401. An auditor
// and a team lead are refused the admin pages. The activity log lists each change with its author.
// A 1280 px screenshot of each page goes to $SCREENSHOTS.
//
//   GATEHOUSE_BIN_DIR=…/debug LEPTOS_SITE_ROOT=…/target/site node scenario.mjs
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { reservePorts, launchChromium, Processes, signInWith, waitFor, waitInPage } from './lib.mjs';
import { LEADS_GROUP, startProvider } from './provider.mjs';

const bin = process.env.GATEHOUSE_BIN_DIR ?? path.resolve('../target/debug');
const siteRoot = process.env.LEPTOS_SITE_ROOT ?? path.resolve('../target/site');
const shots = process.env.SCREENSHOTS ?? path.resolve('../target/end2end');
const providerPort = Number(process.env.OIDC_PROVIDER_PORT ?? 0);
mkdirSync(shots, { recursive: true });

const CLIENT_ID = 'gatehouse-portal';
const CLIENT_SECRET = `e2e-${Math.random().toString(36).slice(2)}${Date.now()}`;
const RESEARCH_GROUP = '5f1c0d3e-8a2b-4c6d-9e0f-123456789abc';

const processes = new Processes(bin);
const start = processes.start.bind(processes);

const failures = [];
function check(condition, message) {
  if (!condition) failures.push(message);
}

const work = mkdtempSync(path.join(os.tmpdir(), 'gatehouse-e2e-'));
let provider;
let browser;
try {
  const reserved = await reservePorts(3);
  const [simPort, gatewayPort, portalPort] = reserved.ports;
  const portal = `http://127.0.0.1:${portalPort}`;
  const gateway = `http://127.0.0.1:${gatewayPort}`;
  provider = await startProvider({
    port: providerPort,
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    redirectUri: `${portal}/auth/callback`,
  });

  const adminToken = path.join(work, 'admin-token');
  writeFileSync(adminToken, `e2e-admin-${Math.random().toString(36).slice(2)}${Date.now()}\n`, { mode: 0o600 });
  writeFileSync(path.join(work, 'gateway.yaml'), [
    'server:',
    `  listen: 127.0.0.1:${gatewayPort}`,
    '  gateway_id: e2e',
    `  state_dir: ${path.join(work, 'state')}`,
    `  admin_token: file:${adminToken}`,
    '  audit:',
    `    database: sqlite:${path.join(work, 'audit.db')}`,
    '  log_format: text',
    'snapshot:',
    '  version: 0',
    '',
  ].join('\n'));

  await reserved.release();
  start('simulator', 'gatehouse-simulator', ['--listen', `127.0.0.1:${simPort}`, '--id', 'simulator']);
  start('gateway', 'gatehouse-gateway', ['serve', '--config', path.join(work, 'gateway.yaml')]);
  await waitFor(`${gateway}/healthz`, 'the gateway');
  start('portal', 'gatehouse-portal', [
    '--listen', `127.0.0.1:${portalPort}`,
    '--public-url', portal,
    '--database', `sqlite:${path.join(work, 'portal.db')}`,
    '--oidc-issuer', provider.issuer,
    '--oidc-client-id', CLIENT_ID,
    '--oidc-client-secret', 'env:E2E_OIDC_CLIENT_SECRET',
    '--group-roles', `${LEADS_GROUP}=TeamLead`,
    '--gateway', `e2e=${gateway}=file:${adminToken}`,
  ], {
    E2E_OIDC_CLIENT_SECRET: CLIENT_SECRET,
    LEPTOS_SITE_ROOT: siteRoot,
    LEPTOS_OUTPUT_NAME: 'gatehouse-portal',
  });
  await waitFor(`${portal}/`, 'the portal');

  browser = await launchChromium();
  const signIn = signInWith(browser, portal, failures);

  async function chat(key, deployment) {
    const response = await fetch(
      `${gateway}/openai/deployments/${deployment}/chat/completions?api-version=2024-10-21`,
      {
        method: 'POST',
        headers: { 'api-key': key, 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ role: 'user', content: 'Hello from the scenario' }] }),
      },
    );
    return response.status;
  }

  async function shot(page, name) {
    await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
  }

  // --- The admin ---
  const admin = await signIn('alice');
  check((await admin.textContent('.who-name'))?.includes('Alice Admin'), 'the admin is signed in');
  check(!(await admin.content()).includes('Development sign-in is enabled'), 'no dev sign-in banner');
  await shot(admin, 'overview');

  // A pool whose member is the simulator.
  await admin.goto(`${portal}/pools`, { waitUntil: 'networkidle' });
  await admin.fill('[data-testid=pool-form] input[name=id]', 'simulator');
  await admin.fill('[data-testid=pool-form] input[name=deployments]', 'gpt-4o, gpt-4o-mini');
  await admin.click('[data-testid=pool-form] button[type=submit]');
  await admin.waitForSelector('[data-testid=pool] >> text=simulator');
  await admin.goto(`${portal}/pools?add_to=simulator`, { waitUntil: 'networkidle' });
  await admin.fill('[data-testid=member-form] input[name=id]', 'simulator');
  await admin.fill('[data-testid=member-form] input[name=endpoint]', `http://127.0.0.1:${simPort}`);
  await admin.click('[data-testid=member-form] button[type=submit]');
  await admin.waitForSelector('tr[data-member=simulator]');

  // A subscription; its key is shown once and copied with the button.
  await admin.goto(`${portal}/subscriptions`, { waitUntil: 'networkidle' });
  await admin.fill('input[name=id]', 'e2e-team');
  await admin.fill('input[name=display_name]', 'End-to-end team');
  await admin.click('text=Create and show key');
  const keyElement = await admin.waitForSelector('[data-testid=issued-key]', { timeout: 10000 });
  const shown = (await keyElement.textContent())?.trim() ?? '';
  await admin.click('button:has-text("Copy")');
  await admin.waitForSelector('button:has-text("Copied")');
  const key = await admin.evaluate(() => navigator.clipboard.readText());
  check(key === shown && key.startsWith('ghk_'), `the copied key is the shown key (${key.slice(0, 6)}…)`);
  await shot(admin, 'subscriptions');

  // Access rules: a refused form keeps the message beside its field; then a group and the
  // subscription.
  await admin.goto(`${portal}/access-rules`, { waitUntil: 'networkidle' });
  const form = '[data-testid=rule-form]';
  await admin.fill(`${form} input[name=id]`, 'research');
  await admin.selectOption(`${form} select[name=grantee_kind]`, 'group');
  await admin.fill(`${form} input[name=grantee_id]`, 'not-a-guid');
  await admin.fill(`${form} input[name=grantee_display_name]`, 'Research');
  await admin.fill(`${form} input[name=deployments]`, 'gpt-4o*');
  await admin.click(`${form} button[type=submit]`);
  const besideField = await admin.waitForSelector('[data-field=grantee_id]');
  check((await besideField.textContent())?.includes('Entra object id'), 'the bad object id is explained beside its field');
  await shot(admin, 'access-rules-invalid');
  await admin.fill(`${form} input[name=grantee_id]`, RESEARCH_GROUP);
  await admin.fill(`${form} input[name=tokens_per_minute]`, '20000');
  await admin.click(`${form} button[type=submit]`);
  await admin.waitForSelector('[data-testid=access-rules] >> text=Research');
  await admin.goto(`${portal}/access-rules`, { waitUntil: 'networkidle' });
  await admin.fill(`${form} input[name=id]`, 'e2e-team-gpt-4o');
  await admin.selectOption(`${form} select[name=grantee_kind]`, 'subscription');
  await admin.fill(`${form} input[name=grantee_id]`, 'e2e-team');
  await admin.fill(`${form} input[name=deployments]`, 'gpt-4o');
  await admin.click(`${form} button[type=submit]`);
  await admin.waitForSelector('[data-testid=access-rules] >> text=e2e-team-gpt-4o');
  await shot(admin, 'access-rules');

  // The key at the gateway: the granted deployment, then another.
  check(await chat(key, 'gpt-4o') === 200, 'the key works for the granted deployment');
  check(await chat(key, 'gpt-4o-mini') === 403, 'the key is refused (403) for another deployment');

  // The member's health as the gateway sees it.
  await admin.goto(`${portal}/pools`, { waitUntil: 'networkidle' });
  const health = await admin.textContent('tr[data-member=simulator]');
  check(health?.includes('e2e: available'), `the pool page shows the member available (${health})`);
  await shot(admin, 'pools');

  // Revoke; the next call is refused.
  await admin.goto(`${portal}/subscriptions`, { waitUntil: 'networkidle' });
  await admin.click('button:has-text("Revoke")');
  await admin.waitForSelector('.badge-revoked');
  check(await chat(key, 'gpt-4o') === 401, 'the revoked key gets 401');

  // Gateways: current, and the difference between the first and the newest version.
  await admin.goto(`${portal}/gateways`, { waitUntil: 'networkidle' });
  check((await admin.textContent('table'))?.includes('current'), 'the gateway runs the current version');
  await admin.click('[data-testid=diff-form] button[type=submit]');
  await admin.waitForSelector('[data-testid=version-diff]');
  check((await admin.textContent('[data-testid=version-diff]'))?.includes('revoked'), 'the diff shows the revocation');
  await shot(admin, 'gateways');

  // Registering a gateway whose admin-token reference is outside the portal's policy (here the
  // portal's own PATH) is refused, and the page says which references it reads.
  const prefixes = await admin.textContent('[data-testid=token-prefixes]');
  check(prefixes?.includes('env:GATEHOUSE_GATEWAY_TOKEN') && prefixes?.includes('file:/run/secrets/gatehouse/'),
    `the page names the allowed token references (${prefixes})`);
  const registerPanel = 'section:has(input[name=admin_token_ref])';
  await admin.fill(`${registerPanel} input[name=id]`, 'collector');
  await admin.fill(`${registerPanel} input[name=url]`, 'http://127.0.0.1:9');
  await admin.fill(`${registerPanel} input[name=admin_token_ref]`, 'env:PATH');
  await admin.click(`${registerPanel} button:has-text("Register")`);
  const refusedToken = await admin.waitForSelector(`${registerPanel} .field-error`);
  check((await refusedToken.textContent())?.includes('`env:PATH` is not one'),
    `a token reference outside the policy is refused (${await refusedToken.textContent()})`);
  check(!(await admin.textContent('table'))?.includes('collector'), 'the refused gateway is not listed');

  // Gateway settings: a wrong field is named by its path and nothing is published; right, they
  // are published and the gateway runs them.
  const settings = '[data-testid=gateway-settings]';
  const settingsPanel = `section:has(${settings})`;
  check((await admin.inputValue(settings)).trim() === '{}', 'no gateway settings at first');
  await admin.fill(settings, '{"trusted_proxies": ["127.0.0.1/32", "not an address"]}');
  await admin.click(`${settingsPanel} button:has-text("Save and publish")`);
  const settingsError = await admin.waitForSelector(`${settingsPanel} .field-error`);
  check((await settingsError.textContent())?.includes('trusted_proxies[1]'),
    `the wrong address is named by its path (${await settingsError.textContent()})`);
  await admin.fill(settings, '{"trusted_proxies": ["127.0.0.1/32"]}');
  await admin.click(`${settingsPanel} button:has-text("Save and publish")`);
  const saved = await admin.waitForSelector(`${settingsPanel} .saved-note`);
  const published = Number((await saved.textContent())?.match(/version (\d+)/)?.[1]);
  // The page reads the settings back as stored (pretty-printed) and lists the new version.
  await waitInPage(
    admin,
    (selector) => document.querySelector(selector)?.value.includes('\n  "trusted_proxies"'),
    settings,
  );
  await waitInPage(
    admin,
    (version) => document.querySelector('[data-testid=versions] tr:has(.badge-active) td')
      ?.textContent.trim() === String(version),
    published,
  );
  let running;
  for (let i = 0; i < 50 && running?.version !== published; i += 1) {
    if (i) await new Promise((resolve) => setTimeout(resolve, 200));
    const response = await fetch(`${gateway}/_gatehouse/config`, {
      headers: { authorization: `Bearer ${readFileSync(adminToken, 'utf8').trim()}` },
    });
    running = await response.json();
  }
  check(running?.version === published, `the gateway runs version ${published}, which the settings made`);
  check(JSON.stringify(running?.trusted_proxies) === '["127.0.0.1/32"]',
    `the gateway runs the saved settings (${JSON.stringify(running?.trusted_proxies)})`);
  check(running?.access_rules?.length === 2 && running?.subscriptions?.some((s) => s.id === 'e2e-team'),
    'the rules and subscriptions are still sent beside the settings');
  await shot(admin, 'gateway-settings');

  // The activity log names the admin as the author of each change.
  await admin.goto(`${portal}/activity`, { waitUntil: 'networkidle' });
  const entries = await admin.$$eval('.activity-entry > div', (divs) => divs.map((d) => d.textContent));
  for (const action of ['pool.create', 'member.create', 'subscription.create', 'access_rule.create', 'subscription.revoke', 'settings.update']) {
    check(entries.some((e) => e.includes(action) && e.includes('Alice Admin <alice>')),
      `the activity log lists ${action} by the admin`);
  }
  check(entries.filter((e) => e.includes('access_rule.create')).length === 2, 'both rules are in the activity log');
  await shot(admin, 'activity');

  // --- An auditor and a team lead: refused the admin pages ---
  for (const [login, activity] of [['audrey', true], ['lee', false]]) {
    const page = await signIn(login);
    for (const name of ['access-rules', 'subscriptions', 'pools', 'gateways']) {
      await page.goto(`${portal}/${name}`, { waitUntil: 'networkidle' });
      const text = await page.textContent('main');
      check(text?.includes('your role does not allow this'), `${login} is refused /${name}`);
      check(!text?.includes('e2e-team'), `${login} sees no subscription on /${name}`);
    }
    await shot(page, `${login}-refused`);
    await page.goto(`${portal}/activity`, { waitUntil: 'networkidle' });
    const text = await page.textContent('main');
    check(text?.includes('subscription.revoke') === activity,
      `${login} ${activity ? 'reads' : 'is refused'} the activity log`);
    await page.context().close();
  }
  // And the server functions themselves refuse them, whatever the page does.
  const lead = await signIn('lee');
  const refused = await lead.evaluate(async () => {
    const response = await fetch('/api/list_subscriptions', { method: 'POST', headers: { accept: 'application/json' } });
    return response.status;
  });
  check(refused === 403, `the team lead's call to list_subscriptions is refused (${refused})`);
} catch (error) {
  failures.push(String(error?.stack ?? error));
} finally {
  if (browser) await browser.close();
  processes.stop();
  if (provider) await provider.stop();
  rmSync(work, { recursive: true, force: true });
}
if (failures.length) {
  console.error(failures.join('\n'));
  console.error(processes.report());
  process.exit(1);
}
console.log(`end-to-end scenario passed; screenshots in ${shots}`);
