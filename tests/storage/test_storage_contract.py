"""One contract for every storage backend: memory, durable memory (journaled), Redis,
Redis Cluster, and Redis-with-failover.

Each test gets a fresh storage; the Redis-backed ones share one throwaway redis-server
(or one six-node cluster, started only if a cluster test runs) and are kept apart by a
unique key prefix; a durable one journals in the test's own temporary directory.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from pricehub.storage import DiskState, MemoryStorage, Storage, StorageCounters
from pricehub.storage.cluster import RedisClusterStorage
from pricehub.storage.durable import DurableStorage
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import RedisStorage
from pricehub.wire.messages import PriceBody, accepted_at_of, with_seq
from tests.harness import history_data
from tests.harness.redisproc import RecordingListener, RedisCluster, SentinelSetup
from tests.harness.support import eventually

ZONES = ("pjm", "ercot")
HISTORY = 5


def body(zone: str, price: float, *, volume: float | None = 1.0) -> bytes:
    return PriceBody(zone, price, volume, "2026-11-27T15:00:00.000Z").encode()


def stored(body: bytes, seq: int, payload: bytes) -> bytes:
    """What ``body`` stored as ``seq`` reads, with the accepted_at ``payload`` carries."""
    accepted_at = accepted_at_of(payload)
    assert accepted_at is not None and re.fullmatch(ACCEPTED_AT, accepted_at), payload
    return with_seq(body, seq, accepted_at.encode())


ACCEPTED_AT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


IN_MEMORY = ("memory", "durable")  # the backends that say "in-memory"
JOURNALED = ("durable", "failover-durable")  # the backends with a data dir


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelSetup]:
    with SentinelSetup() as started:
        yield started


def make_storage(kind: str, request: pytest.FixtureRequest, prefix: str) -> Storage:
    """A fresh ``kind`` backend; the servers it needs are started on first use."""
    if kind == "memory":
        return MemoryStorage(history_size=HISTORY)
    if kind == "durable":
        data_dir: Path = request.getfixturevalue("tmp_path") / "data"
        return DurableStorage(data_dir, history_size=HISTORY, zones=ZONES)
    if kind == "cluster":
        url = request.getfixturevalue("cluster").url
        return RedisClusterStorage(
            url, zones=ZONES, key_prefix=prefix, history_size=HISTORY, timeout=2.0
        )
    if kind == "sentinel":
        url = request.getfixturevalue("sentinel").url
        return RedisStorage(url, key_prefix=prefix, history_size=HISTORY, timeout=2.0)
    url = request.getfixturevalue("redis_server").url
    if kind == "redis":
        return RedisStorage(url, key_prefix=prefix, history_size=HISTORY)
    if kind == "failover-durable":  # the mirror journaled in a data dir (SQLite)
        data_dir = request.getfixturevalue("tmp_path") / "data"
        return FailoverStorage(
            url, zones=ZONES, key_prefix=prefix, history_size=HISTORY, data_dir=data_dir
        )
    return FailoverStorage(url, zones=ZONES, key_prefix=prefix, history_size=HISTORY)


# Every backend a deployment can run on: the embedded ones, Redis on one node, behind
# Sentinel and as a Cluster, and the failover on Redis with and without a data dir.
@pytest.fixture(
    params=["memory", "durable", "redis", "sentinel", "cluster", "failover", "failover-durable"]
)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def started(
    kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Storage, RecordingListener]]:
    storage = make_storage(kind, request, f"test{uuid.uuid4().hex[:8]}:")
    listener = RecordingListener()
    await storage.start(listener)
    yield storage, listener
    await storage.close()
    await storage.close()  # idempotent


async def test_backend_and_epoch(kind: str, started: tuple[Storage, RecordingListener]) -> None:
    storage, _ = started
    assert storage.backend == ("in-memory" if kind in IN_MEMORY else "redis")
    epoch = storage.epoch
    assert isinstance(epoch, str)
    assert epoch
    await storage.append("pjm", body("pjm", 1.0))
    assert storage.epoch == epoch
    await storage.check()


async def test_seqs_per_zone_and_payload(started: tuple[Storage, RecordingListener]) -> None:
    storage, listener = started
    first = await storage.append("pjm", body("pjm", 41.5))
    second = await storage.append("pjm", body("pjm", -3.25, volume=None))
    other = await storage.append("ercot", body("ercot", 12.0))
    assert [first.seq, second.seq, other.seq] == [1, 2, 1]
    assert first.payload == stored(body("pjm", 41.5), 1, first.payload)
    assert orjson.loads(second.payload) == {
        "seq": 2, "market_zone": "pjm", "price": -3.25, "volume": None,
        "timestamp": "2026-11-27T15:00:00.000Z", "accepted_at": accepted_at_of(second.payload),
    }  # fmt: skip
    assert await listener.wait_for("pjm", 2) == [1, 2]
    assert await listener.wait_for("ercot", 1) == [1]
    assert listener.prices[0] == first


async def test_latest_and_bounded_history(started: tuple[Storage, RecordingListener]) -> None:
    storage, listener = started
    assert await storage.latest("pjm") is None
    assert await storage.history("pjm", limit=10) == []
    for index in range(HISTORY + 3):
        await storage.append("pjm", body("pjm", float(index)))
    await listener.wait_for("pjm", HISTORY + 3)
    latest = await storage.latest("pjm")
    assert latest is not None
    assert latest.seq == HISTORY + 3
    assert latest.payload == stored(body("pjm", float(HISTORY + 2)), HISTORY + 3, latest.payload)
    assert [p.seq for p in await storage.history("pjm", limit=100)] == [4, 5, 6, 7, 8]
    assert [p.seq for p in await storage.history("pjm", limit=2)] == [7, 8]
    assert await storage.history("pjm", limit=0) == []
    assert await storage.latest("ercot") is None


async def test_since(started: tuple[Storage, RecordingListener]) -> None:
    storage, listener = started
    assert await storage.since("pjm", 0) == []
    assert await storage.since("pjm", 1) is None  # ahead of the zone
    for index in range(HISTORY + 2):  # seqs 1..7, history keeps 3..7
        await storage.append("pjm", body("pjm", float(index)))
    await listener.wait_for("pjm", HISTORY + 2)
    replay = await storage.since("pjm", 4)
    assert replay is not None
    assert [p.seq for p in replay] == [5, 6, 7]
    assert replay[0].payload == stored(body("pjm", 4.0), 5, replay[0].payload)
    assert [p.seq for p in await storage.since("pjm", 2) or []] == [3, 4, 5, 6, 7]
    assert await storage.since("pjm", 1) is None  # seq 2 is no longer retained
    assert await storage.since("pjm", 0) is None
    assert await storage.since("pjm", 7) == []
    assert await storage.since("pjm", 8) is None


async def test_concurrent_appends_are_numbered_once_in_order(
    started: tuple[Storage, RecordingListener],
) -> None:
    storage, listener = started
    prices = await asyncio.gather(
        *(storage.append("pjm", body("pjm", float(i))) for i in range(200))
    )
    assert sorted(p.seq for p in prices) == list(range(1, 201))
    # pipelined appends keep call order: the i-th call got seq i+1
    assert [orjson.loads(p.payload)["price"] for p in prices] == [float(i) for i in range(200)]
    assert await listener.wait_for("pjm", 200) == list(range(1, 201))


async def test_append_many_numbers_in_order_like_single_appends(
    started: tuple[Storage, RecordingListener],
) -> None:
    storage, listener = started
    first = await storage.append("pjm", body("pjm", -1.0))
    items = [(zone, body(zone, float(i))) for i in range(300) for zone in ("pjm", "ercot")]
    prices = await storage.append_many(items)
    assert [(p.zone, orjson.loads(p.payload)["price"]) for p in prices] == [
        (zone, float(i)) for i in range(300) for zone in ("pjm", "ercot")
    ]
    assert [p.seq for p in prices if p.zone == "pjm"] == list(range(first.seq + 1, 302))
    assert [p.seq for p in prices if p.zone == "ercot"] == list(range(1, 301))
    assert await listener.wait_for("pjm", 301) == list(range(1, 302))
    assert await listener.wait_for("ercot", 300) == list(range(1, 301))
    latest = await storage.latest("ercot")
    assert latest is not None and latest.payload == prices[-1].payload
    history = await storage.history("pjm", limit=HISTORY + 10)
    assert [p.seq for p in history] == list(range(302 - HISTORY, 302))  # bounded
    assert await storage.append_many([]) == []


async def test_instance_registry_expires(started: tuple[Storage, RecordingListener]) -> None:
    storage, _ = started
    await storage.register_instance("a", b'{"connections":1}', ttl=30)
    await storage.register_instance("b", b'{"connections":2}', ttl=0.2)
    assert await storage.instances() == {"a": b'{"connections":1}', "b": b'{"connections":2}'}
    await storage.register_instance("a", b'{"connections":3}', ttl=30)
    async def b_expired() -> bool:
        return "b" not in await storage.instances()

    await eventually(b_expired)
    assert await storage.instances() == {"a": b'{"connections":3}'}
    await storage.unregister_instance("a")
    await storage.unregister_instance("never-registered")
    assert await storage.instances() == {}


async def test_counters_are_typed_and_start_at_zero(
    kind: str, started: tuple[Storage, RecordingListener]
) -> None:
    storage, listener = started
    await storage.append("pjm", body("pjm", 1.0))
    await listener.wait_for("pjm", 1)
    assert storage.counters() == StorageCounters()  # nothing went wrong: nothing counted


async def test_disk_status_is_a_state_the_backend_decides(
    kind: str, started: tuple[Storage, RecordingListener]
) -> None:
    """Durable memory and the failover with a data dir journal (``OK``, the figures
    moving with each write: the failover's behind Redis's answer); every other backend,
    as built here, keeps no journal (``DISABLED``, no figures; Redis and Cluster are also
    the failover's inner backends, which reports the disk for them)."""
    storage, _ = started
    before = storage.disk_status()
    await storage.append("pjm", body("pjm", 1.0))
    if kind not in JOURNALED:
        after = storage.disk_status()
        assert (after.state, after.journal, after.ok) == (DiskState.DISABLED, None, True)
        return
    assert before.journal is not None

    def written() -> bool:
        journal = storage.disk_status().journal
        return journal is not None and journal.records > before.journal.records

    await eventually(written)
    after = storage.disk_status()
    assert (after.state, after.reason, after.ok, after.write_errors) == (
        DiskState.OK, None, True, 0
    )
    assert after.journal is not None
    if kind == "durable":  # the price alone (the failover may still write its epoch behind)
        assert after.journal.records == before.journal.records + 1
    assert (after.recovered, after.fresh_reason) == (False, "new data dir")


async def test_snapshot_reads_every_zone_with_the_epoch(
    kind: str, started: tuple[Storage, RecordingListener]
) -> None:
    storage, listener = started
    empty = await storage.snapshot(["pjm", "ercot"])
    assert (empty.epoch, dict(empty.prices), empty.cursor()) == (
        storage.epoch, {"pjm": None, "ercot": None}, {"pjm": 0, "ercot": 0}
    )
    for index in range(3):
        await storage.append("pjm", body("pjm", float(index)))
    await storage.append("ercot", body("ercot", 7.0))
    await listener.wait_for("pjm", 3)
    await listener.wait_for("ercot", 1)
    taken = await storage.snapshot(["ercot", "nyiso", "pjm", "ercot"])  # repeats dropped
    assert list(taken.prices) == ["ercot", "nyiso", "pjm"]  # the order asked
    assert taken.cursor() == {"ercot": 1, "nyiso": 0, "pjm": 3}
    assert taken.prices["pjm"] == await storage.latest("pjm")
    assert taken.prices["nyiso"] is None
    assert taken.epoch == storage.epoch
    assert (await storage.snapshot([])).prices == {}


async def test_history_between_orders_by_market_time_across_zones(
    kind: str, started: tuple[Storage, RecordingListener]
) -> None:
    storage, listener = started
    for zone, timestamp in history_data.PRICES:
        if zone in ZONES:  # (a cluster storage numbers only its configured zones)
            await storage.append(zone, history_data.body(zone, timestamp))
    await listener.wait_for("pjm", 5)
    start, end = history_data.FROM, history_data.TO
    found = await storage.history_between(["pjm", "ercot"], start, end, limit=100)
    assert [(p.zone, p.seq) for p in found.prices] == list(history_data.EXPECTED)
    assert not found.truncated
    assert found.prices[0] == (await storage.since("ercot", 1) or [])[0]  # as stored
    cut = await storage.history_between(["ercot", "pjm"], start, end, limit=3)
    assert ([(p.zone, p.seq) for p in cut.prices], cut.truncated) == (
        list(history_data.EXPECTED[:3]), True
    )
    exact = await storage.history_between(["pjm", "ercot"], start, end, limit=6)
    assert (len(exact.prices), exact.truncated) == (6, False)
    assert await storage.history_between(["pjm"], end, end, limit=10) == ([], False)
    assert await storage.history_between([], start, end, limit=10) == ([], False)
    assert await storage.history_between(["nyiso"], start, end, limit=10) == ([], False)
    later = await storage.history_between(["pjm"], end, "2026-11-28T00:00:00.000Z", limit=10)
    assert [(p.zone, p.seq) for p in later.prices] == [("pjm", 4)]
