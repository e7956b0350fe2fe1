"""The pipelined writer's parts: a queued append (``Write``), how appends share a script
(``groups``), and the one place that drives redis-py below its public API
(``RawConnection``).

``RedisStorage`` keeps several pipelines in flight on one connection (sent ahead of
their replies, read back in order), which redis-py's ``Pipeline`` cannot do: it sends
and then waits. So the writer takes a connection of the client's pool and uses the
connection's own ``pack_commands``, ``send_packed_command`` and ``read_response``.
They are redis-py internals: only this module touches them, and
tests/storage/test_redis_writer.py pins their names and signatures, so an upgrade that
moves them fails there by name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from pricehub.storage.base import IngestAck, StoredPrice

__all__ = ["RawConnection", "Write", "fail_writes", "groups", "next_stream_id"]


@dataclass(slots=True)
class Write:
    """One append waiting for its script's reply."""

    zone: str
    body: bytes
    ack: IngestAck | None
    future: asyncio.Future[StoredPrice]
    # For an ingest write, the call it came from (``append_outcomes``' acks, or a token
    # per ``append``): only one call's entries are a run of the stream. None otherwise.
    call: object = None


def fail_writes(batch: Iterable[Write], error: BaseException) -> None:
    """Refuse every write of ``batch`` still waiting with ``error``."""
    for write in batch:
        if not write.future.done():
            write.future.set_exception(error)


_MAX_ID_PART = 2**64 - 1


def next_stream_id(entry_id: str) -> str:
    """The smallest stream id above ``entry_id`` (``ms-seq``): ``XTRIM MINID`` with it
    removes that entry and everything older. Python's ints, not Lua's doubles: both
    parts are 64-bit."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) < _MAX_ID_PART:
        return f"{ms}-{int(seq) + 1}"
    return f"{int(ms) + 1}-0"


def groups(batch: Sequence[Write]) -> list[list[Write]]:
    """Consecutive writes that can share one script: HTTP prices (none of them ingest),
    or the ingest entries of one call. Never ingest and HTTP together (a lost lease must
    refuse only the stream entries), nor two calls' entries: retries of two batches in
    flight, one price each, can meet in one pipeline, and the script checks stream order
    and trims the stream from the group's first and last entry, as if it were a run."""
    found: list[list[Write]] = []
    for write in batch:
        last = found[-1][-1] if found else None
        if last is not None and last.call is write.call:
            found[-1].append(write)
        else:
            found.append([write])
    return found


class RawConnection:
    """One connection of a client's pool, written to and read from directly."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection

    @classmethod
    async def take(cls, client: aioredis.Redis) -> RawConnection:
        """A connection of ``client``'s pool, kept until ``close`` (never given back)."""
        taken = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        return cls(cast(AbstractConnection, taken))

    async def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Send ``commands`` as one write, without waiting for their replies."""
        packed = self._connection.pack_commands(commands)
        await self._connection.send_packed_command(packed, check_health=False)

    async def reply(self) -> Any:
        """The next reply, in the order the commands were sent (an error reply raises
        it as ``ResponseError``)."""
        return await self._connection.read_response()

    async def close(self) -> None:
        """Drop the connection (a failed send or read has closed its socket already)."""
        with contextlib.suppress(Exception):
            await self._connection.disconnect(nowait=True)
