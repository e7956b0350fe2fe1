"""Delivery lag: from a price's ``accepted_at`` to its write to the sockets.

Kept as plain numbers on the broadcaster (no ``prometheus_client`` on the fan-out path,
as for every other metric of it); ``/metrics`` exports them as the histogram
``pricehub_delivery_lag_seconds`` with a ``transport`` label.

What one observation is (``Broadcaster._observe_lag``): a shared write of an audience
(every member gets the same bytes, docs/fanout.md) carrying a zone's prices of one
event-loop tick. Its value is the wall-clock time right after the last member's
``transport.write`` minus the ``accepted_at`` of the oldest of those prices (the worst
in the write); its weight is the number of members written. So ``_count`` counts
(socket, zone, write) deliveries, and quantiles are over deliveries, at the cost of one
observation per (audience, zone) per tick: nothing per subscriber.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["DELIVERY_LAG_BUCKETS", "SSE", "TRANSPORTS", "WS", "LagHistogram"]

# Upper bounds in seconds. A healthy in-memory feed delivers in tens to hundreds of
# microseconds, so the low end is fine-grained; seconds mean a stalled loop or a Redis
# clock far from this host's.
DELIVERY_LAG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
WS, SSE = "ws", "sse"  # ``Encoding.transport``: the label values, both always exported
TRANSPORTS = (WS, SSE)


class LagHistogram:
    """Per-bucket counts (not cumulative; the last one is ``+Inf``) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = DELIVERY_LAG_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float, weight: int) -> None:
        """``weight`` deliveries that each took ``seconds``. A negative lag (the clock
        that stamped accepted_at is ahead of this host's) counts as 0."""
        if seconds < 0.0:
            seconds = 0.0
        # bisect_left: the first bound >= seconds, Prometheus's "le" (less or equal).
        self.counts[bisect_left(self.bounds, seconds)] += weight
        self.total += seconds * weight

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` per bucket, cumulative as Prometheus exposes them."""
        running, buckets = 0, []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets

    @property
    def count(self) -> int:
        return sum(self.counts)
