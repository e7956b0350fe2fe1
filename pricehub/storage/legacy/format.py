"""The journal's on-disk format: framed, checksummed records (see ``legacy.journal``).

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

A log segment is ``SEGMENT_MAGIC`` then *writes*: each ``write`` + ``fsync`` the journal
makes (one group-committed batch) is a ``WRITE`` header frame, ``<u8 type> <u64 bytes>``,
then exactly that many bytes of record frames. Knowing where each write starts and ends
is what tells a torn tail from damage (``scan_segment``): a crash can only tear the write
that was in flight, and tear it anywhere (out-of-order writeback can zero a page in its
middle while later pages land), whereas a bad frame in a write that a later write
follows is damage to data that was acknowledged. A segment of the previous format
(``LEGACY_SEGMENT_MAGIC``) has no write headers: each frame counts as its own write.

A snapshot is ``SNAPSHOT_MAGIC``, one ``EPOCH``, one ``RESET`` per zone and ``END``, as
plain frames (it is written whole and renamed into place: it has no torn tail).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pricehub.storage.base import StoredPrice
from pricehub.storage.datadir import EpochRecord, ResetRecord

__all__ = [
    "FRAME_HEADER",
    "LEGACY_SEGMENT_MAGIC",
    "MAX_FRAME",
    "SEGMENT_MAGIC",
    "SNAPSHOT_MAGIC",
    "BadFrame",
    "EpochRecord",
    "FormatError",
    "Frame",
    "PriceRecord",
    "Record",
    "ResetRecord",
    "ScanResult",
    "SegmentScan",
    "SnapshotEnd",
    "decode_body",
    "encode_end",
    "encode_epoch",
    "encode_price",
    "encode_reset",
    "encode_write",
    "find_frame_after",
    "scan_frames",
    "scan_segment",
]

SEGMENT_MAGIC = b"PHJLOG2\n"
LEGACY_SEGMENT_MAGIC = b"PHJLOG1\n"
SNAPSHOT_MAGIC = b"PHJSNP1\n"
FRAME_HEADER = struct.Struct("<II")
# Far above any real record (a RESET of a 1000-price history is a few hundred KB); a
# length beyond it is damage, and it bounds what a torn-tail probe will checksum.
MAX_FRAME = 256 * 1024 * 1024

PRICE, EPOCH, RESET, END, WRITE = 1, 2, 3, 4, 5
_ZONE = struct.Struct("<BH")
_SEQ = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_ITEM = struct.Struct("<QI")
_TYPE = struct.Struct("<B")
_END = struct.Struct("<BI")
_WRITE = struct.Struct("<BQ")
# Every write header is a frame of this fixed length: its first four bytes are what a
# search for the next write looks for (``bytes.find``: C speed, even over a long tail).
_WRITE_HEADER_START = struct.pack("<I", _WRITE.size)
_NONZERO = re.compile(rb"[^\x00]")


class FormatError(ValueError):
    """A frame passed its checksum but its body makes no sense (damage or a bug)."""


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


def encode_write(frames: bytes) -> bytes:
    """One write of a segment: its header, then ``frames`` (encoded records)."""
    return _frame(_WRITE.pack(WRITE, len(frames))) + frames


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


def _frame_at(
    data: bytes | memoryview, offset: int, limit: int | None = None
) -> tuple[bytes, int] | str:
    """The body of the frame at ``offset`` and the offset after it, or why there is none
    (a frame must end by ``limit``, the end of ``data`` by default)."""
    end = len(data) if limit is None or limit > len(data) else limit
    if offset + FRAME_HEADER.size > end:
        return "partial frame header"
    length, crc = FRAME_HEADER.unpack_from(data, offset)
    start = offset + FRAME_HEADER.size
    if length == 0 or length > MAX_FRAME:
        return f"impossible frame length {length}"
    if start + length > end:
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


def _next_nonzero(data: bytes, offset: int) -> int | None:
    found = _NONZERO.search(data, offset)
    return None if found is None else found.start()


def find_frame_after(data: bytes, offset: int) -> int | None:
    """The first offset after ``offset`` where a whole, checksummed frame starts.

    A run of zeros (a file that grew while its data never reached the disk) is skipped
    at C speed: a frame cannot start where its four length bytes are all zero.
    """
    view = memoryview(data)
    candidate = offset + 1
    while candidate <= len(data) - FRAME_HEADER.size:
        if not any(view[candidate : candidate + 4]):
            nonzero = _next_nonzero(data, candidate)
            if nonzero is None:
                return None
            # The earliest start whose length bytes reach the nonzero byte.
            candidate = max(candidate + 1, nonzero - 3)
            continue
        length = int.from_bytes(view[candidate : candidate + 4], "little")
        if 0 < length <= len(data) - candidate - FRAME_HEADER.size and isinstance(
            _frame_at(view, candidate), tuple
        ):
            return candidate
        candidate += 1
    return None


class Frame(NamedTuple):
    """A good record frame of a segment: where it starts and its body (a tuple: a
    replay makes one per record)."""

    offset: int
    body: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Where a segment's good part ends.

    ``write_start`` is where the write holding the bad frame starts (``offset`` itself
    when the bad frame is that write's header). ``followed`` says whether anything on
    disk proves that another write began after that one: a good write header further
    on, or any non-zero byte past its declared end. A write that another one followed
    had returned from its fsync, so it was acknowledged: the bad frame is damage. One
    that nothing followed was the last write, possibly never acknowledged: a torn tail.
    """

    offset: int
    reason: str
    write_start: int
    followed: bool


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """Every good record frame before the first bad frame (of the bad write too), in
    order, and the bad frame if any."""

    frames: list[Frame]
    bad: BadFrame | None


def _write_header_at(data: bytes | memoryview, offset: int) -> int | str:
    """The declared end of the write whose header is at ``offset``, or why none is."""
    found = _frame_at(data, offset)
    if isinstance(found, str):
        return f"{found} (write header)"
    body, end = found
    if len(body) != _WRITE.size or body[0] != WRITE:
        return "not a write header"
    declared: int = _WRITE.unpack(body)[1]
    return end + declared


def _find_write_after(data: bytes, offset: int) -> int | None:
    """The first good write header starting after ``offset``."""
    candidate = data.find(_WRITE_HEADER_START, offset + 1)
    while candidate != -1:
        if isinstance(_write_header_at(data, candidate), int):
            return candidate
        candidate = data.find(_WRITE_HEADER_START, candidate + 1)
    return None


def _scan_legacy(data: bytes, offset: int) -> SegmentScan:
    """A segment without write headers: each frame is taken as its own write."""
    frames: list[Frame] = []
    while offset < len(data):
        found = _frame_at(data, offset)
        if isinstance(found, str):
            followed = find_frame_after(data, offset) is not None
            return SegmentScan(frames, BadFrame(offset, found, offset, followed))
        frames.append(Frame(offset, found[0]))
        offset = found[1]
    return SegmentScan(frames, None)


def scan_segment(data: bytes, *, legacy: bool = False) -> SegmentScan:
    """The records of a segment's bytes (magic included), write by write, up to the
    first bad frame; see ``BadFrame`` for what tells a torn tail from damage."""
    if legacy:
        return _scan_legacy(data, len(LEGACY_SEGMENT_MAGIC))
    frames: list[Frame] = []
    write = len(SEGMENT_MAGIC)
    while write < len(data):
        end = _write_header_at(data, write)
        if isinstance(end, str):
            followed = _find_write_after(data, write) is not None
            return SegmentScan(frames, BadFrame(write, end, write, followed))
        offset = write + FRAME_HEADER.size + _WRITE.size
        while offset < end:
            found = _frame_at(data, offset, end)  # a record may not run past its write
            if isinstance(found, str):
                followed = (
                    _find_write_after(data, offset) is not None
                    or _next_nonzero(data, end) is not None
                )
                return SegmentScan(frames, BadFrame(offset, found, write, followed))
            frames.append(Frame(offset, found[0]))
            offset = found[1]
        write = end
    return SegmentScan(frames, None)
