"""Shared fixtures: an in-process pricehub behind a real aiohttp test server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pricehub.server.app import create_app
from tests.redisproc import RedisProcess
from tests.serverproc import ServerProcess
from tests.support import PUBLISH_KEY, Client, MakeClient, make_settings


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    """``await make_client(**settings_overrides)``: a client of a fresh in-memory server."""

    async def factory(**overrides: Any) -> Client:
        client: Client = await aiohttp_client(create_app(make_settings(**overrides)))
        return client

    return factory


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    """A redis-server of the test module's own on a free port (never the machine's)."""
    with RedisProcess() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix, so tests sharing one redis-server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """A plain client of ``redis_server``, to look at keys or write ingest entries."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A real ``run_server.py`` subprocess: in memory, no simulator, publishing with
    ``PUBLISH_KEY`` (``await server.publish(...)``)."""
    with ServerProcess("--no-simulate", publish_key=PUBLISH_KEY) as proc:
        yield proc
