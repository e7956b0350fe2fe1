"""``snapshot`` (PROTOCOL.md, "One consistent picture of many zones"): the wire's builders,
parsers and decoders, ``GET /api/ws/ws/snapshot`` through real servers (memory, durable,
Redis), and the Redis read itself: one ``MGET`` for any number of zones, counted by the
test's own redis-server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import structlog

from pricehub.storage import StorageConfig, StoredPrice, create_storage
from pricehub.storage.base import Snapshot
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import EpochChanged, KeyLayout, RedisStorage
from pricehub.storage.redis.reads import NO_EPOCH, snapshot
from pricehub.wire import decode, messages, paths
from pricehub.wire.codes import ErrorCode, HttpErrorCode, MessageType
from pricehub.wire.errors import ProtocolError
from tests.harness.redisproc import RecordingListener, RedisProcess
from tests.harness.serverproc import ServerProcess
from tests.harness.support import PUBLISH_KEY, MakeClient, eventually, publish
from tests.server.test_security import SECRET, token

ZONES = ("pjm", "caiso", "ercot")
NOW = "2026-11-27T15:00:00.000Z"


def stored(zone: str, seq: int, price: float) -> StoredPrice:
    body = messages.PriceBody(zone, price, None, NOW).encode()
    return StoredPrice(zone, seq, messages.with_seq(body, seq, b"2026-11-27T15:00:00.123456Z"))


# --- wire -------------------------------------------------------------------------------


def test_snapshot_reply_has_prices_nulls_and_the_cursor() -> None:
    taken = Snapshot("e1", {"pjm": stored("pjm", 12, 41.5), "ercot": None})
    reply = orjson.loads(messages.snapshot_reply(taken, now=NOW))
    assert reply == {
        "type": "snapshot", "epoch": "e1",
        "prices": {"pjm": orjson.loads(taken.prices["pjm"].payload), "ercot": None},  # type: ignore[union-attr]
        "cursor": {"pjm": 12, "ercot": 0}, "timestamp": NOW,
    }  # fmt: skip
    decoded = decode.decode_server_message(messages.snapshot_reply(taken, now=NOW))
    assert isinstance(decoded, decode.SnapshotMessage)
    assert (decoded.epoch, dict(decoded.cursor), decoded.prices["ercot"]) == (
        "e1", {"pjm": 12, "ercot": 0}, None
    )
    pjm = decoded.prices["pjm"]
    assert pjm is not None and (pjm.zone, pjm.seq, pjm.price) == ("pjm", 12, 41.5)
    assert pjm.accepted_at == "2026-11-27T15:00:00.123456Z"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "snapshot", "epoch": "e", "prices": [], "cursor": {}},
        {"type": "snapshot", "epoch": "e", "prices": {}, "cursor": {"pjm": -1}},
        {"type": "snapshot", "epoch": "e", "prices": {}},
        {"type": "snapshot", "prices": {}, "cursor": {}},
        {"type": "snapshot", "epoch": "e", "prices": {"pjm": 3}, "cursor": {}},
    ],
)
def test_a_malformed_snapshot_is_refused_by_the_decoder(obj: dict[str, Any]) -> None:
    with pytest.raises(decode.MalformedMessage):
        decode.decode_server_object(obj)


def test_snapshot_request_round_trips_and_defaults_to_the_sockets_zones() -> None:
    for request in (messages.SnapshotRequest(), messages.SnapshotRequest(("pjm", "ercot"))):
        assert messages.decode_client_message(messages.encode_client_message(request)) == request
    assert MessageType.SNAPSHOT == "snapshot"
    check = messages.parse_snapshot_request
    assert check(messages.SnapshotRequest(), zones=ZONES, default_zones=("ercot",)) == ("ercot",)
    asked = messages.decode_client_message(b'{"type":"snapshot","zones":["pjm","pjm","caiso"]}')
    assert isinstance(asked, messages.SnapshotRequest)
    assert check(asked, zones=ZONES, default_zones=()) == ("pjm", "caiso")
    for zones, hint in ((["nope"], "nope"), (["PJM"], "lower case")):
        with pytest.raises(ProtocolError) as refused:
            check(messages.SnapshotRequest(tuple(zones)), zones=ZONES, default_zones=())
        assert refused.value.code == ErrorCode.UNKNOWN_ZONE and hint in refused.value.message
    with pytest.raises(ProtocolError) as bad:
        messages.decode_client_message(b'{"type":"snapshot","zones":"pjm"}')
    assert bad.value.code == ErrorCode.INVALID_MESSAGE


# --- HTTP, in memory --------------------------------------------------------------------


async def test_http_snapshot_in_memory(make_client: MakeClient) -> None:
    client = await make_client(zones=ZONES)
    await publish(client, {"market_zone": "pjm", "price": 1}, {"market_zone": "pjm", "price": 2},
                  {"market_zone": "ercot", "price": -3.5})  # fmt: skip
    response = await client.get(paths.SNAPSHOT, params={"zones": "ercot,caiso,pjm"})
    assert response.status == 200
    answer = await response.json()
    assert (answer["type"], answer["cursor"]) == ("snapshot", {"ercot": 1, "caiso": 0, "pjm": 2})
    assert list(answer["prices"]) == ["ercot", "caiso", "pjm"]
    assert answer["prices"]["caiso"] is None
    history = await (await client.get(paths.history("pjm"))).json()
    assert answer["prices"]["pjm"] == history["data"][-1]  # the latest, as stored
    async with client.ws_connect(paths.ws_market("pjm")) as ws:
        hello = await ws.receive_json()
    assert answer["epoch"] == hello["epoch"]
    every = await (await client.get(paths.SNAPSHOT)).json()  # no zones: every zone
    assert list(every["prices"]) == list(ZONES)


@pytest.mark.parametrize(
    ("zones", "code"),
    [("pjm,nope", HttpErrorCode.UNKNOWN_ZONE), ("PJM", HttpErrorCode.UNKNOWN_ZONE),
     ("", HttpErrorCode.INVALID_ZONE), (" , ", HttpErrorCode.INVALID_ZONE)],
)  # fmt: skip
async def test_http_snapshot_refuses_unknown_zones(
    make_client: MakeClient, zones: str, code: HttpErrorCode
) -> None:
    client = await make_client(zones=ZONES)
    response = await client.get(paths.SNAPSHOT, params={"zones": zones})
    assert response.status == 422
    assert (await response.json())["error"] == code


async def test_http_snapshot_reads_at_most_max_snapshot_zones(make_client: MakeClient) -> None:
    """Nothing unbounded: a snapshot reads at most max(1000, ``--max-zones-per-socket``)
    distinct zones (on one Redis node 1,000 are one MGET, ~4 ms). Named or, without
    ``zones``, every configured zone: one more is 422 ``too_many_zones`` naming the bound."""
    zones = tuple(f"z{index}" for index in range(1001))
    client = await make_client(zones=zones)  # --max-zones-per-socket 64: the bound is 1000
    served = await client.get(paths.SNAPSHOT, params={"zones": ",".join(zones[:1000])})
    assert served.status == 200
    assert len((await served.json())["prices"]) == 1000
    for params in ({"zones": ",".join(zones)}, {}):  # named, or every configured zone
        response = await client.get(paths.SNAPSHOT, params=params)
        assert response.status == 422
        answer = await response.json()
        assert (answer["error"], answer["field"]) == (HttpErrorCode.TOO_MANY_ZONES, "zones")
        assert "at most 1000" in answer["message"], answer
    wider = await make_client(zones=zones, max_zones_per_socket=2000)  # a socket's zones
    every = await wider.get(paths.SNAPSHOT)
    assert every.status == 200 and len((await every.json())["prices"]) == 1001


async def test_http_snapshot_follows_the_history_endpoints_token_rules(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=ZONES, jwt_secret=SECRET)
    assert (await client.get(paths.SNAPSHOT, params={"zones": "pjm"})).status == 401
    narrow = token(zones=["pjm"])
    refused = await client.get(paths.SNAPSHOT, params={"zones": "pjm,ercot", "token": narrow})
    assert (refused.status, (await refused.json())["error"]) == (403, "forbidden_zone")
    allowed = await client.get(
        paths.SNAPSHOT, params={"zones": "pjm"}, headers={"Authorization": f"Bearer {narrow}"}
    )
    assert allowed.status == 200
    assert (await allowed.json())["cursor"] == {"pjm": 0}


# --- HTTP, durable and Redis (real server processes) -------------------------------------


async def get_json(url: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as response:
        return response.status, await response.json()


async def test_http_snapshot_durable_survives_a_restart(tmp_path: Path) -> None:
    with ServerProcess("--no-simulate", publish_key=PUBLISH_KEY, data_dir=tmp_path) as server:
        await server.publish({"market_zone": "pjm", "price": 1}, {"market_zone": "pjm", "price": 2})
        url = server.url + paths.SNAPSHOT
        status, before = await get_json(url, zones="pjm,ercot")
        assert (status, before["cursor"]) == (200, {"pjm": 2, "ercot": 0})
        server.stop()
        server.start()
        status, after = await get_json(url, zones="pjm,ercot")
    assert status == 200
    assert {k: after[k] for k in ("epoch", "prices", "cursor")} == {
        k: before[k] for k in ("epoch", "prices", "cursor")
    }


async def test_http_snapshot_on_redis(redis_server: RedisProcess, raw: aioredis.Redis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    with ServerProcess(
        "--no-simulate", publish_key=PUBLISH_KEY, redis_url=redis_server.url,
        env={"PRICEHUB_KEY_PREFIX": prefix},
    ) as server:  # fmt: skip
        await server.publish(
            {"market_zone": "ercot", "price": 5}, {"market_zone": "pjm", "price": 6},
            {"market_zone": "ercot", "price": 7},
        )  # fmt: skip
        status, answer = await get_json(server.url + paths.SNAPSHOT, zones="pjm,ercot,caiso")
    assert status == 200
    assert answer["cursor"] == {"pjm": 1, "ercot": 2, "caiso": 0}
    assert answer["epoch"] == (await raw.get(KeyLayout(prefix).epoch)).decode()
    assert answer["prices"]["ercot"]["price"] == 7


# --- the Redis read: one MGET ---------------------------------------------------------------


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name: int(entry["calls"]) for name, entry in stats.items()}


async def commands_of(client: aioredis.Redis, read: Any) -> tuple[Any, dict[str, int]]:
    """What ``read`` returns and the commands Redis ran for it (this client's INFO aside)."""
    before = await command_calls(client)
    result = await read
    after = await command_calls(client)
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return result, {n: c for n, c in delta.items() if c and n != "cmdstat_info"}


@pytest.fixture
async def filled(redis_server: RedisProcess) -> tuple[RedisStorage, str]:
    """A RedisStorage that appended to 1,000 zones (2 prices to z00000), then was closed:
    nothing else talks to the test's redis-server while a read is counted."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    storage = RedisStorage(redis_server.url, key_prefix=prefix)
    await storage.start(RecordingListener())
    zones = [f"z{i:05d}" for i in range(1000)]
    body = messages.PriceBody("z00000", 1.0, None, NOW)
    await storage.append_many([(zone, body.encode()) for zone in [zones[0], *zones]])
    await storage.close()
    return storage, prefix


async def test_redis_snapshot_of_1000_zones_is_one_mget(
    filled: tuple[RedisStorage, str], raw: aioredis.Redis
) -> None:
    storage, prefix = filled
    zones = [f"z{i:05d}" for i in range(1000)] + ["never"]
    await raw.ping()  # connected before counting
    taken, ran = await commands_of(raw, snapshot(raw, KeyLayout(prefix), zones))
    assert ran == {"cmdstat_mget": 1}
    assert taken.epoch == storage.epoch
    assert taken.cursor() == {**{zone: 1 for zone in zones[1:-1]}, "z00000": 2, "never": 0}
    price = taken.prices["z00000"]
    assert price is not None and messages.seq_of(price.payload) == 2


async def test_redis_snapshot_without_an_epoch_says_so(
    filled: tuple[RedisStorage, str], raw: aioredis.Redis
) -> None:
    _, prefix = filled
    keys = KeyLayout(prefix)
    await raw.delete(keys.epoch)  # Redis lost its data (only this key, for the test)
    assert (await snapshot(raw, keys, ["z00001"])).epoch == NO_EPOCH


async def test_a_redis_snapshot_under_another_epoch_is_refused(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """Its seqs are no cursor of the stream this instance delivers: ``EpochChanged`` (a
    ``StorageUnavailable``), whether Redis lost its epoch or holds another one."""
    storage = RedisStorage(redis_server.url, key_prefix=prefix)
    await storage.start(RecordingListener())
    try:
        keys = KeyLayout(prefix)
        assert (await storage.snapshot(["pjm"])).epoch == storage.epoch
        await raw.set(keys.epoch, "another")  # no announcement: the subscriber hears nothing
        with pytest.raises(EpochChanged, match="another"):
            await storage.snapshot(["pjm"])
        await raw.delete(keys.epoch)
        with pytest.raises(EpochChanged, match="none"):
            await storage.snapshot(["pjm"])
    finally:
        await storage.close()


async def test_the_failover_snapshot_is_redis_s_and_its_mirror_s_after_an_epoch_move(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """On Redis while it serves (its MGET counted); when Redis's epoch moved under it,
    the failover answers from its mirror under the epoch its subscribers have, and the
    refusal starts a resync (not a failover), after which it serves Redis's epoch."""
    storage = FailoverStorage(redis_server.url, zones=ZONES, key_prefix=prefix)
    await storage.start(RecordingListener())
    try:
        price = await storage.append("pjm", messages.PriceBody("pjm", 1.0, None, NOW).encode())
        taken, ran = await commands_of(raw, storage.snapshot(["pjm", "ercot"]))
        assert ran.get("cmdstat_mget") == 1  # (the storage's probes may run meanwhile)
        assert (taken.epoch, dict(taken.prices)) == (storage.epoch, {"pjm": price, "ercot": None})
        ours = storage.epoch
        await raw.set(KeyLayout(prefix).epoch, "moved")
        mirrored = await storage.snapshot(["pjm"])
        assert (mirrored.epoch, dict(mirrored.prices)) == (ours, {"pjm": price})
        await eventually(lambda: storage.epoch == "moved")
        assert (storage.counters().resyncs, storage.counters().failovers) == (1, 0)
        assert (await storage.snapshot(["pjm"])).epoch == "moved"
    finally:
        await storage.close()


async def test_the_failover_store_answers_from_memory_while_redis_is_away() -> None:
    """What ``create_storage`` builds for a Redis URL, with nothing listening there: it
    numbers in memory, and the many-zone reads answer from there under its own epoch."""
    config = StorageConfig(
        redis_url="redis://127.0.0.1:1/0", zones=ZONES, key_prefix="pricehub:",
        history_size=10, data_dir=None, redis_timeout=0.2, redis_probe_interval=1.0,
        redis_hold=0.0, assume_peers=False, adopt_journal=False,
    )  # fmt: skip
    storage = create_storage(config, log=structlog.get_logger("test"))
    await storage.start(RecordingListener())
    try:
        assert storage.backend == "in-memory"
        price = await storage.append("pjm", messages.PriceBody("pjm", 1.0, None, NOW).encode())
        taken = await storage.snapshot(["pjm", "ercot"])
        assert (taken.epoch, dict(taken.prices)) == (storage.epoch, {"pjm": price, "ercot": None})
        found = await storage.history_between(["pjm"], NOW, "2026-11-28T00:00:00.000Z", limit=5)
        assert found == ([price], False)
    finally:
        await storage.close()
