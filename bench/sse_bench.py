"""Scenario 1 over SSE vs WebSocket (issue 16): server CPU per delivery, loss.

For each transport in turn, one fresh pricehub (in memory, no simulator) pinned to CPU 0,
``--clients`` subscribers of ``/market/pjm`` in ``--procs`` client processes on the other
CPU(s), and a publisher posting one price ``--rate`` times a second. Server CPU seconds over
the measured window divided by the deliveries the clients counted in it is the CPU per
delivery; the ratio SSE / WebSocket comes from one invocation (same machine state, as far as
a shared machine allows). ``--repeat N`` alternates the transports N times and reports each
pair, so drift shows instead of hiding in one number.

    python -m bench.sse_bench --clients 2000 --duration 15 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.processes import cpu_seconds, free_port, machine_line, spawn, stop

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key"
SERVER_CPUS = frozenset({0})


def other_cpus() -> frozenset[int]:
    cpus = os.sched_getaffinity(0)
    return frozenset(cpus - SERVER_CPUS) or frozenset(cpus)


async def wait_healthy(port: int, deadline: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/api/ws/ws/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("server did not become healthy")


async def command(process: asyncio.subprocess.Process, text: str) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(text.encode() + b"\n")
    await process.stdin.drain()
    return dict(orjson.loads(await process.stdout.readline()))


async def run_one(transport: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    port = free_port()
    server = await spawn(
        [sys.executable, "run_server.py", "--port", str(port), "--redis-url", "none",
         "--data-dir", "none", "--no-simulate", "--publish-key", KEY, "--log-format", "json",
         "--max-connections-per-ip", "100000"],
        log=out / f"server-{transport}.log", cwd=REPO, pipes=False, cpus=SERVER_CPUS,
    )  # fmt: skip
    clients: list[asyncio.subprocess.Process] = []
    try:
        await wait_healthy(port, time.monotonic() + 20)
        per_proc = args.clients // args.procs
        for index in range(args.procs):
            clients.append(await spawn(
                [sys.executable, "-m", "bench.streamclient", "--transport", transport,
                 "--port", str(port), "--clients", str(per_proc)],
                log=out / f"client-{transport}-{index}.log", cwd=REPO, pipes=True,
                cpus=other_cpus(),
            ))  # fmt: skip
        for client in clients:
            assert client.stdout is not None
            ready = orjson.loads(await client.stdout.readline())
            assert ready["event"] == "ready", ready
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            return await measure(session, port, server.pid, clients, args)
    finally:
        for client in clients:
            await stop(client)
        await stop(server)


async def measure(
    session: aiohttp.ClientSession, port: int, server_pid: int,
    clients: list[asyncio.subprocess.Process], args: argparse.Namespace,
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/ws/ws/broadcast/price"
    interval = 1 / args.rate

    async def publish_for(seconds: float) -> int:
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            async with session.post(url, json={"market_zone": "pjm", "price": 1.0}) as response:
                assert response.status == 202
            sent += 1
            await asyncio.sleep(max(0.0, started + sent * interval - time.monotonic()))
        return sent

    await publish_for(args.warmup)
    before = [await command(c, "report") for c in clients]
    cpu_before = cpu_seconds([server_pid])
    sent = await publish_for(args.duration)
    await asyncio.sleep(0.5)  # the last tick's writes reach the clients
    cpu = cpu_seconds([server_pid]) - cpu_before
    after = [await command(c, "report") for c in clients]
    deliveries = sum(a["deliveries"] - b["deliveries"] for a, b in zip(after, before, strict=True))
    return {
        "sent": sent, "deliveries": deliveries, "expected": sent * args.clients // args.procs
        * args.procs, "lost": sum(a["lost"] for a in after),
        "closed": sum(a["closed"] for a in after), "server_cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(1e6 * cpu / max(1, deliveries), 3),
    }  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    out = REPO / "bench" / "out" / time.strftime("sse-%Y%m%dT%H%M%S")
    rows = []
    for attempt in range(args.repeat):
        pair = {t: await run_one(t, args, out) for t in ("ws", "sse")}
        ratio = pair["sse"]["cpu_us_per_delivery"] / max(1e-9, pair["ws"]["cpu_us_per_delivery"])
        rows.append((attempt + 1, pair, ratio))
    print(machine_line(REPO))
    print(f"\n{args.clients} subscribers of /market/pjm, {args.rate} prices/s, "
          f"{args.duration} s measured\n")
    print(
        "| run | transport | deliveries (expected) | lost | closed | server CPU s "
        "| µs/delivery | SSE/WS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for attempt, pair, ratio in rows:
        for transport, result in pair.items():
            print(
                f"| {attempt} | {transport} | {result['deliveries']} ({result['expected']}) | "
                f"{result['lost']} | {result['closed']} | {result['server_cpu_s']} | "
                f"{result['cpu_us_per_delivery']} | {ratio:.2f}x |"
            )
    (out / "results.json").write_bytes(orjson.dumps(rows))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
