"""The built-in price simulator: a plausible live feed with no publisher and no Redis.

Each zone follows a mean-reverting random walk (Ornstein-Uhlenbeck) around a level typical
of its market, with occasional scarcity spikes and, where renewables flood the grid,
negative prices, because a demo that never shows those misleads UI developers.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import structlog

from pricehub.server.publisher import Publisher
from pricehub.storage.errors import StorageError
from pricehub.wire import messages

__all__ = ["MIN_GAP", "ZONE_LEVELS", "PriceWalk", "run_simulator"]

log = structlog.get_logger("pricehub.simulator")

# Typical day-ahead / real-time levels in $/MWh (rough, for realism only).
ZONE_LEVELS = {
    "pjm": 42.0, "caiso": 55.0, "ercot": 38.0, "nyiso": 48.0,
    "miso": 35.0, "spp": 30.0, "isone": 58.0,
}


@dataclass(slots=True)
class PriceWalk:
    """One zone's simulated price; ``step`` is pure given the random source."""

    level: float
    price: float
    reversion: float = 0.15
    volatility: float = 0.04
    spike_chance: float = 0.01
    negative_chance: float = 0.005

    @classmethod
    def for_zone(cls, zone: str, rng: random.Random) -> PriceWalk:
        level = ZONE_LEVELS.get(zone, 40.0 + rng.uniform(-5, 5))
        return cls(level=level, price=level)

    def step(self, rng: random.Random) -> tuple[float, float]:
        """Advance one tick; returns (price, volume)."""
        shock = rng.gauss(0.0, self.volatility * self.level)
        self.price += self.reversion * (self.level - self.price) + shock
        roll = rng.random()
        if roll < self.spike_chance:
            self.price = self.level * rng.uniform(3.0, 8.0)
        elif roll < self.spike_chance + self.negative_chance:
            self.price = -rng.uniform(5.0, 30.0)
        volume = max(0.0, rng.gauss(500.0, 120.0))
        return round(self.price, 2), round(volume, 1)


MIN_GAP = 0.01  # seconds: finer spreading would be a timer per price at 100,000 zones


async def run_simulator(
    publisher: Publisher, zones: tuple[str, ...], *, interval: float, seed: int | None = None
) -> None:
    """Publish one price per zone every ``interval`` seconds, spread over the interval:
    one batch every ``max(interval / zones, MIN_GAP)`` seconds, so many zones cost a few
    batches per second instead of a timer per price."""
    rng = random.Random(seed)
    walks = {zone: PriceWalk.for_zone(zone, rng) for zone in zones}
    gap = max(interval / len(zones), MIN_GAP)
    per_batch = max(1, round(len(zones) * gap / interval))
    items = list(walks.items())
    while True:
        for start in range(0, len(items), per_batch):
            now = messages.utc_now()
            bodies = []
            for zone, walk in items[start : start + per_batch]:
                price, volume = walk.step(rng)
                bodies.append(messages.PriceBody(zone, price, volume, now))
            try:
                await publisher.publish_many(bodies, source="simulator")
            except StorageError as exc:
                # A storage hiccup must not end the feed; the next tick tries again.
                log.warning("simulator_publish_failed", zones=len(bodies), error=str(exc))
            await asyncio.sleep(gap)
