"""The chaos soak's faults: a seeded schedule and the code that injects each kind.

Faults never overlap: each one is injected after a quiet gap, held, undone, and the next one
waits for its own gap. A fault's window runs from the signal to the moment the process answers
again (or, for a pause, to SIGCONT); the analysis also charges it the 5 s after that.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bench.chaos_procs import Instance, RedisServer

__all__ = ["KINDS", "Fault", "FaultPlan", "inject", "plan_faults"]

KINDS = (
    "redis_kill",  # SIGKILL, restart empty on the same port after `hold` s
    "redis_pause_short",  # SIGSTOP for `hold` < 2 s, then SIGCONT
    "redis_pause_long",  # SIGSTOP for longer, then SIGCONT
    "instance_term",  # SIGTERM (graceful: 1001 to its clients), restart after `hold` s
    "instance_kill",  # SIGKILL (sockets just drop), restart after `hold` s
)
# (short run, full run): seconds each kind is held
HOLDS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "redis_kill": ((1.5, 3.0), (2.0, 6.0)),
    "redis_pause_short": ((0.6, 1.8), (0.6, 1.8)),
    "redis_pause_long": ((3.0, 4.5), (4.0, 10.0)),
    "instance_term": ((0.3, 1.5), (0.3, 3.0)),
    "instance_kill": ((0.3, 1.5), (0.3, 3.0)),
}
GAPS = ((2.0, 3.0), (3.0, 8.0))  # quiet seconds before each fault (short, full)
RESTART_ESTIMATE = 2.0  # planning only: a restart and a recovery take about this long


@dataclass(frozen=True, slots=True)
class FaultPlan:
    kind: str
    target: int  # instance faults: the preferred instance on a tie (see ``inject``); Redis: 0
    gap: float
    hold: float


@dataclass
class Fault:
    """A fault as it happened, times in seconds since the epoch (``time.time()``)."""

    plan: FaultPlan
    start: float = 0.0
    end: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, origin: float) -> dict[str, Any]:
        return {
            "kind": self.plan.kind, "target": self.plan.target, "hold": round(self.plan.hold, 2),
            "start": round(self.start - origin, 2),
            "end": None if self.end is None else round(self.end - origin, 2),
            **self.notes,
        }  # fmt: skip


def plan_faults(
    rng: random.Random, *, short: bool, budget: float, instances: int
) -> list[FaultPlan]:
    """Short: each kind once, shuffled. Full: each kind once, then random kinds until the
    planned time (gaps, holds, restarts) fills ``budget`` seconds."""
    mode = 0 if short else 1
    kinds = list(KINDS)
    rng.shuffle(kinds)
    plans: list[FaultPlan] = []
    used = 0.0
    while True:
        kind = kinds[len(plans)] if len(plans) < len(kinds) else rng.choice(KINDS)
        plan = FaultPlan(
            kind,
            rng.randrange(instances) if kind.startswith("instance") else 0,
            rng.uniform(*GAPS[mode]),
            rng.uniform(*HOLDS[kind][mode]),
        )
        cost = plan.gap + plan.hold + RESTART_ESTIMATE
        if short and len(plans) == len(kinds):
            return plans
        if not short and used + cost > budget:
            return plans
        plans.append(plan)
        used += cost


def busiest(plan: FaultPlan, load: Sequence[int]) -> FaultPlan:
    """An instance fault hits the instance carrying the most clients (the planned one on a
    tie): clients that fled a stopped instance stay where they landed, so a fixed target
    could hit an instance nobody is connected to."""
    if not plan.kind.startswith("instance"):
        return plan
    target = max(range(len(load)), key=lambda i: (load[i], i == plan.target))
    return replace(plan, target=target)


async def inject(
    plan: FaultPlan, redis: RedisServer, instances: Sequence[Instance], load: Sequence[int]
) -> Fault:
    """Inject one fault, hold it, undo it; returns what happened when. ``load``: clients
    connected to each instance right now."""
    plan = busiest(plan, load)
    fault = Fault(plan, start=time.time())
    if plan.kind.startswith("instance"):
        fault.notes["clients_on_target"] = load[plan.target]
    if plan.kind == "redis_kill":
        redis.signal(signal.SIGKILL)
        await redis.wait_exit()
        await asyncio.sleep(plan.hold)
        await redis.start()
    elif plan.kind.startswith("redis_pause"):
        redis.signal(signal.SIGSTOP)
        await asyncio.sleep(plan.hold)
        redis.signal(signal.SIGCONT)
    else:
        instance = instances[plan.target]
        instance.signal(signal.SIGTERM if plan.kind == "instance_term" else signal.SIGKILL)
        fault.notes["exit_code"] = await instance.wait_exit()
        fault.notes["exit_after"] = round(time.time() - fault.start, 2)
        await asyncio.sleep(plan.hold)
        await instance.start()
    fault.end = time.time()
    return fault
