"""The durable embedded default (PROTOCOL.md, "Durable in-memory storage"), end to end:
real ``run_server.py`` processes on a real ``--data-dir`` (the SQLite journal, and a data
dir of the old journal migrated), killed with SIGKILL at random points of bursts or
stopped with SIGTERM, then restarted
and resumed over real WebSockets; the lock, an unusable directory and a full disk (a
small tmpfs); plus ``DurableStorage`` in process for what needs a closer look."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from pricehub.server.app import create_app
from pricehub.storage import MemoryStorage, StoredPrice, create_storage
from pricehub.storage.durable import DurableStorage, disk_status
from pricehub.storage.errors import DiskError
from pricehub.storage.legacy.journal import Journal as LegacyJournal
from pricehub.storage.legacy.migrate import LEGACY_DIR
from pricehub.storage.sqlite_journal import DB_NAME, SqliteJournal
from pricehub.wire import paths
from tests.harness.datadir import wal_frame
from tests.harness.serverproc import REPO, ServerProcess, free_port
from tests.harness.support import (
    PUBLISH_KEY,
    WAIT,
    MakeClient,
    eventually,
    make_settings,
    missing_tool,
    receive_json,
)

ZONES = ("pjm", "caiso", "ercot")
HEADERS = {"Authorization": f"Bearer {PUBLISH_KEY}"}
# Publishers hammer the server far over the default 200 requests/s per key.
COMMON = ("--no-simulate", "--zones", ",".join(ZONES), "--publish-rate-limit", "1000000",
          "--log-format", "json")  # fmt: skip


def durable_server(data_dir: Path, *args: str, **options: Any) -> ServerProcess:
    return ServerProcess(*COMMON, *args, publish_key=PUBLISH_KEY, data_dir=data_dir, **options)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# --- talking to a server ----------------------------------------------------------------


@dataclass
class Acked:
    """What the server acknowledged (202), per zone: seq -> price."""

    prices: dict[str, dict[int, float]] = field(default_factory=dict)

    def add(self, zone: str, seq: int, price: float) -> None:
        zone_prices = self.prices.setdefault(zone, {})
        assert seq not in zone_prices, f"{zone} seq {seq} acknowledged twice"
        zone_prices[seq] = price

    def count(self) -> int:
        return sum(map(len, self.prices.values()))


_unique = itertools.count(1)


async def hammer(session: aiohttp.ClientSession, url: str, acked: Acked, zones: tuple[str, ...]
                 ) -> None:  # fmt: skip
    """Publish single prices with unique values until the server goes away."""
    rng = random.Random()
    while True:
        zone, price = rng.choice(zones), float(next(_unique))
        try:
            async with session.post(
                url + paths.BROADCAST_PRICE, json={"market_zone": zone, "price": price},
                headers=HEADERS,
            ) as response:  # fmt: skip
                if response.status != 202:
                    return
                (entry,) = (await response.json())["accepted"]
        except (TimeoutError, aiohttp.ClientError):
            return
        acked.add(zone, entry["seq"], price)


@contextlib.asynccontextmanager
async def publishers(server: ServerProcess, acked: Acked, *, count: int = 20,
                     zones: tuple[str, ...] = ZONES) -> AsyncIterator[None]:  # fmt: skip
    """``count`` concurrent publishers for the duration of the block (the block kills
    the server; they stop on their own then)."""
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(hammer(session, server.url, acked, zones))
                 for _ in range(count)]  # fmt: skip
        try:
            yield
        finally:
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*tasks)


async def get_json(server: ServerProcess, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(server.url + path) as response:
        return await response.json()


async def history(server: ServerProcess, zone: str) -> list[dict[str, Any]]:
    body = await get_json(server, paths.history(zone) + "?limit=100000")
    data: list[dict[str, Any]] = body["data"]
    return data


async def epoch_of(server: ServerProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.ws_url + paths.ws_market("pjm")) as ws,
    ):
        hello = await receive_json(ws)
        epoch: str = hello["epoch"]
        return epoch


async def resume(server: ServerProcess, zone: str, *, since: int, epoch: str
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Connect with ``since``/``epoch``: the replayed updates and ``resume_complete``."""
    url = f"{server.ws_url}{paths.ws_market(zone)}?since={since}&epoch={epoch}"
    replayed: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        assert (await receive_json(ws))["type"] == "connection_established"
        while True:
            message = await receive_json(ws)
            if message["type"] == "resume_complete":
                # A gap from a resume always comes with recovered: false (the contract).
                assert not gaps or message["recovered"] is False, (gaps, message)
                return replayed, message
            if message["type"] == "gap":
                gaps.append(message)
                continue
            assert message["type"] == "price_update" and message.get("replay"), message
            replayed.append(message)


async def assert_everything_acked_is_back(
    server: ServerProcess, acked: Acked, *, zones: tuple[str, ...] = ZONES
) -> dict[str, int]:
    """Each zone's retained history is contiguous (no gap, no duplicate, in order) and
    holds every acknowledged price it still retains with its seq; the last seq of each."""
    last = {}
    for zone in zones:
        data = await history(server, zone)
        seqs = [entry["seq"] for entry in data]
        expected = acked.prices.get(zone, {})
        if not seqs:
            assert not expected, zone
            last[zone] = 0
            continue
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{zone}: not contiguous"
        by_seq = {entry["seq"]: entry["price"] for entry in data}
        for seq, price in expected.items():
            if seq >= seqs[0]:
                assert by_seq.get(seq) == price, f"{zone} seq {seq}: acked {price}"
        assert max(expected, default=0) <= seqs[-1], f"{zone}: acknowledged seqs missing"
        last[zone] = seqs[-1]
    return last


async def assert_resumes(server: ServerProcess, epoch: str, since: dict[str, int],
                         last: dict[str, int]) -> None:  # fmt: skip
    """A client that last saw ``since`` gets exactly the rest, with ``recovered: true``."""
    for zone, seq in since.items():
        replayed, complete = await resume(server, zone, since=seq, epoch=epoch)
        assert complete["recovered"] is True, (zone, complete)
        assert [m["seq"] for m in replayed] == list(range(seq + 1, last[zone] + 1)), zone


# --- crashes ------------------------------------------------------------------------------


async def test_sigkill_at_random_points_of_bursts_loses_no_acknowledged_price(
    data_dir: Path,
) -> None:
    rng = random.Random()
    acked = Acked()
    with durable_server(data_dir) as server:
        epoch = await epoch_of(server)
        last = dict.fromkeys(ZONES, 0)
        for _ in range(4):
            async with publishers(server, acked):
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                before = acked.count()

                def more(before: int = before) -> bool:
                    return acked.count() > before

                await eventually(more)  # the kill lands mid-burst
                server.kill()
            await server.start_async()
            assert await epoch_of(server) == epoch
            previous, last = last, await assert_everything_acked_is_back(server, acked)
            await assert_resumes(server, epoch, previous, last)
        # Numbering goes on after the last seq on disk: nothing is handed out twice.
        accepted = await server.publish({"market_zone": "pjm", "price": -1.0})
        assert accepted == [{"market_zone": "pjm", "seq": last["pjm"] + 1}]
    assert acked.count() > 0


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_keeps_epoch_history_and_numbering_for_a_resuming_client(
    data_dir: Path, how: str
) -> None:
    with durable_server(data_dir) as server:
        await server.publish(*({"market_zone": "pjm", "price": p} for p in (1.0, 2.0, 3.0)))
        url = server.ws_url + paths.ws_market("pjm")
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            hello = await receive_json(ws)
            epoch = hello["epoch"]
            initial = await receive_json(ws)
            assert (initial["type"], initial["latest_price"]["seq"]) == ("initial_data", 3)
            if how == "sigterm":
                assert await server.stop_async() == 0
                closing = await ws.receive(timeout=WAIT)
                assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
            else:
                server.kill()
        await server.start_async()
        accepted = await server.publish(
            {"market_zone": "pjm", "price": 4.0}, {"market_zone": "pjm", "price": 5.0}
        )
        assert [entry["seq"] for entry in accepted] == [4, 5]  # no gap, no reused seq
        replayed, complete = await resume(server, "pjm", since=3, epoch=epoch)
        assert complete["recovered"] is True
        assert [(m["seq"], m["price"]) for m in replayed] == [(4, 4.0), (5, 5.0)]
        replayed, complete = await resume(server, "pjm", since=1, epoch=epoch)
        assert complete["recovered"] is True
        assert [(m["seq"], m["price"]) for m in replayed] == [
            (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)
        ]  # fmt: skip


async def test_simulator_ticks_survive_a_restart(data_dir: Path) -> None:
    server = ServerProcess(
        "--simulate", "--simulate-interval", "0.05", "--zones", "pjm,caiso", data_dir=data_dir
    )
    with server:

        async def ticked() -> bool:
            return len(await history(server, "pjm")) >= 5

        await eventually(ticked)
        before = await history(server, "pjm")
        epoch = await epoch_of(server)
        server.kill()
        server.command.append("--no-simulate")  # flag given last wins: nothing new comes
        await server.start_async()
        after = await history(server, "pjm")
        assert after[: len(before)] == before and await epoch_of(server) == epoch
        replayed, complete = await resume(server, "pjm", since=before[1]["seq"], epoch=epoch)
        assert complete["recovered"] is True
        pairs = [(m["seq"], m["price"]) for m in replayed]
        assert pairs[: len(before) - 2] == [(p["seq"], p["price"]) for p in before[2:]]


# --- damage (the SQLite journal's own cases are in test_sqlite_journal) --------------------


def database(directory: Path) -> Path:
    return directory / DB_NAME


def moved_aside(directory: Path, name: str) -> list[Path]:
    return list(directory.glob(f"{name}.corrupt-*"))


def append_torn_transaction(directory: Path) -> None:
    """What a SIGKILL (or power cut) mid-commit leaves at the end of the WAL: frames of
    the transaction in flight whose checksums fail."""
    wal = directory / (DB_NAME + "-wal")
    with open(wal, "ab") as out:
        out.write(wal_frame(wal, commit=False) + wal_frame(wal, commit=True) + b"\0" * 99)


def overwrite_header(path: Path) -> None:
    with open(path, "r+b") as out:
        out.write(b"not SQLite at all")


async def test_a_torn_wal_tail_is_ignored_and_everything_acknowledged_stays(
    data_dir: Path,
) -> None:
    with durable_server(data_dir) as server:
        accepted = await server.publish(*({"market_zone": "pjm", "price": p} for p in (1.0, 2.0)))
        epoch = await epoch_of(server)
        server.kill()  # the WAL is not checkpointed: SQLite's recovery replays it
        await asyncio.to_thread(append_torn_transaction, data_dir)
        await server.start_async()
        assert await epoch_of(server) == epoch
        assert await pjm_history(server) == [
            (entry["seq"], price) for entry, price in zip(accepted, (1.0, 2.0), strict=True)
        ]
        durability = (await get_json(server, paths.STATS))["durability"]
        assert durability["recovered"] is True, durability["fresh_reason"]
        _, complete = await resume(server, "pjm", since=1, epoch=epoch)
        assert complete["recovered"] is True


async def test_a_damaged_database_is_moved_aside_and_a_new_epoch_starts(data_dir: Path) -> None:
    with durable_server(data_dir) as server:
        for price in (1.0, 2.0, 3.0):
            await server.publish({"market_zone": "pjm", "price": price})
        epoch = await epoch_of(server)
        assert await server.stop_async() == 0  # checkpointed and closed: all in the file
        await asyncio.to_thread(overwrite_header, database(data_dir))
        await server.start_async()
        assert await epoch_of(server) != epoch
        durability = (await get_json(server, paths.STATS))["durability"]
        assert durability["recovered"] is False and DB_NAME in durability["fresh_reason"]
        assert moved_aside(data_dir, DB_NAME)  # kept, not deleted
        assert '"journal_damaged_starting_new_epoch"' in server.log()
        _, complete = await resume(server, "pjm", since=2, epoch=epoch)
        assert complete["recovered"] is False  # told, not silently mixed
        accepted = await server.publish({"market_zone": "pjm", "price": 9.0})
        assert accepted[0]["seq"] == 1


async def publish_prices(server: ServerProcess, prices: range, per_request: int = 10
                         ) -> list[tuple[int, float]]:  # fmt: skip
    """Publish ``prices`` to pjm, ``per_request`` in each request (one journal write each);
    the (seq, price) acknowledged."""
    acked = []
    values = [float(p) for p in prices]
    for start in range(0, len(values), per_request):
        chunk = values[start : start + per_request]
        accepted = await server.publish(*({"market_zone": "pjm", "price": p} for p in chunk))
        acked += [(entry["seq"], p) for entry, p in zip(accepted, chunk, strict=True)]
    return acked


async def pjm_history(server: ServerProcess) -> list[tuple[int, float]]:
    return [(p["seq"], p["price"]) for p in await history(server, "pjm")]


async def resume_outcome(server: ServerProcess, *, since: int, epoch: str) -> dict[str, Any]:
    """pjm's ``resume_complete`` for a client that last saw ``since`` of ``epoch`` (a
    client that cannot be resumed gets ``initial_data`` before it)."""
    url = f"{server.ws_url}{paths.ws_market('pjm')}?since={since}&epoch={epoch}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        while (message := await receive_json(ws))["type"] != "resume_complete":
            assert message["type"] in ("connection_established", "gap", "initial_data"), message
        return message


# --- a data dir of the old journal ----------------------------------------------------------


def stored(zone: str, seq: int, price: float) -> StoredPrice:
    entry = {"market_zone": zone, "price": price, "timestamp": "2026-12-01T00:00:00Z"}
    return StoredPrice(zone, seq, with_seq_of(entry, seq))


def tear_newest_segment(directory: Path) -> None:
    with open(max(directory.glob("wal-*.log")), "ab") as out:
        out.write(b"\x13\x00\x00\x00half a record")


def old_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """The old journal's segments beside the database, and those in ``legacy-journal/``."""
    return list(directory.glob("wal-*.log")), list((directory / LEGACY_DIR).glob("wal-*.log"))


async def write_old_data_dir(directory: Path, prices: int) -> None:
    """A data dir as pricehub wrote it before issue 27 (the old journal, its own code),
    left as a SIGKILL mid-write leaves it: a torn tail after the last acknowledged write."""
    journal, _ = LegacyJournal.open(directory, history_size=100, new_epoch="oldepoch")
    for seq in range(1, prices + 1):
        await journal.append([stored("pjm", seq, float(seq))])
    await journal.close()
    await asyncio.to_thread(tear_newest_segment, directory)


async def test_a_data_dir_of_the_old_journal_is_migrated_at_start_and_resumes(
    data_dir: Path,
) -> None:
    await write_old_data_dir(data_dir, 30)
    with durable_server(data_dir) as server:
        assert await epoch_of(server) == "oldepoch"  # the lineage goes on: clients resume
        assert await pjm_history(server) == [(seq, float(seq)) for seq in range(1, 31)]
        _, complete = await resume(server, "pjm", since=25, epoch="oldepoch")
        assert complete["recovered"] is True
        log = server.log()
        assert '"journal_torn_tail"' in log and '"journal_migrated_to_sqlite"' in log
        assert (await server.publish({"market_zone": "pjm", "price": -1.0}))[0]["seq"] == 31
        beside, moved = await asyncio.to_thread(old_files, data_dir)
        assert not beside and moved  # moved, never deleted
        server.kill()
        await server.start_async()  # once: the database is the journal now
        assert (await pjm_history(server))[-1] == (31, -1.0)
        assert server.log().count('"journal_migrated_to_sqlite"') == 1


STRAYS = ("wal-3.log", "wal-²³.log", "snap-٣.snap", "wal-000000000099.log",
          "snap-000000000098.snap", "pricehub.db.bak", "notes.txt")  # fmt: skip


def add_strays(directory: Path) -> dict[str, bytes | None]:
    """Names that look like the old journal's or the database's and are not: a short
    number, digits that are not ASCII, a directory named like a segment, an empty
    snapshot, an operator's copy and notes. What each holds."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STRAYS[0]).write_bytes(b"PHJLOG1\nan operator's")
    (directory / STRAYS[1]).write_bytes(b"PHJLOG1\n")
    (directory / STRAYS[2]).write_bytes(b"PHJSNP1\n")
    (directory / STRAYS[3]).mkdir()
    (directory / STRAYS[4]).write_bytes(b"")
    (directory / STRAYS[5]).write_bytes(b"a copy")
    (directory / STRAYS[6]).write_text("why this box")
    return strays_of(directory)


def strays_of(directory: Path) -> dict[str, bytes | None]:
    """What each stray present holds (None: a directory)."""
    paths = [directory / name for name in STRAYS if (directory / name).exists()]
    return {path.name: None if path.is_dir() else path.read_bytes() for path in paths}


async def test_stray_names_in_the_data_dir_are_left_alone(data_dir: Path) -> None:
    strays = await asyncio.to_thread(add_strays, data_dir)  # a fresh dir: no old journal
    with durable_server(data_dir, "--history-size", "20") as server:
        acked = await publish_prices(server, range(305))  # the trim on the way
        assert await asyncio.to_thread(strays_of, data_dir) == strays
        assert not moved_aside(data_dir, "*") and not (data_dir / LEGACY_DIR).exists()
        assert '"journal_migrated_to_sqlite"' not in server.log()
        server.kill()
        await server.start_async()
        assert await pjm_history(server) == acked[-20:]
        assert await asyncio.to_thread(strays_of, data_dir) == strays


def with_seq_of(entry: dict[str, Any], seq: int) -> bytes:
    """A stored payload as the server writes it (``seq`` first, ``timestamp`` last)."""
    return orjson.dumps({**entry, "seq": seq})


# --- start errors -------------------------------------------------------------------------


def run_second(data_dir: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_server.py", "--port", str(free_port()), "--redis-url", "none",
         "--no-simulate", "--log-format", "json", "--data-dir", str(data_dir), *args],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT * 2, check=False,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    """What the server printed that is not a JSON log line."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


def test_a_second_process_on_the_data_dir_exits_2_naming_the_holder(data_dir: Path) -> None:
    with durable_server(data_dir) as holder:
        assert holder.process is not None
        second = run_second(data_dir)
        assert second.returncode == 2, second.stderr
        (line,) = error_lines(second.stderr)
        assert f"data dir {data_dir} is in use by another process (pid {holder.process.pid}" in line
        assert "Traceback" not in second.stderr


def test_an_unusable_data_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    result = run_second(tmp_path / "file" / "data")
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"pricehub: data dir {tmp_path / 'file' / 'data'} cannot be used")


def test_a_symlinked_lock_exits_2_and_leaves_its_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"an operator's file\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "LOCK").symlink_to(target)
    result = run_second(tmp_path / "data")
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "LOCK is a symbolic link" in line and "Traceback" not in result.stderr
    assert target.read_bytes() == b"an operator's file\n"


@contextlib.contextmanager
def tmpfs(mountpoint: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs (mounting needs root; a missing capability fails under CI)."""
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mountpoint)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        missing_tool(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_read_only_data_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=64k") as mountpoint:
        result = run_second(mountpoint)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert str(mountpoint) in line and "Read-only file system" in line


# --- a full disk --------------------------------------------------------------------------


def fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as out:
        while True:
            out.write(b"x" * 4096)


async def publish_status(session: aiohttp.ClientSession, server: ServerProcess, price: float
                         ) -> tuple[int, Any, str | None]:  # fmt: skip
    """Status, JSON body and Retry-After of one publish."""
    async with session.post(
        server.url + paths.BROADCAST_PRICE, json={"market_zone": "pjm", "price": price},
        headers=HEADERS,
    ) as response:  # fmt: skip
        return response.status, await response.json(), response.headers.get("Retry-After")


async def test_disk_full_answers_503_broadcasts_nothing_and_heals(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "small", "size=256k") as mountpoint,
        durable_server(mountpoint / "data") as server,
        contextlib.ExitStack() as cleanup,
    ):
        filler = mountpoint / "filler"
        cleanup.callback(filler.unlink, missing_ok=True)
        acked = [entry["seq"] for entry in await server.publish(
            *({"market_zone": "pjm", "price": float(p)} for p in range(3))
        )]  # fmt: skip
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(server.ws_url + paths.ws_market("pjm")) as ws,
        ):
            await receive_json(ws)  # connection_established
            await receive_json(ws)  # initial_data
            await asyncio.to_thread(fill, filler)
            for attempt in range(100):  # the segment's last page may take a few more
                status, body, retry_after = await publish_status(session, server, 100.0 + attempt)
                if status != 202:
                    break
                acked.append(body["accepted"][0]["seq"])
                assert (await receive_json(ws))["seq"] == acked[-1]
            assert status == 503, body
            assert body["error"] == "storage_unavailable" and "disk is full" in body["message"]
            assert retry_after == "1"
            health = await get_json(server, paths.HEALTH)
            assert health["status"] == "degraded"
            assert health["checks"]["disk"].startswith("unavailable: ")
            assert (await get_json(server, paths.STATS))["durability"]["write_errors"] >= 1

            filler.unlink()  # space is back: the next publish heals by itself
            status, body, _ = await publish_status(session, server, 999.0)
            assert status == 202, body
            assert body["accepted"][0]["seq"] == acked[-1] + 1  # the failed seq, reused
            live = await receive_json(ws)  # nothing of the failed publish was broadcast
            assert (live["seq"], live["price"]) == (acked[-1] + 1, 999.0)
            acked.append(live["seq"])
        health = await get_json(server, paths.HEALTH)
        assert health["checks"]["disk"] == "ok" and health["status"] == "healthy"
        server.kill()
        await server.start_async()
        assert [p["seq"] for p in await history(server, "pjm")] == acked
        assert (await history(server, "pjm"))[-1]["price"] == 999.0


# --- in process ---------------------------------------------------------------------------


class Listener:
    def __init__(self) -> None:
        self.prices: list[StoredPrice] = []

    def on_price(self, price: StoredPrice) -> None:
        self.prices.append(price)

    def on_backend_changed(self, backend: str) -> None:
        return None

    def on_epoch_changed(self, epoch: str) -> None:
        return None


def body(price: float) -> bytes:
    return orjson.dumps({"market_zone": "pjm", "price": price, "timestamp": "t"})


async def open_durable(directory: Path, **options: Any) -> tuple[DurableStorage, Listener]:
    storage, listener = DurableStorage(directory, **options), Listener()
    await storage.start(listener)
    return storage, listener


async def test_concurrent_appends_share_fsyncs_and_keep_seq_order(tmp_path: Path) -> None:
    storage, listener = await open_durable(tmp_path)
    stored = await asyncio.gather(*(storage.append("pjm", body(i)) for i in range(200)))
    many = await storage.append_many([("pjm", body(200)), ("caiso", body(1)), ("pjm", body(201))])
    assert [p.seq for p in stored] == list(range(1, 201))
    assert [(p.zone, p.seq) for p in many] == [("pjm", 201), ("caiso", 1), ("pjm", 202)]
    assert listener.prices == [*stored, *many]  # broadcast in seq order, once each
    journal = disk_status(storage).journal
    assert journal is not None
    assert journal.fsyncs < 20, journal.fsyncs
    await storage.close()
    again, _ = await open_durable(tmp_path)
    assert await again.history("pjm", limit=1000) == [*stored, many[0], many[2]]
    assert again.epoch == storage.epoch and again.recovered and again.recovered.recovered
    await again.close()


async def test_a_cancelled_caller_does_not_cancel_its_price(tmp_path: Path) -> None:
    storage, listener = await open_durable(tmp_path)
    first = asyncio.ensure_future(storage.append("pjm", body(1)))
    second = asyncio.ensure_future(storage.append("pjm", body(2)))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert (await second).seq == 2
    assert [p.seq for p in listener.prices] == [1, 2]
    await storage.close()
    _, recovered = await asyncio.to_thread(SqliteJournal.open, tmp_path, history_size=10)
    assert [p.seq for p in recovered.zones["pjm"].prices] == [1, 2]


async def test_a_failed_batch_fails_every_caller_in_it_and_leaves_no_gap(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=128k") as mountpoint:
        storage, listener = await open_durable(mountpoint / "data")
        await storage.append("pjm", body(0))
        filler = mountpoint / "filler"
        await asyncio.to_thread(fill, filler)
        try:
            for attempt in range(200):
                results = await asyncio.gather(
                    *(storage.append("pjm", body(attempt + i / 10)) for i in range(10)),
                    return_exceptions=True,
                )
                failed = [result for result in results if isinstance(result, DiskError)]
                if failed:
                    assert len(failed) == 10  # one batch: all or nothing
                    break
            else:
                raise AssertionError("the disk never filled up")
            stored_seq = listener.prices[-1].seq
            assert await storage.latest("pjm") == listener.prices[-1]  # nothing half-stored
            assert disk_status(storage).check.startswith("unavailable: ")
        finally:
            filler.unlink()
        healed = await asyncio.gather(*(storage.append("pjm", body(-i)) for i in range(5)))
        assert [p.seq for p in healed] == list(range(stored_seq + 1, stored_seq + 6))
        assert disk_status(storage).check == "ok" and storage.write_errors >= 1
        assert [p.seq for p in listener.prices] == list(range(1, stored_seq + 6))
        await storage.close()


async def test_data_dir_none_keeps_nothing_and_health_says_disabled(
    make_client: MakeClient,
) -> None:
    settings = make_settings(data_dir=None)
    storage = create_storage(settings.storage_config(), log=structlog.get_logger())
    assert isinstance(storage, MemoryStorage)
    client = await make_client()
    health = await (await client.get(paths.HEALTH)).json()
    assert health["checks"]["disk"] == "disabled" and health["durability"] == {"status": "disabled"}
    metrics = await (await client.get(paths.METRICS)).text()
    assert not re.search(r"^pricehub_journal_", metrics, re.M)  # no samples, only HELP


async def test_stats_health_and_metrics_describe_the_journal(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(data_dir=str(tmp_path / "data"))
    response = await client.post(
        paths.BROADCAST_PRICE, json={"market_zone": "pjm", "price": 1.0}, headers=HEADERS
    )
    assert response.status == 202
    stats = await (await client.get(paths.STATS)).json()
    durability = stats["durability"]
    assert durability["status"] == "ok" and durability["data_dir"] == str(tmp_path / "data")
    assert durability["bytes_on_disk"] > 0 and durability["fsyncs"] >= 1
    assert durability["fsync_last_ms"] is not None and durability["recovered"] is False
    health = await (await client.get(paths.HEALTH)).json()
    assert health["checks"]["disk"] == "ok" and health["status"] == "healthy"
    metrics = await (await client.get(paths.METRICS)).text()
    assert f'pricehub_journal_info{{data_dir="{tmp_path / "data"}"}} 1.0' in metrics
    for name in ("bytes", "fsync_last_seconds", "fsync_max_seconds", "fsyncs_total",
                 "available", "write_errors_total"):  # fmt: skip
        assert re.search(rf"^pricehub_journal_{name} [0-9.e-]+$", metrics, re.M), name


async def test_create_app_does_not_touch_the_disk_before_start(tmp_path: Path) -> None:
    create_app(make_settings(data_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()
