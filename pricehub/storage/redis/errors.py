"""Redis failures as the storage's errors: nothing of the driver escapes the backend.

Every Redis/socket failure surfaces as ``StorageUnavailable`` (``redis_errors``), which
``FailoverStorage`` turns into a failover (or a hold of appends, with peers). Two kinds
say more: ``WriteInDoubt`` (the append was sent, its reply lost) and ``EpochChanged``
(refused, nothing written, the connection is fine). The append scripts refuse with error
replies that start with a ``PRICEHUB_*`` word: ``script_refusal`` and ``refusal`` read
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from pricehub.storage.errors import (
    LeaseLost,
    OlderEntryPending,
    StorageError,
    StorageUnavailable,
)

__all__ = [
    "ZONE_ERROR",
    "EpochChanged",
    "WriteInDoubt",
    "redis_errors",
    "refusal",
    "script_refusal",
]

# A zone's refusal (ZoneRefused), as the append scripts' error reply starts.
ZONE_ERROR = "PRICEHUB_ZONE"


class EpochChanged(StorageUnavailable):
    """Redis's numbering lineage is not the one this instance writes under (it lost
    its data, or another instance reconciled a divergence): reconcile before writing."""


class WriteInDoubt(StorageUnavailable):
    """The connection failed with the append sent: Redis may or may not have run it
    (its reply is what was lost). Retrying blindly could number one price twice."""


@contextlib.asynccontextmanager
async def redis_errors(what: str) -> AsyncIterator[None]:
    """Turn any driver or socket failure into ``StorageUnavailable``."""
    try:
        yield
    # RedisClusterException (no reachable node, a slot not covered) is no RedisError.
    except (RedisError, RedisClusterException, OSError) as exc:  # TimeoutError: OSError
        raise StorageUnavailable(f"redis {what}: {exc!r}") from exc


def refusal(error: BaseException) -> str | None:
    """Why a zone's keys refused an append (ZONE_ERROR), or None for any other error."""
    text = str(error)
    if isinstance(error, ResponseError) and text.startswith(ZONE_ERROR):
        return text[len(ZONE_ERROR) + 1 :]
    return None


def script_refusal(error: BaseException) -> StorageError | None:
    """The append script's refusal of a whole script (lease, stream order, epoch) as the
    storage's error, or None for anything else (the caller's failure to handle)."""
    if not isinstance(error, ResponseError):
        return None
    text = str(error)
    if text.startswith("PRICEHUB_LEASE"):
        return LeaseLost(text)
    if text.startswith("PRICEHUB_ORDER"):
        return OlderEntryPending(text)
    if text.startswith("PRICEHUB_EPOCH"):
        # Refused, nothing written, and the connection is fine: the owner reconciles
        # and retries (it must not fail over to numbering alone).
        return EpochChanged(text)
    return None
