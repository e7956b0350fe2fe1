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
 * Everything with a side effect on time or I/O (timers, clock, randomness, WebSocket,
 * fetch) is injectable so the reconnect logic can be unit-tested deterministically.
 */

/** Close codes after which retrying cannot help (unknown zone, bad token, forbidden zone). */
export const TERMINAL_CLOSE_CODES = Object.freeze([1008, 4001, 4003]);

/** Code used locally when the client gives up on a silent or stuck socket. */
export const CLIENT_TIMEOUT_CODE = 4000;

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

function defaultBaseUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error('PriceHubClient: option `url` is required outside a browser');
  return loc.href;
}

/**
 * Client for one pricehub server.
 *
 * Events (use `client.on(type, fn)` -> fn(detail), or addEventListener(type, e => e.detail)):
 *   status   {status: 'connecting'|'connected'|'reconnecting'|'failed'|'closed', ...}
 *   price    {price: {market_zone, price, volume, seq, timestamp}, flags: {initial, replay, conflated}}
 *   gap      {zone, fromSeq, toSeq, epochChanged}
 *   backend  {backend, previous}
 *   error    {code, message}           (server `error` messages; the socket stays open)
 *   message  the raw server message     (every frame, after the client processed it)
 */
export class PriceHubClient extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string} [options.url] server base URL (http(s):// or ws(s)://); default: page origin
   * @param {string} [options.zone] subscribe to one zone on `/api/ws/ws/market/{zone}`
   * @param {string[]} [options.zones] zones for `/api/ws/ws/prices` (default: all zones)
   * @param {string} [options.token] subscriber token, when the server has auth on
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
    this._epoch = null;
    this._epochChanged = false; // did the current connection start a new seq lineage?
    this._lastSeq = new Map(); // zone -> last seq delivered to the application
    this._resuming = new Map(); // zone -> held initial_data price (or null) until resume_complete
    this._backend = null;
    this._zones = o.zone ? [o.zone] : [...(o.zones ?? [])];
    this._subscribeAfterOpen = false; // multi-zone resume: socket opened with `zones=`
    this._duplicates = 0;
  }

  /** Current status: idle, connecting, connected, reconnecting, failed or closed. */
  get status() { return this._status; }
  /** Storage backend last announced by the server ("redis" / "in-memory"), or null. */
  get backend() { return this._backend; }
  /** Zones of the current (or last) connection. */
  get zones() { return [...this._zones]; }
  /** Sequence-number lineage of the server's history, or null before the first connection. */
  get epoch() { return this._epoch; }
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
    this.connect();
  }

  /** Close for good (status `closed`); no automatic reconnect follows. */
  close() {
    this._cancelRetry();
    const ws = this._detach();
    if (ws) ws.close(1000, 'client closed');
    this._setStatus('closed', {});
  }

  /** Send a JSON message if the socket is open; returns whether it was sent. */
  send(message) {
    if (!this._ws || this._ws.readyState !== OPEN) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Fetch the retained history of a zone over HTTP (oldest first).
   * @returns {Promise<object[]>}
   */
  async fetchHistory(zone, { limit = 200 } = {}) {
    if (!this._fetch) throw new Error('PriceHubClient: no fetch implementation');
    const u = new URL(`/api/ws/ws/history/${encodeURIComponent(zone)}`, this._baseUrl);
    if (u.protocol === 'ws:') u.protocol = 'http:';
    else if (u.protocol === 'wss:') u.protocol = 'https:';
    u.searchParams.set('limit', String(limit));
    const response = await this._fetch(u.href, { headers: { Accept: 'application/json' } });
    if (!response.ok) throw new Error(`history ${zone}: HTTP ${response.status}`);
    const body = await response.json();
    return Array.isArray(body.data) ? body.data : [];
  }

  // ---- connection lifecycle -------------------------------------------------------------

  _socketUrl() {
    const u = toWebSocketBase(this._baseUrl);
    const single = this.options.zone;
    if (single) {
      u.pathname = `/api/ws/ws/market/${encodeURIComponent(single)}`;
      const since = this._lastSeq.get(single);
      if (since !== undefined && this._epoch !== null) {
        u.searchParams.set('since', String(since));
        u.searchParams.set('epoch', this._epoch);
      }
    } else {
      u.pathname = '/api/ws/ws/prices';
      this._subscribeAfterOpen = this._lastSeq.size > 0 && this._zones.length > 0;
      if (this._subscribeAfterOpen) {
        // Resuming: open no zone (`zones=`), then one `subscribe` opens each zone with its
        // `since`. Opening the zones here would let live updates overtake the replay.
        u.searchParams.set('zones', '');
      } else if (this.options.zones?.length) {
        u.searchParams.set('zones', this.options.zones.join(','));
      }
    }
    if (this.options.token) u.searchParams.set('token', this.options.token);
    return u.href;
  }

  _open(attempt) {
    this._setStatus('connecting', { attempt, maxAttempts: this.options.maxAttempts });
    let ws;
    try {
      ws = new this._WebSocket(this._socketUrl());
    } catch (err) {
      // A throwing constructor means a bad URL or a blocked scheme: retrying cannot help.
      this._setStatus('failed', { terminal: true, reason: String(err), attempts: this._attempts,
        maxAttempts: this.options.maxAttempts });
      return;
    }
    this._ws = ws;
    this._establishTimer = this._timers.setTimeout(() => {
      this._establishTimer = null;
      this._abandon('no connection_established from the server');
    }, this.options.establishTimeoutMs);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    // Every failure is followed by a close event; that is where retrying is decided.
    ws.onerror = () => {};
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._lastFrameAt = this._now();
    // Resetting on open would retry forever against a server that accepts and drops.
    this._stableTimer = this._timers.setTimeout(() => {
      this._stableTimer = null;
      this._attempts = 0;
    }, this.options.stableAfterMs);
  }

  _onClose(ws, code, reason = '') {
    if (ws !== this._ws) return;
    this._detach();
    if (TERMINAL_CLOSE_CODES.includes(code)) {
      this._setStatus('failed', { code, reason, terminal: true, attempts: this._attempts,
        maxAttempts: this.options.maxAttempts });
      return;
    }
    this._scheduleRetry(code, reason);
  }

  _scheduleRetry(code, reason) {
    const attempt = this._attempts + 1;
    const { maxAttempts } = this.options;
    if (attempt > maxAttempts) {
      this._setStatus('failed', { code, reason, terminal: false, attempts: this._attempts,
        maxAttempts });
      return;
    }
    this._attempts = attempt;
    const delayMs = backoffDelay(attempt, { ...this.options, random: this._random });
    this._setStatus('reconnecting', { attempt, maxAttempts, delayMs, code, reason });
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
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    return ws;
  }

  /** Give up on the current socket now and retry: its close handshake could hang. */
  _abandon(reason) {
    const ws = this._detach();
    if (ws) ws.close(CLIENT_TIMEOUT_CODE, reason);
    this._scheduleRetry(CLIENT_TIMEOUT_CODE, reason);
  }

  _cancelRetry() { this._clearTimer('_retryTimer', 'clearTimeout'); }

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
    const resumeZones = Object.keys(resumeSince);
    for (const zone of resumeZones) this._resuming.set(zone, null);
    this._epoch = msg.epoch;
    this._epochChanged = epochChanged;
    // A new epoch restarts numbering: old seqs would make every new update look duplicated.
    if (epochChanged) this._lastSeq.clear();
    this._setBackend(msg.storage_backend);
    this._startHeartbeat(msg.heartbeat_interval);
    if (this._subscribeAfterOpen) {
      // The single-zone socket resumes through its URL; the multi-zone one asks here, with the
      // old epoch so the server can tell us (recovered:false) when the lineage changed.
      this.send({ type: 'subscribe', zones: this.zones, since: resumeSince,
        epoch: previousEpoch });
    }
    this._setStatus('connected', { connectionId: msg.connection_id, zones: this.zones,
      backend: this._backend, epoch: msg.epoch, resuming: resumeZones });
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
    const { market_zone, price, volume, seq, timestamp } = msg;
    this._deliver({ market_zone, price, volume, seq, timestamp },
      { initial: false, replay: msg.replay === true, conflated: msg.conflated === true });
  }

  _onResumeComplete(msg) {
    const zone = msg.market_zone;
    const held = this._resuming.get(zone);
    this._resuming.delete(zone);
    if (msg.recovered === false) {
      this.dispatchEvent(new PriceHubEvent('gap', { zone, fromSeq: msg.from_seq,
        toSeq: msg.to_seq, epochChanged: this._epochChanged }));
    }
    if (held) this._deliver(held, { initial: true, replay: false, conflated: false });
  }

  _onBackendChanged(msg) { this._setBackend(msg.storage_backend); }

  _onError(msg) {
    this.dispatchEvent(new PriceHubEvent('error', { code: msg.code, message: msg.message }));
  }

  _setBackend(backend) {
    if (!backend || backend === this._backend) return;
    const previous = this._backend;
    this._backend = backend;
    this.dispatchEvent(new PriceHubEvent('backend', { backend, previous }));
  }

  _deliver(price, flags) {
    const zone = price.market_zone;
    const last = this._lastSeq.get(zone);
    if (typeof price.seq === 'number') {
      if (last !== undefined && price.seq <= last) {
        this._duplicates += 1;
        return;
      }
      this._lastSeq.set(zone, price.seq);
    }
    this.dispatchEvent(new PriceHubEvent('price', { price, flags }));
  }
}

PriceHubClient.prototype._handlers = Object.freeze({
  connection_established: PriceHubClient.prototype._onEstablished,
  initial_data: PriceHubClient.prototype._onInitialData,
  price_update: PriceHubClient.prototype._onPriceUpdate,
  resume_complete: PriceHubClient.prototype._onResumeComplete,
  storage_backend_changed: PriceHubClient.prototype._onBackendChanged,
  error: PriceHubClient.prototype._onError,
});
