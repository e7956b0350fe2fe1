"""In-memory storage: the embedded default and the failover target.

Same semantics as the Redis backend, within one process: seqs per zone, a bounded
history (``deque(maxlen=...)`` drops the oldest price, which ``since`` then reports as
a gap), and instance registrations that expire by TTL.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from pricehub.storage.base import (
    HistorySlice,
    IngestAck,
    IngestSource,
    Snapshot,
    Storage,
    StorageListener,
    StoredPrice,
    first_in_history_order,
)
from pricehub.storage.errors import StorageUnavailable
from pricehub.wire.codes import Backend
from pricehub.wire.messages import accepted_now, timestamp_bytes, with_seq

__all__ = ["MemoryStorage"]


class _Zone:
    __slots__ = ("history", "seq")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.history: deque[StoredPrice] = deque(maxlen=history_size)


# What a read sees for a zone that never had a price: no state is created for it, so
# state exists only for zones with prices however many are configured or asked about.
_EMPTY = _Zone(0)


class MemoryStorage(Storage):
    """A dict of zones in this process. It counts nothing and keeps no journal: its
    ``counters`` and ``disk_status`` are the Protocol's defaults.

    :param history_size: prices retained per zone (default 1000, as ``--history-size``).
    :param epoch: numbering lineage; a fresh random one by default, since a new
        process starts numbering from 1 again.
    :param clock: monotonic seconds, injectable for TTL tests.
    """

    backend = Backend.IN_MEMORY

    def __init__(
        self,
        *,
        history_size: int = 1000,
        epoch: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._history_size = history_size
        self._epoch = epoch or uuid.uuid4().hex[:12]
        self._clock = clock
        self._zones: dict[str, _Zone] = {}
        self._instances: dict[str, tuple[float, bytes]] = {}
        self._listener: StorageListener | None = None

    @property
    def epoch(self) -> str:
        return self._epoch

    async def start(self, listener: StorageListener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    def _zone(self, zone: str) -> _Zone:
        state = self._zones.get(zone)
        if state is None:
            state = self._zones[zone] = _Zone(self._history_size)
        return state

    async def append(
        self, zone: str, body: bytes, *, ack: IngestAck | None = None
    ) -> StoredPrice:
        if ack is not None:  # there is no stream here to acknowledge the entry in
            raise StorageUnavailable("in-memory storage has no ingest stream")
        price = self.record(zone, body)
        if self._listener is not None:
            self._listener.on_price(price)
        return price

    def ingest_source(self) -> IngestSource | None:
        return None  # no Redis, no stream to consume

    async def append_many(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice]:
        """``append`` for a batch, in order, with no await in between (one loop turn):
        numbered in one step, so its prices share one ``accepted_at``."""
        if acks is not None:
            raise StorageUnavailable("no ingest stream without Redis")
        accepted_at = accepted_now()
        prices = [self.record(zone, body, accepted_at) for zone, body in items]
        listener = self._listener
        if listener is not None:
            for price in prices:
                listener.on_price(price)
        return prices

    def record(self, zone: str, body: bytes, accepted_at: bytes | None = None) -> StoredPrice:
        """Number and store a price without publishing it. ``accepted_at`` (the time of
        numbering, stored in the payload): now unless a batch numbered together gives it."""
        state = self._zone(zone)
        state.seq += 1
        stamp = accepted_now() if accepted_at is None else accepted_at
        price = StoredPrice(zone, state.seq, with_seq(body, state.seq, stamp))
        state.history.append(price)
        return price

    def mirror(self, price: StoredPrice) -> None:
        """Keep a copy of a price that another backend numbered, so this store can
        take over with no gap and no seq going backwards (failover)."""
        state = self._zone(price.zone)
        if price.seq > state.seq:
            state.seq = price.seq
            state.history.append(price)

    def reset(self, zone: str, prices: Iterable[StoredPrice], *, seq: int) -> None:
        """Replace a zone's seq and retained history (contiguous, oldest first) with
        another backend's, once failover recovery has reconciled the two."""
        state = self._zone(zone)
        state.seq = seq
        state.history.clear()
        state.history.extend(prices)

    def forget(self, zone: str) -> None:
        """Drop one zone's seq and history: failover recovery adopted a lineage that
        has no price there, so its first price must be taken as seq 1 again."""
        self._zones.pop(zone, None)

    def clear(self) -> None:
        """Forget every zone's seq and history (registrations stay): failover drops a
        lineage that must not reach Redis (a journal of another Redis feed)."""
        self._zones.clear()

    def last_seq(self, zone: str) -> int:
        return self._zones.get(zone, _EMPTY).seq

    def zones_with_prices(self) -> list[str]:
        """The zones this store holds state for (failover reconciles only those)."""
        return list(self._zones)

    async def latest(self, zone: str) -> StoredPrice | None:
        history = self._zones.get(zone, _EMPTY).history
        return history[-1] if history else None

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        history = self._zones.get(zone, _EMPTY).history
        return list(history)[-limit:] if limit > 0 else []

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        state = self._zones.get(zone, _EMPTY)
        if seq > state.seq:
            return None
        if seq == state.seq:
            return []
        if not state.history or state.history[0].seq > seq + 1:
            return None
        return [price for price in state.history if price.seq > seq]

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        """One synchronous read of the dicts: nothing can run between two zones (no
        await), so it is one instant without a lock."""
        zones_state = self._zones
        prices: dict[str, StoredPrice | None] = {}
        for zone in zones:
            history = zones_state.get(zone, _EMPTY).history
            prices[zone] = history[-1] if history else None
        return Snapshot(self._epoch, prices)

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        """A scan of the zones' bounded histories (a zone's prices are in seq order, not
        necessarily in market time order: a publisher may send an older time)."""
        low, high = start.encode(), end.encode()
        matching = [
            price
            for zone in dict.fromkeys(zones)
            for price in self._zones.get(zone, _EMPTY).history
            if low <= timestamp_bytes(price.payload) < high
        ]
        return first_in_history_order(matching, limit)

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        self._instances[instance_id] = (self._clock() + ttl, snapshot)

    async def unregister_instance(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)

    async def instances(self) -> dict[str, bytes]:
        now = self._clock()
        expired = [key for key, (deadline, _) in self._instances.items() if deadline <= now]
        for key in expired:
            del self._instances[key]
        return {key: snapshot for key, (_, snapshot) in self._instances.items()}

    async def check(self) -> None:
        return None
