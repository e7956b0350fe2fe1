"""The wire contract (``PROTOCOL.md``) as pure functions: no sockets, no clocks of its own.

Three parts:

* client messages: ``decode_client_message`` turns a frame into one of the message
  dataclasses or raises ``ProtocolError`` with the contract's error code;
* published prices: ``validate_price`` (and the HTTP / Redis-ingest wrappers) turn
  untrusted input into a ``PriceBody`` or raise ``ValidationError`` naming the field;
* server messages: builders returning the exact bytes of a text frame's payload, and
  ``text_frame`` which wraps a payload into a complete WebSocket frame once, so the same
  bytes can be written to every subscriber;
* many zones at once (``snapshot``, history by market time): the checks shared by the
  HTTP endpoints and the WebSocket session (``history_range``, ``parse_history_request``,
  ``parse_snapshot_request``) and their answers (``snapshot_reply``,
  ``price_history_range``, ``history_range_body``); resuming many zones from a URL's
  ``since=pjm:12,ercot:40`` (``parse_since_vector``).

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
from typing import Any, Protocol

import orjson

from pricehub.wire.codes import ErrorCode, GapReason, HttpErrorCode, MessageType, ZoneStatus
from pricehub.wire.decode import GapNotice, ZoneState, decode_gap, decode_zone_status
from pricehub.wire.errors import ProtocolError, ValidationError
from pricehub.wire.rate import FIELD as RATE_FIELD
from pricehub.wire.rate import RateError
from pricehub.wire.rate import parse_json as parse_rate
from pricehub.wire.sse import MAX_SEQ

__all__ = [
    "ACCEPTED_AT_NULL",
    "DEFAULT_HISTORY_LIMIT",
    "DEFAULT_RANGE_LIMIT",
    "EPOCH",
    "MAX_RANGE_LIMIT",
    "SINCE",
    "ClientMessage",
    "GapNotice",
    "Heartbeat",
    "HistoryQuery",
    "Ping",
    "PriceBody",
    "RequestHistory",
    "SnapshotLike",
    "SnapshotRequest",
    "StoredLike",
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
    "history_range",
    "history_range_body",
    "initial_data",
    "is_valid_zone_name",
    "known_zones",
    "normalise_timestamp",
    "parse_count",
    "parse_history_request",
    "parse_since_vector",
    "parse_snapshot_request",
    "price_history",
    "price_history_range",
    "price_object",
    "price_update",
    "resume_complete",
    "seq_of",
    "simple",
    "snapshot_reply",
    "storage_backend_changed",
    "text_frame",
    "timestamp_bytes",
    "timestamp_of",
    "unknown_zone_text",
    "utc_now",
    "validate_ingest_fields",
    "validate_price",
    "validate_publish_body",
    "with_seq",
    "zone_case_error",
    "zone_status",
    "zones_from_query",
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
    moment = _moment(value)
    try:
        return format_timestamp(moment)
    except OverflowError:  # e.g. year 1 at +01:00 is before datetime.min in UTC
        raise ValueError(f"time out of range: {value[:40]!r}") from None


def _moment(value: str) -> datetime:
    """An ISO-8601 time with an offset (see ``normalise_timestamp``), as given."""
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
    return moment


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


def seq_of(payload: bytes) -> int:
    """The seq of a stored price object, without parsing the JSON: ``with_seq`` puts it
    first, so the object always starts with ``{"seq":N,``."""
    return int(payload[7 : payload.index(b",", 7)])


_TIMESTAMP_TAIL = len(b'"2026-11-27T15:21:16.123Z"}')


def timestamp_of(payload: bytes) -> str:
    """The market time of a stored price object, without parsing the JSON.

    ``PriceBody.encode`` writes ``timestamp`` last and its format has a fixed width, and
    ``with_seq`` only splices the front, so it is always the last 24 characters before
    the closing quote and brace (a test keeps this true).
    """
    return payload[-_TIMESTAMP_TAIL + 1 : -2].decode()


def timestamp_bytes(payload: bytes) -> bytes:
    """``timestamp_of`` without decoding: ASCII, so these compare as the texts do (for
    filtering every retained price by market time, where the decode is half the cost)."""
    return payload[-_TIMESTAMP_TAIL + 1 : -2]


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
    """``request_price_history``: by count (``hours`` or ``limit``), or by market time
    when ``start`` (``from``), ``end`` (``to``) or ``zones`` is given, as sent (checked by
    ``parse_history_request``)."""

    market_zone: str | None
    hours: float | None
    limit: int | None
    zones: tuple[str, ...] | None = None
    start: str | None = None
    end: str | None = None

    @property
    def by_time(self) -> bool:
        return self.start is not None or self.end is not None or self.zones is not None


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """``snapshot``: ``zones`` None for the socket's zones."""

    zones: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscribe``; ``max_rate`` None: the socket's rate (its URL's, or none)."""

    zones: tuple[str, ...]
    since: Mapping[str, int]
    epoch: str | None
    max_rate: float | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    zones: tuple[str, ...]


ClientMessage = Ping | Heartbeat | RequestHistory | Subscribe | Unsubscribe | SnapshotRequest


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
    zones = None if obj.get("zones") is None else _zone_list(obj)
    if zones is not None and zone is not None:
        raise _invalid("give 'zones' or 'market_zone', not both")
    start, end = obj.get("from"), obj.get("to")
    for name, value in (("from", start), ("to", end)):
        if value is not None and not isinstance(value, str):
            raise _invalid(f"'{name}' must be an ISO-8601 time string")
    if hours is not None and (start is not None or end is not None):
        raise _invalid("give 'hours' or 'from'/'to', not both")
    return RequestHistory(zone, hours, limit, zones, start, end)  # echoed back as asked


def _decode_snapshot(obj: dict[str, Any]) -> SnapshotRequest:
    return SnapshotRequest(None if obj.get("zones") is None else _zone_list(obj))


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
    value = obj.get(RATE_FIELD)
    try:
        max_rate = None if value is None else parse_rate(value)
    except RateError as exc:
        raise _invalid(str(exc)) from None
    return Subscribe(zones, since, epoch, max_rate)


_DECODERS: dict[str, Callable[[dict[str, Any]], ClientMessage]] = {
    MessageType.PING: lambda obj: Ping(),
    MessageType.HEARTBEAT: lambda obj: Heartbeat(),
    MessageType.REQUEST_PRICE_HISTORY: _decode_history,
    MessageType.SUBSCRIBE: _decode_subscribe,
    MessageType.UNSUBSCRIBE: lambda obj: Unsubscribe(_zone_list(obj)),
    MessageType.SNAPSHOT: _decode_snapshot,
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
                   "hours": message.hours, "limit": message.limit,
                   "zones": None if message.zones is None else list(message.zones),
                   "from": message.start, "to": message.end}  # fmt: skip
        case Subscribe():
            obj = {"type": MessageType.SUBSCRIBE, "zones": list(message.zones),
                   "since": dict(message.since) or None, "epoch": message.epoch,
                   RATE_FIELD: message.max_rate}  # fmt: skip
        case Unsubscribe():
            obj = {"type": MessageType.UNSUBSCRIBE, "zones": list(message.zones)}
        case SnapshotRequest():
            obj = {"type": MessageType.SNAPSHOT,
                   "zones": None if message.zones is None else list(message.zones)}  # fmt: skip
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


def price_update(
    payload: bytes, *, replay: bool = False, conflated: bool = False, skipped: int | None = None
) -> bytes:
    """A ``price_update`` built by splicing the stored price object (no re-encoding).

    ``skipped`` (``max_rate``, a slow reader's conflation): how many updates of the zone
    this one replaces, its seq minus the previous delivered seq of that zone minus 1,
    right after the type."""
    flags = (b'"replay":true,' if replay else b"") + (b'"conflated":true,' if conflated else b"")
    if skipped is not None:
        flags = b'"skipped":%d,' % skipped + flags
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


# --- many zones at once: snapshot, history by market time (PROTOCOL.md, Trading-grade) ---
#
# Pure checks and builders, shared by the HTTP endpoints and the WebSocket session: the
# storage reads (``Storage.snapshot``, ``Storage.history_between``) sit between them.

DEFAULT_RANGE_LIMIT = 1000  # prices in a history by market time when no limit is given
MAX_RANGE_LIMIT = 10_000


class StoredLike(Protocol):
    """A stored price as these builders read it (``storage.base.StoredPrice``)."""

    @property
    def zone(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def payload(self) -> bytes: ...


class SnapshotLike(Protocol):
    """A storage snapshot as ``snapshot_reply`` reads it (``storage.base.Snapshot``)."""

    @property
    def epoch(self) -> str: ...

    @property
    def prices(self) -> Mapping[str, StoredLike | None]: ...


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A checked history by market time: ``[start, end)`` in the stored timestamp form
    (so the storage compares strings), ``zones`` known and distinct, ``limit`` within
    bounds; ``market_zone`` when one zone was asked for by that name (echoed)."""

    zones: tuple[str, ...]
    start: str
    end: str
    limit: int
    market_zone: str | None = None


def _bound(name: str, value: str) -> str:
    """A range bound in the stored form, rounded up to the millisecond: stored times have
    milliseconds, so ``stored >= bound`` is then exactly ``stored >= value`` (and the same
    for ``<``), whatever finer digits the client sent."""
    try:
        moment = _moment(value)
        extra = moment.microsecond % 1000
        if extra:
            moment += timedelta(microseconds=1000 - extra)
        return format_timestamp(moment)
    except (ValueError, OverflowError) as exc:
        message = str(exc) if isinstance(exc, ValueError) else f"time out of range: {value[:40]!r}"
        raise ValidationError(name, message, code=HttpErrorCode.INVALID_TIMESTAMP) from None


def known_zones(zones: Iterable[str], known: Collection[str]) -> tuple[str, ...]:
    """``zones`` without repeats, order kept, each one served; else ``ValidationError``
    (field ``zones``, code ``unknown_zone``). None asked for is an error too."""
    distinct = tuple(dict.fromkeys(zones))
    if not distinct:
        raise ValidationError("zones", "no zone given", code=HttpErrorCode.INVALID_ZONE)
    for zone in distinct:
        if zone not in known:
            text = unknown_zone_text(zone, known)
            raise ValidationError("zones", text, code=HttpErrorCode.UNKNOWN_ZONE)
    return distinct


def zones_from_query(
    raw: str | None, *, known: Collection[str], default: Sequence[str]
) -> tuple[str, ...]:
    """``?zones=a,b`` of an HTTP endpoint (absent: ``default``), checked as ``known_zones``."""
    if raw is None:
        return known_zones(default, known)
    return known_zones((zone.strip() for zone in raw.split(",") if zone.strip()), known)


def history_range(
    *,
    zones: Sequence[str],
    start: str | None,
    end: str | None,
    limit: int | None,
    known: Collection[str],
    now: str,
    market_zone: str | None = None,
) -> HistoryQuery:
    """Check a history by market time; ``ValidationError`` names the field (``zones``,
    ``from``, ``to``, ``limit``) and carries the HTTP error code. ``end`` None: ``now``.
    ``from`` after ``to`` is refused; equal, the range is empty (``[t, t)``)."""
    checked = known_zones(zones, known)
    if start is None:
        raise ValidationError("from", "is required", code=HttpErrorCode.INVALID_TIMESTAMP)
    begin = _bound("from", start)
    finish = now if end is None else _bound("to", end)
    if begin > finish:
        raise ValidationError("from", "is after 'to'", code=HttpErrorCode.INVALID_RANGE)
    if limit is None:
        limit = DEFAULT_RANGE_LIMIT
    elif not 1 <= limit <= MAX_RANGE_LIMIT:
        raise ValidationError(
            "limit", f"must be an integer from 1 to {MAX_RANGE_LIMIT}",
            code=HttpErrorCode.INVALID_LIMIT,
        )  # fmt: skip
    return HistoryQuery(checked, begin, finish, limit, market_zone)


def parse_history_request(
    request: RequestHistory, *, zones: Collection[str], default_zones: Sequence[str], now: str
) -> HistoryQuery | None:
    """The WebSocket ``request_price_history`` by market time, checked: None when it is a
    request by count (no ``from``, ``to`` nor ``zones``); ``ProtocolError``
    ``invalid_message`` for a bad range, as the contract says (unknown zones included).
    ``zones``: the zones served; ``default_zones``: the socket's (no ``zones`` nor
    ``market_zone`` given)."""
    if not request.by_time:
        return None
    if request.zones is not None:
        asked: Sequence[str] = request.zones
    elif request.market_zone is not None:
        asked = (request.market_zone,)
    else:
        asked = default_zones
    try:
        return history_range(
            zones=asked, start=request.start, end=request.end, limit=request.limit,
            known=zones, now=now, market_zone=request.market_zone,
        )  # fmt: skip
    except ValidationError as exc:
        raise _invalid(str(exc)) from None


# A resume on a subscriber's URL (and the ``subscribe`` fields of the same names).
SINCE = "since"
EPOCH = "epoch"
# The longest entry of a ``since`` vector: a zone name, a colon, a seq of MAX_SEQ's digits and
# the comma before the next one.
_VECTOR_ENTRY = 32 + 1 + len(str(MAX_SEQ)) + 1


def parse_since_vector(raw: str, zones: Collection[str]) -> dict[str, int]:
    """The ``since`` of a several-zones URL, ``since=pjm:12,ercot:40``: where to resume
    each zone named (a zone not named starts fresh). Each zone is one of ``zones`` (the
    URL's), named once, with a seq from 0 to ``MAX_SEQ``; at most one entry per zone, so
    the text is bounded by the zones. Raises ``ProtocolError`` ``invalid_message``
    (answered as each transport answers a bad single-zone ``since``)."""
    if not raw or len(raw) > max(1, len(zones)) * _VECTOR_ENTRY:
        raise _invalid("'since' must be zone:seq pairs of this socket's zones, comma-separated")
    vector: dict[str, int] = {}
    for entry in raw.split(","):
        zone, colon, seq_text = entry.partition(":")
        seq = parse_count(seq_text, max_digits=len(str(MAX_SEQ)))
        if not colon or seq is None or seq > MAX_SEQ:
            raise _invalid(f"'since' entry {entry[:60]!r} is not zone:seq (seq >= 0)")
        if zone not in zones:
            raise _invalid(f"'since' names {zone[:40]!r}, not one of this socket's zones")
        if zone in vector:
            raise _invalid(f"'since' names {zone[:40]!r} twice")
        vector[zone] = seq
    return vector


def parse_snapshot_request(
    request: SnapshotRequest, *, zones: Collection[str], default_zones: Sequence[str]
) -> tuple[str, ...]:
    """The zones of a WebSocket ``snapshot`` (default: the socket's), each one served, or
    ``ProtocolError`` ``unknown_zone`` (as ``subscribe`` refuses one)."""
    asked = default_zones if request.zones is None else request.zones
    for zone in asked:
        if zone not in zones:
            case = zone_case_error(zone, zones)
            raise case or ProtocolError(ErrorCode.UNKNOWN_ZONE, f"unknown zone {zone[:40]!r}")
    return tuple(dict.fromkeys(asked))


def snapshot_reply(snapshot: SnapshotLike, *, now: str) -> bytes:
    """The ``snapshot`` message (also the HTTP body): ``epoch``, ``prices`` (each zone's
    price object or null) and ``cursor`` (each zone's seq, 0 without a price)."""
    prices = snapshot.prices
    return encode({
        "type": MessageType.SNAPSHOT,
        "epoch": snapshot.epoch,
        "prices": {
            zone: None if price is None else orjson.Fragment(price_object(price.payload))
            for zone, price in prices.items()
        },
        "cursor": {zone: 0 if price is None else price.seq for zone, price in prices.items()},
        "timestamp": now,
    })  # fmt: skip


def _range_fields(
    query: HistoryQuery, prices: Sequence[StoredLike], truncated: bool
) -> dict[str, Any]:
    highest: dict[str, int] = {}
    for price in prices:
        if price.seq > highest.get(price.zone, 0):
            highest[price.zone] = price.seq
    fields: dict[str, Any] = {} if query.market_zone is None else {
        "market_zone": query.market_zone
    }  # fmt: skip
    fields.update(
        zones=list(query.zones),
        data=[orjson.Fragment(price_object(price.payload)) for price in prices],
        truncated=truncated,
        # The hand-over to the live stream: subscribe with since = this (zones without a
        # price in the answer have no position in it and are left out).
        cursor={zone: highest[zone] for zone in query.zones if zone in highest},
        limit=query.limit,
    )
    fields["from"], fields["to"] = query.start, query.end
    return fields


def price_history_range(
    query: HistoryQuery, prices: Sequence[StoredLike], *, truncated: bool, now: str
) -> bytes:
    """The ``price_history`` answer to a request by market time (``prices`` in history
    order, as ``Storage.history_between`` gives them)."""
    message = {"type": MessageType.PRICE_HISTORY, **_range_fields(query, prices, truncated)}
    message["timestamp"] = now
    return encode(message)


def history_range_body(
    query: HistoryQuery, prices: Sequence[StoredLike], *, truncated: bool
) -> bytes:
    """The HTTP body of a history by market time: ``price_history_range``'s fields."""
    return encode(_range_fields(query, prices, truncated))
