"""Redis storage: the cluster backend (redis.asyncio).

Every key and channel lives under one prefix (``pricehub:`` by default, see
``KeyLayout``). Appending a price is one Lua script (``APPEND_LUA``): INCR the zone's seq,
splice ``"seq":N,"accepted_at":"<Redis's TIME>",`` into the body exactly as
``messages.with_seq`` does, store it as latest and in a bounded history ZSET
(score = seq), PUBLISH it. Because the script is
atomic and one PUB/SUB connection delivers in publish order, every instance sees a
zone's prices in seq order. Concurrent appends are pipelined: they queue up while one
round trip is in flight and leave together in the next one, several of them as one
``APPEND_MANY_LUA`` (the same steps per price, one reply and one ``!many`` message for
the lot), so a batch of N prices costs about N / ``MAX_PIPELINE`` round trips.

A published price reads ``<epoch> <zone> <payload>``: the subscriber drops (and counts,
and logs) anything that is not its own feed's lineage, so a price of another feed can
never reach clients disguised as one of ours (channels are also per database, see
``KeyLayout``).

The subscriber connection can look healthy and deliver nothing (a half-open TCP
connection, a proxy that stopped forwarding). So a watcher publishes a probe to this
instance's own probe channel every ``probe_interval`` and expects the subscriber to
receive *something* within ``2 * timeout``; otherwise the storage is lost.

Errors never escape as driver exceptions: every Redis/socket failure surfaces as
``StorageUnavailable``, which ``FailoverStorage`` turns into a failover (or a hold of
appends, with peers). Two kinds say more: ``WriteInDoubt`` (the append was sent, its
reply lost) and ``EpochChanged`` (refused, nothing written, the connection is fine).
One is no outage at all: ``ZoneRefused`` (a ``StorageError``), a price refused because
its zone's own keys are damaged (``STORE_LUA``); the other prices go on, and a load or
write-back leaves such a zone out instead of failing for every zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

import pricehub.storage.redis_reads as redis_reads
from pricehub.storage.base import (
    DiskState,
    DiskStatus,
    HistorySlice,
    IngestAck,
    IngestKeys,
    IngestSource,
    Snapshot,
    StorageCounters,
    StorageListener,
    StoredPrice,
)
from pricehub.storage.errors import (
    LeaseLost,
    OlderEntryPending,
    StorageError,
    StorageUnavailable,
    ZoneRefused,
)
from pricehub.wire.codes import Backend
from pricehub.wire.messages import seq_of, with_seq

__all__ = [
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
    "WriteInDoubt",
    "announce_gap",
    "connect_client",
    "next_stream_id",
    "redis_errors",
]

INGEST_GROUP = "pricehub"  # the consumer group of the ingest stream
EPOCH_MESSAGE = b"!epoch "  # control message on the prices channel ('!' is no zone char)
# Several prices in one message (APPEND_MANY_LUA): "!many zone payload\nzone payload...".
# A payload is compact JSON, which never holds a raw newline.
MANY_MESSAGE = b"!many "
MAX_PIPELINE = 512  # appends per pipeline (one APPEND_MANY_LUA script, usually)
# Pipelines sent on the write connection ahead of their replies. Bounds what is in doubt
# when the connection fails (and so looked up one by one): 4 x 512 prices.
MAX_IN_FLIGHT = 4
LOGGED_FOREIGN = 10  # log every foreign message up to this many, then one in a thousand
LOGGED_DAMAGED = 10  # log every refusal of a damaged zone up to this many, then 1 in 1000
LOAD_CHUNK = 2000  # zones per LOAD_LUA call when loading every zone (start, recovery)


class EpochChanged(StorageUnavailable):
    """Redis's numbering lineage is not the one this instance writes under (it lost
    its data, or another instance reconciled a divergence): reconcile before writing."""


class WriteInDoubt(StorageUnavailable):
    """The connection failed with the append sent: Redis may or may not have run it
    (its reply is what was lost). Retrying blindly could number one price twice."""


# ``LeaseLost`` and ``OlderEntryPending`` live in ``storage.errors`` (the ingest consumer
# raises and catches them without importing this module); re-exported here.


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Every Redis key and channel pricehub uses, under ``prefix``.

    Keys live in the selected database (``/N`` of the URL), but Redis Pub/Sub ignores
    the database number: a channel is shared by every client of the server. So every
    channel name also carries ``db`` (``<prefix>db<N>:prices``): two feeds on one server
    with different database numbers never hear each other, even under the same prefix.
    """

    prefix: str = "pricehub:"
    db: int = 0

    def seq(self, zone: str) -> str:
        return f"{self.prefix}seq:{zone}"

    def latest(self, zone: str) -> str:
        return f"{self.prefix}latest:{zone}"

    def history(self, zone: str) -> str:
        return f"{self.prefix}history:{zone}"

    def probe(self, token: str) -> str:
        return f"{self.prefix}db{self.db}:probe:{token}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    def instance_mirror(self, instance_id: str) -> str:
        """The mirror id of a registered instance (``FailoverStorage``): derived from
        its registration key, so a cluster layout keeps it in the registry's slot."""
        return f"{self.instance(instance_id)}:mirror"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def restored(self) -> str:
        """The set of mirrors that wrote back into a Redis found empty (``claim_epoch``).
        Claimed in one script with the epoch, so it must share the epoch key's slot: a
        key with a hash tag keeps it, one without is made the tag."""
        epoch = self.epoch
        opening = epoch.find("{")
        if opening >= 0 and epoch.find("}", opening + 2) >= 0:
            return f"{epoch}:restored"
        return f"{{{epoch}}}:restored"

    @property
    def prices(self) -> str:
        return f"{self.prefix}db{self.db}:prices"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    def ingested(self, zone: str) -> str:
        """A zone's last applied ingest entry: kept on a cluster only (its layout puts
        it in the zone's slot), where the append script checks it."""
        return f"{self.prefix}ingested:{zone}"

    @property
    def ingest(self) -> str:
        return f"{self.prefix}ingest"

    @property
    def ingest_lease(self) -> str:
        return f"{self.prefix}ingest:lease"

    @property
    def ingest_keys(self) -> IngestKeys:
        """The ingest consumer's names (``IngestSource.ingest_keys``)."""
        return IngestKeys(stream=self.ingest, lease=self.ingest_lease, group=INGEST_GROUP)


# Replies are bytes throughout: clients are made with decode_responses off (the default).

# A zone's refusal (ZoneRefused), as the append scripts' error reply starts.
ZONE_ERROR = "PRICEHUB_ZONE"

# Lua shared by every append script: ``accepted_at`` (PROTOCOL.md), the moment the seq is
# given, taken inside the script that gives it, from Redis's own clock (TIME), not the
# instance's: so it is the moment of numbering whichever instance sent the price and
# however long it queued in a pipeline, and a zone's prices all get their time from one
# clock (its keys live on one node, on a cluster too) instead of from instances whose
# clocks may disagree. The value is then stored in the payload (history, latest, the
# published message): every instance serves it as stored, never recomputes it. TIME may
# precede writes in a script because Redis replicates a script's effects, not the
# script (the default since Redis 5, the only mode since 7.0): a replica or an AOF
# replay gets the payload with the time in it and never runs TIME again. One TIME per
# script: a batch (APPEND_MANY_LUA) is numbered in one atomic step, and its prices
# share the value. ``utc_text`` is ``messages.format_accepted_at`` in Lua (days to civil
# date, H. Hinnant's algorithm: Redis's Lua has no os.date); a test compares the two.
STAMP_LUA = """
local function utc_text(secs, micros)
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', year, month, day,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, micros)
end

local function accepted_now()
  local now = redis.call('TIME')
  return utc_text(tonumber(now[1]), tonumber(now[2]))
end
"""

# Lua shared by every append script (pricehub.storage.cluster's too), prepended to it:
# one price into its zone's keys. Returns its seq and payload, or nil and why the zone's
# keys refuse it, with nothing written: a seq that is no integer, or out of 1 .. 2^53 - 1
# (what Lua's numbers hold exactly), or a history that is no sorted set. Such damage (a
# key set by hand or by another program) is that zone's, not the feed's: its prices
# fail, the others go on (``redis.pcall``; ``redis.call`` would abort the script, and
# with it a whole batch half written, as an error the caller could not tell from a broken
# Redis). A price costs the steps of before (INCR, ZADD, ZREMRANGEBYRANK, SET): the
# checks ride in their replies, and a refused price's INCR is taken back (``undo``: a seq
# key it created is deleted again). ``accepted``: the script's ``accepted_now()``.
STORE_LUA = STAMP_LUA + """
local function undo(seq_key)
  if redis.call('DECR', seq_key) == 0 then redis.call('DEL', seq_key) end
end

local function store(seq_key, history_key, latest_key, body, keep, accepted)
  local seq = redis.pcall('INCR', seq_key)
  if type(seq) == 'table' then return nil, seq_key .. ': ' .. seq.err end
  if seq < 1 or seq > 9007199254740991 then
    undo(seq_key)
    return nil, seq_key .. ': not a seq from 1 to 2^53 - 1'
  end
  local payload = string.format('{"seq":%d,"accepted_at":"%s",', seq, accepted)
    .. string.sub(body, 2)
  local added = redis.pcall('ZADD', history_key, seq, payload)
  if type(added) == 'table' then
    undo(seq_key)
    return nil, history_key .. ': ' .. added.err
  end
  redis.call('ZREMRANGEBYRANK', history_key, 0, keep)
  redis.call('SET', latest_key, payload)
  return seq, payload
end
"""

# KEYS: seq, history, latest, epoch [, ingest lease, ingest stream]
# ARGV: body, history_size, channel, zone, epoch [, consumer token, group, entry id]
# Returns "<accepted_at> <seq>": the caller rebuilds the stored payload from it byte for
# byte (``with_seq``), so the price it answers with is the one Redis stores.
# A price its zone's keys refuse is an error reply (ZONE_ERROR); its ingest entry is
# acknowledged all the same: left pending, it would hold up every later entry (the
# order check), and it would only be refused again. The consumer logs and counts it.
APPEND_LUA = STORE_LUA + """
if redis.call('GET', KEYS[4]) ~= ARGV[5] then
  return redis.error_reply('PRICEHUB_EPOCH numbering lineage changed')
end
if #KEYS == 6 then
  if redis.call('GET', KEYS[5]) ~= ARGV[6] then
    return redis.error_reply('PRICEHUB_LEASE ingest lease lost')
  end
  if #redis.call('XPENDING', KEYS[6], ARGV[7], '-', '(' .. ARGV[8], 1) > 0 then
    return redis.error_reply('PRICEHUB_ORDER an older ingest entry is still pending')
  end
end
local accepted = accepted_now()
local seq, payload = store(KEYS[1], KEYS[2], KEYS[3], ARGV[1], -(tonumber(ARGV[2]) + 1),
  accepted)
if seq then
  redis.call('PUBLISH', ARGV[3], ARGV[5] .. ' ' .. ARGV[4] .. ' ' .. payload)
end
if #KEYS == 6 then
  redis.call('XACK', KEYS[6], ARGV[7], ARGV[8])
  -- The stream is a queue, not an archive: a consumed entry is deleted so it stays
  -- bounded by the backlog (history lives in the per-zone ZSETs).
  redis.call('XDEL', KEYS[6], ARGV[8])
end
if not seq then return redis.error_reply('PRICEHUB_ZONE ' .. payload) end
return string.format('%s %d', accepted, seq)
"""

# A batch of appends in one script: one round trip, one reply and one PUBLISH (so one
# subscriber message on every instance) for the lot, instead of one of each per price.
# Same steps per price as APPEND_LUA, in order; the epoch (and, for ingest, the lease) is
# checked once, and the batch's stream entries are acknowledged and deleted in the same
# script as their appends (exactly once).
# Single Redis only: a zone's keys are built inside the script (prefix .. zone) instead
# of being declared, because packing three key arguments per price was the largest share
# of redis-py's cost for a batch. That is fine on one node and wrong on a cluster, where a
# batch spans slots: RedisClusterStorage sends APPEND_LUA per price instead.
# KEYS: epoch, ingest lease, ingest stream.
# ARGV: history_size, channel, epoch, consumer token ('' = no ingest acks), group, the
#       seq, history and latest key prefixes (KeyLayout's, zone appended), and the
#       prices as one string of lines "zone entry_id body" (entry_id '' without acks),
#       then (with acks) the stream id just after the batch's last entry.
#       Zones and ids hold no space, a compact JSON body no newline.
# Returns "<accepted_at> " and the seqs as one "s1,s2,..." string (cheaper to parse than
# an array reply); a price its zone's keys refuse has "!<why>" in its place (no comma in
# it) and is left out of the message, its ingest entry acknowledged with the others (see
# APPEND_LUA). Every price of the batch has that one accepted_at (STAMP_LUA).
APPEND_MANY_LUA = STORE_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[3] then
  return redis.error_reply('PRICEHUB_EPOCH numbering lineage changed')
end
local acking = ARGV[4] ~= ''
if acking then
  if redis.call('GET', KEYS[2]) ~= ARGV[4] then
    return redis.error_reply('PRICEHUB_LEASE ingest lease lost')
  end
  -- Stream order, enforced here: the batch's first entry (its ids are in stream order)
  -- may only be appended once no older entry is pending. The consumer keeps more than
  -- one batch in flight; if a failure ever let a later batch overtake an earlier one,
  -- it is refused and the consumer starts over from the pending entries, oldest first.
  local first = string.match(ARGV[9], '^[^ ]* ([^ ]*) ')
  if #redis.call('XPENDING', KEYS[3], ARGV[5], '-', '(' .. first, 1) > 0 then
    return redis.error_reply('PRICEHUB_ORDER an older ingest entry is still pending')
  end
end
local keep = -(tonumber(ARGV[1]) + 1)
local accepted = accepted_now()
local seq_key, history_key, latest_key = ARGV[6], ARGV[7], ARGV[8]
local blob = ARGV[9]
local pos, i, n = 1, 0, 0
local seqs, lines, ids = {}, {}, {}
while pos <= #blob do
  i = i + 1
  local stop = string.find(blob, '\\n', pos, true) or (#blob + 1)
  local first = string.find(blob, ' ', pos, true)
  local second = string.find(blob, ' ', first + 1, true)
  local zone = string.sub(blob, pos, first - 1)
  ids[i] = string.sub(blob, first + 1, second - 1)
  local body = string.sub(blob, second + 1, stop - 1)
  pos = stop + 1
  local seq, payload = store(seq_key .. zone, history_key .. zone, latest_key .. zone, body, keep,
    accepted)
  if seq then
    seqs[i] = seq
    n = n + 1
    lines[n] = zone .. ' ' .. payload
  else
    seqs[i] = '!' .. string.gsub(payload, ',', ';')
  end
end
if acking then
  redis.call('XACK', KEYS[3], ARGV[5], unpack(ids))
  -- As in APPEND_LUA, a consumed entry is deleted (the stream stays a bounded queue),
  -- but by trimming below the batch's last entry (ARGV[10]: the id just after it):
  -- XTRIM frees whole stream nodes; XDEL looked every id up, which cost Redis more than
  -- any other step of an entry (~3 of ~10 us). Nothing older is pending (checked above)
  -- and the batch's own entries are acknowledged by now, but the trim stops at the
  -- oldest entry still pending all the same: an entry never appended is never deleted,
  -- whatever a caller got wrong about the batch being one run of the stream.
  local minid = ARGV[10]
  local pending = redis.call('XPENDING', KEYS[3], ARGV[5], '-', '(' .. minid, 1)
  if #pending > 0 then minid = pending[1][1] end
  redis.call('XTRIM', KEYS[3], 'MINID', minid)
end
if n > 0 then
  redis.call('PUBLISH', ARGV[2], '!many ' .. ARGV[3] .. '\\n' .. table.concat(lines, '\\n'))
end
return accepted .. ' ' .. table.concat(seqs, ',')
"""

# Lua shared by the scripts that read a zone's state (load, restore; the cluster's too):
# the seq its key holds, nil without one, or -1 when its keys are damaged (a seq that is
# no integer from 0 to 2^53 - 1, as APPEND's ``store`` takes them, or a history that is
# no sorted set). A damaged zone is left out (logged) instead of failing the script, and
# with it a start or a recovery for every zone.
STORED_LUA = """
local function stored(seq_key, history_key)
  local raw = redis.pcall('GET', seq_key)
  if not raw then return nil end
  local kind = redis.call('TYPE', history_key)['ok']
  if type(raw) ~= 'string' or (kind ~= 'zset' and kind ~= 'none') then return -1 end
  if raw ~= '0' and not string.match(raw, '^[1-9]%d*$') then return -1 end
  local seq = tonumber(raw)
  if seq > 9007199254740991 then return -1 end
  return seq
end
"""

# Recovery of one zone. KEYS: seq, history, latest [, zone ingested (a cluster's)].
# ARGV: history_size, channel, zone, our last seq, epoch, the ingest entries of our
# prices ("seq entry_id" items joined by ",", or ""), then (seq, payload) pairs oldest
# first.
# Writes back (and publishes) the prices Redis lacks, raises the seq to ours so no
# instance's numbering goes backwards, and reports whether a seq both sides hold
# carries different prices (numbering diverged during the outage): 1, else 0; 2 when
# the zone's keys are damaged (nothing written: its prices stay this instance's).
# On a cluster the zone's last applied entry id (which its append script skips up to)
# is raised to the entry of the newest of our prices Redis now holds (written back, or
# already there: another instance's copy may have written it back first): a promotion
# that lost such a price lost the id with it (same slot), and the entry would be
# applied again. Raised only, never lowered (stream ids compared as numbers).
RESTORE_LUA = STORED_LUA + """
local function after(a, b)
  local ams, asq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bsq = string.match(b, '^(%d+)-(%d+)$')
  ams, asq, bms, bsq = tonumber(ams), tonumber(asq), tonumber(bms), tonumber(bsq)
  return ams > bms or (ams == bms and asq > bsq)
end
local current = stored(KEYS[1], KEYS[2]) or 0
if current < 0 then return 2 end
local entries = {}
for seq, entry in string.gmatch(ARGV[6], '(%d+) ([^,]+)') do entries[tonumber(seq)] = entry end
local newest = nil
local diverged = 0
for i = 7, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  local payload = ARGV[i + 1]
  local ours = true
  if seq <= current then
    local held = redis.call('ZRANGE', KEYS[2], seq, seq, 'BYSCORE')
    if held[1] and held[1] ~= payload then diverged = 1 end
    ours = held[1] == payload
  else
    redis.call('ZADD', KEYS[2], seq, payload)
    redis.call('SET', KEYS[3], payload)
    redis.call('PUBLISH', ARGV[2], ARGV[5] .. ' ' .. ARGV[3] .. ' ' .. payload)
  end
  if ours and entries[seq] then newest = entries[seq] end
end
if newest and #KEYS == 4 then
  local last = redis.call('GET', KEYS[4])
  if not last or after(newest, last) then redis.call('SET', KEYS[4], newest) end
end
if tonumber(ARGV[4]) > current then
  redis.call('SET', KEYS[1], ARGV[4])
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[1]) + 1))
return diverged
"""

# KEYS: epoch, restored. ARGV: candidate, channel, restored TTL (ms). Claim the epoch
# unless Redis has one; a new lineage (Redis lost its data) is announced so that
# subscribers learn it, and the restored set is started (empty but for a placeholder,
# so that it exists): every instance reconciling while it lives learns, atomically with
# the claim, that Redis was found empty and is being restored (``written_back``).
CLAIM_EPOCH_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('PUBLISH', ARGV[2], '!epoch ' .. ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('SADD', KEYS[2], '')
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return redis.call('GET', KEYS[1])
"""

# KEYS: restored. ARGV: mirror id ('' only reads). While the restored set lives: add the
# mirror (it wrote back what it had) and return the members; else false.
WRITTEN_BACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
if ARGV[1] ~= '' then
  redis.call('SADD', KEYS[1], ARGV[1])
end
return redis.call('SMEMBERS', KEYS[1])
"""
# How long the restored set lives after the claim: past every peer's write-back (they
# reconnect within a few probe intervals, and one waits at most PEER_RESTORE_WAIT for
# the others) but short, so an ordinary outage later finds none (see ``written_back``).
RESTORED_TTL = 10.0

# KEYS: per zone its seq and history key. Per zone that has a seq: its (1-based) index
# in the chunk, the seq and the whole retained history; zones without one are skipped;
# a zone whose keys are damaged has seq -1 and no history.
LOAD_LUA = STORED_LUA + """
local out = {}
for i = 1, #KEYS, 2 do
  local seq = stored(KEYS[i], KEYS[i + 1])
  if seq then
    out[#out + 1] = (i + 1) / 2
    out[#out + 1] = seq
    out[#out + 1] = seq < 0 and {} or redis.call('ZRANGE', KEYS[i + 1], 0, -1)
  end
end
return out
"""

# KEYS: epoch. ARGV: expected, replacement, channel. Compare-and-set, announced to all.
REPLACE_EPOCH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PUBLISH', ARGV[3], '!epoch ' .. ARGV[2])
end
return redis.call('GET', KEYS[1])
"""


def connect_client(url: str, *, timeout: float) -> aioredis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``
    (``redis+cluster://``: ``pricehub.storage.cluster.connect_any``).

    Short socket timeouts and no driver retries: a failing Redis must surface at once
    so the instance fails over to memory within a second, instead of the driver
    silently retrying (and reconnecting a subscriber that missed messages).
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, options)
    return aioredis.Redis.from_url(url, **options)


def _sentinel_client(url: str, options: dict[str, Any]) -> aioredis.Redis:
    """``redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]``."""
    parts = urlsplit(url)
    hosts: list[tuple[str, int]] = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        hosts.append((host, int(port or 26379)))
    path = [segment for segment in parts.path.split("/") if segment]
    service = path[0] if path else "mymaster"
    db = int(path[1]) if len(path) > 1 else 0
    password = unquote(parts.password) if parts.password else None
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel = Sentinel(
        hosts,
        sentinel_kwargs={
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "password": sentinel_password,
        },
        **options,
    )
    client: aioredis.Redis = sentinel.master_for(service, db=db, password=password)
    return client


@contextlib.asynccontextmanager
async def redis_errors(what: str) -> AsyncIterator[None]:
    """Turn any driver or socket failure into ``StorageUnavailable``."""
    try:
        yield
    # RedisClusterException (no reachable node, a slot not covered) is no RedisError.
    except (RedisError, RedisClusterException, OSError) as exc:  # TimeoutError: OSError
        raise StorageUnavailable(f"redis {what}: {exc!r}") from exc


RESTORE_DAMAGED = 2  # RESTORE_LUA's reply for a zone whose keys are damaged

# After RESTORE_LUA, in the same MULTI (``restore``'s ``entries``): the stream entries
# that ingest turned into prices Redis now holds are acknowledged and deleted, so that
# none is applied again. A promotion that lost replication loses an entry's XACK (and
# XDEL) with its price; written back from an instance's mirror, the price is there
# again, and the entry, still pending or not even delivered on the new master, would be
# read and appended a second time, under a new seq. Only where Redis holds exactly our
# payload at that seq: a diverged seq's price is declared lost (the epoch changes), and
# its entry is then rightly applied again in the new epoch.
# KEYS: history, stream. ARGV: group, then (seq, entry id, payload) triples.
SETTLE_INGESTED_LUA = """
local settled = 0
for i = 2, #ARGV, 3 do
  local held = redis.call('ZRANGE', KEYS[1], ARGV[i], ARGV[i], 'BYSCORE')
  if held[1] == ARGV[i + 2] then
    redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[i + 1])
    settled = settled + redis.call('XDEL', KEYS[2], ARGV[i + 1])
  end
end
return settled
"""


def _refusal(error: BaseException) -> str | None:
    """Why a zone's keys refused an append (ZONE_ERROR), or None for any other error."""
    text = str(error)
    if isinstance(error, ResponseError) and text.startswith(ZONE_ERROR):
        return text[len(ZONE_ERROR) + 1 :]
    return None


def _seq_or_none(raw: Any) -> int | None:
    """A zone's seq key as read (bytes or None: 0), None when it is no integer."""
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return None


def _price(zone: str, payload: bytes) -> StoredPrice:
    return StoredPrice(zone, seq_of(payload), payload)


def _parse_message(data: bytes) -> tuple[str, StoredPrice | None]:
    """``<epoch> <zone> <payload>`` from the prices channel; ``None`` for anything
    else (a stray PUBLISH must be dropped, not crash the subscriber into a failover)."""
    epoch, _, rest = data.partition(b" ")
    zone, _, payload = rest.partition(b" ")
    price = _parse_price(zone, payload)
    return ("", None) if price is None else (epoch.decode(errors="replace"), price)


def _parse_price(zone: bytes, payload: bytes) -> StoredPrice | None:
    try:
        if not payload.startswith(b'{"seq":'):
            return None
        return _price(zone.decode(), payload)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None


_MAX_ID_PART = 2**64 - 1


def next_stream_id(entry_id: str) -> str:
    """The smallest stream id above ``entry_id`` (``ms-seq``): ``XTRIM MINID`` with it
    removes that entry and everything older. Python's ints, not Lua's doubles: both
    parts are 64-bit."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) < _MAX_ID_PART:
        return f"{ms}-{int(seq) + 1}"
    return f"{int(ms) + 1}-0"


def _database(client: aioredis.Redis) -> int:
    """The database number the client selected (``/N`` or ``?db=N`` of the URL)."""
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


@dataclass(slots=True)
class _Write:
    zone: str
    body: bytes
    ack: IngestAck | None
    future: asyncio.Future[StoredPrice]
    # For an ingest write, the call it came from (``append_outcomes``' acks, or a token
    # per ``append``): only one call's entries are a run of the stream. None otherwise.
    call: object = None


def _groups(batch: Sequence[_Write]) -> list[list[_Write]]:
    """Consecutive writes that can share one script: HTTP prices (none of them ingest),
    or the ingest entries of one call. Never ingest and HTTP together (a lost lease must
    refuse only the stream entries), nor two calls' entries: retries of two batches in
    flight, one price each, can meet in one pipeline, and the script checks stream order
    and trims the stream from the group's first and last entry, as if it were a run."""
    groups: list[list[_Write]] = []
    for write in batch:
        last = groups[-1][-1] if groups else None
        if last is not None and last.call is write.call:
            groups[-1].append(write)
        else:
            groups.append([write])
    return groups


def announce_gap(listener: object, zone: str, from_seq: int, to_seq: int) -> None:
    """Tell ``listener`` that seqs ``from_seq..to_seq`` of ``zone`` will never be
    delivered (the broadcaster says ``gap`` ``lost`` to the zone's subscribers). Optional:
    a listener without ``on_gap`` (the failover's mirror, which finds the hole itself;
    the storage tests' recorders) hears nothing."""
    on_gap = getattr(listener, "on_gap", None)
    if on_gap is not None:
        on_gap(zone, from_seq, to_seq)


class RedisStorage:
    """The ``Storage`` Protocol on Redis.

    :param url: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL.
    :param key_prefix: prefix of every key and channel (default ``pricehub:``).
    :param history_size: prices retained per zone (default 1000).
    :param timeout: socket timeout in seconds (default 0.5); the subscriber liveness
        probe allows ``2 * timeout``.
    :param probe_interval: seconds between subscriber liveness probes (default 1).
    :param on_lost: called once, with the cause, when this storage stops being usable
        (subscriber closed or silent, or a failed write); default: nothing.
    :param log: structlog logger for listener failures (default ``pricehub.storage``).
    """

    backend = Backend.REDIS
    # Ingest batches the consumer may keep in flight: the append script refuses an entry
    # while an older one is pending (``OlderEntryPending``), so order holds whatever fails.
    ingest_depth = 2
    # Hooks for RedisClusterStorage (pricehub.storage.cluster): the write-back script and
    # the channel a zone's prices are published on.
    _restore_script = RESTORE_LUA

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "pricehub:",
        history_size: int = 1000,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        on_lost: Callable[[RedisStorage, BaseException], None] | None = None,
        log: Any = None,
    ) -> None:
        self.keys = KeyLayout(key_prefix)
        self._url = url
        self._history_size = history_size
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._on_lost = on_lost
        self._log = log or structlog.get_logger("pricehub.storage")
        self._token = uuid.uuid4().hex  # names this connection's probe channel
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._append_sha = ""
        self._append_many_sha = ""
        self._epoch: str | None = None
        self._listener: StorageListener | None = None
        # Last seq delivered per zone; a zone missing here takes whatever comes first.
        self._positions: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        # The write connection (appends only) and its pipelines sent and not yet
        # answered, oldest first, with the task reading their replies.
        self._writer: AbstractConnection | None = None
        self._in_flight: deque[list[list[_Write]]] = deque()
        self._replied = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._activity = asyncio.Event()
        self._lost: BaseException | None = None
        self.gaps = 0  # updates that arrived after a hole the history could not fill
        self.foreign_messages = 0  # dropped: not this feed's lineage, or not a price
        self.damaged_zones = 0  # prices (or zone states) refused: that zone's keys are damaged

    # --- lifecycle --------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        if self._epoch is None:
            raise StorageUnavailable("redis storage not started")
        return self._epoch

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None or self._lost is not None:
            raise StorageUnavailable("redis connection not available")
        return self._client

    async def start(self, listener: StorageListener) -> None:
        await self.connect()
        await self.claim_epoch(uuid.uuid4().hex[:12])
        self.deliver_to(listener, {})

    async def connect(self) -> None:
        """Connect, load the scripts and subscribe; messages wait until ``deliver_to``."""
        client = connect_client(self._url, timeout=self._timeout)
        self._client = client
        self.keys = KeyLayout(self.keys.prefix, db=_database(client))
        try:
            async with redis_errors("connect"):
                await client.ping()
                self._append_sha = await client.script_load(APPEND_LUA)
                self._append_many_sha = await client.script_load(APPEND_MANY_LUA)
                pubsub = self._pubsub = client.pubsub()
                await pubsub.subscribe(self.keys.prices, self.keys.probe(self._token))
                await self._await_subscribed(pubsub, count=2)
        except BaseException:
            await self.close()
            raise

    async def _await_subscribed(self, pubsub: PubSub, *, count: int) -> None:
        # SUBSCRIBE only counts once Redis confirms it; reading state before that could
        # miss a price published in between.
        confirmed = 0
        async with asyncio.timeout(2 * self._timeout):
            while confirmed < count:
                message = await pubsub.get_message(timeout=self._timeout)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1

    def deliver_to(self, listener: StorageListener, positions: Mapping[str, int]) -> None:
        """Start delivering prices, dropping those at or below ``positions``."""
        self._listener = listener
        self._positions = dict(positions)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]

    async def close(self) -> None:
        tasks = [*self._tasks, *(task for task in (self._flusher, self._reader) if task)]
        self._tasks, self._flusher, self._reader = [], None, None
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task cancelled inside a redis-py read can fail to end.
            await asyncio.wait(tasks, timeout=2 * self._timeout)
        self._fail_pending(StorageUnavailable("redis storage closed"))
        # Sent, reply unread: Redis may have stored them. Plain StorageUnavailable would
        # say "not written", and a retry would store such a price twice (issue 23).
        self._fail_in_flight(WriteInDoubt("redis storage closed with the append sent"))
        await self._drop_writer()
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        for resource in (pubsub, client):
            if resource is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._timeout):
                        await resource.aclose()

    def _mark_lost(self, cause: BaseException) -> None:
        if self._lost is not None:
            return
        self._lost = cause
        if self._on_lost is not None:
            self._on_lost(self, cause)

    def ingest_source(self) -> IngestSource | None:
        return None  # the ingest runs on FailoverStorage, which create_storage gives

    @property
    def ingest_keys(self) -> IngestKeys:
        return self.keys.ingest_keys

    def counters(self) -> StorageCounters:
        """What this connection counted: the prices after a hole no history could fill
        and the foreign messages dropped (failovers and the like are the owner's)."""
        return StorageCounters(gaps=self.gaps, foreign_messages=self.foreign_messages)

    def disk_status(self) -> DiskStatus:
        """Redis keeps nothing on this instance's disk (as the failover's inner backend,
        the failover reports its mirror's journal instead)."""
        return DiskStatus(DiskState.DISABLED)

    async def check(self) -> None:
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        async with redis_errors("ping"):
            await self.client.ping()

    # --- subscriber -------------------------------------------------------------------

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        prices_channel = self.keys.prices.encode()
        try:
            async for message in pubsub.listen():
                self._activity.set()
                if message["type"] == "message" and message["channel"] == prices_channel:
                    await self._on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the subscriber means it is lost
            self._mark_lost(exc)
        else:
            self._mark_lost(StorageUnavailable("redis subscriber stopped"))

    async def _on_message(self, data: bytes) -> None:
        listener = self._listener
        assert listener is not None
        if data.startswith(EPOCH_MESSAGE):
            epoch = data[len(EPOCH_MESSAGE) :].decode(errors="replace")
            if epoch != self._epoch:  # our own claim's announcement changes nothing
                self._epoch = epoch
                listener.on_epoch_changed(epoch)
            return
        if data.startswith(MANY_MESSAGE):
            await self._on_many(listener, data)
            return
        epoch, price = _parse_message(data)
        await self._on_price_message(listener, data, epoch, price)

    async def _on_many(self, listener: StorageListener, data: bytes) -> None:
        """``!many <epoch>`` then one ``<zone> <payload>`` line per price of a batch."""
        header, _, body = data.partition(b"\n")
        epoch = header[len(MANY_MESSAGE) :].decode(errors="replace")
        positions = self._positions
        for line in body.split(b"\n"):
            zone, _, payload = line.partition(b" ")
            price = _parse_price(zone, payload)
            # Fast path, no coroutine per price: our lineage and the zone's next seq (or
            # its first), which is every price of a burst unless something went wrong.
            if price is not None and epoch == self._epoch:
                last = positions.get(price.zone)
                if last is None or price.seq == last + 1:
                    positions[price.zone] = price.seq
                    self._deliver(listener, price)
                    continue
            await self._on_price_message(listener, line, epoch, price)

    async def _on_price_message(
        self, listener: StorageListener, data: bytes, epoch: str, price: StoredPrice | None
    ) -> None:
        """One price: delivered in seq order, holes filled from the history; anything not
        of this feed's lineage is dropped and counted."""
        last = None if price is None else self._positions.get(price.zone)
        if price is None or epoch != self._epoch:
            if price is not None and last is not None and price.seq <= last:
                return  # a stale echo of our own feed from before an epoch change
            self._foreign(data)
            return
        if last is not None:
            if price.seq <= last:
                return  # already delivered (catch-up or a restore's echo)
            if price.seq > last + 1:
                await self._fill_gap(listener, price.zone, last, price.seq)
        self._positions[price.zone] = price.seq
        self._deliver(listener, price)

    def _foreign(self, data: bytes) -> None:
        """Not a price of this feed: never delivered, always counted, logged (throttled).
        The ``gaps`` counter must not be the only trace of another feed's data."""
        self.foreign_messages += 1
        if self.foreign_messages <= LOGGED_FOREIGN or self.foreign_messages % 1000 == 0:
            self._log.warning(
                "storage_foreign_message", channel=self.keys.prices, epoch=self._epoch,
                message=data[:80].decode(errors="replace"), total=self.foreign_messages,
            )  # fmt: skip

    def _deliver(self, listener: StorageListener, price: StoredPrice) -> None:
        # A listener bug must show up as such, not as a lost Redis (and a failover).
        try:
            listener.on_price(price)
        except Exception:
            self._log.exception("storage_listener_failed", zone=price.zone, seq=price.seq)

    async def _fill_gap(self, listener: StorageListener, zone: str, last: int, seq: int) -> None:
        """Deliver the prices between ``last`` and ``seq`` from the history, in order:
        blocking the reader keeps everything after them waiting in the socket."""
        missing = await self.since(zone, last)
        if missing is None or not missing or missing[0].seq != last + 1:
            self.gaps += 1
            announce_gap(listener, zone, last + 1, seq - 1)
            return
        for price in missing:
            if price.seq >= seq:
                break
            self._deliver(listener, price)

    async def _watch(self) -> None:
        """Liveness of the subscriber: a probe to our own channel must come back."""
        try:
            while True:
                await asyncio.sleep(self._probe_interval)
                # Any message counts, not just the probe: a busy reader may lag behind
                # its socket, yet a connection that keeps delivering is alive.
                self._activity.clear()
                async with redis_errors("probe"):
                    await self.client.publish(self.keys.probe(self._token), b"probe")
                try:
                    async with asyncio.timeout(2 * self._timeout):
                        await self._activity.wait()
                except TimeoutError:
                    # After a long loop stall the deadline and the reader's wake-up are
                    # due together: let the reader run before calling the link dead.
                    await asyncio.sleep(0)
                    if not self._activity.is_set():
                        raise StorageUnavailable(
                            f"redis subscriber silent for {2 * self._timeout:g} s"
                        ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._mark_lost(exc)

    # --- writes -----------------------------------------------------------------------

    async def append(
        self, zone: str, body: bytes, *, ack: IngestAck | None = None
    ) -> StoredPrice:
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        future: asyncio.Future[StoredPrice] = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(zone, body, ack, future, None if ack is None else object()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def append_many(self, items: Sequence[tuple[str, bytes]]) -> list[StoredPrice]:
        """``append`` for a batch, in order: one script per price (each atomic, so the
        per-zone seq order and exactly-once hold as for ``append``), all queued at once
        so they leave in ``ceil(N / MAX_PIPELINE)`` round trips. Raises the first error
        once every price of the batch is settled."""
        outcomes = await self.append_outcomes(items)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(list[StoredPrice], outcomes)

    async def append_outcomes(
        self, items: Sequence[tuple[str, bytes]], *, acks: Sequence[IngestAck] | None = None
    ) -> list[StoredPrice | BaseException]:
        """Per price of the batch, its ``StoredPrice`` or the error that refused it.

        ``acks[i]`` (ingest) rides in price i's script. A failure does not stop the
        prices after it from being sent (they are in the same pipeline), which keeps
        stream order: a lost lease or a changed epoch refuses every later script too.
        """
        if self._lost is not None:
            raise StorageUnavailable(f"redis lost: {self._lost!r}")
        loop = asyncio.get_running_loop()
        writes = [
            _Write(zone, body, None if acks is None else acks[index], loop.create_future(), acks)
            for index, (zone, body) in enumerate(items)
        ]
        self._pending.extend(writes)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        outcomes: list[StoredPrice | BaseException] = []
        for write in writes:
            # Sequential awaits, not gather: once the first is done the rest mostly are,
            # and awaiting a done future costs no loop turn.
            try:
                outcomes.append(await write.future)
            except StorageError as exc:
                outcomes.append(exc)
        return outcomes

    async def _flush(self) -> None:
        """Send queued appends, many per pipeline, in the order they were made, without
        waiting for one pipeline's replies before sending the next (up to
        ``MAX_IN_FLIGHT``): Redis works through them back to back while this process
        handles the replies and messages of the previous ones. One connection, so Redis
        runs them in the order sent; ``_read_replies`` settles them in that order."""
        try:
            writer = await self._write_connection()
        except StorageUnavailable as exc:
            self._fail_pending(exc)
            self._mark_lost(exc)
            return
        while self._pending:
            while len(self._in_flight) >= MAX_IN_FLIGHT:
                self._replied.clear()
                await self._replied.wait()
            if self._lost is not None:
                self._fail_pending(StorageUnavailable(f"redis lost: {self._lost!r}"))
                return
            batch, self._pending = self._pending[:MAX_PIPELINE], self._pending[MAX_PIPELINE:]
            groups = self._groups(batch)
            self._in_flight.append(groups)
            try:
                async with redis_errors("append"):
                    packed = writer.pack_commands([self._script_call(g) for g in groups])
                    await writer.send_packed_command(packed, check_health=False)
            except StorageUnavailable as exc:
                # Maybe partly sent: this pipeline and those before it are in doubt.
                self._write_failed(WriteInDoubt(str(exc)))
                return
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        try:
            await self._read_each_reply()
        except Exception as exc:
            # Whatever stopped the reader, no append in flight may wait for ever.
            self._write_failed(WriteInDoubt(f"redis reply reader failed: {exc!r}"))
            raise

    async def _read_each_reply(self) -> None:
        writer = self._writer
        while self._in_flight and writer is not None:
            groups = self._in_flight[0]
            results: list[Any] = []
            try:
                async with redis_errors("append"):
                    for _ in groups:
                        try:
                            results.append(await writer.read_response())
                        except ResponseError as exc:  # one script refused: the others ran
                            results.append(exc)
            except StorageUnavailable as exc:
                self._write_failed(WriteInDoubt(str(exc)))  # sent, replies lost
                return
            self._in_flight.popleft()
            self._replied.set()
            for group, result in zip(groups, results, strict=True):
                self._settle(group, result)

    def _write_failed(self, error: WriteInDoubt) -> None:
        """The write connection failed: what was sent is in doubt (the owner looks each
        price up), what was not is refused as not written, and the storage is lost."""
        self._fail_in_flight(error)
        self._fail_pending(StorageUnavailable(f"redis lost: {error}"))
        self._mark_lost(error)
        self._replied.set()
        # redis-py closed its socket already (it disconnects on any send or read error);
        # the pool's ``aclose`` in ``close`` finishes it.
        self._writer = None

    async def _write_connection(self) -> AbstractConnection:
        if self._writer is None:
            async with redis_errors("connect"):
                pool = self.client.connection_pool
                writer = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._writer = cast(AbstractConnection, writer)
        return self._writer

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.disconnect(nowait=True)

    def _settle(self, group: Sequence[_Write], result: Any) -> None:
        """Resolve one script's writes with its reply: "<accepted_at> <seq>",
        "<accepted_at> s1,s2,..." (a price its zone's keys refused has "!<why>" in its
        place) or an error. Each write gets its price as Redis stored it."""
        if isinstance(result, BaseException):
            why = _refusal(result)
            if why is not None and len(group) == 1:
                self._fail_writes(group, self._zone_damaged(group[0].zone, why))
            else:
                self._fail_writes(group, self._write_error(result))
            return
        accepted_at, _, numbers = result.partition(b" ")
        seqs: list[int | bytes]
        if len(group) == 1:
            seqs = [int(numbers)]
        elif b"!" in numbers:  # rare: checked once per reply, not per price
            seqs = [seq if seq[:1] == b"!" else int(seq) for seq in numbers.split(b",")]
        else:
            seqs = [int(seq) for seq in numbers.split(b",")]
        for write, seq in zip(group, seqs, strict=True):
            if write.future.done():
                continue
            if isinstance(seq, int):
                payload = with_seq(write.body, seq, accepted_at)
                write.future.set_result(StoredPrice(write.zone, seq, payload))
            else:
                write.future.set_exception(
                    self._zone_damaged(write.zone, seq[1:].decode(errors="replace"))
                )

    def _zone_damaged(self, zone: str, why: str) -> ZoneRefused:
        """``zone``'s keys are damaged (see STORE_LUA): its price is refused, or its state
        left out of a load or restore; logged (throttled) and counted. The connection and
        every other zone are fine: nothing is lost, no failover."""
        self.damaged_zones += 1
        if self.damaged_zones <= LOGGED_DAMAGED or self.damaged_zones % 1000 == 0:
            self._log.error(
                "storage_zone_damaged", zone=zone, reason=why, total=self.damaged_zones
            )
        return ZoneRefused(zone, why)

    @staticmethod
    def _groups(batch: Sequence[_Write]) -> list[list[_Write]]:
        """Hook (RedisClusterStorage: one price per script, a batch spans slots)."""
        return _groups(batch)

    def _script_call(self, group: Sequence[_Write]) -> tuple[str | bytes | int, ...]:
        """The EVALSHA of one group: a lone price is an APPEND_LUA (its message is the
        per-price one), several are one APPEND_MANY_LUA."""
        if len(group) > 1:
            script_keys, args = self._many_args(group)
            return ("EVALSHA", self._append_many_sha, len(script_keys), *script_keys, *args)
        keys, write = self.keys, group[0]
        zone = write.zone
        script_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone), keys.epoch]
        one: list[str | bytes | int] = [
            write.body, self._history_size, keys.prices, zone, self.epoch,
        ]  # fmt: skip
        if write.ack is not None:
            script_keys += [keys.ingest_lease, keys.ingest]
            one += [write.ack.consumer, INGEST_GROUP, write.ack.entry_id]
        return ("EVALSHA", self._append_sha, len(script_keys), *script_keys, *one)

    def _many_args(self, group: Sequence[_Write]) -> tuple[list[str], list[str | bytes | int]]:
        """APPEND_MANY_LUA's KEYS and ARGV for a group (see the script)."""
        keys = self.keys
        ack = group[0].ack
        args: list[str | bytes | int] = [
            self._history_size, keys.prices, self.epoch,
            "" if ack is None else ack.consumer, INGEST_GROUP,
            keys.seq(""), keys.history(""), keys.latest(""),
            b"\n".join([
                b"%s %s %s" % (write.zone.encode(),
                               b"" if write.ack is None else write.ack.entry_id.encode(),
                               write.body)
                for write in group
            ]),
        ]  # fmt: skip
        last = group[-1].ack
        if last is not None:  # a group's writes all carry acks (_groups), or none do
            args.append(next_stream_id(last.entry_id))
        return [keys.epoch, keys.ingest_lease, keys.ingest], args

    def _write_error(self, error: BaseException) -> StorageError:
        text = str(error)
        if isinstance(error, ResponseError) and text.startswith("PRICEHUB_LEASE"):
            return LeaseLost(text)
        if isinstance(error, ResponseError) and text.startswith("PRICEHUB_ORDER"):
            return OlderEntryPending(text)
        if isinstance(error, ResponseError) and text.startswith("PRICEHUB_EPOCH"):
            # Refused, nothing written, and the connection is fine: the owner
            # reconciles and retries (it must not fail over to numbering alone).
            return EpochChanged(text)
        cause = StorageUnavailable(f"redis append: {error!r}")
        self._mark_lost(cause)
        return cause

    @staticmethod
    def _fail_writes(batch: Iterable[_Write], error: BaseException) -> None:
        for write in batch:
            if not write.future.done():
                write.future.set_exception(error)

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, []
        self._fail_writes(pending, error)

    def _fail_in_flight(self, error: BaseException) -> None:
        in_flight, self._in_flight = self._in_flight, deque()
        for groups in in_flight:
            for group in groups:
                self._fail_writes(group, error)

    # --- reads ------------------------------------------------------------------------

    async def latest(self, zone: str) -> StoredPrice | None:
        async with redis_errors("latest"):
            payload = cast(bytes | None, await self.client.get(self.keys.latest(zone)))
        return None if payload is None else _price(zone, payload)

    async def history(self, zone: str, *, limit: int) -> list[StoredPrice]:
        if limit <= 0:
            return []
        async with redis_errors("history"):
            payloads = cast(
                list[bytes], await self.client.zrange(self.keys.history(zone), -limit, -1)
            )
        return [_price(zone, payload) for payload in payloads]

    async def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.seq(zone))
        pipe.zrange(self.keys.history(zone), f"({seq}", "+inf", byscore=True)
        async with redis_errors("since"):
            current_raw, payloads = await pipe.execute(raise_on_error=False)
        current = _seq_or_none(current_raw)
        if current is None or isinstance(payloads, ResponseError) or seq > current:
            return None  # a zone whose keys are damaged cannot replay either
        prices = [_price(zone, payload) for payload in payloads]
        # A retained history with a hole (bounded write-back after an outage) cannot
        # replay across it: that is a gap, not a short answer.
        if any(price.seq != seq + 1 + index for index, price in enumerate(prices)):
            return None
        if len(prices) != current - seq:
            return None
        return prices

    async def snapshot(self, zones: Sequence[str]) -> Snapshot:
        """One ``MGET`` on one node (one instant); per zone, pipelined, on a cluster
        (``redis_reads.snapshot``). A snapshot under another epoch than ours (Redis lost
        its data, or a peer moved the lineage) is refused as ``EpochChanged``: its seqs
        are no cursor of the stream this instance delivers."""
        async with redis_errors("snapshot"):
            found = await redis_reads.snapshot(self.client, self.keys, zones)
        if found.epoch != self.epoch:
            raise EpochChanged(f"redis holds epoch {found.epoch or 'none'}, not ours")
        return found

    async def history_between(
        self, zones: Sequence[str], start: str, end: str, *, limit: int
    ) -> HistorySlice:
        """One Lua script on one node; one per zone, pipelined, on a cluster."""
        async with redis_errors("history"):
            return await redis_reads.history_between(
                self.client, self.keys, zones, start, end, limit=limit
            )

    # --- instance registry ------------------------------------------------------------

    async def register_instance(
        self, instance_id: str, snapshot: bytes, *, ttl: float, mirror: str | None = None
    ) -> None:
        """``mirror``: the id of the copy this instance keeps (``FailoverStorage``),
        registered with the same TTL (``instance_mirrors``)."""
        pipe = self.client.pipeline(transaction=True)
        expiry = max(1, int(ttl * 1000))
        pipe.set(self.keys.instance(instance_id), snapshot, px=expiry)
        if mirror is not None:
            pipe.set(self.keys.instance_mirror(instance_id), mirror, px=expiry)
        pipe.sadd(self.keys.instances, instance_id)
        async with redis_errors("register"):
            await pipe.execute()

    async def unregister_instance(self, instance_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.instance(instance_id), self.keys.instance_mirror(instance_id))
        pipe.srem(self.keys.instances, instance_id)
        async with redis_errors("unregister"):
            await pipe.execute()

    async def instance_mirrors(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """The mirror id each of ``instance_ids`` registered (left out: none)."""
        ids = list(instance_ids)
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for instance_id in ids:
            pipe.get(self.keys.instance_mirror(instance_id))
        async with redis_errors("instances"):
            found = cast(list[bytes | None], await pipe.execute())
        return {i: m.decode() for i, m in zip(ids, found, strict=True) if m is not None}

    async def instances(self) -> dict[str, bytes]:
        """The set names every instance that registered; its snapshot key expires by
        TTL, so a crashed instance disappears without a scan (and is pruned here)."""
        client = self.client
        async with redis_errors("instances"):
            registered = cast(set[bytes], await client.smembers(self.keys.instances))
            members = sorted(member.decode() for member in registered)
            if not members:
                return {}
            snapshots = cast(
                list[bytes | None],
                await client.mget([self.keys.instance(member) for member in members]),
            )
            expired = [m for m, snap in zip(members, snapshots, strict=True) if snap is None]
            if expired:
                await client.srem(self.keys.instances, *expired)
        return {m: snap for m, snap in zip(members, snapshots, strict=True) if snap is not None}

    # --- recovery primitives (used by FailoverStorage) --------------------------------

    async def claim_epoch(self, candidate: str) -> str:
        """Set the epoch to ``candidate`` unless Redis has one; write under the result.
        A claim that sets it also starts the restored set (``written_back``)."""
        keys = self.keys
        async with redis_errors("epoch"):
            current = await self.client.eval(
                CLAIM_EPOCH_LUA, 2, keys.epoch, keys.restored, candidate, keys.prices,
                int(RESTORED_TTL * 1000),
            )  # fmt: skip
        self._epoch = current.decode()
        return self._epoch

    async def written_back(self, mirror: str = "") -> frozenset[str] | None:
        """Whether Redis was found empty in the last ``RESTORED_TTL`` seconds (its epoch
        claimed anew): then the mirrors that have written back into it since, ``mirror``
        added first (``""``: only look); None when it was not."""
        async with redis_errors("epoch"):
            members = await self.client.eval(WRITTEN_BACK_LUA, 1, self.keys.restored, mirror)
        if members is None:
            return None
        return frozenset(m.decode() for m in cast(list[bytes], members)) - {""}

    async def replace_epoch(self, expected: str, replacement: str) -> str:
        """Compare-and-set the epoch, announcing a change to every instance."""
        async with redis_errors("epoch"):
            current = await self.client.eval(
                REPLACE_EPOCH_LUA, 1, self.keys.epoch, expected, replacement, self.keys.prices
            )
        self._epoch = current.decode()
        return self._epoch

    async def restore(
        self,
        local: Mapping[str, tuple[int, Sequence[StoredPrice]]],
        *,
        entries: Mapping[str, Mapping[int, str]] | None = None,
    ) -> dict[str, bool]:
        """Per zone ``(last seq, retained prices)``: write back what Redis lacks and
        raise its seq to ours; returns, per zone, whether the numbering diverged.

        ``entries``: per zone, the ingest stream entry each ingested price came from
        (by seq), so that none is applied again: on one node settled in the same
        transaction (``SETTLE_INGESTED_LUA``); on a cluster, which cannot run one
        across the stream's slot and a zone's, the zone's last applied entry is
        raised in its restore script (``RESTORE_LUA``), which its append script skips
        up to (and then acknowledges)."""
        zones = [zone for zone, (last, _) in local.items() if last > 0]
        if not zones:
            return {}
        keys, entries = self.keys, entries or {}
        cluster = isinstance(self.client, AsyncRedisCluster)
        settle = [] if cluster else self._settle_calls(local, zones, entries)
        pipe = self.client.pipeline(transaction=bool(settle))
        for zone in zones:
            last, prices = local[zone]
            pairs = [item for price in prices for item in (price.seq, price.payload)]
            ids = entries.get(zone, {})
            ingested = ",".join(f"{p.seq} {ids[p.seq]}" for p in prices if p.seq in ids)
            zone_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone)]
            if cluster and ingested:
                zone_keys.append(keys.ingested(zone))
            pipe.eval(
                self._restore_script, len(zone_keys), *zone_keys, self._history_size,
                self._channel(zone), zone, last, self.epoch, ingested, *pairs,
            )  # fmt: skip
        for args in settle:
            pipe.eval(SETTLE_INGESTED_LUA, 2, *args)
        async with redis_errors("restore"):
            results = await pipe.execute()
        diverged: dict[str, bool] = {}
        for zone, result in zip(zones, results[: len(zones)], strict=True):
            if result == RESTORE_DAMAGED:  # nothing written back: logged, not diverged
                self._zone_damaged(zone, f"{self._damage(zone)}; not written back")
            diverged[zone] = result == 1
        return diverged

    def _settle_calls(
        self,
        local: Mapping[str, tuple[int, Sequence[StoredPrice]]],
        zones: Sequence[str],
        entries: Mapping[str, Mapping[int, str]],
    ) -> list[list[Any]]:
        """The ``SETTLE_INGESTED_LUA`` arguments of ``restore``, one list per zone with
        ingested prices among those written back."""
        if not entries:
            return []
        calls: list[list[Any]] = []
        for zone in zones:
            ids = entries.get(zone)
            if not ids:
                continue
            triples = [
                item for price in local[zone][1] if price.seq in ids
                for item in (price.seq, ids[price.seq], price.payload)
            ]  # fmt: skip
            if triples:
                calls.append([self.keys.history(zone), self.keys.ingest, INGEST_GROUP, *triples])
        return calls

    def _damage(self, zone: str) -> str:
        """What STORED_LUA found wrong with a zone (it says no more than that)."""
        return f"{self.keys.seq(zone)} is no seq or {self.keys.history(zone)} no sorted set"

    def _channel(self, zone: str) -> str:
        """The channel ``zone``'s prices are published on (one for all zones here)."""
        return self.keys.prices

    async def load(self, zones: Iterable[str]) -> dict[str, tuple[int, list[StoredPrice]]]:
        """The seq and retained history of every zone that has a seq (zones without one
        are left out: they have nothing to load).

        One ``LOAD_LUA`` per ``LOAD_CHUNK`` zones: a script is atomic, so a zone's seq
        and history agree (different zones need not: positions are per zone), and the
        reply holds only zones with prices, so 100,000 fresh zones cost a few calls
        instead of 200,000 commands and replies.
        """
        zone_list = list(zones)
        keys = self.keys
        state: dict[str, tuple[int, list[StoredPrice]]] = {}
        for start in range(0, len(zone_list), LOAD_CHUNK):
            chunk = zone_list[start : start + LOAD_CHUNK]
            script_keys = [key for zone in chunk for key in (keys.seq(zone), keys.history(zone))]
            async with redis_errors("load"):
                reply = await self.client.eval(LOAD_LUA, len(script_keys), *script_keys)
            for i in range(0, len(reply), 3):
                zone, seq = chunk[int(reply[i]) - 1], int(reply[i + 1])
                if seq < 0:  # damaged: left out (as a zone without prices), logged
                    self._zone_damaged(zone, f"{self._damage(zone)}; not loaded")
                    continue
                state[zone] = (seq, [_price(zone, p) for p in reply[i + 2]])
        return state
