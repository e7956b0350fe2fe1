"""Storage backends behind one Protocol, chosen from the Redis URL.

As in encode/broadcaster, the Redis driver is imported only in the branch that needs
it, so the embedded default (``--redis-url none``) never touches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pricehub.storage.base import Storage, StorageListener, StoredPrice
from pricehub.storage.memory import MemoryStorage

if TYPE_CHECKING:
    import structlog

    from pricehub.server.settings import Settings

__all__ = ["MemoryStorage", "Storage", "StorageListener", "StoredPrice", "create_storage"]


def create_storage(settings: Settings, *, log: structlog.typing.FilteringBoundLogger) -> Storage:
    """The backend for ``settings.redis_url``: memory for ``none`` (journaled in
    ``settings.data_dir`` unless that is none), else Redis with live failover to memory
    (which also covers "unreachable at start")."""
    if settings.redis_url is None:
        log.info(
            "storage_selected", backend="in-memory", reason="redis_url is none",
            data_dir=settings.data_dir,
        )  # fmt: skip
        if settings.data_dir is None:
            return MemoryStorage(history_size=settings.history_size)
        from pricehub.storage.durable import DurableStorage

        return DurableStorage(
            settings.data_dir, history_size=settings.history_size, zones=settings.zones
        )
    from pricehub.storage.failover import FailoverStorage

    return FailoverStorage.from_settings(settings, log=log)
