"""Redis Cluster storage: ``redis+cluster://host:port[,host:port...]/`` (Redis >= 7).

``RedisClusterStorage`` is ``RedisStorage`` with three things swapped through small hooks:

* the key layout (``ClusterKeyLayout``): every key and channel of a zone carries the zone
  as hash tag (``pricehub:{pjm}:seq``, ``:history``, ``:latest``, ``:epoch``,
  ``:ingested``, channel ``pricehub:{pjm}:prices``), so a zone's append script, its
  reads and its Pub/Sub channel live in one hash slot, on one master;
* the client (``connect_cluster``): redis-py's asyncio ``RedisCluster`` with no driver
  retries (a script whose reply was lost must never be run twice), MOVED/ASK followed;
* fan-out over sharded Pub/Sub: the append script ``SPUBLISH``-es to the zone's channel,
  and this instance holds one subscriber connection per master that serves one of its
  zones (``SSUBSCRIBE`` of that master's zone channels, one command per slot, plus a
  probe channel hashed onto that master for the liveness watch).

No script needs two slots:

* the epoch has a global key (``pricehub:epoch``, claimed with ``SET NX``) and a mirror
  per zone inside the zone's slot (``pricehub:{pjm}:epoch``), which the append script
  checks. Every connect (and every epoch replacement) copies the global epoch into every
  zone's mirror, announcing a change on the zone's channel; a shard that lost its data
  has no mirror, so its appends are refused and the instance reconciles (writes back)
  instead of numbering from 1 again;
* the instance registry keys share the hash tag ``{registry}`` (one slot, small writes);
* stream ingest cannot XACK inside the append script (the stream is in another slot), so
  the append is idempotent per entry instead: the zone's slot keeps the last ingest entry
  id applied (``pricehub:{pjm}:ingested``) and the script skips an entry id <= it; XACK
  and XDEL follow in a separate round trip. Stream ids only grow and a zone's entries are
  applied in stream order, so an entry re-delivered after a crash between the append and
  the XACK (or taken by a stalled ex-holder of the lease) is skipped: exactly once.

A master replaced by its replica shows up as a dead subscriber connection or a failed
write: the storage is then lost, ``FailoverStorage`` serves from memory, and the next
probe connects afresh (new slot map, new subscriptions) and reconciles. A slot migrated
by resharding shows up as a ``sunsubscribe`` push: followed in place (``_follow``), the
zone's channel subscribed on its new master and the gap replayed from the history
(docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import StorageError, StorageUnavailable
from pricehub.storage.redis import (
    INGEST_GROUP,
    MAX_PIPELINE,
    EpochChanged,
    KeyLayout,
    RedisStorage,
    Write,
    WriteInDoubt,
    connect_client,
    redis_errors,
    refusal,
    stored_price,
)
from pricehub.storage.redis.scripts import (
    CAS_EPOCH,
    CLUSTER_APPEND,
    CLUSTER_RESTORE,
    LOAD_ZONE,
    MIRROR_EPOCH,
)
from pricehub.storage.redis.urls import (
    CLUSTER_SCHEME,
    RedisUrl,
    connect_any,
    connect_cluster,
    is_cluster_url,
    parse_url,
    ping_problem,
)

__all__ = [
    "CLUSTER_SCHEME",
    "ClusterKeyLayout",
    "RedisClusterStorage",
    "connect_any",
    "connect_cluster",
    "is_cluster_url",
    "ping_problem",
]

# Tries to re-subscribe a moved zone's channel before calling the storage lost.
FOLLOW_ATTEMPTS = 4

LOAD_CHUNK = 2000  # zones per pipelined round trip when loading every zone's state
LOGGED_UNREPLICATED = 10  # log every short WAIT up to this many, then one in a thousand
PROBE_TAGS = 10_000  # hash tags tried to find a probe channel on each master


@dataclass(frozen=True, slots=True)
class ClusterKeyLayout(KeyLayout):
    """``KeyLayout`` with a zone's keys and channel under the hash tag ``{zone}``.

    The ingest stream and its lease keep their names (``pricehub:ingest`` is the
    contract): each is one key, used alone.
    """

    def _zone(self, zone: str, name: str) -> str:
        return f"{self.prefix}{{{zone}}}:{name}"

    def seq(self, zone: str) -> str:
        return self._zone(zone, "seq")

    def latest(self, zone: str) -> str:
        return self._zone(zone, "latest")

    def history(self, zone: str) -> str:
        return self._zone(zone, "history")

    def zone_epoch(self, zone: str) -> str:
        return self._zone(zone, "epoch")

    def ingested(self, zone: str) -> str:
        return self._zone(zone, "ingested")

    def channel(self, zone: str) -> str:
        return self._zone(zone, "prices")

    def probe(self, token: str) -> str:
        return f"{self.prefix}{{probe-{token}}}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}{{registry}}:instance:{instance_id}"

    @property
    def instances(self) -> str:
        return f"{self.prefix}{{registry}}:instances"


# The scripts: lua/cluster_*.lua, mirror_epoch.lua, cas_epoch.lua, load_zone.lua
# (pricehub.storage.redis.scripts). URLs and clients: pricehub.storage.redis.urls
# (re-exported here: connect_any, connect_cluster, is_cluster_url, ping_problem).


def _node_url(node: ClusterNode, parsed: RedisUrl) -> str:
    auth = ""
    if parsed.password is not None:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password, safe='')}@"
    return f"redis://{auth}{node.host}:{node.port}/0"


@dataclass(slots=True)
class _Shard:
    """One master's subscriber: its connection, its channels and its probe."""

    name: str
    client: aioredis.Redis
    pubsub: PubSub
    probe: str
    channels: int
    activity: asyncio.Event = field(default_factory=asyncio.Event)


async def _close_shard(shard: _Shard, timeout: float) -> None:
    for resource in (shard.pubsub, shard.client):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await resource.aclose()


class RedisClusterStorage(RedisStorage):
    """The ``Storage`` Protocol on a Redis Cluster (``RedisStorage`` through hooks).

    :param url: ``redis+cluster://host:port[,host:port...]/``.
    :param zones: the configured zones: subscribed and given the epoch mirror.
    Other parameters: as ``RedisStorage``.
    """

    _restore_script = CLUSTER_RESTORE

    def __init__(self, url: str, *, zones: Sequence[str], **options: Any) -> None:
        super().__init__(url, **options)
        self.keys: ClusterKeyLayout = ClusterKeyLayout(self.keys.prefix)
        self._zones = tuple(zones)
        self._shards: list[_Shard] = []
        self._wait_replicas = parse_url(url).wait_replicas
        self._delivering = asyncio.Lock()
        self._confirmations: dict[bytes, asyncio.Event] = {}  # SSUBSCRIBEs awaited
        self.moves = 0  # zone channels followed to another master (resharding)
        self._zone_by_channel: dict[str, str] | None = None
        self.unreplicated = 0  # batches a master acknowledged before enough replicas had them

    @property
    def cluster(self) -> AsyncRedisCluster:
        return cast(AsyncRedisCluster, self.client)

    # One ingest batch at a time: an entry's per-zone idempotency marker would take an
    # older entry arriving after a newer one as applied before, and skip it.
    ingest_depth = 1

    # --- hooks of RedisStorage ---------------------------------------------------------

    def _write_error(self, error: BaseException) -> StorageError:
        """A script answered MOVED/ASK (a slot is migrating; the driver does not retry):
        it did not run, nothing was written. Refused like an epoch change, so the owner
        resyncs quietly (a fresh connection refreshes the slot map) and retries it:
        never a failover to memory for a resharding."""
        if isinstance(error, MovedError | AskError):
            return EpochChanged(f"redis cluster: slot moved ({error})")
        return super()._write_error(error)

    def _channel(self, zone: str) -> str:
        return self.keys.channel(zone)

    def _message_prefix(self, zone: str) -> str:
        """What precedes the payload on the channel: ``<epoch> <zone> `` (the format
        ``RedisStorage._on_message`` parses; see lua/append.lua)."""
        return f"{self.epoch} {zone} "

    # --- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        self._client = connect_any(self._url, timeout=self._timeout)
        client = self.cluster
        try:
            async with redis_errors("connect"):
                await client.initialize()
                await client.ping(target_nodes=AsyncRedisCluster.PRIMARIES)
                await CLUSTER_APPEND.load(client)  # sent as raw EVALSHA (_run_groups)
                await self._subscribe_shards(client)
        except BaseException:
            await self.close()
            raise

    async def _subscribe_shards(self, client: AsyncRedisCluster) -> None:
        """One subscriber per master serving a zone: SSUBSCRIBE one slot at a time
        (a multi-channel SSUBSCRIBE must stay in one slot), then its probe channel."""
        by_node: dict[str, tuple[ClusterNode, dict[int, list[str]]]] = {}
        for zone in self._zones:
            channel = self.keys.channel(zone)
            node = client.get_node_from_key(channel)
            if node is None:
                raise StorageUnavailable(f"redis cluster: no master for {channel}")
            slots = by_node.setdefault(node.name, (node, {}))[1]
            slots.setdefault(key_slot(channel.encode()), []).append(channel)
        for node, slots in by_node.values():
            self._shards.append(await self._open_shard(client, node, slots))

    async def _open_shard(
        self, client: AsyncRedisCluster, node: ClusterNode, slots: dict[int, list[str]]
    ) -> _Shard:
        """A subscriber on ``node``: ``slots``' channels and a probe, confirmed."""
        sub_client = connect_client(_node_url(node, parse_url(self._url)),
                                    timeout=self._timeout)  # fmt: skip
        count = sum(len(channels) for channels in slots.values()) + 1
        shard = _Shard(node.name, sub_client, sub_client.pubsub(),
                       self._probe_on(client, node.name), count)  # fmt: skip
        try:
            for channels in slots.values():
                await shard.pubsub.ssubscribe(*channels)
            await shard.pubsub.ssubscribe(shard.probe)
            await self._await_ssubscribed(shard)
        except BaseException:
            await _close_shard(shard, self._timeout)
            raise
        return shard

    def _probe_on(self, client: AsyncRedisCluster, node_name: str) -> str:
        """A probe channel of this connection that hashes onto ``node_name``."""
        for index in range(PROBE_TAGS):
            channel = self.keys.probe(f"{self._token}-{index}")
            node = client.get_node_from_key(channel)
            if node is not None and node.name == node_name:
                return channel
        raise StorageUnavailable(f"redis cluster: no probe channel for {node_name}")

    async def _await_ssubscribed(self, shard: _Shard) -> None:
        # As _await_subscribed: reading state before Redis confirmed could miss a price.
        # Bounded by progress, not in total: thousands of zones take a while to confirm,
        # but a silent connection fails within one timeout.
        confirmed = 0
        while confirmed < shard.channels:
            message = await shard.pubsub.get_message(timeout=self._timeout)
            if message is None:
                raise StorageUnavailable(f"redis cluster: {shard.name} did not confirm SSUBSCRIBE")
            if message["type"] == "ssubscribe":
                confirmed += 1

    async def close(self) -> None:
        await super().close()
        shards, self._shards = self._shards, []
        for shard in shards:
            await _close_shard(shard, self._timeout)

    async def check(self) -> None:
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        async with redis_errors("ping"):
            # Masters only: a replica being down is not an outage of the feed.
            await self.cluster.ping(target_nodes=AsyncRedisCluster.PRIMARIES)

    # --- subscriber -------------------------------------------------------------------

    async def _read(self) -> None:
        await asyncio.gather(*(self._read_shard(shard) for shard in self._shards))

    async def _read_shard(self, shard: _Shard) -> None:
        try:
            while not await self._listen(shard):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a shard subscriber means it is lost
            self._mark_lost(exc)
        else:
            self._mark_lost(StorageUnavailable(f"redis shard subscriber {shard.name} stopped"))

    async def _listen(self, shard: _Shard) -> bool:
        """Deliver what the shard subscriber hears; True when its connection ended,
        False after a MOVED/ASK reply: a subscribe the slot's old owner refused while a
        migration settled (``_follow`` re-subscribed where the slot lives), which leaves
        the connection usable, so listening goes on."""
        probe = shard.probe.encode()
        try:
            async for message in shard.pubsub.listen():
                shard.activity.set()
                kind = message["type"]
                if kind == "smessage" and message["channel"] != probe:
                    # One delivery at a time across shards: a zone's catch-up after its
                    # slot moved must not interleave with its new shard's gap filling.
                    async with self._delivering:
                        await self._on_message(message["data"])
                elif kind == "ssubscribe":
                    self._confirmed(message["channel"])
                elif kind == "sunsubscribe":
                    await self._follow(message["channel"])
        except (MovedError, AskError):
            return False
        return True

    def _confirmed(self, channel: bytes) -> None:
        waiter = self._confirmations.pop(channel, None)
        if waiter is not None:
            waiter.set()

    async def _follow(self, raw_channel: bytes) -> None:
        """Redis moved a zone's slot to another master (resharding; a failover shows up
        as a dead connection instead): subscribe to the zone's channel there, then feed
        the zone's newest price through the delivery path, which fills the gap from the
        history and drops what was delivered already. Any failure: the storage is lost
        (memory, then a fresh connect)."""
        channel = raw_channel.decode()
        zone = self._zone_of(channel)
        if zone is None:
            return  # our probe channel: its slot moved too; the watch notices silence
        async with redis_errors("follow slot"):
            for attempt in range(FOLLOW_ATTEMPTS):
                try:
                    await self._subscribe_where_it_lives(channel, raw_channel)
                    break
                except TimeoutError:
                    # A migration's new owner can be announced before every node agrees:
                    # the subscribe lands on the old owner, which never confirms it.
                    # Refresh the slot map and try again, a few times, then give up.
                    if attempt == FOLLOW_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
            latest = await self.latest(zone)
        self.moves += 1
        if latest is not None:
            async with self._delivering:
                await self._on_message(self._message_prefix(zone).encode() + latest.payload)

    async def _subscribe_where_it_lives(self, channel: str, raw_channel: bytes) -> None:
        """SSUBSCRIBE ``channel`` on the master that owns its slot now (after a refresh of
        the slot map), waiting for the confirmation."""
        client = self.cluster
        await client.nodes_manager.initialize()
        node = client.get_node_from_key(channel)
        if node is None:
            raise StorageUnavailable(f"redis cluster: no master for {channel}")
        target = next((s for s in self._shards if s.name == node.name), None)
        if target is None:
            target = await self._open_shard(client, node, {0: [channel]})
            self._shards.append(target)
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._read_shard(target)
            ))  # fmt: skip
            return
        waiter = self._confirmations[raw_channel] = asyncio.Event()
        await target.pubsub.ssubscribe(channel)
        async with asyncio.timeout(2 * self._timeout):
            await waiter.wait()

    def _zone_of(self, channel: str) -> str | None:
        if self._zone_by_channel is None:  # built on the first move only
            self._zone_by_channel = {self.keys.channel(zone): zone for zone in self._zones}
        return self._zone_by_channel.get(channel)

    async def _watch(self) -> None:
        """Liveness of every shard subscriber: a probe to each must come back."""
        try:
            while True:
                await asyncio.sleep(self._probe_interval)
                for shard in self._shards:
                    shard.activity.clear()
                pipe = self.cluster.pipeline(transaction=False)
                for shard in self._shards:
                    pipe.spublish(shard.probe, b"probe")
                async with redis_errors("probe"):
                    await pipe.execute()
                for shard in self._shards:
                    await self._await_activity(shard)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._mark_lost(exc)

    async def _await_activity(self, shard: _Shard) -> None:
        try:
            async with asyncio.timeout(2 * self._timeout):
                await shard.activity.wait()
        except TimeoutError:
            await asyncio.sleep(0)  # see RedisStorage._watch: a loop stall is not death
            if not shard.activity.is_set():
                raise StorageUnavailable(
                    f"redis shard subscriber {shard.name} silent for {2 * self._timeout:g} s"
                ) from None

    # --- writes -----------------------------------------------------------------------

    @staticmethod
    def _groups(batch: Sequence[Write]) -> list[list[Write]]:
        # One price per script: lua/append_many.lua's batch spans zones, so slots.
        return [[write] for write in batch]

    async def _flush(self) -> None:
        """One pipeline at a time, each waiting for its replies (not RedisStorage's
        pipelining on one connection: a cluster pipeline spans nodes, and its WAIT and
        ingest acknowledgements follow its replies)."""
        while self._pending:
            batch, self._pending = self._pending[:MAX_PIPELINE], self._pending[MAX_PIPELINE:]
            groups = self._groups(batch)
            try:
                results = await self._run_groups(groups)
            except StorageUnavailable as exc:
                self._fail_writes(batch, exc)
                self._mark_lost(exc)
                continue
            except BaseException:
                self._fail_writes(batch, StorageUnavailable("redis storage closed"))
                raise
            for group, result in zip(groups, results, strict=True):
                self._settle(group, result)

    async def _run_groups(self, groups: Sequence[Sequence[Write]]) -> list[Any]:
        batch = [write for group in groups for write in group]  # groups of one
        keys, epoch = self.keys, self.epoch
        pipe = self.cluster.pipeline(transaction=False)
        for write in batch:
            zone = write.zone
            script_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone),
                           keys.zone_epoch(zone)]  # fmt: skip
            args: list[str | bytes | int] = [
                write.body, self._history_size, keys.channel(zone),
                self._message_prefix(zone), epoch,
            ]  # fmt: skip
            if write.ack is not None:
                script_keys.append(keys.ingested(zone))
                args.append(write.ack.entry_id)
            # execute_command: redis-py blocks its pipelined ``evalsha`` helper on a
            # cluster (a script is routed by its first key, which is what we want).
            pipe.execute_command(*CLUSTER_APPEND.command(script_keys, args))
        try:
            async with redis_errors("append"):
                results: list[Any] = await pipe.execute(raise_on_error=False)
            if self._wait_replicas:
                await self._wait_for_replicas({write.zone for write in batch})
        except StorageUnavailable as exc:
            # As RedisStorage._run_batch: the scripts may have run (settled by the owner).
            raise WriteInDoubt(str(exc)) from exc
        await self._ack_ingested(batch, results)
        return results

    async def _wait_for_replicas(self, zones: Iterable[str]) -> None:
        """``WAIT N`` on every master the batch wrote to: its prices are acknowledged
        only once N replicas have them (or the timeout passed: counted, not refused, so
        a replica being down does not stop the feed). A failure here means the master
        died with the batch unconfirmed: the whole batch is in doubt (``WriteInDoubt``),
        settled by ``FailoverStorage`` like a batch whose replies were lost, never 202-ed
        on an unconfirmed copy alone."""
        cluster = self.cluster
        nodes = {
            node.name: node
            for zone in zones
            if (node := cluster.get_node_from_key(self.keys.seq(zone))) is not None
        }
        wait_ms = max(1, int(self._timeout * 1000 / 2))
        async with redis_errors("wait"):
            counts = await asyncio.gather(*(
                cluster.execute_command("WAIT", self._wait_replicas, wait_ms, target_nodes=node)
                for node in nodes.values()
            ))  # fmt: skip
        short = sum(int(count) < self._wait_replicas for count in counts)
        if short:
            self.unreplicated += short
            # Throttled: a dead replica makes every batch short until it is replaced.
            if self.unreplicated <= LOGGED_UNREPLICATED or self.unreplicated % 1000 == 0:
                self._log.warning(
                    "storage_unreplicated", wait_replicas=self._wait_replicas,
                    masters=short, total=self.unreplicated,
                )  # fmt: skip

    async def _ack_ingested(self, batch: Sequence[Write], results: Sequence[Any]) -> None:
        """XACK + XDEL the ingest entries whose script ran (applied now or before) or
        that their zone's keys refused (damaged: done with, as on one node; see
        lua/append.lua). Not atomic with the append: a failure here leaves them pending, and
        their next delivery is skipped by the script (the zone's last applied id) or
        refused again."""
        done = [
            write.ack.entry_id
            for write, result in zip(batch, results, strict=True)
            if write.ack is not None
            and (not isinstance(result, BaseException) or refusal(result) is not None)
        ]
        if not done:
            return
        pipe = self.cluster.pipeline(transaction=False)
        pipe.xack(self.keys.ingest, INGEST_GROUP, *done)
        pipe.xdel(self.keys.ingest, *done)
        try:
            async with redis_errors("ingest ack"):
                await pipe.execute()
        except StorageUnavailable as exc:
            self._mark_lost(exc)  # the appends stand; the entries are taken again later

    # --- reads ------------------------------------------------------------------------

    async def load(self, zones: Iterable[str]) -> dict[str, tuple[int, list[StoredPrice]]]:
        """Every zone's seq and retained history, each zone read atomically (a script
        in its slot; a MULTI over many zones would cross slots)."""
        zone_list = list(zones)
        state: dict[str, tuple[int, list[StoredPrice]]] = {}
        for start in range(0, len(zone_list), LOAD_CHUNK):
            chunk = zone_list[start : start + LOAD_CHUNK]
            pipe = self.cluster.pipeline(transaction=False)
            for zone in chunk:
                LOAD_ZONE.queue(pipe, [self.keys.seq(zone), self.keys.history(zone)], [])
            async with redis_errors("load"):
                results = await pipe.execute()
            for zone, (seq, payloads) in zip(chunk, results, strict=True):
                if int(seq) < 0:  # damaged: left out, logged (as RedisStorage.load)
                    self._zone_damaged(zone, f"{self._damage(zone)}; not loaded")
                elif int(seq):  # as RedisStorage.load: zones without a price are left out
                    state[zone] = (int(seq), [stored_price(zone, payload) for payload in payloads])
        return state

    # --- epoch ------------------------------------------------------------------------

    async def claim_epoch(self, candidate: str) -> str:
        epoch = await super().claim_epoch(candidate)
        await self._mirror_epoch(epoch)
        return epoch

    async def replace_epoch(self, expected: str, replacement: str) -> str:
        async with redis_errors("epoch"):
            current = await CAS_EPOCH.run(self.cluster, [self.keys.epoch], [expected, replacement])
        self._epoch = current.decode()
        await self._mirror_epoch(self._epoch)
        return self._epoch

    async def _mirror_epoch(self, epoch: str) -> None:
        """Copy the global epoch into every zone's slot (what the append script checks)."""
        for start in range(0, len(self._zones), LOAD_CHUNK):
            pipe = self.cluster.pipeline(transaction=False)
            for zone in self._zones[start : start + LOAD_CHUNK]:
                MIRROR_EPOCH.queue(
                    pipe, [self.keys.zone_epoch(zone)], [epoch, self.keys.channel(zone)]
                )
            async with redis_errors("epoch mirror"):
                await pipe.execute()
