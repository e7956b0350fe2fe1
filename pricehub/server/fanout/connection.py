"""One subscriber as the broadcaster sees it, whatever its transport: zones, outbox,
slow-consumer state. ``socket.connection.WsConnection`` and ``sse.connection.SseConnection``
are its two implementations; they add only their framing, ping and ending.

Frames are not written one by one. A connection that is in step with its zones belongs
to an *audience* (``Audience``): every connection with the same zones and encoding, which
get byte-identical data each tick, so the broadcaster joins a tick's frames once per
audience and writes that one ``bytes`` to each member. Any other connection (its zones
being opened or resumed, conflated, or with a message of its own queued behind this
tick's broadcasts) gets frames one by one in its outbox (``deliver``, ``queue``), written
by one ``transport.write`` per tick. Either way a client gets one write per tick.

A client that does not keep up stops getting individual price updates: the connection
keeps only the newest price per zone and sends it with ``conflated: true`` once
everything written before has reached the client. That happens when either

* more than ``high_water`` bytes are unsent: in pricehub's transport buffer, or in the
  kernel's send queue (``SIOCOUTQ``, Linux), which autotunes up to megabytes and would
  otherwise hide a stalled reader for minutes; or
* the client has not received what was written ``max_lag`` seconds ago (a trickle it
  does not read: at a few KB/s no byte threshold is reached in useful time).

Above ``hard_limit`` bytes in pricehub's own buffer, or conflating for longer than
``lag_timeout``, it is closed with 4008. Memory per connection is therefore bounded
whatever the client does: at most ``hard_limit`` plus one tick's frames, and one price
per zone while conflating.

A conflated price says how many it replaces (``skipped``, from the zone's last seq
delivered before conflation began). A rate-limited zone (``pacing.PacedStream``) is not
delivered here once it is live: its ``PaceGroup`` gives it the newest price at its rate
(``pace``).
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import fcntl
import socket
import struct
import termios
import time
import uuid
from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Protocol, cast

from pricehub.server.fanout.encoding import Encoding
from pricehub.server.fanout.pacing import PacedStream
from pricehub.server.policy.resume import ZoneStream
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode, DisconnectReason

if TYPE_CHECKING:
    from pricehub.storage import StoredPrice

__all__ = [
    "DEFAULT_CLOSE_GRACE", "DEFAULT_MAX_LAG", "Connection", "DirectSocket", "FlushScheduler",
    "SendLimits", "direct_socket", "kernel_unsent", "paced_frame",
]

# Close grace of a connection whose transport does not say (``--shutdown-grace``'s default).
DEFAULT_CLOSE_GRACE = 5.0
# Prices this late are stale for a trading UI: better the newest one when it catches up.
DEFAULT_MAX_LAG = 2.0
_NO_BYTES = bytes(4)


def kernel_unsent(sock: socket.socket | None) -> int:
    """Bytes the kernel has not yet had acknowledged by the peer (0 where unknown)."""
    if sock is None or sock.fileno() < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _NO_BYTES))[0])
    except OSError:  # not Linux, or not a TCP socket: count pricehub's own buffer only
        return 0


class DirectSocket(Protocol):
    """What the shared writes read of asyncio's plain socket transport to do what its
    ``write`` does when nothing is buffered (``sock.send`` at once), without the ~40
    bytecodes of its Python body per member and tick: its buffer, whether it is closing
    (from then on the socket may be closed and its descriptor reused, so nothing is sent)
    and its socket (the object, not the descriptor: once closed, ``send`` fails with EBADF
    instead of writing to whatever reused the number). Not read: ``_eof`` and the
    sendfile waiter, as neither ``write_eof`` nor ``sendfile`` is ever used on a
    subscriber's socket (after a ``write_eof`` the send fails with EPIPE and the
    fallback, ``transport.write``, raises as it always did)."""

    _buffer: Sized
    _closing: bool
    _sock: socket.socket


_PLAIN_TRANSPORT = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)


def direct_socket(transport: asyncio.Transport) -> DirectSocket | None:
    """``transport`` as a ``DirectSocket`` if it is exactly asyncio's plain socket
    transport with the internals read (TLS, uvloop, test doubles: None, they are only
    ever written through ``transport.write``)."""
    if _PLAIN_TRANSPORT is None or type(transport) is not _PLAIN_TRANSPORT:
        return None
    internals = ("_buffer", "_closing", "_sock")
    if not all(hasattr(transport, name) for name in internals):
        return None
    return cast(DirectSocket, transport)


class Audience(Protocol):
    """What a connection reads of its audience (``fanout.broadcaster.Audience``); a
    Protocol so that this module does not import the broadcaster (no import cycle)."""

    bytes: int
    frames: int
    writes: int
    dirty: bool


class FlushScheduler(Protocol):
    """What a connection needs from the broadcaster."""

    def mark_dirty(self, connection: Connection) -> None: ...

    def detach(self, connection: Connection) -> None: ...

    def seal(self, connection: Connection) -> None: ...

    def close(self, connection: Connection, code: int, message: str, *, reason: str) -> None: ...


class SendLimits:
    """Outbound limits; one instance can be shared by every connection.

    :param high_water: unsent bytes (pricehub + kernel) above which updates are conflated
        (``--send-high-water``).
    :param hard_limit: bytes in pricehub's buffer above which the socket is closed with
        4008 (``--send-hard-limit``).
    :param lag_timeout: seconds a socket may stay conflated before 4008
        (``--slow-consumer-timeout``).
    :param max_lag: seconds after which bytes the client has still not received make it
        conflated (default ``DEFAULT_MAX_LAG``); it is checked every ``max_lag / 2``.
    """

    __slots__ = ("check_interval", "hard_limit", "high_water", "lag_timeout", "max_lag")

    def __init__(
        self,
        *,
        high_water: int,
        hard_limit: int,
        lag_timeout: float,
        max_lag: float = DEFAULT_MAX_LAG,
    ) -> None:
        self.high_water = high_water
        self.hard_limit = hard_limit
        self.lag_timeout = lag_timeout
        self.max_lag = max_lag
        self.check_interval = max_lag / 2


class Connection:
    """Per-subscriber state; all methods but ``end`` and ``pong`` are synchronous and
    never await the client. A transport implements ``send``, ``ping``, ``end`` (and may
    override ``stamp``, ``caught_up``, ``pong``, ``transport_lost``)."""

    __slots__ = (
        "_bytes", "_frames", "_writes", "audience", "audience_base", "busy", "checkpoint_at",
        "checkpoint_bytes", "close_grace", "closing", "conflated", "conflated_from",
        "conflating_since",
        "consumed_mark", "direct", "disconnect_reason", "encoding", "epoch", "id",
        "last_ping", "last_seen", "limits", "messages_received", "next_check", "opened_at",
        "outbox", "scheduler", "sock", "streams", "transport",
    )

    def __init__(
        self,
        *,
        encoding: Encoding,
        transport: asyncio.Transport,
        scheduler: FlushScheduler,
        limits: SendLimits,
        epoch: str = "",
        close_grace: float = DEFAULT_CLOSE_GRACE,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.transport = transport
        # The same transport, when the shared writes may send to its socket directly.
        self.direct = direct_socket(transport)
        self.scheduler = scheduler
        self.limits = limits
        # Audiences share bytes only among connections that frame them alike.
        self.encoding = encoding
        self.epoch = epoch  # the lineage its cursors name (SSE streams only)
        # How long its close may take before the transport is aborted (``close_socket``).
        self.close_grace = close_grace
        self.streams: dict[str, ZoneStream] = {}
        self.outbox: list[bytes] = []
        # Set by the broadcaster while this connection gets its audience's shared writes;
        # the audience's counters when it joined (its shares are counted there, once).
        self.audience: Audience | None = None
        self.audience_base = (0, 0, 0)
        # None while healthy; zone -> newest price while the client is too slow.
        self.conflated: dict[str, StoredPrice] | None = None
        # While conflating, per zone conflated: the last seq the client got before.
        self.conflated_from: dict[str, int] = {}
        self.conflating_since = 0.0
        self.closing = False
        # Set by whoever closes the socket from the server side (DisconnectReason).
        self.disconnect_reason: str | None = None
        self.opened_at = self.last_seen = self.last_ping = time.monotonic()
        # True while a session job runs (``Driver.run``): the client's frames, its pongs
        # among them, wait unread behind it, so the heartbeat reaper takes what the client
        # consumes as its sign of life instead (``consumed_since_last_look``).
        self.busy = False
        self.consumed_mark: int | None = None  # bytes_received() at the reaper's last look
        # Lag: the client had not yet received everything up to ``checkpoint_bytes``
        # (of ``bytes_written``) when last checked; it was written at ``checkpoint_at``.
        self.sock: socket.socket | None = transport.get_extra_info("socket")
        self.checkpoint_bytes = 0
        self.checkpoint_at = self.opened_at
        self.next_check = self.opened_at + limits.check_interval
        # Written outside an audience: bytes, frames (messages), transport writes.
        self._bytes = self._frames = self._writes = 0
        self.messages_received = 0

    # --- counters ---------------------------------------------------------------------

    def _shared(self) -> tuple[int, int, int]:
        """Bytes, frames and writes received through the audience since joining it."""
        audience = self.audience
        if audience is None:
            return 0, 0, 0
        base = self.audience_base
        return audience.bytes - base[0], audience.frames - base[1], audience.writes - base[2]

    @property
    def bytes_written(self) -> int:
        return self._bytes + self._shared()[0]

    @property
    def messages_sent(self) -> int:
        return self._frames + self._shared()[1]

    @property
    def writes(self) -> int:
        """Transport writes: ``messages_sent / writes`` is the coalescing factor."""
        return self._writes + self._shared()[2]

    def join(self, audience: Audience) -> None:
        self.audience = audience
        self.audience_base = (audience.bytes, audience.frames, audience.writes)

    def leave(self) -> None:
        shared_bytes, shared_frames, shared_writes = self._shared()
        self._bytes += shared_bytes
        self._frames += shared_frames
        self._writes += shared_writes
        self.audience = None

    # --- queueing ---------------------------------------------------------------------

    def send(self, payload: bytes, *, zone: str | None = None, seq: int | None = None) -> None:
        """Queue one server message for this client only; ``zone`` and ``seq`` say which
        price it delivers (``price_update``, ``initial_data``; None for the others)."""
        raise NotImplementedError

    def queue(self, frame: bytes) -> None:
        if self.closing:
            return
        audience = self.audience
        if audience is not None and audience.dirty:
            # This tick's broadcasts are still in the audience's shared write: take them
            # into the outbox first, so they keep their place before this frame.
            self.scheduler.detach(self)
        if not self.outbox:
            self.scheduler.mark_dirty(self)
        self.outbox.append(frame)

    def ping(self, now: float) -> None:
        """Queue the transport's keep-alive (the heartbeat reaper calls it)."""
        raise NotImplementedError

    def stamp(self, zone: str, seq: int, frame: bytes) -> bytes:
        """A live price's shared bytes as this connection gets them on its own (outside
        an audience); SSE adds the stream's cursor."""
        return frame

    def caught_up(self, last_seq: Mapping[str, int]) -> None:
        """Leaving an audience: every zone is at ``last_seq`` (its share went out)."""

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
            if isinstance(stream, PacedStream):
                return  # its pace group delivers it, at its rate
            previous, stream.last_seq = stream.last_seq, price.seq
            if self.conflated is not None:
                self.conflate(price, previous)
            elif not self.closing:
                self.push(price.zone, price.seq, frame)

    def conflate(self, price: StoredPrice, previous: int) -> None:
        """Keep ``price`` as the zone's newest while conflating; ``previous`` is the last
        seq of the zone the client got (counted from the first conflated one)."""
        conflated = self.conflated
        assert conflated is not None
        # Only the newest price per zone survives: a trader wants the current price,
        # not a backlog of stale ones the client cannot read anyway.
        if price.zone not in conflated:
            self.conflated_from[price.zone] = previous
        conflated[price.zone] = price

    def push(self, zone: str, seq: int, frame: bytes) -> None:
        """A live price's shared bytes into the outbox (outside an audience)."""
        if not self.outbox:
            self.scheduler.mark_dirty(self)
        self.outbox.append(self.stamp(zone, seq, frame))

    def pace(self, price: StoredPrice, frames: dict[tuple[Encoding, int], bytes]) -> bool:
        """A rate-limited zone's newest price, from its pace group (outside an audience):
        True if it was delivered (or kept while conflating). ``frames`` caches the bytes
        of one firing per (encoding, skipped), shared by every connection it reaches."""
        stream = self.streams.get(price.zone)
        if stream is None or stream.syncing or price.seq <= stream.last_seq:
            return False
        previous, stream.last_seq = stream.last_seq, price.seq
        if self.conflated is not None:
            self.conflate(price, previous)
        elif not self.closing:
            self.push(price.zone, price.seq, paced_frame(frames, self.encoding, price, previous))
        return True

    # --- writing ----------------------------------------------------------------------

    def flush(self, now: float | None = None) -> None:
        """Write the whole outbox with one write, then check the client keeps up."""
        outbox = self.outbox
        if outbox:
            self.outbox = []
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            self.write(data, len(outbox), time.monotonic() if now is None else now)

    def write(self, data: bytes, count: int, now: float) -> None:
        """One ``transport.write`` of ``count`` frames (audience members get theirs from
        the broadcaster's shared-write loop instead)."""
        transport = self.transport
        if self.closing or transport.is_closing():
            return
        data = self.encoding.wrap(data)
        transport.write(data)
        self._bytes += len(data)
        self._frames += count
        self._writes += 1
        if transport.get_write_buffer_size() or now >= self.next_check:
            self.check_backlog(now)

    def check_backlog(self, now: float) -> None:
        """After a write that left bytes waiting, or when a lag check is due: close,
        conflate, or nothing (the broadcaster's shared writes call it the same way)."""
        waiting = self.transport.get_write_buffer_size()
        if waiting > self.limits.hard_limit:
            self.scheduler.close(
                self, CloseCode.SLOW_CONSUMER, "slow consumer: send buffer full",
                reason=DisconnectReason.SLOW_CONSUMER,
            )
        elif self.conflated is None and (
            waiting > self.limits.high_water or now >= self.next_check
        ):
            self._check_lag(waiting, now)

    def _check_lag(self, waiting: int, now: float) -> None:
        """Start conflating if too much is unsent or the client lags more than ``max_lag``."""
        limits = self.limits
        self.next_check = now + limits.check_interval
        unsent = waiting + kernel_unsent(self.sock)
        written = self.bytes_written
        if unsent <= limits.high_water:
            if written - unsent >= self.checkpoint_bytes:
                # Everything written at the checkpoint has arrived: move it to now.
                self.checkpoint_bytes, self.checkpoint_at = written, now
                return
            if now - self.checkpoint_at < limits.max_lag:
                return
        self.conflated, self.conflated_from = {}, {}
        self.conflating_since = now

    def release_conflated(self, now: float) -> bool:
        """Called periodically while conflating; True when back to normal.

        Released only once the client has received every byte written so far, so a
        reader that keeps falling behind stays conflated until ``lag_timeout`` closes it.
        """
        if self.conflated is None:
            return True
        if self.closing:
            return False
        if not self.transport.get_write_buffer_size() and not kernel_unsent(self.sock):
            pending, self.conflated = self.conflated, None
            since, self.conflated_from = self.conflated_from, {}
            self.checkpoint_bytes, self.checkpoint_at = self.bytes_written, now
            for price in pending.values():
                skipped = price.seq - since.get(price.zone, price.seq - 1) - 1
                payload = messages.price_update(price.payload, skipped=skipped, conflated=True)
                self.send(payload, zone=price.zone, seq=price.seq)
            return True
        if now - self.conflating_since > self.limits.lag_timeout:
            self.scheduler.close(
                self, CloseCode.SLOW_CONSUMER, "slow consumer: lagging too long",
                reason=DisconnectReason.SLOW_CONSUMER,
            )
        return False

    # --- ending -----------------------------------------------------------------------

    async def end(self, code: int, reason: bytes) -> None:
        """End the connection as its transport does (a close frame, the last chunk);
        ``close_socket`` bounds it and frees the transport."""
        raise NotImplementedError

    async def pong(self, data: bytes) -> None:
        """Answer a protocol-level ping (transports whose clients send none never do)."""

    def transport_lost(self) -> None:
        """The peer went away (the reaper saw the transport closing). A WebSocket's
        reader notices by itself; transports without a reader (SSE) end here."""

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    # --- pacing (a session's replays and histories wait for these) ---------------------

    def unsent(self) -> int:
        """Bytes queued for this client that it has not received: the outbox,
        pricehub's transport buffer and the kernel's send queue."""
        queued = sum(map(len, self.outbox))
        return queued + self.transport.get_write_buffer_size() + kernel_unsent(self.sock)

    def bytes_received(self) -> int:
        """Bytes written so far that the client has received (acknowledged)."""
        waiting = self.transport.get_write_buffer_size() + kernel_unsent(self.sock)
        return self.bytes_written - waiting

    def consumed_since_last_look(self) -> bool:
        """True if the client has taken in bytes since the last call (the first call of a
        job only sets the mark). Taken in, not merely queued: bytes leave pricehub's
        buffer and the kernel's send queue only as the peer acknowledges them, so a
        dead peer shows no progress however much is written to it."""
        received = self.bytes_received()
        before, self.consumed_mark = self.consumed_mark, received
        return before is not None and received > before


def paced_frame(
    frames: dict[tuple[Encoding, int], bytes], encoding: Encoding, price: StoredPrice,
    previous: int,
) -> bytes:
    """``price``'s shared bytes in ``encoding`` with ``skipped`` counted from ``previous``,
    built once per (encoding, skipped) of a firing (``frames``)."""
    key = (encoding, price.seq - previous - 1)
    frame = frames.get(key)
    if frame is None:
        payload = messages.price_update(price.payload, skipped=key[1])
        frame = frames[key] = encoding.price(payload)
    return frame
