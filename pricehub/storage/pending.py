"""PENDING (issue 24, item 3): what ``failover.py`` does not provide yet.

``FailoverStorage`` still keeps its counters as attributes and builds its ``DiskStatus``
from check strings (``durable.LegacyDiskStatus``). Until it defines ``counters()`` itself,
``create_storage`` builds this subclass, whose ``counters()`` reads those attributes by
their typed names (a rename is a type error, not a silent 0). Delete this module once
``FailoverStorage.counters`` exists, and build ``FailoverStorage`` in ``create_storage``.
"""

from __future__ import annotations

from pricehub.storage.base import StorageCounters
from pricehub.storage.failover import FailoverStorage

__all__ = ["CountingFailoverStorage"]


class CountingFailoverStorage(FailoverStorage):
    """``FailoverStorage`` with ``counters()`` (see the module docstring)."""

    def counters(self) -> StorageCounters:
        return StorageCounters(
            failovers=self.failovers,
            recoveries=self.recoveries,
            redis_errors=self.redis_errors,
            gaps=self.gaps,
            holds=self.holds,
            held_refusals=self.held_refusals,
            resyncs=self.resyncs,
            foreign_messages=self.foreign_messages,
            epoch_changes=self.epoch_changes,
        )
