"""The Python client's side of PROTOCOL.md "One consistent picture of many zones" and
"History by market time", against a real server subprocess through real sockets:
``client.history`` pages a range without losing or repeating a price (also where prices
share a timestamp at a page's edge), ``client.snapshot`` reads every zone at one instant,
and ``since``/``epoch`` start the stream from a snapshot's cursor vector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pricehub.client.client import ClientError, Gap, HistoryPage, PriceClient, PriceUpdate
from tests.client.test_client import (
    WAIT,
    GatedSleep,
    StatusLog,
    _established,
    _sse,
    _update,
    make_client,
    publish,
    scripted,
    take,
    updates,
)
from tests.harness.serverproc import ServerProcess

__all__ = ["scripted"]  # the fixture, imported for pytest

ZONES = ("pjm", "ercot")
DAY = datetime(2026, 11, 27, tzinfo=UTC)


def at(minute: int) -> str:
    return (DAY + timedelta(minutes=minute)).isoformat()


async def publish_at(server: ServerProcess, *rows: tuple[str, int, float]) -> list[int]:
    """Publish (zone, minute of DAY, price) rows in one batch; their seqs."""
    accepted = await server.publish(
        *({"market_zone": zone, "price": price, "timestamp": at(minute)}
          for zone, minute, price in rows)
    )  # fmt: skip
    return [entry["seq"] for entry in accepted]


async def all_pages(client: PriceClient, *args: Any, **kwargs: Any) -> list[HistoryPage]:
    pages: list[HistoryPage] = []
    async with asyncio.timeout(WAIT):
        async for page in client.history(*args, **kwargs):
            pages.append(page)
    return pages


def keys(prices: Any) -> list[tuple[str, str, int]]:
    return [(p.timestamp, p.zone, p.seq) for p in prices]


# Prices of two zones, several at one market time, published out of time order: a page
# of 3 cuts inside the groups of equal timestamps.
ROWS = [
    ("pjm", 10, 1.0), ("ercot", 10, 2.0), ("pjm", 10, 3.0), ("ercot", 5, 4.0),
    ("pjm", 20, 5.0), ("ercot", 20, 6.0), ("ercot", 20, 7.0), ("pjm", 20, 8.0),
    ("pjm", 30, 9.0), ("ercot", 70, 10.0),  # after the range asked for
]


async def test_history_pages_cover_the_range_once_in_time_order(server: ServerProcess) -> None:
    await publish_at(server, *ROWS)
    client = PriceClient(server.url, ZONES)
    try:
        pages = await all_pages(client, ZONES, DAY, DAY + timedelta(hours=1), limit=3)
        [whole] = await all_pages(client, None, at(0), at(60), limit=100)
    finally:
        await client.close()
    got = [price for page in pages for price in page.prices]
    expected = sorted(keys(whole.prices))
    assert keys(got) == expected == keys(whole.prices)
    assert len(got) == 9, "every price of [00:00, 01:00) once; 01:10 is outside"
    assert len(set(keys(got))) == len(got)
    assert [page.more for page in pages] == [True] * (len(pages) - 1) + [False]
    assert all(isinstance(p, PriceUpdate) and p.accepted_at for p in got)
    # The cursor hands over to the live stream: the highest seq of each zone given.
    assert pages[-1].cursor == {"pjm": 5, "ercot": 4}  # seqs in publish order per zone
    assert pages[-1].cursor == {
        zone: max(p.seq for p in got if p.zone == zone) for zone in ZONES
    }


async def test_more_prices_at_one_timestamp_than_a_page_holds(server: ServerProcess) -> None:
    await publish_at(server, *(("pjm", 10, float(n)) for n in range(5)), ("pjm", 11, 9.0))
    client = PriceClient(server.url, "pjm")
    try:
        pages = await all_pages(client, "pjm", at(0), at(60), limit=2)
    finally:
        await client.close()
    got = [price for page in pages for price in page.prices]
    assert [p.seq for p in got] == [1, 2, 3, 4, 5, 6]


async def test_history_without_an_end_keeps_the_first_answers_end(server: ServerProcess) -> None:
    await publish_at(server, ("pjm", 1, 1.0), ("pjm", 2, 2.0), ("pjm", 3, 3.0))
    client = PriceClient(server.url, "pjm")
    try:
        pages = await all_pages(client, "pjm", at(0), limit=1)
    finally:
        await client.close()
    assert [p.seq for page in pages for p in page.prices] == [1, 2, 3]
    assert len({page.end for page in pages}) == 1 and pages[0].end is not None


async def test_an_empty_range_is_one_empty_page_and_bad_ranges_are_errors(
    server: ServerProcess,
) -> None:
    client = PriceClient(server.url, ZONES)
    try:
        [page] = await all_pages(client, ZONES, at(0), at(60))
        assert (page.prices, page.more, page.cursor) == ((), False, {})
        with pytest.raises(ClientError, match="HTTP 422"):
            await all_pages(client, ZONES, at(60), at(0))  # from after to
        with pytest.raises(ClientError, match="HTTP 422"):
            await all_pages(client, ("pjm", "atlantis"), at(0), at(60))
        with pytest.raises(ValueError, match="offset"):
            await all_pages(client, ZONES, datetime(2026, 11, 27), at(60))  # naive
    finally:
        await client.close()


async def test_http_snapshot_is_every_zone_with_its_cursor(server: ServerProcess) -> None:
    await publish(server, "pjm", 40.0, 41.0)
    client = PriceClient(server.url, ("pjm", "ercot", "caiso"))
    try:
        snap = await client.snapshot(via="http")
    finally:
        await client.close()
    assert snap.via == "http"
    assert snap.cursor == {"pjm": 2, "ercot": 0, "caiso": 0}
    pjm = snap.prices["pjm"]
    assert pjm is not None and (pjm.price, pjm.seq) == (41.0, 2)
    assert snap.prices["ercot"] is None and snap.prices["caiso"] is None
    assert isinstance(snap.epoch, str) and snap.epoch


@pytest.mark.parametrize("transport", ["ws", "sse"])
@pytest.mark.parametrize("zones", [("pjm",), ZONES], ids=["one-zone", "two-zones"])
async def test_since_a_snapshot_the_stream_is_contiguous(
    server: ServerProcess, transport: str, zones: tuple[str, ...]
) -> None:
    """The stream after a snapshot starts right after its cursor: what was published in
    between is replayed, nothing before it repeated, no ``initial_data`` instead."""
    for zone in zones:
        await publish(server, zone, 10.0, 11.0)
    reader = PriceClient(server.url, zones)
    try:
        snap = await reader.snapshot(via="http")
    finally:
        await reader.close()
    between = {zone: await publish(server, zone, 12.0, 13.0) for zone in zones}
    log, sleep = StatusLog(), GatedSleep()
    client = make_client(
        server.url, zones, sleep, log, transport=transport, since=snap.cursor, epoch=snap.epoch
    )
    async with client:
        await log.wait_for(lambda s: s.state == "connected")
        got = updates(await take(client, 2 * len(zones)))
        live = {zone: await publish(server, zone, 14.0) for zone in zones}
        got += updates(await take(client, len(zones)))
    for zone in zones:
        seqs = [u.seq for u in got if u.zone == zone]
        assert seqs == [*between[zone], *live[zone]], (zone, got)
    assert not any(u.initial for u in got)
    assert all(u.replay for u in got if u.seq in (3, 4))


async def test_socket_snapshot_then_every_later_update_follows_the_cursor(
    server: ServerProcess,
) -> None:
    """PROTOCOL.md: every price_update the socket gets after the snapshot has seq >
    cursor[zone], and none is missing (needs the server's ``snapshot`` message)."""
    await publish(server, "pjm", 1.0, 2.0)
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, ZONES, sleep, log, transport="ws") as client:
        await log.wait_for(lambda s: s.state == "connected")
        snap = await client.snapshot(timeout=5)
        assert snap.via == "socket"
        assert snap.cursor == {"pjm": 2, "ercot": 0}
        after = await publish(server, "pjm", 3.0, 4.0)
        got = updates(await take(client, 3))  # initial_data (seq 2), then 3 and 4
    assert [u.seq for u in got if not u.initial] == after


async def test_snapshot_refusals_are_client_errors(server: ServerProcess) -> None:
    client = PriceClient(server.url, ("pjm", "atlantis"))
    try:
        with pytest.raises(ClientError, match="HTTP 422"):
            await client.snapshot(via="http")
    finally:
        await client.close()


def test_since_and_epoch_go_together() -> None:
    with pytest.raises(ValueError, match="together"):
        PriceClient("http://127.0.0.1:1", ZONES, since={"pjm": 1})
    with pytest.raises(ValueError, match="does not watch"):
        PriceClient("http://127.0.0.1:1", ZONES, since={"caiso": 1}, epoch="e")
    with pytest.raises(ValueError, match="non-negative"):
        PriceClient("http://127.0.0.1:1", ZONES, since={"pjm": -1}, epoch="e")


async def test_a_stream_resumes_from_the_url_vector_and_without_it_if_refused(
    scripted: Callable[..., Any],
) -> None:
    """An SSE stream of several zones without a cursor of its own carries the vector on its
    URL (``since=pjm:1,ercot:2&epoch=e1``); a server refusing it (400) gets the stream again
    at once without it, and the zones report what they missed as gaps."""
    fake, url = await scripted(
        (400, '{"error": "invalid_cursor", "message": "no"}'),
        [_sse(_established()), _sse(_update(9), "c9")],
    )
    client = make_client(
        url, ZONES, GatedSleep(), StatusLog(), transport="sse", since={"pjm": 1, "ercot": 2},
        epoch="e1",
    )  # fmt: skip
    async with client:
        events = await take(client, 3)
    first, second = (request.query for request in fake.requests[:2])
    assert (first["zones"], first["since"], first["epoch"]) == ("pjm,ercot", "pjm:1,ercot:2", "e1")
    assert "since" not in second and "epoch" not in second
    gaps = [event for event in events if isinstance(event, Gap)]
    assert sorted((gap.zone, gap.last_seq) for gap in gaps) == [("ercot", 2), ("pjm", 1)]
    assert isinstance(events[-1], PriceUpdate) and events[-1].seq == 9
