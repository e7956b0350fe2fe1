'use strict';
// What the Node peer servers share: the bench's contract subset, as bench/servers/common.py
// defines it for the Python baselines (same paths, same frames, same publish endpoint), so
// that one publisher and one load client drive every server and only the fan-out differs.
//
// Served by every peer script but soketi (which speaks Pusher and has its own HTTP API):
// POST /api/ws/ws/broadcast/price (Bearer key, one price object or a list, 202 with the seqs);
// ws and uWS also serve the plain WebSocket paths /api/ws/ws/market/{zone} and
// /api/ws/ws/prices?zones=... with a connection_established frame first.

const crypto = require('node:crypto');

const ZONES = ['pjm', 'caiso', 'ercot', 'nyiso', 'miso', 'spp', 'isone'];
const MARKET_PREFIX = '/api/ws/ws/market/';
const PRICES_PATH = '/api/ws/ws/prices';
const PUBLISH_PATH = '/api/ws/ws/broadcast/price';
const CLOSE_UNKNOWN_ZONE = 1008;

// --host H --port P --publish-key K [--name value ...] -> {host, port, publishKey, ...}.
function parseArgs(argv, required = ['port', 'publish-key']) {
  const options = { host: '127.0.0.1' };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) {
      throw new Error(`usage: --name value pairs, got ${argv.slice(i).join(' ')}`);
    }
    options[argv[i].slice(2)] = argv[i + 1];
  }
  for (const name of required) {
    if (options[name] === undefined) throw new Error(`--${name} is required`);
  }
  return options;
}

function finiteNumber(value, field) {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new RangeError(`${field} must be a finite number`);
  }
  return value;
}

// Numbers accepted prices per zone and renders each once, as bench/servers/common.py's Feed:
// {"type":"price_update","market_zone","price","volume","seq","timestamp"} (~120 bytes).
class Feed {
  constructor() {
    this.seq = new Map(ZONES.map((zone) => [zone, 0]));
  }

  accept(item) {
    if (item === null || typeof item !== 'object' || Array.isArray(item)) {
      throw new RangeError('price object must be a JSON object');
    }
    const zone = item.market_zone;
    if (!this.seq.has(zone)) throw new RangeError('market_zone is unknown');
    const price = finiteNumber(item.price, 'price');
    const volume = item.volume ?? null;
    if (volume !== null && finiteNumber(volume, 'volume') < 0) {
      throw new RangeError('volume must be >= 0');
    }
    const moment = typeof item.timestamp === 'string' ? new Date(item.timestamp) : new Date();
    if (Number.isNaN(moment.getTime())) throw new RangeError('timestamp is not a date');
    const seq = this.seq.get(zone) + 1;
    this.seq.set(zone, seq);
    const message = {
      type: 'price_update', market_zone: zone, price, volume, seq,
      timestamp: moment.toISOString(),
    };
    return { zone, seq, message, text: JSON.stringify(message) };
  }

  // A publish body (already parsed) -> the accepted updates; throws RangeError on a bad one.
  acceptAll(body) {
    return (Array.isArray(body) ? body : [body]).map((item) => this.accept(item));
  }
}

// The zones a plain WebSocket request asks for; null when one is unknown or the path not ours.
function subscriptionZones(path, query) {
  let wanted;
  if (path.startsWith(MARKET_PREFIX)) {
    wanted = [path.slice(MARKET_PREFIX.length)];
  } else if (path === PRICES_PATH) {
    const listed = new URLSearchParams(query).get('zones');
    wanted = listed ? listed.split(',') : ZONES.slice();
  } else {
    return null;
  }
  return wanted.every((zone) => ZONES.includes(zone)) ? wanted : null;
}

// The contract's connection_established frame, so handshake costs stay comparable.
function welcome(zones) {
  const where = zones.length === 1 ? { market_zone: zones[0] } : { zones };
  return JSON.stringify({
    type: 'connection_established', connection_id: crypto.randomUUID(), ...where,
    storage_backend: 'in-memory', epoch: 'bench', heartbeat_interval: 30,
    message: `Connected to ${zones.join(',')} market updates`,
    timestamp: new Date().toISOString(),
  });
}

// The publish answer: [status, JSON body]. `broadcast(update)` is called once per accepted
// update, in order, before the answer (as the Python baselines do).
function publishAnswer(feed, key, authorization, raw, broadcast) {
  if (authorization !== `Bearer ${key}`) return [403, JSON.stringify({ error: 'bad publish key' })];
  let updates;
  try {
    updates = feed.acceptAll(JSON.parse(raw));
  } catch (error) {
    if (!(error instanceof SyntaxError || error instanceof RangeError)) throw error;
    return [422, JSON.stringify({ error: error.message })];
  }
  for (const update of updates) broadcast(update);
  const accepted = updates.map(({ zone, seq }) => ({ market_zone: zone, seq }));
  return [202, JSON.stringify({ accepted })];
}

// A node:http request handler for the publish endpoint (socket.io and ws peers).
function httpPublishHandler(key, broadcast) {
  const feed = new Feed();
  return (request, response) => {
    if (request.method !== 'POST' || request.url !== PUBLISH_PATH) {
      response.writeHead(404).end();
      return;
    }
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', () => {
      const raw = Buffer.concat(chunks).toString();
      const [status, body] = publishAnswer(feed, key, request.headers.authorization, raw, broadcast);
      response.writeHead(status, { 'Content-Type': 'application/json' }).end(body);
    });
  };
}

// The bench stops a server with SIGTERM: exit at once (no graceful drain is measured).
function exitOnTerm() {
  process.on('SIGTERM', () => process.exit(0));
}

module.exports = {
  CLOSE_UNKNOWN_ZONE, Feed, MARKET_PREFIX, PRICES_PATH, PUBLISH_PATH, ZONES,
  exitOnTerm, httpPublishHandler, parseArgs, publishAnswer, subscriptionZones, welcome,
};
