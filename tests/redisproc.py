"""A throwaway ``redis-server`` for tests: a free port, no persistence, kill -9, restart.

::

    with RedisProcess() as redis_server:
        redis_server.url          # redis://127.0.0.1:<port>/0
        redis_server.kill()       # SIGKILL: connections drop, every key is gone
        redis_server.start()      # the same port again, empty

Never the Redis on 6379: each instance gets a port that was free a moment ago.
Without a ``redis-server`` binary the test is skipped, except under ``CI=true``
where a missing binary fails the run (CI must not silently skip the cluster tests).

Also here, for the storage tests: ``RecordingListener`` (a ``StorageListener`` that
records and lets a test wait, bounded, for a seq).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from pricehub.storage import StoredPrice
from tests.serverproc import free_port
from tests.support import missing_tool

__all__ = [
    "WAIT", "RecordingListener", "RedisProcess", "TcpProxy", "redis_binary",
]

WAIT = 5.0  # upper bound of every wait; the happy path takes milliseconds


class RecordingListener:
    """Keeps what the storage delivered; ``wait_for`` blocks (bounded) until it has it."""

    def __init__(self) -> None:
        self.prices: list[StoredPrice] = []
        self.backends: list[str] = []
        self.epochs: list[str] = []
        self._changed = asyncio.Event()

    def on_price(self, price: StoredPrice) -> None:
        self.prices.append(price)
        self._changed.set()

    def on_backend_changed(self, backend: str) -> None:
        self.backends.append(backend)
        self._changed.set()

    def on_epoch_changed(self, epoch: str) -> None:
        self.epochs.append(epoch)

    def seqs(self, zone: str) -> list[int]:
        return [price.seq for price in self.prices if price.zone == zone]

    async def wait_for(self, zone: str, seq: int) -> list[int]:
        """The zone's delivered seqs once ``seq`` has been delivered (within ``WAIT``)."""
        async with asyncio.timeout(WAIT):
            while seq not in self.seqs(zone):
                self._changed.clear()
                await self._changed.wait()
        return self.seqs(zone)

    async def wait_backend(self, backend: str) -> None:
        async with asyncio.timeout(WAIT):
            while not self.backends or self.backends[-1] != backend:
                self._changed.clear()
                await self._changed.wait()


def redis_binary() -> str:
    """The ``redis-server`` path, or skip (fail under CI) when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        missing_tool("redis-server not installed (apt-get install redis-server)")
    return path


class RedisProcess:
    """One ``redis-server`` on 127.0.0.1, also listening on a unix socket.

    :param port: TCP port (default: a free one); kept across ``kill``/``start``.
    :param tls: ``(cert, key)`` PEM files: the TCP port speaks TLS only (default None).
    :param startup_timeout: seconds until it must answer PING (default 10).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.tls = tls
        self._dir = Path(tempfile.mkdtemp(prefix=f"pricehub-redis-{self.port}-"))
        self.unix_socket = self._dir / "redis.sock"
        self._startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}?db=0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart, empty) on the same port; wait until it answers PING."""
        if self.running:
            raise RuntimeError("redis-server already running")
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(self._dir),
            "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if self.tls is not None:
            cert, key = self.tls
            command[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            command += [
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
            ]  # fmt: skip
        log = (self._dir / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + self._startup_timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.02)

    def ping(self) -> bool:
        """PING over the unix socket (plain, whatever the TCP port speaks)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.unix_socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections reset, data gone (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.send_signal(signal.SIGCONT)  # a paused process dies only then
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and silent, commands wait in the socket."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``: everything sent meanwhile is served, in order."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self._dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class TcpProxy:
    """A TCP relay to ``127.0.0.1:target_port`` that can go silent, through real sockets.

    ``freeze()`` makes every current connection drop what it relays, both ways, while
    staying open: a half-dead link that looks healthy. ``freeze(subscribers_only=True)``
    does that only to connections that sent SUBSCRIBE. ``block()`` also refuses new
    connections (a partition); ``unblock()`` accepts them again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blocked = False
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.close()

    def freeze(self, *, subscribers_only: bool = False) -> None:
        for link in self._links:
            if link.subscriber or not subscribers_only:
                link.frozen = True

    def block(self) -> None:
        self.blocked = True
        self.freeze()

    def unblock(self) -> None:
        self.blocked = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        await asyncio.gather(
            link.relay(reader, up_writer, upstream=True),
            link.relay(up_reader, writer, upstream=False),
            return_exceptions=True,
        )
        link.close()


class _Link:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.writers = (client, server)
        self.frozen = False
        self.subscriber = False

    async def relay(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while data := await source.read(65536):
            if upstream and b"SUBSCRIBE" in data.upper():
                self.subscriber = True
            if not self.frozen:
                sink.write(data)
                await sink.drain()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
