'use strict';
// uWebSockets.js (C++): the plain contract paths, one pub/sub topic per zone, and
// `app.publish(zone, text)` per accepted update: the fan-out runs in C++ (uWS corks each
// subscriber's writes of one event-loop turn into one send). The publish endpoint is served
// by the same uWS app. uWS's defaults otherwise (no compression, 64 KiB backpressure limit,
// 120 s idle timeout with automatic pings).
//
// node uws.js --host 127.0.0.1 --port P --publish-key K

const common = require('./common');
const uWS = require('./native_uws').nativeUws();

// uWS writes the status line as given: code and reason phrase.
const STATUS_LINES = { 202: '202 Accepted', 403: '403 Forbidden', 422: '422 Unprocessable Entity' };

function publishRoute(app, key) {
  const feed = new common.Feed();
  const broadcast = ({ zone, text }) => app.publish(zone, text, false);
  return (res, req) => {
    const authorization = req.getHeader('authorization'); // req is gone once this returns
    const chunks = [];
    res.onAborted(() => { res.aborted = true; });
    res.onData((chunk, isLast) => {
      chunks.push(Buffer.from(chunk)); // uWS reuses the chunk's memory after this callback
      if (!isLast || res.aborted) return;
      const raw = Buffer.concat(chunks).toString();
      const [status, body] = common.publishAnswer(feed, key, authorization, raw, broadcast);
      res.cork(() => {
        res.writeStatus(STATUS_LINES[status]).writeHeader('Content-Type', 'application/json').end(body);
      });
    });
  };
}

function main() {
  const args = common.parseArgs(process.argv.slice(2));
  const app = uWS.App();
  app.ws('/*', {
    compression: uWS.DISABLED,
    upgrade: (res, req, context) => {
      const zones = common.subscriptionZones(req.getUrl(), req.getQuery() || '');
      res.upgrade({ zones }, req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'), req.getHeader('sec-websocket-extensions'),
        context);
    },
    open: (ws) => {
      const { zones } = ws.getUserData();
      if (zones === null) {
        ws.end(common.CLOSE_UNKNOWN_ZONE, 'unknown zone');
        return;
      }
      ws.send(common.welcome(zones), false);
      for (const zone of zones) ws.subscribe(zone);
    },
  });
  app.post(common.PUBLISH_PATH, publishRoute(app, args['publish-key']));
  common.exitOnTerm();
  app.listen(args.host, Number(args.port), (listening) => {
    if (!listening) {
      console.error(`uws: cannot listen on ${args.host}:${args.port}`);
      process.exit(1);
    }
  });
}

main();
