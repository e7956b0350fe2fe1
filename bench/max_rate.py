"""``max_rate`` bench (issue 25): many subscribers of one zone at ``max_rate`` while the zone
gets far more updates, against the same run without ``max_rate``.

Run from the repository root::

    python bench/max_rate.py                      # 2,000 subscribers, 200 updates/s, max_rate=4
    python bench/max_rate.py --clients 500 --duration 5

Both runs use ``bench/run.py``'s pieces (a fresh ``running_server`` each, the picows
``client_fleet``, its CPU ``snapshot``s). The publisher here is open loop like
``bench/publisher.py`` but counts what the server accepted, so that it can post ``--batch``
prices of the zone per POST (``--batch 1``: one price per POST, 200 POSTs/s; ``--batch 10``:
20 POSTs of 10, which leaves the fan-out, not HTTP, as what is measured). ``volume`` carries
the send time, as for ``loadclient.py``'s latency. Printed per run: server CPU over the window
(publishing, then ``--drain`` seconds) per *published* update, deliveries, and for the last
published update: how many subscribers got it and its worst publish-to-receive time. Checks
(exit 1 if one fails):

* server CPU per published update with ``max_rate`` <= ``--max-ratio`` (0.25) x without;
* every subscriber's last delivered seq is the last published one, within ``1/max_rate``
  (0.25 s at 4/s) + ``--noise`` s.

Loss is not counted (with ``max_rate`` most seqs are skipped by design, ``skipped`` says
so): the load clients are asked about the last published seq only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from publisher import MAX_IN_FLIGHT, TIMEOUT, iso_ms
from run import (
    BENCH,
    QUICK_IDLE,
    ClientProc,
    Group,
    Plan,
    Server,
    Snapshot,
    client_fleet,
    running_server,
    snapshot,
    split,
)
from servers.common import MARKET_PREFIX, ZONES

__all__ = ["main"]

ZONE = ZONES[0]


@dataclass(frozen=True)
class Outcome:
    """One run's numbers."""

    label: str
    published: int
    cpu_s: float
    deliveries: int
    got_last: int
    connected: int
    worst_last_s: float
    conflated: int
    ticks_skipped: int  # POSTs not sent: MAX_IN_FLIGHT unanswered (a saturated server)
    posts_failed: int

    @property
    def cpu_us_per_published(self) -> float:
        return 1e6 * self.cpu_s / self.published if self.published else float("nan")

    def line(self) -> str:
        return (
            f"{self.label:>14}: {self.published} published, server CPU {self.cpu_s:.3f} s = "
            f"{self.cpu_us_per_published:.1f} us per published update; "
            f"{self.deliveries} deliveries; last seq reached {self.got_last}/{self.connected} "
            f"subscribers, worst {1000 * self.worst_last_s:.0f} ms after its publish; "
            f"conflated {self.conflated}; POSTs skipped {self.ticks_skipped}, failed "
            f"{self.posts_failed}"
        )


def build_plan(args: argparse.Namespace) -> Plan:
    """``bench/run.py``'s plan for pricehub alone (the server pinned to a core of its own)."""
    cpus = frozenset(os.sched_getaffinity(0))
    server_cpus = frozenset({min(cpus)}) if len(cpus) > 1 else cpus
    out = args.out or BENCH / "out" / ("max_rate-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    return Plan(
        streams={}, idle=QUICK_IDLE, servers=("pricehub",), client_procs=args.client_procs,
        repeat=1, server_cpus=server_cpus, client_cpus=cpus - server_cpus or cpus, out=out,
        pricehub_args=(),
    )  # fmt: skip


@dataclass
class Window:
    """The measured window: CPU snapshots, prices accepted from POSTs sent inside it, and
    the highest seq accepted (the last published)."""

    before: Snapshot | None = None
    after: Snapshot | None = None
    published: int = 0
    last_seq: int = 0
    failed: int = 0
    skipped: int = 0


def body(batch: int, t0: float, tick: int) -> bytes:
    now = time.time()
    price = {"market_zone": ZONE, "price": round(40 + (tick % 97) / 10, 2),
             "volume": round((now - t0) * 1e6), "timestamp": iso_ms(now)}  # fmt: skip
    return json.dumps(price if batch == 1 else [price] * batch).encode()


async def measure(
    args: argparse.Namespace, server: Server, procs: list[ClientProc], t0: float
) -> Window:
    """Publish ``--rate`` prices/s in POSTs of ``--batch`` through warm-up and window, open
    loop (a tick due while MAX_IN_FLIGHT POSTs are unanswered is skipped and counted)."""
    window = Window()
    headers = {"Authorization": f"Bearer {server.publish_key}",
               "Content-Type": "application/json"}  # fmt: skip
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    in_flight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as session:

        async def post(data: bytes, measured: bool) -> None:
            try:
                async with session.post(server.publish_url, data=data, headers=headers) as answer:
                    accepted = (await answer.json())["accepted"] if answer.status == 202 else []
            except (aiohttp.ClientError, TimeoutError):
                accepted = []
            if not accepted:
                window.failed += 1
                return
            window.last_seq = max(window.last_seq, accepted[-1]["seq"])
            window.published += len(accepted) if measured else 0

        ticks_per_s = args.rate / args.batch
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_at, end = start + args.warmup, start + args.warmup + args.duration
        tick = 0
        while (due := start + tick / ticks_per_s) < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            measured = due >= measure_at
            if measured and window.before is None:
                window.before = snapshot(server, procs)
            if len(in_flight) >= MAX_IN_FLIGHT:
                window.skipped += 1
            else:
                task = asyncio.create_task(post(body(args.batch, t0, tick), measured))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            tick += 1
        if in_flight:
            await asyncio.wait(in_flight, timeout=TIMEOUT)
    await asyncio.sleep(args.drain)
    window.after = snapshot(server, procs)
    return window


async def run_one(args: argparse.Namespace, plan: Plan, *, query: str, label: str,
                  t0: float) -> Outcome:  # fmt: skip
    """One fresh server, ``--clients`` subscribers of ``/market/<zone><query>``."""
    async with running_server("pricehub", plan, label) as server:
        path = MARKET_PREFIX + ZONE + query
        groups = [Group(path, (ZONE,), count) for count in split(args.clients, plan.client_procs)]
        async with client_fleet(server, groups, plan, label, t0) as (procs, connected):
            window = await measure(args, server, procs, t0)
            assert window.before is not None and window.after is not None
            last, span = window.last_seq, [window.before.at, window.after.at]
            for proc in procs:  # asked about the last published seq only: see the docstring
                await proc.send({"cmd": "report", "window": span, "ranges": {ZONE: [last, last]}})
            reports: list[dict[str, Any]] = [await proc.expect("report", 60) for proc in procs]
    return Outcome(
        label=label,
        published=window.published,
        cpu_s=window.after.server_cpu - window.before.server_cpu,
        deliveries=sum(report["deliveries_in_window"] for report in reports),
        got_last=sum(report["measured_deliveries"] for report in reports),
        connected=sum(event["ok"] for event in connected),
        worst_last_s=max(report["max_latency_us"] for report in reports) / 1e6,
        conflated=sum(report["conflated"] for report in reports),
        ticks_skipped=window.skipped,
        posts_failed=window.failed,
    )


async def run_both(args: argparse.Namespace, plan: Plan) -> tuple[Outcome, Outcome]:
    t0 = time.time()
    every = await run_one(args, plan, query="", label="every update", t0=t0)
    paced = await run_one(
        args, plan, query=f"?max_rate={args.max_rate:g}", label=f"max_rate={args.max_rate:g}",
        t0=t0,
    )  # fmt: skip
    return every, paced


def verdict(args: argparse.Namespace, every: Outcome, paced: Outcome) -> list[tuple[str, bool]]:
    ratio = paced.cpu_us_per_published / every.cpu_us_per_published
    bound = 1.0 / args.max_rate + args.noise
    return [
        (f"CPU per published update: {ratio:.3f}x (<= {args.max_ratio}x)", ratio <= args.max_ratio),
        (
            f"last seq at every subscriber: {paced.got_last}/{paced.connected}, worst "
            f"{paced.worst_last_s:.3f} s (<= {bound:.2f} s)",
            paced.got_last == paced.connected > 0 and paced.worst_last_s <= bound,
        ),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=2000, help="subscribers (2000)")
    parser.add_argument("--rate", type=float, default=200.0, help="updates/s published (200)")
    parser.add_argument("--max-rate", type=float, default=4.0, help="subscribers' max_rate (4)")
    parser.add_argument("--batch", type=int, default=1, help="prices per POST (1)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before (2)")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds after, measured (1)")
    parser.add_argument("--client-procs", type=int, default=2, help="load-client processes (2)")
    parser.add_argument("--max-ratio", type=float, default=0.25, help="CPU ratio bound (0.25)")
    parser.add_argument("--noise", type=float, default=0.1, help="latency slack, s (0.1)")
    parser.add_argument("--out", type=Path, help="logs (bench/out/max_rate-<time>/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, plan.client_cpus)  # the publisher runs on the clients' side
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    every, paced = asyncio.run(run_both(args, plan))
    print(every.line())
    print(paced.line())
    checks = verdict(args, every, paced)
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    print(f"logs: {plan.out}", file=sys.stderr)
    return 0 if all(ok for _text, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
