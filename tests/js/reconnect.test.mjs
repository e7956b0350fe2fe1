import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { backoffDelay, PriceHubClient } from '../../pricehub/static/pricehub.js';
import { established } from './fakes.mjs';
import { makeClient, statusTrail } from './harness.mjs';

describe('backoff delays', () => {
  test('1 s, 2 s, 4 s, 8 s, 16 s plus the jitter drawn from random()', () => {
    const opts = { baseDelayMs: 1000, jitterMs: 1000 };
    assert.deepEqual([1, 2, 3, 4, 5].map((n) => backoffDelay(n, { ...opts, random: () => 0 })),
      [1000, 2000, 4000, 8000, 16000]);
    assert.deepEqual([1, 2, 3, 4, 5].map((n) => backoffDelay(n, { ...opts, random: () => 0.999 })),
      [1999, 2999, 4999, 8999, 16999]);
  });

  test('the client waits exactly the announced delay before each attempt', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    WS.last().refuse();
    for (const [attempt, delay] of [[1, 1500], [2, 2500], [3, 4500], [4, 8500], [5, 16500]]) {
      const before = WS.sockets.length;
      assert.equal(events.status.at(-1).status, 'reconnecting');
      assert.equal(events.status.at(-1).attempt, attempt);
      assert.equal(events.status.at(-1).delayMs, delay);
      clock.advance(delay - 1);
      assert.equal(WS.sockets.length, before, `attempt ${attempt} opened early`);
      clock.advance(1);
      assert.equal(WS.sockets.length, before + 1, `attempt ${attempt} not opened on time`);
      WS.last().refuse();
    }
  });
});

describe('attempt cap and manual reconnect', () => {
  test('after 5 failed attempts the client stops with status failed', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    WS.last().refuse();
    for (const delay of [1500, 2500, 4500, 8500, 16500]) {
      clock.advance(delay);
      WS.last().refuse();
    }
    assert.deepEqual(statusTrail(events), [
      'connecting 0',
      'reconnecting 1/5 1500', 'connecting 1',
      'reconnecting 2/5 2500', 'connecting 2',
      'reconnecting 3/5 4500', 'connecting 3',
      'reconnecting 4/5 8500', 'connecting 4',
      'reconnecting 5/5 16500', 'connecting 5',
      'failed 1006',
    ]);
    assert.equal(client.status, 'failed');
    clock.advance(10 * 60_000);
    assert.equal(WS.sockets.length, 6, 'no socket may be opened after failing');
    assert.equal(clock.pending, 0, 'no timer may stay armed after failing');
  });

  test('maxAttempts is configurable', () => {
    const { client, clock, WS, events } = makeClient({ maxAttempts: 2, baseDelayMs: 50, jitterMs: 0 });
    client.connect();
    WS.last().refuse();
    clock.advance(50);
    WS.last().refuse();
    clock.advance(100);
    WS.last().refuse();
    assert.deepEqual(statusTrail(events).filter((s) => !s.startsWith('connecting')),
      ['reconnecting 1/2 50', 'reconnecting 2/2 100', 'failed 1006']);
  });

  test('reconnect() after failing connects at once and starts a fresh cycle', () => {
    const { client, clock, WS, events } = makeClient({ maxAttempts: 1 });
    client.connect();
    WS.last().refuse();
    clock.advance(1500);
    WS.last().refuse();
    assert.equal(client.status, 'failed');
    client.reconnect();
    assert.equal(WS.sockets.length, 3);
    assert.equal(client.status, 'connecting');
    WS.last().refuse();
    assert.equal(events.status.at(-1).status, 'reconnecting');
    assert.equal(events.status.at(-1).attempt, 1);
  });

  test('reconnect() during the backoff wait skips the wait; no-op when connected', () => {
    const { client, clock, WS } = makeClient();
    client.connect();
    WS.last().refuse();
    client.reconnect();
    assert.equal(WS.sockets.length, 2);
    clock.advance(5_000);
    assert.equal(WS.sockets.length, 2, 'the cancelled backoff timer must not fire');
    WS.last().serverAccept();
    client.reconnect();
    assert.equal(WS.sockets.length, 2);
  });
});

describe('attempt counter resets only after 10 s of stable connection', () => {
  test('a server that accepts and drops does not get endless retries', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    while (client.status !== 'failed') {
      WS.last().serverAccept();
      clock.advance(9_999); // open, but not for 10 s
      WS.last().serverClose(1011);
      if (client.status === 'reconnecting') clock.advance(events.status.at(-1).delayMs);
    }
    const attempts = events.status.filter((s) => s.status === 'reconnecting').map((s) => s.attempt);
    assert.deepEqual(attempts, [1, 2, 3, 4, 5]);
    assert.equal(client.status, 'failed');
    assert.equal(WS.sockets.length, 6);
  });

  test('a connection open for 10 s makes the next outage start at attempt 1 again', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    WS.last().refuse();
    clock.advance(1500);
    WS.last().refuse();
    clock.advance(2500);
    WS.last().serverAccept(); // attempt 2 succeeded
    clock.advance(10_000);
    WS.last().serverClose(1001);
    assert.equal(events.status.at(-1).attempt, 1);
    assert.equal(events.status.at(-1).delayMs, 1500);
  });

  test('closing before the 10 s mark keeps counting', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    WS.last().refuse();
    clock.advance(1500);
    WS.last().serverAccept();
    clock.advance(9_000);
    WS.last().serverClose(1001);
    assert.equal(events.status.at(-1).attempt, 2);
  });
});

describe('close codes', () => {
  for (const code of [1008, 4001, 4003]) {
    test(`close ${code} is terminal: no retry`, () => {
      const { client, clock, WS, events } = makeClient();
      client.connect();
      WS.last().serverOpen();
      WS.last().serverClose(code, 'nope');
      const { cause, ...failed } = events.status.at(-1);
      assert.deepEqual(failed,
        { status: 'failed', code, reason: 'nope', terminal: true, attempts: 0, maxAttempts: 5 });
      assert.equal(cause.kind, 'server');
      assert.match(cause.text, /^The .* \(nope\)\.$/);
      clock.advance(10 * 60_000);
      assert.equal(WS.sockets.length, 1);
    });
  }

  for (const code of [1000, 1001, 1006, 1009, 1011, 1013, 4000, 4008, 4029]) {
    test(`close ${code} is retried`, () => {
      const { client, clock, WS } = makeClient();
      client.connect();
      WS.last().serverOpen();
      WS.last().serverClose(code);
      assert.equal(client.status, 'reconnecting');
      clock.advance(1500);
      assert.equal(WS.sockets.length, 2);
    });
  }

  test('close() by the application is final and quiet', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    WS.last().serverOpen();
    client.close();
    assert.equal(WS.last().closedWith.code, 1000);
    assert.equal(events.status.at(-1).status, 'closed');
    clock.advance(10 * 60_000);
    assert.equal(WS.sockets.length, 1);
    assert.equal(clock.pending, 0);
  });

  test('a constructor that throws fails terminally instead of looping', () => {
    const client = new PriceHubClient({
      url: 'http://127.0.0.1:1/',
      WebSocket: class { constructor() { throw new SyntaxError('bad url'); } },
    });
    const statuses = [];
    client.on('status', (s) => statuses.push(s.status));
    client.connect();
    assert.deepEqual(statuses, ['connecting', 'failed']);
  });
});

describe('heartbeat', () => {
  test('sends {"type":"heartbeat"} every heartbeat_interval seconds from connection_established', () => {
    const { client, clock, WS } = makeClient();
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    clock.advance(5_000);
    assert.equal(ws.sent.length, 0, 'no heartbeat before connection_established');
    ws.serverSend(established({ heartbeat_interval: 5 }));
    for (let i = 1; i <= 3; i += 1) {
      clock.advance(4_999);
      assert.equal(ws.sent.length, i - 1);
      clock.advance(1);
      assert.deepEqual(ws.sent.at(-1), { type: 'heartbeat' });
      ws.serverSend({ type: 'heartbeat_ack', timestamp: '2026-11-27T15:00:00.000Z' });
    }
  });

  test('a silent socket (no frame for 2 intervals) is abandoned and retried', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ heartbeat_interval: 5 }));
    clock.advance(15_000);
    assert.equal(ws.closedWith.code, 4000);
    assert.equal(events.status.at(-1).status, 'reconnecting');
    assert.equal(events.status.at(-1).code, 4000);
  });

  test('a socket that never delivers connection_established is abandoned after 10 s', () => {
    const { client, clock, WS, events } = makeClient();
    client.connect();
    const ws = WS.last();
    ws.serverOpen(); // accepted, but the greeting never comes
    clock.advance(9_999);
    assert.equal(client.status, 'connecting');
    clock.advance(1);
    assert.equal(ws.closedWith.code, 4000);
    assert.equal(events.status.at(-1).status, 'reconnecting');
    clock.advance(1500);
    WS.last().serverOpen();
    WS.last().serverSend(established());
    clock.advance(60_000);
    assert.equal(client.status, 'connected', 'the greeting must stop the establish timer');
  });

  test('heartbeats stop when the socket closes', () => {
    const { client, clock, WS } = makeClient();
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ heartbeat_interval: 1 }));
    ws.serverClose(1001);
    client.close();
    clock.advance(60_000);
    assert.equal(ws.sent.length, 0);
    assert.equal(clock.pending, 0);
  });
});
