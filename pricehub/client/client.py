"""Reconnecting asyncio client of the pricehub WebSocket feed (aiohttp).

::

    async with PriceClient("http://127.0.0.1:8080", ["pjm", "ercot"]) as client:
        async for event in client:
            if isinstance(event, Gap):
                ...  # history was lost; event.zone restarts from the next update
            else:
                print(event.zone, event.seq, event.price)

One zone uses ``/api/ws/ws/market/{zone}`` (resume with ``since``/``epoch`` in the query),
several use ``/api/ws/ws/prices?zones=...`` (resume with a ``subscribe`` message). Where the
WebSocket upgrade is refused (a proxy that strips it), ``transport="auto"`` (the default)
falls back to the Server-Sent Events feed ``/api/ws/sse/...`` (resume with ``since``/``epoch``
or the ``Last-Event-ID`` cursor) and stays on it; ``"ws"`` and ``"sse"`` pin one. The
client keeps the last delivered ``seq`` of every zone, so after any retryable close it
reconnects per ``pricehub.client.backoff`` and asks for exactly what it missed. Each zone's
updates come out once and in ``seq`` order; when the server cannot fill a gap
(``resume_complete`` with ``recovered: false``) or says one in-band (``gap``) a ``Gap``
comes out first. ``client.events()`` yields the same plus ``ZoneState`` (``zone_status``:
a zone gone stale, live again); ``client.stale_zones`` holds the zones stale right now.

Trading-grade options (PROTOCOL.md "Trading-grade subscriptions"): ``max_rate`` (every
zone's, or per zone) caps the updates per second the server sends, each saying in
``PriceUpdate.skipped`` how many it replaces; ``await client.snapshot()`` is every zone's
latest price at one instant with its cursor; ``since``/``epoch`` start the stream from such
a cursor (or a history's), so nothing between the two is lost or repeated; and
``client.history(zones, start, end)`` iterates over the pages of a history by market time.

Connection state is reported to an ``on_status`` callback as ``Status`` values:
``connecting`` -> ``connected`` -> (``reconnecting`` -> ``connecting`` -> ...) and finally
``failed`` or ``closed``. After ``failed`` the iterator raises ``TerminalCloseError`` (close
code 1008/4001/4003) or ``ReconnectFailed`` (attempts exhausted); ``reconnect()`` starts
over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import aiohttp
import orjson
from yarl import URL

from pricehub.client.backoff import Backoff, GiveUp
from pricehub.client.sse import SseParser
from pricehub.client.trading import (
    HistoryPager,
    HistoryStalled,
    RateOption,
    Rates,
    format_rate,
    time_text,
)
from pricehub.wire import messages, paths, rate
from pricehub.wire.codes import MessageType, ZoneStatus
from pricehub.wire.decode import (
    ConnectionEstablished,
    ErrorMessage,
    GapNotice,
    InitialData,
    PriceHistory,
    PriceObject,
    PriceUpdateMessage,
    ResumeComplete,
    ServerMessage,
    SnapshotMessage,
    ZoneState,
    decode_refusal,
    decode_server_object,
)
from pricehub.wire.errors import MalformedMessage, PriceHubError
from pricehub.wire.messages import (
    Heartbeat,
    SnapshotRequest,
    Subscribe,
    encode_client_message,
)

__all__ = [
    "ClientError",
    "ConnectionState",
    "Gap",
    "HistoryPage",
    "PriceClient",
    "PriceUpdate",
    "ReconnectFailed",
    "Snapshot",
    "Status",
    "TerminalCloseError",
    "TradingEvent",
    "Transport",
    "ZoneState",
]

logger = logging.getLogger(__name__)

ConnectionState = Literal["connecting", "connected", "reconnecting", "failed", "closed"]
Transport = Literal["auto", "ws", "sse"]

_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}
_TRANSPORTS = ("auto", "ws", "sse")
_HEARTBEAT = encode_client_message(Heartbeat()).decode()
_SSE_BODY_CHARS = 1000  # of a refusal's body, kept for the error text
# Wire names wire/ does not spell yet: the ``since`` vector and ``epoch`` of a multi-zone
# URL, and the query of the snapshot and history endpoints.
_SINCE, _EPOCH, _ZONES, _TOKEN = messages.SINCE, messages.EPOCH, "zones", "token"


@dataclass(frozen=True, slots=True)
class PriceUpdate:
    """One price of one zone.

    ``timestamp`` is the wire string (ISO-8601 UTC, milliseconds, ``Z``). ``replay`` marks an
    update re-sent during a resume, ``conflated`` one after which the server skipped updates
    for a slow reader, ``initial`` the zone's current price sent on (re)subscribe.
    ``accepted_at`` is when the server gave it its seq (ISO-8601 UTC, microseconds, ``Z``;
    the same on every instance), None for a price the server stored before it had the
    field; ``accepted`` is it as a ``datetime``, for measuring lag. ``skipped`` is how many
    updates of the zone this one replaces (``max_rate``, or a slow reader's conflation):
    0 when the server sent every one.
    """

    zone: str
    price: float
    volume: float | None
    seq: int
    timestamp: str
    replay: bool = False
    conflated: bool = False
    initial: bool = False
    accepted_at: str | None = None
    skipped: int = 0

    @property
    def accepted(self) -> datetime | None:
        """``accepted_at`` as an aware UTC ``datetime`` (None without one)."""
        if self.accepted_at is None:
            return None
        return datetime.fromisoformat(self.accepted_at.replace("Z", "+00:00"))

    def as_price_object(self) -> dict[str, Any]:
        """The PROTOCOL.md price object, plus ``replay``/``conflated`` only when true and
        ``skipped`` only when not 0 (as on the wire)."""
        price = PriceObject(
            self.zone, self.price, self.volume, self.seq, self.timestamp, self.accepted_at
        )
        return PriceUpdateMessage(
            price, replay=self.replay, conflated=self.conflated, skipped=self.skipped
        ).as_json()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Several zones' latest prices at one instant (``snapshot``): ``prices`` None for a
    zone without one, ``cursor`` each zone's seq in it (0 without a price). Start or
    resume a stream from it with ``PriceClient(..., since=snap.cursor, epoch=snap.epoch)``.
    ``via`` says how it was read: ``"socket"`` (every update the socket delivers after it
    is newer than ``cursor``, none missing) or ``"http"``."""

    epoch: str
    prices: Mapping[str, PriceUpdate | None]
    cursor: Mapping[str, int]
    timestamp: str | None = None
    via: Literal["socket", "http"] = "socket"


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of ``PriceClient.history``: ``prices`` ordered by (``timestamp``, zone,
    ``seq``), none given on an earlier page; ``more`` when another page follows;
    ``cursor`` each zone's highest seq given so far (all pages), to hand over to the live
    stream (``since``) without a gap or a repeat; ``start``/``end`` the range."""

    zones: tuple[str, ...]
    start: str
    end: str | None
    prices: tuple[PriceUpdate, ...]
    more: bool
    cursor: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Gap:
    """Updates of ``zone`` after ``last_seq`` were lost and will never be delivered.

    ``epoch`` differs from ``previous_epoch`` when the server's numbering restarted (history
    lost, e.g. an in-memory server restarted); otherwise the missing updates were older than
    the retained history, or lost on the way. ``from_seq``/``to_seq`` are the missing seqs
    as the server's ``gap`` says (inclusive, ``to_seq`` None when unknown); from a server
    that sends no ``gap``, its ``resume_complete`` fields. ``reason`` is the ``gap``'s
    (``history_exceeded``, ``epoch_changed``, ``lost``), None when the server said none.
    """

    zone: str
    last_seq: int
    previous_epoch: str
    epoch: str
    from_seq: int | None
    to_seq: int | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """A connection state change; ``attempt``/``delay`` describe the next reconnect,
    ``code``/``error`` why the previous connection ended."""

    state: ConnectionState
    attempt: int = 0
    delay: float | None = None
    code: int | None = None
    error: str | None = None
    transport: Literal["ws", "sse"] | None = None  # of the live connection (``connected``)


class ClientError(PriceHubError):
    """Base of the errors the client raises from its iterator."""


class TerminalCloseError(ClientError):
    """The server closed with a code that forbids retrying (1008, 4001, 4003)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"server closed the connection with {code}: {reason or 'no reason'}")
        self.code = code
        self.reason = reason


class ReconnectFailed(ClientError):
    """Every reconnect attempt failed; call ``PriceClient.reconnect()`` to try again."""

    def __init__(self, attempts: int, error: str | None) -> None:
        super().__init__(f"gave up after {attempts} reconnect attempts (last error: {error})")
        self.attempts = attempts
        self.error = error


@dataclass(slots=True)
class _Cursor:
    """Last delivered seq of a zone and the epoch it belongs to."""

    epoch: str
    seq: int


Event = PriceUpdate | Gap  # what ``async for event in client`` yields
TradingEvent = PriceUpdate | Gap | ZoneState  # what ``client.events()`` yields
_LOST_TYPES = (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
_WAKE = object()  # queued to wake a blocked iterator after a failure or close


class PriceClient:
    """Subscribe to one or more zones and iterate over their updates, reconnecting.

    ``server`` is the base URL (``http(s)://`` or ``ws(s)://``, an optional path prefix is
    kept); ``zones`` one zone name or several. Keyword-only options:

    * ``token`` (None): subscriber token, sent as the ``token`` query parameter.
    * ``backoff`` (``Backoff()``): the reconnect policy; inject ``random``/``clock`` there.
    * ``sleep`` (``asyncio.sleep``): awaited with each reconnect delay; tests inject one
      that records the delay and returns at once.
    * ``heartbeat_interval`` (None): seconds between ``heartbeat`` messages; None uses the
      server's ``heartbeat_interval``. No frame for twice the interval counts as a dead
      connection.
    * ``open_timeout`` (10.0): seconds to open the socket and get ``connection_established``.
    * ``close_timeout`` (2.0): seconds to wait for the server's answer to a client close.
    * ``max_queue`` (1024): updates buffered for the iterator; when full the client stops
      reading the socket so a slow consumer is handled by the server's flow control.
    * ``on_status`` (None): called with every ``Status``.
    * ``transport`` (``"auto"``): ``"ws"`` WebSocket only, ``"sse"`` Server-Sent Events
      only, ``"auto"`` WebSocket, and SSE from the moment the upgrade is refused with an
      HTTP status (not when the server is merely down) until ``reconnect()``.
    * ``session`` (None): an ``aiohttp.ClientSession`` to use; by default the client owns one.
    * ``max_rate`` (None: every update): at most this many updates per second of each zone
      (``0 < max_rate <= 1000``; the newest wins, ``PriceUpdate.skipped`` says how many it
      replaces), or a mapping ``{zone: rate}`` (zones not named: every update). On the
      URL for every zone; per zone by ``subscribe`` on a WebSocket of several zones; an
      SSE stream of several zones has one rate, the lowest in the mapping.
    * ``since`` / ``epoch`` (None): start from a cursor vector ``{zone: seq}`` of lineage
      ``epoch`` (a ``Snapshot``'s ``cursor``/``epoch``) instead of each zone's current
      price: the first connection resumes every zone named from there, as a reconnect does.
    """

    def __init__(
        self,
        server: str,
        zones: str | Iterable[str],
        *,
        token: str | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        heartbeat_interval: float | None = None,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_queue: int = 1024,
        on_status: Callable[[Status], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        transport: Transport = "auto",
        max_rate: RateOption = None,
        since: Mapping[str, int] | None = None,
        epoch: str | None = None,
    ) -> None:
        self.zones: tuple[str, ...] = tuple(
            dict.fromkeys([zones] if isinstance(zones, str) else zones)
        )
        if not self.zones:
            raise ValueError("at least one zone is required")
        base = URL(server)
        if base.scheme not in _SCHEMES:
            raise ValueError(f"server must be an http(s):// or ws(s):// URL, got {server!r}")
        self._base = base.with_scheme(_SCHEMES[base.scheme])
        self._http_base = self._base.with_scheme(_HTTP_SCHEMES[self._base.scheme])
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(_TRANSPORTS)}")
        self.transport: Transport = transport
        self._on_sse = transport == "sse"  # auto switches to SSE once the upgrade is refused
        self._no_sse = False  # auto: the server answered 404 on the SSE path
        self._sse_cursor: str | None = None  # last safe Last-Event-ID of the SSE feed
        self._unresumable: dict[str, _Cursor] = {}  # zones an SSE stream cannot resume
        self._no_vector = False  # the next stream resumes no `since` vector (one was refused)
        self.token = token
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._heartbeat_override = heartbeat_interval
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._on_status = on_status
        self._session = session
        self._owns_session = session is None
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=max_queue)
        self._rates = Rates.parse(max_rate, self.zones)
        self._cursors: dict[str, _Cursor] = _start_cursors(self.zones, since, epoch)
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # once established
        self._live = asyncio.Event()  # set while `_ws` is
        self._snapshots: deque[asyncio.Future[SnapshotMessage]] = deque()  # awaiting answers
        self._held: dict[str, list[PriceUpdate]] = {}  # zones awaiting resume_complete
        self._gaps: dict[str, GapNotice] = {}  # the `gap` of a zone awaiting resume_complete
        self._stale: dict[str, ZoneState] = {}
        self._epoch: str | None = None  # epoch of the current connection
        self._task: asyncio.Task[None] | None = None
        self._failure: ClientError | None = None
        self._closed = False
        self.status = Status("connecting")

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (needs a running event loop)."""
        if self._closed:
            raise ClientError("the client is closed")
        if self._task is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(self._on_task_done)

    async def reconnect(self) -> None:
        """Reconnect now with a fresh attempt counter, resuming where delivery stopped.

        Use it after ``failed`` (a ``ReconnectFailed``, or a ``TerminalCloseError`` once the
        cause is fixed, e.g. a new ``token``); on a live connection it drops the socket.
        """
        if self._closed:
            raise ClientError("the client is closed")
        await self._stop_task()
        self._failure = None
        self._backoff.reset()
        self._on_sse = self.transport == "sse"  # auto tries the WebSocket again
        self._no_sse = False
        self.start()

    async def close(self) -> None:
        """Close the socket and end iteration; pending updates are discarded."""
        if self._closed:
            return
        self._closed = True
        await self._stop_task()
        if self._owns_session and self._session is not None:
            await self._session.close()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._set_status(Status("closed"))
        self._wake()

    async def __aenter__(self) -> PriceClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        if not self._closed:
            self.start()  # iterating a client nobody started would wait forever
        return self

    async def __anext__(self) -> Event:
        # ZoneState only through ``events()``: a loop written before it existed treats
        # everything that is not a Gap as a price.
        while not isinstance(item := await self._next_item(), PriceUpdate | Gap):
            pass
        return item

    async def events(self) -> AsyncIterator[TradingEvent]:
        """Like ``async for event in client``, plus a ``ZoneState`` whenever a zone goes
        stale or live again (``zone_status``), in the order the server said them."""
        if not self._closed:
            self.start()
        while True:
            try:
                yield await self._next_item()
            except StopAsyncIteration:
                return

    @property
    def stale_zones(self) -> Mapping[str, ZoneState]:
        """The zones the server last said are stale, with that ``ZoneState`` (a copy)."""
        return dict(self._stale)

    # --- snapshot, history by market time ---------------------------------------------

    async def snapshot(
        self,
        zones: str | Iterable[str] | None = None,
        *,
        via: Literal["auto", "socket", "http"] = "auto",
        timeout: float | None = None,
    ) -> Snapshot:
        """Every zone's latest price at one instant (default: the client's zones).

        ``via="socket"`` asks on the live WebSocket (``snapshot`` message): every update
        this client yields after the answer is newer than its ``cursor`` and none is
        missing. ``"http"`` reads ``GET /api/ws/ws/snapshot`` (no connection needed, the
        same picture, without that promise about the stream). ``"auto"``: the socket when
        a WebSocket is live, else HTTP. Waits at most ``timeout`` s (``open_timeout``);
        raises ``ClientError`` when it cannot be had.
        """
        asked = self.zones if zones is None else _zone_tuple(zones)
        limit = self._open_timeout if timeout is None else timeout
        use_socket = via == "socket" or (via == "auto" and self._ws is not None)
        how: Literal["socket", "http"]
        try:
            async with asyncio.timeout(limit):
                if use_socket:
                    message, how = await self._socket_snapshot(asked), "socket"
                else:
                    message, how = await self._http_snapshot(asked), "http"
        except TimeoutError:
            raise ClientError(f"no snapshot answer within {limit:g} s") from None
        prices = {  # the zones' current prices, as initial_data gives them
            zone: None if p is None else _update(p, initial=True)
            for zone, p in message.prices.items()
        }
        return Snapshot(message.epoch, prices, dict(message.cursor), message.timestamp, how)

    async def history(
        self,
        zones: str | Iterable[str] | None,
        start: datetime | str,
        end: datetime | str | None = None,
        *,
        limit: int | None = None,
    ) -> AsyncIterator[HistoryPage]:
        """The retained prices of ``zones`` (None: the client's) whose market time is in
        ``[start, end)`` (``end`` None: now, fixed by the first answer), page by page
        (``GET /api/ws/ws/history``, ``limit`` prices a page, the server's default when
        None). Pages follow ``truncated`` until the range is done; across them no price is
        given twice nor left out, also where prices share a timestamp at a page's edge.
        Times are aware ``datetime``s or ISO-8601 strings with an offset. Raises
        ``ClientError`` when the server refuses (e.g. 422 for a bad range)."""
        asked = self.zones if zones is None else _zone_tuple(zones)
        pager = HistoryPager(
            asked, time_text(start), None if end is None else time_text(end), limit
        )
        more = True
        while more:
            body = await self._get_json(paths.HISTORY_ZONES, pager.query(), "history")
            body.setdefault("type", MessageType.PRICE_HISTORY.value)  # the socket's shape
            page = _as(PriceHistory, body, "history")
            try:
                fresh, more = pager.take(page)
            except HistoryStalled as exc:
                raise ClientError(f"history cannot be paged further: {exc}") from None
            if fresh or pager.pages == 1:
                yield HistoryPage(
                    asked, pager.start, pager.end, tuple(_update(p) for p in fresh), more,
                    dict(pager.cursor),
                )  # fmt: skip

    async def _socket_snapshot(self, zones: tuple[str, ...]) -> SnapshotMessage:
        if self._closed or self._on_sse:
            raise ClientError("no WebSocket to ask for a snapshot on")
        self.start()
        while self._ws is None:  # connecting: wait for it (bounded by the caller)
            await self._live.wait()
        answer: asyncio.Future[SnapshotMessage] = asyncio.get_running_loop().create_future()
        self._snapshots.append(answer)
        frame = encode_client_message(SnapshotRequest(zones)).decode()
        try:
            await self._ws.send_str(frame)
        except (aiohttp.ClientError, ConnectionError) as exc:
            self._snapshots.remove(answer)
            raise ClientError(f"the snapshot request could not be sent: {_explain(exc)}") from None
        # Timed out, it stays queued (cancelled): a late answer is its, not the next one's.
        return await answer

    def _on_snapshot(self, message: SnapshotMessage) -> None:
        # The server answers a socket's snapshots in the order they were asked: this is the
        # oldest one's answer (dropped when that one gave up waiting).
        if self._snapshots:
            answer = self._snapshots.popleft()
            if not answer.done():
                answer.set_result(message)

    def _fail_snapshots(self, why: str) -> None:
        while self._snapshots:
            answer = self._snapshots.popleft()
            if not answer.done():
                answer.set_exception(ClientError(why))

    async def _http_snapshot(self, zones: tuple[str, ...]) -> SnapshotMessage:
        body = await self._get_json(paths.SNAPSHOT, {_ZONES: ",".join(zones)}, "the snapshot")
        return _as(SnapshotMessage, body, "the snapshot")

    async def _get_json(self, path: str, query: dict[str, str], what: str) -> dict[str, Any]:
        """``GET`` one of the server's JSON endpoints (the token added); ``ClientError``
        with the server's words for anything but a 200 with a JSON object."""
        if self._closed:
            raise ClientError("the client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self.token is not None:
            query = {**query, _TOKEN: self.token}
        base = self._http_base
        url = base.with_path(base.path.rstrip("/") + path).with_query(query)
        try:
            # Bounded like opening a socket: a black-holed host must not hang a history.
            wait = self._open_timeout
            bound = aiohttp.ClientTimeout(sock_connect=wait, sock_read=wait)
            headers = {"Accept": "application/json"}
            async with self._session.get(url, headers=headers, timeout=bound) as response:
                text = await response.text(errors="replace")
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ClientError(f"{what} failed: {_explain(exc)}") from None
        if status != 200:
            refusal = decode_refusal(status, text[:_SSE_BODY_CHARS])
            raise ClientError(f"{what} refused: HTTP {status}: {refusal.text}")
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise ClientError(f"{what}: the answer is not a JSON object: {text[:200]!r}")
        return body

    async def _next_item(self) -> TradingEvent:
        while True:
            if self._queue.empty():
                if self._closed:
                    raise StopAsyncIteration
                if self._failure is not None:
                    raise self._failure
            item = await self._queue.get()
            if item is not _WAKE:
                return item  # type: ignore[return-value]

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        # A bug in the loop must end iteration loudly, not leave the iterator waiting.
        if task.cancelled() or task.exception() is None:
            return
        self._failure = ClientError(f"client loop crashed: {task.exception()!r}")
        self._set_status(Status("failed", error=str(self._failure)))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a full queue has no blocked reader
            self._queue.put_nowait(_WAKE)

    def _set_status(self, status: Status) -> None:
        self.status = status
        if self._on_status is not None:
            try:
                self._on_status(status)
            except Exception:  # a broken callback must not kill the connection loop
                logger.exception("on_status callback failed")

    # --- connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._set_status(Status("connecting", attempt=attempt))
            code, error = await self._connect_once()
            decision = self._backoff.closed(code)
            if isinstance(decision, GiveUp):
                self._give_up(decision, error)
                return
            attempt = decision.attempt
            self._set_status(
                Status(
                    "reconnecting", attempt=attempt, delay=decision.delay, code=code, error=error
                )
            )
            await self._sleep(decision.delay)

    def _give_up(self, decision: GiveUp, error: str | None) -> None:
        if decision.reason == "terminal" and decision.code is not None:
            self._failure = TerminalCloseError(decision.code, error or "")
        else:
            self._failure = ReconnectFailed(decision.attempts, error)
        self._set_status(Status("failed", code=decision.code, error=str(self._failure)))
        self._wake()

    async def _connect_once(self) -> tuple[int | None, str | None]:
        """One connection, from open to close: the close code (None if it never opened
        or died without a close frame) and a description of why it ended."""
        assert self._session is not None
        # Zones with a cursor resume; their output is held until resume_complete.
        self._held = {zone: [] for zone in self._cursors}
        self._gaps = {}
        self._epoch = None
        if self._on_sse:
            code, error, _ = await self._sse_once()
            return code, error
        try:
            async with asyncio.timeout(self._open_timeout):
                ws = await self._session.ws_connect(
                    self._url(), timeout=aiohttp.ClientWSTimeout(ws_close=self._close_timeout)
                )
        except aiohttp.WSServerHandshakeError as exc:
            # Something answered, but not with an upgrade: a proxy that strips it, or a
            # refusal. A server that is down raises ClientConnectorError instead (below).
            refused = f"connect failed: {_explain(exc)}"
            if self.transport == "ws":
                return None, refused
            if not self._no_sse:
                code, error, self._no_sse = await self._sse_once()
                if not self._no_sse:
                    return code, error
            return None, f"{refused}; no SSE endpoint either"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"connect failed: {_explain(exc)}"
        try:
            return await self._serve(ws)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return ws.close_code, f"connection lost: {_explain(exc)}"
        finally:
            await ws.close()

    # --- Server-Sent Events ---------------------------------------------------------

    async def _sse_once(self) -> tuple[int | None, str | None, bool]:
        """One SSE stream, from request to end: like ``_connect_once``, plus whether the
        server has no SSE endpoint at all (a plain 404)."""
        assert self._session is not None
        url, headers = self._sse_request()
        try:
            async with asyncio.timeout(self._open_timeout):
                response = await self._session.get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"connect failed: {_explain(exc)}", False
        async with response:
            if response.status != 200:
                return await self._sse_refusal(response)
            self._on_sse = True  # the upgrade was refused but this works: stay here
            try:
                code, error = await self._serve_sse(response)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                # ValueError: a line longer than aiohttp's buffer limit.
                code, error = None, f"connection lost: {_explain(exc)}"
            return code, error, False

    def _sse_request(self) -> tuple[URL, dict[str, str]]:
        """URL and headers of the next SSE stream; sets up what it resumes."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        self._unresumable = {}
        vector: dict[str, _Cursor] = {}
        if len(self.zones) > 1:
            if self._sse_cursor is not None:
                headers[paths.LAST_EVENT_ID] = self._sse_cursor
            elif self._cursors and self._no_vector:
                # The last stream's vector was refused: what was missed is reported as a gap.
                self._unresumable, self._held = dict(self._cursors), {}
            elif self._cursors:
                # Cursors from a WebSocket, or given as `since`: the URL's vector resumes
                # the zones of one epoch (the most common one); the URL carries a single
                # epoch, so the others (a rare resume cut short by an epoch change) report
                # what they missed as a gap.
                epoch, _ = Counter(c.epoch for c in self._cursors.values()).most_common(1)[0]
                for zone, cursor in self._cursors.items():
                    if cursor.epoch == epoch:
                        vector[zone] = cursor
                    else:
                        self._unresumable[zone] = cursor
                        self._held.pop(zone, None)
        self._no_vector = False
        return self._target(self._http_base, sse=True, vector=vector), headers

    async def _sse_refusal(
        self, response: aiohttp.ClientResponse
    ) -> tuple[int | None, str | None, bool]:
        body = (await response.text(errors="replace"))[:_SSE_BODY_CHARS]
        refusal = decode_refusal(response.status, body)
        error = f"SSE refused: HTTP {refusal.status}: {refusal.text or response.reason}"
        if refusal.cursor_refused:  # e.g. an outdated cursor (or vector): start without it
            self._sse_cursor = None
            self._no_vector = True
        return refusal.close_code, error, refusal.endpoint_missing

    async def _serve_sse(self, response: aiohttp.ClientResponse) -> tuple[int | None, str | None]:
        parser = SseParser()
        silence_limit = self._open_timeout  # until connection_established says otherwise
        established = False
        while True:
            try:
                async with asyncio.timeout(silence_limit):
                    raw = await response.content.readline()
            except TimeoutError:
                return None, f"nothing from the server for {silence_limit:g} s"
            if not raw:
                return None, "the server ended the event stream"
            event = parser.feed_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if event is None:
                continue  # `: ping` comments reset the silence timer all the same
            message = _decode(event.data)
            if established:
                await self._dispatch(message)
                # A cursor is only safe to resume from once nothing is held back: held
                # updates are lost if the stream dies before their resume_complete.
                if event.id and not self._held and isinstance(message, _CURSOR_MESSAGES):
                    self._sse_cursor = event.id
                continue
            opened = self._opening(message, "sse")
            if isinstance(opened, str):
                return None, opened
            if opened is not None:
                established = True
                silence_limit = 2 * opened
                await self._report_unresumable()

    async def _report_unresumable(self) -> None:
        assert self._epoch is not None
        for zone, cursor in self._unresumable.items():
            await self._queue.put(Gap(zone, cursor.seq, cursor.epoch, self._epoch, None, None))
            if cursor.epoch != self._epoch:
                del self._cursors[zone]
        self._unresumable = {}

    # --- WebSocket ----------------------------------------------------------------------

    def _url(self) -> URL:
        return self._target(self._base, sse=False)

    def _target(self, base: URL, *, sse: bool, vector: Mapping[str, _Cursor] | None = None) -> URL:
        """The socket's or stream's URL under ``base`` (its path prefix kept), resuming a
        single zone from its cursor, or several from ``vector`` (``since=pjm:12,ercot:40``,
        cursors of one epoch), with the rate the URL carries."""
        cursor = self._cursors.get(self.zones[0]) if len(self.zones) == 1 else None
        path, query = paths.subscriber_target(
            self.zones, sse=sse, since=None if cursor is None else cursor.seq,
            epoch=None if cursor is None else cursor.epoch, token=self.token,
        )  # fmt: skip
        if vector:
            query[_SINCE] = ",".join(f"{zone}:{c.seq}" for zone, c in vector.items())
            query[_EPOCH] = next(iter(vector.values())).epoch
        if not sse and len(self.zones) > 1:
            # Zones with a rate of their own open by `subscribe` (`_send_resumes`), not at
            # the URL's pace first (``zones=`` may name none).
            query[_ZONES] = ",".join(z for z in self.zones if not self._rates.needs_subscribe(z))
        url_rate = self._rates.url_rate(self.zones, sse=sse)
        if url_rate is not None:
            query[rate.FIELD] = format_rate(url_rate)
        return base.with_path(base.path.rstrip("/") + path).with_query(query)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str | None]:
        silence_limit = self._open_timeout  # until connection_established says otherwise
        heartbeat: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=silence_limit)
                except TimeoutError:
                    return None, f"no frame from the server for {silence_limit:g} s"
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    return ws.close_code, msg.extra or "closed by the server without a reason"
                if msg.type in _LOST_TYPES:
                    cause = f": {_explain(msg.data)}" if isinstance(msg.data, BaseException) else ""
                    return ws.close_code, f"connection lost{cause}"
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                message = _decode(msg.data)
                if heartbeat is not None:
                    await self._dispatch(message)
                    continue
                opened = self._opening(message, "ws")
                if isinstance(opened, str):
                    return None, opened
                if opened is not None:
                    self._ws = ws  # before any await: `connected` was just told
                    self._live.set()
                    if len(self.zones) > 1:
                        await self._send_resumes(ws)
                    heartbeat = asyncio.create_task(self._heartbeat(ws, opened))
                    silence_limit = 2 * opened
        finally:
            self._ws = None
            self._live.clear()
            self._fail_snapshots("the connection ended before the snapshot was answered")
            if heartbeat is not None:
                heartbeat.cancel()

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse, interval: float) -> None:
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            while not ws.closed:
                await asyncio.sleep(interval)
                await ws.send_str(_HEARTBEAT)

    def _opening(self, message: _Decoded, transport: Literal["ws", "sse"]) -> float | str | None:
        """A message before ``connection_established``: the heartbeat interval once it came
        (the epoch recorded, the stability timer started), the reason to drop the
        connection when it is malformed, None to keep waiting."""
        if isinstance(message, ConnectionEstablished):
            self._epoch = message.epoch
            self._backoff.opened()
            self._set_status(Status("connected", transport=transport))
            return self._heartbeat_override or message.heartbeat_interval
        if isinstance(message, MalformedMessage):
            if message.kind == MessageType.CONNECTION_ESTABLISHED:
                return f"malformed connection_established: {message}"
            return None  # logged by _decode
        logger.warning("ignoring %.200r before connection_established", message)
        return None

    async def _send_resumes(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # One subscribe per epoch and rate: a disconnect in the middle of resuming after an
        # epoch change can leave cursors of two lineages, and `subscribe` carries one epoch
        # and one `max_rate`. Zones with a rate of their own and nothing to resume are
        # subscribed again for that rate (the URL opened them at the common one).
        groups: dict[tuple[str | None, float | None], dict[str, int | None]] = {}
        for zone in self.zones:
            cursor = self._cursors.get(zone)
            if cursor is None and not self._rates.needs_subscribe(zone):
                continue
            key = (None if cursor is None else cursor.epoch, self._rates.of(zone))
            groups.setdefault(key, {})[zone] = None if cursor is None else cursor.seq
        for (epoch, max_rate), zones in groups.items():
            since = {zone: seq for zone, seq in zones.items() if seq is not None}
            await ws.send_str(_subscribe_frame(tuple(zones), since, epoch, max_rate))

    async def _dispatch(self, message: _Decoded) -> None:
        match message:
            case PriceUpdateMessage(price, replay, conflated, skipped):
                update = _update(price, replay=replay, conflated=conflated, skipped=skipped)
                await self._offer(update)
            case SnapshotMessage():
                self._on_snapshot(message)
            case InitialData(latest_price=price):
                await self._offer(_update(price, initial=True))
            case ResumeComplete():
                await self._on_resume_complete(message)
            case GapNotice():
                await self._on_gap(message)
            case ZoneState():
                await self._on_zone_status(message)
            case ErrorMessage(code=code, message=text):
                logger.warning("server error %s: %s", code, text)
            case _:
                pass  # answers (pong, ...), notices a client need not act on, malformed ones

    async def _offer(self, update: PriceUpdate) -> None:
        held = self._held.get(update.zone)
        if held is not None:
            held.append(update)
        else:
            await self._deliver(update)

    async def _deliver(self, update: PriceUpdate) -> None:
        """Pass ``update`` on unless its seq was already delivered (in this epoch)."""
        cursor = self._cursors.get(update.zone)
        if cursor is not None and cursor.epoch == self._epoch and update.seq <= cursor.seq:
            return
        assert self._epoch is not None  # updates only follow connection_established
        self._cursors[update.zone] = _Cursor(self._epoch, update.seq)
        stale = self._stale.get(update.zone)
        if stale is not None and (update.seq > stale.last_seq or cursor is None):
            # A newer price (or another lineage's) while the zone was stale: it went live
            # while this client was away, and the server tells `live` only to those who
            # saw it stale. Said here, so `events()` readers never see a price of a
            # zone they were told is stale.
            await self._on_zone_status(ZoneState(update.zone, ZoneStatus.LIVE, None, update.seq))
        await self._queue.put(update)

    async def _on_gap(self, notice: GapNotice) -> None:
        """A ``gap``: a resuming zone's is told with its ``resume_complete`` (which says
        what the resume did deliver); any other comes out at once, before the zone's next
        update."""
        if notice.zone in self._held:
            self._gaps[notice.zone] = notice
            return
        assert self._epoch is not None
        await self._queue.put(
            Gap(
                notice.zone, notice.from_seq - 1, self._epoch, self._epoch,
                notice.from_seq, notice.to_seq, notice.reason,
            )
        )

    async def _on_zone_status(self, state: ZoneState) -> None:
        known = self._stale.get(state.zone)
        if state.stale:
            if known == state:
                return  # told again on reconnecting to a zone still stale
            self._stale[state.zone] = state
        elif self._stale.pop(state.zone, None) is None:
            return  # live without having been stale here: nothing changed
        await self._queue.put(state)

    async def _on_resume_complete(self, message: ResumeComplete) -> None:
        zone = message.zone
        held = self._held.pop(zone, None)
        cursor = self._cursors.get(zone)
        if held is None or cursor is None:
            return  # not a resume this client asked for
        assert self._epoch is not None
        notice = self._gaps.pop(zone, None)
        if not message.recovered:
            span: tuple[int | None, int | None, str | None]
            if notice is None:  # a server without `gap`: what resume_complete says
                span = (message.from_seq, message.to_seq, None)
            else:
                span = (notice.from_seq, notice.to_seq, notice.reason)
            await self._queue.put(Gap(zone, cursor.seq, cursor.epoch, self._epoch, *span))
            if cursor.epoch != self._epoch:
                del self._cursors[zone]  # a new lineage: its seqs start over
        # Replay, live updates and initial_data may interleave while resuming; seq order
        # plus the cursor turn them into one ordered, duplicate-free stream. On equal seqs
        # the real update wins over the initial_data copy, keeping its replay flag.
        for update in sorted(held, key=lambda u: (u.seq, u.initial)):
            await self._deliver(update)


def _zone_tuple(zones: str | Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([zones] if isinstance(zones, str) else zones))


_M = TypeVar("_M")


def _as(kind: type[_M], body: dict[str, Any], what: str) -> _M:
    """An HTTP answer decoded as the socket message ``kind`` it mirrors."""
    try:
        message = decode_server_object(body)
    except MalformedMessage as exc:
        raise ClientError(f"{what}: malformed answer: {exc}") from None
    if not isinstance(message, kind):
        raise ClientError(f"{what}: unexpected answer {type(message).__name__}")
    return message


def _subscribe_frame(
    zones: tuple[str, ...], since: Mapping[str, int], epoch: str | None, max_rate: float | None
) -> str:
    """A ``subscribe`` frame, with ``max_rate`` when given."""
    return encode_client_message(
        Subscribe(zones, since, epoch if since else None, max_rate=max_rate)
    ).decode()


def _start_cursors(
    zones: tuple[str, ...], since: Mapping[str, int] | None, epoch: str | None
) -> dict[str, _Cursor]:
    """The ``since``/``epoch`` options as cursors (both or neither)."""
    if since is None and epoch is None:
        return {}
    if since is None or epoch is None:
        raise ValueError("give since and epoch together (a snapshot's cursor and epoch)")
    strays = sorted(set(since) - set(zones))
    if strays:
        raise ValueError(f"since names zones the client does not watch: {strays}")
    for zone, seq in since.items():
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"since[{zone!r}] must be a non-negative integer, got {seq!r}")
    return {zone: _Cursor(epoch, seq) for zone, seq in since.items()}


def _explain(exc: BaseException) -> str:
    """``exc`` in plain words: aiohttp's texts (``Cannot connect to host ... ssl:default
    [Connect call failed ...]``) describe its internals, not what went wrong."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        detail = f": {exc.message}" if exc.message else ""
        return f"the server refused the WebSocket upgrade (HTTP {exc.status}{detail})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"cannot connect to {exc.host}:{exc.port}: TLS certificate not accepted"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return _os_reason(exc)
    return str(exc) or type(exc).__name__


def _os_reason(exc: OSError) -> str:
    """``connection refused`` rather than asyncio's ``Connect call failed ('h', p)``."""
    if exc.errno and exc.errno > 0:  # getaddrinfo's are negative, with their own text
        try:
            return os.strerror(exc.errno).lower()
        except ValueError:
            pass
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


_Decoded = ServerMessage | MalformedMessage


def _decode(data: str | bytes) -> _Decoded:
    """A server message, or why it cannot be read (logged here, once): the connection
    carries on without it, except a malformed ``connection_established``."""
    try:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedMessage("not JSON") from None
        message = decode_server_object(obj)
    except MalformedMessage as exc:
        logger.warning("ignoring a malformed server message (%.100s): %.200r", exc, data)
        return exc
    return message


# Events whose `id:` is a stream cursor (initial_data stands in for an update on a stream).
_CURSOR_MESSAGES = (PriceUpdateMessage, InitialData)


def _update(
    price: PriceObject,
    *,
    replay: bool = False,
    conflated: bool = False,
    initial: bool = False,
    skipped: int = 0,
) -> PriceUpdate:
    return PriceUpdate(
        zone=price.zone,
        price=price.price,
        volume=price.volume,
        seq=price.seq,
        timestamp=price.timestamp,
        replay=replay,
        conflated=conflated,
        initial=initial,
        accepted_at=price.accepted_at,
        skipped=skipped,
    )
