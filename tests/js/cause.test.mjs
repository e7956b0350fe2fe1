// Why a connection ended, as the client tells it (explainEnd, status `cause`, lastCause): only
// from what the page can read. Issue 22.7: behind a proxy that refuses upgrades, a stream the
// proxy answered 502 was reported with the WebSocket's stale "origin not allowed" diagnosis.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { explainEnd, SseConnection } from '../../pricehub/static/pricehub.js';
import { established, fakeFetch, flush, sseEvent } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const HOST = '127.0.0.1:8080';
const BEHIND_PROXY_502 = `Cannot reach the server behind the proxy at ${HOST} (HTTP 502).`;
const UNREACHABLE = `Cannot reach the server at ${HOST}.`;
const ORIGIN_BODY = '{"error":"origin_not_allowed","message":"origin not allowed"}';
const BUSY_BODY = '{"error":"over_capacity","message":"server over its connection limit"}';

describe('explainEnd', () => {
  const base = { host: HOST, origin: 'http://page.example' };
  const sseRefused = (status, error, extra = {}) => ({ ...base, transport: 'sse', opened: false,
    code: 1006, reason: `HTTP ${status}: x`, status, error, gateway: false, ...extra });
  for (const [name, end, kind, text] of [
    ['a stream fetch that failed', { ...base, transport: 'sse', opened: false, code: 1006 },
      'unreachable', UNREACHABLE],
    ["a gateway's 502 on the stream", sseRefused(502, null, { gateway: true }),
      'unreachable', BEHIND_PROXY_502],
    ["pricehub's 403 origin_not_allowed", sseRefused(403, 'origin_not_allowed', { code: 4003 }),
      'origin', "The server refused this page's origin (http://page.example): check "
        + "--allowed-origins, or the proxy's Host header: nginx needs 'proxy_set_header Host $http_host'."],
    ["pricehub's 403 forbidden_zone", sseRefused(403, 'forbidden_zone', { code: 4003, reason: 'HTTP 403: no' }),
      'server', 'The token does not allow this zone (HTTP 403: no).'],
    ["pricehub's 503 over_capacity", sseRefused(503, 'over_capacity', { code: 1013, reason: 'HTTP 503: busy' }),
      'server', 'The server is over its connection limit; it will be retried later (HTTP 503: busy).'],
    ['another HTTP refusal', sseRefused(500, null, { reason: 'HTTP 500: oops' }),
      'refused', 'The server refused the event stream (HTTP 500: oops).'],
    ['a stream that ended', { ...base, transport: 'sse', opened: true, code: 1006 },
      'dropped', 'The event stream from the server ended.'],
    ['a socket dropped after opening', { ...base, transport: 'ws', opened: true, code: 1006 },
      'dropped', 'The connection to the server dropped without a close frame.'],
    ['a close code', { ...base, transport: 'ws', opened: true, code: 1001, reason: '' },
      'server', 'The server is restarting or shutting down.'],
    ['the client giving up', { code: 4000, reason: 'no frame from the server' },
      'timeout', 'No answer from the server in time (no frame from the server).'],
    ['a socket refused before opening', { ...base, transport: 'ws', opened: false, code: 1006 },
      'ws_refused', 'The WebSocket could not be opened.'],
  ]) {
    test(`${name}: ${kind}`, () => {
      const cause = explainEnd(end);
      assert.equal(cause.kind, kind);
      assert.equal(cause.text, text);
      assert.equal(Boolean(cause.pending), kind === 'ws_refused');
    });
  }
});

describe('SseConnection: who answered', () => {
  for (const [status, body, code, gateway] of [
    [502, '<h1>502 Bad Gateway</h1>', 1006, true],
    [504, '', 1006, true],
    [503, '<html>Service Unavailable</html>', 1006, true],
    [503, BUSY_BODY, 1013, false],
    [403, ORIGIN_BODY, 4003, false],
  ]) {
    test(`HTTP ${status} ${body.slice(0, 16)}: gateway ${gateway}, close ${code}`, async () => {
      const fetch = fakeFetch();
      const conn = new SseConnection('http://h/x', { fetch });
      let closed = null;
      conn.onclose = (e) => { closed = e; };
      await fetch.respond(status, body);
      await flush();
      assert.deepEqual([closed.code, closed.gateway], [code, gateway]);
    });
  }
});

describe('the cause the client reports', () => {
  function autoClient(options = {}) {
    const fetch = fakeFetch();
    return { fetch, ...makeClient({ transport: 'auto', fetch, zones: ['pjm'], ...options }) };
  }
  const call = (fetch, path) => fetch.calls.filter((c) => new URL(c.url).pathname === path).at(-1);
  const causes = (events) => events.status.filter((s) => s.cause).map((s) => `${s.status} ${s.cause.text}`);

  /** WebSocket refused (a proxy strips the upgrade), diagnosed, then live over SSE. */
  async function liveOverSse() {
    const c = autoClient();
    c.client.connect();
    c.WS.last().refuse();
    await c.fetch.respondTo(call(c.fetch, '/api/ws/ws/health'), 200, '{"status":"healthy"}');
    await c.fetch.respondTo(call(c.fetch, '/api/ws/ws/prices'), 400, 'upgrade expected');
    const stream = await c.fetch.respondTo(c.fetch.lastStream(), 200);
    stream.push(sseEvent(established({ transport: 'sse' })));
    await flush();
    assert.equal(c.client.status, 'connected');
    assert.equal(c.client.lastDiagnosis.kind, 'upgrade_refused');
    assert.equal(c.client.lastCause, null);
    return { ...c, stream };
  }

  test('after an SSE fallback, the server gone behind the proxy: unreachable, never origin', async () => {
    const { client, clock, fetch, events, stream } = await liveOverSse();
    stream.end(); // the server shut down
    await flush();
    clock.advance(1500);
    await fetch.respondTo(fetch.lastStream(), 502, '<h1>502 Bad Gateway</h1>');
    await flush();
    assert.deepEqual(client.lastCause, { kind: 'unreachable', text: BEHIND_PROXY_502 });
    clock.advance(2500);
    fetch.lastStream().reject(new TypeError('fetch failed')); // the proxy gone too
    await flush();
    assert.deepEqual(causes(events), [
      'reconnecting The event stream from the server ended.',
      `reconnecting ${BEHIND_PROXY_502}`,
      `reconnecting ${UNREACHABLE}`,
    ]);
    for (let attempt = 3; attempt <= 5; attempt += 1) {
      clock.advance(events.status.at(-1).delayMs);
      await fetch.respondTo(fetch.lastStream(), 502, '');
      await flush();
    }
    assert.equal(events.status.at(-1).status, 'failed');
    assert.equal(events.status.at(-1).cause.text, BEHIND_PROXY_502);
    assert.equal(client.lastDiagnosis.kind, 'upgrade_refused', 'the WebSocket diagnosis stays');
    assert.equal(causes(events).filter((c) => c.includes('origin')).length, 0);
  });

  test("the stream's 403 origin_not_allowed is the origin, and terminal", async () => {
    const { client, fetch, events } = autoClient({ transport: 'sse' });
    client.connect();
    await fetch.respondTo(fetch.lastStream(), 403, ORIGIN_BODY);
    await flush();
    const last = events.status.at(-1);
    assert.deepEqual([last.status, last.terminal, last.cause.kind], ['failed', true, 'origin']);
    assert.match(last.cause.text, /^The server refused this page's origin \(http:\/\/127\.0\.0\.1:8080\)/);
  });

  test('a WebSocket refused before opening: pending, then what the diagnosis found', async () => {
    const { client, WS, events } = makeClient(); // fetch fails: nothing answers
    client.connect();
    WS.last().refuse();
    assert.equal(events.status.at(-1).cause.kind, 'ws_refused');
    await flush();
    assert.deepEqual(client.lastCause, { kind: 'unreachable', text: UNREACHABLE });
  });

  test("a diagnosis that returns late does not replace the stream's answer", async () => {
    const { client, WS, fetch } = autoClient();
    client.connect();
    WS.last().refuse();
    await fetch.respondTo(fetch.lastStream(), 502, '');
    await flush();
    assert.equal(client.lastCause.text, BEHIND_PROXY_502);
    await fetch.respondTo(call(fetch, '/api/ws/ws/health'), 200, '{"status":"healthy"}');
    await fetch.respondTo(call(fetch, '/api/ws/ws/prices'), 400, '');
    await flush();
    assert.equal(client.lastDiagnosis.kind, 'upgrade_refused');
    assert.equal(client.lastCause.text, BEHIND_PROXY_502);
  });

  test('a server without SSE (404): the WebSocket refusal stays the cause', async () => {
    const { client, WS, fetch, events } = autoClient();
    client.connect();
    WS.last().refuse();
    await fetch.respondTo(fetch.lastStream(), 404, '404: Not Found');
    await flush();
    assert.equal(events.status.at(-1).cause.kind, 'ws_refused');
    await fetch.respondTo(call(fetch, '/api/ws/ws/health'), 502, '');
    await flush();
    assert.equal(client.lastCause.text, BEHIND_PROXY_502);
  });

  test('connected again: no cause', async () => {
    const { client, WS } = makeClient();
    client.connect();
    WS.last().serverAccept();
    WS.last().serverClose(1001);
    assert.equal(client.lastCause.kind, 'server');
    client.reconnect();
    WS.last().serverAccept();
    assert.equal(client.lastCause, null);
  });
});
