"""The zone broadcaster: storage listener, subscriber registry and per-tick flusher.

Each price is serialised once (``price_update(payload)``) and framed once per encoding
present among the zone's subscribers (``encoding.py``: a text frame, a compressed frame,
an SSE event; the broadcaster never learns which transport framed it). Nothing is
awaited and no task or queue exists per client, so one slow or dead client never delays
the others. One ``call_soon`` callback per event-loop tick then writes what the tick
produced, one ``transport.write`` per client:

* connections in step with their zones are grouped in *audiences* (same zones, same
  encoding): the tick's frames for those zones are joined once per audience and the same
  ``bytes`` is written to every member (the per-delivery cost of a raw broadcast);
* the others (opening or resuming a zone, conflated, or with a message of their own
  queued behind this tick's broadcasts) get each frame in their own outbox.

A connection moves to its audience at the end of a flush once every zone of it is in
step: not syncing, and its last ``seq`` equal to the last one broadcast, so shared frames
can never repeat or skip a ``seq`` for it. It leaves (``detach``) whenever that stops
being true; the tick's shared frames it has not been written yet go to its outbox then,
in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any, cast

from pricehub.server.fanout.connection import Connection
from pricehub.server.fanout.encoding import AudienceFramer, Encoding, TickFrame
from pricehub.server.fanout.lag import TRANSPORTS, LagHistogram
from pricehub.storage import StoredPrice
from pricehub.wire import messages, sse
from pricehub.wire.codes import CloseCode, DisconnectReason, GapReason

__all__ = ["Audience", "Broadcaster", "close_socket"]

FLUSH_POLL = 0.05  # seconds between checks that a closing socket's buffer has drained


def _ignore(_seconds: float) -> None:
    return None


def _never_stale(_zone: str) -> bytes | None:
    return None


class Audience:
    """Connections with the same zones and encoding: byte-identical data every tick.

    What the encoding keeps per audience (SSE: the ``id:`` cursor every member shares)
    is its ``framer``.
    """

    __slots__ = (
        "bytes", "dirty", "encoding", "framer", "frames", "members", "pending", "writes",
        "zones",
    )

    def __init__(
        self, zones: frozenset[str], *, encoding: Encoding, last_seq: dict[str, int], epoch: str
    ) -> None:
        self.zones = zones
        self.encoding = encoding
        self.framer: AudienceFramer = encoding.audience_framer(
            zones, last_seq=last_seq, epoch=epoch
        )
        self.members: dict[Connection, None] = {}
        self.dirty = False  # some of this tick's frames are for it and not yet written
        # This tick's frames of its zones, appended as prices arrive: a flush costs each
        # audience its own frames, not a scan of the whole tick (200 audiences x a
        # 20,000-price burst was 4 million membership tests).
        self.pending: list[TickFrame] = []
        # What each member got while in it: counted here once per tick, not per member.
        self.bytes = self.frames = self.writes = 0

    def share(self) -> list[bytes]:
        """Its share of the tick, in the order the prices were accepted (pure: the
        framer moves on and ``pending`` empties in ``commit``, once per tick, however
        many members take a share)."""
        return self.framer.share(self.pending)

    def commit(self, last_seq: dict[str, int]) -> None:
        """After the tick's shared write: every zone is at its last seq."""
        self.pending = []
        self.framer.commit(last_seq)


class _TickLag:
    """One flush's view of the tick's first price per zone, each ``accepted_at`` parsed
    once, when a write first needs it (not per audience)."""

    __slots__ = ("_seconds", "firsts")

    def __init__(self, firsts: dict[str, bytes]) -> None:
        self.firsts = firsts
        self._seconds: dict[str, float | None] = {}

    def accepted(self, zone: str) -> float | None:
        seconds = self._seconds
        if zone not in seconds:
            seconds[zone] = messages.accepted_seconds(self.firsts[zone])
        return seconds[zone]


class Broadcaster:
    """Implements ``StorageListener``; owns the set of open connections.

    :param zones: the configured zones. Per-zone state is created lazily, only for zones
        with subscribers (and a last seq for zones with prices), so 100,000 configured
        zones cost nothing at start and a connection costs the same whatever their number.
    :param flush_delay: seconds to wait after the first frame of a batch before writing
        it (default 0: the end of the current event-loop tick). A few milliseconds let
        updates that arrive in separate ticks share one write per client.
    """

    def __init__(self, *, zones: Collection[str], flush_delay: float = 0.0) -> None:
        self.flush_delay = flush_delay
        self.zones = frozenset(zones)
        self.connections: dict[Connection, None] = {}
        # Every subscriber of a zone; those outside an audience; the zone's audiences.
        # Only zones with subscribers have entries (removed with their last subscriber).
        self.subscribers: dict[str, dict[Connection, None]] = {}
        self._individual: dict[str, dict[Connection, None]] = {}
        self._audiences_of: dict[str, dict[Audience, None]] = {}
        self._audiences: dict[tuple[frozenset[str], str], Audience] = {}
        # Zones that had a price (bounded by the configured zones): a new subscriber is
        # in step once it has seen this seq.
        self._last_seq: dict[str, int] = {}
        # Per zone with subscribers, how many use each encoding: a price is framed for
        # these encodings only (an encoding with none left has no entry).
        self._encodings_of: dict[str, dict[Encoding, int]] = {}
        # What the transports registered (``register``), by name.
        self.encodings: dict[str, Encoding] = {}
        self.conflation_events = 0
        self.slow_consumer_closes = 0
        self.updates_broadcast = 0
        # Called once per flushed tick with the seconds from the oldest price received
        # in that tick to its write (the metrics module installs a histogram here).
        self.observe_latency: Callable[[float], None] = _ignore
        self._tick_started: float | None = None
        # accepted_at -> shared write, per transport (``lag.py`` says what is observed).
        self.delivery_lag = {transport: LagHistogram() for transport in TRANSPORTS}
        # The tick's first price of each zone that went to an audience (its oldest in
        # every audience's share of the tick): the zone's lag is measured on it.
        self._tick_first: dict[str, bytes] = {}
        self._dirty_audiences: list[Audience] = []
        self._dirty: list[Connection] = []
        self._candidates: dict[Connection, None] = {}
        # Members that fell behind or were closed during the shared writes: they leave
        # their audience once the loop over it is done.
        self._leaving: list[Connection] | None = None
        self._flush_scheduled = False
        self._conflating: dict[Connection, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Installed by ``staleness.Staleness`` with --stale-after: a zone's zone_status
        # stale message while it is stale (sessions opening it send it), and the list.
        self.zone_status: Callable[[str], bytes | None] = _never_stale
        self.stale_zones: Callable[[], list[str]] = list

    # --- registry ---------------------------------------------------------------------

    def register(self, *encodings: Encoding) -> None:
        """A transport's encodings (once, at start); a connection must use one of them."""
        for encoding in encodings:
            known = self.encodings.setdefault(encoding.name, encoding)
            if known is not encoding:
                raise ValueError(f"another encoding is registered as {encoding.name!r}")

    def add(self, connection: Connection) -> None:
        if self.encodings.get(connection.encoding.name) is not connection.encoding:
            raise ValueError(f"encoding {connection.encoding.name!r} is not registered")
        self.connections[connection] = None

    def remove(self, connection: Connection) -> None:
        self._leave_audience(connection)
        self.connections.pop(connection, None)
        self._conflating.pop(connection, None)
        self._candidates.pop(connection, None)
        for zone in connection.streams:
            self._drop_subscriber(zone, connection)
        connection.streams.clear()

    def subscribe(self, zone: str, connection: Connection) -> None:
        self.detach(connection)
        subscribers = self.subscribers.get(zone)
        if subscribers is None:
            subscribers = self.subscribers[zone] = {}
            self._individual[zone] = {}
        if connection not in subscribers:
            subscribers[connection] = None
            counts = self._encodings_of.setdefault(zone, {})
            counts[connection.encoding] = counts.get(connection.encoding, 0) + 1
        self._individual[zone][connection] = None
        self._candidates[connection] = None

    def unsubscribe(self, zone: str, connection: Connection) -> None:
        self.detach(connection)
        self._drop_subscriber(zone, connection)
        connection.streams.pop(zone, None)
        if connection.conflated is not None:
            connection.conflated.pop(zone, None)

    def _drop_subscriber(self, zone: str, connection: Connection) -> None:
        subscribers = self.subscribers.get(zone)
        if subscribers is None or connection not in subscribers:
            return
        del subscribers[connection]
        self._individual[zone].pop(connection, None)
        counts = self._encodings_of[zone]
        counts[connection.encoding] -= 1
        if not counts[connection.encoding]:
            del counts[connection.encoding]
        if not subscribers:  # the zone's last subscriber: no state left for it
            del self.subscribers[zone], self._individual[zone], self._encodings_of[zone]

    def connections_by_transport(self) -> dict[str, int]:
        """Open connections per transport (``ws``, ``sse``), both always present."""
        counts = dict.fromkeys(TRANSPORTS, 0)
        for connection in self.connections:
            counts[connection.encoding.transport] += 1
        return counts

    def connections_by_zone(self) -> dict[str, int]:
        return {zone: len(subs) for zone, subs in self.subscribers.items() if subs}

    # --- audiences --------------------------------------------------------------------

    def detach(self, connection: Connection) -> None:
        """Take a connection out of its audience; it gets frames one by one from now on,
        starting with this tick's shared frames it has not been written yet."""
        # The connection knows its audience through a Protocol (no import cycle); this
        # broadcaster only ever gives it one of its own ``Audience`` objects.
        audience = cast("Audience | None", connection.audience)
        if audience is None:
            return
        self._leave_audience(connection)
        pending = audience.share() if audience.dirty else []
        if pending and not connection.outbox:
            self.mark_dirty(connection)
        connection.outbox.extend(pending)
        for zone in audience.zones:
            # Shared writes do not touch the streams: everything up to the zone's last
            # broadcast seq has now been written or queued.
            connection.streams[zone].last_seq = self._last_seq.get(zone, 0)
            self._individual[zone][connection] = None
        connection.caught_up(self._last_seq)  # its pending share ends there too
        self._candidates[connection] = None

    def _leave_audience(self, connection: Connection) -> None:
        # The connection knows its audience through a Protocol (no import cycle); this
        # broadcaster only ever gives it one of its own ``Audience`` objects.
        audience = cast("Audience | None", connection.audience)
        if audience is None:
            return
        connection.leave()
        del audience.members[connection]
        if not audience.members:
            del self._audiences[audience.zones, audience.encoding.name]
            for zone in audience.zones:
                of_zone = self._audiences_of[zone]
                del of_zone[audience]
                if not of_zone:
                    del self._audiences_of[zone]

    def offer(self, connection: Connection) -> None:
        """A connection that may have just come in step (its zones opened, with nothing
        to send): try it at the next flush, which nothing else would schedule."""
        if connection.audience is None and not connection.closing:
            self._candidates[connection] = None
            self._schedule_flush()

    def _join_audience(self, connection: Connection) -> bool:
        """Move a connection into its audience if every zone of it is in step; never
        while a session job runs (``busy``: its zones are still being opened, and
        joining after each one was O(zones) per zone; ``offer`` retries at its end)."""
        if (
            connection.busy or connection.closing or connection.conflated is not None
            or connection.outbox
        ):
            return False
        streams = connection.streams
        if not streams:
            return False
        last_seq = self._last_seq
        for zone, stream in streams.items():
            if stream.syncing or stream.last_seq != last_seq.get(zone, 0):
                return False
        encoding = connection.encoding
        key = (frozenset(streams), encoding.name)
        audience = self._audiences.get(key)
        if audience is None:
            audience = self._audiences[key] = Audience(
                key[0], encoding=encoding, last_seq=last_seq, epoch=connection.epoch
            )
            for zone in audience.zones:
                self._audiences_of.setdefault(zone, {})[audience] = None
        audience.members[connection] = None
        connection.join(audience)
        for zone in streams:
            del self._individual[zone][connection]
        return True

    # --- StorageListener --------------------------------------------------------------

    def on_price(self, price: StoredPrice) -> None:
        zone = price.zone
        self.updates_broadcast += 1
        if zone not in self.zones:
            return
        # Audience members are in step with the zone's last seq, so an older or repeated
        # one is for nobody among them (individual streams check for themselves).
        last = self._last_seq.get(zone, 0)
        audiences = self._audiences_of.get(zone) if price.seq > last else None
        if price.seq > last:
            self._last_seq[zone] = price.seq
        individual = self._individual.get(zone)
        if not audiences and not individual:
            return
        if self._tick_started is None:
            self._tick_started = time.monotonic()
        payload = messages.price_update(price.payload)
        # Once per encoding its subscribers use (every subscriber is counted there).
        framed = {encoding: encoding.price(payload) for encoding in self._encodings_of[zone]}
        if audiences:
            if zone not in self._tick_first:
                self._tick_first[zone] = price.payload
            seq = price.seq
            for audience in audiences:
                audience.pending.append((zone, seq, framed[audience.encoding]))
                if not audience.dirty:
                    audience.dirty = True
                    self._dirty_audiences.append(audience)
            self._schedule_flush()
        for connection in individual or ():
            connection.deliver(price, framed[connection.encoding])

    def on_backend_changed(self, backend: str) -> None:
        self.send_all(messages.storage_backend_changed(backend, now=messages.utc_now()))

    def on_epoch_changed(self, epoch: str) -> None:
        """Numbering diverged across instances during an outage, so a connected client may
        have missed prices it was never told about. Only a reconnect can tell it: it
        resumes with its old epoch, gets ``recovered: false`` plus ``initial_data``, and
        learns the new epoch from ``connection_established`` (1001: reconnect, resume)."""
        for connection in list(self.connections):
            self.close(
                connection, CloseCode.GOING_AWAY,
                f"seq lineage changed to {epoch}; reconnect and resume",
                reason=DisconnectReason.EPOCH_CHANGED,
            )

    def on_gap(self, zone: str, from_seq: int, to_seq: int) -> None:
        """Seqs the storage knows no subscriber will get (a hole Redis could not fill):
        a ``gap`` ``lost`` to each, before the zone's next update. Zones being opened get
        it too: their replay cannot cross the hole either."""
        self.send_zone(zone, messages.gap(
            zone, from_seq=from_seq, to_seq=to_seq, reason=GapReason.LOST,
            now=messages.utc_now(),
        ), syncing=True)

    def send_zone(self, zone: str, payload: bytes, *, syncing: bool = False) -> None:
        """A message about ``zone`` (not a price) to its subscribers, framed once per
        encoding and queued behind what they have (their share of this tick included),
        so it reaches each before the zone's next update. Streams still opening the zone
        are left out unless ``syncing``: their session tells them when it ends."""
        subscribers = self.subscribers.get(zone)
        if not subscribers:
            return
        self._queue_framed(
            (
                connection for connection in subscribers
                if (stream := connection.streams.get(zone)) is not None
                and (syncing or not stream.syncing)
            ),
            payload,
        )

    def send_all(self, payload: bytes) -> None:
        """One server message to every connection, framed once per encoding present
        (``Encoding.frame``). Not for prices: they are delivered per stream (an SSE
        event's id is each stream's own cursor)."""
        if sse.message_type(payload) in sse.CURSOR_TYPES:
            raise ValueError("send_all cannot frame a price: it is delivered per stream")
        self._queue_framed(self.connections, payload)

    def _queue_framed(self, connections: Iterable[Connection], payload: bytes) -> None:
        """Queue ``payload`` on each connection, framed once per encoding present."""
        framed: dict[Encoding, bytes] = {}
        for connection in connections:
            encoding = connection.encoding
            data = framed.get(encoding)
            if data is None:
                data = framed[encoding] = encoding.frame(payload)
            connection.queue(data)

    # --- FlushScheduler ---------------------------------------------------------------

    def mark_dirty(self, connection: Connection) -> None:
        self._dirty.append(connection)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.flush_delay > 0:
                asyncio.get_running_loop().call_later(self.flush_delay, self.flush)
            else:
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        now = time.monotonic()
        leaving = self._flush_audiences(now)
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush(now)
            if connection.conflated is not None:
                leaving.append(connection)
        for connection in leaving:
            self.detach(connection)
            if connection.conflated is not None and connection not in self._conflating:
                self._conflating[connection] = None
                self.conflation_events += 1
        # Kept for another try: connections that could join later by themselves (an
        # outbox still draining, a zone still syncing). Conflating or zone-less ones are
        # dropped: release_conflated and subscribe put them back when that changes.
        self._candidates = {
            connection: None
            for connection in self._candidates
            if not connection.closing
            and connection.conflated is None
            and connection.streams
            and not self._join_audience(connection)
        }
        if self._tick_started is not None:
            self.observe_latency(time.monotonic() - self._tick_started)
            self._tick_started = None

    def _flush_audiences(self, now: float) -> list[Connection]:
        """The shared writes: per member a ``transport.write`` of the same ``bytes`` and
        nothing else unless bytes are left waiting or a lag check is due (this loop is the
        per-delivery cost). Returns the members that must leave their audience."""
        audiences, self._dirty_audiences = self._dirty_audiences, []
        leaving = self._leaving = []
        lag = _TickLag(self._tick_first)
        self._tick_first = {}
        for audience in audiences:
            audience.dirty = False
            frames = audience.share()
            audience.commit(self._last_seq)
            # Once for the audience: what one write of the transport is (SSE: a chunk).
            data, count = audience.encoding.wrap(b"".join(frames)), len(frames)
            audience.bytes += len(data)
            audience.frames += count
            audience.writes += 1
            skipped = 0  # counted off the hot path: only members that were not written
            for connection in audience.members:
                if connection.outbox:  # its own messages, queued first this tick, go first
                    connection.flush(now)
                    if connection.closing:
                        skipped += 1
                        continue
                transport = connection.transport
                if transport.is_closing():
                    skipped += 1
                    continue
                transport.write(data)
                if transport.get_write_buffer_size() or now >= connection.next_check:
                    connection.check_backlog(now)
                    if connection.conflated is not None:
                        leaving.append(connection)
            written = len(audience.members) - skipped
            if written > 0:
                self._observe_lag(audience, lag, written)
        self._leaving = None
        return leaving

    def _observe_lag(self, audience: Audience, lag: _TickLag, written: int) -> None:
        """One observation per zone of the write just made to ``audience``: now minus the
        accepted_at of the zone's oldest price in it, weighted by the members written
        (``lag.py``). O(zones of the audience or of the tick, whichever is fewer)."""
        zones: Collection[str] = audience.zones
        firsts: Collection[str] = lag.firsts
        if len(zones) > len(firsts):
            zones, firsts = firsts, zones  # walk the smaller, look up in the other
        histogram = self.delivery_lag[audience.encoding.transport]
        now = time.time()  # wall clock, as accepted_at
        for zone in zones:
            if zone in firsts:
                accepted = lag.accepted(zone)
                if accepted is not None:  # None: stored before accepted_at existed
                    histogram.observe(now - accepted, written)

    def seal(self, connection: Connection) -> None:
        """Before a close frame: write out what the connection has (its share of this
        tick included) and stop giving it frames. Runs for every close of a
        ``BroadcastWebSocketResponse``, whoever starts it."""
        if connection.closing:
            return
        if self._leaving is not None:  # during the shared writes: leave after the loop
            self._leaving.append(connection)
        else:
            self.detach(connection)  # its share of the tick goes out before the close
        connection.flush()
        connection.closing = True

    def close(self, connection: Connection, code: int, message: str, *, reason: str) -> None:
        """Close a connection from synchronous code; ``reason`` is a DisconnectReason."""
        if not connection.closing:
            grace = self._begin_close(connection, code, reason)
            self.spawn(close_socket(connection, code, message, grace=grace))

    async def close_now(
        self, connection: Connection, code: int, message: str, *, reason: str
    ) -> None:
        """Close a connection and wait for it, within the socket's close grace."""
        if not connection.closing:
            grace = self._begin_close(connection, code, reason)
            await close_socket(connection, code, message, grace=grace)

    def _begin_close(self, connection: Connection, code: int, reason: str) -> float:
        """Seal the connection (nothing may follow the close frame); returns the grace."""
        self.seal(connection)
        connection.disconnect_reason = reason
        if code == CloseCode.SLOW_CONSUMER:
            self.slow_consumer_closes += 1
        return connection.close_grace

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- background -------------------------------------------------------------------

    def release_conflated(self) -> None:
        """Send conflated prices to clients that drained; close the ones lagging too long."""
        now = time.monotonic()
        for connection in list(self._conflating):
            if connection.release_conflated(now):
                del self._conflating[connection]
                self._candidates[connection] = None
            elif connection.closing:
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
                reason = messages.close_reason(message)
                await connection.end(code, reason)
                # asyncio has no event for "transport drained" once it is closing.
                while transport.get_write_buffer_size():  # noqa: ASYNC110
                    await asyncio.sleep(FLUSH_POLL)
    finally:
        if transport.get_write_buffer_size():
            transport.abort()
