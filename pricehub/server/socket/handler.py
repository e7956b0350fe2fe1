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
from pricehub.server.socket.session import Session, SessionClosed
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode, DisconnectReason

__all__ = ["market_socket", "prices_socket"]

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
        unknown = [zone for zone in zones if zone not in app[SETTINGS].zone_set]
        if unknown:
            refusal, code = "unknown_zone", CloseCode.POLICY
            message = f"unknown zone {unknown[0][:40]}"
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
    app = request.app
    settings, stats = app[SETTINGS], app[STATS]
    storage, broadcaster = app[STORAGE], app[BROADCASTER]
    transport = request.transport
    assert transport is not None  # prepare() succeeded, so the socket is open
    connection = Connection(
        ws=ws,
        transport=transport,
        scheduler=broadcaster,
        limits=app[SEND_LIMITS],
    )
    conn_log = log.bind(connection_id=connection.id, zone=",".join(zones), remote=remote)
    session = Session(
        connection=connection, settings=settings, storage=storage, broadcaster=broadcaster,
        stats=stats, allowed_zones=grant.zones, single_zone=single_zone,
    )
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
        if bad_since:
            session.send_error("invalid_message", "'since' must be a non-negative integer")
        for zone in zones:
            await session.open_zone(zone, since=since, epoch=epoch)
        await read_loop(ws, session)
        reason = connection.disconnect_reason or read_loop_reason(ws)
        if reason == DisconnectReason.PROTOCOL:
            stats.protocol_errors["message_too_large"] += 1
    except SessionClosed as exc:
        reason = exc.disconnect_reason
        # Bounded: a client that stopped reading cannot hold this handler (close_socket).
        await broadcaster.close_now(connection, exc.code, exc.reason, reason=reason)
    except AuthError as exc:
        reason = DisconnectReason.AUTH
        await broadcaster.close_now(connection, exc.close_code, exc.message, reason=reason)
    except ConnectionResetError:  # e.g. answering a ping as the client vanished
        reason = connection.disconnect_reason or DisconnectReason.CLIENT
    except asyncio.CancelledError:
        reason = connection.disconnect_reason or DisconnectReason.SHUTDOWN
        raise
    except Exception:
        reason = DisconnectReason.ERROR
        stats.connection_errors += 1
        conn_log.exception("connection_failed")
        await broadcaster.close_now(
            connection, CloseCode.INTERNAL_ERROR, "internal error", reason=reason
        )
    finally:
        if expiry is not None:
            expiry.cancel()
        connection.closing = True
        broadcaster.remove(connection)
        stats.connection_closed(connection, reason)
        conn_log.info(
            "disconnected", reason=reason, close_code=ws.close_code,
            duration_s=round(time.monotonic() - started, 3),
            messages_sent=connection.messages_sent, messages_received=connection.messages_received,
        )
    return ws


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


async def read_loop(ws: web.WebSocketResponse, session: Session) -> None:
    connection = session.connection
    async for message in ws:
        connection.touch()
        if message.type is WSMsgType.TEXT:
            await session.handle_text(message.data)
        elif message.type is WSMsgType.BINARY:
            await session.handle_binary()
        elif message.type is WSMsgType.PING:
            if session.admit_message():  # pings count against the rate like any frame
                await ws.pong(message.data)
        elif message.type is WSMsgType.ERROR:
            break
        # PONG: touching the connection was all it was for.


def read_loop_reason(ws: web.WebSocketResponse) -> str:
    """Why the read loop ended, when no server-side closer said so."""
    exc: Any = ws.exception()
    if exc is not None and getattr(exc, "code", None) == CloseCode.MESSAGE_TOO_BIG:
        return DisconnectReason.PROTOCOL
    return DisconnectReason.CLIENT
