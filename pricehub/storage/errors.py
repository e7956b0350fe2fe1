"""Storage failures: what every backend raises, and what failover reacts to."""

from __future__ import annotations

from collections.abc import Sequence

from pricehub.storage.base import StoredPrice
from pricehub.wire.errors import PriceHubError

__all__ = [
    "BatchInterrupted","StorageError", "StorageHeld", "StorageUnavailable"]


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


class BatchInterrupted(StorageUnavailable):
    """Part of a batch was kept (``accepted``: its stored prices, in order) before
    ``cause`` refused the rest: a publisher must learn which prices have a seq."""

    def __init__(self, accepted: Sequence[StoredPrice], cause: StorageUnavailable) -> None:
        super().__init__(str(cause))
        self.accepted = list(accepted)
        self.cause = cause
        self.retry_after: float = getattr(cause, "retry_after", 1.0)
