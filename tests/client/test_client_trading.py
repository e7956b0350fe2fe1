"""The Python client's side of PROTOCOL.md "Holes said in-band: gap" and "Silence said
in-band: zone_status", against a real server subprocess through real sockets: a ``Gap``
carries the server's exact range and reason, ``events()`` yields ``ZoneState`` changes
(the plain iterator never does), and a zone that went live while the client was away is
told live again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from pricehub.client.client import Gap, PriceClient, PriceUpdate, TradingEvent, ZoneState
from tests.client.test_client import (
    WAIT,
    GatedSleep,
    StatusLog,
    TcpProxy,
    make_client,
    publish,
    take,
)
from tests.harness.serverproc import ServerProcess
from tests.harness.support import PUBLISH_KEY, eventually

ZONE = "pjm"
STALE_AFTER = "0.3"


@pytest.fixture
def small_history() -> Iterator[ServerProcess]:
    with ServerProcess("--no-simulate", "--history-size", "3", publish_key=PUBLISH_KEY) as proc:
        yield proc


@pytest.fixture
def staling() -> Iterator[ServerProcess]:
    with ServerProcess("--no-simulate", "--stale-after", STALE_AFTER, publish_key=PUBLISH_KEY) as p:
        yield p


async def linked(server: ServerProcess) -> AsyncIterator[TcpProxy]:
    tcp = TcpProxy(server.port)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()


@pytest.fixture
async def proxy_small(small_history: ServerProcess) -> AsyncIterator[TcpProxy]:
    async for tcp in linked(small_history):
        yield tcp


@pytest.fixture
async def proxy_staling(staling: ServerProcess) -> AsyncIterator[TcpProxy]:
    async for tcp in linked(staling):
        yield tcp


async def next_events(client: PriceClient, count: int) -> list[TradingEvent]:
    """The next ``count`` items of ``client.events()``, bounded."""
    seen: list[TradingEvent] = []
    async with asyncio.timeout(WAIT):
        async for event in client.events():
            seen.append(event)
            if len(seen) == count:
                break
    return seen


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_resume_beyond_history_is_a_gap_with_the_exact_range(
    small_history: ServerProcess, proxy_small: TcpProxy, transport: str
) -> None:
    log, sleep = StatusLog(), GatedSleep(open_=False)
    url = f"http://127.0.0.1:{proxy_small.port}"
    async with make_client(url, ZONE, sleep, log, transport=transport) as client:
        await log.wait_for(lambda s: s.state == "connected")
        await publish(small_history, ZONE, 1.0)
        await take(client, 1)  # seq 1 delivered: the cursor
        proxy_small.cut()
        await log.wait_for(lambda s: s.state == "reconnecting")
        await publish(small_history, ZONE, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)  # retained: 5..7
        sleep.open()
        gap, current = await take(client, 2)
    assert isinstance(gap, Gap), gap
    assert (gap.zone, gap.last_seq, gap.reason) == (ZONE, 1, "history_exceeded")
    assert (gap.from_seq, gap.to_seq) == (2, 6)  # all it never gets before seq 7
    assert gap.epoch == gap.previous_epoch
    assert isinstance(current, PriceUpdate) and (current.seq, current.initial) == (7, True)


async def test_a_new_epoch_is_an_epoch_changed_gap_with_an_open_end(
    server: ServerProcess,
) -> None:
    log, sleep = StatusLog(), GatedSleep(open_=False)
    async with make_client(server.url, ZONE, sleep, log) as client:
        await log.wait_for(lambda s: s.state == "connected")
        await publish(server, ZONE, 10.0, 11.0)
        await take(client, 2)
        server.kill()
        await log.wait_for(lambda s: s.state == "reconnecting")
        await server.start_async()  # empty in-memory history: a new epoch
        await publish(server, ZONE, 20.0)
        sleep.open()
        gap, current = await take(client, 2)
    assert isinstance(gap, Gap), gap
    assert (gap.reason, gap.last_seq, gap.from_seq, gap.to_seq) == ("epoch_changed", 2, 3, None)
    assert gap.epoch != gap.previous_epoch
    assert isinstance(current, PriceUpdate) and current.seq == 1


async def test_events_yield_stale_then_live_before_the_next_price(staling: ServerProcess) -> None:
    await publish(staling, ZONE, 40.0)
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(staling.url, ZONE, sleep, log) as client:
        initial, stale = await next_events(client, 2)
        assert isinstance(initial, PriceUpdate) and initial.initial
        assert stale == ZoneState(ZONE, "stale", initial.accepted_at, 1)
        assert stale.stale and client.stale_zones == {ZONE: stale}
        await publish(staling, ZONE, 41.0)
        live, update = await next_events(client, 2)
    assert isinstance(live, ZoneState) and (live.status, live.stale) == ("live", False), live
    assert isinstance(update, PriceUpdate) and update.seq == 2
    assert client.stale_zones == {}


async def test_the_plain_iterator_never_yields_zone_states(staling: ServerProcess) -> None:
    """A loop written before ``zone_status`` existed (everything not a Gap is a price)."""
    await publish(staling, ZONE, 40.0)
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(staling.url, ZONE, sleep, log) as client:
        [initial] = await take(client, 1)
        # Read by the connection loop meanwhile, though nobody iterates events().
        await eventually(lambda: ZONE in client.stale_zones)
        await publish(staling, ZONE, 41.0)
        [update] = await take(client, 1)
    assert isinstance(initial, PriceUpdate) and isinstance(update, PriceUpdate)
    assert update.seq == 2


async def test_a_zone_that_went_live_while_away_is_told_live(
    staling: ServerProcess, proxy_staling: TcpProxy
) -> None:
    """The server says ``live`` only to sockets that saw the zone stale; a client that
    reconnects after the zone came back must not keep showing it stale."""
    await publish(staling, ZONE, 40.0)
    log, sleep = StatusLog(), GatedSleep(open_=False)
    async with make_client(f"http://127.0.0.1:{proxy_staling.port}", ZONE, sleep, log) as client:
        _, stale = await next_events(client, 2)
        assert isinstance(stale, ZoneState) and stale.stale
        proxy_staling.cut()
        await log.wait_for(lambda s: s.state == "reconnecting")
        await publish(staling, ZONE, 41.0)
        sleep.open()
        live, replayed = await next_events(client, 2)
    assert isinstance(live, ZoneState) and live.status == "live", live
    assert isinstance(replayed, PriceUpdate) and replayed.seq == 2
    assert client.stale_zones == {}
