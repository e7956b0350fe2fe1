"""What differs between a single Redis (or a Sentinel-watched one) and a Redis Cluster,
as one strategy (``Topology``) that ``RedisStorage`` is built with (issue 27).

redis-py's asyncio cluster is organised the same way: one client surface, the node
routing behind it. Here the storage keeps everything the topologies share (the queue
of appends, the delivery of prices in seq order, reads, the registry, the recovery
primitives) and asks its topology for what differs:

* the client and the key layout (``connect``, ``layout``);
* the subscription and its liveness watch (``subscribers``: one SUBSCRIBE, or one
  sharded SSUBSCRIBE connection per master);
* how queued appends are grouped and written (``flush``: pipelined on one connection,
  or per price across slots with WAIT and a separate ingest acknowledgement);
* error mapping of a write (``write_error``), the epoch's replacement and mirroring,
  and how every zone's state is loaded.

A topology reaches the storage only through ``Host``: public members, declared here,
so renaming anything private in either module is a type error or a no-op, never a
silent change of the other's behaviour.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageError, ZoneRefused
from pricehub.storage.redis.keys import KeyLayout
from pricehub.storage.redis.scripts import Script
from pricehub.storage.redis.writer import Write

__all__ = ["Host", "Settings", "Topology", "ZoneState"]

# A zone's state as Redis holds it: its seq and retained history, oldest first.
ZoneState = tuple[int, list[StoredPrice]]


@dataclass(frozen=True, slots=True)
class Settings:
    """A storage's options, as every part of it reads them."""

    url: str
    history_size: int
    timeout: float
    probe_interval: float
    token: str  # names this connection's probe channel(s)
    log: Any


class Host(Protocol):
    """What a topology may use of the storage it serves."""

    @property
    def settings(self) -> Settings: ...

    @property
    def keys(self) -> KeyLayout: ...

    @property
    def client(self) -> aioredis.Redis:
        """The live client; raises ``StorageUnavailable`` once lost."""

    @property
    def epoch(self) -> str: ...

    @property
    def lost(self) -> BaseException | None:
        """Why the storage stopped being usable (None while it is)."""

    def mark_lost(self, cause: BaseException) -> None: ...

    async def deliver(self, data: bytes) -> None:
        """One message of the prices channel(s): parsed, filtered, delivered in order."""

    def take_pending(self, limit: int) -> list[Write]:
        """Up to ``limit`` queued appends, oldest first (removed from the queue)."""

    def fail_pending(self, error: BaseException) -> None: ...

    def settle(self, group: Sequence[Write], result: Any) -> None:
        """Resolve one script's writes with its reply (or error)."""

    def zone_damaged(self, zone: str, why: str) -> ZoneRefused: ...

    def damage(self, zone: str) -> str:
        """What a damaged zone's keys look like (for the log)."""

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the storage cancels on close."""

    async def latest(self, zone: str) -> StoredPrice | None: ...


class Topology(Protocol):
    """The strategy of one Redis deployment (``SingleNode``, ``ClusterTopology``)."""

    @property
    def ingest_depth(self) -> int:
        """Ingest batches that may be in flight at once."""

    @property
    def restore_script(self) -> Script: ...

    def connect(self, settings: Settings) -> aioredis.Redis:
        """A new client (not yet connected)."""

    def layout(self, prefix: str, client: aioredis.Redis) -> KeyLayout: ...

    def channel(self, keys: KeyLayout, zone: str) -> str:
        """The channel ``zone``'s prices are published on."""

    async def open(self, host: Host) -> None:
        """Ping, load the scripts the writer sends raw, subscribe (confirmed)."""

    async def close(self, host: Host) -> None:
        """Fail what is in flight, drop connections of its own (the client is not)."""

    async def ping(self, client: aioredis.Redis) -> None: ...

    def subscribers(self, host: Host) -> list[Coroutine[Any, Any, None]]:
        """The reader(s) and liveness watch, started by ``deliver_to``."""

    async def flush(self, host: Host) -> None:
        """Write the queued appends until the queue is empty."""

    def write_error(self, error: BaseException) -> StorageError | None:
        """A topology's own reading of a failed script (None: the storage's default)."""

    async def load(self, host: Host, zones: Iterable[str]) -> dict[str, ZoneState]: ...

    async def epoch_claimed(self, host: Host, epoch: str) -> None:
        """After ``claim_epoch``: whatever copy of the epoch the topology keeps."""

    async def replace_epoch(self, host: Host, expected: str, replacement: str) -> str:
        """Compare-and-set the epoch, announcing a change; returns the epoch now."""
