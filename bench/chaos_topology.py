"""What the chaos soak's instances store in, per ``--topology``, and the faults that hit it.

``single``   one ``redis-server``, two instances (faults: Redis SIGKILL, also right after a
             burst, SIGSTOP short and long, and every instance restarted during one outage);
``sentinel`` a master, a replica and three sentinels, two instances on ``redis+sentinel://``
             (``bench/chaos_replicated.py``);
``cluster``  three masters and three replicas, two instances on ``redis+cluster://``
             (``bench/chaos_replicated.py``);
``durable``  no Redis: one instance on its data dir (``--redis-url none``), on a tmpfs the soak
             mounts so that the disk can fill up.

Every instance journals in its own data dir (``<root>/instance-N.data``), as operators run them.
A backend's ``inject`` handles its own kinds; instance faults are ``bench/chaos_faults.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.chaos_faults import Fault, FaultPlan, Rig, restart_instance
from bench.chaos_procs import RedisNode
from bench.chaos_stream import Connect, node_client

__all__ = ["TMPFS", "Backend", "NoRedis", "SingleRedis", "Topology", "unmount"]

TMPFS = "tmpfs"  # the durable run's mount point, under its work dir
NOTICE = 0.5  # s: an outage the instances have seen before the next step of a fault
TMPFS_SIZE = "16m"  # the durable data dir's disk: a few MB of journal, room to fill fast
FILL_CHUNK = 1 << 20


class Backend:
    """Where the instances keep the feed. ``kinds``: the faults ``inject`` knows."""

    kinds: tuple[str, ...] = ()

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @property
    def url(self) -> str:
        """The instances' ``--redis-url``."""
        return "none"

    @property
    def nodes(self) -> list[RedisNode]:
        return []

    @property
    def data_root(self) -> Path:
        """Where the instances' data dirs go."""
        return self.workdir

    def stream(self) -> Connect | None:
        """How the stream producer reaches the ingest stream; None: there is none."""
        return None

    async def start(self) -> None:
        """Start the nodes; returns once they serve as the instances need."""

    async def shutdown(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.shutdown()

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        raise NotImplementedError(plan.kind)


class SingleRedis(Backend):
    """One ``redis-server`` without persistence."""

    kinds = ("redis_kill", "redis_kill_burst", "redis_pause_short", "redis_pause_long",
             "outage_restarts")  # fmt: skip

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.redis = RedisNode(workdir)

    @property
    def url(self) -> str:
        return self.redis.url

    @property
    def nodes(self) -> list[RedisNode]:
        return [self.redis]

    def stream(self) -> Connect:
        return functools.partial(node_client, self.redis.port)

    async def start(self) -> None:
        await self.redis.start()

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        if plan.kind.startswith("redis_pause"):
            self.redis.signal(signal.SIGSTOP)
            await asyncio.sleep(plan.hold)
            self.redis.signal(signal.SIGCONT)
            return
        outages = []
        for index in range(fault.kind.rounds):
            if index:
                await asyncio.sleep(2 * NOTICE)  # the instances are back on Redis
            started = time.time()
            await rig.trigger(plan, fault)
            fault.losses.append(time.time())
            await self.redis.kill()
            if plan.kind == "outage_restarts":
                await self._restart_instances(fault, rig)
            await asyncio.sleep(plan.hold)
            await self.redis.start()
            outages.append(time.time() - started)
        fault.notes["outage"] = round(max(outages), 2)  # each round is its own outage

    async def _restart_instances(self, fault: Fault, rig: Rig) -> None:
        """The known hole: instances restarted while Redis is down know no peer (the
        registry is in Redis) and may each continue their journal's lineage alone."""
        await asyncio.sleep(NOTICE)
        await asyncio.gather(
            *(restart_instance(i, signal.SIGKILL, 0.0, fault) for i in rig.instances)
        )
        fault.notes["restarted_after"] = round(time.time() - fault.start, 2)


class NoRedis(Backend):
    """No Redis: the durable embedded store. The data dirs go on a tmpfs mounted for the run
    (root only) so that ``disk_full`` can fill it; where it cannot be mounted, the data dirs
    stay on the run's disk and ``disk_full`` is skipped, saying why."""

    kinds = ("disk_full",)

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.mount = workdir / TMPFS
        self.unmountable: str | None = None  # why the tmpfs could not be mounted

    @property
    def data_root(self) -> Path:
        return self.workdir if self.unmountable else self.mount

    async def start(self) -> None:
        unmount(self.mount)  # a run killed before its own clean-up left it mounted
        self.mount.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.mount)]
        if shutil.which("mount") is None:
            self.unmountable = "no mount command"
            return
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode != 0:
            self.unmountable = f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"

    async def shutdown(self) -> None:
        unmount(self.mount)

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None:
        if self.unmountable:
            fault.notes["skipped"] = f"disk_full skipped: {self.unmountable} (needs root)"
            return
        filler = self.mount / "filler"
        fault.notes["filled_bytes"] = await asyncio.to_thread(fill, filler)
        await asyncio.sleep(plan.hold)
        filler.unlink()


def fill(path: Path) -> int:
    """Write to ``path`` until the disk is full; the bytes written."""
    written, size = 0, FILL_CHUNK
    with path.open("wb", buffering=0) as sink:
        while size:
            try:
                written += sink.write(bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2  # and fill the last pages too
    return written


def unmount(mount: Path) -> None:
    """Unmount ``mount`` if something is mounted there (lazily if it is still busy)."""
    if not os.path.ismount(mount):
        return
    for command in (["umount", str(mount)], ["umount", "-l", str(mount)]):
        if subprocess.run(command, capture_output=True, timeout=10, check=False).returncode == 0:
            return


@dataclass(frozen=True, slots=True)
class Topology:
    """One ``--topology``: its backend, how many instances, which instance faults."""

    backend: Callable[[Path, argparse.Namespace], Backend]
    instances: int
    instance_kinds: tuple[str, ...]

    def kinds(self, backend: Backend) -> tuple[str, ...]:
        return backend.kinds + self.instance_kinds
