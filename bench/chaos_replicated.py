"""The chaos soak's replicated topologies: Redis Sentinel and Redis Cluster.

``SentinelRedis``: a master, one replica and three sentinels (quorum 2, ``down-after`` 1 s).
``master_kill`` and ``master_pause`` end once the replica is promoted *and* the old master
serves again as its replica, in sync, so the next fault finds the same shape; ``sentinel_kill``
restarts the sentinel on its (rewritten) configuration.

``master_kill`` first stops the replica (SIGSTOP) and cuts its link (``CLIENT KILL TYPE
replica`` on the master: a stopped replica cannot reconnect, and what was sent before waits in
its socket), waits ``LAG`` s (shorter than the failure detection), bursts, kills the master
and lets the replica go on: the replica promoted lacks the master's last ``LAG`` s of
writes, as after a replication lag under load. What
the instances' subscribers received of them must be written back from their copies, and
an acknowledged price none of them received is lost, which must be declared (on loopback,
without the lag, replication is too fast for the soak ever to see that).

``ClusterRedis``: three masters with one replica each (``cluster-node-timeout`` 1 s), created
with ``redis-cli --cluster create``. A fault's target picks a zone; ``master_kill`` and
``master_pause`` hit the master of its slot, ``slot_migration`` moves its slot to another
master the way ``redis-cli --cluster reshard`` does, under load.

Every wait is bounded (``HarnessError``: the set-up did not do what the fault needs).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from pathlib import Path
from typing import Any

from bench.chaos_faults import Fault, FaultPlan, Rig
from bench.chaos_procs import (
    HOST,
    HarnessError,
    RedisNode,
    free_port_pair,
    poll,
    query,
    redis_binary,
)  # fmt: skip
from bench.chaos_stream import Connect, cluster_client, sentinel_client
from bench.chaos_topology import Backend

__all__ = ["ClusterRedis", "SentinelRedis"]

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
NODE_TIMEOUT_MS = 1000
LAG = 0.8  # s the replica is stopped before its master is killed (below 1 s: not failed)
NOTICE = 0.5  # s: at least this long between a takeover and the old master's return
READY = 30.0  # s: a set-up step (sync, promotion, convergence) must be done within this
ZONES = ("pjm", "ercot", "caiso")  # the soak's zones; a target number picks one


def info_field(text: Any, name: str) -> str | None:
    """``name`` in an INFO answer (redis-py parses INFO into a dict)."""
    if isinstance(text, dict):
        value = text.get(name)
        return None if value is None else str(value)
    return None


async def synced_replica(node: RedisNode) -> bool:
    """``node`` answers as a replica whose link to its master is up."""
    replication = await query(node.port, "INFO", "replication")
    return (
        info_field(replication, "role") == "slave"
        and info_field(replication, "master_link_status") == "up"
    )


class SentinelRedis(Backend):
    kinds = ("master_kill", "master_pause", "sentinel_kill")

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        first = RedisNode(workdir, "redis-a")
        second = RedisNode(workdir, "redis-b", args=["--replicaof", HOST, str(first.port)])
        self.data = [first, second]
        self.sentinels = [
            RedisNode(workdir, f"sentinel-{i}", config=workdir / f"sentinel-{i}.conf")
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @property
    def nodes(self) -> list[RedisNode]:
        return [*self.data, *self.sentinels]

    def stream(self) -> Connect:
        return functools.partial(sentinel_client, [n.port for n in self.sentinels], SERVICE)

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.data))
        await poll("the replica in sync", lambda: synced_replica(self.data[1]), READY)
        for node in self.sentinels:
            assert node.config is not None
            node.config.write_text(
                f"dir {self.workdir}\nsentinel resolve-hostnames no\n"
                f"sentinel monitor {SERVICE} {HOST} {self.data[0].port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        await asyncio.gather(*(node.start() for node in self.sentinels))
        await poll("the sentinels know the replica and each other", self._sentinels_ready, READY)

    async def _sentinels_ready(self) -> bool:
        for node in self.sentinels:
            replicas = await query(node.port, "SENTINEL", "REPLICAS", SERVICE) or []
            peers = await query(node.port, "SENTINEL", "SENTINELS", SERVICE) or []
            if len(replicas) < 1 or len(peers) < 2:
                return False
        return await self.master_port() == self.data[0].port

    async def master_port(self) -> int | None:
        """The master port a majority of the sentinels name, if any."""
        votes: dict[int, int] = {}
        for node in self.sentinels:
            answer = await query(node.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            if answer:
                votes[int(answer[1])] = votes.get(int(answer[1]), 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best is not None and best[1] >= 2 else None

    async def _master(self) -> RedisNode:
        port = await self.master_port()
        node = next((n for n in self.data if n.port == port and n.running), None)
        if node is None:
            raise HarnessError(f"no running master (the sentinels say {port})")
        return node

    async def _promoted(self, old: RedisNode) -> bool:
        port = await self.master_port()
        if port is None or port == old.port:
            return False
        return info_field(await query(port, "INFO", "replication"), "role") == "master"

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        if plan.kind == "sentinel_kill":
            sentinel = self.sentinels[plan.target]
            fault.notes["node"] = sentinel.name
            await sentinel.kill()
            await asyncio.sleep(plan.hold)
            await sentinel.start()
        else:
            master = await self._master()
            fault.notes["node"] = master.name
            if plan.kind == "master_kill":
                await self._kill(master, plan, fault, rig)
            else:  # master_pause: the sentinels promote the replica while it is stopped
                master.signal(signal.SIGSTOP)
                await asyncio.sleep(plan.hold)
                fault.notes["promoted_while_stopped"] = await self._promoted(master)
                master.signal(signal.SIGCONT)
                fault.notes["outage"] = round(plan.hold, 2)
        await poll("one master, its replica in sync, every sentinel agreeing", self._settled,
                   READY)  # fmt: skip
        if plan.kind == "master_pause":
            fault.losses.append(time.time())  # demoted by now: its last writes went with it
        fault.notes["master_after"] = (await self._master()).name

    async def _kill(self, master: RedisNode, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        (replica,) = (node for node in self.data if node is not master)
        await kill_lagging(master, replica, plan, fault, rig)
        await poll("a sentinel promotion", lambda: self._promoted(master), READY)
        fault.notes["outage"] = round(time.time() - fault.start, 2)
        await asyncio.sleep(plan.hold)
        master.args = ["--replicaof", HOST, str(await self.master_port())]
        await master.start()

    async def _settled(self) -> bool:
        """Every sentinel names the same master, which says so, and the other data node is
        its replica, in sync: the shape the next fault expects."""
        answers = [
            await query(n.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            for n in self.sentinels
        ]
        ports = {int(a[1]) for a in answers if a}
        if len(ports) != 1 or not all(answers):
            return False
        (port,) = ports
        if info_field(await query(port, "INFO", "replication"), "role") != "master":
            return False
        others = [n for n in self.data if n.port != port]
        return all([await synced_replica(node) for node in others])


class ClusterRedis(Backend):
    kinds = ("master_kill", "master_pause", "slot_migration")
    SIZE = 6

    def __init__(self, workdir: Path, *, wait_replicas: int = 0) -> None:
        super().__init__(workdir)
        self.wait_replicas = wait_replicas
        ports: list[int] = []
        while len(ports) < self.SIZE:
            port = free_port_pair()
            if all(abs(port - other) not in (0, 10000) for other in ports):
                ports.append(port)
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        ]  # fmt: skip
        self.cluster = [
            RedisNode(workdir, f"node-{i}", port=port, args=args) for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{node.port}" for node in self.cluster[:3])
        query_string = f"?wait_replicas={self.wait_replicas}" if self.wait_replicas else ""
        return f"redis+cluster://{hosts}/{query_string}"

    @property
    def nodes(self) -> list[RedisNode]:
        return self.cluster

    def stream(self) -> Connect:
        return functools.partial(cluster_client, [n.port for n in self.cluster[:3]])

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.cluster))
        create = await asyncio.create_subprocess_exec(
            redis_binary("redis-cli"), "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in self.cluster),
            "--cluster-replicas", "1", "--cluster-yes",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(create.communicate(), READY)
        if create.returncode != 0:
            raise HarnessError(f"redis-cli --cluster create failed:\n{output.decode()[-2000:]}")
        await poll("a converged cluster, every replica in sync", self._healthy, READY)

    # --- what the cluster says ---------------------------------------------------------

    async def _view(self, node: RedisNode) -> list[dict[str, Any]]:
        """CLUSTER NODES as ``node`` sees it ([] if it does not answer)."""
        text = await query(node.port, "CLUSTER", "NODES")
        return [parse_node_line(line) for line in text.splitlines() if line] if text else []

    async def _healthy(self) -> bool:
        """Every running node: state ok, three masters owning slots, three replicas with
        their link up, nobody flagged failing."""
        for node in self.cluster:
            if not node.running:
                return False
            state = await query(node.port, "CLUSTER", "INFO")
            if not isinstance(state, str) or "cluster_state:ok" not in state:
                return False
            view = await self._view(node)
            masters = [n for n in view if "master" in n["flags"] and n["slots"]]
            if len(masters) != 3 or any({"fail", "fail?"} & n["flags"] for n in view):
                return False
        replicas = [n for n in self.cluster if await synced_replica(n)]
        return len(replicas) == 3

    async def _slot(self, zone: str) -> int:
        """The slot of every key of ``zone`` (they carry it as hash tag, docs/cluster.md)."""
        viewer = next(node for node in self.cluster if node.running)
        return int(await command(viewer, "CLUSTER", "KEYSLOT", f"pricehub:{{{zone}}}:seq"))

    async def _owner(self, slot: int, *, excluding: RedisNode | None = None) -> RedisNode | None:
        """The running master serving ``slot``, as the first answering node sees it."""
        for viewer in self.cluster:
            if viewer is excluding or not viewer.running:
                continue
            view = await self._view(viewer)
            if not view:
                continue  # stopped, or not up yet: ask the next one
            for entry in view:
                if (
                    "master" in entry["flags"] and not {"fail", "fail?"} & entry["flags"]
                    and any(a <= slot <= b for a, b in entry["slots"])
                ):  # fmt: skip
                    return self._by_port(entry["port"])
            return None
        return None

    async def _replica(self, master: RedisNode) -> RedisNode:
        master_id = await self._node_id(master)
        for entry in await self._view(master):
            if entry["master"] == master_id:
                return self._by_port(entry["port"])
        raise HarnessError(f"{master.name} has no replica")

    def _by_port(self, port: int) -> RedisNode:
        return next(node for node in self.cluster if node.port == port)

    async def _node_id(self, node: RedisNode) -> str:
        answer = await query(node.port, "CLUSTER", "MYID")
        if not answer:
            raise HarnessError(f"{node.name} does not answer CLUSTER MYID")
        return str(answer)

    # --- faults -----------------------------------------------------------------------

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        zone = ZONES[plan.target]
        slot = await self._slot(zone)
        master = await self._owner(slot)
        if master is None:
            raise HarnessError(f"no master serves slot {slot} ({zone})")
        fault.notes.update(zone=zone, slot=slot, node=master.name)
        if plan.kind == "slot_migration":
            await self._migrate(slot, master, plan.hold, fault)
            return
        if plan.kind == "master_kill":
            await kill_lagging(master, await self._replica(master), plan, fault, rig)
        else:
            master.signal(signal.SIGSTOP)
        await poll(f"slot {slot} served by {master.name}'s replica",
                   lambda: self._taken_over(slot, master), READY)  # fmt: skip
        fault.notes["outage"] = round(time.time() - fault.start, 2)
        if plan.kind == "master_kill":
            await asyncio.sleep(plan.hold)
            await master.start()  # rejoins from nodes.conf as the new master's replica
        else:  # stopped for `hold` s in all, and past the takeover
            await asyncio.sleep(max(NOTICE, fault.start + plan.hold - time.time()))
            master.signal(signal.SIGCONT)
        await poll("the cluster healthy again", self._healthy, READY)
        if plan.kind == "master_pause":
            fault.losses.append(time.time())  # demoted by now: its last writes went with it

    async def _taken_over(self, slot: int, old: RedisNode) -> bool:
        owner = await self._owner(slot, excluding=old)
        if owner is None or owner is old:
            return False
        state = await query(owner.port, "CLUSTER", "INFO")
        return isinstance(state, str) and "cluster_state:ok" in state

    async def _migrate(self, slot: int, source: RedisNode, hold: float, fault: Fault) -> None:
        """``redis-cli --cluster reshard``'s steps for one slot, held open ``hold`` s while
        the publisher writes to it."""
        view = await self._view(source)
        masters = [
            self._by_port(n["port"]) for n in view
            if "master" in n["flags"] and n["slots"] and n["port"] != source.port
        ]  # fmt: skip
        target = masters[fault.plan.target % len(masters)]
        source_id, target_id = await self._node_id(source), await self._node_id(target)
        fault.notes["to"] = target.name
        await command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        await asyncio.sleep(hold)
        moved = 0
        while keys := await command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            await command(source, "MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        fault.notes["keys_moved"] = moved
        for node in [target, source, *(m for m in masters if m is not target)]:
            await command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await poll(f"every node sees slot {slot} on {target.name}",
                   lambda: self._everyone_sees(slot, target), READY)  # fmt: skip

    async def _everyone_sees(self, slot: int, owner: RedisNode) -> bool:
        for viewer in self.cluster:
            view = await self._view(viewer)
            served = [n["port"] for n in view if any(a <= slot <= b for a, b in n["slots"])]
            if served != [owner.port]:
                return False
        return True


async def kill_lagging(
    master: RedisNode, replica: RedisNode, plan: FaultPlan, fault: Fault, rig: Rig
) -> None:
    """Stop ``replica`` and cut its link, wait ``LAG`` s, burst, SIGKILL ``master``, let
    ``replica`` go on (SIGSTOP alone is no lag: the writes wait in its socket)."""
    fault.notes["lagging_replica"] = replica.name
    replica.signal(signal.SIGSTOP)
    try:
        await command(master, "CLIENT", "KILL", "TYPE", "replica")
        await asyncio.sleep(LAG)
        await rig.trigger(plan, fault)
        fault.losses.append(time.time())
        await master.kill()
    finally:
        replica.signal(signal.SIGCONT)


async def command(node: RedisNode, *args: str | int) -> Any:
    """A command the fault cannot do without: its error is the harness's."""
    return await query(node.port, *args, timeout=5.0, strict=True)


def parse_node_line(line: str) -> dict[str, Any]:
    """One CLUSTER NODES line: ``id ip:port@bus flags master ping pong epoch link slots...``
    (slots being imported or migrated, ``[...]``, are left out)."""
    fields = line.split()
    slots: list[tuple[int, int]] = []
    for item in fields[8:]:
        if not item.startswith("["):
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
    return {
        "id": fields[0],
        "port": int(fields[1].split("@")[0].rpartition(":")[2]),
        "flags": set(fields[2].split(",")),
        "master": fields[3],
        "slots": slots,
    }
