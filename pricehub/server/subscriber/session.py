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
from pricehub.storage import StoredPrice
from pricehub.wire import messages, rate
from pricehub.wire.codes import CloseCode, DisconnectReason, ErrorCode, GapReason, MessageType
from pricehub.wire.errors import ProtocolError

__all__ = [
    "REPLAY_CHUNK", "Attach", "Close", "Detach", "Drain", "Effect", "Job", "Pong", "ReadHistory",
    "ReadLatest", "ReadSince", "Retained", "Send", "SendError", "Session", "SessionPolicy",
    "filter_hours", "fit_history",
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


Effect = (
    Send | SendError | Pong | Attach | Detach | Drain | Close | ReadLatest | ReadHistory
    | ReadSince
)
# What an entry point returns; the runner sends each read's answer back in (else None).
Job = Generator[Effect, Any, None]

# An answer's JSON around its ``data`` list: type, zone, limit/hours, timestamp.
_HISTORY_ENVELOPE = 256
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
        self, zones: Sequence[str], *, since: int | None, epoch: str | None, bad_since: bool
    ) -> Job:
        """Right after ``connection_established``: open the socket's zones."""
        if bad_since:
            yield self._error(ErrorCode.INVALID_MESSAGE, "'since' must be a non-negative integer")
        for zone in zones:
            yield from self._open_zone(
                zone, since=since, epoch=epoch, max_rate=self.policy.max_rate
            )

    def resume(self, zones: Sequence[str], *, since: Mapping[str, int], epoch: str | None) -> Job:
        """Open ``zones``, each resumed from its own ``since`` seq (a zone missing there
        starts fresh): an SSE stream reconnecting with its cursor."""
        for zone in zones:
            yield from self._open_zone(
                zone, since=since.get(zone), epoch=epoch, max_rate=self.policy.max_rate
            )

    def text(self, data: str | bytes) -> Job:
        """One text frame: a client message, or an ``error`` saying what is wrong with it."""
        if not (yield from self._admit()):
            return
        try:
            message = messages.decode_client_message(data)
            subscribe = isinstance(message, messages.Subscribe)
            max_rate = rate.subscribe_rate(data) if subscribe else None
        except ProtocolError as exc:
            yield self._error(exc.code, exc.message)
            return
        yield from self.handle(message, max_rate=max_rate)

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

    def handle(self, message: messages.ClientMessage, *, max_rate: float | None = None) -> Job:
        """Answer one decoded, admitted client message; ``max_rate`` is a ``subscribe``'s
        own (validated: ``wire.rate``), None for the socket's."""
        if self.closed:
            return
        try:
            yield from self._dispatch(message, max_rate)
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

    def _dispatch(self, message: messages.ClientMessage, max_rate: float | None) -> Job:
        match message:
            case messages.Ping():
                yield Send(messages.simple(MessageType.PONG, now=self.now()), MessageType.PONG)
            case messages.Heartbeat():
                kind = MessageType.HEARTBEAT_ACK
                yield Send(messages.simple(kind, now=self.now()), kind)
            case messages.RequestHistory():
                yield from self._history(message)
            case messages.Subscribe():
                yield from self._subscribe(
                    message.zones, message.since, message.epoch,
                    self.policy.max_rate if max_rate is None else max_rate,
                )
            case messages.Unsubscribe():
                yield from self._unsubscribe(message.zones)

    def _known_zone(self, zone: str) -> str:
        zones = self.policy.zones
        if zone not in zones:
            case = messages.zone_case_error(zone, zones)
            raise case or ProtocolError(ErrorCode.UNKNOWN_ZONE, f"unknown zone {zone[:40]!r}")
        return zone

    def _forbidden(self, zone: str) -> bool:
        allowed = self.policy.allowed_zones
        return allowed is not None and zone not in allowed

    def _history(self, request: messages.RequestHistory) -> Job:
        policy = self.policy
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
        previous = max(stream.last_seq, delivered)
        fresh = stream.finish(delivered_up_to=delivered)
        status = self.policy.zone_status(zone)
        if isinstance(stream, PacedStream) and fresh:  # the newest only, as paced
            newest = fresh[-1]
            yield _price(rate.price_update(newest.payload, skipped=newest.seq - previous - 1),
                         newest)
            fresh = []
        for price in fresh:
            yield _price(messages.price_update(price.payload), price)
        if status is not None:
            yield Send(status, MessageType.ZONE_STATUS, zone)

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
        self, stream: ZoneStream, retained: Retained, since: int
    ) -> Generator[Effect, Any, int | None]:
        """Send the retained prices as the client reads them; then, while the live updates
        held meanwhile do not follow on (the hold overflowed), read on from storage.
        Returns the last seq replayed, or None after closing a client that fell behind
        the retained history (4008: it reconnects and resumes from what it has)."""
        cursor, prices = since, retained.prices or []
        if isinstance(stream, PacedStream):
            # Only the newest missed price; what arrives meanwhile is released as its
            # newest by ``finish``, so nothing older needs reading, however many.
            if not prices:
                return cursor
            newest = prices[-1]
            yield _price(
                rate.price_update(newest.payload, skipped=newest.seq - since - 1, replay=True),
                newest,
            )
            return newest.seq
        while True:
            budget = 0
            for price in prices:
                if budget >= self.policy.chunk_bytes:
                    yield Drain()
                    budget = 0
                payload = messages.price_update(price.payload, replay=True)
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
