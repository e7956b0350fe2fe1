"""The heartbeat reaper: pings every socket and closes the silent ones with 4000.

Any frame from the client (a message, a ``heartbeat``, a protocol-level pong) counts as
a sign of life. So does, while a session job runs (``Connection.busy``: opening zones,
a replay, a history), the client consuming what is written to it: its frames, the pongs
among them, wait unread behind the job, and a client reading a long opening must not be
taken for dead. Consumed means acknowledged by the peer (gone from pricehub's buffer and
the kernel's send queue), not merely written, so a dead peer is still closed
``heartbeat_timeout`` after the last bytes it took in. The reaper wakes often (at most
every second) so a dead client is closed close to ``heartbeat_timeout`` after its last
sign of life, not up to a whole interval later.
"""

from __future__ import annotations

import asyncio
import time

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.stats import Stats
from pricehub.wire.codes import CloseCode, DisconnectReason

__all__ = ["reap_once", "run_reaper"]


def reap_once(
    broadcaster: Broadcaster, stats: Stats, *, now: float, interval: float, timeout: float
) -> int:
    """One pass: ping the sockets due for a ping, close the silent ones. Returns closes."""
    closed = 0
    for connection in list(broadcaster.connections):
        if connection.transport.is_closing():
            connection.transport_lost()  # gone without a close; SSE learns it only here
            continue
        if connection.busy and connection.consumed_since_last_look():
            connection.last_seen = now
        if now - connection.last_seen >= timeout:
            broadcaster.close(
                connection, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout",
                reason=DisconnectReason.HEARTBEAT,
            )
            closed += 1
        elif now - connection.last_ping >= interval:
            connection.ping(now)
    stats.reaper_runs += 1
    stats.reaper_closes += closed
    return closed


async def run_reaper(
    broadcaster: Broadcaster, stats: Stats, *, interval: float, timeout: float
) -> None:
    tick = min(1.0, interval / 2)
    while True:
        await asyncio.sleep(tick)
        reap_once(broadcaster, stats, now=time.monotonic(), interval=interval, timeout=timeout)
