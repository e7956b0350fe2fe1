"""The chaos soak's WebSocket clients: plain aiohttp sockets that resume after every close.

A client holds, per zone, the epoch and last seq it has and resumes with them on every
reconnect, to a randomly chosen instance: single-zone clients with
``/api/ws/ws/market/{zone}?since=N&epoch=E``, multi-zone clients on ``/api/ws/ws/prices?zones=``
with one ``subscribe`` message per epoch their zones are in. Everything they see goes to a shared
``Recorder``, and the checks that need one client's order (gaps, duplicates) run as frames
arrive. ``EpochWatcher`` keeps an idle socket on each instance to log the epoch it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

__all__ = ["Body", "EpochWatcher", "Recorder", "ResumingClient", "Span"]

Body = tuple[float, float | None, str]  # price, volume, timestamp: what names one price
CONNECT_TIMEOUT = 5.0
SILENCE = 20.0  # no frame at all for this long: treat the socket as dead and reconnect
BACKOFF = (0.1, 0.5)
POLL = 1.0  # how often a reading client looks at the stop flag
NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)


def body_of(price: dict[str, Any]) -> Body:
    volume = price.get("volume")
    return (float(price["price"]), None if volume is None else float(volume), price["timestamp"])


@dataclass(frozen=True, slots=True)
class Span:
    """A client followed ``zone`` in ``epoch`` without a declared break from start to end."""

    client: int
    zone: str
    epoch: str
    start: float
    end: float


@dataclass
class Recorder:
    """Everything every client saw, in the harness's one event loop (no locking)."""

    keys: dict[tuple[str, str, int], Counter[Body]] = field(default_factory=dict)
    nonce_epochs: dict[int, set[str]] = field(default_factory=dict)
    live: list[tuple[float, int]] = field(default_factory=list)  # (receive time, nonce)
    replayed: int = 0
    conflated: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    reorders: list[dict[str, Any]] = field(default_factory=list)
    epoch_switches: list[dict[str, Any]] = field(default_factory=list)
    closes: list[tuple[float, int, int | None]] = field(default_factory=list)
    not_recovered: list[tuple[float, int, str]] = field(default_factory=list)
    recovered: int = 0
    backend_changes: list[tuple[float, int, str]] = field(default_factory=list)
    epoch_events: dict[int, list[tuple[float, str]]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)
    client_exceptions: Counter[str] = field(default_factory=Counter)
    spans: list[Span] = field(default_factory=list)
    declared_gaps: list[dict[str, Any]] = field(default_factory=list)  # ``gap`` messages

    def observe(self, zone: str, epoch: str, price: dict[str, Any]) -> int | None:
        """Note which price ``(zone, epoch, seq)`` named; returns the publisher's nonce."""
        body = body_of(price)
        self.keys.setdefault((zone, epoch, int(price["seq"])), Counter())[body] += 1
        if body[1] is None:
            return None
        nonce = int(body[1])
        self.nonce_epochs.setdefault(nonce, set()).add(epoch)
        return nonce

    def epoch_seen(self, instance: int, epoch: str) -> None:
        self.epoch_events.setdefault(instance, []).append((time.time(), epoch))


@dataclass
class ZoneState:
    """One client's position in one zone: the lineage and last seq it can resume from."""

    epoch: str | None = None
    last: int | None = None
    seen: set[int] = field(default_factory=set)
    span: tuple[str, float] | None = None  # (epoch, start) of the open span
    closed_at: float | None = None  # when the socket that carried it last closed
    declared: tuple[int, float] | None = None  # seqs a ``gap`` said will never come


class ResumingClient:
    """One client; ``run`` reconnects (with resume) after any close until ``stop`` is set."""

    def __init__(
        self,
        ident: int,
        zones: Sequence[str],
        *,
        multi: bool,
        instances: Sequence[str],
        recorder: Recorder,
        rng: random.Random,
    ) -> None:
        self.ident = ident
        self.zones = tuple(zones)
        self.multi = multi
        self.instances = tuple(instances)  # ws:// base URLs, index = instance number
        self.recorder = recorder
        self.rng = rng
        self.state = {zone: ZoneState() for zone in self.zones}
        self.connected = False
        self.instance = ident % len(self.instances)
        self.conn_epoch = ""

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._connection(session, stop)
            except NETWORK_ERRORS:
                pass
            except Exception as exc:  # a harness bug: counted and shown, never silent
                self.recorder.client_exceptions[f"{type(exc).__name__}: {exc}"[:120]] += 1
            if stop.is_set():
                break
            self.instance = self.rng.randrange(len(self.instances))
            await asyncio.sleep(self.rng.uniform(*BACKOFF))
        self._close_spans(time.time())

    # --- one connection ---------------------------------------------------------------

    def _url(self) -> str:
        base = self.instances[self.instance] + "/api/ws/ws"
        if self.multi:
            return f"{base}/prices?zones="
        zone = self.zones[0]
        state = self.state[zone]
        if state.last is None or state.epoch is None:
            return f"{base}/market/{zone}"
        return f"{base}/market/{zone}?since={state.last}&epoch={state.epoch}"

    async def _connection(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(self._url(), timeout=WS_TIMEOUT, autoping=True),
                CONNECT_TIMEOUT,
            )
        except NETWORK_ERRORS as exc:
            self.recorder.connect_failures[type(exc).__name__] += 1
            return
        self.recorder.connects += 1
        self.connected = True
        try:
            await self._read(ws, stop)
        finally:
            self.connected = False
            closed = time.time()
            for state in self.state.values():
                state.closed_at = closed
            if not stop.is_set():
                self.recorder.closes.append((closed, self.instance, ws.close_code))
            await ws.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        """Until the socket closes, ``stop`` is set, or nothing came for ``SILENCE`` s."""
        quiet_since = time.monotonic()
        while not stop.is_set() and time.monotonic() - quiet_since < SILENCE:
            try:
                message = await ws.receive(timeout=POLL)
            except TimeoutError:
                continue
            if message.type is not aiohttp.WSMsgType.TEXT:
                return
            quiet_since = time.monotonic()
            await self._handle(ws, orjson.loads(message.data))

    async def _handle(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        kind = message.get("type")
        # A ``gap`` names the client's (old) epoch, not the one this socket serves.
        if isinstance(message.get("epoch"), str) and kind != "gap":
            self.conn_epoch = message["epoch"]
            self.recorder.epoch_seen(self.instance, self.conn_epoch)
        if kind == "connection_established":
            await self._opened(ws)
        elif kind == "price_update":
            self._price(message)
        elif kind == "initial_data":
            self._initial(message["market_zone"], message["latest_price"])
        elif kind == "resume_complete":
            self._resumed(message)
        elif kind == "gap":
            self._gap(message)
        elif kind == "subscribed":
            self._fresh([z for z in message["zones"] if self.state[z].last is None])
        elif kind == "storage_backend_changed":
            self.recorder.backend_changes.append(
                (time.time(), self.instance, message["storage_backend"])
            )
        elif kind == "error":
            self.recorder.errors[str(message.get("code"))] += 1

    async def _opened(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if not self.multi:
            if self.state[self.zones[0]].last is None:
                self._fresh(self.zones)
            return
        by_epoch: dict[str | None, list[str]] = {}
        for zone, state in self.state.items():
            by_epoch.setdefault(state.epoch if state.last is not None else None, []).append(zone)
        for epoch, zones in by_epoch.items():
            message: dict[str, Any] = {"type": "subscribe", "zones": zones}
            if epoch is not None:
                message["epoch"] = epoch
                message["since"] = {zone: self.state[zone].last for zone in zones}
            await ws.send_str(orjson.dumps(message).decode())

    # --- the per-zone bookkeeping -----------------------------------------------------

    def _fresh(self, zones: Sequence[str]) -> None:
        """A subscription without resume: whatever was open ends at the last close."""
        now = time.time()
        for zone in zones:
            state = self.state[zone]
            self._end_span(zone, state.closed_at or now)
            state.span = (self.conn_epoch, now)
            state.epoch, state.last, state.seen = self.conn_epoch, None, set()

    def _end_span(self, zone: str, end: float) -> None:
        state = self.state[zone]
        if state.span is not None:
            epoch, start = state.span
            self.recorder.spans.append(Span(self.ident, zone, epoch, start, end))
            state.span = None

    def _close_spans(self, now: float) -> None:
        for zone, state in self.state.items():
            self._end_span(zone, now if self.connected else (state.closed_at or now))

    def _initial(self, zone: str, price: dict[str, Any]) -> None:
        self.recorder.observe(zone, self.conn_epoch, price)
        state = self.state[zone]
        if state.last is None or state.epoch != self.conn_epoch:
            state.epoch, state.last = self.conn_epoch, int(price["seq"])
        # else a resume that failed: resume_complete (recovered false) follows and resets

    def _resumed(self, message: dict[str, Any]) -> None:
        zone = message["market_zone"]
        if message["recovered"]:
            self.recorder.recovered += 1
            return
        now = time.time()
        self.recorder.not_recovered.append((now, self.instance, zone))
        state = self.state[zone]
        self._end_span(zone, state.closed_at or now)
        state.span = (self.conn_epoch, now)
        to_seq = int(message["to_seq"])
        state.epoch, state.last, state.seen = self.conn_epoch, to_seq or None, set()

    def _gap(self, message: dict[str, Any]) -> None:
        """The server says seqs ``from_seq``..``to_seq`` (None: open) of a zone will never
        come: a declared hole, so the jump over them is not an undeclared gap, and the
        prices they named are declared lost (``chaos_analysis``)."""
        zone = message["market_zone"]
        epoch = message.get("epoch") or self.conn_epoch
        first, last = int(message["from_seq"]), message.get("to_seq")
        self.recorder.declared_gaps.append({
            "client": self.ident, "zone": zone, "epoch": epoch, "time": time.time(),
            "from_seq": first, "to_seq": last, "reason": message.get("reason"),
        })  # fmt: skip
        self.state[zone].declared = (first, float("inf") if last is None else int(last))

    def _undeclared(self, state: ZoneState, seq: int) -> bool:
        """Whether the jump from ``state.last`` to ``seq`` skips a seq no ``gap`` covered."""
        if state.last is None or seq <= state.last + 1:
            return False
        declared, state.declared = state.declared, None
        return declared is None or not (declared[0] <= state.last + 1 and seq - 1 <= declared[1])

    def _price(self, message: dict[str, Any]) -> None:
        zone, seq = message["market_zone"], int(message["seq"])
        nonce = self.recorder.observe(zone, self.conn_epoch, message)
        now = time.time()
        if message.get("replay"):
            self.recorder.replayed += 1
        elif nonce is not None:
            self.recorder.live.append((now, nonce))
        state = self.state[zone]
        where = {
            "client": self.ident,
            "zone": zone,
            "epoch": self.conn_epoch,
            "instance": self.instance,
            "time": now,
            "seq": seq,
            "last": state.last,
        }
        if state.epoch != self.conn_epoch:
            if state.last is not None:
                self.recorder.epoch_switches.append(where | {"from_epoch": state.epoch})
            state.epoch, state.last, state.seen = self.conn_epoch, None, set()
            if state.span is None or state.span[0] != self.conn_epoch:
                self._end_span(zone, state.closed_at or now)
                state.span = (self.conn_epoch, now)
        if message.get("conflated"):
            self.recorder.conflated += 1
        elif seq in state.seen:
            self.recorder.duplicates.append(where)
        elif self._undeclared(state, seq):
            assert state.last is not None
            self.recorder.gaps.append(where | {"missing": seq - state.last - 1})
        elif state.last is not None and seq < state.last:
            self.recorder.reorders.append(where)
        state.seen.add(seq)
        state.last = seq if state.last is None else max(state.last, seq)


class EpochWatcher:
    """An idle ``/prices?zones=`` socket per instance: logs the epoch each (re)connect
    announces, so a price nobody received can still be placed in its instance's epoch."""

    def __init__(self, index: int, base: str, recorder: Recorder) -> None:
        self.index = index
        self.url = base + "/api/ws/ws/prices?zones="
        self.recorder = recorder

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.ws_connect(self.url, autoping=True) as ws:
                    await self._watch(ws, stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                message = await ws.receive(timeout=1.0)
            except TimeoutError:
                continue
            if message.type is not aiohttp.WSMsgType.TEXT:
                return
            data = orjson.loads(message.data)
            if isinstance(data.get("epoch"), str):
                self.recorder.epoch_seen(self.index, data["epoch"])
