"""Snapshot of many zones and history by market time on Redis (issue 26, "Measure").

::

    python bench/snapshot_history.py [--zones 20000] [--retained 1000] [--query-zones 50]
                                     [--snapshot-zones 1000] [--interval-s 60] [--runs 50]

Starts a throwaway redis-server (no persistence; tests/harness/redisproc.py), fills it directly
with pipelined writes in pricehub's key layout (``KeyLayout``: every zone's history
sorted set with ``--retained`` prices one ``--interval-s`` apart in market time, its
latest key and seq, the epoch), then measures the storage's reads
(``pricehub.storage.redis.reads``) as the server runs them:

* ``snapshot`` of ``--snapshot-zones`` zones: Redis commands per call (``INFO
  commandstats`` deltas; one command is one round trip), latency over ``--runs`` calls and
  Redis's own time per call;
* ``history_between`` of ``--query-zones`` zones (drawn with a fixed seed) over one hour
  of market time inside the retained span, with the default limit (1000) and the largest
  (10000): commands per query (the EVAL, and the ZRANGEs it runs inside Redis), latency,
  Redis's own time per query (``usec`` of EVAL in commandstats: how long the script held
  Redis's one thread), prices returned;
* the same history query on the in-memory backend (``MemoryStorage``) holding the same
  zones, for comparison.

Prints one table; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pricehub.storage.base import StoredPrice  # noqa: E402
from pricehub.storage.memory import MemoryStorage  # noqa: E402
from pricehub.storage.redis import KeyLayout  # noqa: E402
from pricehub.storage.redis.reads import history_between, snapshot  # noqa: E402
from pricehub.wire.messages import (  # noqa: E402
    DEFAULT_RANGE_LIMIT,
    MAX_RANGE_LIMIT,
    PriceBody,
    format_timestamp,
    with_seq,
)
from tests.harness.redisproc import RedisProcess  # noqa: E402  (one way to run a redis-server)

END = 1_795_000_000.0  # the newest retained market time (Unix s), late 2026
ACCEPTED = "2026-11-27T15:00:00.000000Z"
ZONES_PER_PIPELINE = 50
# What ``with_seq(PriceBody(...).encode(), ...)`` stores, formatted directly: 20 million
# payloads through orjson would take minutes. ``fill`` checks one against the real thing.
PAYLOAD = (
    '{"seq":%d,"accepted_at":"%s","market_zone":"%s","price":%s,"volume":null,'
    '"timestamp":"%s"}'
)


def zone_name(index: int) -> str:
    return f"z{index:05d}"


def format_timestamp_at(unix: float) -> str:
    return format_timestamp(datetime.fromtimestamp(unix, UTC))


def market_times(retained: int, interval: float) -> list[str]:
    """The retained prices' market times, oldest first, the newest at ``END``."""
    return [format_timestamp_at(END - (retained - seq) * interval)
            for seq in range(1, retained + 1)]  # fmt: skip


def payloads(zone: str, times: list[str]) -> list[bytes]:
    return [
        (PAYLOAD % (seq, ACCEPTED, zone, f"{40 + seq % 17}.5", stamp)).encode()
        for seq, stamp in enumerate(times, start=1)
    ]


async def fill(client: aioredis.Redis, keys: KeyLayout, zones: int, times: list[str]) -> float:
    """Every zone's history, latest and seq, pipelined; seconds it took."""
    sample = payloads(zone_name(0), times[:1])[0]
    real = with_seq(PriceBody(zone_name(0), 41.5, None, times[0]).encode(), 1, ACCEPTED.encode())
    assert sample == real, (sample, real)  # the layout pricehub stores, byte for byte
    started = time.perf_counter()
    await client.set(keys.epoch, "bench-epoch")
    for first in range(0, zones, ZONES_PER_PIPELINE):
        pipe = client.pipeline(transaction=False)
        for index in range(first, min(first + ZONES_PER_PIPELINE, zones)):
            zone = zone_name(index)
            stored = payloads(zone, times)
            pipe.zadd(keys.history(zone), {payload: seq for seq, payload in enumerate(stored, 1)})
            pipe.set(keys.latest(zone), stored[-1])
            pipe.set(keys.seq(zone), len(stored))
        await pipe.execute()
    return time.perf_counter() - started


async def command_stats(client: aioredis.Redis) -> dict[str, dict[str, float]]:
    stats = await client.info("commandstats")
    return {name: {"calls": e["calls"], "usec": e["usec"]} for name, e in stats.items()}


async def counted(client: aioredis.Redis, call: Awaitable[Any]) -> tuple[Any, dict[str, Any]]:
    """``call``'s result and the commands Redis ran for it (INFO itself left out)."""
    before = await command_stats(client)
    result = await call
    after = await command_stats(client)
    delta: dict[str, Any] = {}
    for name, entry in after.items():
        old = before.get(name, {"calls": 0, "usec": 0})
        calls = entry["calls"] - old["calls"]
        if calls and name != "cmdstat_info":
            usec = entry["usec"] - old["usec"]
            delta[name.removeprefix("cmdstat_")] = {"calls": calls, "usec": usec}
    return result, delta


async def timed_on_redis(
    client: aioredis.Redis, command: str, call: Callable[[], Awaitable[Any]], runs: int
) -> dict[str, float]:
    """``timed``, plus how long Redis spent in ``command`` per call (its own clock,
    commandstats ``usec``: the time its one thread was held), over the same runs."""
    before = (await command_stats(client)).get(f"cmdstat_{command}", {"usec": 0})
    figures = await timed(call, runs)
    after = (await command_stats(client))[f"cmdstat_{command}"]
    redis_ms = (after["usec"] - before["usec"]) / runs / 1000
    return {**figures, "redis_ms_per_call": round(redis_ms, 3)}


async def timed(call: Callable[[], Awaitable[Any]], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3),
        "max_ms": round(samples[-1], 3),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    keys = KeyLayout("bench:")
    times = market_times(args.retained, args.interval_s)
    query_zones = sorted(random.Random(26).sample(range(args.zones), args.query_zones))
    asked = [zone_name(index) for index in query_zones]
    # One hour of market time, ending two hours before the newest: inside the retention.
    end = format_timestamp_at(END - 2 * 3600)
    start = format_timestamp_at(END - 3 * 3600)
    results: dict[str, Any] = {"zones": args.zones, "retained": args.retained,
                               "interval_s": args.interval_s}  # fmt: skip
    with RedisProcess() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            results["fill_s"] = round(await fill(client, keys, args.zones, times), 1)
            memory = await client.info("memory")
            results["redis_used_memory"] = memory["used_memory_human"]
            snap_zones = [zone_name(i) for i in range(min(args.snapshot_zones, args.zones))]
            taken, ran = await counted(client, snapshot(client, keys, snap_zones))
            assert len(taken.prices) == len(snap_zones) and all(taken.prices.values())
            results["snapshot"] = {
                "zones": len(snap_zones),
                "commands": {name: entry["calls"] for name, entry in ran.items()},
                **await timed_on_redis(
                    client, "mget", lambda: snapshot(client, keys, snap_zones), args.runs
                ),
            }  # fmt: skip
            for label, limit in (("history_default_limit", DEFAULT_RANGE_LIMIT),
                                 ("history_max_limit", MAX_RANGE_LIMIT)):  # fmt: skip
                found, ran = await counted(
                    client, history_between(client, keys, asked, start, end, limit=limit)
                )
                results[label] = {
                    "zones": len(asked), "from": start, "to": end, "limit": limit,
                    "prices": len(found.prices), "truncated": found.truncated,
                    "commands": {name: entry["calls"] for name, entry in ran.items()},
                    **await timed_on_redis(
                        client, "eval",
                        lambda limit=limit: history_between(  # type: ignore[misc]
                            client, keys, asked, start, end, limit=limit
                        ), args.runs,
                    ),
                }  # fmt: skip
        finally:
            await client.aclose()
    results["memory_history_max_limit"] = await memory_history(asked, times, start, end, args)
    return results


async def memory_history(
    asked: list[str], times: list[str], start: str, end: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The same query on ``MemoryStorage`` (only the queried zones matter to it)."""
    memory = MemoryStorage(history_size=args.retained)
    for zone in asked:
        for seq, payload in enumerate(payloads(zone, times), 1):
            memory.mirror(StoredPrice(zone, seq, payload))
    found = await memory.history_between(asked, start, end, limit=MAX_RANGE_LIMIT)
    figures = await timed(
        lambda: memory.history_between(asked, start, end, limit=MAX_RANGE_LIMIT), args.runs
    )
    return {"zones": len(asked), "prices": len(found.prices), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zones", type=int, default=20_000)
    parser.add_argument("--retained", type=int, default=1000)
    parser.add_argument("--query-zones", type=int, default=50)
    parser.add_argument("--snapshot-zones", type=int, default=1000)
    parser.add_argument("--interval-s", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
