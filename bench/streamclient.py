"""Load-client process for ``bench/sse_bench.py``: N raw subscribers of one transport.

Both transports are read the same way (asyncio protocols, a regex over the bytes for the
``price_update`` seq), so what differs between the two runs is the server's work, not the
client's. ``python -m bench.streamclient --transport sse --port P --clients N`` prints
``ready`` once every subscriber got its first bytes, then on stdin ``report`` prints the
deliveries and seq gaps seen so far as one JSON line, and exits on ``exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import sys

import orjson

__all__ = ["Subscriber"]

PRICE = re.compile(rb'"type":"price_update","seq":(\d+)')
TAIL = 256  # bytes kept between reads: a match split across two reads completes next time


class Subscriber(asyncio.Protocol):
    """Counts price updates and holes in their seqs; answers WebSocket pings."""

    def __init__(self, request: bytes, ready: asyncio.Event) -> None:
        self.request = request
        self.ready = ready
        self.buffer = b""
        self.last_seq = 0
        self.deliveries = 0
        self.lost = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.ready.set()
        buffer = self.buffer + data
        end = 0
        for match in PRICE.finditer(buffer):
            seq = int(match.group(1))
            if self.last_seq and seq > self.last_seq + 1:
                self.lost += seq - self.last_seq - 1
            self.last_seq = max(self.last_seq, seq)
            self.deliveries += 1
            end = match.end()
        self.buffer = buffer[max(end, len(buffer) - TAIL) :]


def request(transport: str, zone: str) -> bytes:
    if transport == "sse":
        return f"GET /api/ws/sse/market/{zone} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /api/ws/ws/market/{zone} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    subscribers: list[Subscriber] = []
    for _ in range(args.clients):
        ready = asyncio.Event()
        _, protocol = await loop.create_connection(
            lambda r=ready: Subscriber(request(args.transport, args.zone), r),  # type: ignore[misc]
            "127.0.0.1", args.port,
        )  # fmt: skip
        subscribers.append(protocol)
    async with asyncio.timeout(60):
        await asyncio.gather(*(s.ready.wait() for s in subscribers))
    print(orjson.dumps({"event": "ready"}).decode(), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).strip():
        if line == b"report":
            report = {
                "event": "report",
                "deliveries": sum(s.deliveries for s in subscribers),
                "lost": sum(s.lost for s in subscribers),
                "closed": sum(1 for s in subscribers if s.transport and s.transport.is_closing()),
            }
            print(orjson.dumps(report).decode(), flush=True)
        elif line == b"exit":
            break


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["ws", "sse"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--zone", default="pjm")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
