"""The Server-Sent Events encoding of the wire messages, and the resume cursor (pure).

Every server message of the WebSocket tables is one event: ``event: <type>`` and
``data: <the same JSON object>`` (one line: orjson never writes a newline). A
``price_update`` (and the ``initial_data`` that stands in for it) also carries ``id:``,
the stream's *cursor*: the epoch and the last seq of every zone of the stream, so a
client reconnecting with ``Last-Event-ID`` names exactly where it stopped in each zone.

Cursor format (opaque to clients, ASCII, no spaces)::

    <epoch>.<zone-set hash>.<base>.<width letter><deltas>

with the stream's zones in sorted order and the hash the CRC-32 (8 hex digits) of those
zones joined by commas: a cursor replayed against another zone set is rejected rather
than read as the wrong zones' seqs. ``base`` (decimal) is the smallest seq of the
stream's zones; ``deltas`` is base64url (no padding) of each zone's seq minus ``base``,
in ``width`` bytes big-endian (``a`` = 1 ... ``h`` = 8, the fewest that hold the largest
difference). A zone costs 4/3 x width characters instead of a decimal seq and a dot:
1,000 zones whose seqs differ by less than 65,536 take 2.7 KB. The widest cursor
(``MAX_STREAM_ZONES`` zones, seqs anywhere below 2^63) is ``MAX_CURSOR`` characters, so
every id the server writes is one it accepts back; a stream carries at most
``MAX_STREAM_ZONES`` zones. The previous, decimal format (``<epoch>.<hash>.<seq>.<seq>...``)
is still read, so a client holding one resumes across an upgrade.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pricehub.wire.codes import ErrorCode, MessageType
from pricehub.wire.errors import ProtocolError

__all__ = [
    "CURSOR_TYPES",
    "MAX_CURSOR",
    "MAX_SEQ",
    "MAX_STREAM_ZONES",
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
MAX_STREAM_ZONES = 1000  # zones of one stream (also bounded by --max-zones-per-socket)
MAX_SEQ = 2**63 - 1  # what a store hands out (Redis INCR's limit)
_WIDTHS = "abcdefgh"  # the width letter: index + 1 bytes per zone
# epoch, hash, base (19 digits), three dots and the width letter, then the deltas.
MAX_CURSOR = 64 + 8 + 19 + 4 + -(-MAX_STREAM_ZONES * len(_WIDTHS) * 4 // 3)
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DELTAS = re.compile(r"[A-Za-z0-9_-]*")
_TYPE_PREFIX = b'{"type":"'


def zone_set_hash(zones: Iterable[str]) -> str:
    return _layout(frozenset(zones))[1]


@lru_cache(maxsize=4096)
def _layout(zones: frozenset[str]) -> tuple[tuple[str, ...], str]:
    """A zone set's sorted order and hash: computed once per set, not once per event."""
    ordered = tuple(sorted(zones))
    return ordered, f"{zlib.crc32(','.join(ordered).encode()):08x}"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a stream stopped: its epoch and the last seq it delivered per zone."""

    epoch: str
    seqs: Mapping[str, int]


def encode_cursor(epoch: str, zones: Iterable[str], seqs: Mapping[str, int]) -> bytes:
    """The ``id:`` value for ``zones`` (any order) at ``seqs`` (a zone missing: 0)."""
    ordered, digest = _layout(frozenset(zones))
    values = [seqs.get(zone, 0) for zone in ordered]
    base = min(values)
    width = max(1, ((max(values) - base).bit_length() + 7) // 8)
    packed = b"".join([(value - base).to_bytes(width, "big") for value in values])
    deltas = base64.urlsafe_b64encode(packed).rstrip(b"=")
    return b"%s.%s.%d.%s%s" % (
        epoch.encode(), digest.encode(), base, _WIDTHS[width - 1].encode(), deltas
    )


def decode_cursor(text: str, zones: Sequence[str]) -> Cursor:
    """Parse a ``Last-Event-ID`` for a stream on ``zones``; ``ProtocolError`` if malformed
    or made for another set of zones (answered with HTTP 400)."""
    if len(text) > MAX_CURSOR or not text.isascii():
        raise _malformed()
    parts = text.strip().split(".")
    ordered, digest = _layout(frozenset(zones))
    if len(parts) < 3 or not _EPOCH.fullmatch(parts[0]):
        raise _malformed()
    if parts[1] != digest:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Last-Event-ID is for another set of zones")
    if len(parts) == 4 and parts[3][:1].isalpha():  # a width letter, never a decimal seq
        values = _packed_seqs(parts[2], parts[3], len(ordered))
    else:
        values = [_seq(raw) for raw in parts[2:]]  # the previous format: one decimal a zone
    if len(values) != len(ordered) or max(values, default=0) > MAX_SEQ:
        raise _malformed()
    return Cursor(parts[0], dict(zip(ordered, values, strict=True)))


def _packed_seqs(base_text: str, field: str, count: int) -> list[int]:
    """The seqs of ``<base>.<width letter><deltas>``; ``count`` zones."""
    width, deltas = _WIDTHS.find(field[0]) + 1, field[1:]
    if not width or len(deltas) != -(-count * width * 4 // 3) or not _DELTAS.fullmatch(deltas):
        raise _malformed()
    base = _seq(base_text)
    try:
        packed = base64.urlsafe_b64decode(deltas + "=" * (-len(deltas) % 4))
    except (binascii.Error, ValueError):
        raise _malformed() from None
    return [
        base + int.from_bytes(packed[start : start + width], "big")
        for start in range(0, count * width, width)
    ]


def _seq(raw: str) -> int:
    if not (0 < len(raw) <= 19 and raw.isdigit()):  # isdigit of ASCII text: 0-9 only
        raise _malformed()
    return int(raw)


def _malformed() -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, "malformed Last-Event-ID")


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
