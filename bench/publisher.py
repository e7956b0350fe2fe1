"""The benchmark's publisher: POSTs prices at a fixed tick rate, open loop.

Each tick is one ``POST /api/ws/ws/broadcast/price`` carrying one price per zone (a single
object for one zone, a list otherwise). ``volume`` holds the send time in integer microseconds
since the run's origin ``t0``, which the load clients subtract from their receive time.

Ticks are scheduled on the clock, not on answers: a server that answers slowly does not slow the
publisher down, up to ``MAX_IN_FLIGHT`` unanswered POSTs; a tick due while that many are pending
is skipped and counted.

Expected seqs: the first tick is awaited and its answer gives each zone's first seq; as seqs
grow by one per accepted update, the n-th update sent for a zone should carry ``first + n``. So
the measured window's updates are known even when a blocked server never answers them, and a
subscriber that never received them counts them as lost.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

__all__ = ["MAX_IN_FLIGHT", "Poster", "PublishLog", "publish"]

MAX_IN_FLIGHT = 16
TIMEOUT = 10.0


@dataclass
class PublishLog:
    first_seq: dict[str, int] = field(default_factory=dict)
    sent_before: Counter[str] = field(default_factory=Counter)  # per zone, before the window
    sent_during: Counter[str] = field(default_factory=Counter)  # per zone, in the window
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    def ranges(self) -> dict[str, list[int]]:
        """Per zone, the first and last seq published during the measured window."""
        ranges = {}
        for zone, count in self.sent_during.items():
            low = self.first_seq[zone] + self.sent_before[zone]
            ranges[zone] = [low, low + count - 1]
        return ranges


def iso_ms(moment: float) -> str:
    stamp = datetime.fromtimestamp(moment, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class Poster:
    """Turns ticks into POST bodies and posts them; a server with another publish API (the
    Pusher peers, bench/servers/peers.py) brings a subclass."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, zones: tuple[str, ...]):
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.zones = zones

    def body(self, tick: int, t0: float) -> str:
        now = time.time()
        prices = [
            {
                "market_zone": zone,
                "price": round(40 + (tick % 97) / 10, 2),
                "volume": round((now - t0) * 1e6),
                "timestamp": iso_ms(now),
            }
            for zone in self.zones
        ]
        return json.dumps(prices[0] if len(prices) == 1 else prices)

    async def post(self, body: str) -> dict[str, Any]:
        async with self.session.post(self.url, data=body, headers=self.headers) as response:
            if response.status != 202:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            answer: dict[str, Any] = await response.json()
            return answer


async def publish(
    *,
    url: str,
    key: str,
    zones: tuple[str, ...],
    rate: float,
    seconds: float,
    t0: float,
    measure_from: float,
    log: PublishLog,
    poster_class: type[Poster] = Poster,
) -> None:
    """Publish ``rate`` ticks/s for ``seconds``; ticks sent at or after ``measure_from`` (wall
    clock) are the measured ones."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    in_flight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        poster = poster_class(session, url, key, zones)
        first = await poster.post(poster.body(0, t0))
        log.first_seq = {item["market_zone"]: item["seq"] for item in first["accepted"]}
        log.sent_before.update(zones)

        async def send(body: str) -> None:
            try:
                await poster.post(body)
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.failed[str(exc)[:60] or type(exc).__name__] += 1

        loop = asyncio.get_running_loop()
        start = loop.time()
        for tick in range(1, math.ceil(seconds * rate)):
            await asyncio.sleep(max(0.0, start + tick / rate - loop.time()))
            if len(in_flight) >= MAX_IN_FLIGHT:
                log.skipped += 1
                continue
            (log.sent_during if time.time() >= measure_from else log.sent_before).update(zones)
            task = asyncio.create_task(send(poster.body(tick, t0)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            _done, pending = await asyncio.wait(in_flight, timeout=TIMEOUT)
            log.failed["no answer"] += len(pending)  # cancelled when the session closes
