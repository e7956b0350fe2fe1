"""The Lua scripts of the Redis backend: every one a ``.lua`` file, read by one loader.

A script is a file of ``lua/`` (packaged: setup.cfg's package_data lists
``storage/redis/lua/*.lua``). Lua shared by several scripts is a fragment file, pulled in
by a line ``-- include <name>.lua`` (expanded in place, recursively; a cycle is an error).
Comment lines (``--`` first on the line) document the files and are dropped from the text
sent to Redis; no script uses a Lua long string, where that would change its meaning.
The cluster's variants are their own files: ``cluster_restore.lua`` is ``restore.lua``
with the ``publish`` it defines before the shared body using SPUBLISH.

A ``Script`` runs four ways:

* ``run``: ``EVALSHA``, and once more after ``SCRIPT LOAD`` when Redis answers NOSCRIPT
  (restarted, a replica promoted that never ran it, ``SCRIPT FLUSH``). Safe to repeat: a
  NOSCRIPT reply means the script did not run.
* ``eval``: ``EVAL`` with the text, one round trip always (a rare query's);
* ``queue``: into a pipeline as ``EVAL`` with the text (as before the loader): in a MULTI,
  or a pipeline spread over cluster nodes, the other commands have run by the time one
  answers NOSCRIPT, so that one could not simply be sent again.
* ``command``: the raw ``EVALSHA`` for the pipelined writer and the cluster's appends,
  after ``load`` at connect. A NOSCRIPT reply there fails that write as refused (it did
  not run) and the storage as lost; the reconnect loads the script again. Retrying it in
  place could overtake the pipelines sent after it (seq and stream order).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import NoScriptError

__all__ = [
    "APPEND",
    "APPEND_MANY",
    "CAS_EPOCH",
    "CLAIM_EPOCH",
    "CLUSTER_APPEND",
    "CLUSTER_RESTORE",
    "HISTORY_BETWEEN",
    "INGEST_LEASE",
    "INGEST_READ",
    "INGEST_RELEASE",
    "LOAD",
    "LOAD_ZONE",
    "MIRROR_EPOCH",
    "REPLACE_EPOCH",
    "RESTORE",
    "SETTLE_INGESTED",
    "WRITTEN_BACK",
    "Script",
    "lua_source",
]

Client: TypeAlias = aioredis.Redis | AsyncRedisCluster
AnyPipeline: TypeAlias = Pipeline | ClusterPipeline
Arg: TypeAlias = str | bytes | int | float

_INCLUDE = re.compile(r"-- include ([a-z_]+\.lua)")


def lua_source(name: str) -> str:
    """The text of ``lua/<name>`` as Redis gets it: includes expanded, comment lines
    dropped."""
    return "".join(_lines(name, ()))


def _lines(name: str, chain: tuple[str, ...]) -> Iterator[str]:
    if name in chain:
        raise ValueError(f"lua include cycle: {' -> '.join((*chain, name))}")
    for line in _text(name).splitlines(keepends=True):
        stripped = line.strip()
        if included := _INCLUDE.fullmatch(stripped):
            yield from _lines(included[1], (*chain, name))
        elif not stripped.startswith("--"):
            yield line


def _text(name: str) -> str:
    return resources.files("pricehub.storage.redis").joinpath("lua", name).read_text()


@dataclass(frozen=True, slots=True)
class Script:
    """One script: its file's name, its text and the SHA1 Redis knows it by."""

    name: str
    source: str = field(repr=False)
    sha: str

    @classmethod
    def read(cls, name: str) -> Script:
        source = lua_source(name)
        # Redis names a script by the SHA1 of its text: computed here, so that EVALSHA
        # needs no SCRIPT LOAD round trip first.
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def run(self, client: Client, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """EVALSHA; on NOSCRIPT load it and run it once more (see the module)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, client: Client) -> None:
        """SCRIPT LOAD (on a cluster: every master), for EVALSHA sent by ``command``."""
        sha = await client.script_load(self.source)
        if sha != self.sha:  # Redis hashes what it got: a mismatch is a bug of ours
            raise RuntimeError(f"redis named script {self.name} {sha}, not {self.sha}")

    async def eval(self, client: Client, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """EVAL with the text: one round trip whatever Redis has cached, for a script
        called rarely whose cost is pinned as one EVAL (``reads.history_between``)."""
        return await client.eval(self.source, len(keys), *keys, *args)

    def queue(self, pipe: AnyPipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Into ``pipe`` as EVAL with the text (see the module: no NOSCRIPT possible)."""
        pipe.eval(self.source, len(keys), *keys, *args)

    def command(self, keys: Sequence[str], args: Sequence[Arg]) -> tuple[Arg, ...]:
        """The raw EVALSHA (``load`` it first): for pipelines redis-py does not build."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


APPEND = Script.read("append.lua")
APPEND_MANY = Script.read("append_many.lua")
RESTORE = Script.read("restore.lua")
SETTLE_INGESTED = Script.read("settle_ingested.lua")
CLAIM_EPOCH = Script.read("claim_epoch.lua")
WRITTEN_BACK = Script.read("written_back.lua")
REPLACE_EPOCH = Script.read("replace_epoch.lua")
LOAD = Script.read("load.lua")
HISTORY_BETWEEN = Script.read("history_between.lua")
# The cluster's (pricehub.storage.cluster).
CLUSTER_APPEND = Script.read("cluster_append.lua")
CLUSTER_RESTORE = Script.read("cluster_restore.lua")
MIRROR_EPOCH = Script.read("mirror_epoch.lua")
CAS_EPOCH = Script.read("cas_epoch.lua")
LOAD_ZONE = Script.read("load_zone.lua")
# The ingest stream's (pricehub.storage.redis.stream).
INGEST_LEASE = Script.read("ingest_lease.lua")
INGEST_RELEASE = Script.read("ingest_release.lua")
INGEST_READ = Script.read("ingest_read.lua")
