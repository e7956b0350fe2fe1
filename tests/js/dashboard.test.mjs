// The dashboard's decisions without a page: what the badge and banner say (connectionView), the
// figures of a tile (ZoneSeries) and what it says about its zone's feed (ZoneHealth). The page itself runs in tests/test_dashboard_browser.py.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { connectionView, dashboardRate, utcClock, ZoneHealth, ZoneSeries } from '../../pricehub/static/dashboard.js';

const UPGRADE_REFUSED = { kind: 'upgrade_refused',
  text: "The server refused the connection: this page's origin (http://p) is not allowed (...), "
    + 'or a proxy strips the WebSocket upgrade.' };
const GATEWAY = { kind: 'unreachable',
  text: 'Cannot reach the server behind the proxy at p:80 (HTTP 502).' };

describe('connectionView', () => {
  test('live over SSE: no banner; the tooltip says why not the WebSocket', () => {
    const view = connectionView({ status: 'connected', transport: 'sse' },
      { cause: null, diagnosis: UPGRADE_REFUSED });
    assert.equal(view.state, 'live');
    assert.equal(view.label, 'Live · SSE');
    assert.equal(view.banner.state, 'hidden');
    assert.equal(view.title,
      `Live over Server-Sent Events: the WebSocket could not be opened (${UPGRADE_REFUSED.text})`);
  });

  test('a diagnosis of "unreachable" is not repeated while the stream is live', () => {
    const view = connectionView({ status: 'connected', transport: 'sse' },
      { diagnosis: { kind: 'unreachable', text: 'Cannot reach the server at p:80.' } });
    assert.equal(view.title, 'Live over Server-Sent Events: the WebSocket could not be opened');
  });

  // Issue 22.7: the WebSocket's old diagnosis (origin or proxy) was the banner's reason for a
  // stream that a proxy now answers 502; the reason is the cause of the attempt that ended.
  for (const s of [
    { status: 'reconnecting', attempt: 2, maxAttempts: 5, delayMs: 100, code: 1006 },
    { status: 'connecting', attempt: 2, maxAttempts: 5, transport: 'sse' },
    { status: 'failed', terminal: false, attempts: 5, maxAttempts: 5, code: 1006 },
  ]) {
    test(`${s.status}: banner and tooltip give the same cause, not the stale diagnosis`, () => {
      const view = connectionView(s, { cause: GATEWAY, diagnosis: UPGRADE_REFUSED });
      assert.equal(view.banner.reason, GATEWAY.text);
      assert.equal(view.title, `${s.status === 'failed' ? 'Offline' : 'Reconnecting'}: ${GATEWAY.text}`);
      assert.doesNotMatch(`${view.title} ${view.banner.reason}`, /origin/);
    });
  }

  test('banner texts: attempts, the end of retrying, a terminal refusal', () => {
    const cause = { kind: 'server', text: 'The subscriber token is missing, invalid or expired.' };
    assert.equal(connectionView({ status: 'reconnecting', attempt: 1, maxAttempts: 5 }).banner.text,
      'Reconnecting… (attempt 1/5)');
    assert.equal(connectionView({ status: 'failed', attempts: 1, maxAttempts: 1 }).banner.text,
      'Offline: reconnection stopped after 1 attempt.');
    const terminal = connectionView({ status: 'failed', terminal: true, code: 4001, reason: 'x' },
      { cause });
    assert.equal(terminal.banner.text, 'Connection refused by the server (code 4001: x).');
    assert.equal(terminal.banner.reason, cause.text);
    assert.equal(terminal.title, `Offline: ${cause.text}`);
    assert.equal(terminal.state, 'offline');
  });

  test('the first connect shows no banner and no reason', () => {
    const view = connectionView({ status: 'connecting', attempt: 0, maxAttempts: 5 });
    assert.deepEqual([view.state, view.banner.state, view.banner.reason, view.title],
      ['connecting', 'hidden', '', 'Connection to the price feed']);
  });
});

describe('ZoneSeries', () => {
  const NOW = Date.parse('2026-11-27T12:00:00.000Z');
  const at = (hhmm) => `2026-11-27T${hhmm}:00.000Z`;
  const price = (seq, value, hhmm) => ({ market_zone: 'pjm', seq, price: value, volume: 1,
    timestamp: at(hhmm) });
  const series = () => new ZoneSeries(240, { now: () => NOW });
  const summary = (f) => ({ open: f.open, exact: f.exact, high: f.high, low: f.low,
    last: f.last.price, prices: f.prices });

  test('the open is the earliest price of the UTC day, exact once midnight is covered', () => {
    const s = series();
    s.merge([price(2, 30, '06:00'), price(1, 20, '03:00'), price(3, 35, '09:00')], 'e1');
    assert.deepEqual(summary(s.figures()),
      { open: 20, exact: false, high: 35, low: 20, last: 35, prices: [20, 30, 35] });
    s.merge([{ ...price(0, 10, '00:00'), timestamp: '2026-11-26T23:30:00.000Z' }], 'e1');
    assert.equal(s.figures().open, 20);
    assert.equal(s.figures().exact, true);
  });

  // Issue 22.7: after a restart on a new epoch, Open* kept the old server's price while High,
  // Low and the sparkline restarted from the new history.
  test('a new epoch starts every figure over, from the new history only', () => {
    const s = series();
    s.merge([{ ...price(1, 5, '00:00'), timestamp: '2026-11-26T23:30:00.000Z' },
      price(2, 100, '01:00'), price(3, 110, '02:00')], 'old');
    assert.deepEqual([s.figures().open, s.figures().exact], [100, true]);
    s.merge([price(1, 30, '05:00')], 'new'); // the first live price of the new server
    assert.deepEqual(summary(s.figures()),
      { open: 30, exact: false, high: 30, low: 30, last: 30, prices: [30] });
    s.merge([price(0, 20, '04:00'), price(1, 30, '05:00')], 'new'); // its history
    const f = s.figures();
    assert.deepEqual(summary(f), { open: 20, exact: false, high: 30, low: 20, last: 30, prices: [20, 30] });
    assert.ok(f.low <= f.open && f.open <= f.high, 'the open lies within the history shown');
  });

  test('no price of today: no open, the rest still shows', () => {
    const s = series();
    s.merge([{ ...price(1, 7, '00:00'), timestamp: '2026-11-26T20:00:00.000Z' }], 'e1');
    assert.deepEqual([s.figures().open, s.figures().high], [null, 7]);
    assert.equal(new ZoneSeries(10).figures(), null);
  });
});

// Issue 25: a tile counts its zone's gaps and shows a stale zone until it is live again.
describe('ZoneHealth', () => {
  const gap = (fromSeq, toSeq, reason) => ({ zone: 'pjm', fromSeq, toSeq, reason,
    epochChanged: reason === 'epoch_changed' });
  const stale = (since, lastSeq) => ({ zone: 'pjm', status: 'stale', since, lastSeq, stale: true });
  const live = { zone: 'pjm', status: 'live', since: null, lastSeq: 9, stale: false };

  test('nothing to say: no gap text, not stale', () => {
    assert.deepEqual(new ZoneHealth().view(),
      { gapText: '', gapTitle: '', stale: false, staleText: '', staleTitle: '' });
  });

  test('gaps are counted; the tooltip has the last one\'s reason and range', () => {
    const h = new ZoneHealth();
    h.noteGap(gap(3, 7, 'history_exceeded'));
    assert.equal(h.view().gapText, 'gaps 1');
    assert.match(h.view().gapTitle, /^Last gap: seqs 3–7 missed, .*\(history_exceeded\)$/);
    h.noteGap(gap(8, null, 'epoch_changed'));
    assert.equal(h.view().gapText, 'gaps 2');
    assert.match(h.view().gapTitle, /^Last gap: seqs from 8 missed, .*new epoch.*\(epoch_changed\)$/);
    h.noteGap(gap(5, 5, null)); // an older server, or the WebSocket-to-SSE switch
    assert.equal(h.view().gapTitle, 'Last gap: seq 5 missed, reason not given');
  });

  test('stale says since when, as UTC HH:MM:SSZ, until the zone is live', () => {
    const h = new ZoneHealth();
    h.noteStatus(stale('2026-11-27T14:05:00.123456Z', 9));
    const view = h.view();
    assert.equal(view.stale, true);
    assert.equal(view.staleText, 'STALE since 14:05:00Z');
    assert.match(view.staleTitle, /since 14:05:00Z/);
    h.noteStatus(live);
    assert.deepEqual([h.view().stale, h.view().staleText], [false, '']);
  });

  test('a newer price ends the staleness; the stale price itself does not', () => {
    const h = new ZoneHealth();
    h.noteStatus(stale('2026-11-27T14:05:00.000000Z', 9));
    h.notePrice({ seq: 9 }); // e.g. initial_data of a reconnect
    assert.equal(h.view().stale, true);
    h.notePrice({ seq: 10 });
    assert.equal(h.view().stale, false);
  });

  test('utcClock reads any ISO UTC time, null for garbage', () => {
    assert.equal(utcClock('2026-11-27T14:05:00Z'), '14:05:00Z');
    assert.equal(utcClock('2026-11-27T14:05:00.5+00:00'), '14:05:00Z');
    assert.equal(utcClock(null), null);
    assert.equal(new ZoneHealth().view().staleText, '');
    const h = new ZoneHealth();
    h.noteStatus(stale(null, null));
    assert.equal(h.view().staleText, 'STALE');
  });
});

describe('dashboardRate', () => {
  test('every update for a few tiles, 4/s above 50 zones, 1/s above 500', () => {
    assert.deepEqual([1, 50, 51, 500, 501, 20000].map(dashboardRate), [null, null, 4, 4, 1, 1]);
  });
});
