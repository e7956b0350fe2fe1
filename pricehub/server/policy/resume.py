"""Seq and resume bookkeeping for one zone on one connection (sans-I/O).

A zone on a socket is first *syncing*: the client is already subscribed, so live
updates arriving meanwhile are held here while the initial state or the replay is
read from storage. ``finish`` then releases the held updates that are newer than what
the replay delivered, so the client sees every seq once, in order, with no gap between
replay and live (the "subscribe first, read second, de-duplicate by seq" pattern).

A replay is sent only as fast as the client reads it, so it may take long, and the hold
is bounded (``HELD_LIMIT``): when it is full the *oldest* held update is dropped. Those
are still in storage, so the replay reads on from where it got to (``missing_after``
says when it must) until it meets the hold: "resume later" semantics, never a gap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pricehub.storage.base import StoredPrice

__all__ = ["HELD_LIMIT", "ResumeOutcome", "ZoneStream", "plan_resume"]

# Live updates held per syncing zone. A held update is a reference to the price object
# every subscriber shares, so this costs ~8 bytes each; the dropped ones are re-read
# from storage by the replay, which is why dropping the oldest is safe.
HELD_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What a resume attempt turned into: ``recovered`` (the session replays what storage
    retained; ``resume_complete`` ends where the replay did), or not (a ``gap``); either way
    ``resume_complete`` starts at ``from_seq``."""

    recovered: bool
    from_seq: int


def plan_resume(
    *, since: int, client_epoch: str | None, epoch: str, retained: list[StoredPrice] | None
) -> ResumeOutcome:
    """Decide a resume from the storage's answer to ``since(zone, since)``.

    A client without an epoch is trusted to be in the current lineage; one with another
    epoch numbered against a history that no longer exists, so nothing can be replayed.
    """
    lineage_kept = client_epoch is None or client_epoch == epoch
    return ResumeOutcome(retained is not None and lineage_kept, since + 1)


class ZoneStream:
    """Where one connection is in one zone's seq order."""

    __slots__ = ("held", "last_seq", "syncing", "zone")

    def __init__(self, zone: str, *, held_limit: int = HELD_LIMIT) -> None:
        self.zone = zone
        self.last_seq = 0
        self.syncing = True
        # Live updates that arrived while syncing, newest ``held_limit`` only (the oldest
        # is dropped when full: see ``missing_after``).
        self.held: deque[StoredPrice] = deque(maxlen=held_limit)

    def accept(self, seq: int) -> bool:
        """True if ``seq`` is new for this client (at-most-once, in order)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def missing_after(self, seq: int) -> bool:
        """True when the held updates do not follow on from ``seq``: the hold overflowed
        (its oldest were dropped), so what lies between must be read from storage before
        the hold can be released."""
        return bool(self.held) and self.held[0].seq > seq + 1

    def finish(self, *, delivered_up_to: int) -> list[StoredPrice]:
        """End syncing: the held prices newer than ``delivered_up_to``, in seq order."""
        self.last_seq = max(self.last_seq, delivered_up_to)
        fresh = [price for price in self.held if self.accept(price.seq)]
        self.held.clear()
        self.syncing = False
        return fresh
