"""HTTP endpoints: stats, health, history, publish, and the dashboard's static files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from pricehub.server.keys import BROADCASTER, INSTANCE_ID, PUBLISHER, SETTINGS, STATS, STORAGE
from pricehub.server.policy.auth import key_matches
from pricehub.server.policy.ratelimit import TokenBucket
from pricehub.server.stats import health_report
from pricehub.storage.errors import StorageError
from pricehub.wire import messages, paths
from pricehub.wire.errors import ValidationError

__all__ = ["STATIC_DIR", "add_routes"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
PUBLISH_BUCKETS = web.AppKey("publish_buckets", dict[str, TokenBucket])


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"error": code, "message": message, **extra}, status=status)


async def cluster_section(app: web.Application) -> dict[str, Any] | None:
    """Live instances and their connections, from the registry (only with Redis)."""
    storage = app[STORAGE]
    if app[SETTINGS].redis_url is None or storage.backend != "redis":
        return None
    try:
        snapshots = await storage.instances()
    except StorageError:
        return None
    by_zone: dict[str, int] = {}
    total = 0
    instances = []
    for instance_id, raw in sorted(snapshots.items()):
        snapshot = orjson.loads(raw)
        instances.append({"instance_id": instance_id, **snapshot})
        total += snapshot.get("connections", 0)
        for zone, count in snapshot.get("connections_by_zone", {}).items():
            by_zone[zone] = by_zone.get(zone, 0) + count
    return {"instances": instances, "total_connections": total, "connections_by_zone": by_zone}


async def stats_handler(request: web.Request) -> web.Response:
    app = request.app
    broadcaster, storage = app[BROADCASTER], app[STORAGE]
    by_zone = broadcaster.connections_by_zone()
    body: dict[str, Any] = {
        "total_connections": len(broadcaster.connections),
        "connections_by_zone": by_zone,
        "active_zones": sorted(by_zone),
        "connections_by_transport": broadcaster.connections_by_transport(),
        "statistics": app[STATS].statistics(broadcaster, backend=storage.backend),
        "instance_id": app[INSTANCE_ID],
    }
    cluster = await cluster_section(app)
    if cluster is not None:
        body["cluster"] = cluster
    body["timestamp"] = messages.utc_now()
    return json_response(body)


async def health_handler(request: web.Request) -> web.Response:
    app = request.app
    settings, stats, storage = app[SETTINGS], app[STATS], app[STORAGE]
    try:
        await storage.check()
        storage_ok = True
    except StorageError:
        storage_ok = False
    report = health_report(
        stats,
        redis_configured=settings.redis_url is not None,
        backend=storage.backend,
        storage_ok=storage_ok,
        loop_lag_threshold=settings.loop_lag_threshold,
    )
    broadcaster = app[BROADCASTER]
    return json_response(
        {
            "status": report.status,
            "storage_backend": storage.backend,
            "active_connections": len(broadcaster.connections),
            "statistics": stats.statistics(broadcaster, backend=storage.backend),
            "error_rate": report.error_rate,
            "checks": report.checks,
            "uptime_s": round(time.time() - stats.started_at, 3),
            "timestamp": messages.utc_now(),
        },
        status=report.http_status,
    )


async def connections_handler(request: web.Request) -> web.Response:
    """Per-connection statistics, newest first (``?limit=N``, at most 1000).

    Remote addresses are left out on purpose: this endpoint is as public as the stats.
    """
    requested = messages.parse_count(request.query.get("limit", "100"))
    if not requested:
        return json_error(422, "invalid_limit", "limit must be a positive integer")
    now = time.monotonic()
    connections = list(request.app[BROADCASTER].connections)[::-1][: min(requested, 1000)]
    return json_response(
        {
            "connections": [
                {
                    "connection_id": c.id,
                    "zones": sorted(c.streams),
                    "connected_s": round(now - c.opened_at, 3),
                    "idle_s": round(now - c.last_seen, 3),
                    "messages_sent": c.messages_sent,
                    "messages_received": c.messages_received,
                    "conflating": c.conflated is not None,
                }
                for c in connections
            ],
            "total": len(request.app[BROADCASTER].connections),
            "timestamp": messages.utc_now(),
        }
    )


def _zone_or_error(request: web.Request) -> str | web.Response:
    zone = request.match_info["zone"]
    if not messages.is_valid_zone_name(zone):
        return json_error(422, "invalid_zone", "zone names are [a-z0-9_]{1,32}")
    if zone not in request.app[SETTINGS].zones:
        return json_error(404, "unknown_zone", f"unknown zone {zone}")
    return zone


async def history_handler(request: web.Request) -> web.Response:
    zone = _zone_or_error(request)
    if isinstance(zone, web.Response):
        return zone
    default = str(messages.DEFAULT_HISTORY_LIMIT)
    requested = messages.parse_count(request.query.get("limit", default))
    if not requested:
        return json_error(422, "invalid_limit", "limit must be a positive integer")
    limit = min(requested, request.app[SETTINGS].history_size)
    prices = await request.app[STORAGE].history(zone, limit=limit)
    body = b'{"market_zone":"%s","data":[%s]}' % (
        zone.encode(), b",".join(price.payload for price in prices)
    )
    return web.Response(body=body, content_type="application/json")


def _publisher_refusal(request: web.Request) -> web.Response | str:
    """401/403/429 before the body is read; returns the key on success."""
    keys = request.app[SETTINGS].publish_key
    if not keys:
        return json_error(403, "publishing_disabled", "no publish key is configured")
    header = request.headers.get("Authorization", "")
    scheme, _, candidate = header.partition(" ")
    if scheme.lower() != "bearer" or not candidate:
        return json_response(
            {"error": "unauthorized", "message": "Authorization: Bearer <key> required"},
            status=401, headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(candidate.strip(), keys):
        return json_error(403, "forbidden", "wrong publish key")
    return candidate.strip()


async def publish_handler(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    key = _publisher_refusal(request)
    if isinstance(key, web.Response):
        return key
    bucket = app[PUBLISH_BUCKETS].setdefault(key, TokenBucket(settings.publish_rate_limit))
    if not bucket.take():
        wait = max(1, round(bucket.retry_after() + 0.5))
        return json_response(
            {"error": "rate_limited", "message": "publish rate over limit"},
            status=429, headers={"Retry-After": str(wait)},
        )
    if request.content_length is not None and request.content_length > settings.max_body_size:
        return json_error(413, "body_too_large", f"body over {settings.max_body_size} bytes")
    try:
        raw = await request.read()  # client_max_size also caps chunked bodies
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, "body_too_large", f"body over {settings.max_body_size} bytes")
    try:
        bodies = messages.validate_publish_body(
            raw, zones=settings.zones, now=messages.utc_now(), max_batch=settings.max_batch_size
        )
    except ValidationError as exc:
        return json_error(422, "invalid_price", exc.message, field=exc.field)
    publisher = app[PUBLISHER]
    accepted = []
    for body in bodies:
        price = await publisher.publish(body, source="http")
        accepted.append({"market_zone": price.zone, "seq": price.seq})
    return json_response({"accepted": accepted}, status=202)


async def dashboard_handler(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def add_routes(app: web.Application) -> None:
    app[PUBLISH_BUCKETS] = {}
    app.router.add_get(paths.STATS, stats_handler)
    app.router.add_get(paths.HEALTH, health_handler)
    app.router.add_get(paths.CONNECTIONS, connections_handler)
    app.router.add_get(paths.HISTORY, history_handler)
    app.router.add_post(paths.BROADCAST_PRICE, publish_handler)
    app.router.add_get(paths.DASHBOARD, dashboard_handler)
    app.router.add_static("/static/", STATIC_DIR)
