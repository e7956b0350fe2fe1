"""The cluster end to end: real servers (``run_server.py``) on a real redis-server, real
WebSocket subscribers, seqs checked at every client.

* Redis killed (SIGKILL) and restarted under 200 subscribers and a running publisher;
* 3 instances, 100 subscribers spread over them, 1,000 updates round-robin;
* Redis Stream ingest reaching subscribers of every instance;
* ``--workers 2`` on one port, and its refusal without Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import REPO, ServerProcess, free_port, running_servers
from tests.harness.support import eventually

KEY = "cluster-test-key"
ZONES = ("pjm", "ercot")
T = TypeVar("T")
# Upper bound for waits over hundreds of sockets on a shared 2-core machine; the happy
# path takes well under a second.
SLOW = 20.0


class Subscriber:
    """One WebSocket client that keeps every message it gets."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str) -> Subscriber:
        return cls(await session.ws_connect(url, autoping=True))

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.messages.append(orjson.loads(message.data))
        self.close_code = self.ws.close_code

    def seqs(self, zone: str) -> list[int]:
        return [
            m["seq"] for m in self.messages
            if m["type"] == "price_update" and m["market_zone"] == zone
        ]  # fmt: skip

    def backends(self) -> list[str]:
        first = [m["storage_backend"] for m in self.messages[:1]]
        changes = [m["storage_backend"] for m in self.messages
                   if m["type"] == "storage_backend_changed"]
        return first + changes

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5)


def client_session() -> aiohttp.ClientSession:
    # limit=0: the default pool of 100 would hold the 101st WebSocket forever
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh redis-server per test here (not per module): these tests kill it."""
    with RedisProcess() as server:
        yield server


def servers(count: int, redis_url: str, *args: str) -> Any:
    return running_servers(count, redis_url, *args, publish_key=KEY)


async def subscribe(
    session: aiohttp.ClientSession, urls: list[str], count: int
) -> list[Subscriber]:
    """``count`` subscribers spread round-robin over ``urls``, connected concurrently."""
    targets = itertools.islice(itertools.cycle(urls), count)
    subscribers = []
    for chunk in chunks(list(targets), 50):
        subscribers += await asyncio.gather(*(Subscriber.connect(session, u) for u in chunk))
    await eventually(_all_established(subscribers), within=SLOW)
    return subscribers


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _all_established(subscribers: list[Subscriber]) -> Any:
    async def established() -> bool:
        return all(s.messages for s in subscribers)

    return established


async def post(session: aiohttp.ClientSession, server: ServerProcess, price: dict[str, Any]) -> int:
    async with session.post(
        server.url + "/api/ws/ws/broadcast/price", json=price,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:  # fmt: skip
        body = await response.json()
        assert response.status == 202, body
        return int(body["accepted"][0]["seq"])


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def test_redis_killed_and_restarted_under_200_subscribers(
    redis_server: RedisProcess,
) -> None:
    async with servers(1, redis_server.url) as (server,), client_session() as session:
        subscribers = await subscribe(session, [server.ws_url + "/api/ws/ws/market/pjm"], 200)
        assert {s.messages[0]["storage_backend"] for s in subscribers} == {"redis"}
        accepted: list[int] = []
        stop = asyncio.Event()

        async def publish() -> None:
            for index in itertools.count():
                if stop.is_set():
                    return
                accepted.append(await post(session, server, {"market_zone": "pjm", "price": index}))
                await asyncio.sleep(0.01)

        def everyone_has(seq: int) -> Any:
            async def check() -> bool:
                return all(s.seqs("pjm")[-1:] >= [seq] for s in subscribers)
            return check

        def everyone_told(backend: str) -> Any:
            async def check() -> bool:
                return all(s.backends()[-1] == backend for s in subscribers)
            return check

        publisher = asyncio.create_task(publish())
        await eventually(everyone_has(5), within=SLOW)
        redis_server.kill()
        killed = time.monotonic()
        await eventually(everyone_told("in-memory"), within=SLOW)
        # one client leaves during the outage and resumes after the recovery
        leaver = subscribers.pop()
        await leaver.close()
        left_at, epoch = leaver.seqs("pjm")[-1], leaver.messages[0]["epoch"]
        told_after = time.monotonic() - killed
        health = await get_json(session, server.url + "/api/ws/ws/health")
        assert (health["storage_backend"], health["status"]) == ("in-memory", "degraded")
        assert health["checks"]["redis"] == "unavailable"
        # still publishing, from memory
        await eventually(everyone_has(accepted[-1] + 20), within=SLOW)

        redis_server.start()
        restarted = time.monotonic()
        await eventually(everyone_told("redis"), within=SLOW)
        back_after = time.monotonic() - restarted
        resumer = await Subscriber.connect(
            session, f"{server.ws_url}/api/ws/ws/market/pjm?since={left_at}&epoch={epoch}"
        )
        await eventually(everyone_has(accepted[-1] + 20), within=SLOW)
        stop.set()
        await asyncio.wait_for(publisher, 5)
        subscribers.append(resumer)
        await eventually(everyone_has(accepted[-1]), within=SLOW)
        resumed = [m for m in resumer.messages if m["type"] == "resume_complete"]
        assert [m["recovered"] for m in resumed] == [True]
        assert resumer.seqs("pjm")[0] == left_at + 1  # the replay filled the outage
        assert resumer.messages[0]["epoch"] == epoch

        assert accepted == list(range(1, len(accepted) + 1))
        for subscriber in subscribers:
            seqs = subscriber.seqs("pjm")
            assert seqs == list(range(seqs[0], accepted[-1] + 1))  # no gap, no repeat
            assert subscriber.close_code is None  # nobody was disconnected
        assert all(s.backends() == ["redis", "in-memory", "redis"] for s in subscribers[:-1])
        stats = await get_json(session, server.url + "/api/ws/ws/stats")
        assert stats["statistics"]["storage_backend"] == "redis"
        assert stats["total_connections"] == 200
        # 1 s to fail over and 5 s to come back, plus the fan-out to 200 sockets
        assert told_after < 2.0
        assert back_after < 6.0
        print(f"failover announced after {told_after:.2f} s, recovery after {back_after:.2f} s, "
              f"{len(accepted)} updates x 200 subscribers")
        await asyncio.gather(*(s.close() for s in subscribers))


async def test_three_instances_deliver_every_seq_once_in_order(
    redis_server: RedisProcess,
) -> None:
    updates = 1000
    async with servers(3, redis_server.url) as instances, client_session() as session:
        urls = [s.ws_url + "/api/ws/ws/prices?zones=pjm,ercot" for s in instances]
        subscribers = await subscribe(session, urls, 100)
        started = time.monotonic()
        targets = itertools.cycle(instances)
        prices = [
            (next(targets), {"market_zone": ZONES[i % 2], "price": float(i)})
            for i in range(updates)
        ]
        for chunk in chunks(prices, 10):
            await asyncio.gather(*(post(session, server, price) for server, price in chunk))
        per_zone = updates // len(ZONES)

        async def all_delivered() -> bool:
            return all(s.seqs(zone)[-1:] == [per_zone] for s in subscribers for zone in ZONES)

        await eventually(all_delivered, within=SLOW)
        elapsed = time.monotonic() - started
        for subscriber in subscribers:
            for zone in ZONES:
                assert subscriber.seqs(zone) == list(range(1, per_zone + 1))
        stats = await get_json(session, instances[0].url + "/api/ws/ws/stats")

        async def registry_complete() -> bool:
            cluster = (await get_json(session, instances[0].url + "/api/ws/ws/stats"))["cluster"]
            return bool(len(cluster["instances"]) == 3 and cluster["total_connections"] == 100)

        await eventually(registry_complete, within=SLOW)
        assert stats["statistics"]["storage_backend"] == "redis"
        print(f"{updates} updates x 100 subscribers over 3 instances in {elapsed:.2f} s")
        await asyncio.gather(*(s.close() for s in subscribers))


async def test_redis_ingest_reaches_every_instance(redis_server: RedisProcess) -> None:
    async with servers(2, redis_server.url) as instances, client_session() as session:
        urls = [s.ws_url + "/api/ws/ws/market/pjm" for s in instances]
        subscribers = await subscribe(session, urls, 4)
        client = aioredis.Redis.from_url(redis_server.url)
        for index in range(50):
            await client.xadd("pricehub:ingest", {"market_zone": "pjm", "price": str(index)})
        await client.xadd("pricehub:ingest", {"market_zone": "pjm", "price": "NaN"})
        await client.xadd("pricehub:ingest", {"market_zone": "pjm", "price": "50"})

        async def all_delivered() -> bool:
            return all(s.seqs("pjm")[-1:] == [51] for s in subscribers)

        await eventually(all_delivered, within=SLOW)
        for subscriber in subscribers:
            assert subscriber.seqs("pjm") == list(range(1, 52))
            prices = [m["price"] for m in subscriber.messages if m["type"] == "price_update"]
            assert prices == [float(i) for i in range(51)]  # stream order
        assert (await client.xpending("pricehub:ingest", "pricehub"))["pending"] == 0
        await client.aclose()
        await asyncio.gather(*(s.close() for s in subscribers))


async def test_workers_share_one_port_as_a_cluster(redis_server: RedisProcess) -> None:
    async with servers(1, redis_server.url, "--workers", "2") as (server,):
        async with client_session() as session:
            async def two_instances() -> bool:
                stats = await get_json(session, server.url + "/api/ws/ws/stats")
                return len(stats.get("cluster", {}).get("instances", [])) == 2

            await eventually(two_instances, within=SLOW)
        # fresh connections land on both workers; each serves the same feed
        answered = set()
        subscribers = []
        for _ in range(12):
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            answered.add((await get_json(session, server.url + "/api/ws/ws/stats"))["instance_id"])
            subscribers.append((session, await Subscriber.connect(
                session, server.ws_url + "/api/ws/ws/market/pjm"
            )))
        assert len(answered) == 2
        async with client_session() as session:
            for index in range(5):
                await post(session, server, {"market_zone": "pjm", "price": index})

        async def delivered() -> bool:
            return all(s.seqs("pjm")[-1:] == [5] for _, s in subscribers)

        await eventually(delivered, within=SLOW)
        for session, subscriber in subscribers:
            assert subscriber.seqs("pjm") == [1, 2, 3, 4, 5]
            await subscriber.close()
            await session.close()
    assert server.process is not None
    assert server.process.returncode == 0


async def test_workers_refuse_without_redis() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run_server.py", "--workers", "2", "--port", str(free_port()),
        "--redis-url", f"redis://127.0.0.1:{free_port()}/0", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"needs a reachable Redis" in stderr


async def post_status(
    session: aiohttp.ClientSession, server: ServerProcess, price: dict[str, Any]
) -> tuple[int, Any, str | None]:
    async with session.post(
        server.url + "/api/ws/ws/broadcast/price", json=price,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:  # fmt: skip
        return response.status, await response.json(), response.headers.get("Retry-After")


async def test_redis_outages_with_two_instances_never_number_alone(
    redis_server: RedisProcess,
) -> None:
    """Issue 13 end to end: a SIGSTOP shorter than --redis-hold costs only latency (every
    202 delivered once, in order, on both instances; no close, no epoch change); a
    SIGKILL longer than it answers 503 + Retry-After, and after it the lineage goes on."""
    hold = 2.0
    async with servers(2, redis_server.url, "--redis-hold", str(hold)) as instances, \
            client_session() as session:  # fmt: skip
        urls = [s.ws_url + "/api/ws/ws/market/pjm" for s in instances]
        subscribers = await subscribe(session, urls, 20)
        epoch = subscribers[0].messages[0]["epoch"]

        async def both_see_a_peer() -> bool:  # /stats reads the registry (who else is up)
            stats = [await get_json(session, s.url + "/api/ws/ws/stats") for s in instances]
            # At least 2: an instance an earlier test of this module SIGKILLed on the same
            # redis-server stays registered until its entry expires (15 s).
            return all(len(s.get("cluster", {}).get("instances", [])) >= 2 for s in stats)

        await eventually(both_see_a_peer, within=SLOW)
        accepted: dict[int, float] = {}
        answers: list[int] = []
        stop = asyncio.Event()

        async def publish() -> None:
            for index in itertools.count():
                if stop.is_set():
                    return
                status, body, _ = await post_status(
                    session, instances[index % 2], {"market_zone": "pjm", "price": index}
                )
                answers.append(status)
                if status == 202:
                    seq = body["accepted"][0]["seq"]
                    assert seq not in accepted, "one seq named two prices"
                    accepted[seq] = float(index)
                await asyncio.sleep(0.01)

        publisher = asyncio.create_task(publish())
        await eventually(lambda: len(accepted) >= 10, within=SLOW)
        redis_server.pause()
        paused = time.monotonic()
        await asyncio.sleep(hold / 2)
        redis_server.resume()
        target = len(accepted) + 10
        await eventually(lambda: len(accepted) >= target, within=SLOW)
        stop.set()
        await asyncio.wait_for(publisher, SLOW)
        assert set(answers) == {202}, "a short pause is no refusal"
        short_outage = time.monotonic() - paused

        redis_server.kill()
        status, body, retry_after = await post_status(
            session, instances[0], {"market_zone": "pjm", "price": -1.0}
        )
        assert status == 503 and body["error"] == "storage_unavailable", body
        assert retry_after is not None and int(retry_after) >= 1
        redis_server.start()
        for index, server in enumerate(instances):
            async def accepted_again(
                server: ServerProcess = server, price: float = 5000.0 + index
            ) -> bool:
                status, body, _ = await post_status(
                    session, server, {"market_zone": "pjm", "price": price}
                )
                if status == 202:
                    seq = body["accepted"][0]["seq"]
                    assert seq not in accepted, "one seq named two prices"
                    accepted[seq] = price
                return status == 202

            await eventually(accepted_again, within=SLOW)

        last = max(accepted)
        assert sorted(accepted) == list(range(1, last + 1))

        async def delivered() -> bool:
            return all(s.seqs("pjm")[-1:] == [last] for s in subscribers)

        await eventually(delivered, within=SLOW)
        for subscriber in subscribers:
            assert subscriber.close_code is None  # nobody was disconnected
            updates = [m for m in subscriber.messages if m["type"] == "price_update"]
            seqs = [m["seq"] for m in updates]
            assert seqs == list(range(seqs[0], last + 1))  # once each, in order
            assert all(accepted[m["seq"]] == m["price"] for m in updates)  # the same price
            assert all(m.get("epoch", epoch) == epoch for m in subscriber.messages)
        for server in instances:
            health = await get_json(session, server.url + "/api/ws/ws/health")
            assert health["storage_backend"] == "redis"
        print(f"pause {short_outage:.2f} s and a kill: {len(accepted)} prices, no collision, "
              f"no close, epoch {epoch} kept")
        await asyncio.gather(*(s.close() for s in subscribers))
