"""The chaos soak's publisher: one price per POST at a fixed rate, alternating instances.

POST ``n`` (1, 2, 3, ...) goes to instance ``n % instances`` and zone ``zones[n % len(zones)]``.
Each price carries ``n`` as a nonce in its ``volume`` and its send time (ms) as its
``timestamp``, so a delivered price names the POST it came from. Every 202 is kept with the
``(zone, seq)`` it was given; every other outcome (an HTTP status, a refused connection, a
timeout) is counted and kept with its time. Open loop: a tick due while ``MAX_IN_FLIGHT`` POSTs
are unanswered is skipped. ``burst`` sends many POSTs at once, for a fault that must hit while
their replies are in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson

from bench.chaos_clients import Body

__all__ = ["Accepted", "Burst", "PublishLog", "Publisher", "ticks"]

PUBLISH_PATH = "/api/ws/ws/broadcast/price"
MAX_IN_FLIGHT = 64
TIMEOUT = 5.0


def iso_ms(moment: float) -> str:
    stamp = datetime.fromtimestamp(moment, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


async def ticks(rate: float, stop: asyncio.Event) -> AsyncIterator[int]:
    """1, 2, 3, ... at ``rate`` per second from now (open loop: a late tick is not moved),
    until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while not stop.is_set():
        tick += 1
        await asyncio.sleep(max(0.0, start + tick / rate - loop.time()))
        yield tick


@dataclass(frozen=True, slots=True)
class Accepted:
    """A price an instance answered 202 for."""

    nonce: int
    zone: str
    seq: int
    instance: int
    body: Body
    sent: float
    answered: float


@dataclass
class Burst:
    """The POSTs of one ``Publisher.burst`` so far."""

    sent: int = 0
    answered: int = 0


@dataclass
class PublishLog:
    sent_at: dict[int, float] = field(default_factory=dict)  # nonce -> send time
    accepted: list[Accepted] = field(default_factory=list)
    refused: list[tuple[float, int, str]] = field(default_factory=list)  # (time, instance, why)
    statuses: Counter[str] = field(default_factory=Counter)
    skipped: int = 0


class Publisher:
    def __init__(
        self,
        urls: Sequence[str],
        key: str,
        zones: Sequence[str],
        *,
        rate: float,
        rng: random.Random,
    ) -> None:
        self.urls = [url + PUBLISH_PATH for url in urls]
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.zones = tuple(zones)
        self.rate = rate
        self.rng = rng
        self.log = PublishLog()
        self._nonces = itertools.count(1)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._pacers: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, then wait (bounded) for the POSTs in flight."""
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            async for _ in ticks(self.rate, stop):
                if not self._launch(None):
                    self.log.skipped += 1
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=TIMEOUT + 1)
        self._session = None

    async def burst(self, count: int, *, spread: float, fire: float) -> dict[str, int]:
        """Start ``count`` POSTs paced evenly over ``spread`` s and return ``fire`` s after
        the first (the in-flight bound still holds): a fault the caller fires now meets POSTs
        at every stage, just sent, in the storage, answered, broadcast. (A burst sent at once
        is answered in one turn of the loop: the fault then finds it all done, or none.)
        Returns how many POSTs were sent and answered by then; the rest go on."""
        burst = Burst()
        pacer = asyncio.create_task(self._pace(burst, count, spread))
        self._pacers.add(pacer)
        pacer.add_done_callback(self._pacers.discard)
        await asyncio.sleep(fire)
        return {
            "burst_sent_before_fault": burst.sent,
            "burst_answered_before_fault": burst.answered,
        }

    async def _pace(self, burst: Burst, count: int, spread: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(count):
            burst.sent += self._launch(burst)
            await asyncio.sleep(max(0.0, start + (index + 1) * spread / count - loop.time()))

    def _launch(self, burst: Burst | None) -> bool:
        """Start the next POST unless ``MAX_IN_FLIGHT`` are unanswered (or not running)."""
        if self._session is None or len(self._in_flight) >= MAX_IN_FLIGHT:
            return False
        task = asyncio.create_task(self._post(self._session, next(self._nonces), burst))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    async def _post(self, session: aiohttp.ClientSession, nonce: int, burst: Burst | None) -> None:
        instance = nonce % len(self.urls)
        zone = self.zones[nonce % len(self.zones)]
        sent = time.time()
        body: Body = (round(self.rng.uniform(-20, 200), 2), float(nonce), iso_ms(sent))
        price = {"market_zone": zone, "price": body[0], "volume": nonce, "timestamp": body[2]}
        self.log.sent_at[nonce] = sent
        try:
            async with session.post(
                self.urls[instance], data=orjson.dumps(price), headers=self.headers
            ) as response:
                status = str(response.status)
                answer = await response.json() if response.status == 202 else None
        except TimeoutError:
            status, answer = "timeout", None
        except (aiohttp.ClientError, OSError) as exc:
            status, answer = type(exc).__name__, None
        self.log.statuses[status] += 1
        if burst is not None:
            burst.answered += 1
        if answer is None:
            self.log.refused.append((time.time(), instance, status))
            return
        for item in answer["accepted"]:
            self.log.accepted.append(
                Accepted(
                    nonce, item["market_zone"], int(item["seq"]), instance, body, sent, time.time()
                )
            )
