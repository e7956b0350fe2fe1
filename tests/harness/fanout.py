"""The smallest subscriber the broadcaster can write to: whole messages in its encoding,
no framing of its own, no ping frames, a close that only closes the transport. Used by the
fan-out tests and by bench/profile_write.py, over real asyncio transports."""

from __future__ import annotations

from pricehub.server.fanout.connection import Connection

__all__ = ["LineConnection"]


class LineConnection(Connection):
    """A ``Connection`` that queues each message as its encoding frames it."""

    __slots__ = ()

    def send(self, payload: bytes, *, zone: str | None = None, seq: int | None = None) -> None:
        self.queue(self.encoding.frame(payload))

    def ping(self, now: float) -> None:
        self.last_ping = now

    async def end(self, code: int, reason: bytes) -> None:
        self.transport.close()
