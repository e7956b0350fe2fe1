"""Storage backends behind one Protocol, chosen from the Redis URL.

This package is the server's way in: it re-exports what the server uses, so that the
server imports nothing else of the storage but ``storage.base`` (the Protocol and its
typed reports) and ``storage.errors``. The storage imports nothing of the server: it is
built from a ``StorageConfig`` the server fills from its settings.

As in encode/broadcaster, the Redis driver is imported only in the branch that needs
it, so the embedded default (``--redis-url none``) never touches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pricehub.storage.base import (
    DiskState,
    DiskStatus,
    ForeignJournal,
    HistorySlice,
    JournalStats,
    Snapshot,
    Storage,
    StorageConfig,
    StorageCounters,
    StorageListener,
    StoredPrice,
)
from pricehub.storage.memory import MemoryStorage
from pricehub.wire.codes import Backend

if TYPE_CHECKING:
    import structlog

__all__ = [
    "DiskState", "DiskStatus", "ForeignJournal", "HistorySlice", "JournalStats",
    "MemoryStorage", "Snapshot", "Storage", "StorageConfig", "StorageCounters",
    "StorageListener", "StoredPrice", "create_storage", "redis_problem",
]


def create_storage(config: StorageConfig, *, log: structlog.typing.FilteringBoundLogger) -> Storage:
    """The backend for ``config.redis_url``: memory for None (journaled in
    ``config.data_dir`` unless that is None), else Redis with live failover to memory
    (which also covers "unreachable at start")."""
    if config.redis_url is None:
        log.info(
            "storage_selected", backend=Backend.IN_MEMORY, reason="redis_url is none",
            data_dir=config.data_dir,
        )  # fmt: skip
        if config.data_dir is None:
            return MemoryStorage(history_size=config.history_size)
        from pricehub.storage.durable import DurableStorage

        return DurableStorage(
            config.data_dir, history_size=config.history_size, zones=config.zones
        )
    from pricehub.storage.failover import FailoverStorage

    return FailoverStorage(
        config.redis_url,
        zones=config.zones,
        key_prefix=config.key_prefix,
        history_size=config.history_size,
        timeout=config.redis_timeout,
        probe_interval=config.redis_probe_interval,
        hold=config.redis_hold,
        assume_peers=config.assume_peers,
        data_dir=config.data_dir,
        adopt_journal=config.adopt_journal,
        log=log,
    )


async def redis_problem(url: str, *, timeout: float) -> str | None:
    """Why the Redis at ``url`` (any scheme pricehub accepts) cannot be used right now,
    or None when it answers PING within ``timeout`` seconds."""
    from pricehub.storage.cluster import ping_problem

    return await ping_problem(url, timeout=timeout)
