"""The failover's modes and the moves between them (issue 27): one enum and one table,
checked, instead of a string mode plus a ``quiet`` flag read in a dozen places.

Pure: no I/O, no asyncio; ``FailoverStorage`` owns one ``ModeMachine`` and does what each
mode means (see ``failover.py``'s module docstring). The moves::

    MEMORY  -> REDIS   Redis reachable and reconciled (at start, or after an outage)
            -> MEMORY  at start: Redis unreachable, a lone instance
            -> HOLD    at start: Redis unreachable, peers
    REDIS   -> MEMORY  an error, a timeout, a silent subscriber: a lone instance
            -> HOLD    the same with peers
            -> RESYNC  the epoch moved (a peer declared a divergence, Redis lost its data)
    HOLD    -> REDIS   reconciled
    RESYNC  -> REDIS   reconciled under Redis's epoch
            -> MEMORY  Redis turned out gone after all: an outage (alone)
            -> HOLD    the same with peers
"""

from __future__ import annotations

import enum

from pricehub.wire.codes import Backend

__all__ = ["InvalidTransition", "Mode", "ModeMachine"]


class Mode(enum.Enum):
    """Where an append goes, and what clients are told."""

    REDIS = "redis"  # Redis numbers; the mirror follows its stream
    MEMORY = "memory"  # Redis away, a lone instance: memory numbers (journaled)
    HOLD = "hold"  # Redis away, peers may exist: appends wait, then 503 (``--redis-hold``)
    RESYNC = "resync"  # the epoch moved: appends wait quietly while this reconnects

    @property
    def backend(self) -> Backend:
        """The backend clients are told of: a resync is no outage, so it stays Redis."""
        return Backend.REDIS if self in (Mode.REDIS, Mode.RESYNC) else Backend.IN_MEMORY

    @property
    def holding(self) -> bool:
        """Whether appends wait for Redis rather than being numbered now."""
        return self in (Mode.HOLD, Mode.RESYNC)


# Every move there is. MEMORY -> HOLD only at start (unreachable, with peers); HOLD never
# goes to MEMORY: a hold window that ends refuses appends (503) but numbering alone would
# risk the split brain the hold exists to prevent.
_MOVES: dict[Mode, frozenset[Mode]] = {
    Mode.MEMORY: frozenset({Mode.MEMORY, Mode.HOLD, Mode.REDIS}),
    Mode.HOLD: frozenset({Mode.REDIS}),
    Mode.REDIS: frozenset({Mode.MEMORY, Mode.HOLD, Mode.RESYNC}),
    Mode.RESYNC: frozenset({Mode.REDIS, Mode.MEMORY, Mode.HOLD}),
}


class InvalidTransition(RuntimeError):
    """A move the table does not allow: a bug in the failover, never an operating state."""


class ModeMachine:
    """The current mode, moved only along ``_MOVES``. Starts in ``MEMORY`` (nothing
    connected yet): ``start`` then moves to ``REDIS`` or to the outage mode."""

    def __init__(self) -> None:
        self._mode = Mode.MEMORY

    @property
    def mode(self) -> Mode:
        return self._mode

    def allows(self, target: Mode) -> bool:
        return target in _MOVES[self._mode]

    def move(self, target: Mode) -> Mode:
        """Move to ``target``; the mode before it.

        :raises InvalidTransition: the table has no such move.
        """
        if not self.allows(target):
            raise InvalidTransition(f"failover cannot go from {self._mode.name} to {target.name}")
        previous, self._mode = self._mode, target
        return previous
