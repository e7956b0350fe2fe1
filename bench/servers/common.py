"""What the baseline servers share: the contract subset the load client speaks.

Every baseline serves the same paths and frames as pricehub (see PROTOCOL.md) so that one load
client and one publisher drive them all; they differ only in how an update reaches the sockets,
which is the thing the benchmark compares.

Subset served: ``GET /api/ws/ws/market/{zone}``, ``GET /api/ws/ws/prices?zones=...`` (WebSocket,
text frames), ``POST /api/ws/ws/broadcast/price`` (Bearer key, object or list, 202) and
``GET /api/ws/ws/health``. No history, resume, heartbeat or auth beyond the publish key.
"""

from __future__ import annotations

import argparse
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from aiohttp import web

__all__ = [
    "CLOSE_UNKNOWN_ZONE",
    "MARKET_PREFIX",
    "PRICES_PATH",
    "PUBLISH_PATH",
    "ZONES",
    "Broadcast",
    "Feed",
    "Registry",
    "add_publish_routes",
    "add_subscribe_routes",
    "aiohttp_app",
    "parse_args",
    "run_aiohttp",
    "subscription_zones",
    "welcome",
]

ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
MARKET_PREFIX = "/api/ws/ws/market/"
PRICES_PATH = "/api/ws/ws/prices"
PUBLISH_PATH = "/api/ws/ws/broadcast/price"
HEALTH_PATH = "/api/ws/ws/health"
CLOSE_UNKNOWN_ZONE = 1008

# Called once per accepted update with the zone and the already serialised frame text.
Broadcast = Callable[[str, str], Awaitable[None]]
Conn = TypeVar("Conn")


def iso_ms(moment: datetime) -> str:
    """The contract's timestamp form: ISO-8601 UTC, milliseconds, ``Z``."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _finite_number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number")
    return value


class Feed:
    """Numbers accepted prices per zone; renders each once as the frame all subscribers get."""

    def __init__(self) -> None:
        self._seq = dict.fromkeys(ZONES, 0)

    def accept(self, item: object) -> tuple[str, int, str]:
        """Validate one published price object; return its zone, its seq and the frame text."""
        if not isinstance(item, dict):
            raise ValueError("price object must be a JSON object")
        zone = item.get("market_zone")
        if zone not in self._seq:
            raise ValueError("market_zone is unknown")
        price = _finite_number(item.get("price"), "price")
        volume = item.get("volume")
        if volume is not None and _finite_number(volume, "volume") < 0:
            raise ValueError("volume must be >= 0")
        stamp = item.get("timestamp")
        moment = datetime.fromisoformat(stamp) if isinstance(stamp, str) else datetime.now(UTC)
        if moment.tzinfo is None:
            raise ValueError("timestamp needs an offset")
        self._seq[zone] += 1
        seq = self._seq[zone]
        frame = {
            "type": "price_update",
            "market_zone": zone,
            "price": price,
            "volume": volume,
            "seq": seq,
            "timestamp": iso_ms(moment),
        }
        return zone, seq, json.dumps(frame, separators=(",", ":"))


class Registry(Generic[Conn]):
    """The open subscriptions of one server: zone -> the connections that want it."""

    def __init__(self) -> None:
        self.by_zone: dict[str, set[Conn]] = {zone: set() for zone in ZONES}

    def add(self, conn: Conn, zones: list[str]) -> None:
        for zone in zones:
            self.by_zone[zone].add(conn)

    def remove(self, conn: Conn, zones: list[str]) -> None:
        for zone in zones:
            self.by_zone[zone].discard(conn)


def subscription_zones(path: str, query: Mapping[str, str]) -> list[str] | None:
    """Zones a WebSocket request asks for; None when a zone is unknown or the path is not ours."""
    if path.startswith(MARKET_PREFIX):
        wanted = [path.removeprefix(MARKET_PREFIX)]
    elif path == PRICES_PATH:
        listed = query.get("zones")
        wanted = listed.split(",") if listed else list(ZONES)
    else:
        return None
    return wanted if all(zone in ZONES for zone in wanted) else None


def welcome(zones: list[str]) -> str:
    """The contract's ``connection_established`` frame, so handshake costs stay comparable."""
    where: dict[str, Any] = {"market_zone": zones[0]} if len(zones) == 1 else {"zones": zones}
    return json.dumps(
        {
            "type": "connection_established",
            "connection_id": str(uuid.uuid4()),
            **where,
            "storage_backend": "in-memory",
            "epoch": "bench",
            "heartbeat_interval": 30,
            "message": f"Connected to {','.join(zones)} market updates",
            "timestamp": iso_ms(datetime.now(UTC)),
        }
    )


def add_publish_routes(app: web.Application, *, key: str, broadcast: Broadcast) -> None:
    """``POST /api/ws/ws/broadcast/price`` (awaits ``broadcast`` per update) and health."""
    feed = Feed()

    async def publish(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "bad publish key"}, status=403)
        try:
            body = await request.json()
            items = body if isinstance(body, list) else [body]
            accepted = [feed.accept(item) for item in items]
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            return web.json_response({"error": str(exc)}, status=422)
        for zone, _seq, text in accepted:
            await broadcast(zone, text)
        answer = [{"market_zone": zone, "seq": seq} for zone, seq, _text in accepted]
        return web.json_response({"accepted": answer}, status=202)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    app.router.add_post(PUBLISH_PATH, publish)
    app.router.add_get(HEALTH_PATH, health)


def add_subscribe_routes(
    app: web.Application,
    registry: Registry[Conn],
    pick: Callable[[web.Request, web.WebSocketResponse], Conn],
) -> None:
    """aiohttp WebSocket routes registering ``pick(request, ws)`` for the requested zones."""

    async def subscribe(request: web.Request) -> web.WebSocketResponse:
        zones = subscription_zones(request.path, request.query)
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        if zones is None:
            await ws.close(code=CLOSE_UNKNOWN_ZONE, message=b"unknown zone")
            return ws
        await ws.send_str(welcome(zones))
        conn = pick(request, ws)
        registry.add(conn, zones)
        try:
            async for _message in ws:  # clients send nothing we act on; reading handles close/ping
                pass
        finally:
            registry.remove(conn, zones)
        return ws

    app.router.add_get(MARKET_PREFIX + "{zone}", subscribe)
    app.router.add_get(PRICES_PATH, subscribe)


def parse_args(description: str, *, publish_port: bool = False) -> argparse.Namespace:
    """The baselines' flags; ``publish_port`` adds ``--publish-port`` for servers without HTTP."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="WebSocket (and publish) port")
    parser.add_argument("--publish-key", required=True, help="Bearer key for the publish endpoint")
    if publish_port:
        parser.add_argument("--publish-port", type=int, required=True, help="HTTP publish port")
    return parser.parse_args()


def aiohttp_app(
    *,
    key: str,
    registry: Registry[Conn],
    pick: Callable[[web.Request, web.WebSocketResponse], Conn],
    broadcast: Broadcast,
) -> web.Application:
    """An aiohttp server of the contract subset, its fan-out given by ``broadcast``."""
    app = web.Application()
    add_subscribe_routes(app, registry, pick)
    add_publish_routes(app, key=key, broadcast=broadcast)
    return app


def run_aiohttp(app: web.Application, args: argparse.Namespace) -> None:
    """Serve one aiohttp app: no access log (it would dominate the per-delivery CPU)."""
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
