"""The old journal (``journal.Journal``) against ``SqliteJournal``, side by side (issue 27).

::

    python bench/journal_compare.py [--seconds 5] [--zones 7,20000] [--history 100]
                                    [--rounds 1] [--retained-zones 2000] [--no-fsync]

At the storage level (the server does not use ``SqliteJournal`` yet), in one run, on
fresh data dirs on the disk ``/tmp`` is on (``--dir`` for another):

* ``single``: ``--callers`` (50) concurrent callers, each appending one price at a time
  as soon as the last one is committed, the zones taken in turn;
* ``batch``: ``--in-flight`` (4) callers appending batches of ``--batch`` (1,000) prices
  over consecutive zones;

each for ``--seconds``, for every ``--zones`` count: accepted prices/s and fsyncs
(commits) per accepted price. Then, in a fresh process per journal, a data dir of
``--retained-zones`` x ``--history`` retained prices is opened and loaded into a
``MemoryStorage`` as ``DurableStorage.start`` does (recovery time), and one whole
turnover of the history is appended through both as ``JournaledAppends`` does: the RSS
per retained price of journal + memory store (the old journal keeps a second copy of
the history's references; SQLite none). Ratios are sqlite / old; ``--rounds`` > 1 runs
each rate measurement that many times, alternating, and keeps the median.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pricehub.storage.base import JournalStats, StoredPrice  # noqa: E402
from pricehub.storage.legacy.journal import Journal  # noqa: E402
from pricehub.storage.memory import MemoryStorage  # noqa: E402
from pricehub.storage.sqlite_journal import SqliteJournal  # noqa: E402

KINDS = ("old", "sqlite")


class AnyJournal(Protocol):
    async def append(self, prices: list[StoredPrice]) -> None: ...
    def stats(self) -> JournalStats: ...
    async def close(self) -> None: ...


def open_journal(kind: str, directory: Path, history: int, *, fsync: bool) -> Any:
    opener: Callable[..., Any] = Journal.open if kind == "old" else SqliteJournal.open
    return opener(directory, history_size=history, new_epoch="bench", fsync=fsync)


def zone_names(count: int) -> list[str]:
    return [f"z{index}" for index in range(count)]


def payload(seq: int) -> bytes:
    """A stored price as ``with_seq`` makes it (~150 bytes)."""
    return (
        b'{"seq":%d,"accepted_at":"2026-12-07T12:00:00.123Z","market_zone":"pjm",'
        b'"price":%d.25,"currency":"USD","unit":"MWh","timestamp":"2026-12-07T12:00:00.000Z"}'
        % (seq, seq % 997)
    )


class Numbering:
    """Seqs per zone, handed out in the order appends are queued (both journals take
    their place in the write order synchronously, so each zone's seqs stay ordered)."""

    def __init__(self, zones: list[str]) -> None:
        self.seqs = dict.fromkeys(zones, 0)
        self.turn = itertools.cycle(zones)

    def take(self, count: int) -> list[StoredPrice]:
        prices = []
        for _ in range(count):
            zone = next(self.turn)
            self.seqs[zone] = seq = self.seqs[zone] + 1
            prices.append(StoredPrice(zone, seq, payload(seq)))
        return prices


async def drive(journal: AnyJournal, zones: int, seconds: float, callers: int,
                size: int) -> tuple[float, int]:  # fmt: skip
    """``callers`` loops appending ``size`` prices each until ``seconds`` are over:
    (accepted prices/s, accepted)."""
    numbering = Numbering(zone_names(zones))
    accepted = 0

    async def caller(until: float) -> None:
        nonlocal accepted
        while time.perf_counter() < until:
            await journal.append(numbering.take(size))
            accepted += size

    started = time.perf_counter()
    await asyncio.gather(*(caller(started + seconds) for _ in range(callers)))
    return accepted / (time.perf_counter() - started), accepted


async def rate(kind: str, scratch: Path, args: argparse.Namespace, zones: int,
               scenario: str) -> dict[str, float]:  # fmt: skip
    directory = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
    journal = open_journal(kind, directory, args.history, fsync=not args.no_fsync)[0]
    callers, size = (args.callers, 1) if scenario == "single" else (args.in_flight, args.batch)
    await journal.append(Numbering(["warmup"]).take(1))
    before = journal.stats()
    per_second, accepted = await drive(journal, zones, args.seconds, callers, size)
    after = journal.stats()
    await journal.close()
    return {
        "rate": per_second,
        "fsyncs_per_price": (after.fsyncs - before.fsyncs) / max(1, accepted),
        "writes_per_price": (after.writes - before.writes) / max(1, accepted),
        "bytes_on_disk": after.bytes_on_disk,
    }


# --- memory and recovery, one fresh process per journal ----------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def fill(kind: str, directory: Path, zones: int, history: int) -> None:
    journal = open_journal(kind, directory, history, fsync=False)[0]
    numbering = Numbering(zone_names(zones))
    for _ in range(zones * history // 1000 + 1):
        await journal.append(numbering.take(1000))
    await journal.close()


async def memory_child(kind: str, directory: Path, zones: int, history: int) -> dict[str, float]:
    """Open + load as ``DurableStorage.start`` does, then one turnover of appends as
    ``JournaledAppends`` does (journal, then ``memory.mirror``)."""
    gc.collect()
    baseline = rss_bytes()
    started = time.perf_counter()
    journal, recovered = open_journal(kind, directory, history, fsync=False)
    memory = MemoryStorage(history_size=history, epoch=recovered.epoch)
    for zone, state in recovered.zones.items():
        memory.reset(zone, state.prices, seq=state.seq)
    recovery = time.perf_counter() - started
    retained = sum(len(state.prices) for state in recovered.zones.values())
    gc.collect()
    loaded = rss_bytes() - baseline
    numbering = Numbering(zone_names(zones))
    numbering.seqs = {zone: state.seq for zone, state in recovered.zones.items()}
    del recovered  # what DurableStorage keeps of it could be its two flags only
    for _ in range(zones * history // 1000 + 1):
        prices = numbering.take(1000)
        await journal.append(prices)
        for price in prices:
            memory.mirror(price)
    gc.collect()
    turned = rss_bytes() - baseline
    await journal.close()
    return {
        "recovery_seconds": recovery,
        "retained": retained,
        "rss_per_price_loaded": loaded / max(1, retained),
        "rss_per_price_after_turnover": turned / max(1, retained),
    }


async def memory(kind: str, scratch: Path, args: argparse.Namespace) -> dict[str, float]:
    directory = Path(tempfile.mkdtemp(prefix=f"mem-{kind}-", dir=scratch))
    await fill(kind, directory, args.retained_zones, args.history)
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, __file__, "--memory-child", kind, str(directory),
         str(args.retained_zones), str(args.history)],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


# --- the report -----------------------------------------------------------------------


def ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old else "-"


def row(label: str, old: float, new: float, fmt: str) -> str:
    return f"| {label} | {old:{fmt}} | {new:{fmt}} | {ratio(new, old)} |"


async def rates(scratch: Path, args: argparse.Namespace) -> list[str]:
    lines = []
    for zones, scenario in itertools.product(args.zones, ("single", "batch")):
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind in KINDS:  # alternating: a noisy neighbour hits both
                runs[kind].append(await rate(kind, scratch, args, zones, scenario))
        med = {
            kind: {key: statistics.median(r[key] for r in runs[kind]) for key in runs[kind][0]}
            for kind in KINDS
        }
        name = (f"{args.callers} callers x 1 price" if scenario == "single"
                else f"{args.in_flight} callers x {args.batch} prices")  # fmt: skip
        label = f"{name}, {zones:,} zones"
        old, new = med["old"], med["sqlite"]
        lines.append(row(f"{label}: prices/s", old["rate"], new["rate"], ",.0f"))
        lines.append(row(f"{label}: fsyncs/price", old["fsyncs_per_price"],
                         new["fsyncs_per_price"], ".4f"))  # fmt: skip
    return lines


async def memory_lines(scratch: Path, args: argparse.Namespace) -> list[str]:
    found = {kind: await memory(kind, scratch, args) for kind in KINDS}
    old, new = found["old"], found["sqlite"]
    retained = f"{int(old['retained']):,} retained prices"
    return [
        row(f"recovery + load, {retained}: seconds", old["recovery_seconds"],
            new["recovery_seconds"], ".2f"),
        row("RSS per retained price after load (bytes)", old["rss_per_price_loaded"],
            new["rss_per_price_loaded"], ".0f"),
        row("RSS per retained price after a turnover (bytes)",
            old["rss_per_price_after_turnover"], new["rss_per_price_after_turnover"], ".0f"),
    ]  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--zones", default="7,20000", help="zone counts (default 7,20000)")
    parser.add_argument("--history", type=int, default=100)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--retained-zones", type=int, default=2000)
    parser.add_argument("--no-fsync", action="store_true", help="both journals without fsync")
    parser.add_argument("--no-memory", action="store_true", help="skip memory and recovery")
    parser.add_argument("--dir", help="where the data dirs go (default: a temp dir)")
    args = parser.parse_args()
    args.zones = [int(count) for count in args.zones.split(",")]
    with tempfile.TemporaryDirectory(prefix="journal-compare-", dir=args.dir) as scratch:
        lines = await rates(Path(scratch), args)
        if not args.no_memory:
            lines += await memory_lines(Path(scratch), args)
    fsync = "fsync off" if args.no_fsync else "fsync on"
    print(f"| measure ({fsync}, history {args.history}, {args.seconds:g} s each) "
          "| old journal | SQLite | SQLite / old |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:
        kind, directory, zones, history = sys.argv[2:6]
        result = asyncio.run(memory_child(kind, Path(directory), int(zones), int(history)))
        print(json.dumps(result))
    else:
        asyncio.run(main())
