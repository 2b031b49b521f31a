// The acceptance scenario of the usage dashboards and the audit search (issue 6), against real
// processes: the OpenID Connect provider (oidc-provider) for the portal's sign-in, a local double
// of Entra ID's discovery and key set for the gateway's token validation (tokens signed here, RS256),
// gatehouse-simulator, gatehouse-gateway (SQLite audit store, 127.0.0.1 a trusted proxy) and
// gatehouse-portal reading the same SQLite file (--audit-database), driven in Debian's Chromium.
//
// Two Entra users of two groups call the gateway from two IPs (X-Forwarded-For). An auditor finds
// each call by caller IP, by user and by a word of its prompt, opens it and sees the prompt as
// text (`<b>x</b>` literally, no <b> element); the CSV export of a search holds the rows of the
// page. A team lead of group A sees group A's tokens on /usage and not group B's, and is refused
// the audit search; an admin sees both groups. Screenshots (1280 px) go to $SCREENSHOTS.
//
//   GATEHOUSE_BIN_DIR=…/debug LEPTOS_SITE_ROOT=…/target/site node insights.mjs
import { generateKeyPairSync, randomUUID, sign } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { downloadByClick, reservePorts, launchChromium, Processes, signInWith, waitFor } from './lib.mjs';
import { LEADS_GROUP, startProvider } from './provider.mjs';

const bin = process.env.GATEHOUSE_BIN_DIR ?? path.resolve('../target/debug');
const siteRoot = process.env.LEPTOS_SITE_ROOT ?? path.resolve('../target/site');
const shots = process.env.SCREENSHOTS ?? path.resolve('../target/end2end/insights');
mkdirSync(shots, { recursive: true });

const CLIENT_ID = 'gatehouse-portal';
const CLIENT_SECRET = `e2e-${Math.random().toString(36).slice(2)}${Date.now()}`;
const TENANT = '7d3c2b1a-0f9e-4d8c-b7a6-112233445566';
const AUDIENCE = 'api://gatehouse';
/** Group A is the one the team lead (lee) leads; group B is another team's. */
const GROUP_A = LEADS_GROUP;
const GROUP_B = 'c0ffee00-2222-4333-8444-555566667777';
/** The two callers: Entra users of groups A and B, behind the proxy at two client IPs. */
const CALLERS = {
  zoe: {
    oid: 'a0a0a0a0-0000-4000-8000-00000000000a', name: 'Zoe Zebra', upn: 'zoe@contoso.example',
    group: GROUP_A, ip: '203.0.113.10', word: 'zebracorn',
    prompt: 'Tell me about the zebracorn of the northern plains.',
  },
  quinn: {
    oid: 'b0b0b0b0-0000-4000-8000-00000000000b', name: 'Quinn Quokka', upn: 'quinn@contoso.example',
    group: GROUP_B, ip: '198.51.100.20', word: 'quokkaphant',
    prompt: 'Is the quokkaphant <b>x</b> real? <script>window.pwned=1</script>',
  },
};

const b64url = (value) => Buffer.from(value).toString('base64url');

/**
 * A local double of Entra ID for the gateway: the v2 discovery document and key set of `TENANT`,
 * and RS256 access tokens signed with its key.
 */
async function startEntra() {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = 'e2e-key-1';
  const jwk = publicKey.export({ format: 'jwk' });
  const server = http.createServer((request, response) => {
    const url = new URL(request.url, base);
    let body;
    if (url.pathname === `/${TENANT}/v2.0/.well-known/openid-configuration`) {
      body = {
        issuer: `${base}/${TENANT}/v2.0`,
        jwks_uri: `${base}/${TENANT}/discovery/v2.0/keys`,
        id_token_signing_alg_values_supported: ['RS256'],
      };
    } else if (url.pathname === `/${TENANT}/discovery/v2.0/keys`) {
      body = { keys: [{ kty: 'RSA', use: 'sig', kid, n: jwk.n, e: jwk.e, issuer: `${base}/{tenantid}/v2.0` }] };
    }
    response.writeHead(body ? 200 : 404, { 'content-type': 'application/json' });
    response.end(JSON.stringify(body ?? { error: 'not found' }));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${server.address().port}`;
  return {
    url: base,
    token(user) {
      const now = Math.floor(Date.now() / 1000);
      const header = b64url(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid }));
      const claims = b64url(JSON.stringify({
        aud: AUDIENCE, iss: `${base}/${TENANT}/v2.0`, iat: now - 10, nbf: now - 10, exp: now + 3600,
        ver: '2.0', tid: TENANT, oid: user.oid, sub: `sub-${user.oid}`, name: user.name,
        preferred_username: user.upn, scp: 'user_impersonation', groups: [user.group],
        // The client application the access token was issued to, as Entra's v2 tokens name it.
        azp: '5e3a0000-0000-0000-0000-0000000c11e1',
      }));
      const signature = sign('sha256', Buffer.from(`${header}.${claims}`), privateKey).toString('base64url');
      return `${header}.${claims}.${signature}`;
    },
    stop: () => new Promise((resolve) => {
      server.close(resolve);
      server.closeAllConnections();
    }),
  };
}

/** Parses RFC 4180 CSV into rows of cells. */
function parseCsv(text) {
  const rows = [];
  let row = [];
  let cell = '';
  let quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { cell += '"'; i += 1; } else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') { row.push(cell); cell = ''; } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i += 1;
      row.push(cell); rows.push(row); row = []; cell = '';
    } else cell += c;
  }
  if (cell !== '' || row.length) { row.push(cell); rows.push(row); }
  return rows;
}

const failures = [];
function check(condition, message) {
  if (!condition) failures.push(message);
}

const processes = new Processes(bin);
const work = mkdtempSync(path.join(os.tmpdir(), 'gatehouse-insights-'));
let provider;
let entra;
let browser;
try {
  const reserved = await reservePorts(3);
  const [simPort, gatewayPort, portalPort] = reserved.ports;
  const portal = `http://127.0.0.1:${portalPort}`;
  const gateway = `http://127.0.0.1:${gatewayPort}`;
  const auditDb = `sqlite:${path.join(work, 'audit.db')}`;
  provider = await startProvider({
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    redirectUri: `${portal}/auth/callback`,
  });
  entra = await startEntra();

  const adminToken = path.join(work, 'admin-token');
  writeFileSync(adminToken, `e2e-admin-${randomUUID()}\n`, { mode: 0o600 });
  // The snapshot is written here rather than through the portal's admin pages (scenario.mjs
  // drives those), and the portal is not told about the gateway, so it pushes no snapshot of its
  // own: Entra tokens of TENANT, a rule per group, the simulator as the only member.
  const snapshot = {
    version: 1,
    trusted_proxies: ['127.0.0.1/32'],
    identity: {
      require: 'token',
      entra: { tenants: [TENANT], audiences: [AUDIENCE], authority_host: entra.url },
    },
    access_rules: [
      { id: 'group-a', grantee: { kind: 'group', id: GROUP_A, display_name: 'Group A' }, deployments: ['gpt-4o'] },
      { id: 'group-b', grantee: { kind: 'group', id: GROUP_B, display_name: 'Group B' }, deployments: ['gpt-4o'] },
    ],
    pools: [{
      id: 'simulator',
      deployments: ['gpt-4o'],
      members: [{ id: 'simulator', endpoint: `http://127.0.0.1:${simPort}`, priority: 1, weight: 1 }],
    }],
  };
  writeFileSync(path.join(work, 'gateway.yaml'), [
    'server:',
    `  listen: 127.0.0.1:${gatewayPort}`,
    '  gateway_id: e2e-insights',
    `  state_dir: ${path.join(work, 'state')}`,
    `  admin_token: file:${adminToken}`,
    '  audit:',
    `    database: ${auditDb}`,
    '  log_format: text',
    // JSON is YAML: the snapshot as one flow mapping.
    `snapshot: ${JSON.stringify(snapshot)}`,
    '',
  ].join('\n'));

  await reserved.release();
  processes.start('simulator', 'gatehouse-simulator', ['--listen', `127.0.0.1:${simPort}`, '--id', 'simulator']);
  processes.start('gateway', 'gatehouse-gateway', ['serve', '--config', path.join(work, 'gateway.yaml')]);
  await waitFor(`${gateway}/healthz`, 'the gateway');
  processes.start('portal', 'gatehouse-portal', [
    '--listen', `127.0.0.1:${portalPort}`,
    '--public-url', portal,
    '--database', `sqlite:${path.join(work, 'portal.db')}`,
    '--audit-database', auditDb,
    '--model-prices', 'gpt-4o=2.5/10',
    '--oidc-issuer', provider.issuer,
    '--oidc-client-id', CLIENT_ID,
    '--oidc-client-secret', 'env:E2E_OIDC_CLIENT_SECRET',
    '--group-roles', `${LEADS_GROUP}=TeamLead`,
  ], {
    E2E_OIDC_CLIENT_SECRET: CLIENT_SECRET,
    LEPTOS_SITE_ROOT: siteRoot,
    LEPTOS_OUTPUT_NAME: 'gatehouse-portal',
  });
  await waitFor(`${portal}/`, 'the portal');

  // --- The calls: each user from their IP, through the trusted proxy's header ---
  for (const user of Object.values(CALLERS)) {
    const response = await fetch(
      `${gateway}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`,
      {
        method: 'POST',
        headers: {
          authorization: `Bearer ${entra.token(user)}`,
          'x-forwarded-for': user.ip,
          'content-type': 'application/json',
        },
        body: JSON.stringify({ messages: [{ role: 'user', content: user.prompt }] }),
      },
    );
    check(response.status === 200, `${user.name}'s call through the gateway answers 200 (${response.status}: ${(await response.text()).slice(0, 200)})`);
  }

  browser = await launchChromium();
  const signIn = signInWith(browser, portal, failures);
  const shot = (page, name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

  // --- The auditor ---
  const auditor = await signIn('audrey');
  const search = async (params) => {
    const query = new URLSearchParams({ range: '1h', ...params });
    await auditor.goto(`${portal}/audit?${query}`, { waitUntil: 'networkidle' });
    await auditor.waitForSelector('#audit-results, #audit-no-results');
    return auditor.$$eval('tr.audit-row', (rows) => rows.map((r) => ({ id: r.dataset.id, text: r.textContent })));
  };

  // The writer batches: wait until both calls are in the store.
  let all = [];
  for (let i = 0; i < 60; i += 1) {
    all = await search({});
    if (all.length >= 2) break;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  check(all.length === 2, `both calls reach the audit store (${all.length} rows)`);

  const found = {};
  for (const [login, user] of Object.entries(CALLERS)) {
    const byIp = await search({ caller: user.ip });
    check(byIp.length === 1 && byIp[0].text.includes(user.ip), `${login}'s call is found by caller IP ${user.ip} (${byIp.length} rows)`);
    const byCidr = await search({ caller: `${user.ip.split('.').slice(0, 3).join('.')}.0/24` });
    check(byCidr.length === 1 && byCidr[0].id === byIp[0]?.id, `${login}'s call is found by the /24 around its IP`);
    // The record's UserName is the token's preferred_username (the UPN); UserId its oid.
    for (const name of [user.upn, user.oid]) {
      const byUser = await search({ user: name });
      check(byUser.length === 1 && byUser[0].id === byIp[0]?.id, `${login}'s call is found by user ${name} (${byUser.length} rows)`);
    }
    const byWord = await search({ text: user.word });
    check(byWord.length === 1 && byWord[0].id === byIp[0]?.id, `${login}'s call is found by the word ${user.word} (${byWord.length} rows)`);
    found[login] = byIp[0]?.id;
  }
  check(found.zoe && found.quinn && found.zoe !== found.quinn, 'the two calls are two records');
  const none = await search({ caller: '192.0.2.1' });
  check(none.length === 0, 'an IP nobody called from finds nothing');

  // The search page and its CSV export hold the same rows.
  const pageIds = (await search({})).map((r) => r.id).sort();
  await shot(auditor, 'audit');
  const csvResponse = await auditor.request.get(`${portal}/audit/export?${new URLSearchParams({ format: 'csv', range: '1h' })}`);
  check(csvResponse.status() === 200, `the CSV export answers 200 (${csvResponse.status()})`);
  const csv = parseCsv(await csvResponse.text()).filter((row) => row.length > 1);
  const column = csv[0]?.indexOf('CorrelationId') ?? -1;
  check(column >= 0, `the CSV has a CorrelationId column (${csv[0]?.join(',')})`);
  const csvIds = csv.slice(1).map((row) => row[column]).sort();
  check(JSON.stringify(csvIds) === JSON.stringify(pageIds),
    `the CSV holds the page's rows (page ${pageIds.join(' ')}; CSV ${csvIds.join(' ')})`);
  // The page's own "Export CSV" button downloads the same rows.
  const clickedCsv = parseCsv(await downloadByClick(auditor, '#audit-export-csv')).filter((row) => row.length > 1);
  const clickedIds = clickedCsv.slice(1).map((row) => row[column]).sort();
  check(JSON.stringify(clickedIds) === JSON.stringify(pageIds),
    `the "Export CSV" button downloads the page's rows (${clickedIds.join(' ')})`);
  const jsonlIds = (await downloadByClick(auditor, '#audit-export-jsonl')).split('\n').filter(Boolean)
    .map((line) => JSON.parse(line).CorrelationId).sort();
  check(JSON.stringify(jsonlIds) === JSON.stringify(pageIds),
    `the "Export JSON lines" button downloads the page's calls, a line each (${jsonlIds.join(' ')})`);
  const wordCsv = await auditor.request.get(`${portal}/audit/export?${new URLSearchParams({ format: 'csv', range: '1h', text: 'zebracorn' })}`);
  const wordIds = parseCsv(await wordCsv.text()).filter((row) => row.length > 1).slice(1).map((row) => row[column]);
  check(wordIds.length === 1 && wordIds[0] === found.zoe, 'the CSV of a word search holds that one call');

  // The call detail: the prompt is text, the markup in it is not markup.
  await search({ text: 'quokkaphant' });
  await Promise.all([auditor.waitForURL(/\/audit\/call\?/), auditor.click('tr.audit-row a.audit-open')]);
  await auditor.waitForSelector('#call-prompt');
  await auditor.waitForLoadState('networkidle');
  const prompt = await auditor.textContent('#call-prompt');
  check(prompt?.includes('quokkaphant <b>x</b> real?'), `the prompt is shown as text (${prompt?.slice(0, 200)})`);
  check(prompt?.includes('<script>'), 'the script tag in the prompt is shown as text');
  const ownElements = await auditor.$$eval('#call-prompt *', (elements) =>
    elements.every((e) => (e.tagName === 'DIV' && ['message', 'message-label'].includes(e.className))
      || (e.tagName === 'DIV' && e.className === 'content message-text')));
  check(ownElements, 'the prompt creates no element: the page\'s own messages only');
  check((await auditor.textContent('#call-prompt .message-label'))?.trim() === 'user',
    'the prompt\'s message is shown under its speaker');
  check((await auditor.textContent('#call-completion'))?.includes('Simulated answer to: Is the quokkaphant'),
    'the completion is shown as text');
  check((await auditor.textContent('#call-attempts td code'))?.trim() === 'simulator',
    'the attempts are a table naming the member');
  const requestBody = await auditor.textContent('#call-request-body .content');
  check(requestBody?.includes('"messages":[') && requestBody?.includes('<script>window.pwned=1</script>'),
    `the request body is shown as captured, as text (${requestBody?.slice(0, 200)})`);
  check((await auditor.$$('#call-request-body .content *')).length === 0, 'the request body creates no element');
  const boldX = await auditor.$$eval('b', (bs) => bs.filter((b) => b.textContent === 'x').length);
  check(boldX === 0, 'no <b> element holds the prompt\'s x');
  check(await auditor.evaluate(() => window.pwned === undefined), 'the prompt\'s script did not run');
  check((await auditor.textContent('#call-id'))?.trim() === found.quinn, 'the detail is the call that was opened');
  check((await auditor.textContent('#call-caller'))?.includes(CALLERS.quinn.ip), 'the detail names the caller IP');
  check((await auditor.textContent('#call-user'))?.includes(CALLERS.quinn.upn), 'the detail names the user');
  await shot(auditor, 'audit-call');

  // The dashboard, as the auditor.
  await auditor.goto(`${portal}/dashboard?range=1h`, { waitUntil: 'networkidle' });
  await auditor.waitForSelector('#dashboard-figures');
  const requests = await auditor.textContent('#fig-requests .card-value');
  check(requests?.trim() === '2', `the dashboard counts the two calls (${requests})`);
  const [figureNames, figures] = parseCsv(await downloadByClick(auditor, '#dashboard-csv'));
  const requestsColumn = figureNames?.indexOf('Requests') ?? -1;
  check(figures?.[requestsColumn] === '2',
    `the dashboard's "Download CSV" button downloads its figures: 2 requests (${figureNames?.join(',')} / ${figures?.join(',')})`);
  await shot(auditor, 'dashboard');

  // Who searched and opened which calls is for admins: an auditor's activity page leaves it out.
  // The page must have listed what the auditor may read (entries, or none yet), not refused them.
  await auditor.goto(`${portal}/activity`, { waitUntil: 'networkidle' });
  await auditor.waitForSelector('ol.activity, p.empty');
  const auditorActivity = await auditor.textContent('main');
  check(!auditorActivity?.includes('audit.search'), 'an auditor does not read the record of audit access');
  await auditor.context().close();

  // --- The admin: the auditor's searches and views in the activity log ---
  const admin = await signIn('alice');
  await admin.goto(`${portal}/activity`, { waitUntil: 'networkidle' });
  await admin.waitForSelector('ol.activity');
  const activity = await admin.textContent('main');
  for (const action of ['audit.search', 'audit.view', 'audit.export']) {
    check(activity?.includes(action), `the activity log records ${action}`);
  }
  check(activity?.includes('audrey'), 'the activity log names the auditor');
  await shot(admin, 'activity');

  // --- The admin: both groups on /usage ---
  await admin.goto(`${portal}/usage?range=1h&dimension=group`, { waitUntil: 'networkidle' });
  await admin.waitForSelector('#usage-table');
  const adminGroups = await admin.$$eval('tr.usage-row', (rows) => rows.map((r) => r.dataset.value));
  check(adminGroups.includes(GROUP_A) && adminGroups.includes(GROUP_B), `the admin sees both groups (${adminGroups})`);
  await shot(admin, 'usage-admin');
  await admin.context().close();

  // --- The team lead of group A ---
  const lead = await signIn('lee');
  await lead.goto(`${portal}/usage?range=1h&dimension=group`, { waitUntil: 'networkidle' });
  await lead.waitForSelector('#usage-table');
  const leadRows = await lead.$$eval('tr.usage-row', (rows) => rows.map((r) => ({
    value: r.dataset.value,
    tokens: Number((r.children[5]?.textContent ?? '').replace(/\D/g, '')),
  })));
  check(leadRows.length === 1 && leadRows[0].value === GROUP_A, `the team lead sees only group A (${JSON.stringify(leadRows)})`);
  check(leadRows[0]?.tokens > 0, 'the team lead sees group A\'s tokens');
  check(!(await lead.textContent('main'))?.includes(GROUP_B), 'group B appears nowhere on the team lead\'s page');
  check((await lead.textContent('#usage-restricted'))?.includes(GROUP_A), 'the page says it shows only the groups led');
  const leadCsv = await lead.request.get(`${portal}/usage/export.csv?range=1h&dimension=group`);
  const leadCsvText = await leadCsv.text();
  check(leadCsv.status() === 200 && leadCsvText.includes(GROUP_A) && !leadCsvText.includes(GROUP_B),
    `the team lead's usage CSV holds group A only (${leadCsv.status()})`);
  const leadClicked = await downloadByClick(lead, '#usage-csv');
  check(leadClicked === leadCsvText, 'the usage page\'s "Download CSV" button downloads that CSV, group A only');
  await shot(lead, 'usage');
  await lead.goto(`${portal}/audit?range=1h`, { waitUntil: 'networkidle' });
  const leadAudit = await lead.textContent('main');
  check(leadAudit?.includes('your role does not allow this') && !leadAudit.includes(CALLERS.zoe.ip),
    'the team lead is refused the audit search');
  const leadExport = await lead.request.get(`${portal}/audit/export?format=csv&range=1h`);
  check(leadExport.status() === 403, `the team lead is refused the audit export (${leadExport.status()})`);
  await lead.context().close();
} catch (error) {
  failures.push(String(error?.stack ?? error));
} finally {
  if (browser) await browser.close();
  processes.stop();
  if (provider) await provider.stop();
  if (entra) await entra.stop();
  rmSync(work, { recursive: true, force: true });
}
if (failures.length) {
  console.error(failures.join('\n'));
  console.error(processes.report());
  process.exit(1);
}
console.log(`insights scenario passed; screenshots in ${shots}`);
