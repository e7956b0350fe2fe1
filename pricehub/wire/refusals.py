"""Why a subscriber is refused, and how each transport says it: one table.

A WebSocket refused after its upgrade is closed with the row's close code; one refused
before it (a browser Origin, ``PROTOCOL.md``: "HTTP 403 before the upgrade"), and every
refused SSE stream, gets the row's HTTP status with a JSON body whose ``error`` is the
row's HTTP error code. The reason itself is the ``reason`` label of
``pricehub_rejected_connections_total`` and of the ``connection_rejected`` log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from pricehub.wire.codes import CloseCode, HttpErrorCode

__all__ = ["REFUSALS", "RefusalCodes", "RefusalReason", "codes_of"]


class RefusalReason(StrEnum):
    """Why admission said no (in the order admission checks)."""

    ORIGIN = "origin"
    LIMIT_TOTAL = "limit_total"
    LIMIT_PER_IP = "limit_per_ip"
    AUTH = "auth"
    UNKNOWN_ZONE = "unknown_zone"
    FORBIDDEN_ZONE = "forbidden_zone"
    TOO_MANY_ZONES = "too_many_zones"
    # SSE only: a WebSocket's bad ``since`` is an ``error`` message once it is open.
    INVALID_CURSOR = "invalid_cursor"
    INVALID_SINCE = "invalid_since"
    # Both transports, before the upgrade or the stream: a bad ``max_rate`` in the URL.
    INVALID_MAX_RATE = "invalid_max_rate"


@dataclass(frozen=True, slots=True)
class RefusalCodes:
    """How one refusal is said: ``close_code`` on an upgraded WebSocket (None: refused
    before the upgrade, with the HTTP answer), else ``status`` and ``error``."""

    close_code: CloseCode | None
    status: int
    error: HttpErrorCode


_HTTP_ONLY = None  # refused before a WebSocket upgrade, or a refusal of SSE alone

REFUSALS = MappingProxyType({
    RefusalReason.ORIGIN: RefusalCodes(_HTTP_ONLY, 403, HttpErrorCode.ORIGIN_NOT_ALLOWED),
    RefusalReason.LIMIT_TOTAL: RefusalCodes(
        CloseCode.TRY_AGAIN_LATER, 503, HttpErrorCode.OVER_CAPACITY
    ),
    RefusalReason.LIMIT_PER_IP: RefusalCodes(
        CloseCode.TRY_AGAIN_LATER, 503, HttpErrorCode.OVER_CAPACITY
    ),
    RefusalReason.AUTH: RefusalCodes(CloseCode.INVALID_TOKEN, 401, HttpErrorCode.INVALID_TOKEN),
    RefusalReason.UNKNOWN_ZONE: RefusalCodes(CloseCode.POLICY, 404, HttpErrorCode.UNKNOWN_ZONE),
    RefusalReason.FORBIDDEN_ZONE: RefusalCodes(
        CloseCode.FORBIDDEN_ZONE, 403, HttpErrorCode.FORBIDDEN_ZONE
    ),
    RefusalReason.TOO_MANY_ZONES: RefusalCodes(
        CloseCode.POLICY, 422, HttpErrorCode.TOO_MANY_ZONES
    ),
    RefusalReason.INVALID_CURSOR: RefusalCodes(_HTTP_ONLY, 400, HttpErrorCode.INVALID_CURSOR),
    RefusalReason.INVALID_SINCE: RefusalCodes(_HTTP_ONLY, 400, HttpErrorCode.INVALID_SINCE),
    RefusalReason.INVALID_MAX_RATE: RefusalCodes(
        _HTTP_ONLY, 400, HttpErrorCode.INVALID_MAX_RATE
    ),
})


def codes_of(reason: RefusalReason) -> RefusalCodes:
    return REFUSALS[reason]
