"""Storage failures: what every backend raises, and what failover reacts to."""

from __future__ import annotations

from pricehub.wire.errors import PriceHubError

__all__ = ["StorageError", "StorageUnavailable"]


class StorageError(PriceHubError):
    """A storage backend failed an operation."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (connection refused, timeout, ...)."""
