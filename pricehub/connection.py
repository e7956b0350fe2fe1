"""One client socket as the broadcaster sees it: zones, outbox, slow-consumer state.

Frames are not written one by one. ``queue`` appends a pre-built frame to the outbox and
marks the connection dirty; the broadcaster flushes every dirty connection once per
event-loop tick with a single ``transport.write``.

A client that does not read lets its transport buffer grow (the bytes the kernel socket
buffer could not take). The connection then stops queueing individual price updates and
keeps only the newest price per zone, sent with ``conflated: true`` once the buffer has
drained, when either

* more than ``high_water`` bytes are waiting (a burst it cannot absorb), or
* bytes have been waiting at every flush for ``stuck_after`` seconds (a trickle it does
  not read: at a few KB/s the high-water mark alone would take minutes to reach).

Above ``hard_limit`` waiting bytes, or conflating for longer than ``lag_timeout``, it is
closed with 4008. Memory per connection is therefore bounded whatever the client does:
at most ``hard_limit`` plus one tick's frames, and one price per zone while conflating.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from pricehub import protocol
from pricehub.compression import Deflater, negotiated_deflate
from pricehub.resume import ZoneStream

if TYPE_CHECKING:
    from aiohttp import web

    from pricehub.storage import StoredPrice

__all__ = [
    "CLOSE_SLOW_CONSUMER", "DEFAULT_STUCK_AFTER", "Connection", "FlushScheduler", "SendLimits",
]

CLOSE_SLOW_CONSUMER = 4008
PING_FRAME = b"\x89\x00"
# A reader whose kernel socket buffer stayed full this long is behind by at least that
# buffer (16 KiB+, i.e. many seconds of one zone's updates): stale for a trading UI.
DEFAULT_STUCK_AFTER = 2.0


class FlushScheduler(Protocol):
    """What a connection needs from the broadcaster."""

    deflater: Deflater

    def mark_dirty(self, connection: Connection) -> None: ...

    def close(self, connection: Connection, code: int, message: str, *, reason: str) -> None: ...


class SendLimits:
    """Outbound limits (``--send-high-water``, ``--send-hard-limit``,
    ``--slow-consumer-timeout``); one instance can be shared by every connection."""

    __slots__ = ("hard_limit", "high_water", "lag_timeout", "stuck_after")

    def __init__(
        self,
        *,
        high_water: int,
        hard_limit: int,
        lag_timeout: float,
        stuck_after: float = DEFAULT_STUCK_AFTER,
    ) -> None:
        self.high_water = high_water
        self.hard_limit = hard_limit
        self.lag_timeout = lag_timeout
        self.stuck_after = stuck_after


class Connection:
    """Per-socket state; all methods are synchronous and never await the client."""

    __slots__ = (
        "closing", "conflated", "conflating_since", "deflater", "disconnect_reason", "id",
        "last_ping", "last_seen", "limits", "messages_received", "messages_sent", "opened_at",
        "outbox", "remote", "scheduler", "streams", "stuck_since", "transport", "ws",
    )

    def __init__(
        self,
        *,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        remote: str,
        scheduler: FlushScheduler,
        limits: SendLimits,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.ws = ws
        self.transport = transport
        self.remote = remote
        self.scheduler = scheduler
        self.limits = limits
        # The process-wide compressor when this client negotiated permessage-deflate.
        self.deflater = scheduler.deflater if negotiated_deflate(ws) else None
        self.streams: dict[str, ZoneStream] = {}
        self.outbox: list[bytes] = []
        # None while healthy; zone -> newest price while the client is too slow.
        self.conflated: dict[str, StoredPrice] | None = None
        self.conflating_since = 0.0
        # When bytes were first seen still waiting after a flush (0.0: none waiting).
        self.stuck_since = 0.0
        self.closing = False
        # Set by whoever closes the socket from the server side (DisconnectReason).
        self.disconnect_reason: str | None = None
        self.opened_at = self.last_seen = self.last_ping = time.monotonic()
        self.messages_sent = 0
        self.messages_received = 0

    # --- queueing ---------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue one server message (payload of a text frame) for this client only."""
        deflater = self.deflater
        if deflater is not None and len(payload) >= deflater.per_connection_min:
            self.queue(deflater.frame(payload))
        else:
            self.queue(protocol.text_frame(payload))

    def queue(self, frame: bytes) -> None:
        if self.closing:
            return
        if not self.outbox:
            self.scheduler.mark_dirty(self)
        self.outbox.append(frame)

    def ping(self, now: float) -> None:
        self.last_ping = now
        self.queue(PING_FRAME)

    def deliver(self, price: StoredPrice, frame: bytes) -> None:
        """A live update for a subscribed zone (the fan-out hot path).

        Inlines ``ZoneStream.accept`` and ``queue``: this runs once per delivery.
        """
        stream = self.streams.get(price.zone)
        if stream is None:
            return
        if stream.syncing:
            stream.held.append(price)
        elif price.seq > stream.last_seq:
            stream.last_seq = price.seq
            if self.conflated is not None:
                # Only the newest price per zone survives: a trader wants the current
                # price, not a backlog of stale ones the client cannot read anyway.
                self.conflated[price.zone] = price
            elif not self.closing:
                if not self.outbox:
                    self.scheduler.mark_dirty(self)
                self.outbox.append(frame)

    # --- writing ----------------------------------------------------------------------

    def flush(self, now: float | None = None) -> None:
        """Write the whole outbox with one write, then check the client keeps up."""
        outbox = self.outbox
        if not outbox:
            return
        self.outbox = []
        transport = self.transport
        if self.closing or transport.is_closing():
            return
        transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))
        self.messages_sent += len(outbox)
        waiting = transport.get_write_buffer_size()
        if waiting:
            self._check_backlog(waiting, time.monotonic() if now is None else now)
        else:
            self.stuck_since = 0.0

    def _check_backlog(self, waiting: int, now: float) -> None:
        """Bytes the kernel could not take are waiting: conflate or close if too many."""
        limits = self.limits
        if waiting > limits.hard_limit:
            self.scheduler.close(
                self, CLOSE_SLOW_CONSUMER, "slow consumer: send buffer full", reason="slow_consumer"
            )
            return
        if not self.stuck_since:
            self.stuck_since = now
        if self.conflated is None and (
            waiting > limits.high_water or now - self.stuck_since >= limits.stuck_after
        ):
            self.conflated = {}
            self.conflating_since = now

    def release_conflated(self, now: float) -> bool:
        """Called periodically while conflating; True when back to normal.

        Released only once nothing is waiting any more (the kernel took every byte), so a
        reader that keeps falling behind stays conflated until ``lag_timeout`` closes it.
        """
        if self.conflated is None:
            return True
        if self.closing:
            return False
        if not self.transport.get_write_buffer_size():
            pending, self.conflated = self.conflated, None
            self.stuck_since = 0.0
            for price in pending.values():
                self.send(protocol.price_update(price.payload, conflated=True))
            return True
        if now - self.conflating_since > self.limits.lag_timeout:
            self.scheduler.close(
                self, CLOSE_SLOW_CONSUMER, "slow consumer: lagging too long", reason="slow_consumer"
            )
        return False

    def touch(self) -> None:
        self.last_seen = time.monotonic()
