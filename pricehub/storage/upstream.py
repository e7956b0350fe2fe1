"""What ``FailoverStorage`` needs of the Redis it fails over from (issue 27): one
Protocol, so the failover depends on this surface and not on a concrete class.

``RedisStorage`` (one node, Sentinel) and ``RedisClusterStorage`` both satisfy it
structurally; ``FailoverStorage._new_redis`` returns them as ``Upstream``, so mypy
checks both against it. Anything the failover starts using must be declared here first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from pricehub.storage.base import HistorySlice, IngestAck, Snapshot, StorageListener, StoredPrice

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from pricehub.storage.redis import KeyLayout

__all__ = ["Upstream"]

# A zone's state as Redis holds it: its seq and retained history, oldest first.
ZoneState = tuple[int, list[StoredPrice]]


class Upstream(Protocol):
    """A connection to one Redis feed (its keys, its Pub/Sub stream, its scripts)."""

    @property
    def epoch(self) -> str:
        """The lineage this connection numbers in (raises before ``connect``)."""

    @property
    def keys(self) -> KeyLayout:
        """The key layout (prefix, epoch key, channels) of this feed."""

    @property
    def client(self) -> aioredis.Redis:
        """The live client (the feed id, the ingest consumer); raises once lost."""

    @property
    def foreign_messages(self) -> int:
        """Messages on the channel that were not this feed's prices (dropped)."""

    @property
    def ingest_depth(self) -> int:
        """Ingest batches that may be in flight at once on this topology."""

    # --- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None:
        """A round trip (PING); raises ``StorageUnavailable`` when Redis is gone."""

    def deliver_to(self, listener: StorageListener, positions: Mapping[str, int]) -> None:
        """Start following the stream after each zone's ``positions`` seq."""

    # --- appends and reads ----------------------------------------------------------------

    async def append(
        self, zone: str, body: bytes, *, ack: IngestAck | None = None
    ) -> StoredPrice: ...

    async def append_outcomes(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice | BaseException]: ...

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None: ...

    async def snapshot(self, zones: Sequence[str]) -> Snapshot: ...

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice: ...

    # --- the instance registry -------------------------------------------------------------

    async def register_instance(
        self, instance_id: str, snapshot: bytes, *, ttl: float, mirror: str | None = None
    ) -> None: ...

    async def unregister_instance(self, instance_id: str) -> None: ...

    async def instances(self) -> dict[str, bytes]: ...

    async def instance_mirrors(self, instance_ids: Iterable[str]) -> dict[str, str]: ...

    # --- recovery primitives (the reconcile of failover.py's docstring) ---------------------

    async def load(self, zones: Iterable[str]) -> dict[str, ZoneState]: ...

    async def claim_epoch(self, candidate: str) -> str: ...

    async def replace_epoch(self, expected: str, replacement: str) -> str: ...

    async def written_back(self, mirror: str = "") -> frozenset[str] | None: ...

    async def restore(
        self,
        local: Mapping[str, tuple[int, Sequence[StoredPrice]]],
        *,
        entries: Mapping[str, Mapping[int, str]] | None = None,
    ) -> dict[str, bool]: ...
