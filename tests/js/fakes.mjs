// Deterministic stand-ins for time and the WebSocket, so the reconnect logic of pricehub.js can
// be checked to the millisecond in Node. Only the client side is faked: these tests exercise the
// client's state machine; the real browser <-> server path is covered by
// tests/test_dashboard_browser.py.

/** A manual clock: timers fire only when advance() moves time past them. */
export class FakeClock {
  constructor() {
    this.time = 0;
    this._nextId = 1;
    this._timers = new Map(); // id -> {at, fn, every}
    this.setTimeout = (fn, ms) => this._add(fn, ms, null);
    this.setInterval = (fn, ms) => this._add(fn, ms, ms);
    this.clearTimeout = (id) => this._timers.delete(id);
    this.clearInterval = (id) => this._timers.delete(id);
    this.now = () => this.time;
  }

  _add(fn, ms, every) {
    const id = this._nextId++;
    this._timers.set(id, { at: this.time + Math.max(0, ms), fn, every });
    return id;
  }

  /** Pending one-shot and interval timers. */
  get pending() { return this._timers.size; }

  /** Move time forward by ms, firing due timers in time order. */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let nextId = null;
      let next = null;
      for (const [id, t] of this._timers) {
        if (t.at <= end && (next === null || t.at < next.at)) { nextId = id; next = t; }
      }
      if (next === null) break;
      this.time = next.at;
      if (next.every === null) this._timers.delete(nextId);
      else next.at += next.every;
      next.fn();
    }
    this.time = end;
  }
}

/** Records every socket the client creates; the test plays the server's part. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(data) {
      if (this.readyState !== 1) throw new Error('send on a socket that is not open');
      this.sent.push(JSON.parse(data));
    }

    close(code = 1000, reason = '') {
      this.readyState = 3;
      this.closedWith = { code, reason };
    }

    // --- server side ---
    serverOpen() { this.readyState = 1; this.onopen?.({}); }
    /** Open and greet, as a pricehub server does. */
    serverAccept(overrides = {}) { this.serverOpen(); this.serverSend(established(overrides)); }
    serverSend(message) { this.onmessage?.({ data: JSON.stringify(message) }); }
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    /** A refused TCP connection: the browser reports close 1006 without an open. */
    refuse() { this.serverClose(1006); }
  }
  FakeWebSocket.sockets = sockets;
  FakeWebSocket.last = () => sockets[sockets.length - 1];
  return FakeWebSocket;
}

export function established(overrides = {}) {
  return {
    type: 'connection_established',
    timestamp: '2026-11-27T15:00:00.000Z',
    connection_id: '00000000-0000-4000-8000-000000000000',
    zones: ['pjm', 'ercot'],
    storage_backend: 'in-memory',
    epoch: 'e1',
    heartbeat_interval: 30,
    message: 'Connected',
    ...overrides,
  };
}

export function priceUpdate(zone, seq, price, extra = {}) {
  return {
    type: 'price_update', market_zone: zone, price, volume: 100, seq,
    timestamp: `2026-11-27T15:00:${String(seq % 60).padStart(2, '0')}.000Z`, ...extra,
  };
}

/** Let pending promise callbacks (fetch answers, stream reads) run. */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** One SSE event as a pricehub server writes it. */
export function sseEvent(message, id = null) {
  return `${id === null ? '' : `id: ${id}\n`}event: ${message.type}\ndata: ${JSON.stringify(message)}\n\n`;
}

/**
 * A fetch whose answers the test gives: every call is recorded ({url, headers}) and waits
 * until respond()/respondTo() answers it. A 200 gets a body stream the test writes into.
 */
export function fakeFetch() {
  const calls = [];
  const fetch = (url, init = {}) => new Promise((resolve, reject) => {
    const call = { url, headers: { ...(init.headers ?? {}) }, resolve, reject };
    init.signal?.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
    calls.push(call);
  });
  fetch.calls = calls;
  fetch.lastStream = () => calls.filter((c) => c.url.includes('/api/ws/sse/')).at(-1);
  fetch.respondTo = async (call, status, text = '') => {
    await flush();
    const encoder = new TextEncoder();
    let controller;
    const body = status === 200 ? new ReadableStream({ start(c) { controller = c; } }) : null;
    call.resolve({ status, ok: status >= 200 && status < 300, body, text: async () => text });
    await flush();
    return {
      push: (chunk) => controller.enqueue(encoder.encode(chunk)),
      end: () => controller.close(),
    };
  };
  fetch.respond = async (status, text) => {
    await flush();
    return fetch.respondTo(calls.at(-1), status, text);
  };
  return fetch;
}
