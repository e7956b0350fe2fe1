"""Batches as batches (issue 14): a publish of N prices costs a handful of Redis round
trips, keeps per-zone seq order and exactly-once across instances, keeps history bounded,
and never holds the event loop for the whole burst; many zones cost nothing at start."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from pricehub.server.keys import BROADCASTER
from pricehub.server.publisher import Publisher
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.memory import MemoryStorage
from pricehub.storage.redis import RedisStorage
from pricehub.wire.messages import PriceBody
from tests.harness.redisproc import RecordingListener, RedisProcess
from tests.harness.support import MakeClient, eventually, publish, receive_json

NOW = "2026-11-27T15:00:00.000Z"
HISTORY = 50


def bodies(zones: list[str], count: int, *, tag: int) -> list[PriceBody]:
    """``count`` prices cycling over ``zones``; the price encodes (tag, index) so every
    price is recognisable wherever it ends up."""
    return [PriceBody(zones[i % len(zones)], tag * 100_000 + i, 1.0, NOW) for i in range(count)]


async def evalsha_calls(raw: aioredis.Redis) -> int:
    stats: dict[str, Any] = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_batch_is_a_few_scripts_not_one_per_price(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    storage = RedisStorage(redis_server.url, key_prefix=prefix, history_size=HISTORY)
    listener = RecordingListener()
    await storage.start(listener)
    try:
        zones = [f"z{i:04d}" for i in range(1000)]
        before = await evalsha_calls(raw)
        prices = await storage.append_many(
            [(body.market_zone, body.encode()) for body in bodies(zones, 1000, tag=1)]
        )
        calls = await evalsha_calls(raw) - before
        # 1,000 prices: two pipelined scripts (MAX_PIPELINE 512 each), not 1,000.
        assert calls <= 2, calls
        assert [(p.zone, p.seq) for p in prices] == [(zone, 1) for zone in zones]
        for zone in ("z0000", "z0999"):
            await listener.wait_for(zone, 1)
        assert len(listener.prices) == 1000  # every price delivered once, in call order
        assert [p.zone for p in listener.prices] == zones
    finally:
        await storage.close()


async def test_batches_from_two_instances_keep_seq_order_exactly_once_and_bounds(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    zones = ["pjm", "ercot", "caiso"]
    instances = [
        FailoverStorage(redis_server.url, zones=zones, key_prefix=prefix, history_size=HISTORY)
        for _ in range(2)
    ]
    listeners = [RecordingListener() for _ in instances]
    for storage, listener in zip(instances, listeners, strict=True):
        await storage.start(listener)
    try:
        publishers = [Publisher(storage) for storage in instances]
        rounds, size = 5, 120
        # Both instances publish batches at once, interleaving their scripts in Redis.
        results = await asyncio.gather(*(
            publisher.publish_many(bodies(zones, size, tag=10 * n + r), source="http", chunk=50)
            for r in range(rounds)
            for n, publisher in enumerate(publishers)
        ))  # fmt: skip
        total_per_zone = 2 * rounds * size // len(zones)
        for listener in listeners:
            for zone in zones:
                await listener.wait_for(zone, total_per_zone)
        replies = {(p.zone, p.seq): p.payload for batch in results for p in batch}
        assert len(replies) == 2 * rounds * size  # no seq given twice
        for listener in listeners:
            for zone in zones:
                # every instance: the zone's seqs 1..n, each once, in order
                assert listener.seqs(zone) == list(range(1, total_per_zone + 1))
            # what it was told is what the publishers were answered, byte for byte
            assert {(p.zone, p.seq): p.payload for p in listener.prices} == replies
        for zone in zones:
            zone_prices = [orjson.loads(p)["price"] for (z, _), p in replies.items() if z == zone]
            assert len(set(zone_prices)) == total_per_zone  # exactly once
            assert await raw.zcard(f"{prefix}history:{zone}") == HISTORY  # bounded
            for storage in instances:
                kept = await storage.history(zone, limit=10 * HISTORY)
                assert [p.seq for p in kept] == list(
                    range(total_per_zone - HISTORY + 1, total_per_zone + 1)
                )
    finally:
        for storage in instances:
            await storage.close()


async def test_publish_many_yields_to_the_loop_between_chunks() -> None:
    storage = MemoryStorage(history_size=10)
    listener = RecordingListener()
    await storage.start(listener)
    publisher = Publisher(storage)
    turns = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:  # stands for pings, health and socket reads
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    before = turns
    prices = await publisher.publish_many(
        bodies(["pjm", "ercot"], 5000, tag=1), source="http", chunk=500
    )
    during = turns - before
    stop.set()
    await beat
    assert [p.seq for p in prices if p.zone == "pjm"] == list(range(1, 2501))
    assert len(listener.prices) == 5000
    assert publisher.accepted["pjm", "http"] == 2500
    assert during >= 9, during  # the other task ran between each of the 10 chunks


async def test_many_zones_cost_nothing_at_start(
    redis_server: RedisProcess, prefix: str
) -> None:
    zones = [f"node_{i:06d}" for i in range(100_000)]
    storage = FailoverStorage(redis_server.url, zones=zones, key_prefix=prefix)
    listener = RecordingListener()
    started = time.perf_counter()
    await storage.start(listener)
    try:
        elapsed = time.perf_counter() - started
        assert storage.backend == "redis"
        assert elapsed < 10, f"start with 100,000 zones took {elapsed:.1f} s"
        # No per-zone state for zones without prices (reads of them create none either).
        assert await storage.latest("node_000007") is None
        assert storage._memory.zones_with_prices() == []
        await storage.append_many([("node_050000", PriceBody("node_050000", 1, 1, NOW).encode())])
        await listener.wait_for("node_050000", 1)
        assert storage._memory.zones_with_prices() == ["node_050000"]
    finally:
        await storage.close()


async def test_a_burst_reaches_a_many_zone_socket_in_a_few_writes(
    make_client: MakeClient,
) -> None:
    zones = tuple(f"z{i:03d}" for i in range(300))
    client = await make_client(zones=zones, max_zones_per_socket=256)
    broadcaster = client.app[BROADCASTER]
    mine = zones[:256]
    ws = await client.ws_connect("/api/ws/ws/prices?zones=" + ",".join(mine))
    assert (await receive_json(ws))["type"] == "connection_established"
    (connection,) = broadcaster.connections

    async def in_step() -> bool:  # joined its audience once every zone was opened
        return connection.audience is not None

    await eventually(in_step)
    writes, sent = connection.writes, connection.messages_sent
    await publish(client, *({"market_zone": zone, "price": 1.0} for zone in zones))
    got = [await receive_json(ws) for _ in mine]
    assert [m["market_zone"] for m in got] == list(mine)
    assert connection.messages_sent - sent == len(mine)
    assert connection.writes - writes <= 2, connection.writes - writes  # not 256
    await ws.close()


async def test_batches_fail_over_to_memory_and_back_without_gap_or_repeat(prefix: str) -> None:
    zones = ["pjm", "ercot"]
    with RedisProcess() as server:
        storage = FailoverStorage(
            server.url, zones=zones, key_prefix=prefix, timeout=0.25, probe_interval=0.2
        )
        listener = RecordingListener()
        await storage.start(listener)
        publisher = Publisher(storage)
        stop = asyncio.Event()
        answered: list[tuple[str, int]] = []
        try:
            async def publish() -> None:
                tag = 0
                while not stop.is_set():
                    tag += 1
                    prices = await publisher.publish_many(
                        bodies(zones, 40, tag=tag), source="http", chunk=20
                    )
                    answered.extend((p.zone, p.seq) for p in prices)
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(publish())
            await listener.wait_for("pjm", 100)
            server.kill()  # mid-stream of batches: some in flight when Redis goes
            await listener.wait_backend("in-memory")
            await listener.wait_for("pjm", len(listener.seqs("pjm")) + 100)
            server.start()
            await listener.wait_backend("redis")
            await listener.wait_for("pjm", len(listener.seqs("pjm")) + 100)
            stop.set()
            await asyncio.wait_for(task, 5)
            for zone in zones:
                total = sum(1 for z, _ in answered if z == zone)
                await listener.wait_for(zone, total)
                # every accepted price numbered once, contiguous, in order, across both
                # switches; what the publisher was answered is what was delivered
                assert listener.seqs(zone) == list(range(1, total + 1))
                assert sorted(seq for z, seq in answered if z == zone) == list(
                    range(1, total + 1)
                )
            assert listener.backends == ["in-memory", "redis"]
        finally:
            stop.set()
            await storage.close()
