"""What only the Redis backend has: key layout, several instances on one Redis, URLs
(unix socket, Sentinel), losing the subscriber loudly or silently, gap filling, one zone's
damaged keys."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from pricehub.server.publisher import Publisher
from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import BatchInterrupted, StorageUnavailable, ZoneRefused
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import (
    MAX_IN_FLIGHT,
    EpochChanged,
    RedisStorage,
    WriteInDoubt,
    next_stream_id,
)
from pricehub.storage.redis.single import SingleNode
from pricehub.wire.messages import PriceBody, accepted_at_of, with_seq
from tests.harness.redisproc import WAIT, RecordingListener, RedisProcess, TcpProxy
from tests.harness.serverproc import free_port
from tests.harness.support import PUBLISH_KEY, MakeClient, eventually, missing_tool
from tests.storage.test_failover import EventLog

FAST = {"timeout": 0.25, "probe_interval": 0.2}


def body(zone: str, price: float) -> bytes:
    return PriceBody(zone, price, None, "2026-11-27T15:00:00.000Z").encode()


class LostRecorder:
    def __init__(self) -> None:
        self.causes: list[BaseException] = []

    def __call__(self, storage: RedisStorage, cause: BaseException) -> None:
        self.causes.append(cause)

    async def happened(self) -> bool:
        return bool(self.causes)


async def test_key_layout(redis_server: RedisProcess, raw: aioredis.Redis, prefix: str) -> None:
    storage = RedisStorage(redis_server.url, key_prefix=prefix, history_size=3)
    await storage.start(RecordingListener())
    try:
        await storage.append("pjm", body("pjm", 1.0))
        await storage.append("pjm", body("pjm", 2.0))
        await storage.register_instance("i1", b"{}", ttl=10)
        keys = sorted([key.decode() async for key in raw.scan_iter(match=f"{prefix}*")])
        assert keys == [
            f"{prefix}epoch", f"{prefix}history:pjm", f"{prefix}instance:i1",
            f"{prefix}instances", f"{prefix}latest:pjm", f"{prefix}seq:pjm",
        ]  # fmt: skip
        assert await raw.get(f"{prefix}seq:pjm") == b"2"
        # the Lua script splices the seq (and Redis's time) exactly like messages.with_seq
        history = await raw.zrange(f"{prefix}history:pjm", 0, -1, withscores=True)
        stamps = [str(accepted_at_of(payload)).encode() for payload, _ in history]
        assert await raw.get(f"{prefix}latest:pjm") == with_seq(body("pjm", 2.0), 2, stamps[1])
        assert history == [
            (with_seq(body("pjm", 1.0), 1, stamps[0]), 1.0),
            (with_seq(body("pjm", 2.0), 2, stamps[1]), 2.0),
        ]  # fmt: skip
        assert await raw.get(f"{prefix}epoch") == storage.epoch.encode()
        assert 0 < await raw.pttl(f"{prefix}instance:i1") <= 10_000
    finally:
        await storage.close()


async def test_instances_share_seqs_epoch_and_order(
    redis_server: RedisProcess, prefix: str
) -> None:
    storages = [RedisStorage(redis_server.url, key_prefix=prefix) for _ in range(3)]
    listeners = [RecordingListener() for _ in storages]
    for storage, listener in zip(storages, listeners, strict=True):
        await storage.start(listener)
    try:
        assert len({storage.epoch for storage in storages}) == 1
        await asyncio.gather(
            *(storages[i % 3].append("pjm", body("pjm", float(i))) for i in range(150))
        )
        for listener in listeners:
            assert await listener.wait_for("pjm", 150) == list(range(1, 151))
        assert listeners[0].prices == listeners[1].prices == listeners[2].prices
    finally:
        for storage in storages:
            await storage.close()


async def assert_round_trip(url: str, prefix: str) -> None:
    """A price appended through ``url`` comes back through its subscriber as seq 1."""
    storage = RedisStorage(url, key_prefix=prefix)
    listener = RecordingListener()
    await storage.start(listener)
    try:
        await storage.append("pjm", body("pjm", 1.0))
        assert await listener.wait_for("pjm", 1) == [1]
    finally:
        await storage.close()


async def test_unix_socket_url(redis_server: RedisProcess, prefix: str) -> None:
    await assert_round_trip(redis_server.unix_url, prefix)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server speaking TLS only, with a self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        missing_tool("openssl CLI not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with RedisProcess(tls=(cert, key)) as server:
        yield server


async def test_rediss_url(tls_redis: RedisProcess, prefix: str) -> None:
    await assert_round_trip(tls_redis.url, prefix)
    plain = RedisStorage(f"redis://127.0.0.1:{tls_redis.port}/0", key_prefix=prefix)
    with pytest.raises(StorageUnavailable):  # the port really speaks TLS only
        await plain.start(RecordingListener())


@pytest.fixture
def sentinel(redis_server: RedisProcess, tmp_path: Path) -> Iterator[int]:
    """A real redis-sentinel watching ``redis_server`` as ``mymaster``."""
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    )
    process = subprocess.Popen(
        [redis_server.binary, str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        process.kill()
        process.wait()


async def test_sentinel_url(sentinel: int, prefix: str) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0"
    storage = RedisStorage(url, key_prefix=prefix)
    listener = RecordingListener()
    for _ in range(100):  # the sentinel needs a moment to listen
        try:
            await storage.start(listener)
            break
        except StorageUnavailable:
            await asyncio.sleep(0.05)
    try:
        await storage.append("pjm", body("pjm", 1.0))
        assert await listener.wait_for("pjm", 1) == [1]
    finally:
        await storage.close()


async def test_flushed_redis_refuses_writes_under_old_epoch(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    lost = LostRecorder()
    storage = RedisStorage(redis_server.url, key_prefix=prefix, on_lost=lost)
    await storage.start(RecordingListener())
    try:
        await storage.append("pjm", body("pjm", 1.0))
        await raw.delete(f"{prefix}epoch", f"{prefix}seq:pjm")  # Redis lost its data
        with pytest.raises(EpochChanged):
            await storage.append("pjm", body("pjm", 2.0))
        assert await raw.get(f"{prefix}seq:pjm") is None  # nothing numbered from 1 again
        # Refused, not lost: the connection is fine, its owner reconciles (issue 13's
        # cascade was a refusal like this one switching the instance to memory).
        assert not lost.causes
    finally:
        await storage.close()


async def test_killed_redis_is_noticed_at_once(prefix: str) -> None:
    """EOF, refused connections: noticed without waiting for any timeout (so a roomy one
    here: a fresh redis-server's first reply can take longer than FAST's on a busy box)."""
    with RedisProcess() as server:
        lost = LostRecorder()
        storage = RedisStorage(
            server.url, key_prefix=prefix, on_lost=lost, timeout=2.0, probe_interval=0.2
        )
        await storage.start(RecordingListener())
        try:
            server.kill()
            await eventually(lost.happened, within=1.0)  # the subscriber sees EOF
            with pytest.raises(StorageUnavailable):
                await storage.append("pjm", body("pjm", 1.0))
            with pytest.raises(StorageUnavailable):
                await storage.check()
        finally:
            await storage.close()


async def test_silent_subscriber_is_detected(redis_server: RedisProcess, prefix: str) -> None:
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    lost = LostRecorder()
    storage = RedisStorage(proxy.url, key_prefix=prefix, on_lost=lost, **FAST)
    listener = RecordingListener()
    await storage.start(listener)
    try:
        await storage.append("pjm", body("pjm", 1.0))
        await listener.wait_for("pjm", 1)
        proxy.freeze(subscribers_only=True)  # open, healthy-looking, delivering nothing
        await storage.append("pjm", body("pjm", 2.0))  # commands still work
        await eventually(lost.happened, within=WAIT)
        assert "silent" in str(lost.causes[0])
        assert listener.seqs("pjm") == [1]
    finally:
        await storage.close()
        await proxy.close()


async def test_subscriber_fills_gaps_from_history(redis_server: RedisProcess, prefix: str) -> None:
    writer = RedisStorage(redis_server.url, key_prefix=prefix)
    await writer.start(RecordingListener())
    late = RedisStorage(redis_server.url, key_prefix=prefix)
    listener = RecordingListener()
    try:
        await late.connect()
        await late.claim_epoch("unused")
        for index in range(3):
            await writer.append("pjm", body("pjm", float(index)))
        # "delivered up to 0" while Redis is at 3: the next price reveals the hole
        late.deliver_to(listener, {"pjm": 0})
        await writer.append("pjm", body("pjm", 3.0))
        assert await listener.wait_for("pjm", 4) == [1, 2, 3, 4]
        assert late.counters().gaps == 0
    finally:
        await late.close()
        await writer.close()


async def test_feeds_on_two_databases_never_mix(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """Pub/Sub ignores the database number: channels carry it, and a message of another
    lineage on our channel is dropped, counted and logged, never delivered."""
    url_0, url_1 = redis_server.url, redis_server.url[: -len("/0")] + "/1"
    logs = [EventLog(), EventLog()]
    feeds = [
        FailoverStorage(url, zones=("pjm",), key_prefix=prefix, log=log, **FAST)
        for url, log in zip((url_0, url_1), logs, strict=True)
    ]
    listeners = [RecordingListener(), RecordingListener()]
    for feed, listener in zip(feeds, listeners, strict=True):
        await feed.start(listener)
    try:
        assert feeds[0].epoch != feeds[1].epoch
        for index in range(5):
            await feeds[0].append("pjm", body("pjm", float(index)))
            await feeds[1].append("pjm", body("pjm", 100.0 + index))
        for listener, base in zip(listeners, (0.0, 100.0), strict=True):
            await listener.wait_for("pjm", 5)
            prices = [orjson.loads(p.payload)["price"] for p in listener.prices]
            assert prices == [base + index for index in range(5)]  # its own feed only
        # A stray publisher on our channel, in the old and in the new message shape.
        channel = f"{prefix}db0:prices"
        stray = with_seq(body("pjm", 666.0), 6, b"2026-11-27T15:00:00.000000Z")
        await raw.publish(channel, b"pjm " + stray)
        await raw.publish(channel, f"{feeds[1].epoch} pjm ".encode() + stray)
        await raw.publish(channel, b"garbage")

        async def counted() -> bool:
            return feeds[0].counters().foreign_messages == 3

        await eventually(counted)
        await feeds[0].append("pjm", body("pjm", 5.0))
        assert await listeners[0].wait_for("pjm", 6) == [1, 2, 3, 4, 5, 6]
        assert orjson.loads(listeners[0].prices[-1].payload)["price"] == 5.0
        assert logs[0].events.count("storage_foreign_message") == 3
        assert feeds[0].counters().gaps == 0 and feeds[1].counters().foreign_messages == 0
        assert feeds[0].backend == "redis"  # a stray message is no reason to fail over
    finally:
        for feed in feeds:
            await feed.close()


def _in_flight(storage: RedisStorage) -> int:
    """Pipelines sent on the single-node writer whose replies are unread."""
    topology = storage.topology
    assert isinstance(topology, SingleNode)
    return topology.pipelines_in_flight


async def test_appends_go_out_ahead_of_replies_and_a_lost_link_splits_sent_from_unsent() -> None:
    """Up to MAX_IN_FLIGHT pipelines are sent without waiting for replies. When the link
    fails, every price that was sent is in doubt (it may have been stored: the owner
    looks it up) and every price that was not is refused as not written."""
    with RedisProcess() as server:
        storage = RedisStorage(server.url, key_prefix="inflight:", timeout=5.0)
        await storage.start(RecordingListener())
        try:
            server.pause()  # SIGSTOP: its socket takes the bytes, nothing answers
            body = PriceBody("pjm", 1.0, None, "2026-11-27T15:00:00.000Z").encode()
            calls: list[asyncio.Task[list[StoredPrice | BaseException]]] = []
            for number in range(MAX_IN_FLIGHT + 2):  # one pipeline per call
                calls.append(asyncio.create_task(storage.append_outcomes([("pjm", body)] * 3)))
                sent = min(number + 1, MAX_IN_FLIGHT)
                await eventually(lambda sent=sent: _in_flight(storage) == sent)
            server.kill()
            outcomes = [await call for call in calls]
        finally:
            await storage.close()
    kinds = [{type(outcome) for outcome in outcome_list} for outcome_list in outcomes]
    assert kinds == [{WriteInDoubt}] * MAX_IN_FLIGHT + [{StorageUnavailable}] * 2


async def test_closing_with_appends_sent_leaves_them_in_doubt_not_unwritten() -> None:
    """Issue 23: ``close`` failed the appends it found sent, their replies not read yet,
    with a plain ``StorageUnavailable``, which says "not written": retried as such, a
    price Redis had stored became a duplicate under a new seq. Sent is in doubt (the
    owner looks it up); only what was never sent is unwritten."""
    with RedisProcess() as server:
        storage = RedisStorage(server.url, key_prefix="closing:", timeout=5.0)
        await storage.start(RecordingListener())
        server.pause()  # SIGSTOP: its socket takes the bytes, nothing answers
        try:
            body = PriceBody("pjm", 1.0, None, "2026-11-27T15:00:00.000Z").encode()
            calls: list[asyncio.Task[list[StoredPrice | BaseException]]] = []
            for number in range(MAX_IN_FLIGHT + 1):  # one pipeline per call
                calls.append(asyncio.create_task(storage.append_outcomes([("pjm", body)])))

                def sent(count: int = min(number + 1, MAX_IN_FLIGHT)) -> bool:
                    return _in_flight(storage) == count

                await eventually(sent)
            await storage.close()
            outcomes = [await call for call in calls]
        finally:
            server.resume()
            await storage.close()
    kinds = [{type(outcome) for outcome in outcome_list} for outcome_list in outcomes]
    assert kinds == [{WriteInDoubt}] * MAX_IN_FLIGHT + [{StorageUnavailable}], kinds


@pytest.mark.parametrize(
    ("entry_id", "after"),
    [("5-1", "5-2"), ("5-18446744073709551615", "6-0"), ("1764000000000-0", "1764000000000-1")],
)
async def test_next_stream_id_trims_exactly_up_to_the_entry(
    raw: aioredis.Redis, prefix: str, entry_id: str, after: str
) -> None:
    """The batch script deletes its entries with ``XTRIM MINID next_stream_id(last)``:
    the entry goes, the one right after it (even past a 64-bit seq) stays."""
    stream = f"{prefix}trim"
    assert next_stream_id(entry_id) == after
    await raw.xadd(stream, {"n": "1"}, id=entry_id)
    await raw.xadd(stream, {"n": "2"}, id=after)
    await raw.xtrim(stream, minid=next_stream_id(entry_id), approximate=False)
    assert [i.decode() for i, _ in await raw.xrange(stream)] == [after]


DAMAGED = ("ercot", "caiso", "nyiso")  # four zones, three of them damaged by hand


async def damage(raw: aioredis.Redis, prefix: str) -> None:
    """What another program (or an operator) might leave: a seq that is no integer, a
    history that is no sorted set, a seq below 1."""
    await raw.set(f"{prefix}seq:ercot", "not-a-number")
    await raw.rpush(f"{prefix}history:caiso", "not a sorted set")
    await raw.set(f"{prefix}seq:nyiso", "-3")


async def assert_left_as_found(raw: aioredis.Redis, prefix: str) -> None:
    assert await raw.get(f"{prefix}seq:ercot") == b"not-a-number"
    assert await raw.lrange(f"{prefix}history:caiso", 0, -1) == [b"not a sorted set"]
    assert await raw.get(f"{prefix}seq:caiso") is None  # its refused INCR taken back
    assert await raw.get(f"{prefix}seq:nyiso") == b"-3"
    for zone in DAMAGED:
        assert await raw.get(f"{prefix}latest:{zone}") is None


def price(zone: str, value: float) -> PriceBody:
    return PriceBody(zone, value, None, "2026-11-27T15:00:00.000Z")


async def test_a_zone_whose_keys_are_damaged_fails_alone_and_redis_keeps_serving(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """``SET pricehub:seq:ercot not-a-number`` (and two more kinds of damage): that zone's
    prices are refused (``ZoneRefused``, logged, counted), nothing of them written; the
    other prices of the batch are numbered on Redis, in order; no failover. One price
    alone (the one-price script) is refused the same way. Repaired, the zone publishes."""
    zones = ("pjm", *DAMAGED)
    storage = FailoverStorage(redis_server.url, zones=zones, key_prefix=prefix, **FAST)
    listener = RecordingListener()
    await storage.start(listener)
    publisher = Publisher(storage)
    try:
        await damage(raw, prefix)
        batch = [
            price(zone, float(i))
            for i, zone in enumerate(["pjm", "ercot", "pjm", "caiso", "nyiso", "pjm"])
        ]
        with capture_logs() as logs, pytest.raises(BatchInterrupted) as refused:
            await publisher.publish_many(batch, source="http")
        assert [(p.zone, p.seq) for p in refused.value.accepted] == [("pjm", s) for s in (1, 2, 3)]
        assert isinstance(refused.value.cause, ZoneRefused)
        assert refused.value.cause.zone == "ercot"
        assert "not an integer" in str(refused.value)
        assert [(e["zone"], e["event"]) for e in logs] == [
            (zone, "storage_zone_damaged") for zone in DAMAGED
        ]
        for zone in DAMAGED:
            with pytest.raises(BatchInterrupted) as alone:
                await publisher.publish_many([price(zone, 9.0)], source="http")
            assert alone.value.accepted == []
            assert isinstance(alone.value.cause, ZoneRefused) and alone.value.cause.zone == zone
        assert await listener.wait_for("pjm", 3) == [1, 2, 3]
        assert await storage.since("ercot", 5) is None  # asked of Redis: cannot replay
        counters = storage.counters()
        assert (storage.backend, counters.failovers, counters.redis_errors) == ("redis", 0, 6)
        assert publisher.accepted == {("pjm", "http"): 3}
        await assert_left_as_found(raw, prefix)

        await raw.delete(f"{prefix}seq:ercot")  # repaired
        (stored,) = await publisher.publish_many([price("ercot", 1.0)], source="http")
        assert stored.seq == 1
        assert await listener.wait_for("ercot", 1) == [1]
        assert storage.backend == "redis"
    finally:
        await storage.close()


async def test_damaged_zone_keys_never_stop_a_start_or_a_recovery(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """A damaged zone found loading every zone (start) or writing back what memory
    numbered during an outage (recovery) is left out, logged: the start does not crash
    and the recovery does not fail for ever; the other zones are loaded and written back."""
    zones = ("pjm", *DAMAGED)
    await raw.set(f"{prefix}seq:pjm", "1")
    await raw.zadd(
        f"{prefix}history:pjm", {with_seq(body("pjm", 0.5), 1, b"2026-11-27T15:00:00.000000Z"): 1}
    )
    await damage(raw, prefix)
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    storage = FailoverStorage(proxy.url, zones=zones, key_prefix=prefix, hold=0, **FAST)
    listener = RecordingListener()
    try:
        with capture_logs() as logs:
            await storage.start(listener)
            assert storage.backend == "redis"
            assert [p.seq for p in await storage.history("pjm", limit=10)] == [1]
            proxy.block()  # an outage: this lone instance numbers in memory
            await listener.wait_backend("in-memory")
            assert (await storage.append("pjm", body("pjm", 2.0))).seq == 2
            assert (await storage.append("ercot", body("ercot", 1.0))).seq == 1
            proxy.unblock()
            await listener.wait_backend("redis")
        assert (await storage.append("pjm", body("pjm", 3.0))).seq == 3  # written back
        assert int(await raw.get(f"{prefix}seq:pjm")) == 3
        await assert_left_as_found(raw, prefix)
        damaged = [
            (e["zone"], e["reason"].rpartition("; ")[2])
            for e in logs
            if e["event"] == "storage_zone_damaged"
        ]
        assert ("ercot", "not loaded") in damaged and ("nyiso", "not loaded") in damaged
        assert ("ercot", "not written back") in damaged
    finally:
        await storage.close()
        await proxy.close()


async def test_a_publish_to_a_damaged_zone_is_a_503_naming_it_the_others_accepted(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str, make_client: MakeClient
) -> None:
    """Through the HTTP endpoint: the batch answers 503 ``storage_unavailable`` with the
    zone named in the message and the prices that were numbered in ``accepted``; the
    instance stays on Redis (health ``healthy``) and publishes the other zones."""
    client = await make_client(
        redis_url=redis_server.url, key_prefix=prefix, redis_timeout=0.3,
        redis_probe_interval=0.2,
    )  # fmt: skip
    await raw.set(f"{prefix}seq:ercot", "not-a-number")
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}"}
    prices = [{"market_zone": zone, "price": 1.0} for zone in ("pjm", "ercot", "caiso")]
    response = await client.post("/api/ws/ws/broadcast/price", json=prices, headers=headers)
    assert response.status == 503
    answer = await response.json()
    assert answer["error"] == "storage_unavailable"
    assert answer["message"].startswith("zone ercot: ")
    assert answer["accepted"] == [
        {"market_zone": "pjm", "seq": 1}, {"market_zone": "caiso", "seq": 1},
    ]  # fmt: skip
    health = await (await client.get("/api/ws/ws/health")).json()
    assert health["status"] == "healthy" and health["storage_backend"] == "redis"
    response = await client.post(
        "/api/ws/ws/broadcast/price", json={"market_zone": "pjm", "price": 2.0}, headers=headers
    )
    assert response.status == 202
    assert (await response.json())["accepted"] == [{"market_zone": "pjm", "seq": 2}]
