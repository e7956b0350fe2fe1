"""What one WebSocket client may ask and how it is answered.

The session owns the protocol conversation of one socket: opening zones (initial data
or resume), answering client messages, and turning bad input into the contract's error
messages. Socket setup, admission and teardown live in ``pricehub.server.socket.handler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from pricehub.server.errors import AuthError
from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.policy.ratelimit import TokenBucket
from pricehub.server.policy.resume import ZoneStream, plan_resume
from pricehub.server.settings import Settings
from pricehub.server.socket.connection import Connection
from pricehub.server.stats import Stats
from pricehub.storage import Storage, StoredPrice
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode, DisconnectReason
from pricehub.wire.errors import ProtocolError

__all__ = ["Session", "SessionClosed"]


class SessionClosed(Exception):
    """The session decided to close the socket with ``code``."""

    def __init__(self, code: int, reason: str, disconnect_reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.disconnect_reason = disconnect_reason


class Session:
    """One socket's protocol state on top of its ``Connection``."""

    def __init__(
        self,
        *,
        connection: Connection,
        settings: Settings,
        storage: Storage,
        broadcaster: Broadcaster,
        stats: Stats,
        allowed_zones: frozenset[str] | None,
        single_zone: str | None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.storage = storage
        self.broadcaster = broadcaster
        self.stats = stats
        self.allowed_zones = allowed_zones
        self.single_zone = single_zone
        self.bucket = TokenBucket(settings.client_rate_limit)

    # --- opening zones ----------------------------------------------------------------

    def check_zone_allowed(self, zone: str) -> None:
        if self.allowed_zones is not None and zone not in self.allowed_zones:
            raise AuthError(CloseCode.FORBIDDEN_ZONE, f"token does not allow zone {zone}")

    async def open_zone(self, zone: str, *, since: int | None, epoch: str | None) -> None:
        """Subscribe first, then read storage, then release held live updates."""
        self.broadcaster.unsubscribe(zone, self.connection)
        stream = self.connection.streams[zone] = ZoneStream(zone)
        self.broadcaster.subscribe(zone, self.connection)
        delivered = await (
            self._initial(zone) if since is None else self._resume(zone, since, epoch)
        )
        if self.connection.streams.get(zone) is not stream:
            return  # unsubscribed or re-subscribed while we were reading storage
        for price in stream.finish(delivered_up_to=delivered):
            self.connection.send(messages.price_update(price.payload))

    async def _initial(self, zone: str) -> int:
        latest = await self.storage.latest(zone)
        if latest is None:
            return 0
        self.connection.send(messages.initial_data(zone, latest.payload, now=messages.utc_now()))
        return latest.seq

    async def _resume(self, zone: str, since: int, epoch: str | None) -> int:
        current_epoch = self.storage.epoch
        retained = await self.storage.since(zone, since)
        outcome = plan_resume(
            since=since, client_epoch=epoch, epoch=current_epoch, retained=retained
        )
        if not outcome.recovered:
            delivered = await self._initial(zone)
            to_seq = delivered
        else:
            for price in outcome.replay:
                self.connection.send(messages.price_update(price.payload, replay=True))
            delivered = to_seq = outcome.to_seq
        self.connection.send(
            messages.resume_complete(
                zone, recovered=outcome.recovered, from_seq=outcome.from_seq, to_seq=to_seq,
                now=messages.utc_now(),
            )
        )
        return delivered

    # --- client messages --------------------------------------------------------------

    def admit_message(self) -> bool:
        """Count a client frame against the rate limit; False if it must be dropped."""
        self.connection.messages_received += 1
        if self.bucket.take():
            return True
        if self.bucket.sustained_overflow:
            raise SessionClosed(
                CloseCode.RATE_LIMITED, "message rate over limit", DisconnectReason.RATE_LIMIT
            )
        self.send_error("rate_limited", "too many messages; slow down")
        return False

    async def handle_binary(self) -> None:
        if self.admit_message():
            self.send_error("invalid_message", "binary frames are not supported; send JSON text")

    async def handle_text(self, data: str | bytes) -> None:
        """Answer one text frame; bad input becomes an ``error`` message, never a crash."""
        if not self.admit_message():
            return
        try:
            message = messages.decode_client_message(data)
            await self.dispatch(message)
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message)

    def send_error(self, code: str, message: str) -> None:
        self.stats.protocol_errors[code] += 1
        self.connection.send(messages.error(code, message, now=messages.utc_now()))

    async def dispatch(self, message: messages.ClientMessage) -> None:
        now = messages.utc_now()
        match message:
            case messages.Ping():
                self.connection.send(messages.simple("pong", now=now))
            case messages.Heartbeat():
                self.connection.send(messages.simple("heartbeat_ack", now=now))
            case messages.RequestHistory():
                await self.send_history(message)
            case messages.Subscribe():
                await self.subscribe(message.zones, message.since, message.epoch)
            case messages.Unsubscribe():
                self.unsubscribe(message.zones)

    def known_zone(self, zone: str) -> str:
        if zone not in self.broadcaster.zones:
            raise ProtocolError("unknown_zone", f"unknown zone {zone[:40]!r}")
        return zone

    async def send_history(self, request: messages.RequestHistory) -> None:
        zone = request.market_zone or self.single_zone
        if zone is None:
            raise ProtocolError("invalid_message", "'market_zone' is required on this socket")
        self.known_zone(zone)
        try:
            self.check_zone_allowed(zone)
        except AuthError as exc:
            raise ProtocolError("forbidden_zone", exc.message) from None
        limit = min(request.limit or messages.DEFAULT_HISTORY_LIMIT, self.settings.history_size)
        if request.hours is not None:
            prices = filter_hours(
                await self.storage.history(zone, limit=self.settings.history_size), request.hours
            )
        else:
            prices = await self.storage.history(zone, limit=limit)
        self.connection.send(
            messages.price_history(
                zone,
                (price.payload for price in prices),
                hours=request.hours,
                limit=None if request.hours is not None else request.limit or limit,
                now=messages.utc_now(),
            )
        )

    async def subscribe(
        self, zones: tuple[str, ...], since: Mapping[str, int], epoch: str | None
    ) -> None:
        for zone in zones:
            self.known_zone(zone)
        for zone in zones:
            self.check_zone_allowed(zone)  # AuthError: the socket closes with 4003
        total = len(set(self.connection.streams) | set(zones))
        if total > self.settings.max_zones_per_socket:
            raise ProtocolError(
                "invalid_message", f"at most {self.settings.max_zones_per_socket} zones per socket"
            )
        self.connection.send(messages.zones_message("subscribed", zones, now=messages.utc_now()))
        for zone in zones:
            await self.open_zone(zone, since=since.get(zone), epoch=epoch)

    def unsubscribe(self, zones: tuple[str, ...]) -> None:
        for zone in zones:
            self.known_zone(zone)
        for zone in zones:
            self.broadcaster.unsubscribe(zone, self.connection)
        self.connection.send(messages.zones_message("unsubscribed", zones, now=messages.utc_now()))


def filter_hours(prices: list[StoredPrice], hours: float) -> list[StoredPrice]:
    """Prices whose market time is within the last ``hours`` (history is time-ordered
    only by seq, so each one is checked)."""
    try:
        cutoff = messages.format_timestamp(datetime.now(UTC) - timedelta(hours=hours))
    except OverflowError:  # further back than datetime reaches: everything retained
        return prices
    # ISO-8601 UTC strings of one fixed format compare like the times they denote.
    return [price for price in prices if messages.timestamp_of(price.payload) >= cutoff]
