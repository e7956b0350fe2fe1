"""websockets baseline: sockets served by the ``websockets`` library, updates sent with its
``broadcast()`` (synchronous, frames the message for every connection, no backpressure).

``websockets`` answers only GET requests, so the publish endpoint lives on a second port
(``--publish-port``), served by aiohttp in the same process and event loop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from common import (
    CLOSE_UNKNOWN_ZONE,
    Registry,
    add_publish_routes,
    parse_args,
    subscription_zones,
    welcome,
)
from websockets.asyncio.server import ServerConnection, broadcast, serve

__all__ = ["serve_forever"]


async def serve_forever(*, host: str, port: int, publish_port: int, key: str) -> None:
    registry: Registry[ServerConnection] = Registry()

    async def subscriber(conn: ServerConnection) -> None:
        url = urlsplit(conn.request.path if conn.request else "")
        zones = subscription_zones(url.path, dict(parse_qsl(url.query)))
        if zones is None:
            await conn.close(CLOSE_UNKNOWN_ZONE, "unknown zone")
            return
        await conn.send(welcome(zones))
        registry.add(conn, zones)
        try:
            await conn.wait_closed()
        finally:
            registry.remove(conn, zones)

    async def fan_out(zone: str, text: str) -> None:
        broadcast(registry.by_zone[zone], text)

    app = web.Application()
    add_publish_routes(app, key=key, broadcast=fan_out)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, publish_port).start()
    # Same settings as the aiohttp servers: no compression, no server pings.
    async with serve(subscriber, host, port, compression=None, ping_interval=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    args = parse_args(__doc__ or "", publish_port=True)
    asyncio.run(
        serve_forever(
            host=args.host, port=args.port, publish_port=args.publish_port, key=args.publish_key
        )
    )
