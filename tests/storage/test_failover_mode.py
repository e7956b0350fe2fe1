"""The failover's mode table (``storage/failover_mode.py``), without sockets: every move
the failover makes is allowed, every other one refused, and each mode says what clients
are told and whether appends wait."""

from __future__ import annotations

import itertools

import pytest

from pricehub.storage.failover_mode import InvalidTransition, Mode, ModeMachine
from pricehub.wire.codes import Backend

# The moves of failover.py's docstring (start, outage, resync, recovery), and no other.
ALLOWED = {
    (Mode.MEMORY, Mode.REDIS), (Mode.MEMORY, Mode.MEMORY), (Mode.MEMORY, Mode.HOLD),
    (Mode.REDIS, Mode.MEMORY), (Mode.REDIS, Mode.HOLD), (Mode.REDIS, Mode.RESYNC),
    (Mode.HOLD, Mode.REDIS),
    (Mode.RESYNC, Mode.REDIS), (Mode.RESYNC, Mode.MEMORY), (Mode.RESYNC, Mode.HOLD),
}  # fmt: skip


def machine_in(mode: Mode) -> ModeMachine:
    """A machine brought to ``mode`` along allowed moves only."""
    machine = ModeMachine()
    path = {Mode.MEMORY: [], Mode.REDIS: [Mode.REDIS], Mode.HOLD: [Mode.HOLD],
            Mode.RESYNC: [Mode.REDIS, Mode.RESYNC]}[mode]  # fmt: skip
    for step in path:
        machine.move(step)
    assert machine.mode is mode
    return machine


def test_a_machine_starts_in_memory_serving_nothing_from_redis_yet() -> None:
    machine = ModeMachine()
    assert machine.mode is Mode.MEMORY and machine.mode.backend is Backend.IN_MEMORY


@pytest.mark.parametrize(("source", "target"), list(itertools.product(Mode, Mode)))
def test_only_the_tables_moves_are_made(source: Mode, target: Mode) -> None:
    machine = machine_in(source)
    if (source, target) in ALLOWED:
        assert machine.allows(target) and machine.move(target) is source
        assert machine.mode is target
    else:
        assert not machine.allows(target)
        with pytest.raises(InvalidTransition, match=f"from {source.name} to {target.name}"):
            machine.move(target)
        assert machine.mode is source  # a refused move changes nothing


def test_a_hold_never_turns_into_numbering_alone() -> None:
    """The split brain the hold prevents: a peer's window ending refuses appends (503)
    but never lets this instance number in memory."""
    assert not machine_in(Mode.HOLD).allows(Mode.MEMORY)


@pytest.mark.parametrize(
    ("mode", "backend", "holding"),
    [
        (Mode.REDIS, Backend.REDIS, False),
        (Mode.MEMORY, Backend.IN_MEMORY, False),
        (Mode.HOLD, Backend.IN_MEMORY, True),
        (Mode.RESYNC, Backend.REDIS, True),  # a resync is no outage: clients are not told
    ],
)
def test_each_mode_says_its_backend_and_whether_appends_wait(
    mode: Mode, backend: Backend, holding: bool
) -> None:
    assert (mode.backend, mode.holding) == (backend, holding)
