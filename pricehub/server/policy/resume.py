"""Seq and resume bookkeeping for one zone on one connection (sans-I/O).

A zone on a socket is first *syncing*: the client is already subscribed, so live
updates arriving meanwhile are held here while the initial state or the replay is
read from storage. ``finish`` then releases the held updates that are newer than what
the replay delivered, so the client sees every seq once, in order, with no gap between
replay and live (the "subscribe first, read second, de-duplicate by seq" pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

from pricehub.storage.base import StoredPrice

__all__ = ["ResumeOutcome", "ZoneStream", "plan_resume"]


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What a resume attempt turned into: replay these prices, or report a gap."""

    recovered: bool
    replay: tuple[StoredPrice, ...]
    from_seq: int
    to_seq: int


def plan_resume(
    *, since: int, client_epoch: str | None, epoch: str, retained: list[StoredPrice] | None
) -> ResumeOutcome:
    """Decide a resume from the storage's answer to ``since(zone, since)``.

    A client without an epoch is trusted to be in the current lineage; one with another
    epoch numbered against a history that no longer exists, so nothing can be replayed.
    """
    if retained is None or (client_epoch is not None and client_epoch != epoch):
        return ResumeOutcome(False, (), since + 1, since)
    to_seq = retained[-1].seq if retained else since
    return ResumeOutcome(True, tuple(retained), since + 1, to_seq)


class ZoneStream:
    """Where one connection is in one zone's seq order."""

    __slots__ = ("held", "last_seq", "syncing", "zone")

    def __init__(self, zone: str) -> None:
        self.zone = zone
        self.last_seq = 0
        self.syncing = True
        # Bounded by what can be published during one storage read; see ``finish``.
        self.held: list[StoredPrice] = []

    def accept(self, seq: int) -> bool:
        """True if ``seq`` is new for this client (at-most-once, in order)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def finish(self, *, delivered_up_to: int) -> list[StoredPrice]:
        """End syncing: the held prices newer than ``delivered_up_to``, in seq order."""
        self.last_seq = max(self.last_seq, delivered_up_to)
        fresh = [price for price in self.held if self.accept(price.seq)]
        self.held = []
        self.syncing = False
        return fresh
