"""Naive baseline: an aiohttp broadcaster that awaits ``send_str`` for each client in turn.

The common tutorial shape: the update is serialised once, but every client costs a framing, a
write and an await, and a client whose buffer is full (aiohttp then waits for it to drain) holds
up that update for every subscriber after it, and the publish request that carries it.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from common import Registry, aiohttp_app, parse_args, run_aiohttp

__all__ = ["build_app"]


def build_app(*, key: str) -> web.Application:
    registry: Registry[web.WebSocketResponse] = Registry()

    async def broadcast(zone: str, text: str) -> None:
        for ws in list(registry.by_zone[zone]):
            # A socket closed under us is unregistered by its own handler.
            with contextlib.suppress(ConnectionError):
                await ws.send_str(text)

    return aiohttp_app(
        key=key, registry=registry, pick=lambda _request, ws: ws, broadcast=broadcast
    )


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    run_aiohttp(build_app(key=args.publish_key), args)
