"""A durable journal for the in-memory store (PROTOCOL.md, "Durable in-memory storage").

The memory store numbers prices; this journal makes them survive a restart, clean or
SIGKILL. It is a write-ahead log plus snapshots in one data directory::

    LOCK                     flock'd by the one process using the directory (PID, host)
    meta.json                the owner's record of what the data describes (``write_meta``:
                             the failover's journal names the Redis feed it mirrors)
    wal-000000000007.log     log segments: framed, CRC'd records (``journal_format``)
    snap-000000000007.snap   the whole state as of every segment numbered below 7

*Appends* use group commit: a caller's records join a pending batch; one flusher task
writes the batch and fsyncs it in a worker thread, and every append that arrived while
that fsync was in flight goes into the next single write+fsync. A burst of N concurrent
publishes costs a handful of fsyncs, and the event loop never waits on the disk.

A write or fsync that fails (ENOSPC, EIO) fails its whole batch with ``DiskError`` and
abandons the segment: its torn bytes are cut back to the last good frame (best effort)
and the next batch starts a new segment, so a full disk that gets space back heals by
itself. Recovery treats an unterminated tail of *any* segment as torn for that reason.

*Snapshots* keep the disk near history size x zones: once the log holds more than
``compact_factor`` x history size x zones-with-data records, the flusher rotates to a
new segment N between two batches, captures the state (references, no copies of
payloads), and a background thread writes ``snap-N.snap.tmp``, fsyncs it, renames it,
fsyncs the directory and only then deletes the segments and snapshots below N.

*Recovery* (``Journal.open``) loads the newest snapshot and replays the segments from its
number on. A torn tail (a bad frame with no good frame after it) is cut off with a
warning. Anything else unreadable (a bad frame followed by good ones, a damaged
snapshot, a record that makes no sense) is damage: every data file is moved aside as
``<name>.corrupt-<timestamp>`` (never deleted), an error is logged, and the journal
starts empty on the caller's new epoch, reporting why in ``Recovered.fresh_reason``.

Seq rules on replay (and in the live mirror, so both agree): a price with the zone's
next seq is appended; one further ahead restarts the zone's history at it (a batch in
between failed and its seqs were never reused); one at or below the zone's seq replaces
what it follows (a failed batch's seqs were reused, and the failed batch may still have
reached the disk). So a caller should roll back the seqs of a failed append.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

import pricehub.storage.journal_format as fmt
from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageUnavailable

__all__ = [
    "DiskError",
    "Journal",
    "JournalLocked",
    "JournalStats",
    "JournalUnavailable",
    "Recovered",
    "RecoveredZone",
]

LOCK_NAME = "LOCK"
META_NAME = "meta.json"
_SEGMENT_PREFIX, _SEGMENT_SUFFIX = "wal-", ".log"
_SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX = "snap-", ".snap"
_TMP_SUFFIX = ".tmp"
_RECENT_FSYNCS = 64


class DiskError(StorageUnavailable):
    """A journal write or fsync failed (disk full, I/O error): the batch is not durable."""


class JournalUnavailable(StorageUnavailable):
    """The data directory cannot be used (not creatable, not writable, unreadable)."""


class JournalLocked(JournalUnavailable):
    """Another process holds the data directory's lock; the message names it."""

    def __init__(self, directory: Path, pid: int | None, host: str | None) -> None:
        holder = f"pid {pid}" if pid is not None else "an unknown pid"
        if host:
            holder += f" on {host}"
        super().__init__(f"data dir {directory} is in use by another process ({holder})")
        self.pid = pid
        self.host = host


@dataclass(frozen=True, slots=True)
class RecoveredZone:
    """One zone as the journal holds it: its last seq and retained prices, oldest first."""

    seq: int
    prices: tuple[StoredPrice, ...]


@dataclass(frozen=True, slots=True)
class Recovered:
    """What ``Journal.open`` found.

    ``epoch`` is the epoch to use: the recovered one, or the caller's ``new_epoch`` when
    ``fresh_reason`` is set (``"new data dir"``, or which damaged file was moved aside).
    ``torn_bytes`` is how much torn tail was cut off.
    """

    epoch: str
    zones: dict[str, RecoveredZone]
    fresh_reason: str | None
    torn_bytes: int = 0

    @property
    def recovered(self) -> bool:
        return self.fresh_reason is None


@dataclass(frozen=True, slots=True)
class JournalStats:
    """For health and metrics. ``bytes_on_disk`` counts snapshots and segments (not the
    LOCK file nor files moved aside). ``records`` and ``writes`` count since open;
    ``log_records`` is what the log holds since the last snapshot; ``last_error`` is
    cleared by the next successful write."""

    data_dir: str
    bytes_on_disk: int
    last_snapshot_at: float | None
    snapshots: int
    fsyncs: int
    writes: int
    records: int
    log_records: int
    fsync_last_seconds: float | None
    fsync_max_seconds: float
    fsync_recent_seconds: tuple[float, ...]
    last_error: str | None


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


def _number(name: str, prefix: str, suffix: str) -> int | None:
    if name.startswith(prefix) and name.endswith(suffix):
        digits = name[len(prefix) : -len(suffix)]
        if digits.isdigit():
            return int(digits)
    return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make renames, creations and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


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

    def write(self, data: bytes) -> float | None:
        """Append ``data`` and fsync it; the fsync's duration (None with fsync off).
        On failure the segment is abandoned and the error raised."""
        if self.fd is None:
            self._create()
        assert self.fd is not None
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, fmt.SEGMENT_MAGIC)
            if self.fsync:
                os.fsync(fd)
                # Without this a crash could lose the new file's name, and with it every
                # acknowledged record written to it.
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            _unlink_quietly(path)  # holds no record yet: retry the same number later
            raise
        self.fd, self.offset = fd, len(fmt.SEGMENT_MAGIC)

    def _abandon(self) -> None:
        """Cut a failed write's torn bytes and move on to a new segment. If the cut
        fails too, recovery still reads the tail as torn (nothing good follows it)."""
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
    with open(path, "wb") as out:
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


def _holder(fd: int) -> tuple[int | None, str | None]:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace")
    except OSError:
        return None, None
    fields: dict[str, str] = {}
    for part in text.split():
        key, _, value = part.partition("=")
        fields[key] = value
    pid = fields.get("pid", "")
    return (int(pid) if pid.isdigit() else None), fields.get("host")


def _acquire_lock(directory: Path) -> int:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JournalUnavailable(
            f"data dir {directory} cannot be used: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host = _holder(fd)
        os.close(fd)
        raise JournalLocked(directory, pid, host) from None
    except OSError as exc:
        os.close(fd)
        raise JournalUnavailable(f"data dir {directory} cannot be locked: {exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise JournalUnavailable(
            f"data dir {directory} is not writable: {exc.strerror or exc}"
        ) from exc
    return fd


# --- recovery ----------------------------------------------------------------------


class _Damaged(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(slots=True)
class _Recovery:
    state: _State
    next_segment: int
    log_records: int = 0
    torn_bytes: int = 0
    fresh_reason: str | None = None


def _listing(directory: Path) -> tuple[list[int], list[int]]:
    """Snapshot and segment numbers present, ascending; temp files removed (a temp
    snapshot is by construction incomplete and was never the authority)."""
    snapshots, segments = [], []
    for entry in os.scandir(directory):
        if entry.name.startswith(_SNAPSHOT_PREFIX) and entry.name.endswith(_TMP_SUFFIX):
            _unlink_quietly(Path(entry.path))
        elif (number := _number(entry.name, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX)) is not None:
            snapshots.append(number)
        elif (number := _number(entry.name, _SEGMENT_PREFIX, _SEGMENT_SUFFIX)) is not None:
            segments.append(number)
    return sorted(snapshots), sorted(segments)


def _read(path: Path) -> bytes:
    """A data file's bytes; one that cannot be read (EIO, ...) is damage like a bad CRC."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Damaged(path.name, f"unreadable: {exc.strerror or exc}") from exc


def _load_snapshot(path: Path, state: _State) -> None:
    data = _read(path)
    if not data.startswith(fmt.SNAPSHOT_MAGIC):
        raise _Damaged(path.name, "not a snapshot (bad magic)")
    scan = fmt.scan_frames(data, len(fmt.SNAPSHOT_MAGIC))
    if scan.error is not None:
        raise _Damaged(path.name, scan.error)
    try:
        records = [fmt.decode_body(body) for body in scan.bodies]
    except fmt.FormatError as exc:
        raise _Damaged(path.name, str(exc)) from exc
    if not records or not isinstance(records[0], fmt.EpochRecord):
        raise _Damaged(path.name, "snapshot does not start with its epoch")
    end = records[-1]
    resets = records[1:-1]
    if not isinstance(end, fmt.SnapshotEnd) or end.zones != len(resets):
        raise _Damaged(path.name, "snapshot is incomplete")
    for record in records[:-1]:
        if not isinstance(record, fmt.EpochRecord | fmt.ResetRecord):
            raise _Damaged(path.name, "unexpected record in a snapshot")
        state.apply(record)


def _is_torn_header(data: bytes) -> bool:
    """A segment cut before its magic was whole: a crash right after creating it."""
    return len(data) < len(fmt.SEGMENT_MAGIC) and (
        fmt.SEGMENT_MAGIC.startswith(data) or not data.strip(b"\0")
    )


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(size)
        os.fsync(file.fileno())


def _replay_segment(path: Path, state: _State, log: Any) -> tuple[int, int]:
    """Apply one segment's records; (records, torn bytes cut)."""
    data = _read(path)
    if _is_torn_header(data):
        if data:
            log.warning("journal_torn_tail", file=path.name, offset=0, cut_bytes=len(data))
            _cut(path, 0)
        return 0, len(data)
    if not data.startswith(fmt.SEGMENT_MAGIC):
        raise _Damaged(path.name, "not a log segment (bad magic)")
    scan = fmt.scan_frames(data, len(fmt.SEGMENT_MAGIC))
    torn = 0
    if scan.error is not None:
        later = fmt.find_frame_after(data, scan.good_end)
        if later is not None:
            raise _Damaged(path.name, f"{scan.error}, good records follow at offset {later}")
        torn = len(data) - scan.good_end
        log.warning(
            "journal_torn_tail",
            file=path.name,
            offset=scan.good_end,
            cut_bytes=torn,
            reason=scan.error,
        )
        _cut(path, scan.good_end)
    try:
        for body in scan.bodies:
            state.apply(fmt.decode_body(body))
    except fmt.FormatError as exc:
        raise _Damaged(path.name, str(exc)) from exc
    return len(scan.bodies), torn


def _recover(directory: Path, state: _State, log: Any) -> _Recovery:
    snapshots, segments = _listing(directory)
    base = snapshots[-1] if snapshots else 0
    if snapshots:
        _load_snapshot(directory / _snapshot_name(base), state)
    # Leftovers of a compaction interrupted after its rename: the snapshot covers them.
    for number in snapshots[:-1]:
        _unlink_quietly(directory / _snapshot_name(number))
    for number in segments:
        if number < base:
            _unlink_quietly(directory / _segment_name(number))
    recovery = _Recovery(state, max([base, 1, *(n + 1 for n in segments)]))
    for number in (n for n in segments if n >= base):
        path = directory / _segment_name(number)
        records, torn = _replay_segment(path, state, log)
        recovery.log_records += records
        recovery.torn_bytes += torn
        if records == 0:
            _unlink_quietly(path)  # each open starts a new segment; drop empty ones
    if state.restarts:
        log.warning("journal_seq_restarts", zones_restarted=state.restarts)
    if state.epoch is None and any(zone.seq for zone in state.zones.values()):
        raise _Damaged(directory.name, "prices without an epoch")
    return recovery


def _move_aside(directory: Path, damaged: _Damaged, log: Any) -> list[str]:
    """Rename every data file to ``<name>.corrupt-<timestamp>``: the damaged one cannot be
    read, and the others belong to the lineage being abandoned."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:]
    moved = []
    for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
        name = entry.name
        snapshot = _number(name, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX) is not None
        if snapshot or _number(name, _SEGMENT_PREFIX, _SEGMENT_SUFFIX) is not None:
            os.rename(entry.path, directory / f"{name}.corrupt-{stamp}")
            moved.append(f"{name}.corrupt-{stamp}")
    _fsync_dir(directory)
    log.error(
        "journal_damaged_starting_new_epoch",
        data_dir=str(directory),
        damaged_file=damaged.name,
        reason=damaged.reason,
        moved_aside=moved,
    )
    return moved


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
    with open(temp, "wb") as out:
        out.write(data)
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    os.replace(temp, final)
    if fsync:
        _fsync_dir(directory)


def _sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for entry in os.scandir(directory):
        if (
            _number(entry.name, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX) is not None
            or _number(entry.name, _SEGMENT_PREFIX, _SEGMENT_SUFFIX) is not None
        ):
            sizes[entry.name] = entry.stat().st_size
    return sizes


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
    ) -> tuple[Journal, Recovered]:
        """Lock ``path`` (created if missing), recover what it holds and open a new log
        segment. Blocking: call it at start, or through ``asyncio.to_thread``.

        :param history_size: prices kept per zone, as the memory store's.
        :param new_epoch: the epoch of a fresh journal (new or damaged data dir);
            a random one by default. Written durably before ``open`` returns.
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
        lock_fd = _acquire_lock(directory)
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
        **options: Any,
    ) -> tuple[Journal, Recovered]:
        try:
            recovery = _recover(directory, _State(history_size), log)
        except _Damaged as damaged:
            moved = _move_aside(directory, damaged, log)
            recovery = _Recovery(_State(history_size), 1)
            recovery.fresh_reason = (
                f"damaged {damaged.name} ({damaged.reason}); moved aside: {', '.join(moved)}"
            )
        state = recovery.state
        if state.epoch is None:
            recovery.fresh_reason = recovery.fresh_reason or "new data dir"
            state.epoch = new_epoch
        journal = cls(directory, lock_fd=lock_fd, recovery=recovery, log=log, **options)
        journal._meta = _read_meta(directory, log)
        # Opening the next segment now proves the directory writable at start, and a
        # fresh epoch must be durable before anything is numbered under it.
        journal._segments.write(fmt.encode_epoch(state.epoch) if recovery.fresh_reason else b"")
        journal._file_sizes = _sizes(directory)
        recovered = Recovered(
            state.epoch, state.export(), recovery.fresh_reason, recovery.torn_bytes
        )
        return journal, recovered

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

    async def set_epoch(self, epoch: str) -> None:
        """Record a new numbering lineage (failover reconciliation)."""
        await self.queue_epoch(epoch)

    async def reset_zone(self, zone: str, prices: Sequence[StoredPrice], *, seq: int) -> None:
        """Record that ``zone`` now has ``seq`` and exactly ``prices`` (contiguous,
        oldest first), as ``MemoryStorage.reset`` does."""
        await self.queue_reset(zone, prices, seq=seq)

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
        """``set_epoch`` without waiting."""
        return self._enqueue(fmt.encode_epoch(epoch), [fmt.EpochRecord(epoch)])

    def queue_reset(
        self, zone: str, prices: Sequence[StoredPrice], *, seq: int
    ) -> asyncio.Future[None]:
        """``reset_zone`` without waiting."""
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
            _fsync_dir(self._directory)

    def _drop_obsolete(self, number: int) -> list[str]:
        """Delete the segments and snapshots the new snapshot ``number`` covers."""
        dropped = []
        for name in sorted(entry.name for entry in os.scandir(self._directory)):
            segment = _number(name, _SEGMENT_PREFIX, _SEGMENT_SUFFIX)
            snapshot = _number(name, _SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX)
            older = segment if segment is not None else snapshot
            if older is not None and older < number:
                _unlink_quietly(self._directory / name)
                dropped.append(name)
        if self._fsync:
            _fsync_dir(self._directory)
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
