"""The scale scenario (issue 28): tens of thousands of subscribers on this box, Lightstreamer's
published Kafka-connector load test run here.

Run from the repository root, in the bench venv (``python3 scripts/venv.py bench``)::

    python bench/scale.py                              # shape "keys", 4K 16K 32K 40K clients
    python bench/scale.py --shape fanout --clients 16000 32000
    python bench/scale.py --clients 2000 --duration 5  # a quick look

Shapes (Lightstreamer's numbering in brackets):

* ``keys`` [their scenario 2]: 40 zones, 100 prices/s in all (40 per tick, 2.5 ticks/s), each
  client subscribed to one zone (connection i opens zone i mod 40);
* ``fanout`` [their scenario 1]: one zone, 4 prices/s, every client gets every price (their
  messages are 1 KB; pricehub's price objects are ~170 bytes).

Each client count gets a fresh private ``redis-server`` (``--workers`` needs one) and a fresh
``run_server.py --workers N``; ``--client-procs`` load-client processes (``loadclient.py``) each
connect from a source address of their own in 127.0.0.0/8 (one ephemeral port range per
address pair) and open their share of the sockets. The publisher is ``publisher.py`` in this
process. Prints one JSON line per run (clients, connect time, deliveries/s, mean/p50/p99/max
latency, loss, closes, server RSS per connection, the spread of connections over the workers,
and how long the server took to stop with every socket open) and writes ``results.json`` into
``--out``. Nothing leaves 127.0.0.1; every child is stopped by PID.

Not a pass/fail test: targets are checked by reading the numbers (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processes import HOST, free_port, machine_line, process_tree, rss_kib, spawn, stop
from publisher import PublishLog, publish
from report import merge_reports, percentile_ms
from run import ClientProc, Group, connect_fleet, split, stop_fleet, wait_listening
from servers.peers import redis_server

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PUBLISH_PATH = "/api/ws/ws/broadcast/price"
MARKET_URL = "/api/ws/ws/market/{zone}"
START_TIMEOUT = 60.0
HANDSHAKES_IN_FLIGHT = 200  # over all load processes; below the kernel's listen backlog
ALL_CPUS = frozenset(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Shape:
    zones: tuple[str, ...]
    rate: float  # ticks per second; each tick publishes one price of every zone


SHAPES = {
    "keys": Shape(tuple(f"node{index:02d}" for index in range(40)), 2.5),
    "fanout": Shape(("pjm",), 4.0),
}


@dataclass(frozen=True)
class Plan:
    shape: Shape
    workers: int
    client_procs: int
    warmup: float
    duration: float
    out: Path
    pricehub_args: tuple[str, ...]


def server_argv(plan: Plan, port: int, redis_port: int, key: str) -> list[str]:
    return [
        sys.executable, "run_server.py", "--host", HOST, "--port", str(port),
        "--publish-key", key, "--redis-url", f"redis://{HOST}:{redis_port}/0",
        "--workers", str(plan.workers), "--zones", ",".join(plan.shape.zones),
        "--data-dir", "none", "--no-simulate", "--log-format", "json",
        "--max-connections", "200000", "--max-connections-per-ip", "200000",
        *plan.pricehub_args,
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def running_pricehub(plan: Plan, label: str) -> AsyncIterator[tuple[Any, int, str]]:
    """Redis, then pricehub with its workers; yields (process, port, publish key)."""
    async with redis_server(plan.out / f"{label}-redis.log", ALL_CPUS) as redis_port:
        port, key = free_port(), secrets.token_hex(8)
        argv = server_argv(plan, port, redis_port, key)
        process = await spawn(argv, log=plan.out / f"{label}-server.log", cwd=REPO,
                              pipes=False, cpus=ALL_CPUS)  # fmt: skip
        try:
            await wait_listening(port, process, time.monotonic() + START_TIMEOUT)
            yield process, port, key
        finally:
            await stop(process)


@contextlib.asynccontextmanager
async def fleet(
    plan: Plan, clients: int, port: int, label: str, t0: float
) -> AsyncIterator[tuple[list[ClientProc], list[dict[str, Any]]]]:
    """One load process per share, each from its own source address; connect all at once."""
    procs: list[ClientProc] = []
    shares = split(clients, plan.client_procs)
    concurrency = max(1, HANDSHAKES_IN_FLIGHT // len(shares))
    url = f"ws://{HOST}:{port}{MARKET_URL}"
    try:
        for index, count in enumerate(shares):
            argv = [sys.executable, str(BENCH / "loadclient.py"), "--url", url,
                    "--t0", str(t0), "--connections", str(count),
                    "--concurrency", str(concurrency), "--handshake-timeout", "60",
                    "--cycle-zones", ",".join(plan.shape.zones),
                    "--source-address", f"127.0.{index // 200}.{10 + index % 200}"]  # fmt: skip
            log = plan.out / f"{label}-client{index}.log"
            process = await spawn(argv, log=log, cwd=REPO, pipes=True, cpus=ALL_CPUS)
            procs.append(ClientProc(process, Group(MARKET_URL, plan.shape.zones, count)))
        yield procs, await connect_fleet(procs, 60 + clients / 200, before_connect=_listening)
    finally:
        await stop_fleet(procs)


async def _listening() -> None:
    """``running_pricehub`` returned once the server listened: nothing more to wait for."""


def socket_count(pid: int) -> int:
    """Open sockets of one process (its listening socket included)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(entry).startswith("socket:")
    return count


def worker_pids(process: Any) -> list[int]:
    """The server's workers: its children, less multiprocessing's resource tracker."""
    workers = []
    for pid in process_tree(process.pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if pid != process.pid and b"resource_tracker" not in cmdline:
                workers.append(pid)
    return workers


def mean_ms(histogram: dict[str, int]) -> float | None:
    from loadclient import bucket_value  # picows is needed only once a run has happened

    total = sum(histogram.values())
    if not total:
        return None
    return sum(bucket_value(int(b)) * n for b, n in histogram.items()) / total / 1000


async def stop_timed(process: Any) -> float:
    """SIGTERM the server with every socket open; seconds until it has exited."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 60)
    return time.monotonic() - started


async def run_one(plan: Plan, clients: int) -> dict[str, Any]:
    label = f"scale-{clients}"
    t0 = time.time()
    async with running_pricehub(plan, label) as (process, port, key):
        await asyncio.sleep(1.0)  # workers finish start-up before the baseline RSS
        base_rss = rss_kib(process_tree(process.pid))
        async with fleet(plan, clients, port, label, t0) as (procs, connected):
            loaded_rss = rss_kib(process_tree(process.pid))
            spread = [socket_count(pid) for pid in worker_pids(process)]
            log = PublishLog()
            measure_from = time.time() + plan.warmup
            await publish(
                url=f"http://{HOST}:{port}{PUBLISH_PATH}", key=key, zones=plan.shape.zones,
                rate=plan.shape.rate, seconds=plan.warmup + plan.duration, t0=t0,
                measure_from=measure_from, log=log,
            )  # fmt: skip
            await asyncio.sleep(2.0)  # the last tick reaches every socket
            ranges = log.ranges()
            window = [measure_from, time.time()]
            for proc in procs:
                await proc.send({"cmd": "report", "window": window, "ranges": ranges})
            reports = [await proc.expect("report", 120) for proc in procs]
            peak_rss = rss_kib(process_tree(process.pid))
            shutdown_s = await stop_timed(process)
    return result(clients, connected, reports, log, base_rss, loaded_rss, peak_rss, spread,
                  shutdown_s, plan)  # fmt: skip


def result(
    clients: int,
    connected: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    log: PublishLog,
    base_rss: int,
    loaded_rss: int,
    peak_rss: int,
    spread: list[int],
    shutdown_s: float,
    plan: Plan,
) -> dict[str, Any]:
    merged = merge_reports(reports)
    histogram = Counter({k: int(v) for k, v in merged["histogram"].items()})
    ok = sum(c["ok"] for c in connected)
    expected_per_zone = {zone: high - low + 1 for zone, (low, high) in log.ranges().items()}
    zones = len(plan.shape.zones)
    expected = sum(
        expected_per_zone.get(plan.shape.zones[i % zones], 0) for i in range(ok)
    )  # connection i of each process has zone i mod n; shares are near-equal, so this is close
    return {
        "shape": "keys" if zones > 1 else "fanout",
        "clients": clients,
        "connected": ok,
        "connect_failed": sum(c["failed"] for c in connected),
        "connect_s": max(c["finished"] for c in connected) - min(c["started"] for c in connected),
        "workers": plan.workers,
        "sockets_per_worker": spread,
        "deliveries_per_s": merged.get("measured_deliveries", 0) / plan.duration,
        "published": sum(expected_per_zone.values()),
        "publish_skipped": log.skipped,
        "publish_failed": dict(log.failed),
        "mean_ms": mean_ms(dict(histogram)),
        "p50_ms": percentile_ms(histogram, 0.50),
        "p99_ms": percentile_ms(histogram, 0.99),
        "max_ms": merged["max_latency_us"] / 1000,
        "expected": expected,
        "missing": merged.get("missing", 0),
        "duplicates": merged.get("duplicates", 0),
        "out_of_order": merged.get("out_of_order", 0),
        "close_codes": dict(merged["close_codes"]),
        "server_rss_mib": loaded_rss / 1024,
        "server_rss_peak_mib": peak_rss / 1024,
        "rss_kib_per_connection": (loaded_rss - base_rss) / ok if ok else None,
        "shutdown_s": shutdown_s,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="keys")
    parser.add_argument("--clients", type=int, nargs="+", default=[4000, 16000, 32000, 40000])
    parser.add_argument("--workers", type=int, default=3, help="server processes (3)")
    parser.add_argument("--client-procs", type=int, default=8, help="load processes (8)")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pricehub-arg", action="append", default=[], dest="pricehub_args")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace, out: Path) -> int:
    plan = Plan(SHAPES[args.shape], args.workers, args.client_procs, args.warmup,
                args.duration, out, tuple(args.pricehub_args))  # fmt: skip
    results = []
    print(json.dumps({"machine": machine_line(REPO)}), flush=True)
    for clients in args.clients:
        line = await run_one(plan, clients)
        results.append(line)
        print(json.dumps(line), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if any(math.ceil(c / args.client_procs) > 19_000 for c in args.clients):
        print("scale: more than 19,000 sockets per load process; raise --client-procs")
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or BENCH / "out" / f"scale-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(amain(args, out))


if __name__ == "__main__":
    sys.exit(main())
