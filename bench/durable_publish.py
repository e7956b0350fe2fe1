"""Publish accept rate with a durable data dir against ``--data-dir none`` (issue 15).

::

    python bench/durable_publish.py [--seconds 10] [--data-dir DIR]

For each mode it starts ``run_server.py --redis-url none`` (no simulator, a huge
publish rate limit) and measures, for ``--seconds`` each:

* ``batch``: ``--in-flight`` publishers (default 4, as the burst scenario) each POSTing
  batches of 1,000 prices (7 zones), one after another;
* ``single``: 50 concurrent publishers POSTing one price each, as fast as answered.

It prints accepted prices per second, the ratio durable / none, and the journal's fsync
figures from the stats document (count, prices per fsync, median / max latency).
The data dir defaults to a fresh temporary directory on the disk ``/tmp`` is on.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pricehub.wire import paths  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402  (one way to run a server)

KEY = "bench-key"
ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
BATCH = 1000
PUBLISHERS = 50


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> int:
    async with session.post(
        url, json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        data = await response.json()
        if response.status != 202:
            raise RuntimeError(f"publish answered {response.status}: {data}")
        return len(data["accepted"])


async def concurrently(server: ServerProcess, seconds: float, publishers: int,
                       body: Any) -> float:  # fmt: skip
    """``publishers`` loops POSTing ``body`` until ``seconds`` are over: prices/s."""
    url = server.url + paths.BROADCAST_PRICE
    accepted = 0

    async def publisher(session: aiohttp.ClientSession, until: float) -> None:
        nonlocal accepted
        while time.perf_counter() < until:
            # Not ``accepted += await ...``: that reads ``accepted`` before the await.
            count = await post(session, url, body)
            accepted += count

    connector = aiohttp.TCPConnector(limit=publishers)
    async with aiohttp.ClientSession(connector=connector) as session:
        await post(session, url, body)  # warm-up
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(publisher(session, until) for _ in range(publishers)))
        return accepted / (time.perf_counter() - started)


async def batches(server: ServerProcess, seconds: float, in_flight: int) -> float:
    body = [{"market_zone": ZONES[i % len(ZONES)], "price": float(i)} for i in range(BATCH)]
    return await concurrently(server, seconds, in_flight, body)


async def singles(server: ServerProcess, seconds: float, in_flight: int) -> float:
    return await concurrently(server, seconds, PUBLISHERS, {"market_zone": "pjm", "price": 1.0})


async def stats(server: ServerProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
        server.url + paths.STATS
    ) as response:
        body: dict[str, Any] = await response.json()
        return body


async def measure(data_dir: str, seconds: float, in_flight: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, scenario in (("batch", batches), ("single", singles)):
        server = ServerProcess(
            "--no-simulate", "--publish-rate-limit", "1000000", "--log-format", "json",
            "--log-level", "warning", publish_key=KEY, data_dir=data_dir,
        )  # fmt: skip
        with server:
            rate = await scenario(server, seconds, in_flight)
            durability = (await stats(server))["durability"]
        results[name] = {"rate": rate, "durability": durability}
    return results


def fsync_line(durability: dict[str, Any]) -> str:
    if durability.get("status") == "disabled":
        return "-"
    per = durability["records_written"] / max(1, durability["fsyncs"])
    return (
        f"{durability['fsyncs']} fsyncs, {per:.0f} prices/fsync, median "
        f"{durability['fsync_median_ms']} ms, max {durability['fsync_max_ms']} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--data-dir", help="durable run's data dir (default: a temp dir)")
    parser.add_argument("--in-flight", type=int, default=4, help="batch publishers (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pricehub-bench-") as scratch:
        durable_dir = args.data_dir or str(Path(scratch) / "data")
        none = await measure("none", args.seconds, args.in_flight)
        durable = await measure(durable_dir, args.seconds, args.in_flight)
    print("| scenario | --data-dir none (prices/s) | durable (prices/s) | ratio | journal |")
    print("| --- | --- | --- | --- | --- |")
    for name, label in (("batch", f"HTTP batches of {BATCH}, {args.in_flight} in flight"),
                        ("single", f"{PUBLISHERS} concurrent single-price publishers")):
        plain, kept = none[name]["rate"], durable[name]["rate"]
        print(f"| {label} | {plain:,.0f} | {kept:,.0f} | {kept / plain:.2f} | "
              f"{fsync_line(durable[name]['durability'])} |")


if __name__ == "__main__":
    asyncio.run(main())
