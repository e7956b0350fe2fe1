"""Fan-out under pressure, through real sockets: slow readers are conflated then closed
with 4008 while everyone else gets every update in order; a tick's frames go out in one
write per client; permessage-deflate interoperates with standard clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
import orjson
import pytest
import websockets

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import Connection
from pricehub.server.keys import BROADCASTER, STATS
from pricehub.server.socket.compression import Deflater, negotiate
from tests.harness.support import (
    WAIT,
    Client,
    MakeClient,
    collect_updates,
    eventually,
    publish,
    receive_json,
)

BATCH = 500  # prices per publish request: ~80 KiB of frames in one tick
STALLED_RCVBUF = 4096
STALLED_MSS = 536


class RawSocket:
    """A WebSocket client on a bare TCP socket: it reads only when the test says so, so
    it can stall like a client whose user stopped reading (small receive buffer)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response_headers = ""

    @classmethod
    async def open(cls, client: Client, path: str, *, extensions: str | None = None) -> RawSocket:
        sock = socket.socket()
        # A small window and MSS, as behind a slow link: over loopback the server's kernel
        # send buffer would otherwise autotune to megabytes before pricehub sees a byte.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLED_MSS)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{client.port}", "Upgrade: websocket",
            "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        ]
        if extensions:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        raw.response_headers = head.decode()
        return raw

    def send_text(self, payload: bytes) -> None:
        """A masked client text frame (payload under 126 bytes)."""
        self.send_frame(0x81, payload)

    def send_frame(self, first: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.writer.write(bytes((first, 0x80 | len(payload))) + mask + masked)

    def stall(self) -> None:
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    def resume(self) -> None:
        cast(asyncio.Transport, self.writer.transport).resume_reading()

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (first header byte, payload)."""
        async with asyncio.timeout(WAIT):
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return head[0], await self.reader.readexactly(length)

    async def message(self) -> dict[str, Any]:
        """The next text message (pings skipped), inflated if it was compressed."""
        while True:
            first, payload = await self.frame()
            if first & 0x0F == 0x1:
                if first & 0x40:
                    payload = inflate(payload)
                message: dict[str, Any] = orjson.loads(payload)
                return message
            assert first & 0x0F == 0x9, f"unexpected frame {first:#x}"

    async def close_code(self) -> int | None:
        """Read until the close frame (its code) or the end of the stream (None)."""
        try:
            while True:
                first, payload = await self.frame()
                if first & 0x0F == 0x8:
                    code: int = struct.unpack("!H", payload[:2])[0]
                    return code
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    def close(self) -> None:
        self.writer.transport.abort()


def inflate(payload: bytes) -> bytes:
    """One permessage-deflate message on its own: no context from earlier messages."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def connection_by_id(broadcaster: Broadcaster, connection_id: str) -> Connection:
    return next(c for c in broadcaster.connections if c.id == connection_id)


async def until(condition: Callable[[], bool], *, timeout: float = WAIT) -> None:
    """Poll server state (no event to wait on) with a deadline."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def open_stalled(client: Client, path: str) -> tuple[RawSocket, Connection]:
    raw = await RawSocket.open(client, path)
    hello = await raw.message()
    raw.stall()
    return raw, connection_by_id(client.app[BROADCASTER], hello["connection_id"])


async def publish_until(client: Client, condition: Callable[[], bool], zone: str = "pjm") -> int:
    """Publish batches until ``condition`` holds; the last seq published."""
    last = 0
    async with asyncio.timeout(WAIT):
        while not condition():
            accepted = await publish(
                client, *[{"market_zone": zone, "price": i % 97} for i in range(BATCH)]
            )
            last = accepted[-1]["seq"]
    return last


async def readers_for(client: Client, paths: list[str]) -> list[aiohttp.ClientWebSocketResponse]:
    sockets = [await client.ws_connect(path) for path in paths]
    for ws in sockets:
        assert (await receive_json(ws))["type"] == "connection_established"
    return sockets


# --- slow consumers ---------------------------------------------------------------------


async def test_stalled_reader_is_conflated_then_gets_the_newest_price_flagged(
    make_client: MakeClient,
) -> None:
    client = await make_client(send_high_water=16 * 1024, send_hard_limit=64 * 1024 * 1024)
    broadcaster = client.app[BROADCASTER]
    stalled, connection = await open_stalled(client, "/api/ws/ws/market/pjm")
    last = await publish_until(client, lambda: connection.conflated is not None)
    assert broadcaster.conflation_events == 1
    # While conflated, further updates replace each other instead of queueing.
    for price in (1.25, 1.5):
        final = (await publish(client, {"market_zone": "pjm", "price": price}))[0]["seq"]
    assert final == last + 2
    assert connection.conflated is not None and connection.conflated["pjm"].seq == final
    stalled.resume()
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["seq"] != final:
        message = await stalled.message()
        if message["type"] == "price_update":
            seen.append(message)
    seqs = [m["seq"] for m in seen]
    assert seqs == sorted(set(seqs)), "in order, each at most once"
    assert final - 1 not in seqs, "the update it was too slow for was dropped"
    assert seen[-1].get("conflated") is True and seen[-1]["price"] == 1.5
    assert all("conflated" not in m for m in seen[:-1])
    assert connection.conflated is None  # released once it drained
    # Back in step: it rejoins the shared writes and misses nothing from now on.
    after = await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(50)])
    seqs = []
    while len(seqs) < 50:
        message = await stalled.message()
        if message["type"] == "price_update":
            seqs.append(message["seq"])
    assert seqs == [item["seq"] for item in after]
    assert connection.audience is not None
    stalled.close()


async def test_stalled_reader_is_conflated_then_4008_while_readers_get_every_update(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        send_high_water=16 * 1024, send_hard_limit=64 * 1024 * 1024,
        slow_consumer_timeout=0.5, shutdown_grace=0.5,
    )
    broadcaster, stats = client.app[BROADCASTER], client.app[STATS]
    readers = await readers_for(client, ["/api/ws/ws/market/pjm", "/api/ws/ws/prices"])
    stalled, connection = await open_stalled(client, "/api/ws/ws/market/pjm")
    total = 6 * BATCH
    collecting = [
        asyncio.create_task(collect_updates(ws, "pjm", until_seq=total)) for ws in readers
    ]
    for start in range(0, total, BATCH):
        prices = [{"market_zone": "pjm", "price": p} for p in range(start, start + BATCH)]
        await publish(client, *prices)
    results = await asyncio.wait_for(asyncio.gather(*collecting), WAIT)
    assert all(seqs == list(range(1, total + 1)) for seqs in results)
    await until(lambda: broadcaster.conflation_events == 1)
    # It never reads, so it never takes the close frame queued behind its backlog: the
    # socket is aborted after the close grace, which frees what was queued for it.
    await until(lambda: connection not in broadcaster.connections)
    await until(lambda: connection.transport.get_write_buffer_size() == 0)
    assert connection.transport.is_closing()
    assert connection.disconnect_reason == "slow_consumer"
    assert broadcaster.slow_consumer_closes == 1
    assert stats.disconnections["slow_consumer"] == 1
    stalled.resume()
    assert await stalled.close_code() in (None, 4008)  # aborted: maybe before the close frame
    seq = (await publish(client, {"market_zone": "pjm", "price": 2}))[0]["seq"]
    for ws in readers:
        assert (await collect_updates(ws, "pjm", until_seq=seq)) == [seq]


async def test_burst_over_the_hard_limit_closes_4008_with_the_code_on_the_wire(
    make_client: MakeClient,
) -> None:
    # The high-water mark above what the first tick leaves in pricehub's buffer (~80 KiB
    # written, most of it taken by the kernel), so the burst reaches the hard limit
    # before the connection starts conflating.
    client = await make_client(
        send_high_water=48 * 1024, send_hard_limit=64 * 1024, max_batch_size=10 * BATCH
    )
    broadcaster = client.app[BROADCASTER]
    stalled, connection = await open_stalled(client, "/api/ws/ws/market/pjm")
    # One request writes ~800 KiB (ticks of 500), far more than the kernel takes for a
    # stalled reader.
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(10 * BATCH)])
    assert connection.closing and connection.disconnect_reason == "slow_consumer"
    assert broadcaster.slow_consumer_closes == 1
    stalled.resume()  # a client that reads again in time sees the close code
    assert await stalled.close_code() == 4008
    await until(lambda: connection not in broadcaster.connections)


async def test_a_reader_that_trickles_behind_is_conflated_by_lag_alone(
    make_client: MakeClient,
) -> None:
    """Far below the high-water mark, but not reading: the lag check catches it."""
    client = await make_client(send_high_water=64 * 1024 * 1024, send_hard_limit=128 * 1024 * 1024)
    stalled, connection = await open_stalled(client, "/api/ws/ws/market/pjm")
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(100)])
    async with asyncio.timeout(WAIT):
        while connection.conflated is None:
            await publish(client, {"market_zone": "pjm", "price": 1})
            await asyncio.sleep(0.1)  # a slow trickle, as a real feed is
    assert connection.transport.get_write_buffer_size() < 64 * 1024
    stalled.close()


async def test_the_close_frame_is_the_last_frame_when_the_session_closes_mid_stream(
    make_client: MakeClient,
) -> None:
    """A close decided outside the broadcaster (here 4029, for flooding) while prices
    stream: nothing, shared or not, is written after the close frame."""
    # Publishing flat out for the whole test: no publish rate limit to run into.
    client = await make_client(client_rate_limit=1, publish_rate_limit=1_000_000)
    raw = await RawSocket.open(client, "/api/ws/ws/market/pjm")
    assert (await raw.message())["type"] == "connection_established"
    streaming = asyncio.Event()

    async def stream() -> None:
        while True:
            await publish(client, *[{"market_zone": "pjm", "price": 1}] * 20)
            streaming.set()

    publishing = asyncio.create_task(stream())
    await asyncio.wait_for(streaming.wait(), WAIT)
    for _ in range(20):
        raw.send_text(b'{"type":"ping"}')
    while True:
        first, payload = await raw.frame()
        if first & 0x0F == 0x8:
            break
    assert struct.unpack("!H", payload[:2])[0] == 4029
    await asyncio.sleep(0.2)  # prices keep coming meanwhile: none may follow the close
    raw.send_frame(0x88, payload[:2])  # the client's close answer: the server hangs up
    assert await asyncio.wait_for(raw.reader.read(), WAIT) == b""
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await publishing
    raw.close()


# --- coalescing ---------------------------------------------------------------------------


async def test_a_tick_of_many_zones_is_one_write_per_client_in_publish_order(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    broadcaster = client.app[BROADCASTER]
    readers = await readers_for(client, ["/api/ws/ws/prices"] * 3)
    prices: list[dict[str, Any]] = [
        {"market_zone": zone, "price": index}
        for index, zone in enumerate(["pjm", "ercot", "pjm", "caiso", "ercot", "pjm", "spp"])
    ]
    before = [(c.writes, c.messages_sent) for c in broadcaster.connections]
    await publish(client, *prices)
    for ws in readers:
        got = [await receive_json(ws) for _ in prices]
        assert [(m["market_zone"], m["price"]) for m in got] == [
            (p["market_zone"], float(p["price"])) for p in prices
        ]
        assert [m["seq"] for m in got if m["market_zone"] == "pjm"] == [1, 2, 3]
    after = [(c.writes, c.messages_sent) for c in broadcaster.connections]
    deltas = [(w - w0, m - m0) for (w0, m0), (w, m) in zip(before, after, strict=True)]
    assert deltas == [(1, len(prices))] * 3  # one write each, carrying the whole tick


async def test_own_messages_and_subscriptions_mid_stream_keep_every_zone_in_order(
    make_client: MakeClient,
) -> None:
    """Replies, (un)subscriptions and broadcasts interleaved in the same ticks: each zone
    still arrives complete and in order, and the replies arrive."""
    client = await make_client(client_rate_limit=1000)
    broadcaster = client.app[BROADCASTER]
    (ws,) = await readers_for(client, ["/api/ws/ws/prices?zones=pjm,ercot"])
    (watcher,) = await readers_for(client, ["/api/ws/ws/prices?zones=pjm,ercot"])
    seen: dict[str, list[int]] = {"pjm": [], "ercot": [], "caiso": []}
    replies: list[str] = []

    async def read(rounds: int) -> None:
        while seen["pjm"][-1:] != [2 * rounds] or seen["caiso"][-1:] != [rounds]:
            message = await receive_json(ws)
            if message["type"] == "price_update":
                seen[message["market_zone"]].append(message["seq"])
            else:
                replies.append(message["type"])

    rounds = 30
    reading = asyncio.create_task(read(rounds))
    pjm, ercot, caiso = ({"market_zone": zone, "price": 1} for zone in ("pjm", "ercot", "caiso"))
    for n in range(rounds):
        await publish(client, pjm, ercot)
        await ws.send_json({"type": "ping"})
        if n == 10:
            await ws.send_json({"type": "subscribe", "zones": ["caiso"]})
        if n == 20:
            await ws.send_json({"type": "unsubscribe", "zones": ["ercot"]})
        await publish(client, pjm, caiso)
    await asyncio.wait_for(reading, WAIT)
    assert seen["pjm"] == list(range(1, 2 * rounds + 1))
    assert seen["ercot"] == list(range(1, len(seen["ercot"]) + 1)) and len(seen["ercot"]) >= 20
    live = seen["caiso"]  # from the subscription on (initial_data had the one before)
    assert live == list(range(live[0], rounds + 1))
    assert replies.count("pong") >= rounds - 1 and "subscribed" in replies
    assert "unsubscribed" in replies
    # Both sockets are back in shared writes: different zones, different audiences.
    connections = list(broadcaster.connections)
    await until(lambda: all(c.audience is not None for c in connections))
    assert len({id(c.audience) for c in connections}) == 2
    await watcher.close()


# --- permessage-deflate -----------------------------------------------------------------------


def test_each_compressed_message_decodes_on_its_own() -> None:
    deflater = Deflater()
    payloads = [orjson.dumps({"type": "price_update", "seq": n, "price": 41.5}) for n in range(3)]
    big = orjson.dumps({"data": [{"market_zone": "pjm", "seq": n} for n in range(200)]})
    for payload in [*payloads, big, *payloads]:
        frame = deflater.frame(payload)
        if len(payload) > 100:
            assert frame[0] == 0xC1  # FIN, RSV1, text
            assert inflate(frame[4:] if frame[1] == 126 else frame[2:]) == payload
    tiny = deflater.frame(b"{}")
    assert tiny == b"\x81\x02{}"  # compressing would not make it smaller: sent plain


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (None, None),
        ("x-webkit-deflate-frame", None),
        ("permessage-deflate", "permessage-deflate; server_no_context_takeover"),
        (
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            "permessage-deflate; server_max_window_bits=10, permessage-deflate",
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            "permessage-deflate; server_max_window_bits=15",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=15",
        ),
        ("permessage-deflate; server_max_window_bits=10", None),
        ("permessage-deflate; unknown_param", None),
        ("permessage-deflate; client_max_window_bits; client_max_window_bits", None),
        ("permessage-deflate; server_no_context_takeover=1", None),
    ],
)
def test_negotiation_answers(offer: str | None, answer: str | None) -> None:
    assert negotiate(offer) == answer


async def test_compressed_broadcast_frames_are_built_once_and_shared(
    make_client: MakeClient,
) -> None:
    client = await make_client(compression=True)
    sockets = [
        await RawSocket.open(client, "/api/ws/ws/market/pjm", extensions="permessage-deflate")
        for _ in range(2)
    ]
    plain = await RawSocket.open(client, "/api/ws/ws/market/pjm", extensions=None)
    for raw in [*sockets, plain]:
        assert (await raw.message())["type"] == "connection_established"
    for raw in sockets:
        assert "server_no_context_takeover" in raw.response_headers
    assert "Sec-WebSocket-Extensions" not in plain.response_headers
    await publish(client, *[{"market_zone": "pjm", "price": p, "volume": 1e6} for p in range(3)])
    frames = [[await raw.frame() for _ in range(3)] for raw in sockets]
    assert frames[0] == frames[1]  # the same bytes for every deflate client
    assert all(first == 0xC1 for first, _ in frames[0])
    for seq, (_, payload) in enumerate(frames[0], start=1):
        assert orjson.loads(inflate(payload))["seq"] == seq  # no context from earlier frames
    plain_frames = [await plain.frame() for _ in range(3)]
    assert all(first == 0x81 for first, _ in plain_frames)
    deflating = [c for c in client.app[BROADCASTER].connections if c.deflater is not None]
    assert len(deflating) == 2
    for connection in deflating:
        # aiohttp's own per-connection compressor (~256 KiB of zlib state) never existed.
        assert connection.ws._writer._compressobj is None
    for raw in [*sockets, plain]:
        raw.close()


async def check_client_session(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    client: Client,
) -> None:
    """What any standard client must see: hello, live updates, a big history answer."""
    assert (await receive())["type"] == "connection_established"
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(300)])
    seqs: list[int] = []
    while len(seqs) < 300:
        message = await receive()
        if message["type"] == "price_update":
            seqs.append(message["seq"])
    assert seqs[0] == 1 and seqs == list(range(1, 301))
    await send({"type": "request_price_history", "limit": 300})  # ~30 KiB: compressed
    history = await receive()
    assert [p["seq"] for p in history["data"]] == list(range(1, 301))
    await send({"type": "ping"})
    assert (await receive())["type"] == "pong"


@pytest.mark.parametrize("server_compression", [True, False])
@pytest.mark.parametrize("client_compression", [True, False])
async def test_aiohttp_client_interoperates(
    make_client: MakeClient, server_compression: bool, client_compression: bool
) -> None:
    client = await make_client(compression=server_compression)
    ws = await client.ws_connect("/api/ws/ws/market/pjm", compress=15 if client_compression else 0)
    assert bool(ws.compress) is (server_compression and client_compression)

    async def send(message: dict[str, Any]) -> None:
        await ws.send_json(message)

    async def receive() -> dict[str, Any]:
        message: dict[str, Any] = await receive_json(ws)
        return message

    await check_client_session(send, receive, client)
    await ws.close()


@pytest.mark.parametrize("server_compression", [True, False])
@pytest.mark.parametrize("client_compression", [True, False])
async def test_websockets_client_interoperates(
    make_client: MakeClient, server_compression: bool, client_compression: bool
) -> None:
    client = await make_client(compression=server_compression)
    async with websockets.connect(
        f"ws://127.0.0.1:{client.port}/api/ws/ws/market/pjm",
        compression="deflate" if client_compression else None,
        open_timeout=WAIT,
    ) as ws:
        negotiated = [type(ext).__name__ for ext in ws.protocol.extensions]
        assert bool(negotiated) is (server_compression and client_compression)

        async def send(message: dict[str, Any]) -> None:
            await ws.send(orjson.dumps(message).decode())

        async def receive() -> dict[str, Any]:
            message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
            return message

        await check_client_session(send, receive, client)


# --- zones at scale (issue 14) ------------------------------------------------------------


async def test_per_zone_state_exists_only_for_zones_with_subscribers_or_prices(
    make_client: MakeClient,
) -> None:
    zones = tuple(f"node_{i:05d}" for i in range(20_000))
    client = await make_client(zones=zones)
    broadcaster = client.app[BROADCASTER]
    assert broadcaster.subscribers == {} and broadcaster._last_seq == {}
    watched = ["node_00001", "node_12345", "node_19999"]
    ws = await client.ws_connect("/api/ws/ws/prices?zones=" + ",".join(watched))
    assert (await receive_json(ws))["type"] == "connection_established"

    async def all_opened() -> bool:  # the zones open after connection_established
        return sorted(broadcaster.subscribers) == watched

    await eventually(all_opened)
    assert broadcaster.connections_by_zone() == dict.fromkeys(watched, 1)
    await publish(client, {"market_zone": "node_12345", "price": 1}, {
        "market_zone": "node_07777", "price": 2})  # fmt: skip
    assert (await receive_json(ws))["market_zone"] == "node_12345"
    assert sorted(broadcaster._last_seq) == ["node_07777", "node_12345"]
    await ws.send_json({"type": "unsubscribe", "zones": watched[:1]})
    assert (await receive_json(ws))["type"] == "unsubscribed"
    assert sorted(broadcaster.subscribers) == watched[1:]
    await ws.close()

    async def all_gone() -> bool:
        return not broadcaster.connections

    await eventually(all_gone)
    assert broadcaster.subscribers == {} and broadcaster._individual == {}
    assert broadcaster._audiences_of == {} and broadcaster._encodings_of == {}
