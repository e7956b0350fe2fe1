"""The two WebSocket endpoints: the WebSocket's part of the subscriber lifecycle.

``subscriber.lifecycle.serve`` admits, sets up, runs and tears down; this adapter only
refuses (HTTP 403 before the upgrade for a browser Origin, a close code after it for the
rest), upgrades, opens the zones from the URL, reads the client's frames until the
socket ends, and says which close code ended it.

Both URLs resume on the URL: ``since=N&epoch=E`` on the one-zone path, a vector
``since=pjm:12,ercot:40&epoch=E`` on the several-zones path. A malformed ``since`` of
either is no refusal: an ``error`` ``invalid_message`` once the socket is open, and the
zones then open fresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from pricehub.server.fanout.connection import Connection
from pricehub.server.keys import BROADCASTER, SEND_LIMITS, SETTINGS
from pricehub.server.policy.admission import Refusal
from pricehub.server.socket.compression import BroadcastWebSocketResponse
from pricehub.server.socket.connection import WsConnection, WsEncodings
from pricehub.server.subscriber.driver import Driver
from pricehub.server.subscriber.lifecycle import (
    Subscription,
    http_refusal,
    requested_zones,
    serve,
    url_rate,
)
from pricehub.server.subscriber.session import Job, Session
from pricehub.wire import messages, paths
from pricehub.wire.codes import CloseCode, DisconnectReason
from pricehub.wire.errors import ProtocolError

__all__ = ["WS_ENCODINGS", "WsTransport", "install", "market_socket", "prices_socket"]

log = structlog.get_logger("pricehub.ws")
# The WebSocket's encodings, registered with the app's broadcaster (``install``).
WS_ENCODINGS = web.AppKey("ws_encodings", WsEncodings)


def install(app: web.Application) -> None:
    """The WebSocket routes, and its encodings registered with the broadcaster."""
    encodings = app[WS_ENCODINGS] = WsEncodings()
    app[BROADCASTER].register(*encodings.all())
    app.router.add_get(paths.WS_MARKET, market_socket)
    app.router.add_get(paths.WS_PRICES, prices_socket)


async def market_socket(request: web.Request) -> web.StreamResponse:
    """``/api/ws/ws/market/{zone}``: one zone, resumable with ``since`` and ``epoch``."""
    zone = request.match_info["zone"]
    since_raw = request.query.get(messages.SINCE)
    since = None if since_raw is None else messages.parse_count(since_raw)
    transport = WsTransport(
        request, (zone,), single_zone=zone, since=since,
        epoch=request.query.get(messages.EPOCH) or None,
        bad_since=since_raw is not None and since is None,
    )  # fmt: skip
    return await serve(request, transport, transport.subscription)


async def prices_socket(request: web.Request) -> web.StreamResponse:
    """``/api/ws/ws/prices?zones=a,b``: several zones (default all; ``zones=`` none,
    for clients that resume every zone with a ``subscribe`` message), each resumable
    from a ``since`` vector with ``epoch``."""
    zones = requested_zones(request)
    since_raw = request.query.get(messages.SINCE)
    vector: dict[str, int] | None = None
    bad_since: str | bool = False
    if since_raw is not None:
        try:
            vector = messages.parse_since_vector(since_raw, frozenset(zones))
        except ProtocolError as exc:
            bad_since = exc.message
    transport = WsTransport(
        request, zones, since=vector, epoch=request.query.get(messages.EPOCH) or None,
        bad_since=bad_since,
    )  # fmt: skip
    return await serve(request, transport, transport.subscription)


class WsTransport:
    """One WebSocket request's adapter (``lifecycle.Transport``)."""

    __slots__ = ("bad_since", "epoch", "request", "since", "subscription", "ws", "zones")
    log: Any = log

    def __init__(
        self,
        request: web.Request,
        zones: tuple[str, ...],
        *,
        single_zone: str | None = None,
        since: int | Mapping[str, int] | None = None,
        epoch: str | None = None,
        bad_since: bool | str = False,
    ) -> None:
        self.request, self.zones = request, zones
        # A bad ``since`` is no refusal here: an ``error`` message once the socket is open.
        self.since, self.epoch, self.bad_since = since, epoch, bad_since
        settings = request.app[SETTINGS]
        max_rate = url_rate(request)  # a bad one is refused with 400, before the upgrade
        self.subscription = Subscription(
            zones=zones, single_zone=single_zone, fewest_zones=0,
            most_zones=settings.max_zones_per_socket,
            late=max_rate if isinstance(max_rate, Refusal) else None,
            max_rate=None if isinstance(max_rate, Refusal) else max_rate,
        )  # fmt: skip
        self.ws = BroadcastWebSocketResponse(
            autoping=False,
            max_msg_size=settings.max_frame_size,
            compress=settings.compression,
            timeout=settings.shutdown_grace,
        )

    @property
    def response(self) -> web.StreamResponse:
        return self.ws

    async def refuse(self, refusal: Refusal) -> web.StreamResponse:
        """Before the upgrade when the table has no close code for it; else upgraded and
        closed with the code, so a browser learns why (it never sees an HTTP status)."""
        code = refusal.codes.close_code
        if code is None:
            return http_refusal(refusal)
        await self.ws.prepare(self.request)
        await self.ws.close(code=code, message=messages.close_reason(refusal.message))
        return self.ws

    async def start(self) -> Connection | None:
        request, ws = self.request, self.ws
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None  # prepare() succeeded, so the socket is open
        app = request.app
        return WsConnection(
            ws=ws, encodings=app[WS_ENCODINGS], transport=transport,
            scheduler=app[BROADCASTER], limits=app[SEND_LIMITS],
        )  # fmt: skip

    def open(self, session: Session) -> Job:
        return session.start(
            self.zones, since=self.since, epoch=self.epoch, bad_since=self.bad_since
        )

    async def wait(self, driver: Driver, session: Session) -> str:
        await read_loop(self.ws, session, driver)
        return driver.connection.disconnect_reason or read_loop_reason(self.ws)

    async def finish(self, connection: Connection) -> None:
        """Nothing to end: the close handshake is over, or aiohttp's to finish."""

    def close_code(self) -> int | None:
        """The code that ended the socket: the one pricehub sent, if it closed first
        (aiohttp's ``close_code`` is then the client's answer), else the client's."""
        ws = self.ws
        return ws.sent_close_code if ws.sent_close_code is not None else ws.close_code


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
