"""What one subscriber may ask and how it is answered: a state machine without I/O.

The session owns the protocol conversation of one socket: opening zones (initial data
or a resume), answering client frames, and turning bad input into the contract's error
messages. It does no I/O itself. Every entry point (``start``, ``text``, ``binary``,
``ping``, ``pong``, ``handle``) returns a *job*: a generator of effects (``Send`` a
message, ``Attach`` a zone's stream to the fan-out, read storage with ``ReadSince``...,
wait for the socket to ``Drain``, ``Close`` it). Whoever runs the job performs each effect
and sends a read's answer back into the generator (``pricehub.server.subscriber.driver``
does this against the real socket; ``tests/test_session.py`` does it with plain values).

A job is one client request, and the driver runs one job at a time per socket, so a
client's requests are answered one after another, never concurrently. Anything large
(a replay, a history) is produced only as the socket drains: a ``Drain`` precedes it
and every ``chunk_bytes`` of a replay, and one answer never exceeds ``reply_budget``
bytes (a history is cut to the newest prices that fit, with an ``error`` saying so).
What one socket can make the server queue is therefore bounded by the socket's send
limits, whatever it asks for (``docs/security.md``, "Per-socket budget").

A zone opened with a rate (``max_rate``: the URL's for the socket's zones and for
``subscribe``s without one, or the ``subscribe``'s own) is a ``PacedStream``: its resume
replays only the newest missed price and the live updates held meanwhile are released
as their newest only, each with ``skipped``; the fan-out paces it from then on.

A ``snapshot`` (PROTOCOL.md, "One consistent picture of many zones") holds the live
updates of the socket's zones it covers while the storage reads them (``Hold``: the
zones are syncing again, as when they were opened), then sends the snapshot and raises
each such zone's floor to its ``cursor``: what was held, and everything the fan-out
brings later, reaches the client only if its seq is above the cursor. A snapshot read
from Redis can be ahead of this instance's stream (Pub/Sub lag): the updates at or below
the cursor that arrive late are dropped, those above it all delivered, so the client
gets every seq after the cursor exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pricehub.server.fanout.pacing import PacedStream
from pricehub.server.policy.ratelimit import TokenBucket
from pricehub.server.policy.resume import HELD_LIMIT, ZoneStream, plan_resume
from pricehub.server.settings import Settings
from pricehub.storage import HistorySlice, Snapshot, StoredPrice
from pricehub.wire import messages
from pricehub.wire.codes import (
    CloseCode,
    DisconnectReason,
    ErrorCode,
    GapReason,
    MessageType,
    ZoneStatus,
)
from pricehub.wire.errors import ProtocolError

__all__ = [
    "REPLAY_CHUNK", "Attach", "Close", "Detach", "Drain", "Effect", "Hold", "Job",
    "Pong", "ReadHistory", "ReadLatest", "ReadRange", "ReadSince", "ReadSnapshot", "Retained",
    "Send", "SendError", "Session", "SessionPolicy", "filter_hours", "fit_history", "fit_range",
]


# --- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Queue one server message (its encoded JSON) for this client: what it is, and the
    zone and seq it delivers (a ``price_update`` or ``initial_data``; None for others,
    e.g. a ``gap`` has a zone and no seq), beside the bytes, so that no transport parses
    them back (an SSE stream's cursor moves with ``zone`` and ``seq``)."""

    payload: bytes
    kind: MessageType
    zone: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class SendError:
    """Queue an ``error`` message; ``code`` is also counted in the stats."""

    code: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer a protocol-level ping frame with ``data``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Attach:
    """Subscribe the socket to ``stream.zone`` with this stream (replacing any other):
    live updates then reach ``stream``, held while it is syncing."""

    stream: ZoneStream


@dataclass(frozen=True, slots=True)
class Detach:
    """Unsubscribe the socket from ``zone``."""

    zone: str


@dataclass(frozen=True, slots=True)
class Drain:
    """Wait until what the socket has not yet sent is below its low-water mark. The job
    ends here if the socket closes meanwhile."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket with ``code``; ``reason`` is a DisconnectReason. Ends the job."""

    code: int
    message: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReadLatest:
    """Answer: ``storage.latest(zone)``."""

    zone: str


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Answer: ``storage.history(zone, limit=limit)``."""

    zone: str
    limit: int


@dataclass(frozen=True, slots=True)
class ReadSince:
    """Answer: a ``Retained`` (the epoch before the read, ``storage.since(zone, seq)``)."""

    zone: str
    seq: int


@dataclass(frozen=True, slots=True)
class Retained:
    """The answer to ``ReadSince``."""

    epoch: str
    prices: list[StoredPrice] | None


@dataclass(frozen=True, slots=True)
class ReadSnapshot:
    """Answer: ``storage.snapshot(zones)`` (a ``Snapshot``)."""

    zones: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadRange:
    """Answer: ``storage.history_between(zones, start, end, limit=limit)`` (a
    ``HistorySlice``)."""

    zones: tuple[str, ...]
    start: str
    end: str
    limit: int


@dataclass(frozen=True, slots=True)
class Hold:
    """Hold the live updates of these subscribed zones from now on: take the socket out
    of its audience (its share of this tick goes to its outbox first) and make each
    stream syncing again, so what arrives meanwhile waits in ``ZoneStream.held``; a price
    kept for a slow reader (conflated, not yet sent) is held too, and the stream put back
    at what the client was sent. Ended by the stream's ``finish``."""

    streams: tuple[ZoneStream, ...]


Effect = (
    Send | SendError | Pong | Attach | Detach | Drain | Close | ReadLatest | ReadHistory
    | ReadSince | ReadSnapshot | ReadRange | Hold
)
# What an entry point returns; the runner sends each read's answer back in (else None).
Job = Generator[Effect, Any, None]

# An answer's JSON around its ``data`` list: type, zone, limit/hours, timestamp.
_HISTORY_ENVELOPE = 256
_BAD_SEQ = "'since' must be a non-negative integer"
# What each zone adds to a history by market time around its ``data``: its name in
# ``zones`` and in ``cursor`` with a seq (32 + 19 characters and the JSON around them).
_RANGE_ZONE = 96
# Replay bytes produced per loop turn (~140 prices, about a millisecond of CPU).
REPLAY_CHUNK = 16 * 1024


def _never_stale(_zone: str) -> bytes | None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionPolicy:
    """Everything a session needs to know besides the client's frames.

    :param zones: the configured zones.
    :param allowed_zones: the token's ``zones`` claim (None: every zone).
    :param single_zone: the zone of a ``/market/{zone}`` socket (None: multi-zone socket).
    :param max_zones: ``--max-zones-per-socket``.
    :param history_size: ``--history-size`` (the largest history anyone can ask for).
    :param rate: ``--client-rate-limit`` (frames per second, burst twice that).
    :param chunk_bytes: replay bytes produced between two ``Drain`` waits.
    :param reply_budget: the largest answer in bytes (``send_hard_limit -
        send_high_water``: queued after a drain, it cannot push the socket over its hard
        limit by itself).
    :param held_limit: live updates held per syncing zone.
    :param zone_status: a stale zone's ``zone_status`` message, None for a live one
        (``Broadcaster.zone_status``): sent to a client that opens a stale zone.
    :param max_rate: the URL's ``max_rate`` (None: every update), the rate of the zones
        opened from the URL and of a ``subscribe`` that names none.
    :param max_snapshot_zones: the most zones one ``snapshot`` reads
        (``Settings.max_snapshot_zones``).
    :param max_history_zones: the most zones one history by market time covers
        (``Settings.max_history_zones``).
    """

    zones: frozenset[str]
    allowed_zones: frozenset[str] | None = None
    single_zone: str | None = None
    max_zones: int = 64
    history_size: int = 1000
    rate: float = 20.0
    chunk_bytes: int = REPLAY_CHUNK
    reply_budget: int = 768 * 1024
    held_limit: int = HELD_LIMIT
    zone_status: Callable[[str], bytes | None] = _never_stale
    max_rate: float | None = None
    max_snapshot_zones: int = 1000
    max_history_zones: int = 64

    @classmethod
    def from_settings(
        cls, settings: Settings, *, allowed_zones: frozenset[str] | None, single_zone: str | None,
        zone_status: Callable[[str], bytes | None] = _never_stale, max_rate: float | None = None,
    ) -> SessionPolicy:
        return cls(
            zone_status=zone_status,
            max_rate=max_rate,
            zones=settings.zone_set,  # built once: not O(zones) per connection
            allowed_zones=allowed_zones,
            single_zone=single_zone,
            max_zones=settings.max_zones_per_socket,
            max_snapshot_zones=settings.max_snapshot_zones,
            max_history_zones=settings.max_history_zones,
            history_size=settings.history_size,
            rate=settings.client_rate_limit,
            # At most a quarter of the high-water mark (the driver waits for half of it,
            # so a replay alone never makes a reading client look slow, conflated) and
            # at most REPLAY_CHUNK: about a millisecond of the loop per turn.
            chunk_bytes=max(1, min(REPLAY_CHUNK, settings.send_high_water // 4)),
            reply_budget=settings.send_hard_limit - settings.send_high_water,
        )


class Session:
    """One socket's protocol state.

    :param clock: monotonic seconds for the rate limit (injectable for tests).
    :param now: the server time stamped on messages (injectable for tests).
    """

    def __init__(
        self,
        policy: SessionPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = messages.utc_now,
    ) -> None:
        self.policy = policy
        self.now = now
        self.bucket = TokenBucket(policy.rate, clock=clock)
        # The zones this socket is subscribed to, with where it is in each.
        self.streams: dict[str, ZoneStream] = {}
        self.closed = False

    # --- entry points -------------------------------------------------------------------

    def start(
        self, zones: Sequence[str], *, since: int | Mapping[str, int] | None,
        epoch: str | None, bad_since: bool | str = False,
    ) -> Job:
        """Right after ``connection_established``: open the socket's zones, resumed from
        ``since``: one seq (the zone of a ``/market/{zone}`` URL), or a seq per zone (a
        ``since=pjm:12,ercot:40`` vector; a zone missing there starts fresh).
        ``bad_since``: the URL's ``since`` is malformed (True: it is no seq; a text: what
        is wrong with it), said in an ``error`` before the zones open fresh."""
        if bad_since:
            text = bad_since if isinstance(bad_since, str) else _BAD_SEQ
            yield self._error(ErrorCode.INVALID_MESSAGE, text)
        max_rate = self.policy.max_rate
        for zone in zones:
            seq = since.get(zone) if isinstance(since, Mapping) else since
            yield from self._open_zone(zone, since=seq, epoch=epoch, max_rate=max_rate)

    def resume(self, zones: Sequence[str], *, since: Mapping[str, int], epoch: str | None) -> Job:
        """Open ``zones``, each resumed from its own ``since`` seq (a zone missing there
        starts fresh): an SSE stream reconnecting with its cursor or a vector."""
        return self.start(zones, since=since, epoch=epoch)

    def text(self, data: str | bytes) -> Job:
        """One text frame: a client message, or an ``error`` saying what is wrong with it."""
        if not (yield from self._admit()):
            return
        try:
            message = messages.decode_client_message(data)
        except ProtocolError as exc:
            yield self._error(exc.code, exc.message)
            return
        yield from self.handle(message)

    def binary(self) -> Job:
        if (yield from self._admit()):
            yield self._error(
                ErrorCode.INVALID_MESSAGE, "binary frames are not supported; send JSON text"
            )

    def ping(self, data: bytes) -> Job:
        """A protocol-level ping: it costs a pong write, so it counts like any frame."""
        if (yield from self._admit()):
            yield Pong(data)

    def pong(self) -> Job:
        """An (often unsolicited) pong: nothing to answer, but parsing it costs CPU, so it
        counts against the rate like any frame (a pong flood is closed with 4029)."""
        yield from self._admit()

    def handle(self, message: messages.ClientMessage) -> Job:
        """Answer one decoded, admitted client message."""
        if self.closed:
            return
        try:
            yield from self._dispatch(message)
        except ProtocolError as exc:
            yield self._error(exc.code, exc.message)

    # --- admission ----------------------------------------------------------------------

    def _admit(self) -> Generator[Effect, Any, bool]:
        """Count a client frame against the rate limit; False if it must be dropped."""
        if self.closed:
            return False
        if self.bucket.take():
            return True
        if self.bucket.sustained_overflow:
            yield self._close(
                CloseCode.RATE_LIMITED, "message rate over limit", DisconnectReason.RATE_LIMIT
            )
        else:
            yield self._error(ErrorCode.RATE_LIMITED, "too many messages; slow down")
        return False

    def _close(self, code: int, message: str, reason: str) -> Close:
        self.closed = True
        return Close(code, message, reason)

    def _error(self, code: str, message: str) -> SendError:
        return SendError(code, messages.error(code, message, now=self.now()))

    # --- client messages ----------------------------------------------------------------

    def _dispatch(self, message: messages.ClientMessage) -> Job:
        match message:
            case messages.Ping():
                yield Send(messages.simple(MessageType.PONG, now=self.now()), MessageType.PONG)
            case messages.Heartbeat():
                kind = MessageType.HEARTBEAT_ACK
                yield Send(messages.simple(kind, now=self.now()), kind)
            case messages.RequestHistory():
                yield from self._history(message)
            case messages.Subscribe():
                own = message.max_rate
                yield from self._subscribe(
                    message.zones, message.since, message.epoch,
                    self.policy.max_rate if own is None else own,
                )
            case messages.Unsubscribe():
                yield from self._unsubscribe(message.zones)
            case messages.SnapshotRequest():
                yield from self._snapshot(message)

    def _known_zone(self, zone: str) -> str:
        zones = self.policy.zones
        if zone not in zones:
            case = messages.zone_case_error(zone, zones)
            raise case or ProtocolError(ErrorCode.UNKNOWN_ZONE, f"unknown zone {zone[:40]!r}")
        return zone

    def _forbidden(self, zone: str) -> bool:
        allowed = self.policy.allowed_zones
        return allowed is not None and zone not in allowed

    def _allowed(self, zones: Sequence[str]) -> None:
        """``forbidden_zone`` for the first of ``zones`` the token leaves out."""
        for zone in zones:
            if self._forbidden(zone):
                raise ProtocolError(ErrorCode.FORBIDDEN_ZONE, f"token does not allow zone {zone}")

    def _history(self, request: messages.RequestHistory) -> Job:
        policy = self.policy
        by_time = messages.parse_history_request(
            request, zones=policy.zones, default_zones=tuple(self.streams), now=self.now()
        )
        if by_time is not None:
            yield from self._history_range(by_time)
            return
        zone = request.market_zone or policy.single_zone
        if zone is None:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "'market_zone' is required on this socket"
            )
        self._known_zone(zone)
        if self._forbidden(zone):
            raise ProtocolError(ErrorCode.FORBIDDEN_ZONE, f"token does not allow zone {zone}")
        limit = min(request.limit or messages.DEFAULT_HISTORY_LIMIT, policy.history_size)
        yield Drain()  # the previous answers first: one answer queued at a time
        if request.hours is not None:
            prices = filter_hours((yield ReadHistory(zone, policy.history_size)), request.hours)
        else:
            prices = yield ReadHistory(zone, limit)
        kept = fit_history(prices, policy.reply_budget)
        if len(kept) < len(prices):
            yield self._error(
                ErrorCode.INVALID_MESSAGE,
                f"history cut to the newest {len(kept)} of {len(prices)} prices: one answer "
                f"carries at most {policy.reply_budget} bytes; ask for fewer",
            )
        yield Send(
            messages.price_history(
                zone,
                (price.payload for price in kept),
                hours=request.hours,
                limit=None if request.hours is not None else request.limit or limit,
                now=self.now(),
            ),
            MessageType.PRICE_HISTORY,
            zone,
        )

    def _history_range(self, query: messages.HistoryQuery) -> Job:
        """``request_price_history`` by market time (``from``/``to``/``zones``): every
        retained price of the zones in the range, in history order, at most ``limit``;
        cut further (``truncated``) to what one answer may carry."""
        policy = self.policy
        zones = query.zones
        if len(zones) > policy.max_history_zones:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"a history query covers at most {policy.max_history_zones} zones, "
                f"not {len(zones)}",
            )
        self._allowed(zones)
        yield Drain()  # the previous answers first: one answer queued at a time
        found: HistorySlice = yield ReadRange(zones, query.start, query.end, query.limit)
        room = policy.reply_budget - _HISTORY_ENVELOPE - _RANGE_ZONE * len(zones)
        kept = fit_range(found.prices, room)
        answer = messages.price_history_range(
            query, kept, truncated=found.truncated or len(kept) < len(found.prices),
            now=self.now(),
        )  # fmt: skip
        yield Send(answer, MessageType.PRICE_HISTORY, query.market_zone)

    def _snapshot(self, request: messages.SnapshotRequest) -> Job:
        """``snapshot``: the zones' latest prices at one instant (the socket's zones by
        default), then the socket's live updates of those zones above the ``cursor`` only
        (the module docstring). Zones the socket is not subscribed to are read too, with
        no promise about a stream it does not get."""
        policy = self.policy
        zones = messages.parse_snapshot_request(
            request, zones=policy.zones, default_zones=tuple(self.streams)
        )
        if not zones:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "no zones: name them in 'zones', or subscribe first"
            )
        if len(zones) > policy.max_snapshot_zones:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"a snapshot covers at most {policy.max_snapshot_zones} zones, not {len(zones)}",
            )
        self._allowed(zones)
        yield Drain()
        held = tuple(self.streams[zone] for zone in zones if zone in self.streams)
        statuses = {stream.zone: policy.zone_status(stream.zone) for stream in held}
        if held:
            yield Hold(held)
        taken: Snapshot = yield ReadSnapshot(zones)
        yield Send(messages.snapshot_reply(taken, now=self.now()), MessageType.SNAPSHOT)
        for stream in held:
            price = taken.prices.get(stream.zone)
            cursor = 0 if price is None else price.seq
            # The client has what it was sent before the snapshot, and the snapshot: its
            # floor is the higher of the two (see docs/trading.md for a cursor below what
            # the socket already had: an instance ahead of the read).
            if not (yield from self._release_held(stream, max(stream.last_seq, cursor),
                                                  statuses[stream.zone])):  # fmt: skip
                return

    def _release_held(
        self, stream: ZoneStream, floor: int, before: bytes | None
    ) -> Generator[Effect, Any, bool]:
        """End a snapshot's hold of ``stream``: the held updates above ``floor`` (and
        what the hold had to drop, from storage), with the zone's status if it changed
        meanwhile (a status message skips a syncing stream). False: the socket was closed."""
        zone = stream.zone
        if stream.missing_after(floor) and not isinstance(stream, PacedStream):
            retained: Retained = yield ReadSince(zone, floor)
            if retained.prices is None:
                yield self._close(
                    CloseCode.SLOW_CONSUMER, "slow consumer: fell behind the history",
                    DisconnectReason.SLOW_CONSUMER,
                )
                return False
            replayed = yield from self._replay(stream, retained, floor, replay=False)
            if replayed is None:
                return False
            floor = replayed
        first = stream.held[0] if stream.held else None
        sends = self._released(stream, floor)
        after = self.policy.zone_status(zone)
        if before is not None and after != before and first is not None:
            # It went live while held: the live message went to the streams not held.
            yield Send(messages.zone_status(
                zone, ZoneStatus.LIVE, since=messages.accepted_at_of(first.payload),
                last_seq=first.seq, now=self.now(),
            ), MessageType.ZONE_STATUS, zone)  # fmt: skip
        yield from sends
        if after is not None and after != before:
            yield Send(after, MessageType.ZONE_STATUS, zone)
        return True

    def _subscribe(
        self, zones: tuple[str, ...], since: Mapping[str, int], epoch: str | None,
        max_rate: float | None,
    ) -> Job:
        for zone in zones:
            self._known_zone(zone)
        for zone in zones:
            if self._forbidden(zone):
                yield self._close(
                    CloseCode.FORBIDDEN_ZONE, f"token does not allow zone {zone}",
                    DisconnectReason.AUTH,
                )
                return
        # Counted without building sets of every zone already open: O(len(zones)).
        added = sum(1 for zone in zones if zone not in self.streams)
        if len(self.streams) + added > self.policy.max_zones:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, f"at most {self.policy.max_zones} zones per socket"
            )
        kind = MessageType.SUBSCRIBED
        yield Send(messages.zones_message(kind, zones, now=self.now()), kind)
        for zone in zones:
            yield from self._open_zone(zone, since=since.get(zone), epoch=epoch, max_rate=max_rate)

    def _unsubscribe(self, zones: tuple[str, ...]) -> Job:
        for zone in zones:
            self._known_zone(zone)
        for zone in zones:
            self.streams.pop(zone, None)
            yield Detach(zone)
        kind = MessageType.UNSUBSCRIBED
        yield Send(messages.zones_message(kind, zones, now=self.now()), kind)

    # --- opening zones ------------------------------------------------------------------

    def _open_zone(
        self, zone: str, *, since: int | None, epoch: str | None, max_rate: float | None
    ) -> Job:
        """Subscribe first, then read storage, then release the held live updates."""
        held_limit = self.policy.held_limit
        stream = self.streams[zone] = (
            ZoneStream(zone, held_limit=held_limit) if max_rate is None
            else PacedStream(zone, rate=max_rate, held_limit=held_limit)
        )  # fmt: skip
        yield Drain()  # what is queued goes first: one zone's data queued at a time
        yield Attach(stream)
        if since is None:
            delivered = yield from self._initial(zone)
        else:
            resumed = yield from self._resume(stream, since, epoch)
            if resumed is None:
                return  # closed: the client fell behind the retained history
            delivered = resumed
        # Held prices and the zone's status in one step (the driver runs Sends without
        # awaiting): from ``finish`` on the broadcaster tells this stream of changes.
        yield from self._released(stream, delivered)
        status = self.policy.zone_status(zone)
        if status is not None:
            yield Send(status, MessageType.ZONE_STATUS, zone)

    @staticmethod
    def _released(stream: ZoneStream, delivered: int) -> list[Send]:
        """End ``stream``'s syncing at ``delivered``: the held prices above it, as live
        updates (a paced zone's newest only, with ``skipped``)."""
        previous = max(stream.last_seq, delivered)
        fresh = stream.finish(delivered_up_to=delivered)
        if isinstance(stream, PacedStream) and fresh:  # the newest only, as paced
            newest = fresh[-1]
            skipped = newest.seq - previous - 1
            return [_price(messages.price_update(newest.payload, skipped=skipped), newest)]
        return [_price(messages.price_update(price.payload), price) for price in fresh]

    def _initial(self, zone: str) -> Generator[Effect, Any, int]:
        latest: StoredPrice | None = yield ReadLatest(zone)
        if latest is None:
            return 0
        yield self._initial_data(zone, latest)
        return latest.seq

    def _initial_data(self, zone: str, latest: StoredPrice) -> Send:
        payload = messages.initial_data(zone, latest.payload, now=self.now())
        return Send(payload, MessageType.INITIAL_DATA, zone, latest.seq)

    def _resume(
        self, stream: ZoneStream, since: int, epoch: str | None
    ) -> Generator[Effect, Any, int | None]:
        zone = stream.zone
        retained: Retained = yield ReadSince(zone, since)
        outcome = plan_resume(
            since=since, client_epoch=epoch, epoch=retained.epoch, retained=retained.prices
        )
        if outcome.recovered:
            replayed = yield from self._replay(stream, retained, since)
            if replayed is None:
                return None
            delivered = to_seq = replayed
        else:
            # One read of the latest price serves both the gap and initial_data, so the gap
            # ends exactly before the seq the client is then given.
            latest: StoredPrice | None = yield ReadLatest(zone)
            lost = self._resume_gap(zone, since, epoch, retained, latest)
            if lost is not None:
                yield Send(lost, MessageType.GAP, zone)
            delivered = to_seq = 0 if latest is None else latest.seq
            if latest is not None:
                yield self._initial_data(zone, latest)
        yield Send(
            messages.resume_complete(
                zone, recovered=outcome.recovered, from_seq=outcome.from_seq, to_seq=to_seq,
                now=self.now(),
            ),
            MessageType.RESUME_COMPLETE,
            zone,
        )
        return delivered

    def _resume_gap(
        self, zone: str, since: int, epoch: str | None, retained: Retained,
        latest: StoredPrice | None,
    ) -> bytes | None:
        """The ``gap`` of a resume that cannot recover (sent before its ``initial_data``
        of ``latest``), None when nothing newer than ``since`` is missing (a client ahead
        of the zone)."""
        if epoch is not None and epoch != retained.epoch:
            # Its seqs name another lineage: which of ours it lacks is unknown.
            return messages.gap(
                zone, from_seq=since + 1, to_seq=None, reason=GapReason.EPOCH_CHANGED,
                epoch=epoch, now=self.now(),
            )
        # The stream gives the client ``latest`` and what follows it: every seq between
        # its cursor and that one is never sent (older than the history, or retained but
        # not replayed since the history does not reach back to the cursor).
        if latest is None or latest.seq - 1 <= since:
            return None
        return messages.gap(
            zone, from_seq=since + 1, to_seq=latest.seq - 1,
            reason=GapReason.HISTORY_EXCEEDED, now=self.now(),
        )  # fmt: skip

    def _replay(
        self, stream: ZoneStream, retained: Retained, since: int, *, replay: bool = True
    ) -> Generator[Effect, Any, int | None]:
        """Send the retained prices as the client reads them; then, while the live updates
        held meanwhile do not follow on (the hold overflowed), read on from storage.
        Returns the last seq replayed, or None after closing a client that fell behind
        the retained history (4008: it reconnects and resumes from what it has).
        ``replay`` False: updates the client never had (a snapshot's hold overflowed),
        not flagged ``replay``."""
        cursor, prices = since, retained.prices or []
        if isinstance(stream, PacedStream):
            # Only the newest missed price; what arrives meanwhile is released as its
            # newest by ``finish``, so nothing older needs reading, however many.
            if not prices:
                return cursor
            newest = prices[-1]
            yield _price(
                messages.price_update(
                    newest.payload, skipped=newest.seq - since - 1, replay=replay
                ),
                newest,
            )
            return newest.seq
        while True:
            budget = 0
            for price in prices:
                if budget >= self.policy.chunk_bytes:
                    yield Drain()
                    budget = 0
                payload = messages.price_update(price.payload, replay=replay)
                budget += len(payload)
                yield _price(payload, price)
            if prices:
                cursor = prices[-1].seq
            if not stream.missing_after(cursor):
                return cursor
            yield Drain()
            more: Retained = yield ReadSince(stream.zone, cursor)
            if more.prices is None or more.epoch != retained.epoch:
                yield self._close(
                    CloseCode.SLOW_CONSUMER, "slow consumer: replay fell behind the history",
                    DisconnectReason.SLOW_CONSUMER,
                )
                return None
            if not more.prices:
                return cursor  # a hole storage cannot fill either: go live
            prices = more.prices


def _price(payload: bytes, price: StoredPrice) -> Send:
    """A ``price_update`` of ``price`` (live, held or replayed)."""
    return Send(payload, MessageType.PRICE_UPDATE, price.zone, price.seq)


def fit_range(prices: list[StoredPrice], budget: int) -> list[StoredPrice]:
    """The first of ``prices`` (history order, as given) whose price objects fit
    ``budget`` bytes: a history by market time is cut at its end, and says so
    (``truncated``), so the client asks again from the last price's timestamp."""
    room = budget
    for index, price in enumerate(prices):
        room -= len(messages.price_object(price.payload)) + 1  # and its comma
        if room < 0:
            return prices[:index]
    return prices


def fit_history(prices: list[StoredPrice], budget: int) -> list[StoredPrice]:
    """The newest of ``prices`` (oldest first, as given) whose answer fits ``budget`` bytes."""
    room = budget - _HISTORY_ENVELOPE
    for index in range(len(prices) - 1, -1, -1):
        # as sent: a price stored without accepted_at gets it (null) on the wire
        room -= len(messages.price_object(prices[index].payload)) + 1  # and its comma
        if room < 0:
            return prices[index + 1:]
    return prices


def filter_hours(prices: list[StoredPrice], hours: float) -> list[StoredPrice]:
    """Prices whose market time is within the last ``hours`` (history is time-ordered
    only by seq, so each one is checked)."""
    try:
        cutoff = messages.format_timestamp(datetime.now(UTC) - timedelta(hours=hours))
    except OverflowError:  # further back than datetime reaches: everything retained
        return prices
    # ISO-8601 UTC strings of one fixed format compare like the times they denote.
    return [price for price in prices if messages.timestamp_of(price.payload) >= cutoff]
