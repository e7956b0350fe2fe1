"""Redis Stream ingest: once per cluster, in stream order, past bad entries (huge ones
included), a zone whose keys are damaged and a consumer killed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from pricehub.server.ingest import IngestConsumer
from pricehub.server.logs import configure_logging
from pricehub.server.publisher import Publisher
from pricehub.storage.base import IngestAck
from pricehub.storage.failover import FailoverStorage
from pricehub.storage.redis import INGEST_GROUP, LeaseLost, OlderEntryPending, RedisStorage
from pricehub.wire.messages import PriceBody
from tests.harness.redisproc import RecordingListener, RedisProcess
from tests.harness.serverproc import REPO
from tests.harness.support import eventually

ZONES = ("pjm", "ercot")
ENTRIES = 1000


class Instance:
    """What one server instance has for ingest: storage, publisher, consumer."""

    def __init__(self, url: str, prefix: str, name: str) -> None:
        self.storage = FailoverStorage(url, zones=ZONES, key_prefix=prefix, history_size=5000)
        self.publisher = Publisher(self.storage)
        self.consumer = IngestConsumer(
            self.storage, self.publisher, zones=ZONES, consumer=name, lease_ttl=1.0
        )
        self.listener = RecordingListener()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.storage.start(self.listener)
        self._task = asyncio.create_task(self.consumer.run())

    async def stop(self) -> None:
        if self._task is not None:
            self.consumer.stop()
            await asyncio.wait_for(self._task, 5)
        await self.storage.close()

    def prices(self, zone: str) -> list[float]:
        return [orjson.loads(p.payload)["price"] for p in self.listener.prices if p.zone == zone]


def entry(index: int) -> dict[str, str]:
    zone = ZONES[index % 2]
    return {"market_zone": zone, "price": str(float(index)), "volume": "1.5"}


async def add_entries(
    raw: aioredis.Redis, prefix: str, indexes: range, *, bad_every: int = 0
) -> int:
    """XADD the entries (and a malformed one every ``bad_every``); returns bad count."""
    pipe = raw.pipeline(transaction=False)
    bad = 0
    for index in indexes:
        pipe.xadd(f"{prefix}ingest", entry(index))  # type: ignore[arg-type]
        if bad_every and index % bad_every == 0:
            malformed = [
                {"market_zone": "nowhere", "price": "1"},
                {"market_zone": "pjm", "price": "NaN"},
                {"market_zone": "pjm", "price": "cheap"},
                {"market_zone": "pjm", "price": "1", "timestamp": "2026-11-27T15:00:00"},
            ][bad % 4]
            pipe.xadd(f"{prefix}ingest", malformed)  # type: ignore[arg-type]
            bad += 1
    await pipe.execute()
    return bad


def expected_prices(zone: str, count: int) -> list[float]:
    return [float(i) for i in range(count) if ZONES[i % 2] == zone]


async def wait_all_delivered(instance: Instance, count: int) -> None:
    for zone in ZONES:
        await instance.listener.wait_for(zone, len(expected_prices(zone, count)))


async def test_two_instances_take_each_entry_once_in_stream_order(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    instances = [Instance(redis_server.url, prefix, name) for name in ("one", "two")]
    for instance in instances:
        await instance.start()
    try:
        started = time.monotonic()
        bad = await add_entries(raw, prefix, range(ENTRIES), bad_every=50)
        for instance in instances:
            await wait_all_delivered(instance, ENTRIES)
        elapsed = time.monotonic() - started
        for instance in instances:
            for zone in ZONES:
                # every entry once, in stream order, numbered 1..n with no hole
                assert instance.prices(zone) == expected_prices(zone, ENTRIES)
                assert instance.listener.seqs(zone) == list(range(1, ENTRIES // 2 + 1))
        stats = [instance.consumer.stats for instance in instances]

        async def all_counted() -> bool:  # the append's reply can trail its broadcast
            return sum(s.accepted for s in stats) == ENTRIES

        await eventually(all_counted)
        assert sum(s.invalid for s in stats) == bad == 20
        published = sum(
            count for instance in instances
            for (_, source), count in instance.publisher.accepted.items()
            if source == "redis-ingest"
        )  # fmt: skip
        assert published == ENTRIES
        pending = await raw.xpending(f"{prefix}ingest", INGEST_GROUP)
        assert pending["pending"] == 0
        assert await raw.xlen(f"{prefix}ingest") == 0  # consumed entries are deleted
        print(f"ingest: {ENTRIES} entries in {elapsed:.2f} s")
    finally:
        for instance in instances:
            await instance.stop()


async def test_a_fenced_consumer_cannot_append(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    instance = Instance(redis_server.url, prefix, "stale")
    await instance.storage.start(instance.listener)
    try:
        await raw.set(f"{prefix}ingest:lease", "successor")
        body = PriceBody("pjm", 1.0, None, "2026-11-27T15:00:00.000Z")
        with pytest.raises(LeaseLost):
            await instance.publisher.publish(
                body, source="redis-ingest", ack=IngestAck("1-0", "stale")
            )
        assert await raw.get(f"{prefix}seq:pjm") is None
        assert instance.storage.backend == "redis"  # a lost lease is not a lost Redis
    finally:
        await instance.stop()


async def pending_entries(
    raw: aioredis.Redis, stream: str, count: int, prefix: str, *, read: int | None = None
) -> list[str]:
    """``count`` entries, the first ``read`` of them (all by default) read, so pending,
    by "holder", which holds the lease."""
    await raw.xgroup_create(stream, INGEST_GROUP, id="0", mkstream=True)
    ids = [(await raw.xadd(stream, {"market_zone": "pjm", "price": "1"})).decode()
           for _ in range(count)]  # fmt: skip
    await raw.xreadgroup(INGEST_GROUP, "holder", {stream: ">"}, count=read)
    await raw.set(f"{prefix}ingest:lease", "holder")
    return ids


@pytest.mark.parametrize("batch", [1, 3], ids=["one-price-script", "batch-script"])
async def test_an_entry_cannot_overtake_an_older_pending_one(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str, batch: int
) -> None:
    """The scripts enforce stream order themselves: the consumer keeps two batches in
    flight, so an append whose entries have an older entry still pending is refused,
    nothing written, and goes through once the older one is in."""
    instance = Instance(redis_server.url, prefix, "holder")
    stream = f"{prefix}ingest"
    await instance.storage.start(instance.listener)
    try:
        ids = await pending_entries(raw, stream, 1 + batch, prefix)
        later = [PriceBody("pjm", float(i), None, "2026-11-27T15:00:00.000Z")
                 for i in range(1, 1 + batch)]  # fmt: skip
        acks = [IngestAck(entry_id, "holder") for entry_id in ids[1:]]
        with pytest.raises(OlderEntryPending):
            await instance.publisher.publish_many(later, source="redis-ingest", acks=acks)
        assert await raw.get(f"{prefix}seq:pjm") is None
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 1 + batch
        assert instance.storage.backend == "redis"  # a refusal is not a lost Redis

        first = PriceBody("pjm", 0.0, None, "2026-11-27T15:00:00.000Z")
        await instance.publisher.publish(first, source="redis-ingest",
                                         ack=IngestAck(ids[0], "holder"))  # fmt: skip
        stored = await instance.publisher.publish_many(later, source="redis-ingest", acks=acks)
        assert [price.seq for price in stored] == list(range(2, 2 + batch))
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0
    finally:
        await instance.stop()


async def test_a_batch_deletes_its_entries_and_nothing_newer(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """The batch script deletes its entries by trimming the stream below its last one:
    entries added after the batch (read or not) stay, pending or new, and are taken
    next; an entry older than the batch was already done with."""
    instance = Instance(redis_server.url, prefix, "holder")
    stream = f"{prefix}ingest"
    await instance.storage.start(instance.listener)
    try:
        ids = await pending_entries(raw, stream, 6, prefix, read=5)  # the 6th unread
        bodies = [PriceBody("pjm", float(i), None, "2026-11-27T15:00:00.000Z")
                  for i in range(6)]  # fmt: skip
        acks = [IngestAck(entry_id, "holder") for entry_id in ids]

        await instance.publisher.publish_many(bodies[:3], source="redis-ingest", acks=acks[:3])
        left = [entry_id.decode() for entry_id, _ in await raw.xrange(stream)]
        assert left == ids[3:]  # read and pending (4, 5) and never read (6) stay
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 2
        await raw.xreadgroup(INGEST_GROUP, "holder", {stream: ">"})
        stored = await instance.publisher.publish_many(
            bodies[3:], source="redis-ingest", acks=acks[3:]
        )
        assert [price.seq for price in stored] == [4, 5, 6]
        assert await raw.xlen(stream) == 0
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0
    finally:
        await instance.stop()


async def test_the_batch_trim_never_deletes_an_entry_still_pending(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """A batch that is not one run of the stream (entry 2 left out, still pending) trims
    the stream only up to the oldest entry still pending: entry 2 stays, to be taken."""
    storage = RedisStorage(redis_server.url, key_prefix=prefix)
    stream = f"{prefix}ingest"
    await storage.start(RecordingListener())
    try:
        ids = await pending_entries(raw, stream, 4, prefix)
        picked = [ids[0], ids[2]]
        outcomes = await storage.append_outcomes(
            [("pjm", price_body(1.0)), ("pjm", price_body(3.0))],
            acks=[IngestAck(entry_id, "holder") for entry_id in picked],
        )
        assert [getattr(outcome, "seq", outcome) for outcome in outcomes] == [1, 2]
        left = [entry_id.decode() for entry_id, _ in await raw.xrange(stream)]
        assert left == ids[1:]  # 2 and 4 pending, 3 acknowledged but not yet trimmed
        pending = await raw.xpending_range(stream, INGEST_GROUP, min="-", max="+", count=10)
        assert [entry["message_id"].decode() for entry in pending] == [ids[1], ids[3]]
    finally:
        await storage.close()


async def test_single_entry_appends_of_two_calls_are_never_one_script(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """Two entries appended one by one in the same loop turn (retries of two batches in
    flight after a failure) leave in one pipeline, but as two scripts: each checks its
    own stream order, so entry 4 is refused while 2 and 3 are pending, not appended
    ahead of them as the second half of a batch that starts at entry 1."""
    storage = RedisStorage(redis_server.url, key_prefix=prefix)
    stream = f"{prefix}ingest"
    await storage.start(RecordingListener())
    try:
        ids = await pending_entries(raw, stream, 4, prefix)
        first, later = await asyncio.gather(
            storage.append("pjm", price_body(1.0), ack=IngestAck(ids[0], "holder")),
            storage.append("pjm", price_body(4.0), ack=IngestAck(ids[3], "holder")),
            return_exceptions=True,
        )
        assert getattr(first, "seq", first) == 1
        assert isinstance(later, OlderEntryPending)
        assert await raw.get(f"{prefix}seq:pjm") == b"1"
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 3
    finally:
        await storage.close()


def price_body(price: float) -> bytes:
    return PriceBody("pjm", price, None, "2026-11-27T15:00:00.000Z").encode()


DOOMED = """
import asyncio, sys
from pricehub.server.ingest import IngestConsumer
from pricehub.server.publisher import Publisher
from pricehub.storage.failover import FailoverStorage

class Quiet:
    def on_price(self, price): pass
    def on_backend_changed(self, backend): pass
    def on_epoch_changed(self, epoch): pass

async def main(url, prefix):
    storage = FailoverStorage(url, zones=("pjm", "ercot"), key_prefix=prefix, history_size=5000)
    await storage.start(Quiet())
    consumer = IngestConsumer(
        storage, Publisher(storage), zones=("pjm", "ercot"), consumer="doomed", lease_ttl=1.0
    )
    await consumer.run()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_consumer_killed_mid_stream_leaves_nothing_behind(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED, redis_server.url, prefix, cwd=REPO
    )
    survivor = Instance(redis_server.url, prefix, "survivor")
    try:

        async def doomed_holds_lease() -> bool:
            return await raw.get(f"{prefix}ingest:lease") == b"doomed"

        await eventually(doomed_holds_lease, within=15)
        await survivor.start()
        await add_entries(raw, prefix, range(ENTRIES))

        async def doomed_is_busy() -> bool:
            return int(await raw.get(f"{prefix}seq:pjm") or 0) >= 50

        await eventually(doomed_is_busy)
        doomed.send_signal(signal.SIGKILL)
        await asyncio.wait_for(doomed.wait(), 5)
        left_pending = (await raw.xpending(f"{prefix}ingest", INGEST_GROUP))["pending"]

        await wait_all_delivered(survivor, ENTRIES)
        for zone in ZONES:
            assert survivor.prices(zone) == expected_prices(zone, ENTRIES)
            assert survivor.listener.seqs(zone) == list(range(1, ENTRIES // 2 + 1))
        assert survivor.consumer.stats.claimed == left_pending
        assert (await raw.xpending(f"{prefix}ingest", INGEST_GROUP))["pending"] == 0
        await survivor.stop()
        survivor = Instance(redis_server.url, prefix, "restarted")
        await survivor.start()  # a new lease term forgets the dead, idle consumers

        async def dead_consumers_forgotten() -> bool:
            consumers = await raw.xinfo_consumers(f"{prefix}ingest", INGEST_GROUP)
            return {c["name"] for c in consumers} <= {b"restarted"}

        await eventually(dead_consumers_forgotten)
        print(f"ingest takeover: {left_pending} pending entries claimed from the dead consumer")
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
        await survivor.stop()


async def test_a_pending_entry_deleted_before_its_append_is_reported(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """Entries a dead consumer read are taken over; one deleted in between (by hand, or
    an XTRIM MAXLEN shorter than the backlog) cannot be, and its loss is logged as an
    error, not passed over in silence."""
    stream = f"{prefix}ingest"
    ids = await pending_entries(raw, stream, 3, prefix)  # "holder" read them, then died
    await raw.delete(f"{prefix}ingest:lease")
    await raw.xdel(stream, ids[1])
    instance = Instance(redis_server.url, prefix, "successor")
    with capture_logs() as logs:
        await instance.start()
        try:
            await instance.listener.wait_for("pjm", 2)
        finally:
            await instance.stop()
    deleted = [entry for entry in logs if entry["event"] == "ingest_pending_entries_deleted"]
    assert [(entry["count"], entry["first"]) for entry in deleted] == [(1, ids[1])]
    assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0


LOOSE_ENTRIES: list[tuple[str, list[str]]] = [
    # (the field the rejection names, the entry's flat field list as given to XADD)
    ("price", ["market_zone", "pjm", "price", "1_000"]),
    ("price", ["market_zone", "pjm", "price", " 5 "]),
    ("price", ["market_zone", "pjm", "price", "٣"]),  # an Arabic-Indic digit
    ("price", ["market_zone", "pjm", "price", "+5"]),
    ("price", ["market_zone", "pjm", "price", "inf"]),
    ("volume", ["market_zone", "pjm", "price", "5", "volume", "1_0"]),
    ("market_zone", ["market_zone", "pjm", "market_zone", "ercot", "price", "5"]),
    ("price", ["market_zone", "pjm", "price", "5", "price", "6"]),
]


async def test_stream_entries_follow_the_http_body_rules(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """Through a real XADD (raw, so a field can be given twice): every loose entry is
    rejected, counted and acknowledged; the good ones around them go through in order."""
    stream = f"{prefix}ingest"
    await raw.execute_command("XADD", stream, "*", "market_zone", "pjm", "price", "1")
    for _, fields in LOOSE_ENTRIES:
        await raw.execute_command("XADD", stream, "*", *fields)
    await raw.execute_command("XADD", stream, "*", "market_zone", "pjm", "price", "2.5e1")
    instance = Instance(redis_server.url, prefix, "strict")
    await instance.start()
    try:
        await instance.listener.wait_for("pjm", 2)
        assert instance.prices("pjm") == [1.0, 25.0]

        async def all_acknowledged() -> bool:
            return int(await raw.xlen(stream)) == 0

        await eventually(all_acknowledged)
        assert instance.consumer.stats.invalid == len(LOOSE_ENTRIES)
        assert instance.consumer.stats.accepted == 2
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0
    finally:
        await instance.stop()


STALLING = """
import asyncio, sys
from pricehub.server.ingest import IngestConsumer
from pricehub.server.publisher import Publisher
from pricehub.storage.failover import FailoverStorage

class Quiet:
    def on_price(self, price): pass
    def on_backend_changed(self, backend): pass
    def on_epoch_changed(self, epoch): pass

class Stalling(FailoverStorage):
    # Appends 3 chunks of a batch, then hangs in the 4th: killed there, mid-batch.
    # One batch in flight: with two, the next batch's first chunk would be refused
    # (an older entry pending) and counted as a call here.
    ingest_depth = 1
    calls = 0
    async def append_many(self, items, *, acks=None):
        Stalling.calls += 1
        if Stalling.calls > 3:
            print("stalled", flush=True)
            await asyncio.Event().wait()
        return await super().append_many(items, acks=acks)

class SmallChunks(Publisher):
    async def publish_many(self, bodies, *, source, acks=None, chunk=10):
        return await super().publish_many(bodies, source=source, acks=acks, chunk=10)

async def main(url, prefix):
    storage = Stalling(url, zones=("pjm", "ercot"), key_prefix=prefix, history_size=5000)
    await storage.start(Quiet())
    consumer = IngestConsumer(
        storage, SmallChunks(storage), zones=("pjm", "ercot"), consumer="stalling",
        lease_ttl=1.0, batch=100,
    )
    await consumer.run()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_consumer_killed_mid_batch_leaves_each_entry_taken_once_in_order(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    await add_entries(raw, prefix, range(ENTRIES))  # waiting before the consumer starts
    stalling = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STALLING, redis_server.url, prefix, cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    survivor = Instance(redis_server.url, prefix, "survivor")
    try:
        assert stalling.stdout is not None
        async with asyncio.timeout(15):  # its log lines come first, on the same stdout
            while (line := await stalling.stdout.readline()) != b"stalled\n":
                assert line, "the stalling consumer exited"
        # 3 chunks of 10 of a 100-entry read appended (and acknowledged, in their
        # scripts); the other 70 delivered to the consumer and not yet appended, and,
        # if its read-ahead of the next 100 ran before the stall, those 100 too.
        assert int(await raw.get(f"{prefix}seq:pjm") or 0) == 15
        pending = (await raw.xpending(f"{prefix}ingest", INGEST_GROUP))["pending"]
        (group,) = await raw.xinfo_groups(f"{prefix}ingest")
        assert group["entries-read"] in (100, 200)
        assert pending == group["entries-read"] - 30
        stalling.send_signal(signal.SIGKILL)
        await asyncio.wait_for(stalling.wait(), 5)

        await survivor.start()
        await wait_all_delivered(survivor, ENTRIES)
        for zone in ZONES:
            # The first 30 went out before the survivor's subscriber existed: it sees
            # them through its start-up load, not as deliveries.
            assert survivor.prices(zone) == expected_prices(zone, ENTRIES)[15:]
            assert survivor.listener.seqs(zone) == list(range(16, ENTRIES // 2 + 1))
            history = await survivor.storage.history(zone, limit=ENTRIES)
            assert [orjson.loads(p.payload)["price"] for p in history] == expected_prices(
                zone, ENTRIES
            )  # every entry once, in stream order, numbered without a hole
        assert survivor.consumer.stats.claimed == pending

        async def all_counted() -> bool:  # the append's reply can trail its broadcast
            return survivor.consumer.stats.accepted == ENTRIES - 30

        await eventually(all_counted)
        assert (await raw.xpending(f"{prefix}ingest", INGEST_GROUP))["pending"] == 0
        assert await raw.xlen(f"{prefix}ingest") == 0
    finally:
        if stalling.returncode is None:
            stalling.kill()
            await stalling.wait()
        await survivor.stop()


async def test_entries_that_are_not_utf8_are_refused_and_the_rest_kept_in_order(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    instance = Instance(redis_server.url, prefix, "solo")
    pipe = raw.pipeline(transaction=False)
    for index in range(300):  # queued before the consumer starts: read as batches
        fields: dict[str, Any] = entry(index)
        if index == 150:
            fields = {"market_zone": "pjm", "price": b"\xff\xfe"}  # not UTF-8: no JSON
        pipe.xadd(f"{prefix}ingest", fields)
    await pipe.execute()
    await instance.start()
    try:
        kept = [i for i in range(300) if i != 150]
        for zone in ZONES:
            want = [float(i) for i in kept if ZONES[i % 2] == zone]
            await instance.listener.wait_for(zone, len(want))
            assert instance.prices(zone) == want
        stats = instance.consumer.stats

        async def all_counted() -> bool:  # the append's reply can trail its broadcast
            return stats.accepted == 299

        await eventually(all_counted)
        assert stats.invalid == 1
        assert await raw.xlen(f"{prefix}ingest") == 0
    finally:
        await instance.stop()


MiB = 1 << 20


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The server's own log pipeline (JSON, secrets redacted) writing into a buffer; the
    process-wide logging state is put back after."""
    config, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(stream=stream, log_format="json")
    yield stream
    structlog.configure(**config)
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


@contextlib.asynccontextmanager
async def loop_stalls() -> AsyncIterator[list[float]]:
    """The longest the event loop went without running a 5 ms ticker (``[0]``), as any
    concurrent publish or ping would have waited."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            worst[0] = max(worst[0], time.monotonic() - before - 0.005)

    ticker = asyncio.create_task(tick())
    try:
        yield worst
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def test_huge_entries_are_refused_unread_logged_short_and_never_stall_the_loop(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str, json_log: io.StringIO
) -> None:
    """An 8 MiB zone, an 8 MiB field name, 100,000 fields and 16 entries of 1 MiB (the
    issue's 64 MiB / 1,000,000 / 300 x 1 MiB, scaled to a few seconds): each is invalid,
    counted and acknowledged like any bad entry, without this process ever holding them
    (one read brings at most a few MiB), without a long log line, without a stall. Then
    one more huge entry arrives while the consumer waits (the blocking read, which takes
    an entry as Redis sends it): refused the same way."""
    stream = f"{prefix}ingest"
    add = raw.execute_command
    await add("XADD", stream, "*", "market_zone", "pjm", "price", "1")
    await add("XADD", stream, "*", "market_zone", "z" * (8 * MiB), "price", "2")
    await add("XADD", stream, "*", "f" * (8 * MiB), "pjm", "price", "3")
    await add("XADD", stream, "*", *[f"f{i}".encode() for i in range(200_000)])
    for _ in range(16):
        await add("XADD", stream, "*", "market_zone", "pjm", "price", "9" * MiB)
    await add("XADD", stream, "*", "market_zone", "pjm", "price", "4")
    instance = Instance(redis_server.url, prefix, "bounded")
    tracemalloc.start()
    try:
        async with loop_stalls() as stalled:
            await instance.start()
            await instance.listener.wait_for("pjm", 2)

            async def drained() -> bool:
                return int(await raw.xlen(stream)) == 0

            await eventually(drained, within=15)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            await asyncio.sleep(0.3)  # the consumer is waiting in its blocking read now
            await add("XADD", stream, "*", "market_zone", "y" * (8 * MiB), "price", "5")
            await add("XADD", stream, "*", "market_zone", "pjm", "price", "6")
            await instance.listener.wait_for("pjm", 3)
            await eventually(drained, within=15)
        assert instance.prices("pjm") == [1.0, 4.0, 6.0]
        assert instance.consumer.stats.invalid == 3 + 16 + 1
        assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0
        assert peak < 6 * MiB, f"{peak / MiB:.0f} MiB held while reading"
        assert stalled[0] < 1.0, f"the event loop stalled {stalled[0]:.2f} s"
        lines = json_log.getvalue().splitlines()
        invalid = [line for line in lines if "ingest_invalid_entry" in line]
        assert len(invalid) == 10  # the first 10, then one in a thousand
        assert max(map(len, lines)) < 1024, max(lines, key=len)[:300]
        assert "too large" in invalid[1] and "never decoded" in invalid[1]
        print(f"huge entries: {peak / MiB:.1f} MiB peak, worst loop stall {stalled[0]:.3f} s")
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await instance.stop()


async def test_a_zone_with_damaged_keys_fails_its_entries_and_ingest_goes_on(
    redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """``SET pricehub:seq:ercot not-a-number``: ercot's entries are refused (logged with
    their price, counted, acknowledged: never left to hold up the stream), pjm's go on in
    order on Redis, in a batch (the many-price script) and one by one (the one-price
    script); no failover, the consumer keeps its lease. Repaired, ercot publishes again."""
    stream = f"{prefix}ingest"
    instance = Instance(redis_server.url, prefix, "steady")
    with capture_logs() as logs:
        await instance.start()
        try:
            await raw.set(f"{prefix}seq:ercot", "not-a-number")
            async with raw.pipeline(transaction=True) as pipe:  # at once: read as a batch
                for index in range(6):
                    pipe.xadd(stream, entry(index))  # type: ignore[arg-type]
                await pipe.execute()
            await instance.listener.wait_for("pjm", 3)
            for index in range(6, 10):  # one at a time: each read alone
                await raw.xadd(stream, entry(index))  # type: ignore[arg-type]
                if index % 2 == 0:
                    await instance.listener.wait_for("pjm", index // 2 + 1)

            async def drained() -> bool:
                return int(await raw.xlen(stream)) == 0

            await eventually(drained)
            assert instance.prices("pjm") == expected_prices("pjm", 10)
            assert instance.listener.seqs("pjm") == [1, 2, 3, 4, 5]
            stats, storage = instance.consumer.stats, instance.storage
            await eventually(lambda: stats.accepted == 5)
            assert stats.invalid == 5 and stats.leases == 1
            assert (storage.backend, storage.counters().failovers) == ("redis", 0)
            assert (await raw.xpending(stream, INGEST_GROUP))["pending"] == 0
            assert await raw.get(f"{prefix}seq:ercot") == b"not-a-number"  # left as found

            await raw.delete(f"{prefix}seq:ercot")  # repaired by an operator
            await raw.xadd(stream, entry(11))  # type: ignore[arg-type]
            assert await instance.listener.wait_for("ercot", 1) == [1]
        finally:
            await instance.stop()
    refused = [e for e in logs if e["event"] == "ingest_entry_refused"]
    assert [orjson.loads(e["price"])["price"] for e in refused] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert {e["zone"] for e in refused} == {"ercot"}
    assert "not an integer" in refused[0]["error"]
    assert not [e for e in logs if e["event"] == "storage_failover"]
