"""The one path by which a price enters pricehub (HTTP, Redis ingest, simulator).

Validation happens before (``pricehub.wire.messages``); here a price gets its seq from the
storage, which publishes it to every instance, and it is counted by source.
"""

from __future__ import annotations

from collections import Counter

from pricehub.storage import Storage, StoredPrice
from pricehub.storage.base import IngestAck
from pricehub.wire.messages import PriceBody

__all__ = ["SOURCES", "Publisher"]

SOURCES = ("http", "redis-ingest", "simulator")


class Publisher:
    """Appends validated prices to the storage and counts them per (zone, source)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.accepted: Counter[tuple[str, str]] = Counter()

    async def publish(
        self, body: PriceBody, *, source: str, ack: IngestAck | None = None
    ) -> StoredPrice:
        """``ack``: the Redis ingest entry this price comes from, acknowledged by the
        storage in the same atomic step as the append."""
        price = await self.storage.append(body.market_zone, body.encode(), ack=ack)
        self.accepted[body.market_zone, source] += 1
        return price
