"""``--stale-after``: a zone whose feed went quiet is said to be so, in-band.

``Staleness`` sits between the storage and the broadcaster (a ``StorageListener`` that
forwards everything). It hears every accepted price of every instance, since the storage
delivers the cluster's prices to each instance, and judges silence on the price's
``accepted_at``, which is stored with the price and the same on every instance: a zone
kept alive by another instance's publishes is live here too, and all instances agree
(up to their clocks, which NTP keeps within milliseconds of Redis's).

Cost: a price costs a dict store (and, once per zone and period, a heap push); nothing
is parsed per price. One sweep task (``run``) pops the deadlines that are due, each
zone's at most once per ``stale_after``: only then is its latest ``accepted_at`` read.
A zone is pushed again only when its deadline moved (prices came meanwhile), and a zone
announced stale leaves the heap until its next price. No timer per zone or subscriber.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable

import structlog

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.storage import Storage, StoredPrice
from pricehub.storage.errors import StorageError
from pricehub.wire import messages
from pricehub.wire.codes import ZoneStatus

__all__ = ["MAX_SWEEP_INTERVAL", "Staleness"]

log = structlog.get_logger("pricehub.staleness")
# How late a stale announcement may be, at most (and a tenth of --stale-after below it).
MAX_SWEEP_INTERVAL = 0.5


class Staleness:
    """Which zones are stale, told to their subscribers through ``broadcaster``.

    :param stale_after: ``--stale-after`` seconds (> 0).
    :param clock: Unix seconds, the clock ``accepted_at`` is in (injectable for tests).
    """

    def __init__(
        self, broadcaster: Broadcaster, *, stale_after: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broadcaster = broadcaster
        self.stale_after = stale_after
        self.clock = clock
        self._latest: dict[str, StoredPrice] = {}  # zones that had a price: their newest
        self._deadlines: list[tuple[float, str]] = []  # (when it may be stale, zone)
        self._queued: set[str] = set()  # zones with an entry in the heap
        self._stale: dict[str, bytes] = {}  # stale zones: their zone_status stale message
        broadcaster.zone_status = self.status
        broadcaster.stale_zones = self.stale_zones

    # --- StorageListener --------------------------------------------------------------

    def on_price(self, price: StoredPrice) -> None:
        zone = price.zone
        self._latest[zone] = price
        if self._stale and zone in self._stale:
            # Before the price itself: a subscriber learns the zone is live, then gets it.
            del self._stale[zone]
            self.broadcaster.send_zone(zone, messages.zone_status(
                zone, ZoneStatus.LIVE, since=messages.accepted_at_of(price.payload),
                last_seq=price.seq, now=messages.utc_now(),
            ))
        if zone not in self._queued:
            self._push(zone, price)
        self.broadcaster.on_price(price)

    def on_backend_changed(self, backend: str) -> None:
        self.broadcaster.on_backend_changed(backend)

    def on_epoch_changed(self, epoch: str) -> None:
        self.broadcaster.on_epoch_changed(epoch)

    def on_gap(self, zone: str, from_seq: int, to_seq: int) -> None:
        self.broadcaster.on_gap(zone, from_seq, to_seq)

    # --- what the session, stats and metrics read ---------------------------------------

    def status(self, zone: str) -> bytes | None:
        """The ``zone_status`` stale message of a stale zone, None for a live one."""
        return self._stale.get(zone)

    def stale_zones(self) -> list[str]:
        return sorted(self._stale)

    # --- the sweep --------------------------------------------------------------------

    def _push(self, zone: str, price: StoredPrice) -> None:
        accepted = messages.accepted_seconds(price.payload)
        if accepted is None:
            return  # stored before accepted_at existed: judged from its next price on
        heapq.heappush(self._deadlines, (accepted + self.stale_after, zone))
        self._queued.add(zone)

    def sweep(self) -> None:
        """Announce every zone whose deadline has passed with no newer price."""
        now, deadlines = self.clock(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _deadline, zone = heapq.heappop(deadlines)
            self._queued.discard(zone)
            price = self._latest[zone]
            accepted = messages.accepted_seconds(price.payload)
            if accepted is not None and accepted + self.stale_after > now:
                self._push(zone, price)  # prices came meanwhile: judged again later
            elif accepted is not None:
                self._announce(zone, price)

    def _announce(self, zone: str, price: StoredPrice) -> None:
        message = messages.zone_status(
            zone, ZoneStatus.STALE, since=messages.accepted_at_of(price.payload),
            last_seq=price.seq, now=messages.utc_now(),
        )
        self._stale[zone] = message
        self.broadcaster.send_zone(zone, message)

    def seed(self, prices: Iterable[StoredPrice]) -> None:
        """Zones' latest prices read at start: a zone silent since before this instance
        started is stale here too. A price heard meanwhile is newer and wins."""
        for price in prices:
            if price.zone not in self._latest:
                self._latest[price.zone] = price
                if price.zone not in self._queued:
                    self._push(price.zone, price)

    async def run(self, storage: Storage, zones: Iterable[str]) -> None:
        """The one timer: seed from storage, then sweep every tenth of ``stale_after``
        (at most ``MAX_SWEEP_INTERVAL``: that late, at most, is an announcement)."""
        async with asyncio.TaskGroup() as group:  # sweeping already while seeding
            group.create_task(self._seed_from(storage, zones))
            group.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        interval = min(self.stale_after / 10, MAX_SWEEP_INTERVAL)
        while True:
            self.sweep()
            await asyncio.sleep(interval)

    async def _seed_from(self, storage: Storage, zones: Iterable[str]) -> None:
        for zone in zones:
            try:
                latest = await storage.latest(zone)
            except StorageError as exc:  # judged from the next prices only
                log.warning("staleness_seed_failed", zone=zone, error=str(exc))
                return
            if latest is not None:
                self.seed((latest,))
