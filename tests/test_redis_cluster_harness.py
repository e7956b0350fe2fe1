"""The ``RedisCluster`` harness (tests/redisproc.py) and what redis-py does on a cluster.

For the Redis Cluster backend (issue 17). These tests check the harness itself (six real
``redis-server`` nodes, three masters with one replica each) and pin down the driver
behaviour the backend has to build on:

* keys and channels sharing the hash tag ``{pjm}`` land in one slot, on one master;
* sharded Pub/Sub (SSUBSCRIBE / SPUBLISH) through ``redis.asyncio.cluster.RedisCluster``
  (``pubsub()`` returns a ``ClusterPubSub``; new in redis-py 8.0, setup.cfg says >= 5.0);
* a SIGKILLed master is replaced by its replica within a bounded time, the data survives;
* after that failover a subscriber-only ``ClusterPubSub`` keeps pointing at the dead node
  (``get_sharded_message`` raises ``ConnectionError``, SPUBLISH reaches 0 receivers) until
  its client refreshes the slot map; ``await client.nodes_manager.initialize()`` does that
  and the driver then moves the SSUBSCRIBE to the new master by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests.redisproc import RedisCluster
from tests.support import eventually

WAIT = 10.0  # bound of every wait on messages or topology; the happy path is milliseconds
FAILOVER_BOUND = 15.0  # node timeout 1 s: detection plus election takes 2-4 s here
ZONE_KEYS = ("pricehub:{pjm}:seq", "pricehub:{pjm}:history", "pricehub:{pjm}:prices")
CHANNEL = "pricehub:{pjm}:prices"
# asyncio ClusterPubSub (SSUBSCRIBE/SPUBLISH on redis.asyncio.cluster.RedisCluster) is new
# in redis-py 8.0.0; before that the asyncio cluster client had no pubsub() at all.
needs_async_cluster_pubsub = pytest.mark.skipif(
    not hasattr(redis.asyncio.cluster, "ClusterPubSub"),
    reason=f"redis-py {redis.__version__}: asyncio cluster pub/sub needs redis-py >= 8.0",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """One cluster for the tests that leave it whole."""
    with RedisCluster() as started:
        yield started


@pytest.fixture
def fresh_cluster() -> Iterator[RedisCluster]:
    """A cluster of the test's own: the test kills a master."""
    with RedisCluster() as started:
        yield started


def client_of(cluster: RedisCluster) -> AsyncRedisCluster:
    """An asyncio cluster client on the harness's startup nodes."""
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    return AsyncRedisCluster(startup_nodes=nodes, decode_responses=True)


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    rc = client_of(cluster)
    await rc.initialize()
    yield rc
    await rc.aclose()


async def next_sharded(pubsub: Any, *, within: float = WAIT) -> tuple[str, list[str]]:
    """The next ``smessage`` payload, and the error class names ``get_sharded_message``
    raised meanwhile (a per-node pubsub of a dead node raises on every poll)."""
    errors: list[str] = []
    async with asyncio.timeout(within):
        while True:
            try:
                message = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=0.1
                )
            except RedisConnectionError as exc:
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            if message is not None and message["type"] == "smessage":
                return str(message["data"]), errors
            await asyncio.sleep(0)


async def poll_sharded(pubsub: Any, *, within: float = WAIT) -> None:
    """Poll ``get_sharded_message`` until it raises (``TimeoutError`` after ``within`` s)."""
    async with asyncio.timeout(within):
        while True:
            await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.1)


async def spublish_retrying(client: AsyncRedisCluster, message: str) -> int:
    """SPUBLISH, retried (bounded) while the client's slot map still names a dead node;
    the number of receivers Redis reported."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                return int(await client.spublish(CHANNEL, message))
            except RedisError:
                await asyncio.sleep(0.1)


def test_cluster_starts_with_three_masters_covering_every_slot(cluster: RedisCluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    covered = sorted(r for _, ranges in masters for r in ranges)
    assert covered[0][0] == 0 and covered[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(covered))
    assert all(len(cluster.replica_of(port)) == 1 for port, _ in masters)
    assert cluster.cluster_ok()
    assert all(port < 55535 for port in cluster.ports)
    assert cluster.url.startswith("redis+cluster://127.0.0.1:") and cluster.url.endswith("/")
    print(f"cluster of 6 up in {cluster.started_in:.2f} s")


async def test_hash_tagged_keys_share_one_slot(
    cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    slots = {cluster.keyslot(key) for key in ZONE_KEYS}
    assert len(slots) == 1
    assert {cluster.node_for_key(key) for key in ZONE_KEYS} == {
        cluster.node_for_key("{pjm}")
    }
    # zones spread: the seven default zones do not all hash to one slot
    zones = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
    assert len({cluster.keyslot(f"pricehub:{{{zone}}}:seq") for zone in zones}) > 1
    # a multi-key command on one tag works (no CROSSSLOT), through the driver
    await client.mset({"pricehub:{pjm}:seq": "7", "pricehub:{pjm}:epoch": "e1"})
    assert await client.mget("pricehub:{pjm}:seq", "pricehub:{pjm}:epoch") == ["7", "e1"]
    owner = cluster.node_for_key("pricehub:{pjm}:seq")
    direct = redis.Redis(port=owner, decode_responses=True)
    assert direct.get("pricehub:{pjm}:seq") == "7"  # on the master the slot map names
    direct.close()


@needs_async_cluster_pubsub
async def test_sharded_pubsub_through_the_asyncio_cluster_client(
    cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    pubsub = client.pubsub()
    await pubsub.ssubscribe(CHANNEL)
    try:
        owner = cluster.node_for_key(CHANNEL)
        # the driver opened the SSUBSCRIBE connection on the slot's master
        assert list(pubsub.node_pubsub_mapping) == [f"127.0.0.1:{owner}"]
        numsub = redis.Redis(port=owner, decode_responses=True)
        shardnumsub = numsub.execute_command(  # type: ignore[no-untyped-call]
            "PUBSUB", "SHARDNUMSUB", CHANNEL
        )
        assert shardnumsub == [CHANNEL, 1]
        numsub.close()
        assert await client.spublish(CHANNEL, "41.5") == 1
        assert (await next_sharded(pubsub))[0] == "41.5"
        # another zone's channel, on another slot, on the same ClusterPubSub
        await pubsub.ssubscribe("pricehub:{ercot}:prices")
        assert await client.spublish("pricehub:{ercot}:prices", "12") == 1
        assert (await next_sharded(pubsub))[0] == "12"
    finally:
        await pubsub.aclose()


async def test_master_kill_fails_over_and_keeps_replicated_data(
    fresh_cluster: RedisCluster,
) -> None:
    cluster = fresh_cluster
    client = client_of(cluster)
    try:
        await client.set("pricehub:{pjm}:seq", "42")
        owner = cluster.node_for_key("pricehub:{pjm}:seq")
        (replica,) = cluster.replica_of(owner)
        # WAIT 1: the replica has it before the kill (replication is asynchronous)
        node = client.get_node(host="127.0.0.1", port=owner)
        assert node is not None
        assert await client.execute_command("WAIT", 1, 1000, target_nodes=node) == 1
        cluster.kill(owner)
        killed = time.monotonic()
        promoted = await asyncio.to_thread(cluster.wait_for_failover, owner, FAILOVER_BOUND)
        took = time.monotonic() - killed
        assert promoted == replica
        assert cluster.node_for_key("pricehub:{pjm}:seq") == replica
        async with asyncio.timeout(WAIT):  # the driver follows (its first try may fail)
            while True:
                try:
                    value = await client.get("pricehub:{pjm}:seq")
                    break
                except RedisError:
                    await asyncio.sleep(0.1)
        assert value == "42"
        print(f"master {owner} killed: replica {replica} serving, cluster ok after {took:.2f} s")
    finally:
        await client.aclose()


@needs_async_cluster_pubsub
async def test_sharded_subscription_follows_failover_after_slot_refresh(
    fresh_cluster: RedisCluster,
) -> None:
    """What the backend must do: a subscriber-only client does not notice the failover on
    its own; refreshing its slot map (``nodes_manager.initialize()``) after a
    ``ConnectionError`` makes ``ClusterPubSub`` re-issue SSUBSCRIBE on the new master."""
    cluster = fresh_cluster
    subscriber, publisher = client_of(cluster), client_of(cluster)
    await subscriber.initialize()
    await publisher.initialize()
    pubsub = subscriber.pubsub()
    try:
        await pubsub.ssubscribe(CHANNEL)
        assert await publisher.spublish(CHANNEL, "before") == 1
        assert (await next_sharded(pubsub))[0] == "before"

        owner = cluster.node_for_key(CHANNEL)
        cluster.kill(owner)
        promoted = await asyncio.to_thread(cluster.wait_for_failover, owner, FAILOVER_BOUND)
        assert promoted is not None

        # The subscriber's per-node pubsub still targets the dead master: polling raises
        # ConnectionError, and nobody is subscribed on the new one. (If this starts to
        # fail, redis-py now re-routes by itself and the explicit refresh can go.)
        with pytest.raises(RedisConnectionError):
            await poll_sharded(pubsub)
        assert await spublish_retrying(publisher, "lost") == 0

        # The recipe: refresh the slot map; the driver's slots-cache listener reconciles
        # shard subscriptions (SUNSUBSCRIBE old node, SSUBSCRIBE new owner) in a task.
        await subscriber.nodes_manager.initialize()
        async def resubscribed() -> bool:
            return int(await publisher.spublish(CHANNEL, "probe")) > 0

        await eventually(resubscribed, within=WAIT)
        assert await publisher.spublish(CHANNEL, "after") == 1
        async with asyncio.timeout(WAIT):  # the probe that found a receiver comes first
            while (await next_sharded(pubsub))[0] != "after":
                pass
        assert f"127.0.0.1:{promoted}" in pubsub.node_pubsub_mapping
        assert f"127.0.0.1:{owner}" not in pubsub.node_pubsub_mapping  # dead one dropped
    finally:
        await pubsub.aclose()
        await subscriber.aclose()
        await publisher.aclose()
