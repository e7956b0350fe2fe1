"""``pricehub.wire`` spells every code and path once; this pins them to PROTOCOL.md's
literals (a test that only imported the constants could not catch a typo in them)."""

from __future__ import annotations

from pricehub.wire import paths
from pricehub.wire.codes import (
    HTTP_REFUSAL_CLOSE_CODES,
    NO_RETRY_CLOSE_CODES,
    Backend,
    CheckState,
    CloseCode,
    ErrorCode,
    HealthStatus,
    HttpErrorCode,
    MessageType,
    Transport,
)
from pricehub.wire.refusals import REFUSALS, RefusalReason


def test_paths_are_the_contracts() -> None:
    assert paths.ws_market("pjm") == "/api/ws/ws/market/pjm"
    assert paths.WS_PRICES == "/api/ws/ws/prices"
    assert paths.sse_market("pjm") == "/api/ws/sse/market/pjm"
    assert paths.SSE_PRICES == "/api/ws/sse/prices"
    assert (paths.STATS, paths.HEALTH, paths.METRICS) == (
        "/api/ws/ws/stats", "/api/ws/ws/health", "/metrics",
    )
    assert paths.BROADCAST_PRICE == "/api/ws/ws/broadcast/price"
    assert paths.history("pjm") == "/api/ws/ws/history/pjm"
    assert (paths.HISTORY_ZONES, paths.SNAPSHOT) == ("/api/ws/ws/history", "/api/ws/ws/snapshot")
    assert paths.DASHBOARD == "/"


def test_close_codes_are_the_contracts() -> None:
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000, "GOING_AWAY": 1001, "POLICY": 1008, "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011, "TRY_AGAIN_LATER": 1013, "HEARTBEAT_TIMEOUT": 4000,
        "INVALID_TOKEN": 4001, "FORBIDDEN_ZONE": 4003, "SLOW_CONSUMER": 4008,
        "RATE_LIMITED": 4029,
    }
    assert frozenset({1008, 4001, 4003}) == NO_RETRY_CLOSE_CODES


def test_error_codes_and_message_types_are_the_contracts() -> None:
    assert {str(code) for code in ErrorCode} == {
        "invalid_json", "invalid_message", "unknown_type", "unknown_zone", "forbidden_zone",
        "rate_limited", "message_too_large",
    }
    assert {str(kind) for kind in MessageType} == {
        "connection_established", "initial_data", "price_update", "resume_complete", "pong",
        "heartbeat_ack", "price_history", "subscribed", "unsubscribed",
        "storage_backend_changed", "gap", "zone_status", "snapshot", "error", "ping",
        "heartbeat", "request_price_history", "subscribe", "unsubscribe",
    }


def test_backends_transports_and_health_words_are_the_contracts() -> None:
    assert {str(backend) for backend in Backend} == {"redis", "in-memory"}
    assert {str(transport) for transport in Transport} == {"ws", "sse"}
    assert {str(status) for status in HealthStatus} == {"healthy", "degraded", "unhealthy"}
    assert {"ok", "unavailable", "disabled"} <= {str(state) for state in CheckState}


def test_stream_refusals_map_to_the_close_codes_with_the_same_advice() -> None:
    """PROTOCOL.md, SSE: 401 (token), 403 (Origin or zone), 404 (unknown zone), 503 (over
    the connection limit); 422 is too many zones, a 1008 on the WebSocket."""
    assert {status: int(code) for status, code in HTTP_REFUSAL_CLOSE_CODES.items()} == {
        401: 4001, 403: 4003, 404: 1008, 422: 1008, 503: 1013,
    }


def test_http_error_codes_are_the_contracts() -> None:
    """Every ``error`` an HTTP JSON body may carry; ``invalid_max_rate`` is the contract's
    (PROTOCOL.md, "A rate the client chooses: max_rate")."""
    assert {str(code) for code in HttpErrorCode} == {
        "unauthorized", "forbidden", "invalid_token", "forbidden_zone", "operator_key_required",
        "publishing_disabled", "rate_limited", "auth_rate_limited", "body_too_large",
        "body_timeout", "invalid_body", "invalid_limit", "invalid_range", "invalid_zone",
        "unknown_zone", "invalid_price", "invalid_timestamp", "invalid_number",
        "storage_unavailable", "origin_not_allowed", "over_capacity", "too_many_zones",
        "invalid_cursor", "invalid_since", "invalid_max_rate",
    }


def test_every_refusal_reason_and_how_it_is_said() -> None:
    """Reason (the metric's label) -> close code (None: said before the upgrade), HTTP
    status and error: a bad URL max_rate is a 400 on both transports."""
    assert {
        str(reason): (codes.close_code, codes.status, str(codes.error))
        for reason, codes in REFUSALS.items()
    } == {
        "origin": (None, 403, "origin_not_allowed"),
        "limit_total": (1013, 503, "over_capacity"),
        "limit_per_ip": (1013, 503, "over_capacity"),
        "auth": (4001, 401, "invalid_token"),
        "unknown_zone": (1008, 404, "unknown_zone"),
        "forbidden_zone": (4003, 403, "forbidden_zone"),
        "too_many_zones": (1008, 422, "too_many_zones"),
        "invalid_cursor": (None, 400, "invalid_cursor"),
        "invalid_since": (None, 400, "invalid_since"),
        "invalid_max_rate": (None, 400, "invalid_max_rate"),
    }
    assert set(REFUSALS) == set(RefusalReason)
