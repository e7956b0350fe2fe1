"""Storage failures: what every backend raises, and what failover reacts to; and the
configuration error, which the storage raises too (a Redis URL that cannot be parsed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pricehub.storage.base import StoredPrice
from pricehub.wire.errors import PriceHubError

__all__ = [
    "BatchInterrupted", "ConfigError", "DiskError", "JournalLocked", "JournalUnavailable",
    "LeaseLost", "OlderEntryPending", "StorageError", "StorageHeld", "StorageUnavailable",
    "ZoneRefused",
]


class ConfigError(PriceHubError):
    """A setting is missing, malformed or inconsistent; the message names the setting.

    Defined here, in the lowest layer that raises one, so that the storage needs nothing
    of the server; ``pricehub.server.errors`` re-exports it for the settings and the CLI.
    """


class StorageError(PriceHubError):
    """A storage backend failed an operation."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (connection refused, timeout, ...)."""


class StorageHeld(StorageUnavailable):
    """A write was held while Redis was away (this instance has peers, so it must not
    number alone) and Redis did not come back in time: nothing was written; try again
    after ``retry_after`` seconds (HTTP publish answers 503 with ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DiskError(StorageUnavailable):
    """A journal write or fsync failed (disk full, I/O error): the batch is not durable."""


class JournalUnavailable(StorageUnavailable):
    """The data directory cannot be used (not creatable, not writable, unreadable)."""


class JournalLocked(JournalUnavailable):
    """Another process holds the data directory's lock; the message names it."""

    def __init__(self, directory: Path, pid: int | None, host: str | None) -> None:
        holder = f"pid {pid}" if pid is not None else "an unknown pid"
        if host:
            holder += f" on {host}"
        super().__init__(f"data dir {directory} is in use by another process ({holder})")
        self.pid = pid
        self.host = host


class LeaseLost(StorageError):
    """The ingest lease passed to another instance; this one must stop consuming.

    Raised by the Redis backends' append scripts and by the ingest consumer itself
    (``server/ingest.py``), which therefore finds it here, not in ``storage/redis/``."""


class OlderEntryPending(LeaseLost):
    """An ingest append was refused because an older stream entry is still pending: it
    would overtake it. As for a lost lease, the consumer stops, nothing was written, and
    it starts over from the pending entries (oldest first) once it holds the lease."""


class ZoneRefused(StorageError):
    """Redis refused one zone's append because of that zone's own keys (a seq that is no
    integer, a history that is no sorted set: damaged by hand or by another program),
    with nothing written. The price fails, not the backend: no failover, no retry (it
    would be refused again until an operator repairs the key); other zones go on."""

    def __init__(self, zone: str, reason: str) -> None:
        super().__init__(
            f"zone {zone}: Redis refused its append ({reason}); its keys need repair, "
            "other zones are unaffected"
        )
        self.zone = zone
        self.reason = reason
        self.retry_after = 1.0


class BatchInterrupted(StorageUnavailable):
    """Part of a batch was kept (``accepted``: its stored prices, in order) before
    ``cause`` refused the rest: a publisher must learn which prices have a seq. When
    ``cause`` is a ``ZoneRefused``, only that zone's prices were refused: ``accepted``
    may hold prices that came after them in the batch."""

    def __init__(self, accepted: Sequence[StoredPrice], cause: StorageError) -> None:
        super().__init__(str(cause))
        self.accepted = list(accepted)
        self.cause = cause
        self.retry_after: float = getattr(cause, "retry_after", 1.0)

    @classmethod
    def of_refused_zones(
        cls, results: Sequence[StoredPrice | None], errors: Sequence[BaseException | None]
    ) -> BatchInterrupted | None:
        """A batch whose only failures (``errors``) are zones refusing their prices
        (``ZoneRefused``): what was kept (``results``, None where refused) with the first
        refusal as cause. None when ``errors`` is empty or holds anything else: that is
        the storage's failure, not a zone's."""
        refusals = [error for error in errors if isinstance(error, ZoneRefused)]
        if not errors or len(refusals) < len(errors):
            return None
        return cls([price for price in results if price is not None], refusals[0])
