"""Redis Stream ingest: ``XADD pricehub:ingest * market_zone pjm price 41.5 [volume V]
[timestamp T]``, taken once per cluster and published like an HTTP price.

Ordering is the hard part: "a zone's entries get their seqs in stream order, whichever
instance takes them". A consumer group alone does not give that (two consumers can read
entries 1 and 2 of a zone and append them in either order), so exactly one instance
consumes at a time: the holder of a lease (``<prefix>ingest:lease``, ``SET NX PX``,
renewed by its holder). It reads through the consumer group, up to ``batch`` entries
at a time (the reply parsed by hiredis), and appends each read as one batch, in stream
order (``Publisher.publish_many``); on one Redis node two batches are in flight at once,
and the append script itself refuses an entry while an older one is pending.

Exactly once: an entry's append and its XACK are one Lua script (the ``acks=`` of
``Storage.append_many``, passed through ``Publisher.publish_many``; a batch's entries are
acknowledged in the script that appends them, see ``APPEND_MANY_LUA``), so a crash, even
mid-batch, cannot separate them, and the script refuses to run unless the caller still
holds the lease: an instance that stalled past its lease cannot append once its
successor started (a fencing token).

Takeover: when the holder dies its lease expires (``lease_ttl``); the next holder first
XAUTOCLAIMs the pending entries (delivered to the dead consumer but, by atomicity, never
appended), oldest first, then goes on with new ones. A holder shutting down cleanly
releases the lease at once.

Invalid entries are validated like the HTTP body, logged (throttled), counted and
acknowledged, never retried. Entries are read as Redis sends them (a flat field list,
not redis-py's dict), so a field given twice is seen and rejected instead of "the last
one wins". While the instance serves from memory (Redis away), ingest pauses: entries
wait in the stream.

The consumer talks to the storage through ``storage.base.IngestSource`` only, and owns
its counters (``IngestStats``, published as ``keys.INGEST_STATS`` by ``install``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from pricehub.server.keys import INGEST_STATS, INSTANCE_ID, PUBLISHER, SETTINGS, STORAGE
from pricehub.server.publisher import Publisher
from pricehub.server.stats import IngestStats
from pricehub.storage.base import IngestAck, IngestSource
from pricehub.storage.errors import StorageError
from pricehub.storage.redis import INGEST_GROUP, KeyLayout, LeaseLost
from pricehub.wire.errors import ValidationError
from pricehub.wire.messages import PriceBody, utc_now, validate_ingest_fields

__all__ = ["INGEST_STATS", "IngestConsumer", "IngestStats", "ingest_ctx", "install"]

log = structlog.get_logger("pricehub.ingest")

# KEYS: lease. ARGV: token, ttl ms. Take the lease if free, extend it if ours.
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token. Give the lease up, if it is still ours.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

STOP_GRACE = 2.0  # seconds shutdown waits for the consumer
# Entries per read, validated in one loop turn (as one HTTP batch of up to 1,000 is).
# Measured on 2-core bursts (bench/RESULTS.md): 1,000 took 2,000-zone bursts at 32-36k/s
# where 500 took 20-23k/s and 250 or 2,000 less still; at 20,000 zones 39k vs 29k/s.
# With two such reads in flight a whole 2,000-price interval is in Redis's hands at once.
BATCH = 1000
LOGGED_INVALID = 10  # log every invalid entry up to this many, then one in a thousand

# id, flat [name, value, ...] as Redis sends it: a duplicated field stays visible.
Entry = tuple[bytes, list[bytes] | list[str]]


async def _settle(flying: deque[asyncio.Task[None]]) -> None:
    """Wait for every append in flight, oldest first; the first error ends the wait."""
    while flying:
        await flying.popleft()


def _raw_replies(client: aioredis.Redis) -> aioredis.Redis:
    """A client on the same connections whose stream reads are left as Redis sent them:
    redis-py turns an entry's fields into a dict, which hides a duplicated field."""
    raw = client
    if not isinstance(client, AsyncRedisCluster):
        # A cluster client has no pool to share; its callbacks can be set in place, as
        # only the ingest reads streams through it.
        raw = aioredis.Redis(connection_pool=client.connection_pool)
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        raw.set_response_callback(command, lambda response, **_: response)
    return raw


class IngestConsumer:
    """Consumes the ingest stream while holding the cluster-wide lease.

    :param storage: the Redis-backed storage (its live client is used).
    :param publisher: where valid prices go (``source="redis-ingest"``).
    :param zones: the configured zones (validation).
    :param consumer: this instance's name in the group and its lease token.
    :param lease_ttl: seconds a lease lives without renewal (default 2): how long a
        dead holder's entries wait before another instance takes them.
    :param block: seconds one read waits for new entries (default 0.25); keep it under
        the Redis socket timeout.
    :param batch: entries per read (default ``BATCH``): appended as one pipelined batch.
    :param stats: counters to update (default: a fresh ``IngestStats``).
    """

    def __init__(
        self,
        storage: IngestSource,
        publisher: Publisher,
        *,
        zones: Sequence[str],
        consumer: str,
        lease_ttl: float = 2.0,
        block: float = 0.25,
        batch: int = BATCH,
        stats: IngestStats | None = None,
    ) -> None:
        self._storage = storage
        self._publisher = publisher
        self._zones = frozenset(zones)
        self._consumer = consumer
        self._keys = KeyLayout(storage.key_prefix)
        self._lease_ms = int(lease_ttl * 1000)
        self._renew_every = lease_ttl / 3
        self._block_ms = max(1, int(block * 1000))
        self._batch = batch
        self._stopping = asyncio.Event()
        self._claim_due = True
        self.stats = stats or IngestStats()

    async def run(self) -> None:
        """Until ``stop``: wait for Redis and the lease, consume until either is lost."""
        while not self._stopping.is_set():
            try:
                client = self._storage.redis_client()
                if await self._acquire(client):
                    await self._consume(_raw_replies(client))
            # RedisClusterException: a cluster with a slot uncovered (mid-failover).
            except (StorageError, RedisError, RedisClusterException, OSError) as exc:
                log.debug("ingest_paused", reason=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._renew_every):
                    await self._stopping.wait()

    def stop(self) -> None:
        """Ask ``run`` to return after the entry in hand (within one ``block``).

        Cooperative on purpose: cancelling a task inside a blocking XREADGROUP can
        leave redis-py (8.1, Python 3.11) waiting on its socket with the
        cancellation swallowed, so shutdown would hang.
        """
        self._stopping.set()

    async def release(self) -> None:
        """Hand the lease over at once (clean shutdown)."""
        client = self._storage.redis_client()
        await client.eval(RELEASE_LUA, 1, self._keys.ingest_lease, self._consumer)

    async def _acquire(self, client: aioredis.Redis) -> bool:
        held = await client.eval(
            LEASE_LUA, 1, self._keys.ingest_lease, self._consumer, self._lease_ms
        )
        return bool(held)

    async def _consume(self, client: aioredis.Redis) -> None:
        await self._ensure_group(client)
        await self._forget_idle_consumers(client)
        self.stats.leases += 1
        log.info("ingest_lease_acquired", consumer=self._consumer)
        # Pending entries (a dead holder's, ours from before a failure) come first.
        self._claim_due = True
        renew_at = time.monotonic() + self._renew_every
        ahead: asyncio.Task[list[Entry]] | None = None
        # Appends in flight, oldest first: while Redis runs one batch's script the next
        # is validated and queued behind it (same connection, so run in order after it).
        flying: deque[asyncio.Task[None]] = deque()
        depth = self._storage.ingest_depth
        try:
            while not self._stopping.is_set():
                if ahead is not None:
                    entries, ahead = await ahead, None
                else:
                    if self._claim_due:
                        # In-flight entries are pending too: a claim now would take
                        # them again and append them twice.
                        await _settle(flying)
                    entries = await self._next_entries(client)
                if not entries:
                    await _settle(flying)  # nothing new: settle what is in flight first
                else:
                    if time.monotonic() >= renew_at:
                        renew_at = await self._renew(client)
                    if len(entries) >= self._batch:
                        # A full read: more is probably waiting (a burst). Read it while
                        # this batch is appended; an entry read but never appended stays
                        # pending, claimed by the next holder (or by us after a failure).
                        ahead = asyncio.create_task(self._read_batch(client))
                    bodies, acks = await self._prepare_batch(client, entries)
                    if bodies:
                        flying.append(asyncio.create_task(self._publish(bodies, acks)))
                        await asyncio.sleep(0)  # it queues its appends before the next
                    while flying and (len(flying) >= depth or flying[0].done()):
                        await flying.popleft()  # its error ends this lease's consuming
                if time.monotonic() >= renew_at:
                    renew_at = await self._renew(client)
        finally:
            # Not cancelled (see ``stop``): reads and appends end within Redis's timeout.
            for task in [*flying, *([ahead] if ahead is not None else [])]:
                with contextlib.suppress(Exception):
                    await task

    async def _next_entries(self, client: aioredis.Redis) -> list[Entry]:
        if self._claim_due:
            self._claim_due = False
            claimed = await self._claim_pending(client)
            if claimed:
                self._claim_due = True  # until a claim comes back empty
                return claimed
        return await self._read_new(client)  # returns at once when entries are waiting

    async def _renew(self, client: aioredis.Redis) -> float:
        if not await self._acquire(client):
            raise LeaseLost("ingest lease taken by another instance")
        return time.monotonic() + self._renew_every

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        # From id 0: entries added before the group existed are prices for us too.
        try:
            await client.xgroup_create(self._keys.ingest, INGEST_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _forget_idle_consumers(self, client: aioredis.Redis) -> None:
        """Drop previous consumers with nothing pending: every restart names a new
        one, and the group would otherwise list them forever."""
        consumers: Any = await client.xinfo_consumers(self._keys.ingest, INGEST_GROUP)
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != self._consumer and int(consumer["pending"]) == 0:
                await client.xgroup_delconsumer(self._keys.ingest, INGEST_GROUP, name)

    async def _claim_pending(self, client: aioredis.Redis) -> list[Entry]:
        """Entries delivered but never acknowledged (a dead holder's, or ours from
        before Redis failed), oldest first: they come before anything new."""
        response = await client.xautoclaim(
            self._keys.ingest, INGEST_GROUP, self._consumer,
            min_idle_time=0, start_id="0-0", count=self._batch,
        )  # fmt: skip
        # Pending entries that no longer exist were deleted before anyone appended them (by
        # hand, or an XADD MAXLEN shorter than the backlog): their prices are lost, so say
        # so loudly. Redis 7 lists their ids apart (and drops them from the group); 6.2
        # returns them without fields, and they go on to be acknowledged as invalid.
        gone = [entry_id for entry_id, fields in response[1] if fields is None]
        gone += response[2] if len(response) > 2 else []
        if gone:
            log.error(
                "ingest_pending_entries_deleted", count=len(gone),
                first=gone[0].decode(errors="replace"),
            )  # fmt: skip
        entries = [(entry_id, fields or []) for entry_id, fields in response[1]]
        self.stats.claimed += len(entries)
        return entries

    async def _read_batch(self, client: aioredis.Redis) -> list[Entry]:
        """Up to ``batch`` new entries, without blocking."""
        return await self._read(client, block=None)

    async def _read_new(self, client: aioredis.Redis) -> list[Entry]:
        """Blocks until something is new (up to ``block``), then takes up to a batch."""
        return await self._read(client, block=self._block_ms)

    async def _read(self, client: aioredis.Redis, *, block: int | None) -> list[Entry]:
        # The nested reply is parsed by hiredis (C); it is left as Redis sent it (see
        # ``_raw_replies``): RESP2 [[stream, [[id, fields], ...]]], RESP3 {stream: [...]},
        # or nil, each entry's fields a flat list in which a name given twice is seen.
        response: Any = await client.xreadgroup(
            INGEST_GROUP, self._consumer, {self._keys.ingest: ">"},
            count=self._batch, block=block,
        )  # fmt: skip
        if not response:
            return []
        streams = response.values() if isinstance(response, dict) else (s[1] for s in response)
        return [(entry_id, fields or []) for entries in streams for entry_id, fields in entries]

    async def _prepare_batch(
        self, client: aioredis.Redis, entries: Sequence[Entry]
    ) -> tuple[list[PriceBody], list[IngestAck]]:
        """One read's entries, in stream order: invalid ones acknowledged at once (they
        publish nothing, and must not stay pending: an append is refused while an older
        entry is); returns the valid ones with their acks, for ``_publish`` (each entry's
        XACK rides in its append script: exactly once, see ``IngestAck``)."""
        now = utc_now()  # one clock read per batch: entries of one read are one instant
        bodies: list[PriceBody] = []
        acks: list[IngestAck] = []
        invalid: list[bytes] = []
        for entry_id, fields in entries:
            body = self._validate(entry_id, fields, now)
            if body is None:
                invalid.append(entry_id)
            else:
                bodies.append(body)
                acks.append(IngestAck(entry_id.decode(), self._consumer))
        if invalid:
            # Acknowledged and deleted together: the stream stays bounded by the backlog.
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(self._keys.ingest, INGEST_GROUP, *invalid)
                pipe.xdel(self._keys.ingest, *invalid)
                await pipe.execute()
        return bodies, acks

    async def _publish(self, bodies: Sequence[PriceBody], acks: Sequence[IngestAck]) -> None:
        # One storage call for the batch (no chunks): the next batch queues behind all of
        # it, never between its chunks, where an append would be refused (older pending).
        await self._publisher.publish_many(
            bodies, source="redis-ingest", acks=acks, chunk=len(bodies)
        )
        self.stats.accepted += len(bodies)

    def _validate(self, entry_id: bytes, fields: Any, now: str) -> PriceBody | None:
        try:
            return validate_ingest_fields(fields, zones=self._zones, now=now)
        except ValidationError as exc:
            self.stats.invalid += 1
            # Throttled: a broken publisher must not turn into a log flood.
            if self.stats.invalid <= LOGGED_INVALID or self.stats.invalid % 1000 == 0:
                log.warning(
                    "ingest_invalid_entry", entry_id=entry_id.decode(), field=exc.field,
                    error=exc.message, invalid_total=self.stats.invalid,
                )  # fmt: skip
            return None


def install(app: web.Application) -> None:
    """Give the app this component's counters (``keys.INGEST_STATS``, read by the
    metrics) and its cleanup context (before the app is frozen)."""
    app[INGEST_STATS] = IngestStats()
    app.cleanup_ctx.append(ingest_ctx)


async def ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: consume the ingest stream when the storage has one."""
    source = app[STORAGE].ingest_source()
    if source is None:
        yield
        return
    settings = app[SETTINGS]
    consumer = IngestConsumer(
        source, app[PUBLISHER], zones=settings.zones, consumer=app[INSTANCE_ID],
        block=settings.redis_timeout / 2, stats=app.get(INGEST_STATS),
    )  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        consumer.stop()
        done, _ = await asyncio.wait({task}, timeout=STOP_GRACE)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_GRACE)
        with contextlib.suppress(StorageError, RedisError, RedisClusterException, OSError):
            await consumer.release()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("ingest_failed", error=repr(task.exception()))
