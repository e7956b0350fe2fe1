// pricehub live dashboard: one tile per zone, fed by PriceHubClient.
//
// Page options (query string), mostly for tests and demos:
//   zones=pjm,ercot     zones to show (default: every zone the server streams)
//   history=240         points of history loaded per zone and kept in the sparkline
//   base_delay_ms, jitter_ms, max_attempts, stable_after_ms   reconnect tuning (see pricehub.js)
//   token=...           subscriber token, when the server has auth on
import { PriceHubClient } from './pricehub.js';

const ZONE_NAMES = {
  pjm: 'PJM Interconnection',
  caiso: 'California ISO',
  ercot: 'ERCOT · Texas',
  nyiso: 'New York ISO',
  miso: 'Midcontinent ISO',
  spp: 'Southwest Power Pool',
  isone: 'ISO New England',
};

const FLASH_CLASSES = ['flash-up', 'flash-down'];
// Percent change against an open near $0/MWh (common in power markets) is noise, not signal.
const MIN_OPEN_FOR_PCT = 1;
const priceFormat = new Intl.NumberFormat('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const volumeFormat = new Intl.NumberFormat('en-US', { maximumFractionDigits: 1 });

function readOptions(search) {
  const q = new URLSearchParams(search);
  const num = (name) => (q.has(name) && Number.isFinite(Number(q.get(name))) ? Number(q.get(name)) : undefined);
  const client = {
    baseDelayMs: num('base_delay_ms'),
    jitterMs: num('jitter_ms'),
    maxAttempts: num('max_attempts'),
    stableAfterMs: num('stable_after_ms'),
    token: q.get('token') ?? undefined,
    zones: q.get('zones') ? q.get('zones').split(',').map((z) => z.trim()).filter(Boolean) : undefined,
  };
  // Undefined entries would override the client's documented defaults.
  for (const key of Object.keys(client)) if (client[key] === undefined) delete client[key];
  return { client, historyLimit: num('history') ?? 240 };
}

const fmtPrice = (v) => priceFormat.format(v);
const fmtSigned = (v) => `${v > 0 ? '+' : ''}${priceFormat.format(v)}`;
const utcDay = (ms) => new Date(ms).toISOString().slice(0, 10);
const utcTime = (ms) => new Date(ms).toISOString().slice(11, 19);

/** The data behind one tile: a seq-ordered series plus the open of the UTC day. */
class ZoneSeries {
  constructor(limit) {
    this.limit = limit;
    this.points = []; // {seq, price, volume, t}, ascending seq
    this.epoch = null; // seq lineage of `points`
    this.open = null; // earliest point of the current UTC day (kept across epochs: it is a time)
  }

  /**
   * Merge points of seq lineage `epoch` (any order, possibly overlapping); returns whether the
   * last point changed. Points of an older lineage are dropped: their seqs are not comparable.
   */
  merge(prices, epoch) {
    if (epoch !== this.epoch) {
      this.points = [];
      this.epoch = epoch;
    }
    const lastBefore = this.points.at(-1);
    const bySeq = new Map(this.points.map((p) => [p.seq, p]));
    for (const p of prices) {
      const t = Date.parse(p.timestamp);
      bySeq.set(p.seq, { seq: p.seq, price: p.price, volume: p.volume, t });
      this._considerOpen(p.price, t);
    }
    this.points = [...bySeq.values()].sort((a, b) => a.seq - b.seq).slice(-this.limit);
    return this.points.at(-1) !== lastBefore;
  }

  _considerOpen(price, t) {
    const today = utcDay(Date.now());
    if (utcDay(t) !== today) return;
    if (!this.open || utcDay(this.open.t) !== today || t < this.open.t) this.open = { price, t };
  }

  get last() { return this.points.at(-1) ?? null; }
  get previous() { return this.points.at(-2) ?? null; }
}

/** DOM of one tile. */
class Tile {
  constructor(zone, template, historyLimit) {
    this.zone = zone;
    this.series = new ZoneSeries(historyLimit);
    this.el = template.content.firstElementChild.cloneNode(true);
    this.el.dataset.zone = zone;
    this.f = {};
    for (const node of this.el.querySelectorAll('[data-field]')) this.f[node.dataset.field] = node;
    this.f.zone.textContent = zone.toUpperCase();
    this.f.name.textContent = ZONE_NAMES[zone] ?? '';
    this.el.addEventListener('animationend', () => this.el.classList.remove(...FLASH_CLASSES));
  }

  render({ flash }) {
    const last = this.series.last;
    if (!last) return;
    const open = this.series.open?.price ?? this.series.points[0].price;
    const change = last.price - open;
    const dir = change > 0 ? 'up' : change < 0 ? 'down' : 'flat';
    this.el.dataset.dir = dir;

    this.f.price.textContent = fmtPrice(last.price);
    this.f.price.dataset.value = String(last.price);
    this.f['change-abs'].textContent = fmtSigned(change);
    this.f['change-pct'].textContent = Math.abs(open) >= MIN_OPEN_FOR_PCT
      ? `(${fmtSigned((change / Math.abs(open)) * 100)}%)` : '';
    this.f.updated.textContent = utcTime(last.t);
    this.f.updated.dateTime = new Date(last.t).toISOString();
    this.f.volume.textContent = last.volume == null ? '—' : volumeFormat.format(last.volume);
    this.f.open.textContent = fmtPrice(open);
    const prices = this.series.points.map((p) => p.price);
    this.f.high.textContent = fmtPrice(Math.max(...prices));
    this.f.low.textContent = fmtPrice(Math.min(...prices));
    this._renderSparkline(prices, open);
    this.f.sparkline.dataset.firstSeq = String(this.series.points[0].seq);
    if (flash) this._flash();
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
    this.$ = (id) => doc.getElementById(id);
    this.client = new PriceHubClient(options.client);
    this.client.on('status', (s) => this.onStatus(s));
    this.client.on('backend', ({ backend }) => this.onBackend(backend));
    this.client.on('price', (p) => this.onPrice(p));
    this.client.on('gap', (g) => this.onGap(g));
    this.$('reconnect-btn').addEventListener('click', () => this.client.reconnect());
    setInterval(() => this.tick(), 250);
    this.tick();
  }

  start() { this.client.connect(); }

  ensureTiles(zones) {
    const container = this.$('tiles');
    const template = this.$('tile-template');
    for (const zone of zones) {
      if (this.tiles.has(zone)) continue;
      const tile = new Tile(zone, template, this.options.historyLimit);
      this.tiles.set(zone, tile);
      container.append(tile.el);
      this.loadHistory(tile);
    }
    this.$('tiles-empty').hidden = this.tiles.size > 0;
  }

  async loadHistory(tile) {
    const { epoch } = this.client;
    try {
      const data = await this.client.fetchHistory(tile.zone, { limit: this.options.historyLimit });
      // The HTTP answer carries no epoch: if the lineage changed meanwhile, it may be stale.
      if (this.client.epoch !== epoch) return;
      tile.series.merge(data, epoch);
      tile.render({ flash: false });
    } catch (err) {
      console.warn(`pricehub: history of ${tile.zone} unavailable`, err);
    }
  }

  onStatus(s) {
    if (s.status === 'connected') this.ensureTiles(s.zones);
    const state = {
      connecting: s.attempt ? 'reconnecting' : 'connecting',
      connected: 'live',
      reconnecting: 'reconnecting',
      failed: 'offline',
      closed: 'offline',
    }[s.status] ?? 'connecting';
    const badge = this.$('conn-badge');
    badge.dataset.state = state;
    badge.querySelector('[data-field=conn-label]').textContent =
      { live: 'Live', reconnecting: 'Reconnecting', offline: 'Offline', connecting: 'Connecting' }[state];
    this.$('tiles').dataset.stale = String(state !== 'live');
    this.retryDeadline = s.status === 'reconnecting' ? performance.now() + s.delayMs : null;
    this.renderBanner(s);
  }

  renderBanner(s) {
    const banner = this.$('conn-banner');
    const button = this.$('reconnect-btn');
    const retrying = s.status === 'reconnecting' || (s.status === 'connecting' && s.attempt > 0);
    let text = '';
    let state = 'hidden';
    if (retrying) {
      state = 'reconnecting';
      text = `Reconnecting… (attempt ${s.attempt}/${s.maxAttempts})`;
    } else if (s.status === 'failed') {
      state = 'failed';
      text = s.terminal
        ? `Connection refused by the server (code ${s.code ?? '—'}${s.reason ? `: ${s.reason}` : ''}).`
        : `Offline: reconnection stopped after ${s.attempts} attempt${s.attempts === 1 ? '' : 's'}.`;
    }
    banner.hidden = state === 'hidden';
    banner.dataset.state = state;
    this.$('conn-banner-text').textContent = text;
    this.$('conn-banner-detail').textContent = s.status === 'connecting' && retrying ? 'connecting…' : '';
    button.hidden = s.status !== 'failed';
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
    this.ensureTiles([price.market_zone]);
    const tile = this.tiles.get(price.market_zone);
    const moved = tile.series.merge([price], this.client.epoch);
    tile.render({ flash: moved && !flags.replay });
    this.counters.updates += 1;
    this.$('stat-updates').textContent = this.counters.updates.toLocaleString('en-US');
  }

  onGap({ zone }) {
    this.counters.gaps += 1;
    this.$('stat-gaps').textContent = String(this.counters.gaps);
    const tile = this.tiles.get(zone);
    // The history endpoint holds what the socket could not replay.
    if (tile) this.loadHistory(tile);
  }

  tick() {
    this.$('clock').textContent = `${utcTime(Date.now())} UTC`;
    this.$('stat-dupes').textContent = String(this.client.duplicatesDropped);
    this.renderCountdown();
  }
}

const dashboard = new Dashboard(document, readOptions(location.search));
// Handy from the devtools console: pricehubDashboard.client.reconnect(), .tiles, ...
globalThis.pricehubDashboard = dashboard;
dashboard.start();
