"""The fan-out knows encodings, not transports (issue 24, item 2): any registered
encoding is served, each price is framed once per encoding present among the zone's
subscribers (none for an encoding nobody uses), a message to everyone once per encoding,
and the broadcaster imports no transport. Real asyncio transports over socket pairs;
the transport under test is a minimal one written here."""

from __future__ import annotations

import ast
import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import SendLimits
from pricehub.server.fanout.encoding import FramedEncoding
from pricehub.server.policy.resume import ZoneStream
from pricehub.storage import StoredPrice
from pricehub.wire import messages
from tests.harness.fanout import LineConnection

WAIT = 5.0
FANOUT = Path(__file__).resolve().parents[2] / "pricehub" / "server" / "fanout"


class Counted(FramedEncoding):
    """An encoding that counts what it builds: ``<name>`` + the payload + a newline."""

    __slots__ = ("frames", "prices")

    def __init__(self, name: str) -> None:
        super().__init__(name, transport="ws")
        self.frames = self.prices = 0

    def frame(self, payload: bytes) -> bytes:
        self.frames += 1
        return b"<" + self.name.encode() + b">" + payload + b"\n"

    def price(self, payload: bytes) -> bytes:
        self.prices += 1
        return b"<" + self.name.encode() + b">" + payload + b"\n"


Line = LineConnection  # the smallest transport: whole messages in its encoding


@pytest.fixture
async def pairs() -> AsyncIterator[list[tuple[asyncio.Transport, socket.socket]]]:
    """Three connected socket pairs: the server side as an asyncio transport."""
    loop = asyncio.get_running_loop()
    made: list[tuple[asyncio.Transport, socket.socket]] = []
    for _ in range(3):
        ours, theirs = socket.socketpair()
        transport, _protocol = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        theirs.setblocking(False)
        made.append((transport, theirs))
    yield made
    for transport, theirs in made:
        transport.close()
        theirs.close()


async def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    loop, data = asyncio.get_running_loop(), b""
    async with asyncio.timeout(WAIT):
        while data.count(b"\n") < count:
            data += await loop.sock_recv(sock, 65536)
    return data.splitlines()


def subscribed(broadcaster: Broadcaster, transport: asyncio.Transport, encoding: Counted) -> Line:
    limits = SendLimits(high_water=1 << 20, hard_limit=1 << 22, lag_timeout=5.0)
    connection = Line(encoding=encoding, transport=transport, scheduler=broadcaster, limits=limits)
    broadcaster.add(connection)
    stream = connection.streams["pjm"] = ZoneStream("pjm")
    stream.finish(delivered_up_to=0)
    broadcaster.subscribe("pjm", connection)
    return connection


def price(seq: int) -> StoredPrice:
    return StoredPrice("pjm", seq, b'{"market_zone":"pjm","price":%d.0,"seq":%d}' % (seq, seq))


async def test_each_price_is_framed_once_per_encoding_present(
    pairs: list[tuple[asyncio.Transport, socket.socket]],
) -> None:
    broadcaster = Broadcaster(zones=["pjm", "ercot"])
    used, unused = Counted("lines"), Counted("unused")
    broadcaster.register(used, unused)
    for transport, _ in pairs:
        subscribed(broadcaster, transport, used)
    broadcaster.on_price(price(1))  # delivered one by one: nobody is in an audience yet
    for _, theirs in pairs:
        (line,) = await read_lines(theirs, 1)
        assert line == b"<lines>" + messages.price_update(price(1).payload)
    broadcaster.on_price(price(2))  # by now all three share one audience's write
    for _, theirs in pairs:
        assert await read_lines(theirs, 1) == [b"<lines>" + messages.price_update(price(2).payload)]
    assert len(broadcaster._audiences) == 1
    assert (used.prices, unused.prices) == (2, 0)  # once per price for three subscribers

    notice = messages.storage_backend_changed("redis", now=messages.utc_now())
    broadcaster.send_all(notice)
    for _, theirs in pairs:
        assert await read_lines(theirs, 1) == [b"<lines>" + notice]
    assert (used.frames, unused.frames) == (1, 0)
    assert broadcaster.connections_by_transport() == {"ws": 3, "sse": 0}


async def test_a_connection_needs_a_registered_encoding(
    pairs: list[tuple[asyncio.Transport, socket.socket]],
) -> None:
    broadcaster = Broadcaster(zones=["pjm"])
    broadcaster.register(Counted("lines"))
    with pytest.raises(ValueError, match="another encoding"):
        broadcaster.register(Counted("lines"))
    with pytest.raises(ValueError, match="not registered"):
        subscribed(broadcaster, pairs[0][0], Counted("stray"))


def test_the_fanout_imports_no_transport() -> None:
    """``fanout/`` is below the transports: it imports neither the WebSocket nor SSE
    packages, nor the subscriber lifecycle built on it."""
    below = ("pricehub.server.socket", "pricehub.server.sse", "pricehub.server.subscriber")
    for path in sorted(FANOUT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(below), (path.name, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(below), (path.name, alias.name)
