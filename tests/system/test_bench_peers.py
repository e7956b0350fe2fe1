"""The bench's load client speaks each peer's protocol (issue 28): plain JSON frames,
Engine.IO v4 / Socket.IO and Pusher 7, and counts the prices each carries.

No Node peer runs here (the test command never needs bench/peers/node_modules): a small aiohttp
server plays each protocol's server side with the frames the real peers send (socket.io 4.8's
OPEN and CONNECT answer, soketi 1.6's connection_established and subscription_succeeded, as
captured from them), and the real ``bench/loadclient.py`` runs against it in its own process,
driven over its stdin/stdout as ``bench/run.py`` drives it. The fake server confirms the
subscription only once the client has done its part (named its zones, answered the ping), so
``connected`` means the client spoke the protocol; then it sends prices with the protocol's
framing, mixed with frames that are not prices, and the client's report must count exactly the
prices, none lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.harness.serverproc import REPO

pytest.importorskip("picows", reason="the load client needs the bench extra (picows)")

LOADCLIENT = REPO / "bench" / "loadclient.py"
WAIT = 15.0  # the whole exchange with one load client
ARRIVAL = 5.0  # for the prices sent to reach the client (milliseconds, normally)
CONNECTIONS = 3
ZONES = ("pjm", "caiso")
PRICES = 5  # per zone
T0 = float(int(time.time()))


def price(zone: str, seq: int) -> dict[str, Any]:
    """The price object every server sends (~120 bytes); ``volume`` is the send time."""
    return {"type": "price_update", "market_zone": zone, "price": 40.1,
            "volume": round((time.time() - T0) * 1e6), "seq": seq,
            "timestamp": "2026-01-01T00:00:00.000Z"}  # fmt: skip


class FakePeer:
    """The server side of one protocol: ``greet`` runs the subscription exchange on a new
    socket (returning once the client has done its part), ``frames`` are what a tick sends."""

    def __init__(self) -> None:
        self.sockets: list[web.WebSocketResponse] = []
        self.all_in = asyncio.Event()  # every connection has been greeted
        self.refuse = False

    async def greet(self, ws: web.WebSocketResponse) -> None:
        raise NotImplementedError

    def frames(self, zone: str, seq: int) -> list[str]:
        raise NotImplementedError

    @staticmethod
    async def receive_until(ws: web.WebSocketResponse, done: Callable[[list[str]], bool]) -> None:
        """Read the client's text frames until ``done`` says they are all there."""
        seen: list[str] = []
        while not done(seen):
            message = await ws.receive()
            if message.type is not WSMsgType.TEXT:
                raise ConnectionError(f"the client sent {message.type} before subscribing")
            seen.append(message.data)


class PlainPeer(FakePeer):
    async def greet(self, ws: web.WebSocketResponse) -> None:
        await ws.send_str(json.dumps({"type": "connection_established", "zones": list(ZONES)}))

    def frames(self, zone: str, seq: int) -> list[str]:
        return [json.dumps(price(zone, seq)), json.dumps({"type": "heartbeat"})]


class SocketIOPeer(FakePeer):
    async def greet(self, ws: web.WebSocketResponse) -> None:
        await ws.send_str('0{"sid":"oAFIvFOpbArsxAzpAAAA","upgrades":[],"pingInterval":25000,'
                          '"pingTimeout":20000,"maxPayload":1000000}')  # fmt: skip
        await ws.send_str("2")  # a ping: the client must answer "3"
        connect = '40{"zones":' + json.dumps(list(ZONES), separators=(",", ":")) + "}"
        await self.receive_until(ws, lambda seen: connect in seen and "3" in seen)
        if self.refuse:
            await ws.send_str('44{"message":"not authorized"}')
        else:
            await ws.send_str('40{"sid":"r73aI-iuB0t4bguSAAAA"}')

    def frames(self, zone: str, seq: int) -> list[str]:
        return ['42["price",' + json.dumps(price(zone, seq)) + "]", '42["other",{"seq":1}]']


class PusherPeer(FakePeer):
    async def greet(self, ws: web.WebSocketResponse) -> None:
        established = {"socket_id": "4296090115.968333924", "activity_timeout": 30}
        await ws.send_json({"event": "pusher:connection_established",
                            "data": json.dumps(established)})  # fmt: skip
        await ws.send_json({"event": "pusher:ping", "data": {}})  # the client must pong

        def subscribed_and_ponged(seen: list[str]) -> bool:
            messages = [json.loads(text) for text in seen]
            channels = {m["data"]["channel"] for m in messages if m["event"] == "pusher:subscribe"}
            return channels == set(ZONES) and any(m["event"] == "pusher:pong" for m in messages)

        await self.receive_until(ws, subscribed_and_ponged)
        if self.refuse:
            error = {"code": 4009, "message": "Connection is unauthorized"}
            await ws.send_json({"event": "pusher:error", "data": error})
            return
        for zone in ZONES:
            await ws.send_json({"event": "pusher_internal:subscription_succeeded", "channel": zone})

    def frames(self, zone: str, seq: int) -> list[str]:
        event = {"event": "price", "channel": zone, "data": json.dumps(price(zone, seq))}
        other = {"event": "other", "channel": zone, "data": json.dumps({"seq": 1})}
        return [json.dumps(event), json.dumps(other)]


PEERS: dict[str, type[FakePeer]] = {
    "plain": PlainPeer, "socketio": SocketIOPeer, "pusher": PusherPeer,
}  # fmt: skip


@contextlib.asynccontextmanager
async def serve(peer: FakePeer) -> AsyncIterator[str]:
    """The fake peer on a free loopback port; yields the URL the load client opens."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await peer.greet(ws)
        peer.sockets.append(ws)
        if len(peer.sockets) == CONNECTIONS:
            peer.all_in.set()
        async for _message in ws:  # until the client goes
            pass
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"ws://127.0.0.1:{port}/api/ws/ws/prices?zones={','.join(ZONES)}"
    finally:
        await runner.cleanup()


class LoadClient:
    """bench/loadclient.py in its own process, spoken to as bench/run.py does."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def say(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def hear(self, event: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        assert line, f"the load client exited ({await self.process.wait()}) instead of {event!r}"
        answer: dict[str, Any] = json.loads(line)
        assert answer["event"] == event, answer
        return answer


async def with_load_client(
    url: str, protocol: str, then: Callable[[LoadClient, dict[str, Any]], Awaitable[None]]
) -> None:
    argv = [sys.executable, str(LOADCLIENT), "--url", url, "--t0", str(T0),
            "--connections", str(CONNECTIONS), "--handshake-timeout", "5",
            "--protocol", protocol, "--zones", ",".join(ZONES)]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    client = LoadClient(process)
    try:
        async with asyncio.timeout(WAIT):
            await client.hear("ready")
            await client.say({"cmd": "connect"})
            await then(client, await client.hear("connected"))
            await client.say({"cmd": "exit"})
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def report_once_all_arrived(client: LoadClient, expected: int) -> dict[str, Any]:
    """Ask for reports until every price arrived, or for ``ARRIVAL`` seconds: the last report
    (then the caller's assertion shows what the client counted)."""
    ranges = {zone: [1, PRICES] for zone in ZONES}
    deadline = time.monotonic() + ARRIVAL
    while True:
        await client.say({"cmd": "report", "window": [0, 1e12], "ranges": ranges})
        report = await client.hear("report")
        if report["measured_deliveries"] >= expected or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", sorted(PEERS))
async def test_the_load_client_counts_every_price_of_each_protocol(protocol: str) -> None:
    peer = PEERS[protocol]()
    expected = CONNECTIONS * len(ZONES) * PRICES

    async def publish_and_count(client: LoadClient, connected: dict[str, Any]) -> None:
        assert (connected["ok"], connected["failed"]) == (CONNECTIONS, 0), connected
        await peer.all_in.wait()  # plain: the client is connected before the greeting is sent
        for seq in range(1, PRICES + 1):
            for zone in ZONES:
                for ws in peer.sockets:
                    for frame in peer.frames(zone, seq):
                        await ws.send_str(frame)
        report = await report_once_all_arrived(client, expected)
        counts = {key: report[key] for key in ("measured_deliveries", "frames", "missing",
                                               "out_of_order", "duplicates")}  # fmt: skip
        assert counts == {"measured_deliveries": expected, "frames": expected, "missing": 0,
                          "out_of_order": 0, "duplicates": 0}, report  # fmt: skip
        assert 0 < report["max_latency_us"] < WAIT * 1e6, report

    async with serve(peer) as url:
        await with_load_client(url, protocol, publish_and_count)


@pytest.mark.parametrize("protocol", ["socketio", "pusher"])
async def test_a_refused_subscription_is_a_failed_connection(protocol: str) -> None:
    peer = PEERS[protocol]()
    peer.refuse = True

    async def check(_client: LoadClient, connected: dict[str, Any]) -> None:
        assert (connected["ok"], connected["failed"]) == (0, CONNECTIONS), connected
        (error,) = connected["errors"]
        assert "NotSubscribed" in error and ("not authorized" in error or "4009" in error), error

    async with serve(peer) as url:
        await with_load_client(url, protocol, check)
