"""``gap`` (PROTOCOL.md, "Holes said in-band: gap"), black-box through real sockets and
SSE streams: a resume beyond the retained history (``history_exceeded``), a resume with
another epoch (``epoch_changed``), and a hole the Redis subscriber cannot fill
(``lost``), each said before the zone's next update, a resume's with ``recovered: false``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.wire import paths
from tests.harness.redisproc import RedisProcess
from tests.harness.ssestream import EventStream
from tests.harness.support import (
    Client,
    MakeClient,
    make_settings,
    publish,
    receive_json,
    receive_until,
)

ZONE = "pjm"


async def numbered(client: Client, count: int) -> str:
    """Publish ``count`` prices of ``ZONE`` (seqs 1..count); the server's epoch."""
    for index in range(count):
        await publish(client, {"market_zone": ZONE, "price": 40.0 + index})
    stats = await client.get(paths.STATS)
    assert stats.status == 200
    ws = await client.ws_connect(paths.ws_market(ZONE))
    try:
        hello = await receive_json(ws)
    finally:
        await ws.close()
    epoch: str = hello["epoch"]
    return epoch


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [message["type"] for message in messages]


async def ws_resume(client: Client, query: str) -> list[dict[str, Any]]:
    ws = await client.ws_connect(f"{paths.ws_market(ZONE)}?{query}")
    try:
        return await receive_until(ws, lambda m: m["type"] == "resume_complete")
    finally:
        await ws.close()


async def sse_resume(client: Client, query: str) -> list[Any]:
    response = await client.get(f"{paths.sse_market(ZONE)}?{query}")
    assert response.status == 200, await response.text()
    stream = EventStream(response)
    try:
        events = await stream.until(lambda event: event.type == "resume_complete")
    finally:
        response.close()
    return events


async def test_ws_resume_beyond_history_is_a_gap_before_initial_data(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,), history_size=3)
    epoch = await numbered(client, 6)  # retained: 4, 5, 6
    seen = await ws_resume(client, f"since=1&epoch={epoch}")
    assert kinds(seen)[-3:] == ["gap", "initial_data", "resume_complete"], seen
    gap, initial, done = seen[-3:]
    assert gap["market_zone"] == ZONE and gap["reason"] == "history_exceeded"
    # 4 and 5 are still in the history, but this stream never sends them: initial_data
    # gives 6, so the gap names every seq between the cursor and it.
    assert (gap["from_seq"], gap["to_seq"]) == (2, 5)
    assert "epoch" not in gap
    assert initial["latest_price"]["seq"] == 6
    assert done["recovered"] is False


async def test_sse_resume_beyond_history_is_a_gap_event_without_id(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=(ZONE,), history_size=3)
    epoch = await numbered(client, 6)
    events = await sse_resume(client, f"since=1&epoch={epoch}")
    assert [event.type for event in events][-3:] == ["gap", "initial_data", "resume_complete"]
    gap = events[-3]
    assert gap.id is None  # not a cursor: a reconnect resumes from the prices' ids
    assert gap.data["reason"] == "history_exceeded"
    assert (gap.data["from_seq"], gap.data["to_seq"]) == (2, 5)
    assert events[-1].data["recovered"] is False


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_resume_with_another_epoch_is_an_epoch_changed_gap(
    make_client: MakeClient, transport: str
) -> None:
    client = await make_client(zones=(ZONE,))
    await numbered(client, 5)
    query = "since=2&epoch=gone"
    if transport == "ws":
        seen = await ws_resume(client, query)
    else:
        seen = [event.data for event in await sse_resume(client, query)]
    assert kinds(seen)[-3:] == ["gap", "initial_data", "resume_complete"], seen
    gap = seen[-3]
    assert gap["reason"] == "epoch_changed" and gap["epoch"] == "gone"
    assert gap["from_seq"] == 3 and gap["to_seq"] is None
    assert seen[-1]["recovered"] is False


async def test_a_resume_that_recovers_has_no_gap(make_client: MakeClient) -> None:
    client = await make_client(zones=(ZONE,), history_size=3)
    epoch = await numbered(client, 6)
    seen = await ws_resume(client, f"since=4&epoch={epoch}")
    assert "gap" not in kinds(seen)
    assert seen[-1]["recovered"] is True


async def test_a_hole_redis_cannot_fill_is_a_lost_gap_before_the_next_update(
    aiohttp_client: Any, prefix: str
) -> None:
    """A price announced on the prices channel after a hole no history holds (here: a
    forged announcement of seq last+5) reaches subscribers after a ``gap`` ``lost``."""
    from pricehub.server.app import create_app

    with RedisProcess() as redis_server:
        settings = make_settings(zones=(ZONE,), redis_url=redis_server.url, key_prefix=prefix)
        client: Client = await aiohttp_client(create_app(settings))
        await publish(client, {"market_zone": ZONE, "price": 1.0})
        ws = await client.ws_connect(paths.ws_market(ZONE))
        hello = await receive_json(ws)
        await receive_until(ws, lambda m: m["type"] == "initial_data")
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            channels = [c.decode() for c in await raw.pubsub_channels(f"{prefix}*prices")]
            assert len(channels) == 1, channels
            payload = orjson.dumps({
                "seq": 6, "accepted_at": "2026-01-01T00:00:00.000000Z", "market_zone": ZONE,
                "price": 9.0, "volume": None, "timestamp": "2026-01-01T00:00:00.000Z",
            })
            await raw.publish(channels[0], f"{hello['epoch']} {ZONE} ".encode() + payload)
        finally:
            await raw.aclose()
        seen = await receive_until(ws, lambda m: m["type"] == "price_update")
        await ws.close()
    assert kinds(seen) == ["gap", "price_update"], seen
    assert seen[0]["reason"] == "lost" and (seen[0]["from_seq"], seen[0]["to_seq"]) == (2, 5)
    assert seen[1]["seq"] == 6
