"""The pipelined writer's fence around redis-py (``pricehub.storage.redis.writer``).

``RawConnection`` is the only user of redis-py internals: a connection taken from the
pool, ``pack_commands``, ``send_packed_command`` and ``read_response``. The first tests
pin what it calls by name and signature, so a redis-py upgrade that moves any of them
fails here, by name, instead of as a silent storage outage; the others run it against a
real redis-server.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ResponseError

from pricehub.storage.redis.writer import RawConnection
from tests.harness.redisproc import RedisProcess


def parameters(function: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_pool_hands_out_a_connection() -> None:
    assert inspect.iscoroutinefunction(ConnectionPool.get_connection)
    pinned = parameters(ConnectionPool.get_connection)
    # Called with no argument: every parameter but self needs a default (or is *args).
    for name, parameter in pinned.items():
        if name != "self":
            assert parameter.kind is parameter.VAR_POSITIONAL or (
                parameter.kind is parameter.VAR_KEYWORD or parameter.default is not parameter.empty
            ), name


def test_the_connection_methods_the_writer_calls() -> None:
    assert "commands" in parameters(AbstractConnection.pack_commands)
    assert not inspect.iscoroutinefunction(AbstractConnection.pack_commands)
    send = parameters(AbstractConnection.send_packed_command)
    assert inspect.iscoroutinefunction(AbstractConnection.send_packed_command)
    assert "command" in send and send["check_health"].default is True
    assert inspect.iscoroutinefunction(AbstractConnection.read_response)
    read = parameters(AbstractConnection.read_response)
    assert all(p.default is not p.empty for n, p in read.items() if n != "self")
    assert inspect.iscoroutinefunction(AbstractConnection.disconnect)
    assert parameters(AbstractConnection.disconnect)["nowait"].default is False


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    made = aioredis.Redis.from_url(redis_server.url)
    yield made
    await made.aclose()


async def test_replies_come_back_in_the_order_sent(client: aioredis.Redis, prefix: str) -> None:
    """Two batches sent back to back before any reply is read (the writer's pipelining)."""
    connection = await RawConnection.take(client)
    try:
        await connection.send([("INCR", f"{prefix}n"), ("INCR", f"{prefix}n")])
        await connection.send([("GET", f"{prefix}n"), ("ECHO", b"done")])
        replies = [await connection.reply() for _ in range(4)]
        assert replies == [1, 2, b"2", b"done"]
    finally:
        await connection.close()


async def test_an_error_reply_raises_and_the_next_reply_still_reads(
    client: aioredis.Redis, prefix: str
) -> None:
    """One refused script leaves the connection usable (``_read_each_reply`` relies on
    it: the others of the pipeline ran)."""
    connection = await RawConnection.take(client)
    try:
        await connection.send([
            ("EVAL", "return redis.error_reply('PRICEHUB_ZONE damaged')", 0),
            ("SET", f"{prefix}k", b"v"),
        ])  # fmt: skip
        with pytest.raises(ResponseError, match="PRICEHUB_ZONE damaged"):
            await connection.reply()
        assert await connection.reply() == b"OK"
    finally:
        await connection.close()
    assert await client.get(f"{prefix}k") == b"v"


async def test_close_twice_is_harmless(client: aioredis.Redis) -> None:
    connection = await RawConnection.take(client)
    await connection.close()
    await connection.close()
