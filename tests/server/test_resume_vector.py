"""Resume from a cursor vector on the URL (PROTOCOL.md, "One consistent picture of many
zones"): ``since=pjm:12,ercot:40&epoch=E`` on ``/api/ws/ws/prices`` and on the SSE
``prices`` path, through real sockets and streams.

The parser (pure), resume and refusals in memory, and the case it is for: a client whose
instance is SIGKILLed reconnects to the other instance of the cluster (one test-started
redis-server) with the vector of what it had, and gets every seq it missed exactly once,
then the live stream, with no gap and no duplicate, on both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aiohttp
import pytest

from pricehub.wire import messages, paths
from pricehub.wire.codes import ErrorCode, HttpErrorCode
from pricehub.wire.errors import ProtocolError
from pricehub.wire.sse import MAX_SEQ
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import ServerProcess, running_servers
from tests.harness.ssestream import EventStream
from tests.harness.support import PUBLISH_KEY, WAIT, Client, MakeClient, publish, receive_until
from tests.server.test_snapshot_ws import Recorder, reached, seed_every_zone

ZONES = tuple(f"z{index:02d}" for index in range(10))
URL_ZONES = ("pjm", "ercot", "caiso")

BAD_VECTORS = [
    "", "pjm", "pjm:", ":1", "pjm:-1", "pjm:x", "pjm:1.5", "pjm: 1", "pjm:+1", "pjm:1e3",
    "pjm:\u0661", "nope:1", "miso:1", "PJM:1", "pjm:1,pjm:2", "pjm:1,", ",pjm:1",
    "pjm:1;ercot:2", "pjm:1:2", f"pjm:{MAX_SEQ + 1}", "pjm:" + "9" * 20, "pjm:1," * 400,
]


# --- the parser -------------------------------------------------------------------------


def test_a_vector_names_seqs_of_the_socket_s_zones() -> None:
    parse = messages.parse_since_vector
    assert parse("pjm:12,ercot:40", URL_ZONES) == {"pjm": 12, "ercot": 40}
    assert parse("caiso:0", URL_ZONES) == {"caiso": 0}
    assert parse(f"ercot:{MAX_SEQ},pjm:0,caiso:7", URL_ZONES) == {
        "ercot": MAX_SEQ, "pjm": 0, "caiso": 7,
    }
    wide = tuple(f"zone_{index:04d}" for index in range(1000))
    text = ",".join(f"{zone}:{MAX_SEQ}" for zone in wide)
    assert len(parse(text, frozenset(wide))) == 1000  # the longest vector of 1000 zones


@pytest.mark.parametrize("raw", BAD_VECTORS)
def test_a_malformed_vector_is_invalid_message(raw: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        messages.parse_since_vector(raw, URL_ZONES)
    assert refused.value.code == ErrorCode.INVALID_MESSAGE
    assert "since" in refused.value.message


# --- in memory: resume, refusals --------------------------------------------------------


async def filled(make_client: MakeClient) -> Client:
    client = await make_client(zones=(*URL_ZONES, "miso"))
    for zone, count in (("pjm", 5), ("ercot", 3)):
        for index in range(count):
            await publish(client, {"market_zone": zone, "price": float(index)})
    return client


def prices_url(since: str, **extra: str) -> dict[str, str]:
    return {"zones": ",".join(URL_ZONES), "since": since, **extra}


async def test_the_ws_url_vector_resumes_each_zone_named(make_client: MakeClient) -> None:
    client = await filled(make_client)
    async with client.ws_connect(paths.WS_PRICES, params=prices_url("pjm:2,ercot:3")) as ws:
        hello = await ws.receive_json()
        seen = await receive_until(ws, lambda m: m["type"] == "resume_complete"
                                   and m["market_zone"] == "ercot")  # fmt: skip
        replayed = [(m["seq"], m.get("replay")) for m in seen if m["type"] == "price_update"]
        assert replayed == [(3, True), (4, True), (5, True)]
        completes = {m["market_zone"]: m for m in seen if m["type"] == "resume_complete"}
        assert (completes["pjm"]["recovered"], completes["pjm"]["to_seq"]) == (True, 5)
        assert (completes["ercot"]["recovered"], completes["ercot"]["from_seq"]) == (True, 4)
        assert not [m for m in seen if m["type"] in ("initial_data", "error", "gap")]
        await publish(client, {"market_zone": "caiso", "price": 1.0})  # not named: fresh
        live = await ws.receive_json(timeout=WAIT)
        assert (live["type"], live["market_zone"], live["seq"]) == ("price_update", "caiso", 1)
    params = prices_url("pjm:2", epoch="not-" + hello["epoch"])
    async with client.ws_connect(paths.WS_PRICES, params=params) as ws:
        await ws.receive_json()
        seen = await receive_until(ws, lambda m: m["type"] == "resume_complete")
        assert [m["type"] for m in seen] == ["gap", "initial_data", "resume_complete"]
        assert (seen[0]["reason"], seen[2]["recovered"]) == ("epoch_changed", False)
        # ercot was not named: its current state, as without a vector.
        ercot = await receive_until(ws, lambda m: m["type"] == "initial_data")
        assert ercot[-1]["latest_price"]["seq"] == 3


@pytest.mark.parametrize("raw", ["pjm", "pjm:-1", "nope:1", "miso:1", "pjm:1,pjm:2", ""])
async def test_a_malformed_ws_vector_is_an_error_then_every_zone_fresh(
    make_client: MakeClient, raw: str
) -> None:
    """As a bad ``since`` of the one-zone socket: no refusal, an ``error``
    ``invalid_message`` once open, then each zone's current state."""
    client = await filled(make_client)
    async with client.ws_connect(paths.WS_PRICES, params=prices_url(raw)) as ws:
        assert (await ws.receive_json())["type"] == "connection_established"
        error = await ws.receive_json(timeout=WAIT)
        assert (error["type"], error["code"]) == ("error", ErrorCode.INVALID_MESSAGE)
        assert "since" in error["message"]
        seen = await receive_until(ws, lambda m: m["type"] == "initial_data"
                                   and m["market_zone"] == "ercot")  # fmt: skip
        assert [m["latest_price"]["seq"] for m in seen if m["type"] == "initial_data"] == [5, 3]
        assert not [m for m in seen if m["type"] == "resume_complete"]
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=WAIT))["type"] == "pong"


@pytest.mark.parametrize("raw", BAD_VECTORS[:12])
async def test_a_malformed_sse_vector_is_a_400(make_client: MakeClient, raw: str) -> None:
    """As a bad ``since`` of the one-zone stream: 400 with ``invalid_since``."""
    client = await filled(make_client)
    response = await client.get(paths.SSE_PRICES, params=prices_url(raw))
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["error"] == HttpErrorCode.INVALID_SINCE and "since" in body["message"]


async def test_the_sse_url_vector_resumes_and_last_event_id_wins(
    make_client: MakeClient,
) -> None:
    client = await filled(make_client)
    response = await client.get(paths.SSE_PRICES, params=prices_url("pjm:3,ercot:1"))
    assert response.status == 200, await response.text()
    stream = EventStream(response)
    seen = await stream.until(lambda e: e.type == "resume_complete" and
                              e.data["market_zone"] == "ercot")  # fmt: skip
    assert [(e.data["market_zone"], e.data["seq"], e.data.get("replay")) for e in seen
            if e.type == "price_update"] == [("pjm", 4, True), ("pjm", 5, True),
                                             ("ercot", 2, True), ("ercot", 3, True)]  # fmt: skip
    last_id = stream.last_id
    response.close()
    assert last_id is not None
    # A reconnect with the stream's own cursor: the header wins over any since.
    response = await client.get(paths.SSE_PRICES, params=prices_url("garbage"),
                                headers={paths.LAST_EVENT_ID: last_id})  # fmt: skip
    assert response.status == 200, await response.text()
    stream = EventStream(response)
    resumed = await stream.until(lambda e: e.type == "resume_complete" and
                                 e.data["market_zone"] == "caiso")  # fmt: skip
    assert [e.data["recovered"] for e in resumed if e.type == "resume_complete"] == [True] * 3
    assert not [e for e in resumed if e.type == "price_update"]
    response.close()


# --- two instances, one killed ------------------------------------------------------------


async def publisher(url: str, seed: int, *, batches: int) -> dict[str, int]:
    """Batches of prices to random zones, spread over time; the highest seq per zone."""
    chance = random.Random(seed)
    highest: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}"}
    async with aiohttp.ClientSession() as session:
        for _ in range(batches):
            batch = [{"market_zone": chance.choice(ZONES), "price": 1.0} for _ in range(3)]
            async with session.post(
                url + paths.BROADCAST_PRICE, json=batch, headers=headers
            ) as response:
                assert response.status == 202, await response.text()
                for accepted in (await response.json())["accepted"]:
                    zone = accepted["market_zone"]
                    highest[zone] = max(highest.get(zone, 0), accepted["seq"])
            await asyncio.sleep(0.01)
    return highest


def positions(log: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per zone, every seq a client was given, in order (its first state included)."""
    seqs: dict[str, list[int]] = {zone: [] for zone in ZONES}
    for message in log:
        if message["type"] == "price_update":
            seqs[message["market_zone"]].append(message["seq"])
        elif message["type"] == "initial_data":
            price = message["latest_price"]
            seqs[price["market_zone"]].append(price["seq"])
    return seqs


def vector_of(seqs: dict[str, list[int]]) -> str:
    return ",".join(f"{zone}:{got[-1]}" for zone, got in seqs.items() if got)


def check_no_gap_no_repeat(
    before: dict[str, list[int]], log: list[dict[str, Any]], finals: dict[str, int]
) -> None:
    """Per zone, what the first instance gave and what the second did, together, is
    every seq from the first state to the last published, once; the second began with a
    replay of what was missed."""
    after = positions(log)
    for zone in ZONES:
        got = before[zone] + after[zone]
        assert got == list(range(got[0], finals[zone] + 1)), (zone, before[zone], after[zone])
        first = next(m for m in log if m["type"] == "price_update" and m["market_zone"] == zone)
        assert first.get("replay") is True, first


@contextlib.asynccontextmanager
async def two_instances() -> Any:
    with RedisProcess() as redis_server:
        async with running_servers(
            2, redis_server.url, "--zones", ",".join(ZONES), publish_key=PUBLISH_KEY
        ) as servers:
            yield servers


async def kill(server: ServerProcess) -> None:
    await asyncio.to_thread(server.kill)


async def test_ws_resumes_from_the_vector_on_the_other_instance_after_a_sigkill() -> None:
    async with two_instances() as (first, second):
        seeded = await seed_every_zone_of(second)
        writers = asyncio.gather(*(publisher(second.url, seed, batches=120) for seed in range(2)))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                f"{first.ws_url}{paths.WS_PRICES}", params={"zones": ",".join(ZONES)}
            )
            before = Recorder(ws)
            await before.wait(reached(seeded))
            epoch = before.log[0]["epoch"]
            await before.wait(lambda log: sum(m["type"] == "price_update" for m in log) >= 60)
            await kill(first)
            await before.ended()
            had = positions(before.log)
            missed = await seed_every_zone(second.url, ZONES)  # one more each while away
            ws = await session.ws_connect(
                f"{second.ws_url}{paths.WS_PRICES}",
                params={"zones": ",".join(ZONES), "since": vector_of(had), "epoch": epoch},
            )
            after = Recorder(ws)
            finals = merge([*await writers, missed], seeded)
            await after.wait(reached(finals))
            completes = [m for m in after.log if m["type"] == "resume_complete"]
            assert len(completes) == len(ZONES) and all(m["recovered"] for m in completes)
            assert not [m for m in after.log if m["type"] in ("initial_data", "gap", "error")]
            check_no_gap_no_repeat(had, after.log, finals)
            await after.close()


async def seed_every_zone_of(server: ServerProcess) -> dict[str, int]:
    return await seed_every_zone(server.url, ZONES)


def merge(results: list[dict[str, int]], first: dict[str, int]) -> dict[str, int]:
    finals = dict(first)
    for highest in results:
        for zone, seq in highest.items():
            finals[zone] = max(finals[zone], seq)
    return finals


class SseRecorder:
    """Every event of one SSE stream, read by a task until the stream ends."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.stream = EventStream(response)
        self.response = response
        self.log: list[dict[str, Any]] = []
        self.ended = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                event = await self.stream.next(timeout=3 * WAIT)
                self.log.append(event.data)
        except (EOFError, aiohttp.ClientError, TimeoutError):
            self.ended.set()

    async def wait(self, condition: Any) -> None:
        async with asyncio.timeout(WAIT):
            while not condition(self.log):
                assert not self.ended.is_set(), self.log[-3:]
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.response.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_sse_resumes_from_the_vector_on_the_other_instance_after_a_sigkill() -> None:
    async with two_instances() as (first, second):
        seeded = await seed_every_zone_of(second)
        writers = asyncio.gather(*(publisher(second.url, seed, batches=120) for seed in range(2)))
        async with aiohttp.ClientSession() as session:
            response = await session.get(
                first.url + paths.SSE_PRICES, params={"zones": ",".join(ZONES)}
            )
            assert response.status == 200
            before = SseRecorder(response)
            await before.wait(reached(seeded))
            epoch = before.log[0]["epoch"]
            await before.wait(lambda log: sum(m["type"] == "price_update" for m in log) >= 60)
            await kill(first)
            async with asyncio.timeout(WAIT):
                await before.ended.wait()
            had = positions(before.log)
            missed = await seed_every_zone(second.url, ZONES)  # one more each while away
            response = await session.get(
                second.url + paths.SSE_PRICES,
                params={"zones": ",".join(ZONES), "since": vector_of(had), "epoch": epoch},
            )
            assert response.status == 200, await response.text()
            after = SseRecorder(response)
            finals = merge([*await writers, missed], seeded)
            await after.wait(reached(finals))
            completes = [m for m in after.log if m["type"] == "resume_complete"]
            assert len(completes) == len(ZONES) and all(m["recovered"] for m in completes)
            check_no_gap_no_repeat(had, after.log, finals)
            await after.close()
