"""A real pricehub server in a subprocess, for tests that need one.

::

    with ServerProcess("--no-simulate", publish_key="k") as server:
        ...  # server.url, server.ws_url; await server.publish({"market_zone": "pjm", ...})
        server.kill()                # SIGKILL: no close frames, history lost
        await server.start_async()   # same port again

The server always runs with ``--redis-url none`` unless ``redis_url`` is given, so a test
never touches a developer's Redis, and with ``--data-dir none`` unless ``data_dir`` is
given, so no test writes ``data/`` into the repository (and a SIGKILL forgets everything,
as those tests expect). Output goes to a log file (``server.log()``, ``server.log_path``,
under the session's tmp dir: ``scratch_dir``) instead of a pipe nobody
reads, and start-up failures include it. The blocking methods have ``_async``
twins that run in a thread: a test that owns client sockets must keep its event loop
running while the server shuts down, or the server waits for close handshakes nobody sends.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

__all__ = ["REPO", "ServerProcess", "free_port", "scratch_dir", "use_scratch_dir"]

REPO = Path(__file__).resolve().parents[2]
HEALTH_PATH = "/api/ws/ws/health"
PUBLISH_PATH = "/api/ws/ws/broadcast/price"


# Set once per session by conftest: a directory of pytest's tmp_path_factory.
_scratch: list[Path] = []


def use_scratch_dir(path: Path) -> None:
    _scratch[:] = [path]


def scratch_dir() -> Path:
    """Where the process harnesses (here and tests/harness/redisproc.py) keep server logs and
    redis-server directories: under the pytest session's tmp dir, so a run leaves nothing
    in the system temp dir and a failed test's logs stay readable (pytest prunes old
    runs). Outside pytest (bench scripts), a temp dir removed at exit."""
    if not _scratch:
        path = Path(tempfile.mkdtemp(prefix="pricehub-harness-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _scratch.append(path)
    return _scratch[0]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python run_server.py --host 127.0.0.1 --port P`` plus ``args``, from the repo root.

    Keyword-only options: ``port`` (a free one), ``publish_key`` (None; else passed as
    ``--publish-key`` and used by ``publish``), ``redis_url`` (``"none"``), ``data_dir``
    (``"none"``: the store's journal directory), ``env`` (extra environment variables),
    ``startup_timeout`` (20 s until health answers 200).
    """

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        publish_key: str | None = None,
        redis_url: str = "none",
        data_dir: str | os.PathLike[str] = "none",
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.port = port or free_port()
        self.publish_key = publish_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        key_args = ["--publish-key", publish_key] if publish_key else []
        self.command = [
            sys.executable, "run_server.py", "--host", "127.0.0.1", "--port", str(self.port),
            "--redis-url", redis_url, "--data-dir", os.fspath(data_dir), *key_args, *args,
        ]  # fmt: skip
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._startup_timeout = startup_timeout
        descriptor, log = tempfile.mkstemp(
            prefix=f"server-{self.port}-", suffix=".log", dir=scratch_dir()
        )
        os.close(descriptor)
        self.log_path = Path(log)
        self.process: subprocess.Popen[bytes] | None = None

    # --- start ------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server and wait until its health endpoint answers 200."""
        if self.running:
            raise RuntimeError("the server is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self._startup_timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"server not healthy after {self._startup_timeout} s\n{self.log()}"
                )
            time.sleep(0.05)

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + HEALTH_PATH, timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    # --- stop -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, grace: float = 10.0) -> int:
        """SIGTERM, wait up to ``grace`` s for the exit and return its code (SIGKILL and
        raise on a hang)."""
        return self._signal(signal.SIGTERM, grace)

    async def stop_async(self, *, grace: float = 10.0) -> int:
        return await asyncio.to_thread(self.stop, grace=grace)

    def kill(self) -> int:
        """SIGKILL: the server dies without closing sockets or flushing anything."""
        return self._signal(signal.SIGKILL, 10.0)

    def _signal(self, signum: signal.Signals, grace: float) -> int:
        if self.process is None:
            raise RuntimeError("the server was never started")
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise TimeoutError(
                f"server ignored {signum.name} for {grace} s\n{self.log()}"
            ) from None

    def log(self) -> str:
        """Everything the server printed, across restarts."""
        return self.log_path.read_text(errors="replace")

    def memory_kib(self, field: str = "VmRSS") -> int:
        """The running server's ``VmRSS`` (resident now) or ``VmHWM`` (its peak), KiB."""
        if self.process is None:
            raise RuntimeError("the server was never started")
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
        raise KeyError(f"{field} not in /proc/{self.process.pid}/status")

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            self.stop()

    # --- publishing -------------------------------------------------------------------

    async def publish(self, *prices: Mapping[str, Any]) -> list[dict[str, Any]]:
        """POST ``prices`` to the publish endpoint; returns the ``accepted`` list."""
        if self.publish_key is None:
            raise RuntimeError("start the server with publish_key= to publish")
        headers = {"Authorization": f"Bearer {self.publish_key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + PUBLISH_PATH, json=list(prices), headers=headers) as response,
        ):
            body = await response.json()
            if response.status != 202:
                raise AssertionError(f"publish answered {response.status}: {body}")
            return list(body["accepted"])


@contextlib.asynccontextmanager
async def running_servers(
    count: int, redis_url: str, *args: str, publish_key: str
) -> AsyncIterator[list[ServerProcess]]:
    """``count`` instances on one Redis (no simulator), started together and stopped
    together, whatever the test did to them (a killed one is left as it is)."""
    started = [
        ServerProcess("--no-simulate", *args, publish_key=publish_key, redis_url=redis_url)
        for _ in range(count)
    ]
    try:
        await asyncio.gather(*(server.start_async() for server in started))
        yield started
    finally:
        await asyncio.gather(
            *(server.stop_async() for server in started if server.running),
            return_exceptions=True,
        )


def many_zones_config(directory: Path, count: int) -> Path:
    """A ``--config`` TOML file configuring ``count`` zones ``z00000``, ``z00001``, ...

    A TOML list, because a comma list of 20,000 zones exceeds what one environment variable
    or command-line argument may hold (128 KiB on Linux).
    """
    path = directory / f"zones-{count}.toml"
    names = ", ".join(f'"z{i:05d}"' for i in range(count))
    path.write_text(f"zones = [{names}]\n")
    return path
