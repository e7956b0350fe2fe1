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

Sizes are bounded before anything is decoded (anyone who can XADD can send a 64 MiB
field or a million of them: Redis takes up to 512 MB per value): an entry over the
caps of ``storage.redis.stream`` (4 KiB, 8 fields) is invalid. Reads take the entries
inside Redis and send one over a cap as a stub (its size, not its fields), so a read
brings at most about ``batch`` x 4 KiB (4 MiB by default) into this process whatever
the stream holds. Every value a log line echoes is cut to ``ECHO_LIMIT`` characters
(``clip``).

A zone whose Redis keys are damaged (``ZoneRefused``: its seq is no integer, ...) fails
its entries, not the consumer: they are logged (``ingest_entry_refused``), counted with
the invalid ones and acknowledged in the script that refused them (left pending, they
would hold up every later entry of every zone, and would only be refused again); the
other zones' entries go on.

The consumer talks to the storage through ``storage.base.IngestSource`` only: every
stream operation (lease, group, reads, claims, acknowledgements) is the storage's
``IngestStream`` (``storage.redis.stream``); this module validates and publishes. It owns
its counters (``IngestStats``, published as ``keys.INGEST_STATS`` by ``install``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
from aiohttp import web

from pricehub.server.keys import INGEST_STATS, INSTANCE_ID, PUBLISHER, SETTINGS, STORAGE
from pricehub.server.publisher import Publisher
from pricehub.server.stats import IngestStats
from pricehub.storage.base import (
    IngestAck,
    IngestEntry,
    IngestSource,
    IngestStream,
    Oversized,
    StoredPrice,
)
from pricehub.storage.errors import BatchInterrupted, LeaseLost, StorageError, ZoneRefused
from pricehub.wire.errors import ValidationError
from pricehub.wire.messages import PriceBody, body_of, utc_now, validate_ingest_fields

__all__ = [
    "ECHO_LIMIT",
    "INGEST_STATS",
    "IngestConsumer",
    "IngestStats",
    "clip",
    "ingest_ctx",
    "install",
]

log = structlog.get_logger("pricehub.ingest")

STOP_GRACE = 2.0  # seconds shutdown waits for the consumer
# Entries per read, validated in one loop turn (as one HTTP batch of up to 1,000 is).
# Measured on 2-core bursts (bench/RESULTS.md): 1,000 took 2,000-zone bursts at 32-36k/s
# where 500 took 20-23k/s and 250 or 2,000 less still; at 20,000 zones 39k vs 29k/s.
# With two such reads in flight a whole 2,000-price interval is in Redis's hands at once.
BATCH = 1000
LOGGED_INVALID = 10  # log every invalid entry up to this many, then one in a thousand
ECHO_LIMIT = 120  # characters of a value a log line echoes (``clip``)


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as a log line may echo it: at most ``limit`` characters, the cut said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def _oversize_error(entry: Oversized) -> ValidationError:
    return ValidationError("entry", f"too large: {entry.why} (never decoded)")


async def _settle(flying: deque[asyncio.Task[None]]) -> None:
    """Wait for every append in flight, oldest first; the first error ends the wait."""
    while flying:
        await flying.popleft()


class IngestConsumer:
    """Consumes the ingest stream while holding the cluster-wide lease.

    :param storage: the Redis-backed storage (its ``ingest_stream`` is used).
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
        self._keys = storage.ingest_keys  # the stream, lease and group names
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
                stream = self._storage.ingest_stream()
                if await self._acquire(stream):
                    await self._consume(stream)
            # A Redis failure is StorageUnavailable (the stream's), as is Redis away.
            except StorageError as exc:
                log.debug("ingest_paused", reason=clip(str(exc), 2 * ECHO_LIMIT))
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
        await self._storage.ingest_stream().release(self._consumer)

    async def _acquire(self, stream: IngestStream) -> bool:
        return await stream.lease(self._consumer, self._lease_ms)

    async def _consume(self, stream: IngestStream) -> None:
        await stream.ensure_group()
        await stream.forget_idle_consumers(keep=self._consumer)
        self.stats.leases += 1
        log.info("ingest_lease_acquired", consumer=self._consumer)
        # Pending entries (a dead holder's, ours from before a failure) come first.
        self._claim_due = True
        renew_at = time.monotonic() + self._renew_every
        ahead: asyncio.Task[list[IngestEntry]] | None = None
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
                    entries = await self._next_entries(stream)
                if not entries:
                    await _settle(flying)  # nothing new: settle what is in flight first
                else:
                    if time.monotonic() >= renew_at:
                        renew_at = await self._renew(stream)
                    if len(entries) >= self._batch:
                        # A full read: more is probably waiting (a burst). Read it while
                        # this batch is appended; an entry read but never appended stays
                        # pending, claimed by the next holder (or by us after a failure).
                        ahead = asyncio.create_task(stream.read(self._consumer, self._batch))
                    bodies, acks = await self._prepare_batch(stream, entries)
                    if bodies:
                        flying.append(asyncio.create_task(self._publish(bodies, acks)))
                        await asyncio.sleep(0)  # it queues its appends before the next
                    while flying and (len(flying) >= depth or flying[0].done()):
                        await flying.popleft()  # its error ends this lease's consuming
                if time.monotonic() >= renew_at:
                    renew_at = await self._renew(stream)
        finally:
            # Not cancelled (see ``stop``): reads and appends end within Redis's timeout.
            for task in [*flying, *([ahead] if ahead is not None else [])]:
                with contextlib.suppress(Exception):
                    await task

    async def _next_entries(self, stream: IngestStream) -> list[IngestEntry]:
        if self._claim_due:
            self._claim_due = False
            claimed = await self._claim_pending(stream)
            if claimed:
                self._claim_due = True  # until a claim comes back empty
                return claimed
        return await self._read_new(stream)  # returns at once when entries are waiting

    async def _renew(self, stream: IngestStream) -> float:
        if not await self._acquire(stream):
            raise LeaseLost("ingest lease taken by another instance")
        return time.monotonic() + self._renew_every

    async def _claim_pending(self, stream: IngestStream) -> list[IngestEntry]:
        """Entries delivered but never acknowledged (a dead holder's, or ours from
        before Redis failed), oldest first: they come before anything new."""
        entries, gone = await stream.claim(self._consumer, self._batch)
        # Pending entries that no longer exist were deleted before anyone appended them (by
        # hand, or an XADD MAXLEN shorter than the backlog): their prices are lost, so say
        # so loudly. Redis 7 lists their ids apart (and drops them from the group); 6.2
        # returns them without fields, and they go on to be acknowledged as invalid.
        gone += [entry_id for entry_id, fields in entries if fields is None]
        if gone:
            log.error(
                "ingest_pending_entries_deleted", count=len(gone),
                first=clip(gone[0].decode(errors="replace")),
            )  # fmt: skip
        self.stats.claimed += len(entries)
        return [(entry_id, [] if fields is None else fields) for entry_id, fields in entries]

    async def _read_new(self, stream: IngestStream) -> list[IngestEntry]:
        """Up to a batch of new entries; when there is none, blocks until one is new
        (up to ``block``) and takes that one."""
        entries = await stream.read(self._consumer, self._batch)
        if entries:
            return entries
        return await stream.wait_for_one(self._consumer, self._block_ms)

    async def _prepare_batch(
        self, stream: IngestStream, entries: Sequence[IngestEntry]
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
            await stream.ack_invalid(invalid)
        return bodies, acks

    async def _publish(self, bodies: Sequence[PriceBody], acks: Sequence[IngestAck]) -> None:
        # One storage call for the batch (no chunks): the next batch queues behind all of
        # it, never between its chunks, where an append would be refused (older pending).
        try:
            await self._publisher.publish_many(
                bodies, source="redis-ingest", acks=acks, chunk=len(bodies)
            )
        except BatchInterrupted as exc:
            if not isinstance(exc.cause, ZoneRefused):
                raise  # the storage's failure: consuming stops, the entries stay pending
            self._refused(exc.cause, bodies, acks, exc.accepted)
            return
        self.stats.accepted += len(bodies)

    def _validate(self, entry_id: bytes, fields: Any, now: str) -> PriceBody | None:
        try:
            if isinstance(fields, Oversized):
                raise _oversize_error(fields)
            return validate_ingest_fields(fields, zones=self._zones, now=now)
        except ValidationError as exc:
            if self._count_dropped():
                log.warning(
                    "ingest_invalid_entry", entry_id=clip(entry_id.decode(errors="replace")),
                    field=clip(exc.field), error=clip(exc.message),
                    invalid_total=self.stats.invalid,
                )  # fmt: skip
            return None

    def _count_dropped(self) -> bool:
        """Count an entry dropped (invalid, or refused by its zone's keys); whether to log
        it. Throttled: a broken publisher must not turn into a log flood."""
        self.stats.invalid += 1
        return self.stats.invalid <= LOGGED_INVALID or self.stats.invalid % 1000 == 0

    def _refused(
        self,
        refusal: ZoneRefused,
        bodies: Sequence[PriceBody],
        acks: Sequence[IngestAck],
        accepted: Sequence[StoredPrice],
    ) -> None:
        """The entries of a batch their zone's damaged keys refused, acknowledged with the
        others (in the script that refused them on one node, right after it on a
        cluster): logged, with the price (to publish it again once the key is repaired),
        and counted; the batch's other entries stand."""
        self.stats.accepted += len(accepted)
        for index in _refused_indexes(bodies, accepted):
            if self._count_dropped():
                log.error(
                    "ingest_entry_refused", entry_id=clip(acks[index].entry_id),
                    zone=bodies[index].market_zone, price=clip(bodies[index].encode().decode()),
                    error=clip(refusal.reason, 2 * ECHO_LIMIT), invalid_total=self.stats.invalid,
                )  # fmt: skip


def _refused_indexes(bodies: Sequence[PriceBody], accepted: Sequence[StoredPrice]) -> list[int]:
    """Which prices of a batch were refused, from those stored (a subsequence, in order)."""
    kept = iter(accepted)
    stored = next(kept, None)
    refused: list[int] = []
    for index, body in enumerate(bodies):
        if stored is not None and body_of(stored.payload) == body.encode():
            stored = next(kept, None)
        else:
            refused.append(index)
    return refused


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
        with contextlib.suppress(StorageError):
            await consumer.release()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("ingest_failed", error=repr(task.exception()))
