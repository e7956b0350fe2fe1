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
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.storage.base import IngestAck, StoredPrice
from pricehub.storage.errors import StorageHeld, StorageUnavailable
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import KeyLayout
from pricehub.wire.messages import PriceBody
from tests.harness.redisproc import RecordingListener, RedisProcess, TcpProxy
from tests.harness.support import eventually

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
            assert (storage.counters().failovers, storage.counters().recoveries) == (1, 1)
            assert storage.counters().redis_errors >= 1
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
            # Refused by Redis (its epoch is gone): held, reconciled (the mirror is
            # written back), then numbered 4 in Redis. Not a failover: the backend never
            # changed for the clients, the epoch is the same, nothing numbered alone.
            price = await storage.append("pjm", body("pjm", 3.0))
            assert price.seq == 4
            await storage.append("pjm", body("pjm", 4.0))
            assert await listener.wait_for("pjm", 5) == [1, 2, 3, 4, 5]
            assert int(await raw.get(f"{prefix}seq:pjm")) == 5
            assert listener.backends == [] and listener.epochs == []
            assert (storage.counters().failovers, storage.counters().resyncs) == (0, 1)
            assert await raw.get(f"{prefix}epoch") == storage.epoch.encode()
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


class GapRecorder(RecordingListener):
    """Also keeps the holes the storage declares, in order with the prices."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, int, int]] = []

    def on_price(self, price: StoredPrice) -> None:
        self.order.append(("price", price.seq, price.seq))
        super().on_price(price)

    def on_gap(self, zone: str, from_seq: int, to_seq: int) -> None:
        self.order.append(("gap", from_seq, to_seq))


async def test_a_hole_in_what_redis_holds_beyond_the_mirror_is_declared_on_recovery(
    prefix: str,
) -> None:
    """The prices a reconcile catches up must continue from the mirror's last seq; where
    Redis's history has a hole (a restored Redis written back by several instances, or
    trimmed), the hole is said (``on_gap``, then the price after it), never skipped
    silently (the chaos soak's undeclared gap at a redis_kill_burst)."""
    with RedisProcess() as server:
        proxy = TcpProxy(server.port)
        await proxy.start()
        cut_off, steady = make(proxy.url, prefix), make(server.url, prefix)
        listener = GapRecorder()
        await cut_off.start(listener)
        await steady.start(RecordingListener())
        async with running(cut_off, steady):
            await steady.append("pjm", body("pjm", 0.0))
            await listener.wait_for("pjm", 1)
            proxy.block()
            await listener.wait_backend("in-memory")
            for index in range(1, 4):  # seqs 2, 3, 4 while the instance is cut off
                await steady.append("pjm", body("pjm", float(index)))
            raw = aioredis.Redis.from_url(server.url)
            await raw.zremrangebyscore(KeyLayout(prefix).history("pjm"), 3, 3)  # a hole
            await raw.aclose()
            proxy.unblock()
            await listener.wait_backend("redis")
            await listener.wait_for("pjm", 4)
        await proxy.close()
    assert listener.order == [("price", 1, 1), ("price", 2, 2), ("gap", 3, 3), ("price", 4, 4)]


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


# --- several instances: hold instead of numbering alone (issue 13) -------------------


async def peers(url: str, prefix: str, count: int = 2, **options: Any) -> list[FailoverStorage]:
    """Storages that know each other through the instance registry, as app instances
    do (the registry, not a flag, is what tells them they have peers)."""
    storages = [
        FailoverStorage(url, zones=ZONES, key_prefix=prefix, log=EventLog(), **FAST, **options)
        for _ in range(count)
    ]
    return storages


async def register_all(storages: list[FailoverStorage]) -> None:
    for index, storage in enumerate(storages):
        await storage.register_instance(f"i{index}", b"{}", ttl=30)
    for storage in storages:
        await storage.instances()
        assert storage.has_peers


def all_prices(listener: RecordingListener) -> list[tuple[str, int, bytes]]:
    return [(p.zone, p.seq, p.payload) for p in listener.prices]


async def publish_alternating(
    storages: list[FailoverStorage], stop: asyncio.Event, accepted: list[StoredPrice],
    refused: list[Exception],
) -> None:
    """Two publishers (one per instance) until ``stop``; what each append answered."""

    async def one(storage: FailoverStorage, base: float) -> None:
        count = 0
        while not stop.is_set():
            try:
                accepted.append(await storage.append("pjm", body("pjm", base + count)))
            except StorageHeld as exc:
                refused.append(exc)
                await asyncio.sleep(0.05)
            count += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(one(s, 1000.0 * i) for i, s in enumerate(storages)))


@dataclass
class PublishingPeers:
    """Two registered peer storages on one Redis, both publishing (``publish_alternating``)
    until ``stop``; what they accepted and refused, what their listeners got."""

    storages: list[FailoverStorage]
    listeners: list[RecordingListener]
    epoch: str
    publisher: asyncio.Task[None]
    stop_event: asyncio.Event
    accepted: list[StoredPrice] = field(default_factory=list)
    refused: list[Exception] = field(default_factory=list)

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.publisher, 10)

    async def assert_every_accepted_price_kept_once_in_order(self) -> None:
        """Both instances delivered seqs 1..last in order, the same prices; one seq names
        one price; every accepted (202) price is among the delivered ones."""
        last = max(price.seq for price in self.accepted)
        for listener in self.listeners:
            assert await listener.wait_for("pjm", last) == list(range(1, last + 1))
        assert all_prices(self.listeners[0]) == all_prices(self.listeners[1])
        assert len({p.seq for p in self.accepted}) == len(self.accepted)  # one seq, one price
        delivered = {(p.seq, p.payload) for p in self.listeners[0].prices}
        assert {(p.seq, p.payload) for p in self.accepted} <= delivered  # 202 means kept


@contextlib.asynccontextmanager
async def publishing_peers(url: str, prefix: str, *, hold: float) -> AsyncIterator[PublishingPeers]:
    storages = await peers(url, prefix, hold=hold)
    listeners = [RecordingListener(), RecordingListener()]
    for storage, listener in zip(storages, listeners, strict=True):
        await storage.start(listener)
    async with running(*storages):
        await register_all(storages)
        stop = asyncio.Event()
        accepted: list[StoredPrice] = []
        refused: list[Exception] = []
        publisher = asyncio.create_task(publish_alternating(storages, stop, accepted, refused))
        run = PublishingPeers(
            storages, listeners, storages[0].epoch, publisher, stop, accepted, refused
        )
        try:
            yield run
        finally:
            stop.set()
            await asyncio.wait({publisher}, timeout=10)


async def test_short_pause_with_peers_costs_only_latency(prefix: str) -> None:
    """SIGSTOP shorter than the hold window, two instances publishing: nobody numbers
    alone, so the epoch stays, every accepted price is delivered once, in order, to both
    instances, and one (zone, epoch, seq) never names two prices."""
    with RedisProcess() as server:
        async with publishing_peers(server.url, prefix, hold=5.0) as run:
            listeners = run.listeners
            await listeners[0].wait_for("pjm", 20)
            server.pause()
            await listeners[0].wait_backend("in-memory")
            await listeners[1].wait_backend("in-memory")
            await asyncio.sleep(1.0)  # publishes wait meanwhile
            server.resume()
            await listeners[0].wait_backend("redis")
            await listeners[1].wait_backend("redis")
            await listeners[0].wait_for("pjm", len(listeners[0].seqs("pjm")) + 20)
            await run.stop()

            assert not run.refused
            for storage, listener in zip(run.storages, listeners, strict=True):
                assert storage.epoch == run.epoch and listener.epochs == []
                assert storage.counters().holds == 1
            await run.assert_every_accepted_price_kept_once_in_order()


async def test_long_kill_with_peers_refuses_then_recovers_without_epoch_change(
    prefix: str,
) -> None:
    """SIGKILL longer than the hold window: appends are refused (StorageHeld, nothing
    written), never numbered alone; Redis restarted empty gets the history back from the
    mirrors and the lineage goes on."""
    with RedisProcess() as server:
        storages = await peers(server.url, prefix, hold=0.8)
        listeners = [RecordingListener(), RecordingListener()]
        for storage, listener in zip(storages, listeners, strict=True):
            await storage.start(listener)
        async with running(*storages):
            await register_all(storages)
            epoch = storages[0].epoch
            for index in range(4):
                await storages[index % 2].append("pjm", body("pjm", float(index)))
            await listeners[1].wait_for("pjm", 4)
            server.kill()
            await listeners[0].wait_backend("in-memory")
            started = time.monotonic()
            with pytest.raises(StorageHeld) as held:
                await storages[0].append("pjm", body("pjm", 99.0))
            assert 0.3 < time.monotonic() - started < 2.0  # waited the window, not more
            assert held.value.retry_after >= 1
            started = time.monotonic()
            with pytest.raises(StorageHeld):  # the window is over: refused at once
                await storages[1].append("pjm", body("pjm", 98.0))
            assert time.monotonic() - started < 0.5
            assert await storages[0].latest("pjm") == await storages[1].latest("pjm")
            server.start()
            await listeners[0].wait_backend("redis")
            await listeners[1].wait_backend("redis")
            price = await storages[1].append("pjm", body("pjm", 4.0))
            assert price.seq == 5
            for storage, listener in zip(storages, listeners, strict=True):
                assert await listener.wait_for("pjm", 5) == [1, 2, 3, 4, 5]
                assert storage.epoch == epoch and listener.epochs == []
                assert storage.counters().held_refusals >= 1
            assert storages[0].counters().held_refusals + storages[1].counters().held_refusals == 2


async def test_epoch_moved_by_a_peer_mid_append_is_no_failover(prefix: str) -> None:
    """The cascade of issue 13: appends refused because a peer just replaced the epoch
    (its announcement still on the way) must reconcile and be retried under the new
    epoch, in Redis, not switch the instance to numbering alone in memory."""
    with RedisProcess() as server:
        storages = await peers(server.url, prefix, hold=5.0)
        listeners = [RecordingListener(), RecordingListener()]
        for storage, listener in zip(storages, listeners, strict=True):
            await storage.start(listener)
        async with running(*storages):
            await register_all(storages)
            for index in range(3):
                await storages[0].append("pjm", body("pjm", float(index)))
            await listeners[1].wait_for("pjm", 3)
            raw = aioredis.Redis.from_url(server.url)
            await raw.set(KeyLayout(prefix).epoch, "peerepoch01")  # announced later
            prices = await asyncio.gather(
                *(storages[0].append("pjm", body("pjm", 10.0 + i)) for i in range(20))
            )
            # The late announcement: the other instance resyncs and catches up (it
            # dropped the new lineage's prices as foreign until it heard of it).
            await raw.publish(KeyLayout(prefix).prices, "!epoch peerepoch01")
            await raw.aclose()
            assert storages[0].epoch == "peerepoch01"
            assert storages[0].counters().failovers == 0 and storages[0].backend == "redis"
            assert listeners[0].backends == []  # nobody was told of an outage
            assert listeners[0].epochs == ["peerepoch01"]  # the declaration, once
            assert storages[0].counters().resyncs == 1
            assert [price.seq for price in prices] == list(range(4, 24))  # in Redis, once
            assert await listeners[0].wait_for("pjm", 23) == list(range(1, 24))
            assert await listeners[1].wait_for("pjm", 23) == list(range(1, 24))


async def test_a_fault_of_each_kind_with_peers_never_collides(prefix: str) -> None:
    """A short soak at the storage level: two instances publishing, Redis paused
    briefly, killed and restarted, and paused longer than the hold window. One seq never
    names two prices, every accepted price is delivered to both, in order, and the epoch
    never changes (nobody numbered alone)."""
    with RedisProcess() as server:
        async with publishing_peers(server.url, prefix, hold=1.0) as run:
            accepted = run.accepted
            for fault, length in (("pause", 0.5), ("kill", 0.5), ("pause", 1.8)):
                target = len(accepted) + 20
                await eventually(lambda: len(accepted) >= target, within=10)  # noqa: B023
                if fault == "pause":
                    server.pause()
                    await asyncio.sleep(length)
                    server.resume()
                else:
                    server.kill()
                    await asyncio.sleep(length)
                    server.start()
            target = len(accepted) + 20
            await eventually(lambda: len(accepted) >= target, within=10)
            await run.stop()

            assert run.refused  # the long pause outlasted the window: refused, not numbered
            await run.assert_every_accepted_price_kept_once_in_order()
            for storage, listener in zip(run.storages, run.listeners, strict=True):
                assert storage.epoch == run.epoch and listener.epochs == []
