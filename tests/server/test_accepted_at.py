"""``accepted_at`` on every price object (PROTOCOL.md, "Accepted time on every price") and
the ``pricehub_delivery_lag_seconds`` histogram, black-box through real sockets.

* every path and transport of one in-memory server (WebSocket live, ``initial_data``,
  ``request_price_history``, resume replay; SSE live, ``initial_data``, ``Last-Event-ID``
  replay; the HTTP history) shows one value per seq, microseconds and ``Z``, the moment
  the price was numbered;
* it is stored with the price: the same after a SIGKILL of a durable server; the same on
  two instances of one Redis (Redis's clock, in the append script) and of a Redis Cluster;
  kept through a failover to memory and the write-back into a Redis that restarted empty;
* a price stored before the field existed is served with ``"accepted_at": null``;
* the Lua formatter equals the Python one; the Python client and browser module pass the
  field on; the histogram is exported per transport and counts deliveries.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from pricehub.client import PriceClient, PriceUpdate
from pricehub.wire import messages, paths
from tests.harness.redisproc import RedisCluster, RedisProcess
from tests.harness.serverproc import ServerProcess, running_servers
from tests.harness.ssestream import EventStream
from tests.harness.support import (
    PUBLISH_KEY,
    WAIT,
    Client,
    MakeClient,
    eventually,
    publish,
    receive_json,
    receive_until,
)

ACCEPTED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
LAG = "pricehub_delivery_lag_seconds"
SLOW = 20.0  # bound of waits over real processes on a shared 2-core machine
FAST = ("--redis-timeout", "0.3", "--redis-probe-interval", "0.2")
SKEW = timedelta(milliseconds=5)  # slack for comparing two clocks' truncations


def stamp_of(price: dict[str, Any]) -> str:
    """A price object's ``accepted_at``, checked against the contract's format."""
    value = price["accepted_at"]
    assert isinstance(value, str) and ACCEPTED_AT.fullmatch(value), price
    return value


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def price_objects(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The price objects a server message carries (none for the others)."""
    kind = message.get("type")
    if kind == "price_update":
        return [message]
    if kind == "initial_data":
        return [message["latest_price"]]
    if kind == "price_history":
        return list(message["data"])
    return []


class Seen:
    """Every ``accepted_at`` seen per (zone, seq), from wherever it came."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, int], set[str]] = {}
        self.paths: set[str] = set()

    def add(self, path: str, prices: list[dict[str, Any]]) -> None:
        for price in prices:
            key = (price["market_zone"], price["seq"])
            self.values.setdefault(key, set()).add(stamp_of(price))
            self.paths.add(path)

    def one_each(self) -> dict[tuple[str, int], str]:
        """The single value of every seq (fails if any path saw another one)."""
        assert all(len(values) == 1 for values in self.values.values()), self.values
        return {key: next(iter(values)) for key, values in self.values.items()}


async def history_http(session: Any, base: str, zone: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}{paths.history(zone)}?limit=100") as response:
        assert response.status == 200, await response.text()
        data: list[dict[str, Any]] = (await response.json())["data"]
        return data


# --- one server, every path ---------------------------------------------------------


async def test_every_path_and_transport_shows_one_stored_value_per_seq(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    seen = Seen()
    before = datetime.now(UTC)
    await publish(client, {"market_zone": "pjm", "price": 1.0})
    after = datetime.now(UTC)
    ws = await client.ws_connect(paths.ws_market("pjm"))
    hello = await receive_json(ws)
    initial = await receive_json(ws)
    assert initial["type"] == "initial_data"
    seen.add("ws initial_data", price_objects(initial))
    assert before - SKEW <= moment(stamp_of(initial["latest_price"])) <= after + SKEW

    await publish(client, {"market_zone": "pjm", "price": 2.0}, {"market_zone": "pjm", "price": 3})
    live = await receive_until(ws, lambda m: m.get("seq") == 3)
    seen.add("ws price_update", [m for m in live if m["type"] == "price_update"])
    await ws.send_json({"type": "request_price_history", "limit": 10})
    (history,) = await receive_until(ws, lambda m: m["type"] == "price_history")
    assert [p["seq"] for p in history["data"]] == [1, 2, 3]
    seen.add("ws price_history", price_objects(history))
    seen.add("http history", await history_http(client, "", "pjm"))
    await ws.close()

    resumed = await client.ws_connect(
        f"{paths.ws_market('pjm')}?since=0&epoch={hello['epoch']}"
    )
    replay = await receive_until(resumed, lambda m: m["type"] == "resume_complete")
    replayed = [m for m in replay if m["type"] == "price_update"]
    assert [m["seq"] for m in replayed] == [1, 2, 3] and all(m["replay"] for m in replayed)
    seen.add("ws replay", replayed)
    await resumed.close()

    multi = await client.ws_connect(f"{paths.WS_PRICES}?zones=pjm")
    opening = await receive_until(multi, lambda m: m["type"] == "initial_data")
    seen.add("ws multi-zone initial_data", price_objects(opening[-1]))
    await multi.close()

    await sse_paths(client, seen)
    values = seen.one_each()
    assert sorted(values) == [("pjm", seq) for seq in range(1, 5)]
    ordered = [moment(values["pjm", seq]) for seq in range(1, 5)]
    assert ordered == sorted(ordered)  # numbered in this order, so accepted in it
    assert len(seen.paths) == 9, seen.paths


async def sse_paths(client: Client, seen: Seen) -> None:
    """SSE: initial_data, a live update (seq 4), then a Last-Event-ID replay."""
    response = await client.get(paths.sse_market("pjm"))
    assert response.status == 200
    events = EventStream(response)
    initial = (await events.until(lambda e: e.type == "initial_data"))[-1]
    seen.add("sse initial_data", price_objects(initial.data))
    cursor = initial.id
    await publish(client, {"market_zone": "pjm", "price": 4.0})
    update = (await events.until(lambda e: e.type == "price_update"))[-1]
    seen.add("sse price_update", [update.data])
    response.close()
    assert cursor is not None
    again = await client.get(paths.sse_market("pjm"), headers={"Last-Event-ID": cursor})
    replay = await EventStream(again).until(lambda e: e.type == "resume_complete")
    replayed = [e.data for e in replay if e.type == "price_update"]
    assert [p["seq"] for p in replayed] == [4] and replayed[0]["replay"] is True
    seen.add("sse replay", replayed)
    again.close()


# --- the histogram ------------------------------------------------------------------


def lag_samples(text: str) -> dict[tuple[str, str], float]:
    """``(sample suffix and le, transport) -> value`` of the delivery-lag histogram."""
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == LAG]
    assert family.type == "histogram"
    return {
        (sample.name.removeprefix(LAG) + sample.labels.get("le", ""),
         sample.labels["transport"]): sample.value
        for sample in family.samples
    }  # fmt: skip


async def scrape(client: Client) -> dict[tuple[str, str], float]:
    response = await client.get(paths.METRICS)
    assert response.status == 200
    return lag_samples(await response.text())


async def test_delivery_lag_histogram_counts_deliveries_per_transport(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    start = await scrape(client)
    for transport in ("ws", "sse"):  # exported before the first delivery
        assert start["_count", transport] == 0 and ("_bucket0.0001", transport) in start
    await publish(client, {"market_zone": "pjm", "price": 0.0})
    sockets = [await client.ws_connect(paths.ws_market("pjm")) for _ in range(3)]
    for ws in sockets:
        await receive_until(ws, lambda m: m["type"] == "initial_data")
    stream = await client.get(paths.sse_market("pjm"))
    events = EventStream(stream)
    await events.until(lambda e: e.type == "initial_data")
    # Members join their audience at a flush once in step: publish until one update is
    # counted once per WebSocket (3) and once for the stream. Bounded, never a sleep.
    before, counted = await scrape(client), None
    for seq in range(2, 50):
        await publish(client, {"market_zone": "pjm", "price": float(seq)})
        for ws in sockets:
            await receive_until(ws, lambda m, seq=seq: m.get("seq") == seq)
        await events.until(lambda e, seq=seq: e.data.get("seq") == seq)
        after = await scrape(client)
        delta = {t: after["_count", t] - before["_count", t] for t in ("ws", "sse")}
        before = after
        if delta == {"ws": 3, "sse": 1}:
            counted = after
            break
    assert counted is not None, "never measured every delivery of one update"
    for transport in ("ws", "sse"):
        count = counted["_count", transport]
        assert counted["_bucket+Inf", transport] == count > 0
        assert 0 <= counted["_sum", transport] < count * WAIT
        # buckets resolve sub-millisecond lags: 100 us, 250 us, 500 us below 1 ms
        assert {("_bucket0.00025", transport), ("_bucket0.0005", transport)} <= set(counted)
    stream.close()
    for ws in sockets:
        await ws.close()


# --- clients ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_python_client_exposes_accepted_at(make_client: MakeClient, transport: str) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1.0})
    wire = await history_http(client, "", "pjm")
    base = str(client.make_url("/"))
    async with PriceClient(base, "pjm", transport=transport) as feed:
        events: list[Any] = []
        async with asyncio.timeout(WAIT):
            async for event in feed:
                events.append(event)
                if len(events) == 1:
                    await publish(client, {"market_zone": "pjm", "price": 2.0})
                if len(events) == 2:
                    break
    initial, live = events
    assert isinstance(initial, PriceUpdate) and isinstance(live, PriceUpdate)
    assert initial.initial and initial.accepted_at == stamp_of(wire[0])
    assert live.accepted_at == stamp_of((await history_http(client, "", "pjm"))[1])
    assert live.accepted == moment(live.accepted_at) and live.accepted.tzinfo is not None
    assert live.as_price_object()["accepted_at"] == live.accepted_at


def test_python_client_reads_a_null_accepted_at_as_none() -> None:
    update = PriceUpdate("pjm", 1.0, None, 1, "2026-11-27T15:00:00.000Z")
    assert update.accepted_at is None and update.accepted is None
    assert update.as_price_object()["accepted_at"] is None


# --- the wire helpers and the Lua twin ----------------------------------------------


def test_price_object_adds_null_only_to_prices_stored_without_accepted_at() -> None:
    body = messages.PriceBody("pjm", 1.5, None, "2026-11-27T15:00:00.000Z").encode()
    stored = messages.with_seq(body, 7, b"2026-11-27T15:21:16.123456Z")
    assert messages.price_object(stored) is stored
    assert messages.accepted_at_of(stored) == "2026-11-27T15:21:16.123456Z"
    assert messages.body_of(stored) == body
    assert messages.timestamp_of(stored) == "2026-11-27T15:00:00.000Z"
    legacy = b'{"seq":7,' + body[1:]
    served = orjson.loads(messages.price_object(legacy))
    assert served == {**orjson.loads(legacy), "accepted_at": None}
    assert messages.accepted_at_of(legacy) is None and messages.body_of(legacy) == body
    update = orjson.loads(messages.price_update(legacy))
    assert update["accepted_at"] is None and update["seq"] == 7
    seconds = messages.accepted_seconds(stored)
    assert seconds == datetime(2026, 11, 27, 15, 21, 16, 123456, tzinfo=UTC).timestamp()


async def test_lua_accepted_at_is_the_python_format_over_many_dates(raw: aioredis.Redis) -> None:
    """STAMP_LUA's civil-date arithmetic against ``format_accepted_at``: epoch, leap days,
    century rules, year ends, random instants to 2200, and TIME itself."""
    from pricehub.storage.redis import STAMP_LUA  # here: the module is older than it

    rng = random.Random(25)
    moments = [0, 951_782_400, 951_868_799, 4_107_542_399, 1_798_761_599, 1_798_761_600]
    moments += [rng.randrange(0, 7_258_118_400) for _ in range(300)]
    script = STAMP_LUA + """
local out = {}
for i = 1, #ARGV, 2 do out[#out + 1] = utc_text(tonumber(ARGV[i]), tonumber(ARGV[i + 1])) end
out[#out + 1] = accepted_now()
return out
"""
    args = [part for secs in moments for part in (secs, rng.randrange(1_000_000))]
    before = datetime.now(UTC)
    reply = await raw.eval(script, 0, *args)
    after = datetime.now(UTC)
    expected = [
        messages.format_accepted_at((secs * 1_000_000 + micros) * 1000)
        for secs, micros in zip(args[::2], args[1::2], strict=True)
    ]
    assert reply[:-1] == expected
    assert ACCEPTED_AT.fullmatch(reply[-1].decode())
    assert before - SKEW <= moment(reply[-1].decode()) <= after + SKEW


# --- durable: SIGKILL ---------------------------------------------------------------


async def test_durable_server_keeps_accepted_at_across_sigkill(tmp_path: Path) -> None:
    server = ServerProcess("--no-simulate", publish_key=PUBLISH_KEY, data_dir=tmp_path / "data")
    await server.start_async()
    try:
        await server.publish(
            {"market_zone": "pjm", "price": 1.0}, {"market_zone": "pjm", "price": 2.0}
        )
        await server.publish({"market_zone": "pjm", "price": 3.0})
        async with aiohttp.ClientSession() as session:
            kept = await history_http(session, server.url, "pjm")
            assert [p["seq"] for p in kept] == [1, 2, 3] and all(map(stamp_of, kept))
            server.kill()
            await server.start_async()
            assert await history_http(session, server.url, "pjm") == kept
            async with session.ws_connect(server.ws_url + paths.ws_market("pjm")) as ws:
                initial = (await receive_until(ws, lambda m: m["type"] == "initial_data"))[-1]
            assert initial["latest_price"] == kept[-1]
            await server.publish({"market_zone": "pjm", "price": 4.0})
            after = await history_http(session, server.url, "pjm")
            assert after[:3] == kept and moment(stamp_of(after[3])) >= moment(stamp_of(kept[2]))
    finally:
        if server.running:
            await server.stop_async()


# --- Redis: two instances, failover, legacy data ------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test alone: the failover test kills it."""
    with RedisProcess() as server:
        yield server


def instances(url: str, count: int, *args: str) -> Any:
    return running_servers(count, url, *args, publish_key=PUBLISH_KEY)


async def live_updates(
    ws: aiohttp.ClientWebSocketResponse, zone: str, seq: int
) -> list[dict[str, Any]]:
    seen = await receive_until(
        ws, lambda m: m["type"] == "price_update" and m["market_zone"] == zone
        and m["seq"] >= seq, timeout=SLOW,
    )  # fmt: skip
    return [m for m in seen if m["type"] == "price_update"]


async def test_two_instances_on_one_redis_show_the_same_value(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    async with instances(redis_server.url, 2, *FAST, "--key-prefix", prefix) as (first, second), \
            aiohttp.ClientSession() as session:  # fmt: skip
        url = paths.WS_PRICES + "?zones=pjm,ercot"
        async with session.ws_connect(first.ws_url + url) as one, \
                session.ws_connect(second.ws_url + url) as other:  # fmt: skip
            for ws in (one, other):
                await receive_json(ws, timeout=SLOW)  # connection_established (no prices yet)
            before = datetime.now(UTC)
            await first.publish({"market_zone": "pjm", "price": 1.0},
                                {"market_zone": "ercot", "price": 2.0},
                                {"market_zone": "pjm", "price": 3.0})  # one batch script
            await second.publish({"market_zone": "pjm", "price": 4.0})  # one lone script
            after = datetime.now(UTC)
            seen = Seen()
            for name, ws in (("first", one), ("second", other)):
                updates = await live_updates(ws, "pjm", 3)
                if not any(m["market_zone"] == "ercot" for m in updates):
                    updates += await live_updates(ws, "ercot", 1)
                seen.add(f"{name} live", updates)
        for server in (first, second):
            for zone in ("pjm", "ercot"):
                seen.add(f"{server.port} history", await history_http(session, server.url, zone))
    values = seen.one_each()
    assert sorted(values) == [("ercot", 1), ("pjm", 1), ("pjm", 2), ("pjm", 3)]
    for value in values.values():  # Redis's clock: this host's, here
        assert before - SKEW <= moment(value) <= after + SKEW
    stored = await raw.get(f"{prefix}latest:pjm")
    assert messages.accepted_at_of(stored) == values["pjm", 3]


async def test_failover_to_memory_and_write_back_keep_the_value(own_redis: RedisProcess) -> None:
    async with instances(own_redis.url, 1, *FAST) as (server,), \
            aiohttp.ClientSession() as session:  # fmt: skip
        await server.publish({"market_zone": "pjm", "price": 1.0})  # numbered by Redis
        own_redis.kill()
        await eventually(backend_is(session, server, "in-memory"), within=SLOW)
        await server.publish({"market_zone": "pjm", "price": 2.0})  # numbered in memory
        kept = await history_http(session, server.url, "pjm")
        assert [p["seq"] for p in kept] == [1, 2] and all(map(stamp_of, kept))
        own_redis.start()  # empty: the instance writes its prices back
        await eventually(backend_is(session, server, "redis"), within=SLOW)
        async with instances(own_redis.url, 1, *FAST) as (late,):  # knows only what Redis has
            assert await history_http(session, late.url, "pjm") == kept
            async with session.ws_connect(late.ws_url + paths.ws_market("pjm")) as ws:
                initial = (await receive_until(ws, lambda m: m["type"] == "initial_data"))[-1]
            assert initial["latest_price"] == kept[-1]
        assert await history_http(session, server.url, "pjm") == kept


def backend_is(session: aiohttp.ClientSession, server: ServerProcess, backend: str) -> Any:
    async def check() -> bool:
        async with session.get(server.url + paths.HEALTH) as response:
            return bool((await response.json())["storage_backend"] == backend)

    return check


async def test_prices_stored_without_accepted_at_are_served_with_null(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """History an older pricehub left in Redis: readable on every path, the field null;
    the next price has one again."""
    legacy = [
        b'{"seq":%d,"market_zone":"pjm","price":%d.0,"volume":null,'
        b'"timestamp":"2026-11-27T15:00:00.000Z"}' % (seq, seq)
        for seq in (1, 2)
    ]
    await raw.set(f"{prefix}seq:pjm", 2)
    await raw.zadd(f"{prefix}history:pjm", {payload: seq for seq, payload in enumerate(legacy, 1)})
    await raw.set(f"{prefix}latest:pjm", legacy[-1])
    async with instances(redis_server.url, 1, *FAST, "--key-prefix", prefix) as (server,), \
            aiohttp.ClientSession() as session:  # fmt: skip
        old = await history_http(session, server.url, "pjm")
        assert [(p["seq"], p["accepted_at"]) for p in old] == [(1, None), (2, None)]
        async with session.ws_connect(server.ws_url + paths.ws_market("pjm")) as ws:
            hello = await receive_json(ws, timeout=SLOW)
            initial = await receive_json(ws, timeout=SLOW)
            assert initial["latest_price"]["accepted_at"] is None
            await ws.send_json({"type": "request_price_history"})
            (history,) = await receive_until(ws, lambda m: m["type"] == "price_history")
            assert [p["accepted_at"] for p in history["data"]] == [None, None]
            await server.publish({"market_zone": "pjm", "price": 3.0})
            (update,) = await live_updates(ws, "pjm", 3)
            assert stamp_of(update) and update["seq"] == 3
        resume = f"{paths.ws_market('pjm')}?since=0&epoch={hello['epoch']}"
        async with session.ws_connect(server.ws_url + resume) as ws:
            replay = await receive_until(ws, lambda m: m["type"] == "resume_complete")
        replayed = [m for m in replay if m["type"] == "price_update"]
        assert [(m["seq"], m["accepted_at"]) for m in replayed[:2]] == [(1, None), (2, None)]
        assert replayed[2]["accepted_at"] == update["accepted_at"]


# --- Redis Cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


async def test_two_instances_on_a_redis_cluster_show_the_same_value(
    cluster: RedisCluster, prefix: str
) -> None:
    zones = ("pjm", "ercot", "caiso", "nyiso")  # spread over the masters
    args = ("--zones", ",".join(zones), "--key-prefix", prefix, "--redis-timeout", "1")
    async with instances(cluster.url, 2, *args) as (first, second), \
            aiohttp.ClientSession() as session:  # fmt: skip
        async with session.ws_connect(second.ws_url + paths.ws_market("caiso")) as ws:
            await receive_json(ws, timeout=SLOW)  # connection_established
            await first.publish(*({"market_zone": zone, "price": 1.0} for zone in zones))
            await first.publish({"market_zone": "caiso", "price": 2.0})
            seen = Seen()
            seen.add("second live", await live_updates(ws, "caiso", 2))
        for server in (first, second):
            for zone in zones:
                seen.add(f"{server.port} history", await history_http(session, server.url, zone))
    values = seen.one_each()
    assert len(values) == len(zones) + 1
