"""A journal never seeds a Redis it did not mirror (issue 22, item 4).

The data dir of a failover instance records which Redis feed its journal mirrors (the
Redis address, database and key prefix, and the feed id kept in Redis next to the
epoch). Pointed at another Redis, the journal is left alone: nothing of it is written
there, one warning names both, and health and stats say so. The same Redis found empty
is restored from the journal as before, and ``--adopt-journal`` seeds another Redis on
purpose. Real ``run_server.py`` processes and real ``redis-server`` processes (no
persistence: a SIGKILL empties one), plus ``FailoverStorage`` in process where a closer
look is needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.server.http.api import durability_section
from pricehub.server.settings import load_settings
from pricehub.storage.base import StoredPrice
from pricehub.storage.binding import (
    FEED_KEY,
    RedisAddress,
    had_peers,
    meta_json,
    mirror_id,
    peer_mirrors,
)
from pricehub.storage.durable import disk_status
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.legacy.journal import Journal
from pricehub.wire.messages import with_seq
from tests.harness.datadir import contents, journaled_seq, owner_meta, owner_meta_text
from tests.harness.redisproc import RecordingListener, RedisProcess, TcpProxy
from tests.harness.support import eventually
from tests.storage.test_durable import body, epoch_of, get_json
from tests.storage.test_failover import EventLog
from tests.storage.test_failover_durable import health, prices, seqs_of, server

FOREIGN = "journal_belongs_to_another_redis"
PREFIX = "pricehub:"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def redis_a() -> Iterator[RedisProcess]:
    with RedisProcess() as redis:
        yield redis


@pytest.fixture
def redis_b() -> Iterator[RedisProcess]:
    with RedisProcess() as redis:
        yield redis


async def keys_of(url: str) -> dict[str, Any]:
    """What a Redis holds of the default feed: its epoch, feed id and pjm state."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        return {
            "epoch": await client.get(f"{PREFIX}epoch"),
            "feed": await client.get(f"{PREFIX}{FEED_KEY}"),
            "seq": await client.get(f"{PREFIX}seq:pjm"),
            "history": await client.zrange(f"{PREFIX}history:pjm", 0, -1),
        }
    finally:
        await client.aclose()


def events(log: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event ``name``."""
    found = []
    for line in log.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


async def make_feed(url: str, data_dir: Path, *values: float) -> str:
    """Run a server on ``url`` with ``data_dir``, publish ``values`` to pjm, stop it
    (SIGKILL: the journal is all that is left of its view); the feed's epoch."""
    with server(url, data_dir) as instance:
        assert await seqs_of(instance, *values) == list(range(1, len(values) + 1))
        epoch = await epoch_of(instance)

        async def journaled() -> bool:  # the mirror writes behind the 202
            return await asyncio.to_thread(journaled_seq, data_dir, "pjm") == len(values)

        await eventually(journaled)
        instance.kill()
    return epoch


# --- another Redis ---------------------------------------------------------------------


@pytest.mark.parametrize("change", ["address", "database"])
async def test_a_journal_of_one_redis_never_seeds_another(
    data_dir: Path, redis_a: RedisProcess, redis_b: RedisProcess, change: str
) -> None:
    epoch = await make_feed(redis_a.url, data_dir, 1.0, 2.0, 3.0)
    journal_before = contents(data_dir)
    other = redis_b.url if change == "address" else redis_a.url.replace("/0", "/1")
    with server(other, data_dir) as instance:
        stored = await keys_of(other)
        assert stored["seq"] is None and stored["history"] == []  # nothing of the old feed
        assert stored["epoch"] is not None and stored["epoch"] != epoch
        assert await epoch_of(instance) == stored["epoch"]
        assert await prices(instance) == []
        report = await health(instance)
        assert report["status"] == "degraded"
        assert report["checks"]["disk"] == FOREIGN
        assert report["checks"]["redis"] == "ok"
        section = report["durability"]
        assert section["status"] == FOREIGN
        stats = await get_json(instance, "/api/ws/ws/stats")
        assert stats["durability"] == section
        (warning,) = events(instance.log(), FOREIGN)
        assert warning["level"] == "warning"
        assert redis_a.url in warning["journal_redis"]
        assert other in warning["redis"]
        # The server serves the Redis feed as usual.
        assert await seqs_of(instance, 9.0) == [1]
        assert (await keys_of(other))["seq"] == "1"
    # The journal was left untouched: back on the Redis it mirrors (emptied meanwhile),
    # it restores the old feed, without the other Redis's price.
    assert contents(data_dir) == journal_before
    redis_a.kill()
    redis_a.start()
    with server(redis_a.url, data_dir) as instance:
        assert await epoch_of(instance) == epoch
        assert await prices(instance) == [(1, 1.0), (2, 2.0), (3, 3.0)]
        assert (await health(instance))["checks"]["disk"] == "ok"
        assert not events(instance.log(), FOREIGN)


async def test_the_same_redis_found_empty_is_restored_from_the_journal(
    data_dir: Path, redis_a: RedisProcess
) -> None:
    epoch = await make_feed(redis_a.url, data_dir, 1.0, 2.0)
    feed = (await keys_of(redis_a.url))["feed"]
    assert feed is not None  # the feed id is created with the feed
    assert owner_meta(data_dir)["feed_id"] == feed
    redis_a.kill()  # no persistence: it comes back empty
    redis_a.start()
    with server(redis_a.url, data_dir) as instance:
        stored = await keys_of(redis_a.url)
        assert (stored["epoch"], stored["feed"], stored["seq"]) == (epoch, feed, "2")
        assert await prices(instance) == [(1, 1.0), (2, 2.0)]
        report = await health(instance)
        assert (report["status"], report["checks"]["disk"]) == ("healthy", "ok")
        assert await seqs_of(instance, 3.0) == [3]
        assert not events(instance.log(), FOREIGN)


async def test_adopt_journal_seeds_another_redis_and_binds_the_journal_to_it(
    data_dir: Path, redis_a: RedisProcess, redis_b: RedisProcess
) -> None:
    epoch = await make_feed(redis_a.url, data_dir, 1.0, 2.0, 3.0)
    with server(redis_b.url, data_dir, env={"PRICEHUB_ADOPT_JOURNAL": "true"}) as instance:
        stored = await keys_of(redis_b.url)
        assert (stored["epoch"], stored["seq"]) == (epoch, "3")
        assert len(stored["history"]) == 3
        assert await prices(instance) == [(1, 1.0), (2, 2.0), (3, 3.0)]
        assert (await health(instance))["checks"]["disk"] == "ok"
        (adopted,) = events(instance.log(), "journal_adopted")
        assert str(redis_a.port) in adopted["journal_redis"]
        assert str(redis_b.port) in adopted["redis"]
        assert await seqs_of(instance, 4.0) == [4]  # mirrored: journaled behind
        await instance.stop_async()  # so a clean stop, which writes what is queued
    # Adopted once: the journal now mirrors B, so B found empty is restored without the flag.
    redis_b.kill()
    redis_b.start()
    with server(redis_b.url, data_dir) as instance:
        assert await epoch_of(instance) == epoch
        assert await prices(instance) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert not events(instance.log(), FOREIGN)
        assert not events(instance.log(), "journal_adopted")


async def test_the_same_address_holding_another_feed_is_another_redis(
    data_dir: Path, redis_a: RedisProcess
) -> None:
    """Redis replaced at the same address, and another pricehub created its feed there
    first: the feed ids differ, so the journal's feed is not written into it."""
    await make_feed(redis_a.url, data_dir, 1.0, 2.0, 3.0)
    redis_a.kill()
    redis_a.start()
    with server(redis_a.url, "none") as newcomer:
        assert await seqs_of(newcomer, 7.0) == [1]
        other_epoch = await epoch_of(newcomer)
    with server(redis_a.url, data_dir) as instance:
        stored = await keys_of(redis_a.url)
        assert (stored["epoch"], stored["seq"], len(stored["history"])) == (other_epoch, "1", 1)
        assert await prices(instance) == [(1, 7.0)]
        assert (await health(instance))["checks"]["disk"] == FOREIGN
        assert len(events(instance.log(), FOREIGN)) == 1


# --- in process: a running instance, journals without a binding, credentials ----------


async def test_a_running_instance_follows_a_feed_recreated_at_its_redis(
    data_dir: Path, redis_a: RedisProcess
) -> None:
    """Only the journal as loaded at start is checked: once an instance has reconciled,
    memory is its live mirror of that Redis (as without a data dir), so a feed another
    instance recreated there during an outage is followed, the journal bound to it."""
    proxy = TcpProxy(redis_a.port)  # lets this instance miss Redis's return
    await proxy.start()
    log, listener = EventLog(), RecordingListener()
    storage = FailoverStorage(
        proxy.url, zones=("pjm",), data_dir=data_dir, log=log, timeout=0.25,
        probe_interval=0.2,
    )  # fmt: skip
    await storage.start(listener)
    try:
        await storage.append("pjm", body(1.0))
        first_feed = owner_meta(data_dir)["feed_id"]
        proxy.block()
        redis_a.kill()
        await listener.wait_backend("in-memory")
        redis_a.start()
        newcomer = FailoverStorage(redis_a.url, zones=("pjm",))
        await newcomer.start(RecordingListener())
        await newcomer.append("pjm", body(7.0))
        await newcomer.close()
        proxy.unblock()
        await listener.wait_backend("redis")
        stored = await keys_of(redis_a.url)
        assert stored["feed"] != first_feed
        assert owner_meta(data_dir)["feed_id"] == stored["feed"]
        assert disk_status(storage).check == "ok"
        assert storage.epoch == stored["epoch"]
        assert FOREIGN not in log.events and "journal_bound" in log.events
    finally:
        await storage.close()
        await proxy.close()


def price(seq: int, value: float) -> StoredPrice:
    return StoredPrice("pjm", seq, with_seq(body(value), seq, b"2026-11-27T15:00:00.000000Z"))


async def legacy_journal(directory: Path, epoch: str) -> None:
    """A data dir as pricehub wrote it before the binding existed: records, no meta."""
    journal, _ = Journal.open(directory, history_size=100, new_epoch=epoch, fsync=False)
    await journal.append([price(1, 1.0), price(2, 2.0)])
    await journal.close()
    assert not (directory / "meta.json").exists()  # the old journal's owner meta file


async def test_a_journal_without_a_binding_never_seeds_an_empty_redis(
    data_dir: Path, redis_b: RedisProcess
) -> None:
    await legacy_journal(data_dir, "legacyepoch1")
    storage = FailoverStorage(redis_b.url, zones=("pjm",), data_dir=data_dir)
    await storage.start(RecordingListener())
    try:
        assert storage.backend == "redis"
        stored = await keys_of(redis_b.url)
        assert stored["epoch"] != "legacyepoch1" and stored["seq"] is None
        assert await storage.history("pjm", limit=10) == []
        assert disk_status(storage).check == FOREIGN
    finally:
        await storage.close()


async def test_a_journal_without_a_binding_is_bound_by_the_redis_holding_its_epoch(
    data_dir: Path, redis_a: RedisProcess
) -> None:
    """The upgrade path: a data dir from before the binding, restarted on the Redis it
    mirrored (which still holds its epoch), is bound to it and used as before."""
    await legacy_journal(data_dir, "legacyepoch2")
    client = aioredis.from_url(redis_a.url)
    await client.set(f"{PREFIX}epoch", "legacyepoch2")
    await client.aclose()
    storage = FailoverStorage(redis_a.url, zones=("pjm",), data_dir=data_dir)
    await storage.start(RecordingListener())
    try:
        assert storage.epoch == "legacyepoch2"
        assert disk_status(storage).check == "ok"
        assert [p.seq for p in await storage.history("pjm", limit=10)] == [1, 2]
        stored = await keys_of(redis_a.url)
        assert stored["seq"] == "2" and stored["feed"] is not None
        meta = owner_meta(data_dir)
        assert meta["feed_id"] == stored["feed"]
    finally:
        await storage.close()


async def test_a_password_is_never_stored_nor_logged(
    data_dir: Path, redis_a: RedisProcess, redis_b: RedisProcess
) -> None:
    plain = aioredis.from_url(redis_a.url)
    await plain.config_set("requirepass", "s3cret-pw")
    await plain.aclose()
    url = f"redis://:s3cret-pw@127.0.0.1:{redis_a.port}/0"
    storage = FailoverStorage(url, zones=("pjm",), data_dir=data_dir)
    await storage.start(RecordingListener())
    await storage.append("pjm", body(1.0))
    await storage.close()
    meta = owner_meta_text(data_dir)
    assert "s3cret" not in meta and f"127.0.0.1:{redis_a.port}" in meta
    records: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def _record(self, event: str, **fields: Any) -> None:
            records.append((event, fields))

        debug = info = warning = error = exception = _record

    other = f"redis://:other-pw@127.0.0.1:{redis_b.port}/0"
    storage = FailoverStorage(other, zones=("pjm",), data_dir=data_dir, log=Log())
    await storage.start(RecordingListener())
    await storage.close()
    (warning,) = [fields for event, fields in records if event == FOREIGN]
    assert "pw" not in repr(warning), warning
    assert str(redis_a.port) in warning["journal_redis"]
    assert str(redis_b.port) in warning["redis"]
    assert "pw" not in repr(durability_section(disk_status(storage)))


# --- addresses -------------------------------------------------------------------------


def address(url: str, prefix: str = PREFIX) -> RedisAddress:
    return RedisAddress.from_url(url, key_prefix=prefix)


def test_addresses_are_normalised_before_they_are_compared() -> None:
    base = address("redis://127.0.0.1:6379/0")
    for same in (
        "redis://127.0.0.1", "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/",
        "redis://:pw@127.0.0.1:6379/0", "redis://user:pw@127.0.0.1:6379?db=0",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none",
    ):  # fmt: skip
        assert address(same).same_as(base), same
    for other in (
        "redis://127.0.0.1:6380/0", "redis://127.0.0.1:6379/1", "redis://127.0.0.1/?db=2",
        "redis://10.0.0.9:6379/0", "unix:///tmp/redis.sock",
    ):  # fmt: skip
        assert not address(other).same_as(base), other
    assert not address("redis://127.0.0.1:6379/0", "other:").same_as(base)
    assert address("redis://EXAMPLE.com:6379/0").same_as(address("redis://example.com/0"))
    assert address("redis://[::1]:6379/0").same_as(address("redis://[::1]/0"))
    assert address("unix:///tmp/r.sock?db=1").same_as(address("unix://:pw@/tmp/r.sock?db=1"))


def test_sentinel_and_cluster_addresses_bind_to_the_service_and_the_seeds() -> None:
    sentinel = address("redis+sentinel://:pw@s1:26379,s2:26379/feed/0")
    # Another seed list naming one of the same sentinels is the same service.
    assert address("redis+sentinel://s2:26379,s3:26379/feed/0").same_as(sentinel)
    assert not address("redis+sentinel://s1:26379/other/0").same_as(sentinel)
    assert not address("redis+sentinel://s1:26379/feed/1").same_as(sentinel)
    assert not address("redis+sentinel://s9:26379/feed/0").same_as(sentinel)
    cluster = address("redis+cluster://:pw@n1:7000,n2:7001/")
    assert address("redis+cluster://n2:7001,n3:7002/").same_as(cluster)
    assert not address("redis+cluster://n4:7000/").same_as(cluster)
    assert not address("redis://n1:7000/0").same_as(cluster)


def test_an_address_keeps_no_credentials_and_survives_its_json() -> None:
    for url in (
        "redis://user:pw@127.0.0.1:6379/3", "redis+sentinel://:pw@s1,s2:26380/feed/2",
        "redis+cluster://u:pw@n1:7000,n2:7001/", "unix://:pw@/tmp/r.sock?db=4",
    ):  # fmt: skip
        parsed = address(url)
        text = json.dumps(parsed.as_json()) + str(parsed)
        assert "pw" not in text and "user" not in text, text
        assert RedisAddress.from_json(json.loads(json.dumps(parsed.as_json()))) == parsed


def test_adopt_journal_is_a_flag_a_variable_and_a_toml_key(tmp_path: Path) -> None:
    assert load_settings([]).adopt_journal is False
    assert load_settings(["--adopt-journal"]).adopt_journal is True
    assert load_settings([], environ={"PRICEHUB_ADOPT_JOURNAL": "true"}).adopt_journal is True
    config = tmp_path / "pricehub.toml"
    config.write_text("adopt_journal = true\n")
    assert load_settings(["--config", str(config)], environ={}).adopt_journal is True


def test_the_meta_keeps_the_mirror_id_and_the_peers_mirror_ids() -> None:
    """Issue 23: a data dir names its own copy and its peers' by mirror id (instance ids
    are per process), so an instance restarted during an outage knows whom to wait for;
    the meta of an older pricehub (no such keys) knows nobody."""
    meta = json.loads(json.dumps(meta_json(None, peers=True, mirror="m-a",
                                           peer_ids=frozenset({"m-c", "m-b"}))))  # fmt: skip
    assert (had_peers(meta), mirror_id(meta), peer_mirrors(meta)) == (
        True, "m-a", frozenset({"m-b", "m-c"})
    )  # fmt: skip
    alone = meta_json(None, peers=False, mirror="m-a", peer_ids=frozenset({"m-b"}))
    assert peer_mirrors(alone) == frozenset()  # peers no longer counted: none recorded
    legacy = {"peers": True, "feed_id": None}
    assert (had_peers(legacy), mirror_id(legacy), peer_mirrors(legacy)) == (
        True, None, frozenset()
    )  # fmt: skip
    assert mirror_id({"mirror_id": 7}) is None and peer_mirrors({"peer_mirrors": "m"}) == set()
