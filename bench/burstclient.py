"""One scenario-5 client process: multi-zone subscribers that time their share of a burst.

Started by ``bench/burst.py``. Talks JSON lines:

* stdout ``{"event": "ready"}`` once imported;
* stdin ``{"cmd": "connect", "zones": [[zone, ...], ...]}`` opens one
  ``/prices?zones=...`` socket per zone list (``--concurrency`` handshakes in flight) and answers
  ``{"event": "connected", "ok", "failed", "seconds"}`` once every socket has its
  ``connection_established``. The server opens the zones after that, one per loop turn
  (paced, issue 11): a zone opened after the burst gets the burst's price as its
  ``initial_data``, which counts as receiving it (it is the zone's price, once);
* stdin ``{"cmd": "arm", "seq": K}`` (answer ``{"event": "armed"}``) gets every socket ready
  for burst K: on a fresh server the K-th burst gives every zone its seq K, so a price of
  any other seq is not this burst's (counted in ``extra``). Armed for seq 1 on connect;
* stdin ``{"cmd": "report", "wait": S}`` waits up to S seconds for every socket to have one
  price of each of its zones and answers ``{"event": "report", "complete": [t, ...],
  "incomplete": N, "missing": N, "frames": N, "extra": N}``: ``t`` is the wall-clock time
  (``time.time()``) at which a socket had its last zone, ``missing`` the zones never received,
  ``extra`` a second price for a zone (a burst has one per zone: more is a duplicate);
* stdin ``{"cmd": "exit"}`` or end of stdin closes everything and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import aiohttp
import orjson

__all__ = ["Burst"]


class Burst:
    """One socket's zones and which of them a price has arrived for."""

    def __init__(self, zones: list[str]) -> None:
        self.zones = zones
        self.frames = 0
        self.arm(1)

    def arm(self, seq: int) -> None:
        self.seq = seq
        self.waiting = set(self.zones)
        self.extra = 0
        self.done_at: float | None = None
        self.complete = asyncio.Event()

    def on_price(self, zone: str, seq: int) -> None:
        self.frames += 1
        if seq != self.seq or zone not in self.waiting:
            self.extra += 1
            return
        self.waiting.discard(zone)
        if not self.waiting:
            self.done_at = time.time()
            self.complete.set()


async def run_socket(
    session: aiohttp.ClientSession, url: str, burst: Burst, established: asyncio.Event
) -> None:
    async with session.ws_connect(url, max_msg_size=0, autoping=True) as ws:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data: dict[str, Any] = orjson.loads(message.data)
            kind = data.get("type")
            if kind == "price_update":
                burst.on_price(data["market_zone"], data["seq"])
            elif kind == "initial_data":
                burst.on_price(data["market_zone"], data["latest_price"]["seq"])
            elif kind == "connection_established":
                established.set()


def reply(event: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(event).decode() + "\n")
    sys.stdout.flush()


async def connect(
    session: aiohttp.ClientSession, url: str, lists: list[list[str]], concurrency: int,
    tasks: list[asyncio.Task[None]],
) -> tuple[list[Burst], int, float]:
    bursts = [Burst(zones) for zones in lists]
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one(burst: Burst, zones: list[str]) -> bool:
        async with gate:
            established = asyncio.Event()
            task = asyncio.create_task(
                run_socket(session, f"{url}?zones={','.join(zones)}", burst, established)
            )
            tasks.append(task)
            waiter = asyncio.create_task(established.wait())
            await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            return established.is_set()

    results = await asyncio.gather(*(one(b, z) for b, z in zip(bursts, lists, strict=True)))
    return bursts, sum(not ok for ok in results), time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="ws://host:port/api/ws/ws/prices")
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: list[asyncio.Task[None]] = []
    bursts: list[Burst] = []
    reply({"event": "ready"})
    async with aiohttp.ClientSession() as session:
        while line := await reader.readline():
            command = orjson.loads(line)
            if command["cmd"] == "connect":
                bursts, failed, seconds = await connect(
                    session, args.url, command["zones"], args.concurrency, tasks
                )
                reply({"event": "connected", "ok": len(bursts) - failed, "failed": failed,
                       "seconds": seconds})  # fmt: skip
            elif command["cmd"] == "arm":
                for burst in bursts:
                    burst.arm(command["seq"])
                reply({"event": "armed"})
            elif command["cmd"] == "report":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(command["wait"]):
                        await asyncio.gather(*(burst.complete.wait() for burst in bursts))
                reply({
                    "event": "report",
                    "complete": [b.done_at for b in bursts if b.done_at is not None],
                    "incomplete": sum(b.done_at is None for b in bursts),
                    "missing": sum(len(b.waiting) for b in bursts),
                    "frames": sum(b.frames for b in bursts),
                    "extra": sum(b.extra for b in bursts),
                })  # fmt: skip
            else:
                break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
