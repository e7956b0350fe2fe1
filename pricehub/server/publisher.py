"""The one path by which a price enters pricehub (HTTP, Redis ingest, simulator).

Validation happens before (``pricehub.wire.messages``); here a price gets its seq from the
storage, which publishes it to every instance, and it is counted by source.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from pricehub.storage import Storage, StoredPrice
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import IngestAck
from pricehub.wire.messages import PriceBody

__all__ = ["PUBLISH_CHUNK", "SOURCES", "Publisher"]

SOURCES = ("http", "redis-ingest", "simulator")

# Prices a batch hands to the storage per event-loop turn. In memory a chunk is
# numbered and fanned out without an await, so this bounds how long a burst holds the
# loop (heartbeats, health, socket reads wait behind it); on Redis it is about one
# pipeline (MAX_PIPELINE), so chunks overlap with the round trips anyway.
PUBLISH_CHUNK = 500


class Publisher:
    """Appends validated prices to the storage and counts them per (zone, source)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.accepted: Counter[tuple[str, str]] = Counter()

    async def publish(self, body: PriceBody, *, source: str) -> StoredPrice:
        price = await self.storage.append(body.market_zone, body.encode())
        self.accepted[body.market_zone, source] += 1
        return price

    async def publish_many(
        self,
        bodies: Sequence[PriceBody],
        *,
        source: str,
        acks: Sequence[IngestAck] | None = None,
        chunk: int = PUBLISH_CHUNK,
    ) -> list[StoredPrice]:
        """``publish`` for a batch, in order, ``chunk`` prices per storage call, yielding
        to the event loop between chunks so a burst never starves the rest.

        ``acks`` (the Redis ingest, one per body) ride in the append scripts; they need
        the Redis-backed ``FailoverStorage``.
        """
        prices: list[StoredPrice] = []
        accepted = self.accepted
        for start in range(0, len(bodies), chunk):
            if start:
                await asyncio.sleep(0)
            items = [(body.market_zone, body.encode()) for body in bodies[start : start + chunk]]
            if acks is None:
                stored = await self.storage.append_many(items)
            else:
                if not isinstance(self.storage, FailoverStorage):
                    raise TypeError("ingest acknowledgements need the Redis-backed storage")
                stored = await self.storage.append_many(
                    items, acks=acks[start : start + chunk]
                )
            for price in stored:
                accepted[price.zone, source] += 1
            prices.extend(stored)
        return prices
