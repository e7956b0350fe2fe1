"""The one path by which a price enters pricehub (HTTP, Redis ingest, simulator).

Validation happens before (``pricehub.wire.messages``); here a price gets its seq from the
storage, which publishes it to every instance, and it is counted by source.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
from collections import Counter
from collections.abc import Sequence

from pricehub.storage import Storage, StoredPrice
from pricehub.storage.base import IngestAck
from pricehub.storage.errors import BatchInterrupted, StorageUnavailable, ZoneRefused
from pricehub.wire.messages import PriceBody

__all__ = ["PUBLISH_CHUNK", "SOURCES", "Publisher"]

SOURCES = ("http", "redis-ingest", "simulator")

# Prices a batch hands to the storage per event-loop turn. In memory a chunk is
# numbered and fanned out without an await, so this bounds how long a burst holds the
# loop (heartbeats, health, socket reads wait behind it); on Redis it is about one
# pipeline (MAX_PIPELINE), so chunks overlap with the round trips anyway.
PUBLISH_CHUNK = 500

_ZONE = operator.attrgetter("zone")


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

        ``acks`` (the Redis ingest, one per body) ride in the append scripts. A refusal
        after some prices were kept raises ``BatchInterrupted`` naming all of them.
        """
        prices: list[StoredPrice] = []
        for start in range(0, len(bodies), chunk):
            if start:
                await asyncio.sleep(0)
            items = [(body.market_zone, body.encode()) for body in bodies[start : start + chunk]]
            part = None if acks is None else acks[start : start + chunk]
            try:
                stored = await self.storage.append_many(items, acks=part)
            except (StorageUnavailable, ZoneRefused) as exc:
                kept = exc.accepted if isinstance(exc, BatchInterrupted) else []
                self._count(kept, source)
                # A bare ZoneRefused (a retry after an epoch change can raise one) still
                # goes out as a BatchInterrupted: the caller answers it like any refusal
                # (503 naming the zone), never as an internal error.
                if not prices and not kept and isinstance(exc, StorageUnavailable):
                    raise
                cause = exc.cause if isinstance(exc, BatchInterrupted) else exc
                raise BatchInterrupted([*prices, *kept], cause) from exc
            self._count(stored, source)
            prices.extend(stored)
        return prices

    def _count(self, prices: Sequence[StoredPrice], source: str) -> None:
        # Counted in C (Counter.update over an iterator): a burst counts thousands.
        self.accepted.update(zip(map(_ZONE, prices), itertools.repeat(source)))
