"""The zone broadcaster: storage listener, subscriber registry and per-tick flusher.

Each price is serialised once (``price_update(payload)``) and framed once per encoding
present among the zone's subscribers (``encoding.py``: a text frame, a compressed frame,
an SSE event; the broadcaster never learns which transport framed it). Nothing is
awaited and no task or queue exists per client, so one slow or dead client never delays
the others. One ``call_soon`` callback per event-loop tick then writes what the tick
produced, one write per client (straight to the socket when its transport has nothing
buffered: what ``transport.write`` would do, without its Python body):

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

A zone a connection asked to get at a rate (``max_rate``) is paced (``pacing.py``): its
audiences are keyed also by their zones' rates and are not among the zone's per-update
audiences; the zone's ``PaceGroup`` of that rate fires on the rate's grid and gives each
member (audience or connection) the zone's newest price with ``skipped``. An audience's
paced zones are in step at the audience's own last seq of the zone (``Audience.paced``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import ChainMap
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from typing import Any, cast

from pricehub.server.fanout.connection import Connection, paced_frame
from pricehub.server.fanout.encoding import AudienceFramer, Encoding, TickFrame
from pricehub.server.fanout.lag import TRANSPORTS, LagHistogram
from pricehub.server.fanout.pacing import PacedStream, PaceGroup, next_tick
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
    """Connections with the same zones, encoding and rates: byte-identical data every
    tick.

    What the encoding keeps per audience (SSE: the ``id:`` cursor every member shares)
    is its ``framer``; ``paced`` is, per rate-limited zone, the last seq its members got
    (``rates`` says each one's rate).
    """

    __slots__ = (
        "bytes", "dirty", "encoding", "framer", "frames", "key", "members", "paced", "pending",
        "rates", "writes", "zones",
    )

    def __init__(
        self, key: AudienceKey, *, encoding: Encoding, last_seq: dict[str, int],
        paced: dict[str, int], epoch: str,
    ) -> None:
        self.key = key
        self.zones, _name, self.rates = key
        self.encoding = encoding
        self.paced = paced
        self.framer: AudienceFramer = encoding.audience_framer(
            self.zones, last_seq=self.cursor(last_seq), epoch=epoch
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
        self.framer.commit(self.cursor(last_seq))

    def cursor(self, last_seq: dict[str, int]) -> Mapping[str, int]:
        """Where its members are: the zones' last seqs, its own for paced zones (a view:
        nothing copied, whatever the number of zones)."""
        return ChainMap(self.paced, last_seq) if self.paced else last_seq


# An audience's key: its zones, its encoding's name, and (zone, rate) per paced zone.
AudienceKey = tuple[frozenset[str], str, frozenset[tuple[str, float]]]
_NO_RATES: frozenset[tuple[str, float]] = frozenset()


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
        self._audiences: dict[AudienceKey, Audience] = {}
        # Zones that had a price (bounded by the configured zones): a new subscriber is
        # in step once it has seen this seq; and that price (what a pace group sends).
        self._last_seq: dict[str, int] = {}
        self._latest: dict[str, StoredPrice] = {}
        # Per paced zone, a group per rate (only while it has members).
        self._groups: dict[str, dict[float, PaceGroup[Audience | Connection]]] = {}
        # Pace groups fired, and paced frames queued (once per audience or connection
        # outside one per firing: with one audience, 1 per firing whatever its size).
        self.paced_firings = 0
        self.paced_frames = 0
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
        self._make_individual(zone, connection)
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
        self._unmake_individual(zone, connection)
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
        paced = audience.paced
        for zone in audience.zones:
            # Shared writes do not touch the streams: everything up to the zone's last
            # broadcast seq (the audience's own for a paced zone) is written or queued.
            connection.streams[zone].last_seq = (
                paced[zone] if zone in paced else self._last_seq.get(zone, 0)
            )
            self._make_individual(zone, connection)
        connection.caught_up(audience.cursor(self._last_seq))  # its pending share ends there
        self._candidates[connection] = None

    def _make_individual(self, zone: str, connection: Connection) -> None:
        """``connection`` gets ``zone`` on its own: per update, or from its pace group."""
        self._individual[zone][connection] = None
        stream = connection.streams.get(zone)
        if isinstance(stream, PacedStream):
            self._join_group(zone, stream.rate, connection, stream.last_seq)

    def _unmake_individual(self, zone: str, connection: Connection) -> None:
        self._individual[zone].pop(connection, None)
        stream = connection.streams.get(zone)
        if isinstance(stream, PacedStream):
            self._leave_group(zone, stream.rate, connection)

    def _join_group(
        self, zone: str, rate: float, member: Audience | Connection, last_seq: int
    ) -> None:
        """Pace ``zone`` for ``member`` at ``rate``; armed if it is behind the zone."""
        groups = self._groups.setdefault(zone, {})
        group = groups.get(rate)
        if group is None:
            group = groups[rate] = PaceGroup(zone, rate)
        group.members[member] = None
        latest = self._latest.get(zone)
        if group.timer is None and latest is not None and latest.seq > last_seq:
            self._arm(group)

    def _leave_group(self, zone: str, rate: float, member: Audience | Connection) -> None:
        groups = self._groups.get(zone)
        group = None if groups is None else groups.get(rate)
        if groups is None or group is None or member not in group.members:
            return
        del group.members[member]
        if not group.members:  # no state (and no timer) left for an unused rate
            group.cancel()
            del groups[rate]
            if not groups:
                del self._groups[zone]

    def _arm(self, group: PaceGroup[Audience | Connection]) -> None:
        loop = asyncio.get_running_loop()
        group.timer = loop.call_at(next_tick(loop.time(), group.rate), self._fire, group)

    def _fire(self, group: PaceGroup[Audience | Connection]) -> None:
        """A pace group's tick: each member gets the zone's newest price if it has not
        had it, with ``skipped``; the frames are built once per (encoding, skipped)."""
        group.timer = None
        price = self._latest.get(group.zone)
        if price is None:
            return
        self.paced_firings += 1
        frames: dict[tuple[Encoding, int], bytes] = {}
        for member in group.members:
            if isinstance(member, Audience):
                self._pace_audience(member, price, frames)
            elif member.pace(price, frames):
                self.paced_frames += 1
                self._candidates[member] = None  # in step with its audience now, maybe
                self._schedule_flush()

    def _pace_audience(
        self, audience: Audience, price: StoredPrice, frames: dict[tuple[Encoding, int], bytes]
    ) -> None:
        zone, previous = price.zone, audience.paced[price.zone]
        if price.seq <= previous:
            return
        audience.paced[zone] = price.seq
        audience.pending.append(
            (zone, price.seq, paced_frame(frames, audience.encoding, price, previous))
        )
        self.paced_frames += 1
        if zone not in self._tick_first:
            self._tick_first[zone] = price.payload
        if self._tick_started is None:
            self._tick_started = time.monotonic()
        if not audience.dirty:
            audience.dirty = True
            self._dirty_audiences.append(audience)
        self._schedule_flush()

    def _leave_audience(self, connection: Connection) -> None:
        # The connection knows its audience through a Protocol (no import cycle); this
        # broadcaster only ever gives it one of its own ``Audience`` objects.
        audience = cast("Audience | None", connection.audience)
        if audience is None:
            return
        connection.leave()
        del audience.members[connection]
        if not audience.members:
            del self._audiences[audience.key]
            for zone, rate in audience.rates:
                self._leave_group(zone, rate, audience)
            for zone in audience.zones:
                if zone in audience.paced:
                    continue
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
        last_seq, paced_any = self._last_seq, False
        for zone, stream in streams.items():  # cheap refusals first, before any key is built
            if stream.syncing:
                return False
            if isinstance(stream, PacedStream):
                paced_any = True
            elif stream.last_seq != last_seq.get(zone, 0):
                return False
        rates = frozenset(
            (zone, stream.rate) for zone, stream in streams.items()
            if isinstance(stream, PacedStream)
        ) if paced_any else _NO_RATES  # fmt: skip
        key = (frozenset(streams), connection.encoding.name, rates)
        audience = self._audiences.get(key)
        if audience is None:
            audience = self._new_audience(key, connection)  # it starts where this one is
        elif paced_any and any(
            streams[zone].last_seq != seq for zone, seq in audience.paced.items()
        ):
            return False  # out of step until its pace group's next firing
        audience.members[connection] = None
        connection.join(audience)
        for zone in streams:
            self._unmake_individual(zone, connection)
        return True

    def _new_audience(self, key: AudienceKey, connection: Connection) -> Audience:
        streams = connection.streams
        paced = {zone: streams[zone].last_seq for zone, _rate in key[2]}
        audience = self._audiences[key] = Audience(
            key, encoding=connection.encoding, last_seq=self._last_seq, paced=paced,
            epoch=connection.epoch,
        )  # fmt: skip
        for zone in audience.zones:
            if zone not in paced:
                self._audiences_of.setdefault(zone, {})[audience] = None
        for zone, rate in audience.rates:
            self._join_group(zone, rate, audience, paced[zone])
        return audience

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
            self._latest[zone] = price
            groups = self._groups.get(zone)
            if groups:  # paced: one timer per (zone, rate), armed once per firing
                for group in groups.values():
                    if group.timer is None:
                        self._arm(group)
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
            size = len(data)
            for connection in audience.members:
                if connection.outbox:  # its own messages, queued first this tick, go first
                    connection.flush(now)
                    if connection.closing:
                        skipped += 1
                        continue
                # The common case inlined (this line runs once per delivery): nothing of
                # its own buffered, not closing, the kernel takes it all. That is what
                # ``transport.write`` does then, and the transport's buffer stays empty, so
                # only a lag check can be due.
                direct = connection.direct
                if direct is not None and not direct._buffer and not direct._closing:
                    try:
                        sent = direct._sock.send(data)
                    except OSError:  # EAGAIN, a reset...: ``transport.write`` handles it
                        sent = 0
                    if sent == size:
                        if now >= connection.next_check:
                            self._check_member(connection, now, leaving)
                        continue
                    if not self._write_member(connection, data[sent:], now, leaving):
                        skipped += 1
                elif not self._write_member(connection, data, now, leaving):
                    skipped += 1
            written = len(audience.members) - skipped
            if written > 0:
                self._observe_lag(audience, lag, written)
        self._leaving = None
        return leaving

    def _write_member(
        self, connection: Connection, data: bytes, now: float, leaving: list[Connection]
    ) -> bool:
        """A shared write through the transport (bytes already buffered, a partial or
        failed send, a transport the loop cannot send on directly); False if closing."""
        transport = connection.transport
        if transport.is_closing():
            return False
        transport.write(data)
        if transport.get_write_buffer_size() or now >= connection.next_check:
            self._check_member(connection, now, leaving)
        return True

    @staticmethod
    def _check_member(connection: Connection, now: float, leaving: list[Connection]) -> None:
        """The slow-consumer check after a shared write (4008, conflation, lag)."""
        connection.check_backlog(now)
        if connection.conflated is not None:
            leaving.append(connection)

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
