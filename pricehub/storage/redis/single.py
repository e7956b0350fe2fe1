"""``SingleNode``: the ``Topology`` of one Redis (or a Sentinel-watched one).

* one client (``urls.connect_client``) and one SUBSCRIBE connection for every zone's
  prices (``KeyLayout.prices``) and this connection's probe channel;
* appends pipelined on one write connection: several pipelines sent ahead of their
  replies (up to ``MAX_IN_FLIGHT``), each holding up to ``MAX_PIPELINE`` appends,
  consecutive ones sharing one ``lua/append_many.lua`` (``writer.groups``), the ingest
  acknowledgement inside the script;
* every zone's state loaded by ``lua/load.lua``, ``LOAD_CHUNK`` zones per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from pricehub.storage.errors import StorageError, StorageUnavailable
from pricehub.storage.redis.errors import WriteInDoubt, redis_errors
from pricehub.storage.redis.keys import INGEST_GROUP, KeyLayout
from pricehub.storage.redis.reads import stored_price
from pricehub.storage.redis.scripts import (
    APPEND,
    APPEND_MANY,
    LOAD,
    REPLACE_EPOCH,
    RESTORE,
    Arg,
    Script,
)
from pricehub.storage.redis.topology import Host, Settings, ZoneState
from pricehub.storage.redis.urls import connect_client
from pricehub.storage.redis.writer import (
    RawConnection,
    Write,
    fail_writes,
    groups,
    next_stream_id,
)

__all__ = ["LOAD_CHUNK", "MAX_IN_FLIGHT", "MAX_PIPELINE", "SingleNode"]

MAX_PIPELINE = 512  # appends per pipeline (one lua/append_many.lua, usually)
# Pipelines sent on the write connection ahead of their replies. Bounds what is in doubt
# when the connection fails (and so looked up one by one): 4 x 512 prices.
MAX_IN_FLIGHT = 4
LOAD_CHUNK = 2000  # zones per lua/load.lua call when loading every zone (start, recovery)


def _database(client: aioredis.Redis) -> int:
    """The database number the client selected (``/N`` or ``?db=N`` of the URL)."""
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


class SingleNode:
    """One node: one subscriber, one pipelined write connection."""

    # The append script refuses an entry while an older one is pending
    # (``OlderEntryPending``), so order holds whatever fails: two batches may fly.
    ingest_depth = 2
    restore_script: Script = RESTORE

    def __init__(self) -> None:
        self._pubsub: PubSub | None = None
        self._activity = asyncio.Event()
        # The write connection (appends only) and its pipelines sent and not yet
        # answered, oldest first, with the task reading their replies.
        self._writer: RawConnection | None = None
        self._in_flight: deque[list[list[Write]]] = deque()
        self._replied = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pipelines_in_flight(self) -> int:
        """Pipelines sent whose replies are not read yet (tests watch the window)."""
        return len(self._in_flight)

    # --- connection -------------------------------------------------------------------

    def connect(self, settings: Settings) -> aioredis.Redis:
        return connect_client(settings.url, timeout=settings.timeout)

    def layout(self, prefix: str, client: aioredis.Redis) -> KeyLayout:
        return KeyLayout(prefix, db=_database(client))

    def channel(self, keys: KeyLayout, zone: str) -> str:
        return keys.prices  # one channel for every zone

    async def open(self, host: Host) -> None:
        client, keys = host.client, host.keys
        await client.ping()
        # The writer sends them as raw EVALSHA (scripts.Script.command).
        await APPEND.load(client)
        await APPEND_MANY.load(client)
        pubsub = self._pubsub = client.pubsub()
        await pubsub.subscribe(keys.prices, keys.probe(host.settings.token))
        await self._await_subscribed(pubsub, count=2, timeout=host.settings.timeout)

    @staticmethod
    async def _await_subscribed(pubsub: PubSub, *, count: int, timeout: float) -> None:
        # SUBSCRIBE only counts once Redis confirms it; reading state before that could
        # miss a price published in between.
        confirmed = 0
        async with asyncio.timeout(2 * timeout):
            while confirmed < count:
                message = await pubsub.get_message(timeout=timeout)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1

    async def close(self, host: Host) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            # Bounded: a task cancelled inside a redis-py read can fail to end.
            await asyncio.wait([reader], timeout=2 * host.settings.timeout)
        # Sent, reply unread: Redis may have stored them. Plain StorageUnavailable would
        # say "not written", and a retry would store such a price twice (issue 23).
        self._fail_in_flight(WriteInDoubt("redis storage closed with the append sent"))
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(host.settings.timeout):
                    await pubsub.aclose()

    async def ping(self, client: aioredis.Redis) -> None:
        await client.ping()

    def write_error(self, error: BaseException) -> StorageError | None:
        return None  # the storage's default reading

    # --- subscriber -------------------------------------------------------------------

    def subscribers(self, host: Host) -> list[Coroutine[Any, Any, None]]:
        return [self._read(host), self._watch(host)]

    async def _read(self, host: Host) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        prices_channel = host.keys.prices.encode()
        try:
            async for message in pubsub.listen():
                self._activity.set()
                if message["type"] == "message" and message["channel"] == prices_channel:
                    await host.deliver(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the subscriber means it is lost
            host.mark_lost(exc)
        else:
            host.mark_lost(StorageUnavailable("redis subscriber stopped"))

    async def _watch(self, host: Host) -> None:
        """Liveness of the subscriber: a probe to our own channel must come back."""
        settings = host.settings
        try:
            while True:
                await asyncio.sleep(settings.probe_interval)
                # Any message counts, not just the probe: a busy reader may lag behind
                # its socket, yet a connection that keeps delivering is alive.
                self._activity.clear()
                async with redis_errors("probe"):
                    await host.client.publish(host.keys.probe(settings.token), b"probe")
                try:
                    async with asyncio.timeout(2 * settings.timeout):
                        await self._activity.wait()
                except TimeoutError:
                    # After a long loop stall the deadline and the reader's wake-up are
                    # due together: let the reader run before calling the link dead.
                    await asyncio.sleep(0)
                    if not self._activity.is_set():
                        raise StorageUnavailable(
                            f"redis subscriber silent for {2 * settings.timeout:g} s"
                        ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            host.mark_lost(exc)

    # --- writes -----------------------------------------------------------------------

    async def flush(self, host: Host) -> None:
        """Send queued appends, many per pipeline, in the order they were made, without
        waiting for one pipeline's replies before sending the next (up to
        ``MAX_IN_FLIGHT``): Redis works through them back to back while this process
        handles the replies and messages of the previous ones. One connection, so Redis
        runs them in the order sent; ``_read_replies`` settles them in that order."""
        try:
            writer = await self._write_connection(host)
        except StorageUnavailable as exc:
            host.fail_pending(exc)
            host.mark_lost(exc)
            return
        while batch := await self._next_batch(host):
            scripts = groups(batch)
            self._in_flight.append(scripts)
            try:
                async with redis_errors("append"):
                    await writer.send([self._script_call(host, group) for group in scripts])
            except StorageUnavailable as exc:
                # Maybe partly sent: this pipeline and those before it are in doubt.
                self._write_failed(host, WriteInDoubt(str(exc)))
                return
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read_replies(host))

    async def _next_batch(self, host: Host) -> list[Write]:
        """The next pipeline's appends once the window has room ([]: none, or lost)."""
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._replied.clear()
            await self._replied.wait()
        if host.lost is not None:
            host.fail_pending(StorageUnavailable(f"redis lost: {host.lost!r}"))
            return []
        return host.take_pending(MAX_PIPELINE)

    async def _read_replies(self, host: Host) -> None:
        try:
            await self._read_each_reply(host)
        except Exception as exc:
            # Whatever stopped the reader, no append in flight may wait for ever.
            self._write_failed(host, WriteInDoubt(f"redis reply reader failed: {exc!r}"))
            raise

    async def _read_each_reply(self, host: Host) -> None:
        writer = self._writer
        while self._in_flight and writer is not None:
            scripts = self._in_flight[0]
            results: list[Any] = []
            try:
                async with redis_errors("append"):
                    for _ in scripts:
                        try:
                            results.append(await writer.reply())
                        except ResponseError as exc:  # one script refused: the others ran
                            results.append(exc)
            except StorageUnavailable as exc:
                self._write_failed(host, WriteInDoubt(str(exc)))  # sent, replies lost
                return
            self._in_flight.popleft()
            self._replied.set()
            for group, result in zip(scripts, results, strict=True):
                host.settle(group, result)

    def _write_failed(self, host: Host, error: WriteInDoubt) -> None:
        """The write connection failed: what was sent is in doubt (the owner looks each
        price up), what was not is refused as not written, and the storage is lost."""
        self._fail_in_flight(error)
        host.fail_pending(StorageUnavailable(f"redis lost: {error}"))
        host.mark_lost(error)
        self._replied.set()
        # redis-py closed its socket already (it disconnects on any send or read error);
        # the pool's ``aclose`` in the storage's ``close`` finishes it.
        self._writer = None

    async def _write_connection(self, host: Host) -> RawConnection:
        if self._writer is None:
            async with redis_errors("connect"):
                self._writer = await RawConnection.take(host.client)
        return self._writer

    def _fail_in_flight(self, error: BaseException) -> None:
        in_flight, self._in_flight = self._in_flight, deque()
        for pipeline in in_flight:
            for group in pipeline:
                fail_writes(group, error)

    @staticmethod
    def _script_call(host: Host, group: Sequence[Write]) -> tuple[Arg, ...]:
        """The EVALSHA of one group: a lone price is one lua/append.lua (its message is
        the per-price one), several are one lua/append_many.lua."""
        if len(group) > 1:
            script_keys, args = SingleNode._many_args(host, group)
            return APPEND_MANY.command(script_keys, args)
        keys, write = host.keys, group[0]
        zone = write.zone
        script_keys = [keys.seq(zone), keys.history(zone), keys.latest(zone), keys.epoch]
        one: list[str | bytes | int] = [
            write.body, host.settings.history_size, keys.prices, zone, host.epoch,
        ]  # fmt: skip
        if write.ack is not None:
            script_keys += [keys.ingest_lease, keys.ingest]
            one += [write.ack.consumer, INGEST_GROUP, write.ack.entry_id]
        return APPEND.command(script_keys, one)

    @staticmethod
    def _many_args(host: Host, group: Sequence[Write]) -> tuple[list[str], list[str | bytes | int]]:
        """lua/append_many.lua's KEYS and ARGV for a group (see the script)."""
        keys = host.keys
        ack = group[0].ack
        args: list[str | bytes | int] = [
            host.settings.history_size, keys.prices, host.epoch,
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
        if last is not None:  # a group's writes all carry acks (writer.groups), or none do
            args.append(next_stream_id(last.entry_id))
        return [keys.epoch, keys.ingest_lease, keys.ingest], args

    # --- state and epoch --------------------------------------------------------------

    async def load(self, host: Host, zones: Iterable[str]) -> dict[str, ZoneState]:
        """One ``lua/load.lua`` per ``LOAD_CHUNK`` zones: a script is atomic, so a zone's
        seq and history agree (different zones need not: positions are per zone), and
        the reply holds only zones with prices, so 100,000 fresh zones cost a few calls
        instead of 200,000 commands and replies."""
        zone_list = list(zones)
        keys = host.keys
        state: dict[str, ZoneState] = {}
        for start in range(0, len(zone_list), LOAD_CHUNK):
            chunk = zone_list[start : start + LOAD_CHUNK]
            script_keys = [key for zone in chunk for key in (keys.seq(zone), keys.history(zone))]
            async with redis_errors("load"):
                reply = await LOAD.run(host.client, script_keys, [])
            for i in range(0, len(reply), 3):
                zone, seq = chunk[int(reply[i]) - 1], int(reply[i + 1])
                if seq < 0:  # damaged: left out (as a zone without prices), logged
                    host.zone_damaged(zone, f"{host.damage(zone)}; not loaded")
                    continue
                state[zone] = (seq, [stored_price(zone, p) for p in reply[i + 2]])
        return state

    async def epoch_claimed(self, host: Host, epoch: str) -> None:
        return None  # one epoch key, which the append scripts read directly

    async def replace_epoch(self, host: Host, expected: str, replacement: str) -> str:
        async with redis_errors("epoch"):
            current = await REPLACE_EPOCH.run(
                host.client, [host.keys.epoch], [expected, replacement, host.keys.prices]
            )
        return str(current.decode())
