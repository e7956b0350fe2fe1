"""Burst over HTTP on two pricehub instances: one Redis node vs a 3-master Redis Cluster.

::

    python -m bench.cluster_burst                       # 500 zones x 4 rounds, all cases
    python -m bench.cluster_burst --zones 1000 --rounds 2 --cases single cluster

Per case: a fresh store (a ``redis-server``, or six nodes: 3 masters + 3 replicas, from
``tests.harness.redisproc``), two ``run_server.py`` instances on it
(``tests.harness.serverproc``), and
``--clients`` WebSocket subscribers spread over both, each on a slice of
``--zones-per-client`` zones. Then the burst: ``rounds`` prices for every zone, POSTed in
batches of ``--batch`` with ``--in-flight`` requests at a time, alternating instances.

Printed per case: accepted prices/s (burst start to the last 202) and fan-out completion
(burst start until every subscriber has the last seq of each of its zones), plus a check
that every subscriber saw each of its zones' seqs once, in order.

Cases: ``single`` (one node), ``cluster``, ``cluster-wait`` (``?wait_replicas=1``: a
price is acknowledged only once a replica has it). Loopback only; every process is a
child of this one and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from tests.harness.redisproc import RedisCluster, RedisProcess
from tests.harness.serverproc import ServerProcess

__all__ = ["main"]

KEY = "bench-cluster-key"
CASES = ("single", "cluster", "cluster-wait")


@dataclass(slots=True)
class Result:
    case: str
    prices: int
    accept_s: float
    fanout_s: float
    in_order: bool

    def row(self) -> str:
        rate = self.prices / self.accept_s if self.accept_s else 0.0
        return (
            f"| {self.case} | {self.prices} | {rate:,.0f} | {self.accept_s:.2f} | "
            f"{self.fanout_s:.2f} | {'yes' if self.in_order else 'NO'} |"
        )


class Watcher:
    """One subscriber: the seqs it got per zone."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, zones: list[str]) -> None:
        self.ws = ws
        self.zones = zones
        self.seqs: dict[str, list[int]] = {zone: [] for zone in zones}
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(message.data)
            if data["type"] == "price_update":
                self.seqs[data["market_zone"]].append(data["seq"])
                self.changed.set()

    def complete(self, last: int) -> bool:
        return all(seqs[-1:] == [last] for seqs in self.seqs.values())

    def in_order(self, last: int) -> bool:
        return all(seqs == list(range(1, last + 1)) for seqs in self.seqs.values())


@contextlib.contextmanager
def store(case: str) -> Iterator[str]:
    """The Redis URL of a fresh store for ``case``."""
    if case == "single":
        with RedisProcess() as node:
            yield node.url
        return
    with RedisCluster() as cluster:
        yield cluster.url + ("?wait_replicas=1" if case == "cluster-wait" else "")


@contextlib.asynccontextmanager
async def instances(url: str, zones: list[str]) -> AsyncIterator[list[ServerProcess]]:
    args = ["--no-simulate", "--zones", ",".join(zones), "--log-format", "json",
            "--publish-rate-limit", "100000", "--max-connections-per-ip", "100000"]  # fmt: skip
    started = [ServerProcess(*args, publish_key=KEY, redis_url=url) for _ in range(2)]
    try:
        await asyncio.gather(*(server.start_async() for server in started))
        yield started
    finally:
        await asyncio.gather(*(s.stop_async() for s in started if s.running),
                             return_exceptions=True)  # fmt: skip


async def burst(
    session: aiohttp.ClientSession, servers: list[ServerProcess], zones: list[str],
    options: argparse.Namespace,
) -> float:  # fmt: skip
    """POST every price; seconds until the last 202."""
    targets = itertools.cycle(servers)
    gate = asyncio.Semaphore(options.in_flight)

    async def send(batch: list[dict[str, Any]], server: ServerProcess) -> None:
        async with gate, session.post(
            server.url + "/api/ws/ws/broadcast/price", json=batch,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:  # fmt: skip
            if response.status != 202:
                raise RuntimeError(f"{response.status}: {await response.text()}")

    started = time.monotonic()
    # Round by round: a zone's price of round r+1 (maybe on the other instance) is sent
    # once round r is accepted, so "in order" checks the servers, not this driver.
    for price in range(options.rounds):
        prices = [{"market_zone": zone, "price": float(price)} for zone in zones]
        batches = [prices[i : i + options.batch] for i in range(0, len(prices), options.batch)]
        await asyncio.gather(*(send(batch, next(targets)) for batch in batches))
    return time.monotonic() - started


async def run_case(case: str, options: argparse.Namespace) -> Result:
    zones = [f"z{index}" for index in range(options.zones)]
    with store(case) as url:
        async with instances(url, zones) as servers, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)
        ) as session:  # fmt: skip
            watchers = []
            for index in range(options.clients):
                first = index * options.zones_per_client % len(zones)
                mine = (zones * 2)[first : first + options.zones_per_client]
                server = servers[index % 2]
                ws = await session.ws_connect(
                    server.ws_url + "/api/ws/ws/prices?zones=" + ",".join(mine)
                )
                watchers.append(Watcher(ws, mine))
            await asyncio.sleep(0.5)  # subscriptions settle (initial frames)
            started = time.monotonic()
            accept_s = await burst(session, servers, zones, options)
            async with asyncio.timeout(options.timeout):
                for watcher in watchers:
                    while not watcher.complete(options.rounds):
                        watcher.changed.clear()
                        await watcher.changed.wait()
            fanout_s = time.monotonic() - started
            in_order = all(w.in_order(options.rounds) for w in watchers)
            for watcher in watchers:
                await watcher.ws.close()
    return Result(case, options.zones * options.rounds, accept_s, fanout_s, in_order)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_burst")
    parser.add_argument("--zones", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4, help="prices per zone")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--zones-per-client", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100, help="prices per POST")
    parser.add_argument("--in-flight", type=int, default=4, help="POSTs at a time")
    parser.add_argument("--timeout", type=float, default=60.0, help="fan-out bound, s")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    print(f"{options.zones} zones x {options.rounds} rounds, {options.clients} subscribers "
          f"x {options.zones_per_client} zones, 2 instances, batches of {options.batch}, "
          f"{options.in_flight} in flight")  # fmt: skip
    print("| case | prices | accepted/s | accept s | fan-out done s | each seq once, in order |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in options.cases:
        print(asyncio.run(run_case(case, options)).row(), flush=True)


if __name__ == "__main__":
    main()
