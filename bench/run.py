"""pricehub fan-out benchmark: starts each server, drives it with picows load clients, reports.

Run from the repository root (see bench/README.md)::

    python bench/run.py                 # all four scenarios, all four servers (~12 min)
    python bench/run.py --quick         # everything small, about a minute (smoke test)
    python bench/run.py --scenario 1 --servers naive ceiling --clients 500 --duration 5
    python bench/run.py --scenario 1 2 --servers pricehub --peers   # vs the Node peers

Every measurement gets a fresh server process. Load clients (``bench/loadclient.py``) run in
several processes; the publisher (``bench/publisher.py``) runs in this one. Server CPU comes from
``/proc/<pid>/stat`` (the server and its descendants), RSS from ``/proc/<pid>/status``.
Everything listens and connects on 127.0.0.1 only, every wait has a deadline, and every child
process is killed when this one ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import resource
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processes import (
    HOST,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    machine_line,
    process_tree,
    rss_kib,
    spawn,
    stop,
)
from publisher import Poster, PublishLog, publish
from report import (
    Run,
    fmt,
    idle_table,
    markdown_table,
    merge_reports,
    ratio,
    record,
    slow_table,
    stream_table,
    summarise,
    target_checks,
)
from servers.common import MARKET_PREFIX, PRICES_PATH, PUBLISH_PATH, ZONES
from servers.peers import PEERS, install, missing_tools, peer_setup, socket_path, versions

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
SERVER_START_TIMEOUT = 30.0
SERVER_NAMES = ("pricehub", "naive", "websockets", "ceiling")
PEER_NAMES = tuple(PEERS)  # bench/peers/ (Node): only when asked for, see --peers
BASELINE_SCRIPTS = {
    "naive": "naive_aiohttp.py",
    "websockets": "websockets_broadcast.py",
    "ceiling": "raw_ceiling.py",
}
# pricehub's defaults (1,000 per IP) would refuse scenario 3's 10,000 loopback sockets.
# No data dir by default (the baselines keep nothing either); measure the durable default
# with --pricehub-arg=--data-dir=DIR (it comes later on the command line, so it wins).
PRICEHUB_FLAGS = ("--redis-url", "none", "--data-dir", "none", "--no-simulate",
                  "--log-format", "json", "--max-connections", "100000",
                  "--max-connections-per-ip", "100000")  # fmt: skip
HANDSHAKES_IN_FLIGHT = 100  # over all client processes; below the servers' listen backlog

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Stream:
    """A streaming scenario: readers on one socket kind, a publisher at a fixed tick rate."""

    clients: int  # readers + stalled
    zones: tuple[str, ...]  # published every tick, one price each, in one POST
    multi_zone: bool  # readers use /prices?zones=<all zones>, else /market/<first zone>
    rate: float  # ticks per second
    warmup: float  # seconds published before the measured window
    duration: float  # measured seconds
    drain: float = 2.0  # seconds after the last publish still inside the CPU window
    # Clients that stop reading right after their handshake. They subscribe to every published
    # zone on the multi-zone socket, so their backlog builds several times faster than a
    # reader's traffic and reaches a server's buffer limits within a bounded run.
    stalled: int = 0


@dataclass(frozen=True)
class Idle:
    """The idle scenario: open many sockets (measuring the handshake rate), then hold them."""

    connections: int
    settle: float


@dataclass(frozen=True)
class Plan:
    streams: dict[int, Stream]
    idle: Idle
    servers: tuple[str, ...]
    client_procs: int
    repeat: int
    # On a 2-core machine the server gets a core of its own; clients, publisher and driver share
    # the other. Unpinned, every tick wakes the server and all client processes at once and the
    # scheduler's sharing shows up as latency that is not the server's.
    server_cpus: frozenset[int]
    client_cpus: frozenset[int]
    out: Path
    pricehub_args: tuple[str, ...]


FULL = {
    1: Stream(clients=2000, zones=ZONES[:1], multi_zone=False, rate=20, warmup=3, duration=15),
    2: Stream(clients=1000, zones=ZONES, multi_zone=True, rate=10, warmup=3, duration=15),
    4: Stream(
        clients=1000, zones=ZONES, multi_zone=False, rate=20, warmup=10, duration=15, stalled=1
    ),
}
FULL_IDLE = Idle(connections=10_000, settle=2)
QUICK = {
    number: replace(stream, clients=stream.clients // 10, warmup=0.5, duration=1, drain=0.3)
    for number, stream in FULL.items()
}
QUICK_IDLE = Idle(connections=1000, settle=0.5)

# ----------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    ports: set[int]
    ws_base: str
    publish_url: str
    publish_key: str
    protocol: str = "plain"  # what its load clients speak (loadclient.py --protocol)
    poster_class: type[Poster] = Poster  # how the publisher talks to it

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    async def listening(self) -> None:
        """Return once every port accepts connections; raise if the server died or is late."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        for port in self.ports:
            await wait_listening(port, self.process, deadline)


def server_argv(
    name: str, port: int, publish_port: int, key: str, extra: Iterable[str]
) -> list[str]:
    common = ["--host", HOST, "--port", str(port), "--publish-key", key]
    if name == "pricehub":
        return [sys.executable, "run_server.py", *common, *PRICEHUB_FLAGS, *extra]
    script = str(BENCH / "servers" / BASELINE_SCRIPTS[name])
    if name == "websockets":  # websockets serves no POST: its publish endpoint has its own port
        common += ["--publish-port", str(publish_port)]
    return [sys.executable, script, *common]


async def wait_listening(port: int, process: asyncio.subprocess.Process, deadline: float) -> None:
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            _reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


@contextlib.asynccontextmanager
async def running_server(name: str, plan: Plan, label: str) -> AsyncIterator[Server]:
    """Start a server (not waiting for it: see ``Server.listening``); stop it on exit."""
    if name in PEERS:
        async with running_peer(name, plan, label) as server:
            yield server
        return
    port = free_port()
    publish_port = free_port() if name == "websockets" else port
    key = secrets.token_hex(8)
    argv = server_argv(name, port, publish_port, key, plan.pricehub_args)
    log = plan.out / f"{label}-{name}.log"
    process = await spawn(argv, log=log, cwd=REPO, pipes=False, cpus=plan.server_cpus)
    try:
        publish_url = f"http://{HOST}:{publish_port}{PUBLISH_PATH}"
        yield Server(name, process, {port, publish_port}, f"ws://{HOST}:{port}", publish_url, key)
    finally:
        await stop(process)


@contextlib.asynccontextmanager
async def running_peer(name: str, plan: Plan, label: str) -> AsyncIterator[Server]:
    """``running_server`` for a Node peer (servers/peers.py): its redis-server, if it has
    one, starts first, on the clients' CPUs."""
    port, key, log = free_port(), secrets.token_hex(8), plan.out / f"{label}-{name}.log"
    async with peer_setup(name, port, key, log=log, cpus=plan.client_cpus) as setup:
        process = await spawn(setup.argv, log=log, cwd=REPO, pipes=False, cpus=plan.server_cpus)
        try:
            yield Server(name, process, {port}, f"ws://{HOST}:{port}", setup.publish_url, key,
                         setup.protocol, setup.poster_class)  # fmt: skip
        finally:
            await stop(process)


# ----------------------------------------------------------------------------- load clients


@dataclass(frozen=True)
class Group:
    """The connections one load-client process opens: same path, same zones."""

    path: str
    zones: tuple[str, ...]
    connections: int
    stalled: bool = False


@dataclass
class ClientProc:
    process: asyncio.subprocess.Process
    group: Group

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, event: str, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"load client exited ({self.process.returncode}); see its log")
        answer: dict[str, Any] = json.loads(line)
        if answer.get("event") != event:
            raise RuntimeError(f"load client said {answer!r}, expected {event!r}")
        return answer


def split(total: int, parts: int) -> list[int]:
    """``total`` as at most ``parts`` near-equal positive shares."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@contextlib.asynccontextmanager
async def client_fleet(
    server: Server, groups: list[Group], plan: Plan, label: str, t0: float
) -> AsyncIterator[tuple[list[ClientProc], list[dict[str, Any]]]]:
    """Start one load-client process per group, open every connection at the same moment,
    yield the processes with their ``connected`` events."""
    procs: list[ClientProc] = []
    concurrency = max(1, HANDSHAKES_IN_FLIGHT // len(groups))
    try:
        for index, group in enumerate(groups):
            url = server.ws_base + socket_path(server.protocol, group.path)
            argv = [sys.executable, str(BENCH / "loadclient.py"),
                    "--url", url, "--t0", str(t0),
                    "--connections", str(group.connections),
                    "--concurrency", str(concurrency)]  # fmt: skip
            argv += ["--stall"] if group.stalled else []
            if server.protocol != "plain":  # these subscribe after the handshake
                argv += ["--protocol", server.protocol, "--zones", ",".join(group.zones)]
            log = plan.out / f"{label}-client{index}.log"
            process = await spawn(argv, log=log, cwd=REPO, pipes=True, cpus=plan.client_cpus)
            procs.append(ClientProc(process, group))
        timeout = 30 + sum(group.connections for group in groups) / 100
        yield procs, await connect_fleet(procs, timeout, before_connect=server.listening)
    finally:
        await stop_fleet(procs)


async def connect_fleet(
    procs: list[ClientProc], timeout: float, *, before_connect: Callable[[], Awaitable[None]]
) -> list[dict[str, Any]]:
    """Every load process ready, then (once ``before_connect`` returned: the server
    listens) all told to connect at once; their ``connected`` events."""
    for proc in procs:  # the server starts meanwhile
        await proc.expect("ready", 30)
    await before_connect()
    for proc in procs:
        await proc.send({"cmd": "connect"})
    return [await proc.expect("connected", timeout) for proc in procs]


async def stop_fleet(procs: list[ClientProc]) -> None:
    """Ask every load process to exit, then stop each (by PID, after a grace)."""
    for proc in procs:
        with contextlib.suppress(OSError, RuntimeError):
            await proc.send({"cmd": "exit"})
    await asyncio.gather(*(stop(proc.process) for proc in procs))


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Snapshot:
    at: float
    server_cpu: float
    client_cpu: float
    machine_cpu: float
    rss_kib: int


def snapshot(server: Server, procs: list[ClientProc]) -> Snapshot:
    pids = server.pids()
    clients = cpu_seconds(p.process.pid for p in procs)
    return Snapshot(time.time(), cpu_seconds(pids), clients, machine_busy_seconds(), rss_kib(pids))


def stream_groups(stream: Stream, plan: Plan) -> list[Group]:
    all_zones = PRICES_PATH + "?zones=" + ",".join(stream.zones)
    if stream.multi_zone:
        path, zones = all_zones, stream.zones
    else:
        path, zones = MARKET_PREFIX + stream.zones[0], stream.zones[:1]
    readers = split(stream.clients - stream.stalled, plan.client_procs)
    groups = [Group(path, zones, count) for count in readers]
    return groups + (
        [Group(all_zones, stream.zones, stream.stalled, True)] if stream.stalled else []
    )


@dataclass
class Window:
    """One streaming run's measured window."""

    before: Snapshot
    after: Snapshot
    log: PublishLog
    peak_rss_kib: int


async def measure_stream(
    server: Server, stream: Stream, procs: list[ClientProc], t0: float
) -> Window:
    """Publish through warm-up and window; CPU/RSS snapshots at the window's two ends."""
    peak = 0

    async def sample_peak_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(server.pids()))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample_peak_rss())
    log = PublishLog()
    measure_from = time.time() + stream.warmup
    publisher = asyncio.create_task(
        publish(
            url=server.publish_url,
            key=server.publish_key,
            zones=stream.zones,
            rate=stream.rate,
            seconds=stream.warmup + stream.duration,
            t0=t0,
            measure_from=measure_from,
            log=log,
            poster_class=server.poster_class,
        )
    )
    await asyncio.sleep(max(0.0, measure_from - time.time()))
    before = snapshot(server, procs)
    await publisher
    await asyncio.sleep(stream.drain)
    after = snapshot(server, procs)
    sampler.cancel()
    return Window(before, after, log, peak)


async def run_stream(
    name: str, stream: Stream, plan: Plan, label: str, t0: float
) -> dict[str, Any]:
    """One server, one streaming scenario: connect, warm up, measure, drain, collect."""
    async with running_server(name, plan, label) as server:
        groups = stream_groups(stream, plan)
        fleet = client_fleet(server, groups, plan, f"{label}-{name}", t0)
        async with fleet as (procs, connected):
            window = await measure_stream(server, stream, procs, t0)
            stalled = [proc for proc in procs if proc.group.stalled]
            for proc in stalled:  # let it read what reached it, to see how it ended
                await proc.send({"cmd": "resume"})
            await asyncio.sleep(stream.drain if stalled else 0)
            ranges = window.log.ranges()
            span = [window.before.at, window.after.at]
            for proc in procs:
                mine = {zone: ranges[zone] for zone in proc.group.zones if zone in ranges}
                await proc.send({"cmd": "report", "window": span, "ranges": mine})
            reports = [await proc.expect("report", 60) for proc in procs]
    return stream_result(name, stream, connected, window, procs, reports)


def summarise_group(
    procs: list[ClientProc],
    reports: list[dict[str, Any]],
    ranges: dict[str, list[int]],
    *,
    stalled: bool,
) -> dict[str, Any] | None:
    """Readers' (or stalled clients') reports added up; None when there are none."""
    mine = [(proc, report) for proc, report in zip(procs, reports, strict=True)
            if proc.group.stalled is stalled]  # fmt: skip
    if not mine:
        return None
    zones = mine[0][0].group.zones  # a group's processes all subscribe to the same zones
    expected = sum(ranges[zone][1] - ranges[zone][0] + 1 for zone in zones if zone in ranges)
    return summarise(merge_reports([report for _proc, report in mine]), expected)


def stream_result(
    name: str,
    stream: Stream,
    connected: list[dict[str, Any]],
    window: Window,
    procs: list[ClientProc],
    reports: list[dict[str, Any]],
) -> dict[str, Any]:
    before, after, log = window.before, window.after, window.log
    seconds = after.at - before.at
    cpu = after.server_cpu - before.server_cpu
    clients = after.client_cpu - before.client_cpu
    others = after.machine_cpu - before.machine_cpu - cpu - clients
    ranges = log.ranges()
    readers = summarise_group(procs, reports, ranges, stalled=False)
    assert readers is not None, "every streaming run has readers"
    delivered = readers["deliveries_in_window"]
    return {
        "server": name,
        "clients": stream.clients,
        "connected": sum(c["ok"] for c in connected),
        "connect_failed": sum(c["failed"] for c in connected),
        "connect_errors": [c["errors"] for c in connected if c["errors"]],
        "window_s": seconds,
        "server_cpu_s": cpu,
        "server_core_pct": 100 * cpu / seconds,
        "client_core_pct": 100 * clients / seconds,
        "others_core_pct": 100 * others / seconds,
        "cpu_us_per_delivery": 1e6 * cpu / delivered if delivered else None,
        "deliveries_per_s": readers["measured_deliveries"] / stream.duration,
        "rss_start_mib": before.rss_kib / 1024,
        "rss_mib": after.rss_kib / 1024,
        "rss_peak_mib": window.peak_rss_kib / 1024,
        "publish_skipped": log.skipped,
        "publish_failed": dict(log.failed),
        "ranges": ranges,
        "readers": readers,
        "stalled": summarise_group(procs, reports, ranges, stalled=True),
    }


async def run_idle(name: str, idle: Idle, plan: Plan, label: str, t0: float) -> dict[str, Any]:
    """One server, idle scenario: handshake rate while opening, RSS per held connection."""
    async with running_server(name, plan, label) as server:
        await server.listening()
        await asyncio.sleep(0.5)  # let start-up allocations finish before the baseline
        rss_before, cpu_before = rss_kib(server.pids()), cpu_seconds(server.pids())
        machine_before, opening = machine_busy_seconds(), time.time()
        path, zones = MARKET_PREFIX + ZONES[0], ZONES[:1]
        groups = [Group(path, zones, n) for n in split(idle.connections, plan.client_procs)]
        async with client_fleet(server, groups, plan, f"{label}-{name}", t0) as (procs, connected):
            cpu = cpu_seconds(server.pids()) - cpu_before
            clients = cpu_seconds(proc.process.pid for proc in procs)  # all since they started
            others = machine_busy_seconds() - machine_before - cpu - clients
            opened = time.time() - opening
            await asyncio.sleep(idle.settle)
            rss_after = rss_kib(server.pids())
    ok = sum(c["ok"] for c in connected)
    elapsed = max(c["finished"] for c in connected) - min(c["started"] for c in connected)
    return {
        "server": name,
        "connections": idle.connections,
        "connected": ok,
        "connect_failed": sum(c["failed"] for c in connected),
        "connect_errors": [c["errors"] for c in connected if c["errors"]],
        "handshakes_per_s": ok / elapsed if elapsed > 0 else None,
        "cpu_us_per_handshake": 1e6 * cpu / ok if ok else None,
        "others_core_pct": 100 * others / opened,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "rss_kib_per_connection": (rss_after - rss_before) / ok if ok else None,
    }


Measure = Callable[[str, float], Awaitable[dict[str, Any]]]  # (label, t0) -> run


async def run_plan(plan: Plan, scenarios: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Every (scenario, server) ``plan.repeat`` times; of the repeats, the table shows the run
    that the rest of the machine disturbed least (lowest ``others_core_pct``), whatever its
    numbers. All runs go to results.json."""
    t0 = float(int(time.time()))
    shown: dict[str, list[dict[str, Any]]] = {}
    every: dict[str, list[dict[str, Any]]] = {}

    async def measure(key: str, name: str, run: Measure) -> None:
        runs = []
        for attempt in range(plan.repeat):
            print(
                f"scenario {key}: {name} #{attempt + 1} (load {os.getloadavg()[0]:.1f})", flush=True
            )
            runs.append(await run(f"s{key}-{attempt + 1}", t0))
        every.setdefault(key, []).extend(runs)
        shown.setdefault(key, []).append(min(runs, key=lambda run: run["others_core_pct"]))
        (plan.out / "results.json").write_text(json.dumps({"shown": shown, "all": every}, indent=1))

    for scenario in scenarios:
        for name in plan.servers:
            if scenario == 3:
                await measure("3", name, functools.partial(run_idle, name, plan.idle, plan))
                continue
            stream = plan.streams[scenario]
            if stream.stalled:
                without = replace(stream, clients=stream.clients - stream.stalled, stalled=0)
                await measure(
                    f"{scenario}-without", name, functools.partial(run_stream, name, without, plan)
                )
            await measure(str(scenario), name, functools.partial(run_stream, name, stream, plan))
    return shown


# ----------------------------------------------------------------------------- output


def _stream_section(
    key: str, title: str, stream: Stream, results: dict[str, list[Run]]
) -> list[str]:
    return [f"### {title.format(**vars(stream))}", "",
            f"Measured {stream.duration:g} s after {stream.warmup:g} s of warm-up.", "",
            stream_table(results[key])]  # fmt: skip


def _slow_section(stream: Stream, results: dict[str, list[Run]]) -> list[str]:
    return [
        f"### Scenario 4: {stream.clients - stream.stalled} readers on {stream.zones[0]}, "
        f"one client that stops reading, {stream.rate:g} updates/s", "",
        f"The slow client subscribes to all {len(stream.zones)} published zones and stops "
        f"reading after its handshake, {stream.warmup:g} s before the {stream.duration:g} s "
        "measured window; \"without\" is the same run without it.", "",
        slow_table(results["4-without"], results["4"]), "",
        "Readers, in the run with the slow client:", "", stream_table(results["4"]),
    ]  # fmt: skip


def versus_pricehub(runs: list[Run]) -> list[str]:
    """With peers in the run: each server's CPU per delivery and p99 as multiples of
    pricehub's (the comparison of issue 28); nothing without pricehub or without a peer."""
    base = next((run for run in runs if run["server"] == "pricehub"), None)
    if base is None or not any(run["server"] in PEERS for run in runs):
        return []
    header = ["server", "CPU µs/delivery", "CPU x pricehub", "p99 ms", "p99 x pricehub", "lost"]
    rows = [
        [run["server"], fmt(run["cpu_us_per_delivery"], 2),
         ratio(run["cpu_us_per_delivery"], base["cpu_us_per_delivery"]),
         fmt(run["readers"]["p99_ms"]), ratio(run["readers"]["p99_ms"], base["readers"]["p99_ms"]),
         f"{run['readers']['missing']}/{run['readers']['expected']}"]
        for run in runs
    ]  # fmt: skip
    return ["", "Against pricehub:", "", markdown_table(header, rows)]


def render(
    results: dict[str, list[Run]], plan: Plan, machine: str, argv: list[str]
) -> dict[int, str]:
    """One Markdown section per scenario run, each with the machine line and its target checks."""
    origin = f"Machine: {machine}. Command: `python bench/run.py {' '.join(argv)}`."
    sections = {}
    for scenario in sorted({int(key.split("-")[0]) for key in results}):
        if scenario == 1:
            title = "Scenario 1: {clients} subscribers on one zone, {rate:g} updates/s"
            body = _stream_section("1", title, plan.streams[1], results)
        elif scenario == 2:
            title = ("Scenario 2: {clients} clients on the multi-zone socket, all 7 zones, "
                     "{rate:g} updates/s per zone")  # fmt: skip
            body = _stream_section("2", title, plan.streams[2], results)
        elif scenario == 3:
            body = [f"### Scenario 3: {plan.idle.connections:,} idle connections", "",
                    idle_table(results["3"])]  # fmt: skip
        else:
            body = _slow_section(plan.streams[4], results)
        if scenario in (1, 2):
            body += versus_pricehub(results[str(scenario)])
        mine = {key: runs for key, runs in results.items() if key.split("-")[0] == str(scenario)}
        checks = target_checks(mine)
        targets = ["", "pricehub against issue 4's targets:", "", *checks] if checks else []
        sections[scenario] = "\n".join([*body[:2], origin, "", *body[2:], *targets])
    return sections


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        type=int,
        nargs="+",
        choices=[1, 2, 3, 4],
        default=[1, 2, 3, 4],
        help="scenarios to run (default: all)",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=SERVER_NAMES + PEER_NAMES,
        default=list(SERVER_NAMES),
        help="servers to compare (default: the first four; pricehub is skipped while "
        "run_server.py does not exist; the others are the Node peers of bench/peers/)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also every Node peer (" + " ".join(PEER_NAMES) + "); bench/peers/node_modules "
        "is installed with npm ci first when it is missing",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute in all")
    parser.add_argument("--clients", type=int, help="clients per run (scenario 3: connections)")
    parser.add_argument("--duration", type=float, help="measured seconds per streaming run")
    parser.add_argument("--warmup", type=float, help="seconds published before measuring")
    parser.add_argument("--rate", type=float, help="ticks (updates per zone) per second")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per scenario and server; the least disturbed one is shown (1)",
    )
    parser.add_argument("--client-procs", type=int, default=2, help="load-client processes (2)")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the server to the first CPU and the rest to the others",
    )
    parser.add_argument("--out", type=Path, help="logs and results.json (bench/out/<time>/)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write the tables into bench/RESULTS.md, between its markers (not with --quick)",
    )
    parser.add_argument(
        "--record-from",
        type=Path,
        metavar="DIR",
        help="run nothing: write DIR/results.json's tables into bench/RESULTS.md (not those "
        "of a --quick run)",
    )
    parser.add_argument(
        "--pricehub-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra run_server.py flag, repeatable: --pricehub-arg=--workers=2",
    )
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    chosen = {
        key: getattr(args, key)
        for key in ("clients", "duration", "warmup", "rate")
        if getattr(args, key) is not None
    }
    streams = {
        number: replace(stream, **chosen)
        for number, stream in (QUICK if args.quick else FULL).items()
    }
    idle = QUICK_IDLE if args.quick else FULL_IDLE
    if args.clients is not None:
        idle = replace(idle, connections=args.clients)
    servers = tuple(dict.fromkeys([*args.servers, *(PEER_NAMES if args.peers else ())]))
    if "pricehub" in servers and not (REPO / "run_server.py").exists():
        print("pricehub skipped: run_server.py does not exist yet", file=sys.stderr)
        servers = tuple(name for name in servers if name != "pricehub")
    cpus = frozenset(os.sched_getaffinity(0))
    server_cpus = frozenset({min(cpus)}) if args.pin and len(cpus) > 1 else cpus
    return Plan(
        streams=streams,
        idle=idle,
        servers=servers,
        client_procs=args.client_procs,
        repeat=args.repeat,
        server_cpus=server_cpus,
        client_cpus=cpus - server_cpus or cpus,
        out=args.out or BENCH / "out" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        pricehub_args=tuple(args.pricehub_arg),
    )


def refuse(message: str) -> int:
    """A command that would do the wrong thing: one line on stderr, exit 2."""
    print(f"bench/run.py: {message}", file=sys.stderr)
    return 2


def is_quick(saved: dict[str, Any]) -> bool:
    """Whether a results.json comes from a ``--quick`` run. Files written before ``quick``
    was saved say so only in the command line of their sections."""
    if "quick" in saved:
        return bool(saved["quick"])
    command = re.compile(r"Command: `python bench/run\.py [^`]*--quick")
    return any(command.search(text) for text in saved["sections"].values())


QUICK_NOT_RECORDED = (
    "a --quick run is a smoke test of the harness, not a measurement: it is not recorded "
    "into bench/RESULTS.md, whose tables are full runs"
)


def record_from(directory: Path) -> int:
    """``--record-from``: the tables of an earlier run into RESULTS.md, unless it was quick."""
    path = directory / "results.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return refuse(f"cannot read {path}: {exc}")
    if "sections" not in saved:
        return refuse(f"{path} has no tables: that run did not finish")
    if is_quick(saved):
        return refuse(f"{QUICK_NOT_RECORDED} (its tables: {directory / 'results.md'})")
    record({int(key): text for key, text in saved["sections"].items()}, RESULTS)
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if args.record_from:
        return record_from(args.record_from)
    if args.quick and args.record:
        return refuse(f"{QUICK_NOT_RECORDED}; drop --record (results.md in --out has the tables)")
    plan = build_plan(args)
    peers = [name for name in plan.servers if name in PEERS]
    if peers and (missing := missing_tools(peers)):
        return refuse(f"the peers need {', '.join(missing)} on the PATH (see bench/README.md)")
    if peers and (error := install()):
        return refuse(error)
    machine = machine_line(REPO)  # taken now: the date and tree of the run, not of its end
    machine += f"; peers: {versions()}" if peers else ""
    plan.out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, plan.client_cpus)  # the publisher runs on the clients' side
    # 10,000 sockets in one server: lift the soft fd limit; servers and clients inherit it.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # SIGTERM ends the run as Ctrl-C does, so every `finally` stops its child processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        results = asyncio.run(run_plan(plan, sorted(args.scenario)))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    sections = render(results, plan, machine, raw)
    text = "\n\n".join(sections.values())
    print(text)
    (plan.out / "results.md").write_text(text + "\n")
    saved = json.loads((plan.out / "results.json").read_text())
    saved.update(sections=sections, quick=args.quick)  # what --record-from reads
    (plan.out / "results.json").write_text(json.dumps(saved, indent=1))
    if args.record:
        record(sections, RESULTS)
    print(f"logs and raw results: {plan.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
