"""``max_rate`` on the fan-out: a zone stream with a rate, and the pace groups that time it.

A rate-limited zone of a connection is a ``PacedStream``. Its updates do not go through
the per-update path (``Connection.deliver`` skips it once it is live; audiences pacing a
zone are not among the zone's per-update audiences): one ``PaceGroup`` per (zone, rate)
holds every audience and every connection outside an audience that paces the zone at
that rate, and a price only arms the group's one timer, if it is not armed already.
When the timer fires, each member gets the zone's newest price if it is newer than what
it last got, with ``skipped``. So a subscriber costs nothing for the updates it does not
get, and one shared write per firing serves an audience of any size.

Every group of one rate fires on the same grid of loop times (multiples of
``1/rate``): deliveries are ``1/rate`` apart, the newest price waits at most ``1/rate``,
and a connection outside its audience, fired at the same instant as the audience, has
the same last seq afterwards, so it is in step and joins it at the end of that flush
("out of step until its first delivery, then joins").
"""

from __future__ import annotations

import asyncio
import math
from typing import Generic, TypeVar

from pricehub.server.policy.resume import HELD_LIMIT, ZoneStream

__all__ = ["PaceGroup", "PacedStream", "next_tick"]

Member = TypeVar("Member")


class PacedStream(ZoneStream):
    """A zone stream that gets at most ``rate`` updates per second (``max_rate``)."""

    __slots__ = ("rate",)

    def __init__(self, zone: str, *, rate: float, held_limit: int = HELD_LIMIT) -> None:
        super().__init__(zone, held_limit=held_limit)
        self.rate = rate


class PaceGroup(Generic[Member]):
    """Who paces one zone at one rate (audiences and individual connections, as the
    broadcaster keeps them), and the group's timer (None: not armed)."""

    __slots__ = ("interval", "members", "rate", "timer", "zone")

    def __init__(self, zone: str, rate: float) -> None:
        self.zone = zone
        self.rate = rate
        self.interval = 1.0 / rate
        self.members: dict[Member, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def next_tick(now: float, rate: float) -> float:
    """The first point of ``rate``'s grid (multiples of ``1/rate``) after ``now``."""
    return (math.floor(now * rate) + 1.0) / rate
