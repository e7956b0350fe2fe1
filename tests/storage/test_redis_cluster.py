"""pricehub on a real Redis Cluster (issue 17): ``--redis-url redis+cluster://...``.

One six-node cluster (three masters, one replica each, ``tests.harness.redisproc.RedisCluster``)
is shared by the module; every test writes under its own key prefix. Real servers
(``run_server.py``) and real WebSocket subscribers; zones spread over several masters.
The master-kill test runs last: it leaves the cluster serving (a replica promoted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any, cast

import orjson
import pytest
import redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from pricehub.server.errors import ConfigError
from pricehub.server.ingest import IngestConsumer
from pricehub.server.publisher import Publisher
from pricehub.server.settings import Settings
from pricehub.storage.cluster import ClusterKeyLayout, RedisClusterStorage
from pricehub.storage.errors import BatchInterrupted, ZoneRefused
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import IngestAck
from pricehub.wire.messages import PriceBody
from tests.harness.redisproc import RecordingListener, RedisCluster
from tests.harness.serverproc import ServerProcess, running_servers
from tests.harness.support import eventually
from tests.storage.test_cluster import Subscriber, chunks, client_session, get_json, post, subscribe

KEY = "cluster-test-key"  # the publish key tests.storage.test_cluster.post sends
ZONES = ("pjm", "ercot", "caiso", "nyiso")
SLOW = 30.0  # bound of waits over real processes on a shared 2-core machine
FAILOVER_BOUND = 20.0  # node timeout 1 s: detection plus election takes 2-4 s here
HISTORY = 100_000  # retained per zone (--history-size): more than any test publishes


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


def instances(
    cluster: RedisCluster, prefix: str, count: int = 2
) -> contextlib.AbstractAsyncContextManager[list[ServerProcess]]:
    args = ["--zones", ",".join(ZONES), "--key-prefix", prefix,
            "--redis-timeout", "1", "--redis-probe-interval", "0.2",
            "--publish-rate-limit", "100000",
            # Room for every price a test publishes: a fast machine publishes thousands
            # per zone while a master fails over, and the history is what is checked.
            "--history-size", str(HISTORY)]  # fmt: skip
    return running_servers(count, cluster.url, *args, publish_key=KEY)


def client_of(cluster: RedisCluster) -> AsyncRedisCluster:
    return AsyncRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes]
    )


def body(zone: str, price: float) -> bytes:
    return PriceBody(zone, price, None, "2026-11-27T15:00:00.000Z").encode()


def test_settings_accept_a_cluster_url_and_refuse_braces_in_its_prefix() -> None:
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/"
    assert Settings(redis_url=url).redis_url == url
    with pytest.raises(ConfigError, match="key_prefix"):
        Settings(redis_url=url, key_prefix="ph{x}:")


def test_a_zone_lives_in_one_slot_and_zones_spread_over_masters(
    cluster: RedisCluster, prefix: str
) -> None:
    keys = ClusterKeyLayout(prefix)
    for zone in ZONES:
        names = [keys.seq(zone), keys.history(zone), keys.latest(zone),
                 keys.zone_epoch(zone), keys.ingested(zone), keys.channel(zone)]  # fmt: skip
        assert len({cluster.keyslot(name) for name in names}) == 1, names
    assert len({cluster.node_for_key(keys.seq(zone)) for zone in ZONES}) >= 2
    assert cluster.keyslot(keys.instance("a")) == cluster.keyslot(keys.instances)


async def test_two_instances_number_every_price_once_in_order(
    cluster: RedisCluster, prefix: str
) -> None:
    per_zone = 100
    async with instances(cluster, prefix) as servers, client_session() as session:
        urls = [s.ws_url + "/api/ws/ws/prices?zones=" + ",".join(ZONES) for s in servers]
        subscribers = await subscribe(session, urls, 10)
        assert all(s.backends() == ["redis"] for s in subscribers)
        targets = itertools.cycle(servers)
        prices = [
            (next(targets), {"market_zone": zone, "price": float(i)})
            for i in range(per_zone) for zone in ZONES
        ]  # fmt: skip
        for chunk in chunks(prices, 16):
            await asyncio.gather(*(post(session, server, price) for server, price in chunk))

        async def all_delivered() -> bool:
            return all(s.seqs(z)[-1:] == [per_zone] for s in subscribers for z in ZONES)

        await eventually(all_delivered, within=SLOW)
        for subscriber in subscribers:
            for zone in ZONES:
                assert subscriber.seqs(zone) == list(range(1, per_zone + 1))

        async def registry_complete() -> bool:
            stats = await get_json(session, servers[0].url + "/api/ws/ws/stats")
            return bool(len(stats["cluster"]["instances"]) == 2)

        await eventually(registry_complete, within=SLOW)
        await asyncio.gather(*(s.close() for s in subscribers))


async def test_resume_on_the_other_instance(cluster: RedisCluster, prefix: str) -> None:
    async with instances(cluster, prefix) as (first, second), client_session() as session:
        (subscriber,) = await subscribe(session, [first.ws_url + "/api/ws/ws/market/ercot"], 1)
        epoch = subscriber.messages[0]["epoch"]
        for index in range(5):
            await post(session, first, {"market_zone": "ercot", "price": float(index)})
        await eventually(lambda: subscriber.seqs("ercot")[-1:] == [5], within=SLOW)
        await subscriber.close()
        for index in range(5, 12):
            await post(session, second, {"market_zone": "ercot", "price": float(index)})
        url = second.ws_url + f"/api/ws/ws/market/ercot?since=5&epoch={epoch}"
        resumed = await Subscriber.connect(session, url)

        async def completed() -> bool:
            return any(m["type"] == "resume_complete" for m in resumed.messages)

        await eventually(completed, within=SLOW)
        replay = [m for m in resumed.messages if m["type"] == "price_update"]
        assert [m["seq"] for m in replay] == list(range(6, 13))
        assert all(m["replay"] for m in replay)
        assert [m["price"] for m in replay] == [float(i) for i in range(5, 12)]
        done = next(m for m in resumed.messages if m["type"] == "resume_complete")
        assert done["recovered"] is True
        await resumed.close()


async def test_stream_ingest_takes_each_entry_once_in_stream_order(
    cluster: RedisCluster, prefix: str
) -> None:
    client = client_of(cluster)
    async with instances(cluster, prefix) as servers, client_session() as session:
        urls = [s.ws_url + "/api/ws/ws/prices?zones=" + ",".join(ZONES) for s in servers]
        subscribers = await subscribe(session, urls, 4)
        stream = f"{prefix}ingest"
        for index in range(40):
            zone = ZONES[index % len(ZONES)]
            await client.xadd(stream, {"market_zone": zone, "price": str(index)})
        await client.xadd(stream, {"market_zone": "pjm", "price": "NaN"})  # invalid: acked

        async def all_delivered() -> bool:
            return all(s.seqs(z)[-1:] == [10] for s in subscribers for z in ZONES)

        await eventually(all_delivered, within=SLOW)
        for subscriber in subscribers:
            for number, zone in enumerate(ZONES):
                assert subscriber.seqs(zone) == list(range(1, 11))
                prices = [
                    m["price"]
                    for m in subscriber.messages
                    if m["type"] == "price_update" and m["market_zone"] == zone
                ]
                assert prices == [float(i) for i in range(number, 40, len(ZONES))]

        async def drained() -> bool:
            pending = await client.xpending(stream, "pricehub")
            return bool(pending["pending"] == 0 and await client.xlen(stream) == 0)

        await eventually(drained, within=SLOW)
        await asyncio.gather(*(s.close() for s in subscribers))
    await client.aclose()


async def test_an_ingest_entry_delivered_again_is_not_appended_again(
    cluster: RedisCluster, prefix: str
) -> None:
    """The cluster cannot XACK inside the append script (the stream is in another slot):
    the zone's last applied entry id makes a second delivery a no-op instead."""
    storage = RedisClusterStorage(cluster.url, zones=ZONES, key_prefix=prefix, timeout=2.0)
    listener = RecordingListener()
    await storage.start(listener)
    try:
        first = await storage.append("pjm", body("pjm", 1.0), ack=IngestAck("1000-0", "a"))
        again = await storage.append("pjm", body("pjm", 1.0), ack=IngestAck("1000-0", "b"))
        older = await storage.append("pjm", body("pjm", 0.5), ack=IngestAck("999-5", "b"))
        newer = await storage.append("pjm", body("pjm", 2.0), ack=IngestAck("1000-1", "b"))
        assert (first.seq, again.seq, older.seq, newer.seq) == (1, 0, 0, 2)
        assert await listener.wait_for("pjm", 2) == [1, 2]
        assert [p.seq for p in await storage.history("pjm", limit=10)] == [1, 2]
    finally:
        await storage.close()


async def test_a_zone_whose_keys_are_damaged_fails_alone_on_the_cluster(
    cluster: RedisCluster, prefix: str
) -> None:
    """``SET pricehub:{ercot}:seq not-a-number``: ercot's prices are refused (HTTP-style
    batch and stream ingest alike: its entries acknowledged, never left pending), every
    other zone publishes on the cluster in order, no failover; an instance started with
    the damage in place starts on the cluster."""
    keys = ClusterKeyLayout(prefix)
    client = client_of(cluster)
    storage = FailoverStorage(
        cluster.url, zones=ZONES, key_prefix=prefix, timeout=1.0, probe_interval=0.2
    )
    listener = RecordingListener()
    await storage.start(listener)
    publisher = Publisher(storage)
    consumer = IngestConsumer(
        storage, publisher, zones=ZONES, consumer="only", block=0.2, lease_ttl=1.0
    )
    consuming = asyncio.create_task(consumer.run())
    try:
        await client.set(keys.seq("ercot"), "not-a-number")
        batch = [PriceBody(zone, 1.0, None, "2026-11-27T15:00:00.000Z") for zone in ZONES]
        with pytest.raises(BatchInterrupted) as refused:
            await publisher.publish_many(batch, source="http")
        assert isinstance(refused.value.cause, ZoneRefused)
        assert [p.zone for p in refused.value.accepted] == [z for z in ZONES if z != "ercot"]
        for index in range(16):
            zone = ZONES[index % len(ZONES)]
            await client.xadd(keys.ingest, {"market_zone": zone, "price": str(index)})
        for zone in ZONES:
            if zone != "ercot":
                assert await asyncio.wait_for(listener.wait_for(zone, 5), SLOW) == [1, 2, 3, 4, 5]

        async def drained() -> bool:
            pending = await client.xpending(keys.ingest, "pricehub")
            return bool(pending["pending"] == 0 and await client.xlen(keys.ingest) == 0)

        await eventually(drained, within=SLOW)
        # Counted when publish_many returns, which can be just after the entries were
        # acknowledged (the cluster acks in the round trip right after the append).
        await eventually(lambda: (consumer.stats.invalid, consumer.stats.accepted) == (4, 12))
        assert consumer.stats.leases == 1
        assert (storage.backend, storage.counters().failovers) == ("redis", 0)
        assert await client.get(keys.seq("ercot")) == b"not-a-number"

        restarted = FailoverStorage(cluster.url, zones=ZONES, key_prefix=prefix, timeout=1.0)
        await restarted.start(RecordingListener())
        try:
            assert restarted.backend == "redis"
            assert [p.seq for p in await restarted.history("pjm", limit=10)] == [1, 2, 3, 4, 5]
        finally:
            await restarted.close()
    finally:
        consumer.stop()
        await asyncio.wait({consuming}, timeout=5)
        await client.aclose()
        await storage.close()


async def test_wait_replicas_acknowledges_a_price_once_its_replica_has_it(
    cluster: RedisCluster, prefix: str
) -> None:
    url = cluster.url + "?wait_replicas=1"
    storage = RedisClusterStorage(url, zones=ZONES, key_prefix=prefix, timeout=2.0)
    await storage.start(RecordingListener())
    try:
        for zone in ZONES:
            price = await storage.append(zone, body(zone, 3.0))
            key = ClusterKeyLayout(prefix).latest(zone)
            (replica,) = cluster.replica_of(cluster.node_for_key(key))
            reader = redis.Redis(port=replica, single_connection_client=True)
            command(reader, "READONLY")
            assert reader.get(key) == price.payload  # there when append returned
            reader.close()
        assert storage.unreplicated == 0
    finally:
        await storage.close()


def command(client: redis.Redis, *args: Any) -> Any:
    """A raw command on a synchronous client (redis-py leaves it untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def migrate_slot(cluster: RedisCluster, slot: int, source: int, target: int) -> None:
    """Move ``slot`` with its keys from master ``source`` to master ``target`` (what
    ``redis-cli --cluster reshard`` does, for one slot)."""
    nodes = {port: redis.Redis(port=port, decode_responses=True) for port, _ in cluster.masters()}
    try:
        ids = {port: command(client, "CLUSTER", "MYID") for port, client in nodes.items()}
        command(nodes[target], "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        command(nodes[source], "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := command(nodes[source], "CLUSTER", "GETKEYSINSLOT", slot, 100):
            command(nodes[source], "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for client in nodes.values():
            command(client, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in nodes.values():
            client.close()


async def test_a_zone_slot_moved_to_another_master_is_followed(
    cluster: RedisCluster, prefix: str
) -> None:
    """Resharding: Redis tells the subscriber ``sunsubscribe``; the instance subscribes
    to the zone's channel on the slot's new master and goes on, without a gap and
    without leaving Redis (no failover to memory)."""
    storage = FailoverStorage(
        cluster.url, zones=ZONES, key_prefix=prefix, timeout=1.0, probe_interval=0.2
    )
    listener = RecordingListener()
    await storage.start(listener)
    try:
        for index in range(5):
            await storage.append("nyiso", body("nyiso", float(index)))
        await listener.wait_for("nyiso", 5)
        key = ClusterKeyLayout(prefix).seq("nyiso")
        source = cluster.node_for_key(key)
        target = next(port for port, _ in cluster.masters() if port != source)
        await asyncio.to_thread(migrate_slot, cluster, cluster.keyslot(key), source, target)
        redis_storage = storage._redis
        assert isinstance(redis_storage, RedisClusterStorage)
        await eventually(lambda: redis_storage.moves == 1, within=SLOW)  # the sunsubscribe
        for index in range(5, 10):
            await storage.append("nyiso", body("nyiso", float(index)))
        assert await listener.wait_for("nyiso", 10) == list(range(1, 11))
        assert cluster.node_for_key(key) == target
        counters = storage.counters()
        assert (counters.failovers, counters.epoch_changes, listener.backends) == (0, 0, [])
    finally:
        await storage.close()


async def test_a_master_killed_under_load_loses_and_repeats_nothing(
    cluster: RedisCluster, prefix: str
) -> None:
    """SIGKILL the master serving ``pjm`` while prices stream in through one instance and
    both instances' subscribers watch: the instances fail over to memory, come back once
    the replica took over, and every accepted price is in the history exactly once."""
    concurrency = 4
    async with instances(cluster, prefix) as servers, client_session() as session:
        publisher = servers[0]
        urls = [s.ws_url + "/api/ws/ws/prices?zones=" + ",".join(ZONES) for s in servers]
        subscribers = await subscribe(session, urls, 6)
        accepted: dict[float, tuple[str, int]] = {}
        counter = itertools.count()
        stop = asyncio.Event()

        async def publish_loop() -> None:
            while not stop.is_set():
                number = next(counter)
                zone = ZONES[number % len(ZONES)]
                price = {"market_zone": zone, "price": float(number)}
                accepted[float(number)] = (zone, await post(session, publisher, price))

        loops = [asyncio.create_task(publish_loop()) for _ in range(concurrency)]
        await eventually(lambda: len(accepted) >= 100, within=SLOW)
        victim = cluster.node_for_key(ClusterKeyLayout(prefix).seq("pjm"))
        cluster.kill(victim)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.wait_for_failover, victim, FAILOVER_BOUND)
        promoted_after = time.monotonic() - killed_at

        async def back_on_redis() -> bool:
            for server in servers:
                health = await get_json(session, server.url + "/api/ws/ws/health")
                if health["storage_backend"] != "redis":
                    return False
            return True

        await eventually(back_on_redis, within=SLOW)
        before_stop = len(accepted)
        await eventually(lambda: len(accepted) >= before_stop + 100, within=SLOW)
        stop.set()
        await asyncio.gather(*loops)

        last = {zone: max(s for z, s in accepted.values() if z == zone) for zone in ZONES}

        async def all_delivered() -> bool:
            return all(s.seqs(z)[-1:] == [last[z]] for s in subscribers for z in ZONES)

        await eventually(all_delivered, within=SLOW)
        for subscriber in subscribers:
            for zone in ZONES:
                seqs = subscriber.seqs(zone)
                assert seqs == sorted(set(seqs)), f"{zone}: repeated or out of order"
        history: dict[str, list[Any]] = {}
        for zone in ZONES:
            url = servers[1].url + f"/api/ws/ws/history/{zone}?limit={HISTORY}"
            history[zone] = (await get_json(session, url))["data"]
            assert [p["seq"] for p in history[zone]] == list(range(1, last[zone] + 1))
        stored = [p["price"] for zone in ZONES for p in history[zone]]
        # Every accepted price is there, under the seq its publisher was given.
        by_seq = {(p["market_zone"], p["seq"]): p["price"] for z in ZONES for p in history[z]}
        assert all(by_seq[key] == price for price, key in accepted.items())
        # Prices stored twice: only the documented in-flight edge (a write whose reply
        # died with the master, numbered again by the instance) can do that.
        repeated = len(stored) - len(set(stored))
        assert repeated <= concurrency
        print(
            f"{len(accepted)} prices, master {victim} killed: replica promoted after "
            f"{promoted_after:.2f} s; repeated under two seqs: {repeated}"
        )
        await asyncio.gather(*(s.close() for s in subscribers))


async def test_unreachable_cluster_serves_from_memory_then_writes_back(prefix: str) -> None:
    """Its own cluster, started only after pricehub: from memory at start, then back on
    the cluster with what was accepted meanwhile written back."""
    late = RedisCluster()
    storage = FailoverStorage(
        late.url, zones=ZONES, key_prefix=prefix, timeout=1.0, probe_interval=0.2
    )
    listener = RecordingListener()
    await storage.start(listener)
    try:
        assert storage.backend == "in-memory"
        for index in range(3):
            await storage.append("caiso", body("caiso", float(index)))
        with late:
            await listener.wait_backend("redis")  # bounded (WAIT in tests.harness.redisproc)
            price = await storage.append("caiso", body("caiso", 3.0))
            assert price.seq == 4
            client = client_of(late)
            history_key = ClusterKeyLayout(prefix).history("caiso")
            stored = cast(list[bytes], await client.zrange(history_key, 0, -1))
            await client.aclose()
            assert [orjson.loads(p)["seq"] for p in stored] == [1, 2, 3, 4]
    finally:
        await storage.close()


async def test_stream_ingest_through_a_master_kill_takes_each_entry_once_in_order(
    cluster: RedisCluster, prefix: str
) -> None:
    """Entries keep coming while the master of one zone (not the stream's) is killed: the
    instance pauses ingest in memory, resumes on the promoted replica, and every entry is
    numbered once, in stream order (the zone's last applied entry id skips repeats)."""
    keys = ClusterKeyLayout(prefix)
    stream_master = cluster.node_for_key(keys.ingest)
    victims = [
        zone for zone in ZONES
        if (port := cluster.node_for_key(keys.seq(zone))) != stream_master
        and cluster.replica_of(port)
    ]  # fmt: skip
    if not victims:
        pytest.skip("every zone shares the stream's master or lost its replica")
    victim = cluster.node_for_key(keys.seq(victims[0]))
    storage = FailoverStorage(
        cluster.url, zones=ZONES, key_prefix=prefix, timeout=1.0, probe_interval=0.2
    )
    listener = RecordingListener()
    await storage.start(listener)
    publisher = Publisher(storage)
    consumer = IngestConsumer(
        storage, publisher, zones=ZONES, consumer="only", block=0.2, lease_ttl=1.0
    )
    consuming = asyncio.create_task(consumer.run())
    producer = client_of(cluster)
    added = 0

    async def produce(count: int) -> None:
        nonlocal added
        for _ in range(count):
            zone = ZONES[added % len(ZONES)]
            await producer.xadd(keys.ingest, {"market_zone": zone, "price": str(added)})
            added += 1

    try:
        await produce(200)
        cluster.kill(victim)
        await produce(100)
        await asyncio.to_thread(cluster.wait_for_failover, victim, FAILOVER_BOUND)
        await produce(100)
        per_zone = added // len(ZONES)
        for zone in ZONES:
            await asyncio.wait_for(listener.wait_for(zone, per_zone), SLOW)
        for number, zone in enumerate(ZONES):
            assert listener.seqs(zone) == list(range(1, per_zone + 1))
            prices = [orjson.loads(p.payload)["price"] for p in listener.prices if p.zone == zone]
            assert prices == [float(i) for i in range(number, added, len(ZONES))]
        assert storage.counters().failovers >= 1 and storage.backend == "redis"
    finally:
        consumer.stop()
        await asyncio.wait({consuming}, timeout=5)
        await producer.aclose()
        await storage.close()
