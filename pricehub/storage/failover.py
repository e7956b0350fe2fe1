"""Redis with live failover to memory and back: what ``create_storage`` gives for a URL.

Every price Redis delivers is mirrored into a ``MemoryStorage``, and reads are served
from that mirror, which is exactly what this instance's listener has seen (resumes are
consistent with the live stream and cost no round trip). So when Redis fails (an error,
a timeout, a silent subscriber), the instance switches to the mirror at once: it keeps
serving, its numbering continues from the last seq it knew, and clients are told
through ``on_backend_changed("in-memory")``. Unreachable at start is the same state.

A probe then retries Redis every ``probe_interval``. Recovery reconciles under a
closed gate (appends wait, for a few round trips):

1. the epoch: claimed if Redis lost it, else Redis's is adopted;
2. per zone, the prices accepted during the outage are written back (and published)
   where Redis is behind, and Redis's seq is raised to ours, so no instance's
   numbering ever goes backwards;
3. if a seq both sides hold carries different prices, the numbering diverged (several
   instances numbered alone): the epoch changes, so clients resuming across the
   outage get ``recovered: false`` instead of a silent mix of two histories;
4. the listener gets the prices other instances published meanwhile, then the backend
   change, and the subscriber takes over from the reconciled seqs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import structlog

from pricehub.server.errors import ConfigError
from pricehub.storage.base import StorageListener, StoredPrice
from pricehub.storage.errors import StorageUnavailable
from pricehub.storage.memory import MemoryStorage
from pricehub.storage.redis import INGEST_ACK, IngestAck, RedisStorage

T = TypeVar("T")

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from pricehub.server.settings import Settings

__all__ = ["FailoverStorage"]

REDIS = "redis"
MEMORY = "in-memory"


class FailoverStorage:
    """The ``Storage`` Protocol on Redis, falling back to memory while Redis is away.

    :param redis_url: the Redis to use when reachable.
    :param zones: the configured zones (reconciled and mirrored on recovery).
    :param key_prefix: prefix of every Redis key and channel (default ``pricehub:``).
    :param history_size: prices retained per zone, in Redis and in memory (default 1000).
    :param timeout: Redis socket timeout in seconds (default 0.5): the failover trigger.
    :param probe_interval: seconds between attempts to get Redis back (default 1), and
        between liveness probes of the subscriber connection.
    :param log: structlog logger (default ``pricehub.storage``).

    Counters for the metrics module: ``failovers``, ``recoveries``, ``redis_errors``,
    ``epoch_changes``, ``gaps`` (prices that arrived after a hole no history could fill).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        zones: Sequence[str],
        key_prefix: str = "pricehub:",
        history_size: int = 1000,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        log: Any = None,
    ) -> None:
        self._url = redis_url
        self._zones = tuple(zones)
        self._key_prefix = key_prefix
        self._history_size = history_size
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._log = log or structlog.get_logger("pricehub.storage")
        self._memory = MemoryStorage(history_size=history_size)
        self._epoch = self._memory.epoch
        self._mode = MEMORY
        self._redis: RedisStorage | None = None
        self._listener: StorageListener | None = None
        # Cleared while recovery reconciles: appends wait so none is numbered twice.
        self._gate = asyncio.Event()
        self._gate.set()
        self._probe_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.failovers = 0
        self.recoveries = 0
        self.redis_errors = 0
        self.epoch_changes = 0
        self.gaps = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, log: structlog.typing.FilteringBoundLogger
    ) -> FailoverStorage:
        if settings.redis_url is None:
            raise ConfigError("redis_url is none: use MemoryStorage")
        return cls(
            settings.redis_url,
            zones=settings.zones,
            key_prefix=settings.key_prefix,
            history_size=settings.history_size,
            timeout=settings.redis_timeout,
            probe_interval=settings.redis_probe_interval,
            log=log,
        )

    @property
    def backend(self) -> str:
        return self._mode

    @property
    def epoch(self) -> str:
        return self._epoch

    def redis_client(self) -> aioredis.Redis:
        """The live Redis client (for the ingest consumer); raises while in memory."""
        redis = self._redis
        if self._mode != REDIS or redis is None:
            raise StorageUnavailable("serving from memory: redis unavailable")
        return redis.client

    @property
    def key_prefix(self) -> str:
        return self._key_prefix

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, listener: StorageListener) -> None:
        self._listener = listener
        try:
            await self._switch_to_redis(recovering=False)
        except StorageUnavailable as exc:
            self.redis_errors += 1
            self._log.warning(
                "redis_unavailable_at_start", backend=MEMORY, error=str(exc),
                probe_interval=self._probe_interval,
            )  # fmt: skip
            self._start_probe()
        else:
            self._log.info("storage_selected", backend=REDIS, epoch=self._epoch)

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._background, *([self._probe_task] if self._probe_task else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self._timeout)  # see RedisStorage.close
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.close()

    # --- failover ---------------------------------------------------------------------

    def _on_lost(self, redis: RedisStorage, cause: BaseException) -> None:
        """Switch to memory (once per outage); callable from any task, synchronously."""
        self.redis_errors += 1
        if redis is not self._redis or self._mode != REDIS:
            return  # an old connection's last words, or already failed over
        self._mode, self._redis = MEMORY, None
        self.failovers += 1
        self._log.warning("storage_failover", backend=MEMORY, error=str(cause), epoch=self._epoch)
        self._spawn(redis.close())
        if self._listener is not None:
            self._listener.on_backend_changed(MEMORY)
        self._start_probe()

    def _start_probe(self) -> None:
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while not self._closed and self._mode != REDIS:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._switch_to_redis(recovering=True)
            except StorageUnavailable as exc:
                self.redis_errors += 1  # counted, not logged: no log storm while down
                self._log.debug("redis_probe_failed", error=str(exc))
            except Exception:
                self._log.exception("redis_recovery_failed")

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- recovery ---------------------------------------------------------------------

    async def _switch_to_redis(self, *, recovering: bool) -> None:
        redis = RedisStorage(
            self._url, key_prefix=self._key_prefix, history_size=self._history_size,
            timeout=self._timeout, probe_interval=self._probe_interval,
            on_lost=self._on_lost, log=self._log,
        )  # fmt: skip
        await redis.connect()
        self._gate.clear()
        try:
            epoch, state = await self._reconcile(redis)
            if self._closed:
                raise StorageUnavailable("storage closed during recovery")
            self._adopt(redis, epoch, state, recovering=recovering)
        except BaseException:
            await redis.close()
            raise
        finally:
            self._gate.set()

    async def _reconcile(
        self, redis: RedisStorage
    ) -> tuple[str, dict[str, tuple[int, list[StoredPrice]]]]:
        """Steps 1-3 of the module docstring; returns Redis's epoch and state."""
        epoch = await redis.claim_epoch(self._epoch)
        # Only zones this instance holds prices for have anything to write back.
        local = {
            zone: (
                self._memory.last_seq(zone),
                await self._memory.history(zone, limit=self._history_size),
            )
            for zone in self._memory.zones_with_prices()
        }
        diverged = await redis.restore(local)
        if epoch == self._epoch and any(diverged.values()):
            epoch = await redis.replace_epoch(epoch, uuid.uuid4().hex[:12])
        return epoch, await redis.load(self._zones)

    def _adopt(
        self,
        redis: RedisStorage,
        epoch: str,
        state: dict[str, tuple[int, list[StoredPrice]]],
        *,
        recovering: bool,
    ) -> None:
        """Step 4, synchronously so no price or append slips in between."""
        catch_up: list[StoredPrice] = []
        for zone, (seq, prices) in state.items():
            if seq == 0 and self._memory.last_seq(zone) == 0:
                continue  # no price on either side: no state for this zone
            if self._memory.last_seq(zone) > 0:  # a fresh zone has no one to catch up
                catch_up += [p for p in prices if p.seq > self._memory.last_seq(zone)]
            self._memory.reset(zone, _contiguous_tail(prices, seq), seq=seq)
        changed = epoch != self._epoch
        self._epoch, self._redis, self._mode = epoch, redis, REDIS
        # Zones without a price are left out: "take whatever comes first" is the same
        # as "after 0" for them (subscribed before the load, nothing can be older).
        positions = {zone: seq for zone, (seq, _) in state.items() if seq}
        redis.deliver_to(_Mirror(self, redis), positions)
        if not recovering:
            return
        self.recoveries += 1
        self.epoch_changes += int(changed)
        self._log.info(
            "storage_recovered", backend=REDIS, epoch=epoch, epoch_changed=changed,
            caught_up=len(catch_up),
        )  # fmt: skip
        listener = self._listener
        if listener is not None:
            if changed:
                listener.on_epoch_changed(epoch)
            listener.on_backend_changed(REDIS)
            for price in catch_up:
                listener.on_price(price)

    # --- from the subscriber ----------------------------------------------------------

    def _mirror(self, redis: RedisStorage, price: StoredPrice) -> None:
        if redis is not self._redis:
            return
        last = self._memory.last_seq(price.zone)
        if price.seq <= last:
            return
        if price.seq == last + 1:
            self._memory.mirror(price)
        else:  # a hole the history could not fill: keep the mirror contiguous
            self.gaps += 1
            self._memory.reset(price.zone, [price], seq=price.seq)
        if self._listener is not None:
            self._listener.on_price(price)

    def _epoch_announced(self, redis: RedisStorage, epoch: str) -> None:
        if redis is not self._redis or epoch == self._epoch:
            return
        self._epoch = epoch
        self.epoch_changes += 1
        self._log.info("storage_epoch_changed", epoch=epoch)
        if self._listener is not None:
            self._listener.on_epoch_changed(epoch)

    # --- Storage ----------------------------------------------------------------------

    async def append(self, zone: str, body: bytes) -> StoredPrice:
        ack = INGEST_ACK.get()
        while True:
            redis = self._redis
            if self._mode == REDIS and redis is not None:
                try:
                    return await redis.append(zone, body, ack=ack)
                except StorageUnavailable as exc:
                    self._on_lost(redis, exc)
                    continue
            if ack is not None:
                # An ingest entry stays pending in the stream and is taken again once
                # Redis is back; numbering it here too would deliver it twice.
                raise StorageUnavailable("redis ingest paused: serving from memory")
            if not self._gate.is_set():
                await self._gate.wait()
                continue
            price = self._memory.record(zone, body)
            if self._listener is not None:
                self._listener.on_price(price)
            return price

    async def append_many(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice]:
        """``append`` for a batch, in order, with the same failover rules per price:
        on Redis, pipelined (see ``RedisStorage.append_outcomes``); prices Redis refused
        because it was lost are numbered in memory, in order, except ingest entries
        (``acks``): those stay pending in the stream (``StorageUnavailable``)."""
        results: list[StoredPrice | None] = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            redis = self._redis
            if self._mode == REDIS and redis is not None:
                todo = await self._append_on_redis(redis, items, acks, todo, results)
                continue
            if acks is not None:
                raise StorageUnavailable("redis ingest paused: serving from memory")
            if not self._gate.is_set():
                await self._gate.wait()
                continue
            prices = await self._memory.append_many([items[index] for index in todo])
            for index, price in zip(todo, prices, strict=True):
                results[index] = price
            if self._listener is not None:
                for price in prices:
                    self._listener.on_price(price)
            todo = []
        return cast(list[StoredPrice], results)

    async def _append_on_redis(
        self,
        redis: RedisStorage,
        items: Sequence[tuple[str, bytes]],
        acks: Sequence[IngestAck] | None,
        todo: list[int],
        results: list[StoredPrice | None],
    ) -> list[int]:
        """One pipelined pass; fills ``results`` and returns the indices Redis did not
        take because it was lost (the caller numbers them in memory)."""
        try:
            outcomes = await redis.append_outcomes(
                [items[index] for index in todo],
                acks=None if acks is None else [acks[index] for index in todo],
            )
        except StorageUnavailable as exc:
            self._on_lost(redis, exc)
            return todo
        failed: list[int] = []
        lost: StorageUnavailable | None = None
        for index, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, StorageUnavailable):
                failed.append(index)
                lost = lost or outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # LeaseLost: the ingest consumer stops
            else:
                results[index] = outcome
        if lost is not None:
            self._on_lost(redis, lost)
        return failed

    async def latest(self, zone: str) -> StoredPrice | None:
        return await self._memory.latest(zone)

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        return await self._memory.history(zone, limit=limit)

    async def _on_redis(self, call: Callable[[RedisStorage], Awaitable[T]]) -> T | None:
        """``call`` on the connected Redis; None when there is none or it was just lost
        (which starts the failover), so the caller falls back to memory."""
        redis = self._redis
        if redis is None:
            return None
        try:
            return await call(redis)
        except StorageUnavailable as exc:
            self._on_lost(redis, exc)
            return None

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        found = await self._memory.since(zone, seq)
        if found is None and seq > self._memory.last_seq(zone):
            # The client saw a newer seq on a faster instance; Redis has it already.
            return await self._on_redis(lambda redis: redis.since(zone, seq))
        return found

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        await self._memory.register_instance(instance_id, snapshot, ttl=ttl)
        await self._on_redis(lambda redis: redis.register_instance(instance_id, snapshot, ttl=ttl))

    async def unregister_instance(self, instance_id: str) -> None:
        await self._memory.unregister_instance(instance_id)
        await self._on_redis(lambda redis: redis.unregister_instance(instance_id))

    async def instances(self) -> dict[str, bytes]:
        found = await self._on_redis(lambda redis: redis.instances())
        return found if found is not None else await self._memory.instances()

    async def check(self) -> None:
        """Never raises: this storage serves from memory when Redis is away (health
        reports that as ``degraded`` through ``backend``). A failing PING here is one
        more way to notice Redis is gone."""
        await self._on_redis(lambda redis: redis.check())


class _Mirror:
    """The listener of the current ``RedisStorage``: mirrors, then forwards."""

    def __init__(self, owner: FailoverStorage, redis: RedisStorage) -> None:
        self._owner = owner
        self._redis = redis

    def on_price(self, price: StoredPrice) -> None:
        self._owner._mirror(self._redis, price)

    def on_backend_changed(self, backend: str) -> None:
        return None  # RedisStorage never changes backend; failover is the owner's

    def on_epoch_changed(self, epoch: str) -> None:
        self._owner._epoch_announced(self._redis, epoch)


def _contiguous_tail(prices: Sequence[StoredPrice], seq: int) -> list[StoredPrice]:
    """The newest prices ending at ``seq`` without a hole (what memory can replay)."""
    tail: list[StoredPrice] = []
    for price in reversed(prices):
        if price.seq != seq - len(tail):
            break
        tail.append(price)
    tail.reverse()
    return tail
