"""The storage Protocol shared by the memory, Redis and failover backends, what a
storage is built from (``StorageConfig``), and the typed reports a backend gives the
server (``StorageCounters``, ``DiskStatus``).

Everything crosses this boundary as bytes: a price is stored and published as its JSON
object (``StoredPrice.payload``), so a backend never parses prices and the broadcaster
never re-encodes them. Every collection is bounded (``history_size`` per zone) and
instance registrations expire by TTL, which Redis honours natively (``PX``).

What a backend counts and what it says of its disk are typed values returned by members
of the Protocol: a renamed counter is a type error, not a metric silently exported as 0.
The storage decides the state; the server shapes the documents (stats, health, metrics).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pricehub.wire.codes import Backend
from pricehub.wire.messages import timestamp_bytes

__all__ = [
    "DiskState", "DiskStatus", "ForeignJournal", "HistorySlice", "IngestAck", "IngestEntry",
    "IngestKeys", "IngestSource", "IngestStream", "JournalStats", "Oversized", "Snapshot",
    "Storage", "StorageConfig", "StorageCounters", "StorageListener", "StoredPrice",
    "first_in_history_order", "history_order",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """What the storage is built from (``pricehub.storage.create_storage``): the storage's
    part of the settings (``--redis-url``, ``--data-dir``, ...), filled by the server
    (``Settings.storage_config``), so that the storage needs nothing of the server.

    :param redis_url: the Redis to use when reachable (any scheme pricehub accepts);
        None: memory only, journaled in ``data_dir`` unless that is None too.
    :param zones: the configured zones.
    :param key_prefix: prefix of every Redis key and channel.
    :param history_size: prices retained per zone.
    :param data_dir: where the in-memory store is journaled; None: nothing on disk.
    :param redis_timeout: Redis socket timeout in seconds (the failover trigger).
    :param redis_probe_interval: seconds between probes of a lost Redis.
    :param redis_hold: seconds an instance with peers holds appends while Redis is away.
    :param assume_peers: act as an instance with peers from the start (``--workers`` > 1).
    :param adopt_journal: take a journal that mirrored another Redis as this one's.
    """

    redis_url: str | None
    zones: tuple[str, ...]
    key_prefix: str
    history_size: int
    data_dir: str | None
    redis_timeout: float
    redis_probe_interval: float
    redis_hold: float
    assume_peers: bool
    adopt_journal: bool


@dataclass(frozen=True, slots=True)
class StoredPrice:
    """A price after the storage accepted it: its zone, its seq and its JSON object."""

    zone: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Several zones' latest prices read together (``Storage.snapshot``): ``prices`` has
    every zone asked for, in the order asked, None for a zone without a price; ``epoch``
    is the numbering lineage read with them."""

    epoch: str
    prices: Mapping[str, StoredPrice | None]

    def cursor(self) -> dict[str, int]:
        """Each zone's seq in the snapshot, 0 when it has no price (the contract's
        ``cursor``: where a subscriber resumes every zone from)."""
        return {zone: 0 if price is None else price.seq for zone, price in self.prices.items()}


class HistorySlice(NamedTuple):
    """``Storage.history_between``'s answer: the prices in history order (``history_order``)
    and whether more matched than the limit let through."""

    prices: list[StoredPrice]
    truncated: bool


def history_order(price: StoredPrice) -> tuple[bytes, str, int]:
    """The order of a history by market time across zones: (``timestamp``, zone, seq).
    Stored timestamps have one fixed-width ASCII form, so comparing their bytes compares
    the times (``wire.messages.format_timestamp``, ``timestamp_bytes``)."""
    return timestamp_bytes(price.payload), price.zone, price.seq


def first_in_history_order(prices: Iterable[StoredPrice], limit: int) -> HistorySlice:
    """The first ``limit`` of ``prices`` in history order, and whether any was left out:
    sorted when they fit, else a heap of ``limit + 1`` (not a sort of every match)."""
    matching = list(prices)
    most = max(limit, 0)
    if len(matching) <= most:
        return HistorySlice(sorted(matching, key=history_order), False)
    return HistorySlice(heapq.nsmallest(most, matching, key=history_order), True)


@dataclass(frozen=True, slots=True)
class IngestAck:
    """A Redis Stream entry whose XACK must ride in the same script as its append, so
    that a crash can never separate them (exactly once)."""

    entry_id: str
    consumer: str  # the lease holder's token; the script refuses anyone else (fencing)


@dataclass(frozen=True, slots=True)
class StorageCounters:
    """What a backend counted since it was built (the metrics export each one as a
    ``_total``). All zero for a backend that keeps none (memory, durable memory)."""

    failovers: int = 0  # switches from Redis to the in-memory fallback
    recoveries: int = 0  # switches back to Redis
    redis_errors: int = 0  # Redis operations and probes that failed
    gaps: int = 0  # prices that arrived after a hole no history could fill
    holds: int = 0  # outages during which appends were held (this instance has peers)
    held_refusals: int = 0  # appends refused because the hold window ended
    resyncs: int = 0  # reconciles because the epoch moved (not failovers)
    foreign_messages: int = 0  # messages on our channel that are not our feed's prices
    epoch_changes: int = 0  # numbering lineage changes


_NO_COUNTERS = StorageCounters()


@dataclass(frozen=True, slots=True)
class JournalStats:
    """A journal's figures (``SqliteJournal.stats``), for health and metrics.
    ``bytes_on_disk`` counts the database and its WAL (not the LOCK file nor files moved
    aside). ``records`` and ``writes`` count since open; ``log_records`` is what the WAL
    holds since the last checkpoint (``snapshots``, ``last_snapshot_at``: checkpoints);
    ``fsyncs`` and the ``fsync_*`` times are commits; ``last_error`` is cleared by the next
    successful write."""

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


class DiskState(enum.Enum):
    """Where durability stands. The values are how health's ``checks.disk`` spells them
    (``DiskStatus.check``)."""

    OK = "ok"  # the journal writes
    DISABLED = "disabled"  # no data dir, or (with Redis) one not usable at start
    UNAVAILABLE = "unavailable"  # the last journal write failed, or it is not open
    # The failover's journal mirrors another Redis feed than the one configured: left
    # untouched and not used (``binding.py``). A degradation: nothing is durable, and the
    # operator has a decision to make (see docs/operations.md).
    FOREIGN = "journal_belongs_to_another_redis"


@dataclass(frozen=True, slots=True)
class ForeignJournal:
    """Which feed a foreign journal mirrors (``DiskState.FOREIGN``), passwords redacted."""

    data_dir: str
    journal_redis: str  # the Redis the journal mirrors
    redis: str  # the Redis configured
    advice: str  # what was done with the journal and what the operator may do


@dataclass(frozen=True, slots=True)
class DiskStatus:
    """What a backend says of its durability: the state, decided here, and the figures
    behind it. ``reason`` says why it is ``UNAVAILABLE`` (or ``DISABLED`` at start);
    ``journal`` is None without an open journal; ``recovered`` / ``fresh_reason`` say
    what the journal held at start (None before it opened)."""

    state: DiskState
    reason: str | None = None
    journal: JournalStats | None = None
    write_errors: int = 0  # failed journal batches
    recovered: bool | None = None
    fresh_reason: str | None = None
    foreign: ForeignJournal | None = None

    @property
    def ok(self) -> bool:
        """No problem for health: durable, or durability off (by configuration, or a data
        dir not usable at start with a Redis URL: a warning then, not a degradation)."""
        return self.state in (DiskState.OK, DiskState.DISABLED)

    @property
    def check(self) -> str:
        """The state as health's ``checks.disk`` (and the tests) spell it: its value,
        then ``": <reason>"`` when there is one."""
        state = self.state.value
        return state if self.reason is None else f"{state}: {self.reason}"


_NOT_DURABLE = DiskStatus(DiskState.DISABLED)


@dataclass(frozen=True, slots=True)
class IngestKeys:
    """The Redis names the ingest consumer works with: the stream it reads
    (``<prefix>ingest``, the contract), the key of the cluster-wide lease, and the
    consumer group. The storage's key layout decides them, so the consumer needs none."""

    stream: str
    lease: str
    group: str


@dataclass(frozen=True, slots=True)
class Oversized:
    """An ingest entry over a size cap, as far as it was looked at (never decoded)."""

    size: int  # bytes of its names and values (0: too many fields to count)
    items: int  # names and values
    why: str  # the cap it is over, for the log ("5000 bytes, over 4096")


# An ingest entry: its id, and its fields flat as Redis sent them (a duplicated field
# stays visible), ``Oversized``, or None (a pending entry found deleted, Redis 6.2).
IngestEntry = tuple[bytes, list[bytes] | list[str] | Oversized | None]


class IngestStream(Protocol):
    """The ingest stream's operations (``storage.redis.stream.RedisIngestStream``):
    the lease, the consumer group, bounded reads and claims, acknowledgements outside an
    append script. Every Redis failure raises ``StorageUnavailable``."""

    async def lease(self, consumer: str, ttl_ms: int) -> bool:
        """Take the lease if free, extend it if ``consumer`` holds it; whether it does."""

    async def release(self, consumer: str) -> None: ...

    async def ensure_group(self) -> None: ...

    async def forget_idle_consumers(self, keep: str) -> None: ...

    async def read(self, consumer: str, count: int) -> list[IngestEntry]:
        """Up to ``count`` new entries, without blocking."""

    async def claim(self, consumer: str, count: int) -> tuple[list[IngestEntry], list[bytes]]:
        """Up to ``count`` pending entries, oldest first, and ids found deleted."""

    async def wait_for_one(self, consumer: str, block_ms: int) -> list[IngestEntry]:
        """Block until an entry is new (up to ``block_ms``), then take it."""

    async def ack_invalid(self, entry_ids: Sequence[bytes]) -> None:
        """Acknowledge and delete entries that publish nothing."""


class IngestSource(Protocol):
    """What the Redis ingest consumer needs from the storage: the stream's operations
    (``ingest_stream``: lease, group, reads, acknowledgements; raises
    ``StorageUnavailable`` while Redis is away), the names of the stream, lease and group
    (``ingest_keys``), and appends that carry the entry's acknowledgement (``ack=``)."""

    @property
    def ingest_keys(self) -> IngestKeys: ...

    @property
    def ingest_depth(self) -> int:
        """Batches the consumer may keep in flight at once (1: strictly one after another)."""

    def ingest_stream(self) -> IngestStream: ...

    async def append(
        self, zone: str, body: bytes, *, ack: IngestAck | None = None
    ) -> StoredPrice: ...


class StorageListener(Protocol):
    """Who hears about prices and backend changes (the zone broadcaster)."""

    def on_price(self, price: StoredPrice) -> None:
        """Called for every accepted price of every instance, in seq order per zone."""

    def on_backend_changed(self, backend: str) -> None:
        """Called when the backend in use changes (failover to memory and back)."""

    def on_epoch_changed(self, epoch: str) -> None:
        """Called when the numbering lineage changed (instances diverged during an outage):
        what connected clients saw may differ from what the cluster now holds."""


class Storage(Protocol):
    """Latest price, bounded history and seq per zone; pub/sub; instance registry."""

    @property
    def backend(self) -> Backend:
        """``Backend.REDIS`` or ``Backend.IN_MEMORY``: what is serving right now."""

    @property
    def epoch(self) -> str:
        """The seq numbering lineage; changes only when numbering restarts."""

    async def start(self, listener: StorageListener) -> None:
        """Connect, load the epoch, and start delivering prices to ``listener``."""

    async def close(self) -> None:
        """Stop delivering and release connections; idempotent."""

    async def append(
        self, zone: str, body: bytes, *, ack: IngestAck | None = None
    ) -> StoredPrice:
        """Atomically give ``body`` (a price object without seq) the zone's next seq,
        store it as latest and in history, and publish it to every instance. With
        ``ack``, the ingest entry is acknowledged in the same atomic step (Redis only:
        a backend that cannot do that raises ``StorageUnavailable``)."""

    def ingest_source(self) -> IngestSource | None:
        """This storage as a source for the Redis ingest, or None (no Redis)."""

    async def append_many(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice]:
        """``append`` for each ``(zone, body)`` in order, sharing what a batch can share
        (round trips, loop turns); the same guarantees per price. ``acks[i]`` is
        ``append``'s ``ack`` for price i. When a price is refused after some were kept,
        ``BatchInterrupted`` says which were."""

    async def latest(self, zone: str) -> StoredPrice | None:
        """The zone's newest price, if any."""

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        """Up to ``limit`` newest retained prices of the zone, oldest first."""

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        """Every retained price with seq > ``seq``, oldest first; ``None`` when the
        history no longer reaches back to ``seq + 1`` (or ``seq`` is ahead of it)."""

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        """The latest price of each of ``zones`` (repeats dropped, order kept) and the
        epoch, read at one instant: in memory with no await between zones, on a single
        Redis in one command. On Redis Cluster, where zones live on different nodes, each
        zone is read atomically but not all at one instant (docs/trading.md)."""

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        """Every retained price of ``zones`` whose market ``timestamp`` is in
        ``[start, end)`` (both in the stored form, ``wire.messages.format_timestamp``),
        in history order (``history_order``), at most ``limit``; ``truncated`` when more
        matched. Costs a scan of the queried zones' retained histories (Redis: on the
        server side, returning only what matches), nothing per append."""

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        """Publish this instance's snapshot (connections, ...) for ``ttl`` seconds."""

    async def unregister_instance(self, instance_id: str) -> None:
        """Remove this instance's registration at once (clean shutdown)."""

    async def instances(self) -> dict[str, bytes]:
        """Every live (unexpired) instance's snapshot, by instance id."""

    async def check(self) -> None:
        """Raise ``StorageUnavailable`` if the backend cannot serve right now."""

    # Reports, read by the server (health, stats, metrics). Each has a default for
    # backends that subclass this Protocol and have nothing to report; any other backend
    # must define it, which the type checker verifies wherever it is used as a Storage.

    def counters(self) -> StorageCounters:
        """What this backend counted since it was built. Default: nothing (all zero)."""
        return _NO_COUNTERS

    def disk_status(self) -> DiskStatus:
        """Where durability stands. Default: ``DISABLED`` (a backend without a journal)."""
        return _NOT_DURABLE
