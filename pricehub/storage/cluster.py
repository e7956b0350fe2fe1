"""Redis Cluster storage: ``redis+cluster://host:port[,host:port...]/`` (Redis >= 7).

``RedisClusterStorage`` is ``RedisStorage`` built with the cluster's strategy
(``ClusterTopology``, a ``pricehub.storage.redis.topology.Topology``), which supplies:

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

Why not redis-py 8.2's own ``ClusterPubSub`` (whose ``on_slots_changed`` re-subscribes
moved shard channels): its reconciliation runs in a background task whose failures are
only logged, so a channel it failed to move would go silent instead of making the
storage lost; it gives no hook to replay the moved zone's gap from the history or to
count the move; and its per-node connections are its own, so the per-master liveness
probe could not tell which connection went silent. The following here is what those
tests (tests/storage/test_redis_cluster.py) need; the driver's is not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from pricehub.storage.errors import StorageError, StorageUnavailable
from pricehub.storage.redis import (
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
    Script,
)
from pricehub.storage.redis.stream import acknowledge
from pricehub.storage.redis.topology import Host, Settings, ZoneState
from pricehub.storage.redis.urls import (
    CLUSTER_SCHEME,
    RedisUrl,
    connect_any,
    connect_cluster,
    is_cluster_url,
    parse_url,
    ping_problem,
)
from pricehub.storage.redis.writer import fail_writes

__all__ = [
    "CLUSTER_SCHEME",
    "ClusterKeyLayout",
    "ClusterTopology",
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


def _cluster(host: Host) -> AsyncRedisCluster:
    """The host's client, which this topology made (``connect``): a cluster client."""
    return cast(AsyncRedisCluster, host.client)


class ClusterTopology:
    """The ``Topology`` of a Redis Cluster: a zone's keys and channel in its slot,
    one sharded subscriber per master, one script per price with WAIT and a separate
    ingest acknowledgement.

    :param zones: the configured zones: subscribed and given the epoch mirror.
    :param keys: the layout (its prefix is the storage's).
    :param wait_replicas: replicas a master must have written a batch to (``WAIT``).
    """

    # One ingest batch at a time: an entry's per-zone idempotency marker would take an
    # older entry arriving after a newer one as applied before, and skip it.
    ingest_depth = 1
    restore_script: Script = CLUSTER_RESTORE

    def __init__(self, zones: Sequence[str], keys: ClusterKeyLayout, *, wait_replicas: int) -> None:
        self.keys = keys
        self._zones = tuple(zones)
        self._wait_replicas = wait_replicas
        self._shards: list[_Shard] = []
        self._delivering = asyncio.Lock()
        self._confirmations: dict[bytes, asyncio.Event] = {}  # SSUBSCRIBEs awaited
        self._zone_by_channel: dict[str, str] | None = None
        self.moves = 0  # zone channels followed to another master (resharding)
        self.unreplicated = 0  # batches a master acknowledged before enough replicas had them

    def write_error(self, error: BaseException) -> StorageError | None:
        """A script answered MOVED/ASK (a slot is migrating; the driver does not retry):
        it did not run, nothing was written. Refused like an epoch change, so the owner
        resyncs quietly (a fresh connection refreshes the slot map) and retries it:
        never a failover to memory for a resharding."""
        if isinstance(error, MovedError | AskError):
            return EpochChanged(f"redis cluster: slot moved ({error})")
        return None

    def channel(self, keys: KeyLayout, zone: str) -> str:
        return self.keys.channel(zone)

    def _message_prefix(self, host: Host, zone: str) -> str:
        """What precedes the payload on the channel: ``<epoch> <zone> `` (the format
        the storage's delivery parses; see lua/append.lua)."""
        return f"{host.epoch} {zone} "

    # --- lifecycle --------------------------------------------------------------------

    def connect(self, settings: Settings) -> aioredis.Redis:
        return connect_any(settings.url, timeout=settings.timeout)

    def layout(self, prefix: str, client: aioredis.Redis) -> KeyLayout:
        return self.keys  # no database numbers on a cluster

    async def open(self, host: Host) -> None:
        client = _cluster(host)
        await client.initialize()
        await client.ping(target_nodes=AsyncRedisCluster.PRIMARIES)
        await CLUSTER_APPEND.load(client)  # sent as raw EVALSHA (_run_batch)
        await self._subscribe_shards(host, client)

    async def _subscribe_shards(self, host: Host, client: AsyncRedisCluster) -> None:
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
            self._shards.append(await self._open_shard(host.settings, client, node, slots))

    async def _open_shard(
        self,
        settings: Settings,
        client: AsyncRedisCluster,
        node: ClusterNode,
        slots: dict[int, list[str]],
    ) -> _Shard:
        """A subscriber on ``node``: ``slots``' channels and a probe, confirmed."""
        sub_client = connect_client(_node_url(node, parse_url(settings.url)),
                                    timeout=settings.timeout)  # fmt: skip
        count = sum(len(channels) for channels in slots.values()) + 1
        probe = self._probe_on(client, node.name, settings.token)
        shard = _Shard(node.name, sub_client, sub_client.pubsub(), probe, count)
        try:
            for channels in slots.values():
                await shard.pubsub.ssubscribe(*channels)
            await shard.pubsub.ssubscribe(shard.probe)
            await self._await_ssubscribed(shard, settings.timeout)
        except BaseException:
            await _close_shard(shard, settings.timeout)
            raise
        return shard

    def _probe_on(self, client: AsyncRedisCluster, node_name: str, token: str) -> str:
        """A probe channel of this connection that hashes onto ``node_name``."""
        for index in range(PROBE_TAGS):
            channel = self.keys.probe(f"{token}-{index}")
            node = client.get_node_from_key(channel)
            if node is not None and node.name == node_name:
                return channel
        raise StorageUnavailable(f"redis cluster: no probe channel for {node_name}")

    @staticmethod
    async def _await_ssubscribed(shard: _Shard, timeout: float) -> None:
        # As SingleNode's: reading state before Redis confirmed could miss a price.
        # Bounded by progress, not in total: thousands of zones take a while to confirm,
        # but a silent connection fails within one timeout.
        confirmed = 0
        while confirmed < shard.channels:
            message = await shard.pubsub.get_message(timeout=timeout)
            if message is None:
                raise StorageUnavailable(f"redis cluster: {shard.name} did not confirm SSUBSCRIBE")
            if message["type"] == "ssubscribe":
                confirmed += 1

    async def close(self, host: Host) -> None:
        shards, self._shards = self._shards, []
        for shard in shards:
            await _close_shard(shard, host.settings.timeout)

    async def ping(self, client: aioredis.Redis) -> None:
        # Masters only: a replica being down is not an outage of the feed.
        await cast(AsyncRedisCluster, client).ping(target_nodes=AsyncRedisCluster.PRIMARIES)

    # --- subscriber -------------------------------------------------------------------

    def subscribers(self, host: Host) -> list[Coroutine[Any, Any, None]]:
        return [self._read(host), self._watch(host)]

    async def _read(self, host: Host) -> None:
        await asyncio.gather(*(self._read_shard(host, shard) for shard in self._shards))

    async def _read_shard(self, host: Host, shard: _Shard) -> None:
        try:
            while not await self._listen(host, shard):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a shard subscriber means it is lost
            host.mark_lost(exc)
        else:
            host.mark_lost(StorageUnavailable(f"redis shard subscriber {shard.name} stopped"))

    async def _listen(self, host: Host, shard: _Shard) -> bool:
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
                        await host.deliver(message["data"])
                elif kind == "ssubscribe":
                    self._confirmed(message["channel"])
                elif kind == "sunsubscribe":
                    await self._follow(host, message["channel"])
        except (MovedError, AskError):
            return False
        return True

    def _confirmed(self, channel: bytes) -> None:
        waiter = self._confirmations.pop(channel, None)
        if waiter is not None:
            waiter.set()

    async def _follow(self, host: Host, raw_channel: bytes) -> None:
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
                    await self._subscribe_where_it_lives(host, channel, raw_channel)
                    break
                except TimeoutError:
                    # A migration's new owner can be announced before every node agrees:
                    # the subscribe lands on the old owner, which never confirms it.
                    # Refresh the slot map and try again, a few times, then give up.
                    if attempt == FOLLOW_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
            latest = await host.latest(zone)
        self.moves += 1
        if latest is not None:
            async with self._delivering:
                await host.deliver(self._message_prefix(host, zone).encode() + latest.payload)

    async def _subscribe_where_it_lives(self, host: Host, channel: str, raw_channel: bytes) -> None:
        """SSUBSCRIBE ``channel`` on the master that owns its slot now (after a refresh of
        the slot map), waiting for the confirmation."""
        client = _cluster(host)
        await client.nodes_manager.initialize()
        node = client.get_node_from_key(channel)
        if node is None:
            raise StorageUnavailable(f"redis cluster: no master for {channel}")
        target = next((s for s in self._shards if s.name == node.name), None)
        if target is None:
            target = await self._open_shard(host.settings, client, node, {0: [channel]})
            self._shards.append(target)
            host.spawn(self._read_shard(host, target))
            return
        waiter = self._confirmations[raw_channel] = asyncio.Event()
        await target.pubsub.ssubscribe(channel)
        async with asyncio.timeout(2 * host.settings.timeout):
            await waiter.wait()

    def _zone_of(self, channel: str) -> str | None:
        if self._zone_by_channel is None:  # built on the first move only
            self._zone_by_channel = {self.keys.channel(zone): zone for zone in self._zones}
        return self._zone_by_channel.get(channel)

    async def _watch(self, host: Host) -> None:
        """Liveness of every shard subscriber: a probe to each must come back."""
        settings = host.settings
        try:
            while True:
                await asyncio.sleep(settings.probe_interval)
                for shard in self._shards:
                    shard.activity.clear()
                pipe = _cluster(host).pipeline(transaction=False)
                for shard in self._shards:
                    pipe.spublish(shard.probe, b"probe")
                async with redis_errors("probe"):
                    await pipe.execute()
                for shard in self._shards:
                    await self._await_activity(shard, settings.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            host.mark_lost(exc)

    @staticmethod
    async def _await_activity(shard: _Shard, timeout: float) -> None:
        try:
            async with asyncio.timeout(2 * timeout):
                await shard.activity.wait()
        except TimeoutError:
            await asyncio.sleep(0)  # as SingleNode's watch: a loop stall is not death
            if not shard.activity.is_set():
                raise StorageUnavailable(
                    f"redis shard subscriber {shard.name} silent for {2 * timeout:g} s"
                ) from None

    # --- writes -----------------------------------------------------------------------

    async def flush(self, host: Host) -> None:
        """One pipeline at a time, each waiting for its replies (not SingleNode's
        pipelining on one connection: a cluster pipeline spans nodes, and its WAIT and
        ingest acknowledgements follow its replies). One price per script:
        lua/append_many.lua's batch spans zones, so slots."""
        while batch := host.take_pending(MAX_PIPELINE):
            try:
                results = await self._run_batch(host, batch)
            except StorageUnavailable as exc:
                fail_writes(batch, exc)
                host.mark_lost(exc)
                continue
            except BaseException:
                fail_writes(batch, StorageUnavailable("redis storage closed"))
                raise
            for write, result in zip(batch, results, strict=True):
                host.settle([write], result)

    async def _run_batch(self, host: Host, batch: Sequence[Write]) -> list[Any]:
        keys, epoch = self.keys, host.epoch
        pipe = _cluster(host).pipeline(transaction=False)
        for write in batch:
            zone = write.zone
            script_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone),
                           keys.zone_epoch(zone)]  # fmt: skip
            args: list[str | bytes | int] = [
                write.body, host.settings.history_size, keys.channel(zone),
                self._message_prefix(host, zone), epoch,
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
                await self._wait_for_replicas(host, {write.zone for write in batch})
        except StorageUnavailable as exc:
            # As SingleNode's: the scripts may have run (settled by the owner).
            raise WriteInDoubt(str(exc)) from exc
        await self._ack_ingested(host, batch, results)
        return results

    async def _wait_for_replicas(self, host: Host, zones: Iterable[str]) -> None:
        """``WAIT N`` on every master the batch wrote to: its prices are acknowledged
        only once N replicas have them (or the timeout passed: counted, not refused, so
        a replica being down does not stop the feed). A failure here means the master
        died with the batch unconfirmed: the whole batch is in doubt (``WriteInDoubt``),
        settled by ``FailoverStorage`` like a batch whose replies were lost, never 202-ed
        on an unconfirmed copy alone."""
        cluster = _cluster(host)
        nodes = {
            node.name: node
            for zone in zones
            if (node := cluster.get_node_from_key(self.keys.seq(zone))) is not None
        }
        wait_ms = max(1, int(host.settings.timeout * 1000 / 2))
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
                host.settings.log.warning(
                    "storage_unreplicated", wait_replicas=self._wait_replicas,
                    masters=short, total=self.unreplicated,
                )  # fmt: skip

    async def _ack_ingested(
        self, host: Host, batch: Sequence[Write], results: Sequence[Any]
    ) -> None:
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
        pipe = _cluster(host).pipeline(transaction=False)
        acknowledge(pipe, self.keys.ingest_keys, done)
        try:
            async with redis_errors("ingest ack"):
                await pipe.execute()
        except StorageUnavailable as exc:
            host.mark_lost(exc)  # the appends stand; the entries are taken again later

    # --- state and epoch --------------------------------------------------------------

    async def load(self, host: Host, zones: Iterable[str]) -> dict[str, ZoneState]:
        """Each zone read atomically: a script in its slot (a MULTI over many zones
        would cross slots), pipelined ``LOAD_CHUNK`` zones per round trip."""
        zone_list = list(zones)
        state: dict[str, ZoneState] = {}
        for start in range(0, len(zone_list), LOAD_CHUNK):
            chunk = zone_list[start : start + LOAD_CHUNK]
            pipe = _cluster(host).pipeline(transaction=False)
            for zone in chunk:
                LOAD_ZONE.queue(pipe, [self.keys.seq(zone), self.keys.history(zone)], [])
            async with redis_errors("load"):
                results = await pipe.execute()
            for zone, (seq, payloads) in zip(chunk, results, strict=True):
                if int(seq) < 0:  # damaged: left out, logged (as on one node)
                    host.zone_damaged(zone, f"{host.damage(zone)}; not loaded")
                elif int(seq):  # as on one node: zones without a price are left out
                    state[zone] = (int(seq), [stored_price(zone, payload) for payload in payloads])
        return state

    async def epoch_claimed(self, host: Host, epoch: str) -> None:
        await self._mirror_epoch(host, epoch)

    async def replace_epoch(self, host: Host, expected: str, replacement: str) -> str:
        async with redis_errors("epoch"):
            current = await CAS_EPOCH.run(
                _cluster(host), [self.keys.epoch], [expected, replacement]
            )
        epoch = str(current.decode())
        await self._mirror_epoch(host, epoch)
        return epoch

    async def _mirror_epoch(self, host: Host, epoch: str) -> None:
        """Copy the global epoch into every zone's slot (what the append script checks)."""
        for start in range(0, len(self._zones), LOAD_CHUNK):
            pipe = _cluster(host).pipeline(transaction=False)
            for zone in self._zones[start : start + LOAD_CHUNK]:
                MIRROR_EPOCH.queue(
                    pipe, [self.keys.zone_epoch(zone)], [epoch, self.keys.channel(zone)]
                )
            async with redis_errors("epoch mirror"):
                await pipe.execute()


class RedisClusterStorage(RedisStorage):
    """The ``Storage`` Protocol on a Redis Cluster: ``RedisStorage`` built with
    ``ClusterTopology`` (nothing of it overridden).

    :param url: ``redis+cluster://host:port[,host:port...]/``.
    :param zones: the configured zones: subscribed and given the epoch mirror.
    Other parameters: as ``RedisStorage``.
    """

    def __init__(
        self, url: str, *, zones: Sequence[str], key_prefix: str = "pricehub:", **options: Any
    ) -> None:
        self.cluster_topology = ClusterTopology(
            zones, ClusterKeyLayout(key_prefix), wait_replicas=parse_url(url).wait_replicas
        )
        super().__init__(url, key_prefix=key_prefix, topology=self.cluster_topology, **options)

    @property
    def moves(self) -> int:
        """Zone channels followed to another master (resharding)."""
        return self.cluster_topology.moves

    @property
    def unreplicated(self) -> int:
        """Batches a master acknowledged before enough replicas had them."""
        return self.cluster_topology.unreplicated
