// PROTOCOL.md "A rate the client chooses", "One consistent picture of many zones" and
// "History by market time" in the browser module: maxRate on the URL and in `subscribe`,
// `skipped` on the price event, snapshot() over the socket or HTTP, since/epoch to start from
// a snapshot's vector (a stream carries it on its URL), and history() paging a range without
// losing or repeating a price where timestamps are equal at a page's edge.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { HistoryPager, Rates, formatRate } from '../../pricehub/static/pricehub.js';
import { established, fakeFetch, flush, priceUpdate, sseEvent } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const TS = '2026-11-27T15:00:00.000Z';
const query = (url) => Object.fromEntries(new URL(url).searchParams);
const single = { zones: undefined, market_zone: 'pjm' };

describe('maxRate', () => {
  test('one rate goes on the URL of a socket and of a stream', () => {
    const { client, WS } = makeClient({ zone: 'pjm', maxRate: 4 });
    client.connect();
    assert.equal(query(WS.last().url).max_rate, '4');
    const multi = makeClient({ zones: ['pjm', 'ercot'], maxRate: 0.5 });
    multi.client.connect();
    assert.equal(query(multi.WS.last().url).max_rate, '0.5');
    assert.equal(query(multi.WS.last().url).zones, 'pjm,ercot');
  });

  test('per-zone rates are set by one subscribe per rate', () => {
    const { client, WS } = makeClient({ zones: ['pjm', 'ercot', 'caiso'],
      maxRate: { pjm: 4, caiso: 4 } });
    client.connect();
    const ws = WS.last();
    assert.equal(query(ws.url).zones, '', 'the URL opens no zone at one rate');
    assert.equal(query(ws.url).max_rate, undefined);
    ws.serverAccept({ zones: [] });
    assert.deepEqual(ws.sent, [
      { type: 'subscribe', zones: ['pjm', 'caiso'], max_rate: 4 },
      { type: 'subscribe', zones: ['ercot'] },
    ]);
  });

  test('a stream has one rate: the lowest asked', async () => {
    const fetch = fakeFetch();
    const { client } = makeClient({ zones: ['pjm', 'ercot'], transport: 'sse', fetch,
      maxRate: { pjm: 4, ercot: 0.25 } });
    client.connect();
    await flush();
    assert.equal(query(fetch.lastStream().url).max_rate, '0.25');
  });

  test('rates the server would refuse throw at once', () => {
    for (const bad of [0, -1, 1001, NaN, Infinity, 1e-9, 0.0001, '4', true]) {
      assert.throws(() => makeClient({ zone: 'pjm', maxRate: bad }), /maxRate/);
    }
    assert.throws(() => makeClient({ zones: ['pjm'], maxRate: { pjm: 0 } }), /maxRate of pjm/);
    assert.deepEqual([0.5, 1000, 0.001, 2.25].map(formatRate), ['0.5', '1000', '0.001', '2.25']);
    assert.equal(new Rates({ pjm: 2 }).of('ercot'), null);
  });

  test('skipped is on the price event, 0 when the server sent every update', () => {
    const { client, WS, events } = makeClient({ zone: 'pjm', maxRate: 1 });
    client.connect();
    const ws = WS.last();
    ws.serverAccept(single);
    ws.serverSend(priceUpdate('pjm', 1, 40));
    ws.serverSend(priceUpdate('pjm', 9, 48, { skipped: 7 }));
    assert.deepEqual(events.price.map((p) => [p.price.seq, p.skipped]), [[1, 0], [9, 7]]);
    assert.deepEqual(events.gap, [], 'skipped seqs are no gap');
  });

  test('setMaxRate on a live socket subscribes again from each zone\'s last seq', () => {
    const { client, WS } = makeClient({ zones: ['pjm', 'ercot'], subscribe: true });
    client.connect();
    const ws = WS.last();
    ws.serverAccept({ zones: [] });
    ws.serverSend({ type: 'subscribed', zones: ['pjm', 'ercot'], timestamp: TS });
    ws.serverSend(priceUpdate('pjm', 5, 40));
    ws.sent.length = 0;
    client.setMaxRate(1);
    assert.deepEqual(ws.sent, [{ type: 'subscribe', zones: ['pjm', 'ercot'], since: { pjm: 5 },
      epoch: 'e1', max_rate: 1 }]);
    assert.equal(WS.sockets.length, 1, 'the same socket');
  });

  test('setMaxRate on a single-zone socket reopens it, resuming', () => {
    const { client, WS } = makeClient({ zone: 'pjm' });
    client.connect();
    WS.last().serverAccept(single);
    WS.last().serverSend(priceUpdate('pjm', 3, 40));
    client.setMaxRate(2);
    assert.equal(WS.sockets.length, 2);
    assert.deepEqual(query(WS.last().url), { since: '3', epoch: 'e1', max_rate: '2' });
  });
});

describe('since / epoch', () => {
  test('a single zone starts resumed on the URL; nothing of before is delivered', () => {
    const { client, WS, events } = makeClient({ zone: 'pjm', since: { pjm: 7 }, epoch: 'e1' });
    client.connect();
    const ws = WS.last();
    assert.deepEqual(query(ws.url), { since: '7', epoch: 'e1' });
    ws.serverAccept(single);
    ws.serverSend(priceUpdate('pjm', 8, 41, { replay: true }));
    ws.serverSend({ type: 'resume_complete', market_zone: 'pjm', recovered: true, from_seq: 8,
      to_seq: 8, timestamp: TS });
    ws.serverSend(priceUpdate('pjm', 7, 40));
    assert.deepEqual(events.price.map((p) => p.price.seq), [8]);
  });

  test('several zones on a socket subscribe with the vector', () => {
    const { client, WS } = makeClient({ zones: ['pjm', 'ercot'], since: { pjm: 12, ercot: 0 },
      epoch: 'e1' });
    client.connect();
    const ws = WS.last();
    assert.equal(query(ws.url).zones, '');
    ws.serverAccept({ zones: [] });
    assert.deepEqual(ws.sent, [{ type: 'subscribe', zones: ['pjm', 'ercot'],
      since: { pjm: 12, ercot: 0 }, epoch: 'e1' }]);
  });

  test('a stream of several zones resumes from the vector on its URL', async () => {
    const fetch = fakeFetch();
    const { client, events } = makeClient({ zones: ['pjm', 'ercot'], transport: 'sse', fetch,
      since: { pjm: 12, ercot: 40 }, epoch: 'e1' });
    client.connect();
    await flush();
    const call = fetch.lastStream();
    assert.deepEqual(query(call.url), { zones: 'pjm,ercot', since: 'pjm:12,ercot:40', epoch: 'e1' });
    const stream = await fetch.respondTo(call, 200);
    stream.push(sseEvent(established({ transport: 'sse' })));
    stream.push(sseEvent(priceUpdate('pjm', 13, 41, { replay: true }), 'c13'));
    stream.push(sseEvent({ type: 'resume_complete', market_zone: 'pjm', recovered: true,
      from_seq: 13, to_seq: 13, timestamp: TS }));
    stream.push(sseEvent({ type: 'resume_complete', market_zone: 'ercot', recovered: true,
      from_seq: 41, to_seq: 40, timestamp: TS }));
    await flush();
    assert.deepEqual(events.gap, [], 'no zone reported as lost');
    assert.deepEqual(events.price.map((p) => p.price.seq), [13]);
  });

  test('since without epoch is refused', () => {
    assert.throws(() => makeClient({ zone: 'pjm', since: { pjm: 1 } }), /together/);
  });
});

describe('snapshot()', () => {
  const snapshotMessage = { type: 'snapshot', epoch: 'e1', timestamp: TS,
    prices: { pjm: { market_zone: 'pjm', price: 40, volume: null, seq: 12, timestamp: TS,
      accepted_at: '2026-11-27T15:00:00.000001Z' }, ercot: null },
    cursor: { pjm: 12, ercot: 0 } };

  test('on a live socket it is asked and answered there', async () => {
    const { client, WS } = makeClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    const ws = WS.last();
    ws.serverAccept();
    const pending = client.snapshot();
    assert.deepEqual(ws.sent.at(-1), { type: 'snapshot', zones: ['pjm', 'ercot'] });
    ws.serverSend(snapshotMessage);
    const snap = await pending;
    assert.equal(snap.via, 'socket');
    assert.deepEqual(snap.cursor, { pjm: 12, ercot: 0 });
    assert.equal(snap.prices.pjm.seq, 12);
    assert.equal(snap.prices.ercot, null);
  });

  test('a socket lost before the answer rejects it; no answer in time too', async () => {
    const { client, WS, clock } = makeClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    WS.last().serverAccept();
    const lost = client.snapshot();
    WS.last().serverClose(1001);
    await assert.rejects(lost, /connection ended/);
    clock.advance(1500);
    WS.last().serverAccept();
    const late = client.snapshot(['pjm'], { timeoutMs: 500 });
    clock.advance(500);
    await assert.rejects(late, /no answer within 500 ms/);
  });

  test('a late answer belongs to the request that gave up, not to the next one', async () => {
    const { client, WS, clock } = makeClient({ zones: ['pjm', 'ercot'] });
    client.connect();
    const ws = WS.last();
    ws.serverAccept();
    const first = client.snapshot(null, { timeoutMs: 100 });
    clock.advance(100);
    await assert.rejects(first, /no answer/);
    const second = client.snapshot();
    ws.serverSend({ ...snapshotMessage, cursor: { pjm: 1, ercot: 0 } }); // the first's, late
    ws.serverSend(snapshotMessage);
    assert.deepEqual((await second).cursor, { pjm: 12, ercot: 0 });
  });

  test('without a socket it reads the HTTP endpoint', async () => {
    const fetch = fakeFetch();
    const { client } = makeClient({ zones: ['pjm', 'ercot'], fetch, token: 't' });
    const pending = client.snapshot(['pjm', 'ercot']);
    await flush();
    assert.deepEqual(query(fetch.calls.at(-1).url), { zones: 'pjm,ercot', token: 't' });
    assert.equal(new URL(fetch.calls.at(-1).url).pathname, '/api/ws/ws/snapshot');
    await fetch.respond(200, JSON.stringify(snapshotMessage));
    const snap = await pending;
    assert.equal(snap.via, 'http');
    assert.equal(snap.epoch, 'e1');
  });
});

/** What GET /api/ws/ws/history answers (PROTOCOL.md) over `prices`, for a fake fetch. */
function historyServer(prices) {
  const requests = [];
  const order = (a, b) => (a.timestamp < b.timestamp ? -1 : a.timestamp > b.timestamp ? 1
    : a.market_zone < b.market_zone ? -1 : a.market_zone > b.market_zone ? 1 : a.seq - b.seq);
  const fetch = async (url) => {
    const q = query(url);
    requests.push(q);
    const zones = q.zones.split(',');
    const to = q.to ?? '2026-11-27T23:59:59.999Z';
    const limit = Number(q.limit ?? 1000);
    const hits = prices.filter((p) => zones.includes(p.market_zone) && p.timestamp >= q.from
      && p.timestamp < to).sort(order);
    const body = { zones, from: q.from, to, limit, data: hits.slice(0, limit),
      truncated: hits.length > limit, cursor: {} };
    return { status: 200, ok: true, text: async () => JSON.stringify(body) };
  };
  return { fetch, requests };
}

const at = (minute, zone, seq) => ({ market_zone: zone, price: seq, volume: null, seq,
  timestamp: `2026-11-27T10:${String(minute).padStart(2, '0')}:00.000Z` });

describe('history()', () => {
  test('pages cover the range once, in time order, with equal timestamps at the edges', async () => {
    const prices = [at(1, 'pjm', 1), at(1, 'ercot', 1), at(1, 'pjm', 2), at(2, 'ercot', 2),
      at(2, 'ercot', 3), at(2, 'pjm', 3), at(3, 'pjm', 4), at(59, 'ercot', 4)];
    const { fetch, requests } = historyServer(prices);
    const { client } = makeClient({ zones: ['pjm', 'ercot'], fetch });
    const pages = [];
    for await (const page of client.history(null, { from: '2026-11-27T10:00:00Z',
      to: new Date('2026-11-27T10:30:00Z'), limit: 2 })) pages.push(page);
    const got = pages.flatMap((p) => p.prices).map((p) => `${p.timestamp.slice(14, 16)} ${p.market_zone} ${p.seq}`);
    assert.deepEqual(got, ['01 ercot 1', '01 pjm 1', '01 pjm 2', '02 ercot 2', '02 ercot 3',
      '02 pjm 3', '03 pjm 4']);
    assert.deepEqual(pages.at(-1).cursor, { ercot: 3, pjm: 4 });
    assert.deepEqual(pages.map((p) => p.more), [...pages.slice(1).map(() => true), false]);
    assert.equal(requests[0].to, '2026-11-27T10:30:00.000Z');
  });

  test('more prices at one timestamp than a page holds: one bigger page, then on', async () => {
    const prices = [1, 2, 3, 4, 5].map((seq) => at(1, 'pjm', seq)).concat([at(2, 'pjm', 6)]);
    const { fetch, requests } = historyServer(prices);
    const { client } = makeClient({ zone: 'pjm', fetch });
    const seqs = [];
    for await (const page of client.history(['pjm'], { from: '2026-11-27T10:00:00Z', limit: 2 })) {
      seqs.push(...page.prices.map((p) => p.seq));
    }
    assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6]);
    assert.ok(requests.some((r) => r.limit === '10000'), 'a stalled page is asked bigger');
    assert.ok(new Set(requests.map((r) => r.to)).size <= 2, 'the end is fixed by the first answer');
  });

  test('the pager refuses limits the contract refuses', () => {
    assert.throws(() => new HistoryPager(['pjm'], { from: TS, limit: 0 }), /limit/);
    assert.throws(() => new HistoryPager(['pjm'], { from: TS, limit: 10001 }), /limit/);
  });
});
