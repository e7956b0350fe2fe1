"""One subscriber's life, whatever its transport: admit, set up, run, tear down.

``serve`` is the one lifecycle of a WebSocket and of an SSE stream (as centrifuge's
``NewClient(ctx, node, transport)`` serves every transport with one client, and
Starlette's ``WebSocketEndpoint.dispatch`` runs one lifecycle with hooks). A transport is
a small adapter (``Transport``) that knows only its own wire:

1. ``refuse``: answer a ``Refusal`` (a close code, or an HTTP status and JSON error);
2. ``start``: begin the response and make the ``Connection`` that writes to it;
3. ``open``: the session job that opens the zones (a resume, or initial data);
4. ``wait``: until the connection ends (the WebSocket's read loop; an SSE stream has
   nothing to read), returning why;
5. ``finish``: end the response (SSE: the terminating chunk).

Everything else happens here, once, in one order for both: admission (``admit``:
origin, slot, token, zones), the ``connection_established`` message, registration with
the broadcaster, stats, the token's expiry, the ``FAILURES`` table and the teardown
(unregister, count, one ``disconnected`` log line with the same fields).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import Connection
from pricehub.server.http.replies import json_error
from pricehub.server.keys import BROADCASTER, LIMITS, SETTINGS, STATS, STORAGE, VERIFIER
from pricehub.server.policy.admission import Admitted, Gate, Refusal, admit
from pricehub.server.subscriber.driver import Driver
from pricehub.server.subscriber.session import Job, Session, SessionPolicy
from pricehub.wire import messages, rate
from pricehub.wire.codes import CloseCode, DisconnectReason, ErrorCode
from pricehub.wire.refusals import RefusalReason

__all__ = [
    "FAILURES", "Subscription", "Transport", "close_at_expiry", "failure", "http_refusal",
    "requested_zones", "serve", "url_rate",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """What a request asks for, as its transport read it.

    :param zones: the zones to open, in the client's order.
    :param single_zone: the zone of a ``/market/{zone}`` path (None: several zones).
    :param fewest_zones: the fewest zones the transport serves (``Gate``).
    :param most_zones: the most.
    :param late: what the transport found wrong in the request (checked last).
    :param announce: the ``transport`` that ``connection_established`` names (the
        contract's one SSE-only field; None: not named).
    :param max_rate: the URL's ``max_rate`` (None: none asked).
    """

    zones: tuple[str, ...]
    single_zone: str | None
    fewest_zones: int
    most_zones: int
    late: Refusal | None = None
    announce: str | None = None
    max_rate: float | None = None


class Transport(Protocol):
    """A transport's part of the lifecycle (see the module docstring); one per request."""

    log: Any  # its structlog logger

    async def refuse(self, refusal: Refusal) -> web.StreamResponse: ...

    async def start(self) -> Connection | None:
        """The response begun and its connection; None when the client left first."""
        ...

    @property
    def response(self) -> web.StreamResponse: ...

    def open(self, session: Session) -> Job: ...

    async def wait(self, driver: Driver, session: Session) -> str:
        """Until the connection ends; returns the ``DisconnectReason``."""
        ...

    async def finish(self, connection: Connection) -> None: ...

    def close_code(self) -> int | None:
        """The close code that ended it (None: the transport has none)."""
        ...


def requested_zones(request: web.Request) -> tuple[str, ...]:
    """``?zones=a,b`` of a several-zones path, in order, without repeats or blanks
    (absent: every configured zone; ``zones=``: none)."""
    raw = request.query.get("zones")
    if raw is None:
        return request.app[SETTINGS].zones
    return tuple(dict.fromkeys(z.strip() for z in raw.split(",") if z.strip()))


def url_rate(request: web.Request) -> float | Refusal | None:
    """The URL's ``max_rate`` (None: absent), or the refusal of a bad one (400 on both
    transports, before the upgrade or the stream)."""
    raw = request.query.get(rate.FIELD)
    if raw is None:
        return None
    try:
        return rate.parse_url(raw)
    except rate.RateError as exc:
        return Refusal(RefusalReason.INVALID_MAX_RATE, str(exc))


def http_refusal(refusal: Refusal, *, headers: Mapping[str, str] | None = None) -> web.Response:
    """A refusal as an HTTP answer: the table's status and error code."""
    codes = refusal.codes
    answer = dict(headers or {})
    if codes.status == 401:
        answer["WWW-Authenticate"] = "Bearer"
    return json_error(codes.status, codes.error, refusal.message, headers=answer)


async def serve(
    request: web.Request, transport: Transport, subscription: Subscription
) -> web.StreamResponse:
    """The whole life of one subscriber on ``transport``."""
    app = request.app
    admitted = admit(request, Gate(
        settings=app[SETTINGS], limits=app[LIMITS], verifier=app[VERIFIER],
        zones=subscription.zones, fewest_zones=subscription.fewest_zones,
        most_zones=subscription.most_zones, late=subscription.late,
    ))  # fmt: skip
    if isinstance(admitted, Refusal):
        app[STATS].rejected_connections[admitted.reason] += 1
        codes = admitted.codes
        transport.log.info(
            "connection_rejected", reason=admitted.reason, close_code=codes.close_code,
            status=codes.status, remote=request.remote or "unknown",
        )  # fmt: skip
        return await transport.refuse(admitted)
    try:
        connection = await transport.start()
        if connection is not None:
            await Subscriber(request, transport, connection, subscription, admitted).run()
        return transport.response
    finally:
        app[LIMITS].release(admitted.remote)


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


class Subscriber:
    """An admitted subscriber from set-up to teardown."""

    __slots__ = (
        "app", "broadcaster", "connection", "driver", "grant", "log", "session",
        "subscription", "transport",
    )

    def __init__(
        self,
        request: web.Request,
        transport: Transport,
        connection: Connection,
        subscription: Subscription,
        admitted: Admitted,
    ) -> None:
        app = request.app
        self.app, self.transport, self.connection = app, transport, connection
        self.subscription, self.grant = subscription, admitted.grant
        self.broadcaster: Broadcaster = app[BROADCASTER]
        self.session = Session(
            SessionPolicy.from_settings(
                app[SETTINGS], allowed_zones=admitted.grant.zones,
                single_zone=subscription.single_zone, zone_status=self.broadcaster.zone_status,
                max_rate=subscription.max_rate,
            )
        )  # fmt: skip
        self.driver = Driver(
            connection, storage=app[STORAGE], broadcaster=self.broadcaster, stats=app[STATS]
        )
        self.log = transport.log.bind(
            connection_id=connection.id, zone=",".join(subscription.zones),
            remote=admitted.remote, transport=connection.encoding.transport,
        )  # fmt: skip

    async def run(self) -> None:
        """Register, say hello, open the zones, wait for the end; then tear down."""
        connection, broadcaster, stats = self.connection, self.broadcaster, self.app[STATS]
        broadcaster.add(connection)
        # Access ends with the token, whatever the connection is doing then (the opening
        # replay included): at ``exp`` it is closed with 4001 (an SSE stream is ended).
        expiry = close_at_expiry(broadcaster, connection, self.grant.expires_at)
        stats.total_connections += 1
        started = time.monotonic()
        self.log.info("connected")
        reason: str = DisconnectReason.CLIENT
        try:
            connection.send(self.established())
            await self.driver.run(self.transport.open(self.session))
            reason = await self.transport.wait(self.driver, self.session)
        except BaseException as exc:
            outcome = failure(exc)
            if outcome is None:
                raise
            reason = await self.end_on_failure(outcome)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if expiry is not None:
                expiry.cancel()
            try:
                await self.transport.finish(connection)
            finally:  # even if finishing is cancelled (a client gone meanwhile)
                self.teardown(reason, duration=time.monotonic() - started)

    def established(self) -> bytes:
        subscription, storage = self.subscription, self.app[STORAGE]
        payload = messages.connection_established(
            connection_id=self.connection.id, zones=subscription.zones,
            single_zone=subscription.single_zone is not None, backend=storage.backend,
            epoch=storage.epoch, heartbeat_interval=self.app[SETTINGS].heartbeat_interval,
            now=messages.utc_now(),
        )  # fmt: skip
        return announced(payload, subscription.announce)

    async def end_on_failure(self, outcome: tuple[DisconnectReason, CloseCode | None]) -> str:
        """Apply a ``FAILURES`` row; returns the disconnect reason."""
        reason, code = outcome
        connection = self.connection
        if code is None:
            if connection.disconnect_reason is not None:
                return connection.disconnect_reason
            # Cancelled because the client went away (aiohttp cancels the handler of a
            # lost connection with ``handler_cancellation``), not by a shutdown.
            return DisconnectReason.CLIENT if connection.transport.is_closing() else reason
        self.app[STATS].connection_errors += 1
        self.log.exception("connection_failed")
        await self.broadcaster.close_now(connection, code, "internal error", reason=reason)
        return reason

    def teardown(self, reason: str, *, duration: float) -> None:
        """Unregister, count and log one ended connection."""
        connection, stats = self.connection, self.app[STATS]
        connection.closing = True
        self.broadcaster.remove(connection)
        if reason == DisconnectReason.PROTOCOL:
            stats.protocol_errors[ErrorCode.MESSAGE_TOO_LARGE] += 1
        stats.connection_closed(connection, reason)
        self.log.info(
            "disconnected", reason=reason, close_code=self.transport.close_code(),
            duration_s=round(duration, 3), messages_sent=connection.messages_sent,
            messages_received=connection.messages_received,
        )  # fmt: skip


def announced(payload: bytes, transport: str | None) -> bytes:
    """``connection_established`` naming its transport right after its ``type`` (which
    must stay first). Until ``messages.connection_established`` takes a ``transport``
    keyword (wire/ is not this module's to change), its one splice lives here."""
    if transport is None:
        return payload
    head, _, rest = payload.partition(b",")
    return head + b',"transport":"' + transport.encode() + b'",' + rest


def close_at_expiry(
    broadcaster: Broadcaster, connection: Connection, expires_at: float | None
) -> asyncio.TimerHandle | None:
    """Access ends with the token: at its ``exp`` the connection is closed with 4001."""
    if expires_at is None:
        return None
    close = functools.partial(
        broadcaster.close, connection, CloseCode.INVALID_TOKEN, "token expired",
        reason=DisconnectReason.AUTH,
    )
    return asyncio.get_running_loop().call_later(max(0.0, expires_at - time.time()), close)

