"""The chaos soak's own processes: one ``redis-server`` and the pricehub instances on it.

Both keep their port across restarts, log to files under the run's directory (appended across
restarts, so a count of tracebacks covers every process an instance ever was) and are started
through ``bench.processes.spawn`` (own process group, killed with the harness).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import aiohttp

from bench.processes import HOST, free_port, rss_kib, spawn, stop

__all__ = ["REPO", "HarnessError", "Instance", "RedisServer", "redis_binary"]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0
HEALTH_PATH = "/api/ws/ws/health"
ALL_CPUS = frozenset(os.sched_getaffinity(0))


class HarnessError(RuntimeError):
    """The harness itself failed (a process would not start): not a finding about pricehub."""


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise HarnessError("redis-server not installed (apt-get install redis-server)")
    return path


class _Child:
    """A restartable child on a fixed port; ``process`` is the current incarnation."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise HarnessError(f"{self.name} was never started")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def argv(self) -> list[str]:
        raise NotImplementedError

    async def ready(self) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        """Start (or restart on the same port) and wait until it answers."""
        self.process = await spawn(self.argv(), log=self.log, cwd=REPO, pipes=False, cpus=ALL_CPUS)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while not await self.ready():
            if self.process.returncode is not None or time.monotonic() > deadline:
                await stop(self.process)
                tail = self.log.read_text(errors="replace")[-2000:]
                raise HarnessError(f"{self.name} did not start on port {self.port}:\n{tail}")
            await asyncio.sleep(0.05)

    def signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    async def wait_exit(self) -> int:
        """Wait (bounded) for the current process to exit; SIGKILL it if it hangs."""
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.process.wait()

    def rss_kib(self) -> int:
        return rss_kib([self.pid]) if self.running else 0

    async def shutdown(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            await stop(self.process)


class RedisServer(_Child):
    """``redis-server`` without persistence: a SIGKILL loses every key."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir / "redis.log")
        self.workdir = workdir
        self.binary = redis_binary()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip

    async def ready(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()


class Instance(_Child):
    """One ``run_server.py`` of the worktree, publishing on, simulator off."""

    def __init__(
        self, index: int, workdir: Path, *, redis_url: str, zones: tuple[str, ...], key: str
    ) -> None:
        super().__init__(f"instance-{index}", workdir / f"instance-{index}.log")
        self.index = index
        self.redis_url = redis_url
        self.zones = zones
        self.key = key
        self._session: aiohttp.ClientSession | None = None

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable, "run_server.py", "--host", HOST, "--port", str(self.port),
            "--redis-url", self.redis_url, "--no-simulate", "--publish-key", self.key,
            "--zones", ",".join(self.zones), "--log-format", "json",
            # One working directory for all instances: no shared data dir (the soak
            # measures the Redis failover, not the journal; see docs/operations.md).
            "--data-dir", "none",
        ]  # fmt: skip

    async def ready(self) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        try:
            async with self._session.get(self.http + HEALTH_PATH) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def tracebacks(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("Traceback")

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._session is not None:
            await self._session.close()
