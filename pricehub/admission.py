"""Who may open a socket: browser Origin check and connection limits.

The Origin check stops cross-site WebSocket hijacking: a page on another site could
otherwise open a socket with the trader's cookies. Non-browser clients send no Origin
and are not affected.
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["ConnectionLimits", "origin_allowed"]


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    # Same origin: the page was served by this very host and port.
    parts = urlsplit(origin)
    return parts.netloc.lower() == request.host.lower() and parts.scheme in {"http", "https"}


class ConnectionLimits:
    """Open sockets in total and per remote address (``--max-connections*``)."""

    def __init__(self, *, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: Counter[str] = Counter()

    def acquire(self, remote: str) -> str | None:
        """Take a slot; returns why not (``"total"`` / ``"per_ip"``) or None on success."""
        if self.open >= self.total:
            return "total"
        if self.by_ip[remote] >= self.per_ip:
            return "per_ip"
        self.open += 1
        self.by_ip[remote] += 1
        return None

    def release(self, remote: str) -> None:
        self.open -= 1
        self.by_ip[remote] -= 1
        if self.by_ip[remote] <= 0:
            del self.by_ip[remote]
