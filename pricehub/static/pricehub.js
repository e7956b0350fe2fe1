/**
 * pricehub.js — dependency-free client for the pricehub live price feed.
 *
 * Works in browsers (ES module) and in Node (inject `WebSocket`). Implements the
 * "Reconnecting clients" rules of the pricehub wire contract:
 *   - delay before reconnect attempt n = baseDelayMs * 2^(n-1) + uniform(0, jitterMs)
 *   - at most `maxAttempts` attempts, then status `failed` and a manual `reconnect()`
 *   - the attempt counter resets only after a connection stayed open `stableAfterMs`
 *   - no retry after close 1008 / 4001 / 4003
 *   - resume with `since`/`epoch` after every other close
 *   - `{"type":"heartbeat"}` every `heartbeat_interval` seconds
 *
 * Transports: WebSocket, or the Server-Sent Events feed (`/api/ws/sse/...`) for networks
 * whose proxies strip the upgrade. `transport: 'auto'` (default) falls back to SSE when a
 * WebSocket closes 1006 before it ever opened, and stays on SSE once that works. The SSE
 * stream is read with fetch() (not EventSource) so the same backoff rules decide every
 * reconnect and each one resumes with the `Last-Event-ID` header (EventSource can set no
 * header and reconnects by itself, forever). A WebSocket refused before it opens is
 * also diagnosed over HTTP: the browser hides the HTTP status of a refused upgrade.
 *
 * Trading-grade subscriptions (PROTOCOL.md): `maxRate` (one rate for every zone, or
 * {zone: rate}) caps the updates per second the server sends, each `price` event saying in
 * `flags.skipped` how many it replaces; `snapshot()` is every zone's latest price at one
 * instant with its cursor; `since`/`epoch` start the stream from such a cursor vector (a
 * reconnect resumes every zone from the vector of its last seqs: `subscribe` on a socket,
 * `since=pjm:12,ercot:40` on a stream's URL); `history()` pages a history by market time.
 *
 * Everything with a side effect on time or I/O (timers, clock, randomness, WebSocket,
 * fetch) is injectable so the reconnect logic can be unit-tested deterministically.
 */

/** Close codes after which retrying cannot help (unknown zone, bad token, forbidden zone). */
export const TERMINAL_CLOSE_CODES = Object.freeze([1008, 4001, 4003]);

/** Code used locally when the client gives up on a silent or stuck socket. */
export const CLIENT_TIMEOUT_CODE = 4000;

/** Close code a browser reports when a connection failed or dropped without a close frame. */
export const ABNORMAL_CLOSE_CODE = 1006;

/** The token does not allow a zone (terminal, unless the zone was just added: see _onClose). */
const FORBIDDEN_ZONE_CODE = 4003;

const PATHS = Object.freeze({
  wsMarket: '/api/ws/ws/market/',
  wsPrices: '/api/ws/ws/prices',
  sseMarket: '/api/ws/sse/market/',
  ssePrices: '/api/ws/sse/prices',
  history: '/api/ws/ws/history/',
  historyZones: '/api/ws/ws/history',
  snapshot: '/api/ws/ws/snapshot',
  health: '/api/ws/ws/health',
});

/** Bounds of `max_rate` (PROTOCOL.md; pricehub takes at most 3 decimals). */
export const MAX_RATE = 1000;
export const MIN_RATE = 0.001;
/** Most prices one history-by-time answer holds (PROTOCOL.md). */
export const MAX_HISTORY_LIMIT = 10000;

/** A rate the server accepts, else an Error saying what is allowed. */
export function checkMaxRate(value, what = '') {
  const ok = typeof value === 'number' && Number.isFinite(value) && value >= MIN_RATE
    && value <= MAX_RATE && Math.round(value * 1000) / 1000 === value;
  if (!ok) {
    throw new Error(`PriceHubClient: maxRate${what ? ` ${what}` : ''} must be a number from `
      + `${MIN_RATE} to ${MAX_RATE} (updates per second) with at most 3 decimals`);
  }
  return value;
}

/** A rate as the URL form the server takes (plain decimals, no exponent). */
export function formatRate(value) { return String(Number(value.toFixed(3))); }

/**
 * The `maxRate` option: a number for every zone, or {zone: rate} (zones not named get every
 * update), or null. A WebSocket carries the common rate on its URL and a zone's own in the
 * `subscribe` naming it; a stream (it cannot be sent anything) has one rate: the lowest.
 */
export class Rates {
  constructor(option = null) {
    this.default = null;
    this.zones = null;
    if (option === null || option === undefined) return;
    if (typeof option === 'object') {
      this.zones = new Map(Object.entries(option).map(([z, r]) => [z, checkMaxRate(r, `of ${z}`)]));
    } else {
      this.default = checkMaxRate(option);
    }
  }

  /** The rate `zone` is delivered at, or null (every update). */
  of(zone) { return this.zones ? this.zones.get(zone) ?? null : this.default; }

  /** Does a zone need a `subscribe` of its own for its rate (a per-zone mapping)? */
  get perZone() { return this.zones !== null && this.zones.size > 0; }

  /** The rate on the URL of a socket (`sse` false) or stream on `zones`. */
  urlRate(zones, sse) {
    if (!this.zones) return this.default;
    if (zones.length === 1) return this.zones.get(zones[0]) ?? null;
    return sse && this.zones.size ? Math.min(...this.zones.values()) : null;
  }
}

/** `since=pjm:12,ercot:40`: a cursor vector as a URL value. */
function sinceVector(since) {
  return Object.entries(since).map(([zone, seq]) => `${zone}:${seq}`).join(',');
}

/** A range bound: a Date or epoch ms as ISO-8601 UTC, a string as given (the server checks). */
function timeText(value) {
  if (value instanceof Date || typeof value === 'number') return new Date(value).toISOString();
  return String(value);
}

const byHistoryOrder = (a, b) => (a.timestamp < b.timestamp ? -1 : a.timestamp > b.timestamp ? 1
  : a.market_zone < b.market_zone ? -1 : a.market_zone > b.market_zone ? 1 : a.seq - b.seq);

/**
 * The paging of one history by market time (PROTOCOL.md orders it by timestamp, zone, seq):
 * the next page starts at the last page's last timestamp (`from` is inclusive) and drops what
 * was given already, so prices sharing a timestamp at a page's edge are neither lost nor
 * repeated; a page with nothing new (more prices at one timestamp than it holds) is asked
 * again at the largest limit before giving up. `end` is fixed by the first answer.
 */
export class HistoryPager {
  constructor(zones, { from, to = null, limit = null }) {
    if (limit !== null && !(Number.isInteger(limit) && limit >= 1 && limit <= MAX_HISTORY_LIMIT)) {
      throw new Error(`PriceHubClient: limit must be an integer from 1 to ${MAX_HISTORY_LIMIT}`);
    }
    this.zones = zones;
    this.start = timeText(from);
    this.end = to === null ? null : timeText(to);
    this.cursor = {};
    this.pages = 0;
    this._limit = limit;
    this._pageLimit = limit;
    this._from = this.start;
    this._last = null;
  }

  /** Query parameters of the next request. */
  query() {
    const q = { zones: this.zones.join(','), from: this._from };
    if (this.end !== null) q.to = this.end;
    if (this._pageLimit !== null) q.limit = String(this._pageLimit);
    return q;
  }

  /** {fresh: the new prices of the answer `body`, more: is another request needed}. */
  take(body) {
    this.pages += 1;
    if (this.end === null) {
      this.end = body.to ?? null;
      this.start = body.from ?? this.start;
    }
    const data = Array.isArray(body.data) ? body.data : [];
    const last = this._last;
    const fresh = data.filter((p) => last === null || byHistoryOrder(p, last) > 0);
    for (const p of fresh) {
      if (p.seq > (this.cursor[p.market_zone] ?? 0)) this.cursor[p.market_zone] = p.seq;
    }
    if (fresh.length) {
      this._last = fresh.at(-1);
      this._pageLimit = this._limit;
    }
    if (body.truncated !== true) return { fresh, more: false };
    if (!data.length) throw new Error('history: the server said truncated but sent no price');
    if (!fresh.length) {
      if (this._pageLimit !== null && this._pageLimit >= MAX_HISTORY_LIMIT) {
        throw new Error(`history: more than ${MAX_HISTORY_LIMIT} prices share the timestamp ${this._from}`);
      }
      this._pageLimit = MAX_HISTORY_LIMIT;
    }
    this._from = data.at(-1).timestamp;
    return { fresh, more: true };
  }
}

const CLOSE_REASONS = Object.freeze({
  1000: 'the connection was closed normally',
  1001: 'the server is restarting or shutting down',
  1006: 'the connection failed or dropped without a close frame',
  1008: 'the server refused the request (unknown zone, or too many zones on one connection)',
  1009: 'a message from this page was larger than the server accepts',
  1011: 'the server hit an internal error',
  1013: 'the server is over its connection limit; it will be retried later',
  4000: 'no heartbeat from the other side in time',
  4001: 'the subscriber token is missing, invalid or expired',
  4003: 'the token does not allow this zone',
  4008: 'this page fell too far behind the feed (slow consumer)',
  4029: 'this page sent messages faster than the server allows',
});

/** A close code (and the server's reason text, if any) as one plain sentence fragment. */
export function describeClose(code, reason = '') {
  const words = CLOSE_REASONS[code] ?? `the connection closed with code ${code}`;
  return reason && !words.includes(reason) ? `${words} (${reason})` : words;
}

/**
 * What an HTTP status of the SSE endpoint means, as the WebSocket close code carrying the same
 * advice (PROTOCOL.md): the reconnect rules then treat both transports alike.
 */
export const SSE_STATUS_CLOSE_CODES = Object.freeze({
  401: 4001, 403: 4003, 404: 1008, 422: 1008, 503: 1013,
});

const ORIGIN_ADVICE = "check --allowed-origins, or the proxy's Host header: nginx needs "
  + "'proxy_set_header Host $http_host'";

/** A sentence fragment as a sentence. */
function sentence(text) { return `${text.charAt(0).toUpperCase()}${text.slice(1)}.`; }

/** A response body as a JSON object, or null (a proxy's HTML page, an empty body, ...). */
function jsonObject(text) {
  try {
    const value = JSON.parse(text);
    return value && typeof value === 'object' ? value : null;
  } catch {
    return null;
  }
}

/**
 * Did a proxy or load balancer answer instead of pricehub, because nothing answers it behind?
 * pricehub itself never sends 502 or 504, and its 503s carry a JSON body (over_capacity on the
 * stream, the health report): a 503 without one is a gateway's.
 */
function isGatewayAnswer(status, body) {
  return status === 502 || status === 504 || (status === 503 && body === null);
}

function unreachable(host, status) {
  return { kind: 'unreachable', text: status === undefined ? `Cannot reach the server at ${host}.`
    : `Cannot reach the server behind the proxy at ${host} (HTTP ${status}).` };
}

/**
 * Why a connection attempt ended, from what the page can actually read: `{kind, text}`.
 *   unreachable  nothing answered, or a gateway answered for a server that is gone
 *   origin       pricehub's 403 origin_not_allowed on the event stream (a readable answer,
 *                unlike a refused WebSocket upgrade)
 *   refused      any other HTTP refusal of the stream without a close code of its own
 *   dropped      it was open, and ended without a close code
 *   timeout      the client gave up on a silent or stuck connection
 *   server       the server's close code (or its stream's HTTP status as one), in words
 *   ws_refused   a WebSocket closed before it opened: the browser hides why (`pending`: the
 *                diagnosis over HTTP, diagnoseRefusedSocket, replaces it)
 * `end`: {transport 'ws'|'sse', opened, code, reason, host, origin}, plus for a stream refused
 * over HTTP {status, error (pricehub's error code, or null), gateway}.
 */
export function explainEnd(end) {
  const { transport, opened, code, reason = '' } = end;
  if (transport === 'sse' && end.status !== undefined) return explainRefusedStream(end);
  if (code === CLIENT_TIMEOUT_CODE) return { kind: 'timeout', text: `No answer from the server in time (${reason}).` };
  if (code !== ABNORMAL_CLOSE_CODE) return { kind: 'server', text: sentence(describeClose(code, reason)) };
  if (opened) {
    return { kind: 'dropped', text: transport === 'sse' ? 'The event stream from the server ended.'
      : 'The connection to the server dropped without a close frame.' };
  }
  if (transport === 'sse') return unreachable(end.host); // fetch() itself failed
  return { kind: 'ws_refused', pending: true, text: 'The WebSocket could not be opened.' };
}

function explainRefusedStream({ code, reason, status, error, gateway, host, origin }) {
  if (gateway) return unreachable(host, status);
  if (status === 403 && error === 'origin_not_allowed') {
    return { kind: 'origin', text: `The server refused this page's origin (${origin}): ${ORIGIN_ADVICE}.` };
  }
  if (code !== ABNORMAL_CLOSE_CODE) return { kind: 'server', text: sentence(describeClose(code, reason)) };
  return { kind: 'refused', text: `The server refused the event stream (${reason}).` };
}

/**
 * Incremental text/event-stream parser (WHATWG rules). feed(text) returns the events that the
 * text completed: {event, data, id}; `id` persists across events as the spec says.
 */
export class SseParser {
  constructor({ maxEventChars = 1 << 20 } = {}) {
    this.lastEventId = '';
    this.comments = 0;
    this._max = maxEventChars;
    this._buffer = '';
    this._reset();
  }

  _reset() {
    this._event = '';
    this._data = [];
    this._size = 0;
    this._oversized = false;
  }

  feed(text) {
    this._buffer += text;
    const events = [];
    // Lines end with CRLF, LF or CR; a lone CR at the end may be the first half of a CRLF.
    const re = /\r\n|\n|\r(?!$)/g;
    let start = 0;
    for (let m = re.exec(this._buffer); m; m = re.exec(this._buffer)) {
      const event = this._line(this._buffer.slice(start, m.index));
      if (event) events.push(event);
      start = m.index + m[0].length;
    }
    this._buffer = this._buffer.slice(start);
    if (this._buffer.length > this._max) this._buffer = ''; // an endless line: drop it
    return events;
  }

  _line(line) {
    if (line === '') return this._dispatch();
    if (line.startsWith(':')) {
      this.comments += 1;
      return null;
    }
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (name === 'data') {
      this._size += value.length + 1;
      if (this._size > this._max) this._oversized = true;
      else this._data.push(value);
    } else if (name === 'event') this._event = value;
    else if (name === 'id' && !value.includes('\0')) this.lastEventId = value;
    return null; // retry: our backoff decides reconnects; unknown fields are ignored
  }

  _dispatch() {
    const { _data: data, _event: event, _oversized: oversized } = this;
    this._reset();
    if (oversized || data.length === 0) return null;
    return { event: event || 'message', data: data.join('\n'), id: this.lastEventId };
  }
}

/**
 * A Server-Sent Events stream behind the slice of the WebSocket interface the client uses
 * (readyState, onopen/onmessage/onclose, close), read with fetch() so it can send
 * `Last-Event-ID` itself. An HTTP refusal becomes a close event with the matching close code
 * (SSE_STATUS_CLOSE_CODES) plus `status`; `routeMissing` marks a server without SSE at all.
 * It never sends: `oneWay` is true. `onping` fires on `: ping` comments (signs of life).
 */
export class SseConnection {
  constructor(url, { fetch, lastEventId = '' }) {
    this.url = url;
    this.readyState = 0;
    this.oneWay = true;
    this.lastEventId = lastEventId;
    this.onopen = this.onmessage = this.onclose = this.onerror = this.onping = null;
    this._abort = typeof AbortController === 'function' ? new AbortController() : null;
    this._run(fetch);
  }

  send() { throw new Error('an SSE stream cannot send'); }

  /** Stop reading; like WebSocket.close() on a detached socket, no close event follows. */
  close() {
    this.readyState = 3;
    this._abort?.abort();
  }

  async _run(fetchImpl) {
    const headers = { Accept: 'text/event-stream' };
    if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
    let response;
    try {
      response = await fetchImpl(this.url, { headers, cache: 'no-store', signal: this._abort?.signal });
    } catch {
      this._end(ABNORMAL_CLOSE_CODE, 'cannot reach the server');
      return;
    }
    if (this.readyState === 3) return;
    if (response.status !== 200 || !response.body) {
      await this._refused(response);
      return;
    }
    this.readyState = 1;
    this.onopen?.({});
    await this._read(response.body.getReader());
  }

  async _refused(response) {
    let text = '';
    try { text = (await response.text()).slice(0, 300); } catch { /* the status says enough */ }
    const body = jsonObject(text); // null: a proxy's or the router's page
    const { status } = response;
    const reason = body?.message ?? (text.trim() || `HTTP ${status}`);
    const error = body?.error ?? body?.code ?? null;
    const routeMissing = status === 404 && error !== 'unknown_zone';
    // A gateway's 503 is not pricehub's "over capacity": nothing answered behind it.
    const gateway = isGatewayAnswer(status, body);
    const code = routeMissing || gateway ? ABNORMAL_CLOSE_CODE
      : SSE_STATUS_CLOSE_CODES[status] ?? ABNORMAL_CLOSE_CODE;
    this._end(code, `HTTP ${status}: ${reason}`,
      { status, error, gateway, routeMissing, badCursor: status === 400 });
  }

  async _read(reader) {
    const parser = new SseParser();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done || this.readyState === 3) break;
        const comments = parser.comments;
        const events = parser.feed(decoder.decode(value, { stream: true }));
        if (parser.comments !== comments) this.onping?.();
        for (const e of events) {
          if (this.readyState === 3) return;
          this.onmessage?.({ data: e.data, type: e.event, lastEventId: e.id });
        }
      }
    } catch {
      // aborted by close(), or the network dropped: both end the stream below
    }
    this._end(ABNORMAL_CLOSE_CODE, 'the event stream ended');
  }

  _end(code, reason, extra = {}) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: false, ...extra });
  }
}

/** Documented defaults of every tunable option. */
export const DEFAULT_OPTIONS = Object.freeze({
  baseDelayMs: 1000,
  jitterMs: 1000,
  maxAttempts: 5,
  stableAfterMs: 10000,
  // Browsers can take minutes to fail a connect to a black-holed host, and a server that
  // accepts but never greets would otherwise leave the client "connecting" forever.
  establishTimeoutMs: 10000,
  // A socket with no frame for this many heartbeat intervals is presumed dead: browsers
  // cannot see protocol-level pings, and a half-open TCP connection never fires `close`.
  staleAfterIntervals: 2,
});

const OPEN = 1;

/**
 * Delay in ms before reconnect attempt `attempt` (1-based).
 * @param {number} attempt
 * @param {{baseDelayMs:number, jitterMs:number, random:() => number}} opts
 */
export function backoffDelay(attempt, { baseDelayMs, jitterMs, random }) {
  return baseDelayMs * 2 ** (attempt - 1) + random() * jitterMs;
}

/** An Event carrying a `detail` payload (CustomEvent is not global on every runtime). */
export class PriceHubEvent extends Event {
  constructor(type, detail) {
    super(type);
    this.detail = detail;
  }
}

function toWebSocketBase(url) {
  const u = new URL(url);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  return u;
}

function toHttpBase(url) {
  const u = new URL(url);
  if (u.protocol === 'ws:') u.protocol = 'http:';
  else if (u.protocol === 'wss:') u.protocol = 'https:';
  return u;
}

function defaultBaseUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error('PriceHubClient: option `url` is required outside a browser');
  return loc.href;
}

/**
 * Client for one pricehub server.
 *
 * Events (use `client.on(type, fn)` -> fn(detail), or addEventListener(type, e => e.detail)):
 *   status   {status: 'connecting'|'connected'|'reconnecting'|'failed'|'closed', ...};
 *            `connected` carries `transport` ('ws' | 'sse')
 *   price    {price: {market_zone, price, volume, seq, timestamp, accepted_at}, flags: {initial, replay, conflated},
 *            skipped}  (skipped: how many updates of the zone this one replaces; 0 when none)
 *   gap      {zone, fromSeq, toSeq, epochChanged}
 *   backend  {backend, previous}
 *   error    {code, message}           (server `error` messages; the socket stays open)
 *   zones    {zones, added, removed, rejected: [{zone, code, message}]}  (watched zones changed)
 *   diagnosis {kind, text}             (why a WebSocket was refused before it opened)
 *   `reconnecting` and `failed` carry `cause` {kind, text}: why the last attempt ended
 *   (explainEnd), also in `client.lastCause` (null while connected)
 *   message  the raw server message     (every frame, after the client processed it)
 */
export class PriceHubClient extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string} [options.url] server base URL (http(s):// or ws(s)://); default: page origin
   * @param {string} [options.zone] subscribe to one zone on `/api/ws/ws/market/{zone}`
   * @param {string[]} [options.zones] zones for `/api/ws/ws/prices` (default: all zones)
   * @param {string} [options.token] subscriber token, when the server has auth on
   * @param {boolean} [options.subscribe=false] multi-zone: open the socket on no zone and
   *   subscribe to `zones` with a message (zones can then change: addZones/removeZones);
   *   with no `zones` it watches nothing, never every zone
   * @param {'auto'|'ws'|'sse'} [options.transport='auto']
   * @param {number|Object<string, number>} [options.maxRate] at most this many updates per
   *   second of each zone (0.001..1000, the newest wins), or {zone: rate}; see setMaxRate
   * @param {Object<string, number>} [options.since] start from this cursor vector {zone: seq}
   *   (a snapshot's `cursor`) instead of each zone's current price; needs `epoch`
   * @param {string} [options.epoch] the lineage of `since` (the snapshot's `epoch`)
   * @param {number} [options.baseDelayMs=1000]
   * @param {number} [options.jitterMs=1000]
   * @param {number} [options.maxAttempts=5]
   * @param {number} [options.stableAfterMs=10000]
   * @param {number} [options.establishTimeoutMs=10000] socket creation -> connection_established
   * @param {number} [options.staleAfterIntervals=2]
   * @param {Function} [options.WebSocket] WebSocket constructor (default: globalThis.WebSocket)
   * @param {Function} [options.fetch] fetch implementation (default: globalThis.fetch)
   * @param {object} [options.timers] {setTimeout, clearTimeout, setInterval, clearInterval}
   * @param {() => number} [options.now] clock in ms (default: Date.now)
   * @param {() => number} [options.random] uniform [0,1) (default: Math.random)
   */
  constructor(options = {}) {
    super();
    const o = { ...DEFAULT_OPTIONS, ...options };
    if (o.zone && o.zones) throw new Error('PriceHubClient: give `zone` or `zones`, not both');
    if (!(o.maxAttempts >= 0)) throw new Error('PriceHubClient: maxAttempts must be >= 0');
    o.transport ??= 'auto';
    if (!['auto', 'ws', 'sse'].includes(o.transport)) {
      throw new Error("PriceHubClient: transport must be 'auto', 'ws' or 'sse'");
    }
    if ((o.since == null) !== (o.epoch == null)) {
      throw new Error('PriceHubClient: give `since` and `epoch` together (a snapshot\'s cursor and epoch)');
    }
    this._rates = new Rates(o.maxRate);
    this.options = Object.freeze(o);
    this._baseUrl = o.url ?? defaultBaseUrl();
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this._fetch = o.fetch ?? globalThis.fetch?.bind(globalThis);
    this._timers = o.timers ?? globalThis;
    this._now = o.now ?? Date.now;
    this._random = o.random ?? Math.random;

    this._ws = null;
    this._status = 'idle';
    this._attempts = 0; // reconnect attempts made since the last stable connection
    this._retryTimer = null;
    this._stableTimer = null;
    this._establishTimer = null;
    this._heartbeatTimer = null;
    this._lastFrameAt = 0;
    this._epoch = o.epoch ?? null;
    this._epochChanged = false; // did the current connection start a new seq lineage?
    // zone -> last seq delivered to the application (or given as `since`: resumed from there)
    this._lastSeq = new Map(Object.entries(o.since ?? {}));
    this._snapshots = []; // snapshot requests awaiting the socket's answer, oldest first
    this._streamVector = null; // zones the current stream's URL resumes (since=...)
    this._noVector = false; // the next stream resumes no vector (the last one was refused)
    this._resuming = new Map(); // zone -> held initial_data price (or null) until resume_complete
    this._gaps = new Map(); // zone -> the server's `gap` of a zone awaiting resume_complete
    this._stale = new Map(); // zone -> the last `zone_status` stale of it
    this._backend = null;
    this._zones = o.zone ? [o.zone] : [...(o.zones ?? [])];
    this._subscribeAfterOpen = false; // multi-zone resume: socket opened with `zones=`
    this._duplicates = 0;
    this._useSse = o.transport === 'sse'; // auto: true from the first SSE stream that opens
    this._sseUnavailable = false; // auto: the server answered 404 on the SSE path
    this._sseCursor = ''; // Last-Event-ID safe to resume from (nothing held back behind it)
    this._opened = false; // did the current socket reach `open`?
    this._pending = []; // zone subscribes awaiting `subscribed` / `error`: {zones, resolve}
    this._diagnosing = false;
    this.lastDiagnosis = null;
    this.lastCause = null;
  }

  /** Current status: idle, connecting, connected, reconnecting, failed or closed. */
  get status() { return this._status; }
  /** Storage backend last announced by the server ("redis" / "in-memory"), or null. */
  get backend() { return this._backend; }
  /** Zones of the current (or last) connection. */
  get zones() { return [...this._zones]; }
  /** Sequence-number lineage of the server's history, or null before the first connection. */
  get epoch() { return this._epoch; }

  /** Zones the server last said are stale: {zone: {zone, status, since, lastSeq, stale}}. */
  get staleZones() { return Object.fromEntries(this._stale); }
  /** 'ws' or 'sse' while connected (or the one being tried), else null. */
  get transport() { return this._ws ? (this._ws.oneWay ? 'sse' : 'ws') : null; }
  /** Number of updates dropped because their seq was already delivered. */
  get duplicatesDropped() { return this._duplicates; }
  /** Last delivered seq of `zone`, or undefined. */
  lastSeq(zone) { return this._lastSeq.get(zone); }

  /** Subscribe to an event; returns a function that unsubscribes. fn receives the detail. */
  on(type, fn) {
    const listener = (event) => fn(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** Open the connection (no-op while already connecting or connected). */
  connect() {
    if (this._ws) return;
    this._cancelRetry();
    this._attempts = 0;
    this._open(0);
  }

  /**
   * Manual reconnect: after `failed`, or to skip the remaining backoff wait. Starts a fresh
   * cycle of `maxAttempts` automatic attempts. No-op while a socket is open or opening.
   */
  reconnect() {
    if (!this._ws) {
      // A fresh cycle tries the WebSocket again: the network may have changed.
      this._useSse = this.options.transport === 'sse';
      this._sseUnavailable = false;
    }
    this.connect();
  }

  /**
   * Watch more zones (multi-zone client). Resolves with {added, rejected}: over a WebSocket
   * the server's answer decides (`subscribed`, or an `error` such as unknown_zone); while
   * not connected they are simply remembered and subscribed on the next connection.
   */
  async addZones(zones) {
    const fresh = [...new Set(zones)].filter((z) => !this._zones.includes(z));
    if (fresh.length === 0) return { added: [], rejected: [] };
    if (this.options.zone) throw new Error('PriceHubClient: a single-zone client cannot add zones');
    if (this._ws?.oneWay) return this._addZonesSse(fresh);
    // Not connected: remembered, and subscribed with the others on the next connection. A
    // socket lost before the answer counts as added for the same reason.
    // One subscribe per zone: the server refuses a whole subscribe for one unknown zone.
    const answers = await Promise.all(fresh.map((zone) => (!this._canSend()
      ? { added: [zone], rejected: [] }
      : new Promise((resolve) => {
        this._pending.push({ zones: [zone], resolve, fromAdd: true });
        this.send(this._subscribeMessage([zone]));
      }))));
    const answer = { added: answers.flatMap((a) => a.added),
      rejected: answers.flatMap((a) => a.rejected) };
    this._zones.push(...answer.added.filter((z) => !this._zones.includes(z)));
    this._emitZones(answer);
    return answer;
  }

  /** Stop watching zones (multi-zone client). */
  removeZones(zones) {
    const gone = zones.filter((z) => this._zones.includes(z));
    if (gone.length === 0) return;
    this._dropZones(gone);
    for (const zone of gone) this._lastSeq.delete(zone);
    if (this._ws?.oneWay) this._restartStream();
    else if (this._canSend()) this.send({ type: 'unsubscribe', zones: gone });
    this._emitZones({ removed: gone });
  }

  async _addZonesSse(zones) {
    // A stream cannot be told about zones: check them over HTTP (an unknown one would make
    // the whole stream 404), then reopen it with the longer list, resuming the others.
    const rejected = [];
    for (const zone of zones) {
      try {
        await this.fetchHistory(zone, { limit: 1 });
      } catch (err) {
        rejected.push({ zone, code: err.status === 404 ? 'unknown_zone' : 'unavailable',
          message: String(err.message ?? err) });
      }
    }
    const added = zones.filter((z) => !rejected.some((r) => r.zone === z)
      && !this._zones.includes(z));
    this._zones.push(...added);
    if (added.length) this._restartStream();
    this._emitZones({ added, rejected });
    return { added, rejected };
  }

  _dropZones(zones) {
    this._zones = this._zones.filter((z) => !zones.includes(z));
    for (const zone of zones) this._resuming.delete(zone);
  }

  _emitZones({ added = [], removed = [], rejected = [] }) {
    this.dispatchEvent(new PriceHubEvent('zones', { zones: this.zones, added, removed, rejected }));
  }

  /**
   * Change the rate (the `maxRate` option's forms; null: every update). A WebSocket of several
   * zones subscribes them again with it, each from its last seq (nothing is lost or
   * repeated); a single-zone socket or a stream, whose URL carries the rate, is reopened and
   * resumes. Not connected: the next connection uses it.
   */
  setMaxRate(option) {
    this._rates = new Rates(option);
    if (!this._ws) return;
    if (this._ws.oneWay || this.options.zone || !this._canSend()) {
      this._restartStream();
      return;
    }
    const since = {};
    for (const zone of this._zones) if (this._lastSeq.has(zone)) since[zone] = this._lastSeq.get(zone);
    this._subscribeAll(since, this._epoch);
  }

  /**
   * Replace the socket or stream at once (not a reconnect attempt): its URL names the zones
   * (and the rate). A stream's cursor is made for one set of zones, so it goes: the stream
   * resumes the zones kept from the vector of their last seqs (`since=` on its URL).
   * Between attempts (no stream) the next attempt simply uses the new list.
   */
  _restartStream() {
    if (!this._ws) return;
    const ws = this._detach();
    ws.close(1000, 'subscription changed');
    this._sseCursor = '';
    this._open(this._attempts);
  }

  _canSend() { return Boolean(this._ws && this._ws.readyState === OPEN && !this._ws.oneWay); }
  /** Close for good (status `closed`); no automatic reconnect follows. */
  close() {
    this._cancelRetry();
    const ws = this._detach();
    if (ws) ws.close(1000, 'client closed');
    this._setStatus('closed', {});
  }

  /** Send a JSON message if the socket is open; returns whether it was sent. */
  send(message) {
    if (!this._canSend()) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Fetch the retained history of a zone over HTTP (oldest first).
   * @returns {Promise<object[]>}
   */
  async fetchHistory(zone, { limit = 200 } = {}) {
    if (!this._fetch) throw new Error('PriceHubClient: no fetch implementation');
    const u = toHttpBase(new URL(`${PATHS.history}${encodeURIComponent(zone)}`, this._baseUrl));
    u.searchParams.set('limit', String(limit));
    if (this.options.token) u.searchParams.set('token', this.options.token);
    const response = await this._fetch(u.href, { headers: { Accept: 'application/json' } });
    if (!response.ok) {
      const err = new Error(`history ${zone}: HTTP ${response.status}`);
      err.status = response.status;
      throw err;
    }
    const body = await response.json();
    return Array.isArray(body.data) ? body.data : [];
  }

  /**
   * Every zone's latest price at one instant (default: the client's zones):
   * {epoch, prices: {zone: price object or null}, cursor: {zone: seq}, via}. On a live
   * WebSocket (`via: 'socket'`) every update this client delivers after it is newer than
   * `cursor`, none missing; otherwise (`via: 'http'`) GET /api/ws/ws/snapshot. Start a
   * client from it with {since: snap.cursor, epoch: snap.epoch}.
   * @returns {Promise<{epoch: string, prices: object, cursor: object, via: string}>}
   */
  async snapshot(zones = null, { timeoutMs = this.options.establishTimeoutMs } = {}) {
    const asked = zones ?? this.zones;
    if (!this._canSend()) {
      const body = await this._getJson(PATHS.snapshot, { zones: asked.join(',') }, 'snapshot');
      return { ...snapshotOf(body), via: 'http' };
    }
    const answer = new Promise((resolve, reject) => {
      const pending = { resolve, reject, timer: null, dead: false };
      pending.timer = this._timers.setTimeout(() => {
        // It stays queued: a late answer is this one's, not the next request's.
        pending.dead = true;
        reject(new Error(`snapshot: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this._snapshots.push(pending);
    });
    this.send({ type: 'snapshot', zones: asked });
    return { ...snapshotOf(await answer), via: 'socket' };
  }

  /**
   * The retained prices of `zones` whose market time is in [from, to) (`to` default: now, as
   * of the first answer), page by page over GET /api/ws/ws/history, following `truncated`;
   * no price is given twice nor left out. Each page: {zones, from, to, prices (ordered by
   * timestamp, zone, seq), more, cursor (each zone's highest seq so far: hand over to the live
   * stream with `since`)}. `from`/`to`: Date, epoch ms or ISO-8601 with an offset.
   */
  async* history(zones, { from, to = null, limit = null } = {}) {
    const pager = new HistoryPager(zones ?? this.zones, { from, to, limit });
    let more = true;
    while (more) {
      const body = await this._getJson(PATHS.historyZones, pager.query(), 'history');
      const taken = pager.take(body);
      more = taken.more;
      if (taken.fresh.length || pager.pages === 1) {
        yield { zones: pager.zones, from: pager.start, to: pager.end, prices: taken.fresh, more,
          cursor: { ...pager.cursor } };
      }
    }
  }

  /** GET one of the server's JSON endpoints; an Error with `status` and its words if refused. */
  async _getJson(path, query, what) {
    if (!this._fetch) throw new Error('PriceHubClient: no fetch implementation');
    const u = toHttpBase(new URL(path, this._baseUrl));
    for (const [name, value] of Object.entries(query)) u.searchParams.set(name, value);
    if (this.options.token) u.searchParams.set('token', this.options.token);
    const response = await this._fetch(u.href, { headers: { Accept: 'application/json' } });
    const text = await response.text();
    const body = jsonObject(text);
    if (response.status !== 200 || body === null) {
      const err = new Error(`${what}: HTTP ${response.status}: ${body?.message ?? text.slice(0, 200)}`);
      err.status = response.status;
      err.body = body;
      throw err;
    }
    return body;
  }

  _onSnapshot(msg) {
    // A socket's snapshots are answered in the order they were asked: this is the oldest
    // one's answer (dropped when that one gave up waiting).
    const pending = this._snapshots.shift();
    if (!pending || pending.dead) return;
    this._timers.clearTimeout(pending.timer);
    pending.resolve(msg);
  }

  // ---- connection lifecycle -------------------------------------------------------------

  _socketUrl() {
    const u = toWebSocketBase(this._baseUrl);
    const single = this.options.zone;
    if (single) {
      u.pathname = `${PATHS.wsMarket}${encodeURIComponent(single)}`;
      const since = this._lastSeq.get(single);
      if (since !== undefined && this._epoch !== null) {
        u.searchParams.set('since', String(since));
        u.searchParams.set('epoch', this._epoch);
      }
    } else {
      u.pathname = PATHS.wsPrices;
      // Per-zone rates are set by `subscribe`: the URL would open the zones at one rate.
      this._subscribeAfterOpen = this.options.subscribe
        || ((this._lastSeq.size > 0 || this._rates.perZone) && this._zones.length > 0);
      if (this._subscribeAfterOpen) {
        // Resuming: open no zone (`zones=`), then one `subscribe` opens each zone with its
        // `since`. Opening the zones here would let live updates overtake the replay.
        u.searchParams.set('zones', '');
      } else if (this.options.zones?.length) {
        u.searchParams.set('zones', this.options.zones.join(','));
      }
    }
    this._setUrlRate(u, single ? [single] : this._zones, false);
    if (this.options.token) u.searchParams.set('token', this.options.token);
    return u.href;
  }

  _setUrlRate(u, zones, sse) {
    const rate = this._rates.urlRate(zones, sse);
    if (rate !== null) u.searchParams.set('max_rate', formatRate(rate));
  }

  /** URL and Last-Event-ID of the next SSE stream; sets up what it resumes. */
  _streamRequest() {
    const u = toHttpBase(this._baseUrl);
    const single = this.options.zone;
    let lastEventId = '';
    this._subscribeAfterOpen = false; // a stream cannot be sent anything
    if (single) {
      u.pathname = `${PATHS.sseMarket}${encodeURIComponent(single)}`;
      const since = this._lastSeq.get(single);
      if (since !== undefined && this._epoch !== null) {
        u.searchParams.set('since', String(since));
        u.searchParams.set('epoch', this._epoch);
      }
    } else {
      u.pathname = PATHS.ssePrices;
      const zones = this.options.subscribe || this._lastSeq.size > 0 ? this._zones
        : this.options.zones ?? null;
      if (zones) u.searchParams.set('zones', zones.join(','));
      lastEventId = this._sseCursor;
      this._streamVector = lastEventId || this._noVector ? null
        : this._vectorQuery(u, zones ?? this._zones);
      this._noVector = false;
    }
    this._setUrlRate(u, single ? [single] : this._zones, true);
    if (this.options.token) u.searchParams.set('token', this.options.token);
    return { url: u.href, lastEventId };
  }

  /**
   * Without a cursor of its own (cursors from a WebSocket, `since`, or a stream reopened for
   * other zones), a stream resumes its zones from their last seqs on the URL:
   * `since=pjm:12,ercot:40&epoch=E`. Returns the zones it resumes (null: none).
   */
  _vectorQuery(u, zones) {
    if (this._epoch === null) return null;
    const since = {};
    for (const zone of zones) if (this._lastSeq.has(zone)) since[zone] = this._lastSeq.get(zone);
    if (Object.keys(since).length === 0) return null;
    u.searchParams.set('since', sinceVector(since));
    u.searchParams.set('epoch', this._epoch);
    return new Set(Object.keys(since));
  }

  /** Open a socket or stream; `transport` defaults to the sticky choice. */
  _open(attempt, transport = this._useSse ? 'sse' : 'ws') {
    this._setStatus('connecting', { attempt, maxAttempts: this.options.maxAttempts, transport });
    let ws;
    this._opened = false;
    try {
      if (transport === 'sse') {
        const { url, lastEventId } = this._streamRequest();
        ws = new SseConnection(url, { fetch: this._fetch, lastEventId });
        ws.onping = () => { if (ws === this._ws) this._lastFrameAt = this._now(); };
      } else {
        ws = new this._WebSocket(this._socketUrl());
      }
    } catch (err) {
      // A throwing constructor means a bad URL or a blocked scheme: retrying cannot help.
      this.lastCause = { kind: 'invalid', text: sentence(String(err)) };
      this._setStatus('failed', { terminal: true, reason: String(err), attempts: this._attempts,
        maxAttempts: this.options.maxAttempts, cause: this.lastCause });
      return;
    }
    this._ws = ws;
    this._establishTimer = this._timers.setTimeout(() => {
      this._establishTimer = null;
      this._abandon('no connection_established from the server');
    }, this.options.establishTimeoutMs);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason, event);
    // Every failure is followed by a close event; that is where retrying is decided.
    ws.onerror = () => {};
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._opened = true;
    if (ws.oneWay) this._useSse = true; // the stream works where the upgrade did not: stay
    this._lastFrameAt = this._now();
    // Resetting on open would retry forever against a server that accepts and drops.
    this._stableTimer = this._timers.setTimeout(() => {
      this._stableTimer = null;
      this._attempts = 0;
    }, this.options.stableAfterMs);
  }

  _onClose(ws, code, reason = '', event = {}) {
    if (ws !== this._ws) return;
    const opened = this._opened;
    // A token that does not allow a zone closes the socket (4003) on its subscribe. When that
    // subscribe was addZones' (the oldest unanswered one), only that zone is refused: drop it
    // and reconnect at once, instead of failing for good with the zone remembered.
    const refusedAdd = code === FORBIDDEN_ZONE_CODE && this._pending[0]?.fromAdd
      ? this._pending.shift() : null;
    this._detach();
    if (refusedAdd) {
      refusedAdd.resolve({ added: [], rejected: refusedAdd.zones.map((zone) => ({
        zone, code: 'forbidden_zone', message: describeClose(code, reason) })) });
      this._open(this._attempts);
      return;
    }
    if (ws.oneWay && event.badCursor && (this._sseCursor || this._streamVector)) {
      // A cursor (or since= vector) the server does not take (e.g. made for another set of
      // zones): the cause is gone with it, so open again at once without either; the zones
      // report gaps instead.
      this._sseCursor = '';
      this._noVector = true;
      this._open(this._attempts);
      return;
    }
    if (ws.oneWay && event.routeMissing && this.options.transport === 'auto') {
      // No SSE on this server: go on with the WebSocket and its own failure (its cause
      // stays, and its diagnosis may still replace it).
      this._sseUnavailable = true;
      this._useSse = false;
      reason = this._wsFailure ?? reason;
    } else {
      // What the page could read about this end; a stream's HTTP answer replaces whatever
      // the WebSocket's diagnosis said (it is the more precise of the two).
      this.lastCause = explainEnd({ ...event, transport: ws.oneWay ? 'sse' : 'ws', opened, code,
        reason, host: toHttpBase(this._baseUrl).host, origin: this._pageOrigin() });
    }
    if (!ws.oneWay && code === ABNORMAL_CLOSE_CODE && !opened) {
      // Refused or unreachable before the upgrade: the browser hides which; ask over HTTP.
      this._diagnose();
      if (this.options.transport === 'auto' && !this._sseUnavailable && this._fetch) {
        this._wsFailure = reason;
        this._open(this._attempts, 'sse'); // same attempt, other transport: no retry of its own
        return;
      }
    }
    if (TERMINAL_CLOSE_CODES.includes(code)) {
      this._setStatus('failed', { code, reason, terminal: true, attempts: this._attempts,
        maxAttempts: this.options.maxAttempts, cause: this.lastCause });
      return;
    }
    this._scheduleRetry(code, reason);
  }

  _scheduleRetry(code, reason) {
    const attempt = this._attempts + 1;
    const { maxAttempts } = this.options;
    const cause = this.lastCause;
    if (attempt > maxAttempts) {
      this._setStatus('failed', { code, reason, terminal: false, attempts: this._attempts,
        maxAttempts, cause });
      return;
    }
    this._attempts = attempt;
    const delayMs = backoffDelay(attempt, { ...this.options, random: this._random });
    this._setStatus('reconnecting', { attempt, maxAttempts, delayMs, code, reason, cause });
    this._retryTimer = this._timers.setTimeout(() => {
      this._retryTimer = null;
      this._open(attempt);
    }, delayMs);
  }

  /** Forget the current socket (handlers off, timers stopped); returns it for closing. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    this._clearTimer('_stableTimer', 'clearTimeout');
    this._clearTimer('_establishTimer', 'clearTimeout');
    this._clearTimer('_heartbeatTimer', 'clearInterval');
    this._resuming.clear();
    this._gaps.clear();
    // Subscribes sent on this socket will never be answered, nor its snapshots.
    for (const { zones, resolve } of this._pending.splice(0)) resolve({ added: zones, rejected: [] });
    for (const { reject, timer, dead } of this._snapshots.splice(0)) {
      this._timers.clearTimeout(timer);
      if (!dead) reject(new Error('snapshot: the connection ended before the answer'));
    }
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = ws.onping = null;
    return ws;
  }

  /**
   * Why did a WebSocket fail before it opened? The browser reports only close 1006, not the
   * HTTP status of a refused upgrade, so ask over plain HTTP: is the server reachable (a
   * proxy's 502/503/504 says it is not), and what does the socket path answer to a request
   * without an upgrade? That request carries no Origin header (browsers send none on
   * same-origin GETs), so a pricehub server answers it 400 ("upgrade expected") where the
   * upgrade itself got 403: then the page's Origin was refused, or a proxy stripped the
   * upgrade, and the page cannot tell which. Emits `diagnosis` {kind, text}.
   */
  async _diagnose() {
    if (!this._fetch || this._diagnosing) return;
    this._diagnosing = true;
    try {
      this.lastDiagnosis = await diagnoseRefusedSocket(this._fetch, this._baseUrl, this._socketUrl());
      // It explains a refused WebSocket only: an answer read since (a stream's 502, a close
      // code) or a connection made since keeps its own cause.
      if (this.lastCause?.pending) this.lastCause = this.lastDiagnosis;
      this.dispatchEvent(new PriceHubEvent('diagnosis', this.lastDiagnosis));
    } finally {
      this._diagnosing = false;
    }
  }

  /** Give up on the current socket now and retry: its close handshake could hang. */
  _abandon(reason) {
    const ws = this._detach();
    if (ws) ws.close(CLIENT_TIMEOUT_CODE, reason);
    this.lastCause = explainEnd({ code: CLIENT_TIMEOUT_CODE, reason });
    this._scheduleRetry(CLIENT_TIMEOUT_CODE, reason);
  }

  _cancelRetry() { this._clearTimer('_retryTimer', 'clearTimeout'); }

  /** The Origin a browser sends for this page (the server's own outside a browser). */
  _pageOrigin() { return globalThis.location?.origin ?? toHttpBase(this._baseUrl).origin; }

  _clearTimer(field, clearFn) {
    if (this[field] !== null) {
      this._timers[clearFn](this[field]);
      this[field] = null;
    }
  }

  _setStatus(status, detail) {
    this._status = status;
    this.dispatchEvent(new PriceHubEvent('status', { status, ...detail }));
  }

  _startHeartbeat(intervalS) {
    const intervalMs = Number(intervalS) * 1000;
    if (!(intervalMs > 0)) return;
    this._heartbeatTimer = this._timers.setInterval(() => {
      if (this._now() - this._lastFrameAt > intervalMs * this.options.staleAfterIntervals) {
        this._abandon('no frame from the server');
        return;
      }
      this.send({ type: 'heartbeat' });
    }, intervalMs);
  }

  // ---- messages -------------------------------------------------------------------------

  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    this._lastFrameAt = this._now();
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return; // the contract promises JSON text frames; anything else is noise
    }
    if (!msg || typeof msg !== 'object') return;
    const handler = this._handlers[msg.type];
    if (handler) handler.call(this, msg);
    // A stream's cursor is only safe to resume from while nothing is held back for a resume:
    // held prices are lost if the stream dies before their resume_complete.
    if (event.lastEventId && CURSOR_TYPES.includes(msg.type) && this._resuming.size === 0) {
      this._sseCursor = event.lastEventId;
    }
    this.dispatchEvent(new PriceHubEvent('message', msg));
  }

  _onEstablished(msg) {
    this._clearTimer('_establishTimer', 'clearTimeout');
    const previousEpoch = this._epoch;
    const epochChanged = previousEpoch !== null && msg.epoch !== previousEpoch;
    if (this.options.zone) this._zones = [this.options.zone];
    else if (!this._subscribeAfterOpen) this._zones = [...(msg.zones ?? [])];
    const resumeSince = {};
    for (const zone of this._zones) {
      if (this._lastSeq.has(zone)) resumeSince[zone] = this._lastSeq.get(zone);
    }
    let resumeZones = Object.keys(resumeSince);
    if (this._ws?.oneWay && !this.options.zone && !this._sseCursor && resumeZones.length) {
      // A multi-zone stream resumes from its own Last-Event-ID, else from the URL's vector;
      // a zone in neither (none: no epoch yet) reports a gap (reload its history).
      const vector = this._streamVector ?? new Set();
      for (const zone of resumeZones.filter((z) => !vector.has(z))) {
        this.dispatchEvent(new PriceHubEvent('gap', { zone, fromSeq: resumeSince[zone] + 1,
          toSeq: null, epochChanged: false }));
      }
      resumeZones = resumeZones.filter((z) => vector.has(z));
    }
    for (const zone of resumeZones) this._resuming.set(zone, null);
    this._epoch = msg.epoch;
    this._epochChanged = epochChanged;
    // A new epoch restarts numbering: old seqs would make every new update look duplicated.
    if (epochChanged) this._lastSeq.clear();
    this._setBackend(msg.storage_backend);
    this._startHeartbeat(msg.heartbeat_interval);
    if (this._subscribeAfterOpen && this._zones.length) this._subscribeAll(resumeSince, previousEpoch);
    this.lastCause = null;
    this._setStatus('connected', { connectionId: msg.connection_id, zones: this.zones,
      backend: this._backend, epoch: msg.epoch, resuming: resumeZones,
      transport: this.transport });
  }

  /**
   * The single-zone socket resumes through its URL; the multi-zone one asks here, with the
   * old epoch so the server can tell us (recovered:false) when the lineage changed. An
   * unknown zone fails the whole subscribe: it is dropped and the rest asked again.
   */
  _subscribeAll(since, epoch) {
    // One subscribe per rate: `max_rate` applies to every zone a subscribe names.
    const groups = new Map();
    for (const zone of this.zones) {
      const rate = this._rates.of(zone);
      if (!groups.has(rate)) groups.set(rate, []);
      groups.get(rate).push(zone);
    }
    for (const zones of groups.values()) this._subscribeGroup(zones, since, epoch);
  }

  _subscribeGroup(zones, since, epoch) {
    const mine = {};
    for (const zone of zones) if (zone in since) mine[zone] = since[zone];
    this._pending.push({ zones, resolve: (answer) => {
      if (!answer.rejected.length) return;
      // Only a zone the server does not know is dropped; e.g. "too many zones" keeps the
      // list (the error event says why nothing was subscribed).
      const unknown = answer.rejected[0].code === 'unknown_zone';
      if (unknown) this._dropZones(answer.rejected.map((r) => r.zone));
      this._emitZones({ rejected: answer.rejected });
      if (!unknown) return;
      const rest = zones.filter((zone) => this._zones.includes(zone));
      if (rest.length && this._canSend()) this._subscribeGroup(rest, mine, epoch);
    } });
    this.send(this._subscribeMessage(zones, mine, epoch));
  }

  /** A `subscribe` of `zones` (one rate), resuming those in `since` of lineage `epoch`. */
  _subscribeMessage(zones, since = {}, epoch = null) {
    const message = { type: 'subscribe', zones };
    if (Object.keys(since).length) Object.assign(message, { since, epoch });
    const rate = this._rates.of(zones[0]);
    if (rate !== null) message.max_rate = rate;
    return message;
  }

  _onSubscribed() {
    const pending = this._pending.shift();
    pending?.resolve({ added: pending.zones, rejected: [] });
  }

  _onInitialData(msg) {
    const price = msg.latest_price;
    if (!price || typeof price !== 'object') return;
    const zone = msg.market_zone ?? price.market_zone;
    if (this._resuming.has(zone)) {
      // Held back: a successful replay may cover it, and it must not run ahead of the replay.
      const held = this._resuming.get(zone);
      if (!held || price.seq > held.seq) this._resuming.set(zone, price);
      return;
    }
    this._deliver(price, { initial: true, replay: false, conflated: false });
  }

  _onPriceUpdate(msg) {
    // accepted_at: when the server gave the price its seq (null for one stored before the
    // server had the field), passed through as the wire string.
    const { market_zone, price, volume, seq, timestamp } = msg;
    const accepted_at = msg.accepted_at ?? null;
    // skipped: how many updates this one replaces (max_rate, a slow reader's conflation).
    const skipped = Number.isInteger(msg.skipped) && msg.skipped > 0 ? msg.skipped : 0;
    this._deliver({ market_zone, price, volume, seq, timestamp, accepted_at },
      { initial: false, replay: msg.replay === true, conflated: msg.conflated === true }, skipped);
  }

  _onResumeComplete(msg) {
    const zone = msg.market_zone;
    const held = this._resuming.get(zone);
    this._resuming.delete(zone);
    // The server's `gap` (sent before this) has the exact hole and why; a server without
    // it leaves resume_complete's range.
    const notice = this._gaps.get(zone);
    this._gaps.delete(zone);
    if (msg.recovered === false) {
      this.dispatchEvent(new PriceHubEvent('gap', { zone,
        fromSeq: notice ? notice.from_seq : msg.from_seq,
        toSeq: notice ? notice.to_seq : msg.to_seq,
        epochChanged: this._epochChanged, reason: notice?.reason ?? null }));
    }
    if (held) this._deliver(held, { initial: true, replay: false, conflated: false });
  }

  /** A `gap`: a resuming zone's is told with its resume_complete, any other at once
   * (before the zone's next update, which the server sends after it). */
  _onGap(msg) {
    const zone = msg.market_zone;
    if (typeof zone !== 'string' || typeof msg.from_seq !== 'number') return;
    if (this._resuming.has(zone)) {
      this._gaps.set(zone, msg);
      return;
    }
    this.dispatchEvent(new PriceHubEvent('gap', { zone, fromSeq: msg.from_seq,
      toSeq: msg.to_seq ?? null, epochChanged: false, reason: msg.reason ?? null }));
  }

  _onZoneStatus(msg) {
    if (typeof msg.market_zone !== 'string' || !['stale', 'live'].includes(msg.status)) return;
    this._setZoneStatus({ zone: msg.market_zone, status: msg.status, since: msg.since ?? null,
      lastSeq: msg.last_seq ?? null });
  }

  /** Emit `zone_status` on a change only: a zone still stale after a reconnect is told
   * again by the server, a `live` of a zone never seen stale here changes nothing. */
  _setZoneStatus(state) {
    const known = this._stale.get(state.zone);
    const detail = { ...state, stale: state.status === 'stale' };
    if (detail.stale) {
      if (known && known.since === detail.since && known.lastSeq === detail.lastSeq) return;
      this._stale.set(state.zone, detail);
    } else if (!this._stale.delete(state.zone)) {
      return;
    }
    this.dispatchEvent(new PriceHubEvent('zone_status', detail));
  }

  _onBackendChanged(msg) { this._setBackend(msg.storage_backend); }

  _onError(msg) {
    if (this._pending.length && SUBSCRIBE_ERRORS.includes(msg.code)) {
      // The server answers each subscribe in order: this error is the oldest one's answer,
      // and it subscribed none of that message's zones.
      const { zones, resolve } = this._pending.shift();
      const named = /'([a-z0-9_]+)'/.exec(msg.message ?? '')?.[1];
      const culprits = named && zones.includes(named) ? [named] : zones;
      resolve({ added: [],
        rejected: culprits.map((zone) => ({ zone, code: msg.code, message: msg.message })) });
    }
    this.dispatchEvent(new PriceHubEvent('error', { code: msg.code, message: msg.message }));
  }

  _setBackend(backend) {
    if (!backend || backend === this._backend) return;
    const previous = this._backend;
    this._backend = backend;
    this.dispatchEvent(new PriceHubEvent('backend', { backend, previous }));
  }

  _deliver(price, flags, skipped = 0) {
    const zone = price.market_zone;
    const last = this._lastSeq.get(zone);
    if (typeof price.seq === 'number') {
      if (last !== undefined && price.seq <= last) {
        this._duplicates += 1;
        return;
      }
      this._lastSeq.set(zone, price.seq);
      const stale = this._stale.get(zone);
      if (stale && (last === undefined || price.seq > stale.lastSeq)) {
        // Newer than the stale zone's last price: it came back while this client was
        // away (the server says `live` only to sockets that saw it stale).
        this._setZoneStatus({ zone, status: 'live', since: null, lastSeq: price.seq });
      }
    }
    this.dispatchEvent(new PriceHubEvent('price', { price, flags, skipped }));
  }
}

/** The fields of a `snapshot` message (or the HTTP body). */
function snapshotOf(msg) {
  return { epoch: msg.epoch, prices: msg.prices ?? {}, cursor: msg.cursor ?? {},
    timestamp: msg.timestamp ?? null };
}

// Events whose `id:` is a stream cursor (initial_data stands in for an update on a stream).
const CURSOR_TYPES = Object.freeze(['price_update', 'initial_data']);

const SUBSCRIBE_ERRORS = Object.freeze(['unknown_zone', 'forbidden_zone', 'invalid_message',
  'rate_limited']);

/**
 * Explain a WebSocket that failed before it opened (see PriceHubClient._diagnose).
 * @returns {Promise<{kind: string, text: string}>}
 */
export async function diagnoseRefusedSocket(fetchImpl, baseUrl, socketUrl) {
  const base = toHttpBase(baseUrl);
  const probeUrl = toHttpBase(socketUrl);
  const origin = globalThis.location?.origin ?? base.origin;
  let status;
  for (const url of [new URL(PATHS.health, base), probeUrl]) {
    const answer = await answerTo(fetchImpl, url);
    if (answer.status === undefined || answer.gateway) return unreachable(base.host, answer.status);
    status = answer.status;
  }
  const text = {
    401: 'The server refused the connection: a valid subscriber token is required.',
    403: `The server refused the connection: this page's origin (${origin}) is not allowed.`,
    404: `The server has no socket at ${probeUrl.pathname}: check the address, or that the proxy forwards /api/ws/.`,
    503: 'The server refused the connection: it is over its connection limit or unavailable.',
  }[status];
  if (text) return { kind: { 401: 'auth', 403: 'origin', 404: 'not_found', 503: 'busy' }[status], text };
  // The server answers plain HTTP (pricehub: 400 "upgrade expected"), the upgrade did not
  // get through: its Origin, or a proxy, and a same-origin page cannot tell which.
  return {
    kind: 'upgrade_refused',
    text: `The server refused the connection: this page's origin (${origin}) is not allowed `
      + `(${ORIGIN_ADVICE}), or a proxy strips the WebSocket upgrade.`,
  };
}

/** {status, gateway} of a GET (see isGatewayAnswer); {} when nothing answered. */
async function answerTo(fetchImpl, url) {
  let response;
  try {
    response = await fetchImpl(url.href, { cache: 'no-store', headers: { Accept: 'application/json' } });
  } catch {
    return {};
  }
  let text = '';
  try { text = await response.text(); } catch { /* the status says enough */ }
  return { status: response.status, gateway: isGatewayAnswer(response.status, jsonObject(text)) };
}

PriceHubClient.prototype._handlers = Object.freeze({
  connection_established: PriceHubClient.prototype._onEstablished,
  subscribed: PriceHubClient.prototype._onSubscribed,
  initial_data: PriceHubClient.prototype._onInitialData,
  price_update: PriceHubClient.prototype._onPriceUpdate,
  resume_complete: PriceHubClient.prototype._onResumeComplete,
  gap: PriceHubClient.prototype._onGap,
  zone_status: PriceHubClient.prototype._onZoneStatus,
  snapshot: PriceHubClient.prototype._onSnapshot,
  storage_backend_changed: PriceHubClient.prototype._onBackendChanged,
  error: PriceHubClient.prototype._onError,
});
