// PROTOCOL.md "Holes said in-band: gap" and "Silence said in-band: zone_status" in the
// browser module: a gap's exact range and reason (with a resume's, or at once on a live
// stream), and `zone_status` events on each change, including a zone that came back
// while the page was disconnected.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { established, priceUpdate } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const TS = '2026-11-27T15:00:00.000Z';
const SINCE = '2026-11-27T14:05:00.123456Z';

const initialData = (zone, seq, price) => ({ type: 'initial_data', timestamp: TS,
  market_zone: zone, latest_price: { market_zone: zone, price, volume: 1, seq, timestamp: TS,
    accepted_at: SINCE } });
const gap = (zone, from, to, reason, extra = {}) => ({ type: 'gap', market_zone: zone,
  from_seq: from, to_seq: to, reason, timestamp: TS, ...extra });
const zoneStatus = (zone, status, lastSeq, since = SINCE) => ({ type: 'zone_status',
  market_zone: zone, status, since, last_seq: lastSeq, timestamp: TS });
const resumeComplete = (zone, recovered, from, to) => ({ type: 'resume_complete',
  market_zone: zone, recovered, from_seq: from, to_seq: to, timestamp: TS });

/** A single-zone client that got pjm seq 1, then lost its socket and is resuming. */
function resuming() {
  const env = makeClient({ zone: 'pjm' });
  env.client.connect();
  const first = env.WS.last();
  first.serverOpen();
  first.serverSend(established({ zones: undefined, market_zone: 'pjm' }));
  first.serverSend(priceUpdate('pjm', 1, 40));
  first.serverClose(1001);
  env.clock.advance(1500);
  const ws = env.WS.last();
  ws.serverOpen();
  ws.serverSend(established({ zones: undefined, market_zone: 'pjm' }));
  return { ...env, ws };
}

describe('gap', () => {
  test("a resume's gap has the server's exact range and reason", () => {
    const { ws, events } = resuming();
    ws.serverSend(gap('pjm', 2, 4, 'history_exceeded'));
    ws.serverSend(initialData('pjm', 7, 47));
    ws.serverSend(resumeComplete('pjm', false, 2, 7));
    assert.deepEqual(events.gap, [{ zone: 'pjm', fromSeq: 2, toSeq: 4, epochChanged: false,
      reason: 'history_exceeded' }]);
    assert.deepEqual(events.price.map((p) => p.price.seq), [1, 7]);
  });

  test('a server without `gap` leaves resume_complete\'s range and no reason', () => {
    const { ws, events } = resuming();
    ws.serverSend(initialData('pjm', 7, 47));
    ws.serverSend(resumeComplete('pjm', false, 2, 7));
    assert.equal(events.gap.length, 1);
    assert.equal(events.gap[0].toSeq, 7);
    assert.equal(events.gap[0].reason, null);
  });

  test('a gap on a live stream is told at once, before the next price', () => {
    const { client, WS, events } = makeClient({ zones: ['pjm'] });
    const order = [];
    client.on('gap', () => order.push('gap'));
    client.on('price', ({ price }) => order.push(`price ${price.seq}`));
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: ['pjm'] }));
    ws.serverSend(priceUpdate('pjm', 1, 40));
    ws.serverSend(gap('pjm', 2, 5, 'lost'));
    ws.serverSend(priceUpdate('pjm', 6, 46));
    assert.deepEqual(order, ['price 1', 'gap', 'price 6']);
    assert.deepEqual(events.gap[0], { zone: 'pjm', fromSeq: 2, toSeq: 5, epochChanged: false,
      reason: 'lost' });
  });
});

describe('zone_status', () => {
  test('stale then live, each once; staleZones follows', () => {
    const { client, WS, events } = makeClient({ zones: ['pjm'] });
    client.connect();
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: ['pjm'] }));
    ws.serverSend(initialData('pjm', 1, 40));
    ws.serverSend(zoneStatus('pjm', 'stale', 1));
    ws.serverSend(zoneStatus('pjm', 'stale', 1)); // said again (e.g. a reconnect): no news
    assert.deepEqual(events.zone_status, [{ zone: 'pjm', status: 'stale', since: SINCE,
      lastSeq: 1, stale: true }]);
    assert.deepEqual(Object.keys(client.staleZones), ['pjm']);
    ws.serverSend(zoneStatus('pjm', 'live', 1));
    ws.serverSend(priceUpdate('pjm', 2, 41));
    assert.deepEqual(events.zone_status.map((s) => s.status), ['stale', 'live']);
    assert.deepEqual(client.staleZones, {});
  });

  test('a zone that came back while the page was away is told live before its price', () => {
    const { client, clock, WS, events } = makeClient({ zone: 'pjm' });
    const order = [];
    client.on('zone_status', ({ status }) => order.push(status));
    client.on('price', ({ price }) => order.push(`price ${price.seq}`));
    client.connect();
    const first = WS.last();
    first.serverOpen();
    first.serverSend(established({ zones: undefined, market_zone: 'pjm' }));
    first.serverSend(initialData('pjm', 1, 40));
    first.serverSend(zoneStatus('pjm', 'stale', 1));
    first.serverClose(1001);
    clock.advance(1500);
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: undefined, market_zone: 'pjm' }));
    ws.serverSend({ ...priceUpdate('pjm', 2, 41), replay: true });
    ws.serverSend(resumeComplete('pjm', true, 2, 2));
    assert.deepEqual(order, ['price 1', 'stale', 'live', 'price 2']);
    assert.equal(events.zone_status.at(-1).stale, false);
  });
});
