"""The chaos soak's stream producer, and the checks of what became of its entries.

While the HTTP publisher runs, one producer ``XADD``s prices to the instances' ingest stream
(``pricehub:ingest``), one at a time, at a fixed rate, zone ``zones[n % len(zones)]``. Each entry
carries a nonce as its ``volume`` (``STREAM_NONCE_BASE + n``: never one of the HTTP publisher's),
so a delivered price names the entry it came from; for every ``XADD`` Redis answered, the entry
id is kept. A refused or timed-out ``XADD`` is counted; its entry may still exist (a stopped
Redis runs it once continued), so only answered ones take part in the order check.

What the stream ingest promises (docs/cluster.md), checked over every client's deliveries:

(e) ``stream_duplicates``   an entry appended twice: one nonce under two seqs of one
                            (zone, epoch);
(f) ``stream_reorders``     two answered entries of one zone whose seqs, in one epoch, are in
                            the opposite order of their stream ids;
(g) ``stream_backlog``      entries left in the stream or pending in its group once the soak has
                            been quiet for ``SETTLE`` + ``DRAIN`` seconds (a stalled consumer);
(h) ``stream_lost``         answered entries no client received, added more than ``KILL_SHADOW``
                            seconds before any moment Redis lost data (or after it).

A SIGKILLed Redis (no persistence here) takes the entries still in its stream with it, and a
master replaced by its replica takes the entries it had not replicated: that is Redis's
durability, not pricehub's, so entries added in the ``KILL_SHADOW`` seconds before such a
moment (time to be consumed, even across a lease takeover or a hold) are not counted in (h).
Every repeat is (e), the edge where the dead master had applied an entry (its append, XACK
and XDEL in one script) without replicating that script included: the instance's copy that
writes the price back settles the entry in the same step (issue 23), so it is never applied
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisClusterException, RedisError

from bench.chaos_clients import Body
from bench.chaos_procs import HOST, no_retry
from bench.chaos_publisher import iso_ms, ticks

__all__ = [
    "STREAM_NONCE_BASE",
    "Connect",
    "StreamLog",
    "StreamProducer",
    "cluster_client",
    "node_client",
    "sentinel_client",
    "stream_checks",
]

StreamClient = aioredis.Redis | RedisCluster  # one node (or a Sentinel's master), or a cluster
Connect = Callable[[], contextlib.AbstractAsyncContextManager[StreamClient]]
# RedisClusterException (no node answers for a slot) is not a RedisError.
STREAM_ERRORS = (RedisError, RedisClusterException, OSError)

STREAM_NONCE_BASE = 1_000_000_000
STREAM = "pricehub:ingest"  # the instances' default key prefix
GROUP = "pricehub"  # pricehub.storage.redis.INGEST_GROUP (the bench does not import pricehub)
TIMEOUT = 1.0
KILL_SHADOW = 10.0  # lease expiry (2 s) + the hold (5 s) + margin
EXAMPLES = 5


@dataclass
class StreamLog:
    ids: dict[int, tuple[int, int]] = field(default_factory=dict)  # nonce -> parsed entry id
    zones: dict[int, str] = field(default_factory=dict)  # nonce -> zone, every XADD tried
    failed: Counter[str] = field(default_factory=Counter)
    backlog: int | None = None  # XLEN + pending at the end; None: Redis did not answer


@contextlib.asynccontextmanager
async def node_client(port: int) -> AsyncIterator[StreamClient]:
    """A client of one node."""
    client = aioredis.Redis(
        host=HOST, port=port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
        retry=no_retry(),
    )  # fmt: skip
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def sentinel_client(ports: Sequence[int], service: str) -> AsyncIterator[StreamClient]:
    """A client of the master the sentinels name, found again after a promotion."""
    timeouts = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    sentinel = Sentinel(
        [(HOST, port) for port in ports], sentinel_kwargs=timeouts,
        socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
    )  # fmt: skip
    client = sentinel.master_for(service, retry=no_retry())
    try:
        yield client
    finally:
        await client.aclose()
        await sentinel.aclose()


@contextlib.asynccontextmanager
async def cluster_client(ports: Sequence[int]) -> AsyncIterator[StreamClient]:
    """A cluster client that follows MOVED/ASK (nothing ran) but never resends a command
    after a connection error (it may have run)."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in ports], retry=no_retry(),
        socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
    )  # fmt: skip
    try:
        yield client
    finally:
        await client.aclose()


class StreamProducer:
    """``connect()`` opens a client of the topology's Redis that never retries a command on
    its own: a resent ``XADD`` would add the entry twice, a duplicate of the producer's."""

    def __init__(self, connect: Connect, zones: Sequence[str], *, rate: float) -> None:
        self.connect = connect
        self.zones = tuple(zones)
        self.rate = rate
        self.log = StreamLog()

    async def run(self, stop: asyncio.Event) -> None:
        """``XADD`` one entry per tick until ``stop``; one at a time, so answered entries'
        ids follow their nonces."""
        async with self.connect() as client:
            async for tick in ticks(self.rate, stop):
                await self._add(client, tick)

    async def _add(self, client: StreamClient, tick: int) -> None:
        nonce = STREAM_NONCE_BASE + tick
        zone = self.zones[tick % len(self.zones)]
        self.log.zones[nonce] = zone
        fields = {"market_zone": zone, "price": f"{tick % 9000 / 100:.2f}",
                  "volume": str(nonce), "timestamp": iso_ms(time.time())}  # fmt: skip
        try:
            entry_id = await client.xadd(STREAM, fields)  # type: ignore[arg-type]
        except STREAM_ERRORS as exc:
            self.log.failed[type(exc).__name__] += 1
            return
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        ms, _, seq = text.partition("-")
        self.log.ids[nonce] = (int(ms), int(seq))

    async def measure_backlog(self) -> None:
        """Entries still in the stream plus those pending in the group (once quiet)."""
        try:
            async with self.connect() as client:
                length = int(await client.xlen(STREAM))
                try:
                    pending = int((await client.xpending(STREAM, GROUP))["pending"])
                except RedisError:  # no group: nothing consumed since Redis last restarted
                    pending = 0
            self.log.backlog = length + pending
        except STREAM_ERRORS:
            self.log.backlog = None


def stream_checks(
    keys: Mapping[tuple[str, str, int], Counter[Body]],
    log: StreamLog,
    *,
    redis_kills: Sequence[float],
) -> dict[str, Any]:
    """(e)-(h) and context from every (zone, epoch, seq) a client saw; ``redis_kills``:
    when Redis lost data (a SIGKILL, a master replaced; epoch seconds)."""
    seqs: dict[tuple[str, str, int], set[int]] = {}  # (zone, epoch, nonce) -> seqs
    for (zone, epoch, seq), bodies in keys.items():
        for _, volume, _ in bodies:
            if volume is not None and int(volume) in log.zones:
                seqs.setdefault((zone, epoch, int(volume)), set()).add(seq)
    duplicates = [
        {"zone": zone, "epoch": epoch, "nonce": nonce, "seqs": sorted(found)}
        for (zone, epoch, nonce), found in sorted(seqs.items()) if len(found) > 1
    ]  # fmt: skip
    reorders = _reorders(seqs, log)
    delivered = {n for _, _, n in seqs}
    lost = [
        {"nonce": nonce, "zone": log.zones[nonce], "id": f"{entry_id[0]}-{entry_id[1]}"}
        for nonce, entry_id in sorted(log.ids.items())
        if nonce not in delivered
        and not _in_kill_shadow(entry_id, redis_kills)
    ]
    return {
        "counts": {
            "stream_duplicates": len(duplicates),
            "stream_reorders": len(reorders),
            "stream_backlog": 1 if log.backlog is None else log.backlog,
            "stream_lost": len(lost),
        },
        "stream": {
            "tried": len(log.zones), "answered": len(log.ids),
            "failed": dict(log.failed), "backlog": log.backlog,
            "delivered": len(delivered),
        },
        "examples": {"stream_duplicates": duplicates[:EXAMPLES],
                     "stream_reorders": reorders[:EXAMPLES], "stream_lost": lost[:EXAMPLES]},
    }  # fmt: skip


def _in_kill_shadow(entry_id: tuple[int, int] | None, redis_kills: Sequence[float]) -> bool:
    """Whether an entry was added within ``KILL_SHADOW`` before a moment Redis lost data."""
    return entry_id is not None and any(
        0 <= kill - entry_id[0] / 1000 <= KILL_SHADOW for kill in redis_kills
    )


def _reorders(
    seqs: Mapping[tuple[str, str, int], set[int]], log: StreamLog
) -> list[dict[str, Any]]:
    """Per (zone, epoch), the answered entries in seq order: each id must be above the last."""
    lines: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for (zone, epoch, nonce), found in seqs.items():
        if nonce in log.ids:
            lines.setdefault((zone, epoch), []).append((min(found), nonce))
    found_reorders = []
    for (zone, epoch), line in sorted(lines.items()):
        line.sort()
        for (seq_a, nonce_a), (seq_b, nonce_b) in itertools.pairwise(line):
            if log.ids[nonce_a] > log.ids[nonce_b]:
                found_reorders.append({"zone": zone, "epoch": epoch, "seqs": [seq_a, seq_b],
                                       "nonces": [nonce_a, nonce_b]})  # fmt: skip
    return found_reorders
