// accepted_at (PROTOCOL.md, "Accepted time on every price"): the browser module hands it on
// with every price, from a live update, initial_data and SSE alike; null stays null.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { established, fakeFetch, flush, priceUpdate, sseEvent } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const STAMP = '2026-11-27T15:21:16.123456Z';

describe('accepted_at', () => {
  test('live updates and initial data carry it on the WebSocket; null stays null', () => {
    const { client, WS, events } = makeClient({ zones: ['pjm'] });
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: ['pjm'] }));
    ws.serverSend({ type: 'initial_data', timestamp: STAMP, market_zone: 'pjm',
      latest_price: { market_zone: 'pjm', price: 1, volume: null, seq: 1,
        timestamp: '2026-11-27T15:00:00.000Z', accepted_at: null } });
    ws.serverSend(priceUpdate('pjm', 2, 41, { accepted_at: STAMP }));
    assert.deepEqual(events.price.map((p) => p.price.accepted_at), [null, STAMP]);
  });

  test('an update without the field (an older server) reads as null', () => {
    const { client, WS, events } = makeClient({ zones: ['pjm'] });
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: ['pjm'] }));
    ws.serverSend(priceUpdate('pjm', 1, 40));
    assert.equal(events.price[0].price.accepted_at, null);
  });

  test('SSE events carry it too', async () => {
    const fetch = fakeFetch();
    const { client, events } = makeClient({ transport: 'sse', fetch, zones: ['pjm'] });
    client.connect();
    const stream = await fetch.respondTo(fetch.lastStream(), 200);
    stream.push(sseEvent(established({ transport: 'sse' })));
    stream.push(sseEvent(priceUpdate('pjm', 1, 40, { accepted_at: STAMP }), 'cur-1'));
    await flush();
    assert.deepEqual(events.price.map((p) => p.price.accepted_at), [STAMP]);
  });
});
