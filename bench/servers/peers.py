"""The peer servers (Node, ``bench/peers/``): what users would pick instead of pricehub.

The driver's side of them: which script each runs, the protocol its load clients speak, the
Redis the socket.io adapter needs, how the bench publishes to soketi (its Pusher HTTP API,
signed), and installing ``bench/peers/node_modules`` from the committed lock (``npm ci``).

| peer | server | protocol | publish |
| --- | --- | --- | --- |
| ``socketio`` | socket.io 4.8, a room per zone | Engine.IO v4 / Socket.IO | the script's POST |
| ``socketio-redis`` | the same with ``@socket.io/redis-streams-adapter`` | the same | the same |
| ``node-ws`` | ``ws`` 8, a broadcast loop per zone | plain (the contract's frames) | the same |
| ``uws`` | uWebSockets.js, a pub/sub topic per zone | plain | the same |
| ``soketi`` | soketi 1.6, a public channel per zone | Pusher 7 | Pusher HTTP API |
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from processes import HOST, free_port, spawn, stop
from publisher import Poster
from servers.common import PUBLISH_PATH

__all__ = [
    "PEERS",
    "PEERS_DIR",
    "PeerSetup",
    "PusherPoster",
    "install",
    "missing_tools",
    "peer_setup",
    "pusher_signed_query",
    "socket_path",
    "versions",
]

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
START_TIMEOUT = 30.0
# soketi's one app. The secret is the run's publish key; id and key are public in Pusher.
PUSHER_APP_ID = "pricehub-bench"
PUSHER_APP_KEY = "pricehub-bench-key"
PUSHER_EVENT = "price"
SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"
PUSHER_PATH = f"/app/{PUSHER_APP_KEY}?protocol=7&client=pricehub-bench&version=1.0"


@dataclass(frozen=True)
class Peer:
    script: str  # in bench/peers/
    protocol: str  # loadclient.py --protocol
    redis: bool = False  # needs a redis-server of its own (started by the bench)


PEERS = {
    "socketio": Peer("socketio.js", "socketio"),
    "socketio-redis": Peer("socketio.js", "socketio", redis=True),
    "node-ws": Peer("ws.js", "plain"),
    "uws": Peer("uws.js", "plain"),
    "soketi": Peer("soketi.js", "pusher"),
}
# The packages whose versions go into the machine line of a run with peers.
PACKAGES = ("socket.io", "@socket.io/redis-streams-adapter", "redis", "ws", "uWebSockets.js",
            "@soketi/soketi")  # fmt: skip


def socket_path(protocol: str, plain_path: str) -> str:
    """The path a load client opens: the contract's for plain, else the protocol's own (those
    subscribe to their zones after the handshake, see loadclient.py)."""
    return {"plain": plain_path, "socketio": SOCKETIO_PATH, "pusher": PUSHER_PATH}[protocol]


# ----------------------------------------------------------------------------- installing


def missing_tools(names: list[str]) -> list[str]:
    """The programs the named peers need that are not on the PATH."""
    needed = ["node", "npm"] + (["redis-server"] if any(PEERS[n].redis for n in names) else [])
    return [tool for tool in needed if shutil.which(tool) is None]


def _installed() -> bool:
    """node_modules exists and npm installed it from the current lock (npm writes its own copy,
    node_modules/.package-lock.json, last)."""
    done = PEERS_DIR / "node_modules" / ".package-lock.json"
    lock = PEERS_DIR / "package-lock.json"
    return done.exists() and done.stat().st_mtime >= lock.stat().st_mtime


def install() -> str | None:
    """``npm ci`` in bench/peers unless node_modules is there and current; the error, if any."""
    if _installed():
        return None
    print("bench/peers: installing node_modules from package-lock.json (npm ci)", file=sys.stderr)
    argv = ["npm", "ci", "--prefix", str(PEERS_DIR), "--no-audit", "--no-fund"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"npm ci in {PEERS_DIR} failed ({done.returncode}): {last}"
    return None


def versions() -> str:
    """Node's and the installed peer packages' versions, for the runs' machine line."""
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    found = [f"node {node.stdout.strip()}"]
    for package in PACKAGES:
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((PEERS_DIR / "node_modules" / package / "package.json").read_text())
            found.append(f"{package} {meta['version']}")
    return ", ".join(found)


# ----------------------------------------------------------------------------- starting


@dataclass(frozen=True)
class PeerSetup:
    argv: list[str]
    protocol: str
    publish_url: str
    poster_class: type[Poster]


async def _redis_ready(port: int, process: asyncio.subprocess.Process) -> None:
    """Return once redis-server answers PING (it accepts connections before it serves)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see its log")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"PING\r\n")
            answer = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
            writer.close()
            if answer == b"+PONG\r\n":
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server on port {port} does not answer")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def redis_server(log: Path, cpus: frozenset[int]) -> AsyncIterator[int]:
    """A throwaway redis-server (no persistence, loopback) on a free port, never 6379."""
    port = free_port()
    workdir = log.with_suffix("")  # nothing is saved there; redis-server needs a --dir anyway
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    process = await spawn(argv, log=log, cwd=workdir, pipes=False, cpus=cpus)
    try:
        await _redis_ready(port, process)
        yield port
    finally:
        await stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def peer_setup(
    name: str, port: int, key: str, *, log: Path, cpus: frozenset[int]
) -> AsyncIterator[PeerSetup]:
    """How to start peer ``name`` on ``port``: its command line and how to drive it. Its
    redis-server, if it has one, runs meanwhile (on ``cpus``: it is not the server measured,
    its CPU is not counted)."""
    peer = PEERS[name]
    argv = ["node", str(PEERS_DIR / peer.script), "--host", HOST, "--port", str(port)]
    poster_class: type[Poster] = Poster
    async with contextlib.AsyncExitStack() as stack:
        if peer.protocol == "pusher":
            argv += ["--app-id", PUSHER_APP_ID, "--app-key", PUSHER_APP_KEY, "--app-secret", key]
            argv += ["--metrics-port", str(free_port()), "--discovery-port", str(free_port())]
            url, poster_class = f"http://{HOST}:{port}/apps/{PUSHER_APP_ID}", PusherPoster
        else:
            argv += ["--publish-key", key]
            url = f"http://{HOST}:{port}{PUBLISH_PATH}"
        if peer.redis:
            redis_port = await stack.enter_async_context(
                redis_server(log.with_name(log.stem + "-redis.log"), cpus)
            )
            argv += ["--redis-url", f"redis://{HOST}:{redis_port}"]
        yield PeerSetup(argv, peer.protocol, url, poster_class)


# ----------------------------------------------------------------------------- Pusher publishing


def pusher_signed_query(
    method: str, path: str, body: str, *, key: str, secret: str, timestamp: int
) -> dict[str, str]:
    """The query string of a signed Pusher HTTP API request (Pusher's "Authenticating
    requests": HMAC-SHA256 over method, path and the sorted query, body_md5 included)."""
    query = {
        "auth_key": key,
        "auth_timestamp": str(timestamp),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body.encode()).hexdigest(),
    }
    signed = "\n".join([method, path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))])
    query["auth_signature"] = hmac.new(secret.encode(), signed.encode(), "sha256").hexdigest()
    return query


class PusherPoster(Poster):
    """Publishes through the Pusher HTTP API: one event (``/events``) or one batch of them
    (``/batch_events``) per tick, channel = zone, ``data`` = the price object the other servers
    send, as a JSON string. Pusher answers ``{}``, without seqs, so the seqs are numbered here,
    in the order the ticks are sent (a skipped tick takes none)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, zones: tuple[str, ...]):
        super().__init__(session, url, key, zones)
        self.secret = key
        self.headers = {"Content-Type": "application/json"}
        self.next_seq = dict.fromkeys(zones, 1)

    def body(self, tick: int, t0: float) -> str:
        parsed = json.loads(super().body(tick, t0))
        events = []
        for price in parsed if isinstance(parsed, list) else [parsed]:
            zone = price["market_zone"]
            seq, self.next_seq[zone] = self.next_seq[zone], self.next_seq[zone] + 1
            update = {"type": "price_update", "market_zone": zone, "price": price["price"],
                      "volume": price["volume"], "seq": seq,
                      "timestamp": price["timestamp"]}  # fmt: skip
            data = json.dumps(update, separators=(",", ":"))
            events.append({"name": PUSHER_EVENT, "channel": zone, "data": data})
        return json.dumps(events[0] if len(events) == 1 else {"batch": events})

    async def post(self, body: str) -> dict[str, Any]:
        parsed = json.loads(body)
        batch = "batch" in parsed
        events = parsed["batch"] if batch else [parsed]
        url = self.url + ("/batch_events" if batch else "/events")
        query = pusher_signed_query("POST", urlsplit(url).path, body, key=PUSHER_APP_KEY,
                                    secret=self.secret, timestamp=int(time.time()))  # fmt: skip
        async with self.session.post(url, data=body, params=query, headers=self.headers) as answer:
            if answer.status != 200:
                raise RuntimeError(f"HTTP {answer.status}: {(await answer.text())[:200]}")
        accepted = [json.loads(event["data"]) for event in events]
        return {"accepted": [{"market_zone": u["market_zone"], "seq": u["seq"]} for u in accepted]}
