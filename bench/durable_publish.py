"""Publish accept rate with a durable data dir against ``--data-dir none`` (issue 15).

::

    python bench/durable_publish.py [--seconds 10] [--data-dir DIR] [--journal old|sqlite|both]
                                    [--zones 7]

For each mode it starts ``run_server.py --redis-url none`` (no simulator, a huge
publish rate limit) and measures, for ``--seconds`` each:

* ``batch``: ``--in-flight`` publishers (default 4, as the burst scenario) each POSTing
  batches of 1,000 prices over consecutive zones, one after another;
* ``single``: 50 concurrent publishers POSTing one price each, as fast as answered, the
  zones taken in turn.

``--zones``: how many zones the server serves and the prices go to (default 7, the ISOs;
more are ``node_NNNNNN``, e.g. 20,000 for a nodal market).

It prints accepted prices per second, the ratio durable / none, and the journal's fsync
figures from the stats document (count, prices per fsync, median / max latency).
The data dir defaults to a fresh temporary directory on the disk ``/tmp`` is on.

``--journal`` picks the durable run's journal (issue 27): ``sqlite`` (default, the
server's ``SqliteJournal``), ``old`` (``legacy.journal.Journal``, swapped in through
``bench/legacy_swap/sitecustomize.py``) or ``both``: each on its own fresh data dir in the
same run, with the ratio sqlite / old.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pricehub.wire import paths  # noqa: E402
from tests.harness.serverproc import ServerProcess  # noqa: E402  (one way to run a server)

KEY = "bench-key"
JOURNALS = {"old": (str(REPO / "bench" / "legacy_swap"),), "sqlite": ()}
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


def zone_names(count: int) -> tuple[str, ...]:
    return ZONES[:count] if count <= len(ZONES) else tuple(f"node_{i:06d}" for i in range(count))


async def concurrently(server: ServerProcess, seconds: float, publishers: int,
                       body: Callable[[int], Any]) -> float:  # fmt: skip
    """``publishers`` loops POSTing ``body(n)`` (the n-th request) until ``seconds`` are
    over: prices/s."""
    url = server.url + paths.BROADCAST_PRICE
    accepted = 0
    requests = itertools.count()

    async def publisher(session: aiohttp.ClientSession, until: float) -> None:
        nonlocal accepted
        while time.perf_counter() < until:
            # Not ``accepted += await ...``: that reads ``accepted`` before the await.
            count = await post(session, url, body(next(requests)))
            accepted += count

    connector = aiohttp.TCPConnector(limit=publishers)
    async with aiohttp.ClientSession(connector=connector) as session:
        await post(session, url, body(next(requests)))  # warm-up
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(publisher(session, until) for _ in range(publishers)))
        return accepted / (time.perf_counter() - started)


async def batches(
    server: ServerProcess, seconds: float, in_flight: int, zones: tuple[str, ...]
) -> float:
    def body(n: int) -> list[dict[str, Any]]:
        first = n * BATCH
        return [{"market_zone": zones[(first + i) % len(zones)], "price": float(i)}
                for i in range(BATCH)]  # fmt: skip

    return await concurrently(server, seconds, in_flight, body)


async def singles(
    server: ServerProcess, seconds: float, in_flight: int, zones: tuple[str, ...]
) -> float:
    def body(n: int) -> dict[str, Any]:
        return {"market_zone": zones[n % len(zones)], "price": 1.0}

    return await concurrently(server, seconds, PUBLISHERS, body)


async def stats(server: ServerProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
        server.url + paths.STATS
    ) as response:
        body: dict[str, Any] = await response.json()
        return body


def journal_env(journal: str) -> dict[str, str]:
    """The server's environment for ``journal`` (``JOURNALS``: what goes on its path)."""
    path = [*JOURNALS[journal], str(REPO), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(part for part in path if part)}


async def measure(data_dir: str, seconds: float, in_flight: int, zones: tuple[str, ...],
                  journal: str = "sqlite") -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pricehub-zones-") as scratch:
        zones_file = Path(scratch) / "zones.txt"  # 20,000 names overflow one argument
        zones_file.write_text("\n".join(zones) + "\n")
        for name, scenario in (("batch", batches), ("single", singles)):
            server = ServerProcess(
                "--no-simulate", "--publish-rate-limit", "1000000", "--log-format", "json",
                "--log-level", "warning", "--zones-file", str(zones_file), publish_key=KEY,
                data_dir=data_dir, env=journal_env(journal),
            )  # fmt: skip
            with server:
                rate = await scenario(server, seconds, in_flight, zones)
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
    parser.add_argument("--zones", type=int, default=7, help="zones served and published to")
    parser.add_argument("--journal", choices=("old", "sqlite", "both"), default="sqlite",
                        help="the durable run's journal (default sqlite)")  # fmt: skip
    args = parser.parse_args()
    journals = ["old", "sqlite"] if args.journal == "both" else [args.journal]
    if args.data_dir and len(journals) > 1:
        parser.error("--journal both uses a fresh data dir for each journal")
    durable: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pricehub-bench-") as scratch:
        zones = zone_names(args.zones)
        none = await measure("none", args.seconds, args.in_flight, zones)
        for journal in journals:
            durable_dir = args.data_dir or str(Path(scratch) / f"data-{journal}")
            durable[journal] = await measure(
                durable_dir, args.seconds, args.in_flight, zones, journal
            )
    heads = " | ".join(f"{journal} (prices/s) | {journal} / none | {journal} journal"
                       for journal in journals)  # fmt: skip
    compare = " | sqlite / old |" if len(journals) > 1 else " |"
    print(f"{len(zones)} zones")
    print(f"| scenario | --data-dir none (prices/s) | {heads}{compare}")
    print("| --- " * (2 + 3 * len(journals) + (len(journals) > 1)) + "|")
    for name, label in (("batch", f"HTTP batches of {BATCH}, {args.in_flight} in flight"),
                        ("single", f"{PUBLISHERS} concurrent single-price publishers")):
        plain = none[name]["rate"]
        cells = [f"{plain:,.0f}"]
        for journal in journals:
            kept = durable[journal][name]
            cells += [f"{kept['rate']:,.0f}", f"{kept['rate'] / plain:.2f}",
                      fsync_line(kept["durability"])]  # fmt: skip
        if len(journals) > 1:
            cells.append(f"{durable['sqlite'][name]['rate'] / durable['old'][name]['rate']:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
