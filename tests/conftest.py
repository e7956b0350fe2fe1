"""Shared fixtures: an in-process pricehub behind a real aiohttp test server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pricehub.server.app import create_app
from tests.harness.hygiene import Footprint
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import REPO, ServerProcess, use_scratch_dir
from tests.harness.support import PUBLISH_KEY, Client, MakeClient, make_settings

# Markers from folders: tests/ mirrors the package (tests/wire/, tests/storage/,
# tests/server/, tests/client/ hold the tests of pricehub/<that package>/; tests/system/ the
# multi-process, browser, docs and bench tests; tests/harness/ what they share), and each
# test carries its folder's name: ``pytest -m wire`` runs the pure wire tests in seconds,
# ``pytest -m "not system"`` everything but the slow end-to-end runs.
FOLDER_MARKERS = ("wire", "storage", "server", "client", "system")
# Pure but long (thousands of generated inputs): also marked, to leave out of a quick run.
_FUZZ_MODULE = "tests.wire.test_fuzz"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == _FUZZ_MODULE:
            item.add_marker(pytest.mark.fuzz)


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
