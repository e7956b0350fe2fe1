import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  describeClose, diagnoseRefusedSocket, SseConnection, SseParser,
} from '../../pricehub/static/pricehub.js';
import { established, fakeFetch, flush, priceUpdate, sseEvent } from './fakes.mjs';
import { makeClient, statusTrail } from './harness.mjs';

describe('SseParser', () => {
  test('events, ids that persist, comments, multi-line data, any line ending', () => {
    const p = new SseParser();
    const events = [
      ...p.feed('retry: 1000\n: ping\nevent: connection_established\ndata: {"a":1}\n\n'),
      ...p.feed('id: c1\r\nevent: price_update\r\ndata: x\r\ndata:y\r\n\r\n'),
      ...p.feed('data: no type\r\rdata: z\n'),
    ];
    assert.deepEqual(events, [
      { event: 'connection_established', data: '{"a":1}', id: '' },
      { event: 'price_update', data: 'x\ny', id: 'c1' },
      { event: 'message', data: 'no type', id: 'c1' },
    ]);
    assert.equal(p.comments, 1);
    assert.deepEqual(p.feed('\n'), [{ event: 'message', data: 'z', id: 'c1' }]);
  });

  test('a line split anywhere across chunks, even inside CRLF', () => {
    const text = 'id: k9\r\nevent: price_update\r\ndata: {"seq":1}\r\n\r\n';
    for (let cut = 1; cut < text.length; cut += 1) {
      const p = new SseParser();
      const events = [...p.feed(text.slice(0, cut)), ...p.feed(text.slice(cut))];
      assert.deepEqual(events, [{ event: 'price_update', data: '{"seq":1}', id: 'k9' }], `cut ${cut}`);
    }
  });

  test('an oversized event is dropped, the next one parses', () => {
    const p = new SseParser({ maxEventChars: 10 });
    assert.deepEqual(p.feed(`data: ${'x'.repeat(20)}\n\ndata: ok\n\n`),
      [{ event: 'message', data: 'ok', id: '' }]);
  });
});

describe('SseConnection', () => {
  test('opens on 200, delivers events with their id, pings, then closes 1006 at the end', async () => {
    const fetch = fakeFetch();
    const conn = new SseConnection('http://h/api/ws/sse/prices', { fetch, lastEventId: 'c7' });
    const seen = [];
    conn.onopen = () => seen.push('open');
    conn.onmessage = (e) => seen.push(`${e.type}:${e.lastEventId}:${e.data}`);
    conn.onping = () => seen.push('ping');
    conn.onclose = (e) => seen.push(`close ${e.code}`);
    const stream = await fetch.respond(200);
    assert.equal(fetch.calls[0].headers['Last-Event-ID'], 'c7');
    stream.push(': ping\n\nid: c8\nevent: price_update\ndata: {}\n\n');
    await flush();
    stream.end();
    await flush();
    assert.deepEqual(seen, ['open', 'ping', 'price_update:c8:{}', 'close 1006']);
  });

  for (const [status, body, code, extra] of [
    [401, '{"error":"invalid_token","message":"token expired"}', 4001, {}],
    [403, '{"error":"origin_not_allowed","message":"origin not allowed"}', 4003, {}],
    [404, '{"error":"unknown_zone","message":"unknown zone x"}', 1008, { routeMissing: false }],
    [404, '404: Not Found', 1006, { routeMissing: true }],
    [503, '{"error":"over_limit","message":"busy"}', 1013, {}],
    [400, '{"error":"invalid_cursor","message":"bad cursor"}', 1006, { badCursor: true }],
    [422, '{"error":"too_many_zones","message":"too many zones"}', 1008, {}],
  ]) {
    test(`HTTP ${status} ${body.slice(0, 20)} closes with ${code}`, async () => {
      const fetch = fakeFetch();
      const conn = new SseConnection('http://h/x', { fetch });
      let closed = null;
      conn.onclose = (e) => { closed = e; };
      await fetch.respond(status, body);
      await flush();
      assert.equal(closed.code, code);
      assert.equal(closed.status, status);
      for (const [k, v] of Object.entries(extra)) assert.equal(closed[k], v);
    });
  }
});

describe('transport fallback', () => {
  function autoClient(options = {}) {
    const fetch = fakeFetch();
    return { fetch, ...makeClient({ transport: 'auto', fetch, ...options }) };
  }

  test('a WebSocket refused before opening falls back to SSE in the same attempt', async () => {
    const { client, WS, fetch, events } = autoClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    WS.last().refuse();
    const streamCall = fetch.calls.find((c) => c.url.includes('/api/ws/sse/'));
    assert.ok(streamCall, 'no SSE request after the refused WebSocket');
    assert.equal(new URL(streamCall.url).pathname, '/api/ws/sse/prices');
    assert.equal(new URL(streamCall.url).searchParams.get('zones'), 'pjm,ercot');
    const stream = await fetch.respondTo(streamCall, 200);
    stream.push(sseEvent(established({ transport: 'sse' })));
    stream.push(sseEvent(priceUpdate('pjm', 1, 40), 'cur-1'));
    await flush();
    assert.equal(client.status, 'connected');
    assert.equal(client.transport, 'sse');
    assert.equal(events.status.at(-1).transport, 'sse');
    assert.deepEqual(events.price.map((p) => p.price.seq), [1]);
    assert.equal(client.send({ type: 'heartbeat' }), false, 'a stream cannot send');
  });

  test('SSE stays, resumes with Last-Event-ID, and keeps the backoff rules', async () => {
    const { client, clock, WS, fetch, events } = autoClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    WS.last().refuse();
    let stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established()));
    stream.push(sseEvent(priceUpdate('pjm', 1, 40), 'cur-1'));
    stream.push(sseEvent(priceUpdate('pjm', 2, 41), 'cur-2'));
    await flush();
    stream.end(); // e.g. the server shut down
    await flush();
    assert.equal(events.status.at(-1).status, 'reconnecting');
    assert.equal(events.status.at(-1).delayMs, 1500);
    const sockets = WS.sockets.length;
    clock.advance(1500);
    assert.equal(WS.sockets.length, sockets, 'no WebSocket once SSE works');
    assert.equal(fetch.lastStream().headers['Last-Event-ID'], 'cur-2');
    stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established()));
    stream.push(sseEvent(priceUpdate('pjm', 2, 41, { replay: true }), 'cur-2'));
    stream.push(sseEvent(priceUpdate('pjm', 3, 42, { replay: true }), 'cur-3'));
    stream.push(sseEvent({ type: 'resume_complete', timestamp: 't', market_zone: 'pjm',
      recovered: true, from_seq: 3, to_seq: 3 }));
    stream.push(sseEvent({ type: 'resume_complete', timestamp: 't', market_zone: 'ercot',
      recovered: true, from_seq: 1, to_seq: 0 }));
    await flush();
    assert.deepEqual(events.price.map((p) => p.price.seq), [1, 2, 3]);
    assert.equal(client.duplicatesDropped, 1);
  });

  test('the cursor does not move past prices held back for a resume', async () => {
    const { client, WS, fetch, clock } = autoClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    WS.last().refuse();
    let stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established()));
    stream.push(sseEvent(priceUpdate('pjm', 1, 40), 'cur-1'));
    await flush();
    stream.end();
    await flush();
    clock.advance(1500);
    stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established()));
    stream.push(sseEvent(priceUpdate('pjm', 2, 41, { replay: true }), 'cur-2')); // held
    await flush();
    stream.end(); // dies before resume_complete
    await flush();
    clock.advance(2500);
    assert.equal(fetch.lastStream().headers['Last-Event-ID'], 'cur-1');
    assert.equal(client.lastSeq('pjm'), 2, 'the replayed price itself was delivered');
  });

  test('a cursor the server refuses (400) is dropped and the stream reopened at once', async () => {
    const { client, clock, WS, fetch, events } = autoClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    WS.last().refuse();
    let stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established()));
    stream.push(sseEvent(priceUpdate('pjm', 1, 40), 'cur-1'));
    await flush();
    stream.end();
    await flush();
    clock.advance(1500);
    await fetch.respondTo(fetch.lastStream(), 400, '{"error":"invalid_cursor","message":"no"}');
    await flush();
    const last = fetch.lastStream();
    assert.equal(last.headers['Last-Event-ID'], undefined);
    assert.equal(events.status.filter((s) => s.status === 'reconnecting').length, 1);
    stream = await fetch.respondTo(last, 200);
    stream.push(sseEvent(established()));
    await flush();
    assert.deepEqual(events.gap.map((g) => g.zone), ['pjm'], 'pjm could not be resumed');
    assert.equal(client.status, 'connected');
  });

  test('a server without SSE (404): the WebSocket failure counts, then WebSocket again', async () => {
    const { client, clock, WS, fetch, events } = autoClient();
    client.connect();
    WS.last().refuse();
    await fetch.respondTo(fetch.lastStream(), 404, '404: Not Found');
    await flush();
    assert.deepEqual(statusTrail(events).filter((s) => !s.startsWith('connecting')),
      ['reconnecting 1/5 1500']);
    clock.advance(1500);
    assert.equal(WS.sockets.length, 2);
    WS.last().refuse();
    assert.equal(fetch.calls.filter((c) => c.url.includes('/sse/')).length, 1,
      'SSE is not asked again after a 404');
  });

  test("transport 'sse' never opens a WebSocket; single zone resumes with since/epoch", async () => {
    const { client, clock, WS, fetch } = autoClient({ transport: 'sse', zone: 'pjm' });
    client.connect();
    assert.equal(WS.sockets.length, 0);
    let stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established({ zones: undefined, market_zone: 'pjm', epoch: 'E1' })));
    stream.push(sseEvent(priceUpdate('pjm', 9, 40), 'c9'));
    await flush();
    stream.end();
    await flush();
    clock.advance(1500);
    const url = new URL(fetch.lastStream().url);
    assert.equal(url.pathname, '/api/ws/sse/market/pjm');
    assert.equal(url.searchParams.get('since'), '9');
    assert.equal(url.searchParams.get('epoch'), 'E1');
    stream = await fetch.respondTo(fetch.lastStream(), 200);
    assert.equal(WS.sockets.length, 0);
  });

  test('an SSE 401 is terminal like close 4001', async () => {
    const { client, fetch, events } = autoClient({ transport: 'sse' });
    client.connect();
    await fetch.respondTo(fetch.lastStream(), 401, '{"error":"invalid_token","message":"expired"}');
    await flush();
    assert.equal(events.status.at(-1).status, 'failed');
    assert.equal(events.status.at(-1).terminal, true);
    assert.equal(events.status.at(-1).code, 4001);
  });
});

describe('diagnosis of a refused WebSocket', () => {
  const SOCKET = 'ws://127.0.0.1:8080/api/ws/ws/prices?zones=';
  // byPath: pathname -> status, or [status, body]; a path missing: the fetch fails.
  const answering = (byPath) => async (url) => {
    const answer = byPath[new URL(url).pathname];
    if (answer === undefined) throw new TypeError('fetch failed');
    const [status, body] = Array.isArray(answer) ? answer : [answer, ''];
    return { status, ok: status < 300, text: async () => body };
  };
  const BUSY = [503, '{"error":"over_capacity","message":"server over its connection limit"}'];

  test('server up, the socket path wants an upgrade: the Origin or a proxy refused it', async () => {
    const fetch = answering({ '/api/ws/ws/health': 200, '/api/ws/ws/prices': 400 });
    const d = await diagnoseRefusedSocket(fetch, 'http://127.0.0.1:8080/', SOCKET);
    assert.equal(d.kind, 'upgrade_refused');
    assert.match(d.text, /^The server refused the connection: this page's origin \(http:\/\/127\.0\.0\.1:8080\) is not allowed/);
    assert.match(d.text, /--allowed-origins/);
    assert.match(d.text, /\$http_host/);
  });

  for (const [answer, kind] of [[401, 'auth'], [403, 'origin'], [404, 'not_found'], [BUSY, 'busy']]) {
    test(`the socket path answers ${answer}: ${kind}`, async () => {
      const fetch = answering({ '/api/ws/ws/health': 200, '/api/ws/ws/prices': answer });
      assert.equal((await diagnoseRefusedSocket(fetch, 'http://127.0.0.1:8080/', SOCKET)).kind, kind);
    });
  }

  // Issue 22.7: a proxy's 502 went on to the socket path, whose 502 read as an Origin refusal.
  for (const [path, answer] of [['/api/ws/ws/health', 502], ['/api/ws/ws/health', 504],
    ['/api/ws/ws/health', [503, '<html>Service Unavailable</html>']], ['/api/ws/ws/prices', 502]]) {
    const status = Array.isArray(answer) ? answer[0] : answer;
    test(`a gateway's ${status} on ${path}: unreachable, with the status`, async () => {
      const fetch = answering({ '/api/ws/ws/health': 200, '/api/ws/ws/prices': 400, [path]: answer });
      const d = await diagnoseRefusedSocket(fetch, 'http://127.0.0.1:8080/', SOCKET);
      assert.deepEqual(d, { kind: 'unreachable',
        text: `Cannot reach the server behind the proxy at 127.0.0.1:8080 (HTTP ${status}).` });
    });
  }

  test("pricehub's own 503 health report (unhealthy) is an answer from the server", async () => {
    const fetch = answering({ '/api/ws/ws/health': [503, '{"status":"unhealthy"}'],
      '/api/ws/ws/prices': 400 });
    const d = await diagnoseRefusedSocket(fetch, 'http://127.0.0.1:8080/', SOCKET);
    assert.equal(d.kind, 'upgrade_refused');
  });

  test('nothing answers: unreachable', async () => {
    const d = await diagnoseRefusedSocket(answering({}), 'http://127.0.0.1:8080/', SOCKET);
    assert.deepEqual(d, { kind: 'unreachable', text: 'Cannot reach the server at 127.0.0.1:8080.' });
  });

  test('the client emits it after a 1006 before open, and only then', async () => {
    const fetch = answering({ '/api/ws/ws/health': 200, '/api/ws/ws/prices': 400 });
    const { client, WS, clock } = makeClient({ fetch });
    const seen = [];
    client.on('diagnosis', (d) => seen.push(d.kind));
    client.connect();
    WS.last().serverAccept();
    WS.last().serverClose(1006); // dropped after opening: not a refusal
    await flush();
    assert.deepEqual(seen, []);
    clock.advance(1500);
    WS.last().refuse();
    await flush();
    assert.deepEqual(seen, ['upgrade_refused']);
  });
});

test('close codes in words', () => {
  assert.equal(describeClose(4029), 'this page sent messages faster than the server allows');
  assert.equal(describeClose(1008, 'unknown zone x'),
    'the server refused the request (unknown zone, or too many zones on one connection) (unknown zone x)');
  assert.match(describeClose(1013), /connection limit/);
  assert.match(describeClose(4001), /token/);
  assert.match(describeClose(4003), /token does not allow/);
  assert.equal(describeClose(4999), 'the connection closed with code 4999');
});
