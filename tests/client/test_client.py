"""pricehub.client.client against a real server subprocess, through real sockets.

Reconnect delays are checked exactly by injecting ``random`` and ``sleep``; connection loss
without a server restart is produced by a TCP proxy between client and server that can cut
or freeze every link, like a flaky network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiohttp.web
import jwt
import pytest

from pricehub.client.backoff import Backoff
from pricehub.client.client import (
    Gap,
    PriceClient,
    PriceUpdate,
    ReconnectFailed,
    Status,
    TerminalCloseError,
)
from pricehub.client.sse import MAX_EVENT_CHARS, SseEvent, SseParser
from tests.harness.serverproc import ServerProcess
from tests.harness.support import PUBLISH_KEY

WAIT = 10.0  # upper bound of every wait; the happy path takes milliseconds
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class TcpProxy:
    """Forwards 127.0.0.1:port to the server; ``cut()`` aborts every link, ``freeze()``
    keeps them open but stops forwarding (a half-open connection)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._links.discard(writer)

    def cut(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()

    def freeze(self) -> None:
        self._flowing.clear()

    async def close(self) -> None:
        self._flowing.set()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[TcpProxy]:
    tcp = TcpProxy(server.port)
    await tcp.start()
    yield tcp
    await tcp.close()


class StatusLog:
    """Collects ``on_status`` calls; ``wait_for`` waits (bounded) for a matching one."""

    def __init__(self) -> None:
        self.statuses: list[Status] = []
        self._changed = asyncio.Event()

    def __call__(self, status: Status) -> None:
        self.statuses.append(status)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[Status], bool], *, after: int = 0) -> Status:
        async with asyncio.timeout(WAIT):
            while True:
                for status in self.statuses[after:]:
                    if predicate(status):
                        return status
                self._changed.clear()
                await self._changed.wait()

    def states(self) -> list[str]:
        return [status.state for status in self.statuses]


class GatedSleep:
    """An injected ``sleep``: records each delay, then waits for the test to ``open()``
    the gate (open from the start = return at once)."""

    def __init__(self, *, open_: bool = True) -> None:
        self.delays: list[float] = []
        self._gate = asyncio.Event()
        if open_:
            self._gate.set()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self._gate.wait()

    def open(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self._gate.clear()


def make_client(
    base_url: str, zones: str | tuple[str, ...], sleep: GatedSleep, log: StatusLog, **kwargs: Any
) -> PriceClient:
    kwargs.setdefault("backoff", Backoff(random=lambda: 0.5))
    return PriceClient(base_url, zones, sleep=sleep, on_status=log, **kwargs)


async def take(client: PriceClient, count: int) -> list[PriceUpdate | Gap]:
    events: list[PriceUpdate | Gap] = []
    async with asyncio.timeout(WAIT):
        async for event in client:
            events.append(event)
            if len(events) == count:
                break
    return events


async def publish(server: ServerProcess, zone: str, *prices: float) -> list[int]:
    accepted = await server.publish(*({"market_zone": zone, "price": p} for p in prices))
    return [entry["seq"] for entry in accepted]


def updates(events: list[PriceUpdate | Gap]) -> list[PriceUpdate]:
    assert all(isinstance(event, PriceUpdate) for event in events), events
    return [event for event in events if isinstance(event, PriceUpdate)]


async def test_receives_published_prices(server: ServerProcess) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, "pjm", sleep, log) as client:
        await log.wait_for(lambda s: s.state == "connected")
        await server.publish(
            {
                "market_zone": "pjm",
                "price": -12.5,
                "volume": 10,
                "timestamp": "2026-11-27T16:00:00+01:00",
            },
            {"market_zone": "pjm", "price": 41.25},
        )
        first, second = updates(await take(client, 2))
    assert (first.zone, first.price, first.volume, first.seq) == ("pjm", -12.5, 10.0, 1)
    assert first.timestamp == "2026-11-27T15:00:00.000Z"
    assert (second.price, second.volume, second.seq) == (41.25, None, 2)
    assert TIMESTAMP.match(second.timestamp)
    assert (first.replay, first.conflated, first.initial) == (False, False, False)
    assert log.states() == ["connecting", "connected", "closed"]
    assert sleep.delays == []


async def test_current_price_arrives_as_initial_data(server: ServerProcess) -> None:
    await publish(server, "ercot", 30.0, 31.0)
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, ("ercot", "pjm"), sleep, log) as client:
        [initial] = updates(await take(client, 1))
        assert (initial.zone, initial.price, initial.seq, initial.initial) == (
            "ercot",
            31.0,
            2,
            True,
        )
        await publish(server, "pjm", 5.0)
        [live] = updates(await take(client, 1))
    assert (live.zone, live.seq, live.initial) == ("pjm", 1, False)


@pytest.mark.parametrize("zones", [("pjm",), ("pjm", "caiso")], ids=["single", "multi"])
async def test_resume_after_a_cut_replays_every_missed_update_once(
    server: ServerProcess, proxy: TcpProxy, zones: tuple[str, ...]
) -> None:
    log, sleep = StatusLog(), GatedSleep(open_=False)
    async with make_client(f"http://127.0.0.1:{proxy.port}", zones, sleep, log) as client:
        await log.wait_for(lambda s: s.state == "connected")
        for zone in zones:
            await publish(server, zone, 1.0, 2.0)
        before = updates(await take(client, 2 * len(zones)))

        proxy.cut()
        await log.wait_for(lambda s: s.state == "reconnecting")
        for zone in zones:
            await publish(server, zone, 3.0, 4.0, 5.0)  # published while disconnected
        sleep.open()
        replayed = updates(await take(client, 3 * len(zones)))
        await log.wait_for(lambda s: s.state == "connected", after=2)
        for zone in zones:
            await publish(server, zone, 6.0)
        live = updates(await take(client, len(zones)))

    assert sleep.delays == [1.5]
    assert {u.replay for u in replayed} == {True}
    assert {u.replay for u in before + live} == {False}
    for zone in zones:
        seen = [u.seq for u in before + replayed + live if u.zone == zone]
        assert seen == [1, 2, 3, 4, 5, 6], zone


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_server_restart_surfaces_a_gap_then_the_new_numbering(
    server: ServerProcess, how: str
) -> None:
    log, sleep = StatusLog(), GatedSleep(open_=False)
    async with make_client(server.url, "pjm", sleep, log) as client:
        await log.wait_for(lambda s: s.state == "connected")
        await publish(server, "pjm", 10.0, 11.0, 12.0)
        assert [u.seq for u in updates(await take(client, 3))] == [1, 2, 3]
        if how == "sigkill":
            server.kill()
        else:
            assert await server.stop_async() == 0
        reconnecting = await log.wait_for(lambda s: s.state == "reconnecting")
        await server.start_async()  # same port, empty in-memory history, new epoch
        await publish(server, "pjm", 20.0, 21.0)
        sleep.open()
        gap, current = await take(client, 2)
        await publish(server, "pjm", 22.0)
        [live] = updates(await take(client, 1))

    if how == "sigterm":
        assert reconnecting.code == 1001
    assert isinstance(gap, Gap)
    assert (gap.zone, gap.last_seq) == ("pjm", 3)
    assert gap.epoch != gap.previous_epoch
    assert isinstance(current, PriceUpdate)
    assert (current.seq, current.price, current.initial) == (2, 21.0, True)
    assert (live.seq, live.price) == (3, 22.0)


async def test_attempt_cap_then_failed_then_manual_reconnect(server: ServerProcess) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, "pjm", sleep, log) as client:
        await publish(server, "pjm", 1.0)
        await take(client, 1)  # as initial_data or as a live update: either sets a cursor
        assert await server.stop_async() == 0
        failed = await log.wait_for(lambda s: s.state == "failed")
        with pytest.raises(ReconnectFailed, match="gave up after 5 reconnect attempts"):
            await take(client, 1)

        assert sleep.delays == [1.5, 2.5, 4.5, 8.5, 16.5]
        attempts = [(s.attempt, s.delay) for s in log.statuses if s.state == "reconnecting"]
        assert attempts == list(enumerate(sleep.delays, start=1))
        assert failed.code is None  # the last attempt could not even connect

        await server.start_async()
        mark = len(log.statuses)
        await client.reconnect()
        await log.wait_for(lambda s: s.state == "connected", after=mark)
        await publish(server, "pjm", 2.0)
        gap, update = await take(client, 2)
    assert isinstance(gap, Gap)
    assert isinstance(update, PriceUpdate)
    assert (update.seq, update.price) == (1, 2.0)


async def test_unknown_zone_is_terminal(server: ServerProcess) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, "nosuchzone", sleep, log) as client:
        with pytest.raises(TerminalCloseError) as caught:
            await take(client, 1)
    assert caught.value.code == 1008
    assert str(caught.value) == "server closed the connection with 1008: unknown zone nosuchzone"
    assert sleep.delays == []
    assert [s.state for s in log.statuses] == ["connecting", "failed", "closed"]
    assert log.statuses[1].code == 1008


async def test_counter_resets_only_after_ten_stable_seconds(
    server: ServerProcess, proxy: TcpProxy
) -> None:
    now = [0.0]
    log, sleep = StatusLog(), GatedSleep()
    backoff = Backoff(random=lambda: 0.0, clock=lambda: now[0])
    async with make_client(f"http://127.0.0.1:{proxy.port}", "pjm", sleep, log, backoff=backoff):
        mark = 0
        for open_for, expected_attempt in [(9.0, 1), (9.99, 2), (10.0, 1)]:
            await log.wait_for(lambda s: s.state == "connected", after=mark)
            mark = len(log.statuses)
            now[0] += open_for
            proxy.cut()
            status = await log.wait_for(lambda s: s.state == "reconnecting", after=mark)
            assert status.attempt == expected_attempt, (open_for, log.statuses)


async def test_sends_heartbeats(server: ServerProcess) -> None:
    async def received() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.url + "/api/ws/ws/stats") as response,
        ):
            stats = await response.json()
        return int(stats["statistics"]["total_messages_received"])

    log, sleep = StatusLog(), GatedSleep()
    async with make_client(server.url, "pjm", sleep, log, heartbeat_interval=0.1):
        await log.wait_for(lambda s: s.state == "connected")
        start = await received()
        async with asyncio.timeout(WAIT):
            # The counter lives in another process: polling is the only way to watch it.
            while await received() < start + 5:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_a_frozen_connection_is_detected_and_replaced(
    server: ServerProcess, proxy: TcpProxy
) -> None:
    log, sleep = StatusLog(), GatedSleep()
    async with make_client(
        f"http://127.0.0.1:{proxy.port}", "pjm", sleep, log, heartbeat_interval=0.2
    ):
        await log.wait_for(lambda s: s.state == "connected")
        proxy.freeze()
        status = await log.wait_for(lambda s: s.state == "reconnecting")
    assert status.error == "no frame from the server for 0.4 s"


async def test_close_ends_iteration(server: ServerProcess) -> None:
    log, sleep = StatusLog(), GatedSleep()
    client = make_client(server.url, ("pjm", "ercot"), sleep, log)
    client.start()
    await log.wait_for(lambda s: s.state == "connected")
    await client.close()
    assert await take(client, 1) == []
    assert log.states()[-1] == "closed"


@pytest.mark.parametrize(
    ("claims", "secret", "code"),
    [
        ({"zones": ["pjm"]}, "jwt-test-secret-of-at-least-32-bytes", None),
        ({"zones": ["ercot"]}, "jwt-test-secret-of-at-least-32-bytes", 4003),
        ({"zones": ["pjm"]}, "some-other-secret-of-at-least-32-bytes", 4001),
    ],
    ids=["allowed", "forbidden-zone", "bad-signature"],
)
async def test_tokens_are_sent_and_auth_closes_are_terminal(
    claims: dict[str, Any], secret: str, code: int | None
) -> None:
    token = jwt.encode({**claims, "exp": int(time.time()) + 300}, secret, algorithm="HS256")
    log, sleep = StatusLog(), GatedSleep()
    with ServerProcess(
        "--no-simulate",
        "--jwt-secret",
        "jwt-test-secret-of-at-least-32-bytes",
        publish_key=PUBLISH_KEY,
    ) as srv:
        async with make_client(srv.url, "pjm", sleep, log, token=token) as client:
            if code is None:
                await log.wait_for(lambda s: s.state == "connected")
                await publish(srv, "pjm", 7.0)
                [update] = updates(await take(client, 1))
                assert update.price == 7.0
            else:
                with pytest.raises(TerminalCloseError) as caught:
                    await take(client, 1)
                assert caught.value.code == code
    assert sleep.delays == []


# --- Server-Sent Events transport ------------------------------------------------------
# The parser and the fallback decisions are checked against a scripted SSE server (a real
# aiohttp server in the test, speaking the contract's format); the tests against the real
# pricehub run once the server has the SSE routes and skip while it answers 404.


def test_sse_parser_follows_the_event_stream_rules() -> None:
    parser = SseParser()
    lines = [
        "retry: 1000", ": ping", "event: connection_established", 'data: {"a":1}', "",
        "id: c1", "event: price_update", "data: x", "data:y", "", "data: plain", "",
    ]  # fmt: skip
    events = [event for line in lines if (event := parser.feed_line(line)) is not None]
    assert events == [
        SseEvent("connection_established", '{"a":1}', None),
        SseEvent("price_update", "x\ny", "c1"),
        SseEvent("message", "plain", "c1"),
    ]
    assert (parser.comments, parser.retry_ms, parser.last_event_id) == (1, 1000, "c1")


def test_sse_parser_drops_an_oversized_event() -> None:
    parser = SseParser()
    assert parser.feed_line("data: " + "x" * (MAX_EVENT_CHARS + 1)) is None
    assert parser.feed_line("") is None
    assert parser.feed_line("data: ok") is None
    assert parser.feed_line("") == SseEvent("message", "ok", None)


def _sse(message: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {message['type']}\ndata: {json.dumps(message)}\n\n".encode()


def _established(**extra: Any) -> dict[str, Any]:
    return {
        "type": "connection_established", "timestamp": "2026-11-27T15:00:00.000Z",
        "connection_id": "c", "zones": ["pjm", "ercot"], "storage_backend": "in-memory",
        "epoch": "e1", "heartbeat_interval": 5, "message": "hi", "transport": "sse", **extra,
    }  # fmt: skip


def _update(seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "price_update", "market_zone": "pjm", "price": 40.0 + seq, "volume": None,
        "seq": seq, "timestamp": "2026-11-27T15:00:00.000Z", **extra,
    }  # fmt: skip


def _resumed(zone: str) -> dict[str, Any]:
    return {
        "type": "resume_complete", "timestamp": "t", "market_zone": zone, "recovered": True,
        "from_seq": 0, "to_seq": 0,
    }  # fmt: skip


class ScriptedSse:
    """A server whose WebSocket path refuses the upgrade (like a proxy that strips it) and
    whose SSE path plays one script per request: a list of event chunks, or an HTTP status."""

    def __init__(self, scripts: list[list[bytes] | tuple[int, str]]) -> None:
        self.scripts = scripts
        self.requests: list[aiohttp.web.BaseRequest] = []
        self.ws_attempts = 0

    def app(self) -> aiohttp.web.Application:
        app = aiohttp.web.Application()
        app.router.add_get("/api/ws/ws/prices", self._refuse)
        app.router.add_get("/api/ws/sse/prices", self._stream)
        return app

    async def _refuse(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.ws_attempts += 1
        return aiohttp.web.Response(status=400, text="upgrade stripped")

    async def _stream(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        self.requests.append(request)
        script = self.scripts.pop(0) if self.scripts else (503, '{"message": "script over"}')
        if isinstance(script, tuple):
            return aiohttp.web.Response(
                status=script[0], text=script[1], content_type="application/json"
            )
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n: ping\n\n")
        for chunk in script:
            await response.write(chunk)
        return response  # the stream ends: the client must resume


@pytest.fixture
async def scripted(aiohttp_server: Any) -> Callable[..., Any]:
    async def start(*scripts: list[bytes] | tuple[int, str]) -> tuple[ScriptedSse, str]:
        fake = ScriptedSse(list(scripts))
        test_server = await aiohttp_server(fake.app())
        return fake, str(test_server.make_url("/"))

    return start


async def test_auto_falls_back_to_sse_and_resumes_with_last_event_id(
    scripted: Callable[..., Any],
) -> None:
    fake, url = await scripted(
        [_sse(_established()), _sse(_update(1), "c1"), _sse(_update(2), "c2")],
        [
            _sse(_established()), _sse(_update(2, replay=True), "c2"),
            _sse(_update(3, replay=True), "c3"), _sse(_resumed("pjm")), _sse(_resumed("ercot")),
            _sse(_update(4), "c4"),
        ],
    )  # fmt: skip
    log = StatusLog()
    async with make_client(url, ("pjm", "ercot"), GatedSleep(), log) as client:
        events = updates(await take(client, 4))
    assert [event.seq for event in events] == [1, 2, 3, 4]
    assert [event.replay for event in events] == [False, False, True, False]
    assert fake.ws_attempts == 1, "once the stream works, the client stays on it"
    assert [r.headers.get("Last-Event-ID") for r in fake.requests][:2] == [None, "c2"]
    assert fake.requests[0].query["zones"] == "pjm,ercot"
    connected = [s for s in log.statuses if s.state == "connected"]
    assert {s.transport for s in connected} == {"sse"}


async def test_ws_only_does_not_fall_back(scripted: Callable[..., Any]) -> None:
    fake, url = await scripted([_sse(_established())])
    backoff = Backoff(max_attempts=1, random=lambda: 0.0)
    client = make_client(url, ("pjm", "ercot"), GatedSleep(), StatusLog(), transport="ws",
                         backoff=backoff)  # fmt: skip
    async with client:
        with pytest.raises(ReconnectFailed, match=r"refused the WebSocket upgrade \(HTTP 400"):
            await take(client, 1)
    assert fake.requests == []


async def test_no_sse_endpoint_reports_the_websocket_failure(
    scripted: Callable[..., Any],
) -> None:
    fake, url = await scripted((404, "404: Not Found"))
    backoff = Backoff(max_attempts=1, random=lambda: 0.0)
    client = make_client(url, ("pjm", "ercot"), GatedSleep(), StatusLog(), backoff=backoff)
    async with client:
        with pytest.raises(ReconnectFailed, match="no SSE endpoint either"):
            await take(client, 1)
    assert (fake.ws_attempts, len(fake.requests)) == (2, 1), "SSE is not asked again"


async def test_sse_refusals_follow_the_close_code_rules(scripted: Callable[..., Any]) -> None:
    _, url = await scripted((401, '{"error": "invalid_token", "message": "token expired"}'))
    client = make_client(url, ("pjm", "ercot"), GatedSleep(), StatusLog(), transport="sse")
    async with client:
        with pytest.raises(TerminalCloseError) as caught:
            await take(client, 1)
    assert caught.value.code == 4001
    assert "token expired" in str(caught.value)


async def test_a_malformed_message_is_skipped_and_the_stream_goes_on(
    scripted: Callable[..., Any],
) -> None:
    """A price that breaks the contract (a string price, no seq) is dropped, not delivered
    as a guess nor allowed to end the connection."""
    _, url = await scripted(
        [
            _sse(_established()), _sse(_update(1), "c1"), _sse(_update(2, price="42.0"), "c2"),
            _sse({**_update(3), "seq": None}, "c3"), b"data: not json\n\n",
            _sse(_update(4), "c4"),
        ],
    )  # fmt: skip
    async with make_client(url, ("pjm", "ercot"), GatedSleep(), StatusLog()) as client:
        events = updates(await take(client, 2))
    # 4 came on the same stream: the script has one, a second request gets a 503.
    assert [event.seq for event in events] == [1, 4]


async def test_a_malformed_connection_established_ends_the_attempt(
    scripted: Callable[..., Any],
) -> None:
    _, url = await scripted([_sse(_established(epoch=7))], [_sse(_established())])
    log = StatusLog()
    async with make_client(url, ("pjm", "ercot"), GatedSleep(), log, transport="sse"):
        retry = await log.wait_for(lambda status: status.state == "reconnecting")
        await log.wait_for(lambda status: status.state == "connected")
    assert retry.error is not None
    assert "malformed connection_established" in retry.error and "'epoch'" in retry.error


def _sse_route_missing(server: ServerProcess) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/api/ws/sse/market/pjm", timeout=5):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 404 and b"unknown_zone" not in exc.read()


async def test_sse_transport_against_the_real_server(server: ServerProcess) -> None:
    if await asyncio.to_thread(_sse_route_missing, server):
        pytest.skip("this server has no SSE endpoint yet (branch sse)")
    log = StatusLog()
    sleep = GatedSleep(open_=False)  # the reconnect waits until the server is back
    async with make_client(server.url, "pjm", sleep, log, transport="sse") as client:
        await log.wait_for(lambda s: s.state == "connected")
        seqs = await publish(server, "pjm", 1.0, 2.0, 3.0)
        events = updates(await take(client, 3))
        assert [event.seq for event in events] == seqs
        mark = len(log.statuses)
        await server.stop_async()
        await server.start_async()
        sleep.open()
        await log.wait_for(lambda s: s.state == "connected", after=mark)
        more = await publish(server, "pjm", 4.0)
        tail = await take(client, 2)  # a gap (new in-memory epoch), then the new price
    assert isinstance(tail[0], Gap)
    assert [event.seq for event in updates(tail[1:])] == more
    assert {s.transport for s in log.statuses if s.state == "connected"} == {"sse"}
