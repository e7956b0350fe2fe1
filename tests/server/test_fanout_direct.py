"""The shared writes send to the socket directly when the transport has nothing buffered
(issue 28, item 2), and go through ``transport.write`` otherwise, so no guarantee moves:
bytes already buffered keep their place, a partial send's rest is buffered in order and
checked for backlog, a closing transport gets nothing, a failed send ends the transport
as asyncio ends it, and a transport that is not asyncio's plain socket transport (TLS,
another loop) is only ever written through ``transport.write``. Real sockets throughout."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import SendLimits, direct_socket
from pricehub.server.fanout.encoding import FramedEncoding
from pricehub.server.policy.resume import ZoneStream
from pricehub.storage import StoredPrice
from pricehub.wire import messages
from tests.harness.fanout import LineConnection

WAIT = 5.0
LIMITS = SendLimits(high_water=1 << 24, hard_limit=1 << 26, lag_timeout=5.0)


class Lines(FramedEncoding):
    """Each message as it is plus a newline."""

    __slots__ = ()

    def frame(self, payload: bytes) -> bytes:
        return payload + b"\n"


class Line(LineConnection):
    """Counts its slow-consumer checks."""

    __slots__ = ("checks",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checks = 0

    def check_backlog(self, now: float) -> None:
        self.checks += 1
        super().check_backlog(now)


class Counting:
    """Wraps a transport's ``write`` to count the calls (the direct path makes none)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.calls = 0
        self._write = transport.write
        transport.write = self  # type: ignore[method-assign]

    def __call__(self, data: Any) -> None:
        self.calls += 1
        self._write(data)


Pair = tuple[asyncio.Transport, socket.socket]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _protocol = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    theirs.setblocking(False)
    yield transport, theirs
    transport.abort()
    theirs.close()


def member(broadcaster: Broadcaster, transport: asyncio.Transport, encoding: Lines) -> Line:
    connection = Line(encoding=encoding, transport=transport, scheduler=broadcaster, limits=LIMITS)
    broadcaster.add(connection)
    stream = connection.streams["pjm"] = ZoneStream("pjm")
    stream.finish(delivered_up_to=0)
    broadcaster.subscribe("pjm", connection)
    return connection


def setup(transport: asyncio.Transport) -> tuple[Broadcaster, Line]:
    """A broadcaster whose one connection is in its audience (shared writes from now)."""
    broadcaster = Broadcaster(zones=["pjm"])
    encoding = Lines("lines", transport="ws")
    broadcaster.register(encoding)
    connection = member(broadcaster, transport, encoding)
    broadcaster.flush()
    assert connection.audience is not None
    return broadcaster, connection


def price(seq: int, size: int = 0) -> StoredPrice:
    return StoredPrice("pjm", seq, b'{"seq":%d,"pad":"%s"}' % (seq, b"x" * size))


def line(seq: int, size: int = 0) -> bytes:
    """What the client gets for ``price(seq, size)``."""
    return messages.price_update(price(seq, size).payload) + b"\n"


async def read_all(sock: socket.socket, until: bytes) -> bytes:
    loop, data = asyncio.get_running_loop(), b""
    async with asyncio.timeout(WAIT):
        while not data.endswith(until):
            data += await loop.sock_recv(sock, 1 << 20)
    return data


async def test_a_plain_transport_is_written_directly(pair: Pair) -> None:
    transport, theirs = pair
    assert cast(object, direct_socket(transport)) is transport
    broadcaster, _connection = setup(transport)
    counted = Counting(transport)
    for seq in (1, 2, 3):
        broadcaster.on_price(price(seq))
        broadcaster.flush()
    assert await read_all(theirs, line(3)) == line(1) + line(2) + line(3)
    assert counted.calls == 0
    assert transport.get_write_buffer_size() == 0


async def test_other_transports_go_through_write(pair: Pair) -> None:
    """Anything but asyncio's plain socket transport (here a subclass, as TLS or another
    loop's transports are other classes) is written through ``transport.write``."""

    class Other(asyncio.Transport):
        def __init__(self, inner: asyncio.Transport) -> None:
            super().__init__()
            self.inner, self.writes = inner, 0

        def write(self, data: Any) -> None:
            self.writes += 1
            self.inner.write(data)

        def is_closing(self) -> bool:
            return self.inner.is_closing()

        def get_write_buffer_size(self) -> int:
            return self.inner.get_write_buffer_size()

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.inner.get_extra_info(name, default)

    transport, theirs = pair
    other = Other(transport)
    assert direct_socket(other) is None
    broadcaster, _connection = setup(other)
    broadcaster.on_price(price(1))
    broadcaster.flush()
    assert await read_all(theirs, b"\n") == line(1)
    assert other.writes == 1


async def test_buffered_bytes_keep_their_place(pair: Pair) -> None:
    """With bytes in the transport's buffer the shared write queues behind them."""
    transport, theirs = pair
    ours = transport.get_extra_info("socket")
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    broadcaster, _connection = setup(transport)
    backlog = b"B" * 300_000 + b"\n"
    transport.write(backlog)  # more than the kernel takes: the rest stays buffered
    assert transport.get_write_buffer_size() > 0
    # The client reads some without the loop turning: the kernel has room again while
    # the transport still holds the rest, which must go first.
    received = theirs.recv(1 << 20)
    counted = Counting(transport)
    broadcaster.on_price(price(1))
    broadcaster.flush()
    assert counted.calls == 1
    assert received + await read_all(theirs, line(1)) == backlog + line(1)


async def test_a_partial_send_buffers_the_rest_in_order(pair: Pair) -> None:
    transport, theirs = pair
    ours = transport.get_extra_info("socket")
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    broadcaster, connection = setup(transport)
    checks = connection.checks
    counted = Counting(transport)
    broadcaster.on_price(price(1, size=300_000))  # one frame larger than the kernel takes
    broadcaster.flush()
    assert counted.calls == 1  # the rest, through the transport
    assert transport.get_write_buffer_size() > 0
    assert connection.checks == checks + 1  # bytes left waiting: the slow-consumer check
    broadcaster.on_price(price(2))
    broadcaster.flush()  # behind the buffered rest, through the transport again
    assert counted.calls == 2
    assert await read_all(theirs, line(2)) == line(1, size=300_000) + line(2)


async def test_a_closing_transport_gets_nothing(pair: Pair) -> None:
    transport, theirs = pair
    broadcaster, _connection = setup(transport)
    transport.close()  # its socket is closed on the loop's next turn
    broadcaster.on_price(price(1))
    broadcaster.flush()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT):
        assert await loop.sock_recv(theirs, 1024) == b""  # the end, no frame


async def test_a_failed_send_ends_the_transport_as_asyncio_does(pair: Pair) -> None:
    transport, theirs = pair
    broadcaster, _connection = setup(transport)
    theirs.close()  # the peer is gone: the next sends fail (EPIPE)
    for seq in (1, 2):
        broadcaster.on_price(price(seq))
        broadcaster.flush()  # no exception escapes
    assert transport.is_closing()
