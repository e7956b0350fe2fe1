"""``max_rate`` and ``skipped`` (PROTOCOL.md, "A rate the client chooses: max_rate"),
black-box through real sockets and SSE streams: URL refusals, ``subscribe`` errors,
spacing, ``skipped`` arithmetic, the last update of a burst, resume, SSE, shared writes
and slow-reader conflation. Timing is asserted loosely (seqs and ``skipped`` exactly,
spacing with generous bounds): the machine is shared."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.keys import BROADCASTER
from pricehub.wire import messages, paths, rate
from tests.harness.ssestream import EventStream
from tests.harness.support import WAIT, Client, MakeClient, eventually, publish, receive_json
from tests.server.test_fanout import open_stalled, publish_until

ZONE = "pjm"
RATE = 10.0  # updates per second: 100 ms apart, so a test takes about a second
INTERVAL = 1.0 / RATE

BAD_URL_RATES = [
    "0", "-1", "1001", "1000.5", "nan", "NaN", "inf", "1e-9", "1e3", "0.0001", "4.0001",
    "abc", "", "0x10", " 4", "+4", "4,5", "\u0664", "00000004",
]
BAD_JSON_RATES: list[Any] = [
    0, -1, 1001, 1000.5, 1e-9, 0.0001, 4.0001, "4", True, False, [4], {"rate": 4},
]


def price(value: float, zone: str = ZONE) -> dict[str, Any]:
    return {"market_zone": zone, "price": value}


@asynccontextmanager
async def sse_stream(client: Client, path: str, **kwargs: Any) -> AsyncIterator[EventStream]:
    response = await client.get(path, **kwargs)
    assert response.status == 200, await response.text()
    try:
        yield EventStream(response)
    finally:
        response.close()


async def timed_updates(
    ws: aiohttp.ClientWebSocketResponse, *, until_seq: int, zone: str = ZONE
) -> list[tuple[float, dict[str, Any]]]:
    """(receive time, message) of ``zone``'s price updates until ``until_seq`` arrives."""
    seen: list[tuple[float, dict[str, Any]]] = []
    async with asyncio.timeout(WAIT):
        while True:
            message = await receive_json(ws)
            if message["type"] == "price_update" and message["market_zone"] == zone:
                seen.append((time.monotonic(), message))
                if message["seq"] >= until_seq:
                    return seen


async def publish_paced(client: Client, count: int, *, every: float, zone: str = ZONE) -> int:
    """``count`` prices, one POST each, about ``every`` s apart; the last seq."""
    last = 0
    for index in range(count):
        last = (await publish(client, price(40.0 + index, zone)))[0]["seq"]
        await asyncio.sleep(every)
    return last


def check_skipped(updates: list[dict[str, Any]], *, previous: int) -> None:
    """Seqs strictly increase and each ``skipped`` is its seq - the previous one - 1."""
    for update in updates:
        assert update["seq"] > previous, updates
        assert update["skipped"] == update["seq"] - previous - 1, updates
        previous = update["seq"]


# --- the pure parsers ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", BAD_URL_RATES)
def test_url_rates_outside_the_contract_are_refused(raw: str) -> None:
    with pytest.raises(rate.RateError):
        rate.parse_url(raw)


@pytest.mark.parametrize("value", BAD_JSON_RATES)
def test_json_rates_outside_the_contract_are_refused(value: Any) -> None:
    with pytest.raises(rate.RateError):
        rate.parse_json(value)


def test_rates_inside_the_contract_parse() -> None:
    assert [rate.parse_url(raw) for raw in ("4", "0.001", "1000", "2.5", "1000.000")] == [
        4.0, 0.001, 1000.0, 2.5, 1000.0,
    ]
    assert [rate.parse_json(value) for value in (4, 0.001, 1000, 2.5)] == [4.0, 0.001, 1000.0, 2.5]


def test_skipped_is_spliced_without_re_encoding_the_price() -> None:
    stored = b'{"market_zone":"pjm","price":41.5,"volume":null,"seq":9,"timestamp":"t"}'
    frame = orjson.loads(messages.price_update(stored, skipped=3, replay=True))
    assert frame["type"] == "price_update" and frame["skipped"] == 3
    assert frame["replay"] is True and frame["seq"] == 9 and frame["price"] == 41.5


# --- URL refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", BAD_URL_RATES)
async def test_a_bad_url_max_rate_is_a_400_before_the_upgrade_or_the_stream(
    make_client: MakeClient, raw: str
) -> None:
    client = await make_client()
    for path in (paths.ws_market(ZONE), paths.WS_PRICES, paths.sse_market(ZONE),
                 paths.SSE_PRICES):  # fmt: skip
        response = await client.get(path, params={"max_rate": raw})
        assert response.status == 400, (path, raw, await response.text())
        body = await response.json()
        assert body["error"] == "invalid_max_rate" and "max_rate" in body["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(paths.ws_market(ZONE), params={"max_rate": raw})
    assert refused.value.status == 400


# --- subscribe --------------------------------------------------------------------------


async def test_a_bad_subscribe_max_rate_is_invalid_message_and_the_socket_stays_open(
    make_client: MakeClient,
) -> None:
    client = await make_client(client_rate_limit=1000.0)
    ws = await client.ws_connect(f"{paths.WS_PRICES}?zones=")
    assert (await receive_json(ws))["type"] == "connection_established"
    for value in BAD_JSON_RATES:
        await ws.send_str(orjson.dumps(
            {"type": "subscribe", "zones": [ZONE], "max_rate": value}
        ).decode())  # fmt: skip
        error = await receive_json(ws)
        assert (error["type"], error["code"]) == ("error", "invalid_message"), (value, error)
        await ws.send_str('{"type": "ping"}')
        assert (await receive_json(ws))["type"] == "pong"  # open, and nothing subscribed
    assert not client.app[BROADCASTER].subscribers
    await ws.close()


async def test_subscribe_paces_the_zones_it_names_and_no_others(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE, "ercot"))
    ws = await client.ws_connect(f"{paths.WS_PRICES}?zones=ercot")
    assert (await receive_json(ws))["type"] == "connection_established"
    await ws.send_str(orjson.dumps(
        {"type": "subscribe", "zones": [ZONE], "max_rate": RATE}
    ).decode())  # fmt: skip
    assert (await receive_json(ws))["type"] == "subscribed"
    # One batch per zone: ercot (every update) and pjm (paced) in one tick each.
    await publish(client, *[price(float(i), "ercot") for i in range(20)])
    last = (await publish(client, *[price(float(i)) for i in range(20)]))[-1]["seq"]
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while not seen or seen[-1]["market_zone"] != ZONE or seen[-1]["seq"] != last:
            message = await receive_json(ws)
            if message["type"] == "price_update":
                seen.append(message)
    ercot = [m for m in seen if m["market_zone"] == "ercot"]
    paced = [m for m in seen if m["market_zone"] == ZONE]
    assert [m["seq"] for m in ercot] == list(range(1, 21))
    assert all("skipped" not in m for m in ercot)
    assert len(paced) <= 2 and paced[-1]["seq"] == last  # the burst's newest wins
    check_skipped(paced, previous=0)
    await ws.close()


# --- spacing, skipped, the end of a burst -----------------------------------------------------


async def test_updates_are_spaced_newest_wins_and_skipped_counts_the_rest(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,))
    ws = await client.ws_connect(paths.ws_market(ZONE), params={"max_rate": str(RATE)})
    assert (await receive_json(ws))["type"] == "connection_established"
    started = time.monotonic()
    count = 60  # ~100/s for ~0.6 s or more; received meanwhile, so the times are real
    receiving = asyncio.create_task(timed_updates(ws, until_seq=count))
    last = await publish_paced(client, count, every=0.01)
    assert last == count
    seen = await receiving
    took = time.monotonic() - started
    updates = [message for _at, message in seen]
    check_skipped(updates, previous=0)
    assert updates[-1]["seq"] == last
    assert sum(message["skipped"] for message in updates) + len(updates) == last
    assert len(updates) <= took * RATE + 2, (len(updates), took)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(seen)]
    # Received, not written: loose bound for loop and network jitter.
    assert min(gaps) >= 0.5 * INTERVAL, gaps
    await ws.close()


async def test_the_last_update_of_a_burst_arrives_within_one_interval(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,))
    ws = await client.ws_connect(paths.ws_market(ZONE), params={"max_rate": "2"})
    assert (await receive_json(ws))["type"] == "connection_established"
    for _burst in range(2):
        sent = time.monotonic()
        last = (await publish(client, *[price(float(i)) for i in range(50)]))[-1]["seq"]
        seen = await timed_updates(ws, until_seq=last)
        assert seen[-1][1]["seq"] == last
        assert len(seen) <= 2  # at most one from the burst's start, then its newest
        assert seen[-1][0] - sent <= 0.5 + 0.5  # 1/max_rate, plus generous noise
    await ws.close()


# --- resume -------------------------------------------------------------------------------


async def epoch_of(client: Client) -> str:
    ws = await client.ws_connect(paths.ws_market(ZONE))
    hello = await receive_json(ws)
    await ws.close()
    epoch: str = hello["epoch"]
    return epoch


async def test_a_resume_with_max_rate_replays_only_the_newest_missed_update(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE, "ercot"))
    await publish(client, *[price(float(i)) for i in range(10)])  # pjm 1..10
    await publish(client, *[price(float(i), "ercot") for i in range(4)])  # ercot 1..4
    epoch = await epoch_of(client)
    ws = await client.ws_connect(
        paths.ws_market(ZONE), params={"since": "3", "epoch": epoch, "max_rate": "4"}
    )
    assert (await receive_json(ws))["type"] == "connection_established"
    replay, done = await receive_json(ws), await receive_json(ws)
    assert replay["type"] == "price_update" and replay["replay"] is True
    assert (replay["seq"], replay["skipped"]) == (10, 6)
    assert done["type"] == "resume_complete" and done["recovered"] is True
    assert (done["from_seq"], done["to_seq"]) == (4, 10)
    await ws.close()
    # The multi-zone socket: per zone, in a subscribe.
    ws = await client.ws_connect(f"{paths.WS_PRICES}?zones=")
    assert (await receive_json(ws))["type"] == "connection_established"
    await ws.send_str(orjson.dumps({
        "type": "subscribe", "zones": [ZONE, "ercot"], "since": {ZONE: 8, "ercot": 0},
        "epoch": epoch, "max_rate": 4,
    }).decode())  # fmt: skip
    seen = [await receive_json(ws) for _ in range(5)]
    assert [m["type"] for m in seen] == [
        "subscribed", "price_update", "resume_complete", "price_update", "resume_complete",
    ]
    assert (seen[1]["seq"], seen[1]["skipped"], seen[1]["replay"]) == (10, 1, True)
    assert (seen[3]["market_zone"], seen[3]["seq"], seen[3]["skipped"]) == ("ercot", 4, 3)
    assert seen[2]["recovered"] is True and seen[4]["recovered"] is True
    # Live updates after it are paced from the replayed seq.
    last = (await publish(client, *[price(float(i)) for i in range(5)]))[-1]["seq"]
    updates = [message for _at, message in await timed_updates(ws, until_seq=last)]
    check_skipped(updates, previous=10)
    await ws.close()


# --- SSE ----------------------------------------------------------------------------------


async def test_sse_paces_by_url_and_resumes_the_newest_only(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,))
    path = paths.sse_market(ZONE)
    async with sse_stream(client, path, params={"max_rate": str(RATE)}) as events:
        assert (await events.next()).type == "connection_established"
        last = 30
        updates: list[dict[str, Any]] = []
        times: list[float] = []

        async def receive() -> None:
            async with asyncio.timeout(WAIT):
                while not updates or updates[-1]["seq"] != last:
                    event = await events.next()
                    if event.type == "price_update":
                        updates.append(event.data)
                        times.append(time.monotonic())

        receiving = asyncio.create_task(receive())
        assert await publish_paced(client, last, every=0.01) == last
        await receiving
        check_skipped(updates, previous=0)
        assert len(updates) < last  # paced: fewer than published
        assert all(b - a >= 0.5 * INTERVAL for a, b in itertools.pairwise(times))
        cursor = events.last_id
    assert cursor is not None
    await publish(client, *[price(float(i)) for i in range(7)])  # missed: last+1..last+7
    headers = {"Last-Event-ID": cursor}
    async with sse_stream(client, path, params={"max_rate": "4"}, headers=headers) as events:
        seen = await events.until(lambda event: event.type == "resume_complete")
    replays = [event.data for event in seen if event.type == "price_update"]
    assert len(replays) == 1 and replays[0]["replay"] is True
    assert (replays[0]["seq"], replays[0]["skipped"]) == (last + 7, 6)
    assert seen[-1].data["recovered"] is True


# --- shared writes, toggling, conflation ----------------------------------------------------------


async def test_many_subscribers_at_one_rate_share_one_write_per_tick(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,))
    broadcaster: Broadcaster = client.app[BROADCASTER]
    sockets = []
    for _ in range(20):
        ws = await client.ws_connect(paths.ws_market(ZONE), params={"max_rate": str(RATE)})
        assert (await receive_json(ws))["type"] == "connection_established"
        sockets.append(ws)
    await eventually(lambda: all(c.audience is not None for c in broadcaster.connections))
    last = await publish_paced(client, 30, every=0.01)
    for ws in sockets:
        updates = [message for _at, message in await timed_updates(ws, until_seq=last)]
        check_skipped(updates, previous=0)
    audiences = {id(connection.audience) for connection in broadcaster.connections}
    assert len(audiences) == 1  # one audience: its shared write serves all 20
    # One paced frame per firing, not one per subscriber.
    assert 0 < broadcaster.paced_frames <= broadcaster.paced_firings
    for ws in sockets:
        await ws.close()


async def test_toggling_rates_keeps_one_group_per_zone(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,), client_rate_limit=1000.0)
    broadcaster: Broadcaster = client.app[BROADCASTER]
    ws = await client.ws_connect(f"{paths.WS_PRICES}?zones=")
    assert (await receive_json(ws))["type"] == "connection_established"
    await publish(client, price(1.0))
    for index in range(200):
        await ws.send_str(orjson.dumps(
            {"type": "subscribe", "zones": [ZONE], "max_rate": 1 + index % 50}
        ).decode())  # fmt: skip
    await ws.send_str('{"type": "ping"}')
    async with asyncio.timeout(WAIT):
        while (await receive_json(ws))["type"] != "pong":
            pass
    assert sum(len(groups) for groups in broadcaster._groups.values()) <= 1
    assert len(broadcaster._audiences) <= 1
    await ws.close()
    await eventually(lambda: not broadcaster._groups and not broadcaster._audiences)


async def test_slow_reader_conflation_says_how_many_it_skipped(make_client: MakeClient) -> None:
    client = await make_client(send_high_water=16 * 1024, send_hard_limit=64 * 1024 * 1024)
    stalled, connection = await open_stalled(client, paths.ws_market(ZONE))
    await publish_until(client, lambda: connection.conflated is not None)
    for value in (1.25, 1.5):
        final = (await publish(client, price(value)))[0]["seq"]
    stalled.resume()
    previous, conflated = 0, None
    async with asyncio.timeout(WAIT):
        while conflated is None:
            message = await stalled.message()
            if message["type"] != "price_update":
                continue
            if message.get("conflated"):
                conflated = message
            else:
                assert "skipped" not in message  # every update: nothing to say
                previous = message["seq"]
    assert conflated["seq"] == final and conflated["skipped"] == final - previous - 1 > 0
    stalled.close()


async def test_zone_status_goes_before_the_zone_s_next_paced_update(
    make_client: MakeClient,
) -> None:
    # Stale after 3 intervals: the paced update comes before the zone is stale again.
    client = await make_client(zones=(ZONE,), stale_after=3 * INTERVAL)
    await publish(client, price(1.0))
    ws = await client.ws_connect(paths.ws_market(ZONE), params={"max_rate": str(RATE)})
    async with asyncio.timeout(WAIT):
        while (message := await receive_json(ws))["type"] != "zone_status":
            pass
    assert message["status"] == "stale"
    last = (await publish(client, *[price(float(i)) for i in range(5)]))[-1]["seq"]
    async with asyncio.timeout(WAIT):
        while (message := await receive_json(ws))["type"] not in {"zone_status", "price_update"}:
            pass
        assert (message["type"], message["status"]) == ("zone_status", "live")
        update = await receive_json(ws)
    assert update["type"] == "price_update" and update["seq"] <= last
    assert update["skipped"] == update["seq"] - 1 - 1  # after initial_data's seq 1
    await ws.close()


async def test_a_subscriber_out_of_step_joins_its_audience_after_one_firing(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,))
    broadcaster: Broadcaster = client.app[BROADCASTER]
    # 2/s: the second socket opens well before the first one's next firing, so its seq (6)
    # is not its audience's (1) until that firing.
    params = {"max_rate": "2"}
    first = await client.ws_connect(paths.ws_market(ZONE), params=params)
    assert (await receive_json(first))["type"] == "connection_established"
    await publish(client, price(1.0))
    assert [m["seq"] for _at, m in await timed_updates(first, until_seq=1)] == [1]
    await publish(client, *[price(float(i)) for i in range(5)])  # 2..6, paced for `first`
    second = await client.ws_connect(paths.ws_market(ZONE), params=params)
    hello = await receive_json(second)
    initial = await receive_json(second)
    assert (initial["type"], initial["latest_price"]["seq"]) == ("initial_data", 6)
    mine = next(c for c in broadcaster.connections if c.id == hello["connection_id"])
    theirs = next(c for c in broadcaster.connections if c is not mine)
    assert [(m["seq"], m["skipped"]) for _at, m in await timed_updates(first, until_seq=6)] == [
        (6, 4),
    ]
    await eventually(lambda: mine.audience is not None and mine.audience is theirs.audience)
    last = (await publish(client, *[price(float(i)) for i in range(3)]))[-1]["seq"]
    for ws in (first, second):  # from now on one shared write: the same frames for both
        updates = [m for _at, m in await timed_updates(ws, until_seq=last)]
        check_skipped(updates, previous=6)
        await ws.close()
