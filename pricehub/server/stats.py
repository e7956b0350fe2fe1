"""Counters and the stats / health documents of the contract.

Hot-path counters are plain integers on the connections (``messages_sent``); the
totals here add the closed connections' counts to the open ones' at read time, so
nothing on the fan-out path touches a lock or a shared object per message.

Health must describe the server *now*, not its whole life: the error rate is taken over
a sliding window (``ERROR_RATE_WINDOW``) and the event-loop lag is the worst sample of
the last ``LOOP_LAG_WINDOW`` seconds, so one bad hour long ago does not degrade a healthy
server forever and a brief stall is still visible to a probe that polls every few seconds.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from pricehub.wire.codes import Backend, CheckState, HealthStatus

__all__ = [
    "ERROR_RATE_WINDOW",
    "LOOP_LAG_WINDOW",
    "ConnectionTotals",
    "DiskCheck",
    "HealthReport",
    "IngestStats",
    "RedisChoice",
    "SocketCounters",
    "SocketSource",
    "Stats",
    "health_report",
    "redis_required",
]

ERROR_RATE_WINDOW = 300.0  # seconds of history the health error rate looks at
CHECKPOINT_EVERY = 10.0  # seconds between error-rate checkpoints (bounds their number)
LOOP_LAG_WINDOW = 10.0  # seconds over which the worst loop-lag sample counts


class _Checkpoint(NamedTuple):
    at: float  # monotonic seconds
    accepted: int
    errors: int


def _first_checkpoint() -> deque[_Checkpoint]:
    return deque([_Checkpoint(time.monotonic(), 0, 0)])


class WriteBuffer(Protocol):
    def get_write_buffer_size(self) -> int: ...


class SocketCounters(Protocol):
    """What the totals read of one socket (a ``fanout.connection.Connection``).

    Protocols, not imports: this module knows plain numbers, not the fan-out's classes.
    """

    @property
    def messages_sent(self) -> int: ...

    @property
    def messages_received(self) -> int: ...

    @property
    def transport(self) -> WriteBuffer: ...

    @property
    def conflated(self) -> object: ...


class SocketSource(Protocol):
    """Where the open sockets are listed (the ``fanout.broadcaster.Broadcaster``)."""

    @property
    def connections(self) -> Collection[SocketCounters]: ...

    def connections_by_zone(self) -> Mapping[str, int]: ...


@dataclass(slots=True)
class IngestStats:
    """The Redis ingest consumer's counters (it fills them; the metrics read them)."""

    accepted: int = 0
    invalid: int = 0
    leases: int = 0  # times this instance became the consumer
    claimed: int = 0  # pending entries taken over from a previous consumer


@dataclass(slots=True)
class ConnectionTotals:
    """What the open sockets hold, gathered in one pass per scrape (at 50k sockets
    every extra pass is milliseconds of event loop)."""

    messages_sent: int = 0
    messages_received: int = 0
    buffered_bytes: int = 0
    max_buffered_bytes: int = 0
    conflating: int = 0

    @classmethod
    def measure(cls, connections: Iterable[SocketCounters]) -> ConnectionTotals:
        totals = cls()
        for connection in connections:
            totals.messages_sent += connection.messages_sent
            totals.messages_received += connection.messages_received
            buffered = connection.transport.get_write_buffer_size()
            totals.buffered_bytes += buffered
            totals.max_buffered_bytes = max(totals.max_buffered_bytes, buffered)
            totals.conflating += connection.conflated is not None
        return totals


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
    shutting_down: bool = False
    # Names of background tasks (reaper, simulator, ...) that crashed: the instance can no
    # longer keep its promises, so health turns unhealthy and an orchestrator restarts it.
    failed_tasks: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    _lag_samples: deque[tuple[float, float]] = field(default_factory=deque, init=False, repr=False)
    _checkpoints: deque[_Checkpoint] = field(
        default_factory=_first_checkpoint, init=False, repr=False
    )

    # --- connections ------------------------------------------------------------------

    def connection_closed(self, connection: SocketCounters, reason: str) -> None:
        self.total_disconnections += 1
        self.disconnections[reason] += 1
        self.closed_messages_sent += connection.messages_sent
        self.closed_messages_received += connection.messages_received

    # --- event-loop lag ---------------------------------------------------------------

    @property
    def loop_lag(self) -> float:
        """The latest event-loop lag sample in seconds (0 before the first)."""
        return self._lag_samples[-1][1] if self._lag_samples else 0.0

    @loop_lag.setter
    def loop_lag(self, seconds: float) -> None:
        self.record_loop_lag(seconds, now=time.monotonic())

    def record_loop_lag(self, seconds: float, *, now: float) -> None:
        samples = self._lag_samples
        samples.append((now, seconds))
        while samples[0][0] < now - LOOP_LAG_WINDOW:
            samples.popleft()

    def max_loop_lag(self, *, now: float | None = None) -> float:
        """The worst lag sample of the last ``LOOP_LAG_WINDOW`` seconds."""
        cutoff = (time.monotonic() if now is None else now) - LOOP_LAG_WINDOW
        return max((lag for at, lag in self._lag_samples if at >= cutoff), default=0.0)

    # --- error rate -------------------------------------------------------------------

    def error_rate(self, *, now: float | None = None) -> float:
        """Connection errors as a percentage of connections accepted, 2 decimals, over
        the last ``ERROR_RATE_WINDOW`` seconds (or since the previous reading, when
        readings are further apart than that).

        Each reading may leave a checkpoint (at most one per ``CHECKPOINT_EVERY``
        seconds) that later readings measure from.
        """
        now = time.monotonic() if now is None else now
        checkpoints = self._checkpoints
        while len(checkpoints) > 1 and checkpoints[1].at <= now - ERROR_RATE_WINDOW:
            checkpoints.popleft()
        base = checkpoints[0]
        accepted = self.total_connections - base.accepted
        errors = self.connection_errors - base.errors
        if now - checkpoints[-1].at >= CHECKPOINT_EVERY:
            checkpoints.append(_Checkpoint(now, self.total_connections, self.connection_errors))
        if not errors:
            return 0.0
        # A long-lived connection accepted before the window may fail inside it.
        return round(100.0 * errors / max(accepted, errors), 2)

    # --- documents --------------------------------------------------------------------

    def statistics(self, broadcaster: SocketSource, *, backend: str) -> dict[str, Any]:
        open_sockets = ConnectionTotals.measure(broadcaster.connections)
        return {
            "total_connections": self.total_connections,
            "total_disconnections": self.total_disconnections,
            "total_messages_sent": self.closed_messages_sent + open_sockets.messages_sent,
            "total_messages_received": (
                self.closed_messages_received + open_sockets.messages_received
            ),
            "connection_errors": self.connection_errors,
            "active_connections": len(broadcaster.connections),
            "active_zones": len(broadcaster.connections_by_zone()),
            "storage_backend": backend,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The verdict: ``status``, its HTTP code, the ``checks`` behind it and the error
    rate it used (so the document shows the number that decided)."""

    status: str
    http_status: int
    checks: dict[str, str]
    error_rate: float = 0.0


class DiskCheck(Protocol):
    """What health reads of the storage's durability (``pricehub.storage.DiskStatus``,
    whose state the storage decides): its ``checks.disk`` text and whether it is fine."""

    @property
    def check(self) -> str: ...

    @property
    def ok(self) -> bool: ...


class RedisChoice(Protocol):
    """What ``redis_required`` reads of the settings (``server.settings.Settings``)."""

    @property
    def redis_url(self) -> str | None: ...

    @property
    def redis_url_explicit(self) -> bool: ...


def redis_required(settings: RedisChoice, *, failovers: int) -> bool:
    """Whether serving from memory is a degradation (health, ``pricehub_redis_required``).

    Yes for a Redis URL the operator gave (flag, environment, file), and for the default
    URL once a Redis has served there: losing it since leaves the instances that shared
    it apart. No with ``--redis-url none``, nor while nothing has answered the default
    URL: that is the embedded default (durable memory) working as designed, not a fallback.
    """
    if settings.redis_url is None:
        return False
    # ``failovers``: the storage's count of losses of a Redis it served from
    # (``StorageCounters.failovers``).
    return settings.redis_url_explicit or failovers > 0


def health_report(
    stats: Stats,
    *,
    redis_configured: bool,
    redis_required: bool = True,
    backend: str,
    storage_ok: bool,
    loop_lag_threshold: float,
    error_rate_threshold: float = 10.0,
    disk: DiskCheck | None = None,
    now: float | None = None,
) -> HealthReport:
    """``healthy`` / ``degraded`` / ``unhealthy`` and the checks that decided it.

    ``unhealthy`` (503): shutting down, the storage cannot serve, or a background task
    (reaper, conflation monitor, ...) crashed. ``degraded`` (200):
    a Redis the operator asked for (``redis_required``) but the in-memory fallback
    serving, error rate at or over
    ``error_rate_threshold`` percent, event-loop lag over ``loop_lag_threshold`` s, or
    the journal of the in-memory store failing (``disk`` not ``ok``, e.g.
    ``"unavailable: <reason>"``; subscribers are still served, publishes get 503 until the
    disk recovers); ``disk`` None: durability disabled. A data dir
    not usable at start with a Redis URL (``"disabled: <reason>"``) is not a degradation,
    nor is the embedded default: no Redis URL given and none answering at the default one
    (``redis: "not_found"``; it is still probed, and used once it answers).
    """
    error_rate = stats.error_rate(now=now)
    ok, state = CheckState.OK, CheckState
    if backend == Backend.REDIS:
        redis = ok
    else:
        redis = state.UNAVAILABLE if redis_required else state.NOT_FOUND
    checks: dict[str, str] = {
        "redis": redis if redis_configured else state.DISABLED,
        "storage": ok if storage_ok else state.UNAVAILABLE,
        "event_loop": ok if stats.max_loop_lag(now=now) <= loop_lag_threshold else state.LAGGING,
        "error_rate": ok if error_rate < error_rate_threshold else state.HIGH,
        "shutdown": state.SHUTTING_DOWN if stats.shutting_down else ok,
        "background": f"{state.FAILED}: " + ",".join(stats.failed_tasks)
        if stats.failed_tasks
        else ok,
        "disk": state.DISABLED if disk is None else disk.check,
    }
    if stats.shutting_down or not storage_ok or stats.failed_tasks:
        return HealthReport(HealthStatus.UNHEALTHY, 503, checks, error_rate)
    disk_ok = disk is None or disk.ok
    degraded = (
        checks["redis"] == state.UNAVAILABLE
        or not disk_ok
        or any(checks[name] != ok for name in ("event_loop", "error_rate"))
    )
    status = HealthStatus.DEGRADED if degraded else HealthStatus.HEALTHY
    return HealthReport(status, 200, checks, error_rate)
