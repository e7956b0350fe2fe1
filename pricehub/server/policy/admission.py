"""Who may open a socket: browser Origin check and connection limits.

The Origin check stops cross-site WebSocket hijacking: a page on another site could
otherwise open a socket with the trader's cookies. Non-browser clients send no Origin
and are not affected (they can forge any header anyway; tokens are what stops them).
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

from aiohttp import hdrs, web

__all__ = ["ConnectionLimits", "normalise_origin", "origin_allowed"]


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case without a trailing slash, so a configured
    ``https://App.example/`` matches what browsers send (``https://app.example``)."""
    return origin.strip().rstrip("/").lower()


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """True for no Origin, an allowed one (``*``: any) or the server's own origin."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or "*" in allowed:
        return True
    origin = normalise_origin(origin)
    if origin in {normalise_origin(entry) for entry in allowed}:
        return True
    # Same origin: the page was served by this very host and port. The Host header is
    # read directly: ``request.host`` falls back to a blocking DNS lookup without one.
    host = request.headers.get(hdrs.HOST)
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False
    return (
        host is not None
        and parts.scheme in {"http", "https"}
        and parts.netloc == host.strip().lower()
    )


class ConnectionLimits:
    """Open sockets in total and per remote address (``--max-connections*``).

    ``by_ip`` only holds addresses with an open socket, so it is bounded by ``total``
    however many addresses come and go.
    """

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
        """Give back a slot taken by a successful ``acquire``."""
        if self.by_ip[remote] <= 0:
            raise RuntimeError(f"release without acquire for {remote!r}")
        self.open -= 1
        self.by_ip[remote] -= 1
        if self.by_ip[remote] == 0:
            del self.by_ip[remote]
