"""A throwaway ``redis-server`` for tests: a free port, no persistence, kill -9, restart.

::

    with RedisProcess() as redis_server:
        redis_server.url          # redis://127.0.0.1:<port>/0
        redis_server.kill()       # SIGKILL: connections drop, every key is gone
        redis_server.start()      # the same port again, empty

Never the Redis on 6379: each instance gets a port that was free a moment ago. Its unix
socket and log live in a directory of the session's tmp dir (``scratch_dir``), removed
at ``__exit__``.
Without a ``redis-server`` binary the test is skipped, except under ``CI=true``
where a missing binary fails the run (CI must not silently skip the cluster tests).

Also here, for the storage tests: ``RecordingListener`` (a ``StorageListener`` that
records and lets a test wait, bounded, for a seq).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from pricehub.storage import StoredPrice
from tests.harness.serverproc import free_port, scratch_dir
from tests.harness.support import missing_tool

__all__ = [
    "WAIT", "RecordingListener", "RedisCluster", "RedisProcess", "SentinelSetup", "TcpProxy",
    "free_cluster_port", "redis_binary", "redis_cli_binary",
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
        self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-", dir=scratch_dir()))
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


# --- Sentinel and Cluster harnesses (issue 17) ----------------------------------------
#
# Both drive several ``redis-server`` processes on loopback free ports and poll them
# with short-timeout synchronous clients; every wait is bounded and raises
# ``TimeoutError`` with the relevant logs.

SENTINEL_SERVICE = "mymaster"


def redis_cli_binary() -> str:
    """The ``redis-cli`` path, or skip (fail under CI) when there is none."""
    path = shutil.which("redis-cli")
    if path is None:
        missing_tool("redis-cli not installed (apt-get install redis-tools)")
    return path


def _sync_client(port: int) -> Any:
    """A synchronous client of ``127.0.0.1:port`` that gives up fast."""
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
        decode_responses=True,
    )  # fmt: skip


def _query(port: int, *command: str) -> Any:
    """One command on ``127.0.0.1:port``; ``None`` when the node does not answer."""
    client = _sync_client(port)
    try:
        return client.execute_command(*command)
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def _info_field(text: Any, name: str) -> str | None:
    """``name``'s value in an INFO-style ``key:value`` text (or dict from redis-py)."""
    if isinstance(text, dict):
        value = text.get(name)
        return None if value is None else str(value)
    if not isinstance(text, str):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _poll(
    what: str, condition: Callable[[], bool], timeout: float, logs: Callable[[], str]
) -> None:
    """Call ``condition`` every 50 ms until it holds; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s\n{logs()}")
        time.sleep(0.05)


def free_cluster_port() -> int:
    """A port below 55535 that is free on 127.0.0.1, and whose cluster bus port
    (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class _Node:
    """One ``redis-server`` (or sentinel) child process on ``127.0.0.1:port``."""

    def __init__(self, binary: str, port: int, directory: Path, args: Sequence[str]) -> None:
        self.port = port
        self.log_path = directory / f"redis-{port}.log"
        self._command = [binary, *args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._command, stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        """SIGKILL (only this child) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.port} ---\n{text[-3000:]}"


def _wait_answering(nodes: Sequence[_Node], timeout: float, logs: Callable[[], str]) -> None:
    def answering() -> bool:
        for node in nodes:
            if not node.running:
                raise RuntimeError(f"redis-server on {node.port} exited\n{logs()}")
        return all(_query(node.port, "PING") for node in nodes)

    _poll("redis-server answering PING", answering, timeout, logs)


class SentinelSetup:
    """One master, one replica and three sentinels on loopback free ports.

    ::

        with SentinelSetup() as sentinel:
            sentinel.url                  # redis+sentinel://127.0.0.1:p1,.../mymaster/0
            sentinel.kill_master()        # SIGKILL the current master
            sentinel.wait_for_promotion() # until every sentinel names the replica

    ``__enter__`` returns once the replica is in sync (``master_link_status:up``) and every
    sentinel knows the replica and the two other sentinels, so a failover can be
    authorised (quorum 2 of 3) the moment the master dies.

    :param down_after_ms: ``sentinel down-after-milliseconds`` (default 500).
    :param failover_timeout_ms: ``sentinel failover-timeout`` (default 2000).
    :param startup_timeout: seconds for the whole set-up (default 30).
    """

    def __init__(
        self,
        *,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = redis_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="sentinel-", dir=scratch_dir()))
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._startup_timeout = startup_timeout
        self.master = self._data_node(free_port(), [])
        self.replica = self._data_node(
            free_port(), ["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinels = [self._sentinel_node(free_port()) for _ in range(3)]

    def _data_node(self, port: int, extra: list[str]) -> _Node:
        data = self._dir / str(port)
        data.mkdir()
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data), "--daemonize", "no", "--loglevel", "notice",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", *extra,
        ]  # fmt: skip
        return _Node(self.binary, port, self._dir, args)

    def _sentinel_node(self, port: int) -> _Node:
        config = self._dir / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self._dir}\n"
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self._down_after_ms}\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} {self._failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
        )
        return _Node(self.binary, port, self._dir, [str(config), "--sentinel"])

    # --- addresses --------------------------------------------------------------------

    @property
    def sentinel_ports(self) -> list[int]:
        return [node.port for node in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"

    def master_port(self) -> int | None:
        """The master port a majority of live sentinels report, or None."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            answer = _query(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE)
            if answer:
                votes[int(answer[1])] = votes.get(int(answer[1]), 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best is not None and best[1] >= 2 else None

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> SentinelSetup:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def _start(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        self.master.start()
        self.replica.start()
        _wait_answering([self.master, self.replica], self._startup_timeout, self.logs)
        _poll(
            "replica in sync",
            lambda: _info_field(_query(self.replica.port, "INFO", "replication"),
                                "master_link_status") == "up",
            max(deadline - time.monotonic(), 0.1), self.logs,
        )  # fmt: skip
        for node in self.sentinels:
            node.start()
        _wait_answering(self.sentinels, max(deadline - time.monotonic(), 0.1), self.logs)
        _poll(
            "sentinels know the replica and each other", self._sentinels_ready,
            max(deadline - time.monotonic(), 0.1), self.logs,
        )  # fmt: skip

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            replicas = _query(port, "SENTINEL", "REPLICAS", SENTINEL_SERVICE) or []
            peers = _query(port, "SENTINEL", "SENTINELS", SENTINEL_SERVICE) or []
            known = [
                r for r in replicas
                if _pairs(r).get("port") == str(self.replica.port)
                and "disconnected" not in _pairs(r).get("flags", "")
                and "s_down" not in _pairs(r).get("flags", "")
            ]  # fmt: skip
            if not known or len(peers) < 2:
                return False
        return self.master_port() == self.master.port

    def kill_master(self) -> int:
        """SIGKILL the data node the sentinels currently call master; its port."""
        port = self.master_port()
        node = next((n for n in (self.master, self.replica) if n.port == port), None)
        if node is None or not node.running:
            raise RuntimeError(f"no running master (sentinels say {port})")
        node.kill()
        return node.port

    def wait_for_promotion(self, timeout: float = 15.0) -> int:
        """Block until the sentinels report a live replica as master (and it says
        ``role:master``); its port. ``TimeoutError`` after ``timeout`` s."""
        survivors = [n for n in (self.master, self.replica) if n.running]

        def promoted() -> bool:
            port = self.master_port()
            return (
                any(n.port == port for n in survivors)
                and _info_field(_query(port or 0, "INFO", "replication"), "role") == "master"
            )

        _poll("sentinel promotion", promoted, timeout, self.logs)
        port = self.master_port()
        assert port is not None
        return port

    def logs(self) -> str:
        return "\n".join(n.log() for n in (self.master, self.replica, *self.sentinels))

    def _stop(self) -> None:
        for node in (*self.sentinels, self.replica, self.master):
            node.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def _pairs(flat: Any) -> dict[str, str]:
    """redis-py gives SENTINEL REPLICAS entries as dicts or flat [k, v, ...] lists."""
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


START_ATTEMPTS = 3  # cluster start-ups tried with fresh ports after a lost port race


class RedisCluster:
    """A six-node Redis Cluster (three masters, one replica each) on loopback ports.

    ::

        with RedisCluster() as cluster:
            cluster.url                     # redis+cluster://127.0.0.1:p1,p2,p3/
            cluster.masters()               # [(port, [(first_slot, last_slot), ...]), ...]
            port = cluster.node_for_key("pricehub:{pjm}:seq")
            cluster.kill(port)              # SIGKILL that master
            cluster.wait_for_failover(port) # until its replica took over, state ok

    Ports are picked so that the cluster bus port (port + 10000) is free too. Without
    ``redis-server`` or ``redis-cli`` the test is skipped (fails under ``CI=true``).

    :param node_timeout_ms: ``--cluster-node-timeout`` (default 1000).
    :param startup_timeout: seconds for the whole set-up (default 60).
    """

    NODES = 6

    def __init__(self, *, node_timeout_ms: int = 1000, startup_timeout: float = 60.0) -> None:
        self.binary = redis_binary()
        self.cli = redis_cli_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="cluster-", dir=scratch_dir()))
        self._startup_timeout = startup_timeout
        self._node_timeout_ms = node_timeout_ms
        self.nodes = self._pick_nodes()
        self.started_in: float | None = None  # seconds __enter__ took
        self._killed_slots: dict[int, list[tuple[int, int]]] = {}

    def _pick_nodes(self) -> dict[int, _Node]:
        ports: list[int] = []
        while len(ports) < self.NODES:
            port = free_cluster_port()
            if port not in ports and port + 10000 not in ports and port - 10000 not in ports:
                ports.append(port)
        return {port: self._cluster_node(port) for port in ports}

    def _cluster_node(self, port: int) -> _Node:
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(self._dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self._node_timeout_ms),
            "--save", "", "--appendonly", "no", "--dir", str(self._dir),
            "--daemonize", "no", "--loglevel", "notice",
            # replicas sync at once (the default waits 5 s for more replicas to join)
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        return _Node(self.binary, port, self._dir, args)

    # --- addresses --------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of the first three nodes, as given in ``url``."""
        return [("127.0.0.1", port) for port in self.ports[:3]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.startup_nodes)
        return f"redis+cluster://{hosts}/"

    def live_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.running]

    # --- topology ---------------------------------------------------------------------

    def cluster_nodes(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as seen by the first live node that answers: one dict per node
        with ``port``, ``id``, ``flags`` (set), ``master`` (id or ``-``), ``slots``."""
        for port in self.live_ports():
            text = _query(port, "CLUSTER", "NODES")
            if isinstance(text, str):
                return [_parse_node_line(line) for line in text.splitlines() if line]
        return []

    def masters(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """``(port, slot ranges)`` of every master not flagged as failed, by port."""
        return sorted(
            (node["port"], node["slots"]) for node in self.cluster_nodes()
            if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]
        )  # fmt: skip

    def replica_of(self, master_port: int) -> list[int]:
        """Ports of the replicas of the master on ``master_port``."""
        nodes = self.cluster_nodes()
        ids = [n["id"] for n in nodes if n["port"] == master_port]
        return sorted(n["port"] for n in nodes if ids and n["master"] == ids[0])

    def keyslot(self, key: str) -> int:
        for port in self.live_ports():
            answer = _query(port, "CLUSTER", "KEYSLOT", key)
            if answer is not None:
                return int(answer)
        raise RuntimeError("no cluster node answers")

    def node_for_key(self, key: str) -> int:
        """The port of the master serving ``key``'s slot (CLUSTER KEYSLOT + slot map)."""
        slot = self.keyslot(key)
        for port, ranges in self.masters():
            if any(first <= slot <= last for first, last in ranges):
                return port
        raise RuntimeError(f"slot {slot} has no live master")

    def cluster_ok(self, ports: Sequence[int] | None = None) -> bool:
        """``cluster_state:ok`` on every one of ``ports`` (default: every live node)."""
        return all(
            _info_field(_query(port, "CLUSTER", "INFO"), "cluster_state") == "ok"
            for port in (ports if ports is not None else self.live_ports())
        )

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> RedisCluster:
        started = time.monotonic()
        for attempt in range(START_ATTEMPTS):
            try:
                self._start()
                break
            except BaseException as exc:
                self._stop()
                # A port (or its bus port, +10000) free a moment ago was taken meanwhile
                # by someone else on the machine: pick new ports and start again.
                if "exited" not in str(exc) or attempt == START_ATTEMPTS - 1:
                    raise
                self._dir.mkdir(parents=True, exist_ok=True)  # _stop removed it
                self.nodes = self._pick_nodes()
        self.started_in = time.monotonic() - started
        return self

    def _start(self) -> None:
        deadline = time.monotonic() + self._startup_timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.1)

        for node in self.nodes.values():
            node.start()
        _wait_answering(list(self.nodes.values()), left(), self.logs)
        create = subprocess.run(
            [self.cli, "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=left(), check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({create.returncode}):\n"
                f"{create.stdout}\n{create.stderr}\n{self.logs()}"
            )
        _poll("cluster_state:ok on every node", self.cluster_ok, left(), self.logs)
        _poll("every node sees 3 masters with slots and 3 replicas", self._converged,
              left(), self.logs)  # fmt: skip
        _poll("every replica in sync", self._replicas_synced, left(), self.logs)

    def _converged(self) -> bool:
        for port in self.ports:
            text = _query(port, "CLUSTER", "NODES")
            if not isinstance(text, str):
                return False
            nodes = [_parse_node_line(line) for line in text.splitlines() if line]
            masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
            replicas = [n for n in nodes if "slave" in n["flags"]]
            if len(masters) != 3 or len(replicas) != 3 or any(
                "fail" in n["flags"] or "fail?" in n["flags"] for n in nodes
            ):
                return False
        return True

    def _replicas_synced(self) -> bool:
        replicas = [n["port"] for n in self.cluster_nodes() if "slave" in n["flags"]]
        return len(replicas) == 3 and all(
            _info_field(_query(port, "INFO", "replication"), "master_link_status") == "up"
            for port in replicas
        )

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a child of this harness, never anything else)."""
        self._killed_slots[port] = next((r for p, r in self.masters() if p == port), [])
        self.nodes[port].kill()

    def wait_for_failover(self, killed_port: int, timeout: float = 20.0) -> int | None:
        """Block until another node serves every slot ``killed_port`` had, the killed node
        is flagged ``fail`` and every live node says ``cluster_state:ok``; the port of the
        master now holding those slots (None if the killed node was a replica).
        ``TimeoutError`` after ``timeout`` s."""
        slots = self._killed_slots.get(killed_port, [])
        owner: list[int] = []

        def failed_over() -> bool:
            nodes = self.cluster_nodes()
            killed = [n for n in nodes if n["port"] == killed_port]
            if not killed or "fail" not in killed[0]["flags"] or killed[0]["slots"]:
                return False
            if slots:
                first = slots[0][0]
                owner[:] = [
                    n["port"] for n in nodes
                    if "master" in n["flags"] and "fail" not in n["flags"]
                    and any(a <= first <= b for a, b in n["slots"])
                ]  # fmt: skip
                if not owner:
                    return False
            return self.cluster_ok()

        _poll(f"failover of {killed_port}", failed_over, timeout, self.logs)
        return owner[0] if owner else None

    def logs(self) -> str:
        return "\n".join(node.log() for node in self.nodes.values())

    def _stop(self) -> None:
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def _parse_node_line(line: str) -> dict[str, Any]:
    """One CLUSTER NODES line: ``id ip:port@bus flags master ping pong epoch link slots...``."""
    fields = line.split()
    address = fields[1].split("@")[0]
    slots: list[tuple[int, int]] = []
    for item in fields[8:]:
        if item.startswith("["):
            continue  # a slot being imported or migrated
        first, _, last = item.partition("-")
        slots.append((int(first), int(last or first)))
    return {
        "id": fields[0],
        "port": int(address.rpartition(":")[2]),
        "flags": set(fields[2].split(",")),
        "master": fields[3],
        "link": fields[7],
        "slots": slots,
    }
