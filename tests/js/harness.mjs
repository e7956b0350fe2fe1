import { PriceHubClient } from '../../pricehub/static/pricehub.js';
import { FakeClock, fakeWebSocketClass } from './fakes.mjs';

/** A client wired to a fake clock and fake sockets, with every event recorded. */
export function makeClient(options = {}, { random = () => 0.5 } = {}) {
  const clock = new FakeClock();
  const WS = fakeWebSocketClass();
  const client = new PriceHubClient({
    url: 'http://127.0.0.1:8080/',
    WebSocket: WS,
    // WebSocket-only unless a test says otherwise; no real network: fetch always fails.
    transport: 'ws',
    fetch: async () => { throw new TypeError('fetch failed'); },
    timers: clock,
    now: clock.now,
    random,
    ...options,
  });
  const events = { status: [], price: [], gap: [], zone_status: [], backend: [], error: [] };
  for (const type of Object.keys(events)) client.on(type, (detail) => events[type].push(detail));
  return { client, clock, WS, events };
}

/** Statuses as compact strings, e.g. "reconnecting 2/5 2500". */
export function statusTrail(events) {
  return events.status.map((s) => {
    if (s.status === 'reconnecting') return `reconnecting ${s.attempt}/${s.maxAttempts} ${s.delayMs}`;
    if (s.status === 'connecting') return `connecting ${s.attempt}`;
    if (s.status === 'failed') return `failed${s.terminal ? ' terminal' : ''} ${s.code ?? ''}`.trim();
    return s.status;
  });
}
