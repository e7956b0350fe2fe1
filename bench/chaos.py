"""Chaos soak (issues 13, 23): pricehub under seeded faults, checked for what clients see.

Run from the repository root::

    python -m bench.chaos --seed 1 --duration 90     # ~100 s: random faults for 90 s
    python -m bench.chaos --short --seed 1           # CI size: each fault kind once, < 60 s
    python -m bench.chaos --short --topology cluster # the same on a 3 + 3 Redis Cluster
    python -m bench.chaos --short --json --check     # JSON on stdout; exit 1 on (a)-(j) > 0

``--topology`` (``bench/chaos_topology.py``): ``single`` (one ``redis-server``, no persistence,
two instances), ``sentinel`` (a master, a replica and three sentinels; two instances on
``redis+sentinel://``), ``cluster`` (three masters, three replicas; two instances on
``redis+cluster://``) or ``durable`` (no Redis: one instance, ``--redis-url none``, its data
dir on a tmpfs the soak mounts). Every instance runs ``--no-simulate --publish-key``, zones
pjm, ercot, caiso, and journals in its own data dir. 60 resuming WebSocket clients, half
single-zone, half multi-zone, spread over the instances, reconnect after every close (to any
instance) and resume with ``since``/``epoch``; a publisher POSTs ~40 prices/s, one price per
request, alternating instances, each price carrying a nonce in ``volume``; with Redis, a
producer ``XADD``s ~20 entries/s to the ingest stream, nonces in ``volume`` too. While that
runs, faults from a seeded schedule hit the storage and the instances, one at a time (the
kinds of each topology: ``bench/chaos_faults.py``).

What is measured, and how to read the output (details in bench/README.md, "Chaos soak"):

(a) ``undeclared_gaps``   a client got seq N, then N+k (k > 1) of a zone in the same epoch,
                          with no ``recovered: false`` or ``gap`` declaring it;
(b) ``duplicates``        a client got the same (zone, epoch, seq) twice outside a declared reset;
(c) ``conflicting_keys``  (zone, epoch, seq) keys naming two different prices across all clients
                          and all 202 answers (the split-brain symptom);
(d) ``lost_accepted``     202-accepted prices no client received although some client followed
                          that zone in that epoch over the publish, and nothing declared the loss;
(e)-(h) check the Redis stream ingest the same way (``bench/chaos_stream.py``: an entry appended
twice, entries numbered against stream order, a backlog left after the drain, an entry lost);
(i) ``double_acks``       (zone, epoch, seq) keys two 202 answers named (a seq given twice);
(j) ``undue_resets``      ``recovered: false`` or a 1001 close charged to a fault that promises
                          none (a storage outage shorter than the hold, a durable restart).

(a)-(j) are the contract's promises and should be 0; ``--check`` exits 1 when one is not.
``declared_replication_loss`` counts the 202s a master failover lost *and declared* (an epoch
change or a ``gap``): asynchronous replication allows that, silently it is (d) or (i). The
rest is context, charged to the fault active at the time or ended at most 5 s before: non-202
publish answers, ``mass_closes_1001``, ``recovered_false`` resumes; publish-to-receive latency
p50/p99 of live deliveries inside vs outside fault windows; server RSS at the start and end of
the soak; ``Traceback`` count in the server logs. Output: a table on stdout (or the JSON with
``--json``), the JSON in ``<out>/chaos-<topology>-<seed>.json``, server logs in
``<out>/chaos-<topology>-<seed>/``. Exit code 0 unless the harness itself fails (2) or
``--check`` finds (a)-(j) non-zero (1).

Everything runs on 127.0.0.1, every wait is bounded, every child is killed when this ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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

from bench.chaos_analysis import analyse, drift, table
from bench.chaos_clients import EpochWatcher, Recorder, ResumingClient
from bench.chaos_faults import Fault, Rig, inject, plan_faults
from bench.chaos_procs import REPO, Child, HarnessError, Instance
from bench.chaos_publisher import Publisher
from bench.chaos_replicated import ClusterRedis, SentinelRedis
from bench.chaos_stream import StreamProducer
from bench.chaos_topology import TMPFS, Backend, NoRedis, SingleRedis, Topology, unmount

__all__ = ["main"]

OUT = Path(__file__).resolve().parent / "out"
ZONES = ("pjm", "ercot", "caiso")
CLIENTS = 60
RATE = 40.0
STREAM_RATE = 20.0
WARMUP = 3.0
SETTLE = 5.0  # quiet seconds after the last fault before publishing stops
DRAIN = 3.0  # seconds clients keep reading after the last publish
CONNECT_WAIT = 15.0
STOP_WAIT = 10.0


TOPOLOGIES: dict[str, Topology] = {
    "single": Topology(lambda w, _: SingleRedis(w), 2, ("instance_term", "instance_kill")),
    "sentinel": Topology(lambda w, _: SentinelRedis(w), 2, ("instance_term", "instance_kill")),
    "cluster": Topology(
        lambda w, a: ClusterRedis(w, wait_replicas=a.wait_replicas), 2, ("instance_kill",)
    ),
    "durable": Topology(lambda w, _: NoRedis(w), 1, ("restart_loop", "instance_term")),
}


@dataclass
class Deployment:
    """The topology's storage and the instances on it."""

    backend: Backend
    instances: list[Instance]
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def children(self) -> list[Child]:
        return [*self.instances, *self.backend.nodes]

    def rss(self) -> dict[str, int]:
        return {child.name: child.rss_kib() for child in self.children()}

    async def sample(self, origin: float, every: float, stop: asyncio.Event) -> None:
        """Every ``every`` s, each instance's RSS, open descriptors and starts: a long run
        shows drift (a leak grows across samples of one process; ``starts`` tells a
        restart's reset apart from a release)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            self.samples.append({
                "t": round(time.time() - origin, 1),
                **{i.name: {"rss_kib": i.rss_kib(), "fds": _fds(i), "starts": i.starts}
                   for i in self.instances},
            })  # fmt: skip

    async def shutdown(self) -> None:
        for instance in self.instances:
            with contextlib.suppress(Exception):
                await instance.shutdown()
        await self.backend.shutdown()

    def servers(self) -> dict[str, dict[str, int]]:
        info: dict[str, dict[str, int]] = {}
        for child in self.children():
            info[child.name] = {
                "starts": child.starts,
                "rss_kib_start": self.rss_start.get(child.name, 0),
                "rss_kib_end": self.rss_end.get(child.name, 0),
            }
            if isinstance(child, Instance):
                info[child.name]["tracebacks"] = child.tracebacks()
        return info


def _fds(child: Child) -> int:
    try:
        return len(os.listdir(f"/proc/{child.pid}/fd")) if child.running else 0
    except OSError:  # exited between the check and the read
        return 0


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
        "--topology", choices=sorted(TOPOLOGIES), default="single",
        help="what the instances store in (default single: one Redis, two instances)",
    )  # fmt: skip
    parser.add_argument(
        "--server-tree", type=Path, default=REPO,
        help="run the instances from this checkout's run_server.py (default: this one)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-replicas", type=int, default=0,
        help="cluster: acknowledge a price once N replicas have it (?wait_replicas=N)",
    )  # fmt: skip
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
        "--sample-every", type=float, default=60.0,
        help="seconds between drift samples (RSS, descriptors, latency per window)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where logs and the report go (default {OUT})"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any of (a)-(j) is non-zero")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="WebSocket clients")
    parser.add_argument("--rate", type=float, default=RATE, help="prices per second")
    parser.add_argument(
        "--stream-rate", type=float, default=STREAM_RATE,
        help="ingest stream entries per second",
    )  # fmt: skip
    return parser.parse_args(argv)


async def deploy(topology: Topology, args: argparse.Namespace, workdir: Path) -> Deployment:
    """Start the storage, then the instances on it (their data dirs go where the started
    backend says: the durable run's tmpfs, if it could be mounted)."""
    deployment = Deployment(topology.backend(workdir, args), [])
    key = secrets.token_hex(16)  # hex: a urlsafe token may start with "-" (read as a flag)
    try:
        await deployment.backend.start()
        deployment.instances = [
            Instance(
                i, workdir, redis_url=deployment.backend.url, zones=ZONES, key=key,
                data_dir=deployment.backend.data_root / f"instance-{i}.data",
                tree=args.server_tree.resolve(),
            )
            for i in range(topology.instances)
        ]  # fmt: skip
        await asyncio.gather(*(instance.start() for instance in deployment.instances))
    except BaseException:
        await deployment.shutdown()
        raise
    return deployment


def make_clients(
    count: int, deployment: Deployment, recorder: Recorder, seed: int
) -> list[ResumingClient]:
    """Half single-zone (zones in turn), half multi-zone (all zones, or two of them); each
    starts on the instances in turn and then reconnects to a random one."""
    bases = [instance.ws for instance in deployment.instances]
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


def load(clients: Sequence[ResumingClient], instances: int) -> list[int]:
    """Connected clients per instance."""
    return [sum(c.connected and c.instance == i for c in clients) for i in range(instances)]


async def run_faults(
    args: argparse.Namespace, topology: Topology, rig: Rig, deadline: float
) -> list[Fault]:
    budget = deadline - time.time() - SETTLE
    assert isinstance(rig.backend, Backend)
    plans = plan_faults(
        random.Random(f"{args.seed}-faults"), topology.kinds(rig.backend),
        short=args.short, budget=budget, instances=len(rig.instances),
    )  # fmt: skip
    faults: list[Fault] = []
    for plan in plans:
        if not args.short and time.time() + plan.gap + plan.hold > deadline - SETTLE:
            break
        await asyncio.sleep(plan.gap)
        fault = await inject(plan, rig)
        faults.append(fault)
        say(f"fault {len(faults)}/{len(plans)}: {fault.as_dict(fault.start)}")
    return faults


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.time()
    topology = TOPOLOGIES[args.topology]
    deployment = await deploy(topology, args, workdir)
    backend, instances = deployment.backend, deployment.instances
    if isinstance(backend, NoRedis) and backend.unmountable:
        say(f"{backend.unmountable}: the data dir stays on disk, disk_full will be skipped")
    say(
        f"{args.topology}: {backend.url}, instances on "
        f"{', '.join(str(i.port) for i in instances)}; logs in {workdir}"
    )
    recorder = Recorder()
    stop_clients, stop_publisher = asyncio.Event(), asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
    tasks: list[asyncio.Task[None]] = []
    connect = backend.stream()
    producer = StreamProducer(connect, ZONES, rate=args.stream_rate) if connect else None
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            clients = make_clients(args.clients, deployment, recorder, args.seed)
            watchers = [EpochWatcher(i.index, i.ws, recorder) for i in instances]
            runners = [c.run(session, stop_clients) for c in clients]
            runners += [w.run(session, stop_clients) for w in watchers]
            tasks = [asyncio.create_task(runner) for runner in runners]
            await wait_connected(clients)
            publisher = Publisher(
                [i.http for i in instances], instances[0].key, ZONES,
                rate=args.rate, rng=random.Random(f"{args.seed}-prices"),
            )  # fmt: skip
            feeding = [publisher.run(stop_publisher)]
            feeding += [producer.run(stop_publisher)] if producer else []
            publishing = [asyncio.create_task(feed) for feed in feeding]
            origin = time.time()
            await asyncio.sleep(WARMUP)
            deployment.rss_start = deployment.rss()
            sampling = asyncio.create_task(
                deployment.sample(origin, args.sample_every, stop_publisher)
            )
            deadline = origin + (args.duration if not args.short else 1e9)
            rig = Rig(
                backend, instances, publisher, lambda: load(clients, len(instances)),
                rng=random.Random(f"{args.seed}-bursts"),
                restarts_recover=isinstance(backend, NoRedis),
            )  # fmt: skip
            faults = await run_faults(args, topology, rig, deadline)
            await asyncio.sleep(max(SETTLE, (deadline - time.time()) if not args.short else 0))
            stop_publisher.set()
            await asyncio.gather(*publishing, sampling)
            await asyncio.sleep(DRAIN)
            if producer:
                await producer.measure_backlog()
            deployment.rss_end = deployment.rss()
            stop_clients.set()
            await asyncio.wait(tasks, timeout=STOP_WAIT)
    finally:
        stop_clients.set()
        for task in tasks:
            task.cancel()
        await deployment.shutdown()
    report = analyse(
        recorder, publisher.log, faults, origin=origin, servers=deployment.servers(),
        stream=producer.log if producer else None,
    )  # fmt: skip
    report["drift"] = drift(
        deployment.samples, recorder, publisher.log, faults, origin=origin, every=args.sample_every
    )
    config = {
        "topology": args.topology,
        "redis_url": backend.url,
        "clients": args.clients,
        "rate": args.rate,
        "stream_rate": args.stream_rate if producer else None,
        "zones": list(ZONES),
        "instances": len(instances),
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
    name = f"chaos-{args.topology}-{args.seed}"
    workdir = args.out / name
    unmount(workdir / TMPFS)  # a killed durable run may have left its disk mounted
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        report = asyncio.run(soak(args, workdir))
    except HarnessError as exc:
        say(f"harness failed: {exc}")
        return 2
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str) if args.json else table(report))
    say(f"report written to {path}")
    return 1 if args.check and report["check_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
