"""Placeholder until the Redis backend lands: always serves from memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pricehub.storage.memory import MemoryStorage

if TYPE_CHECKING:
    import structlog

    from pricehub.settings import Settings

__all__ = ["FailoverStorage"]


class FailoverStorage(MemoryStorage):
    @classmethod
    def from_settings(
        cls, settings: Settings, *, log: structlog.typing.FilteringBoundLogger
    ) -> FailoverStorage:
        log.warning("storage_selected", backend="in-memory", reason="redis backend not built yet")
        return cls(history_size=settings.history_size)
