"""The ingest stream's Redis half (``IngestStream``): the lease, the consumer group, reads
of new and pending entries, and every acknowledgement outside an append script.

``server/ingest.py`` keeps validation and publishing; everything it does to the stream
goes through here, on one node and on a cluster alike (the stream and its lease are one
key each, so every command here stays in one slot). Where an entry is acknowledged:

* a valid entry: in the append script that stores its price (``lua/append.lua``,
  ``lua/append_many.lua``: XACK with the append, exactly once); on a cluster, whose
  stream is in another slot than the zone, right after it (``acknowledge``, from
  ``cluster.ClusterTopology``), the zone's ``ingested`` marker making a repeat a no-op;
* an invalid entry: at once, acknowledged and deleted (``ack_invalid``): it publishes
  nothing, and left pending it would hold up every later entry (an append is refused
  while an older entry is pending).

Reads are bounded before anything is decoded (``lua/ingest_read.lua`` sizes each entry
inside Redis and sends one over ``MAX_ENTRY_BYTES`` / ``MAX_ENTRY_FIELDS`` as a stub,
``Oversized``); only the blocking wait for a new entry (a script cannot block) takes one
entry as Redis sends it, checked against the same caps after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ResponseError

from pricehub.storage.base import IngestEntry, IngestKeys, Oversized
from pricehub.storage.redis.errors import redis_errors
from pricehub.storage.redis.scripts import INGEST_LEASE, INGEST_READ, INGEST_RELEASE, AnyPipeline

__all__ = ["MAX_ENTRY_BYTES", "MAX_ENTRY_FIELDS", "RedisIngestStream", "acknowledge"]

# Caps of one entry, checked before anything decodes it. A price has at most 4 fields of
# a few dozen bytes (a zone is at most 32 characters): 4 KiB and 8 fields leave room.
MAX_ENTRY_BYTES = 4096  # its names and values together
MAX_ENTRY_FIELDS = 8  # name/value pairs


def acknowledge(pipe: AnyPipeline, keys: IngestKeys, entry_ids: Sequence[bytes | str]) -> None:
    """Queue XACK + XDEL of ``entry_ids`` into ``pipe``: done with, and deleted, so the
    stream stays bounded by the backlog."""
    pipe.xack(keys.stream, keys.group, *entry_ids)
    pipe.xdel(keys.stream, *entry_ids)


def _raw_replies(client: aioredis.Redis) -> aioredis.Redis:
    """A client on the same connections whose stream reads (the blocking wait's; the
    others are lua/ingest_read.lua's) are left as Redis sent them: redis-py turns an
    entry's fields into a dict, which hides a duplicated field."""
    raw = client
    if not isinstance(client, AsyncRedisCluster):
        # A cluster client has no pool to share; its callbacks can be set in place, as
        # only the ingest reads streams through it.
        raw = aioredis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XREADGROUP", lambda response, **_: response)
    return raw


def _capped(fields: list[bytes] | list[str]) -> list[bytes] | list[str] | Oversized:
    """``fields``, or ``Oversized`` when they are over a cap: lua/ingest_read.lua's
    check, for the entry the blocking wait took as Redis sent it."""
    items = len(fields)
    if items > 2 * MAX_ENTRY_FIELDS:
        return _oversized(0, items)
    size = sum(map(len, fields))
    return _oversized(size, items) if size > MAX_ENTRY_BYTES else fields


def _oversized(size: int, items: int) -> Oversized:
    if items > 2 * MAX_ENTRY_FIELDS:
        why = f"{items // 2} fields, over {MAX_ENTRY_FIELDS}"
    else:
        why = f"{size} bytes, over {MAX_ENTRY_BYTES}"
    return Oversized(size, items, why)


def _entry(item: list[Any]) -> IngestEntry:
    """One entry of lua/ingest_read.lua's reply: [id, fields], [id, nil] (deleted while
    pending: no fields, kept as None) or [id, nil, bytes, items] (over a cap)."""
    if len(item) > 2:
        return item[0], _oversized(int(item[2]), int(item[3]))
    return item[0], item[1]


def _stream_entries(response: Any) -> list[IngestEntry]:
    """The entries of an XREADGROUP reply as Redis sent it (RESP2 or RESP3, or nil),
    each checked against the caps."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else (s[1] for s in response)
    return [
        (entry_id, _capped(fields or [])) for entries in streams for entry_id, fields in entries
    ]  # fmt: skip


class RedisIngestStream:
    """``base.IngestStream`` on Redis: the stream, its consumer group and its lease, on
    one live client. Every failure of Redis surfaces as ``StorageUnavailable``
    (``redis_errors``).

    :param client: the storage's live client (one node or a cluster).
    :param keys: the stream, lease and group names.
    """

    def __init__(self, client: aioredis.Redis, keys: IngestKeys) -> None:
        self._client = _raw_replies(client)
        self.keys = keys

    # --- the lease (one consumer per cluster at a time) ---------------------------------

    async def lease(self, consumer: str, ttl_ms: int) -> bool:
        """Take the lease if free, extend it if ``consumer`` holds it; whether it does."""
        async with redis_errors("ingest lease"):
            held = await INGEST_LEASE.run(self._client, [self.keys.lease], [consumer, ttl_ms])
        return bool(held)

    async def release(self, consumer: str) -> None:
        """Give the lease up at once, if ``consumer`` still holds it (clean shutdown)."""
        async with redis_errors("ingest release"):
            await INGEST_RELEASE.run(self._client, [self.keys.lease], [consumer])

    # --- the consumer group -------------------------------------------------------------

    async def ensure_group(self) -> None:
        # From id 0: entries added before the group existed are prices for us too.
        async with redis_errors("ingest group"):
            try:
                await self._client.xgroup_create(
                    self.keys.stream, self.keys.group, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def forget_idle_consumers(self, keep: str) -> None:
        """Drop previous consumers with nothing pending (``keep`` stays): every restart
        names a new one, and the group would otherwise list them forever."""
        stream, group = self.keys.stream, self.keys.group
        async with redis_errors("ingest consumers"):
            consumers: Any = await self._client.xinfo_consumers(stream, group)
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name != keep and int(consumer["pending"]) == 0:
                    await self._client.xgroup_delconsumer(stream, group, name)

    # --- reads --------------------------------------------------------------------------

    async def read(self, consumer: str, count: int) -> list[IngestEntry]:
        """Up to ``count`` new entries (XREADGROUP >), without blocking."""
        entries, _ = await self._take(consumer, "new", count)
        return entries

    async def claim(self, consumer: str, count: int) -> tuple[list[IngestEntry], list[bytes]]:
        """Up to ``count`` pending entries (XAUTOCLAIM, any idle time), oldest first,
        with the ids of pending entries found deleted (Redis 7 lists them apart)."""
        return await self._take(consumer, "claim", count)

    async def _take(
        self, consumer: str, mode: Literal["new", "claim"], count: int
    ) -> tuple[list[IngestEntry], list[bytes]]:
        """Bounded in bytes whatever the stream holds: about ``count`` x
        ``MAX_ENTRY_BYTES`` at most, an entry over a cap only as a stub (its size)."""
        async with redis_errors("ingest read"):
            reply: Any = await INGEST_READ.run(self._client, [self.keys.stream], [
                self.keys.group, consumer, mode, count,
                MAX_ENTRY_BYTES, 2 * MAX_ENTRY_FIELDS, count * MAX_ENTRY_BYTES,
            ])  # fmt: skip
        return [_entry(item) for item in reply[0]], list(reply[1])

    async def wait_for_one(self, consumer: str, block_ms: int) -> list[IngestEntry]:
        """Blocks until an entry is new (up to ``block_ms``; a script cannot block), then
        takes it as Redis sends it: the one read the caps cannot bound beforehand, so it
        takes one entry (of any size) and checks it against them after."""
        # Left as Redis sent it (see ``_raw_replies``): RESP2 [[stream, [[id, fields]]]],
        # RESP3 {stream: [...]}, or nil; the fields a flat list (a name twice is seen).
        async with redis_errors("ingest read"):
            response: Any = await self._client.xreadgroup(
                self.keys.group, consumer, {self.keys.stream: ">"}, count=1, block=block_ms,
            )  # fmt: skip
        return _stream_entries(response)

    # --- acknowledgements outside an append script --------------------------------------

    async def ack_invalid(self, entry_ids: Sequence[bytes]) -> None:
        """Entries that publish nothing (invalid): acknowledged and deleted together."""
        async with redis_errors("ingest ack"), self._client.pipeline(transaction=True) as pipe:
            acknowledge(pipe, self.keys, entry_ids)
            await pipe.execute()
