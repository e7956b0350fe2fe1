"""The durable journal of the in-memory store on stdlib ``sqlite3`` (issue 27).

The default journal since issue 27, with the old one's surface (``legacy.journal``:
``open`` -> ``(journal, Recovered)``, ``append`` and its ``queue_*`` twins (``queue_epoch``,
``queue_reset``), ``write_meta``, ``snapshot``, ``stats``, ``close``; the same errors), over
one SQLite database in the data dir::

    LOCK                the flock of the one process using the directory (PID, host;
                        ``datadir``): the one-line "in use by pid ... on ..." error
    pricehub.db         the database (WAL mode); ``-wal`` and ``-shm`` beside it while open
    pricehub.db.corrupt-<time>  a damaged database (and its WAL), moved aside
    legacy-journal/     the files of the old journal, once migrated (``legacy.migrate``)

Tables: ``runs`` (rows in the order written, each one zone's consecutive seqs from one
transaction within one block of 16: ``first``, ``last``, ``sizes``, ``payloads``, the
stored JSON bytes end to end, ``prev``: the zone's run before it; no index), ``zones``
zone -> seq where a seq rule set it (a reset, a reused seq, one further ahead), ``meta``
key -> value (``epoch``; ``owner``: the owner's ``write_meta`` object as JSON). A
zone's seq is its last run's ``last``, or its ``zones`` seq when that is higher.
``PRAGMA user_version`` is the schema's version (2).

*Writes* are group-committed, as the old journal's: a caller's records join a pending
batch; one flusher task hands the batch to the one writer thread, which applies it in
ONE transaction (each zone's prices inserted as one run per block, the runs of a zone
whose history passed the end of a block deleted, following the zone's chain of runs
from its newest: at most 15 prices beyond ``history_size`` stay) and commits;
every record queued meanwhile goes into the next transaction. A caller's future settles
when its transaction commits: with ``fsync`` (``synchronous=FULL``) the WAL is fsynced
by the commit; without (``synchronous=NORMAL``) it survives a process crash, not a power
cut. A failed transaction (disk full, I/O error) is rolled back whole and fails every
caller in it with ``DiskError``; the next batch tries again, so a disk that gets space
back heals by itself. The seq rules are the old journal's (a seq at or below the zone's
replaces what it follows, one further ahead restarts the history).

*Checkpoints* (the old journal's snapshots) are SQLite's own: once the WAL holds
``checkpoint_bytes`` of frames, the commit copies them into the database, and the next
transaction writes the WAL over from its start (the file is not grown again, and is cut
back to ``checkpoint_bytes`` if it grew past it), so the disk stays near history size x
zones plus ``checkpoint_bytes``. ``snapshot`` checkpoints now and empties the WAL.

*Recovery* is SQLite's own (the WAL's committed frames are replayed, a torn tail is
ignored), then ``PRAGMA quick_check`` and one ``SELECT`` per table. Damage (the check
fails, or SQLite says the file is corrupt or not a database) moves the database and its
WAL aside, starts a new database under the caller's new epoch (keeping the owner's meta
when it can still be read) and logs ``journal_damaged_starting_new_epoch``: nothing more
is recovered from it. Runs are replayed in the order written (a run that starts at or
below what its zone holds replaces what it follows, as the seq rules did), and checked
as the old journal checked replayed records (zone name, seq range, sizes that match the
bytes, a contiguous history, a payload that is the JSON object of its seq): what fails
is named in one ``journal_records_refused`` warning and not served.

The journal holds no copy of the history in memory: only each zone's last seq (for
the seq rules) and newest run's id (its chain's head), on the writer thread. See
docs/storage-sqlite.md for what SQLite guarantees here and what the old format detected
that this does not.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import json
import os
import shutil
import sqlite3
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from pricehub.storage.base import JournalStats, StoredPrice
from pricehub.storage.datadir import (
    EpochRecord,
    Recovered,
    RecoveredZone,
    ResetRecord,
    acquire_lock,
    fsync_dir,
)
from pricehub.storage.errors import DiskError, JournalLocked, JournalUnavailable
from pricehub.storage.legacy import migrate as legacy
from pricehub.wire.messages import ZONE_RE

__all__ = [
    "DB_NAME",
    "DiskError",
    "JournalLocked",
    "JournalStats",
    "JournalUnavailable",
    "Recovered",
    "RecoveredZone",
    "SqliteJournal",
]

DB_NAME = "pricehub.db"
SCHEMA_VERSION = 2  # 1: a row per price (never the default, not read)
_CORRUPT = ".corrupt-"
_MIGRATING = ".migrating"
_WAL_SUFFIXES = ("-wal", "-shm")
_RECENT_COMMITS = 64
_EXAMPLES = 10  # refused rows named in one log line
_MAX_SEQ = 2**63 - 1  # as the old journal: every store numbers below 2^63
_EPOCH_KEY, _OWNER_KEY = "epoch", "owner"
DEFAULT_CHECKPOINT_BYTES = 16 * 1024 * 1024
# SQLite's primary result codes that mean the bytes are not a sound database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
# The WAL's own format (sqlite.org/fileformat.html, "The WAL file format"): big-endian.
_WAL_HEADER = struct.Struct(">8I")  # magic, version, page size, checkpoint, salts, sums
_FRAME_HEADER = struct.Struct(">6I")  # page, db size (commit frames only), salts, sums
_WAL_MAGIC = (0x377F0682, 0x377F0683)

_SCHEMA = (
    # One row per *run*: one zone's consecutive seqs written by one transaction, within
    # one block of ``_block(history_size)`` seqs (a run never crosses a multiple of the
    # block). Rows are in the order written (``id``): every insert lands at the table's
    # right edge, and a transaction inserts a row per zone it touches (per block), not
    # per price: 50 prices over 7 zones are 7 rows, a batch of 1,000 over 7 zones some
    # 70. ``sizes`` is each payload's length (little-endian uint32; empty for a run of
    # one), ``payloads`` their bytes end to end. ``prev`` is the zone's run before it:
    # the trim and the seq rules follow a zone's chain from its newest run (known in
    # memory) instead of an index on (zone, ...), which over 20,000 zones rewrote a
    # page of the index per zone per transaction (2,300 of 2,600 pages written).
    "CREATE TABLE runs (id INTEGER PRIMARY KEY, zone TEXT NOT NULL, first INTEGER NOT NULL,"
    " last INTEGER NOT NULL, prev INTEGER, sizes BLOB NOT NULL, payloads BLOB NOT NULL)",
    "CREATE TABLE zones (zone TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = (
    "INSERT INTO runs (id, zone, first, last, prev, sizes, payloads) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = 7
_CHUNK = 64  # runs per multi-row insert (7 parameters each, far below SQLite's limit)
_UPSERT_ZONE = (
    "INSERT INTO zones (zone, seq) VALUES (?, ?)"
    " ON CONFLICT (zone) DO UPDATE SET seq = excluded.seq"
)
# A zone's (?3) chain from its newest run (?1) back to the first that ends at or below
# the cut (?2): that run and every older one go (the chain's tail). Every step checks
# the zone: a ``prev`` damaged on disk ends a walk, it never leads into another zone.
_TRIM = (
    "WITH RECURSIVE kept(id, last, prev) AS ("
    " SELECT id, last, prev FROM runs WHERE id = ?1"
    " UNION ALL SELECT runs.id, runs.last, runs.prev FROM runs JOIN kept"
    " ON runs.id = kept.prev AND runs.zone = ?3 WHERE kept.last > ?2),"
    " doomed(id, prev) AS (SELECT id, prev FROM kept WHERE last <= ?2"
    " UNION ALL SELECT runs.id, runs.prev FROM runs JOIN doomed"
    " ON runs.id = doomed.prev AND runs.zone = ?3)"
    " DELETE FROM runs WHERE id IN (SELECT id FROM doomed)"
)
_DROP_CHAIN = (
    "WITH RECURSIVE doomed(id, prev) AS (SELECT id, prev FROM runs WHERE id = ?1"
    " UNION ALL SELECT runs.id, runs.prev FROM runs JOIN doomed"
    " ON runs.id = doomed.prev AND runs.zone = ?2)"
    " DELETE FROM runs WHERE id IN (SELECT id FROM doomed)"
)
# A reused seq (?2): the chain's runs that start at or after it, and the first before.
_CHAIN_FROM = (
    "WITH RECURSIVE chain(id, first, prev) AS ("
    " SELECT id, first, prev FROM runs WHERE id = ?1"
    " UNION ALL SELECT runs.id, runs.first, runs.prev FROM runs JOIN chain"
    " ON runs.id = chain.prev AND runs.zone = ?3 WHERE chain.first >= ?2)"
    " SELECT id, first FROM chain"
)
_DELETE_RUN = "DELETE FROM runs WHERE id = ?"
_SELECT_RUNS = "SELECT id, zone, first, last, sizes, payloads FROM runs ORDER BY id"  # a scan
_PAGE_SIZE = 4096  # SQLite's default: 1, 2 and 8 KiB measured no faster (bench/journal_compare.py)
_BLOCK = 16  # the most seqs in one run; a zone keeps at most _BLOCK - 1 beyond its history
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"


# --- the records a batch holds ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Meta:
    text: str


# The journal's record kinds (datadir), one vocabulary for both engines.
_Op = StoredPrice | EpochRecord | ResetRecord | _Meta
_RunRow = tuple[str, int, int, bytes, bytes]  # zone, first, last, sizes, payloads


class _Chains:
    """Each zone's newest run (the head of its chain) and the next run's id: what the
    writer links rows with, put back as it was when a transaction rolls back."""

    __slots__ = ("_saved", "_saved_id", "newest", "next_id")

    def __init__(self, newest: dict[str, int], next_id: int) -> None:
        self.newest = newest
        self.next_id = next_id
        self._saved: dict[str, int | None] = {}  # zone -> its head before the transaction
        self._saved_id = next_id

    def begin(self) -> None:
        self._saved.clear()
        self._saved_id = self.next_id

    def rollback(self) -> None:
        for zone, head in self._saved.items():
            self.set_head(zone, head)
        self._saved.clear()
        self.next_id = self._saved_id

    def set_head(self, zone: str, head: int | None) -> None:
        self._saved.setdefault(zone, self.newest.get(zone))
        if head is None:
            self.newest.pop(zone, None)
        else:
            self.newest[zone] = head

    def link(self, rows: Iterable[_RunRow]) -> list[object]:
        """The values of ``rows`` as inserted (``_INSERT``'s columns, row after row, in
        one flat list for multi-row inserts): each with its id and its zone's run
        before it."""
        newest, saved = self.newest, self._saved
        values: list[object] = []
        run_id = self.next_id
        for zone, first, last, sizes, payloads in rows:
            prev = newest.get(zone)
            if zone not in saved:
                saved[zone] = prev
            newest[zone] = run_id
            values += (run_id, zone, first, last, prev, sizes, payloads)
            run_id += 1
        self.next_id = run_id
        return values


def _block(history_size: int) -> int:
    """Seqs per block: a run stays inside one, so that the trim (whole runs) keeps at
    most ``block - 1`` prices of a zone beyond its history."""
    return max(1, min(_BLOCK, history_size))


def _run_rows(zone: str, prices: Sequence[StoredPrice], block: int) -> Iterator[_RunRow]:
    """Rows for one zone's contiguous ``prices`` (seq order): a run per block."""
    start, end = 0, len(prices)
    while start < end:
        first = prices[start].seq
        stop = min(end, start + block - (first - 1) % block)  # up to the block's end
        if stop - start == 1:  # one price, the common case of many zones: no sizes
            yield zone, first, first, b"", prices[start].payload
        else:
            payloads = [price.payload for price in prices[start:stop]]
            sizes = array.array("I", map(len, payloads))
            if sys.byteorder == "big":  # stored little-endian, whoever wrote it
                sizes.byteswap()
            yield zone, first, first + len(payloads) - 1, sizes.tobytes(), b"".join(payloads)
        start = stop


@dataclass(slots=True)
class _Pending:
    ops: Sequence[_Op]
    records: int
    future: asyncio.Future[None]
    epoch: str | None = None  # the lineage it records, taken once committed


@dataclass(frozen=True, slots=True)
class _Options:
    """How a journal writes: ``SqliteJournal.open``'s options."""

    history_size: int
    fsync: bool
    checkpoint_bytes: int


@dataclass(frozen=True, slots=True)
class _Committed:
    """What one transaction did, for the stats (read on the loop)."""

    elapsed: float
    bytes_on_disk: int
    checkpoints: int  # since the last commit (SQLite's automatic ones)


# --- the database -------------------------------------------------------------------


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _connect(path: Path, *, fsync: bool, checkpoint_bytes: int) -> sqlite3.Connection:
    """A connection in WAL mode, transactions by hand (``BEGIN``/``COMMIT``), used by
    one thread at a time (opened here, then only by the writer thread)."""
    # The busy timeout lets an operator's ``sqlite3`` CLI read while we run.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        # Only a new database takes it (before its first table); an existing one keeps
        # the page size it was made with.
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise JournalUnavailable(f"data dir {path.parent} cannot use SQLite's WAL mode")
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, checkpoint_bytes // page)}")
        conn.execute(f"PRAGMA journal_size_limit = {checkpoint_bytes}")
    except BaseException:
        conn.close()
        raise
    return conn


def _damage_of(conn: sqlite3.Connection) -> str | None:
    """Why the database is not sound (``quick_check``: every page and b-tree, not the
    indexes' contents against the tables), or None."""
    rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
    return None if rows == ["ok"] else "; ".join(rows[:3])


def _create_schema(
    conn: sqlite3.Connection,
    epoch: str,
    owner: str | None,
    zones: Mapping[str, RecoveredZone] | None = None,
    *,
    block: int = _BLOCK,
) -> None:
    """Tables, epoch, owner's meta (and ``zones``: a migration's) in one transaction:
    a database without its epoch is one whose creation never committed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(_SET_META, (_EPOCH_KEY, epoch))
        if owner is not None:
            conn.execute(_SET_META, (_OWNER_KEY, owner))
        chains = _Chains({}, 1)
        for name, zone in (zones or {}).items():
            conn.execute(_UPSERT_ZONE, (name, zone.seq))
            _insert_values(conn, chains.link(_run_rows(name, zone.prices, block)))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


@functools.cache
def _insert_rows(count: int) -> str:
    return _INSERT + ", (?, ?, ?, ?, ?, ?, ?)" * (count - 1)


def _insert_values(conn: sqlite3.Connection, values: list[object]) -> None:
    """Insert runs from ``Chains.link``'s values, up to ``_CHUNK`` rows per statement:
    one statement per chunk is one GIL release for the chunk's b-tree work, where
    ``executemany`` takes the GIL back after every row (against a busy event loop
    thread, that handover per row is what a large batch cost)."""
    step = _CHUNK * _COLUMNS
    for start in range(0, len(values), step):
        chunk = values[start : start + step]
        conn.execute(_insert_rows(len(chunk) // _COLUMNS), chunk)


def _drop_unfinished_migration(directory: Path) -> None:
    """A temporary database of a migration that never got renamed into place."""
    temp = directory / (DB_NAME + _MIGRATING)
    for path in (temp, temp.with_name(temp.name + "-journal")):
        path.unlink(missing_ok=True)


def _migrate(directory: Path, found: legacy.Legacy, *, block: int) -> None:
    """Write what the old journal held into a new database, under its epoch: built
    under a temporary name (rollback journal, fsynced) and renamed into place, so that
    a crash leaves either no database (the migration runs again) or a whole one."""
    final = directory / DB_NAME
    temp = final.with_name(final.name + _MIGRATING)
    conn = sqlite3.connect(temp, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        owner = None if found.meta is None else json.dumps(found.meta, sort_keys=True)
        _create_schema(conn, found.recovered.epoch, owner, found.recovered.zones, block=block)
    finally:
        conn.close()
    os.replace(temp, final)
    fsync_dir(directory)


def _meta_value(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _owner_meta(text: str | None, log: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        log.warning("journal_meta_unreadable", error=str(exc))
        return None
    if not isinstance(meta, dict):
        log.warning("journal_meta_unreadable", error="not a JSON object")
        return None
    return meta


def _payload_refusal(price: StoredPrice) -> str | None:
    """Why a retained price cannot be served (its payload goes out verbatim): it must
    be the JSON object of its seq. Also what catches a flipped byte in a payload, which
    no SQLite check sees (docs/storage-sqlite.md)."""
    try:
        payload = orjson.loads(price.payload)
    except orjson.JSONDecodeError:
        return "payload is not JSON"
    if not isinstance(payload, dict):
        return "payload is not a JSON object"
    seq = payload.get("seq", price.seq)
    return None if type(seq) is int and seq == price.seq else "payload names another seq"


def _servable(
    zone: str, seq: int, rows: list[StoredPrice], refused: list[str]
) -> list[StoredPrice]:
    """The longest suffix of ``rows`` (seq order) that can be served: contiguous, at or
    below the zone's seq, every payload sound. What is cut is named in ``refused``."""
    kept: list[StoredPrice] = []
    for price in reversed(rows):
        if price.seq > seq or price.seq < 1:
            reason: str | None = "seq out of range"
        elif kept and price.seq != kept[-1].seq - 1:
            break  # a hole: what precedes it is not this history (quietly: trimmed)
        else:
            reason = _payload_refusal(price)
        if reason is not None:
            refused.append(f"{zone} seq {price.seq}: {reason}")
            break
        kept.append(price)
    kept.reverse()
    return kept


@dataclass(slots=True)
class _Found:
    """What the database holds, read at open."""

    epoch: str | None
    owner: str | None
    seqs: dict[str, int]
    zones: dict[str, RecoveredZone]
    newest: dict[str, int] = field(default_factory=dict)  # each zone's newest run
    next_id: int = 1


def _zone_refusal(zone: object, refused: list[str]) -> str | None:
    if isinstance(zone, str) and ZONE_RE.fullmatch(zone):
        return None
    reason = f"zone {str(zone)[:40]!r} is not a zone name"
    refused.append(reason)
    return reason


def _unpacked(
    zone: str, first: object, last: object, sizes: object, payloads: object, refused: list[str]
) -> list[StoredPrice]:
    """The prices of one run row; none (named in ``refused``) when its columns do not
    agree with each other: its seq range, sizes and bytes."""
    reason = None
    if type(first) is not int or type(last) is not int or not 1 <= first <= last <= _MAX_SEQ:
        reason = "seq range out of range"
    elif not isinstance(sizes, bytes) or not isinstance(payloads, bytes):
        reason = "sizes or payloads are not bytes"
    elif not sizes and first == last:
        return [StoredPrice(zone, first, payloads)]
    elif len(sizes) != 4 * (last - first + 1):
        reason = "sizes do not match its seq range"
    if reason is None:
        assert isinstance(sizes, bytes) and isinstance(payloads, bytes) and type(first) is int
        lengths = array.array("I")
        lengths.frombytes(sizes)
        if sys.byteorder == "big":
            lengths.byteswap()
        if sum(lengths) == len(payloads):
            return _split(zone, first, lengths, payloads)
        reason = "sizes do not match its payloads"
    refused.append(f"{zone} run {str(first)[:20]}-{str(last)[:20]}: {reason}")
    return []


def _split(zone: str, first: int, lengths: Iterable[int], payloads: bytes) -> list[StoredPrice]:
    prices, start = [], 0
    for seq, length in enumerate(lengths, first):
        prices.append(StoredPrice(zone, seq, payloads[start : start + length]))
        start += length
    return prices


def _replay(history: list[StoredPrice], run: list[StoredPrice]) -> None:
    """Add a run (in write order) to a zone's history as the seq rules had it: a run
    starting at or below what the history holds replaces what it follows (a reused seq:
    the run it fell inside was not cut at write time)."""
    if not run:
        return
    first = run[0].seq
    while history and history[-1].seq >= first:
        history.pop()
    history.extend(run)


def _read(
    conn: sqlite3.Connection, served_zones: Collection[str] | None, history_size: int, log: Any
) -> _Found:
    """Every zone's seq (all of them: numbering goes on for zones not served) and the
    served zones' histories, checked like the old journal's replayed records."""
    zones = None if served_zones is None else frozenset(served_zones)
    refused: list[str] = []
    seqs: dict[str, int] = {}  # a zone's seq as its seq rules last set it (not appends)
    for zone, seq in conn.execute("SELECT zone, seq FROM zones"):
        if _zone_refusal(zone, refused) is None:
            if type(seq) is int and 0 <= seq <= _MAX_SEQ:
                seqs[zone] = seq
            else:
                refused.append(f"zone {zone}: seq {seq!r} out of range")
    histories: dict[str, list[StoredPrice]] = {}
    lasts: dict[str, int] = {}  # each zone's last run (in write order): its seq since
    unknown: set[object] = set()
    newest: dict[str, int] = {}
    run_id = 0
    for run_id, zone, first, last, sizes, payloads in conn.execute(_SELECT_RUNS):
        if zone not in lasts and zone not in seqs and zone not in unknown:
            if _zone_refusal(zone, refused) is not None:
                unknown.add(zone)
                continue
        elif zone in unknown:
            continue
        newest[zone] = run_id
        if type(last) is int and 1 <= last <= _MAX_SEQ:
            lasts[zone] = last
        if zones is None or zone in zones:
            _replay(
                histories.setdefault(zone, []),
                _unpacked(zone, first, last, sizes, payloads, refused),
            )
    for zone, last in lasts.items():
        seqs[zone] = max(seqs.get(zone, 0), last)
    served = {}
    for zone, seq in seqs.items():
        if zones is None or zone in zones:
            rows = histories.get(zone, [])
            prices = _servable(zone, seq, rows[-history_size:], refused)
            served[zone] = RecoveredZone(seq, tuple(prices))
    if refused:
        log.warning("journal_records_refused", count=len(refused), records=refused[:_EXAMPLES])
    unserved = sorted(set(seqs).difference(served))
    if unserved:
        log.warning("journal_zones_not_served", count=len(unserved), zones=unserved[:_EXAMPLES])
    epoch, owner = _meta_value(conn, _EPOCH_KEY), _meta_value(conn, _OWNER_KEY)
    return _Found(epoch, owner, seqs, served, newest, run_id + 1)


def _has_schema(conn: sqlite3.Connection, directory: Path) -> bool:
    row = conn.execute("PRAGMA user_version").fetchone()
    version = 0 if row is None else int(row[0])
    if version not in (0, SCHEMA_VERSION):
        raise JournalUnavailable(
            f"data dir {directory} holds a {DB_NAME} of schema {version}, which this "
            f"pricehub does not know (it knows {SCHEMA_VERSION})"
        )
    return version == SCHEMA_VERSION


def _db_files(directory: Path) -> list[Path]:
    db = directory / DB_NAME
    return [db, *(db.with_name(db.name + suffix) for suffix in _WAL_SUFFIXES)]


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:]


def _move_aside(directory: Path) -> list[str]:
    """Rename the database and its WAL to ``<name>.corrupt-<time>`` (never deleted)."""
    stamp = _stamp()
    moved = []
    for path in _db_files(directory):
        target = path.with_name(f"{path.name}{_CORRUPT}{stamp}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
            moved.append(target.name)
    fsync_dir(directory)
    return moved


def _salvage_owner(directory: Path) -> str | None:
    """The owner's meta of a damaged database, if it can still be read: it describes
    the directory's purpose (which Redis it mirrors), not its records."""
    with contextlib.suppress(sqlite3.Error):
        conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
        try:
            return _meta_value(conn, _OWNER_KEY)
        finally:
            conn.close()
    return None


@dataclass(slots=True)
class _Opened:
    conn: sqlite3.Connection
    found: _Found
    fresh_reason: str | None


def _open_db(
    directory: Path,
    options: _Options,
    *,
    new_epoch: str,
    zones: Collection[str] | None,
    log: Any,
) -> _Opened:
    """Open (or create) the database, check it, read it; damage -> aside, a new one."""
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect(
            directory / DB_NAME, fsync=options.fsync, checkpoint_bytes=options.checkpoint_bytes
        )
        damage = _damage_of(conn)
        if damage is None:
            if not _has_schema(conn, directory):
                _create_schema(conn, new_epoch, None)
                return _Opened(conn, _read(conn, zones, options.history_size, log), "new data dir")
            lost = _lost_in_wal(conn, directory)  # before anything writes to the WAL
            found = _read(conn, zones, options.history_size, log)
            if found.epoch is not None and lost is not None:
                return _keep_before_wal_damage(conn, directory, found, lost, new_epoch, log)
            if found.epoch is not None:
                return _Opened(conn, found, None)
            damage = "no epoch recorded"
    except sqlite3.DatabaseError as exc:
        if not _is_corrupt(exc):
            if conn is not None:
                conn.close()
            raise
        damage = str(exc)
    if conn is not None:
        conn.close()
    return _replace_damaged(directory, damage, options, new_epoch=new_epoch, log=log)


def _lost_in_wal(conn: sqlite3.Connection, directory: Path) -> str | None:
    """Whether SQLite's recovery of the WAL stopped before transactions that were
    committed: see ``_wal_damage``. The passive checkpoint says how many frames SQLite
    took as valid (and copies them into the database, where they belong anyway)."""
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    valid = int(row[1]) if row is not None and row[1] is not None and row[1] > 0 else 0
    return _wal_damage(directory / (DB_NAME + "-wal"), valid)


def _wal_damage(wal: Path, valid: int) -> str | None:
    """Why committed transactions were lost in ``wal`` beyond its ``valid`` frames, or
    None (no WAL, or only a torn tail).

    SQLite replays the WAL up to the first frame whose checksum fails and silently
    ignores the rest. After a crash that rest is the one transaction in flight, never
    acknowledged: at most one commit frame, its last. A commit frame of the current WAL
    (its salts) that another such frame follows is a transaction that another came
    after, so it was acknowledged: the media damaged the WAL, and it was lost.
    """
    try:
        with open(wal, "rb") as file:
            header = file.read(_WAL_HEADER.size)
            if len(header) < _WAL_HEADER.size:
                return None
            magic, _, page_size, _, salt1, salt2, _, _ = _WAL_HEADER.unpack(header)
            if magic not in _WAL_MAGIC or not 512 <= page_size <= 65536:
                return None  # no WAL SQLite wrote (or one it never used): nothing in it
            current, commits = [], []
            for index, size, salts in _frames_from(file.fileno(), valid, page_size):
                if salts == (salt1, salt2):
                    current.append(index)
                    commits += [index] if size else []
    except FileNotFoundError:
        return None
    if any(index != current[-1] for index in commits):
        return f"frame {valid + 1} fails its checksum, and {len(commits)} commits follow it"
    return None


def _frames_from(fd: int, first: int, page_size: int) -> Iterator[tuple[int, int, tuple[int, int]]]:
    """Each whole frame's header from frame ``first`` on: (index, db size, salts)."""
    frame = _FRAME_HEADER.size + page_size
    end = os.fstat(fd).st_size
    for index in range(first, (end - _WAL_HEADER.size) // frame):
        head = os.pread(fd, _FRAME_HEADER.size, _WAL_HEADER.size + index * frame)
        _, size, salt1, salt2, _, _ = _FRAME_HEADER.unpack(head)
        yield index, size, (salt1, salt2)


def _copy_aside(path: Path) -> str:
    """A durable copy of ``path`` under ``<name>.corrupt-<time>`` (a copy, not a link:
    SQLite rewrites the WAL in place)."""
    target = path.with_name(f"{path.name}{_CORRUPT}{_stamp()}")
    with open(path, "rb") as reader, open(target, "xb") as out:
        shutil.copyfileobj(reader, out)
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(path.parent)
    return target.name


def _keep_before_wal_damage(
    conn: sqlite3.Connection, directory: Path, found: _Found, lost: str, new_epoch: str,
    log: Any,
) -> _Opened:  # fmt: skip
    """Serve what came before the damage, as the old journal did, under a new epoch
    (acknowledged seqs are missing and would be numbered again); the WAL kept aside."""
    copied = _copy_aside(directory / (DB_NAME + "-wal"))
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(_SET_META, (_EPOCH_KEY, new_epoch))
    conn.execute("COMMIT")
    log.error(
        "journal_damaged_starting_new_epoch",
        data_dir=str(directory),
        damaged_file=DB_NAME + "-wal",
        reason=lost,
        moved_aside=[copied],
        epoch=new_epoch,
        zones_kept=len(found.zones),
    )
    found.epoch = new_epoch
    reason = f"damaged {DB_NAME}-wal ({lost}); the transactions before it are kept"
    return _Opened(conn, found, f"{reason}; moved aside: {copied}")


def _replace_damaged(
    directory: Path, damage: str, options: _Options, *, new_epoch: str, log: Any
) -> _Opened:
    owner = _salvage_owner(directory)
    moved = _move_aside(directory)
    conn = _connect(
        directory / DB_NAME, fsync=options.fsync, checkpoint_bytes=options.checkpoint_bytes
    )
    try:
        _create_schema(conn, new_epoch, owner)
    except BaseException:
        conn.close()
        raise
    log.error(
        "journal_damaged_starting_new_epoch",
        data_dir=str(directory),
        damaged_file=DB_NAME,
        reason=damage,
        moved_aside=moved,
        epoch=new_epoch,
        zones_kept=0,
    )
    reason = f"damaged {DB_NAME} ({damage}); nothing recovered from it; moved aside: "
    return _Opened(conn, _Found(new_epoch, owner, {}, {}), reason + ", ".join(moved))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- the writer thread ----------------------------------------------------------------


class _Writer:
    """Everything that touches the connection after open, run on the one writer thread
    (a single-worker executor): each batch is one transaction.

    ``seqs`` is each zone's last seq as committed and ``chains`` each zone's newest run:
    the only state kept in memory (two numbers per zone, none per price).
    """

    def __init__(
        self, conn: sqlite3.Connection, directory: Path, options: _Options, found: _Found
    ) -> None:
        self.conn = conn
        self.history_size = options.history_size
        self.block = _block(options.history_size)
        self._runs: dict[str, list[StoredPrice]] = {}  # a transaction's, zone by zone
        self.seqs = found.seqs
        self.chains = _Chains(found.newest, found.next_id)
        self._wal_counter: int | None = None  # the WAL header's checkpoint counter
        self.db, self.wal = directory / DB_NAME, directory / (DB_NAME + "-wal")

    def commit(self, ops: Sequence[_Op]) -> _Committed:
        """Apply ``ops`` in one transaction and commit; on any failure roll back the
        transaction and the in-memory seqs, and raise."""
        undo: dict[str, int] = {}
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.chains.begin()
            self._apply(ops, undo)
            started = time.perf_counter()
            conn.execute("COMMIT")
            elapsed = time.perf_counter() - started
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for zone, seq in undo.items():
                self.seqs[zone] = seq
            self._runs.clear()  # what a failed transaction grouped is not the next's
            self.chains.rollback()
            raise
        return _Committed(elapsed, self.bytes_on_disk(), self._wal_restarts())

    def _apply(self, ops: Sequence[_Op], undo: dict[str, int]) -> None:
        """Each zone's prices of the transaction grouped for its runs; what the seq
        rules say (a reused seq, one further ahead, a reset) recorded where it happens,
        and its seq in ``zones`` (a pure append moves a zone's seq by its runs alone)."""
        conn, seqs, runs, price_type = self.conn, self.seqs, self._runs, StoredPrice
        ruled: dict[str, int] = {}
        for op in ops:
            if type(op) is price_type:  # by far the most common, so the fast path
                zone, seq = op.zone, op.seq
                last = seqs.get(zone, 0)
                if seq != last + 1:  # the old journal's seq rules, see the module doc
                    self._flush()
                    if seq <= last:
                        self._drop_from(zone, seq)
                    else:
                        self._drop_zone(zone)
                    ruled[zone] = seq
                seqs[zone] = seq
                run = runs.get(zone)
                if run is None:
                    runs[zone] = [op]
                    if zone not in undo:
                        undo[zone] = last
                else:
                    run.append(op)
            elif isinstance(op, ResetRecord):
                self._flush()
                self._drop_zone(op.zone)
                self._insert(_run_rows(op.zone, op.prices, self.block))
                undo.setdefault(op.zone, seqs.get(op.zone, 0))
                seqs[op.zone] = ruled[op.zone] = op.seq
            elif isinstance(op, EpochRecord):
                conn.execute(_SET_META, (_EPOCH_KEY, op.epoch))
            elif isinstance(op, _Meta):
                conn.execute(_SET_META, (_OWNER_KEY, op.text))
        self._flush()
        if ruled:
            conn.executemany(_UPSERT_ZONE, ruled.items())
        if undo:
            conn.executemany(_TRIM, self._trims(undo))

    def _trims(self, undo: Mapping[str, int]) -> list[tuple[int, int, str]]:
        """(newest run, cut, zone) for each zone whose history passed a block's end: its runs
        that end at or below the cut go (whole runs: at most ``block - 1`` prices kept
        beyond ``history_size``). Other zones have nothing to trim yet: one walk of a
        zone's chain per block, not per transaction."""
        size, block, seqs, newest = self.history_size, self.block, self.seqs, self.chains.newest
        trims = []
        for zone, before in undo.items():
            cut = (seqs[zone] - size) // block * block
            if cut > 0 and cut > (before - size) // block * block and zone in newest:
                trims.append((newest[zone], cut, zone))
        return trims

    def _drop_zone(self, zone: str) -> None:
        """Delete a zone's runs (a seq further ahead, a reset)."""
        head = self.chains.newest.get(zone)
        if head is not None:
            self.conn.execute(_DROP_CHAIN, (head, zone))
            self.chains.set_head(zone, None)

    def _drop_from(self, zone: str, seq: int) -> None:
        """A reused ``seq``: delete the zone's runs that start at or after it; the one it
        falls inside (if any) stays, and recovery cuts it where the next run starts."""
        head = self.chains.newest.get(zone)
        if head is None:
            return
        chain = self.conn.execute(_CHAIN_FROM, (head, seq, zone)).fetchall()
        self.conn.executemany(_DELETE_RUN, [(run,) for run, first in chain if first >= seq])
        kept = [run for run, first in chain if first < seq]
        self.chains.set_head(zone, kept[0] if kept else None)

    def _flush(self) -> None:
        """Insert the runs grouped so far (before a statement that must follow them)."""
        block, rows = self.block, []
        for zone, run in self._runs.items():
            if len(run) == 1:  # one price per zone (many zones): no generator, no sizes
                price = run[0]
                rows.append((zone, price.seq, price.seq, b"", price.payload))
            else:
                rows.extend(_run_rows(zone, run, block))
        self._runs.clear()
        self._insert(rows)

    def _insert(self, runs: Iterable[_RunRow]) -> None:
        _insert_values(self.conn, self.chains.link(runs))

    def checkpoint(self) -> int:
        """Copy the WAL into the database and empty it; the bytes on disk after."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self._wal_counter = None  # the caller counts this one, not the WAL's next start
        return self.bytes_on_disk()

    def _wal_restarts(self) -> int:
        """How many times the WAL started over since last asked: the checkpoint counter
        in its header goes up each time (SQLite's automatic checkpoints, for the stats)."""
        try:
            with open(self.wal, "rb") as wal:
                header = wal.read(_WAL_HEADER.size)
        except FileNotFoundError:
            return 0
        if len(header) < _WAL_HEADER.size:
            return 0
        counter = _WAL_HEADER.unpack(header)[3]
        seen, self._wal_counter = self._wal_counter, counter
        return 0 if seen is None else max(0, counter - seen)

    def bytes_on_disk(self) -> int:
        return _file_size(self.db) + _file_size(self.wal)

    def close(self) -> None:
        """Close the connection (SQLite checkpoints and removes the WAL)."""
        self.conn.close()


# --- the journal ----------------------------------------------------------------------


class SqliteJournal:
    """``journal.Journal``'s surface over one SQLite database; see the module docstring.

    Open it with ``SqliteJournal.open``; every method but ``stats`` and the ``queue_*``
    twins is a coroutine, and the database is only touched from its writer thread after
    open.
    """

    def __init__(
        self, directory: Path, *, lock_fd: int, opened: _Opened, options: _Options, log: Any
    ) -> None:
        self._directory = directory
        self._lock_fd: int | None = lock_fd
        self._log = log
        self._fsync = options.fsync
        self._history_size = options.history_size
        found = opened.found
        assert found.epoch is not None
        self._epoch = found.epoch
        self._meta = _owner_meta(found.owner, log)
        self._writer = _Writer(opened.conn, directory, options, found)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-journal")
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._bytes_on_disk = self._writer.bytes_on_disk()
        self._records = 0
        self._writes = 0
        self._fsyncs = 0
        self._log_records = 0
        self._snapshots = 0
        self._last_snapshot_at: float | None = None
        self._commit_recent: deque[float] = deque(maxlen=_RECENT_COMMITS)
        self._commit_max = 0.0
        self._last_error: str | None = None

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
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
    ) -> tuple[SqliteJournal, Recovered]:
        """Lock ``path`` (created if missing), migrate an old journal found there,
        open or create the database and recover what it holds. Blocking: call it at
        start, or through ``asyncio.to_thread``.

        The parameters are ``Journal.open``'s; ``compact_factor`` and
        ``compact_min_records`` are accepted and unused (the database is bounded by the
        trim, the WAL by ``checkpoint_bytes``).

        :param checkpoint_bytes: checkpoint once the WAL holds this much.

        :raises JournalLocked: another process holds the directory.
        :raises JournalUnavailable: the directory cannot be created, read or written.
        """
        del compact_factor, compact_min_records
        options = _Options(history_size, fsync, checkpoint_bytes)
        log = log or structlog.get_logger("pricehub.storage.journal")
        directory = Path(path)
        epoch = new_epoch or uuid.uuid4().hex[:12]
        # Before our lock: the old journal takes the same LOCK to read itself.
        found_legacy = None
        if legacy.needs_migration(directory, DB_NAME):
            found_legacy = legacy.read(
                directory, history_size=history_size, new_epoch=epoch, log=log
            )
        lock_fd = acquire_lock(directory)
        try:
            journal, recovered = cls._open_locked(
                directory, lock_fd, found_legacy, options, new_epoch=epoch, log=log, zones=zones
            )
        except (OSError, sqlite3.Error) as exc:
            os.close(lock_fd)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise JournalUnavailable(f"data dir {directory} cannot be used: {reason}") from exc
        except BaseException:
            os.close(lock_fd)
            raise
        log.info(
            "journal_opened",
            data_dir=str(directory),
            storage="sqlite",
            epoch=recovered.epoch,
            recovered=recovered.recovered,
            fresh_reason=recovered.fresh_reason,
            zones=len(recovered.zones),
            torn_bytes=0,
        )
        return journal, recovered

    @classmethod
    def _open_locked(
        cls,
        directory: Path,
        lock_fd: int,
        found_legacy: legacy.Legacy | None,
        options: _Options,
        *,
        new_epoch: str,
        log: Any,
        zones: Collection[str] | None,
    ) -> tuple[SqliteJournal, Recovered]:
        _drop_unfinished_migration(directory)
        if found_legacy is not None and not (directory / DB_NAME).exists():
            _migrate(directory, found_legacy, block=_block(options.history_size))
        else:
            found_legacy = None  # another process migrated it meanwhile
        legacy.move_leftovers(directory, log, migrated=found_legacy)
        opened = _open_db(directory, options, new_epoch=new_epoch, zones=zones, log=log)
        fresh_reason = opened.fresh_reason
        if found_legacy is not None and fresh_reason is None:
            fresh_reason = found_legacy.recovered.fresh_reason
        journal = cls(directory, lock_fd=lock_fd, opened=opened, options=options, log=log)
        return journal, Recovered(journal.epoch, opened.found.zones, fresh_reason)

    # -- what it holds ----------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._directory

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def meta(self) -> dict[str, Any] | None:
        """The owner's record of what this data describes (``write_meta``), as found at
        open or last written; None when there is none."""
        return None if self._meta is None else dict(self._meta)

    async def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace the owner's meta, in its own transaction (in write order).

        :raises DiskError: it could not be written (the old one stays).
        """
        await self._enqueue([_Meta(json.dumps(dict(meta), sort_keys=True))], 0)
        self._meta = dict(meta)

    # -- appending --------------------------------------------------------------------

    async def append(self, prices: Sequence[StoredPrice]) -> None:
        """Write ``prices`` (each zone's in seq order) and return once committed.

        Cancelling the caller does not cancel the write: the batch may still land.

        :raises DiskError: the transaction failed (or the journal is closed).
        """
        await self.queue_append(prices)

    # The ``queue_*`` twins take their place in the write order *now*, synchronously,
    # and return the future of their transaction (see ``Journal``).

    def queue_append(self, prices: Sequence[StoredPrice]) -> asyncio.Future[None]:
        """``append`` without waiting: the future is settled once the batch commits."""
        if not prices:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._enqueue(tuple(prices), len(prices))

    def queue_epoch(self, epoch: str) -> asyncio.Future[None]:
        """Record a new numbering lineage (failover reconciliation)."""
        return self._enqueue([EpochRecord(epoch)], 1, epoch=epoch)

    def queue_reset(
        self, zone: str, prices: Sequence[StoredPrice], *, seq: int
    ) -> asyncio.Future[None]:
        """Record that ``zone`` now has ``seq`` and exactly ``prices`` (contiguous,
        oldest first), as ``MemoryStorage.reset`` does."""
        kept = tuple(prices)[-self._history_size :]
        return self._enqueue([ResetRecord(zone, seq, kept)], 1)

    def _enqueue(
        self, ops: Sequence[_Op], records: int, *, epoch: str | None = None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(DiskError(f"journal {self._directory} is closed"))
            return future
        self._pending.append(_Pending(ops, records, future, epoch))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="sqlite_journal")
        return future

    async def _flush_loop(self) -> None:
        """One transaction for everything pending, then one for what came meanwhile."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            ops = [op for pending in batch for op in pending.ops]
            error: DiskError | None = None
            try:
                committed = await loop.run_in_executor(self._executor, self._writer.commit, ops)
            except Exception as exc:  # sqlite3.Error / OSError; anything else fails it too
                error = self._disk_error("journal_write_failed", exc)
            else:
                self._note_commit(batch, committed)
            _settle(batch, error)

    def _note_commit(self, batch: list[_Pending], committed: _Committed) -> None:
        records = 0
        for pending in batch:
            records += pending.records
            if pending.epoch is not None:
                self._epoch = pending.epoch
        self._writes += 1
        self._records += records
        self._log_records += records
        self._bytes_on_disk = committed.bytes_on_disk
        self._last_error = None
        if self._fsync:  # synchronous=FULL: the commit fsynced the WAL
            self._fsyncs += 1
            self._commit_recent.append(committed.elapsed)
            self._commit_max = max(self._commit_max, committed.elapsed)
        if committed.checkpoints:
            self._noted_checkpoint(committed.checkpoints)

    def _noted_checkpoint(self, count: int = 1) -> None:
        self._snapshots += count
        self._log_records = 0
        self._last_snapshot_at = time.time()

    def _disk_error(self, event: str, exc: Exception) -> DiskError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        error = DiskError(f"journal write in {self._directory} failed: {reason}")
        self._last_error = str(error)
        self._log.error(event, data_dir=str(self._directory), error=str(exc))
        return error

    async def snapshot(self) -> None:
        """Checkpoint now (it also happens by itself); raises ``DiskError`` on failure."""
        if self._closed:
            raise DiskError(f"journal {self._directory} is closed")
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        try:
            self._bytes_on_disk = await loop.run_in_executor(
                self._executor, self._writer.checkpoint
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._disk_error("journal_snapshot_failed", exc) from exc
        self._noted_checkpoint()

    # -- the rest -----------------------------------------------------------------------

    def stats(self) -> JournalStats:
        """The old journal's figures: ``fsyncs`` and ``writes`` count transactions (one
        fsync of the WAL each with ``fsync``), ``snapshots`` checkpoints."""
        return JournalStats(
            data_dir=str(self._directory),
            bytes_on_disk=self._bytes_on_disk,
            last_snapshot_at=self._last_snapshot_at,
            snapshots=self._snapshots,
            fsyncs=self._fsyncs,
            writes=self._writes,
            records=self._records,
            log_records=self._log_records,
            fsync_last_seconds=self._commit_recent[-1] if self._commit_recent else None,
            fsync_max_seconds=self._commit_max,
            fsync_recent_seconds=tuple(self._commit_recent),
            last_error=self._last_error,
        )

    async def close(self) -> None:
        """Finish pending writes, close the database, release the lock. Idempotent;
        appends after it raise ``DiskError``."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await self._flusher
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._writer.close)
        finally:
            self._executor.shutdown(wait=False)
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)  # closing the only descriptor drops the flock


def _settle(batch: Iterable[_Pending], error: DiskError | None) -> None:
    for pending in batch:
        if pending.future.done():  # its caller was cancelled
            continue
        if error is None:
            pending.future.set_result(None)
        else:
            pending.future.set_exception(DiskError(str(error)))
