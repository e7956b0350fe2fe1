'use strict';
// Node `ws` 8: the library's WebSocketServer on a node:http server, and the broadcast loop
// its README shows: for each subscriber of the zone, `send` if the socket is open. The frame
// text is encoded once per update (a Buffer sent as a text frame), as every server here does.
//
// node ws.js --host 127.0.0.1 --port P --publish-key K

const http = require('node:http');
const { WebSocket, WebSocketServer } = require('ws');
const common = require('./common');

function main() {
  const args = common.parseArgs(process.argv.slice(2));
  const byZone = new Map(common.ZONES.map((zone) => [zone, new Set()]));

  const broadcast = ({ zone, text }) => {
    const data = Buffer.from(text);
    for (const socket of byZone.get(zone)) {
      if (socket.readyState === WebSocket.OPEN) socket.send(data, { binary: false });
    }
  };
  const server = http.createServer(common.httpPublishHandler(args['publish-key'], broadcast));
  // No compression (ws's server default too), as every server in the bench.
  const wss = new WebSocketServer({ server, perMessageDeflate: false });
  wss.on('connection', (socket, request) => {
    const url = new URL(request.url, 'http://bench');
    const zones = common.subscriptionZones(url.pathname, url.search);
    if (zones === null) {
      socket.close(common.CLOSE_UNKNOWN_ZONE, 'unknown zone');
      return;
    }
    socket.send(common.welcome(zones));
    for (const zone of zones) byZone.get(zone).add(socket);
    socket.on('close', () => {
      for (const zone of zones) byZone.get(zone).delete(socket);
    });
  });
  common.exitOnTerm();
  server.listen(Number(args.port), args.host);
}

main();
