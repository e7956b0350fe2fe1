"""The wire contract (``PROTOCOL.md``) as pure functions: no sockets, no clocks of its own.

Three parts:

* client messages: ``decode_client_message`` turns a frame into one of the message
  dataclasses or raises ``ProtocolError`` with the contract's error code;
* published prices: ``validate_price`` (and the HTTP / Redis-ingest wrappers) turn
  untrusted input into a ``PriceBody`` or raise ``ValidationError`` naming the field;
* server messages: builders returning the exact bytes of a text frame's payload, and
  ``text_frame`` which wraps a payload into a complete WebSocket frame once, so the same
  bytes can be written to every subscriber.

The other direction, for clients: ``encode_client_message`` (``decode_client_message``'s
inverse) here, and the server messages read back into typed values in
``pricehub.wire.decode`` (``GapNotice``, ``ZoneState`` and their decoders are re-exported
from here for older imports).
"""

from __future__ import annotations

import calendar
import functools
import math
import re
import struct
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pricehub.wire.codes import ErrorCode, GapReason, MessageType, ZoneStatus
from pricehub.wire.decode import GapNotice, ZoneState, decode_gap, decode_zone_status
from pricehub.wire.errors import ProtocolError, ValidationError

__all__ = [
    "ACCEPTED_AT_NULL",
    "DEFAULT_HISTORY_LIMIT",
    "ClientMessage",
    "GapNotice",
    "Heartbeat",
    "Ping",
    "PriceBody",
    "RequestHistory",
    "Subscribe",
    "Unsubscribe",
    "ZoneState",
    "accepted_at_of",
    "accepted_now",
    "accepted_seconds",
    "body_of",
    "close_reason",
    "connection_established",
    "decode_client_message",
    "decode_gap",
    "decode_zone_status",
    "encode",
    "encode_client_message",
    "error",
    "format_accepted_at",
    "format_timestamp",
    "gap",
    "initial_data",
    "is_valid_zone_name",
    "normalise_timestamp",
    "parse_count",
    "price_history",
    "price_object",
    "price_update",
    "resume_complete",
    "simple",
    "storage_backend_changed",
    "text_frame",
    "timestamp_of",
    "unknown_zone_text",
    "utc_now",
    "validate_ingest_fields",
    "validate_price",
    "validate_publish_body",
    "with_seq",
    "zone_case_error",
    "zone_status",
    "zones_message",
]

# Always ``fullmatch``: with ``match``, ``$`` also matches before a trailing newline.
ZONE_RE = re.compile(r"[a-z0-9_]{1,32}")
DEFAULT_HISTORY_LIMIT = 100  # prices in a history answer when the client names no limit


def is_valid_zone_name(zone: object) -> bool:
    return isinstance(zone, str) and ZONE_RE.fullmatch(zone) is not None


def zone_case_error(zone: str, zones: Collection[str]) -> ProtocolError | None:
    """The refusal of a zone name written with capitals (``PJM``); None for any other.

    Zone names are lower case on the wire, and a person who types ``PJM`` meant ``pjm``:
    the dashboard and ``pricehub tail`` lower-case what is typed, and every server path
    (publish, WebSocket, SSE, history) answers this one code and message, each in its
    transport's error shape, instead of a bare "unknown zone".
    """
    lowered = zone.lower()
    # ASCII only: "\u212a".lower() is "k", but nobody typed a Kelvin sign for a zone.
    if lowered == zone or not zone.isascii() or not is_valid_zone_name(lowered):
        return None
    hint = f' (did you mean "{lowered}"?)' if lowered in zones else ""
    return ProtocolError(ErrorCode.UNKNOWN_ZONE, f'zone names are lower case: "{zone}"{hint}')


def unknown_zone_text(zone: str, zones: Collection[str]) -> str:
    """What refusing a zone that is not served says before a socket or stream opens
    (close 1008's reason, the SSE and history 404's message)."""
    case = zone_case_error(zone, zones)
    return f"unknown zone {zone[:40]}" if case is None else case.message


# --- time -------------------------------------------------------------------------------


def utc_now() -> str:
    return format_timestamp(datetime.now(UTC))


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-11-27T15:21:16.123Z``."""
    m = moment.astimezone(UTC)
    # Not strftime: its %Y does not zero-pad years before 1000 on every platform.
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond // 1000:03d}Z"
    )


# Published times outside [EARLIEST_TIMESTAMP, now + MAX_FUTURE] are refused: a feed has
# no prices from before 2000, and a year-9999 typo would sort after every real price and
# sit at the end of the history for good.
EARLIEST_TIMESTAMP = "2000-01-01T00:00:00.000Z"
MAX_FUTURE = timedelta(days=1)


def normalise_timestamp(value: str, *, now: str | None = None) -> str:
    """Any ISO-8601 time with an offset, as UTC milliseconds; no offset is an error.

    A trading feed must not guess time zones, so a naive time is rejected rather
    than read as local or UTC. Only printable ASCII is accepted (``fromisoformat``
    ignores a trailing NUL). With ``now`` (a ``utc_now()`` string), a time before
    2000-01-01 or more than a day after ``now`` is rejected too.
    """
    formatted = _parse_timestamp(value)
    # One fixed-width format: the strings compare like the times they denote.
    if now is not None and not EARLIEST_TIMESTAMP <= formatted <= _latest_allowed(now):
        raise ValueError(f"time out of range (2000-01-01 to 1 day from now): {value[:40]!r}")
    return formatted


# Cached: a market interval's burst repeats one timestamp thousands of times, and parsing
# it is most of a price's validation. Only valid (short, ISO-8601) strings are cached:
# a failed call raises and leaves nothing behind.
@functools.lru_cache(maxsize=256)
def _parse_timestamp(value: str) -> str:
    text = value.strip()
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"not an ISO-8601 time: {value[:40]!r}")
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {value[:40]!r}") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"time has no UTC offset: {value[:40]!r}")
    try:
        return format_timestamp(moment)
    except OverflowError:  # e.g. year 1 at +01:00 is before datetime.min in UTC
        raise ValueError(f"time out of range: {value[:40]!r}") from None


@functools.lru_cache(maxsize=4)
def _latest_allowed(now: str) -> str:
    return format_timestamp(datetime.fromisoformat(now.replace("Z", "+00:00")) + MAX_FUTURE)


def parse_count(text: str, *, max_digits: int = 18) -> int | None:
    """A non-negative decimal integer from a query parameter, or None.

    ``str.isdigit`` is not enough: it accepts digits ``int`` rejects (``"²"``) and
    strings too long for ``int`` (over 4300 digits): a 500 instead of a 4xx.
    """
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def close_reason(text: str) -> bytes:
    """A close frame's reason: at most 123 bytes of valid UTF-8 (RFC 6455 5.5, 7.1.6).

    Longer, the frame is invalid and the client sees 1002 instead of our code.
    """
    return text.encode()[:123].decode(errors="ignore").encode()


# --- published prices -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceBody:
    """A validated price, before the storage gives it its ``seq``."""

    market_zone: str
    price: float
    volume: float | None
    timestamp: str

    def encode(self) -> bytes:
        """The JSON object without ``seq``; ``with_seq`` adds it (and ``accepted_at``) once
        the seq is known."""
        return orjson.dumps(
            {
                "market_zone": self.market_zone,
                "price": self.price,
                "volume": self.volume,
                "timestamp": self.timestamp,
            }
        )


def with_seq(body: bytes, seq: int, accepted_at: bytes) -> bytes:
    """Insert ``"seq"`` and ``"accepted_at"`` into an encoded ``PriceBody``.

    Done by splicing bytes (the Redis Lua script does the same, ``STORE_LUA``) so the
    seq can be assigned atomically by the storage without parsing the JSON again. Both go
    in front: ``timestamp`` stays last (``timestamp_of``) and the seq first (the Redis
    backend reads it from the first bytes). ``accepted_at`` is ``format_accepted_at``'s
    text of the moment the storage gave the seq, and from then on part of the stored
    price: every instance, restart and failover serves the same bytes.
    """
    return b'{"seq":%d,"accepted_at":"%s",%s' % (seq, accepted_at, body[1:])


_TIMESTAMP_TAIL = len(b'"2026-11-27T15:21:16.123Z"}')


def timestamp_of(payload: bytes) -> str:
    """The market time of a stored price object, without parsing the JSON.

    ``PriceBody.encode`` writes ``timestamp`` last and its format has a fixed width, and
    ``with_seq`` only splices the front, so it is always the last 24 characters before
    the closing quote and brace (a test keeps this true).
    """
    return payload[-_TIMESTAMP_TAIL + 1 : -2].decode()


# --- accepted time ----------------------------------------------------------------------
#
# ``accepted_at`` (PROTOCOL.md, "Accepted time on every price") is taken where the seq is
# given and stored in the payload, right after the seq: ``{"seq":N,"accepted_at":"...",``.
# Prices stored before it existed (an older journal, Redis history written by an older
# version, a price published during a rolling upgrade by an older instance) have no such
# field: they are served as they are, with ``"accepted_at":null`` added to the object
# (``price_object``), so every price object on the wire has the field and old data
# stays readable.

_ACCEPTED_KEY = b'"accepted_at":'
_ACCEPTED_TEXT = b'"accepted_at":"'
ACCEPTED_AT_NULL = b'"accepted_at":null,'  # what a price stored without one gets on the wire


def format_accepted_at(unix_ns: int) -> bytes:
    """ISO-8601 UTC with microseconds and ``Z`` (``2026-11-27T15:21:16.123456Z``), from
    nanoseconds since the epoch (``time.time_ns()``). The Lua twin is ``STAMP_LUA``."""
    seconds, micros = divmod(unix_ns // 1000, 1_000_000)
    return b"%s.%06dZ" % (_second_text(seconds), micros)


@functools.lru_cache(maxsize=8)
def _second_text(seconds: int) -> bytes:
    # Cached: every price accepted within one second shares this part.
    return b"%04d-%02d-%02dT%02d:%02d:%02d" % time.gmtime(seconds)[:6]


def accepted_now() -> bytes:
    """The ``accepted_at`` of a price numbered now, by this process's clock (the memory
    and durable stores; Redis takes it from its own clock, see ``STAMP_LUA``)."""
    return format_accepted_at(time.time_ns())


def _accepted_start(payload: bytes) -> int:
    """Where the key ``"accepted_at"`` of a stored price starts, or -1 without one."""
    start = payload.find(b",", 7) + 1  # after {"seq":N,
    return start if start and payload.startswith(_ACCEPTED_KEY, start) else -1


def accepted_at_of(payload: bytes) -> str | None:
    """The ``accepted_at`` text of a stored price, None for one stored without it."""
    start = _accepted_start(payload)
    if start < 0 or not payload.startswith(_ACCEPTED_TEXT, start):
        return None
    value = start + len(_ACCEPTED_TEXT)
    return payload[value : payload.index(b'"', value)].decode()


def accepted_seconds(payload: bytes) -> float | None:
    """``accepted_at`` of a stored price as Unix seconds (for the delivery-lag metric),
    None without one (or unreadable: the metric skips it, the price is served anyway)."""
    text = accepted_at_of(payload)
    if text is None or len(text) != 27:
        return None
    try:
        return _epoch_second(text[:19]) + int(text[20:26]) / 1e6
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _epoch_second(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def body_of(payload: bytes) -> bytes:
    """The body a stored price was numbered from: ``with_seq``'s inverse (also for a
    price stored without ``accepted_at``). Tells whether a stored price is the one a
    given body became, whatever time it was accepted at."""
    start = payload.find(b",", 7) + 1
    if start and payload.startswith(_ACCEPTED_TEXT, start):
        start = payload.index(b'",', start + len(_ACCEPTED_TEXT)) + 2
    return b"{" + payload[start:]


def price_object(payload: bytes) -> bytes:
    """A stored price as it goes on the wire: as stored, or for a price stored before
    ``accepted_at`` existed, with ``"accepted_at":null`` (see above). One comparison for
    every current price: this runs once per update and per price of a history."""
    if _accepted_start(payload) >= 0:
        return payload
    if len(payload) <= 2:  # {}: nothing to separate from
        return b'{"accepted_at":null}'
    return b"{" + ACCEPTED_AT_NULL + payload[1:]


_PRICE_FIELDS = frozenset({"market_zone", "price", "volume", "timestamp"})


def _finite_number(name: str, value: object) -> float:
    if type(value) is float:  # what JSON and stream numbers parse to: checked first
        number = value
    # bool is an int subclass; "price": true is a publisher bug, not 1.0.
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(name, "must be a number")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValidationError(name, "must be finite")
    return number + 0.0  # -0.0 + 0.0 == 0.0: one zero on the wire, not "-0.0"


def validate_price(item: object, *, zones: Collection[str], now: str) -> PriceBody:
    """Validate one price object (already JSON-decoded). ``now`` is the default timestamp."""
    if not isinstance(item, dict):
        raise ValidationError("body", "a price must be a JSON object")
    if not _PRICE_FIELDS.issuperset(item):
        unknown = sorted(set(item) - _PRICE_FIELDS, key=str)
        raise ValidationError(str(unknown[0]), "unknown field")
    zone = item.get("market_zone")
    if zone is None:
        raise ValidationError("market_zone", "is required")
    # Membership alone: every configured zone is a valid name (settings checked them).
    # The str check first: a JSON list or object is unhashable.
    if not isinstance(zone, str) or zone not in zones:
        raise _unknown_zone(zone, zones)
    if "price" not in item:
        raise ValidationError("price", "is required")
    price = _finite_number("price", item["price"])
    volume_raw = item.get("volume")
    volume = None if volume_raw is None else _finite_number("volume", volume_raw)
    if volume is not None and volume < 0:
        raise ValidationError("volume", "must be >= 0")
    timestamp_raw = item.get("timestamp")
    if timestamp_raw is None:
        timestamp = now
    elif isinstance(timestamp_raw, str):
        try:
            timestamp = normalise_timestamp(timestamp_raw, now=now)
        except ValueError as exc:
            raise ValidationError("timestamp", str(exc)) from None
    else:
        raise ValidationError("timestamp", "must be an ISO-8601 string")
    return PriceBody(str(zone), price, volume, timestamp)


def _unknown_zone(zone: object, zones: Collection[str]) -> ValidationError:
    case = zone_case_error(zone, zones) if isinstance(zone, str) else None
    if case is not None:
        return ValidationError("market_zone", case.message, code=case.code)
    return ValidationError("market_zone", f"unknown zone {zone!r}")


def validate_publish_body(
    raw: bytes, *, zones: Collection[str], now: str, max_batch: int
) -> list[PriceBody]:
    """The HTTP publish body: one price object or a list of them (all or nothing)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationError("body", "invalid JSON") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ValidationError("body", "empty list")
    if len(items) > max_batch:
        raise ValidationError("body", f"batch of {len(items)} exceeds {max_batch}")
    bodies = []
    for index, item in enumerate(items):
        try:
            bodies.append(validate_price(item, zones=zones, now=now))
        except ValidationError as exc:
            field = f"[{index}].{exc.field}" if isinstance(data, list) else exc.field
            raise ValidationError(field, exc.message, code=exc.code) from None
    return bodies


IngestFields = Mapping[bytes, bytes] | Mapping[str, str] | Sequence[bytes] | Sequence[str]

# A JSON number (RFC 8259), ASCII only: what the HTTP body's parser accepts as a number.
# ``float()`` alone would also take ``1_000``, `` 5 ``, ``inf`` and non-ASCII digits.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)


def validate_ingest_fields(
    fields: IngestFields, *, zones: Collection[str], now: str
) -> PriceBody:
    """A Redis Stream entry (all values are strings) validated like the HTTP body.

    ``fields`` is the entry's flat ``[name, value, name, value, ...]`` list as Redis
    sends it (or a mapping): a name given twice is rejected, never "the last one wins",
    and ``price`` / ``volume`` must be JSON numbers (``volume`` may be ``null`` or empty).
    """
    item: dict[str, Any] = _entry_texts(fields)
    for name in ("price", "volume"):
        if name in item:
            item[name] = _parse_number_text(name, item[name])
    return validate_price(item, zones=zones, now=now)


def _entry_texts(fields: IngestFields) -> dict[str, str]:
    """The entry's fields as text, each name once; the first problem in field order is
    the one refused."""
    # ``type() is list`` first: an ABC isinstance (Mapping) costs more than the join.
    if type(fields) is list and not len(fields) % 2:
        texts = _joined_texts(fields)
        if texts is not None:
            pairs = iter(texts)
            item = dict(zip(pairs, pairs, strict=False))  # an even count: checked above
            if 2 * len(item) == len(texts):
                return item
    return _texts_one_by_one(fields)  # anything else, refusals included


def _joined_texts(fields: list[Any]) -> list[str] | None:
    """Every field decoded in one call (a stream entry is a list of bytes): about a
    quarter of decoding them one by one. None unless every part is bytes, all of it is
    UTF-8 and no value holds the NUL used to join (then one by one tells what is wrong)."""
    try:
        texts = b"\0".join(fields).decode().split("\0")
    except (TypeError, UnicodeDecodeError):
        return None
    return texts if len(texts) == len(fields) else None


def _texts_one_by_one(fields: IngestFields) -> dict[str, str]:
    if isinstance(fields, Mapping):
        pairs: Iterable[tuple[bytes | str, bytes | str]] = fields.items()
    elif len(fields) % 2:
        raise ValidationError("entry", "field without a value")
    else:
        pairs = zip(fields[::2], fields[1::2], strict=True)
    item: dict[str, str] = {}
    for key, value in pairs:
        try:
            name = key if isinstance(key, str) else key.decode()
            text = value if isinstance(value, str) else value.decode()
        except UnicodeDecodeError:
            raise ValidationError("entry", "not UTF-8") from None
        if name in item:
            raise ValidationError(name[:40], "field given more than once")
        item[name] = text
    return item


def _parse_number_text(name: str, text: str) -> float | None:
    if name == "volume" and text in {"", "null"}:
        return None
    if _JSON_NUMBER.fullmatch(text) is None:
        raise ValidationError(name, f"not a JSON number: {text[:40]!r}")
    return float(text)


# --- client messages --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class RequestHistory:
    market_zone: str | None
    hours: float | None
    limit: int | None


@dataclass(frozen=True, slots=True)
class Subscribe:
    zones: tuple[str, ...]
    since: Mapping[str, int]
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    zones: tuple[str, ...]


ClientMessage = Ping | Heartbeat | RequestHistory | Subscribe | Unsubscribe


def decode_client_message(data: str | bytes) -> ClientMessage:
    """Parse one client text frame; raise ``ProtocolError`` with the contract's code."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _invalid("message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _invalid("missing string field 'type'")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}")
    return decoder(obj)


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, message)


def _zone_list(obj: dict[str, Any]) -> tuple[str, ...]:
    zones = obj.get("zones")
    if not isinstance(zones, list) or not all(isinstance(zone, str) for zone in zones):
        raise _invalid("'zones' must be a list of strings")
    return tuple(dict.fromkeys(zones))  # de-duplicated, order kept


def _decode_history(obj: dict[str, Any]) -> RequestHistory:
    zone = obj.get("market_zone")
    if zone is not None and not isinstance(zone, str):
        raise _invalid("'market_zone' must be a string")
    hours, limit = obj.get("hours"), obj.get("limit")
    if hours is not None and (
        isinstance(hours, bool) or not isinstance(hours, int | float)
        or not math.isfinite(hours) or hours <= 0
    ):
        raise _invalid("'hours' must be a positive number")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise _invalid("'limit' must be a positive integer")
    if hours is not None and limit is not None:
        raise _invalid("give 'hours' or 'limit', not both")
    return RequestHistory(zone, hours, limit)  # echoed back as asked


def _decode_subscribe(obj: dict[str, Any]) -> Subscribe:
    zones = _zone_list(obj)
    since = obj.get("since") or {}
    if not isinstance(since, dict) or not all(
        isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 for seq in since.values()
    ):
        raise _invalid("'since' must map zones to non-negative integers")
    epoch = obj.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        raise _invalid("'epoch' must be a string")
    return Subscribe(zones, since, epoch)


_DECODERS: dict[str, Callable[[dict[str, Any]], ClientMessage]] = {
    MessageType.PING: lambda obj: Ping(),
    MessageType.HEARTBEAT: lambda obj: Heartbeat(),
    MessageType.REQUEST_PRICE_HISTORY: _decode_history,
    MessageType.SUBSCRIBE: _decode_subscribe,
    MessageType.UNSUBSCRIBE: lambda obj: Unsubscribe(_zone_list(obj)),
}


def encode_client_message(message: ClientMessage) -> bytes:
    """The text frame a client sends for ``message``: ``decode_client_message``'s inverse
    (what is absent or None is left out, as the decoder reads absence)."""
    obj: dict[str, Any]
    match message:
        case Ping():
            obj = {"type": MessageType.PING}
        case Heartbeat():
            obj = {"type": MessageType.HEARTBEAT}
        case RequestHistory():
            obj = {"type": MessageType.REQUEST_PRICE_HISTORY, "market_zone": message.market_zone,
                   "hours": message.hours, "limit": message.limit}  # fmt: skip
        case Subscribe():
            obj = {"type": MessageType.SUBSCRIBE, "zones": list(message.zones),
                   "since": dict(message.since) or None, "epoch": message.epoch}  # fmt: skip
        case Unsubscribe():
            obj = {"type": MessageType.UNSUBSCRIBE, "zones": list(message.zones)}
    return encode({name: value for name, value in obj.items() if value is not None})


# --- server messages --------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message)


def simple(kind: str, *, now: str) -> bytes:
    """``pong``, ``heartbeat_ack``: a type and the server time."""
    return b'{"type":"%s","timestamp":"%s"}' % (kind.encode(), now.encode())


def connection_established(
    *,
    connection_id: str,
    zones: Sequence[str],
    single_zone: bool,
    backend: str,
    epoch: str,
    heartbeat_interval: float,
    now: str,
) -> bytes:
    message: dict[str, Any] = {
        "type": MessageType.CONNECTION_ESTABLISHED, "connection_id": connection_id
    }
    if single_zone:
        message["market_zone"] = zones[0]
        text = f"Connected to {zones[0]} market updates"
    else:
        message["zones"] = list(zones)
        text = f"Connected to {', '.join(zones) or 'no'} market updates"
    message |= {
        "storage_backend": backend,
        "epoch": epoch,
        "heartbeat_interval": heartbeat_interval,
        "message": text,
        "timestamp": now,
    }
    return encode(message)


_PRICE_UPDATE_HEAD = b'{"type":"%s",' % MessageType.PRICE_UPDATE.encode()


def price_update(payload: bytes, *, replay: bool = False, conflated: bool = False) -> bytes:
    """A ``price_update`` built by splicing the stored price object (no re-encoding)."""
    flags = (b'"replay":true,' if replay else b"") + (b'"conflated":true,' if conflated else b"")
    return _PRICE_UPDATE_HEAD + flags + price_object(payload)[1:]


def initial_data(zone: str, payload: bytes, *, now: str) -> bytes:
    return encode(
        {
            "type": MessageType.INITIAL_DATA,
            "market_zone": zone,
            "latest_price": orjson.Fragment(price_object(payload)),
            "timestamp": now,
        }
    )


def resume_complete(zone: str, *, recovered: bool, from_seq: int, to_seq: int, now: str) -> bytes:
    return encode(
        {
            "type": MessageType.RESUME_COMPLETE,
            "market_zone": zone,
            "recovered": recovered,
            "from_seq": from_seq,
            "to_seq": to_seq,
            "timestamp": now,
        }
    )


def price_history(
    zone: str, payloads: Iterable[bytes], *, hours: float | None, limit: int | None, now: str
) -> bytes:
    message: dict[str, Any] = {
        "type": MessageType.PRICE_HISTORY,
        "market_zone": zone,
        "data": [orjson.Fragment(price_object(payload)) for payload in payloads],
    }
    if hours is not None:
        message["hours"] = hours
    else:
        message["limit"] = limit
    message["timestamp"] = now
    return encode(message)


def zones_message(kind: str, zones: Sequence[str], *, now: str) -> bytes:
    """``subscribed`` / ``unsubscribed``."""
    return encode({"type": kind, "zones": list(zones), "timestamp": now})


def storage_backend_changed(backend: str, *, now: str) -> bytes:
    return encode(
        {"type": MessageType.STORAGE_BACKEND_CHANGED, "storage_backend": backend, "timestamp": now}
    )


def gap(
    zone: str, *, from_seq: int, to_seq: int | None, reason: GapReason,
    epoch: str | None = None, now: str,
) -> bytes:
    """Seqs ``from_seq..to_seq`` (inclusive; ``to_seq`` None: unknown) of ``zone`` that
    the client will never get; ``epoch`` (the client's) only with ``epoch_changed``."""
    message: dict[str, Any] = {
        "type": MessageType.GAP,
        "market_zone": zone,
        "from_seq": from_seq,
        "to_seq": to_seq,
        "reason": reason,
    }
    if reason is GapReason.EPOCH_CHANGED:
        message["epoch"] = epoch
    message["timestamp"] = now
    return encode(message)


def zone_status(
    zone: str, status: ZoneStatus, *, since: str | None, last_seq: int, now: str
) -> bytes:
    """``stale`` (``since``: the ``accepted_at`` of the zone's last price) or ``live``."""
    return encode(
        {
            "type": MessageType.ZONE_STATUS,
            "market_zone": zone,
            "status": status,
            "since": since,
            "last_seq": last_seq,
            "timestamp": now,
        }
    )


def error(code: str, message: str, *, now: str) -> bytes:
    return encode({"type": MessageType.ERROR, "code": code, "message": message, "timestamp": now})


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, unfragmented server-to-client text frame (RFC 6455 5.2).

    Built once per update and written as-is to every subscriber's transport: this is
    what makes fan-out cost one ``write`` per client instead of one encode per client.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload
