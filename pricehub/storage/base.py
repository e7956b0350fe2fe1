"""The storage Protocol shared by the memory, Redis and failover backends.

Everything crosses this boundary as bytes: a price is stored and published as its JSON
object (``StoredPrice.payload``), so a backend never parses prices and the broadcaster
never re-encodes them. Every collection is bounded (``history_size`` per zone) and
instance registrations expire by TTL, which Redis honours natively (``PX``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["IngestAck", "IngestSource", "Storage", "StorageListener", "StoredPrice"]


@dataclass(frozen=True, slots=True)
class StoredPrice:
    """A price after the storage accepted it: its zone, its seq and its JSON object."""

    zone: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IngestAck:
    """A Redis Stream entry whose XACK must ride in the same script as its append, so
    that a crash can never separate them (exactly once)."""

    entry_id: str
    consumer: str  # the lease holder's token; the script refuses anyone else (fencing)


class IngestSource(Protocol):
    """What the Redis ingest consumer needs from the storage: the live Redis client
    (raises ``StorageUnavailable`` while Redis is away), the key prefix, and appends
    that carry the entry's acknowledgement (``ack=``)."""

    @property
    def key_prefix(self) -> str: ...

    @property
    def ingest_depth(self) -> int:
        """Batches the consumer may keep in flight at once (1: strictly one after another)."""

    def redis_client(self) -> aioredis.Redis: ...

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
    def backend(self) -> str:
        """``"redis"`` or ``"in-memory"``: what is serving right now."""

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

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        """Publish this instance's snapshot (connections, ...) for ``ttl`` seconds."""

    async def unregister_instance(self, instance_id: str) -> None:
        """Remove this instance's registration at once (clean shutdown)."""

    async def instances(self) -> dict[str, bytes]:
        """Every live (unexpired) instance's snapshot, by instance id."""

    async def check(self) -> None:
        """Raise ``StorageUnavailable`` if the backend cannot serve right now."""
