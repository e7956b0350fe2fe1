"""``RedisStorage``: the Storage Protocol on one Redis (or a Sentinel-watched one).

Every key and channel lives under one prefix (``pricehub:`` by default, see
``KeyLayout``). Appending a price is one Lua script (``lua/append.lua``): INCR the zone's seq,
splice ``"seq":N,"accepted_at":"<Redis's TIME>",`` into the body exactly as
``messages.with_seq`` does, store it as latest and in a bounded history ZSET
(score = seq), PUBLISH it. Because the script is
atomic and one PUB/SUB connection delivers in publish order, every instance sees a
zone's prices in seq order. Concurrent appends are pipelined: they queue up while one
round trip is in flight and leave together in the next one, several of them as one
``lua/append_many.lua`` (the same steps per price, one reply and one ``!many`` message for
the lot), so a batch of N prices costs about N / ``MAX_PIPELINE`` round trips.

A published price reads ``<epoch> <zone> <payload>``: the subscriber drops (and counts,
and logs) anything that is not its own feed's lineage, so a price of another feed can
never reach clients disguised as one of ours (channels are also per database, see
``KeyLayout``).

The subscriber connection can look healthy and deliver nothing (a half-open TCP
connection, a proxy that stopped forwarding). So a watcher publishes a probe to this
instance's own probe channel every ``probe_interval`` and expects the subscriber to
receive *something* within ``2 * timeout``; otherwise the storage is lost.

What differs on a Redis Cluster (client, key layout, sharded subscription, how a batch
is written, error mapping, the epoch's mirrors) is the storage's ``topology``
(``topology.Topology``): ``single.SingleNode`` by default, ``cluster.ClusterTopology``
for ``RedisClusterStorage``. The topology reaches the storage through ``topology.Host``
only (``_Host`` below), never its private state.

Errors never escape as driver exceptions: every Redis/socket failure surfaces as
``StorageUnavailable``, which ``FailoverStorage`` turns into a failover (or a hold of
appends, with peers). Two kinds say more: ``WriteInDoubt`` (the append was sent, its
reply lost) and ``EpochChanged`` (refused, nothing written, the connection is fine).
One is no outage at all: ``ZoneRefused`` (a ``StorageError``), a price refused because
its zone's own keys are damaged (``lua/store.lua``); the other prices go on, and a load or
write-back leaves such a zone out instead of failing for every zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ResponseError

import pricehub.storage.redis.reads as reads
from pricehub.storage.base import (
    DiskState,
    DiskStatus,
    HistorySlice,
    IngestAck,
    IngestKeys,
    IngestSource,
    Snapshot,
    StorageCounters,
    StorageListener,
    StoredPrice,
)
from pricehub.storage.errors import StorageError, StorageUnavailable, ZoneRefused
from pricehub.storage.redis.errors import (
    EpochChanged,
    redis_errors,
    refusal,
    script_refusal,
)
from pricehub.storage.redis.keys import INGEST_GROUP, KeyLayout
from pricehub.storage.redis.reads import stored_price
from pricehub.storage.redis.scripts import CLAIM_EPOCH, SETTLE_INGESTED, WRITTEN_BACK
from pricehub.storage.redis.single import LOAD_CHUNK, MAX_IN_FLIGHT, MAX_PIPELINE, SingleNode
from pricehub.storage.redis.topology import Settings, Topology
from pricehub.storage.redis.writer import Write, fail_writes, next_stream_id
from pricehub.wire.codes import Backend
from pricehub.wire.messages import with_seq

__all__ = [
    "LOAD_CHUNK",
    "MAX_IN_FLIGHT",
    "MAX_PIPELINE",
    "RESTORED_TTL",
    "RedisStorage",
    "announce_gap",
    "next_stream_id",
]

EPOCH_MESSAGE = b"!epoch "  # control message on the prices channel ('!' is no zone char)
# Several prices in one message (lua/append_many.lua): "!many zone payload\nzone payload...".
# A payload is compact JSON, which never holds a raw newline.
MANY_MESSAGE = b"!many "
LOGGED_FOREIGN = 10  # log every foreign message up to this many, then one in a thousand
LOGGED_DAMAGED = 10  # log every refusal of a damaged zone up to this many, then 1 in 1000

# How long the restored set lives after the claim (lua/claim_epoch.lua): past every
# peer's write-back (they reconnect within a few probe intervals, and one waits at most
# PEER_RESTORE_WAIT for the others) but short, so an ordinary outage later finds none
# (see ``written_back``).
RESTORED_TTL = 10.0
RESTORE_DAMAGED = 2  # lua/restore.lua's reply for a zone whose keys are damaged


def _seq_or_none(raw: Any) -> int | None:
    """A zone's seq key as read (bytes or None: 0), None when it is no integer."""
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return None


def _parse_message(data: bytes) -> tuple[str, StoredPrice | None]:
    """``<epoch> <zone> <payload>`` from the prices channel; ``None`` for anything
    else (a stray PUBLISH must be dropped, not crash the subscriber into a failover)."""
    epoch, _, rest = data.partition(b" ")
    zone, _, payload = rest.partition(b" ")
    price = _parse_price(zone, payload)
    return ("", None) if price is None else (epoch.decode(errors="replace"), price)


def _parse_price(zone: bytes, payload: bytes) -> StoredPrice | None:
    try:
        if not payload.startswith(b'{"seq":'):
            return None
        return stored_price(zone.decode(), payload)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None


def announce_gap(listener: object, zone: str, from_seq: int, to_seq: int) -> None:
    """Tell ``listener`` that seqs ``from_seq..to_seq`` of ``zone`` will never be
    delivered (the broadcaster says ``gap`` ``lost`` to the zone's subscribers). Optional:
    a listener without ``on_gap`` (the failover's mirror, which finds the hole itself;
    the storage tests' recorders) hears nothing."""
    on_gap = getattr(listener, "on_gap", None)
    if on_gap is not None:
        on_gap(zone, from_seq, to_seq)


class RedisStorage:
    """The ``Storage`` Protocol on Redis.

    :param url: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL.
    :param key_prefix: prefix of every key and channel (default ``pricehub:``).
    :param history_size: prices retained per zone (default 1000).
    :param timeout: socket timeout in seconds (default 0.5); the subscriber liveness
        probe allows ``2 * timeout``.
    :param probe_interval: seconds between subscriber liveness probes (default 1).
    :param on_lost: called once, with the cause, when this storage stops being usable
        (subscriber closed or silent, or a failed write); default: nothing.
    :param log: structlog logger for listener failures (default ``pricehub.storage``).
    """

    backend = Backend.REDIS

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "pricehub:",
        history_size: int = 1000,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        on_lost: Callable[[RedisStorage, BaseException], None] | None = None,
        log: Any = None,
        topology: Topology | None = None,
    ) -> None:
        self.keys = KeyLayout(key_prefix)
        self.topology: Topology = SingleNode() if topology is None else topology
        self._settings = Settings(
            url=url, history_size=history_size, timeout=timeout,
            probe_interval=probe_interval, token=uuid.uuid4().hex,
            log=log or structlog.get_logger("pricehub.storage"),
        )  # fmt: skip
        self._log = self._settings.log
        self._on_lost = on_lost
        self._client: aioredis.Redis | None = None
        self._epoch: str | None = None
        self._listener: StorageListener | None = None
        # Last seq delivered per zone; a zone missing here takes whatever comes first.
        self._positions: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[Write] = []
        self._flusher: asyncio.Task[None] | None = None
        self._host = _Host(self)
        self._lost: BaseException | None = None
        self.gaps = 0  # updates that arrived after a hole the history could not fill
        self.foreign_messages = 0  # dropped: not this feed's lineage, or not a price
        self.damaged_zones = 0  # prices (or zone states) refused: that zone's keys are damaged

    # --- lifecycle --------------------------------------------------------------------

    @property
    def ingest_depth(self) -> int:
        """Ingest batches the consumer may keep in flight (the topology's)."""
        return self.topology.ingest_depth

    @property
    def epoch(self) -> str:
        if self._epoch is None:
            raise StorageUnavailable("redis storage not started")
        return self._epoch

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None or self._lost is not None:
            raise StorageUnavailable("redis connection not available")
        return self._client

    async def start(self, listener: StorageListener) -> None:
        await self.connect()
        await self.claim_epoch(uuid.uuid4().hex[:12])
        self.deliver_to(listener, {})

    async def connect(self) -> None:
        """Connect, load the scripts and subscribe; messages wait until ``deliver_to``."""
        client = self._client = self.topology.connect(self._settings)
        self.keys = self.topology.layout(self.keys.prefix, client)
        try:
            async with redis_errors("connect"):
                await self.topology.open(self._host)
        except BaseException:
            await self.close()
            raise

    def deliver_to(self, listener: StorageListener, positions: Mapping[str, int]) -> None:
        """Start delivering prices, dropping those at or below ``positions``."""
        self._listener = listener
        self._positions = dict(positions)
        for work in self.topology.subscribers(self._host):
            self._spawn(work)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(work))

    async def close(self) -> None:
        tasks = [*self._tasks, *(task for task in (self._flusher,) if task)]
        self._tasks, self._flusher = [], None
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task cancelled inside a redis-py read can fail to end.
            await asyncio.wait(tasks, timeout=2 * self._settings.timeout)
        self._fail_pending(StorageUnavailable("redis storage closed"))
        await self.topology.close(self._host)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.timeout):
                    await client.aclose()

    def _mark_lost(self, cause: BaseException) -> None:
        if self._lost is not None:
            return
        self._lost = cause
        if self._on_lost is not None:
            self._on_lost(self, cause)

    def ingest_source(self) -> IngestSource | None:
        return None  # the ingest runs on FailoverStorage, which create_storage gives

    @property
    def ingest_keys(self) -> IngestKeys:
        return self.keys.ingest_keys

    def counters(self) -> StorageCounters:
        """What this connection counted: the prices after a hole no history could fill
        and the foreign messages dropped (failovers and the like are the owner's)."""
        return StorageCounters(gaps=self.gaps, foreign_messages=self.foreign_messages)

    def disk_status(self) -> DiskStatus:
        """Redis keeps nothing on this instance's disk (as the failover's inner backend,
        the failover reports its mirror's journal instead)."""
        return DiskStatus(DiskState.DISABLED)

    async def check(self) -> None:
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        async with redis_errors("ping"):
            await self.topology.ping(self.client)

    # --- subscriber -------------------------------------------------------------------

    async def _on_message(self, data: bytes) -> None:
        listener = self._listener
        assert listener is not None
        if data.startswith(EPOCH_MESSAGE):
            epoch = data[len(EPOCH_MESSAGE) :].decode(errors="replace")
            if epoch != self._epoch:  # our own claim's announcement changes nothing
                self._epoch = epoch
                listener.on_epoch_changed(epoch)
            return
        if data.startswith(MANY_MESSAGE):
            await self._on_many(listener, data)
            return
        epoch, price = _parse_message(data)
        await self._on_price_message(listener, data, epoch, price)

    async def _on_many(self, listener: StorageListener, data: bytes) -> None:
        """``!many <epoch>`` then one ``<zone> <payload>`` line per price of a batch."""
        header, _, body = data.partition(b"\n")
        epoch = header[len(MANY_MESSAGE) :].decode(errors="replace")
        positions = self._positions
        for line in body.split(b"\n"):
            zone, _, payload = line.partition(b" ")
            price = _parse_price(zone, payload)
            # Fast path, no coroutine per price: our lineage and the zone's next seq (or
            # its first), which is every price of a burst unless something went wrong.
            if price is not None and epoch == self._epoch:
                last = positions.get(price.zone)
                if last is None or price.seq == last + 1:
                    positions[price.zone] = price.seq
                    self._deliver(listener, price)
                    continue
            await self._on_price_message(listener, line, epoch, price)

    async def _on_price_message(
        self, listener: StorageListener, data: bytes, epoch: str, price: StoredPrice | None
    ) -> None:
        """One price: delivered in seq order, holes filled from the history; anything not
        of this feed's lineage is dropped and counted."""
        last = None if price is None else self._positions.get(price.zone)
        if price is None or epoch != self._epoch:
            if price is not None and last is not None and price.seq <= last:
                return  # a stale echo of our own feed from before an epoch change
            self._foreign(data)
            return
        if last is not None:
            if price.seq <= last:
                return  # already delivered (catch-up or a restore's echo)
            if price.seq > last + 1:
                await self._fill_gap(listener, price.zone, last, price.seq)
        self._positions[price.zone] = price.seq
        self._deliver(listener, price)

    def _foreign(self, data: bytes) -> None:
        """Not a price of this feed: never delivered, always counted, logged (throttled).
        The ``gaps`` counter must not be the only trace of another feed's data."""
        self.foreign_messages += 1
        if self.foreign_messages <= LOGGED_FOREIGN or self.foreign_messages % 1000 == 0:
            self._log.warning(
                "storage_foreign_message", channel=self.keys.prices, epoch=self._epoch,
                message=data[:80].decode(errors="replace"), total=self.foreign_messages,
            )  # fmt: skip

    def _deliver(self, listener: StorageListener, price: StoredPrice) -> None:
        # A listener bug must show up as such, not as a lost Redis (and a failover).
        try:
            listener.on_price(price)
        except Exception:
            self._log.exception("storage_listener_failed", zone=price.zone, seq=price.seq)

    async def _fill_gap(self, listener: StorageListener, zone: str, last: int, seq: int) -> None:
        """Deliver the prices between ``last`` and ``seq`` from the history, in order:
        blocking the reader keeps everything after them waiting in the socket."""
        missing = await self.since(zone, last)
        if missing is None or not missing or missing[0].seq != last + 1:
            self.gaps += 1
            announce_gap(listener, zone, last + 1, seq - 1)
            return
        for price in missing:
            if price.seq >= seq:
                break
            self._deliver(listener, price)

    # --- writes -----------------------------------------------------------------------

    async def append(self, zone: str, body: bytes, *, ack: IngestAck | None = None) -> StoredPrice:
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        future: asyncio.Future[StoredPrice] = asyncio.get_running_loop().create_future()
        self._pending.append(Write(zone, body, ack, future, None if ack is None else object()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self.topology.flush(self._host))
        return await future

    async def append_many(self, items: Sequence[tuple[str, bytes]]) -> list[StoredPrice]:
        """``append`` for a batch, in order: one script per price (each atomic, so the
        per-zone seq order and exactly-once hold as for ``append``), all queued at once
        so they leave in ``ceil(N / MAX_PIPELINE)`` round trips. Raises the first error
        once every price of the batch is settled."""
        outcomes = await self.append_outcomes(items)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(list[StoredPrice], outcomes)

    async def append_outcomes(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice | BaseException]:
        """Per price of the batch, its ``StoredPrice`` or the error that refused it.

        ``acks[i]`` (ingest) rides in price i's script. A failure does not stop the
        prices after it from being sent (they are in the same pipeline), which keeps
        stream order: a lost lease or a changed epoch refuses every later script too.
        """
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        loop = asyncio.get_running_loop()
        writes = [
            Write(zone, body, None if acks is None else acks[index], loop.create_future(), acks)
            for index, (zone, body) in enumerate(items)
        ]
        self._pending.extend(writes)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self.topology.flush(self._host))
        outcomes: list[StoredPrice | BaseException] = []
        for write in writes:
            # Sequential awaits, not gather: once the first is done the rest mostly are,
            # and awaiting a done future costs no loop turn.
            try:
                outcomes.append(await write.future)
            except StorageError as exc:
                outcomes.append(exc)
        return outcomes

    def _settle(self, group: Sequence[Write], result: Any) -> None:
        """Resolve one script's writes with its reply: "<accepted_at> <seq>",
        "<accepted_at> s1,s2,..." (a price its zone's keys refused has "!<why>" in its
        place) or an error. Each write gets its price as Redis stored it."""
        if isinstance(result, BaseException):
            why = refusal(result)
            if why is not None and len(group) == 1:
                fail_writes(group, self._zone_damaged(group[0].zone, why))
            else:
                fail_writes(group, self._write_error(result))
            return
        accepted_at, _, numbers = result.partition(b" ")
        seqs: list[int | bytes]
        if len(group) == 1:
            seqs = [int(numbers)]
        elif b"!" in numbers:  # rare: checked once per reply, not per price
            seqs = [seq if seq[:1] == b"!" else int(seq) for seq in numbers.split(b",")]
        else:
            seqs = [int(seq) for seq in numbers.split(b",")]
        for write, seq in zip(group, seqs, strict=True):
            if write.future.done():
                continue
            if isinstance(seq, int):
                payload = with_seq(write.body, seq, accepted_at)
                write.future.set_result(StoredPrice(write.zone, seq, payload))
            else:
                write.future.set_exception(
                    self._zone_damaged(write.zone, seq[1:].decode(errors="replace"))
                )

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, []
        fail_writes(pending, error)

    def _take_pending(self, limit: int) -> list[Write]:
        batch, self._pending = self._pending[:limit], self._pending[limit:]
        return batch

    def _zone_damaged(self, zone: str, why: str) -> ZoneRefused:
        """``zone``'s keys are damaged (see lua/store.lua): its price is refused, or its state
        left out of a load or restore; logged (throttled) and counted. The connection and
        every other zone are fine: nothing is lost, no failover."""
        self.damaged_zones += 1
        if self.damaged_zones <= LOGGED_DAMAGED or self.damaged_zones % 1000 == 0:
            self._log.error("storage_zone_damaged", zone=zone, reason=why, total=self.damaged_zones)
        return ZoneRefused(zone, why)

    def _write_error(self, error: BaseException) -> StorageError:
        mapped = self.topology.write_error(error)
        if mapped is not None:
            return mapped
        refused = script_refusal(error)
        if refused is not None:
            return refused
        cause = StorageUnavailable(f"redis append: {error!r}")
        self._mark_lost(cause)
        return cause

    # --- reads ------------------------------------------------------------------------

    async def latest(self, zone: str) -> StoredPrice | None:
        async with redis_errors("latest"):
            payload = cast(bytes | None, await self.client.get(self.keys.latest(zone)))
        return None if payload is None else stored_price(zone, payload)

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        if limit <= 0:
            return []
        async with redis_errors("history"):
            payloads = cast(
                list[bytes], await self.client.zrange(self.keys.history(zone), -limit, -1)
            )
        return [stored_price(zone, payload) for payload in payloads]

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.seq(zone))
        pipe.zrange(self.keys.history(zone), f"({seq}", "+inf", byscore=True)
        async with redis_errors("since"):
            current_raw, payloads = await pipe.execute(raise_on_error=False)
        current = _seq_or_none(current_raw)
        if current is None or isinstance(payloads, ResponseError) or seq > current:
            return None  # a zone whose keys are damaged cannot replay either
        prices = [stored_price(zone, payload) for payload in payloads]
        # A retained history with a hole (bounded write-back after an outage) cannot
        # replay across it: that is a gap, not a short answer.
        if any(price.seq != seq + 1 + index for index, price in enumerate(prices)):
            return None
        if len(prices) != current - seq:
            return None
        return prices

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        """One ``MGET`` on one node (one instant); per zone, pipelined, on a cluster
        (``reads.snapshot``). A snapshot under another epoch than ours (Redis lost
        its data, or a peer moved the lineage) is refused as ``EpochChanged``: its seqs
        are no cursor of the stream this instance delivers."""
        async with redis_errors("snapshot"):
            found = await reads.snapshot(self.client, self.keys, zones)
        if found.epoch != self.epoch:
            raise EpochChanged(f"redis holds epoch {found.epoch or 'none'}, not ours")
        return found

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        """One Lua script on one node; one per zone, pipelined, on a cluster."""
        async with redis_errors("history"):
            return await reads.history_between(
                self.client, self.keys, zones, start, end, limit=limit
            )

    # --- instance registry ------------------------------------------------------------

    async def register_instance(
        self, instance_id: str, snapshot: bytes, *, ttl: float, mirror: str | None = None
    ) -> None:
        """``mirror``: the id of the copy this instance keeps (``FailoverStorage``),
        registered with the same TTL (``instance_mirrors``)."""
        pipe = self.client.pipeline(transaction=True)
        expiry = max(1, int(ttl * 1000))
        pipe.set(self.keys.instance(instance_id), snapshot, px=expiry)
        if mirror is not None:
            pipe.set(self.keys.instance_mirror(instance_id), mirror, px=expiry)
        pipe.sadd(self.keys.instances, instance_id)
        async with redis_errors("register"):
            await pipe.execute()

    async def unregister_instance(self, instance_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.instance(instance_id), self.keys.instance_mirror(instance_id))
        pipe.srem(self.keys.instances, instance_id)
        async with redis_errors("unregister"):
            await pipe.execute()

    async def instance_mirrors(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """The mirror id each of ``instance_ids`` registered (left out: none)."""
        ids = list(instance_ids)
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for instance_id in ids:
            pipe.get(self.keys.instance_mirror(instance_id))
        async with redis_errors("instances"):
            found = cast(list[bytes | None], await pipe.execute())
        return {i: m.decode() for i, m in zip(ids, found, strict=True) if m is not None}

    async def instances(self) -> dict[str, bytes]:
        """The set names every instance that registered; its snapshot key expires by
        TTL, so a crashed instance disappears without a scan (and is pruned here)."""
        client = self.client
        async with redis_errors("instances"):
            registered = cast(set[bytes], await client.smembers(self.keys.instances))
            members = sorted(member.decode() for member in registered)
            if not members:
                return {}
            snapshots = cast(
                list[bytes | None],
                await client.mget([self.keys.instance(member) for member in members]),
            )
            expired = [m for m, snap in zip(members, snapshots, strict=True) if snap is None]
            if expired:
                await client.srem(self.keys.instances, *expired)
        return {m: snap for m, snap in zip(members, snapshots, strict=True) if snap is not None}

    # --- recovery primitives (used by FailoverStorage) --------------------------------

    async def claim_epoch(self, candidate: str) -> str:
        """Set the epoch to ``candidate`` unless Redis has one; write under the result.
        A claim that sets it also starts the restored set (``written_back``)."""
        keys = self.keys
        async with redis_errors("epoch"):
            current = await CLAIM_EPOCH.run(
                self.client, [keys.epoch, keys.restored],
                [candidate, keys.prices, int(RESTORED_TTL * 1000)],
            )  # fmt: skip
        self._epoch = current.decode()
        await self.topology.epoch_claimed(self._host, self._epoch)
        return self._epoch

    async def written_back(self, mirror: str = "") -> frozenset[str] | None:
        """Whether Redis was found empty in the last ``RESTORED_TTL`` seconds (its epoch
        claimed anew): then the mirrors that have written back into it since, ``mirror``
        added first (``""``: only look); None when it was not."""
        async with redis_errors("epoch"):
            members = await WRITTEN_BACK.run(self.client, [self.keys.restored], [mirror])
        if members is None:
            return None
        return frozenset(m.decode() for m in cast(list[bytes], members)) - {""}

    async def replace_epoch(self, expected: str, replacement: str) -> str:
        """Compare-and-set the epoch, announcing a change to every instance."""
        self._epoch = await self.topology.replace_epoch(self._host, expected, replacement)
        return self._epoch

    async def restore(
        self,
        local: Mapping[str, tuple[int, Sequence[StoredPrice]]],
        *,
        entries: Mapping[str, Mapping[int, str]] | None = None,
    ) -> dict[str, bool]:
        """Per zone ``(last seq, retained prices)``: write back what Redis lacks and
        raise its seq to ours; returns, per zone, whether the numbering diverged.

        ``entries``: per zone, the ingest stream entry each ingested price came from
        (by seq), so that none is applied again: on one node settled in the same
        transaction (``lua/settle_ingested.lua``); on a cluster, which cannot run one
        across the stream's slot and a zone's, the zone's last applied entry is
        raised in its restore script (``lua/restore.lua``), which its append script skips
        up to (and then acknowledges)."""
        zones = [zone for zone, (last, _) in local.items() if last > 0]
        if not zones:
            return {}
        keys, entries = self.keys, entries or {}
        cluster = isinstance(self.client, AsyncRedisCluster)
        settle = [] if cluster else self._settle_calls(local, zones, entries)
        pipe = self.client.pipeline(transaction=bool(settle))
        for zone in zones:
            last, prices = local[zone]
            pairs = [item for price in prices for item in (price.seq, price.payload)]
            ids = entries.get(zone, {})
            ingested = ",".join(f"{p.seq} {ids[p.seq]}" for p in prices if p.seq in ids)
            zone_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone)]
            if cluster and ingested:
                zone_keys.append(keys.ingested(zone))
            channel = self.topology.channel(keys, zone)
            self.topology.restore_script.queue(pipe, zone_keys, [
                self._settings.history_size, channel, zone, last, self.epoch, ingested, *pairs,
            ])  # fmt: skip
        for args in settle:
            SETTLE_INGESTED.queue(pipe, args[:2], args[2:])
        async with redis_errors("restore"):
            results = await pipe.execute()
        diverged: dict[str, bool] = {}
        for zone, result in zip(zones, results[: len(zones)], strict=True):
            if result == RESTORE_DAMAGED:  # nothing written back: logged, not diverged
                self._zone_damaged(zone, f"{self._damage(zone)}; not written back")
            diverged[zone] = result == 1
        return diverged

    def _settle_calls(
        self,
        local: Mapping[str, tuple[int, Sequence[StoredPrice]]],
        zones: Sequence[str],
        entries: Mapping[str, Mapping[int, str]],
    ) -> list[list[Any]]:
        """The ``lua/settle_ingested.lua`` keys and arguments of ``restore``, one list per zone with
        ingested prices among those written back."""
        if not entries:
            return []
        calls: list[list[Any]] = []
        for zone in zones:
            ids = entries.get(zone)
            if not ids:
                continue
            triples = [
                item for price in local[zone][1] if price.seq in ids
                for item in (price.seq, ids[price.seq], price.payload)
            ]  # fmt: skip
            if triples:
                calls.append([self.keys.history(zone), self.keys.ingest, INGEST_GROUP, *triples])
        return calls

    def _damage(self, zone: str) -> str:
        """What lua/stored.lua found wrong with a zone (it says no more than that)."""
        return f"{self.keys.seq(zone)} is no seq or {self.keys.history(zone)} no sorted set"

    async def load(self, zones: Iterable[str]) -> dict[str, tuple[int, list[StoredPrice]]]:
        """The seq and retained history of every zone that has a seq (zones without one
        are left out: they have nothing to load), each zone read atomically."""
        return await self.topology.load(self._host, zones)


class _Host:
    """``topology.Host`` of one ``RedisStorage``: what its topology may use of it."""

    def __init__(self, storage: RedisStorage) -> None:
        self._storage = storage

    @property
    def settings(self) -> Settings:
        return self._storage._settings

    @property
    def keys(self) -> KeyLayout:
        return self._storage.keys

    @property
    def client(self) -> aioredis.Redis:
        return self._storage.client

    @property
    def epoch(self) -> str:
        return self._storage.epoch

    @property
    def lost(self) -> BaseException | None:
        return self._storage._lost

    def mark_lost(self, cause: BaseException) -> None:
        self._storage._mark_lost(cause)

    async def deliver(self, data: bytes) -> None:
        await self._storage._on_message(data)

    def take_pending(self, limit: int) -> list[Write]:
        return self._storage._take_pending(limit)

    def fail_pending(self, error: BaseException) -> None:
        self._storage._fail_pending(error)

    def settle(self, group: Sequence[Write], result: Any) -> None:
        self._storage._settle(group, result)

    def zone_damaged(self, zone: str, why: str) -> ZoneRefused:
        return self._storage._zone_damaged(zone, why)

    def damage(self, zone: str) -> str:
        return self._storage._damage(zone)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._storage._spawn(work)

    async def latest(self, zone: str) -> StoredPrice | None:
        return await self._storage.latest(zone)
