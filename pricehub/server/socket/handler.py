"""The two WebSocket endpoints: admission, upgrade, the read loop and teardown."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from pricehub.server.errors import AuthError
from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.keys import (
    BROADCASTER,
    LIMITS,
    SEND_LIMITS,
    SETTINGS,
    STATS,
    STORAGE,
    VERIFIER,
)
from pricehub.server.policy.admission import origin_allowed
from pricehub.server.policy.auth import Grant
from pricehub.server.socket.compression import BroadcastWebSocketResponse
from pricehub.server.socket.connection import Connection
from pricehub.server.socket.driver import Driver
from pricehub.server.socket.session import Session, SessionPolicy
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode, DisconnectReason, ErrorCode

__all__ = ["FAILURES", "failure", "market_socket", "prices_socket"]

log = structlog.get_logger("pricehub.ws")


async def market_socket(request: web.Request) -> web.StreamResponse:
    """``/api/ws/ws/market/{zone}``: one zone, resumable with ``since`` and ``epoch``."""
    zone = request.match_info["zone"]
    since_raw = request.query.get("since")
    since = None if since_raw is None else messages.parse_count(since_raw)
    return await serve_socket(
        request,
        zones=(zone,),
        single_zone=zone,
        since=since,
        epoch=request.query.get("epoch") or None,
        bad_since=since_raw is not None and since is None,
    )


async def prices_socket(request: web.Request) -> web.StreamResponse:
    """``/api/ws/ws/prices?zones=a,b``: several zones (default all; ``zones=`` none,
    for clients that resume every zone with a ``subscribe`` message)."""
    raw = request.query.get("zones")
    zones = (
        request.app[SETTINGS].zones
        if raw is None
        else tuple(dict.fromkeys(z.strip() for z in raw.split(",") if z.strip()))
    )
    return await serve_socket(request, zones=zones, single_zone=None, since=None, epoch=None)


async def serve_socket(
    request: web.Request,
    *,
    zones: tuple[str, ...],
    single_zone: str | None,
    since: int | None,
    epoch: str | None,
    bad_since: bool = False,
) -> web.StreamResponse:
    app = request.app
    settings, stats = app[SETTINGS], app[STATS]
    if not origin_allowed(request, settings.allowed_origins):
        stats.rejected_connections["origin"] += 1
        raise web.HTTPForbidden(text="origin not allowed")
    ws = BroadcastWebSocketResponse(
        autoping=False,
        max_msg_size=settings.max_frame_size,
        compress=settings.compression,
        timeout=settings.shutdown_grace,
    )
    await ws.prepare(request)
    remote = request.remote or "unknown"
    grant = await admit(request, ws, zones, remote)
    if grant is None:
        return ws
    try:
        return await run_connection(
            request, ws, zones=zones, single_zone=single_zone, since=since, epoch=epoch,
            bad_since=bad_since, remote=remote, grant=grant,
        )
    finally:
        app[LIMITS].release(remote)


async def admit(
    request: web.Request, ws: web.WebSocketResponse, zones: tuple[str, ...], remote: str
) -> Grant | None:
    """Limits, token and zones, in that order; closes the socket and says why if refused.

    Returns what the token grants, or None when the socket was refused.
    """
    app = request.app
    stats = app[STATS]
    over = app[LIMITS].acquire(remote)
    if over is not None:
        stats.rejected_connections[f"limit_{over}"] += 1
        log.info(
            "connection_rejected", reason=f"limit_{over}", close_code=CloseCode.TRY_AGAIN_LATER,
            remote=remote,
        )
        await ws.close(code=CloseCode.TRY_AGAIN_LATER, message=b"server over its connection limit")
        return None
    refusal, code, message, grant = None, 0, "", None
    try:
        grant = app[VERIFIER].verify(request.query.get("token"))
        allowed = grant.zones
        zone_set = app[SETTINGS].zone_set
        unknown = [zone for zone in zones if zone not in zone_set]
        if unknown:
            refusal, code = "unknown_zone", CloseCode.POLICY
            message = messages.unknown_zone_text(unknown[0], zone_set)
        elif allowed is not None and not set(zones) <= allowed:
            refusal, code = "forbidden_zone", CloseCode.FORBIDDEN_ZONE
            message = "token does not allow this zone"
        elif len(zones) > app[SETTINGS].max_zones_per_socket:
            refusal, code, message = "too_many_zones", CloseCode.POLICY, "too many zones"
    except AuthError as exc:
        refusal, code, message = "auth", exc.close_code, exc.message
    if refusal is None:
        return grant
    app[LIMITS].release(remote)
    stats.rejected_connections[refusal] += 1
    log.info("connection_rejected", reason=refusal, close_code=code, remote=remote)
    await ws.close(code=code, message=messages.close_reason(message))
    return None


# How a connection ends on an exception: its DisconnectReason, and the close code to send
# (None: nothing to send, the socket is gone or closing already). The first matching row
# wins. When pricehub closes because of the exception, the exception is the reason;
# otherwise a server-side closer that already said why (``disconnect_reason``) wins.
FAILURES: tuple[tuple[type[BaseException], DisconnectReason, CloseCode | None], ...] = (
    (ConnectionResetError, DisconnectReason.CLIENT, None),  # e.g. a pong to a vanished client
    (asyncio.CancelledError, DisconnectReason.SHUTDOWN, None),  # re-raised
    (Exception, DisconnectReason.ERROR, CloseCode.INTERNAL_ERROR),  # logged, counted
)


def failure(exc: BaseException) -> tuple[DisconnectReason, CloseCode | None] | None:
    """The ``FAILURES`` row of ``exc`` (None: not ours to handle, e.g. KeyboardInterrupt)."""
    for kind, reason, code in FAILURES:
        if isinstance(exc, kind):
            return reason, code
    return None


async def run_connection(
    request: web.Request,
    ws: web.WebSocketResponse,
    *,
    zones: tuple[str, ...],
    single_zone: str | None,
    since: int | None,
    epoch: str | None,
    bad_since: bool,
    remote: str,
    grant: Grant,
) -> web.WebSocketResponse:
    """Set up, run the session until the socket ends, tear down (log and count)."""
    app = request.app
    settings, stats, storage, broadcaster = (
        app[SETTINGS], app[STATS], app[STORAGE], app[BROADCASTER]
    )
    transport = request.transport
    assert transport is not None  # prepare() succeeded, so the socket is open
    connection = Connection(
        ws=ws, transport=transport, scheduler=broadcaster, limits=app[SEND_LIMITS]
    )
    session = Session(
        SessionPolicy.from_settings(
            settings, allowed_zones=grant.zones, single_zone=single_zone,
            zone_status=broadcaster.zone_status,
        )
    )
    driver = Driver(connection, storage=storage, broadcaster=broadcaster, stats=stats)
    conn_log = log.bind(connection_id=connection.id, zone=",".join(zones), remote=remote)
    broadcaster.add(connection)
    expiry = close_at_expiry(broadcaster, connection, grant.expires_at)
    stats.total_connections += 1
    started = time.monotonic()
    conn_log.info("connected")
    reason: str = DisconnectReason.CLIENT
    try:
        connection.send(
            messages.connection_established(
                connection_id=connection.id, zones=zones, single_zone=single_zone is not None,
                backend=storage.backend, epoch=storage.epoch,
                heartbeat_interval=settings.heartbeat_interval, now=messages.utc_now(),
            )
        )
        await driver.run(session.start(zones, since=since, epoch=epoch, bad_since=bad_since))
        await read_loop(ws, session, driver)
        reason = connection.disconnect_reason or read_loop_reason(ws)
    except BaseException as exc:
        outcome = failure(exc)
        if outcome is None:
            raise
        reason = await end_on_failure(outcome, driver, conn_log)
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        if expiry is not None:
            expiry.cancel()
        teardown(driver, reason, conn_log, duration=time.monotonic() - started)
    return ws


async def end_on_failure(
    outcome: tuple[DisconnectReason, CloseCode | None], driver: Driver, conn_log: Any
) -> str:
    """Apply a ``FAILURES`` row; returns the disconnect reason."""
    reason, code = outcome
    connection = driver.connection
    if code is None:
        return connection.disconnect_reason or reason
    driver.stats.connection_errors += 1
    conn_log.exception("connection_failed")
    await driver.broadcaster.close_now(connection, code, "internal error", reason=reason)
    return reason


def teardown(driver: Driver, reason: str, conn_log: Any, *, duration: float) -> None:
    """Unregister, count and log one ended connection."""
    connection, stats = driver.connection, driver.stats
    connection.closing = True
    driver.broadcaster.remove(connection)
    if reason == DisconnectReason.PROTOCOL:
        stats.protocol_errors[ErrorCode.MESSAGE_TOO_LARGE] += 1
    stats.connection_closed(connection, reason)
    conn_log.info(
        "disconnected", reason=reason, close_code=close_code_of(connection.ws),
        duration_s=round(duration, 3),
        messages_sent=connection.messages_sent, messages_received=connection.messages_received,
    )


def close_code_of(ws: web.StreamResponse) -> int | None:
    """The close code that ended the socket: the one pricehub sent, if it closed first
    (aiohttp's ``close_code`` is then the client's answer), else the client's."""
    if not isinstance(ws, web.WebSocketResponse):
        return None
    sent = ws.sent_close_code if isinstance(ws, BroadcastWebSocketResponse) else None
    return sent if sent is not None else ws.close_code


def close_at_expiry(
    broadcaster: Broadcaster, connection: Connection, expires_at: float | None
) -> asyncio.TimerHandle | None:
    """Access ends with the token: at its ``exp`` the socket is closed with 4001."""
    if expires_at is None:
        return None
    close = functools.partial(
        broadcaster.close, connection, CloseCode.INVALID_TOKEN, "token expired",
        reason=DisconnectReason.AUTH,
    )
    return asyncio.get_running_loop().call_later(max(0.0, expires_at - time.time()), close)


async def read_loop(ws: web.WebSocketResponse, session: Session, driver: Driver) -> None:
    """Each frame is one session job, run to its end before the next frame is read: a
    client's requests are answered one at a time, in order, and a client that sends
    faster than its answers drain is held back by TCP."""
    connection = driver.connection
    async for message in ws:
        connection.touch()
        kind = message.type
        if kind is WSMsgType.TEXT:
            job = session.text(message.data)
        elif kind is WSMsgType.BINARY:
            job = session.binary()
        elif kind is WSMsgType.PING:
            job = session.ping(message.data)
        elif kind is WSMsgType.PONG:
            job = session.pong()
        elif kind is WSMsgType.ERROR:
            break
        else:
            continue
        connection.messages_received += 1
        await driver.run(job)


def read_loop_reason(ws: web.WebSocketResponse) -> str:
    """Why the read loop ended, when no server-side closer said so."""
    exc: Any = ws.exception()
    if exc is not None and getattr(exc, "code", None) == CloseCode.MESSAGE_TOO_BIG:
        return DisconnectReason.PROTOCOL
    return DisconnectReason.CLIENT
