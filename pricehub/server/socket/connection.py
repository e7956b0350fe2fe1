"""One WebSocket as the broadcaster sees it: a ``Connection`` that frames text frames.

Its two encodings (``PLAIN``, ``DEFLATED``) are registered with the broadcaster by the
handler (``WsEncodings``): a client that negotiated permessage-deflate gets the frames
the process-wide compressor made once for every such client (``compression.py``), the
others plain text frames. Everything else (audiences, conflation, limits) is the
transport-neutral ``fanout.connection.Connection``.
"""

from __future__ import annotations

import asyncio

from pricehub.server.fanout.connection import Connection, FlushScheduler, SendLimits
from pricehub.server.fanout.encoding import Encoding, FramedEncoding
from pricehub.server.fanout.lag import WS
from pricehub.server.socket.compression import BroadcastWebSocketResponse, Deflater
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode, ErrorCode

__all__ = [
    "DEFLATE", "PING_FRAME", "PLAIN", "DeflatedFrames", "PlainFrames", "SendLimits",
    "WsConnection", "WsEncodings",
]

# ``SendLimits`` is re-exported for ``server.keys``, which names it from here.
PING_FRAME = b"\x89\x00"
PLAIN = "ws"  # ``Encoding.name`` of plain text frames
DEFLATE = "ws+deflate"  # ... and of permessage-deflate frames


class PlainFrames(FramedEncoding):
    """Encoding of clients without permessage-deflate: text frames."""

    __slots__ = ()

    def frame(self, payload: bytes) -> bytes:
        return messages.text_frame(payload)

    def one(self, payload: bytes) -> bytes:
        """A message for one client (``WsConnection.send``)."""
        return self.frame(payload)


class DeflatedFrames(PlainFrames):
    """Encoding of permessage-deflate clients: each message compressed once, for all."""

    __slots__ = ("deflater",)

    def __init__(self, deflater: Deflater) -> None:
        super().__init__(DEFLATE, transport=WS)
        self.deflater = deflater

    def frame(self, payload: bytes) -> bytes:
        return self.deflater.frame(payload)

    def one(self, payload: bytes) -> bytes:
        """Below ``per_connection_min`` a deflate per client costs more than it saves."""
        if len(payload) >= self.deflater.per_connection_min:
            return self.deflater.frame(payload)
        return messages.text_frame(payload)


class WsEncodings:
    """The WebSocket's two encodings, sharing one process-wide compressor."""

    __slots__ = ("deflated", "plain")

    def __init__(self, deflater: Deflater | None = None) -> None:
        self.plain = PlainFrames(PLAIN, transport=WS)
        self.deflated = DeflatedFrames(deflater or Deflater())

    def all(self) -> tuple[Encoding, Encoding]:
        """What the handler registers with the broadcaster."""
        return self.plain, self.deflated


class WsConnection(Connection):
    """One client WebSocket; ``ws`` is its aiohttp response."""

    __slots__ = ("coder", "deflater", "ws")

    def __init__(
        self,
        *,
        ws: BroadcastWebSocketResponse,
        encodings: WsEncodings,
        transport: asyncio.Transport,
        scheduler: FlushScheduler,
        limits: SendLimits,
    ) -> None:
        coder = encodings.deflated if ws.deflate else encodings.plain
        super().__init__(
            encoding=coder, transport=transport, scheduler=scheduler, limits=limits,
            close_grace=ws.close_timeout,
        )  # fmt: skip
        self.coder: PlainFrames = coder
        self.ws = ws
        # The process-wide compressor when this client negotiated permessage-deflate.
        self.deflater = encodings.deflated.deflater if ws.deflate else None
        ws.before_close = self._sealed_by_close

    def _sealed_by_close(self, code: int) -> None:
        if code == CloseCode.MESSAGE_TOO_BIG and not self.closing:
            # aiohttp closes an oversized frame's socket itself (1009); the contract's
            # error code still goes out first, so the client learns why.
            self.send(
                messages.error(
                    ErrorCode.MESSAGE_TOO_LARGE, "frame larger than the limit",
                    now=messages.utc_now(),
                )
            )
        self.scheduler.seal(self)

    def send(self, payload: bytes, *, zone: str | None = None, seq: int | None = None) -> None:
        self.queue(self.coder.one(payload))

    def ping(self, now: float) -> None:
        self.last_ping = now
        self.queue(PING_FRAME)

    async def pong(self, data: bytes) -> None:
        await self.ws.pong(data)

    async def end(self, code: int, reason: bytes) -> None:
        """Send the close handshake (``close_socket`` bounds it and frees the socket)."""
        await self.ws.close(code=code, message=reason, drain=False)
