// pricehub live dashboard: one tile per watched zone, fed by PriceHubClient.
//
// A server may have 20,000 zones: the page never opens them all. It watches the zones of the
// URL (?zones=a,b), else those remembered in localStorage, else the contract's default ISO
// zones (the ones this server does not have are dropped), and the picker adds or removes one
// at a time. The socket opens on no zone and subscribes the watched ones by message.
//
// Page options (query string), mostly for tests and demos:
//   zones=pjm,ercot     zones to watch (any case; replaces the remembered list for this view)
//   history=240         points of history kept in the sparkline
//   history_page=10000  prices per page of the history query (1..10000)
//   base_delay_ms, jitter_ms, max_attempts, stable_after_ms   reconnect tuning (see pricehub.js)
//   transport=auto|ws|sse   how to connect (default auto: WebSocket, SSE when it is refused)
//   token=...           subscriber token, when the server has auth on
//   max_rate=auto|none|N    updates per second per zone (default auto: dashboardRate)
//
// Charts load by market time: every retained price since 00:00 UTC (and the hour before,
// which shows that the open is the day's first price), over the history-by-time endpoint,
// 50 zones a query, following its pages.
//
// Imported outside a page (tests/js/), it only exports its pure parts: ZoneSeries,
// ZoneHealth, connectionView and dashboardRate.
import { PriceHubClient, checkMaxRate } from './pricehub.js';

const ZONE_NAMES = {
  pjm: 'PJM Interconnection',
  caiso: 'California ISO',
  ercot: 'ERCOT · Texas',
  nyiso: 'New York ISO',
  miso: 'Midcontinent ISO',
  spp: 'Southwest Power Pool',
  isone: 'ISO New England',
};

const DEFAULT_ZONES = Object.keys(ZONE_NAMES); // the contract's default zone list
const STORAGE_KEY = 'pricehub.watched';
const KNOWN_KEY = 'pricehub.known';
const MAX_KNOWN = 2000; // zones kept for the type-ahead; the oldest are dropped beyond it
const ZONE_RE = /^[a-z0-9_]{1,32}$/;
// The open needs every price since 00:00 UTC: the charts load [00:00 - LOOKBACK, now) by
// market time. A price of the hour before midnight shows that nothing of today was trimmed
// from the retained history (it is contiguous from there), so the open is exact.
const OPEN_LOOKBACK_MS = 60 * 60 * 1000;
const HISTORY_BATCH = 50; // zones per history query (the server bounds a query's zones)
const HISTORY_PAGE = 10000; // prices per page, the most the contract allows
// A server without the history-by-time endpoint: the retained history by count instead.
const OPEN_HISTORY_LIMIT = 5000;
const FLASH_CLASSES = ['flash-up', 'flash-down'];
// Percent change against an open near $0/MWh (common in power markets) is noise, not signal.
const MIN_OPEN_FOR_PCT = 1;
const priceFormat = new Intl.NumberFormat('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const volumeFormat = new Intl.NumberFormat('en-US', { maximumFractionDigits: 1 });

/**
 * The rate a dashboard asks for when it shows `zones` tiles: a person reads no tile faster
 * than a few updates a second, and hundreds of tiles redrawn at the feed's full rate would
 * spend the page's (and the server's) time on frames nobody sees. null: every update.
 */
export function dashboardRate(zones) {
  if (zones > 500) return 1;
  if (zones > 50) return 4;
  return null;
}

/** The `max_rate` page option: 'auto' (default: dashboardRate), 'none', or a number. */
function readRate(text) {
  if (text === null || text === 'auto') return 'auto';
  if (text === 'none') return null;
  try {
    return checkMaxRate(Number(text));
  } catch {
    return 'auto';
  }
}

function readOptions(search) {
  const q = new URLSearchParams(search);
  const num = (name) => (q.has(name) && Number.isFinite(Number(q.get(name))) ? Number(q.get(name)) : undefined);
  const client = {
    baseDelayMs: num('base_delay_ms'),
    jitterMs: num('jitter_ms'),
    maxAttempts: num('max_attempts'),
    stableAfterMs: num('stable_after_ms'),
    token: q.get('token') ?? undefined,
    transport: q.get('transport') ?? undefined,
  };
  // Undefined entries would override the client's documented defaults.
  for (const key of Object.keys(client)) if (client[key] === undefined) delete client[key];
  const urlZones = q.has('zones') ? parseZones(q.get('zones')) : null;
  const page = num('history_page');
  const historyPage = Number.isInteger(page) && page >= 1 && page <= HISTORY_PAGE ? page : HISTORY_PAGE;
  return { client, urlZones, historyLimit: num('history') ?? 240, historyPage,
    rate: readRate(q.get('max_rate')) };
}

/** Zone names as typed or linked: any case, commas or spaces. */
function parseZones(text) {
  return [...new Set(text.split(/[\s,]+/).map((z) => z.trim().toLowerCase()).filter(Boolean))];
}

function loadList(key) {
  try {
    const value = JSON.parse(localStorage.getItem(key) ?? 'null');
    return Array.isArray(value) ? value.filter((z) => typeof z === 'string' && ZONE_RE.test(z)) : null;
  } catch {
    return null; // storage disabled or garbage: start from the defaults
  }
}

function saveList(key, zones) {
  try { localStorage.setItem(key, JSON.stringify(zones)); } catch { /* private mode: forget */ }
}

const fmtPrice = (v) => priceFormat.format(v);
const fmtSigned = (v) => `${v > 0 ? '+' : ''}${priceFormat.format(v)}`;
const utcDay = (ms) => new Date(ms).toISOString().slice(0, 10);
const utcTime = (ms) => new Date(ms).toISOString().slice(11, 19);

const midnightUtc = (ms) => Date.parse(`${utcDay(ms)}T00:00:00.000Z`);

/**
 * The data behind one tile: a seq-ordered series plus the open of the UTC day.
 *
 * The open is the earliest price (by market time) of the current UTC day among every price
 * the page has seen, the history included. It is exact once the page has seen a price from
 * before 00:00 UTC (`coveredFrom`): retained history and the live stream are contiguous from
 * there. Otherwise it is the earliest price today that the server still retains, and the tile
 * says so (the server keeps --history-size prices per zone, possibly less than a day).
 *
 * Every figure comes from one seq lineage (epoch): a new one (the server lost its history)
 * starts the points, the open and the coverage over together, so the open, high, low and
 * sparkline of a tile always describe the same history.
 */
export class ZoneSeries {
  constructor(limit, { now = Date.now } = {}) {
    this.limit = limit;
    this.now = now;
    this._reset(null);
  }

  _reset(epoch) {
    this.points = []; // {seq, price, volume, t}, ascending seq
    this.epoch = epoch; // seq lineage of everything below
    this.open = null; // {price, t}: earliest of `day`
    this.day = null; // the UTC day of `open`
    this.coveredFrom = Infinity; // market time from which the page has seen every price
  }

  /** The open of today, or null when no price of today has been seen yet. */
  openToday() { return this.day === utcDay(this.now()) ? this.open : null; }
  /** Does the open cover the whole UTC day (see the class comment)? */
  get openExact() { return this.coveredFrom < midnightUtc(this.now()); }

  /**
   * Merge points of seq lineage `epoch` (any order, possibly overlapping); returns whether the
   * last point changed. Another lineage replaces everything: its seqs are not comparable, and
   * an open kept from the old one would not be the open of the history shown.
   */
  merge(prices, epoch) {
    if (epoch !== this.epoch) this._reset(epoch);
    const lastBefore = this.points.at(-1);
    const bySeq = new Map(this.points.map((p) => [p.seq, p]));
    for (const p of prices) {
      const t = Date.parse(p.timestamp);
      bySeq.set(p.seq, { seq: p.seq, price: p.price, volume: p.volume, t });
      this._considerOpen(p.price, t);
      if (t < this.coveredFrom) this.coveredFrom = t;
    }
    this.points = [...bySeq.values()].sort((a, b) => a.seq - b.seq).slice(-this.limit);
    return this.points.at(-1) !== lastBefore;
  }

  _considerOpen(price, t) {
    const today = utcDay(this.now());
    if (utcDay(t) !== today) return;
    if (this.day !== today || t < this.open.t) {
      this.open = { price, t };
      this.day = today;
    }
  }

  /** Forget what a gap may have made incomplete; the reloaded history sets it again. */
  forgetCoverage() { this.coveredFrom = Infinity; }

  get last() { return this.points.at(-1) ?? null; }
  get previous() { return this.points.at(-2) ?? null; }

  /** What the tile shows, or null before the first point: {last, open, openPoint, exact,
   * high, low, prices}; `open` is null when no price of today has been seen. */
  figures() {
    const { last } = this;
    if (!last) return null;
    const openPoint = this.openToday();
    const prices = this.points.map((p) => p.price);
    return { last, openPoint, open: openPoint?.price ?? null,
      exact: openPoint !== null && this.openExact,
      high: Math.max(...prices), low: Math.min(...prices), prices };
  }
}

const GAP_REASONS = {
  history_exceeded: 'older than the server\'s retained history',
  epoch_changed: 'the server\'s numbering restarted (new epoch)',
  lost: 'lost by the server',
};

/** "seqs 3–7", "seq 5", "seqs from 3" (to_seq unknown). */
function seqRange(fromSeq, toSeq) {
  if (toSeq === null || toSeq === undefined) return `seqs from ${fromSeq}`;
  return fromSeq === toSeq ? `seq ${fromSeq}` : `seqs ${fromSeq}–${toSeq}`;
}

/** HH:MM:SSZ of an ISO-8601 UTC time, read off the string (microseconds need no parse). */
export function utcClock(iso) {
  const m = typeof iso === 'string' && /T(\d\d:\d\d:\d\d)(?:\.\d+)?Z$/.exec(iso);
  if (m) return `${m[1]}Z`;
  const ms = Date.parse(iso);
  return Number.isFinite(ms) ? `${utcTime(ms)}Z` : null;
}

/**
 * What a tile says about the feed of its zone, beside its prices: how many gaps the module
 * reported (holes in its seqs the page will never get) and whether the server says the zone
 * is stale (--stale-after: no price accepted for that long). A stale zone looks just like a
 * quiet market otherwise, so the tile must say it until the zone's `live` or a newer price.
 */
export class ZoneHealth {
  constructor() {
    this.gaps = 0;
    this.lastGap = null; // the module's last `gap` detail of this zone
    this.stale = null; // the module's `zone_status` detail while stale, else null
  }

  noteGap(gap) {
    this.gaps += 1;
    this.lastGap = gap;
  }

  noteStatus(status) { this.stale = status.stale ? status : null; }

  /** A price newer than the stale zone's last one ends the staleness even if its `live`
   * was never seen (the module emits one, but a tile must not depend on the order). */
  notePrice(price) {
    if (this.stale && (this.stale.lastSeq == null || price.seq > this.stale.lastSeq)) this.stale = null;
  }

  /** {gapText, gapTitle, stale, staleText, staleTitle}: the texts are '' when nothing to say. */
  view() {
    const g = this.lastGap;
    const gapText = this.gaps > 0 ? `gaps ${this.gaps}` : '';
    const gapTitle = g ? `Last gap: ${seqRange(g.fromSeq, g.toSeq)} missed, `
      + `${GAP_REASONS[g.reason] ?? g.reason ?? 'reason not given'}`
      + (g.reason ? ` (${g.reason})` : '') : '';
    const since = this.stale ? utcClock(this.stale.since) : null;
    const staleText = this.stale ? (since ? `STALE since ${since}` : 'STALE') : '';
    const staleTitle = this.stale ? 'The server has accepted no price of this zone'
      + (since ? ` since ${since}` : '') + ': the price shown is not live' : '';
    return { gapText, gapTitle, stale: this.stale !== null, staleText, staleTitle };
  }
}

/** DOM of one tile. */
class Tile {
  constructor(zone, template, historyLimit, onRemove) {
    this.zone = zone;
    this.series = new ZoneSeries(historyLimit);
    this.health = new ZoneHealth();
    this.el = template.content.firstElementChild.cloneNode(true);
    this.el.dataset.zone = zone;
    this.f = {};
    for (const node of this.el.querySelectorAll('[data-field]')) this.f[node.dataset.field] = node;
    this.f.zone.textContent = zone.toUpperCase();
    this.f.name.textContent = ZONE_NAMES[zone] ?? '';
    this.el.addEventListener('animationend', () => this.el.classList.remove(...FLASH_CLASSES));
    this.f.remove.setAttribute('aria-label', `Stop watching ${zone.toUpperCase()}`);
    this.f.remove.addEventListener('click', () => onRemove(zone));
  }

  render({ flash }) {
    const figures = this.series.figures();
    if (!figures) return;
    const { last, openPoint, open, exact } = figures;
    const change = open === null ? null : last.price - open;
    const dir = change > 0 ? 'up' : change < 0 ? 'down' : 'flat';
    this.el.dataset.dir = dir;

    this.f.price.textContent = fmtPrice(last.price);
    this.f.price.dataset.value = String(last.price);
    this.f['change-abs'].textContent = change === null ? '—' : fmtSigned(change);
    this.f['change-pct'].textContent = change !== null && Math.abs(open) >= MIN_OPEN_FOR_PCT
      ? `(${fmtSigned((change / Math.abs(open)) * 100)}%)` : '';
    this.f.updated.textContent = utcTime(last.t);
    this.f.updated.dateTime = new Date(last.t).toISOString();
    this.f.volume.textContent = last.volume == null ? '—' : volumeFormat.format(last.volume);
    this.f.open.textContent = open === null ? '—' : fmtPrice(open);
    this.f.open.dataset.exact = String(exact);
    this.f['open-label'].textContent = open === null || exact ? 'Open' : 'Open*';
    this.f['open-label'].title = open === null ? 'No price yet today (UTC)'
      : exact ? `First price of the UTC day, at ${utcTime(openPoint.t)}`
        : `Earliest price today the server still holds (at ${utcTime(openPoint.t)}): `
          + 'its history does not reach back to 00:00 UTC';
    this.f.high.textContent = fmtPrice(figures.high);
    this.f.low.textContent = fmtPrice(figures.low);
    this._renderSparkline(figures.prices, open ?? figures.prices[0]);
    this.f.sparkline.dataset.firstSeq = String(this.series.points[0].seq);
    if (flash) this._flash();
  }

  renderHealth() {
    const view = this.health.view();
    this.el.dataset.stale = String(view.stale);
    this.f.gaps.textContent = view.gapText;
    this.f.gaps.title = view.gapTitle;
    this.f.gaps.hidden = !view.gapText;
    this.f.stale.textContent = view.staleText;
    this.f.stale.title = view.staleTitle;
    this.f.stale.hidden = !view.stale;
  }

  _renderSparkline(prices, open) {
    const W = 200;
    const H = 44;
    const PAD = 3;
    const lo = Math.min(open, ...prices);
    const hi = Math.max(open, ...prices);
    const span = hi - lo || 1;
    const y = (v) => (PAD + (1 - (v - lo) / span) * (H - 2 * PAD)).toFixed(2);
    const step = prices.length > 1 ? W / (prices.length - 1) : 0;
    const pts = prices.map((v, i) => `${(i * step).toFixed(2)},${y(v)}`);
    if (pts.length === 1) pts.push(`${W},${y(prices[0])}`);
    const svg = this.f.sparkline;
    svg.querySelector('.spark-line').setAttribute('points', pts.join(' '));
    svg.querySelector('.spark-area').setAttribute('d', `M0,${H} L${pts.join(' L')} L${W},${H} Z`);
    const base = svg.querySelector('.spark-open');
    base.setAttribute('y1', y(open));
    base.setAttribute('y2', y(open));
    svg.dataset.points = String(prices.length);
  }

  _flash() {
    const last = this.series.last;
    const prev = this.series.previous;
    const cls = prev && last.price < prev.price ? 'flash-down' : 'flash-up';
    this.el.classList.remove(...FLASH_CLASSES);
    void this.el.offsetWidth; // restart the CSS animation when updates come back to back
    this.el.classList.add(cls);
  }
}

class Dashboard {
  constructor(doc, options) {
    this.doc = doc;
    this.options = options;
    this.tiles = new Map();
    this.counters = { updates: 0, gaps: 0 };
    this.retryDeadline = null;
    this.lastStatus = { status: 'connecting', attempt: 0 };
    this.$ = (id) => doc.getElementById(id);
    const watched = options.urlZones ?? loadList(STORAGE_KEY) ?? DEFAULT_ZONES;
    this.known = new Set([...(loadList(KNOWN_KEY) ?? []), ...DEFAULT_ZONES, ...watched]);
    this.rate = this.rateFor(watched.length);
    this.client = new PriceHubClient({ ...options.client, subscribe: true, zones: watched,
      maxRate: this.rate });
    this.historyQueue = new Set(); // zones whose history loads with the next query
    this.historyFlush = null;
    this.client.on('status', (s) => this.onStatus(s));
    this.client.on('backend', ({ backend }) => this.onBackend(backend));
    this.client.on('price', (p) => this.onPrice(p));
    this.client.on('gap', (g) => this.onGap(g));
    this.client.on('zone_status', (z) => this.onZoneStatus(z));
    this.client.on('zones', (z) => this.onZones(z));
    this.client.on('error', (e) => this.onServerError(e));
    this.client.on('diagnosis', () => this.renderConnection());
    this.$('reconnect-btn').addEventListener('click', () => this.client.reconnect());
    this.$('zone-picker').addEventListener('submit', (event) => {
      event.preventDefault();
      this.addFromPicker();
    });
    this.renderSuggestions();
    this.renderRate();
    this.ensureTiles(watched);
    setInterval(() => this.tick(), 250);
    this.tick();
  }

  start() {
    this.client.connect();
    this.suggestActiveZones();
  }

  /** Zones other pages watch on this server make good suggestions (no zone list exists). */
  async suggestActiveZones() {
    try {
      const response = await fetch('/api/ws/ws/stats', { headers: { Accept: 'application/json' } });
      if (!response.ok) return;
      const { active_zones: active } = await response.json();
      if (Array.isArray(active)) this.learn(active.slice(0, MAX_KNOWN));
    } catch { /* suggestions only */ }
  }

  learn(zones) {
    const before = this.known.size;
    for (const zone of zones) if (ZONE_RE.test(zone)) this.known.add(zone);
    if (this.known.size === before) return;
    const kept = [...this.known].slice(-MAX_KNOWN);
    this.known = new Set(kept);
    saveList(KNOWN_KEY, kept);
    this.renderSuggestions();
  }

  renderSuggestions() {
    const list = this.$('zone-options');
    const options = [...this.known].filter((z) => !this.tiles.has(z)).sort().map((zone) => {
      const option = this.doc.createElement('option');
      option.value = zone.toUpperCase();
      if (ZONE_NAMES[zone]) option.label = ZONE_NAMES[zone];
      return option;
    });
    list.replaceChildren(...options);
  }

  async addFromPicker() {
    const input = this.$('zone-input');
    const zones = parseZones(input.value);
    if (zones.length === 0) return;
    const bad = zones.filter((z) => !ZONE_RE.test(z));
    if (bad.length) {
      this.say(`Not a zone name: ${bad.join(', ')} (letters, digits and _ only).`, 'error');
      return;
    }
    input.value = '';
    this.ensureTiles(zones);
    const { rejected } = await this.client.addZones(zones);
    if (rejected.length === 0) this.say('');
  }

  removeZone(zone) {
    this.client.removeZones([zone]);
    this.dropTile(zone);
  }

  dropTile(zone) {
    const tile = this.tiles.get(zone);
    if (!tile) return;
    tile.el.remove();
    this.tiles.delete(zone);
    this.$('tiles-empty').hidden = this.tiles.size > 0;
    this.renderSuggestions();
  }

  rateFor(count) { return this.options.rate === 'auto' ? dashboardRate(count) : this.options.rate; }

  /** More or fewer tiles may want another rate (dashboardRate): ask for it. */
  updateRate(count) {
    const rate = this.rateFor(count);
    if (rate === this.rate) return;
    this.rate = rate;
    this.client.setMaxRate(rate);
    this.renderRate();
  }

  renderRate() {
    this.$('stat-rate').textContent = this.rate === null ? 'every update' : `${this.rate}/s per zone`;
  }

  onZones({ zones, added, rejected }) {
    this.updateRate(zones.length);
    for (const { zone } of rejected) if (!zones.includes(zone)) this.dropTile(zone);
    this.learn(added);
    if (rejected.length) {
      const unknown = rejected.filter((r) => r.code === 'unknown_zone').map((r) => r.zone);
      this.say(unknown.length ? `Unknown zone: ${unknown.map((z) => z.toUpperCase()).join(', ')}.`
        : rejected[0].message, 'error');
    }
    saveList(STORAGE_KEY, zones);
    const url = new URL(location.href);
    url.searchParams.set('zones', zones.join(','));
    history.replaceState(null, '', url);
  }

  onServerError({ code, message }) {
    if (code !== 'unknown_zone') this.say(`Server: ${message}`, 'error');
  }

  say(text, kind = 'info') {
    const msg = this.$('zone-msg');
    msg.textContent = text;
    msg.dataset.kind = kind;
  }

  ensureTiles(zones) {
    const container = this.$('tiles');
    const template = this.$('tile-template');
    for (const zone of zones) {
      if (this.tiles.has(zone)) continue;
      const tile = new Tile(zone, template, this.options.historyLimit, (z) => this.removeZone(z));
      this.tiles.set(zone, tile);
      // A zone watched again may be stale already: the module says so only on a change.
      const stale = this.client.staleZones[zone];
      if (stale) tile.health.noteStatus(stale);
      tile.renderHealth();
      container.append(tile.el);
      if (this.client.epoch !== null) this.queueHistory(tile);
    }
    this.$('tiles-empty').hidden = this.tiles.size > 0;
    this.$('tiles-empty').textContent = 'No zone watched: add one with the picker above.';
    this.renderSuggestions();
  }

  /** Load `tile`'s history with the others asked for in the same turn (one query). */
  queueHistory(tile) {
    this.historyQueue.add(tile.zone);
    this.historyFlush ??= Promise.resolve().then(() => this.flushHistory());
  }

  async flushHistory() {
    const zones = [...this.historyQueue];
    this.historyQueue.clear();
    this.historyFlush = null;
    for (let i = 0; i < zones.length; i += HISTORY_BATCH) {
      await this.loadHistory(zones.slice(i, i + HISTORY_BATCH));
    }
  }

  /** Every retained price of `zones` since 00:00 UTC (see OPEN_LOOKBACK_MS), all pages. */
  async loadHistory(zones) {
    const { epoch } = this.client;
    const byZone = new Map(zones.map((zone) => [zone, []]));
    try {
      const from = new Date(midnightUtc(Date.now()) - OPEN_LOOKBACK_MS);
      const limit = this.options.historyPage;
      for await (const page of this.client.history(zones, { from, limit })) {
        for (const price of page.prices) byZone.get(price.market_zone)?.push(price);
      }
    } catch (err) {
      if (err.status === 404) return this.loadHistoryByCount(zones);
      if ((err.status === 422 || err.status === 403) && zones.length > 1) {
        // One zone the server refuses (unknown, not allowed) fails the query: ask alone.
        for (const zone of zones) await this.loadHistory([zone]);
        return;
      }
      console.warn(`pricehub: history of ${zones.join(', ')} unavailable`, err);
      return;
    }
    // The HTTP answer carries no epoch: if the lineage changed meanwhile, it may be stale.
    if (this.client.epoch === epoch) for (const [zone, prices] of byZone) this.showHistory(zone, prices, epoch);
    return;
  }

  /** An older server without history by time: the last prices by count, zone by zone. */
  async loadHistoryByCount(zones) {
    const { epoch } = this.client;
    const limit = Math.max(this.options.historyLimit, OPEN_HISTORY_LIMIT);
    for (const zone of zones) {
      try {
        const data = await this.client.fetchHistory(zone, { limit });
        if (this.client.epoch === epoch) this.showHistory(zone, data, epoch);
      } catch (err) {
        console.warn(`pricehub: history of ${zone} unavailable`, err);
      }
    }
  }

  showHistory(zone, prices, epoch) {
    const tile = this.tiles.get(zone);
    if (!tile) return;
    tile.series.merge(prices, epoch);
    tile.render({ flash: false });
  }

  onStatus(s) {
    this.lastStatus = s;
    if (s.status === 'connected') {
      // Tiles were made before the epoch was known: their history loads now.
      for (const tile of this.tiles.values()) if (tile.series.epoch !== s.epoch) this.queueHistory(tile);
    }
    this.retryDeadline = s.status === 'reconnecting' ? performance.now() + s.delayMs : null;
    this.renderConnection();
  }

  /** Badge and banner, from the last status and what the client knows about why. */
  renderConnection() {
    const s = this.lastStatus;
    const view = connectionView(s, { cause: this.client.lastCause,
      diagnosis: this.client.lastDiagnosis });
    const badge = this.$('conn-badge');
    badge.dataset.state = view.state;
    badge.dataset.transport = view.transport;
    badge.querySelector('[data-field=conn-label]').textContent = view.label;
    badge.title = view.title;
    this.$('tiles').dataset.stale = String(view.state !== 'live');
    const banner = this.$('conn-banner');
    banner.hidden = view.banner.state === 'hidden';
    banner.dataset.state = view.banner.state;
    this.$('conn-banner-text').textContent = view.banner.text;
    const reason = this.$('conn-banner-reason');
    reason.textContent = view.banner.reason;
    reason.hidden = !reason.textContent;
    this.$('conn-banner-detail').textContent = s.status === 'connecting' && view.retrying
      ? 'connecting…' : '';
    this.$('reconnect-btn').hidden = s.status !== 'failed';
    this.renderCountdown();
  }

  renderCountdown() {
    if (this.retryDeadline === null) return;
    const left = Math.max(0, this.retryDeadline - performance.now()) / 1000;
    this.$('conn-banner-detail').textContent = `next try in ${left.toFixed(1)} s`;
  }

  onBackend(backend) {
    const badge = this.$('backend-badge');
    badge.dataset.backend = backend;
    badge.querySelector('[data-field=backend]').textContent = backend;
  }

  onPrice({ price, flags }) {
    const tile = this.tiles.get(price.market_zone);
    if (!tile) return; // a zone just removed: its last updates were already under way
    const moved = tile.series.merge([price], this.client.epoch);
    tile.health.notePrice(price);
    tile.render({ flash: moved && !flags.replay });
    tile.renderHealth();
    this.counters.updates += 1;
    this.$('stat-updates').textContent = this.counters.updates.toLocaleString('en-US');
  }

  onGap(gap) {
    this.counters.gaps += 1;
    this.$('stat-gaps').textContent = String(this.counters.gaps);
    const tile = this.tiles.get(gap.zone);
    // The history endpoint holds what the socket could not replay.
    if (tile) {
      tile.health.noteGap(gap);
      tile.renderHealth();
      tile.series.forgetCoverage();
      this.queueHistory(tile);
    }
  }

  onZoneStatus(status) {
    const tile = this.tiles.get(status.zone);
    if (!tile) return;
    tile.health.noteStatus(status);
    tile.renderHealth();
  }

  tick() {
    this.$('clock').textContent = `${utcTime(Date.now())} UTC`;
    this.$('stat-dupes').textContent = String(this.client.duplicatesDropped);
    this.renderCountdown();
  }
}

const BADGE_STATES = {
  connecting: 'connecting', connected: 'live', reconnecting: 'reconnecting', failed: 'offline',
  closed: 'offline',
};
const STATE_LABELS = { live: 'Live', reconnecting: 'Reconnecting', offline: 'Offline', connecting: 'Connecting' };
const TRANSPORT_LABELS = { sse: 'SSE', ws: 'WebSocket' };

/**
 * What the badge and the banner say for the client status `s`. Why the page is not live is
 * one sentence, the client's `cause` of the last attempt that ended (pricehub.js explainEnd:
 * only what the page could read), shown in the banner and the badge's tooltip alike. While
 * live over SSE the tooltip says why not the WebSocket: `diagnosis`, unless it found the
 * server unreachable, which the stream just disproved.
 * Returns {state, transport, label, title, retrying, banner: {state, text, reason}}.
 */
export function connectionView(s, { cause = null, diagnosis = null } = {}) {
  const retrying = s.status === 'reconnecting' || (s.status === 'connecting' && s.attempt > 0);
  const state = s.status === 'connecting' && s.attempt ? 'reconnecting'
    : BADGE_STATES[s.status] ?? 'connecting';
  const transport = s.status === 'connected' ? s.transport ?? '' : '';
  const label = STATE_LABELS[state] + (transport ? ` · ${TRANSPORT_LABELS[transport]}` : '');
  const why = state === 'live' ? '' : cause?.text ?? '';
  let title = why ? `${STATE_LABELS[state]}: ${why}` : 'Connection to the price feed';
  if (transport === 'sse') {
    const known = diagnosis && diagnosis.kind !== 'unreachable' ? ` (${diagnosis.text})` : '';
    title = `Live over Server-Sent Events: the WebSocket could not be opened${known}`;
  } else if (transport === 'ws') {
    title = 'Live over WebSocket';
  }
  const banner = bannerView(s, retrying);
  banner.reason = banner.state === 'hidden' ? '' : why;
  return { state, transport, label, title, retrying, banner };
}

function bannerView(s, retrying) {
  if (retrying) {
    return { state: 'reconnecting', text: `Reconnecting… (attempt ${s.attempt}/${s.maxAttempts})` };
  }
  if (s.status !== 'failed') return { state: 'hidden', text: '' };
  return { state: 'failed', text: s.terminal
    ? `Connection refused by the server (code ${s.code ?? '—'}${s.reason ? `: ${s.reason}` : ''}).`
    : `Offline: reconnection stopped after ${s.attempts} attempt${s.attempts === 1 ? '' : 's'}.` };
}

// In a page, run; imported elsewhere (the unit tests), only export.
if (typeof document !== 'undefined') {
  const dashboard = new Dashboard(document, readOptions(location.search));
  // Handy from the devtools console: pricehubDashboard.client.reconnect(), .tiles, ...
  globalThis.pricehubDashboard = dashboard;
  dashboard.start();
}
