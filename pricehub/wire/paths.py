"""Every URL path of the wire contract, spelled once (``PROTOCOL.md``).

The ``/api/ws/ws`` prefix is the original OptiBid backend's, kept for its clients.
"""

from __future__ import annotations

__all__ = [
    "BROADCAST_PRICE", "CONNECTIONS", "DASHBOARD", "HEALTH", "HISTORY", "METRICS", "PREFIX",
    "SSE_MARKET", "SSE_PREFIX", "SSE_PRICES", "STATS", "WS_MARKET", "WS_PRICES", "history",
    "sse_market", "ws_market",
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
BROADCAST_PRICE = f"{PREFIX}/broadcast/price"
METRICS = "/metrics"
DASHBOARD = "/"


def ws_market(zone: str) -> str:
    return WS_MARKET.format(zone=zone)


def sse_market(zone: str) -> str:
    return SSE_MARKET.format(zone=zone)


def history(zone: str) -> str:
    return HISTORY.format(zone=zone)
