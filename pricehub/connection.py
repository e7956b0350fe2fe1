"""One client socket as the broadcaster sees it: zones, outbox, slow-consumer state.

Frames are not written one by one. ``queue`` appends a pre-built frame to the outbox and
marks the connection dirty; the broadcaster flushes every dirty connection once per
event-loop tick with a single ``transport.write``. A client that does not read lets its
transport buffer grow: above ``high_water`` the connection stops queueing individual
updates and keeps only the newest price per zone (sent with ``conflated: true`` once the
buffer drains); above ``hard_limit``, or conflating for longer than ``lag_timeout``, it is
closed with 4008. Memory per connection is therefore bounded whatever the client does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from pricehub import protocol
from pricehub.resume import ZoneStream

if TYPE_CHECKING:
    from aiohttp import web

    from pricehub.storage import StoredPrice

__all__ = ["CLOSE_SLOW_CONSUMER", "Connection", "FlushScheduler", "SendLimits"]

CLOSE_SLOW_CONSUMER = 4008
PING_FRAME = b"\x89\x00"


class FlushScheduler(Protocol):
    def mark_dirty(self, connection: Connection) -> None: ...

    def close(self, connection: Connection, code: int, message: str, *, reason: str) -> None: ...


class SendLimits:
    """Outbound limits shared by every connection (``--send-high-water`` etc.)."""

    __slots__ = ("hard_limit", "high_water", "lag_timeout")

    def __init__(self, *, high_water: int, hard_limit: int, lag_timeout: float) -> None:
        self.high_water = high_water
        self.hard_limit = hard_limit
        self.lag_timeout = lag_timeout


class Connection:
    """Per-socket state; all methods are synchronous and never await the client."""

    __slots__ = (
        "closing", "conflated", "conflating_since", "disconnect_reason", "id", "last_ping", "last_seen",
        "limits", "messages_received", "messages_sent", "opened_at", "outbox", "remote",
        "scheduler", "streams", "transport", "ws",
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
        self.streams: dict[str, ZoneStream] = {}
        self.outbox: list[bytes] = []
        # None while healthy; zone -> newest price while the client is too slow.
        self.conflated: dict[str, StoredPrice] | None = None
        self.conflating_since = 0.0
        self.closing = False
        # Set by whoever closes the socket from the server side (DisconnectReason).
        self.disconnect_reason: str | None = None
        self.opened_at = self.last_seen = self.last_ping = time.monotonic()
        self.messages_sent = 0
        self.messages_received = 0

    # --- queueing ---------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue one server message (payload of a text frame)."""
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
        """A live update for a subscribed zone (the fan-out hot path)."""
        stream = self.streams.get(price.zone)
        if stream is None:
            return
        if stream.syncing:
            stream.held.append(price)
        elif stream.accept(price.seq):
            if self.conflated is None:
                self.queue(frame)
            else:
                # Only the newest price per zone survives: a trader wants the current
                # price, not a backlog of stale ones the client cannot read anyway.
                self.conflated[price.zone] = price

    # --- writing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write the whole outbox with one write, then check the client keeps up."""
        if not self.outbox:
            return
        frames, self.outbox = self.outbox, []
        if self.closing or self.transport.is_closing():
            return
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        self.messages_sent += len(frames)
        self._check_backlog(time.monotonic())

    def _check_backlog(self, now: float) -> None:
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.limits.hard_limit:
            self.scheduler.close(
                self, CLOSE_SLOW_CONSUMER, "slow consumer: send buffer full", reason="slow_consumer"
            )
        elif buffered > self.limits.high_water and self.conflated is None:
            self.conflated = {}
            self.conflating_since = now

    def release_conflated(self, now: float) -> bool:
        """Called periodically while conflating; True when back to normal."""
        if self.conflated is None:
            return True
        if self.closing:
            return False
        buffered = self.transport.get_write_buffer_size()
        if buffered <= self.limits.high_water // 2:
            pending, self.conflated = self.conflated, None
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
