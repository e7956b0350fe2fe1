"""The durable journal of the in-memory store, on real files (PROTOCOL.md, "Durable
in-memory storage"): recovery, group commit, compaction, crashes, damage, the lock and a
full disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import pricehub.storage.legacy.format as fmt
from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageUnavailable
from pricehub.storage.legacy.journal import (
    DiskError,
    Journal,
    JournalLocked,
    JournalUnavailable,
    Recovered,
)
from tests.harness import journal_child

ROOT = Path(__file__).resolve().parents[2]


def price(zone: str, seq: int, size: int = 0) -> StoredPrice:
    return StoredPrice(zone, seq, journal_child.payload(zone, seq) + b" " * size)


def reopen(path: Path, **options: object) -> tuple[Journal, Recovered]:
    options.setdefault("history_size", 100)
    return Journal.open(path, **options)  # type: ignore[arg-type]


def segments(path: Path) -> list[Path]:
    return files(path, "wal-*.log")


# Small sync helpers: the async tests touch files only through these.
def files(path: Path, pattern: str) -> list[Path]:
    return sorted(path.glob(pattern))


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name != "LOCK")


def append_bytes(path: Path, data: bytes) -> int:
    """Append ``data`` to ``path``; the new size."""
    with open(path, "ab") as out:
        out.write(data)
    return path.stat().st_size


def fill_disk(filler: Path) -> None:
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as out:
        while True:
            out.write(b"x" * 4096)


# --- helpers for child processes ----------------------------------------------------


class Child:
    """``tests.harness.journal_child`` in a subprocess, read line by line with deadlines."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.journal_child", str(directory), mode],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        self.acked: dict[str, list[int]] = {}

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError(f"child said nothing for {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"child exited with {self.proc.wait(5)}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode()
        if text.startswith("ACK "):
            _, zone, seq = text.split()
            self.acked.setdefault(zone, []).append(int(seq))
        return text

    def wait_for(self, predicate: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.line(deadline - time.monotonic())
            if text.startswith(predicate):
                return text

    def acks(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        target = sum(map(len, self.acked.values())) + count
        while sum(map(len, self.acked.values())) < target:
            self.line(deadline - time.monotonic())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        # What was printed before the kill was acknowledged: read it all.
        with contextlib.suppress(EOFError):
            while True:
                self.line(1.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def child_factory() -> Iterator[type[Child]]:
    started: list[Child] = []

    class Tracked(Child):
        def __init__(self, directory: Path, mode: str) -> None:
            super().__init__(directory, mode)
            started.append(self)

    yield Tracked
    for child in started:
        child.close()


def assert_acked_recovered(child: Child, recovered: Recovered) -> None:
    """Every acknowledged price is back, once, in order, with no gap and no seq reused."""
    assert recovered.recovered, recovered.fresh_reason
    assert child.acked, "the child acknowledged nothing"
    for zone, acked in child.acked.items():
        assert acked == list(range(acked[0], acked[-1] + 1))
        state = recovered.zones[zone]
        seqs = [p.seq for p in state.prices]
        assert seqs == list(range(state.seq - len(seqs) + 1, state.seq + 1))
        assert state.seq >= acked[-1]
        assert len(seqs) == min(journal_child.HISTORY_SIZE, state.seq)
        for item in state.prices:
            assert item == StoredPrice(zone, item.seq, journal_child.payload(zone, item.seq))


# --- recovery -----------------------------------------------------------------------


async def test_append_then_reopen_gives_exactly_the_prices(tmp_path: Path) -> None:
    journal, recovered = reopen(tmp_path, new_epoch="e1")
    assert recovered.fresh_reason == "new data dir" and recovered.epoch == "e1"
    written = {zone: [price(zone, seq) for seq in range(1, 151)] for zone in ("pjm", "miso")}
    for prices in written.values():
        await journal.append(prices[:50])
        for item in prices[50:]:
            await journal.append([item])
    await journal.close()

    again, recovered = reopen(tmp_path, new_epoch="e2")
    await again.close()
    assert recovered.recovered and recovered.epoch == "e1" and recovered.torn_bytes == 0
    assert set(recovered.zones) == {"pjm", "miso"}
    for zone, prices in written.items():
        assert recovered.zones[zone].seq == 150
        assert list(recovered.zones[zone].prices) == prices[-100:]


async def test_epoch_and_zone_reset_are_journaled(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, new_epoch="e1")
    await journal.append([price("pjm", seq) for seq in (1, 2, 3)])
    await journal.queue_epoch("e2")
    await journal.queue_reset("pjm", [price("pjm", 9), price("pjm", 10)], seq=10)
    await journal.append([price("pjm", 11)])
    await journal.close()

    again, recovered = reopen(tmp_path)
    assert recovered.epoch == "e2"
    assert [p.seq for p in recovered.zones["pjm"].prices] == [9, 10, 11]
    # ... and survive compaction too.
    await again.snapshot()
    await again.close()
    _, recovered = reopen(tmp_path)
    assert recovered.epoch == "e2" and [p.seq for p in recovered.zones["pjm"].prices] == [9, 10, 11]


async def test_reused_seq_of_a_failed_append_wins_on_replay(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", 1), price("pjm", 2), price("pjm", 3)])
    # As if the batch holding seq 3 had failed but reached the disk anyway, and the
    # store handed seq 3 out again.
    await journal.append([StoredPrice("pjm", 3, b'{"again":3}'), price("pjm", 4)])
    await journal.close()
    _, recovered = reopen(tmp_path)
    prices = recovered.zones["pjm"].prices
    assert [p.seq for p in prices] == [1, 2, 3, 4] and prices[2].payload == b'{"again":3}'


# --- group commit ---------------------------------------------------------------------


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, history_size=1000)
    await journal.append([price("pjm", 1)])  # an fsync in flight for what comes next
    before = journal.stats().fsyncs
    first = asyncio.ensure_future(journal.append([price("pjm", 2)]))
    await asyncio.sleep(0)  # the flusher has taken seq 2 and is fsyncing it
    burst = [journal.append([price("pjm", seq)]) for seq in range(3, 1002)]
    await asyncio.gather(first, *burst)
    stats = journal.stats()
    await journal.close()
    assert stats.fsyncs - before <= 3, stats  # 1000 appends: seq 2 alone, then the rest
    assert stats.records == 1001 and stats.fsync_max_seconds >= (stats.fsync_last_seconds or 0)
    _, recovered = reopen(tmp_path, history_size=1000)
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(2, 1002))


# --- compaction -----------------------------------------------------------------------


async def test_snapshots_keep_disk_near_history_times_zones(tmp_path: Path) -> None:
    history = 50
    journal, _ = reopen(tmp_path, history_size=history, compact_factor=4.0, compact_min_records=0)
    record = len(price("pjm", 1000, size=200).payload) + 64  # payload + framing, generously
    peak = 0
    for seq in range(1, 20 * history + 1):
        await journal.append([price("pjm", seq, size=200)])
        peak = max(peak, journal.stats().bytes_on_disk)
    await journal.close()
    stats = journal.stats()
    on_disk = disk_usage(tmp_path)
    # snapshot (1x) + log up to compact_factor (4x) + the next snapshot (1x) at most
    assert stats.snapshots >= 3 and stats.last_snapshot_at is not None
    assert peak <= 6 * history * record, (peak, history * record)
    assert on_disk <= 6 * history * record and on_disk == stats.bytes_on_disk
    assert len(segments(tmp_path)) <= 2 and len(files(tmp_path, "snap-*")) == 1
    _, recovered = reopen(tmp_path, history_size=history)
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(951, 1001))


# --- crashes --------------------------------------------------------------------------


def test_sigkill_while_appending_loses_no_acknowledged_price(
    tmp_path: Path, child_factory: type[Child]
) -> None:
    for _ in range(2):  # a second life on the first one's recovered state
        child = child_factory(tmp_path, "loop")
        child.wait_for("OPEN")
        child.acks(600)
        child.kill()
        journal, recovered = reopen(tmp_path, history_size=journal_child.HISTORY_SIZE)
        assert_acked_recovered(child, recovered)
        asyncio.run(journal.close())


@pytest.mark.parametrize("step", ["before-rename", "after-rename"])
def test_sigkill_during_a_snapshot_loses_no_acknowledged_price(
    tmp_path: Path, child_factory: type[Child], step: str
) -> None:
    child = child_factory(tmp_path, step)
    child.wait_for(f"SNAPSHOT {step}")
    child.acks(150)  # appends go on while the compaction is stuck mid-way
    child.kill()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert any(n.endswith(".tmp") for n in leftovers) == (step == "before-rename")
    journal, recovered = reopen(tmp_path, history_size=journal_child.HISTORY_SIZE)
    asyncio.run(journal.close())
    assert_acked_recovered(child, recovered)
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("snap-*"))) <= 1


# --- damage ---------------------------------------------------------------------------


async def write_prices(path: Path, count: int, **options: object) -> None:
    journal, _ = reopen(path, new_epoch="old", **options)
    for seq in range(1, count + 1):
        await journal.append([price("pjm", seq)])
    await journal.close()


async def test_torn_tail_is_cut_with_a_warning(tmp_path: Path) -> None:
    await write_prices(tmp_path, 20)
    last = segments(tmp_path)[-1]
    frame = (b"\x40\x00\x00\x00\x12\x34\x56\x78") + b"half a record"
    size = append_bytes(last, frame)
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path)
    await journal.close()
    assert recovered.recovered and recovered.epoch == "old" and recovered.torn_bytes == len(frame)
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(1, 21))
    torn = [e for e in logs if e["event"] == "journal_torn_tail"]
    assert torn and torn[0]["log_level"] == "warning" and torn[0]["cut_bytes"] == len(frame)
    assert last.stat().st_size == size - len(frame)
    with capture_logs() as logs:  # cut for good: no warning the second time
        journal, _ = reopen(tmp_path)
    await journal.close()
    assert not [e for e in logs if e["event"] == "journal_torn_tail"]


async def test_zero_filled_tail_is_torn_not_damage(tmp_path: Path) -> None:
    await write_prices(tmp_path, 5)
    # The file grew, its data never reached the disk.
    append_bytes(segments(tmp_path)[-1], b"\0" * 4096)
    journal, recovered = reopen(tmp_path)
    await journal.close()
    assert recovered.recovered and recovered.torn_bytes == 4096
    assert recovered.zones["pjm"].seq == 5


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def zero(path: Path, offset: int, size: int) -> None:
    """What a power cut with out-of-order writeback leaves: a page that never landed."""
    with open(path, "r+b") as out:
        out.seek(offset)
        out.write(b"\0" * size)


def frame_offset(path: Path, seq: int) -> int:
    """Where the record of pjm ``seq`` starts in segment ``path``."""
    for frame in fmt.scan_segment(path.read_bytes()).frames:
        record = fmt.decode_body(frame.body)
        if isinstance(record, fmt.PriceRecord) and record.price.seq == seq:
            return frame.offset
    raise AssertionError(f"no record of seq {seq} in {path.name}")


def forge(path: Path, *prices: StoredPrice) -> None:
    """Append to segment ``path`` one well-formed write of ``prices``: bytes no journal
    wrote, which a checksum cannot tell from its own."""
    append_bytes(path, fmt.encode_write(b"".join(fmt.encode_price(p) for p in prices)))


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def assert_damage_reported(
    path: Path, recovered: Recovered, logs: list[MutableMapping[str, Any]]
) -> None:
    """A new epoch, said in ``fresh_reason`` and one error, the files kept aside."""
    assert not recovered.recovered and recovered.epoch == "new"
    assert "damaged" in (recovered.fresh_reason or "")
    aside = sorted(p.name for p in path.glob("*.corrupt-*"))
    assert aside and all(name in (recovered.fresh_reason or "") for name in aside)
    (error,) = events(logs, "journal_damaged_starting_new_epoch")
    assert error["log_level"] == "error" and error["moved_aside"] == aside


def assert_kept_aside(path: Path, originals: dict[str, bytes]) -> None:
    """Each damaged (or later) file is kept whole under a second name, never deleted,
    and its own name is gone (the new lineage's snapshot superseded it)."""
    for name, data in originals.items():
        (kept,) = files(path, name + ".corrupt-*")
        assert kept.read_bytes() == data and not (path / name).exists()


async def test_a_zeroed_page_inside_the_last_write_is_a_torn_tail(tmp_path: Path) -> None:
    await write_prices(tmp_path, 100)  # an older segment: 100 acknowledged prices
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", 101)])
    newest = segments(tmp_path)[-1]
    start = newest.stat().st_size  # where the last write begins
    await journal.append([price("pjm", seq, size=40) for seq in range(102, 302)])  # one write
    await journal.close()
    end = newest.stat().st_size
    page = (start // 4096 + 1) * 4096  # the first whole page inside the last write
    assert page + 2 * 4096 < end  # good records of that write follow the zeroed page
    zero(newest, page, 4096)
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.close()
    assert recovered.recovered and recovered.epoch == "old", recovered.fresh_reason
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(2, 102))
    assert recovered.torn_bytes == end - start and newest.stat().st_size == start
    (torn,) = events(logs, "journal_torn_tail")
    assert torn["offset"] == start and torn["cut_bytes"] == end - start
    assert not files(tmp_path, "*.corrupt-*")


async def test_damage_in_an_older_segment_keeps_every_record_before_it_on_a_new_epoch(
    tmp_path: Path,
) -> None:
    await write_prices(tmp_path, 100)
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", seq) for seq in range(101, 151)])
    await journal.close()
    older, newer = segments(tmp_path)
    flip_byte(older, frame_offset(older, 60) + 10)
    originals = {path.name: path.read_bytes() for path in (older, newer)}
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new", history_size=1000)
    await journal.append([price("pjm", 60)])  # numbering goes on after what was kept
    await journal.close()
    assert_damage_reported(tmp_path, recovered, logs)
    assert older.name in (recovered.fresh_reason or "")
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(1, 60))
    assert_kept_aside(tmp_path, originals)
    _, again = reopen(tmp_path, new_epoch="other", history_size=1000)  # the lineage is durable
    assert again.recovered and again.epoch == "new"
    assert [p.seq for p in again.zones["pjm"].prices] == list(range(1, 61))


async def test_damage_before_the_last_write_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    await write_prices(tmp_path, 50)
    (damaged,) = segments(tmp_path)
    flip_byte(damaged, frame_offset(damaged, 20) + 10)  # 30 later writes follow it
    original = damaged.read_bytes()
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.append([price("pjm", 20)])
    await journal.close()
    assert_damage_reported(tmp_path, recovered, logs)
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(1, 20))
    assert_kept_aside(tmp_path, {damaged.name: original})
    _, recovered = reopen(tmp_path)
    assert recovered.epoch == "new" and recovered.zones["pjm"].seq == 20


async def test_damaged_snapshot_keeps_the_zones_before_the_damage(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, new_epoch="old")
    await journal.append([price("pjm", seq) for seq in range(1, 30)])
    await journal.append([price("miso", seq) for seq in range(1, 30)])
    await journal.snapshot()
    await journal.close()
    (snapshot,) = files(tmp_path, "snap-*.snap")
    flip_byte(snapshot, snapshot.stat().st_size * 3 // 4)  # inside the second zone's record
    original = snapshot.read_bytes()
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.close()
    assert_damage_reported(tmp_path, recovered, logs)
    assert list(recovered.zones) == ["pjm"] and recovered.zones["pjm"].seq == 29
    assert_kept_aside(tmp_path, {snapshot.name: original})


async def test_a_long_zero_tail_is_cut_in_no_time(tmp_path: Path) -> None:
    await write_prices(tmp_path, 20)
    tail = 20 * 1024 * 1024  # preallocated, or grown by a power cut, never written
    append_bytes(segments(tmp_path)[-1], b"\0" * tail)
    started = time.perf_counter()
    journal, recovered = reopen(tmp_path)
    elapsed = time.perf_counter() - started
    await journal.close()
    assert recovered.recovered and recovered.torn_bytes == tail
    assert recovered.zones["pjm"].seq == 20
    assert elapsed < 1.0, f"a 20 MiB zero tail took {elapsed:.2f} s to open"


def legacy_segment(path: Path, count: int) -> bytes:
    """A segment as the previous format wrote it: frames without write headers."""
    prices = (fmt.encode_price(price("pjm", seq)) for seq in range(1, count + 1))
    frames = [fmt.encode_epoch("old"), *prices]
    data = fmt.LEGACY_SEGMENT_MAGIC + b"".join(frames)
    path.mkdir()
    (path / "wal-000000000001.log").write_bytes(data)
    return data


async def test_a_segment_of_the_previous_format_is_replayed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    legacy_segment(data, 30)
    append_bytes(data / "wal-000000000001.log", b"\0" * 4096)
    journal, recovered = reopen(data)
    await journal.append([price("pjm", 31)])
    await journal.close()
    assert recovered.recovered and recovered.epoch == "old" and recovered.torn_bytes == 4096
    assert [p.seq for p in recovered.zones["pjm"].prices] == list(range(1, 31))
    _, recovered = reopen(data)
    assert recovered.recovered and recovered.zones["pjm"].seq == 31


async def test_damage_in_a_segment_of_the_previous_format_keeps_what_precedes_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    original = legacy_segment(data, 30)
    flip_byte(data / "wal-000000000001.log", len(original) // 2)
    with capture_logs() as logs:
        journal, recovered = reopen(data, new_epoch="new")
    await journal.close()
    assert_damage_reported(data, recovered, logs)
    assert 10 < recovered.zones["pjm"].seq < 20


# --- what the directory holds besides the journal -------------------------------------


def make_stray(data: Path, kind: str) -> Path:
    """One entry that is not the journal's although its name looks like one."""
    if kind == "directory":
        path = data / "wal-000000000009.log"
        path.mkdir()
        (path / "inside").write_bytes(b"kept")
        return path
    if kind == "symlink":
        (data.parent / "elsewhere").write_bytes(b"kept")
        path = data / "wal-000000000008.log"
        path.symlink_to(data.parent / "elsewhere")
        return path
    if kind == "empty snapshot":
        path = data / "snap-000000000009.snap"
        path.write_bytes(b"")
        return path
    path = data / kind  # a name that is not exactly the journal's
    path.write_bytes(fmt.LEGACY_SEGMENT_MAGIC + b"kept")
    return path


def contents(path: Path) -> bytes:
    return (path / "inside").read_bytes() if path.is_dir() else path.read_bytes()


@pytest.mark.parametrize(
    "kind",
    [
        "wal-3.log",
        "wal-²³.log",
        "snap-٣.snap",
        "wal-0000000000012.log",
        "directory",
        "symlink",
        "empty snapshot",
    ],
)
async def test_a_stray_name_is_left_alone_and_named_once(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    await write_prices(data, 20)
    stray = make_stray(data, kind)
    before = contents(stray)
    with capture_logs() as logs:
        journal, recovered = reopen(data, new_epoch="new")
    await journal.append([price("pjm", 21)])
    await journal.snapshot()  # a compaction deletes only the journal's own files
    await journal.close()
    assert recovered.recovered and recovered.epoch == "old", recovered.fresh_reason
    assert recovered.zones["pjm"].seq == 20
    (ignored,) = events(logs, "journal_files_ignored")
    assert ignored["count"] == 1 and ignored["files"][0].startswith(repr(stray.name))
    assert stray.is_symlink() == (kind == "symlink") and contents(stray) == before
    _, again = reopen(data)
    assert again.recovered and again.zones["pjm"].seq == 21 and contents(stray) == before


def test_a_symlinked_lock_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"an operator's file\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "LOCK").symlink_to(target)
    with pytest.raises(JournalUnavailable, match="LOCK is a symbolic link") as refused:
        reopen(data)
    assert "\n" not in str(refused.value)
    assert target.read_bytes() == b"an operator's file\n"


# --- records a checksum cannot refuse ---------------------------------------------------


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        (StoredPrice("pjm", 21, b"\xff not json"), "payload is not JSON"),
        (StoredPrice("pjm", 21, b"[21]"), "payload is not a JSON object"),
        (StoredPrice("pjm", 21, b'{"seq":5}'), "payload names another seq"),
        (StoredPrice("pjm", 2**64 - 1, b"{}"), "out of range"),
        (StoredPrice("pjm", 2**63, b"{}"), "out of range"),
        (StoredPrice("PJM", 1, b"{}"), "is not a zone name"),
        (StoredPrice("pjm\n", 1, b"{}"), "is not a zone name"),
    ],
)
async def test_a_forged_record_is_refused_with_a_warning_and_never_served(
    tmp_path: Path, forged: StoredPrice, reason: str
) -> None:
    await write_prices(tmp_path, 20)
    forge(segments(tmp_path)[-1], forged)
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path)
    await journal.close()
    assert recovered.recovered and set(recovered.zones) == {"pjm"}
    (refused,) = events(logs, "journal_records_refused")
    assert refused["log_level"] == "warning" and refused["count"] == 1
    assert reason in refused["records"][0]
    pjm = recovered.zones["pjm"]
    assert forged not in pjm.prices and pjm.seq < 2**63
    if forged.seq == 21:  # its seq stays taken; the history restarts after it
        assert pjm.seq == 21 and not pjm.prices
    else:
        assert pjm.seq == 20 and [p.seq for p in pjm.prices] == list(range(1, 21))


async def test_a_zone_not_served_is_kept_on_disk_but_not_recovered(tmp_path: Path) -> None:
    await write_prices(tmp_path, 20)
    forge(segments(tmp_path)[-1], price("nyiso", 1), price("nyiso", 2))
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, zones=("pjm", "miso"))
    await journal.snapshot()
    await journal.close()
    assert recovered.recovered and set(recovered.zones) == {"pjm"}
    (unserved,) = events(logs, "journal_zones_not_served")
    assert unserved["zones"] == ["nyiso"] and unserved["log_level"] == "warning"
    _, again = reopen(tmp_path)  # served again: numbering goes on where it was
    assert again.zones["nyiso"].seq == 2


# --- the lock and the directory -------------------------------------------------------


async def test_second_holder_is_refused_naming_the_pid(
    tmp_path: Path, child_factory: type[Child]
) -> None:
    child = child_factory(tmp_path, "hold")
    child.wait_for("LOCKED")
    with pytest.raises(JournalLocked, match=f"pid {child.proc.pid} on ") as refused:
        reopen(tmp_path)
    assert refused.value.pid == child.proc.pid and isinstance(refused.value, StorageUnavailable)
    assert child.proc.stdin is not None
    child.proc.stdin.close()  # the holder closes and exits
    assert child.proc.wait(10) == 0
    journal, recovered = reopen(tmp_path)
    assert recovered.recovered
    with pytest.raises(JournalLocked, match=f"pid {os.getpid()} "):
        reopen(tmp_path)  # one holder per directory within a process too
    await journal.close()


def test_unusable_dir_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(JournalUnavailable) as refused:
        reopen(tmp_path / "file" / "data")
    assert str(tmp_path / "file" / "data") in str(refused.value)
    assert "\n" not in str(refused.value)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, *options: str) -> Iterator[Path]:
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_read_only_dir_is_a_one_line_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=64k") as mountpoint:
        with pytest.raises(JournalUnavailable, match="Read-only file system") as refused:
            reopen(mountpoint)
        assert "\n" not in str(refused.value)


async def append_until_full(journal: Journal, acked: list[StoredPrice]) -> tuple[int, DiskError]:
    """Append until the disk refuses (the segment's last page may take a few more);
    the seq that failed and the error."""
    for seq in range(acked[-1].seq + 1, acked[-1].seq + 100):
        try:
            await journal.append([price("pjm", seq, size=500)])
        except DiskError as error:
            return seq, error
        acked.append(price("pjm", seq, size=500))
    raise AssertionError("the disk never filled up")


async def test_disk_full_fails_the_append_then_heals_when_space_is_freed(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "size=256k") as mountpoint:
        data = mountpoint / "data"
        journal, _ = reopen(data, history_size=1000, compact_min_records=10**6)
        acked = [price("pjm", 1, size=500)]
        await journal.append(acked)
        filler = mountpoint / "filler"
        fill_disk(filler)
        seq, error = await append_until_full(journal, acked)
        assert "No space left on device" in str(error)
        assert journal.stats().last_error is not None
        with pytest.raises(DiskError):  # still full: still failing, nothing corrupted
            await journal.append([price("pjm", seq, size=500)])
        filler.unlink()
        for _ in range(3):  # the failed seq is handed out again, as a store rolls back
            await journal.append([price("pjm", seq, size=500)])
            acked.append(price("pjm", seq, size=500))
            seq += 1
        assert journal.stats().last_error is None
        await journal.close()
        again, recovered = reopen(data, history_size=1000)
        await again.close()
        assert recovered.recovered and recovered.torn_bytes == 0
        assert list(recovered.zones["pjm"].prices) == acked


# --- lifecycle ------------------------------------------------------------------------


async def test_close_is_idempotent_and_refuses_later_appends(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path)
    pending = asyncio.ensure_future(journal.append([price("pjm", 1)]))
    await asyncio.sleep(0)
    await journal.close()
    await pending  # close finished it first
    await journal.close()
    with pytest.raises(DiskError, match="closed"):
        await journal.append([price("pjm", 2)])
    stats = journal.stats()
    assert stats.data_dir == str(tmp_path) and stats.fsyncs >= 1 and stats.records == 1
    _, recovered = reopen(tmp_path)
    assert recovered.zones["pjm"].seq == 1
