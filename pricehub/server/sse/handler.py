"""The two SSE endpoints (``PROTOCOL.md``, "Server-Sent Events transport").

Same admission as the WebSocket, answered with HTTP status codes before the stream
starts (there is no close frame to carry a code): 403 Origin, 503 over a connection
limit, 401 token, 404 unknown zone, 403 zone not allowed by the token, 422 too many
zones, 400 malformed ``since`` or ``Last-Event-ID``. Then ``retry: 1000``, the
``connection_established`` event, and each zone opened exactly as on the WebSocket
(``Session.resume``: initial data, or a resume from the cursor with the same
``recovered`` rules). From then on the broadcaster writes to the stream; this handler
only waits for the stream to end (server close, shutdown, client gone) and writes the
terminating chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import orjson
import structlog
from aiohttp import hdrs, web

from pricehub.server.errors import AuthError
from pricehub.server.keys import (
    BROADCASTER,
    LIMITS,
    SEND_LIMITS,
    SETTINGS,
    STATS,
    STORAGE,
    VERIFIER,
)
from pricehub.server.policy.admission import normalise_origin, origin_allowed
from pricehub.server.policy.auth import Grant, request_token
from pricehub.server.socket.driver import Driver
from pricehub.server.socket.handler import close_at_expiry
from pricehub.server.socket.session import Session, SessionPolicy
from pricehub.server.sse.connection import SseConnection
from pricehub.wire import messages, sse
from pricehub.wire.codes import DisconnectReason, HttpErrorCode
from pricehub.wire.errors import ProtocolError

__all__ = ["market_stream", "prices_stream"]

log = structlog.get_logger("pricehub.sse")


class Refused(Exception):
    """Admission said no: the HTTP status, a stable error code, a message, a stats key."""

    def __init__(self, status: int, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reason = reason or code  # the rejected-connections key (as on the WebSocket)


async def market_stream(request: web.Request) -> web.StreamResponse:
    """``/api/ws/sse/market/{zone}``: one zone; ``since``/``epoch`` or ``Last-Event-ID``."""
    return await serve_stream(request, zones=(request.match_info["zone"],), single_zone=True)


async def prices_stream(request: web.Request) -> web.StreamResponse:
    """``/api/ws/sse/prices?zones=a,b``: several zones (default: all)."""
    raw = request.query.get("zones")
    zones = (
        request.app[SETTINGS].zones
        if raw is None
        else tuple(dict.fromkeys(z.strip() for z in raw.split(",") if z.strip()))
    )
    return await serve_stream(request, zones=zones, single_zone=False)


async def serve_stream(
    request: web.Request, *, zones: tuple[str, ...], single_zone: bool
) -> web.StreamResponse:
    app = request.app
    remote = request.remote or "unknown"
    try:
        grant, resume = admit(request, zones, single_zone=single_zone)
        over = app[LIMITS].acquire(remote)
        if over is not None:
            message = "server over its connection limit"
            raise Refused(503, HttpErrorCode.OVER_CAPACITY, message, f"limit_{over}")
    except Refused as refused:
        app[STATS].rejected_connections[refused.reason] += 1
        log.info("stream_rejected", reason=refused.reason, status=refused.status, remote=remote)
        return error_response(request, refused)
    try:
        return await run_stream(request, zones, resume, grant=grant, single_zone=single_zone)
    finally:
        app[LIMITS].release(remote)


def admit(
    request: web.Request, zones: tuple[str, ...], *, single_zone: bool
) -> tuple[Grant, ResumeFrom]:
    """Origin, token, zones and cursor, in that order; raises ``Refused``. Returns the
    grant and where to resume."""
    settings = request.app[SETTINGS]
    if not origin_allowed(request, settings.allowed_origins):
        raise Refused(403, HttpErrorCode.ORIGIN_NOT_ALLOWED, "origin not allowed", "origin")
    try:
        grant = request.app[VERIFIER].verify(request_token(request))
    except AuthError as exc:
        raise Refused(401, HttpErrorCode.INVALID_TOKEN, exc.message, "auth") from None
    unknown = [zone for zone in zones if zone not in settings.zone_set]
    if unknown:
        message = messages.unknown_zone_text(unknown[0], settings.zone_set)
        raise Refused(404, HttpErrorCode.UNKNOWN_ZONE, message)
    if grant.zones is not None and not set(zones) <= grant.zones:
        raise Refused(403, HttpErrorCode.FORBIDDEN_ZONE, "token does not allow this zone")
    # Also at most sse.MAX_STREAM_ZONES, whatever --max-zones-per-socket allows: the
    # bound under which every cursor the stream writes fits a Last-Event-ID header.
    limit = min(settings.max_zones_per_socket, sse.MAX_STREAM_ZONES)
    if not zones or len(zones) > limit:
        raise Refused(
            422, HttpErrorCode.TOO_MANY_ZONES, f"a stream carries 1 to {limit} zones",
            "too_many_zones",
        )  # fmt: skip
    return grant, resume_points(request, zones, single_zone=single_zone)


@dataclass(frozen=True, slots=True)
class ResumeFrom:
    """Per zone, the last seq the client has (a zone missing: start fresh), and the epoch
    those seqs belong to (None: trusted to be the current one, as on the WebSocket)."""

    since: dict[str, int] = field(default_factory=dict)
    epoch: str | None = None


def resume_points(
    request: web.Request, zones: tuple[str, ...], *, single_zone: bool
) -> ResumeFrom:
    """``Last-Event-ID`` (what EventSource sends on its own reconnects) wins over the
    ``since``/``epoch`` query of the single-zone stream."""
    last_id = request.headers.get("Last-Event-ID")
    if last_id:
        try:
            cursor = sse.decode_cursor(last_id, zones)
        except ProtocolError as exc:
            raise Refused(400, HttpErrorCode.INVALID_CURSOR, exc.message) from None
        return ResumeFrom(dict(cursor.seqs), cursor.epoch)
    since_raw = request.query.get("since")
    if not single_zone or since_raw is None:
        return ResumeFrom()
    since = messages.parse_count(since_raw)
    if since is None:
        message = "'since' must be a non-negative integer"
        raise Refused(400, HttpErrorCode.INVALID_SINCE, message)
    return ResumeFrom({zones[0]: since}, request.query.get("epoch") or None)


def error_response(request: web.Request, refused: Refused) -> web.Response:
    headers = cors_headers(request)
    if refused.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(
        status=refused.status, content_type="application/json", headers=headers,
        body=orjson.dumps({"error": refused.code, "message": refused.message}),
    )  # fmt: skip


def cors_headers(request: web.Request) -> dict[str, str]:
    """An allowed cross-origin page may read the stream, and the reason of a refusal.
    A disallowed Origin gets no CORS header (its refusal included: echoing it with
    credentials would let that page read the answer), only ``Vary``."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return {}
    if not origin_allowed(request, request.app[SETTINGS].allowed_origins):
        return {hdrs.VARY: hdrs.ORIGIN}
    return {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: normalise_origin(origin),
        hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS: "true",
        hdrs.VARY: hdrs.ORIGIN,
    }


def stop_parsing(request: web.Request) -> None:
    """An SSE client sends nothing after its request, so nothing it sends is read as HTTP
    any more: aiohttp would otherwise parse those bytes as further (pipelined) requests
    and queue a parse error per 256 KiB read (the chunk and its repr, up to 32 of them:
    39 MB of NULs per stream) that nobody ever takes, since this handler runs until the
    stream ends. ``RequestHandler.close`` ("stop accepting new pipelining messages")
    makes aiohttp drop what arrives unread, while it keeps reading, so a client that
    closes or resets is still seen at once (pausing the transport would hide that until
    a write failed). Called before the handler's first await, so at most what arrived
    before the handler ran was parsed (bytes in the request's own read make aiohttp
    answer 400 instead: no stream starts)."""
    request.protocol.close()


async def start_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through, do not buffer them
            **cors_headers(request),
        }
    )
    response.force_close()  # one stream per connection: never reused for keep-alive
    await response.prepare(request)
    # Sends the headers too (aiohttp holds them until the first write); from here on the
    # broadcaster writes chunks straight to the transport.
    await response.write(sse.RETRY)
    return response


async def run_stream(
    request: web.Request,
    zones: tuple[str, ...],
    resume: ResumeFrom,
    *,
    grant: Grant,
    single_zone: bool,
) -> web.StreamResponse:
    app = request.app
    settings, stats, storage = app[SETTINGS], app[STATS], app[STORAGE]
    broadcaster = app[BROADCASTER]
    stop_parsing(request)
    response = await start_response(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        return response
    connection = SseConnection(
        zones=zones, epoch=storage.epoch, ws=response, transport=transport,
        scheduler=broadcaster, limits=app[SEND_LIMITS],
    )  # fmt: skip
    session = Session(
        SessionPolicy.from_settings(
            settings, allowed_zones=grant.zones, single_zone=zones[0] if single_zone else None,
            zone_status=broadcaster.zone_status,
        )
    )
    driver = Driver(connection, storage=storage, broadcaster=broadcaster, stats=stats)
    stream_log = log.bind(connection_id=connection.id, zone=",".join(zones), remote=request.remote)
    broadcaster.add(connection)
    stats.total_connections += 1
    started = time.monotonic()
    stream_log.info("connected", transport="sse")
    # Access ends with the token, whatever the stream is doing then (the opening replay
    # included): at ``exp`` the stream is sealed and ended, as the WebSocket gets 4001.
    expiry = close_at_expiry(broadcaster, connection, grant.expires_at)
    reason: str = DisconnectReason.CLIENT
    try:
        connection.send(established(connection, zones, single_zone=single_zone, app=app))
        await driver.run(session.resume(zones, since=resume.since, epoch=resume.epoch))
        await connection.finished.wait()
        reason = connection.disconnect_reason or DisconnectReason.CLIENT
    except asyncio.CancelledError:
        reason = connection.disconnect_reason or DisconnectReason.SHUTDOWN
        raise
    except Exception:
        reason = DisconnectReason.ERROR
        stats.connection_errors += 1
        stream_log.exception("stream_failed")
    finally:
        if expiry is not None:
            expiry.cancel()
        await finish(response, connection, grace=settings.shutdown_grace)
        broadcaster.remove(connection)
        stats.connection_closed(connection, reason)
        stream_log.info(
            "disconnected", transport="sse", reason=reason,
            duration_s=round(time.monotonic() - started, 3),
            messages_sent=connection.messages_sent,
        )  # fmt: skip
    return response


def established(
    connection: SseConnection, zones: tuple[str, ...], *, single_zone: bool, app: web.Application
) -> bytes:
    payload = messages.connection_established(
        connection_id=connection.id, zones=zones, single_zone=single_zone,
        backend=app[STORAGE].backend, epoch=connection.epoch,
        heartbeat_interval=app[SETTINGS].heartbeat_interval, now=messages.utc_now(),
    )  # fmt: skip
    # The contract's one SSE-only field; spliced in after the type (which must stay first).
    head, _, rest = payload.partition(b",")
    return head + b',"transport":"sse",' + rest


async def finish(response: web.StreamResponse, connection: SseConnection, *, grace: float) -> None:
    """End the stream: seal the connection (nothing follows), write what it holds and the
    terminating chunk, bounded by the close grace (a client that stopped reading cannot
    hold the handler), then let ``end`` return."""
    if not connection.closing:
        connection.scheduler.seal(connection)
    transport = connection.transport
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(grace):
            if not transport.is_closing():
                await response.write_eof()
    if transport.get_write_buffer_size():
        transport.abort()
    connection.ended.set()


