"""A real server under attack, and a real server shutting down under load.

Flood: while a publisher streams prices, attackers send garbage, oversized and malformed
frames (through aiohttp and through a raw socket that lies about frame lengths) and 100
honest clients must still receive every update of their zones, in order, once. After the
flood the server's RSS (from /proc) must be back near where it was before it.

Shutdown: SIGTERM with clients connected, prices flowing and a few clients that never
answer a close: every honest client gets 1001, no new socket is accepted, and the process
exits 0 within ``--shutdown-grace`` (plus a small margin for process teardown).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from tests.harness.serverproc import ServerProcess

KEY = "flood-key"
WAIT = 15.0  # upper bound of every wait under the flood
HONEST = 100
ATTACKERS = 24
UPDATES = 120  # per zone
ZONES = ("pjm", "ercot")
MAX_FRAME = 8192
RSS_GROWTH_LIMIT_KB = 20 * 1024  # after the flood, over the pre-flood baseline (measured: ~3 MB)
GRACE = 2.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


# --- a raw WebSocket client that can lie ----------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None
                 ) -> bytes:
    """A masked client frame; ``length`` overrides the declared payload length (a lie)."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if declared < 126:
        header = struct.pack("!BB", first, 0x80 | declared)
    elif declared < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, declared)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, declared)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """Upgrades by hand, then writes whatever frames it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str, *, receive_buffer: int | None = None) -> RawSocket:
        sock = socket.socket()
        if receive_buffer is not None:  # a tiny window: the server's writes back up quickly
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes] | None:
        """The next server frame: (opcode, payload); None when the stream ends."""
        try:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def message(self) -> dict[str, Any] | int | None:
        """The next text message; at the close frame its code (None: dropped without one)."""
        while (frame := await self.frame()) is not None:
            opcode, payload = frame
            if opcode == 0x1:
                message: dict[str, Any] = orjson.loads(payload)
                return message
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
        return None

    async def close_code(self) -> int | None:
        """Skip server frames until its close frame; its code (None: dropped without one)."""
        while (frame := await self.frame()) is not None:
            opcode, payload = frame
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
        return None

    def abort(self) -> None:
        self.writer.transport.abort()


async def raw_attack(port: int, kind: str) -> int | None:
    """One raw attack on a fresh socket; the close code the server answered with."""
    sock = await RawSocket.open(port, "/api/ws/ws/market/pjm")
    try:
        if kind == "huge_length":  # claims 4 EiB, sends a little: must not be buffered
            sock.writer.write(client_frame(0x1, b"x" * 1000, length=1 << 62))
        elif kind == "endless_fragments":  # each fragment small, the message unbounded
            sock.writer.write(client_frame(0x1, b"[" * 1000, fin=False))
            for _ in range(2 * MAX_FRAME // 1000):
                sock.writer.write(client_frame(0x0, b"[" * 1000, fin=False))
        elif kind == "bad_utf8":
            sock.writer.write(client_frame(0x1, b'{"type":"\xff\xfe"}'))
        elif kind == "long_control":  # control frames carry at most 125 bytes
            sock.writer.write(client_frame(0x9, b"p" * 126))
        else:  # reserved opcode
            sock.writer.write(client_frame(0x3, b"?"))
        with contextlib.suppress(ConnectionError):
            await sock.writer.drain()
        async with asyncio.timeout(WAIT):
            return await sock.close_code()
    finally:
        sock.abort()


GARBAGE: list[str | bytes] = [
    "not json", "[1,2]", '{"type":1}', '{"type":"nope"}', "[" * 3000, '"\\ud800"',
    '{"type":"subscribe","zones":"pjm"}', '{"type":"subscribe","zones":["nowhere"]}',
    '{"type":"subscribe","zones":["pjm"],"since":{"pjm":-1}}',
    '{"type":"request_price_history","market_zone":"pjm","hours":1e300}',
    '{"type":"request_price_history","market_zone":"pjm","limit":18446744073709551615}',
    '{"type":"unsubscribe","zones":["pjm","ercot"]}', b"\x00" * 100,
]


async def socket_attack(session: aiohttp.ClientSession, url: str, kind: str) -> int | None:
    """One aiohttp attack: garbage at full speed (rate limit) or an oversized frame."""
    async with session.ws_connect(url + "/api/ws/ws/prices?zones=pjm,ercot") as ws:
        if kind == "oversized":
            # 32x the limit: buffered instead of refused, it would show in the RSS.
            await ws.send_str('{"type":"ping","pad":"' + "x" * (32 * MAX_FRAME) + '"}')
        else:
            with contextlib.suppress(ConnectionError):
                for frame in itertools.islice(itertools.cycle(GARBAGE), 400):
                    if ws.closed:
                        break
                    await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
        async with asyncio.timeout(WAIT):
            async for _ in ws:
                pass
        return ws.close_code


async def attacker(number: int, url: str, port: int, stop: asyncio.Event,
                   codes: list[int | None]) -> None:
    raw = ("huge_length", "endless_fragments", "bad_utf8", "long_control", "reserved_opcode")
    kinds = itertools.cycle(("garbage", "oversized", *raw))
    for _ in range(number):  # stagger the kinds across attackers
        next(kinds)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            kind = next(kinds)
            if kind in raw:
                codes.append(await raw_attack(port, kind))
            else:
                codes.append(await socket_attack(session, url, kind))


# --- honest clients ----------------------------------------------------------------------


class Honest:
    """Reads everything; records every price seq per zone."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seqs: dict[str, list[int]] = {zone: [] for zone in ZONES}
        self.done = asyncio.Event()  # saw every update
        self.finished = asyncio.Event()  # the socket closed

    async def run(self) -> None:
        try:
            await self.read()
        finally:
            self.finished.set()

    async def read(self) -> None:
        async for message in self.ws:
            if message.type is not WSMsgType.TEXT:
                continue
            data: dict[str, Any] = message.json()
            if data["type"] == "price_update":
                assert not data.get("conflated"), "an honest reader must not be conflated"
                self.seqs[data["market_zone"]].append(data["seq"])
                if all(seqs and seqs[-1] >= UPDATES for seqs in self.seqs.values()):
                    self.done.set()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess(
        "--no-simulate", "--max-frame-size", str(MAX_FRAME), "--shutdown-grace", str(GRACE),
        "--log-level", "warning", publish_key=KEY,
    ) as proc:
        yield proc


@contextlib.asynccontextmanager
async def honest_clients(url: str, count: int) -> AsyncIterator[list[Honest]]:
    async with aiohttp.ClientSession() as session:
        sockets = await asyncio.gather(
            *(session.ws_connect(url + "/api/ws/ws/prices?zones=pjm,ercot") for _ in range(count))
        )
        clients = [Honest(ws) for ws in sockets]
        tasks = [asyncio.create_task(client.run()) for client in clients]
        try:
            yield clients
        finally:
            for ws in sockets:
                await ws.close()
            await asyncio.gather(*tasks, return_exceptions=True)


async def publish_all(server: ServerProcess, *, batch: int = 10) -> None:
    for start in range(0, UPDATES, batch):
        for zone in ZONES:
            await server.publish(
                *({"market_zone": zone, "price": float(n)} for n in range(start, start + batch))
            )
        await asyncio.sleep(0.02)  # spread the updates over the flood


async def stats(server: ServerProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
        server.url + "/api/ws/ws/stats"
    ) as response:
        body: dict[str, Any] = await response.json()
        return body


async def test_honest_clients_get_every_update_through_a_flood(server: ServerProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    async with honest_clients(server.url, HONEST) as clients:
        await asyncio.sleep(0.5)  # settle: every socket subscribed, allocator warm
        baseline = rss_kb(pid)
        stop = asyncio.Event()
        codes: list[int | None] = []
        attackers = [
            asyncio.create_task(attacker(n, server.url, server.port, stop, codes))
            for n in range(ATTACKERS)
        ]
        await publish_all(server)
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(client.done.wait() for client in clients))
        stop.set()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*attackers)
        peak = rss_kb(pid)
        for client in clients:
            assert not client.ws.closed
            for zone in ZONES:
                assert client.seqs[zone] == list(range(1, UPDATES + 1)), zone
    after = rss_kb(pid)
    counters = await stats(server)
    print(f"\nRSS kB: baseline {baseline}, after flood {peak}, after clients left {after}; "
          f"attacks {len(codes)}, close codes {sorted(set(map(str, codes)))}")
    assert peak - baseline < RSS_GROWTH_LIMIT_KB
    assert counters["statistics"]["connection_errors"] == 0  # no 1011: nothing crashed
    # None: the server dropped the TCP connection while a raw attacker was still writing
    # (its close frame lost to the reset). A hang would have raised TimeoutError instead.
    assert set(codes) <= {None, 1002, 1003, 1007, 1009, 4029}, codes
    assert len(codes) >= ATTACKERS


# --- graceful shutdown under load ------------------------------------------------------------


async def test_sigterm_under_load_closes_1001_and_exits_in_grace(server: ServerProcess) -> None:
    await server.publish(*({"market_zone": "pjm", "price": float(n)} for n in range(1000)))
    stuck = [await stuck_reader(server.port) for _ in range(5)]
    async with honest_clients(server.url, 50) as clients:
        publishing = asyncio.create_task(keep_publishing(server))
        await asyncio.sleep(0.2)
        assert server.process is not None
        started = time.monotonic()
        server.process.terminate()  # SIGTERM
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(client.finished.wait() for client in clients))
        refused = await new_socket_refused(server)
        exit_code = await asyncio.to_thread(server.process.wait, GRACE + 5)
        elapsed = time.monotonic() - started
        publishing.cancel()
        codes = {client.ws.close_code for client in clients}
    for sock in stuck:
        sock.abort()
    print(f"\nexit {exit_code} after {elapsed:.2f} s (grace {GRACE} s); client close codes {codes}")
    assert codes == {1001}
    assert refused
    assert exit_code == 0
    assert elapsed < GRACE + 1.5


async def stuck_reader(port: int) -> RawSocket:
    """A client that asks for megabytes of history and never reads nor answers a close:
    the server's writes to it back up, so closing it cannot rely on its cooperation."""
    sock = await RawSocket.open(port, "/api/ws/ws/market/pjm", receive_buffer=4096)
    request = client_frame(0x1, b'{"type":"request_price_history","limit":1000}')
    sock.writer.write(request * 30)
    await sock.writer.drain()
    return sock


async def keep_publishing(server: ServerProcess) -> None:
    with contextlib.suppress(aiohttp.ClientError, AssertionError):
        for n in itertools.count():
            await server.publish({"market_zone": ZONES[n % 2], "price": float(n)})


async def new_socket_refused(server: ServerProcess) -> bool:
    """During the drain, a new socket must not be accepted."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(server.url + "/api/ws/ws/market/pjm") as ws:
                message = await ws.receive(timeout=WAIT)
                return message.type is not WSMsgType.TEXT
        except (aiohttp.ClientError, OSError):
            return True


# --- amplification: what one socket may make the server queue (issue 11 item 1) ----------

AMP_SOCKETS = 8
AMP_HISTORY = 10000  # per zone: a `since: 0` subscribe to every zone replays 70,000 prices
AMP_FRAMES = 40  # the rate limit's burst: all of them handled before anything is written
# Per socket, over the pre-attack baseline: about --send-hard-limit (1 MiB) and what it
# takes to produce it. Before the fix each socket queued ~40 MB already at a history of
# 2,000 (14,000 replayed prices per subscribe, twenty subscribes, twenty histories);
# measured now: ~0.14 MB per socket at 10,000.
AMP_RSS_PER_SOCKET_KB = 3 * 1024
HEALTH_BUDGET = 0.5  # seconds: health must answer this fast while the attack runs


def amplifying_frames() -> bytes:
    """The burst: subscribes replaying every zone from seq 0, and the largest histories."""
    zones = ["pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone"]
    subscribe = orjson.dumps(
        {"type": "subscribe", "zones": zones, "since": dict.fromkeys(zones, 0)}
    )
    frames = [
        client_frame(0x1, subscribe if n % 2 == 0 else orjson.dumps(
            {"type": "request_price_history", "market_zone": zones[n % 7], "limit": AMP_HISTORY}
        ))
        for n in range(AMP_FRAMES)
    ]
    return b"".join(frames)


async def health_latency(session: aiohttp.ClientSession, url: str) -> float:
    started = time.monotonic()
    async with session.get(url + "/api/ws/ws/health") as response:
        assert response.status == 200
    return time.monotonic() - started


async def test_sockets_that_never_read_cannot_make_the_server_queue_replays() -> None:
    with ServerProcess(
        "--no-simulate", "--history-size", str(AMP_HISTORY), "--log-level", "warning",
        publish_key=KEY,
    ) as server:
        assert server.process is not None
        pid = server.process.pid
        zones = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
        for zone in zones:
            for start in range(0, AMP_HISTORY, 1000):
                await server.publish(
                    *({"market_zone": zone, "price": float(n)} for n in range(start, start + 1000))
                )
        async with aiohttp.ClientSession() as session:
            await health_latency(session, server.url)
            baseline = rss_kb(pid)
            burst = amplifying_frames()
            attackers = [
                await RawSocket.open(server.port, "/api/ws/ws/prices?zones=", receive_buffer=4096)
                for _ in range(AMP_SOCKETS)
            ]
            for sock in attackers:  # never read: the server's writes back up at once
                sock.writer.write(burst)
            # Observe a fixed window: the server handles the bursts (before the fix, all of
            # them within it) while health is probed and RSS sampled.
            latencies, peak = [], baseline
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                latencies.append(await health_latency(session, server.url))
                peak = max(peak, rss_kb(pid))
                await asyncio.sleep(0.05)
            for sock in attackers:
                sock.abort()
    growth = peak - baseline
    print(f"\nRSS kB: baseline {baseline}, peak {peak} (+{growth // AMP_SOCKETS} per socket); "
          f"health max {max(latencies):.3f} s over {len(latencies)} probes: "
          f"{[round(x, 3) for x in latencies[:8]]}")
    assert growth < AMP_SOCKETS * AMP_RSS_PER_SOCKET_KB
    assert max(latencies) < HEALTH_BUDGET


# --- control frames count against the rate (issue 11 item 3) -------------------------------


async def test_a_flood_of_unsolicited_pongs_is_closed_4029_and_health_stays_fast() -> None:
    with ServerProcess("--no-simulate", "--log-level", "warning", publish_key=KEY) as server:
        flooders = [
            await RawSocket.open(server.port, "/api/ws/ws/market/pjm") for _ in range(4)
        ]
        pong = client_frame(0xA, b"")
        codes = []
        async with aiohttp.ClientSession() as session:
            for sock in flooders:
                # Far more than the burst (40) and the run of rejections (20) that close.
                sock.writer.write(pong * 2000)
            latencies = [await health_latency(session, server.url) for _ in range(5)]
            for sock in flooders:
                async with asyncio.timeout(WAIT):
                    codes.append(await sock.close_code())
                sock.abort()
    print(f"\npong flood: close codes {codes}, health max {max(latencies):.3f} s")
    assert codes == [4029] * 4
    assert max(latencies) < HEALTH_BUDGET


# --- the close code in the log is the one sent (issue 11 item 12) ---------------------------


async def test_shutdown_close_is_logged_with_the_code_clients_receive() -> None:
    with ServerProcess("--no-simulate", "--log-format", "json", publish_key=KEY) as server:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(server.ws_url + "/api/ws/ws/market/pjm")
            hello = await ws.receive_json(timeout=WAIT)
            assert server.process is not None
            server.process.terminate()  # SIGTERM: every socket gets 1001
            message = await ws.receive(timeout=WAIT)
            assert message.type is WSMsgType.CLOSE and ws.close_code == 1001
            # Wait for the exit (a second SIGTERM would not be a graceful stop).
            assert await asyncio.to_thread(server.process.wait, WAIT) == 0
        lines = [orjson.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    gone = [
        line for line in lines
        if line["event"] == "disconnected" and line.get("connection_id") == hello["connection_id"]
    ]
    assert [(line["reason"], line["close_code"]) for line in gone] == [("shutdown", 1001)]
