import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { established, priceUpdate } from './fakes.mjs';
import { makeClient } from './harness.mjs';

const TS = '2026-11-27T15:00:00.000Z';
const subscribed = (zones) => ({ type: 'subscribed', timestamp: TS, zones });
const unknownZone = (zone) => ({ type: 'error', timestamp: TS, code: 'unknown_zone',
  message: `unknown zone '${zone}'` });

function watching(zones) {
  const env = makeClient({ subscribe: true, zones });
  const zoneEvents = [];
  env.client.on('zones', (z) => zoneEvents.push(z));
  env.client.connect();
  return { ...env, zoneEvents };
}

describe('subscribe mode (the dashboard: only the watched zones, whatever the server has)', () => {
  test('the socket opens on no zone; the watched ones are subscribed by message', () => {
    const { WS } = watching(['pjm', 'z00042']);
    const ws = WS.last();
    assert.equal(new URL(ws.url).search, '?zones=');
    ws.serverOpen();
    ws.serverSend(established({ zones: [] }));
    assert.deepEqual(ws.sent, [{ type: 'subscribe', zones: ['pjm', 'z00042'] }]);
  });

  test('watching nothing sends nothing and never means every zone', () => {
    const { WS } = watching([]);
    const ws = WS.last();
    assert.equal(new URL(ws.url).search, '?zones=');
    ws.serverOpen();
    ws.serverSend(established({ zones: [] }));
    assert.deepEqual(ws.sent, []);
  });

  test('addZones resolves with the server answer: subscribed or unknown_zone', async () => {
    const { client, WS, zoneEvents } = watching(['pjm']);
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: [] }));
    ws.serverSend(subscribed(['pjm']));
    const ok = client.addZones(['ercot']);
    const bad = client.addZones(['nosuch']);
    assert.deepEqual(ws.sent.slice(1), [
      { type: 'subscribe', zones: ['ercot'] }, { type: 'subscribe', zones: ['nosuch'] }]);
    ws.serverSend(subscribed(['ercot']));
    ws.serverSend(unknownZone('nosuch'));
    assert.deepEqual(await ok, { added: ['ercot'], rejected: [] });
    assert.deepEqual((await bad).rejected.map((r) => [r.zone, r.code]), [['nosuch', 'unknown_zone']]);
    assert.deepEqual(client.zones, ['pjm', 'ercot']);
    assert.deepEqual(zoneEvents.map((z) => z.zones), [['pjm', 'ercot'], ['pjm', 'ercot']]);
  });

  test('a remembered zone the server no longer has is dropped; the rest are asked again', () => {
    const { client, WS, zoneEvents } = watching(['pjm', 'gone', 'ercot']);
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: [] }));
    ws.serverSend(unknownZone('gone'));
    assert.deepEqual(ws.sent, [
      { type: 'subscribe', zones: ['pjm', 'gone', 'ercot'] },
      { type: 'subscribe', zones: ['pjm', 'ercot'] },
    ]);
    assert.deepEqual(zoneEvents.at(-1).rejected.map((r) => r.zone), ['gone']);
    assert.deepEqual(client.zones, ['pjm', 'ercot']);
  });

  test('removeZones unsubscribes; a reconnect resumes only the watched zones', () => {
    const { client, WS, clock } = watching(['pjm', 'ercot']);
    const ws = WS.last();
    ws.serverOpen();
    ws.serverSend(established({ zones: [] }));
    ws.serverSend(subscribed(['pjm', 'ercot']));
    ws.serverSend(priceUpdate('pjm', 5, 40));
    ws.serverSend(priceUpdate('ercot', 7, 30));
    client.removeZones(['ercot']);
    assert.deepEqual(ws.sent.at(-1), { type: 'unsubscribe', zones: ['ercot'] });
    ws.serverClose(1001);
    clock.advance(1500);
    WS.last().serverOpen();
    WS.last().serverSend(established({ zones: [] }));
    assert.deepEqual(WS.last().sent,
      [{ type: 'subscribe', zones: ['pjm'], since: { pjm: 5 }, epoch: 'e1' }]);
  });

  test('zones added while offline are subscribed on the next connection', async () => {
    const { client, WS } = watching([]);
    assert.deepEqual(await client.addZones(['pjm']), { added: ['pjm'], rejected: [] });
    WS.last().serverOpen();
    WS.last().serverSend(established({ zones: [] }));
    assert.deepEqual(WS.last().sent, [{ type: 'subscribe', zones: ['pjm'] }]);
  });
});

test('a zone the token forbids (close 4003 on its subscribe) is dropped, not fatal', async () => {
  const { client, WS, zoneEvents } = watching(['pjm']);
  WS.last().serverOpen();
  WS.last().serverSend(established({ zones: [] }));
  WS.last().serverSend(subscribed(['pjm']));
  const answer = client.addZones(['secret']);
  WS.last().serverClose(4003, 'token does not allow this zone');
  assert.deepEqual((await answer).rejected.map((r) => [r.zone, r.code]), [['secret', 'forbidden_zone']]);
  assert.equal(WS.sockets.length, 2, 'reconnected at once');
  assert.equal(client.status, 'connecting');
  WS.last().serverOpen();
  WS.last().serverSend(established({ zones: [] }));
  assert.deepEqual(WS.last().sent, [{ type: 'subscribe', zones: ['pjm'] }]);
  assert.deepEqual(client.zones, ['pjm']);
  assert.equal(zoneEvents.at(-1).rejected[0].zone, 'secret');
});

test('a 4003 on the subscribe at connect stays terminal (which zone is unknown)', () => {
  const { client, WS } = watching(['pjm', 'secret']);
  WS.last().serverOpen();
  WS.last().serverSend(established({ zones: [] }));
  WS.last().serverClose(4003, 'token does not allow this zone');
  assert.equal(client.status, 'failed');
});
