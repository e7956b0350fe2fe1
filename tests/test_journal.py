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

from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageUnavailable
from pricehub.storage.journal import (
    DiskError,
    Journal,
    JournalLocked,
    JournalUnavailable,
    Recovered,
)
from tests import journal_child

ROOT = Path(__file__).resolve().parent.parent


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
    """``tests.journal_child`` in a subprocess, read line by line with deadlines."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.journal_child", str(directory), mode],
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
    await journal.set_epoch("e2")
    await journal.reset_zone("pjm", [price("pjm", 9), price("pjm", 10)], seq=10)
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


def assert_moved_aside_fresh(
    path: Path, recovered: Recovered, logs: list[MutableMapping[str, Any]]
) -> None:
    assert not recovered.recovered and recovered.epoch == "new" and recovered.zones == {}
    assert "damaged" in (recovered.fresh_reason or "")
    aside = sorted(p.name for p in path.glob("*.corrupt-*"))
    assert aside and all(name in (recovered.fresh_reason or "") for name in aside)
    errors = [e for e in logs if e["event"] == "journal_damaged_starting_new_epoch"]
    assert errors and errors[0]["log_level"] == "error"


async def test_damage_in_the_middle_is_moved_aside_and_a_new_epoch_starts(
    tmp_path: Path,
) -> None:
    await write_prices(tmp_path, 50)
    damaged = segments(tmp_path)[-1]
    original = damaged.read_bytes()
    flip_byte(damaged, len(original) // 3)
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.append([price("pjm", 1)])
    await journal.close()
    assert_moved_aside_fresh(tmp_path, recovered, logs)
    kept = files(tmp_path, damaged.name + ".corrupt-*")
    assert len(kept) == 1 and len(kept[0].read_bytes()) == len(original)  # never deleted
    _, recovered = reopen(tmp_path)  # the new lineage is durable
    assert recovered.epoch == "new" and recovered.zones["pjm"].seq == 1


async def test_damaged_snapshot_is_moved_aside_and_a_new_epoch_starts(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, new_epoch="old")
    await journal.append([price("pjm", seq) for seq in range(1, 30)])
    await journal.snapshot()
    await journal.close()
    (snapshot,) = files(tmp_path, "snap-*.snap")
    flip_byte(snapshot, snapshot.stat().st_size // 2)
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.close()
    assert_moved_aside_fresh(tmp_path, recovered, logs)
    assert files(tmp_path, snapshot.name + ".corrupt-*")


async def test_unreadable_segment_is_moved_aside(tmp_path: Path) -> None:
    await write_prices(tmp_path, 3)
    make_unreadable(segments(tmp_path)[-1])
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.close()
    assert_moved_aside_fresh(tmp_path, recovered, logs)
    assert "unreadable" in (recovered.fresh_reason or "")


def make_unreadable(path: Path) -> None:
    """Root reads through any mode bits: a directory in the file's place cannot be read."""
    path.rename(path.with_name(path.name + ".orig"))
    path.mkdir()


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
