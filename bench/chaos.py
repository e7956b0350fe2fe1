"""Chaos soak (issue 13): a pricehub cluster under seeded faults, checked for what clients see.

Run from the repository root::

    python -m bench.chaos --seed 1 --duration 90     # ~100 s: random faults for 90 s
    python -m bench.chaos --short --seed 1           # CI size: each fault kind once, < 60 s
    python -m bench.chaos --short --json --check     # JSON on stdout; exit 1 on (a)-(h) > 0

What runs: one ``redis-server`` (no persistence) on a free port; two pricehub instances on it
(``--no-simulate --publish-key``, zones pjm, ercot, caiso); 60 resuming WebSocket clients, half
single-zone, half multi-zone, spread over both instances, which reconnect after every close (to
either instance) and resume with ``since``/``epoch``; a publisher POSTing ~40 prices/s, one price
per request, alternating instances, each price carrying a nonce in ``volume``, and a producer
``XADD``ing ~20 entries/s to the ingest stream, nonces in ``volume`` too. While that runs,
faults from a seeded schedule hit Redis (SIGKILL + restart on the same port, SIGSTOP/SIGCONT
short and long) and the instances (SIGTERM + restart, SIGKILL + restart), one at a time.

What is measured, and how to read the output (details in bench/README.md, "Chaos soak"):

(a) ``undeclared_gaps``   a client got seq N, then N+k (k > 1) of a zone in the same epoch,
                          with no ``resume_complete`` ``recovered: false`` in between;
(b) ``duplicates``        a client got the same (zone, epoch, seq) twice outside a declared reset;
(c) ``conflicting_keys``  (zone, epoch, seq) keys naming two different prices across all clients
                          and all 202 answers (the split-brain symptom);
(d) ``lost_accepted``     202-accepted prices no client received although some client followed
                          that zone in that epoch over the publish without a declared break.

(e)-(h) check the Redis stream ingest the same way (``bench/chaos_stream.py``: an entry appended
twice, entries numbered against stream order, a backlog left after the drain, an entry lost).

(a)-(h) are the contract's promises and should be 0; ``--check`` exits 1 when one is not. The
rest is context, charged to the fault active at the time or ended at most 5 s before: non-202
publish answers, ``mass_closes_1001`` (1001 closes not caused by the client's own instance
shutting down, e.g. an epoch change), ``recovered_false`` resumes; publish-to-receive latency
p50/p99 of live deliveries inside vs outside fault windows; server RSS at the start and end of the
soak; ``Traceback`` count in the server logs. Output: a table on stdout (or the JSON with
``--json``), the JSON in ``bench/out/chaos-<seed>.json``, server logs in
``bench/out/chaos-<seed>/``. Exit code 0 unless the harness itself fails (2) or ``--check`` finds
(a)-(h) non-zero (1).

Everything runs on 127.0.0.1, every wait is bounded, every child is killed when this ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.chaos_analysis import analyse, table
from bench.chaos_clients import EpochWatcher, Recorder, ResumingClient
from bench.chaos_faults import Fault, inject, plan_faults
from bench.chaos_procs import HarnessError, Instance, RedisServer
from bench.chaos_publisher import Publisher
from bench.chaos_stream import StreamProducer

__all__ = ["main"]

OUT = Path(__file__).resolve().parent / "out"
ZONES = ("pjm", "ercot", "caiso")
INSTANCES = 2
CLIENTS = 60
RATE = 40.0
STREAM_RATE = 20.0
WARMUP = 3.0
SETTLE = 5.0  # quiet seconds after the last fault before publishing stops
DRAIN = 3.0  # seconds clients keep reading after the last publish
CONNECT_WAIT = 15.0
STOP_WAIT = 10.0


@dataclass
class Cluster:
    redis: RedisServer
    instances: list[Instance]
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)

    def rss(self) -> dict[str, int]:
        return {"redis": self.redis.rss_kib()} | {i.name: i.rss_kib() for i in self.instances}

    async def shutdown(self) -> None:
        for child in (*self.instances, self.redis):
            with contextlib.suppress(Exception):
                await child.shutdown()

    def servers(self) -> dict[str, dict[str, int]]:
        info = {
            "redis": {
                "starts": self.redis.starts,
                "rss_kib_start": self.rss_start.get("redis", 0),
                "rss_kib_end": self.rss_end.get("redis", 0),
            },
        }
        for instance in self.instances:
            info[instance.name] = {
                "starts": instance.starts,
                "rss_kib_start": self.rss_start.get(instance.name, 0),
                "rss_kib_end": self.rss_end.get(instance.name, 0),
                "tracebacks": instance.tracebacks(),
            }
        return info


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds faults, clients, prices")
    parser.add_argument(
        "--duration",
        type=float,
        default=90.0,
        help="seconds of publishing under faults (ignored with --short)",
    )
    parser.add_argument(
        "--short", action="store_true", help="CI size: each fault kind once, about 50 s in all"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report, not tables")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where logs and the report go (default {OUT})"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any of (a)-(h) is non-zero")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="WebSocket clients")
    parser.add_argument("--rate", type=float, default=RATE, help="prices per second")
    parser.add_argument(
        "--stream-rate", type=float, default=STREAM_RATE,
        help="ingest stream entries per second",
    )  # fmt: skip
    return parser.parse_args(argv)


async def start_cluster(workdir: Path) -> Cluster:
    redis = RedisServer(workdir)
    await redis.start()
    key = secrets.token_hex(16)  # hex: a urlsafe token may start with "-" (read as a flag)
    instances = [
        Instance(i, workdir, redis_url=redis.url, zones=ZONES, key=key) for i in range(INSTANCES)
    ]
    cluster = Cluster(redis, instances)
    try:
        await asyncio.gather(*(instance.start() for instance in instances))
    except BaseException:
        await cluster.shutdown()
        raise
    return cluster


def make_clients(
    count: int, cluster: Cluster, recorder: Recorder, seed: int
) -> list[ResumingClient]:
    """Half single-zone (zones in turn), half multi-zone (all zones, or two of them); each
    starts on the instances in turn and then reconnects to a random one."""
    bases = [instance.ws for instance in cluster.instances]
    clients = []
    for ident in range(count):
        multi = ident % 2 == 1
        offset = ident // 2
        first = offset % len(ZONES)
        if not multi:
            zones: tuple[str, ...] = (ZONES[first],)
        else:
            zones = ZONES if offset % 2 == 0 else (ZONES[first], ZONES[(first + 1) % len(ZONES)])
        client = ResumingClient(
            ident,
            zones,
            multi=multi,
            instances=bases,
            recorder=recorder,
            rng=random.Random(f"{seed}-client-{ident}"),
        )
        client.instance = offset % len(bases)
        clients.append(client)
    return clients


async def wait_connected(clients: Sequence[ResumingClient]) -> None:
    deadline = time.monotonic() + CONNECT_WAIT
    while sum(c.connected for c in clients) < len(clients):
        if time.monotonic() > deadline:
            raise HarnessError(
                f"only {sum(c.connected for c in clients)} of {len(clients)} "
                f"clients connected within {CONNECT_WAIT} s"
            )
        await asyncio.sleep(0.1)


def load(clients: Sequence[ResumingClient]) -> list[int]:
    """Connected clients per instance."""
    return [sum(c.connected and c.instance == i for c in clients) for i in range(INSTANCES)]


async def run_faults(
    args: argparse.Namespace, cluster: Cluster, clients: Sequence[ResumingClient], deadline: float
) -> list[Fault]:
    budget = deadline - time.time() - SETTLE
    plans = plan_faults(
        random.Random(f"{args.seed}-faults"), short=args.short, budget=budget, instances=INSTANCES
    )
    faults: list[Fault] = []
    for plan in plans:
        if not args.short and time.time() + plan.gap + plan.hold > deadline - SETTLE:
            break
        await asyncio.sleep(plan.gap)
        fault = await inject(plan, cluster.redis, cluster.instances, load(clients))
        faults.append(fault)
        say(f"fault {len(faults)}/{len(plans)}: {fault.as_dict(fault.start)}")
    return faults


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.time()
    cluster = await start_cluster(workdir)
    say(
        f"redis on {cluster.redis.port}, instances on "
        f"{', '.join(str(i.port) for i in cluster.instances)}; logs in {workdir}"
    )
    recorder = Recorder()
    stop_clients, stop_publisher = asyncio.Event(), asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
    tasks: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            clients = make_clients(args.clients, cluster, recorder, args.seed)
            watchers = [EpochWatcher(i.index, i.ws, recorder) for i in cluster.instances]
            runners = [c.run(session, stop_clients) for c in clients]
            runners += [w.run(session, stop_clients) for w in watchers]
            tasks = [asyncio.create_task(runner) for runner in runners]
            await wait_connected(clients)
            publisher = Publisher(
                [i.http for i in cluster.instances],
                cluster.instances[0].key,
                ZONES,
                rate=args.rate,
                rng=random.Random(f"{args.seed}-prices"),
            )
            publishing = asyncio.create_task(publisher.run(stop_publisher))
            producer = StreamProducer(cluster.redis.url, ZONES, rate=args.stream_rate)
            streaming = asyncio.create_task(producer.run(stop_publisher))
            origin = time.time()
            await asyncio.sleep(WARMUP)
            cluster.rss_start = cluster.rss()
            deadline = origin + (args.duration if not args.short else 1e9)
            faults = await run_faults(args, cluster, clients, deadline)
            await asyncio.sleep(max(SETTLE, (deadline - time.time()) if not args.short else 0))
            stop_publisher.set()
            await asyncio.gather(publishing, streaming)
            await asyncio.sleep(DRAIN)
            await producer.measure_backlog()
            cluster.rss_end = cluster.rss()
            stop_clients.set()
            await asyncio.wait(tasks, timeout=STOP_WAIT)
    finally:
        stop_clients.set()
        for task in tasks:
            task.cancel()
        await cluster.shutdown()
    report = analyse(
        recorder, publisher.log, faults,
        origin=origin, servers=cluster.servers(), stream=producer.log,
    )  # fmt: skip
    config = {
        "clients": args.clients,
        "rate": args.rate,
        "stream_rate": args.stream_rate,
        "zones": list(ZONES),
        "instances": INSTANCES,
        "duration": None if args.short else args.duration,
    }
    return {
        "seed": args.seed,
        "short": args.short,
        "run_seconds": round(time.time() - started, 1),
        "config": config,
        **report,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.out / f"chaos-{args.seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        report = asyncio.run(soak(args, workdir))
    except HarnessError as exc:
        say(f"harness failed: {exc}")
        return 2
    path = args.out / f"chaos-{args.seed}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str) if args.json else table(report))
    say(f"report written to {path}")
    return 1 if args.check and report["check_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
