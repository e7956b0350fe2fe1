"""An acknowledged price is never lost silently, and its seq is never given twice (issue 23).

The soak finding: an instance answered 202 for pjm seq 202 the instant Redis was SIGKILLed;
the reply of the append reached it, the Pub/Sub message did not, so its memory mirror (fed
from Pub/Sub) never held the price, and the recovery restored the empty Redis from that
mirror and numbered on from 201: a second price got seq 202 and the first was gone.

Made deterministic here with real ``redis-server`` processes: each instance reaches Redis
through a ``TcpProxy`` whose subscriber connections are frozen (they stay open and relay
nothing) right before the append, so its reply arrives and its Pub/Sub message cannot;
Redis is SIGKILLed right after and restarted empty.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

from pricehub.storage.base import StoredPrice
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import KeyLayout
from tests.harness.redisproc import RecordingListener, RedisProcess, TcpProxy
from tests.harness.support import eventually
from tests.storage.test_failover import EventLog, body, register_all, running

ZONES = ("pjm", "ercot")
# The frozen subscriber is noticed by the liveness probe after 2 x timeout: far longer
# than the append and the kill that follow the freeze take.
STEADY = {"timeout": 1.0, "probe_interval": 0.2}


def make(url: str, prefix: str, **options: Any) -> FailoverStorage:
    return FailoverStorage(
        url, zones=ZONES, key_prefix=prefix, log=EventLog(), **STEADY, **options
    )  # fmt: skip


@contextlib.asynccontextmanager
async def proxied(port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def redis_history(url: str, prefix: str, zone: str) -> list[tuple[int, float]]:
    raw = aioredis.Redis.from_url(url)
    try:
        payloads = await raw.zrange(KeyLayout(prefix).history(zone), 0, -1)
    finally:
        await raw.aclose()
    return [(p["seq"], p["price"]) for p in map(orjson.loads, payloads)]


def price_of(price: StoredPrice) -> float:
    return float(orjson.loads(price.payload)["price"])


async def test_a_lone_instance_keeps_a_price_acknowledged_as_redis_died(prefix: str) -> None:
    """The reply came back, the Pub/Sub message never did, Redis died: the price is in
    the mirror (delivered, resumable), memory numbers after it, and the Redis restarted
    empty gets it back at its seq. Before the fix memory numbered its seq again."""
    with RedisProcess() as server:
        async with proxied(server.port) as proxy:
            storage = make(proxy.url, prefix)
            listener = RecordingListener()
            await storage.start(listener)
            async with running(storage):
                for index in range(3):
                    await storage.append("pjm", body("pjm", float(index)))
                await listener.wait_for("pjm", 3)
                proxy.freeze(subscribers_only=True)
                acknowledged = await storage.append("pjm", body("pjm", 100.0))
                server.kill()
                assert acknowledged.seq == 4
                await listener.wait_backend("in-memory")
                assert (await storage.since("pjm", 3) or [None])[0] == acknowledged
                after = await storage.append("pjm", body("pjm", 101.0))
                assert after.seq == 5, "memory numbered an acknowledged seq again"
                server.start()  # empty
                await listener.wait_backend("redis")
                last = await storage.append("pjm", body("pjm", 102.0))
                assert last.seq == 6
                assert await listener.wait_for("pjm", 6) == [1, 2, 3, 4, 5, 6]
                kept = await redis_history(server.url, prefix, "pjm")
                assert kept == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 100.0), (5, 101.0), (6, 102.0)]


async def test_peers_restoring_an_empty_redis_never_give_an_acknowledged_seq_again(
    prefix: str,
) -> None:
    """Two instances with peers (holding, not numbering alone). A gets the reply for seq
    4 while no subscriber hears it, Redis dies and comes back empty, and B reconciles
    first with a publish held: B must not number there before A wrote seq 4 back, or two
    prices would be answered as (pjm, epoch, 4). Before the fix A's mirror lacked the
    price (it was lost silently) and B's held publish got seq 4."""
    with RedisProcess() as server:
        async with proxied(server.port) as proxy_a, proxied(server.port) as proxy_b:
            first = make(proxy_a.url, prefix, hold=10.0)
            second = make(proxy_b.url, prefix, hold=10.0)
            listeners = [RecordingListener(), RecordingListener()]
            await first.start(listeners[0])
            await second.start(listeners[1])
            async with running(first, second):
                await register_all([first, second])
                epoch = first.epoch
                for index in range(3):
                    await first.append("pjm", body("pjm", float(index)))
                await listeners[1].wait_for("pjm", 3)
                proxy_a.freeze(subscribers_only=True)
                proxy_b.freeze(subscribers_only=True)
                acknowledged = await first.append("pjm", body("pjm", 100.0))
                server.kill()
                assert acknowledged.seq == 4
                proxy_a.block()  # A comes back only after B has reconciled
                for listener in listeners:
                    await listener.wait_backend("in-memory")
                held = asyncio.create_task(second.append("pjm", body("pjm", 200.0)))
                server.start()  # empty
                raw = aioredis.Redis.from_url(server.url)
                try:
                    async def claimed() -> bool:
                        return await raw.get(KeyLayout(prefix).epoch) is not None

                    await eventually(claimed)  # B is reconciling the empty Redis
                finally:
                    await raw.aclose()
                proxy_a.unblock()
                other = await asyncio.wait_for(held, 10)
                assert other.seq != acknowledged.seq, "one (zone, epoch, seq), two prices"
                assert other.seq == 5
                for storage, listener in zip((first, second), listeners, strict=True):
                    await listener.wait_backend("redis")
                    assert await listener.wait_for("pjm", 5) == [1, 2, 3, 4, 5]
                    assert storage.epoch == epoch and listener.epochs == []
                    assert [price_of(p) for p in listener.prices][3:] == [100.0, 200.0]
                kept = await redis_history(server.url, prefix, "pjm")
                assert kept[3:] == [(4, 100.0), (5, 200.0)]


async def test_a_zone_the_new_lineage_lacks_starts_again_at_one(prefix: str) -> None:
    """Redis restarted empty and a fresh instance claimed it first (a new epoch): the
    old instance adopts that lineage. A zone it held that the new Redis has no price
    for must restart at seq 1 in its mirror; before the fix the mirror kept its old seq
    there and dropped the new lineage's first prices of that zone."""
    with RedisProcess() as server:
        async with proxied(server.port) as proxy:
            old = make(proxy.url, prefix)
            old_listener = RecordingListener()
            await old.start(old_listener)
            async with running(old):
                for index in range(3):
                    await old.append("pjm", body("pjm", float(index)))
                    await old.append("ercot", body("ercot", float(index)))
                await old_listener.wait_for("ercot", 3)
                proxy.block()
                server.kill()
                await old_listener.wait_backend("in-memory")
                server.start()  # empty
                fresh = make(server.url, prefix)
                await fresh.start(RecordingListener())
                async with running(fresh):
                    assert fresh.epoch != old.epoch
                    await fresh.append("pjm", body("pjm", 10.0))
                    proxy.unblock()
                    await old_listener.wait_backend("redis")
                    assert old.epoch == fresh.epoch
                    assert old_listener.epochs == [fresh.epoch]
                    first = await fresh.append("ercot", body("ercot", 20.0))
                    assert first.seq == 1
                    await eventually(lambda: first in old_listener.prices)
                    assert await old.latest("ercot") == first
                    assert await old.since("ercot", 0) == [first]


async def test_numbering_alone_goes_on_after_every_acknowledged_seq(prefix: str) -> None:
    """``--redis-hold 0`` (numbering alone even with peers): A got the reply for seq 5
    while seq 4 (B's) never reached it, then Redis died. A's memory numbering must go on
    at 6: numbering 4 is the divergence that hold 0 accepts (the epoch change declares it
    later), numbering 5 would answer one seq twice on the same instance. Resumes across
    the hole are refused (declared), not silently short."""
    with RedisProcess() as server:
        async with proxied(server.port) as proxy_a, proxied(server.port) as proxy_b:
            first, second = make(proxy_a.url, prefix, hold=0), make(proxy_b.url, prefix, hold=0)
            listener = RecordingListener()
            await first.start(listener)
            await second.start(RecordingListener())
            async with running(first, second):
                for index in range(3):
                    await first.append("pjm", body("pjm", float(index)))
                await listener.wait_for("pjm", 3)
                proxy_a.freeze(subscribers_only=True)
                proxy_b.freeze(subscribers_only=True)
                assert (await second.append("pjm", body("pjm", 200.0))).seq == 4
                assert (await first.append("pjm", body("pjm", 100.0))).seq == 5
                server.kill()
                await listener.wait_backend("in-memory")
                alone = await first.append("pjm", body("pjm", 101.0))
                assert alone.seq == 6, "an acknowledged seq numbered again"
                assert listener.seqs("pjm") == [1, 2, 3, 5, 6]
                assert await first.since("pjm", 3) is None  # the hole, declared
                assert [price_of(p) for p in await first.since("pjm", 4) or []] == [100.0, 101.0]
