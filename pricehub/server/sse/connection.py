"""One SSE stream as the broadcaster sees it: a ``Connection`` that frames as events.

Everything a WebSocket connection does (zones, outbox, one write per tick, audiences,
conflation, the hard limit, close within a grace) holds unchanged; only the bytes
differ:

* a message is an event (``event:``/``data:`` lines, then ``id:`` with the stream's
  cursor for prices), not a text frame; a ping is a ``: ping`` comment;
* what reaches the transport is HTTP/1.1 chunked (aiohttp sent the headers with
  ``Transfer-Encoding: chunked``), one chunk per write;
* the client sends nothing, so "alive" means "reads what we write": a ping that finds
  nothing unsent (pricehub's buffer and the kernel's) counts as a sign of life, and a
  client that stops reading is closed by the heartbeat timeout like a silent socket;
* ending the stream is the terminating chunk, written by the handler that owns the
  response (``end`` asks it to, ``finished`` tells it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from pricehub.server.socket.connection import Connection, kernel_unsent
from pricehub.wire import sse

if TYPE_CHECKING:
    from pricehub.storage import StoredPrice

__all__ = ["SSE", "SseConnection", "chunk"]

SSE = "sse"  # ``Connection.encoding`` of an event stream
_PRICE = b"price_update"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 7.1) carrying ``data``."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class SseConnection(Connection):
    """An event stream; ``cursor`` is what its last ``id:`` said, per zone."""

    __slots__ = ("cursor", "ended", "finished", "zone_order")

    def __init__(self, *, zones: tuple[str, ...], epoch: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.encoding = SSE
        self.epoch = epoch
        self.zone_order = zones
        self.cursor: dict[str, int] = {}
        # Set when the stream must end (server close, client gone); the handler then
        # writes the terminating chunk and sets ``ended``.
        self.finished = asyncio.Event()
        self.ended = asyncio.Event()

    def _id(self) -> bytes:
        return sse.encode_cursor(self.epoch, self.zone_order, self.cursor)

    # --- queueing ---------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """One server message as an event; prices (and the ``initial_data`` standing in
        for them) move the cursor, so a reconnect resumes right after them."""
        kind = sse.message_type(payload)
        if kind not in sse.CURSOR_TYPES:
            self.queue(sse.event(payload))
            return
        price = orjson.loads(payload)
        if kind != _PRICE:
            price = price["latest_price"]
        self.cursor[price["market_zone"]] = price["seq"]
        self.queue(sse.event(payload, cursor=self._id()))

    def ping(self, now: float) -> None:
        self.last_ping = now
        if not self.transport.get_write_buffer_size() and not kernel_unsent(self.sock):
            self.touch()  # everything written so far was received: the client reads
        self.queue(sse.PING)

    def deliver(self, price: StoredPrice, frame: bytes) -> None:
        """A live update; ``frame`` is the update's shared event lines (no id)."""
        stream = self.streams.get(price.zone)
        if stream is None:
            return
        if stream.syncing:
            stream.held.append(price)
        elif stream.accept(price.seq):
            if self.conflated is not None:
                self.conflated[price.zone] = price
            elif not self.closing:
                self.cursor[price.zone] = price.seq
                self.queue(frame + b"id: " + self._id() + b"\n\n")

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes, count: int, now: float) -> None:
        super().write(chunk(data), count, now)

    def join_cursor(self, last_seq: dict[str, int]) -> None:
        """Joining or leaving an audience: in step means at the zones' last seqs."""
        for zone in self.streams:
            self.cursor[zone] = last_seq.get(zone, 0)

    # --- ending -----------------------------------------------------------------------

    async def end(self, code: int, reason: bytes) -> None:
        self.finished.set()
        await self.ended.wait()

    def transport_lost(self) -> None:
        self.finished.set()
