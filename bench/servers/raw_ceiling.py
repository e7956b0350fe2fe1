"""Raw ceiling: aiohttp accepts the sockets, the broadcast bypasses it entirely.

Each update becomes one WebSocket frame (header + payload bytes, built once) and the very same
bytes object is handed to every subscriber's ``transport.write``: no per-client framing, no
await, no flow control. This is the least a Python asyncio server can do per delivery, so it
is the floor the others are measured against (it also has no protection against slow readers).
"""

from __future__ import annotations

import asyncio
import struct

from aiohttp import web
from common import Registry, aiohttp_app, parse_args, run_aiohttp

__all__ = ["build_app", "text_frame"]

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """An unmasked (server-to-client) FIN text frame, RFC 6455 section 5.2."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", _FIN_TEXT, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, size)
    return header + payload


def _transport_of(request: web.Request, _ws: web.WebSocketResponse) -> asyncio.Transport:
    transport = request.transport
    if not isinstance(transport, asyncio.Transport):
        raise ConnectionResetError("closed before it could subscribe")
    return transport


def build_app(*, key: str) -> web.Application:
    registry: Registry[asyncio.Transport] = Registry()

    async def broadcast(zone: str, text: str) -> None:
        frame = text_frame(text.encode())
        for transport in registry.by_zone[zone]:
            if not transport.is_closing():
                transport.write(frame)

    return aiohttp_app(key=key, registry=registry, pick=_transport_of, broadcast=broadcast)


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    run_aiohttp(build_app(key=args.publish_key), args)
