"""Storage failures: what every backend raises, and what failover reacts to."""

from __future__ import annotations

from pricehub.wire.errors import PriceHubError

__all__ = ["StorageError", "StorageHeld", "StorageUnavailable"]


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
