"""Every code of the wire contract, spelled once: close codes, error codes, reasons.

Server, clients and tests import these; no other module writes ``4008`` or
``"unknown_zone"`` as a literal (as python-websockets keeps one ``CloseCode``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum, StrEnum
from types import MappingProxyType

__all__ = [
    "HTTP_REFUSAL_CLOSE_CODES", "NO_RETRY_CLOSE_CODES", "Backend", "CheckState", "CloseCode",
    "DisconnectReason", "ErrorCode", "GapReason", "HealthStatus", "HttpErrorCode",
    "MessageType", "Transport", "ZoneStatus",
]


class CloseCode(IntEnum):
    """WebSocket close codes of ``PROTOCOL.md`` ("Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down, or the seq lineage changed: resume
    POLICY = 1008  # unknown zone, too many zones
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # over the connection limit
    HEARTBEAT_TIMEOUT = 4000
    INVALID_TOKEN = 4001
    FORBIDDEN_ZONE = 4003
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


# A client must not reconnect after these without a change of its own (zone, token).
NO_RETRY_CLOSE_CODES: frozenset[int] = frozenset(
    {CloseCode.POLICY, CloseCode.INVALID_TOKEN, CloseCode.FORBIDDEN_ZONE}
)


class ErrorCode(StrEnum):
    """``code`` of an ``error`` message (the socket stays open)."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_ZONE = "unknown_zone"
    FORBIDDEN_ZONE = "forbidden_zone"
    RATE_LIMITED = "rate_limited"
    MESSAGE_TOO_LARGE = "message_too_large"


class DisconnectReason(StrEnum):
    """Why a socket ended (the ``reason`` label of the disconnection metric and logs)."""

    CLIENT = "client_close"
    HEARTBEAT = "heartbeat_timeout"
    SLOW_CONSUMER = "slow_consumer"
    RATE_LIMIT = "rate_limit"
    AUTH = "auth"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    PROTOCOL = "protocol"
    EPOCH_CHANGED = "epoch_changed"


class MessageType(StrEnum):
    """``type`` of every message, both directions (``PROTOCOL.md`` tables)."""

    # server -> client
    CONNECTION_ESTABLISHED = "connection_established"
    INITIAL_DATA = "initial_data"
    PRICE_UPDATE = "price_update"
    RESUME_COMPLETE = "resume_complete"
    PONG = "pong"
    HEARTBEAT_ACK = "heartbeat_ack"
    PRICE_HISTORY = "price_history"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    STORAGE_BACKEND_CHANGED = "storage_backend_changed"
    GAP = "gap"
    ZONE_STATUS = "zone_status"
    SNAPSHOT = "snapshot"  # both ways: the client asks, the server answers
    ERROR = "error"
    # client -> server
    PING = "ping"
    HEARTBEAT = "heartbeat"
    REQUEST_PRICE_HISTORY = "request_price_history"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


class GapReason(StrEnum):
    """``reason`` of a ``gap`` message (``PROTOCOL.md``, "Holes said in-band: gap")."""

    HISTORY_EXCEEDED = "history_exceeded"  # a resume asked for seqs no longer retained
    EPOCH_CHANGED = "epoch_changed"  # the client's epoch is not the zone's
    LOST = "lost"  # any other hole the server detects (e.g. Redis could not fill one)


class ZoneStatus(StrEnum):
    """``status`` of a ``zone_status`` message (``--stale-after``)."""

    STALE = "stale"
    LIVE = "live"


class HttpErrorCode(StrEnum):
    """``error`` of an HTTP endpoint's JSON error body (``{"error", "message", ...}``)."""

    UNAUTHORIZED = "unauthorized"  # 401: no or malformed credentials
    FORBIDDEN = "forbidden"  # 403: wrong key
    INVALID_TOKEN = "invalid_token"  # 401: subscriber token missing, invalid or expired
    FORBIDDEN_ZONE = "forbidden_zone"  # 403: the token's ``zones`` claim leaves it out
    OPERATOR_KEY_REQUIRED = "operator_key_required"  # 403: auth on, no --operator-key set
    PUBLISHING_DISABLED = "publishing_disabled"
    RATE_LIMITED = "rate_limited"
    AUTH_RATE_LIMITED = "auth_rate_limited"  # 429: too many failed key attempts
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"  # 408: the body did not arrive within --body-timeout
    INVALID_BODY = "invalid_body"  # 400: the body cannot be decoded (corrupt gzip, ...)
    INVALID_LIMIT = "invalid_limit"
    INVALID_RANGE = "invalid_range"  # 422: a history's ``from`` after its ``to``
    INVALID_ZONE = "invalid_zone"
    UNKNOWN_ZONE = "unknown_zone"
    # 422 of a published price, by the field at fault; ``invalid_price`` for the rest
    # (not JSON, empty batch, unknown field).
    INVALID_PRICE = "invalid_price"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INVALID_NUMBER = "invalid_number"
    # 503 of a publish: Redis held past --redis-hold, or the journal's disk failed;
    # ``accepted`` lists what was kept before, ``Retry-After`` says when to retry.
    STORAGE_UNAVAILABLE = "storage_unavailable"
    # Server-Sent Events streams, refused before they start.
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"  # 403: browser Origin not allowed
    OVER_CAPACITY = "over_capacity"  # 503: over a connection limit
    TOO_MANY_ZONES = "too_many_zones"  # 422: over --max-zones-per-socket
    INVALID_CURSOR = "invalid_cursor"  # 400: malformed Last-Event-ID
    INVALID_SINCE = "invalid_since"  # 400: malformed since (an int, or a zone:seq vector)
    INVALID_MAX_RATE = "invalid_max_rate"  # 400: a URL's max_rate outside the contract


# An HTTP refusal of a stream (SSE, before it starts; PROTOCOL.md "Server-Sent Events
# transport") as the WebSocket close code with the same advice, so a client's reconnect
# policy (``NO_RETRY_CLOSE_CODES``) treats both transports alike. Any other status has no
# such code: a plain retry.
HTTP_REFUSAL_CLOSE_CODES: Mapping[int, CloseCode] = MappingProxyType(
    {
        401: CloseCode.INVALID_TOKEN,  # token missing, invalid or expired
        403: CloseCode.FORBIDDEN_ZONE,  # Origin or zone not allowed (by the token)
        404: CloseCode.POLICY,  # unknown zone
        422: CloseCode.POLICY,  # too many zones
        503: CloseCode.TRY_AGAIN_LATER,  # over a connection limit
    }
)


class Backend(StrEnum):
    """``storage_backend`` of ``connection_established``, ``storage_backend_changed``,
    stats and health: what is serving right now (lower case, as the contract says)."""

    REDIS = "redis"
    IN_MEMORY = "in-memory"


class Transport(StrEnum):
    """How a subscriber is connected: the ``transport`` of an SSE stream's
    ``connection_established`` and the ``transport`` label of the metrics."""

    WS = "ws"
    SSE = "sse"


class HealthStatus(StrEnum):
    """``status`` of the health document (200 unless ``unhealthy``: 503)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class CheckState(StrEnum):
    """A value of the health document's ``checks`` (``{"redis": "ok", ...}``). Some
    checks add a reason after a colon (``"disabled: <reason>"``, ``"failed: <tasks>"``):
    the member is the part before it."""

    OK = "ok"
    UNAVAILABLE = "unavailable"
    DISABLED = "disabled"
    NOT_FOUND = "not_found"  # redis: nothing at the default URL (the embedded default)
    LAGGING = "lagging"  # event_loop
    HIGH = "high"  # error_rate
    SHUTTING_DOWN = "shutting_down"  # shutdown
    FAILED = "failed"  # background: a task crashed
