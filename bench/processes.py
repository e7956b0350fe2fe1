"""Child processes of the benchmark and what the OS says about them (``/proc``).

Every child gets its own process group (so a server's whole tree can be signalled), dies with
the driver even if the driver is SIGKILLed (``PR_SET_PDEATHSIG``), and is pinned to the CPUs it
was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import platform
import re
import signal
import socket
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "HOST",
    "cpu_seconds",
    "free_port",
    "machine_busy_seconds",
    "machine_line",
    "process_tree",
    "rss_kib",
    "spawn",
    "stop",
]

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1


def _stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server may run worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                children.setdefault(int(_stat_fields(entry.name)[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds spent by anything on the machine (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            total += int(match.group(1)) if match else 0
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_setup(cpus: frozenset[int]) -> None:
    """Runs in the child between fork and exec."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.sched_setaffinity(0, cpus)


async def spawn(
    argv: list[str], *, log: Path, cwd: Path, pipes: bool, cpus: frozenset[int]
) -> asyncio.subprocess.Process:
    """Start a child with stderr (and stdout unless ``pipes``) appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else sink,
            stderr=sink,
            preexec_fn=functools.partial(_child_setup, cpus),
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the child's process group, SIGKILL if it is still there after a grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def machine_line(repo: Path) -> str:
    """CPU model, cores, OS, Python and library versions, tree commit, date: for RESULTS.md."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    versions = []
    for module in ("aiohttp", "websockets", "picows"):
        with contextlib.suppress(ImportError, AttributeError):
            versions.append(f"{module} {__import__(module).__version__}")
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=repo, capture_output=True, text=True, check=False).stdout
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}; "
        f"tree at {commit.strip() or 'no commit'}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
