import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { established, priceUpdate } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const TS = '2026-11-27T15:00:00.000Z';

function initialData(zone, seq, price) {
  return { type: 'initial_data', timestamp: TS, market_zone: zone,
    latest_price: { market_zone: zone, price, volume: 10, seq, timestamp: TS } };
}

function resumeComplete(zone, recovered, fromSeq, toSeq) {
  return { type: 'resume_complete', timestamp: TS, market_zone: zone, recovered,
    from_seq: fromSeq, to_seq: toSeq };
}

/** Connect, then deliver pjm seq 1..3 and ercot seq 1 on the multi-zone socket. */
function connectedWithPrices(options = {}) {
  const env = makeClient(options);
  env.client.connect();
  const ws = env.WS.last();
  ws.serverOpen();
  ws.serverSend(established());
  ws.serverSend(initialData('pjm', 1, 40));
  ws.serverSend(priceUpdate('pjm', 2, 41));
  ws.serverSend(priceUpdate('pjm', 3, -2.5));
  ws.serverSend(priceUpdate('ercot', 1, 30));
  return { ...env, ws };
}

const seqs = (events) => events.price.map((p) => `${p.price.market_zone}:${p.price.seq}`);

describe('socket URLs', () => {
  test('multi-zone socket lists the zones and the token', () => {
    const { client, WS } = makeClient({ zones: ['pjm', 'ercot'], token: 't0k' });
    client.connect();
    const url = new URL(WS.last().url);
    assert.equal(`${url.protocol}//${url.host}${url.pathname}`, 'ws://127.0.0.1:8080/api/ws/ws/prices');
    assert.equal(url.searchParams.get('zones'), 'pjm,ercot');
    assert.equal(url.searchParams.get('token'), 't0k');
  });

  test('https base becomes wss; no zones = all zones', () => {
    const { client, WS } = makeClient({ url: 'https://feed.example/' });
    client.connect();
    assert.equal(WS.last().url, 'wss://feed.example/api/ws/ws/prices');
  });

  test('single-zone socket resumes with since and epoch in the URL', () => {
    const { client, clock, WS, events } = makeClient({ zone: 'pjm' });
    client.connect();
    const first = WS.last();
    assert.equal(first.url, 'ws://127.0.0.1:8080/api/ws/ws/market/pjm');
    first.serverOpen();
    first.serverSend(established({ zones: undefined, market_zone: 'pjm', epoch: 'E7' }));
    first.serverSend(priceUpdate('pjm', 41, 50));
    first.serverSend(priceUpdate('pjm', 42, 51));
    first.serverClose(1001);
    clock.advance(1500);
    const url = new URL(WS.last().url);
    assert.equal(url.pathname, '/api/ws/ws/market/pjm');
    assert.equal(url.searchParams.get('since'), '42');
    assert.equal(url.searchParams.get('epoch'), 'E7');
    assert.deepEqual(events.price.map((p) => p.price.seq), [41, 42]);
  });
});

describe('delivery', () => {
  test('prices arrive with flags; negative prices pass through', () => {
    const { events } = connectedWithPrices();
    assert.deepEqual(seqs(events), ['pjm:1', 'pjm:2', 'pjm:3', 'ercot:1']);
    assert.deepEqual(events.price[0].flags, { initial: true, replay: false, conflated: false });
    assert.equal(events.price[2].price.price, -2.5);
  });

  test('duplicates (seq <= last seen for the zone) are dropped, per zone', () => {
    const { client, ws, events } = connectedWithPrices();
    ws.serverSend(priceUpdate('pjm', 3, 99));
    ws.serverSend(priceUpdate('pjm', 2, 99));
    ws.serverSend(priceUpdate('ercot', 2, 31));
    ws.serverSend(priceUpdate('pjm', 4, 42, { conflated: true }));
    assert.deepEqual(seqs(events), ['pjm:1', 'pjm:2', 'pjm:3', 'ercot:1', 'ercot:2', 'pjm:4']);
    assert.equal(events.price.at(-1).flags.conflated, true);
    assert.equal(client.duplicatesDropped, 2);
    assert.equal(client.lastSeq('pjm'), 4);
  });

  test('server error messages become error events and keep the socket', () => {
    const { client, ws, events } = connectedWithPrices();
    ws.serverSend({ type: 'error', timestamp: TS, code: 'rate_limited', message: 'slow down' });
    ws.serverSend({ not: 'json' });
    ws.onmessage({ data: 'garbage{' });
    assert.deepEqual(events.error, [{ code: 'rate_limited', message: 'slow down' }]);
    assert.equal(client.status, 'connected');
  });
});

describe('resume on the multi-zone socket', () => {
  test('subscribe carries since per zone and the epoch; replay fills the gap once', () => {
    const { clock, WS, ws, events } = connectedWithPrices();
    ws.serverClose(4008);
    clock.advance(1500);
    const next = WS.last();
    assert.equal(new URL(next.url).search, '?zones=', 'resume opens no zone in the URL');
    next.serverOpen();
    next.serverSend(established({ zones: [] }));
    assert.deepEqual(next.sent, [{ type: 'subscribe', zones: ['pjm', 'ercot'],
      since: { pjm: 3, ercot: 1 }, epoch: 'e1' }]);
    next.serverSend({ type: 'subscribed', timestamp: TS, zones: ['pjm', 'ercot'] });
    for (const seq of [3, 4, 5, 6]) next.serverSend(priceUpdate('pjm', seq, 40 + seq, { replay: true }));
    next.serverSend(resumeComplete('pjm', true, 4, 6));
    next.serverSend(resumeComplete('ercot', true, 2, 1));
    next.serverSend(priceUpdate('pjm', 7, 47));
    assert.deepEqual(seqs(events).slice(4), ['pjm:4', 'pjm:5', 'pjm:6', 'pjm:7']);
    assert.equal(events.price[4].flags.replay, true);
    assert.deepEqual(events.gap, []);
  });

  test('recovered:false surfaces a gap and then the current state', () => {
    const { clock, WS, ws, events } = connectedWithPrices();
    ws.serverClose(1006);
    clock.advance(1500);
    const next = WS.last();
    next.serverOpen();
    next.serverSend(established());
    next.serverSend(initialData('pjm', 900, 60));
    next.serverSend(resumeComplete('pjm', false, 4, 900));
    assert.deepEqual(events.gap, [{ zone: 'pjm', fromSeq: 4, toSeq: 900, epochChanged: false,
      reason: null }]); // reason: that server sent no `gap`
    assert.deepEqual(seqs(events).at(-1), 'pjm:900');
    assert.equal(events.price.at(-1).flags.initial, true);
  });

  test('a new epoch restarts numbering: lower seqs are accepted, gap flagged', () => {
    const { client, clock, WS, ws, events } = connectedWithPrices();
    ws.serverClose(1001);
    clock.advance(1500);
    const next = WS.last();
    next.serverOpen();
    next.serverSend(established({ epoch: 'e2' }));
    assert.deepEqual(next.sent[0].epoch, 'e1', 'the resume must name the old epoch');
    next.serverSend(initialData('pjm', 1, 70));
    next.serverSend(resumeComplete('pjm', false, 4, 1));
    next.serverSend(priceUpdate('pjm', 2, 71));
    assert.equal(client.epoch, 'e2');
    assert.deepEqual(events.gap.map((g) => [g.zone, g.epochChanged]), [['pjm', true]]);
    assert.deepEqual(seqs(events).slice(4), ['pjm:1', 'pjm:2']);
  });

  test('a server that opened the zones anyway: its initial_data waits for the replay', () => {
    const { clock, WS, ws, events } = connectedWithPrices();
    ws.serverClose(1006);
    clock.advance(1500);
    const next = WS.last();
    next.serverOpen();
    next.serverSend(established());
    next.serverSend(initialData('pjm', 5, 45));
    next.serverSend(priceUpdate('pjm', 4, 44, { replay: true }));
    next.serverSend(priceUpdate('pjm', 5, 45, { replay: true }));
    next.serverSend(resumeComplete('pjm', true, 4, 5));
    assert.deepEqual(seqs(events).slice(4), ['pjm:4', 'pjm:5']);
  });

  test('zones that never had a price are subscribed without since', () => {
    const { client, clock, WS, events } = makeClient({ zones: ['pjm', 'spp'] });
    client.connect();
    assert.equal(new URL(WS.last().url).searchParams.get('zones'), 'pjm,spp');
    WS.last().serverOpen();
    WS.last().serverSend(established({ zones: ['pjm', 'spp'] }));
    WS.last().serverSend(priceUpdate('pjm', 8, 40));
    WS.last().serverClose(1011);
    clock.advance(1500);
    WS.last().serverOpen();
    WS.last().serverSend(established({ zones: [] }));
    assert.deepEqual(WS.last().sent,
      [{ type: 'subscribe', zones: ['pjm', 'spp'], since: { pjm: 8 }, epoch: 'e1' }]);
    assert.deepEqual(events.status.at(-1).zones, ['pjm', 'spp']);
  });

  test('no subscribe is sent on a first connection', () => {
    const { ws } = connectedWithPrices();
    assert.deepEqual(ws.sent, []);
  });
});

describe('storage backend', () => {
  test('backend events on connect and on storage_backend_changed', () => {
    const { client, ws, events } = connectedWithPrices();
    ws.serverSend({ type: 'storage_backend_changed', timestamp: TS, storage_backend: 'redis' });
    ws.serverSend({ type: 'storage_backend_changed', timestamp: TS, storage_backend: 'redis' });
    assert.deepEqual(events.backend, [
      { backend: 'in-memory', previous: null },
      { backend: 'redis', previous: 'in-memory' },
    ]);
    assert.equal(client.backend, 'redis');
  });
});

describe('history over HTTP', () => {
  test('fetchHistory asks /api/ws/ws/history/{zone}?limit=N and returns data', async () => {
    const calls = [];
    const fakeFetch = async (url) => {
      calls.push(url);
      return { ok: true, status: 200, json: async () => ({ market_zone: 'pjm', data: [{ seq: 1 }] }) };
    };
    const { client } = makeClient({ url: 'ws://127.0.0.1:9000/', fetch: fakeFetch });
    assert.deepEqual(await client.fetchHistory('pjm', { limit: 50 }), [{ seq: 1 }]);
    assert.deepEqual(calls, ['http://127.0.0.1:9000/api/ws/ws/history/pjm?limit=50']);
  });

  test('fetchHistory rejects on HTTP errors', async () => {
    const fakeFetch = async () => ({ ok: false, status: 404, json: async () => ({}) });
    const { client } = makeClient({ fetch: fakeFetch });
    await assert.rejects(client.fetchHistory('nowhere'), /HTTP 404/);
  });
});
