"""``zone_status`` and ``--stale-after`` (PROTOCOL.md, "Silence said in-band"), black-box
through real sockets and SSE streams: stale after the silence, told to every subscriber
and to one opening the zone right after ``initial_data``, live again before the next
price; ``stale_zones`` in stats and ``pricehub_zones_stale`` in /metrics; across two
instances on one Redis, a zone kept alive by the other instance's publishes is live.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pricehub.server.app import create_app
from pricehub.server.settings import ConfigError
from pricehub.wire import paths
from tests.harness.redisproc import RedisProcess
from tests.harness.ssestream import EventStream
from tests.harness.support import (
    Client,
    MakeClient,
    eventually,
    make_settings,
    publish,
    receive_json,
    receive_until,
)

ZONE = "pjm"
STALE_AFTER = 0.3
WAIT = 5.0  # bound of waiting for an announcement due STALE_AFTER after the last price


def is_status(status: str) -> Any:
    return lambda m: m["type"] == "zone_status" and m["status"] == status


async def stale_gauge(client: Client) -> float:
    text = await (await client.get(paths.METRICS)).text()
    for family in text_string_to_metric_families(text):
        if family.name == "pricehub_zones_stale":
            return float(family.samples[0].value)
    raise AssertionError("no pricehub_zones_stale in /metrics")


async def stale_zones(client: Client) -> list[str]:
    zones: list[str] = (await (await client.get(paths.STATS)).json())["stale_zones"]
    return zones


async def test_stale_then_live_on_one_instance(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,), stale_after=STALE_AFTER)
    await publish(client, {"market_zone": ZONE, "price": 40.0})
    ws = await client.ws_connect(paths.ws_market(ZONE))
    opened = await receive_until(ws, lambda m: m["type"] == "initial_data")
    accepted_at = opened[-1]["latest_price"]["accepted_at"]
    stale = (await receive_until(ws, is_status("stale"), timeout=WAIT))[-1]
    assert stale["market_zone"] == ZONE and stale["since"] == accepted_at
    assert stale["last_seq"] == 1
    assert await stale_zones(client) == [ZONE]
    assert await stale_gauge(client) == 1.0

    # Opening a stale zone: told right after initial_data.
    late = await client.ws_connect(paths.ws_market(ZONE))
    assert (await receive_json(late))["type"] == "connection_established"
    assert (await receive_json(late))["type"] == "initial_data"
    assert (await receive_json(late, timeout=WAIT))["status"] == "stale"

    await publish(client, {"market_zone": ZONE, "price": 41.0})
    for socket in (ws, late):
        live, update = await receive_json(socket), await receive_json(socket)
        assert (live["type"], live["status"]) == ("zone_status", "live"), live
        assert (update["type"], update["seq"]) == ("price_update", 2)
    assert await stale_zones(client) == []
    assert await stale_gauge(client) == 0.0
    await ws.close()
    await late.close()


async def test_stale_on_sse_is_an_event_without_id(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,), stale_after=STALE_AFTER)
    await publish(client, {"market_zone": ZONE, "price": 40.0})
    response = await client.get(paths.sse_market(ZONE))
    stream = EventStream(response)
    try:
        events = await stream.until(lambda e: e.type == "zone_status", timeout=WAIT)
        assert events[-1].data["status"] == "stale" and events[-1].id is None
        await publish(client, {"market_zone": ZONE, "price": 41.0})
        live, update = await stream.next(), await stream.next()
        assert (live.type, live.data["status"]) == ("zone_status", "live")
        assert update.type == "price_update" and update.id is not None
    finally:
        response.close()


async def test_off_by_default(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,))
    await publish(client, {"market_zone": ZONE, "price": 40.0})
    assert await stale_zones(client) == []
    assert await stale_gauge(client) == 0.0


async def test_another_instances_publishes_keep_the_zone_live(
    aiohttp_client: Any, prefix: str
) -> None:
    """A and B on one Redis; only B is published to. A's subscriber sees no zone_status
    while B's prices flow (for several times --stale-after), then stale once they stop."""
    stale_after = 0.5
    with RedisProcess() as redis_server:
        def instance() -> Any:
            return create_app(make_settings(
                zones=(ZONE,), redis_url=redis_server.url, key_prefix=prefix,
                stale_after=stale_after,
            ))

        a: Client = await aiohttp_client(instance())
        b: Client = await aiohttp_client(instance())
        await publish(b, {"market_zone": ZONE, "price": 1.0})
        ws = await a.ws_connect(paths.ws_market(ZONE))
        await receive_until(ws, lambda m: m["type"] == "initial_data")
        seen: list[dict[str, Any]] = []
        ended = time.monotonic() + 4 * stale_after
        while time.monotonic() < ended:  # B publishes well within every --stale-after
            accepted = await publish(b, {"market_zone": ZONE, "price": 2.0})
            seen += await receive_until(
                ws, lambda m, seq=accepted[0]["seq"]: m.get("seq") == seq
            )
            await asyncio.sleep(stale_after / 5)
        assert not [m for m in seen if m["type"] == "zone_status"], seen
        assert await stale_zones(a) == []
        stale = (await receive_until(ws, is_status("stale"), timeout=WAIT))[-1]
        assert stale["last_seq"] == seen[-1]["seq"]
        assert await stale_zones(a) == [ZONE]

        async def b_agrees() -> bool:  # B sweeps on its own timer: within its interval
            return await stale_zones(b) == [ZONE]

        await eventually(b_agrees, within=WAIT)
        await ws.close()


def test_a_bad_stale_after_is_refused() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="stale_after"):
            make_settings(stale_after=bad)
