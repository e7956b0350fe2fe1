"""The chaos soak's own processes: ``redis-server`` nodes and the pricehub instances on them.

Every child keeps its port across restarts, logs to a file under the run's directory (appended
across restarts, so a count of tracebacks covers every process an instance ever was) and is
started through ``bench.processes.spawn`` (own process group, killed with the harness). A
``RedisNode`` is a plain node, a sentinel or a cluster node, depending on its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bench.processes import HOST, free_port, rss_kib, spawn, stop

__all__ = [
    "HOST", "REPO", "Child", "HarnessError", "Instance", "RedisNode", "free_port_pair",
    "no_retry", "poll", "query", "redis_binary",
]  # fmt: skip

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0
HEALTH_PATH = "/api/ws/ws/health"
ALL_CPUS = frozenset(os.sched_getaffinity(0))


class HarnessError(RuntimeError):
    """The harness itself failed (a process would not start): not a finding about pricehub."""


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"{name} not installed (apt-get install redis-server redis-tools)")
    return path


def no_retry() -> Retry:
    """redis-py's constructors retry a command after a connection error or a timeout by
    default (``Redis(...)`` ten times): a poll tries again itself, and the stream producer
    must never resend an ``XADD`` (it would add the entry twice)."""
    return Retry(NoBackoff(), 0)


async def query(port: int, *command: str | int, timeout: float = 1.0, strict: bool = False) -> Any:
    """One command to ``127.0.0.1:port``, decoded; None when the node does not answer (in
    time) or answers an error: callers poll, so a stopped or dead node is an answer. With
    ``strict`` that is a ``HarnessError`` instead (a step a fault cannot do without)."""
    client = aioredis.Redis(
        host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
        decode_responses=True, retry=no_retry(),
    )  # fmt: skip
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        if strict:
            raise HarnessError(f"{' '.join(map(str, command))} on {port}: {exc}") from exc
        return None
    finally:
        await client.aclose()


async def poll(what: str, condition: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Await ``condition()`` every 50 ms until it holds; the seconds it took. A
    ``HarnessError`` after ``timeout`` s: the set-up the soak needs did not happen."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise HarnessError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def free_port_pair() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port
    raise HarnessError("no free port pair (port, port + 10000) found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


class Child:
    """A restartable child on a fixed port; ``process`` is the current incarnation."""

    def __init__(self, name: str, log: Path, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
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


class RedisNode(Child):
    """One ``redis-server`` on a fixed port. Without ``args`` a plain node without persistence
    (a SIGKILL loses every key); ``args`` replace the persistence options (a replica's
    ``--replicaof``, a cluster node's options) and ``config`` makes it a sentinel."""

    def __init__(
        self,
        workdir: Path,
        name: str = "redis",
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        config: Path | None = None,
    ) -> None:
        super().__init__(name, workdir / f"{name}.log", port)
        self.dir = workdir / name  # its own: a replica's sync file never meets another node's
        self.binary = redis_binary()
        self.args = list(args)
        self.config = config

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        head = [self.binary] if self.config is None else [self.binary, str(self.config)]
        common = ["--port", str(self.port), "--bind", HOST, "--daemonize", "no",
                  "--loglevel", "warning"]  # fmt: skip
        if self.config is not None:
            return [*head, *common, "--sentinel"]
        self.dir.mkdir(parents=True, exist_ok=True)
        data = [
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            # replicas sync at once, through the socket: no RDB file is ever left behind,
            # so a restarted node comes back empty (or from its master), never from disk
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            "--repl-diskless-load", "on-empty-db",
        ]  # fmt: skip
        return [*head, *common, *data, *self.args]

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

    async def kill(self) -> None:
        """SIGKILL (a stopped node too) and reap it."""
        self.signal(signal.SIGKILL)
        self.signal(signal.SIGCONT)
        await self.wait_exit()


class Instance(Child):
    """One ``run_server.py`` of the worktree, publishing on, simulator off, journaling in its
    own ``data_dir`` (what operators run: the default ``data`` of each instance's own working
    directory). ``redis_url`` ``"none"``: the durable embedded store alone."""

    def __init__(
        self,
        index: int,
        workdir: Path,
        *,
        redis_url: str,
        zones: tuple[str, ...],
        key: str,
        data_dir: Path,
        tree: Path = REPO,
    ) -> None:
        super().__init__(f"instance-{index}", workdir / f"instance-{index}.log")
        self.tree = tree  # whose run_server.py (and pricehub, next to it) runs
        self.index = index
        self.redis_url = redis_url
        self.zones = zones
        self.key = key
        self.data_dir = data_dir
        self._session: aiohttp.ClientSession | None = None

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable, str(self.tree / "run_server.py"),
            "--host", HOST, "--port", str(self.port),
            "--redis-url", self.redis_url, "--no-simulate", "--publish-key", self.key,
            "--zones", ",".join(self.zones), "--log-format", "json",
            "--data-dir", str(self.data_dir),
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
