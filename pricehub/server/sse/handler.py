"""The two SSE endpoints (``PROTOCOL.md``, "Server-Sent Events transport"): SSE's part of
the subscriber lifecycle.

``subscriber.lifecycle.serve`` admits, sets up, runs and tears down exactly as for a
WebSocket; a refusal is answered with the HTTP status of ``wire.refusals`` before the
stream starts (there is no close frame to carry a code): 403 Origin, 503 over a
connection limit, 401 token, 404 unknown zone, 403 zone not allowed by the token, 422
too many zones, 400 malformed ``since`` (a seq on the one-zone path, a ``pjm:12,ercot:40``
vector on the several-zones path, both with ``epoch``) or ``Last-Event-ID``. Then
``retry: 1000``, the ``connection_established`` event, and each zone opened exactly as
on the WebSocket (``Session.resume``: initial data, or a resume from the cursor with the
same ``recovered`` rules). From then on the broadcaster writes to the stream; this adapter
only waits for the stream to end (server close, shutdown, client gone) and ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import hdrs, web

from pricehub.server.fanout.connection import Connection
from pricehub.server.fanout.lag import SSE
from pricehub.server.keys import BROADCASTER, SEND_LIMITS, SETTINGS, STORAGE
from pricehub.server.policy.admission import Refusal, normalise_origin, origin_allowed
from pricehub.server.sse.connection import EVENTS, SseConnection
from pricehub.server.subscriber.driver import Driver
from pricehub.server.subscriber.lifecycle import (
    Subscription,
    http_refusal,
    requested_zones,
    serve,
    url_rate,
)
from pricehub.server.subscriber.session import Job, Session
from pricehub.wire import messages, paths, sse
from pricehub.wire.codes import CloseCode, DisconnectReason
from pricehub.wire.errors import ProtocolError
from pricehub.wire.refusals import RefusalReason

__all__ = ["SseTransport", "install", "market_stream", "prices_stream"]

log = structlog.get_logger("pricehub.sse")


def install(app: web.Application) -> None:
    """The SSE routes, and its encoding registered with the broadcaster."""
    app[BROADCASTER].register(EVENTS)
    app.router.add_get(paths.SSE_MARKET, market_stream)
    app.router.add_get(paths.SSE_PRICES, prices_stream)


async def market_stream(request: web.Request) -> web.StreamResponse:
    """``/api/ws/sse/market/{zone}``: one zone; ``since``/``epoch`` or ``Last-Event-ID``."""
    transport = SseTransport(request, (request.match_info["zone"],), single_zone=True)
    return await serve(request, transport, transport.subscription)


async def prices_stream(request: web.Request) -> web.StreamResponse:
    """``/api/ws/sse/prices?zones=a,b``: several zones (default: all)."""
    transport = SseTransport(request, requested_zones(request), single_zone=False)
    return await serve(request, transport, transport.subscription)


@dataclass(frozen=True, slots=True)
class ResumeFrom:
    """Per zone, the last seq the client has (a zone missing: start fresh), and the epoch
    those seqs belong to (None: trusted to be the current one, as on the WebSocket)."""

    since: dict[str, int] = field(default_factory=dict)
    epoch: str | None = None


def resume_points(
    request: web.Request, zones: tuple[str, ...], *, single_zone: bool
) -> ResumeFrom | Refusal:
    """``Last-Event-ID`` (what EventSource sends on its own reconnects) wins over the
    ``since``/``epoch`` query: one seq on the single-zone stream, a vector of seqs
    (``since=pjm:12,ercot:40``) on the several-zones one."""
    last_id = request.headers.get(paths.LAST_EVENT_ID)
    if last_id:
        try:
            cursor = sse.decode_cursor(last_id, zones)
        except ProtocolError as exc:
            return Refusal(RefusalReason.INVALID_CURSOR, exc.message)
        return ResumeFrom(dict(cursor.seqs), cursor.epoch)
    since_raw = request.query.get(messages.SINCE)
    if since_raw is None:
        return ResumeFrom()
    epoch = request.query.get(messages.EPOCH) or None
    if not single_zone:
        try:
            return ResumeFrom(messages.parse_since_vector(since_raw, frozenset(zones)), epoch)
        except ProtocolError as exc:
            return Refusal(RefusalReason.INVALID_SINCE, exc.message)
    since = messages.parse_count(since_raw)
    if since is None:
        return Refusal(RefusalReason.INVALID_SINCE, "'since' must be a non-negative integer")
    return ResumeFrom({zones[0]: since}, epoch)


class SseTransport:
    """One SSE request's adapter (``lifecycle.Transport``)."""

    __slots__ = ("_response", "request", "resume", "subscription", "zones")
    log: Any = log

    def __init__(self, request: web.Request, zones: tuple[str, ...], *, single_zone: bool) -> None:
        self.request = request
        self.zones = zones
        resume = resume_points(request, zones, single_zone=single_zone)
        self.resume = resume if isinstance(resume, ResumeFrom) else ResumeFrom()
        # Also at most sse.MAX_STREAM_ZONES, whatever --max-zones-per-socket allows: the
        # bound under which every cursor the stream writes fits a Last-Event-ID header.
        most = min(request.app[SETTINGS].max_zones_per_socket, sse.MAX_STREAM_ZONES)
        max_rate = url_rate(request)  # the cursor's refusal first, then the rate's
        late = resume if isinstance(resume, Refusal) else None
        if late is None and isinstance(max_rate, Refusal):
            late = max_rate
        self.subscription = Subscription(
            zones=zones, single_zone=zones[0] if single_zone else None, fewest_zones=1,
            most_zones=most, late=late, announce=SSE,
            max_rate=None if isinstance(max_rate, Refusal) else max_rate,
        )  # fmt: skip
        self._response: web.StreamResponse | None = None

    @property
    def response(self) -> web.StreamResponse:
        assert self._response is not None  # after ``start``
        return self._response

    async def refuse(self, refusal: Refusal) -> web.StreamResponse:
        return http_refusal(refusal, headers=cors_headers(self.request))

    async def start(self) -> Connection | None:
        request = self.request
        stop_parsing(request)
        response = self._response = await start_response(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return None
        app = request.app
        return SseConnection(
            zones=self.zones, epoch=app[STORAGE].epoch, response=response, transport=transport,
            scheduler=app[BROADCASTER], limits=app[SEND_LIMITS],
            close_grace=app[SETTINGS].shutdown_grace,
        )  # fmt: skip

    def open(self, session: Session) -> Job:
        return session.resume(self.zones, since=self.resume.since, epoch=self.resume.epoch)

    async def wait(self, driver: Driver, session: Session) -> str:
        connection = driver.connection
        assert isinstance(connection, SseConnection)
        await connection.finished.wait()
        return connection.disconnect_reason or DisconnectReason.CLIENT

    async def finish(self, connection: Connection) -> None:
        """End the stream: seal the connection (nothing follows), then the terminating
        chunk (``SseConnection.end``: once, bounded by the close grace)."""
        if not connection.closing:
            connection.scheduler.seal(connection)
        await connection.end(CloseCode.NORMAL, b"")

    def close_code(self) -> int | None:
        return None  # a stream ends without a code


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
