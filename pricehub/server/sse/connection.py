"""One SSE stream as the broadcaster sees it: a ``Connection`` that frames as events.

Everything the fan-out does for a connection (zones, outbox, one write per tick,
audiences, conflation, the hard limit, close within a grace) holds unchanged; only the
bytes differ (``SseEvents``, the stream's encoding):

* a message is an event (``event:``/``data:`` lines, then ``id:`` with the stream's
  cursor for prices), not a text frame; a ping is a ``: ping`` comment;
* what reaches the transport is HTTP/1.1 chunked (aiohttp sent the headers with
  ``Transfer-Encoding: chunked``), one chunk per write;
* the client sends nothing, so "alive" means "reads what we write": a ping that finds
  nothing unsent (pricehub's buffer and the kernel's) counts as a sign of life, and a
  client that stops reading is closed by the heartbeat timeout like a silent socket;
* ending the stream is the terminating chunk (``end``), written once whoever asks first:
  a server-side close or the handler once the stream is over (``finished`` tells it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from aiohttp import web

from pricehub.server.fanout.connection import Connection, FlushScheduler, SendLimits, kernel_unsent
from pricehub.server.fanout.encoding import FramedEncoding, TickFrame
from pricehub.server.fanout.lag import SSE
from pricehub.wire import sse

__all__ = ["SSE", "AudienceCursor", "SseConnection", "SseEvents", "chunk"]


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 7.1) carrying ``data``."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _with_id(event_lines: bytes, cursor: bytes) -> bytes:
    return event_lines + b"id: " + cursor + b"\n\n"


class AudienceCursor:
    """An SSE audience's shared ``id:``: its members are in step, so the epoch and each
    zone's last seq are the same for all of them."""

    __slots__ = ("cursor", "epoch", "zones")

    def __init__(self, zones: frozenset[str], *, last_seq: Mapping[str, int], epoch: str) -> None:
        self.zones = zones
        self.epoch = epoch
        # Each zone's seq as of the last written tick (the next event's id builds on it).
        self.cursor = {zone: last_seq.get(zone, 0) for zone in zones}

    def share(self, pending: list[TickFrame]) -> list[bytes]:
        cursor, shared = dict(self.cursor), []
        for zone, seq, event_lines in pending:
            cursor[zone] = seq
            shared.append(_with_id(event_lines, sse.encode_cursor(self.epoch, self.zones, cursor)))
        return shared

    def commit(self, last_seq: Mapping[str, int]) -> None:
        self.cursor = {zone: last_seq.get(zone, 0) for zone in self.zones}


class SseEvents(FramedEncoding):
    """The encoding of event streams: a price's event waits for its ``id:`` line (each
    stream's or audience's cursor), and every write is a chunk."""

    __slots__ = ()

    def wrap(self, data: bytes) -> bytes:
        return chunk(data)  # HTTP/1.1 chunked framing, once per write

    def price(self, payload: bytes) -> bytes:
        return sse.event_data(payload)  # the event lines without the id

    def frame(self, payload: bytes) -> bytes:
        return sse.event(payload)

    def audience_framer(
        self, zones: frozenset[str], *, last_seq: Mapping[str, int], epoch: str
    ) -> AudienceCursor:
        return AudienceCursor(zones, last_seq=last_seq, epoch=epoch)


EVENTS = SseEvents(SSE, transport=SSE)


class SseConnection(Connection):
    """An event stream; ``cursor`` is what its last ``id:`` said, per zone."""

    __slots__ = ("_ending", "cursor", "finished", "response", "zone_order")

    def __init__(
        self,
        *,
        zones: tuple[str, ...],
        epoch: str,
        response: web.StreamResponse,
        transport: asyncio.Transport,
        scheduler: FlushScheduler,
        limits: SendLimits,
        close_grace: float,
    ) -> None:
        super().__init__(
            encoding=EVENTS, transport=transport, scheduler=scheduler, limits=limits,
            epoch=epoch, close_grace=close_grace,
        )  # fmt: skip
        self.response = response
        self.zone_order = zones
        self.cursor: dict[str, int] = {}
        # Set when the stream must end (server close, client gone): the handler stops
        # waiting and ends it.
        self.finished = asyncio.Event()
        self._ending: asyncio.Task[None] | None = None

    def _id(self) -> bytes:
        return sse.encode_cursor(self.epoch, self.zone_order, self.cursor)

    # --- queueing ---------------------------------------------------------------------

    def send(self, payload: bytes, *, zone: str | None = None, seq: int | None = None) -> None:
        """One server message as an event; a price (and the ``initial_data`` standing in
        for one) moves the cursor, so a reconnect resumes right after it."""
        if zone is None or seq is None:
            self.queue(sse.event(payload))
            return
        self.cursor[zone] = seq
        self.queue(sse.event(payload, cursor=self._id()))

    def ping(self, now: float) -> None:
        self.last_ping = now
        if not self.transport.get_write_buffer_size() and not kernel_unsent(self.sock):
            self.touch()  # everything written so far was received: the client reads
        self.queue(sse.PING)

    def stamp(self, zone: str, seq: int, frame: bytes) -> bytes:
        self.cursor[zone] = seq
        return _with_id(frame, self._id())

    def caught_up(self, last_seq: Mapping[str, int]) -> None:
        """Joining or leaving an audience: in step means at the zones' last seqs."""
        for zone in self.streams:
            self.cursor[zone] = last_seq.get(zone, 0)

    # --- ending -----------------------------------------------------------------------

    async def end(self, code: int, reason: bytes) -> None:
        """The terminating chunk, once (shielded: a caller's timeout does not cut the
        write for the other); a client that stopped reading cannot hold it past the
        close grace, and what it left unread is dropped."""
        self.finished.set()
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._write_eof())
        await asyncio.shield(self._ending)

    async def _write_eof(self) -> None:
        transport = self.transport
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(self.close_grace):
                if not transport.is_closing():
                    await self.response.write_eof()
        if transport.get_write_buffer_size():
            transport.abort()

    def transport_lost(self) -> None:
        self.finished.set()
