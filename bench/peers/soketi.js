'use strict';
// soketi 1.6 (Pusher protocol 7 on uWebSockets.js), one app, its defaults otherwise: clients
// subscribe to one public channel per zone, the bench publishes through soketi's own Pusher
// HTTP API (POST /apps/<id>/events or /batch_events, signed with the app secret).
//
// node soketi.js --host 127.0.0.1 --port P --app-id I --app-key K --app-secret S
//                --metrics-port M --discovery-port D
//
// Everything stays on 127.0.0.1: soketi always starts node-discover, which by default binds
// UDP 0.0.0.0:11002 and broadcasts a hello to 255.255.255.255 every 0.5 s. Here it binds
// 127.0.0.1 on the given port and runs in client mode (it listens, never says hello); its
// unicast destination is 127.0.0.1 should anything be sent. The /usage (metrics) server,
// which soketi also always starts, listens on 127.0.0.1 too; Prometheus metrics stay off.

const common = require('./common');
require('./native_uws').nativeUws(); // soketi's own require('uWebSockets.js') gets this one
const { Server } = require('@soketi/soketi');

function options(args) {
  return {
    host: args.host,
    port: Number(args.port),
    'appManager.array.apps.0.id': args['app-id'],
    'appManager.array.apps.0.key': args['app-key'],
    'appManager.array.apps.0.secret': args['app-secret'],
    'metrics.enabled': false,
    'metrics.host': args.host,
    'metrics.port': Number(args['metrics-port']),
    'cluster.address': args.host,
    'cluster.port': Number(args['discovery-port']),
    'cluster.client': true,
    'cluster.unicast': args.host,
  };
}

function main() {
  const required = ['port', 'app-id', 'app-key', 'app-secret', 'metrics-port', 'discovery-port'];
  const args = common.parseArgs(process.argv.slice(2), required);
  common.exitOnTerm();
  new Server(options(args)).start();
}

main();
