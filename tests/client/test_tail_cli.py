"""``pricehub tail``'s command line as a user types it: usage errors, a bare ``host:port``,
and the reason for giving up said once (issue 22.7). Subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.harness.serverproc import REPO, ServerProcess, free_port

WAIT = 10.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TAIL = (sys.executable, "-m", "pricehub", "tail")


def run_tail(*args: str) -> subprocess.CompletedProcess[str]:
    """``pricehub tail ARGS`` to its end (a usage error or giving up: a few seconds)."""
    return subprocess.run(
        [*TAIL, *args], cwd=REPO, capture_output=True, text=True, timeout=WAIT, check=False
    )


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ((), "ZONE"),
        (("--bogus", "pjm"), "--bogus"),
        (("--server", "ftp://127.0.0.1:8080", "pjm"), "ftp://127.0.0.1:8080"),
        (("--server", "127.0.0.1:99999", "pjm"), "--server"),
        (("--server", "http://", "pjm"), "no host"),
        (("--max-attempts", "0", "pjm"), "--max-attempts"),
        (("--refresh", "-1", "pjm"), "--refresh"),
        (("--transport", "carrier-pigeon", "pjm"), "carrier-pigeon"),
        (("--max-rate", "0", "pjm"), "--max-rate"),
        (("--max-rate", "nan", "pjm"), "--max-rate"),
        (("--max-rate", "1e-9", "pjm"), "--max-rate"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(args: tuple[str, ...], names: str) -> None:
    result = run_tail(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no usage dump, no traceback
    assert lines[0].startswith("pricehub tail: error: ") and names in lines[0], lines


def test_help_still_prints_the_whole_usage() -> None:
    result = run_tail("--help")
    assert result.returncode == 0, result
    assert "--server" in result.stdout and "host:port" in result.stdout


def reason_lines(text: str) -> list[str]:
    """The lines that say why tail gave up (the client's ``gave up`` / ``closed ... with``)."""
    return [line for line in ANSI.sub("", text).splitlines()
            if "gave up after" in line or "closed the connection with" in line]  # fmt: skip


def test_json_says_why_it_gave_up_once_as_its_last_line() -> None:
    port = free_port()  # nothing listens there
    result = run_tail(
        "--json", "--max-attempts", "1", "--server", f"http://127.0.0.1:{port}", "pjm"
    )
    assert result.returncode == 1, result
    assert result.stdout == ""
    reasons = reason_lines(result.stderr)
    assert len(reasons) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == reasons[0]
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in reasons[0]


def test_table_says_why_it_gave_up_once_below_the_final_frame() -> None:
    port = free_port()
    result = run_tail("--max-attempts", "1", "--refresh", "0.05", "--server",
                      f"http://127.0.0.1:{port}", "pjm")  # fmt: skip
    assert result.returncode == 1, result
    assert reason_lines(result.stdout) == [], "the frame repeats the reason"
    final_frame = ANSI.sub("", result.stdout).split("pricehub tail ")[-1]
    assert final_frame.splitlines()[0].endswith("  failed"), final_frame
    assert len(reason_lines(result.stderr)) == 1, result.stderr


def test_a_terminal_close_is_reported_once(server: ServerProcess) -> None:
    result = run_tail("--json", "--server", server.url, "nosuchzone")
    assert result.returncode == 1, result
    reasons = reason_lines(result.stderr)
    assert len(reasons) == 1 and "1008" in reasons[0], result.stderr
    assert result.stderr.splitlines()[-1] == reasons[0]


Started = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start_tail() -> AsyncIterator[Started]:
    """Starts a long-running ``pricehub tail ARGS``; kills what still runs at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *TAIL, *args, cwd=REPO, env=dict(os.environ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_bare_host_and_port_means_http(server: ServerProcess, start_tail: Started) -> None:
    tail = await start_tail("--json", "--server", f"127.0.0.1:{server.port}", "pjm")
    assert tail.stdout is not None and tail.stderr is not None
    async with asyncio.timeout(WAIT):
        seen: list[bytes] = []
        while not seen or b"pricehub tail: connected" not in seen[-1]:
            line = await tail.stderr.readline()
            assert line, f"tail exited: {b''.join(seen).decode()}"
            seen.append(line)
        await server.publish({"market_zone": "pjm", "price": 12.5})
        price = json.loads(await tail.stdout.readline())
    assert (price["market_zone"], price["price"]) == ("pjm", 12.5)
