"""HTTP endpoints: stats, health, history (by count, or by market time over several
zones), the snapshot of several zones, publish, and the dashboard's static files.

Who may call which is decided in ``guard`` (keys, tokens, operator endpoints).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from pricehub.server.http import guard
from pricehub.server.http.replies import json_error, json_response
from pricehub.server.keys import BROADCASTER, INSTANCE_ID, PUBLISHER, SETTINGS, STATS, STORAGE
from pricehub.server.logs import bad_request_reason
from pricehub.server.policy.ratelimit import TokenBucket
from pricehub.server.stats import health_report, redis_required
from pricehub.storage import DiskStatus
from pricehub.storage.errors import BatchInterrupted, StorageError, StorageUnavailable
from pricehub.wire import messages, paths
from pricehub.wire.codes import HttpErrorCode
from pricehub.wire.errors import ValidationError

__all__ = ["STATIC_DIR", "add_routes", "durability_section"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
PUBLISH_BUCKETS = web.AppKey("publish_buckets", dict[str, TokenBucket])
# The journal retries on a fresh segment with the next batch: a second is enough to see
# whether the disk is back. (Error code: moves into wire's HTTP codes with that branch.)


log = structlog.get_logger("pricehub.http")


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


def durability_section(disk: DiskStatus) -> dict[str, Any]:
    """The ``durability`` section of the stats and health documents, from the storage's
    ``DiskStatus`` (the storage decides the state; the document is shaped here)."""
    section: dict[str, Any] = {"status": disk.check}
    foreign = disk.foreign
    if foreign is not None:  # which feed the journal mirrors, and what was done with it
        section.update(
            reason=disk.state.value, data_dir=foreign.data_dir,
            journal_redis=foreign.journal_redis, redis=foreign.redis, journal=foreign.advice,
        )  # fmt: skip
    journal = disk.journal
    if journal is None:
        return section
    section.update(
        data_dir=journal.data_dir,
        bytes_on_disk=journal.bytes_on_disk,
        last_snapshot_at=_iso(journal.last_snapshot_at),
        snapshots=journal.snapshots,
        fsyncs=journal.fsyncs,
        fsync_last_ms=_ms(journal.fsync_last_seconds),
        fsync_median_ms=_ms(_median(journal.fsync_recent_seconds)),
        fsync_max_ms=_ms(journal.fsync_max_seconds),
        records_written=journal.records,
        write_errors=disk.write_errors,
    )
    if disk.recovered is not None:
        section["recovered"] = disk.recovered
        section["fresh_reason"] = disk.fresh_reason
    return section


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _median(samples: Sequence[float]) -> float | None:
    """Of the journal's last fsyncs (it keeps a bounded window of them)."""
    return statistics.median(samples) if samples else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def stats_handler(request: web.Request) -> web.Response:
    app = request.app
    broadcaster, storage = app[BROADCASTER], app[STORAGE]
    by_zone = broadcaster.connections_by_zone()
    body: dict[str, Any] = {
        "total_connections": len(broadcaster.connections),
        "connections_by_zone": by_zone,
        "active_zones": sorted(by_zone),
        "stale_zones": broadcaster.stale_zones(),  # --stale-after: zones announced stale
        "connections_by_transport": broadcaster.connections_by_transport(),
        "statistics": app[STATS].statistics(broadcaster, backend=storage.backend),
        "instance_id": app[INSTANCE_ID],
    }
    cluster = await cluster_section(app)
    if cluster is not None:
        body["cluster"] = cluster
    body["durability"] = durability_section(storage.disk_status())
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
    disk = storage.disk_status()
    report = health_report(
        stats,
        redis_configured=settings.redis_url is not None,
        redis_required=redis_required(settings, failovers=storage.counters().failovers),
        backend=storage.backend,
        storage_ok=storage_ok,
        loop_lag_threshold=settings.loop_lag_threshold,
        disk=disk,
    )
    if not guard.operator_allowed(request):
        # Open to load balancers, but while the operator endpoints are protected it
        # says no more than they need: the status code, the status and the checks.
        return json_response(
            {"status": report.status, "checks": report.checks, "timestamp": messages.utc_now()},
            status=report.http_status,
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
            "durability": durability_section(disk),
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
        return json_error(422, HttpErrorCode.INVALID_LIMIT, "limit must be a positive integer")
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
    zones = request.app[SETTINGS].zone_set
    if zone in zones:
        return zone
    # A zone in capitals is a name, only wrongly written: 404, as on its SSE stream.
    if not messages.is_valid_zone_name(zone) and messages.zone_case_error(zone, zones) is None:
        return json_error(422, HttpErrorCode.INVALID_ZONE, "zone names are [a-z0-9_]{1,32}")
    return json_error(404, HttpErrorCode.UNKNOWN_ZONE, messages.unknown_zone_text(zone, zones))


async def history_handler(request: web.Request) -> web.Response:
    zone = _zone_or_error(request)
    if isinstance(zone, web.Response):
        return zone
    grant = guard.subscriber_grant(request, zone)  # a zone's history is its feed
    if isinstance(grant, web.Response):
        return grant
    if "from" in request.query or "to" in request.query:
        return await _history_by_time(request, (zone,), market_zone=zone)
    default = str(messages.DEFAULT_HISTORY_LIMIT)
    requested = messages.parse_count(request.query.get("limit", default))
    if not requested:
        return json_error(422, HttpErrorCode.INVALID_LIMIT, "limit must be a positive integer")
    limit = min(requested, request.app[SETTINGS].history_size)
    prices = await request.app[STORAGE].history(zone, limit=limit)
    body = b'{"market_zone":"%s","data":[%s]}' % (
        zone.encode(), b",".join(messages.price_object(price.payload) for price in prices)
    )
    return web.Response(body=body, content_type="application/json")


def _range_error(exc: ValidationError) -> web.Response:
    """422 for a bad snapshot or history query, its code chosen by the wire's check."""
    code = HttpErrorCode(exc.code) if exc.code else HttpErrorCode.INVALID_ZONE
    return json_error(422, code, str(exc), field=exc.field)


def _queried_zones(
    request: web.Request, *, most: int, query: str
) -> tuple[str, ...] | web.Response:
    """``?zones=a,b`` (absent: every zone), each one served and allowed by the token
    (the socket rules: 401 without a valid token when auth is on, 403 for a zone its
    ``zones`` claim leaves out); 422 for an unknown zone or none, and for more than
    ``most`` zones (``too_many_zones``), named or not: a query's cost grows with its
    zones, so none is unbounded (docs/operations.md, "Bounded queries")."""
    settings = request.app[SETTINGS]
    raw = request.query.get("zones")
    if raw is None and len(settings.zones) > most:  # refused before reading every zone
        return _too_many_zones(
            f"{len(settings.zones)} zones are configured and a {query} covers at most "
            f"{most}: name its zones with ?zones="
        )  # fmt: skip
    try:
        zones = messages.zones_from_query(raw, known=settings.zone_set, default=settings.zones)
    except ValidationError as exc:
        return _range_error(exc)
    if len(zones) > most:
        return _too_many_zones(f"a {query} covers at most {most} zones, not {len(zones)}")
    grant = guard.subscriber_grant(request, zones[0])  # the token is verified once
    if isinstance(grant, web.Response):
        return grant
    if grant.zones is not None and not grant.zones.issuperset(zones):
        return json_error(403, HttpErrorCode.FORBIDDEN_ZONE, "token does not allow this zone")
    return zones


def _too_many_zones(message: str) -> web.Response:
    return json_error(422, HttpErrorCode.TOO_MANY_ZONES, message, field="zones")


async def history_zones_handler(request: web.Request) -> web.Response:
    """``GET /api/ws/ws/history?zones=a,b&from=...&to=...&limit=N``: by market time, at
    most ``max_history_zones`` zones."""
    zones = _queried_zones(
        request, most=request.app[SETTINGS].max_history_zones, query="history query"
    )
    if isinstance(zones, web.Response):
        return zones
    return await _history_by_time(request, zones, market_zone=None)


async def _history_by_time(
    request: web.Request, zones: tuple[str, ...], *, market_zone: str | None
) -> web.Response:
    """Every retained price of ``zones`` with ``from <= timestamp < to`` (PROTOCOL.md,
    "History by market time"); the zones are checked and allowed already."""
    query = request.query
    raw_limit = query.get("limit")
    try:
        asked = messages.history_range(
            zones=zones, start=query.get("from"), end=query.get("to"),
            # not a count at all: 0, which the check refuses with the bounds in its message
            limit=None if raw_limit is None else messages.parse_count(raw_limit) or 0,
            known=request.app[SETTINGS].zone_set, now=messages.utc_now(),
            market_zone=market_zone,
        )  # fmt: skip
    except ValidationError as exc:
        return _range_error(exc)
    try:
        found = await request.app[STORAGE].history_between(
            asked.zones, asked.start, asked.end, limit=asked.limit
        )
    except StorageUnavailable as exc:
        return _storage_unavailable(exc)
    body = messages.history_range_body(asked, found.prices, truncated=found.truncated)
    return web.Response(body=body, content_type="application/json")


async def snapshot_handler(request: web.Request) -> web.Response:
    """``GET /api/ws/ws/snapshot?zones=a,b``: the zones' latest prices at one instant, at
    most ``max_snapshot_zones`` zones."""
    zones = _queried_zones(request, most=request.app[SETTINGS].max_snapshot_zones, query="snapshot")
    if isinstance(zones, web.Response):
        return zones
    try:
        snapshot = await request.app[STORAGE].snapshot(zones)
    except StorageUnavailable as exc:
        return _storage_unavailable(exc)
    body = messages.snapshot_reply(snapshot, now=messages.utc_now())
    return web.Response(body=body, content_type="application/json")


def _storage_unavailable(exc: StorageUnavailable) -> web.Response:
    # A failover storage serves reads from memory while Redis is away: this is a read
    # that failed outright (a bare Redis backend), to be retried.
    return json_error(
        503, HttpErrorCode.STORAGE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}
    )


def _publisher_refusal(request: web.Request) -> web.Response | str:
    """403/429/401 before the body is read; returns the key on success."""
    keys = request.app[SETTINGS].publish_key
    if not keys:
        return json_error(
            403, HttpErrorCode.PUBLISHING_DISABLED, "no publish key is configured"
        )
    return guard.bearer_refusal(request, keys, what="publish key")


# The field a ``ValidationError`` names (``[3].timestamp`` in a batch) -> its 422 code.
FIELD_CODES = {
    "timestamp": HttpErrorCode.INVALID_TIMESTAMP,
    "market_zone": HttpErrorCode.INVALID_ZONE,
    "price": HttpErrorCode.INVALID_NUMBER,
    "volume": HttpErrorCode.INVALID_NUMBER,
}


def validation_code(field: str) -> HttpErrorCode:
    return FIELD_CODES.get(field.rpartition(".")[2], HttpErrorCode.INVALID_PRICE)


async def publish_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    key = _publisher_refusal(request)
    if isinstance(key, web.Response):
        return key
    bucket = app[PUBLISH_BUCKETS].setdefault(key, TokenBucket(settings.publish_rate_limit))
    if not bucket.take():
        wait = max(1, round(bucket.retry_after() + 0.5))
        return json_error(
            429, HttpErrorCode.RATE_LIMITED, "publish rate over limit",
            headers={"Retry-After": str(wait)},
        )
    raw = await read_body(request)
    if isinstance(raw, web.StreamResponse):
        return raw
    try:
        bodies = messages.validate_publish_body(
            raw, zones=settings.zone_set, now=messages.utc_now(), max_batch=settings.max_batch_size
        )
    except ValidationError as exc:
        code = HttpErrorCode(exc.code) if exc.code else validation_code(exc.field)
        return json_error(422, code, exc.message, field=exc.field)
    try:
        prices = await app[PUBLISHER].publish_many(bodies, source="http")
    except StorageUnavailable as exc:  # held past --redis-hold, Redis refused, disk failed
        kept = exc.accepted if isinstance(exc, BatchInterrupted) else []
        wait = math.ceil(getattr(exc, "retry_after", 1.0))
        return json_response(
            {
                "error": HttpErrorCode.STORAGE_UNAVAILABLE, "message": str(exc),
                "accepted": [{"market_zone": p.zone, "seq": p.seq} for p in kept],
            },
            status=503, headers={"Retry-After": str(wait)},
        )  # fmt: skip
    accepted = [{"market_zone": price.zone, "seq": price.seq} for price in prices]
    return json_response({"accepted": accepted}, status=202)


async def read_body(request: web.Request) -> bytes | web.StreamResponse:
    """The whole body within ``--body-timeout``, or the error already sent.

    A body that is too slow (408) or cannot be decoded (400: corrupt gzip/deflate) ends
    the connection: the rest of it would otherwise be read and thrown away (aiohttp's
    lingering close), holding the connection or raising the same error again.
    """
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body_size:
        return _body_too_large(settings.max_body_size)
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await request.read()  # client_max_size also caps chunked bodies
    except web.HTTPRequestEntityTooLarge:
        return _body_too_large(settings.max_body_size)
    except TimeoutError:
        log.warning("body_timeout", remote=request.remote, timeout_s=settings.body_timeout)
        return await send_and_close(request, json_error(
            408, HttpErrorCode.BODY_TIMEOUT,
            f"request body not received within {settings.body_timeout} s",
        ))
    except RequestPayloadError as exc:
        reason = bad_request_reason(exc)
        log.warning("bad_http_request", remote=request.remote, reason=reason)
        return await send_and_close(request, json_error(
            400, HttpErrorCode.INVALID_BODY, f"request body cannot be decoded: {reason}"
        ))


def _body_too_large(limit: int) -> web.Response:
    # Built only when needed: every publish request reads a body.
    return json_error(413, HttpErrorCode.BODY_TOO_LARGE, f"body over {limit} bytes")


async def send_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` now and close the connection once it is flushed."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()  # the transport flushes the response first
    return response


async def dashboard_handler(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def add_routes(app: web.Application) -> None:
    app[PUBLISH_BUCKETS] = {}
    guard.install(app)
    app.router.add_get(paths.STATS, stats_handler)
    app.router.add_get(paths.HEALTH, health_handler)
    app.router.add_get(paths.CONNECTIONS, connections_handler)
    app.router.add_get(paths.HISTORY, history_handler)
    app.router.add_get(paths.HISTORY_ZONES, history_zones_handler)
    app.router.add_get(paths.SNAPSHOT, snapshot_handler)
    app.router.add_post(paths.BROADCAST_PRICE, publish_handler)
    app.router.add_get(paths.DASHBOARD, dashboard_handler)
    app.router.add_static("/static/", STATIC_DIR)
