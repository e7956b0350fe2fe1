"""The journal contract over ``SqliteJournal`` (issue 27), on real files and real child
processes: recovery, epoch/meta/reset, the seq rules, group commit, the trim, the lock,
damage, a torn WAL tail, SIGKILL, a full disk, fsync off, and migrating a data dir
written by today's ``Journal``."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageUnavailable
from pricehub.storage.legacy.journal import Journal
from pricehub.storage.legacy.migrate import LEGACY_DIR
from pricehub.storage.sqlite_journal import (
    DB_NAME,
    DiskError,
    JournalLocked,
    JournalUnavailable,
    Recovered,
    SqliteJournal,
)
from tests.harness import journal_child
from tests.harness.datadir import wal_frame
from tests.storage.test_legacy_journal import ROOT, Child, assert_acked_recovered, price


def reopen(path: Path, **options: Any) -> tuple[SqliteJournal, Recovered]:
    options.setdefault("history_size", 100)
    return SqliteJournal.open(path, **options)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def seqs(recovered: Recovered, zone: str) -> list[int]:
    return [p.seq for p in recovered.zones[zone].prices]


def rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    """What the database holds, read as an operator would (the journal closed)."""
    conn = sqlite3.connect(path / DB_NAME)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


# Small sync helpers: the async tests touch files only through these.
def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as out:
        out.seek(offset)
        out.write(data)


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)


def only(path: Path, pattern: str) -> Path:
    (found,) = path.glob(pattern)
    return found


def flip_in_place(path: Path, needle: bytes) -> None:
    """Flip the first byte of ``needle`` where the database file holds it: a page
    damaged on the medium, behind SQLite's back."""
    data = (path / DB_NAME).read_bytes()
    offset = data.find(needle)
    assert offset > 0 and data.find(needle, offset + 1) < 0
    overwrite(path / DB_NAME, offset, bytes([data[offset] ^ 0x01]))


class SqliteChild(Child):
    """``tests.harness.sqlite_child`` in a subprocess (``Child``'s line reading and kill)."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.sqlite_child", str(directory), mode],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        self.acked = {}


@pytest.fixture
def child_factory() -> Iterator[type[SqliteChild]]:
    started: list[SqliteChild] = []

    class Tracked(SqliteChild):
        def __init__(self, directory: Path, mode: str) -> None:
            super().__init__(directory, mode)
            started.append(self)

    yield Tracked
    for child in started:
        child.close()


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
    # Trimmed in the database itself, not only in what is recovered: whole runs, cut at
    # the end of a block of 16 seqs (48 = 150 - 100, rounded down to one), so at most 15
    # prices beyond the history stay on disk.
    on_disk = "SELECT zone, sum(last - first + 1), min(first) FROM runs GROUP BY zone"
    assert rows(tmp_path, on_disk) == [("miso", 102, 49), ("pjm", 102, 49)]


async def test_the_trim_follows_each_zone_across_restarts_and_reused_seqs(
    tmp_path: Path,
) -> None:
    """Each zone's runs are chained newest to oldest (no index): the chain heads are
    found again at open, a reused seq cuts the chain's head, and the trim keeps every
    zone within its history + 15 on disk without touching another zone."""
    on_disk = "SELECT zone, sum(last - first + 1), min(first) FROM runs GROUP BY zone"
    journal, _ = reopen(tmp_path)
    await journal.append([price("miso", seq) for seq in range(1, 6)])
    for seq in range(1, 121):
        await journal.append([price("pjm", seq)])
    await journal.close()
    journal, _ = reopen(tmp_path)
    for seq in range(121, 201):
        await journal.append([price("pjm", seq)])
    await journal.append([StoredPrice("pjm", 150, b'{"again":150}')])  # 150-200 replaced
    for seq in range(151, 256):
        await journal.append([price("pjm", seq)])
    await journal.close()
    # Cut at 144 (255 - 100, down to a block's end): 145-255 stay, 11 beyond history.
    assert rows(tmp_path, on_disk) == [("miso", 5, 1), ("pjm", 111, 145)]
    _, recovered = reopen(tmp_path)
    assert seqs(recovered, "pjm") == list(range(156, 256))
    assert seqs(recovered, "miso") == [1, 2, 3, 4, 5]


async def test_epoch_meta_and_zone_reset_are_journaled(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, new_epoch="e1")
    assert journal.meta is None
    await journal.append([price("pjm", seq) for seq in (1, 2, 3)])
    await journal.queue_epoch("e2")
    await journal.write_meta({"feed_id": "f1", "peers": True})
    await journal.queue_reset("pjm", [price("pjm", 9), price("pjm", 10)], seq=10)
    await journal.append([price("pjm", 11)])
    assert journal.epoch == "e2" and journal.meta == {"feed_id": "f1", "peers": True}
    await journal.close()

    again, recovered = reopen(tmp_path)
    assert recovered.epoch == "e2" and seqs(recovered, "pjm") == [9, 10, 11]
    assert again.meta == {"feed_id": "f1", "peers": True}
    await again.snapshot()  # a checkpoint keeps them too
    assert again.stats().snapshots == 1 and again.stats().last_snapshot_at is not None
    await again.close()
    _, recovered = reopen(tmp_path)
    assert recovered.epoch == "e2" and seqs(recovered, "pjm") == [9, 10, 11]


async def test_the_seq_rules_of_the_old_journal(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", 1), price("pjm", 2), price("pjm", 3)])
    # A reused seq replaces what it follows (a failed batch's seqs handed out again).
    await journal.append([StoredPrice("pjm", 3, b'{"again":3}'), price("pjm", 4)])
    # A seq further ahead restarts the zone's history at it.
    await journal.append([price("miso", 1), price("miso", 7)])
    await journal.close()
    _, recovered = reopen(tmp_path)
    prices = recovered.zones["pjm"].prices
    assert [p.seq for p in prices] == [1, 2, 3, 4] and prices[2].payload == b'{"again":3}'
    assert seqs(recovered, "miso") == [7] and recovered.zones["miso"].seq == 7


async def test_a_seq_reused_below_a_reset_is_the_zones_seq(tmp_path: Path) -> None:
    """A zone's seq is its last run's, or what a seq rule recorded in ``zones`` when
    that is higher (a reset to a seq without its prices): a reused seq records itself
    there too, or the reset's higher seq would win after a restart."""
    journal, _ = reopen(tmp_path)
    await journal.queue_reset("pjm", [price("pjm", 9), price("pjm", 10)], seq=10)
    await journal.append([price("pjm", 11), price("pjm", 12)])
    await journal.append([StoredPrice("pjm", 5, b'{"again":5}')])
    await journal.queue_reset("miso", [], seq=40)  # a seq and no history
    await journal.close()
    _, recovered = reopen(tmp_path)
    assert recovered.zones["pjm"].seq == 5 and seqs(recovered, "pjm") == [5]
    assert recovered.zones["miso"].seq == 40 and seqs(recovered, "miso") == []


async def test_a_zone_not_served_is_kept_on_disk_but_not_recovered(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", 1), price("gone", 1), price("gone", 2)])
    await journal.close()
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, zones=("pjm",))
    assert set(recovered.zones) == {"pjm"}
    (warning,) = events(logs, "journal_zones_not_served")
    assert warning["zones"] == ["gone"]
    await journal.append([price("gone", 3)])  # numbering goes on where it stopped
    await journal.close()
    _, recovered = reopen(tmp_path)
    assert seqs(recovered, "gone") == [1, 2, 3]


# --- group commit ---------------------------------------------------------------------


async def test_concurrent_appends_share_one_transaction(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, history_size=1000)
    await journal.append([price("pjm", 1)])
    before = journal.stats().fsyncs
    first = asyncio.ensure_future(journal.append([price("pjm", 2)]))
    await asyncio.sleep(0)  # the flusher has taken seq 2 and is committing it
    burst = [journal.append([price("pjm", seq)]) for seq in range(3, 1002)]
    await asyncio.gather(first, *burst)
    stats = journal.stats()
    await journal.close()
    assert stats.fsyncs - before <= 3, stats  # 1000 appends: seq 2 alone, then the rest
    assert stats.writes == stats.fsyncs and stats.records == 1001
    assert stats.fsync_max_seconds >= (stats.fsync_last_seconds or 0) > 0
    _, recovered = reopen(tmp_path, history_size=1000)
    assert seqs(recovered, "pjm") == list(range(2, 1002))


async def test_a_cancelled_caller_does_not_cancel_its_write(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path)
    caller = asyncio.ensure_future(journal.append([price("pjm", 1)]))
    await asyncio.sleep(0)
    caller.cancel()
    await journal.append([price("pjm", 2)])
    await journal.close()
    _, recovered = reopen(tmp_path)
    assert seqs(recovered, "pjm") == [1, 2]


async def test_checkpoints_keep_the_disk_near_history_times_zones(tmp_path: Path) -> None:
    history = 50
    journal, _ = reopen(tmp_path, history_size=history, checkpoint_bytes=64 * 1024)
    peak = 0
    for seq in range(1, 20 * history + 1):
        await journal.append([price("pjm", seq, size=200)])
        peak = max(peak, journal.stats().bytes_on_disk)
    stats = journal.stats()
    await journal.close()
    assert stats.snapshots >= 3 and stats.last_snapshot_at is not None
    # WAL up to its limit (plus one commit) + a database of the history's pages.
    assert peak <= 64 * 1024 + 20 * 4096 + history * 600, peak
    assert not (tmp_path / (DB_NAME + "-wal")).exists()  # a clean close checkpoints it
    _, recovered = reopen(tmp_path, history_size=history)
    assert seqs(recovered, "pjm") == list(range(951, 1001))


async def test_fsync_off_commits_without_fsync_and_recovers_the_same(tmp_path: Path) -> None:
    journal, _ = reopen(tmp_path, fsync=False)
    await asyncio.gather(*(journal.append([price("pjm", seq)]) for seq in range(1, 41)))
    stats = journal.stats()
    await journal.close()
    assert stats.fsyncs == 0 and stats.writes >= 1 and stats.records == 40
    _, recovered = reopen(tmp_path, fsync=False)
    assert seqs(recovered, "pjm") == list(range(1, 41))


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


# --- crashes --------------------------------------------------------------------------


def test_sigkill_while_appending_loses_no_acknowledged_price(
    tmp_path: Path, child_factory: type[SqliteChild]
) -> None:
    for _ in range(2):  # a second life on the first one's recovered state
        child = child_factory(tmp_path, "loop")
        child.wait_for("OPEN")
        child.acks(600)  # checkpoints every 32 KiB of WAL: kills land in them too
        child.kill()
        assert (tmp_path / (DB_NAME + "-wal")).exists()  # SQLite's crash recovery runs
        journal, recovered = reopen(tmp_path, history_size=journal_child.HISTORY_SIZE)
        assert_acked_recovered(child, recovered)
        asyncio.run(journal.close())


async def crash_image(path: Path, transactions: int) -> Path:
    """A data dir as a crash leaves it (the database and its WAL as they are while the
    journal runs: every transaction committed, none checkpointed), beside ``path``'s."""
    journal, _ = reopen(path, new_epoch="e1", checkpoint_bytes=10**9)
    for seq in range(1, transactions + 1):
        await journal.append([price("pjm", seq, size=2000)])  # a page or so each
    image = path / "image"
    image.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        shutil.copyfile(path / name, image / name)
    await journal.close()
    return image


async def test_a_torn_wal_tail_is_ignored(tmp_path: Path) -> None:
    image = await crash_image(tmp_path, 20)
    wal = image / (DB_NAME + "-wal")
    # The transaction in flight: its frames reached the disk, its checksums did not.
    append_bytes(wal, wal_frame(wal, commit=False) + wal_frame(wal, commit=True) + b"\0" * 99)
    again, recovered = reopen(image, new_epoch="e2")
    await again.close()
    assert recovered.recovered and recovered.epoch == "e1"
    assert seqs(recovered, "pjm") == list(range(1, 21))


async def test_damage_inside_the_wal_keeps_what_precedes_it_on_a_new_epoch(
    tmp_path: Path,
) -> None:
    """The one case SQLite itself does not report: a frame damaged on the medium inside
    a WAL not yet checkpointed. SQLite replays up to it and silently drops every later
    (acknowledged) transaction; the journal sees their commit frames and says so."""
    image = await crash_image(tmp_path, 20)
    wal = image / (DB_NAME + "-wal")
    size = wal.stat().st_size
    frame = (size - 32) // 20  # roughly one transaction's frames
    overwrite(wal, 32 + (size - 32) // 2 // frame * frame + 24 + 500, b"\xff")  # mid-WAL
    original = wal.read_bytes()
    with capture_logs() as logs:
        journal, recovered = reopen(image, new_epoch="new")
    await journal.append([price("pjm", recovered.zones["pjm"].seq + 1)])
    await journal.close()
    assert not recovered.recovered and recovered.epoch == "new"
    kept = seqs(recovered, "pjm")
    assert 1 <= len(kept) < 20 and kept == list(range(1, len(kept) + 1))
    assert "damaged pricehub.db-wal" in (recovered.fresh_reason or "")
    (error,) = events(logs, "journal_damaged_starting_new_epoch")
    (aside,) = error["moved_aside"]
    assert aside in (recovered.fresh_reason or "") and (image / aside).read_bytes() == original
    _, again = reopen(image)
    assert again.recovered and again.epoch == "new" and len(seqs(again, "pjm")) == len(kept) + 1


def test_a_full_disk_fails_the_append_then_heals(
    tmp_path: Path, child_factory: type[SqliteChild]
) -> None:
    child = child_factory(tmp_path, "full")
    full = child.wait_for("FULL", timeout=30)
    healed = child.wait_for("HEALED", timeout=30)
    assert child.proc.wait(10) == 0
    assert "journal write in" in full and "failed" in full
    assert healed == "HEALED None"  # last_error cleared by the next good write
    acked = child.acked["pjm"]
    failed = int(full.split()[1])
    assert acked == list(range(1, acked[-1] + 1)) and failed in acked  # the seq reused
    journal, recovered = reopen(tmp_path, history_size=1000)
    asyncio.run(journal.close())
    assert recovered.recovered and seqs(recovered, "pjm") == acked


# --- damage ---------------------------------------------------------------------------


async def write_prices(path: Path, count: int) -> None:
    journal, _ = reopen(path, new_epoch="old")
    await journal.write_meta({"feed_id": "f1"})
    for seq in range(1, count + 1):
        await journal.append([price("pjm", seq, size=300)])
    await journal.close()


def assert_damage_reported(
    path: Path, recovered: Recovered, logs: list[MutableMapping[str, Any]]
) -> None:
    """A new epoch with nothing recovered, said in ``fresh_reason`` and one error, the
    damaged database kept aside."""
    assert not recovered.recovered and recovered.epoch == "new" and recovered.zones == {}
    assert "damaged" in (recovered.fresh_reason or "")
    aside = sorted(p.name for p in path.glob(f"{DB_NAME}.corrupt-*"))
    assert aside and all(name in (recovered.fresh_reason or "") for name in aside)
    (error,) = events(logs, "journal_damaged_starting_new_epoch")
    assert error["log_level"] == "error" and error["moved_aside"] == aside


async def test_a_file_that_is_no_database_is_moved_aside_for_a_new_epoch(
    tmp_path: Path,
) -> None:
    await write_prices(tmp_path, 20)
    original = (tmp_path / DB_NAME).read_bytes()
    overwrite(tmp_path / DB_NAME, 0, b"not SQLite at all")  # over the header
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.append([price("pjm", 1)])  # a new lineage, numbered from 1
    await journal.close()
    assert_damage_reported(tmp_path, recovered, logs)
    kept = only(tmp_path, f"{DB_NAME}.corrupt-*")
    assert kept.read_bytes()[17:] == original[17:]  # never deleted
    _, again = reopen(tmp_path)
    assert again.recovered and again.epoch == "new" and seqs(again, "pjm") == [1]


async def test_a_damaged_page_fails_the_check_at_open_and_the_meta_is_kept(
    tmp_path: Path,
) -> None:
    await write_prices(tmp_path, 100)
    (page_size,) = rows(tmp_path, "PRAGMA page_size")[0]
    (pages,) = rows(tmp_path, "PRAGMA page_count")[0]
    assert pages > 4
    overwrite(tmp_path / DB_NAME, (pages - 1) * page_size + 8, b"\xff" * 64)  # a b-tree page
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path, new_epoch="new")
    await journal.close()
    assert_damage_reported(tmp_path, recovered, logs)
    assert journal.meta == {"feed_id": "f1"}  # the directory's purpose outlives damage


async def test_a_flipped_payload_byte_is_refused_and_never_served(tmp_path: Path) -> None:
    """No SQLite check sees a byte flipped inside a row (main-db pages carry no
    checksum: ``quick_check`` passes); the payload check at open refuses what is no
    longer the JSON object of its seq."""
    await write_prices(tmp_path, 30)
    flip_in_place(tmp_path, b'{"zone":"pjm","seq":12,')  # "{" becomes "z"
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path)
    await journal.close()
    assert recovered.recovered and recovered.zones["pjm"].seq == 30
    assert seqs(recovered, "pjm") == list(range(13, 31))  # what follows it, contiguous
    (warning,) = events(logs, "journal_records_refused")
    assert warning["records"] == ["pjm seq 12: payload is not JSON"]


async def test_a_run_whose_sizes_do_not_match_is_refused(tmp_path: Path) -> None:
    """A row holds a run of one zone's prices (their sizes, then their bytes): one whose
    columns disagree is refused whole, and the history after it is served."""
    journal, _ = reopen(tmp_path)
    await journal.append([price("pjm", seq) for seq in range(1, 33)])  # runs 1-16, 17-32
    await journal.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("UPDATE runs SET payloads = substr(payloads, 2) WHERE first = 1")
    conn.commit()
    conn.close()
    with capture_logs() as logs:
        journal, recovered = reopen(tmp_path)
    await journal.close()
    assert recovered.zones["pjm"].seq == 32 and seqs(recovered, "pjm") == list(range(17, 33))
    (warning,) = events(logs, "journal_records_refused")
    assert warning["records"] == ["pjm run 1-16: sizes do not match its payloads"]


def test_an_unknown_schema_is_a_one_line_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JournalUnavailable, match="schema 99") as refused:
        reopen(tmp_path)
    assert "\n" not in str(refused.value)


# --- the lock and the directory -------------------------------------------------------


async def test_second_holder_is_refused_naming_the_pid(
    tmp_path: Path, child_factory: type[SqliteChild]
) -> None:
    child = child_factory(tmp_path, "hold")
    child.wait_for("LOCKED")
    with pytest.raises(JournalLocked, match=f"pid {child.proc.pid} on ") as refused:
        reopen(tmp_path)
    assert refused.value.pid == child.proc.pid and isinstance(refused.value, StorageUnavailable)
    assert "\n" not in str(refused.value)
    assert child.proc.stdin is not None
    child.proc.stdin.close()
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


# --- migration ------------------------------------------------------------------------


async def write_old_journal(path: Path) -> None:
    """A data dir as today's ``Journal`` leaves it: snapshots and segments, an epoch
    change, a reset, the owner's meta, a zone beyond its history."""
    journal, _ = Journal.open(
        path, history_size=100, new_epoch="old", compact_factor=2.0, compact_min_records=0
    )
    await journal.write_meta({"feed_id": "f1", "mirror_id": "m-a"})
    for seq in range(1, 251):
        await journal.append([price("pjm", seq), price("miso", seq)])
    await journal.queue_epoch("e2")  # the old journal: queue_* only
    await journal.queue_reset("ercot", [price("ercot", 41), price("ercot", 42)], seq=42)
    await journal.append([price("ercot", 43)])
    await journal.close()


def old_recovery(path: Path) -> tuple[Recovered, dict[str, Any] | None]:
    """What today's ``Journal`` recovers from a copy of ``path``."""
    copy = path.parent / "copy"
    shutil.copytree(path, copy)
    journal, recovered = Journal.open(copy, history_size=100)
    meta = journal.meta
    asyncio.run(journal.close())
    return recovered, meta


def test_a_data_dir_of_the_old_journal_is_migrated_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    asyncio.run(write_old_journal(data))
    old_names = sorted(p.name for p in data.iterdir() if p.name != "LOCK")
    assert any(n.startswith("snap-") for n in old_names) and "meta.json" in old_names
    expected, expected_meta = old_recovery(data)
    with capture_logs() as logs:
        journal, recovered = reopen(data, new_epoch="unused")
    assert recovered == expected and recovered.epoch == "e2" and recovered.recovered
    assert journal.meta == expected_meta == {"feed_id": "f1", "mirror_id": "m-a"}
    (line,) = events(logs, "journal_migrated_to_sqlite")
    assert line["zones"] == 3 and line["prices"] == 203 and line["epoch"] == "e2"
    # Nothing lost: every old file is in legacy-journal/, none left beside the database.
    moved = sorted(p.name for p in (data / LEGACY_DIR).iterdir())
    assert set(old_names) <= set(moved)
    assert not list(data.glob("wal-*")) and not list(data.glob("snap-*"))
    assert not (data / "meta.json").exists()

    async def go_on() -> None:
        await journal.append([price("pjm", 251)])
        await journal.close()

    asyncio.run(go_on())
    with capture_logs() as logs:
        again, recovered = reopen(data)
    asyncio.run(again.close())
    assert not events(logs, "journal_migrated_to_sqlite")  # once
    assert recovered.epoch == "e2" and seqs(recovered, "pjm") == list(range(152, 252))
    assert seqs(recovered, "ercot") == [41, 42, 43]


def test_a_migration_cut_short_is_finished_on_the_next_start(tmp_path: Path) -> None:
    """A crash before the new database was renamed into place leaves a half-built
    temporary one: never taken for the real one, the migration runs again. A crash
    after the rename but before the old files moved: the database wins, they move."""
    data = tmp_path / "data"
    asyncio.run(write_old_journal(data))
    saved = tmp_path / "saved"
    shutil.copytree(data, saved)
    (data / (DB_NAME + ".migrating")).write_bytes(b"half")
    journal, recovered = reopen(data)
    asyncio.run(journal.close())
    assert recovered.epoch == "e2" and not (data / (DB_NAME + ".migrating")).exists()
    for name in os.listdir(saved):  # the old files back beside the database
        if name != "LOCK":
            shutil.copyfile(saved / name, data / name)
    with capture_logs() as logs:
        journal, again = reopen(data)
    asyncio.run(journal.close())
    assert again == recovered
    assert events(logs, "journal_legacy_files_moved")
    assert not events(logs, "journal_migrated_to_sqlite")
    assert not list(data.glob("wal-*")) and not list(data.glob("snap-*"))
