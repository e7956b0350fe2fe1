"""Every URL path of the wire contract, spelled once (``PROTOCOL.md``).

The ``/api/ws/ws`` prefix is the original OptiBid backend's, kept for its clients.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BROADCAST_PRICE", "CONNECTIONS", "DASHBOARD", "HEALTH", "HISTORY", "HISTORY_ZONES",
    "LAST_EVENT_ID", "METRICS", "PREFIX", "SNAPSHOT", "SSE_MARKET", "SSE_PREFIX",
    "SSE_PRICES", "STATS", "WS_MARKET", "WS_PRICES", "history", "sse_market",
    "subscriber_target", "ws_market",
]

PREFIX = "/api/ws/ws"
WS_MARKET = f"{PREFIX}/market/{{zone}}"  # one zone; query since, epoch, token
WS_PRICES = f"{PREFIX}/prices"  # several zones; query zones, token
# Server-Sent Events: the same feed for networks that block the WebSocket upgrade.
SSE_PREFIX = "/api/ws/sse"
SSE_MARKET = f"{SSE_PREFIX}/market/{{zone}}"  # one zone; query since, epoch, token
SSE_PRICES = f"{SSE_PREFIX}/prices"  # several zones; query zones, token
STATS = f"{PREFIX}/stats"
HEALTH = f"{PREFIX}/health"
CONNECTIONS = f"{PREFIX}/connections"
HISTORY = f"{PREFIX}/history/{{zone}}"
# Several zones by market time; query zones, from, to, limit, token.
HISTORY_ZONES = f"{PREFIX}/history"
SNAPSHOT = f"{PREFIX}/snapshot"  # several zones' latest at one instant; query zones, token
BROADCAST_PRICE = f"{PREFIX}/broadcast/price"
METRICS = "/metrics"
DASHBOARD = "/"


def ws_market(zone: str) -> str:
    return WS_MARKET.format(zone=zone)


def sse_market(zone: str) -> str:
    return SSE_MARKET.format(zone=zone)


def history(zone: str) -> str:
    return HISTORY.format(zone=zone)


# The SSE resume header (browsers' EventSource sends it by itself).
LAST_EVENT_ID = "Last-Event-ID"


def subscriber_target(
    zones: Sequence[str],
    *,
    sse: bool,
    since: int | None = None,
    epoch: str | None = None,
    token: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Path and query of a subscriber's socket (``sse`` False) or stream on ``zones``.

    One zone is the ``market`` path, resumed on the URL (``since``, ``epoch``); several are
    the ``prices`` path with ``zones``, resumed by ``subscribe`` (WebSocket) or
    ``Last-Event-ID`` (SSE), so ``since``/``epoch`` are not written there.
    """
    query: dict[str, str] = {}
    if len(zones) == 1:
        path = sse_market(zones[0]) if sse else ws_market(zones[0])
        if since is not None and epoch is not None:
            query.update(since=str(since), epoch=epoch)
    else:
        path = SSE_PRICES if sse else WS_PRICES
        query["zones"] = ",".join(zones)
    if token is not None:
        query["token"] = token
    return path, query
