"""The zone broadcaster: storage listener, subscriber registry and per-tick flusher.

Each price is serialised and framed once (``text_frame(price_update(payload))``, plus
one compressed frame when some subscriber negotiated permessage-deflate) and handed to
every subscriber of its zone in one synchronous pass: no task, queue or await per
client, so one slow or dead client never delays the others. Connections that received
frames in this event-loop tick are flushed together by one ``call_soon`` callback, so a
client subscribed to many zones gets all of a tick's updates in a single write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pricehub import protocol
from pricehub.compression import BroadcastWebSocketResponse, Deflater
from pricehub.connection import CLOSE_SLOW_CONSUMER, Connection
from pricehub.storage import StoredPrice

__all__ = ["DEFAULT_CLOSE_GRACE", "Broadcaster", "close_socket"]

# Close grace for sockets whose response does not say (``--shutdown-grace``'s default).
DEFAULT_CLOSE_GRACE = 5.0
FLUSH_POLL = 0.05  # seconds between checks that a closing socket's buffer has drained


def _ignore(_seconds: float) -> None:
    return None


class Broadcaster:
    """Implements ``StorageListener``; owns the set of open connections.

    :param zones: the configured zones (a subscriber set each).
    :param deflater: the shared permessage-deflate compressor (default: a new one).
    :param flush_delay: seconds to wait after the first frame of a batch before writing
        it (default 0: the end of the current event-loop tick). A few milliseconds let
        updates that arrive in separate ticks share one write per client.
    """

    def __init__(
        self, *, zones: tuple[str, ...], deflater: Deflater | None = None, flush_delay: float = 0.0
    ) -> None:
        self.flush_delay = flush_delay
        self.connections: dict[Connection, None] = {}
        # Every subscriber of a zone, and the subset that gets compressed frames.
        self.subscribers: dict[str, dict[Connection, None]] = {zone: {} for zone in zones}
        self._deflate_subscribers: dict[str, dict[Connection, None]] = {z: {} for z in zones}
        self.deflater = deflater or Deflater()
        self.conflation_events = 0
        self.slow_consumer_closes = 0
        self.updates_broadcast = 0
        # Called once per flushed tick with the seconds from the oldest price received
        # in that tick to its write (the metrics module installs a histogram here).
        self.observe_latency: Callable[[float], None] = _ignore
        self._tick_started: float | None = None
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._conflating: dict[Connection, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- registry ---------------------------------------------------------------------

    def add(self, connection: Connection) -> None:
        self.connections[connection] = None

    def remove(self, connection: Connection) -> None:
        self.connections.pop(connection, None)
        self._conflating.pop(connection, None)
        for zone in connection.streams:
            self.subscribers[zone].pop(connection, None)
            self._deflate_subscribers[zone].pop(connection, None)
        connection.streams.clear()

    def subscribe(self, zone: str, connection: Connection) -> None:
        self.subscribers[zone][connection] = None
        if connection.deflater is not None:
            self._deflate_subscribers[zone][connection] = None

    def unsubscribe(self, zone: str, connection: Connection) -> None:
        self.subscribers[zone].pop(connection, None)
        self._deflate_subscribers[zone].pop(connection, None)
        connection.streams.pop(zone, None)
        if connection.conflated is not None:
            connection.conflated.pop(zone, None)

    def connections_by_zone(self) -> dict[str, int]:
        return {zone: len(subs) for zone, subs in self.subscribers.items() if subs}

    # --- StorageListener --------------------------------------------------------------

    def on_price(self, price: StoredPrice) -> None:
        subscribers = self.subscribers.get(price.zone)
        self.updates_broadcast += 1
        if not subscribers:
            return
        if self._tick_started is None:
            self._tick_started = time.monotonic()
        payload = protocol.price_update(price.payload)
        frame = protocol.text_frame(payload)
        deflating = self._deflate_subscribers[price.zone]
        if not deflating:
            for connection in subscribers:
                connection.deliver(price, frame)
            return
        deflated = self.deflater.frame(payload)
        for connection in subscribers:
            connection.deliver(price, deflated if connection in deflating else frame)

    def on_backend_changed(self, backend: str) -> None:
        self.send_all(protocol.storage_backend_changed(backend, now=protocol.utc_now()))

    def send_all(self, payload: bytes) -> None:
        frame = protocol.text_frame(payload)
        for connection in self.connections:
            connection.queue(frame)

    # --- FlushScheduler ---------------------------------------------------------------

    def mark_dirty(self, connection: Connection) -> None:
        self._dirty.append(connection)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.flush_delay > 0:
                asyncio.get_running_loop().call_later(self.flush_delay, self.flush)
            else:
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        now = time.monotonic()
        conflating = self._conflating
        for connection in dirty:
            connection.flush(now)
            if connection.conflated is not None and connection not in conflating:
                conflating[connection] = None
                self.conflation_events += 1
        if self._tick_started is not None:
            self.observe_latency(time.monotonic() - self._tick_started)
            self._tick_started = None

    def close(self, connection: Connection, code: int, message: str, *, reason: str) -> None:
        """Close a connection from synchronous code; ``reason`` is a DisconnectReason."""
        if connection.closing:
            return
        connection.flush()  # queued messages precede the close frame
        connection.closing = True
        connection.disconnect_reason = reason
        if code == CLOSE_SLOW_CONSUMER:
            self.slow_consumer_closes += 1
        ws = connection.ws
        grace = (
            ws.close_timeout if isinstance(ws, BroadcastWebSocketResponse) else DEFAULT_CLOSE_GRACE
        )
        self.spawn(close_socket(connection, code, message, grace=grace))

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- background -------------------------------------------------------------------

    def release_conflated(self) -> None:
        """Send conflated prices to clients that drained; close the ones lagging too long."""
        now = time.monotonic()
        for connection in list(self._conflating):
            if connection.release_conflated(now) or connection.closing:
                del self._conflating[connection]

    async def run_conflation_monitor(self, *, interval: float = 0.05) -> None:
        while True:
            await asyncio.sleep(interval)
            self.release_conflated()

    async def drain(self) -> None:
        """Wait for the close tasks started by ``close`` (shutdown)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def close_socket(connection: Connection, code: int, message: str, *, grace: float) -> None:
    """The close handshake, then free the socket even if the client never reads.

    ``grace`` is the socket's close timeout (``--shutdown-grace``), so shutdown, which
    closes every socket this way, ends within it too.

    aiohttp's ``close`` may return as soon as the close frame is queued, and a closed
    transport keeps its unsent bytes until the client reads them: for a client that
    stopped reading, forever. So the buffer gets ``grace`` seconds to drain (the close
    frame is behind it; a client that reads again in time sees the close code), then
    the transport is aborted, which frees it. ``drain=False``: aiohttp's drain would wait
    for that client without a deadline.
    """
    transport = connection.transport
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await connection.ws.close(code=code, message=message.encode()[:123], drain=False)
                # asyncio has no event for "transport drained" once it is closing.
                while transport.get_write_buffer_size():  # noqa: ASYNC110
                    await asyncio.sleep(FLUSH_POLL)
    finally:
        if transport.get_write_buffer_size():
            transport.abort()
