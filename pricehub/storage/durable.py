"""The embedded default made durable: a ``MemoryStorage`` whose every price is journaled.

``DurableStorage`` wraps a ``MemoryStorage`` (reads are served from it unchanged) and a
``SqliteJournal`` (``sqlite_journal.py``, one SQLite database) in its data directory. A
price is numbered, committed (``synchronous=FULL``: the WAL fsynced), and only then
stored in memory, broadcast and acknowledged:

* Numbering happens when a batch is formed, not when ``append`` is called. Callers queue
  their prices; one flusher task takes everything queued, numbers it from memory's seqs,
  hands it to the journal as one write + one fsync, and while that fsync is in flight the
  next callers queue up for the next batch (group commit, as in the journal). So a seq is
  only ever handed out for a batch that is being written, and memory (what readers and
  resuming clients see) only ever holds prices that are on disk.
* A batch that fails (``DiskError``: disk full, I/O error) fails every caller in it and
  leaves memory untouched, so the next batch numbers from the same seqs again: no gap,
  and the failed seqs, which were never broadcast nor acknowledged, are reused. The
  journal's replay rule "a reused seq wins" makes that safe even if the failed batch
  partly reached the disk (a failed SQLite transaction is rolled back whole anyway). The
  journal tries again with the next batch, so publishing recovers by itself once the disk
  does.
* A caller that is cancelled (an HTTP client gone) does not cancel its batch: the
  flusher is not the caller's task, so memory and the journal never disagree.

``start`` opens the journal in a worker thread (it locks the directory, migrates an old
journal found there, recovers, and writes the epoch of a fresh directory) and loads what
it recovered into memory: the epoch, each zone's seq and retained history, so resuming
clients get ``recovered: true`` and numbering continues where it stopped. After damage
the journal recovers what came before it under a new epoch (``Recovered.fresh_reason``):
that is loaded and served just the same, and resuming clients are told (``recovered:
false``). ``JournalLocked`` / ``JournalUnavailable`` propagate from ``start``: with
``--redis-url none`` they are start errors (exit 2).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pricehub.storage.base import (
    DiskState,
    DiskStatus,
    HistorySlice,
    IngestAck,
    IngestSource,
    Snapshot,
    Storage,
    StorageListener,
    StoredPrice,
)
from pricehub.storage.datadir import Recovered
from pricehub.storage.errors import DiskError, StorageUnavailable
from pricehub.storage.memory import MemoryStorage
from pricehub.storage.sqlite_journal import SqliteJournal
from pricehub.wire.codes import Backend
from pricehub.wire.messages import accepted_now, with_seq

__all__ = ["DurableMemory", "DurableStorage", "JournaledAppends", "disk_status", "journal_status"]


def journal_status(
    journal: SqliteJournal | None, recovered: Recovered | None, *, write_errors: int, closed: bool
) -> DiskStatus:
    """A journal's ``DiskStatus`` (shared by ``DurableStorage`` and the failover's):
    ``OK`` while its writes succeed, else ``UNAVAILABLE`` with the last error (or why
    there is no journal: not started, closed)."""
    if journal is None:
        reason = "closed" if closed else "not started"
        return DiskStatus(DiskState.UNAVAILABLE, reason, write_errors=write_errors)
    stats = journal.stats()
    error = stats.last_error
    return DiskStatus(
        DiskState.OK if error is None else DiskState.UNAVAILABLE,
        error,
        journal=stats,
        write_errors=write_errors,
        recovered=None if recovered is None else recovered.recovered,
        fresh_reason=None if recovered is None else recovered.fresh_reason,
    )


def disk_status(storage: Storage) -> DiskStatus:
    """``storage.disk_status()``: kept for the tests that read it this way."""
    return storage.disk_status()


@dataclass(slots=True)
class _Pending:
    items: Sequence[tuple[str, bytes]]
    future: asyncio.Future[list[StoredPrice]]


class JournaledAppends:
    """Numbering into a ``MemoryStorage`` through a ``SqliteJournal``: see the module
    docstring (batches numbered when formed, written and fsynced, then stored in
    ``memory``, broadcast to ``listener`` and answered). Used by ``DurableStorage`` and
    by ``FailoverStorage`` while it numbers in memory.

    ``write_errors`` counts failed batches.
    """

    def __init__(
        self,
        memory: MemoryStorage,
        journal: SqliteJournal,
        *,
        listener: StorageListener | None,
        log: Any,
    ) -> None:
        self.memory = memory
        self.journal = journal
        self.listener = listener
        self._log = log
        # Callers waiting for the next batch. Bounded by the callers themselves: each one
        # awaits its entry, and publishers are bounded by request size and rate limits.
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.write_errors = 0

    async def submit(self, items: Sequence[tuple[str, bytes]]) -> list[StoredPrice]:
        """Number, journal, store and broadcast ``items``, in order; their prices.

        :raises DiskError: the journal write failed; nothing of it was stored.
        """
        future: asyncio.Future[list[StoredPrice]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(items, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="journal_flusher")
        # Shielded: a cancelled caller leaves its prices to the batch (see module doc).
        return await asyncio.shield(future)

    async def drain(self) -> None:
        """Wait until every submitted batch is settled (stored or failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush_loop(self) -> None:
        """One batch at a time: number, write + fsync, then store, broadcast, answer."""
        while self._pending:
            batch, self._pending = self._pending, []
            numbered = self._number(batch)
            prices = [price for group in numbered for price in group]
            try:
                await self.journal.append(prices)
            except Exception as exc:  # DiskError; anything else must fail the batch too
                self._fail(batch, exc)
                continue
            self._commit(batch, numbered, prices)

    def _number(self, batch: list[_Pending]) -> list[list[StoredPrice]]:
        """Seqs continue from memory's, which holds exactly what is durable. The batch is
        numbered in one step, and that moment is every price's ``accepted_at``: stored in
        its payload, so it is journaled with it and the same after any restart."""
        seqs: dict[str, int] = {}
        numbered = []
        accepted_at = accepted_now()
        for pending in batch:
            group = []
            for zone, body in pending.items:
                seq = seqs.get(zone, 0) or self.memory.last_seq(zone)
                seqs[zone] = seq = seq + 1
                group.append(StoredPrice(zone, seq, with_seq(body, seq, accepted_at)))
            numbered.append(group)
        return numbered

    def _commit(
        self, batch: list[_Pending], numbered: list[list[StoredPrice]], prices: list[StoredPrice]
    ) -> None:
        memory = self.memory
        for price in prices:
            memory.mirror(price)
        listener = self.listener
        if listener is not None:
            try:
                for price in prices:
                    listener.on_price(price)
            except Exception:  # the prices are stored: their callers get them regardless
                self._log.exception("storage_listener_failed")
        for pending, group in zip(batch, numbered, strict=True):
            if not pending.future.done():
                pending.future.set_result(group)

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        """Nothing of the batch reached memory: the next batch reuses its seqs."""
        self.write_errors += 1
        message = str(exc) if isinstance(exc, DiskError) else f"journal write failed: {exc!r}"
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(DiskError(message))


class DurableMemory:
    """One data dir's journal and the memory numbering through it: what ``DurableStorage``
    is made of, and what ``FailoverStorage`` journals its mirror with (one object, so
    the two cannot drift apart).

    ``open`` locks and recovers the data dir (nothing is loaded yet: the failover first
    checks whom the journal belongs to); ``load`` puts what it recovered into a
    ``MemoryStorage`` and starts numbering into it through the journal (``appends``).
    """

    def __init__(self, journal: SqliteJournal, recovered: Recovered, *, log: Any) -> None:
        self.journal = journal
        self.recovered = recovered
        self.appends: JournaledAppends | None = None  # once loaded
        self._log = log

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        history_size: int,
        new_epoch: str,
        zones: Collection[str] | None,
        log: Any,
        options: Mapping[str, Any],
    ) -> DurableMemory:
        """Open the journal in a worker thread (it locks, migrates, recovers; it logs
        what it recovered).

        :raises JournalLocked: another process uses the data dir.
        :raises JournalUnavailable: the data dir cannot be created, read or written.
        """
        journal, recovered = await asyncio.to_thread(
            SqliteJournal.open, data_dir, history_size=history_size, new_epoch=new_epoch,
            log=log, zones=zones, **options,
        )  # fmt: skip
        return cls(journal, recovered, log=log)

    def load(self, memory: MemoryStorage, listener: StorageListener | None) -> None:
        """Each recovered zone's seq and history into ``memory``; from now on memory
        numbering goes through the journal (``appends``)."""
        for zone, state in self.recovered.zones.items():
            memory.reset(zone, state.prices, seq=state.seq)
        self.appends = JournaledAppends(memory, self.journal, listener=listener, log=self._log)

    @property
    def write_errors(self) -> int:
        """Failed journal batches of memory numbering."""
        return 0 if self.appends is None else self.appends.write_errors

    def status(self, *, more_errors: int = 0) -> DiskStatus:
        """The journal's ``DiskStatus``; ``more_errors``: the owner's own failed writes."""
        return journal_status(
            self.journal, self.recovered, write_errors=self.write_errors + more_errors,
            closed=False,
        )  # fmt: skip

    async def drain(self) -> None:
        """Wait until every submitted batch is settled (stored or failed)."""
        if self.appends is not None:
            await self.appends.drain()

    async def close(self) -> None:
        """Finish the queued batches, hear nothing more, close the journal (it writes
        what is still queued behind, fsyncs, unlocks)."""
        if self.appends is not None:
            await self.appends.drain()
            self.appends.listener = None
        await self.journal.close()


class DurableStorage(Storage):
    """``MemoryStorage`` semantics, kept in ``data_dir`` across restarts.

    :param data_dir: the journal's directory (created if missing).
    :param history_size: prices retained per zone, in memory and on disk.
    :param zones: the zones served: what the journal holds of others is kept on disk
        but not loaded (``SqliteJournal.open``). None: every zone it holds.
    :param log: structlog logger (default ``pricehub.storage``).
    :param journal_options: passed to ``SqliteJournal.open`` (``fsync``,
        ``checkpoint_bytes``), for tests and benchmarks.

    ``write_errors`` counts failed journal batches (``disk_status``). It counts nothing
    else: ``counters`` is the Protocol's (all zero).
    """

    backend = Backend.IN_MEMORY

    def __init__(
        self,
        data_dir: str | Path,
        *,
        history_size: int = 1000,
        zones: Collection[str] | None = None,
        log: Any = None,
        **journal_options: Any,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._history_size = history_size
        self._zones = None if zones is None else frozenset(zones)
        self._log = log or structlog.get_logger("pricehub.storage")
        self._journal_options = journal_options
        # Replaced in ``start`` by one on the recovered epoch and state.
        self._memory = MemoryStorage(history_size=history_size)
        self._durable: DurableMemory | None = None  # once started
        self._closed = False

    @property
    def epoch(self) -> str:
        return self._memory.epoch

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def recovered(self) -> Recovered | None:
        """What the journal held at start (None before ``start``)."""
        return None if self._durable is None else self._durable.recovered

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, listener: StorageListener) -> None:
        """Open the journal (blocking, so in a thread) and load what it recovered.

        :raises JournalLocked: another process uses the data dir.
        :raises JournalUnavailable: the data dir cannot be created, read or written.
        """
        durable = await DurableMemory.open(
            self._data_dir, history_size=self._history_size, new_epoch=self._memory.epoch,
            zones=self._zones, log=self._log, options=self._journal_options,
        )  # fmt: skip
        memory = MemoryStorage(history_size=self._history_size, epoch=durable.recovered.epoch)
        durable.load(memory, listener)
        self._memory, self._durable = memory, durable

    @property
    def write_errors(self) -> int:
        """Failed journal batches (for the metrics)."""
        return 0 if self._durable is None else self._durable.write_errors

    async def close(self) -> None:
        """Finish the queued batches, then close the journal (fsync, unlock)."""
        if self._closed:
            return
        self._closed = True
        if self._durable is not None:
            await self._durable.close()

    # --- appending --------------------------------------------------------------------

    async def append(self, zone: str, body: bytes, *, ack: IngestAck | None = None) -> StoredPrice:
        if ack is not None:
            raise StorageUnavailable("no ingest stream without Redis")
        (price,) = await self._submit(((zone, body),))
        return price

    async def append_many(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice]:
        """``append`` for each ``(zone, body)``, in order, in one journal batch."""
        if acks is not None:
            raise StorageUnavailable("no ingest stream without Redis")
        if not items:
            return []
        return await self._submit(items)

    def ingest_source(self) -> IngestSource | None:
        return None  # no Redis, no stream to consume

    async def _submit(self, items: Sequence[tuple[str, bytes]]) -> list[StoredPrice]:
        appends = None if self._durable is None else self._durable.appends
        if self._closed or appends is None:
            raise DiskError(f"durable storage in {self._data_dir} is not open")
        return await appends.submit(items)

    # --- reads and the rest: memory's -----------------------------------------------

    async def latest(self, zone: str) -> StoredPrice | None:
        return await self._memory.latest(zone)

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        return await self._memory.history(zone, limit=limit)

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        return await self._memory.since(zone, seq)

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        return await self._memory.snapshot(zones)  # memory holds what is durable, epoch too

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        return await self._memory.history_between(zones, start, end, limit=limit)

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        await self._memory.register_instance(instance_id, snapshot, ttl=ttl)

    async def unregister_instance(self, instance_id: str) -> None:
        await self._memory.unregister_instance(instance_id)

    async def instances(self) -> dict[str, bytes]:
        return await self._memory.instances()

    async def check(self) -> None:
        """Never raises: reads are served from memory whatever the disk does; a failing
        disk shows in ``disk_status`` (health ``checks.disk``), not here."""
        return None

    # --- status -----------------------------------------------------------------------

    def disk_status(self) -> DiskStatus:
        if self._durable is None:
            return journal_status(None, None, write_errors=0, closed=self._closed)
        return self._durable.status()
