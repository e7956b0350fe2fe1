"""The journal's on-disk format: framed, checksummed records (see ``journal.py``).

Every record is a frame::

    <u32 length> <u32 crc> <body: length bytes>

little-endian, where ``crc`` is CRC32 over the four length bytes *and* the body. Covering
the length matters: a crash can leave a tail of zeros (the file grew, the data never
reached the disk), and a zero length with a zero CRC would otherwise pass as a record.

A body starts with its type byte:

* ``PRICE``: ``<u16 zone length> zone <u64 seq> payload`` (payload runs to the end);
* ``EPOCH``: the epoch, UTF-8;
* ``RESET``: ``<u16 zone length> zone <u64 seq> <u32 count>`` then ``count`` times
  ``<u64 seq> <u32 length> payload``: the zone's whole seq and retained history;
* ``END``: ``<u32 zones>``, the last record of a snapshot (a snapshot without it is
  incomplete, although the rename makes that impossible short of damage).

A log segment is ``SEGMENT_MAGIC`` then frames; a snapshot is ``SNAPSHOT_MAGIC``, one
``EPOCH``, one ``RESET`` per zone and ``END``. Both are plain frame streams, so one
decoder reads both.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from pricehub.storage.base import StoredPrice

__all__ = [
    "FRAME_HEADER",
    "MAX_FRAME",
    "SEGMENT_MAGIC",
    "SNAPSHOT_MAGIC",
    "EpochRecord",
    "FormatError",
    "PriceRecord",
    "Record",
    "ResetRecord",
    "ScanResult",
    "SnapshotEnd",
    "decode_body",
    "encode_end",
    "encode_epoch",
    "encode_price",
    "encode_reset",
    "find_frame_after",
    "scan_frames",
]

SEGMENT_MAGIC = b"PHJLOG1\n"
SNAPSHOT_MAGIC = b"PHJSNP1\n"
FRAME_HEADER = struct.Struct("<II")
# Far above any real record (a RESET of a 1000-price history is a few hundred KB); a
# length beyond it is damage, and it bounds what a torn-tail probe will checksum.
MAX_FRAME = 256 * 1024 * 1024

PRICE, EPOCH, RESET, END = 1, 2, 3, 4
_ZONE = struct.Struct("<BH")
_SEQ = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_ITEM = struct.Struct("<QI")
_TYPE = struct.Struct("<B")
_END = struct.Struct("<BI")


class FormatError(ValueError):
    """A frame passed its checksum but its body makes no sense (damage or a bug)."""


@dataclass(frozen=True, slots=True)
class EpochRecord:
    epoch: str


@dataclass(frozen=True, slots=True)
class ResetRecord:
    zone: str
    seq: int
    prices: tuple[StoredPrice, ...]


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    zones: int


@dataclass(frozen=True, slots=True)
class PriceRecord:
    price: StoredPrice


Record = PriceRecord | EpochRecord | ResetRecord | SnapshotEnd


def _frame(body: bytes) -> bytes:
    length_bytes = _COUNT.pack(len(body))
    return length_bytes + _COUNT.pack(zlib.crc32(body, zlib.crc32(length_bytes))) + body


def _zone_header(kind: int, zone: str) -> bytes:
    name = zone.encode()
    return _ZONE.pack(kind, len(name)) + name


def encode_price(price: StoredPrice) -> bytes:
    return _frame(_zone_header(PRICE, price.zone) + _SEQ.pack(price.seq) + price.payload)


def encode_epoch(epoch: str) -> bytes:
    return _frame(_TYPE.pack(EPOCH) + epoch.encode())


def encode_reset(zone: str, seq: int, prices: Sequence[StoredPrice]) -> bytes:
    parts = [_zone_header(RESET, zone), _SEQ.pack(seq), _COUNT.pack(len(prices))]
    for price in prices:
        parts.append(_ITEM.pack(price.seq, len(price.payload)))
        parts.append(price.payload)
    return _frame(b"".join(parts))


def encode_end(zones: int) -> bytes:
    return _frame(_END.pack(END, zones))


def _read_zone(body: bytes) -> tuple[str, int]:
    """The zone name of a PRICE/RESET body and the offset just after it."""
    _, length = _ZONE.unpack_from(body, 0)
    end = _ZONE.size + length
    if end > len(body):
        raise FormatError("zone name runs past the record")
    return body[_ZONE.size : end].decode(), end


def _decode_reset(body: bytes) -> ResetRecord:
    zone, offset = _read_zone(body)
    (seq,) = _SEQ.unpack_from(body, offset)
    (count,) = _COUNT.unpack_from(body, offset + _SEQ.size)
    offset += _SEQ.size + _COUNT.size
    prices = []
    for _ in range(count):
        item_seq, length = _ITEM.unpack_from(body, offset)
        offset += _ITEM.size
        if offset + length > len(body):
            raise FormatError("reset price runs past the record")
        prices.append(StoredPrice(zone, item_seq, body[offset : offset + length]))
        offset += length
    if offset != len(body):
        raise FormatError("trailing bytes after a reset record")
    return ResetRecord(zone, seq, tuple(prices))


def decode_body(body: bytes) -> Record:
    """The record a checksummed frame body holds; ``FormatError`` if it holds none."""
    try:
        kind = body[0]
        if kind == PRICE:
            zone, offset = _read_zone(body)
            (seq,) = _SEQ.unpack_from(body, offset)
            return PriceRecord(StoredPrice(zone, seq, body[offset + _SEQ.size :]))
        if kind == EPOCH:
            return EpochRecord(body[1:].decode())
        if kind == RESET:
            return _decode_reset(body)
        if kind == END:
            return SnapshotEnd(_END.unpack(body)[1])
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise FormatError(f"malformed record: {exc}") from exc
    raise FormatError(f"unknown record type {kind}")


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What ``scan_frames`` found: the good bodies, where the good part ends, and why
    scanning stopped early (``None`` when the data ended on a frame boundary)."""

    bodies: list[bytes]
    good_end: int
    error: str | None


def _frame_at(data: bytes | memoryview, offset: int) -> tuple[bytes, int] | str:
    """The body of the frame at ``offset`` and the offset after it, or why there is none."""
    if offset + FRAME_HEADER.size > len(data):
        return "partial frame header"
    length, crc = FRAME_HEADER.unpack_from(data, offset)
    start = offset + FRAME_HEADER.size
    if length == 0 or length > MAX_FRAME:
        return f"impossible frame length {length}"
    if start + length > len(data):
        return "partial frame body"
    body = bytes(data[start : start + length])
    if zlib.crc32(body, zlib.crc32(data[offset : offset + 4])) != crc:
        return "checksum mismatch"
    return body, start + length


def scan_frames(data: bytes, offset: int) -> ScanResult:
    """Every good frame from ``offset`` on, stopping at the first bad one."""
    bodies: list[bytes] = []
    while offset < len(data):
        found = _frame_at(data, offset)
        if isinstance(found, str):
            return ScanResult(bodies, offset, f"{found} at offset {offset}")
        body, offset = found
        bodies.append(body)
    return ScanResult(bodies, offset, None)


def find_frame_after(data: bytes, offset: int) -> int | None:
    """The first offset after ``offset`` where a whole, checksummed frame starts.

    Tells damage from a torn tail: a crash only ever tears what was written last, so a
    good frame *after* a bad one means bytes were damaged in the middle of the file.
    """
    view = memoryview(data)
    for candidate in range(offset + 1, len(data) - FRAME_HEADER.size + 1):
        length = int.from_bytes(view[candidate : candidate + 4], "little")
        if 0 < length <= len(data) - candidate - FRAME_HEADER.size and isinstance(
            _frame_at(view, candidate), tuple
        ):
            return candidate
    return None
