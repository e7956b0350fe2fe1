"""Serve one instance until SIGTERM/SIGINT, then shut down gracefully and exit 0.

Shutdown order: stop accepting, close every socket with 1001 (``on_shutdown``), stop
the background tasks and the storage (``cleanup_ctx``), all within ``shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys

import structlog
from aiohttp import web

from pricehub.server.app import create_app
from pricehub.server.logs import AccessLogger
from pricehub.server.settings import Settings
from pricehub.storage.journal import JournalUnavailable

__all__ = ["serve", "serve_async"]

log = structlog.get_logger("pricehub.server")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve_async(settings: Settings, *, reuse_port: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.shutdown_grace,
    )
    await runner.setup()
    try:
        context = ssl_context(settings)
        site = web.TCPSite(
            runner, settings.host, settings.port, ssl_context=context, reuse_port=reuse_port,
            backlog=1024,
        )
        await site.start()
        scheme = "https" if context else "http"
        log.info(
            "listening", url=f"{scheme}://{settings.host}:{settings.port}",
            zones=list(settings.zones), simulator=settings.simulator_enabled,
        )
        await stop.wait()
        log.info("shutting_down")
    finally:
        await runner.cleanup()
    log.info("stopped")


def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    """Run until a signal; returns the process exit code (2: the data dir is locked by
    another process or unusable, with ``--redis-url none``: one line on stderr)."""
    try:
        asyncio.run(serve_async(settings, reuse_port=reuse_port))
    except JournalUnavailable as exc:
        print(f"pricehub: {exc}", file=sys.stderr)
        return 2
    return 0
