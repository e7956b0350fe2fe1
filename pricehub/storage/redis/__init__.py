"""The Redis backend, one concern per module (issue 27):

* ``keys``: the key and channel layout (``KeyLayout``);
* ``scripts``: the Lua scripts (``lua/*.lua``) and their one loader (``Script``);
* ``urls``: the URL parser of every scheme and the clients made from it;
* ``errors``: driver failures and script refusals as the storage's errors;
* ``writer``: the pipelined writer's parts, the only user of redis-py internals;
* ``reads``: reads of many zones at once (snapshot, history by market time);
* ``topology``: what differs between deployments (``Topology``), and what a topology
  may use of the storage (``Host``);
* ``single``: ``SingleNode``, the topology of one node or a Sentinel-watched one (the
  cluster's is ``pricehub.storage.cluster.ClusterTopology``);
* ``storage``: ``RedisStorage``, composing them.

What other modules import of the backend is re-exported here.
"""

from __future__ import annotations

from pricehub.storage.base import IngestAck
from pricehub.storage.errors import LeaseLost, OlderEntryPending
from pricehub.storage.redis.errors import (
    ZONE_ERROR,
    EpochChanged,
    WriteInDoubt,
    redis_errors,
    refusal,
)
from pricehub.storage.redis.keys import INGEST_GROUP, KeyLayout
from pricehub.storage.redis.reads import stored_price
from pricehub.storage.redis.scripts import APPEND, RESTORE, lua_source
from pricehub.storage.redis.storage import (
    MAX_IN_FLIGHT,
    MAX_PIPELINE,
    RESTORED_TTL,
    RedisStorage,
    announce_gap,
    next_stream_id,
)
from pricehub.storage.redis.urls import connect_client
from pricehub.storage.redis.writer import Write

__all__ = [
    "APPEND_LUA",
    "INGEST_GROUP",
    "MAX_IN_FLIGHT",
    "MAX_PIPELINE",
    "RESTORED_TTL",
    "RESTORE_LUA",
    "STAMP_LUA",
    "STORED_LUA",
    "STORE_LUA",
    "ZONE_ERROR",
    "EpochChanged",
    "IngestAck",
    "KeyLayout",
    "LeaseLost",
    "OlderEntryPending",
    "RedisStorage",
    "Write",
    "WriteInDoubt",
    "announce_gap",
    "connect_client",
    "next_stream_id",
    "redis_errors",
    "refusal",
    "stored_price",
]

# The scripts' texts under their old names (bench/burst.py loads APPEND_LUA with
# redis-cli; tests run STAMP_LUA's functions), read from the files, never built here.
APPEND_LUA = APPEND.source
RESTORE_LUA = RESTORE.source
STAMP_LUA = lua_source("stamp.lua")
STORE_LUA = lua_source("store.lua")
STORED_LUA = lua_source("stored.lua")
