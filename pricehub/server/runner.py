"""Serve one instance until SIGTERM/SIGINT, then shut down gracefully and exit 0.

The TLS files are loaded and the listening sockets bound first, before the application
exists: a port already in use or an unloadable certificate is then one line on stderr
and exit 2, with nothing started (no storage, no Redis ingest lease, no background
task). aiohttp's ``AppRunner.setup`` runs the startup contexts, so binding through
``TCPSite`` after it would come too late. Whatever else fails at start for a reason an
operator must fix (the data dir, a subscriber key file) is reported the same way.

Shutdown order: stop accepting, close every socket with 1001 (``on_shutdown``), stop
the background tasks and the storage (``cleanup_ctx``), all within ``shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import signal
import socket
import ssl
import sys
import time

import structlog
from aiohttp import web

from pricehub.server.app import create_app
from pricehub.server.errors import ConfigError, error_line
from pricehub.server.http.group_metrics import WORKER_GROUP, WorkerGroup
from pricehub.server.logs import AccessLogger
from pricehub.server.policy.auth import TokenVerifier
from pricehub.server.settings import Settings
from pricehub.storage.errors import JournalUnavailable

__all__ = ["BindError", "bind_sockets", "preflight", "serve", "serve_async"]

log = structlog.get_logger("pricehub.server")
BACKLOG = 1024


class BindError(Exception):
    """The listening address cannot be bound (in use, not local, no permission)."""


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or a ``ConfigError`` naming both files (OpenSSL does not
    say which of them it could not read)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:  # ssl.SSLError is one: not PEM, or the key of another cert
        reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
        if reason.endswith("PEM lib"):
            reason += " (not a PEM certificate and private key)"
        raise ConfigError(
            f"tls_cert {settings.tls_cert} / tls_key {settings.tls_key} cannot be loaded: "
            f"{reason}"
        ) from None
    return context


def preflight(settings: Settings) -> None:
    """Load the files the server will need (TLS certificate and key, subscriber key)
    before any process, socket or storage exists; a ``ConfigError`` when one cannot be.
    The CLI calls it before ``--workers N`` forks, so a bad file is one line, not one
    per worker; ``serve`` loads them again, and reports the same error the same way."""
    ssl_context(settings)
    TokenVerifier.from_settings(settings)


def bind_sockets(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, as asyncio's
    ``create_server`` would make them (SO_REUSEADDR, IPv6-only next to IPv4).

    Raises ``BindError`` naming ``host:port`` when any cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
            (info[0], info[1], info[2], info[3], info[4]) for info in infos
        ):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


async def serve_async(
    settings: Settings, *, reuse_port: bool = False, group: WorkerGroup | None = None
) -> None:
    """Serve until a signal; ``group``: this process is one of ``--workers N``."""
    context = ssl_context(settings)
    sockets = bind_sockets(settings.host, settings.port, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        app = create_app(settings)
        if group is not None:  # before start-up: the metrics read it there
            app[WORKER_GROUP] = group
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log_class=AccessLogger,
            shutdown_timeout=settings.shutdown_grace,
        )
        await runner.setup()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    collector: asyncio.Task[None] | None = None
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=context).start()
        scheme = "https" if context else "http"
        port = sockets[0].getsockname()[1]
        log.info(
            "listening", url=f"{scheme}://{settings.host}:{port}",
            zones=len(settings.zones), simulator=settings.simulator_enabled,
        )
        settle_heap()
        collector = asyncio.create_task(
            collect_periodically(FULL_GC_INTERVAL), name="gc_collector"
        )
        await stop.wait()
        log.info("shutting_down")
    finally:
        if collector is not None:
            collector.cancel()
        await runner.cleanup()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    log.info("stopped")


# Young-generation threshold of the cyclic GC (CPython's default is 700 allocations).
# A market-interval burst allocates a few tracked objects per price (the decoded JSON, its
# PriceBody, futures, StoredPrice): at 700, 100,000 prices at 20,000 zones ran 824 passes
# (6 full, 160-190 ms of GC); at 5,000, 106 passes, none full, 36-49 ms (50,000: 28-46 ms).
# It is not higher because it also bounds young cyclic garbage, which only a pass frees
# and which may carry far more untracked bytes than its tracked count says: a request
# aiohttp cannot parse leaves ~1.7 MB in ~60 tracked objects (the parse error's traceback
# holds the frame that holds the bytes read and their repr). At 50,000, 800 such requests
# took RSS to 1.3 GB for good; at 5,000 it levels off near 250 MB (700: 170 MB).
GC_YOUNG_THRESHOLD = 5_000
# Full collections: the thresholds rarely trigger one on a frozen heap (only when the
# tracked heap grew by a quarter), so garbage that outlived two young passes (a cycle
# left by a connection that lived a while) would stay for good. One runs every
# FULL_GC_INTERVAL seconds, or less often when it stalls the loop longer: never more than
# FULL_GC_SHARE of the time (a 0.5 s pass at most every 500 s).
FULL_GC_INTERVAL = 60.0
FULL_GC_SHARE = 0.001


def settle_heap() -> None:
    """Once start-up is done: freeze what it built and collect less often.

    A full (generation 2) pass walks every tracked object, and start-up builds many that
    live as long as the process (the zone set, routes, loaded history): measured, a full
    pass in the middle of a burst stalled the loop for 30-99 ms at 20,000 zones.
    ``gc.freeze`` moves them where the collector never looks again (Instagram's trick;
    see the ``gc.freeze`` docs). Only start-up's objects are frozen: anything made later
    may become cyclic garbage, which ``collect_periodically`` frees.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def collect_periodically(interval: float = FULL_GC_INTERVAL) -> None:
    """A full collection every ``interval`` s, or as rarely as ``FULL_GC_SHARE`` requires
    (the wait grows with the stall measured), each logged with its stall."""
    wait = interval
    while True:
        await asyncio.sleep(wait)
        started = time.perf_counter()
        collected = gc.collect()
        stall = time.perf_counter() - started
        wait = max(interval, stall / FULL_GC_SHARE)
        log.info(
            "gc_full_collection", stall_ms=round(stall * 1000, 1), collected=collected,
            next_in_s=round(wait, 1),
        )  # fmt: skip


def serve(
    settings: Settings, *, reuse_port: bool = False, group: WorkerGroup | None = None
) -> int:
    """Run until a signal; returns the process exit code: 2, with one line on stderr
    (``error_line``; after whatever was logged before, in either log format), when the
    address cannot be bound, the TLS files or the subscriber key cannot be loaded, or
    (``--redis-url none``) the data dir is locked by another process or unusable."""
    try:
        asyncio.run(serve_async(settings, reuse_port=reuse_port, group=group))
    except (BindError, ConfigError, JournalUnavailable) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    return 0
