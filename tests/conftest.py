"""Shared fixtures: an in-process pricehub behind a real aiohttp test server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pricehub.server.app import create_app
from tests.hygiene import Footprint
from tests.redisproc import RedisProcess
from tests.serverproc import REPO, ServerProcess, use_scratch_dir
from tests.support import PUBLISH_KEY, Client, MakeClient, make_settings

# Markers, derived once here instead of on every test: what a test needs decides how
# fast it is. ``pytest -m unit`` runs the pure tests (no sockets, no processes) in seconds.
_KIND_BY_FIXTURE = {
    "make_client": "app", "aiohttp_client": "app", "aiohttp_server": "app",
    "server": "process", "redis_server": "redis", "raw": "redis",
}
_KIND_BY_IMPORT = {
    "RedisProcess": "redis", "RedisCluster": "redis", "SentinelSetup": "redis",
    "ServerProcess": "process", "subprocess": "process", "chromium": "browser",
    "async_playwright": "browser",
}


# Pure but long (thousands of generated inputs): kept out of the seconds-long unit run.
_KIND_BY_MODULE = {"tests.test_fuzz": "fuzz"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kinds = {
            kind for name, kind in _KIND_BY_FIXTURE.items()
            if name in getattr(item, "fixturenames", ())
        }
        module = getattr(item, "module", None)
        names = vars(module) if module is not None else {}
        kinds |= {kind for name, kind in _KIND_BY_IMPORT.items() if name in names}
        if module is not None and module.__name__ in _KIND_BY_MODULE:
            kinds.add(_KIND_BY_MODULE[module.__name__])
        for kind in kinds or {"unit"}:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session", autouse=True)
def _leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Harness files go under the session's tmp dir; the run fails (an error at the last
    test's teardown) if it touched ``./data`` or left ``pricehub-*`` in the temp dir."""
    use_scratch_dir(tmp_path_factory.mktemp("harness"))
    before = Footprint.take(REPO / "data")
    yield
    problems = Footprint.take(REPO / "data").changes_since(before)
    assert not problems, "the test run left files behind:\n" + "\n".join(problems)


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
