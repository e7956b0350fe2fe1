"""Redis with live failover to memory and back: what ``create_storage`` gives for a URL.

Every price Redis delivers is mirrored into a ``MemoryStorage``, and reads are served
from that mirror, which is exactly what this instance's listener has seen (resumes are
consistent with the live stream and cost no round trip). A price Redis numbered for one
of our own appends is mirrored from the append's reply, before it is answered, not only
when Pub/Sub delivers it (issue 23, ``_acknowledged``): Redis can die between the two,
and a mirror without a price we acknowledged would give its seq to another one. So
when Redis fails (an error,
a timeout, a silent subscriber), the instance switches to the mirror at once: it keeps
serving, its numbering continues from the last seq it knew, and clients are told
through ``on_backend_changed(Backend.IN_MEMORY)``. Unreachable at start is the same state.

A probe then retries Redis every ``probe_interval``. Recovery reconciles under a
closed gate (appends wait, for a few round trips):

1. the epoch: claimed if Redis lost it, else Redis's is adopted;
2. per zone, the prices accepted during the outage are written back (and published)
   where Redis is behind, and Redis's seq is raised to ours, so no instance's
   numbering ever goes backwards; a Redis that lost its data and was just restored by
   this instance is not numbered in until the peers seen alive have written back
   theirs too (bounded, ``_await_peers``): one of them may hold a price acknowledged
   as Redis died that no other copy has;
3. if a seq both sides hold carries different prices, the numbering diverged (several
   instances numbered alone): the epoch changes, so clients resuming across the
   outage get ``recovered: false`` instead of a silent mix of two histories;
4. the listener gets the prices other instances published meanwhile, then the backend
   change, and the subscriber takes over from the reconciled seqs.

Several instances (issue 13): numbering alone is only safe for a *lone* instance. One
that knows it has peers (the instance registry showed another live instance within the
last ``PEER_MEMORY`` seconds, or ``assume_peers``: ``--workers`` > 1, or, restarted
while Redis is away, its data dir's meta says it had peers when it last read the
registry: ``binding.had_peers``) does not number in memory while Redis is
away: it *holds* appends (``hold`` seconds from the start of the outage, ``--redis-hold``)
and lets them through, in order, once Redis is back and reconciled; after the window an
append raises ``StorageHeld`` (HTTP 503 with ``Retry-After``). Reads and subscribers are
served from the mirror meanwhile, nobody is disconnected, and since nobody numbered
alone the reconcile finds nothing diverged: the epoch stays, no client loses continuity.
An append whose connection failed after it was sent (``WriteInDoubt``) waits the same
way and is then looked up in the reconciled history: found, it is answered with the seq
Redis gave it; not found, it is appended then.

A refused append because the epoch moved (``EpochChanged``: a peer declared a
divergence, or Redis lost its data) is a reason to reconcile, never to fail over: the
instance holds its appends (quietly: backend and clients unchanged), reconnects,
reconciles, and retries them under the epoch Redis has. The same happens when the
subscriber hears an epoch announcement.

Durability (issue 15, ``data_dir``): the memory store is journaled like the embedded
default's (``durable.py``), so an instance restarted while Redis is away continues its
lineage. ``start`` opens the journal and loads what it holds into the mirror *before*
the first connect, so the usual reconcile decides: Redis reachable, Redis wins (the
journal's prices are written back where Redis is behind and agrees, a divergence
changes the epoch); unreachable, numbering continues from the journal. Prices numbered
in memory are written and fsynced before they are stored, broadcast or answered
(``JournaledAppends``: a failed write is a ``DiskError``, 503, and leaves no gap).
Prices mirrored from Redis, zone resets and epochs of a reconcile are written behind
(not awaited: Redis keeps them), in the same order as everything else. A data dir that
is locked or not writable is not fatal here: the instance runs without durability and
says so (``disk_status``: ``disabled: <reason>``).

A journal never seeds a Redis it did not mirror (issue 22, ``binding.py``). The data
dir's meta records the Redis address (host, port, db, key prefix) and the feed id found
in Redis (``<prefix>feed``, created with the feed, next to the epoch). A journal bound
to another address is closed at ``start`` without being loaded; one whose Redis turns
out, at the run's first reconcile, to hold another feed (another feed id; for a journal
of an older pricehub with no binding: anything but its epoch) is closed then, and memory
forgets its lineage before anything is written back. Either way the journal is left as
it was, the instance mirrors the Redis it found without durability, one warning names
both, and ``disk_status`` says ``DiskState.FOREIGN`` (health degraded). Later reconciles need
no check: memory is then this run's live mirror of that Redis, as without a data dir.
The same Redis found empty (it lost its data) is restored from the journal as before.
``adopt_journal`` (one start, logged) binds the journal to the configured Redis before
the first connect, so it seeds that Redis if it has no feed (if it has one, Redis wins
as on any reconcile).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from pricehub.storage.base import (
    DiskState,
    DiskStatus,
    ForeignJournal,
    HistorySlice,
    IngestAck,
    IngestKeys,
    IngestSource,
    Snapshot,
    StorageCounters,
    StorageListener,
    StoredPrice,
)
from pricehub.storage.binding import (
    FEED_KEY,
    Binding,
    RedisAddress,
    had_peers,
    meta_json,
    mirror_id,
    mirrors,
    peer_mirrors,
)
from pricehub.storage.cluster import RedisClusterStorage, is_cluster_url
from pricehub.storage.datadir import Recovered
from pricehub.storage.durable import DurableMemory, journal_status
from pricehub.storage.errors import (
    BatchInterrupted,
    DiskError,
    JournalUnavailable,
    LeaseLost,
    StorageHeld,
    StorageUnavailable,
)
from pricehub.storage.failover_mode import Mode, ModeMachine
from pricehub.storage.memory import MemoryStorage
from pricehub.storage.redis import (
    EpochChanged,
    KeyLayout,
    RedisStorage,
    WriteInDoubt,
    announce_gap,
    redis_errors,
)
from pricehub.storage.redis.stream import RedisIngestStream
from pricehub.storage.sqlite_journal import SqliteJournal
from pricehub.storage.upstream import Upstream
from pricehub.wire.codes import Backend
from pricehub.wire.messages import body_of

T = TypeVar("T")

__all__ = ["FailoverCounts", "FailoverStorage"]

# A peer seen in the registry counts for this long. Not just "at the last look": a peer
# restarting (it unregisters, then registers again seconds later) or an outage starting
# between two looks would otherwise leave both sides thinking they are alone and
# numbering alone (seen in the chaos soak: a SIGTERM then a Redis pause 7 s later).
# Twice the registry TTL: a peer that really left stops counting within ~30 s.
PEER_MEMORY = 30.0
MAX_HELD = 10_000  # appends waiting at once; more are refused at once (503), not queued
HOLD_PROBE_INTERVAL = 0.2  # seconds between reconnect attempts while appends are held
# After restoring a Redis that lost its data: how long to wait for the peers known to be
# alive to write back their copies before numbering there (see ``_await_peers``). Peers
# holding reconnect every HOLD_PROBE_INTERVAL; this covers a few of their attempts.
PEER_RESTORE_WAIT = 2.0
PEER_POLL_INTERVAL = 0.05  # seconds between looks at the registry meanwhile
# Mirrored prices waiting to be written behind. Past this (a disk much slower than the
# feed) further mirrored prices are not journaled: Redis keeps them, and the hole only
# makes a later replay restart that zone's history after it (its seq stays right).
# Epochs and zone resets are never dropped: they carry the lineage.
MAX_WRITE_BEHIND = 50_000
WRITE_BEHIND_WARN_INTERVAL = 10.0  # seconds between warnings of write-behind trouble
NO_BINDING = "none recorded (a data dir of an older pricehub, or of --redis-url none)"
FOREIGN_JOURNAL = (
    "left untouched and not used: no durability until restarted on the Redis it mirrors, "
    "with --adopt-journal (seeds this Redis from it), or with another --data-dir"
)


@dataclasses.dataclass(slots=True)
class FailoverCounts:
    """What a ``FailoverStorage`` counted since it was built (``counters()`` exports all
    but the last two, which count in ``disk_status``'s write errors)."""

    failovers: int = 0  # switches from Redis to memory (or to holding)
    recoveries: int = 0  # switches back after an outage (a resync is not one)
    redis_errors: int = 0  # failed Redis operations and probes
    epoch_changes: int = 0  # reconciles that moved the lineage
    gaps: int = 0  # prices after a hole no history could fill
    holds: int = 0  # outages during which appends were held
    held_refusals: int = 0  # appends refused because the hold window ended
    resyncs: int = 0  # reconciles because the epoch moved
    journal_behind_errors: int = 0  # written-behind records that failed
    journal_behind_dropped: int = 0  # mirrored prices not journaled (queue full)


class FailoverStorage:
    """The ``Storage`` Protocol on Redis, falling back to memory while Redis is away.

    :param redis_url: the Redis to use when reachable.
    :param zones: the configured zones (reconciled and mirrored on recovery).
    :param key_prefix: prefix of every Redis key and channel (default ``pricehub:``).
    :param history_size: prices retained per zone, in Redis and in memory (default 1000).
    :param timeout: Redis socket timeout in seconds (default 0.5): the failover trigger.
    :param probe_interval: seconds between attempts to get Redis back (default 1), and
        between liveness probes of the subscriber connection.
    :param hold: seconds appends are held while Redis is away when this instance has
        peers (default 5); 0 numbers in memory even then (the pre-1.x behaviour).
    :param assume_peers: act as an instance with peers from the start (``--workers`` >
        1), whatever the registry says (default False).
    :param data_dir: journal the memory store there (default None: nothing on disk).
    :param adopt_journal: take the journal as this Redis's even if it mirrored another
        (default False; see the module docstring).
    :param journal_options: passed to ``SqliteJournal.open`` (tests, benchmarks).
    :param log: structlog logger (default ``pricehub.storage``).

    Counters: ``counters()`` (for the metrics), from a ``FailoverCounts`` (what each
    counts), plus ``foreign_messages`` (messages on our channel that are not our feed's:
    dropped); written-behind records that failed count in ``disk_status``.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        zones: Sequence[str],
        key_prefix: str = "pricehub:",
        history_size: int = 1000,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        hold: float = 5.0,
        assume_peers: bool = False,
        data_dir: str | Path | None = None,
        adopt_journal: bool = False,
        journal_options: Mapping[str, Any] | None = None,
        log: Any = None,
    ) -> None:
        self._url = redis_url
        self._address = RedisAddress.from_url(redis_url, key_prefix=key_prefix)
        self._zones = tuple(zones)
        self._key_prefix = key_prefix
        self._history_size = history_size
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._log = log or structlog.get_logger("pricehub.storage")
        self._memory = MemoryStorage(history_size=history_size)
        self._epoch = self._memory.epoch
        self._modes = ModeMachine()  # see failover_mode: checked moves
        self._redis: Upstream | None = None
        self._listener: StorageListener | None = None
        # Cleared while recovery reconciles: appends wait so none is numbered twice.
        self._gate = asyncio.Event()
        self._gate.set()
        self._hold = hold
        self._assume_peers = assume_peers
        # When the registry last showed another live instance (monotonic seconds).
        self._peer_seen_at: float | None = None
        self._peer_ids: frozenset[str] = frozenset()  # the other instances last seen
        self._instance_id: str | None = None  # ours, once registered
        self._registration: tuple[bytes, float] | None = None  # our snapshot and ttl
        # What the data dir's meta says of peers (``binding.had_peers``, and their
        # ``peer_mirrors``), kept in step with ``has_peers`` / ``_peer_ids`` while the
        # registry can be read.
        self._peers_recorded = False
        self._peer_ids_recorded: frozenset[str] = frozenset()
        # The id of this instance's copy of the feed, registered with the instance:
        # peers know it by this (``_peer_ids`` are peers' mirror ids). The data dir's
        # (``binding.mirror_id``) when journaled, so that it survives a restart.
        self._mirror_id = uuid.uuid4().hex[:16]
        # Prices Redis acknowledged to our appends that the mirror cannot take yet (a
        # seq before them not delivered by Pub/Sub yet), per zone and seq: see
        # ``_acknowledged``.
        self._unheard: dict[str, dict[int, StoredPrice]] = {}
        # The ingest stream entry of each price our ingest appended, per zone and seq
        # (bounded by the history): a write-back settles it with the price
        # (``RedisStorage.restore``), so a Redis that lost both cannot apply it again.
        self._ingested: dict[str, dict[int, str]] = {}
        # The lost connection's close: it settles the appends still in flight on it.
        self._closing: asyncio.Task[None] | None = None
        self._outage_started = time.monotonic()
        # Cleared while appends are held (``Mode.holding``); held appends wait for it.
        self._released = asyncio.Event()
        self._held = 0
        self._probe_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self._counts = FailoverCounts()  # see the class docstring
        self._foreign_before = 0  # foreign messages counted by connections since closed
        self._data_dir = None if data_dir is None else Path(data_dir)
        self._journal_options = dict(journal_options or {})
        # The journal, what it recovered, memory numbering through it (``durable.py``'s,
        # as the embedded default's); None without a data dir or once detached.
        self._durable: DurableMemory | None = None
        self._disk_reason: str | None = None  # why the data dir is not used
        self._behind = 0  # written-behind records not settled yet
        self._behind_warned_at = -WRITE_BEHIND_WARN_INTERVAL
        self._adopt_journal = adopt_journal
        # Whether memory still holds the journal's lineage as loaded, unchecked: until
        # this run's first reconcile (after it memory is a live mirror of this Redis).
        self._unchecked = not adopt_journal
        self._binding: Binding | None = None  # what the journal mirrors (None: unproven)
        self._feed_id: str | None = None  # of the feed last reconciled with (or the journal's)
        self._foreign: ForeignJournal | None = None  # why the journal is not used

    @property
    def backend(self) -> Backend:
        return self._modes.mode.backend  # a resync is no outage: clients are not told

    @property
    def has_peers(self) -> bool:
        """Whether numbering alone could collide with another instance's numbering."""
        seen = self._peer_seen_at
        return self._assume_peers or (seen is not None and time.monotonic() - seen < PEER_MEMORY)

    @property
    def epoch(self) -> str:
        return self._epoch

    def ingest_stream(self) -> RedisIngestStream:
        """The ingest stream on the live Redis (for the ingest consumer); raises while in
        memory."""
        redis = self._redis
        if self._mode is not Mode.REDIS or redis is None:
            raise StorageUnavailable("serving from memory: redis unavailable")
        return RedisIngestStream(redis.client, self.ingest_keys)

    @property
    def key_prefix(self) -> str:
        return self._key_prefix

    @property
    def ingest_keys(self) -> IngestKeys:
        # Whichever Redis connects: a cluster's layout keeps the ingest names.
        return KeyLayout(self._key_prefix).ingest_keys

    @property
    def ingest_depth(self) -> int:
        """The connected Redis backend's (1 while there is none: ingest waits anyway)."""
        redis = self._redis
        return 1 if redis is None else redis.ingest_depth

    @property
    def foreign_messages(self) -> int:
        redis = self._redis
        return self._foreign_before + (redis.foreign_messages if redis is not None else 0)

    def counters(self) -> StorageCounters:
        counts = self._counts
        return StorageCounters(
            failovers=counts.failovers,
            recoveries=counts.recoveries,
            redis_errors=counts.redis_errors,
            gaps=counts.gaps,
            holds=counts.holds,
            held_refusals=counts.held_refusals,
            resyncs=counts.resyncs,
            foreign_messages=self.foreign_messages,
            epoch_changes=counts.epoch_changes,
        )

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, listener: StorageListener) -> None:
        self._listener = listener
        await self._open_journal(listener)  # before the first connect: see the docstring
        try:
            await self._switch_to_redis(recovering=False)
        except StorageUnavailable as exc:
            self._counts.redis_errors += 1
            self._set_mode(self._outage_mode())
            self._outage_started = time.monotonic()
            self._counts.holds += self._mode is Mode.HOLD
            self._log.warning(
                "redis_unavailable_at_start", backend=Backend.IN_MEMORY, error=str(exc),
                holding=self._mode is Mode.HOLD, probe_interval=self._probe_interval,
            )  # fmt: skip
            self._start_probe()
        else:
            self._log.info("storage_selected", backend=Backend.REDIS, epoch=self._epoch)

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._background, *([self._probe_task] if self._probe_task else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self._timeout)  # see RedisStorage.close
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.close()
        durable, self._durable = self._durable, None
        if durable is not None:
            await durable.close()  # writes what is still queued behind, then unlocks

    # --- durability -------------------------------------------------------------------

    async def _open_journal(self, listener: StorageListener) -> None:
        """Open the data dir and load what it holds into the mirror; a locked or
        unusable one only disables durability (several instances may share a working
        directory: only the first journals)."""
        if self._data_dir is None:
            return
        try:
            durable = await DurableMemory.open(
                self._data_dir, history_size=self._history_size, new_epoch=self._epoch,
                zones=self._zones, log=self._log, options=self._journal_options,
            )  # fmt: skip
        except JournalUnavailable as exc:
            self._disable_durability(exc)
            return
        journal, recovered = durable.journal, durable.recovered
        self._peers_recorded = had_peers(journal.meta)
        self._peer_ids_recorded = peer_mirrors(journal.meta)
        self._mirror_id = mirror_id(journal.meta) or self._mirror_id  # before any write
        try:
            binding = await self._bind_at_open(journal, recovered)
            if binding is not None and not binding.address.same_as(self._address):
                await durable.close()  # never loaded, never written: left as it was
                self._reject(str(binding), str(self._address))
                return
            if mirror_id(journal.meta) is None:  # a new data dir's: kept from now on
                await journal.write_meta(self._meta(binding))
        except DiskError as exc:  # the meta file could not be written
            await durable.close()
            self._disable_durability(exc)
            return
        self._binding, self._feed_id = binding, None if binding is None else binding.feed_id
        self._epoch = recovered.epoch
        if self._peers_recorded:
            # The registry is in Redis: restarted while Redis is away, the last run's
            # view is all there is. Peers then may be numbering from this same journal
            # epoch and seqs, so this instance holds instead of numbering alone; and
            # a Redis that lost its data waits for those peers' copies (``_await_peers``).
            self._peer_seen_at, self._peer_ids = time.monotonic(), self._peer_ids_recorded
        durable.load(self._memory, listener)
        self._durable = durable

    def _disable_durability(self, exc: Exception) -> None:
        self._disk_reason = str(exc)
        self._log.warning("durability_disabled", data_dir=str(self._data_dir), reason=str(exc))

    async def _bind_at_open(self, journal: SqliteJournal, recovered: Recovered) -> Binding | None:
        """The journal's binding, to be checked against Redis. ``adopt_journal`` rebinds
        it to the configured Redis *before* anything of it can reach that Redis (so a
        crash right after the seeding finds it bound to where its feed went); a journal
        with nothing to seed (a new data dir) is simply bound to it."""
        binding = Binding.from_json(journal.meta)
        if self._adopt_journal:
            self._log.warning(
                "journal_adopted", data_dir=str(self._data_dir), epoch=recovered.epoch,
                journal_redis=NO_BINDING if binding is None else str(binding),
                redis=str(self._address),
            )  # fmt: skip
            binding = Binding(self._address, None if binding is None else binding.feed_id)
        elif binding is None and not any(zone.seq for zone in recovered.zones.values()):
            binding = Binding(self._address)
        else:
            return binding
        await journal.write_meta(self._meta(binding))
        return binding

    def _meta(self, binding: Binding | None) -> dict[str, Any]:
        """The data dir's meta as recorded: ``binding``, the mirror id, the peers."""
        return meta_json(
            binding, peers=self._peers_recorded, mirror=self._mirror_id,
            peer_ids=self._peer_ids_recorded,
        )  # fmt: skip

    def _reject(self, journal_redis: str, redis: str) -> None:
        """The journal mirrors another feed: say so, once (log, health, stats)."""
        data_dir = str(self._data_dir)
        self._foreign = ForeignJournal(
            data_dir=data_dir, journal_redis=journal_redis, redis=redis, advice=FOREIGN_JOURNAL
        )
        self._log.warning(
            DiskState.FOREIGN.value, data_dir=data_dir, journal_redis=journal_redis,
            redis=redis, journal=FOREIGN_JOURNAL,
        )  # fmt: skip

    def _write_behind(
        self, write: Callable[[SqliteJournal], asyncio.Future[None]], *, price: bool
    ) -> None:
        """Queue a record Redis already keeps (not awaited); ``price``: droppable."""
        if self._durable is None:
            return
        if price and self._behind >= MAX_WRITE_BEHIND:
            self._counts.journal_behind_dropped += 1
            self._warn_behind("journal_write_behind_dropped", pending=self._behind)
            return
        self._behind += 1
        write(self._durable.journal).add_done_callback(self._written_behind)

    def _written_behind(self, future: asyncio.Future[None]) -> None:
        self._behind -= 1
        error = None if future.cancelled() else future.exception()
        if error is not None:  # retrieved here, so asyncio does not report it again
            self._counts.journal_behind_errors += 1
            self._warn_behind("journal_write_behind_failed", error=str(error))

    def _warn_behind(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._behind_warned_at >= WRITE_BEHIND_WARN_INTERVAL:
            self._behind_warned_at = now
            self._log.warning(
                event, errors=self._counts.journal_behind_errors,
                dropped=self._counts.journal_behind_dropped, **fields,
            )  # fmt: skip

    def disk_status(self) -> DiskStatus:
        """``DISABLED`` without a data dir (with the reason when it could not be used),
        ``FOREIGN`` for a journal of another feed, else the journal's own status."""
        if self._data_dir is None:
            return DiskStatus(DiskState.DISABLED)
        if self._foreign is not None:
            return DiskStatus(DiskState.FOREIGN, foreign=self._foreign)
        if self._disk_reason is not None:
            return DiskStatus(DiskState.DISABLED, self._disk_reason)
        if self._durable is None:
            return journal_status(None, None, write_errors=0, closed=self._closed)
        return self._durable.status(more_errors=self._counts.journal_behind_errors)

    # --- failover ---------------------------------------------------------------------

    @property
    def _mode(self) -> Mode:
        return self._modes.mode

    def _set_mode(self, mode: Mode) -> None:
        self._modes.move(mode)
        if mode.holding:
            self._released.clear()
        else:
            self._released.set()  # held appends go on (in the order they came)

    def _outage_mode(self) -> Mode:
        return Mode.HOLD if self._hold > 0 and self.has_peers else Mode.MEMORY

    def _on_lost(self, redis: Upstream, cause: BaseException) -> None:
        """Leave Redis (once per outage): hold or number in memory, see the module
        docstring; callable from any task, synchronously."""
        self._counts.redis_errors += not isinstance(cause, EpochChanged)
        if redis is not self._redis or self._mode is not Mode.REDIS:
            return  # an old connection's last words, or already failed over
        self._redis = None
        self._foreign_before += redis.foreign_messages
        self._outage_started = time.monotonic()
        self._closing = self._spawn(redis.close())
        if isinstance(cause, EpochChanged):
            self._set_mode(Mode.RESYNC)
            self._counts.resyncs += 1
            self._log.info("storage_resync", reason=str(cause), epoch=self._epoch)
        else:
            self._enter_outage(cause)
        self._start_probe()

    def _enter_outage(self, cause: BaseException) -> None:
        self._set_mode(self._outage_mode())
        for zone in list(self._unheard):  # numbering alone: after every seq acknowledged
            self._fold_unheard(zone)
        for pending in self._unheard.values():  # holding: kept for the write-back
            self._journal_unheard(pending.values())
        self._counts.failovers += 1
        holding = self._mode is Mode.HOLD
        self._counts.holds += holding
        self._log.warning(
            "storage_failover", backend=Backend.IN_MEMORY, error=str(cause), epoch=self._epoch,
            holding=holding, hold=self._hold if holding else 0,
        )  # fmt: skip
        if self._listener is not None:
            self._listener.on_backend_changed(Backend.IN_MEMORY)

    def _start_probe(self) -> None:
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        # Held appends wait for this loop: it tries at once and then often; in memory
        # nothing waits, so it keeps to ``probe_interval``.
        first = True
        while not self._closed and self._mode is not Mode.REDIS:
            if self._mode is Mode.MEMORY or not first:
                interval = self._probe_interval
                if self._mode.holding:
                    interval = min(interval, HOLD_PROBE_INTERVAL)
                await asyncio.sleep(interval)
            first = False
            try:
                await self._switch_to_redis(recovering=True)
            except StorageUnavailable as exc:
                self._counts.redis_errors += 1  # counted, not logged: no log storm while down
                self._log.debug("redis_probe_failed", error=str(exc))
                if self._mode is Mode.RESYNC:  # Redis gone: a real outage after all
                    self._enter_outage(exc)
            except Exception:
                self._log.exception("redis_recovery_failed")

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def _lost_writes_pending(self) -> bool:
        """Whether the lost connection may still settle appends (see ``_closing``)."""
        return self._closing is not None and not self._closing.done()

    async def _settle_lost_writes(self) -> None:
        """Wait until the lost connection is closed: a reply it read before that is an
        acknowledged price (``_acknowledged`` mirrors it), which neither memory numbering
        nor a write-back may overlook. Bounded: ``RedisStorage.close`` is."""
        closing = self._closing
        if closing is not None and not closing.done():
            await asyncio.wait({closing})

    # --- recovery ---------------------------------------------------------------------

    async def _switch_to_redis(self, *, recovering: bool) -> None:
        await self._settle_lost_writes()
        redis = self._new_redis()
        await redis.connect()
        self._gate.clear()
        try:
            if self._durable is not None:
                # Appends numbered in memory before the gate closed are still being
                # written: reconcile only once they are in the mirror (or failed).
                await self._durable.drain()
            epoch, state = await self._reconcile(redis)
            if self._closed:
                raise StorageUnavailable("storage closed during recovery")
            self._adopt(redis, epoch, state, recovering=recovering)
            self._unchecked = False
        except BaseException:
            await redis.close()
            raise
        finally:
            self._gate.set()

    def _new_redis(self) -> Upstream:
        """A connection of the kind the URL names (a Redis Cluster or one node)."""
        options: dict[str, Any] = {
            "key_prefix": self._key_prefix, "history_size": self._history_size,
            "timeout": self._timeout, "probe_interval": self._probe_interval,
            "on_lost": self._on_lost, "log": self._log,
        }  # fmt: skip
        if is_cluster_url(self._url):
            return RedisClusterStorage(self._url, zones=self._zones, **options)
        return RedisStorage(self._url, **options)

    async def _reconcile(
        self, redis: Upstream
    ) -> tuple[str, dict[str, tuple[int, list[StoredPrice]]]]:
        """Steps 1-3 of the module docstring; returns Redis's epoch and state."""
        candidate = self._epoch
        redis_epoch, redis_feed = await _feed_state(redis)
        if not self._mirrors(redis_epoch, redis_feed):
            await self._detach_journal(_describe(self._address, redis_epoch, redis_feed))
            candidate = uuid.uuid4().hex[:12]  # a new feed if Redis has none, not ours
        epoch = await redis.claim_epoch(candidate)
        await self._settle_feed(redis)
        unchanged = epoch == self._epoch
        if unchanged:
            # Only into our own lineage: what memory numbered under an epoch Redis no
            # longer has is declared lost by the epoch change instead.
            diverged = await redis.restore(await self._write_back(), entries=self._ingested)
            if any(diverged.values()):
                epoch = await redis.replace_epoch(epoch, uuid.uuid4().hex[:12])
                unchanged = False
        # Our write-back is done: peers waiting for it go on. ``restored``: Redis was
        # found empty (by us or by a peer: whoever claimed first) moments ago.
        restored = await redis.written_back(self._mirror_id)
        await self._register_again(redis)
        if unchanged and restored is not None and not await self._await_peers(redis, restored):
            # A peer's copy may hold a price acknowledged under this epoch that nobody
            # wrote back: numbering on here could give its seq to another price. A new
            # epoch before our first price declares the loss instead (resumes get
            # ``recovered: false``); the peer, back later, writes nothing into it.
            epoch = await redis.replace_epoch(epoch, uuid.uuid4().hex[:12])
        return epoch, await redis.load(self._zones)

    async def _write_back(self) -> dict[str, tuple[int, list[StoredPrice]]]:
        """What ``restore`` gets, per zone this instance holds prices for: the last seq
        and the retained history, plus the prices Redis acknowledged to us that the
        mirror could not take (``_unheard``): a Redis that lost them gets them back, and
        their seqs are never given again."""
        local: dict[str, tuple[int, list[StoredPrice]]] = {}
        for zone in dict.fromkeys([*self._memory.zones_with_prices(), *self._unheard]):
            last = self._memory.last_seq(zone)
            prices = await self._memory.history(zone, limit=self._history_size)
            extra = sorted(
                (p for p in self._unheard.get(zone, {}).values() if p.seq > last),
                key=lambda price: price.seq,
            )  # fmt: skip
            local[zone] = (extra[-1].seq if extra else last, prices + extra)
        return local

    async def _await_peers(self, redis: Upstream, restored: frozenset[str]) -> bool:
        """Redis had lost its data and is being restored (``restored``: the mirrors
        that have written back so far, this one included). A peer may hold prices this
        copy lacks (acknowledged to it as Redis died, their Pub/Sub messages lost);
        numbering here before it writes them back would give their seqs to other
        prices. So wait, bounded, until every peer known has written back too: each
        adds its mirror id right after its write-back (``written_back``), whoever
        reconciled first. Whether all did: a peer that does not come back in time
        (gone, cut off, or still restarting) may still hold such a price, so the caller
        changes the epoch *before* numbering (issue 23: a peer's late write-back found
        the divergence only after a second 202 had named its seq).

        Peers are known by mirror id, which a data dir keeps across restarts
        (``binding.peer_mirrors``): an instance restarted during the outage still
        knows whom to wait for. Peers seen or recorded without one known (a data dir
        of an older pricehub) cannot be waited for: not all, as if missing."""
        if not self.has_peers or self._hold <= 0:
            return True  # numbering alone is this instance's rule anyway
        peers = self._peer_ids - {self._mirror_id}
        if not peers:
            return self._peer_seen_at is None  # only ``assume_peers``: none was ever seen
        # A deadline between looks, not a timeout around them: a command cancelled
        # midway would cost the reconcile its connection.
        deadline = time.monotonic() + PEER_RESTORE_WAIT
        missing = set(peers - restored)
        while missing and time.monotonic() < deadline:
            await asyncio.sleep(PEER_POLL_INTERVAL)
            found = await redis.written_back()
            if found is None:
                break  # the set expired: whoever is missing now is too late anyway
            missing -= found
        self._log.info(
            "storage_restored_empty_redis", epoch=self._epoch, peers=len(peers),
            peers_missing=sorted(missing),
        )  # fmt: skip
        return not missing

    async def _register_again(self, redis: Upstream) -> None:
        """Put our registration in the Redis just reconciled (the registry loop would
        in a few seconds): it tells waiting peers our write-back is done."""
        if self._instance_id is not None and self._registration is not None:
            snapshot, ttl = self._registration
            await redis.register_instance(
                self._instance_id, snapshot, ttl=ttl, mirror=self._mirror_id
            )

    def _mirrors(self, redis_epoch: str | None, redis_feed: str | None) -> bool:
        """Whether memory's lineage may be reconciled into this Redis: always without a
        journal, and once this run has reconciled with it (memory is then this instance's
        own live mirror of this Redis, as without a data dir)."""
        if self._durable is None or not self._unchecked:
            return True
        return mirrors(
            self._binding, journal_epoch=self._epoch, redis_epoch=redis_epoch,
            redis_feed=redis_feed,
        )  # fmt: skip

    async def _detach_journal(self, redis: str) -> None:
        """Stop using a journal of another feed; memory forgets its lineage (restore then
        writes nothing). Called under the closed gate, appends drained."""
        durable, self._durable = self._durable, None
        assert durable is not None
        if durable.appends is not None:
            durable.appends.listener = None
        self._memory.clear()
        self._feed_id = None  # this Redis's feed is not the journal's
        self._reject(NO_BINDING if self._binding is None else str(self._binding), redis)
        self._binding = None
        await durable.close()

    async def _settle_feed(self, redis: Upstream) -> None:
        """Give a Redis without a feed id ours (a restored or new feed), or one of its own
        (a feed an older pricehub created), and bind the journal to the id it holds."""
        key = f"{redis.keys.prefix}{FEED_KEY}"
        candidate = self._feed_id or uuid.uuid4().hex[:16]
        client = redis.client
        async with redis_errors("feed"):
            await client.set(key, candidate, nx=True)
            found = await client.get(key)
        self._feed_id = _text(found) or candidate
        binding = Binding(self._address, self._feed_id)
        if self._durable is None or binding == self._binding:
            return
        try:
            await self._durable.journal.write_meta(self._meta(binding))
        except DiskError:
            return  # logged; the old binding stays, which at worst makes a start refuse it
        self._binding = binding
        self._log.info("journal_bound", data_dir=str(self._data_dir), redis=str(binding))

    def _adopt(
        self,
        redis: Upstream,
        epoch: str,
        state: dict[str, tuple[int, list[StoredPrice]]],
        *,
        recovering: bool,
    ) -> None:
        """Step 4, synchronously so no price or append slips in between."""
        # What the listener missed, in order: prices Redis holds beyond the mirror, and
        # (zone, from, to) before a price that does not follow on (a hole in what Redis
        # retained: trimmed, or a restored Redis written back by several instances).
        catch_up: list[StoredPrice | tuple[str, int, int]] = []
        self._write_behind(lambda journal: journal.queue_epoch(epoch), price=False)
        self._unheard.clear()  # Redis has them now, or the epoch change declares them
        for zone in self._memory.zones_with_prices():
            if zone not in state and self._memory.last_seq(zone) > 0:
                # Redis has no price here (another lineage, or a Redis that lost its data
                # claimed by an instance that never had this zone): its first price will
                # be seq 1, which a mirror still at our old seq would drop.
                self._memory.forget(zone)
                self._write_behind(_reset_record(zone, [], 0), price=False)
        for zone, (seq, prices) in state.items():
            if seq == 0 and self._memory.last_seq(zone) == 0:
                continue  # no price on either side: no state for this zone
            if self._memory.last_seq(zone) > 0:  # a fresh zone has no one to catch up
                catch_up += _missed(zone, prices, after=self._memory.last_seq(zone))
            tail = _contiguous_tail(prices, seq)
            self._memory.reset(zone, tail, seq=seq)
            self._write_behind(_reset_record(zone, tail, seq), price=False)
        changed = epoch != self._epoch
        quiet = self._mode is Mode.RESYNC
        self._epoch, self._redis = epoch, redis
        self._set_mode(Mode.REDIS)
        # Zones without a price are left out: "take whatever comes first" is the same
        # as "after 0" for them (subscribed before the load, nothing can be older).
        positions = {zone: seq for zone, (seq, _) in state.items() if seq}
        redis.deliver_to(_Mirror(self, redis), positions)
        if not recovering:
            return
        self._counts.recoveries += not quiet
        self._counts.epoch_changes += int(changed)
        caught_up = sum(isinstance(item, StoredPrice) for item in catch_up)
        self._log.info(
            "storage_resynced" if quiet else "storage_recovered", backend=Backend.REDIS,
            epoch=epoch, epoch_changed=changed, caught_up=caught_up,
        )  # fmt: skip
        listener = self._listener
        if listener is not None:
            if changed:
                listener.on_epoch_changed(epoch)
            if not quiet:
                listener.on_backend_changed(Backend.REDIS)
            for item in catch_up:
                if isinstance(item, StoredPrice):
                    listener.on_price(item)
                else:
                    announce_gap(listener, *item)

    # --- from the subscriber ----------------------------------------------------------

    def _mirror(self, redis: Upstream, price: StoredPrice) -> None:
        if redis is not self._redis:
            return
        self._store(price)
        pending = self._unheard.get(price.zone)
        if pending:
            pending.pop(price.seq, None)  # heard at last: the same price
            self._fold_unheard(price.zone)

    def _store(self, price: StoredPrice) -> None:
        """Keep a price Redis numbered in the mirror (once) and deliver it."""
        last = self._memory.last_seq(price.zone)
        if price.seq <= last:
            return
        if price.seq == last + 1:
            self._memory.mirror(price)
            self._write_behind(lambda journal: journal.queue_append((price,)), price=True)
        else:  # a hole the history could not fill: keep the mirror contiguous
            self._counts.gaps += 1
            if last > 0 and self._listener is not None:  # said to subscribers: gap lost
                announce_gap(self._listener, price.zone, last + 1, price.seq - 1)
            self._memory.reset(price.zone, [price], seq=price.seq)
            self._write_behind(_reset_record(price.zone, [price], price.seq), price=False)
            pending = self._unheard.get(price.zone)
            if pending:  # (rare) what the jump passed over is moot now
                self._unheard[price.zone] = {s: p for s, p in pending.items() if s > price.seq}
        if self._listener is not None:
            self._listener.on_price(price)

    def _acknowledged(self, price: StoredPrice, ack: IngestAck | None = None) -> None:
        """Redis numbered ``price`` for one of our appends, which is about to be answered
        (202). The mirror takes it now, from the reply, not only when Pub/Sub delivers
        it: if Redis dies in between (the reply came back, the message did not), the
        mirror would otherwise lack a price we acknowledged, and a lone instance's
        memory numbering, or a write-back into a Redis that restarted empty, would give
        its seq to another price (issue 23). Pub/Sub's copy is then dropped as known.
        A price after a seq the mirror has not heard of yet waits in ``_unheard``.
        ``ack``: the ingest entry it came from, remembered for a write-back."""
        if ack is not None and price.seq > 0:
            self._remember_entry(price, ack.entry_id)
        if price.seq <= self._memory.last_seq(price.zone):
            return  # Pub/Sub was first (or a reconcile took it)
        self._unheard.setdefault(price.zone, {})[price.seq] = price
        self._fold_unheard(price.zone)
        if self._mode is Mode.HOLD and price.seq in self._unheard.get(
            price.zone, {}
        ):  # settled by the lost connection after ``_enter_outage`` journaled the others
            self._journal_unheard((price,))

    def _remember_entry(self, price: StoredPrice, entry_id: str) -> None:
        """Keep ``price``'s stream entry while its price can be written back (within
        the retained history): pruned in bulk, once the zone holds twice that."""
        entries = self._ingested.setdefault(price.zone, {})
        entries[price.seq] = entry_id
        if len(entries) > 2 * self._history_size:
            oldest = price.seq - self._history_size
            self._ingested[price.zone] = {s: e for s, e in entries.items() if s > oldest}

    def _journal_unheard(self, prices: Iterable[StoredPrice]) -> None:
        """Write behind acknowledged prices the mirror holds apart while appends are
        held: no Pub/Sub message will fill the hole before them now, and an instance
        killed before Redis is back must still have them for its write-back (lost, a
        peer could number their seqs again). The journal's replay takes such a price
        across the hole (that zone's history restarts there); the reconcile then
        writes every zone's state from Redis over it."""
        ordered = sorted(prices, key=lambda price: price.seq)
        if ordered:
            self._write_behind(lambda journal: journal.queue_append(ordered), price=False)

    def _fold_unheard(self, zone: str) -> None:
        """Move the zone's acknowledged prices that now follow the mirror into it, in
        seq order. Those after a hole stay until Pub/Sub fills it or a reconcile writes
        them back (``_write_back``); but an instance about to number alone in memory
        takes them across the hole (a declared gap for resumes, as ``_store`` does):
        its numbering must go on after every seq it acknowledged."""
        pending = self._unheard.pop(zone, None)
        if not pending:
            return
        if self._mode is Mode.MEMORY:
            for seq in sorted(pending):
                self._store(pending[seq])  # (it skips what the mirror has)
            return
        # One look per price, no sorting: this runs for every mirrored price of a zone
        # with prices waiting (two instances publishing into one zone at once).
        while (price := pending.pop(self._memory.last_seq(zone) + 1, None)) is not None:
            self._store(price)
        if pending:
            self._unheard[zone] = pending

    def _epoch_announced(self, redis: Upstream, epoch: str) -> None:
        """Another instance moved the epoch (declared a divergence, or claimed a lineage
        after Redis lost its data): reconcile with appends held, then tell the listener
        (from ``_adopt``), rather than number on under a lineage we have not read."""
        if redis is not self._redis or epoch == self._epoch:
            return
        self._on_lost(redis, EpochChanged(f"epoch announced: {epoch}"))

    # --- Storage ----------------------------------------------------------------------

    def ingest_source(self) -> IngestSource:
        return self

    async def append(self, zone: str, body: bytes, *, ack: IngestAck | None = None) -> StoredPrice:
        while True:
            redis = self._redis
            if self._mode is Mode.REDIS and redis is not None:
                known = self._memory.last_seq(zone)
                try:
                    price = await redis.append(zone, body, ack=ack)
                except EpochChanged as exc:
                    self._on_lost(redis, exc)  # refused, nothing written: resync, retry
                    continue
                except WriteInDoubt as exc:
                    self._on_lost(redis, exc)
                    if self._mode.holding:
                        found = await self._settle_in_doubt(zone, body, after=known)
                        if found is not None:
                            return found
                    continue
                except StorageUnavailable as exc:
                    self._on_lost(redis, exc)
                    continue
                self._acknowledged(price, ack)
                return price
            if ack is not None:
                # An ingest entry stays pending in the stream and is taken again once
                # Redis is back; numbering it here too would deliver it twice.
                raise StorageUnavailable("redis ingest paused: serving from memory")
            if self._mode.holding:
                await self._wait_for_redis()
                continue
            if not self._gate.is_set():
                await self._gate.wait()
                continue
            if self._lost_writes_pending:  # numbering after every seq Redis answered us
                await self._settle_lost_writes()
                continue
            appends = None if self._durable is None else self._durable.appends
            if appends is not None:  # written and fsynced before it is delivered
                (price,) = await appends.submit(((zone, body),))
                return price
            price = self._memory.record(zone, body)
            if self._listener is not None:
                self._listener.on_price(price)
            return price

    async def _wait_for_redis(self) -> None:
        """Hold an append until Redis serves again, at most until the window of this
        outage ends (then ``StorageHeld``: nothing was written)."""
        # A resync (hold 0, or a lone instance) still needs its few round trips.
        window = max(self._hold, 2 * self._timeout + HOLD_PROBE_INTERVAL)
        remaining = self._outage_started + window - time.monotonic()
        if remaining <= 0 or self._held >= MAX_HELD:
            self._counts.held_refusals += 1
            raise StorageHeld(
                "redis unavailable: publishes are held, not numbered alone, while this "
                "instance has peers", retry_after=max(1.0, self._probe_interval),
            )  # fmt: skip
        self._held += 1
        try:
            async with asyncio.timeout(remaining):
                await self._released.wait()
        except TimeoutError:
            pass  # the caller's next turn refuses it
        finally:
            self._held -= 1

    async def _settle_in_doubt(
        self, zone: str, body: bytes, *, after: int, taken: set[tuple[str, int]] | None = None
    ) -> StoredPrice | None:
        """Once Redis is back: the price Redis numbered for ``body`` (its reply was lost
        with the connection), or None when it never ran and may be appended now.
        ``taken``: seqs already matched to another price of the same batch (two equal
        bodies in one batch are two prices)."""
        while self._mode.holding:
            await self._wait_for_redis()
        if self._mode is not Mode.REDIS:
            return None  # the resync ended in a lone instance's memory failover
        for price in await self._memory.since(zone, after) or []:
            key = (zone, price.seq)
            # The stored body, not the whole payload: its accepted_at is Redis's to know.
            if body_of(price.payload) == body and (taken is None or key not in taken):
                if taken is not None:
                    taken.add(key)
                return price
        return None

    async def append_many(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice]:
        """``append`` for a batch, in order, under the same rules per price.

        On Redis the batch is one pipelined pass (``RedisStorage.append_outcomes``: a
        few scripts, not one round trip per price). Whatever that pass did not settle
        (Redis lost, the epoch moved, a reply lost in flight) goes through ``append``
        one price at a time, in order, after the in-doubt ones are looked up: so the
        hold, resync and memory-failover rules are exactly ``append``'s. A lost ingest
        lease ends the batch (``LeaseLost``); ingest entries are never numbered in memory.
        """
        appends = None if self._durable is None else self._durable.appends
        if (
            self._mode is Mode.MEMORY and appends is not None and acks is None
            and self._gate.is_set() and not self._lost_writes_pending
        ):  # fmt: skip
            return await appends.submit(items)  # one journal batch, as DurableStorage's
        ack_of = (lambda index: None) if acks is None else acks.__getitem__
        results: list[StoredPrice | None] = [None] * len(items)
        redis = self._redis
        left: list[tuple[int, BaseException | None]] = [(i, None) for i in range(len(items))]
        known: dict[str, int] = {}
        if self._mode is Mode.REDIS and redis is not None and items:
            known = {zone: self._memory.last_seq(zone) for zone, _ in items}
            left = await self._append_on_redis(redis, items, acks, results)
        taken: set[tuple[str, int]] = set()
        try:
            for index, error in left:
                zone, body = items[index]
                if isinstance(error, WriteInDoubt):
                    found = await self._settle_in_doubt(
                        zone, body, after=known.get(zone, 0), taken=taken
                    )
                    if found is not None:
                        results[index] = found
                        continue
                results[index] = await self.append(zone, body, ack=ack_of(index))
        except StorageUnavailable as exc:
            kept = [price for price in results if price is not None]
            if kept:
                raise BatchInterrupted(kept, exc) from exc
            raise
        return cast(list[StoredPrice], results)

    async def _append_on_redis(
        self,
        redis: Upstream,
        items: Sequence[tuple[str, bytes]],
        acks: Sequence[IngestAck] | None,
        results: list[StoredPrice | None],
    ) -> list[tuple[int, BaseException | None]]:
        """One pipelined pass; fills ``results`` and returns, in order, the prices it
        did not settle with the error that stopped each (the caller finishes them)."""
        try:
            outcomes = await redis.append_outcomes(items, acks=acks)
        except StorageUnavailable as exc:  # lost before anything was sent
            self._on_lost(redis, exc)
            return [(index, None) for index in range(len(items))]
        left: list[tuple[int, BaseException | None]] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, LeaseLost):
                raise outcome  # the ingest consumer stops; the entries stay pending
            if isinstance(outcome, BaseException):
                left.append((index, outcome))
            else:
                self._acknowledged(outcome, None if acks is None else acks[index])
                results[index] = outcome
        refused = BatchInterrupted.of_refused_zones(results, [error for _, error in left])
        if refused is not None:
            # Only zones whose own keys are damaged (ZoneRefused, logged by RedisStorage):
            # Redis is fine, so no failover and no retry; the other prices stand.
            self._counts.redis_errors += len(left)
            raise refused
        if left:  # the cause is the storage's failure (a ZoneRefused is no StorageUnavailable)
            lost = next((e for _, e in left if isinstance(e, StorageUnavailable)), None)
            self._on_lost(redis, lost or StorageUnavailable("redis append failed"))
        return left

    async def latest(self, zone: str) -> StoredPrice | None:
        return await self._memory.latest(zone)

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        return await self._memory.history(zone, limit=limit)

    async def _on_redis(self, call: Callable[[Upstream], Awaitable[T]]) -> T | None:
        """``call`` on the connected Redis; None when there is none or it was just lost
        (which starts the failover), so the caller falls back to memory."""
        redis = self._redis
        if redis is None:
            return None
        try:
            return await call(redis)
        except StorageUnavailable as exc:
            self._on_lost(redis, exc)
            return None

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        """On Redis while it is connected (one instant of Redis: one ``MGET``); from the
        mirror, under this instance's epoch, while Redis is away or when the read just
        failed (which starts the failover, or the resync if Redis's epoch moved)."""
        found = await self._on_redis(lambda redis: redis.snapshot(zones))
        if found is not None:
            return found
        return dataclasses.replace(await self._memory.snapshot(zones), epoch=self._epoch)

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        # From the mirror, as ``history`` and ``since`` are: it holds the retained history
        # Redis holds, and the scan then costs this instance ~10 ms for 50 zones x 1,000
        # prices instead of holding Redis's one thread ~60 ms (bench/snapshot_history.py).
        return await self._memory.history_between(zones, start, end, limit=limit)

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        found = await self._memory.since(zone, seq)
        if found is None and seq > self._memory.last_seq(zone):
            # The client saw a newer seq on a faster instance; Redis has it already.
            return await self._on_redis(lambda redis: redis.since(zone, seq))
        return found

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        """Also looks at who else is registered: an instance that has peers must not
        number alone during an outage (see ``has_peers``)."""
        self._instance_id = instance_id
        self._registration = (snapshot, ttl)
        await self._memory.register_instance(instance_id, snapshot, ttl=ttl)
        await self._on_redis(
            lambda redis: redis.register_instance(
                instance_id, snapshot, ttl=ttl, mirror=self._mirror_id
            )
        )
        await self.instances()

    async def unregister_instance(self, instance_id: str) -> None:
        await self._memory.unregister_instance(instance_id)
        await self._on_redis(lambda redis: redis.unregister_instance(instance_id))

    async def instances(self) -> dict[str, bytes]:
        found = await self._on_redis(lambda redis: redis.instances())
        if found is None:
            return await self._memory.instances()
        me = self._instance_id  # registered: who else is there?
        if me is None:
            return found
        others = sorted(other for other in found if other != me)
        if others:
            named = await self._on_redis(lambda redis: redis.instance_mirrors(others))
            if named is not None:
                # A peer of an older pricehub registers no mirror: known by its instance.
                ids = frozenset(named.get(other, f"instance:{other}") for other in others)
                self._peer_seen_at, self._peer_ids = time.monotonic(), ids
        await self._record_peers()
        return found

    async def _record_peers(self) -> None:
        """Keep the data dir's peer knowledge in step with ``has_peers`` (written when
        it changes, so rarely): an instance restarted while Redis is away can then tell
        whether it may number alone (see ``_open_journal``). Only from a registry Redis
        answered: during an outage nothing is learned, the last view stands."""
        peers, durable = self.has_peers, self._durable
        ids = self._peer_ids if peers else frozenset()
        if durable is None or (peers, ids) == (self._peers_recorded, self._peer_ids_recorded):
            return
        recorded = self._peers_recorded, self._peer_ids_recorded
        self._peers_recorded, self._peer_ids_recorded = peers, ids
        try:
            await durable.journal.write_meta(self._meta(self._binding))
        except DiskError:
            # Logged by the journal; tried again at the next look.
            self._peers_recorded, self._peer_ids_recorded = recorded

    async def check(self) -> None:
        """Never raises: this storage serves from memory when Redis is away (health
        reports that as ``degraded`` through ``backend``). A failing PING here is one
        more way to notice Redis is gone."""
        await self._on_redis(lambda redis: redis.check())


async def _feed_state(redis: Upstream) -> tuple[str | None, str | None]:
    """The epoch and feed id Redis holds (None: missing), before anything is claimed."""
    client = redis.client
    async with redis_errors("feed"):
        epoch = await client.get(redis.keys.epoch)
        feed = await client.get(f"{redis.keys.prefix}{FEED_KEY}")
    return _text(epoch), _text(feed)


def _text(value: bytes | str | None) -> str | None:
    """A reply as text (clients are made with decode_responses off: bytes)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _describe(address: RedisAddress, epoch: str | None, feed: str | None) -> str:
    """A Redis as found at a reconcile, for the warning and health."""
    if feed is not None:
        return f"{address}, feed {feed}"
    if epoch is None:
        return f"{address}, empty"
    return f"{address}, epoch {epoch} without a feed id"


class _Mirror:
    """The listener of the current ``RedisStorage``: mirrors, then forwards."""

    def __init__(self, owner: FailoverStorage, redis: Upstream) -> None:
        self._owner = owner
        self._redis = redis

    def on_price(self, price: StoredPrice) -> None:
        self._owner._mirror(self._redis, price)

    def on_backend_changed(self, backend: str) -> None:
        return None  # RedisStorage never changes backend; failover is the owner's

    def on_epoch_changed(self, epoch: str) -> None:
        self._owner._epoch_announced(self._redis, epoch)


def _reset_record(
    zone: str, prices: Sequence[StoredPrice], seq: int
) -> Callable[[SqliteJournal], asyncio.Future[None]]:
    return lambda journal: journal.queue_reset(zone, prices, seq=seq)


def _missed(
    zone: str, prices: Sequence[StoredPrice], *, after: int
) -> list[StoredPrice | tuple[str, int, int]]:
    """The prices of ``zone`` newer than ``after``, each preceded by the hole before it
    if it does not follow on from the one before (``(zone, from_seq, to_seq)``)."""
    missed: list[StoredPrice | tuple[str, int, int]] = []
    expected = after + 1
    for price in prices:
        if price.seq < expected:
            continue
        if price.seq > expected:
            missed.append((zone, expected, price.seq - 1))
        missed.append(price)
        expected = price.seq + 1
    return missed


def _contiguous_tail(prices: Sequence[StoredPrice], seq: int) -> list[StoredPrice]:
    """The newest prices ending at ``seq`` without a hole (what memory can replay)."""
    tail: list[StoredPrice] = []
    for price in reversed(prices):
        if price.seq != seq - len(tail):
            break
        tail.append(price)
    tail.reverse()
    return tail
