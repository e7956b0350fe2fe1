"""A Redis URL plus a data dir (issue 15): the failover's memory store is durable too.

PROTOCOL.md, "Durable in-memory storage": the data dir is "used whenever the store is in
memory (configured, or Redis unreachable at start)", and with a Redis URL a locked or
unwritable data dir only disables durability (a warning, ``checks.disk``). Real
``run_server.py`` processes, a real ``redis-server`` (``RedisProcess``, no persistence:
a SIGKILL loses everything it held) and real WebSocket resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pricehub.storage.durable import disk_status
from pricehub.storage.errors import DiskError
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.sqlite_journal import SqliteJournal
from pricehub.wire import paths
from tests.harness.datadir import owner_meta
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import ServerProcess, free_port
from tests.harness.support import PUBLISH_KEY, eventually
from tests.storage.test_durable import (
    COMMON,
    HEADERS,
    Listener,
    body,
    epoch_of,
    fill,
    get_json,
    history,
    resume,
    tmpfs,
)

# Fast failover and probing, so an outage and a recovery take a fraction of a second.
FAST = ("--redis-timeout", "0.3", "--redis-probe-interval", "0.2")


def server(redis_url: str, data_dir: Path | str, *args: str, **options: Any) -> ServerProcess:
    return ServerProcess(
        *COMMON, *FAST, *args, publish_key=PUBLISH_KEY, redis_url=redis_url,
        data_dir=data_dir, **options,
    )  # fmt: skip


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as redis:
        yield redis


def nowhere() -> str:
    """A Redis URL with nothing listening: Redis unreachable at start."""
    return f"redis://127.0.0.1:{free_port()}/0"


async def health(target: ServerProcess) -> dict[str, Any]:
    body: dict[str, Any] = await get_json(target, paths.HEALTH)
    return body


async def prices(target: ServerProcess, zone: str = "pjm") -> list[tuple[int, float]]:
    return [(entry["seq"], entry["price"]) for entry in await history(target, zone)]


def pjm(*values: float) -> list[dict[str, Any]]:
    return [{"market_zone": "pjm", "price": value} for value in values]


async def seqs_of(target: ServerProcess, *values: float) -> list[int]:
    return [entry["seq"] for entry in await target.publish(*pjm(*values))]


async def test_redis_unreachable_at_start_restart_keeps_epoch_history_and_numbering(
    data_dir: Path,
) -> None:
    with server(nowhere(), data_dir) as instance:
        assert await seqs_of(instance, 1.0, 2.0, 3.0) == [1, 2, 3]
        epoch = await epoch_of(instance)
        instance.kill()
        await instance.start_async()  # Redis still unreachable
        assert (await health(instance))["durability"]["recovered"] is True
        assert await epoch_of(instance) == epoch
        assert await seqs_of(instance, 4.0) == [4]  # no gap, no reused seq
        replayed, complete = await resume(instance, "pjm", since=1, epoch=epoch)
        assert complete["recovered"] is True
        assert [(m["seq"], m["price"]) for m in replayed] == [(2, 2.0), (3, 3.0), (4, 4.0)]


async def test_two_processes_on_one_data_dir_with_a_redis_url_both_serve(
    data_dir: Path,
) -> None:
    url = nowhere()
    with server(url, data_dir) as first, server(url, data_dir) as second:
        assert first.process is not None
        disk = (await health(first))["checks"]["disk"]
        assert disk == "ok"
        disk = (await health(second))["checks"]["disk"]
        assert disk.startswith("disabled: "), disk
        assert f"in use by another process (pid {first.process.pid}" in disk
        assert "durability_disabled" in second.log()
        assert await seqs_of(first, 1.0) == [1]
        assert await seqs_of(second, 2.0) == [1]  # each its own memory: Redis is away


async def test_a_restart_with_redis_up_keeps_the_epoch_and_redis_wins(
    data_dir: Path, redis_server: RedisProcess
) -> None:
    with server(redis_server.url, data_dir) as instance:
        assert await seqs_of(instance, 1.0, 2.0, 3.0) == [1, 2, 3]
        epoch = await epoch_of(instance)
        instance.kill()
        await instance.start_async()
        report = await health(instance)
        assert (report["checks"]["redis"], report["checks"]["disk"]) == ("ok", "ok")
        assert report["durability"]["recovered"] is True  # the mirror was journaled
        assert await epoch_of(instance) == epoch  # nothing diverged: no epoch change
        assert await seqs_of(instance, 4.0) == [4]
        assert await prices(instance) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        replayed, complete = await resume(instance, "pjm", since=2, epoch=epoch)
        assert complete["recovered"] is True
        assert [m["seq"] for m in replayed] == [3, 4]
        assert "epoch_changed=True" not in instance.log()
        assert '"epoch_changed": true' not in instance.log()


async def test_outage_prices_survive_a_sigkill_and_are_written_back_to_redis(
    data_dir: Path, redis_server: RedisProcess
) -> None:
    with server(redis_server.url, data_dir) as instance:
        assert await seqs_of(instance, 1.0, 2.0) == [1, 2]
        epoch = await epoch_of(instance)
        redis_server.kill()  # no persistence: Redis comes back empty
        # A lone instance numbers on in memory, journaled before each 202.
        assert await seqs_of(instance, 3.0) == [3]
        assert await seqs_of(instance, 4.0) == [4]
        instance.kill()
        await instance.start_async()  # Redis still away
        assert await epoch_of(instance) == epoch
        assert await prices(instance) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert await seqs_of(instance, 5.0) == [5]
        redis_server.start()

        async def recovered() -> bool:
            return bool((await health(instance))["storage_backend"] == "redis")

        await eventually(recovered)
        # Another instance without a data dir sees the written-back history in Redis.
        with server(redis_server.url, "none") as reader:
            assert await epoch_of(reader) == epoch
            assert await prices(reader) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]
            assert await seqs_of(reader, 6.0) == [6]
        replayed, complete = await resume(instance, "pjm", since=2, epoch=epoch)
        assert complete["recovered"] is True
        assert [(m["seq"], m["price"]) for m in replayed][:3] == [(3, 3.0), (4, 4.0), (5, 5.0)]


async def test_a_full_disk_during_an_outage_fails_the_append_broadcasts_nothing_no_gap(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "size=128k") as mountpoint:
        storage = FailoverStorage(nowhere(), zones=("pjm",), data_dir=mountpoint / "data")
        listener = Listener()
        await storage.start(listener)  # Redis unreachable: numbering in (durable) memory
        try:
            await storage.append("pjm", body(0))
            filler = mountpoint / "filler"
            await asyncio.to_thread(fill, filler)
            try:
                for attempt in range(200):
                    results = await asyncio.gather(
                        *(storage.append("pjm", body(attempt + i / 10)) for i in range(10)),
                        return_exceptions=True,
                    )
                    if any(isinstance(result, DiskError) for result in results):
                        break
                else:
                    raise AssertionError("the disk never filled up")
                stored = listener.prices[-1]
                assert await storage.latest("pjm") == stored  # nothing unwritten delivered
                assert disk_status(storage).check.startswith("unavailable: ")
            finally:
                filler.unlink()
            healed = await asyncio.gather(*(storage.append("pjm", body(-i)) for i in range(5)))
            assert [p.seq for p in healed] == list(range(stored.seq + 1, stored.seq + 6))
            assert [p.seq for p in listener.prices] == list(range(1, stored.seq + 6))
            assert disk_status(storage).check == "ok"
        finally:
            await storage.close()


async def publish_answer(target: ServerProcess, value: float) -> tuple[int, dict[str, Any]]:
    """POST one pjm price: the status and the JSON body, whatever the status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(target.url + paths.BROADCAST_PRICE, json=pjm(value), headers=HEADERS) as resp,
    ):
        return resp.status, await resp.json()


async def test_peers_restarted_during_one_outage_hold_instead_of_numbering_alone(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """Two instances with their own data dirs, both restarted (SIGKILL) while Redis is
    away: each starts from its own journal, same epoch, same seqs. The registry is in
    Redis, so before the fix neither knew of the other and both numbered alone: two
    202s for (pjm, epoch, 3). Now the data dir remembers the peers: both hold and
    refuse (503, nothing written), and once Redis is back (empty) the lineage goes on."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    instances = [server(redis_server.url, d, "--redis-hold", "0.5") for d in dirs]
    with instances[0] as first, instances[1] as second:
        assert await seqs_of(first, 1.0, 2.0) == [1, 2]
        epoch = await epoch_of(first)

        async def peers_seen() -> bool:  # stats read the registry (and record peers)
            reports = [await get_json(target, paths.STATS) for target in (first, second)]
            return all(len((r.get("cluster") or {}).get("instances", [])) == 2 for r in reports)

        await eventually(peers_seen, within=15)
        assert all(owner_meta(d)["peers"] for d in dirs)
        redis_server.kill()
        first.kill()
        second.kill()
        await asyncio.gather(first.start_async(), second.start_async())  # Redis away
        answers = [await publish_answer(target, 3.0) for target in (first, second)]
        epochs = [await epoch_of(target) for target in (first, second)]
        accepted = [
            (epoch_now, entry["seq"])
            for (status, body), epoch_now in zip(answers, epochs, strict=True)
            if status == 202 for entry in body["accepted"]
        ]  # fmt: skip
        assert len(set(accepted)) == len(accepted), f"two prices, one seq: {answers}"
        assert [status for status, _ in answers] == [503, 503], answers
        assert epochs == [epoch, epoch]
        for target in (first, second):
            assert await prices(target) == [(1, 1.0), (2, 2.0)]  # the journal, served
        redis_server.start()  # empty

        async def recovered() -> bool:
            reports = [await health(target) for target in (first, second)]
            return all(report["storage_backend"] == "redis" for report in reports)

        await eventually(recovered)
        assert await seqs_of(second, 3.0) == [3]
        for target in (first, second):
            assert await epoch_of(target) == epoch  # nobody numbered alone

            async def caught_up(target: ServerProcess = target) -> bool:
                return await prices(target) == [(1, 1.0), (2, 2.0), (3, 3.0)]

            await eventually(caught_up)


async def journaled(data_dir: Path) -> tuple[str, int]:
    """The epoch and pjm's last seq a stopped instance's data dir holds."""
    journal, recovered = SqliteJournal.open(data_dir, history_size=100, fsync=False)
    await journal.close()
    zone = recovered.zones.get("pjm")
    return recovered.epoch, 0 if zone is None else zone.seq


async def test_a_redis_restored_empty_is_numbered_in_only_after_every_known_peer_wrote_back(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """Issue 23 (the 30-minute soak, an ``outage_restarts`` fault): one instance restarted
    during an outage restored the Redis that came back empty from its own journal and
    numbered on at once, before its peer had written back a price acknowledged under
    the same epoch: two 202s for (pjm, epoch, 3), the divergence declared only after
    (the peer's write-back changed the epoch). Restarted, the instance no longer knew
    its peer (instance ids are per process, the registry was gone with Redis). Now the
    data dir remembers the peers' mirror ids, the restorer waits for them, and a peer
    still missing moves it to a new epoch *before* its first 202."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    instances = [server(redis_server.url, d, "--redis-hold", "5") for d in dirs]
    with instances[0] as first, instances[1] as second:
        assert await seqs_of(first, 1.0, 2.0) == [1, 2]
        epoch = await epoch_of(first)

        async def peers_recorded() -> bool:  # stats read the registry (and record peers)
            for target in (first, second):
                await get_json(target, paths.STATS)
            return all(owner_meta(d).get("peers") for d in dirs)

        await eventually(peers_recorded, within=15)
        first.kill()  # its journal ends at seq 2
        written = (await health(second))["durability"]["records_written"]
        assert await seqs_of(second, 3.0) == [3]  # (epoch, 3) acknowledged by the peer only

        async def journaled_3() -> bool:  # mirrored prices are written behind the 202
            return bool((await health(second))["durability"]["records_written"] > written)

        await eventually(journaled_3)
        redis_server.kill()  # no persistence: it comes back empty
        second.kill()
        assert await journaled(dirs[1]) == (epoch, 3)
        assert await journaled(dirs[0]) == (epoch, 2)
        await first.start_async()  # Redis away: it holds
        redis_server.start()

        async def on_redis() -> bool:
            return bool((await health(first))["storage_backend"] == "redis")

        await eventually(on_redis, within=15)
        status, answer = await publish_answer(first, 4.0)
        assert status == 202, answer
        (entry,) = answer["accepted"]
        named = (await epoch_of(first), entry["seq"])
        assert named != (epoch, 3), "(pjm, epoch, 3) answered 202 for 3.0 and for 4.0"
        await second.start_async()  # back on the new epoch: writes nothing into it

        async def both_on_redis() -> bool:
            reports = [await health(target) for target in (first, second)]
            return all(report["storage_backend"] == "redis" for report in reports)

        await eventually(both_on_redis, within=15)
        assert await epoch_of(second) == named[0]

        async def agree() -> bool:
            return await prices(second) == await prices(first)

        await eventually(agree)
        assert (named[1], 4.0) in await prices(first)
