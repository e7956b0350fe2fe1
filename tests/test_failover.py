"""Live failover to memory and back, against real redis-server processes.

Seqs are checked end to end at the listener (what the broadcaster would send): every
zone's numbering must be contiguous and never go backwards, across kill -9, restart,
partitions, data loss and several instances numbering alone during an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.storage.base import IngestAck
from pricehub.storage.errors import StorageUnavailable
from pricehub.storage.failover import FailoverStorage
from pricehub.wire.messages import PriceBody
from tests.redisproc import RecordingListener, RedisProcess, TcpProxy
from tests.support import eventually

ZONES = ("pjm", "ercot")
FAST = {"timeout": 0.25, "probe_interval": 0.2}


class EventLog:
    """A structlog-shaped sink that keeps event names (to count log lines)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def _record(self, event: str, **_: Any) -> None:
        self.events.append(event)

    debug = info = warning = error = exception = _record


def body(zone: str, price: float) -> bytes:
    return PriceBody(zone, price, None, "2026-11-27T15:00:00.000Z").encode()


def make(url: str, prefix: str, log: EventLog | None = None) -> FailoverStorage:
    return FailoverStorage(url, zones=ZONES, key_prefix=prefix, log=log or EventLog(), **FAST)


def assert_contiguous(seqs: list[int]) -> None:
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


@contextlib.asynccontextmanager
async def running(*storages: FailoverStorage) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for storage in storages:
            await storage.close()


async def test_kill_and_restart_under_a_publisher(prefix: str) -> None:
    with RedisProcess() as server:
        log = EventLog()
        storage = make(server.url, prefix, log)
        listener = RecordingListener()
        await storage.start(listener)
        async with running(storage):
            assert storage.backend == "redis"
            epoch = storage.epoch
            stop = asyncio.Event()

            async def publish() -> int:
                count = 0
                while not stop.is_set():
                    await storage.append("pjm", body("pjm", float(count)))
                    count += 1
                    await asyncio.sleep(0.005)
                return count

            publisher = asyncio.create_task(publish())
            await listener.wait_for("pjm", 20)
            server.kill()
            killed = time.monotonic()
            await listener.wait_backend("in-memory")
            assert time.monotonic() - killed < 1.0
            assert storage.backend == "in-memory"
            assert storage.epoch == epoch
            before = len(listener.seqs("pjm"))
            await listener.wait_for("pjm", before + 20)  # still numbering, from memory
            server.start()
            restarted = time.monotonic()
            await listener.wait_backend("redis")
            assert time.monotonic() - restarted < 5.0
            await listener.wait_for("pjm", len(listener.seqs("pjm")) + 20)
            stop.set()
            published = await asyncio.wait_for(publisher, 5)

            seqs = listener.seqs("pjm")
            assert seqs == list(range(1, published + 1))  # no gap, no repeat, in order
            assert listener.backends == ["in-memory", "redis"]
            assert storage.epoch == epoch  # one instance: no divergence, same lineage
            assert (storage.failovers, storage.recoveries) == (1, 1)
            assert storage.redis_errors >= 1
            assert log.events.count("storage_failover") == 1
            assert log.events.count("storage_recovered") == 1
            # Redis was restarted empty; what memory numbered was written back
            raw = aioredis.Redis.from_url(server.url)
            assert int(await raw.get(f"{prefix}seq:pjm")) == published
            assert await raw.zcard(f"{prefix}history:pjm") == min(published, 1000)
            assert await raw.get(f"{prefix}epoch") == epoch.encode()
            await raw.aclose()


async def test_unreachable_at_start_then_redis_appears(prefix: str) -> None:
    server = RedisProcess()
    log = EventLog()
    storage = make(server.url, prefix, log)
    listener = RecordingListener()
    await storage.start(listener)
    async with running(storage):
        assert storage.backend == "in-memory"
        assert "redis_unavailable_at_start" in log.events
        for index in range(3):
            await storage.append("pjm", body("pjm", float(index)))
        await storage.register_instance("me", b"{}", ttl=30)
        assert await storage.instances() == {"me": b"{}"}
        await storage.check()  # serving from memory is not a failed check
        with server:
            await listener.wait_backend("redis")
            price = await storage.append("pjm", body("pjm", 3.0))
            assert price.seq == 4
            assert await listener.wait_for("pjm", 4) == [1, 2, 3, 4]
            raw = aioredis.Redis.from_url(server.url)
            assert await raw.get(f"{prefix}epoch") == storage.epoch.encode()
            assert await raw.zcard(f"{prefix}history:pjm") == 4
            await raw.aclose()


async def test_lost_data_without_lost_connection(prefix: str) -> None:
    """FLUSHALL while connected: the next write is refused, not numbered from 1."""
    with RedisProcess() as server:
        storage = make(server.url, prefix)
        listener = RecordingListener()
        await storage.start(listener)
        async with running(storage):
            for index in range(3):
                await storage.append("pjm", body("pjm", float(index)))
            raw = aioredis.Redis.from_url(server.url)
            await raw.flushall()
            await storage.append("pjm", body("pjm", 3.0))  # refused by Redis -> memory
            await listener.wait_backend("redis")
            await storage.append("pjm", body("pjm", 4.0))
            assert await listener.wait_for("pjm", 5) == [1, 2, 3, 4, 5]
            assert int(await raw.get(f"{prefix}seq:pjm")) == 5
            await raw.aclose()


async def test_partitioned_instance_catches_up_without_epoch_change(prefix: str) -> None:
    with RedisProcess() as server:
        proxy = TcpProxy(server.port)
        await proxy.start()
        cut_off, steady = make(proxy.url, prefix), make(server.url, prefix)
        cut_listener, steady_listener = RecordingListener(), RecordingListener()
        await cut_off.start(cut_listener)
        await steady.start(steady_listener)
        async with running(cut_off, steady):
            epoch = steady.epoch
            assert cut_off.epoch == epoch
            await steady.append("pjm", body("pjm", 0.0))
            await cut_listener.wait_for("pjm", 1)
            proxy.block()  # silent: the liveness probe has to notice
            await cut_listener.wait_backend("in-memory")
            for index in range(1, 4):
                await steady.append("pjm", body("pjm", float(index)))
            proxy.unblock()
            await cut_listener.wait_backend("redis")
            assert cut_listener.seqs("pjm") == [1, 2, 3, 4]  # caught up, in order
            assert cut_off.epoch == epoch  # nothing diverged
            assert await cut_off.latest("pjm") == await steady.latest("pjm")
            await steady.append("pjm", body("pjm", 4.0))
            assert await cut_listener.wait_for("pjm", 5) == [1, 2, 3, 4, 5]
        await proxy.close()


async def test_diverged_numbering_changes_the_epoch_everywhere(prefix: str) -> None:
    with RedisProcess() as server:
        first, second = make(server.url, prefix), make(server.url, prefix)
        first_listener, second_listener = RecordingListener(), RecordingListener()
        await first.start(first_listener)
        await second.start(second_listener)
        async with running(first, second):
            old_epoch = first.epoch
            await first.append("pjm", body("pjm", 1.0))
            await second_listener.wait_for("pjm", 1)
            server.kill()
            await first_listener.wait_backend("in-memory")
            await second_listener.wait_backend("in-memory")
            # each numbers alone: seq 2 means different prices on each instance
            await first.append("pjm", body("pjm", 2.0))
            await second.append("pjm", body("pjm", 20.0))
            await second.append("pjm", body("pjm", 30.0))
            server.start()
            await first_listener.wait_backend("redis")
            await second_listener.wait_backend("redis")

            async def converged() -> bool:
                return first.epoch == second.epoch != old_epoch

            await eventually(converged)
            price = await first.append("pjm", body("pjm", 4.0))
            for listener in (first_listener, second_listener):
                seqs = await listener.wait_for("pjm", price.seq)
                assert_contiguous(seqs)  # never backwards, never a hole
                assert listener.epochs[-1] == first.epoch
            assert price.seq == 4
            assert await first.latest("pjm") == await second.latest("pjm")
            assert orjson.loads(price.payload)["price"] == 4.0


async def test_ingest_writes_never_fall_back_to_memory(prefix: str) -> None:
    server = RedisProcess()
    storage = make(server.url, prefix)
    await storage.start(RecordingListener())
    async with running(storage):
        with pytest.raises(StorageUnavailable):
            await storage.append("pjm", body("pjm", 1.0), ack=IngestAck("1-0", "consumer"))
        assert await storage.latest("pjm") is None
