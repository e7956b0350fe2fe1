'use strict';
// socket.io 4.8: one room per zone, `io.to(zone).emit("price", update)` per accepted update
// (socket.io encodes the packet once per broadcast and writes it to every socket of the room).
// A client names its zones in its CONNECT packet (`40{"zones":[...]}`, socket.handshake.auth)
// and is in their rooms when it receives the server's CONNECT answer.
//
// node socketio.js --host 127.0.0.1 --port P --publish-key K [--redis-url redis://127.0.0.1:R]
//
// With --redis-url the rooms go through @socket.io/redis-streams-adapter (every broadcast is
// also XADDed to the Redis stream other nodes would read), as a multi-node deployment runs it.

const http = require('node:http');
const { Server } = require('socket.io');
const common = require('./common');

async function redisAdapter(url) {
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-streams-adapter');
  const client = createClient({ url });
  client.on('error', (error) => console.error('redis:', error.message));
  await client.connect();
  return createAdapter(client);
}

async function main() {
  const args = common.parseArgs(process.argv.slice(2));
  const adapter = args['redis-url'] ? await redisAdapter(args['redis-url']) : undefined;
  let io = null;
  const broadcast = ({ zone, message }) => io.to(zone).emit('price', message);
  const server = http.createServer(common.httpPublishHandler(args['publish-key'], broadcast));
  // socket.io's defaults (no compression, 25 s pings), WebSocket transport only: the load
  // client opens /socket.io/?EIO=4&transport=websocket directly, without long-polling first.
  io = new Server(server, { adapter, serveClient: false, transports: ['websocket'] });
  io.on('connection', (socket) => {
    const zones = socket.handshake.auth?.zones;
    if (!Array.isArray(zones) || !zones.every((zone) => common.ZONES.includes(zone))) {
      socket.disconnect(true);
      return;
    }
    socket.join(zones);
  });
  common.exitOnTerm();
  server.listen(Number(args.port), args.host);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
