"""``create_app(settings)``: the aiohttp application and its background tasks.

Background tasks run in ``cleanup_ctx`` contexts: each is created on startup, cancelled
on cleanup and then awaited under ``suppress(CancelledError)``, so a task that crashed
earlier re-raises its real exception here instead of dying silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
import structlog
from aiohttp import web

from pricehub.server import simulator
from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import SendLimits
from pricehub.server.http import api, metrics
from pricehub.server.keys import (
    BROADCASTER,
    INSTANCE_ID,
    LIMITS,
    PUBLISHER,
    SEND_LIMITS,
    SETTINGS,
    STATS,
    STORAGE,
    VERIFIER,
)
from pricehub.server.logs import AccessLogger
from pricehub.server.policy import heartbeat
from pricehub.server.policy.admission import ConnectionLimits
from pricehub.server.policy.auth import TokenVerifier
from pricehub.server.publisher import Publisher
from pricehub.server.settings import Settings
from pricehub.server.socket import handler as ws
from pricehub.server.sse import handler as sse
from pricehub.server.staleness import Staleness
from pricehub.server.stats import Stats
from pricehub.storage import Storage, StorageListener, create_storage
from pricehub.storage.errors import StorageError
from pricehub.wire.codes import CloseCode, DisconnectReason
from pricehub.wire.sse import MAX_CURSOR

__all__ = ["create_app"]

log = structlog.get_logger("pricehub.app")
REGISTRY_INTERVAL = 5.0
LOOP_LAG_INTERVAL = 0.5
MAX_HEADER_FIELD = max(8190, len("Last-Event-ID: ") + MAX_CURSOR)
# With --stale-after: the storage's listener, in front of the broadcaster.
STALENESS = web.AppKey("staleness", Staleness)


def create_app(settings: Settings, *, storage: Storage | None = None) -> web.Application:
    """The pricehub application. ``storage`` overrides the one chosen from the settings."""
    app = web.Application(client_max_size=settings.max_body_size, handler_args={
        "access_log_class": AccessLogger,
        # aiohttp closes a connection that has not sent a whole request by then (idle
        # or slowloris sockets; its default is an hour). Also the HTTP keep-alive idle.
        "keepalive_timeout": settings.handshake_timeout,
        # One header, name and value (aiohttp's default: 8190 bytes): an SSE client's
        # Last-Event-ID must fit the widest cursor the server writes.
        "max_field_size": MAX_HEADER_FIELD,
    })
    storage = storage or create_storage(settings.storage_config(), log=log)
    app[SETTINGS] = settings
    app[STORAGE] = storage
    app[STATS] = Stats()
    app[BROADCASTER] = Broadcaster(zones=settings.zones, flush_delay=settings.flush_delay)
    app[SEND_LIMITS] = SendLimits(
        high_water=settings.send_high_water,
        hard_limit=settings.send_hard_limit,
        lag_timeout=settings.slow_consumer_timeout,
        max_lag=settings.send_max_lag,
    )
    if settings.stale_after > 0:
        app[STALENESS] = Staleness(app[BROADCASTER], stale_after=settings.stale_after)
    app[PUBLISHER] = Publisher(storage)
    app[LIMITS] = ConnectionLimits(
        total=settings.max_connections, per_ip=settings.max_connections_per_ip
    )
    app[VERIFIER] = TokenVerifier.from_settings(settings)
    app[INSTANCE_ID] = uuid.uuid4().hex[:12]
    ws.install(app)  # each transport: its routes, and its encodings for the fan-out
    sse.install(app)
    api.add_routes(app)
    metrics.add_routes(app)
    app.cleanup_ctx.extend([storage_ctx, background_ctx])
    if settings.redis_url is not None:
        from pricehub.server import ingest

        ingest.install(app)
    app.on_shutdown.append(close_all_sockets)
    return app


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    storage = app[STORAGE]
    listener: StorageListener = app[BROADCASTER]
    if STALENESS in app:
        listener = app[STALENESS]
    await storage.start(listener)
    log.info("storage_started", backend=storage.backend, epoch=storage.epoch)
    yield
    await storage.close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """The reaper, conflation monitor, registry, loop-lag probe, staleness sweep and
    simulator."""
    settings, broadcaster, stats = app[SETTINGS], app[BROADCASTER], app[STATS]
    jobs: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "reaper": lambda: heartbeat.run_reaper(
            broadcaster, stats,
            interval=settings.heartbeat_interval, timeout=settings.heartbeat_timeout,
        ),
        "conflation_monitor": broadcaster.run_conflation_monitor,
        "registry": lambda: run_registry(app),
        "loop_lag_probe": lambda: run_loop_lag_probe(stats),
    }
    if settings.simulator_enabled:
        jobs["simulator"] = lambda: simulator.run_simulator(
            app[PUBLISHER], settings.zones, interval=settings.simulate_interval
        )
    staleness = app.get(STALENESS)
    if staleness is not None:
        jobs["staleness"] = lambda: staleness.run(app[STORAGE], settings.zones)
    tasks = [watch(asyncio.create_task(job(), name=name), stats) for name, job in jobs.items()]
    yield
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(StorageError):
        await app[STORAGE].unregister_instance(app[INSTANCE_ID])
    crashes = [result for result in results if isinstance(result, Exception)]
    if crashes:
        raise crashes[0]  # already logged when it happened; surface it at cleanup too


def watch(task: asyncio.Task[None], stats: Stats) -> asyncio.Task[None]:
    """Log a background task's crash when it happens (not only at shutdown) and mark the
    instance unhealthy: a dead reaper or simulator must not go unnoticed for days."""

    def done(finished: asyncio.Task[None]) -> None:
        if finished.cancelled() or finished.exception() is None:
            return
        stats.failed_tasks.append(finished.get_name())
        log.error(
            "background_task_failed", task=finished.get_name(), exc_info=finished.exception()
        )

    task.add_done_callback(done)
    return task


async def run_registry(app: web.Application) -> None:
    """Publish this instance's connection counts for the stats ``cluster`` section."""
    broadcaster = app[BROADCASTER]
    while True:
        snapshot = orjson.dumps(
            {
                "connections": len(broadcaster.connections),
                "connections_by_zone": broadcaster.connections_by_zone(),
            }
        )
        with contextlib.suppress(StorageError):  # failover logs and counts Redis errors
            await app[STORAGE].register_instance(
                app[INSTANCE_ID], snapshot, ttl=3 * REGISTRY_INTERVAL
            )
        await asyncio.sleep(REGISTRY_INTERVAL)


async def run_loop_lag_probe(stats: Stats) -> None:
    """How late the loop wakes a sleeper: the health of everything on this loop."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(LOOP_LAG_INTERVAL)
        stats.loop_lag = max(0.0, time.monotonic() - started - LOOP_LAG_INTERVAL)


async def close_all_sockets(app: web.Application) -> None:
    """Shutdown: every client gets 1001 (going away) so it reconnects with resume."""
    app[STATS].shutting_down = True
    broadcaster = app[BROADCASTER]
    for connection in list(broadcaster.connections):
        broadcaster.close(
            connection, CloseCode.GOING_AWAY, "server shutting down",
            reason=DisconnectReason.SHUTDOWN,
        )
    await broadcaster.drain()
