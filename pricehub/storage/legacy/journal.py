"""A durable journal for the in-memory store (PROTOCOL.md, "Durable in-memory storage").

The memory store numbers prices; this journal makes them survive a restart, clean or
SIGKILL. It is a write-ahead log plus snapshots in one data directory::

    LOCK                     flock'd by the one process using the directory (PID, host)
    meta.json                the owner's record of what the data describes (``write_meta``:
                             the failover's journal names the Redis feed it mirrors)
    wal-000000000007.log     log segments: one header + framed, CRC'd records per write
                             (``legacy.format``)
    snap-000000000007.snap   the whole state as of every segment numbered below 7
    *.corrupt-<time>         damaged files (and what followed them), kept aside

Only those exact names are the journal's (ASCII digits, zero-padded to 12, regular
files, a snapshot never empty): anything else in the directory (``wal-3.log``, a
directory named like a segment, ``snap-٣.snap``) is left alone, named in one
``journal_files_ignored`` warning per start, and new files are numbered above it.

*Appends* use group commit: a caller's records join a pending batch; one flusher task
writes the batch and fsyncs it in a worker thread, and every append that arrived while
that fsync was in flight goes into the next single write+fsync. A burst of N concurrent
publishes costs a handful of fsyncs, and the event loop never waits on the disk.

A write or fsync that fails (ENOSPC, EIO) fails its whole batch with ``DiskError`` and
abandons the segment: its torn bytes are cut back to the end of the last good write
(best effort) and the next batch starts a new segment, so a full disk that gets space
back heals by itself.

*Snapshots* keep the disk near history size x zones: once the log holds more than
``compact_factor`` x history size x zones-with-data records, the flusher rotates to a
new segment N between two batches, captures the state (references, no copies of
payloads), and a background thread writes ``snap-N.snap.tmp``, fsyncs it, renames it,
fsyncs the directory and only then deletes the segments and snapshots below N.

*Recovery* (``Journal.open``) loads the newest snapshot and replays the segments from its
number on, and recovers the longest intact prefix of that sequence:

* The *last write* is the group-committed batch whose write + fsync was in flight when
  the process died: never acknowledged, and tearable anywhere (a power cut with
  out-of-order writeback can zero a page in its middle and still land later pages). It
  can only be the newest segment's last write. A bad frame inside it (no later write's
  header after it, nothing but zeros past its declared end) is a *torn tail*: that whole
  write is cut off, with a ``journal_torn_tail`` warning; the epoch and everything
  before it stay.
* Any other bad frame (in an earlier write, in an older segment, in a snapshot, a file
  that cannot be read, a checksummed record that makes no sense) is *damage to
  acknowledged data*. Everything before it is kept (every earlier file, the damaged one
  up to the bad frame); the damaged file and every data file after it get a second name,
  ``<name>.corrupt-<timestamp>`` (never deleted); a snapshot of what was kept, under the
  caller's new epoch, supersedes them (``_supersede``); an error is logged. The lineage
  changes, since acknowledged seqs may be missing, but what was kept is served:
  ``Recovered`` holds it, with ``fresh_reason`` saying what happened.

Replayed records are checked, not only checksummed (``_Replay._refusal``, ``_payload_refusal``):
a zone name the server would refuse, a seq outside 1 .. 2^63-1, or a retained payload
that is not the JSON object of its seq is refused, named in one ``journal_records_refused``
warning, and never served.

Seq rules on replay (and in the live mirror, so both agree): a price with the zone's
next seq is appended; one further ahead restarts the zone's history at it (a batch in
between failed and its seqs were never reused); one at or below the zone's seq replaces
what it follows (a failed batch's seqs were reused, and the failed batch may still have
reached the disk). So a caller should roll back the seqs of a failed append.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import structlog

import pricehub.storage.legacy.format as fmt
from pricehub.storage.base import JournalStats, StoredPrice
from pricehub.storage.datadir import LOCK_NAME, Recovered, RecoveredZone, acquire_lock, fsync_dir
from pricehub.storage.errors import DiskError, JournalLocked, JournalUnavailable
from pricehub.wire.messages import ZONE_RE

__all__ = [
    "DiskError",
    "Journal",
    "JournalLocked",
    "JournalStats",
    "JournalUnavailable",
    "Recovered",
    "RecoveredZone",
]

META_NAME = "meta.json"
_SEGMENT_PREFIX, _SEGMENT_SUFFIX = "wal-", ".log"
_SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX = "snap-", ".snap"
_TMP_SUFFIX = ".tmp"
_RECENT_FSYNCS = 64


# --- state -------------------------------------------------------------------------


class _Zone:
    __slots__ = ("history", "seq")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.history: deque[StoredPrice] = deque(maxlen=history_size)

    def add(self, price: StoredPrice) -> bool:
        """Apply one price by the module's seq rules; False when history restarted."""
        if price.seq == self.seq + 1:
            self.history.append(price)
            self.seq = price.seq
            return True
        while self.history and self.history[-1].seq >= price.seq:
            self.history.pop()
        contiguous = bool(self.history) and self.history[-1].seq == price.seq - 1
        if not contiguous:
            self.history.clear()
        self.history.append(price)
        self.seq = price.seq
        return contiguous

    def reset(self, seq: int, prices: Iterable[StoredPrice]) -> None:
        self.seq = seq
        self.history.clear()
        self.history.extend(prices)


@dataclass(frozen=True, slots=True)
class _Capture:
    """The state at a snapshot point: tuples of references, cheap to take on the loop."""

    epoch: str
    zones: tuple[tuple[str, int, tuple[StoredPrice, ...]], ...]


class _State:
    def __init__(self, history_size: int) -> None:
        self.history_size = history_size
        self.epoch: str | None = None
        self.zones: dict[str, _Zone] = {}
        self.restarts = 0

    def zone(self, name: str) -> _Zone:
        zone = self.zones.get(name)
        if zone is None:
            zone = self.zones[name] = _Zone(self.history_size)
        return zone

    def apply(self, record: fmt.Record) -> None:
        if isinstance(record, fmt.PriceRecord):
            if not self.zone(record.price.zone).add(record.price):
                self.restarts += 1
        elif isinstance(record, fmt.EpochRecord):
            self.epoch = record.epoch
        elif isinstance(record, fmt.ResetRecord):
            self.zone(record.zone).reset(record.seq, record.prices)
        else:
            raise fmt.FormatError("snapshot end record inside a log segment")

    def capture(self) -> _Capture:
        assert self.epoch is not None  # a journal always has one once open
        zones = tuple((name, zone.seq, tuple(zone.history)) for name, zone in self.zones.items())
        return _Capture(self.epoch, zones)

    def export(self) -> dict[str, RecoveredZone]:
        return {
            name: RecoveredZone(zone.seq, tuple(zone.history)) for name, zone in self.zones.items()
        }

    def zones_with_data(self) -> int:
        return sum(1 for zone in self.zones.values() if zone.history)


# --- files -------------------------------------------------------------------------


def _segment_name(number: int) -> str:
    return f"{_SEGMENT_PREFIX}{number:012d}{_SEGMENT_SUFFIX}"


def _snapshot_name(number: int) -> str:
    return f"{_SNAPSHOT_PREFIX}{number:012d}{_SNAPSHOT_SUFFIX}"


# The names the journal writes have at least this many digits (``_segment_name``).
_DIGITS = 12
_CORRUPT = ".corrupt-"  # what moved-aside files are named with (``_keep_aside``)
_QUIET = frozenset({LOCK_NAME, META_NAME, META_NAME + _TMP_SUFFIX})
SEGMENT, SNAPSHOT, TEMP = "segment", "snapshot", "temp"
_KINDS = (
    (SEGMENT, _SEGMENT_PREFIX, _SEGMENT_SUFFIX),
    (SNAPSHOT, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX),
    (TEMP, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX + _TMP_SUFFIX),
)


def _exact_number(name: str, prefix: str, suffix: str) -> int | None:
    """The number in ``name`` if it is exactly a name the journal writes (ASCII digits,
    zero-padded to 12, no other leading zero): ``wal-3.log`` or ``wal-²³.log`` is not."""
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    digits = name[len(prefix) : len(name) - len(suffix)]
    if not (_DIGITS <= len(digits) <= 20 and digits.isascii() and digits.isdigit()):
        return None
    number = int(digits)
    return number if f"{number:0{_DIGITS}d}" == digits else None


@dataclass(frozen=True, slots=True)
class _Own:
    """A data file of the journal's: a segment, a snapshot or a snapshot's temp file."""

    kind: str
    number: int


@dataclass(frozen=True, slots=True)
class _Stray:
    """An entry the journal leaves alone, and why; ``number`` when its name is one the
    journal could write (numbering steps over it)."""

    name: str
    reason: str
    number: int | None = None


def _classify(entry: os.DirEntry[str]) -> _Own | _Stray | None:
    """What ``entry`` is to the journal; None for the files it keeps besides its data
    (the lock, the meta file, files moved aside)."""
    name = entry.name
    for kind, prefix, suffix in _KINDS:
        number = _exact_number(name, prefix, suffix)
        if number is not None:
            return _own_entry(entry, kind, number)
    aside = name.startswith((_SEGMENT_PREFIX, _SNAPSHOT_PREFIX)) and _CORRUPT in name
    if name in _QUIET or aside:
        return None
    return _Stray(name, "not a name the journal writes")


def _own_entry(entry: os.DirEntry[str], kind: str, number: int) -> _Own | _Stray:
    # A temp file is only ever unlinked: a symlink in its place may go with it.
    if kind == TEMP and entry.is_symlink():
        return _Own(kind, number)
    if not entry.is_file(follow_symlinks=False):
        return _Stray(entry.name, "not a regular file", number)
    # A snapshot is fsynced before it is renamed into place: an empty one was never
    # written by the journal (an operator's ``touch``, a copy that failed).
    if kind == SNAPSHOT and entry.stat(follow_symlinks=False).st_size == 0:
        return _Stray(entry.name, "an empty snapshot", number)
    return _Own(kind, number)


def _own_files(directory: Path) -> Iterable[tuple[str, _Own]]:
    """The journal's data files in ``directory`` (name, what it is); nothing else."""
    for entry in os.scandir(directory):
        found = _classify(entry)
        if isinstance(found, _Own):
            yield entry.name, found


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _create_file(path: Path) -> BinaryIO:
    """``open(path, "wb")`` that never follows a symlink planted under that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o644), "wb")


class _Segments:
    """The log segment being written. Used by one thread operation at a time (the
    flusher serializes them), so it needs no lock."""

    def __init__(self, directory: Path, number: int, *, fsync: bool) -> None:
        self.directory = directory
        self.number = number
        self.fsync = fsync
        self.fd: int | None = None
        self.offset = 0

    @property
    def name(self) -> str:
        return _segment_name(self.number)

    def write(self, frames: bytes) -> float | None:
        """Append ``frames`` (encoded records) as one write, behind its header, and
        fsync it; the fsync's duration (None with fsync off). No frames: only create
        the segment. On failure the segment is abandoned and the error raised."""
        if self.fd is None:
            self._create()
        assert self.fd is not None
        data = fmt.encode_write(frames) if frames else b""
        try:
            _write_all(self.fd, data)
            started = time.perf_counter()
            if self.fsync:
                os.fsync(self.fd)
            elapsed = time.perf_counter() - started if self.fsync else None
        except OSError:
            self._abandon()
            raise
        self.offset += len(data)
        return elapsed

    def _create(self) -> None:
        path = self.directory / self.name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            # Something appeared under that name since the start (which numbers above
            # every name present): this batch fails, the next one takes the next number.
            self.number += 1
            raise
        try:
            _write_all(fd, fmt.SEGMENT_MAGIC)
            if self.fsync:
                os.fsync(fd)
                # Without this a crash could lose the new file's name, and with it every
                # acknowledged record written to it.
                fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            _unlink_quietly(path)  # holds no record yet: retry the same number later
            raise
        self.fd, self.offset = fd, len(fmt.SEGMENT_MAGIC)

    def _abandon(self) -> None:
        """Cut a failed write's torn bytes and move on to a new segment. If the cut
        fails too, recovery finds those bytes at the end of a segment that a later one
        follows: damage (a new epoch, the intact records kept), never a silent loss."""
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, self.offset)
            if self.fsync:
                os.fsync(self.fd)
        except OSError:
            pass
        self._close_fd()
        self.number += 1

    def rotate(self) -> int:
        """Start a new segment with the next write; the new segment's number."""
        if self.fd is not None:
            self._close_fd()
            self.number += 1
        return self.number

    def close(self) -> None:
        if self.fd is not None:
            try:
                if self.fsync:
                    os.fsync(self.fd)
            finally:
                self._close_fd()

    def _close_fd(self) -> None:
        assert self.fd is not None
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.close(fd)


def _write_snapshot_file(path: Path, capture: _Capture, *, fsync: bool) -> int:
    """Write ``capture`` to ``path`` (a temp name) and fsync it; its size."""
    with _create_file(path) as out:
        out.write(fmt.SNAPSHOT_MAGIC)
        out.write(fmt.encode_epoch(capture.epoch))
        for name, seq, prices in capture.zones:
            out.write(fmt.encode_reset(name, seq, prices))
        out.write(fmt.encode_end(len(capture.zones)))
        out.flush()
        if fsync:
            os.fsync(out.fileno())
        return out.tell()


# --- lock --------------------------------------------------------------------------


# --- recovery ----------------------------------------------------------------------

# Every store numbers below 2^63 (Redis's INCR is signed 64-bit); a replayed seq of
# 2^64-1 would leave the zone's next seq unencodable: every later publish a 503.
_MAX_SEQ = 2**63 - 1
_EXAMPLES = 10  # refused records or ignored files named in one log line


@dataclass(frozen=True, slots=True)
class _Damage:
    """Where the intact prefix ends: the file, the offset of the first bad frame
    (None: the file cannot be read at all), and why."""

    name: str
    offset: int | None
    reason: str

    def __str__(self) -> str:
        where = "" if self.offset is None else f" at offset {self.offset}"
        return f"{self.name} ({self.reason}{where})"


@dataclass(slots=True)
class _Recovery:
    """What replay found. With ``damage``, ``aside`` names the files to keep aside: the
    damaged one and every data file after it (and any a damaged snapshot did not
    prove covered)."""

    state: _State
    next_segment: int
    log_records: int = 0
    torn_bytes: int = 0
    fresh_reason: str | None = None
    damage: _Damage | None = None
    aside: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Listing:
    snapshots: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    highest: int = 0  # the highest number any entry's name holds, ours or not
    stray: list[_Stray] = field(default_factory=list)


def _listing(directory: Path) -> _Listing:
    """The data files present, numbers ascending; temp snapshots removed (a temp
    snapshot is by construction incomplete and was never the authority)."""
    listing = _Listing()
    for entry in os.scandir(directory):
        found = _classify(entry)
        if found is None:
            continue
        if found.number is not None:  # new files are numbered above every such name
            listing.highest = max(listing.highest, found.number)
        if isinstance(found, _Stray):
            listing.stray.append(found)
        elif found.kind == TEMP:
            _unlink_quietly(Path(entry.path))
        else:
            (listing.snapshots if found.kind == SNAPSHOT else listing.segments).append(found.number)
    listing.snapshots.sort()
    listing.segments.sort()
    return listing


def _log_strays(stray: list[_Stray], log: Any) -> None:
    if stray:
        named = sorted(stray, key=lambda item: item.name)[:_EXAMPLES]
        log.warning(
            "journal_files_ignored",
            count=len(stray),
            files=[f"{item.name!r}: {item.reason}" for item in named],
        )


def _read(path: Path) -> bytes | _Damage:
    """A data file's bytes; one that cannot be read (EIO, ...) is damage like a bad CRC."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return _Damage(path.name, None, f"unreadable: {exc.strerror or exc}")


def _zone_refusal(zone: str) -> str | None:
    return None if ZONE_RE.fullmatch(zone) else f"zone {zone[:40]!r} is not a zone name"


def _seq_refusal(seq: int, *, lowest: int) -> str | None:
    return None if lowest <= seq <= _MAX_SEQ else f"seq {seq} out of range"


def _history_refusal(record: fmt.ResetRecord) -> str | None:
    seqs = [price.seq for price in record.prices]
    if seqs and (seqs[0] < 1 or seqs[-1] > record.seq or seqs[-1] - seqs[0] != len(seqs) - 1):
        return "history not contiguous up to its seq"
    if any(later <= earlier for earlier, later in itertools.pairwise(seqs)):
        return "history not in seq order"
    return None


def _payload_refusal(price: StoredPrice) -> str | None:
    """Why a retained price cannot be served: its payload goes out verbatim inside
    history, snapshot and replay messages, so it must be the JSON object of its seq."""
    try:
        payload = orjson.loads(price.payload)
    except orjson.JSONDecodeError:
        return "payload is not JSON"
    if not isinstance(payload, dict):
        return "payload is not a JSON object"
    seq = payload.get("seq", price.seq)
    if type(seq) is not int or seq != price.seq:
        return "payload names another seq"
    return None


def _drop_unservable(state: _State) -> list[str]:
    """Cut each zone's history after its last price that cannot be served (a history
    stays contiguous; the zone's seq is kept, so nothing is numbered twice)."""
    refused = []
    for name, zone in state.zones.items():
        for kept, price in enumerate(reversed(zone.history)):
            reason = _payload_refusal(price)
            if reason is not None:
                refused.append(f"{name} seq {price.seq}: {reason}")
                suffix = list(zone.history)[len(zone.history) - kept :]
                zone.history.clear()
                zone.history.extend(suffix)
                break
    return refused


class _Replay:
    """Applies replayed records to the state, skipping those ``_refusal`` refuses
    (named in one warning at the end, ``journal_records_refused``)."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.records = 0  # segment records seen (the log's size, for compaction)
        self.refused: list[str] = []
        self._zones: set[str] = set()  # names already checked: one regex per zone

    def apply(self, record: fmt.Record, name: str, offset: int) -> None:
        reason = self._refusal(record)
        if reason is None:
            self.state.apply(record)
        else:
            self.refused.append(f"{name} at offset {offset}: {reason}")

    def _refusal(self, record: fmt.Record) -> str | None:
        """Why a checksummed record is not one the journal writes, if it is not: a CRC
        proves the bytes are the ones written, not who wrote them."""
        if isinstance(record, fmt.PriceRecord):
            price = record.price
            return self._zone_refusal(price.zone) or _seq_refusal(price.seq, lowest=1)
        if isinstance(record, fmt.ResetRecord):
            return (
                self._zone_refusal(record.zone)
                or _seq_refusal(record.seq, lowest=0)
                or _history_refusal(record)
            )
        return None

    def _zone_refusal(self, zone: str) -> str | None:
        if zone in self._zones:
            return None
        reason = _zone_refusal(zone)
        if reason is None:
            self._zones.add(zone)
        return reason

    def frames(self, name: str, frames: Iterable[fmt.Frame]) -> _Damage | None:
        """Apply a segment's records; damage at the first that makes no sense (its
        checksum holds, its body is no log record: a bug or deliberate bytes)."""
        for frame in frames:
            try:
                record = fmt.decode_body(frame.body)
            except fmt.FormatError as exc:
                return _Damage(name, frame.offset, str(exc))
            if isinstance(record, fmt.SnapshotEnd):
                return _Damage(name, frame.offset, "snapshot end record inside a log segment")
            self.apply(record, name, frame.offset)
            self.records += 1
        return None


def _load_snapshot(path: Path, replay: _Replay) -> _Damage | None:
    """Apply a snapshot's records up to the first bad one; the damage, if any."""
    data = _read(path)
    if isinstance(data, _Damage):
        return data
    if not data.startswith(fmt.SNAPSHOT_MAGIC):
        return _Damage(path.name, 0, "not a snapshot (bad magic)")
    scan = fmt.scan_frames(data, len(fmt.SNAPSHOT_MAGIC))
    offset, resets = len(fmt.SNAPSHOT_MAGIC), 0
    for index, body in enumerate(scan.bodies):
        try:
            record = fmt.decode_body(body)
        except fmt.FormatError as exc:
            return _Damage(path.name, offset, str(exc))
        if isinstance(record, fmt.SnapshotEnd):
            last = index == len(scan.bodies) - 1 and scan.error is None
            complete = last and record.zones == resets
            return None if complete else _Damage(path.name, offset, "snapshot is incomplete")
        expected = fmt.EpochRecord if index == 0 else fmt.ResetRecord
        if not isinstance(record, expected):
            return _Damage(path.name, offset, "unexpected record in a snapshot")
        replay.apply(record, path.name, offset)
        resets += isinstance(record, fmt.ResetRecord)
        offset += fmt.FRAME_HEADER.size + len(body)
    return _Damage(path.name, scan.good_end, scan.error or "snapshot is incomplete")


def _is_torn_header(data: bytes) -> bool:
    """A segment cut before its magic was whole: a crash right after creating it."""
    return len(data) < len(fmt.SEGMENT_MAGIC) and (
        fmt.SEGMENT_MAGIC.startswith(data)
        or fmt.LEGACY_SEGMENT_MAGIC.startswith(data)
        or not data.strip(b"\0")
    )


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(size)
        os.fsync(file.fileno())


def _scan(path: Path, data: bytes) -> fmt.SegmentScan | _Damage:
    legacy = data.startswith(fmt.LEGACY_SEGMENT_MAGIC)
    if not legacy and not data.startswith(fmt.SEGMENT_MAGIC):
        return _Damage(path.name, 0, "not a log segment (bad magic)")
    return fmt.scan_segment(data, legacy=legacy)


def _replay_segment(
    path: Path, replay: _Replay, log: Any, *, newest: bool
) -> tuple[int, _Damage | None]:
    """Apply one segment's records; (torn bytes cut, damage).

    Only the newest segment's last write can be torn: every older segment was done
    with (rotated, abandoned after a failed write and cut, or cut here at an earlier
    start) before the next one was begun. In the newest, a bad frame that no later
    write follows is inside the write in flight at the crash, never acknowledged: that
    whole write is cut and everything before it kept (``fmt.BadFrame``). Any other bad
    frame is damage to acknowledged data; the records before it are kept all the same.
    """
    data = _read(path)
    if isinstance(data, _Damage):
        return 0, data
    if _is_torn_header(data):
        if data:
            log.warning("journal_torn_tail", file=path.name, offset=0, cut_bytes=len(data))
            _cut(path, 0)
        return len(data), None
    scan = _scan(path, data)
    if isinstance(scan, _Damage):
        return 0, scan
    bad = scan.bad
    torn = bad is not None and newest and not bad.followed
    frames = [f for f in scan.frames if bad is None or not torn or f.offset < bad.write_start]
    damage = replay.frames(path.name, frames)
    if damage is not None or bad is None:
        return 0, damage
    if not torn:
        after = "a later write follows" if newest else "a later segment follows"
        return 0, _Damage(path.name, bad.offset, f"{bad.reason}, and {after}")
    log.warning(
        "journal_torn_tail",
        file=path.name,
        offset=bad.write_start,
        cut_bytes=len(data) - bad.write_start,
        reason=f"{bad.reason} at offset {bad.offset}",
    )
    _cut(path, bad.write_start)
    return len(data) - bad.write_start, None


def _replay_files(directory: Path, listing: _Listing, replay: _Replay, log: Any) -> _Recovery:
    """The newest snapshot, then the segments from its number on, up to the first
    damage; the snapshot's leftovers and empty segments deleted on the way."""
    recovery = _Recovery(replay.state, listing.highest + 1)
    base = listing.snapshots[-1] if listing.snapshots else 0
    live = [_segment_name(n) for n in listing.segments if n >= base]
    leftovers = [_snapshot_name(n) for n in listing.snapshots[:-1]]
    leftovers += [_segment_name(n) for n in listing.segments if n < base]
    if listing.snapshots:
        damage = _load_snapshot(directory / _snapshot_name(base), replay)
        if damage is not None:  # nothing proves the leftovers covered: keep them too
            recovery.damage, recovery.aside = damage, [_snapshot_name(base), *live, *leftovers]
            return recovery
    # Leftovers of a compaction interrupted after its rename: the snapshot covers them.
    for name in leftovers:
        _unlink_quietly(directory / name)
    for index, name in enumerate(live):
        before = replay.records
        torn, damage = _replay_segment(directory / name, replay, log, newest=index == len(live) - 1)
        recovery.torn_bytes += torn
        if damage is not None:
            recovery.damage, recovery.aside = damage, live[index:]
            return recovery
        if replay.records == before:
            _unlink_quietly(directory / name)  # each open starts a new segment; drop empty ones
    return recovery


def _recover(directory: Path, state: _State, log: Any) -> _Recovery:
    listing = _listing(directory)
    _log_strays(listing.stray, log)
    replay = _Replay(state)
    recovery = _replay_files(directory, listing, replay, log)
    recovery.log_records = replay.records
    refused = replay.refused + _drop_unservable(state)
    if refused:
        log.warning("journal_records_refused", count=len(refused), records=refused[:_EXAMPLES])
    if state.restarts:
        log.warning("journal_seq_restarts", zones_restarted=state.restarts)
    return recovery


def _keep_aside(directory: Path, names: Iterable[str]) -> list[str]:
    """Give each file a second name, ``<name>.corrupt-<timestamp>``, that outlives the
    first: a hard link (a copy where links are refused), fsynced before the caller
    supersedes and deletes the originals, so a crash in between loses no evidence."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:]
    kept = []
    for name in names:
        source, target = directory / name, directory / f"{name}{_CORRUPT}{stamp}"
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError:
            _copy_durably(source, target)
        kept.append(target.name)
    fsync_dir(directory)
    return kept


def _copy_durably(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, _create_file(target) as out:
        shutil.copyfileobj(reader, out)
        out.flush()
        os.fsync(out.fileno())


def _read_meta(directory: Path, log: Any) -> dict[str, Any] | None:
    """The meta file's object; None when there is none. An unreadable one is reported
    and taken as none: it only ever makes the owner more careful (see ``write_meta``)."""
    path = directory / META_NAME
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("journal_meta_unreadable", file=str(path), error=str(exc))
        return None
    if not isinstance(meta, dict):
        log.warning("journal_meta_unreadable", file=str(path), error="not a JSON object")
        return None
    return meta


def _write_meta_file(directory: Path, data: bytes, *, fsync: bool) -> None:
    """Replace the meta file atomically: temp file, fsync, rename, fsync the directory."""
    final = directory / META_NAME
    temp = final.with_name(final.name + _TMP_SUFFIX)
    with _create_file(temp) as out:
        out.write(data)
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    os.replace(temp, final)
    if fsync:
        fsync_dir(directory)


def _sizes(directory: Path) -> dict[str, int]:
    return {
        name: (directory / name).stat().st_size
        for name, own in _own_files(directory)
        if own.kind != TEMP
    }


def _served(state: _State, zones: Collection[str] | None, log: Any) -> dict[str, RecoveredZone]:
    """What ``Recovered`` holds: every zone, or only those served (the others are
    named once)."""
    exported = state.export()
    unserved = [] if zones is None else sorted(set(exported).difference(zones))
    if unserved:
        log.warning("journal_zones_not_served", count=len(unserved), zones=unserved[:_EXAMPLES])
    for zone in unserved:
        del exported[zone]
    return exported


# --- the journal -------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    data: bytes
    records: list[fmt.Record]
    future: asyncio.Future[None]


class Journal:
    """The write-ahead log + snapshots of one data directory; see the module docstring.

    Open it with ``Journal.open``; every method but ``stats`` is a coroutine, and the
    disk is only touched from worker threads after open.
    """

    def __init__(
        self,
        directory: Path,
        *,
        lock_fd: int,
        recovery: _Recovery,
        log: Any,
        fsync: bool,
        compact_factor: float,
        compact_min_records: int,
    ) -> None:
        self._directory = directory
        self._lock_fd: int | None = lock_fd
        self._state = recovery.state
        self._log = log
        self._fsync = fsync
        self._compact_factor = compact_factor
        self._compact_min_records = compact_min_records
        self._segments = _Segments(directory, recovery.next_segment, fsync=fsync)
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[DiskError | None] | None = None
        # Held around each segment write and around a snapshot's rotation, so that a
        # snapshot point always falls between two batches.
        self._io_lock = asyncio.Lock()
        self._closed = False
        self._file_sizes: dict[str, int] = {}
        self._log_records = recovery.log_records
        self._records = 0
        self._writes = 0
        self._fsyncs = 0
        self._snapshots = 0
        self._last_snapshot_at: float | None = None
        self._fsync_recent: deque[float] = deque(maxlen=_RECENT_FSYNCS)
        self._fsync_max = 0.0
        self._last_error: str | None = None
        self._meta: dict[str, Any] | None = None

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        history_size: int,
        new_epoch: str | None = None,
        log: Any = None,
        fsync: bool = True,
        compact_factor: float = 4.0,
        compact_min_records: int = 256,
        zones: Collection[str] | None = None,
    ) -> tuple[Journal, Recovered]:
        """Lock ``path`` (created if missing), recover what it holds and open a new log
        segment. Blocking: call it at start, or through ``asyncio.to_thread``.

        :param history_size: prices kept per zone, as the memory store's.
        :param new_epoch: the epoch of a fresh journal (new or damaged data dir);
            a random one by default. Written durably before ``open`` returns.
        :param zones: the zones served; the others the journal holds are kept on disk
            (numbering goes on if they are served again) but left out of ``Recovered``,
            with one warning. None: every zone.
        :param fsync: off only for tests and benchmarks (survives a process crash, not
            a power cut).
        :param compact_factor: snapshot once the log holds this many times
            history size x zones-with-data records (and at least
            ``compact_min_records``).
        :raises JournalLocked: another process holds the directory.
        :raises JournalUnavailable: the directory cannot be created, read or written.
        """
        log = log or structlog.get_logger("pricehub.storage.journal")
        directory = Path(path)
        lock_fd = acquire_lock(directory)
        try:
            journal, recovered = cls._open_locked(
                directory,
                lock_fd=lock_fd,
                history_size=history_size,
                new_epoch=new_epoch or uuid.uuid4().hex[:12],
                log=log,
                fsync=fsync,
                compact_factor=compact_factor,
                compact_min_records=compact_min_records,
                zones=zones,
            )
        except OSError as exc:
            os.close(lock_fd)
            raise JournalUnavailable(
                f"data dir {directory} cannot be used: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            os.close(lock_fd)
            raise
        log.info(
            "journal_opened",
            data_dir=str(directory),
            epoch=recovered.epoch,
            recovered=recovered.recovered,
            fresh_reason=recovered.fresh_reason,
            zones=len(recovered.zones),
            torn_bytes=recovered.torn_bytes,
        )
        return journal, recovered

    @classmethod
    def _open_locked(
        cls,
        directory: Path,
        *,
        lock_fd: int,
        history_size: int,
        new_epoch: str,
        log: Any,
        zones: Collection[str] | None,
        **options: Any,
    ) -> tuple[Journal, Recovered]:
        recovery = _recover(directory, _State(history_size), log)
        state = recovery.state
        if recovery.damage is None and state.epoch is None:
            recovery.fresh_reason = "prices without an epoch" if state.zones else "new data dir"
        if recovery.damage is not None or state.epoch is None:
            state.epoch = new_epoch  # before the new lineage's snapshot captures it
        journal = cls(directory, lock_fd=lock_fd, recovery=recovery, log=log, **options)
        journal._meta = _read_meta(directory, log)
        if recovery.damage is not None:
            journal._supersede(recovery)
        # Opening the next segment now proves the directory writable at start, and a
        # fresh epoch must be durable before anything is numbered under it.
        journal._segments.write(fmt.encode_epoch(state.epoch) if recovery.fresh_reason else b"")
        journal._file_sizes = _sizes(directory)
        recovered = Recovered(
            state.epoch, _served(state, zones, log), recovery.fresh_reason, recovery.torn_bytes
        )
        return journal, recovered

    def _supersede(self, recovery: _Recovery) -> None:
        """Start the new lineage on what was recovered: keep the damaged file and all
        after it aside (second names first), then a snapshot of the recovered state
        under the new epoch, numbered above every file, which makes them obsolete.

        A crash before the snapshot's rename finds the same damage again; one after it
        finds the new lineage. Never is the intact prefix served under the old epoch
        without the acknowledged records the damage took (their seqs would be reused).
        """
        damage = recovery.damage
        assert damage is not None
        kept = _keep_aside(self._directory, recovery.aside)
        self._snapshot_in_thread(self._segments.number, self._state.capture())
        recovery.fresh_reason = (
            f"damaged {damage}; the records before it are kept; moved aside: {', '.join(kept)}"
        )
        self._log.error(
            "journal_damaged_starting_new_epoch",
            data_dir=str(self._directory),
            damaged_file=damage.name,
            offset=damage.offset,
            reason=damage.reason,
            moved_aside=kept,
            epoch=self.epoch,
            zones_kept=len(self._state.zones),
        )

    # -- appending --------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._directory

    @property
    def epoch(self) -> str:
        assert self._state.epoch is not None
        return self._state.epoch

    @property
    def meta(self) -> dict[str, Any] | None:
        """The owner's record of what this data describes (``meta.json``), as found at
        open or last written; None when there is none. A damaged journal starts afresh
        but keeps it: it describes the directory's purpose, not its records."""
        return None if self._meta is None else dict(self._meta)

    async def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace the meta file (atomically, fsynced unless ``fsync`` is off).

        :raises DiskError: it could not be written (the old one, if any, stays).
        """
        data = json.dumps(dict(meta), sort_keys=True, indent=1).encode() + b"\n"
        try:
            await asyncio.to_thread(_write_meta_file, self._directory, data, fsync=self._fsync)
        except OSError as exc:
            raise self._disk_error("journal_meta_write_failed", exc) from exc
        self._meta = dict(meta)

    async def append(self, prices: Sequence[StoredPrice]) -> None:
        """Write ``prices`` (each zone's in seq order) and return once they are on disk.

        Cancelling the caller does not cancel the write: the batch may still land.

        :raises DiskError: the write or fsync failed (or the journal is closed); the
            next append retries on a new segment.
        """
        await self.queue_append(prices)

    # The ``queue_*`` twins take their place in the write order *now*, synchronously,
    # and return the future of their batch: a caller that must not wait for the disk
    # (write-behind of prices Redis already keeps) still cannot be overtaken by a
    # record queued after it (an ``asyncio.create_task(journal.append(...))`` could).

    def queue_append(self, prices: Sequence[StoredPrice]) -> asyncio.Future[None]:
        """``append`` without waiting: the future is settled once the batch is written."""
        if not prices:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        records: list[fmt.Record] = [fmt.PriceRecord(price) for price in prices]
        return self._enqueue(b"".join(fmt.encode_price(price) for price in prices), records)

    def queue_epoch(self, epoch: str) -> asyncio.Future[None]:
        """Record a new numbering lineage (failover reconciliation)."""
        return self._enqueue(fmt.encode_epoch(epoch), [fmt.EpochRecord(epoch)])

    def queue_reset(
        self, zone: str, prices: Sequence[StoredPrice], *, seq: int
    ) -> asyncio.Future[None]:
        """Record that ``zone`` now has ``seq`` and exactly ``prices`` (contiguous,
        oldest first), as ``MemoryStorage.reset`` does."""
        kept = tuple(prices)[-self._state.history_size :]
        return self._enqueue(fmt.encode_reset(zone, seq, kept), [fmt.ResetRecord(zone, seq, kept)])

    def _enqueue(self, data: bytes, records: list[fmt.Record]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(DiskError(f"journal {self._directory} is closed"))
            return future
        self._pending.append(_Pending(data, records, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return future

    async def _flush_loop(self) -> None:
        """Write everything pending as one batch, then whatever arrived meanwhile."""
        while self._pending:
            batch, self._pending = self._pending, []
            async with self._io_lock:
                error = await self._write_batch(batch)
            self._settle(batch, error)
            if error is None:
                self._maybe_snapshot()

    async def _write_batch(self, batch: list[_Pending]) -> DiskError | None:
        data = b"".join(pending.data for pending in batch)
        try:
            elapsed = await asyncio.to_thread(self._segments.write, data)
        except Exception as exc:  # OSError in practice; anything else must fail the batch too
            return self._disk_error("journal_write_failed", exc, segment=self._segments.name)
        # Still under the I/O lock: no snapshot point can fall between write and apply.
        for pending in batch:
            for record in pending.records:
                self._state.apply(record)
        self._note_write(len(batch), sum(len(p.records) for p in batch), elapsed)
        return None

    def _settle(self, batch: list[_Pending], error: DiskError | None) -> None:
        for pending in batch:
            if pending.future.done():  # its caller was cancelled
                continue
            if error is None:
                pending.future.set_result(None)
            else:
                pending.future.set_exception(DiskError(str(error)))

    def _note_write(self, appends: int, records: int, elapsed: float | None) -> None:
        self._writes += 1
        self._records += records
        self._log_records += records
        self._file_sizes[self._segments.name] = self._segments.offset
        self._last_error = None
        if elapsed is not None:
            self._fsyncs += 1
            self._fsync_recent.append(elapsed)
            self._fsync_max = max(self._fsync_max, elapsed)

    def _disk_error(self, event: str, exc: Exception, **fields: Any) -> DiskError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        error = DiskError(f"journal write in {self._directory} failed: {reason}")
        self._last_error = str(error)
        self._log.error(event, data_dir=str(self._directory), error=str(exc), **fields)
        return error

    # -- snapshots --------------------------------------------------------------------

    def _compact_threshold(self) -> int:
        zones = max(1, self._state.zones_with_data())
        by_history = int(self._compact_factor * self._state.history_size * zones)
        return max(self._compact_min_records, by_history)

    def _maybe_snapshot(self) -> None:
        if self._snapshot_task is None and self._log_records >= self._compact_threshold():
            self._begin_snapshot()

    def _begin_snapshot(self) -> asyncio.Task[DiskError | None]:
        """Snapshot point: called with no write in flight, so segments below the new
        segment's number hold exactly what the captured state holds."""
        number = self._segments.rotate()
        capture = self._state.capture()
        self._log_records = 0
        task = asyncio.create_task(self._run_snapshot(number, capture))
        self._snapshot_task = task
        return task

    async def snapshot(self) -> None:
        """Compact now (it also happens by itself); raises ``DiskError`` on failure."""
        if self._closed:
            raise DiskError(f"journal {self._directory} is closed")
        task = None
        while task is None:
            while self._snapshot_task is not None:  # one at a time; then take a new one
                await asyncio.shield(self._snapshot_task)
            async with self._io_lock:
                if self._snapshot_task is None:
                    task = self._begin_snapshot()
        error = await asyncio.shield(task)
        if error is not None:
            raise error

    async def _run_snapshot(self, number: int, capture: _Capture) -> DiskError | None:
        try:
            size, dropped = await asyncio.to_thread(self._snapshot_in_thread, number, capture)
        except OSError as exc:
            # The old snapshot and segments are all still there: nothing is lost, the
            # log just keeps growing until a later snapshot succeeds.
            return self._disk_error("journal_snapshot_failed", exc, snapshot=number)
        finally:
            self._snapshot_task = None
        for name in dropped:
            self._file_sizes.pop(name, None)
        self._file_sizes[_snapshot_name(number)] = size
        self._snapshots += 1
        self._last_snapshot_at = time.time()
        self._log.info(
            "journal_snapshot",
            snapshot=_snapshot_name(number),
            bytes=size,
            zones=len(capture.zones),
            dropped=len(dropped),
        )
        return None

    def _snapshot_in_thread(self, number: int, capture: _Capture) -> tuple[int, list[str]]:
        final = self._directory / _snapshot_name(number)
        temp = final.with_name(final.name + _TMP_SUFFIX)
        try:
            size = _write_snapshot_file(temp, capture, fsync=self._fsync)
            self._publish_snapshot(temp, final)
        except OSError:
            _unlink_quietly(temp)
            raise
        return size, self._drop_obsolete(number)

    def _publish_snapshot(self, temp: Path, final: Path) -> None:
        """Atomically make the snapshot the authority (its own step for crash tests)."""
        os.replace(temp, final)
        if self._fsync:
            fsync_dir(self._directory)

    def _drop_obsolete(self, number: int) -> list[str]:
        """Delete the segments and snapshots the new snapshot ``number`` covers (the
        journal's own files only: whatever else the directory holds stays)."""
        dropped = []
        for name, own in sorted(_own_files(self._directory), key=lambda item: item[0]):
            if own.kind != TEMP and own.number < number:
                _unlink_quietly(self._directory / name)
                dropped.append(name)
        if self._fsync:
            fsync_dir(self._directory)
        return dropped

    # -- the rest -----------------------------------------------------------------------

    def stats(self) -> JournalStats:
        return JournalStats(
            data_dir=str(self._directory),
            bytes_on_disk=sum(self._file_sizes.values()),
            last_snapshot_at=self._last_snapshot_at,
            snapshots=self._snapshots,
            fsyncs=self._fsyncs,
            writes=self._writes,
            records=self._records,
            log_records=self._log_records,
            fsync_last_seconds=self._fsync_recent[-1] if self._fsync_recent else None,
            fsync_max_seconds=self._fsync_max,
            fsync_recent_seconds=tuple(self._fsync_recent),
            last_error=self._last_error,
        )

    async def close(self) -> None:
        """Finish pending writes and any snapshot, fsync, and release the lock.
        Idempotent; appends after it raise ``DiskError``."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await self._flusher
        if self._snapshot_task is not None:
            await self._snapshot_task
        try:
            await asyncio.to_thread(self._segments.close)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the only descriptor drops the flock
