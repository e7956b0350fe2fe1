"""The ``RedisCluster`` harness (tests/harness/redisproc.py) and what redis-py does on a cluster.

For the Redis Cluster backend (issue 17). These tests check the harness itself (six real
``redis-server`` nodes, three masters with one replica each) and pin down the driver
behaviour the backend has to build on:

* keys and channels sharing the hash tag ``{pjm}`` land in one slot, on one master;
* sharded Pub/Sub (SSUBSCRIBE / SPUBLISH) through ``redis.asyncio.cluster.RedisCluster``
  (``pubsub()`` returns a ``ClusterPubSub``; new in redis-py 8.0, setup.cfg says >= 5.0);
* a SIGKILLed master is replaced by its replica within a bounded time, the data survives;
* after that failover pricehub's own sharded subscription (``RedisClusterStorage``, one
  subscriber per master) delivers again what is published on the promoted master,
  whether or not the driver moves subscriptions by itself.
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
from redis.exceptions import RedisError

from pricehub.storage.cluster import ClusterKeyLayout
from pricehub.storage.failover import FailoverStorage
from pricehub.wire.messages import PriceBody
from tests.harness.redisproc import RecordingListener, RedisCluster
from tests.harness.support import eventually

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


async def next_sharded(pubsub: Any, *, within: float = WAIT) -> str:
    """The next ``smessage`` payload."""
    async with asyncio.timeout(within):
        while True:
            message = await pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=0.1
            )
            if message is not None and message["type"] == "smessage":
                return str(message["data"])


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
        assert shard_subscribers(owner, CHANNEL) == 1
        assert await client.spublish(CHANNEL, "41.5") == 1
        assert await next_sharded(pubsub) == "41.5"
        # another zone's channel, on another slot, on the same ClusterPubSub
        await pubsub.ssubscribe("pricehub:{ercot}:prices")
        assert await client.spublish("pricehub:{ercot}:prices", "12") == 1
        assert await next_sharded(pubsub) == "12"
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


async def test_pricehub_subscription_delivers_from_the_new_master_after_a_failover(
    fresh_cluster: RedisCluster,
) -> None:
    """What pricehub needs, whatever the driver does by itself after a failover: one
    instance's sharded subscription ends up on the promoted master and delivers, live,
    what another instance publishes there. (redis-py's ``ClusterPubSub`` used to stay on
    the dead node until its slot map was refreshed; 8.2 moves it by itself, some time
    after the failover. pricehub does not build on either: it subscribes per master and
    subscribes again on a fresh connection once a shard's connection died.)"""
    cluster = fresh_cluster
    channel = ClusterKeyLayout("pricehub:").channel("pjm")
    options: dict[str, Any] = {"zones": ("pjm",), "timeout": 1.0, "probe_interval": 0.2}
    subscriber, publisher = FailoverStorage(cluster.url, **options), FailoverStorage(
        cluster.url, **options
    )
    heard = RecordingListener()
    await subscriber.start(heard)
    await publisher.start(RecordingListener())
    try:
        first = await publisher.append("pjm", price_body(1.0))
        await heard.wait_for("pjm", first.seq)

        owner = cluster.node_for_key(channel)
        cluster.kill(owner)
        promoted = await asyncio.to_thread(cluster.wait_for_failover, owner, FAILOVER_BOUND)
        assert promoted is not None and cluster.node_for_key(channel) == promoted

        async def both_back_on_the_new_master() -> bool:
            # Both instances' subscriptions live on the promoted master (it was a replica,
            # nobody subscribed there before) and both serve from Redis again.
            receivers = await asyncio.to_thread(shard_subscribers, promoted, channel)
            return receivers == 2 and subscriber.backend == publisher.backend == "redis"

        await eventually(both_back_on_the_new_master, within=FAILOVER_BOUND)
        changes = list(heard.backends)
        sent = [(await publisher.append("pjm", price_body(float(i)))).seq for i in range(5)]
        assert await heard.wait_for("pjm", sent[-1]) == [first.seq, *sent]
        # Delivered live by the subscription, not by a recovery's catch-up.
        assert heard.backends == changes and subscriber.backend == "redis"
    finally:
        await subscriber.close()
        await publisher.close()


def price_body(price: float) -> bytes:
    return PriceBody("pjm", price, None, "2026-11-27T15:00:00.000Z").encode()


def shard_subscribers(port: int, channel: str) -> int:
    """PUBSUB SHARDNUMSUB ``channel`` on the node on ``port``."""
    direct = redis.Redis(port=port, decode_responses=True, socket_timeout=1.0)
    try:
        answer = direct.execute_command(  # type: ignore[no-untyped-call]
            "PUBSUB", "SHARDNUMSUB", channel
        )
        return int(answer[1])
    finally:
        direct.close()
