"""Naive baseline: an aiohttp broadcaster that awaits ``send_str`` for each client in turn.

This is the shape most tutorials (and pricehub's seed) use: the update is serialised once, but
every client costs a framing, a write and an await, and one client whose buffer is full stalls
the loop for everybody behind it.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from common import Registry, add_publish_routes, add_subscribe_routes, parse_args, run_aiohttp

__all__ = ["build_app"]


def build_app(*, key: str) -> web.Application:
    registry: Registry[web.WebSocketResponse] = Registry()

    async def broadcast(zone: str, text: str) -> None:
        for ws in list(registry.by_zone[zone]):
            # A socket closed under us is unregistered by its own handler.
            with contextlib.suppress(ConnectionError):
                await ws.send_str(text)

    app = web.Application()
    add_subscribe_routes(app, registry, lambda _request, ws: ws)
    add_publish_routes(app, key=key, broadcast=broadcast)
    return app


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    run_aiohttp(build_app(key=args.publish_key), args)
