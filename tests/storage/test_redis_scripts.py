"""The Lua loader (``pricehub.storage.redis.scripts``): includes, names, NOSCRIPT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources

import pytest
import redis.asyncio as aioredis

from pricehub.storage.redis import scripts
from pricehub.storage.redis.scripts import CLUSTER_RESTORE, RESTORE, Script, lua_source
from tests.harness.redisproc import RedisProcess

ALL = [value for value in vars(scripts).values() if isinstance(value, Script)]


def test_every_lua_file_is_loaded_or_included() -> None:
    files = {
        entry.name
        for entry in resources.files("pricehub.storage.redis").joinpath("lua").iterdir()
        if entry.name.endswith(".lua")
    }
    used = {script.name for script in ALL}
    included = {
        line.strip().removeprefix("-- include ")
        for name in files
        for line in resources.files("pricehub.storage.redis").joinpath("lua", name)
        .read_text().splitlines()
        if line.strip().startswith("-- include ")
    }  # fmt: skip
    assert files == used | included


def test_includes_are_expanded_and_comments_dropped() -> None:
    store = lua_source("store.lua")
    assert "local function utc_text" in store and "local function store" in store
    assert store.index("utc_text") < store.index("local function store")
    for script in ALL:
        assert "-- include" not in script.source, script.name
        assert not any(line.lstrip().startswith("--") for line in script.source.splitlines())


def test_the_cluster_restore_differs_only_in_its_publish() -> None:
    assert RESTORE.source.replace("'PUBLISH'", "'SPUBLISH'") == CLUSTER_RESTORE.source
    assert "'PUBLISH'" not in CLUSTER_RESTORE.source


def test_an_include_cycle_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = {"a.lua": "-- include b.lua\n", "b.lua": "-- include a.lua\n"}
    monkeypatch.setattr(scripts, "_text", lambda name: texts[name])
    with pytest.raises(ValueError, match=r"a\.lua -> b\.lua -> a\.lua"):
        lua_source("a.lua")


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    made = aioredis.Redis.from_url(redis_server.url)
    yield made
    await made.aclose()


async def test_redis_names_each_script_as_the_loader_does(client: aioredis.Redis) -> None:
    for script in ALL:
        await script.load(client)  # raises if Redis's SHA1 differs
    assert all(await client.script_exists(*(script.sha for script in ALL)))


async def test_run_loads_again_after_redis_lost_its_scripts(
    client: aioredis.Redis, prefix: str
) -> None:
    """A restarted Redis, a promoted replica, SCRIPT FLUSH: NOSCRIPT, loaded, run once."""
    keys = [f"{prefix}epoch", f"{{{prefix}epoch}}:restored"]
    await client.script_flush()
    claimed = await scripts.CLAIM_EPOCH.run(client, keys, ["e1", f"{prefix}prices", 10_000])
    assert claimed == b"e1"
    await client.script_flush()
    assert await scripts.CLAIM_EPOCH.run(client, keys, ["e2", f"{prefix}prices", 1]) == b"e1"
    assert await client.script_exists(scripts.CLAIM_EPOCH.sha) == [True]
