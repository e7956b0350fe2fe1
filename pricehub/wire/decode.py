"""Server -> client messages as typed values: the client's half of the wire (pure).

``decode_server_message`` turns one WebSocket text frame (or one SSE event's data) into one
of the dataclasses below, the inverse of the builders in ``pricehub.wire.messages``; a frame
that is not JSON, not an object, or has a field of the wrong type raises
``MalformedMessage`` naming the field. A ``type`` this module does not know decodes to
``UnknownMessage`` and fields it does not know are ignored: a newer server may add both,
and a client written today must keep reading the rest (as ``PROTOCOL.md``'s tables grow).

``decode_refusal`` reads an HTTP refusal of a stream (the SSE endpoints answer those
before the stream starts) into a ``Refusal`` carrying the WebSocket close code with the
same advice (``HTTP_REFUSAL_CLOSE_CODES``), so a client treats both transports alike.

No I/O: the Python client's transports feed it what they read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import orjson

from pricehub.wire.codes import (
    HTTP_REFUSAL_CLOSE_CODES,
    Backend,
    CloseCode,
    ErrorCode,
    GapReason,
    HttpErrorCode,
    MessageType,
    Transport,
    ZoneStatus,
)
from pricehub.wire.errors import MalformedMessage

__all__ = [
    "ConnectionEstablished",
    "ErrorMessage",
    "GapNotice",
    "HeartbeatAck",
    "InitialData",
    "Pong",
    "PriceHistory",
    "PriceObject",
    "PriceUpdateMessage",
    "Refusal",
    "ResumeComplete",
    "ServerMessage",
    "SnapshotMessage",
    "StorageBackendChanged",
    "Subscribed",
    "UnknownMessage",
    "Unsubscribed",
    "ZoneState",
    "decode_gap",
    "decode_price",
    "decode_refusal",
    "decode_server_message",
    "decode_server_object",
    "decode_zone_status",
    "gap_object",
]

Obj = Mapping[str, Any]
_E = TypeVar("_E", bound=StrEnum)


def _server_time_field() -> Any:
    """The server time (``timestamp``) of a message other than a price: kept, but left out
    of equality, so the same state said twice (a zone still stale on reconnecting) is equal.
    A new ``field`` per use: dataclasses write the field's name into it."""
    return field(default=None, compare=False)


# --- the messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceObject:
    """A price object (``PROTOCOL.md``): ``timestamp`` is the market time, ``accepted_at``
    when the server gave it its seq (None for a price stored before the field existed)."""

    zone: str
    price: float
    volume: float | None
    seq: int
    timestamp: str
    accepted_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The price object as the wire spells it (field order included)."""
        return {
            "market_zone": self.zone,
            "price": self.price,
            "volume": self.volume,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "accepted_at": self.accepted_at,
        }


@dataclass(frozen=True, slots=True)
class ConnectionEstablished:
    """The first message of every socket and stream. ``zones`` is the one zone of a
    single-zone socket (``single_zone``) or the list of a multi-zone one; ``transport`` is
    ``"sse"`` on a stream, None on a WebSocket."""

    connection_id: str
    zones: tuple[str, ...]
    single_zone: bool
    storage_backend: Backend | str  # a name a newer server may add is kept as it came
    epoch: str
    heartbeat_interval: float
    message: str
    transport: Transport | str | None = None
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class InitialData:
    """The zone's current price, sent on (re)subscribe when no resume replaced it."""

    zone: str
    latest_price: PriceObject
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class PriceUpdateMessage:
    """A ``price_update``: ``replay`` when re-sent during a resume, ``conflated`` when the
    server skipped earlier updates for a slow reader; ``skipped``: how many updates of the
    zone this one replaces (``max_rate`` or conflation; 0 when absent)."""

    price: PriceObject
    replay: bool = False
    conflated: bool = False
    skipped: int = 0

    def as_json(self) -> dict[str, Any]:
        """The price object, plus ``replay``/``conflated`` only when true and ``skipped``
        only when not 0 (as on the wire), without ``type``."""
        obj = self.price.as_json()
        if self.replay:
            obj["replay"] = True
        if self.conflated:
            obj["conflated"] = True
        if self.skipped:
            obj["skipped"] = self.skipped
        return obj


@dataclass(frozen=True, slots=True)
class ResumeComplete:
    """The end of a resume of ``zone``: ``recovered`` False when the gap could not be
    filled (``from_seq``/``to_seq``: the range asked for, None when not said)."""

    zone: str
    recovered: bool
    from_seq: int | None
    to_seq: int | None
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class Pong:
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class PriceHistory:
    """The answer to ``request_price_history``: ``data`` oldest first; ``hours`` or
    ``limit`` as asked. An answer by market time also has ``zones``, ``start`` / ``end``
    (the contract's ``from`` / ``to``), ``truncated`` (more matched than ``limit``) and
    ``cursor`` (each zone's highest seq in ``data``: resume the live stream from it);
    ``data`` is then ordered by (``timestamp``, zone, seq)."""

    zone: str | None
    data: tuple[PriceObject, ...]
    hours: float | None = None
    limit: int | None = None
    timestamp: str | None = _server_time_field()
    zones: tuple[str, ...] | None = None
    start: str | None = None
    end: str | None = None
    truncated: bool = False
    cursor: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class SnapshotMessage:
    """A ``snapshot``: several zones' latest prices at one instant (per zone on a Redis
    Cluster), ``None`` for a zone without one, and ``cursor``, each zone's seq in it (0
    without a price), from which ``subscribe`` (``since``) resumes every zone."""

    epoch: str
    prices: Mapping[str, PriceObject | None]
    cursor: Mapping[str, int]
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class Subscribed:
    zones: tuple[str, ...]
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    zones: tuple[str, ...]
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class StorageBackendChanged:
    storage_backend: Backend | str
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class GapNotice:
    """A ``gap``: seqs ``from_seq..to_seq`` (inclusive; ``to_seq`` None: unknown) of
    ``zone`` will never be delivered; ``epoch`` (the client's) only with ``epoch_changed``.
    An unknown ``reason`` is kept as it came (a newer server may add one): still a hole."""

    zone: str
    from_seq: int
    to_seq: int | None
    reason: GapReason | str
    epoch: str | None = None
    timestamp: str | None = _server_time_field()

    def as_json(self) -> dict[str, Any]:
        """The ``gap`` object without its server time."""
        return gap_object(
            self.zone, from_seq=self.from_seq, to_seq=self.to_seq, reason=self.reason,
            epoch=self.epoch,
        )  # fmt: skip


def gap_object(
    zone: str, *, from_seq: int | None, to_seq: int | None, reason: str | None,
    epoch: str | None,
) -> dict[str, Any]:
    """A ``gap`` as the wire spells it, without server time: what a client prints of a hole
    (``from_seq``/``reason`` None where the server did not say, e.g. an older server's
    ``resume_complete``; ``epoch`` only when given)."""
    obj: dict[str, Any] = {
        "type": MessageType.GAP.value, "market_zone": zone, "from_seq": from_seq,
        "to_seq": to_seq, "reason": None if reason is None else str(reason),
    }  # fmt: skip
    if epoch is not None:
        obj["epoch"] = epoch
    return obj


@dataclass(frozen=True, slots=True)
class ZoneState:
    """A ``zone_status``: ``status`` ``"stale"`` (no accepted price since ``since``, the
    ``accepted_at`` of the zone's last price, seq ``last_seq``) or ``"live"`` (a price
    follows)."""

    zone: str
    status: ZoneStatus
    since: str | None
    last_seq: int
    timestamp: str | None = _server_time_field()

    @property
    def stale(self) -> bool:
        return self.status == ZoneStatus.STALE

    def as_json(self) -> dict[str, Any]:
        """The ``zone_status`` object without its server time."""
        return {
            "type": MessageType.ZONE_STATUS.value, "market_zone": self.zone,
            "status": str(self.status), "since": self.since, "last_seq": self.last_seq,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An ``error``: the socket stays open unless a close follows. ``code`` is an
    ``ErrorCode``, or kept as it came when a newer server says one this module lacks."""

    code: ErrorCode | str
    message: str
    timestamp: str | None = _server_time_field()


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message of a ``type`` this module does not know (yet): skip it."""

    kind: str
    timestamp: str | None = _server_time_field()


ServerMessage = (
    ConnectionEstablished | InitialData | PriceUpdateMessage | ResumeComplete | Pong
    | HeartbeatAck | PriceHistory | Subscribed | Unsubscribed | StorageBackendChanged
    | GapNotice | ZoneState | ErrorMessage | UnknownMessage | SnapshotMessage
)


# --- decoding ---------------------------------------------------------------------------


def decode_server_message(data: str | bytes) -> ServerMessage:
    """One server text frame (or SSE event data); ``MalformedMessage`` when unreadable."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedMessage("not JSON") from None
    return decode_server_object(obj)


def decode_server_object(obj: object) -> ServerMessage:
    """A server message already parsed from JSON."""
    if not isinstance(obj, dict):
        raise MalformedMessage("not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MalformedMessage("no string field 'type'")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return UnknownMessage(kind, _server_time(obj, kind))
    return decoder(obj, kind)


def decode_price(obj: object, *, kind: str | None = None) -> PriceObject:
    """A price object (of ``price_update``, ``initial_data``, ``price_history``)."""
    if not isinstance(obj, dict):
        raise MalformedMessage("a price must be a JSON object", kind=kind)
    volume = obj.get("volume")
    accepted_at = obj.get("accepted_at")
    return PriceObject(
        zone=_text(obj, "market_zone", kind),
        price=_number(obj, "price", kind),
        volume=None if volume is None else _number(obj, "volume", kind),
        seq=_count(obj, "seq", kind),
        timestamp=_text(obj, "timestamp", kind),
        # Anything but a string is read as absent rather than failing the price: the field
        # is informative, the price is what a trader needs.
        accepted_at=accepted_at if isinstance(accepted_at, str) else None,
    )


def decode_gap(obj: Obj) -> GapNotice:
    """A decoded ``gap`` message."""
    kind = MessageType.GAP
    to_seq = _required(obj, "to_seq", kind)
    return GapNotice(
        zone=_text(obj, "market_zone", kind),
        from_seq=_count(obj, "from_seq", kind),
        to_seq=None if to_seq is None else _count(obj, "to_seq", kind),
        reason=_member(GapReason, _text(obj, "reason", kind)),
        epoch=_optional_text(obj, "epoch", kind),
        timestamp=_server_time(obj, kind),
    )


def decode_zone_status(obj: Obj) -> ZoneState:
    """A decoded ``zone_status`` message; an unknown ``status`` is malformed (a client
    cannot tell whether the zone's prices are to be trusted)."""
    kind = MessageType.ZONE_STATUS
    status = _member(ZoneStatus, _text(obj, "status", kind))
    if not isinstance(status, ZoneStatus):
        raise MalformedMessage(f"unknown zone status {status!r:.40}", kind=kind)
    return ZoneState(
        zone=_text(obj, "market_zone", kind),
        status=status,
        since=_optional_text(obj, "since", kind),
        last_seq=_count(obj, "last_seq", kind),
        timestamp=_server_time(obj, kind),
    )


def _connection_established(obj: Obj, kind: str) -> ConnectionEstablished:
    zones = obj.get("zones")
    single = zones is None
    return ConnectionEstablished(
        connection_id=_text(obj, "connection_id", kind),
        zones=(_text(obj, "market_zone", kind),) if single else _zones(obj, kind),
        single_zone=single,
        storage_backend=_member(Backend, _text(obj, "storage_backend", kind)),
        epoch=_text(obj, "epoch", kind),
        heartbeat_interval=_positive(obj, "heartbeat_interval", kind),
        message=_optional_text(obj, "message", kind) or "",
        transport=_optional_member(Transport, obj, "transport", kind),
        timestamp=_server_time(obj, kind),
    )


def _initial_data(obj: Obj, kind: str) -> InitialData:
    return InitialData(
        zone=_text(obj, "market_zone", kind),
        latest_price=decode_price(_required(obj, "latest_price", kind), kind=kind),
        timestamp=_server_time(obj, kind),
    )


def _price_update(obj: Obj, kind: str) -> PriceUpdateMessage:
    # The price's fields sit beside ``type`` and the flags (the builder splices them in).
    return PriceUpdateMessage(
        price=decode_price(obj, kind=kind),
        replay=_flag(obj, "replay", kind),
        conflated=_flag(obj, "conflated", kind),
        skipped=_skipped(obj, kind),
    )


def _skipped(obj: Obj, kind: str) -> int:
    value = obj.get("skipped", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMessage("'skipped' must be a count", kind=kind)
    return value


def _resume_complete(obj: Obj, kind: str) -> ResumeComplete:
    recovered = _required(obj, "recovered", kind)
    if not isinstance(recovered, bool):
        raise MalformedMessage("'recovered' must be true or false", kind=kind)
    return ResumeComplete(
        zone=_text(obj, "market_zone", kind),
        recovered=recovered,
        from_seq=_optional_count(obj, "from_seq", kind),
        to_seq=_optional_count(obj, "to_seq", kind),
        timestamp=_server_time(obj, kind),
    )


def _price_history(obj: Obj, kind: str) -> PriceHistory:
    data = _required(obj, "data", kind)
    if not isinstance(data, list):
        raise MalformedMessage("'data' must be a list of prices", kind=kind)
    cursor = obj.get("cursor")
    return PriceHistory(
        zone=_optional_text(obj, "market_zone", kind),
        data=tuple(decode_price(item, kind=kind) for item in data),
        hours=None if obj.get("hours") is None else _positive(obj, "hours", kind),
        limit=_optional_count(obj, "limit", kind),
        timestamp=_server_time(obj, kind),
        zones=None if obj.get("zones") is None else _zones(obj, kind),
        start=_optional_text(obj, "from", kind),
        end=_optional_text(obj, "to", kind),
        truncated=_flag(obj, "truncated", kind),
        cursor=None if cursor is None else _seqs(cursor, "cursor", kind),
    )


def _snapshot(obj: Obj, kind: str) -> SnapshotMessage:
    prices = _required(obj, "prices", kind)
    if not isinstance(prices, dict):
        raise MalformedMessage("'prices' must map zones to prices", kind=kind)
    return SnapshotMessage(
        epoch=_text(obj, "epoch", kind),
        prices={
            zone: None if price is None else decode_price(price, kind=kind)
            for zone, price in prices.items()
        },
        cursor=_seqs(_required(obj, "cursor", kind), "cursor", kind),
        timestamp=_server_time(obj, kind),
    )


def _seqs(value: object, name: str, kind: str) -> dict[str, int]:
    """A ``{zone: seq}`` object (a cursor)."""
    if not isinstance(value, dict) or not all(
        isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 for seq in value.values()
    ):
        raise MalformedMessage(f"{name!r} must map zones to non-negative integers", kind=kind)
    return value


def _error(obj: Obj, kind: str) -> ErrorMessage:
    return ErrorMessage(
        code=_member(ErrorCode, _text(obj, "code", kind)),
        message=_optional_text(obj, "message", kind) or "",
        timestamp=_server_time(obj, kind),
    )


_DECODERS: dict[str, Callable[[Obj, str], ServerMessage]] = {
    MessageType.CONNECTION_ESTABLISHED: _connection_established,
    MessageType.INITIAL_DATA: _initial_data,
    MessageType.PRICE_UPDATE: _price_update,
    MessageType.RESUME_COMPLETE: _resume_complete,
    MessageType.PONG: lambda obj, kind: Pong(_server_time(obj, kind)),
    MessageType.HEARTBEAT_ACK: lambda obj, kind: HeartbeatAck(_server_time(obj, kind)),
    MessageType.PRICE_HISTORY: _price_history,
    MessageType.SUBSCRIBED: lambda obj, kind: Subscribed(
        _zones(obj, kind), _server_time(obj, kind)
    ),
    MessageType.UNSUBSCRIBED: lambda obj, kind: Unsubscribed(
        _zones(obj, kind), _server_time(obj, kind)
    ),
    MessageType.STORAGE_BACKEND_CHANGED: lambda obj, kind: StorageBackendChanged(
        _member(Backend, _text(obj, "storage_backend", kind)), _server_time(obj, kind)
    ),
    MessageType.GAP: lambda obj, kind: decode_gap(obj),
    MessageType.ZONE_STATUS: lambda obj, kind: decode_zone_status(obj),
    MessageType.SNAPSHOT: _snapshot,
    MessageType.ERROR: _error,
}


# --- fields -------------------------------------------------------------------------------


def _required(obj: Obj, name: str, kind: str | None) -> Any:
    if name not in obj:
        raise MalformedMessage(f"no field {name!r}", kind=kind)
    return obj[name]


def _text(obj: Obj, name: str, kind: str | None) -> str:
    value = _required(obj, name, kind)
    if not isinstance(value, str):
        raise MalformedMessage(f"{name!r} must be a string", kind=kind)
    return value


def _optional_text(obj: Obj, name: str, kind: str | None) -> str | None:
    return None if obj.get(name) is None else _text(obj, name, kind)


def _server_time(obj: Obj, kind: str) -> str | None:
    return _optional_text(obj, "timestamp", kind)


def _count(obj: Obj, name: str, kind: str | None) -> int:
    """A seq or a limit: a non-negative JSON integer (``true`` is not 1)."""
    value = _required(obj, name, kind)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMessage(f"{name!r} must be a non-negative integer", kind=kind)
    return value


def _optional_count(obj: Obj, name: str, kind: str | None) -> int | None:
    return None if obj.get(name) is None else _count(obj, name, kind)


def _number(obj: Obj, name: str, kind: str | None) -> float:
    value = _required(obj, name, kind)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedMessage(f"{name!r} must be a number", kind=kind)
    if not math.isfinite(value):  # orjson never yields one, another parser may
        raise MalformedMessage(f"{name!r} must be finite", kind=kind)
    return float(value)


def _positive(obj: Obj, name: str, kind: str | None) -> float:
    value = _number(obj, name, kind)
    if value <= 0:
        raise MalformedMessage(f"{name!r} must be positive", kind=kind)
    return value


def _flag(obj: Obj, name: str, kind: str | None) -> bool:
    """``replay``/``conflated``: written only when true; absent or null is false."""
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedMessage(f"{name!r} must be true or false", kind=kind)
    return value


def _zones(obj: Obj, kind: str) -> tuple[str, ...]:
    zones = _required(obj, "zones", kind)
    if not isinstance(zones, list) or not all(isinstance(zone, str) for zone in zones):
        raise MalformedMessage("'zones' must be a list of strings", kind=kind)
    return tuple(zones)


def _member(enum: type[_E], value: str) -> _E | str:
    """``value`` as ``enum``'s member, or as it came when the enum has none (yet)."""
    try:
        return enum(value)
    except ValueError:
        return value


def _optional_member(enum: type[_E], obj: Obj, name: str, kind: str) -> _E | str | None:
    value = _optional_text(obj, name, kind)
    return None if value is None else _member(enum, value)


# --- refusals before a stream -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer other than 200 to a stream request.

    ``close_code``: the WebSocket close code with the same advice (``NO_RETRY_CLOSE_CODES``
    applies), None when the status has none (retry). ``error`` is the JSON body's
    ``error`` (an ``HttpErrorCode``, or kept as it came) and ``message`` its ``message``;
    both None for a body that is not the server's JSON (a proxy's page).
    """

    status: int
    close_code: CloseCode | None
    error: HttpErrorCode | str | None
    message: str | None
    body: str = ""

    @property
    def text(self) -> str:
        """What the refusal says, for a person: the message, else the body."""
        return self.message or self.body.strip()

    @property
    def endpoint_missing(self) -> bool:
        """A 404 that is not pricehub refusing a zone: there is no such endpoint (a
        server or proxy without the SSE routes)."""
        return self.status == 404 and self.error != HttpErrorCode.UNKNOWN_ZONE

    @property
    def cursor_refused(self) -> bool:
        """A 400: the request's ``Last-Event-ID`` (or ``since``) is not accepted (e.g.
        one of an older format): the next request starts without it."""
        return self.status == 400


def decode_refusal(status: int, body: str) -> Refusal:
    """``status`` and the (possibly truncated) body of a refused stream request."""
    try:
        detail = orjson.loads(body)
    except orjson.JSONDecodeError:
        detail = None
    error = message = None
    if isinstance(detail, dict):
        # ``code``: what the first SSE servers wrote before ``error`` (the HTTP shape).
        raw = detail.get("error") or detail.get("code")
        error = _member(HttpErrorCode, raw) if isinstance(raw, str) else None
        text = detail.get("message")
        message = text if isinstance(text, str) else None
    return Refusal(status, HTTP_REFUSAL_CLOSE_CODES.get(status), error, message, body)
