"""Scenario 5, "market interval burst": one price for every zone at once (issue 14).

Run from the repository root (see bench/README.md)::

    python bench/burst.py                       # 2,000 and 20,000 zones, all four cases
    python bench/burst.py --zones 2000 --cases memory-http
    python bench/burst.py --record              # also write the table into bench/RESULTS.md
    python bench/burst.py --profile             # py-spy the server (exit 2 without py-spy)

Per (zone count, case) a fresh pricehub (``--zones-file`` with that many zones, pinned to the
first CPU) and ``--clients`` sockets on ``/prices`` with ``--zones-per-client`` zones each (a
seeded random choice per client), in ``--client-procs`` processes (``bench/burstclient.py``).
Then ``--bursts`` (5) bursts of one price per zone each, 0.5 s apart, as a market posts one
every interval; the table shows the median burst (by accept rate) and the first one beside
it (cold: it creates every zone's state). A burst is:

* ``memory-http`` / ``memory-durable-http`` (the embedded store with its journal in
  ``--data-dir``) / ``redis-http``: ``POST /api/ws/ws/broadcast/price`` in batches of
  ``--batch``, ``IN_FLIGHT`` requests at a time; accepted = the last 202 is in;
* ``redis-stream``: every entry ``XADD``-ed to the ingest stream by one Lua script (so the
  producer is not what is measured); accepted = the stream is empty (pricehub deletes an entry
  in the script that appends it).

Reported: prices/s accepted, seconds until the last client has one price of each of its zones
(from the burst's start), server CPU per price over that span, RSS after, loss (zones a client
never got) and duplicates; the connect phase's wall time and server CPU per connection; and
Redis's own rate for pricehub's append script (``redis-benchmark``, pipelined, EVALSHA of
``APPEND_LUA``) on the same redis-server. Redis is a throwaway ``redis-server`` on a free port,
pinned with the clients; nothing leaves 127.0.0.1 and every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from processes import HOST, cpu_seconds, free_port, machine_line, process_tree, rss_kib, spawn, stop

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
# memory-durable-http: the embedded default with its journal (issue 15: >= 0.5x memory-http).
CASES = ("memory-http", "memory-durable-http", "redis-http", "redis-stream")
IN_FLIGHT = 4  # concurrent publish requests
REDIS_TOOLS = ("redis-server", "redis-cli", "redis-benchmark")  # the redis-* cases run all three
START_TIMEOUT = 60.0
PUBLISH_PATH = "/api/ws/ws/broadcast/price"
PRICES_PATH = "/api/ws/ws/prices"
SERVER_FLAGS = ("--no-simulate", "--log-format", "json", "--log-level", "warning",
                "--max-connections", "100000", "--max-connections-per-ip", "100000",
                "--publish-rate-limit", "10000")  # fmt: skip

# KEYS: stream. ARGV: zone count, timestamp. One XADD per zone, inside Redis: the burst
# arrives at the stream as fast as Redis can take it, whatever the producer's language.
XADD_BURST_LUA = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('XADD', KEYS[1], '*', 'market_zone', string.format('z%05d', i),
             'price', '42.5', 'volume', '1', 'timestamp', ARGV[2])
end
return tonumber(ARGV[1])
"""


def zone_names(count: int) -> list[str]:
    return [f"z{i:05d}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class Plan:
    zone_counts: tuple[int, ...]
    cases: tuple[str, ...]
    clients: int
    per_client: int
    batch: int
    client_procs: int
    server_cpus: frozenset[int]
    client_cpus: frozenset[int]
    out: Path
    bursts: int = 5
    profile: bool = False


@contextlib.asynccontextmanager
async def redis_server(plan: Plan) -> AsyncIterator[int]:
    """A throwaway redis-server (no persistence) on a free port."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench5-redis-"))
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    process = await spawn(argv, log=plan.out / "redis.log", cwd=workdir, pipes=False,
                          cpus=plan.client_cpus)  # fmt: skip
    try:
        client = aioredis.Redis(host=HOST, port=port)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                await client.ping()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await client.aclose()
        yield port
    finally:
        await stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_benchmark(port: int, zones: int) -> float:
    """Requests/s of pricehub's own append script, pipelined 64 deep, over ``zones`` zones."""
    sys.path.insert(0, str(REPO))
    from pricehub.storage.redis import APPEND_LUA

    def cli(*args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(port), *args],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip

    sha = cli("SCRIPT", "LOAD", APPEND_LUA)
    cli("SET", "rb:epoch", "e1")
    body = '{"market_zone":"z","price":42.5,"volume":1.0,"timestamp":"2026-01-01T00:00:00Z"}'
    out = subprocess.run(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-n", "100000", "-P", "64",
         "-r", str(zones), "-q", "EVALSHA", sha, "4",
         "rb:seq:__rand_int__", "rb:history:__rand_int__", "rb:latest:__rand_int__", "rb:epoch",
         body, "1000", "rb:prices", "z", "e1"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    cli("FLUSHALL")
    return float(re.findall(r"([\d.]+) requests per second", out)[-1])


@contextlib.asynccontextmanager
async def profiled(plan: Plan, server_pid: int, label: str) -> AsyncIterator[None]:
    """``--profile``: py-spy samples the server over the block (collapsed stacks, then a
    summary of the hottest frames in ``<label>-profile.txt``)."""
    if not plan.profile:
        yield
        return
    raw = plan.out / f"{label}-profile.raw"
    argv = ["py-spy", "record", "--pid", str(server_pid), "--rate", "1000", "--format", "raw",
            "--output", str(raw), "--nonblocking"]  # fmt: skip
    process = await spawn(argv, log=plan.out / f"{label}-py-spy.log", cwd=REPO, pipes=False,
                          cpus=plan.client_cpus)  # fmt: skip
    await asyncio.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        await asyncio.wait_for(process.wait(), 30)
        if raw.exists():
            (plan.out / f"{label}-profile.txt").write_text(summarize_profile(raw))


def summarize_profile(raw: Path, top: int = 40) -> str:
    """Self and inclusive sample shares per frame, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- {title}")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * count / max(total, 1):5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


@dataclass
class Server:
    process: asyncio.subprocess.Process
    port: int
    key: str

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)


@contextlib.asynccontextmanager
async def pricehub(plan: Plan, zones_file: Path, redis_url: str, label: str,
                   data_dir: str = "none") -> AsyncIterator[Server]:  # fmt: skip
    port, key = free_port(), secrets.token_hex(8)
    argv = [sys.executable, "run_server.py", "--host", HOST, "--port", str(port),
            "--publish-key", key, "--zones-file", str(zones_file), "--redis-url", redis_url,
            "--key-prefix", f"{label}:", "--data-dir", data_dir, *SERVER_FLAGS]  # fmt: skip
    process = await spawn(argv, log=plan.out / f"{label}-server.log", cwd=REPO, pipes=False,
                          cpus=plan.server_cpus)  # fmt: skip
    server = Server(process, port, key)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"pricehub exited {process.returncode}; see its log")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{HOST}:{port}/api/ws/ws/health") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError("pricehub did not become healthy")
                await asyncio.sleep(0.05)
        yield server
    finally:
        await stop(process)


class ClientProc:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, event: str, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        answer: dict[str, Any] = json.loads(line) if line else {}
        if answer.get("event") != event:
            raise RuntimeError(f"burst client said {answer!r}, expected {event!r}")
        return answer


@contextlib.asynccontextmanager
async def clients(plan: Plan, server: Server, label: str) -> AsyncIterator[list[ClientProc]]:
    procs: list[ClientProc] = []
    try:
        for index in range(plan.client_procs):
            argv = [sys.executable, str(BENCH / "burstclient.py"),
                    "--url", f"ws://{HOST}:{server.port}{PRICES_PATH}"]  # fmt: skip
            log = plan.out / f"{label}-client{index}.log"
            process = await spawn(argv, log=log, cwd=REPO, pipes=True, cpus=plan.client_cpus)
            procs.append(ClientProc(process))
        for proc in procs:
            await proc.expect("ready", 30)
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(OSError, RuntimeError):
                await proc.send({"cmd": "exit"})
        await asyncio.gather(*(stop(proc.process) for proc in procs))


async def publish_http(server: Server, zones: list[str], batch: int) -> int:
    """The burst over HTTP; returns the prices accepted (202)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    prices = [{"market_zone": zone, "price": 42.5, "volume": 1.0, "timestamp": now}
              for zone in zones]  # fmt: skip
    bodies = [
        json.dumps(prices[start : start + batch]).encode()
        for start in range(0, len(prices), batch)
    ]
    gate = asyncio.Semaphore(IN_FLIGHT)
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    url = f"http://{HOST}:{server.port}{PUBLISH_PATH}"
    async with aiohttp.ClientSession() as session:

        async def post(body: bytes) -> int:
            async with gate, session.post(url, data=body, headers=headers) as response:
                if response.status != 202:
                    raise RuntimeError(f"publish answered {response.status}")
                return len((await response.json())["accepted"])

        return sum(await asyncio.gather(*(post(body) for body in bodies)))


async def publish_stream(redis_url: str, prefix: str, count: int) -> int:
    """The burst over the ingest stream; returns once pricehub consumed every entry."""
    client = aioredis.Redis.from_url(redis_url)
    stream = f"{prefix}:ingest"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        await client.eval(XADD_BURST_LUA, 1, stream, count, now)
        # Polled: the stream has no "became empty" event to wait on.
        while await client.xlen(stream):  # noqa: ASYNC110
            await asyncio.sleep(0.002)
    finally:
        await client.aclose()
    return count


async def one_burst(plan: Plan, server: Server, procs: list[ClientProc], case: str,
                    zones: list[str], redis_url: str, label: str) -> dict[str, Any]:  # fmt: skip
    """One price per zone, until every client has its share; what it cost the server."""
    cpu_before = cpu_seconds(server.pids())
    started = time.time()
    if case.endswith("http"):
        accepted = await publish_http(server, zones, plan.batch)
    else:
        accepted = await publish_stream(redis_url, label, len(zones))
    accepted_at = time.time()
    for proc in procs:
        await proc.send({"cmd": "report", "wait": 30})
    reports = [await proc.expect("report", 60) for proc in procs]
    done = [t for report in reports for t in report["complete"]]
    accept_s = accepted_at - started
    return {
        "accepted": accepted,
        "accept_s": accept_s,
        "prices_per_s": accepted / accept_s if accept_s > 0 else None,
        "last_client_s": (max(done) if done else accepted_at) - started,
        "cpu_us_per_price": 1e6 * (cpu_seconds(server.pids()) - cpu_before) / len(zones),
        "incomplete": sum(r["incomplete"] for r in reports),
        "missing": sum(r["missing"] for r in reports),
        "duplicates": sum(r["extra"] for r in reports),
    }


async def run_case(plan: Plan, zone_count: int, case: str, redis_port: int | None,
                   zones_file: Path, label: str) -> dict[str, Any]:  # fmt: skip
    """``plan.bursts`` bursts on one server; the row is the median burst (by accept rate),
    with the first (cold: every zone's state is created by it) beside it."""
    zones = zone_names(zone_count)
    redis_url = f"redis://{HOST}:{redis_port}/0" if case.startswith("redis") else "none"
    data_dir = str(plan.out / f"{label}-data") if "durable" in case else "none"
    bursts: list[dict[str, Any]] = []
    async with pricehub(plan, zones_file, redis_url, label, data_dir) as server, \
            clients(plan, server, label) as procs:  # fmt: skip
        rng = random.Random(5)
        lists = [rng.sample(zones, plan.per_client) for _ in range(plan.clients)]
        cpu0 = cpu_seconds(server.pids())
        for index, proc in enumerate(procs):
            await proc.send({"cmd": "connect", "zones": lists[index :: len(procs)]})
        connected = [await proc.expect("connected", 120) for proc in procs]
        connect_cpu = cpu_seconds(server.pids()) - cpu0
        for number in range(1, plan.bursts + 1):
            if number > 1:
                for proc in procs:
                    await proc.send({"cmd": "arm", "seq": number})
                    await proc.expect("armed", 30)
            await asyncio.sleep(0.5)  # let the previous phase's stragglers settle
            async with profiled(plan, server.process.pid, f"{label}-burst{number}"):
                bursts.append(await one_burst(plan, server, procs, case, zones, redis_url,
                                              label))  # fmt: skip
        rss = rss_kib(server.pids())
    ok = sum(c["ok"] for c in connected)
    ranked = sorted(bursts, key=lambda burst: burst["prices_per_s"] or 0.0)
    return {
        "zones": zone_count,
        "case": case,
        "connected": ok,
        "connect_failed": sum(c["failed"] for c in connected),
        "connect_s": max(c["seconds"] for c in connected),
        "connect_cpu_us": 1e6 * connect_cpu / ok if ok else None,
        **ranked[len(ranked) // 2],
        "first_prices_per_s": bursts[0]["prices_per_s"],
        "rss_mib": rss / 1024,
        # Loss and duplicates over every burst, not just the median one.
        "missing": sum(burst["missing"] for burst in bursts),
        "duplicates": sum(burst["duplicates"] for burst in bursts),
        "late": sum(burst["last_client_s"] > burst["accept_s"] + 1 for burst in bursts),
        "bursts": bursts,
    }


def table(runs: list[dict[str, Any]], redis_rate: dict[int, float]) -> str:
    rows = [
        "| zones | case | accepted prices/s | first burst prices/s | accept s | last client s "
        "| server CPU µs/price | RSS MiB | connect s (200) | server CPU µs/connect | lost | dup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rows.append(
            f"| {run['zones']:,} | {run['case']} | {run['prices_per_s']:,.0f} "
            f"| {run['first_prices_per_s']:,.0f} | {run['accept_s']:.3f} "
            f"| {run['last_client_s']:.3f} "
            f"| {run['cpu_us_per_price']:.0f} | {run['rss_mib']:.0f} | {run['connect_s']:.3f} "
            f"| {run['connect_cpu_us']:.0f} | {run['missing']} | {run['duplicates']} |"
        )
    rows += ["", "redis-benchmark, pricehub's APPEND_LUA (EVALSHA, -P 64): " + ", ".join(
        f"{rate:,.0f}/s over {zones:,} zones" for zones, rate in sorted(redis_rate.items())
    )]  # fmt: skip
    return "\n".join(rows)


def checks(runs: list[dict[str, Any]], redis_rate: dict[int, float]) -> list[str]:
    """Issue 14's targets, as ratios within this run."""
    by = {(run["zones"], run["case"]): run for run in runs}
    lines: list[str] = []

    def check(name: str, value: float | None, target: float, *, at_most: bool = False) -> None:
        if value is None:
            return
        ok = value <= target if at_most else value >= target
        sign = "≤" if at_most else "≥"
        lines.append(f"- {name}: {value:.2f} ({sign} {target:g}) {'met' if ok else 'MISSED'}")

    def rate(zones: int, case: str) -> float | None:
        run = by.get((zones, case))
        return None if run is None else run["prices_per_s"]

    small, large = min(z for z, _ in by), max(z for z, _ in by)
    mem_small, mem_large = rate(small, "memory-http"), rate(large, "memory-http")
    if mem_small and mem_large and small != large:
        check(f"memory accept rate {large:,} / {small:,} zones", mem_large / mem_small, 0.75)
    for zones in sorted({z for z, c in by if c == "memory-durable-http"}):
        durable, memory = rate(zones, "memory-durable-http"), rate(zones, "memory-http")
        if durable and memory:
            check(f"durable / memory accept rate at {zones:,} zones", durable / memory, 0.5)
    for case in ("redis-http", "redis-stream"):
        for zones in sorted({z for z, c in by if c == case}):
            redis_accept = rate(zones, case)
            if redis_accept and mem_small:
                check(f"{case} at {zones:,} / memory at {small:,}", redis_accept / mem_small, 0.4)
            if redis_accept and redis_rate.get(zones):
                check(f"{case} at {zones:,} / redis-benchmark", redis_accept / redis_rate[zones],
                      0.25)  # fmt: skip
    for case in CASES:
        a, b = by.get((small, case)), by.get((large, case))
        if a and b and small != large and a["connect_cpu_us"]:
            check(f"{case}: server CPU per connect {large:,} / {small:,}",
                  b["connect_cpu_us"] / a["connect_cpu_us"], 1.5, at_most=True)  # fmt: skip
    late = [f"{r['zones']}/{r['case']}" for r in runs
            if r["late"] or r["missing"] or r["duplicates"]]
    lines.append("- every client complete within accept + 1 s, no loss, no duplicate: "
                 + ("met" if not late else f"MISSED ({', '.join(late)})"))  # fmt: skip
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zones", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--zones-per-client", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1000, help="prices per POST (1000)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--bursts", type=int, default=5,
                        help="bursts per case, one price per zone each (5; the median is shown)")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--record", action="store_true", help="write into bench/RESULTS.md")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the server over each burst (<out>/<case>-profile.txt)")
    return parser.parse_args(argv)


async def run(plan: Plan) -> tuple[list[dict[str, Any]], dict[int, float]]:
    runs: list[dict[str, Any]] = []
    redis_rate: dict[int, float] = {}
    needs_redis = any(case.startswith("redis") for case in plan.cases)
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(redis_server(plan)) if needs_redis else None
        for zone_count in plan.zone_counts:
            zones_file = plan.out / f"zones-{zone_count}.txt"
            zones_file.write_text("# scenario 5\n" + "\n".join(zone_names(zone_count)) + "\n")
            if port is not None:
                redis_rate[zone_count] = await asyncio.to_thread(redis_benchmark, port, zone_count)
            for number, case in enumerate(plan.cases):
                label = f"b5z{zone_count}c{number}"
                print(f"scenario 5: {zone_count} zones, {case} (load {os.getloadavg()[0]:.1f})",
                      flush=True)  # fmt: skip
                runs.append(await run_case(plan, zone_count, case, port, zones_file, label))
                (plan.out / "results.json").write_text(
                    json.dumps({"runs": runs, "redis_benchmark": redis_rate}, indent=1)
                )
    return runs, redis_rate


def missing_tool(args: argparse.Namespace) -> str | None:
    """What the run needs that is not on the PATH, checked before anything starts (it
    would otherwise be a traceback from deep inside the first burst or Redis case)."""
    needed = {"py-spy": "--profile needs it: pip install py-spy"} if args.profile else {}
    if any(case.startswith("redis") for case in args.cases):
        needed |= {tool: "the redis-* cases need it" for tool in REDIS_TOOLS}
    for tool, why in needed.items():
        if shutil.which(tool) is None:
            return f"{tool} is not on the PATH ({why})"
    return None


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    missing = missing_tool(args)
    if missing is not None:
        print(f"bench/burst.py: {missing}", file=sys.stderr)
        return 2
    cpus = frozenset(os.sched_getaffinity(0))
    server_cpus = frozenset({min(cpus)}) if args.pin and len(cpus) > 1 else cpus
    plan = Plan(
        zone_counts=tuple(args.zones), cases=tuple(args.cases), clients=args.clients,
        per_client=args.zones_per_client, batch=args.batch, client_procs=args.client_procs,
        server_cpus=server_cpus, client_cpus=cpus - server_cpus or cpus,
        out=args.out or BENCH / "out" / ("s5-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")),
        bursts=args.bursts, profile=args.profile,
    )  # fmt: skip
    plan.out.mkdir(parents=True, exist_ok=True)
    machine = machine_line(REPO)
    os.sched_setaffinity(0, plan.client_cpus)
    runs, redis_rate = asyncio.run(run(plan))
    section = "\n".join([
        f"### Scenario 5: market interval burst ({plan.clients} clients x {plan.per_client} "
        f"zones, one price per zone, HTTP batches of {plan.batch:,}; median of {plan.bursts} "
        "bursts)", "",
        f"Machine: {machine}. Command: `python bench/burst.py {' '.join(raw)}`.", "",
        table(runs, redis_rate), "", "pricehub against issue 14's targets:", "",
        *checks(runs, redis_rate),
    ])  # fmt: skip
    print(section)
    (plan.out / "results.md").write_text(section + "\n")
    if args.record:
        from report import record  # here: report imports the picows load client

        record({5: section}, RESULTS)
    print(f"logs and raw results: {plan.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
