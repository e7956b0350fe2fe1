"""The chaos soak's faults: every kind, a seeded schedule, and the injection of instance faults
(faults of the storage go to the topology's backend, ``bench/chaos_topology.py``).

Faults never overlap: each one is injected after a quiet gap, held, undone, and the next one
waits for its own gap. A fault's window runs from the signal to the moment everything answers
again (or, for a pause, to SIGCONT and what follows from it); the analysis also charges it the
5 s after that. A burst kind first starts a burst of POSTs (48 in 50 ms) and fires in the
middle of it, so the fault meets prices at every stage, their replies in flight among them
(the race that can acknowledge a price the storage then loses).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bench.chaos_procs import Instance
from bench.chaos_publisher import Publisher

__all__ = [
    "HOLD", "KINDS", "ROUNDS", "Fault", "FaultPlan", "Kind", "Rig", "inject", "plan_faults",
    "restart_instance",
]  # fmt: skip

HOLD = 5.0  # the instances' --redis-hold (its default): shorter outages must cost no reset
BURST = 48  # POSTs of one burst (the publisher's in-flight bound, 64, still holds) ...
BURST_SPREAD = 0.05  # ... paced over this many seconds ...
BURST_FIRE = (0.01, 0.045)  # ... and the fault fires this long after its first (seeded)
ROUNDS = 3  # rounds of a kind that repeats (a race is likelier hit in three tries)


@dataclass(frozen=True, slots=True)
class Kind:
    """One fault kind. ``holds``: (short run, full run) range of its hold, in seconds."""

    what: str
    holds: tuple[tuple[float, float], tuple[float, float]]
    burst: bool = False  # fired right after a burst of POSTs, their replies in flight
    stops_instances: bool = False  # clients are cut off by the fault itself
    replication: bool = False  # a master replaced: async replication may lose what it acked
    choices: int = 1  # targets to choose from (instances are counted at run time)
    rounds: int = 1  # how many times it is done (and held) in a row


KINDS: dict[str, Kind] = {
    "redis_kill": Kind(
        "SIGKILL Redis, restart it empty on its port after `hold` s",
        ((1.5, 3.0), (2.0, 6.0)),
    ),
    "redis_kill_burst": Kind(
        f"{ROUNDS} times: a burst of POSTs, SIGKILL Redis while their replies are in flight, "
        "restart it empty after `hold` s",
        ((0.5, 1.5), (0.5, 3.0)), burst=True, rounds=ROUNDS,
    ),
    "redis_pause_short": Kind("SIGSTOP Redis for `hold` s < 2 s, then SIGCONT",
                              ((0.6, 1.8), (0.6, 1.8))),
    "redis_pause_long": Kind("SIGSTOP Redis for `hold` s, then SIGCONT",
                             ((3.0, 4.5), (4.0, 10.0))),
    "outage_restarts": Kind(
        "SIGKILL Redis; while it is down SIGKILL every instance and restart it on its own "
        "data dir; Redis comes back (empty) `hold` s after they answer",
        ((1.5, 2.5), (1.5, 4.0)), stops_instances=True,
    ),
    "instance_term": Kind("SIGTERM the busiest instance, restart it after `hold` s",
                          ((0.3, 1.5), (0.3, 3.0)), stops_instances=True),
    "instance_kill": Kind("SIGKILL the busiest instance, restart it after `hold` s",
                          ((0.3, 1.5), (0.3, 3.0)), stops_instances=True),
    "master_kill": Kind(
        "SIGSTOP the replica 0.8 s (a replication lag), burst, SIGKILL the master (of a "
        "zone's slot), SIGCONT the replica; once it is promoted, restart the old master "
        "after `hold` s as its replica",
        ((0.3, 1.0), (0.5, 3.0)), burst=True, replication=True, choices=3,
    ),
    "master_pause": Kind(
        "SIGSTOP the master (of a zone's slot) for `hold` s, past failure detection (its "
        "replica is promoted meanwhile; on a cluster, at least until it is), then SIGCONT: "
        "it comes back as a replica",
        ((3.5, 4.5), (3.5, 6.0)), replication=True, choices=3,
    ),
    "sentinel_kill": Kind("SIGKILL a sentinel, restart it after `hold` s",
                          ((1.0, 3.0), (1.0, 5.0)), choices=3),
    "slot_migration": Kind(
        "move a zone's slot to another master under load: SETSLOT IMPORTING/MIGRATING, "
        "`hold` s, MIGRATE its keys, SETSLOT NODE on every master",
        ((1.0, 2.0), (1.0, 4.0)), choices=3,
    ),
    "restart_loop": Kind(
        f"{ROUNDS} times: a burst, SIGKILL the instance while its replies are in flight, "
        "restart it after `hold` s",
        ((0.3, 1.0), (0.3, 2.0)), burst=True, stops_instances=True, rounds=ROUNDS,
    ),
    "disk_full": Kind("fill the tmpfs holding the data dir for `hold` s, then free it",
                      ((1.5, 3.0), (1.5, 5.0))),
}  # fmt: skip
INSTANCE_KINDS = ("instance_term", "instance_kill", "restart_loop")
GAPS = ((2.0, 3.0), (3.0, 8.0))  # quiet seconds before each fault (short, full)
RESTART_ESTIMATE = 2.0  # planning only: a restart and a recovery take about this long


@dataclass(frozen=True, slots=True)
class FaultPlan:
    kind: str
    target: int  # instance faults: the preferred instance on a tie (see ``busiest``)
    gap: float
    hold: float


@dataclass
class Fault:
    """A fault as it happened, times in seconds since the epoch (``time.time()``).
    ``no_reset``: the contract promises its clients no reset (see ``inject``). ``losses``:
    when Redis may have lost data (a kill's signal, an old master's demotion): the stream
    entries added just before are Redis's to lose (``chaos_stream``)."""

    plan: FaultPlan
    start: float = 0.0
    end: float | None = None
    no_reset: bool = False
    losses: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return KINDS[self.plan.kind]

    def note(self, counts: dict[str, int]) -> None:
        """Add ``counts`` to the notes (summed over a fault's rounds)."""
        for key, value in counts.items():
            self.notes[key] = self.notes.get(key, 0) + value

    def as_dict(self, origin: float) -> dict[str, Any]:
        return {
            "kind": self.plan.kind, "target": self.plan.target, "hold": round(self.plan.hold, 2),
            "start": round(self.start - origin, 2),
            "end": None if self.end is None else round(self.end - origin, 2),
            "no_reset": self.no_reset,
            **self.notes,
        }  # fmt: skip


class Backend(Protocol):
    """The part of the topology that injects its own faults (``bench/chaos_topology.py``)."""

    async def inject(self, plan: FaultPlan, fault: Fault, rig: Rig) -> None: ...


@dataclass
class Rig:
    """What a fault can reach. ``restarts_recover``: an instance restart must resume every
    client with ``recovered: true`` (the durable store promises it; with Redis a client of
    a stopped instance may land anywhere)."""

    backend: Backend
    instances: Sequence[Instance]
    publisher: Publisher
    load: Callable[[], list[int]]
    rng: random.Random  # when a burst's fault fires
    restarts_recover: bool = False

    async def trigger(self, plan: FaultPlan, fault: Fault) -> None:
        """Right before a fault's signal: a burst, for a burst kind (else nothing)."""
        if KINDS[plan.kind].burst:
            fire = self.rng.uniform(*BURST_FIRE)
            fault.note(await self.publisher.burst(BURST, spread=BURST_SPREAD, fire=fire))


def plan_faults(
    rng: random.Random, kinds: Sequence[str], *, short: bool, budget: float, instances: int
) -> list[FaultPlan]:
    """Short: each of ``kinds`` once, shuffled. Full: each once, then random kinds until the
    planned time (gaps, holds, restarts) fills ``budget`` seconds."""
    mode = 0 if short else 1
    order = list(kinds)
    rng.shuffle(order)
    plans: list[FaultPlan] = []
    used = 0.0
    while True:
        kind = order[len(plans)] if len(plans) < len(order) else rng.choice(order)
        choices = instances if kind in INSTANCE_KINDS else KINDS[kind].choices
        plan = FaultPlan(
            kind, rng.randrange(choices), rng.uniform(*GAPS[mode]),
            rng.uniform(*KINDS[kind].holds[mode]),
        )  # fmt: skip
        cost = plan.gap + (plan.hold + RESTART_ESTIMATE) * KINDS[kind].rounds
        if short and len(plans) == len(order):
            return plans
        if not short and used + cost > budget:
            return plans
        plans.append(plan)
        used += cost


def busiest(plan: FaultPlan, load: Sequence[int]) -> FaultPlan:
    """An instance fault hits the instance carrying the most clients (the planned one on a
    tie): clients that fled a stopped instance stay where they landed, so a fixed target
    could hit an instance nobody is connected to."""
    if plan.kind not in INSTANCE_KINDS:
        return plan
    target = max(range(len(load)), key=lambda i: (load[i], i == plan.target))
    return replace(plan, target=target)


async def restart_instance(
    instance: Instance, signum: signal.Signals, hold: float, fault: Fault
) -> None:
    """Signal, wait for the exit (bounded), wait ``hold`` s, start again on its port."""
    started = time.time()
    instance.signal(signum)
    fault.notes.setdefault("exit_codes", []).append(await instance.wait_exit())
    fault.notes["exit_after"] = round(time.time() - started, 2)
    await asyncio.sleep(hold)
    await instance.start()


async def _instance_fault(plan: FaultPlan, fault: Fault, rig: Rig) -> None:
    instance = rig.instances[plan.target]
    if plan.kind == "instance_term":
        await restart_instance(instance, signal.SIGTERM, plan.hold, fault)
        return
    for _ in range(fault.kind.rounds):
        await rig.trigger(plan, fault)
        await restart_instance(instance, signal.SIGKILL, plan.hold, fault)


async def inject(plan: FaultPlan, rig: Rig) -> Fault:
    """Inject one fault, hold it, undo it; returns what happened when. A fault promises
    its clients no reset (``no_reset``) when it stops no instance and its outage (the
    ``outage`` note, else the whole fault) is shorter than ``HOLD``, or when it restarts
    an instance whose restarts must recover (``Rig.restarts_recover``)."""
    plan = busiest(plan, rig.load())
    fault = Fault(plan, start=time.time())
    if plan.kind in INSTANCE_KINDS:
        fault.notes["clients_on_target"] = rig.load()[plan.target]
        await _instance_fault(plan, fault, rig)
    else:
        await rig.backend.inject(plan, fault, rig)
    fault.end = time.time()
    outage = fault.notes.get("outage", fault.end - fault.start)
    if fault.kind.stops_instances:
        fault.no_reset = rig.restarts_recover
    else:
        fault.no_reset = "skipped" not in fault.notes and outage < HOLD
    return fault
