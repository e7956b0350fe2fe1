"""Reads of many zones at once on Redis: ``snapshot`` and ``history_between``.

Functions of a client and a key layout (``keys.KeyLayout`` or the
cluster's), so that ``RedisStorage`` and ``RedisClusterStorage`` share them and a benchmark
can call them on any client. (``FailoverStorage``, what a server with Redis runs on, takes
its snapshot here while Redis is connected, but answers a history from its in-memory copy
of Redis, as it answers ``history`` and ``since``: the same retained prices, scanned in the
instance instead of holding Redis's one thread; bench/snapshot_history.py has both costs.)

* ``snapshot``: one ``MGET`` of the epoch key and every zone's latest key. One command on
  one node is atomic: the prices and the epoch are the ones Redis held at one instant,
  and 1,000 zones cost one round trip.
* ``history_between``: one Lua script (``lua/history_between.lua``, see ``scripts``) that
  filters every queried zone's history sorted set by market time on the Redis side and
  returns only the matching payloads, at most ``limit + 1`` (so the caller knows whether
  it cut). It reads
  each queried zone's retained history once inside Redis (at most ``--history-size`` per
  zone), never the other zones', and nothing comes back to Python but the answer.

  Why no second index by market time (a sorted set scored by timestamp per zone): it
  would cost every append a second ``ZADD`` and ``ZREMRANGEBYRANK`` in the append script,
  and its trimming would have to follow the seq history's exactly (a price published with
  an old market time would otherwise be trimmed from one and not the other). Appends are
  the hot path; a time query is a chart loading. The scan is bounded by the retained
  history of the zones asked for, so the query's cost is too.

On a Redis Cluster client every zone's keys are one hash slot (``ClusterKeyLayout``): one
command or script per zone, in one pipeline (the client sends each to the zone's master),
merged here. That is atomic per zone, not one instant across zones (docs/trading.md).

Functions of a client, not of ``RedisStorage``: the layout is the structural
``ReadKeys``, and driver errors propagate as they are, for the caller to turn into
``StorageUnavailable`` (``errors.redis_errors``), as every other Redis read does.
``stored_price`` is every Redis read's way from a stored payload to a ``StoredPrice``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from pricehub.storage.base import HistorySlice, Snapshot, StoredPrice, first_in_history_order
from pricehub.storage.redis.scripts import HISTORY_BETWEEN
from pricehub.wire.messages import seq_of

__all__ = ["NO_EPOCH", "ReadKeys", "history_between", "snapshot", "stored_price"]

NO_EPOCH = ""  # a snapshot's epoch when Redis holds none (it lost its data)


class ReadKeys(Protocol):
    """The keys these reads use (``redis.KeyLayout`` and ``cluster.ClusterKeyLayout``)."""

    @property
    def epoch(self) -> str: ...

    def latest(self, zone: str) -> str: ...

    def history(self, zone: str) -> str: ...


def _distinct(zones: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(zones))


def stored_price(zone: str, payload: bytes) -> StoredPrice:
    """A payload Redis stores (history, latest, a message) as a price of ``zone``."""
    return StoredPrice(zone, seq_of(payload), payload)


async def snapshot(client: aioredis.Redis, keys: ReadKeys, zones: Sequence[str]) -> Snapshot:
    """The zones' latest prices (repeats dropped, order kept) and the epoch Redis holds
    (``NO_EPOCH`` when none: the caller decides what a lost lineage means). One ``MGET``
    on one node (one instant); on a cluster one ``GET`` per zone, pipelined."""
    distinct = _distinct(zones)
    names = [keys.epoch, *(keys.latest(zone) for zone in distinct)]
    values: list[bytes | None]
    if isinstance(client, AsyncRedisCluster):
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        values = await pipe.execute()
    else:
        values = cast(list[bytes | None], await client.mget(names))
    epoch, latest = values[0], values[1:]
    prices: dict[str, StoredPrice | None] = {
        zone: None if payload is None else stored_price(zone, payload)
        for zone, payload in zip(distinct, latest, strict=True)
    }
    return Snapshot(NO_EPOCH if epoch is None else epoch.decode(), prices)


async def history_between(
    client: aioredis.Redis,
    keys: ReadKeys,
    zones: Sequence[str],
    start: str,
    end: str,
    *,
    limit: int,
) -> HistorySlice:
    """``Storage.history_between``: one script over every zone on one node (one round
    trip); on a cluster the script once per zone (one slot each), in one pipeline."""
    distinct = _distinct(zones)
    if not distinct:
        return HistorySlice([], False)
    args: list[str | int] = [start, end, max(limit, 0) + 1]  # one more than the limit: was it cut?
    if isinstance(client, AsyncRedisCluster):
        pipe = client.pipeline(transaction=False)
        for zone in distinct:
            HISTORY_BETWEEN.queue(pipe, [keys.history(zone)], [*args, zone])
        replies = await pipe.execute()
        matching = [
            price for zone, reply in zip(distinct, replies, strict=True)
            for price in _prices([zone], reply)
        ]  # fmt: skip
    else:
        history_keys = [keys.history(zone) for zone in distinct]
        reply = await HISTORY_BETWEEN.eval(client, history_keys, [*args, *distinct])
        ordered = _prices(distinct, reply)  # in history order already: only cut here
        kept = max(limit, 0)
        return HistorySlice(ordered[:kept], len(ordered) > kept)
    return first_in_history_order(matching, limit)


def _prices(zones: Sequence[str], reply: Sequence[Any]) -> list[StoredPrice]:
    """The script's (zone index, payload) pairs as prices."""
    return [
        stored_price(zones[int(reply[i]) - 1], cast(bytes, reply[i + 1]))
        for i in range(0, len(reply), 2)
    ]
