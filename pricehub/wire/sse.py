"""The Server-Sent Events encoding of the wire messages, and the resume cursor (pure).

Every server message of the WebSocket tables is one event: ``event: <type>`` and
``data: <the same JSON object>`` (one line: orjson never writes a newline). A
``price_update`` (and the ``initial_data`` that stands in for it) also carries ``id:``,
the stream's *cursor*: the epoch and the last seq of every zone of the stream, so a
client reconnecting with ``Last-Event-ID`` names exactly where it stopped in each zone.

Cursor format (opaque to clients, ASCII, no spaces)::

    <epoch>.<zone-set hash>.<seq of zone 1>.<seq of zone 2>...

with the stream's zones in sorted order and the hash the CRC-32 (8 hex digits) of those
zones joined by commas: a cursor replayed against another zone set is rejected rather
than read as the wrong zones' seqs. Seqs are written only as the zones' current values,
so the id of one update costs one short string per stream (or per audience).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pricehub.wire.codes import MessageType
from pricehub.wire.errors import ProtocolError

__all__ = [
    "CURSOR_TYPES",
    "PING",
    "RETRY",
    "Cursor",
    "decode_cursor",
    "encode_cursor",
    "event",
    "event_data",
    "message_type",
    "zone_set_hash",
]

RETRY = b"retry: 1000\n\n"  # the first response line: EventSource waits 1 s to reconnect
PING = b": ping\n\n"  # a comment: keeps proxies from timing the stream out
MAX_CURSOR = 4096  # bytes; a longer Last-Event-ID is malformed (bounds what is parsed)
_EPOCH = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TYPE_PREFIX = b'{"type":"'


def zone_set_hash(zones: Iterable[str]) -> str:
    return f"{zlib.crc32(','.join(sorted(zones)).encode()):08x}"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a stream stopped: its epoch and the last seq it delivered per zone."""

    epoch: str
    seqs: Mapping[str, int]


def encode_cursor(epoch: str, zones: Iterable[str], seqs: Mapping[str, int]) -> bytes:
    """The ``id:`` value for ``zones`` (any order) at ``seqs``."""
    ordered = sorted(zones)
    parts = [epoch, zone_set_hash(ordered), *(str(seqs.get(zone, 0)) for zone in ordered)]
    return ".".join(parts).encode()


def decode_cursor(text: str, zones: Sequence[str]) -> Cursor:
    """Parse a ``Last-Event-ID`` for a stream on ``zones``; ``ProtocolError`` if malformed
    or made for another set of zones (answered with HTTP 400)."""
    if len(text) > MAX_CURSOR or not text.isascii():
        raise ProtocolError("invalid_message", "malformed Last-Event-ID")
    parts = text.strip().split(".")
    ordered = sorted(zones)
    if len(parts) != 2 + len(ordered) or not _EPOCH.match(parts[0]):
        raise ProtocolError("invalid_message", "malformed Last-Event-ID")
    if parts[1] != zone_set_hash(ordered):
        raise ProtocolError("invalid_message", "Last-Event-ID is for another set of zones")
    seqs: dict[str, int] = {}
    for zone, raw in zip(ordered, parts[2:], strict=True):
        if not (0 < len(raw) <= 18 and raw.isdigit()):
            raise ProtocolError("invalid_message", "malformed Last-Event-ID")
        seqs[zone] = int(raw)
    return Cursor(parts[0], seqs)


def message_type(payload: bytes) -> bytes:
    """The ``type`` of an encoded server message, without parsing it: every builder in
    ``pricehub.wire.messages`` writes ``type`` first (a test keeps that true)."""
    if not payload.startswith(_TYPE_PREFIX):
        raise ValueError("server message does not start with its type")
    end = payload.index(b'"', len(_TYPE_PREFIX))
    return payload[len(_TYPE_PREFIX) : end]


def event_data(payload: bytes) -> bytes:
    """``event:`` and ``data:`` lines of one message, without the id and the blank line
    that ends the event: built once per update and shared by every SSE stream."""
    return b"event: " + message_type(payload) + b"\ndata: " + payload + b"\n"


def event(payload: bytes, *, cursor: bytes | None = None) -> bytes:
    """A complete event: data, the optional ``id:`` line, the terminating blank line."""
    if cursor is None:
        return event_data(payload) + b"\n"
    return event_data(payload) + b"id: " + cursor + b"\n\n"


CURSOR_TYPES = frozenset({MessageType.PRICE_UPDATE.encode(), MessageType.INITIAL_DATA.encode()})
