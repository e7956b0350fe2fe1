"""``pricehub tail`` as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest

from pricehub.client.client import Gap, PriceUpdate, Status
from pricehub.client.tail import TableView
from tests.harness.serverproc import REPO, ServerProcess, free_port, many_zones_config
from tests.harness.support import PUBLISH_KEY

WAIT = 10.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Tail:
    """A running ``python -m pricehub tail`` with bounded reads of its output."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr_lines: list[str] = []

    async def stdout_line(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(WAIT):
            return (await self.process.stdout.readline()).decode()

    async def stderr_until(self, text: str) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(WAIT):
            while not any(text in line for line in self.stderr_lines):
                line = (await self.process.stderr.readline()).decode()
                assert line, f"tail exited before printing {text!r}: {self.stderr_lines}"
                self.stderr_lines.append(line)

    async def stdout_until(self, *texts: str) -> str:
        """Read stdout until every text appears in one frame; returns that frame."""
        assert self.process.stdout is not None
        buffer = ""
        async with asyncio.timeout(WAIT):
            while True:
                chunk = (await self.process.stdout.read(4096)).decode()
                assert chunk, f"tail exited; output so far: {buffer!r}"
                buffer += chunk
                frames = ANSI.sub("", buffer).split("pricehub tail ")
                for frame in frames:
                    if all(text in frame for text in texts):
                        return frame

    async def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            return await self.process.wait()


StartTail = Callable[..., Awaitable[Tail]]


def sigint_as_in_a_terminal() -> None:
    """Run in the child before exec: SIGINT back to its default, as an interactive shell
    gives it to a command. A suite started as a background job (``pytest ... &`` in a
    script) inherits SIGINT *ignored*; that survives exec, Python then installs no
    KeyboardInterrupt handler, and tail would sit out ``interrupt`` (the user's Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
async def run_tail() -> AsyncIterator[StartTail]:
    """Starts ``python -m pricehub tail ARGS``; kills what is still running at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Tail:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pricehub", "tail", *args,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})}, preexec_fn=sigint_as_in_a_terminal,
        )  # fmt: skip
        started.append(process)
        return Tail(process)

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_json_mode_prints_one_price_object_per_line(
    server: ServerProcess, run_tail: StartTail
) -> None:
    tail = await run_tail("--json", "--server", server.url, "pjm")
    await tail.stderr_until("pricehub tail: connected")
    prices = [40.0, 41.5, -3.25, 0.0, 99.99]
    await server.publish(*({"market_zone": "pjm", "price": p, "volume": 7} for p in prices))
    lines = [json.loads(await tail.stdout_line()) for _ in prices]
    assert await tail.interrupt() == 0

    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["price"] for line in lines] == prices
    for line in lines:
        assert line["market_zone"] == "pjm"
        assert line["volume"] == 7
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["accepted_at"])
        assert set(line) == {"market_zone", "price", "volume", "seq", "timestamp", "accepted_at"}


async def test_ctrl_c_stops_tail_even_when_the_suite_ignores_sigint(
    server: ServerProcess, run_tail: StartTail
) -> None:
    # What a background job gets (``pytest ... &`` in a script): SIGINT ignored, and
    # inherited by every child the suite starts unless it says otherwise.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tail = await run_tail("--json", "--server", server.url, "pjm")
    finally:
        signal.signal(signal.SIGINT, previous)
    await tail.stderr_until("pricehub tail: connected")
    assert await tail.interrupt() == 0


async def test_table_mode_renders_a_frame(server: ServerProcess, run_tail: StartTail) -> None:
    await server.publish({"market_zone": "ercot", "price": 41.5, "volume": 3})
    tail = await run_tail("--server", server.url, "--refresh", "0.05", "pjm", "ercot")
    frame = await tail.stdout_until("connected", "ercot", "41.50")
    assert await tail.interrupt() == 0
    header = next(line for line in frame.splitlines() if line.startswith("ZONE"))
    assert header.split() == [
        "ZONE",
        "PRICE",
        "CHANGE",
        "VOLUME",
        "SEQ",
        "UPD/S",
        "AGE",
        "GAPS",
        "TIME",
    ]
    assert re.search(r"^pjm\s+-", frame, re.MULTILINE), frame


async def test_unknown_zone_exits_1_with_the_reason(
    server: ServerProcess, run_tail: StartTail
) -> None:
    tail = await run_tail("--json", "--server", server.url, "nosuchzone")
    async with asyncio.timeout(WAIT):
        assert await tail.process.wait() == 1
    assert tail.process.stderr is not None
    assert "1008" in (await tail.process.stderr.read()).decode()


def test_table_view_tracks_change_rate_and_gaps() -> None:
    now = [100.0]
    view = TableView(["pjm", "caiso"], server="http://x", clock=lambda: now[0], width=lambda: 200)

    def price(seq: float, value: float) -> PriceUpdate:
        return PriceUpdate("pjm", value, None, int(seq), "2026-11-27T15:00:00.000Z")

    for seq in range(1, 11):
        now[0] += 1.0
        view.record(price(seq, 40.0 + seq))
    view.record(Gap("pjm", 10, "e1", "e2", None, None))
    view.status = Status("reconnecting", attempt=2, delay=2.5, code=1001, error="going away")
    frame = ANSI.sub("", view.render())

    row = next(line for line in frame.splitlines() if line.startswith("pjm")).split()
    assert row[:8] == ["pjm", "50.00", "+1.00", "-", "10", "1.0", "0.0s", "1"]
    assert "reconnecting in 2.5 s (attempt 2) after close 1001: going away" in frame
    assert "gap in pjm after seq 10 (server history lost)" in frame
    assert re.search(r"^caiso\s+-\s+0\.0\s+0$", frame, re.MULTILINE), frame


async def test_zone_names_are_case_insensitive(server: ServerProcess, run_tail: StartTail) -> None:
    # The dashboard shows "PJM"; the wire only knows "pjm" (issue 11.15: close 1008 twice).
    tail = await run_tail("--json", "--server", server.url, "PJM")
    await tail.stderr_until("pricehub tail: connected")
    await server.publish({"market_zone": "pjm", "price": 12.5})
    line = json.loads(await tail.stdout_line())
    assert await tail.interrupt() == 0
    assert (line["market_zone"], line["price"]) == ("pjm", 12.5)


async def test_a_refused_connection_reads_as_plain_words(run_tail: StartTail) -> None:
    port = free_port()  # nothing listens there
    tail = await run_tail(
        "--json", "--max-attempts", "1", "--server", f"http://127.0.0.1:{port}", "pjm"
    )
    async with asyncio.timeout(WAIT):
        assert await tail.process.wait() == 1
    assert tail.process.stderr is not None
    text = (await tail.process.stderr.read()).decode()
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in text, text
    for internal in ("ssl:default", "Connect call failed", "Cannot connect to host"):
        assert internal not in text, text


async def test_the_status_line_never_wraps(run_tail: StartTail) -> None:
    # A long reconnect reason used to wrap; each redraw then scrolled the table by a line.
    port = free_port()
    tail = await run_tail(
        "--server", f"http://127.0.0.1:{port}", "--refresh", "0.05", "--max-attempts", "1",
        "pjm", env={"COLUMNS": "50"},
    )  # fmt: skip
    frame = "pricehub tail " + await tail.stdout_until("reconnecti")
    async with asyncio.timeout(WAIT):
        await tail.process.wait()
    lines = frame.splitlines()
    assert lines[0].endswith("…"), lines[0]
    assert max(len(line) for line in lines) <= 49, lines


def test_table_view_clips_long_lines_to_the_terminal() -> None:
    view = TableView(["pjm"], server="http://127.0.0.1:8080", width=lambda: 60)
    view.status = Status("reconnecting", attempt=3, delay=4.2, error="x" * 200)
    view.note = "gap " * 40
    first, note = ANSI.sub("", view.render()).splitlines()[:2]
    assert len(first) == 59 and first.endswith("…")
    assert len(note) <= 59


@pytest.fixture(scope="module")
def many_zones_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """20,000 configured zones."""
    config = many_zones_config(tmp_path_factory.mktemp("zones"), 20_000)
    with ServerProcess(
        "--no-simulate", "--config", str(config), publish_key=PUBLISH_KEY
    ) as proc:
        yield proc


async def test_tail_opens_only_the_named_zones_of_20000(
    many_zones_server: ServerProcess, run_tail: StartTail
) -> None:
    server = many_zones_server
    tail = await run_tail("--json", "--server", server.url, "Z00042", "z19999")
    await tail.stderr_until("pricehub tail: connected")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/api/ws/ws/stats") as response,
    ):
        stats = await response.json()
    await server.publish({"market_zone": "z19999", "price": 1.0})
    line = json.loads(await tail.stdout_line())
    assert await tail.interrupt() == 0
    assert stats["connections_by_zone"] == {"z00042": 1, "z19999": 1}
    assert line["market_zone"] == "z19999"


async def test_transport_sse(server: ServerProcess, run_tail: StartTail) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/api/ws/sse/market/pjm", timeout=aiohttp.ClientTimeout(5))
        as response,
    ):
        if response.status == 404 and "unknown_zone" not in await response.text():
            pytest.skip("this server has no SSE endpoint yet (branch sse)")
    tail = await run_tail("--json", "--transport", "sse", "--server", server.url, "pjm")
    await tail.stderr_until("pricehub tail: connected (SSE)")
    await server.publish({"market_zone": "pjm", "price": 3.5})
    line = json.loads(await tail.stdout_line())
    assert await tail.interrupt() == 0
    assert (line["market_zone"], line["price"]) == ("pjm", 3.5)
