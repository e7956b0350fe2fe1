"""Counters and the stats / health documents of the contract.

Hot-path counters are plain integers on the connections (``messages_sent``); the
totals here add the closed connections' counts to the open ones' at read time, so
nothing on the fan-out path touches a lock or a shared object per message.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pricehub.broadcaster import Broadcaster
    from pricehub.connection import Connection

__all__ = ["DisconnectReason", "HealthReport", "Stats", "health_report"]


class DisconnectReason:
    """Why a socket ended (the ``reason`` label of the disconnection metric)."""

    CLIENT = "client_close"
    HEARTBEAT = "heartbeat_timeout"
    SLOW_CONSUMER = "slow_consumer"
    RATE_LIMIT = "rate_limit"
    AUTH = "auth"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    PROTOCOL = "protocol"


@dataclass(slots=True)
class Stats:
    """Process-wide counters (seed names, see ``PROTOCOL.md``)."""

    total_connections: int = 0  # accepted since start
    total_disconnections: int = 0
    connection_errors: int = 0
    rejected_connections: Counter[str] = field(default_factory=Counter)
    disconnections: Counter[str] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    closed_messages_sent: int = 0
    closed_messages_received: int = 0
    reaper_runs: int = 0
    reaper_closes: int = 0
    loop_lag: float = 0.0
    shutting_down: bool = False
    started_at: float = field(default_factory=time.time)

    def connection_closed(self, connection: Connection, reason: str) -> None:
        self.total_disconnections += 1
        self.disconnections[reason] += 1
        self.closed_messages_sent += connection.messages_sent
        self.closed_messages_received += connection.messages_received

    def messages_sent(self, broadcaster: Broadcaster) -> int:
        return self.closed_messages_sent + sum(c.messages_sent for c in broadcaster.connections)

    def messages_received(self, broadcaster: Broadcaster) -> int:
        return self.closed_messages_received + sum(
            c.messages_received for c in broadcaster.connections
        )

    def error_rate(self) -> float:
        """Connection errors as a percentage of connections accepted, 2 decimals."""
        if not self.total_connections:
            return 0.0
        return round(100.0 * self.connection_errors / self.total_connections, 2)

    def statistics(self, broadcaster: Broadcaster, *, backend: str) -> dict[str, Any]:
        return {
            "total_connections": self.total_connections,
            "total_disconnections": self.total_disconnections,
            "total_messages_sent": self.messages_sent(broadcaster),
            "total_messages_received": self.messages_received(broadcaster),
            "connection_errors": self.connection_errors,
            "active_connections": len(broadcaster.connections),
            "active_zones": len(broadcaster.connections_by_zone()),
            "storage_backend": backend,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: str
    http_status: int
    checks: dict[str, str]


def health_report(
    stats: Stats,
    *,
    redis_configured: bool,
    backend: str,
    storage_ok: bool,
    loop_lag_threshold: float,
    error_rate_threshold: float = 10.0,
) -> HealthReport:
    """``healthy`` / ``degraded`` / ``unhealthy`` and the checks that decided it."""
    checks = {
        "redis": "disabled" if not redis_configured else ("ok" if backend == "redis" else
                                                          "unavailable"),
        "storage": "ok" if storage_ok else "unavailable",
        "event_loop": "ok" if stats.loop_lag <= loop_lag_threshold else "lagging",
        "error_rate": "ok" if stats.error_rate() < error_rate_threshold else "high",
        "shutdown": "shutting_down" if stats.shutting_down else "ok",
    }
    if stats.shutting_down or not storage_ok:
        return HealthReport("unhealthy", 503, checks)
    degraded = checks["redis"] == "unavailable" or any(
        checks[name] != "ok" for name in ("event_loop", "error_rate")
    )
    return HealthReport("degraded" if degraded else "healthy", 200, checks)
