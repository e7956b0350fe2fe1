"""The Python client's side of PROTOCOL.md "A rate the client chooses: max_rate", against a
real server subprocess through real sockets: the client asks for a rate (on the URL for
every zone, by ``subscribe`` per zone), and each update it yields says in ``skipped``
how many it replaces; the newest price of a burst always arrives.
"""

from __future__ import annotations

import asyncio

import pytest

from pricehub.client.client import PriceClient, PriceUpdate
from pricehub.client.trading import Rates, format_rate
from tests.client.test_client import WAIT, GatedSleep, StatusLog, make_client, publish
from tests.harness.serverproc import ServerProcess

BURST = 20


async def until_seqs(client: PriceClient, last: dict[str, int]) -> list[PriceUpdate]:
    """Every update until each zone of ``last`` reached its seq there, bounded."""
    got: list[PriceUpdate] = []
    waiting = dict(last)
    async with asyncio.timeout(WAIT):
        async for event in client:
            assert isinstance(event, PriceUpdate), event
            got.append(event)
            if event.seq >= waiting.get(event.zone, event.seq + 1):
                del waiting[event.zone]
            if not waiting:
                return got
    raise AssertionError("the iterator ended")


def assert_skipped_adds_up(got: list[PriceUpdate], zone: str) -> None:
    """Each delivered update replaces exactly the seqs since the previous one."""
    seqs = [(u.seq, u.skipped) for u in got if u.zone == zone and not u.initial]
    previous = 0
    for seq, skipped in seqs:
        assert skipped == seq - previous - 1, seqs
        previous = seq


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_one_rate_for_every_zone(server: ServerProcess, transport: str) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(
        server.url, ("pjm", "ercot"), sleep, log, transport=transport, max_rate=2
    ) as client:
        await log.wait_for(lambda s: s.state == "connected")
        seqs = await publish(server, "pjm", *(float(n) for n in range(BURST)))
        got = await until_seqs(client, {"pjm": seqs[-1]})
    pjm = [u for u in got if u.zone == "pjm"]
    assert pjm[-1].seq == seqs[-1], "the newest price of the burst is delivered"
    assert len(pjm) <= 3, [u.seq for u in pjm]  # the first at once, then 2/s
    assert sum(u.skipped for u in pjm) == BURST - len(pjm)
    assert_skipped_adds_up(got, "pjm")


async def test_a_rate_per_zone_leaves_the_others_unlimited(server: ServerProcess) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(
        server.url, ("pjm", "ercot"), sleep, log, transport="ws", max_rate={"pjm": 1}
    ) as client:
        await log.wait_for(lambda s: s.state == "connected")
        pjm_seqs = await publish(server, "pjm", *(float(n) for n in range(BURST)))
        ercot_seqs = await publish(server, "ercot", *(float(n) for n in range(BURST)))
        got = await until_seqs(client, {"pjm": pjm_seqs[-1], "ercot": ercot_seqs[-1]})
    ercot = [u.seq for u in got if u.zone == "ercot"]
    pjm = [u for u in got if u.zone == "pjm"]
    assert ercot == ercot_seqs and all(u.skipped == 0 for u in got if u.zone == "ercot")
    assert pjm[-1].seq == pjm_seqs[-1] and len(pjm) <= 3
    assert_skipped_adds_up(got, "pjm")


def test_rates_are_checked_as_the_server_would() -> None:
    for bad in (0, -1, 1001, float("nan"), float("inf"), 1e-9, 0.0001, True, "4"):
        with pytest.raises(ValueError, match="max_rate"):
            PriceClient("http://127.0.0.1:1", "pjm", max_rate=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not watch"):
        PriceClient("http://127.0.0.1:1", "pjm", max_rate={"ercot": 1})
    assert [format_rate(r) for r in (0.5, 1000, 0.001, 4, 2.25)] == [
        "0.5", "1000", "0.001", "4", "2.25"
    ]


def test_which_rate_goes_where() -> None:
    one = Rates.parse(4, ("pjm", "ercot"))
    assert one.url_rate(("pjm", "ercot"), sse=False) == 4 and one.of("ercot") == 4
    assert not one.needs_subscribe("pjm")
    per_zone = Rates.parse({"pjm": 4, "ercot": 0.5}, ("pjm", "ercot", "caiso"))
    zones = ("pjm", "ercot", "caiso")
    assert per_zone.url_rate(zones, sse=False) is None  # set by subscribe, zone by zone
    assert per_zone.url_rate(zones, sse=True) == 0.5  # a stream has one rate: the lowest
    assert per_zone.url_rate(("pjm",), sse=True) == 4
    assert (per_zone.of("caiso"), per_zone.needs_subscribe("pjm")) == (None, True)


async def test_a_stream_of_several_zones_has_the_lowest_rate(server: ServerProcess) -> None:
    """SSE cannot be sent a ``subscribe``: per-zone rates become one, the lowest."""
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(
        server.url, ("pjm", "ercot"), sleep, log, transport="sse", max_rate={"pjm": 1}
    ) as client:
        await log.wait_for(lambda s: s.state == "connected")
        seqs = await publish(server, "ercot", *(float(n) for n in range(BURST)))
        got = await until_seqs(client, {"ercot": seqs[-1]})
    ercot = [u for u in got if u.zone == "ercot"]
    assert len(ercot) <= 3 and ercot[-1].seq == seqs[-1], [u.seq for u in ercot]
    assert_skipped_adds_up(got, "ercot")
