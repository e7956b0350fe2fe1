"""``RedisStorage`` composed with a ``Topology`` (issue 27): the cluster storage is the
same class built with ``ClusterTopology``, and overrides nothing of it."""

from __future__ import annotations

import redis.asyncio as aioredis

from pricehub.storage.base import IngestKeys, IngestStream
from pricehub.storage.cluster import ClusterKeyLayout, ClusterTopology, RedisClusterStorage
from pricehub.storage.redis import RedisStorage
from pricehub.storage.redis.single import SingleNode
from pricehub.storage.redis.stream import RedisIngestStream
from pricehub.storage.redis.topology import Topology
from pricehub.storage.upstream import Upstream


def _public_or_private_members(cls: type) -> set[str]:
    return {name for name in vars(cls) if not (name.startswith("__") and name.endswith("__"))}


def test_the_cluster_storage_overrides_nothing_of_redis_storage() -> None:
    """Only its constructor (which passes the strategy) and its own counters: a renamed
    member of ``RedisStorage`` can never change the cluster's behaviour silently."""
    overridden = _public_or_private_members(RedisClusterStorage) & _public_or_private_members(
        RedisStorage
    )
    assert overridden == set()


def test_each_storage_is_built_with_its_topology() -> None:
    # Typed assignments: mypy checks both strategies against the Protocols.
    single: Topology = SingleNode()
    cluster: Topology = ClusterTopology(["pjm"], ClusterKeyLayout("t:"), wait_replicas=0)
    assert single.ingest_depth == 2 and cluster.ingest_depth == 1
    storage = RedisClusterStorage("redis+cluster://127.0.0.1:1/", zones=["pjm"], key_prefix="t:")
    upstream: Upstream = storage
    assert upstream.ingest_depth == 1
    assert storage.topology is storage.cluster_topology
    assert (storage.moves, storage.unreplicated) == (0, 0)
    assert isinstance(RedisStorage("redis://127.0.0.1:1/0").topology, SingleNode)


async def test_the_ingest_stream_satisfies_its_protocol() -> None:
    """The consumer sees ``base.IngestStream`` only (checked by mypy here)."""
    keys = IngestKeys(stream="t:ingest", lease="t:ingest:lease", group="pricehub")
    client = aioredis.Redis(host="127.0.0.1", port=1)  # never connected
    try:
        stream: IngestStream = RedisIngestStream(client, keys)
        assert isinstance(stream, RedisIngestStream)
    finally:
        await client.aclose()
