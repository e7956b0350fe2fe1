"""The WebSocket ``snapshot`` and ranged ``request_price_history`` (PROTOCOL.md, "One
consistent picture of many zones" and "History by market time"), through real sockets.

The guarantee under test: every ``price_update`` a socket gets after a ``snapshot`` has
``seq > cursor[zone]``, and none with a higher seq is missing. Checked with publishers
writing to 20 zones on two instances of one test-started redis-server (a snapshot read
from Redis runs ahead of an instance's Pub/Sub stream), deterministically with the
subscriber link of an instance delayed by a relay (the snapshot is then ahead of what the
instance has broadcast, by exactly known seqs), and in memory. The session's rarer paths
(a hold that overflowed, a zone gone live while held, a paced zone, a price kept for a
slow reader) are driven directly, as tests/server/test_session.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson

from pricehub.server.keys import BROADCASTER
from pricehub.server.subscriber.session import Effect, Hold, ReadSince, ReadSnapshot, Session
from pricehub.storage import Snapshot
from pricehub.wire import paths
from pricehub.wire.codes import ErrorCode, MessageType
from tests.harness.history_data import EXPECTED, FROM, PRICES, TO
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import ServerProcess, running_servers
from tests.harness.support import (
    PUBLISH_KEY,
    WAIT,
    Client,
    MakeClient,
    collect_updates,
    publish,
    receive_until,
)
from tests.server.test_fanout import connection_by_id
from tests.server.test_security import SECRET, token
from tests.server.test_session import Store, make_session, price, run, sent

ZONES = tuple(f"z{index:02d}" for index in range(20))
PUBLISHERS = 4
BATCHES = 60  # per publisher
BATCH = 4  # prices per batch, to random zones
SNAPSHOTS = 10
SNAPSHOT_EVERY = 0.1  # seconds: within --client-rate-limit


class Recorder:
    """Every message of one socket, in order, read by a task; ``wait`` for a condition
    on what was read so far (bounded)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.log: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                self.log.append(orjson.loads(frame.data))
                self._changed.set()

    async def wait(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition(self.log):
                if self._task.done():
                    raise AssertionError(f"socket ended: {self.ws.close_code} {self.log[-3:]}")
                self._changed.clear()
                await self._changed.wait()

    async def ended(self) -> None:
        """Until the socket ends (bounded)."""
        async with asyncio.timeout(WAIT):
            await asyncio.shield(self._task)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            self._task.cancel()
            await self._task


def updates(log: Sequence[dict[str, Any]], zone: str) -> list[int]:
    return [m["seq"] for m in log if m["type"] == "price_update" and m["market_zone"] == zone]


def reached(finals: dict[str, int]) -> Callable[[list[dict[str, Any]]], bool]:
    """Every zone's last published seq has reached the client (as an update, its first
    state or a snapshot's cursor)."""

    def condition(log: list[dict[str, Any]]) -> bool:
        seen: dict[str, int] = {}
        for message in log:
            if message["type"] == "price_update":
                seen[message["market_zone"]] = message["seq"]
            elif message["type"] == "initial_data":
                price = message["latest_price"]
                seen[price["market_zone"]] = price["seq"]
            elif message["type"] == "snapshot":
                for zone, seq in message["cursor"].items():
                    seen[zone] = max(seen.get(zone, 0), seq)
        return all(seen.get(zone, 0) >= seq for zone, seq in finals.items())

    return condition


def check_after_each_snapshot(log: list[dict[str, Any]], finals: dict[str, int]) -> int:
    """From the first snapshot on, per zone, as a client applies them: each update is
    the seq right after the last one it has (none at or below it, none repeated, none
    missing), and each later snapshot's cursor is at or after it (its seqs up to the
    cursor come with the snapshot, its updates go on from there). Ends at the last seq
    published. Returns how many snapshots there were."""
    snapshots = [m for m in log if m["type"] == "snapshot"]
    for snapshot in snapshots:
        assert set(snapshot["cursor"]) == set(finals), snapshot
        for zone, cursor in snapshot["cursor"].items():
            price = snapshot["prices"][zone]
            assert (0 if price is None else price["seq"]) == cursor, snapshot
    first = log.index(snapshots[0])
    for zone in finals:
        have: int | None = None
        for index, message in enumerate(log[first:], start=first):
            if message["type"] == "snapshot":
                cursor = message["cursor"][zone]
                assert have is None or cursor >= have, (zone, index, cursor, have)
                have = cursor
            elif message["type"] == "price_update" and message["market_zone"] == zone:
                assert have is not None and message["seq"] == have + 1, (
                    f"{zone}: update {message['seq']} at {index} after {have}: "
                    f"{updates(log[first:], zone)[:40]}"
                )
                have = message["seq"]
        assert have == finals[zone], (zone, have, finals[zone])
    return len(snapshots)


async def publisher(url: str, seed: int) -> dict[str, int]:
    """``BATCHES`` batches of ``BATCH`` prices to random zones; the highest accepted seq
    per zone."""
    chance = random.Random(seed)
    highest: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}"}
    async with aiohttp.ClientSession() as session:
        for _ in range(BATCHES):
            batch = [
                {"market_zone": chance.choice(ZONES), "price": chance.uniform(-10, 90)}
                for _ in range(BATCH)
            ]
            async with session.post(
                url + paths.BROADCAST_PRICE, json=batch, headers=headers
            ) as response:
                assert response.status == 202, await response.text()
                for accepted in (await response.json())["accepted"]:
                    zone = accepted["market_zone"]
                    highest[zone] = max(highest.get(zone, 0), accepted["seq"])
    return highest


async def snapshots_while(recorder: Recorder, writers: asyncio.Future[Any]) -> int:
    """A ``snapshot`` of the socket's zones every ``SNAPSHOT_EVERY`` s while ``writers``
    run (at least ``SNAPSHOTS`` of them); how many were sent."""
    sent = 0
    while sent < SNAPSHOTS or not writers.done():
        await recorder.ws.send_json({"type": "snapshot"})
        sent += 1
        await asyncio.sleep(SNAPSHOT_EVERY)
    return sent


def snapshots(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda log: sum(m["type"] == "snapshot" for m in log) >= count


def last_snapshot(log: list[dict[str, Any]]) -> dict[str, Any]:
    return [message for message in log if message["type"] == "snapshot"][-1]


def merged(results: Sequence[dict[str, int]], first: dict[str, int]) -> dict[str, int]:
    finals = dict(first)
    for highest in results:
        for zone, seq in highest.items():
            finals[zone] = max(finals.get(zone, 0), seq)
    return finals


async def seed_every_zone(url: str, zones: Sequence[str] = ZONES) -> dict[str, int]:
    """One price per zone, so every zone has a price before the socket opens."""
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}"}
    batch = [{"market_zone": zone, "price": 1.0} for zone in zones]
    async with aiohttp.ClientSession() as session, session.post(
        url + paths.BROADCAST_PRICE, json=batch, headers=headers
    ) as response:
        assert response.status == 202, await response.text()
        return {a["market_zone"]: a["seq"] for a in (await response.json())["accepted"]}


# --- two instances on one Redis --------------------------------------------------------


async def test_snapshots_taken_while_four_publishers_write_on_two_instances() -> None:
    """The socket is on instance A; publishers write to A and B. Each of the snapshots
    taken meanwhile (read from Redis, ahead of A's Pub/Sub stream when B's prices have
    not reached A yet) is followed by exactly the seqs after its cursor, per zone."""
    zones = ",".join(ZONES)
    with RedisProcess() as redis_server:
        async with running_servers(
            2, redis_server.url, "--zones", zones, publish_key=PUBLISH_KEY
        ) as (first, second):
            seeded = await seed_every_zone(first.url)
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(
                    f"{first.ws_url}{paths.WS_PRICES}", params={"zones": zones}
                )
                recorder = Recorder(ws)
                await recorder.wait(reached(seeded))
                writers = asyncio.gather(*(
                    publisher((first, second)[index % 2].url, seed=index)
                    for index in range(PUBLISHERS)
                ))  # fmt: skip
                sent = await snapshots_while(recorder, writers)
                finals = merged(await writers, seeded)
                # One more after the writes: its cursor is every zone's last seq.
                await ws.send_json({"type": "snapshot"})
                await recorder.wait(snapshots(sent + 1))
                await recorder.wait(reached(finals))
                assert check_after_each_snapshot(recorder.log, finals) == sent + 1
                assert last_snapshot(recorder.log)["cursor"] == finals
                # And the ranged history over the socket hands over at the same cursor.
                await ws.send_json({
                    "type": "request_price_history", "zones": list(ZONES),
                    "from": "2000-01-01T00:00:00Z", "limit": 10_000,
                })  # fmt: skip
                await recorder.wait(lambda log: log[-1]["type"] == "price_history")
                history = recorder.log[-1]
                assert history["cursor"] == finals and history["truncated"] is False
                assert len(history["data"]) == sum(finals.values())
                await recorder.close()


class DelayingRelay:
    """A TCP relay to a redis-server whose Pub/Sub connections can be *delayed*: while
    ``holding``, what Redis sends a subscriber connection is kept (nothing dropped), and
    ``release`` sends it on, in order. Commands (the snapshot's ``MGET``) pass at once.
    A real lag of an instance's stream behind Redis, by exactly the prices sent meanwhile."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.holding = False
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> DelayingRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for writer, data in held:
            writer.write(data)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        subscriber = [False]

        async def upstream() -> None:
            while data := await reader.read(65536):
                subscriber[0] = subscriber[0] or b"SUBSCRIBE" in data.upper()
                up_writer.write(data)

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if subscriber[0] and (self.holding or self.held):
                    self.held.append((writer, data))
                else:
                    writer.write(data)

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        writer.close()
        up_writer.close()


@contextlib.asynccontextmanager
async def delayed_pair(redis_server: RedisProcess) -> AsyncIterator[tuple[ServerProcess,
                                                                         ServerProcess,
                                                                         DelayingRelay]]:
    """Instance A on Redis through a ``DelayingRelay`` (a long ``--redis-timeout``: a
    held subscriber is not taken for a dead one), instance B on Redis directly."""
    async with DelayingRelay(redis_server.port) as relay:
        late = ServerProcess("--no-simulate", "--zones", "pjm,ercot", "--redis-timeout", "10",
                             publish_key=PUBLISH_KEY, redis_url=relay.url)  # fmt: skip
        direct = ServerProcess("--no-simulate", "--zones", "pjm,ercot", publish_key=PUBLISH_KEY,
                               redis_url=redis_server.url)  # fmt: skip
        await asyncio.gather(late.start_async(), direct.start_async())
        try:
            yield late, direct, relay
        finally:
            await asyncio.gather(late.stop_async(), direct.stop_async(), return_exceptions=True)


async def test_a_snapshot_ahead_of_the_instance_s_stream_sets_the_floor() -> None:
    """A's stream is held back while B publishes pjm 3 and 4: the snapshot (from Redis)
    says pjm 4. When A's stream catches up, 3 and 4 are not delivered after it; 5 is,
    and ercot (on the socket, not in the snapshot) goes on untouched."""
    with RedisProcess() as redis_server:
        async with delayed_pair(redis_server) as (late, direct, relay):
            await direct.publish({"market_zone": "pjm", "price": 1},
                                 {"market_zone": "pjm", "price": 2})  # fmt: skip
            async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{late.ws_url}{paths.WS_PRICES}", params={"zones": "pjm,ercot"}
            ) as ws:
                recorder = Recorder(ws)
                await recorder.wait(lambda log: any(m["type"] == "initial_data" for m in log))
                relay.holding = True
                accepted = await direct.publish({"market_zone": "pjm", "price": 3},
                                                {"market_zone": "pjm", "price": 4})  # fmt: skip
                assert [a["seq"] for a in accepted] == [3, 4]
                await ws.send_json({"type": "snapshot", "zones": ["pjm"]})
                await recorder.wait(lambda log: log[-1]["type"] == "snapshot")
                assert recorder.log[-1]["cursor"] == {"pjm": 4}
                relay.release()  # A now broadcasts 3 and 4: late, at or below the cursor
                await direct.publish({"market_zone": "ercot", "price": 7},
                                     {"market_zone": "pjm", "price": 5})  # fmt: skip
                await recorder.wait(lambda log: 5 in updates(log, "pjm"))
                index = next(i for i, m in enumerate(recorder.log) if m["type"] == "snapshot")
                assert updates(recorder.log[index + 1 :], "pjm") == [5]
                assert updates(recorder.log, "ercot") == [1]
                assert updates(recorder.log[:index], "pjm") == []  # 3 and 4 were held back
                await recorder.close()


async def test_the_relay_delays_an_instance_s_stream_without_losing_it() -> None:
    """The same lag, seen by a socket that takes no snapshot: it gets 2 and 3 once A's
    stream catches up (what the floor of the test above drops is real traffic)."""
    with RedisProcess() as redis_server:
        async with delayed_pair(redis_server) as (late, direct, relay):
            await direct.publish({"market_zone": "pjm", "price": 1})
            async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{late.ws_url}{paths.ws_market('pjm')}"
            ) as ws:
                recorder = Recorder(ws)
                await recorder.wait(lambda log: any(m["type"] == "initial_data" for m in log))
                relay.holding = True
                await direct.publish({"market_zone": "pjm", "price": 2},
                                     {"market_zone": "pjm", "price": 3})  # fmt: skip
                relay.release()
                await recorder.wait(lambda log: 3 in updates(log, "pjm"))
                assert updates(recorder.log, "pjm") == [2, 3]
                await recorder.close()


# --- in memory --------------------------------------------------------------------------


async def memory_publisher(client: Client, seed: int) -> dict[str, int]:
    chance = random.Random(seed)
    highest: dict[str, int] = {}
    for _ in range(BATCHES):
        batch = [{"market_zone": chance.choice(ZONES), "price": 1.0} for _ in range(BATCH)]
        for accepted in await publish(client, *batch):
            zone = accepted["market_zone"]
            highest[zone] = max(highest.get(zone, 0), accepted["seq"])
        await asyncio.sleep(0)  # let the socket's frames and snapshots interleave
    return highest


async def test_snapshots_while_publishers_write_in_memory(make_client: MakeClient) -> None:
    client = await make_client(zones=ZONES)
    seeded = {
        a["market_zone"]: a["seq"]
        for a in await publish(client, *({"market_zone": zone, "price": 1.0} for zone in ZONES))
    }
    ws = await client.ws_connect(paths.WS_PRICES, params={"zones": ",".join(ZONES)})
    recorder = Recorder(ws)
    await recorder.wait(reached(seeded))
    writers = asyncio.gather(*(memory_publisher(client, seed) for seed in range(PUBLISHERS)))
    sent = await snapshots_while(recorder, writers)
    finals = merged(await writers, seeded)
    await ws.send_json({"type": "snapshot"})
    await recorder.wait(snapshots(sent + 1))
    await recorder.wait(reached(finals))
    assert check_after_each_snapshot(recorder.log, finals) == sent + 1
    assert last_snapshot(recorder.log)["cursor"] == finals
    await recorder.close()


async def ask(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message``; the first answer that is not a price (an error or its reply)."""
    await ws.send_json(message)
    seen = await receive_until(ws, lambda m: m["type"] not in ("price_update", "initial_data"))
    return seen[-1]


async def test_snapshot_zones_default_to_the_socket_s_and_may_be_any_served(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=("pjm", "ercot", "caiso"))
    await publish(client, {"market_zone": "pjm", "price": 1}, {"market_zone": "caiso", "price": 2})
    async with client.ws_connect(paths.ws_market("pjm")) as ws:
        hello = await ws.receive_json()
        mine = await ask(ws, {"type": "snapshot"})
        assert (mine["type"], mine["epoch"], mine["cursor"]) == ("snapshot", hello["epoch"],
                                                                 {"pjm": 1})  # fmt: skip
        others = await ask(ws, {"type": "snapshot", "zones": ["caiso", "ercot", "caiso"]})
        assert others["cursor"] == {"caiso": 1, "ercot": 0} and others["prices"]["ercot"] is None
        assert others["prices"]["caiso"]["price"] == 2
        await publish(client, {"market_zone": "pjm", "price": 3})
        update = await ws.receive_json(timeout=WAIT)
        assert (update["type"], update["seq"]) == ("price_update", 2)
    async with client.ws_connect(paths.WS_PRICES, params={"zones": "caiso,pjm"}) as ws:
        await ws.receive_json()
        both = await ask(ws, {"type": "snapshot"})
        assert list(both["prices"]) == ["caiso", "pjm"] and both["cursor"] == {"caiso": 1,
                                                                              "pjm": 2}  # fmt: skip


async def test_snapshot_refusals_keep_the_socket_open(make_client: MakeClient) -> None:
    """Unknown zones (``unknown_zone``, as ``subscribe`` refuses them), none at all, more
    than ``max_snapshot_zones``, a malformed request: an ``error``, the socket stays."""
    zones = tuple(f"q{index:04d}" for index in range(1001))
    client = await make_client(zones=zones)
    async with client.ws_connect(paths.WS_PRICES, params={"zones": ""}) as ws:
        await ws.receive_json()
        for request, code, says in (
            ({"type": "snapshot", "zones": ["nope"]}, ErrorCode.UNKNOWN_ZONE, "nope"),
            ({"type": "snapshot", "zones": ["Q0001"]}, ErrorCode.UNKNOWN_ZONE, "lower case"),
            ({"type": "snapshot"}, ErrorCode.INVALID_MESSAGE, "no zones"),  # none subscribed
            ({"type": "snapshot", "zones": list(zones)}, ErrorCode.INVALID_MESSAGE,
             "at most 1000 zones"),
            ({"type": "snapshot", "zones": "q0001"}, ErrorCode.INVALID_MESSAGE, "list"),
        ):
            error = await ask(ws, request)
            assert (error["type"], error["code"]) == ("error", code), (request, error)
            assert says in error["message"], error
        bound = await ask(ws, {"type": "snapshot", "zones": list(zones[:1000])})
        assert bound["type"] == MessageType.SNAPSHOT and len(bound["cursor"]) == 1000
        assert (await ask(ws, {"type": "ping"}))["type"] == "pong"


async def test_a_snapshot_of_zones_the_token_leaves_out_is_forbidden(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=("pjm", "ercot"), jwt_secret=SECRET)
    allowed = {"token": token(zones=["pjm"])}
    async with client.ws_connect(paths.ws_market("pjm"), params=allowed) as ws:
        await ws.receive_json()
        error = await ask(ws, {"type": "snapshot", "zones": ["pjm", "ercot"]})
        assert (error["type"], error["code"]) == ("error", ErrorCode.FORBIDDEN_ZONE)
        assert (await ask(ws, {"type": "snapshot"}))["cursor"] == {"pjm": 0}


# --- ranged history over the socket ------------------------------------------------------


async def published_history(client: Client) -> None:
    for zone, timestamp in PRICES:
        await publish(client, {"market_zone": zone, "price": 1.0, "timestamp": timestamp})


def pairs(data: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(price["market_zone"], price["seq"]) for price in data]


async def test_ranged_history_over_the_socket(make_client: MakeClient) -> None:
    client = await make_client(zones=("pjm", "caiso", "ercot"))
    await published_history(client)
    async with client.ws_connect(paths.WS_PRICES, params={"zones": "pjm,ercot"}) as ws:
        await receive_until(ws, lambda m: m["type"] == "initial_data"
                            and m["market_zone"] == "ercot")  # fmt: skip
        answer = await ask(ws, {"type": "request_price_history", "from": FROM, "to": TO})
        assert answer["type"] == "price_history"
        assert (answer["zones"], answer["from"], answer["to"]) == (["pjm", "ercot"], FROM, TO)
        assert pairs(answer["data"]) == list(EXPECTED)
        assert (answer["truncated"], answer["cursor"], answer["limit"]) == (
            False, {"pjm": 5, "ercot": 3}, 1000,
        )
        cut = await ask(ws, {"type": "request_price_history", "zones": ["pjm", "ercot"],
                             "from": FROM, "to": TO, "limit": 2})  # fmt: skip
        assert pairs(cut["data"]) == list(EXPECTED[:2]) and cut["truncated"] is True
        one = await ask(ws, {"type": "request_price_history", "market_zone": "caiso",
                             "from": FROM})  # fmt: skip
        assert (one["market_zone"], pairs(one["data"])) == ("caiso", [("caiso", 1)])
        by_count = await ask(ws, {"type": "request_price_history", "market_zone": "pjm",
                                  "limit": 2})  # fmt: skip
        assert (by_count["limit"], [p["seq"] for p in by_count["data"]]) == (2, [4, 5])
        assert "from" not in by_count
        for bad in (
            {"type": "request_price_history", "from": TO, "to": FROM},
            {"type": "request_price_history", "zones": ["nope"], "from": FROM},
            {"type": "request_price_history", "zones": ["pjm"]},
            {"type": "request_price_history", "from": "2026-11-27T09:00:00"},
            {"type": "request_price_history", "from": FROM, "limit": 10_001},
        ):
            error = await ask(ws, bad)
            assert (error["type"], error["code"]) == ("error", "invalid_message"), (bad, error)
        assert (await ask(ws, {"type": "ping"}))["type"] == "pong"


async def test_ranged_history_is_bounded_by_zones_token_and_answer_size(
    make_client: MakeClient,
) -> None:
    zones = ("pjm", "caiso", "ercot")
    client = await make_client(zones=zones, max_zones_per_socket=2, jwt_secret=SECRET,
                               send_high_water=8192, send_hard_limit=8192 + 4096)  # fmt: skip
    for index in range(60):
        await publish(client, {"market_zone": "pjm", "price": float(index),
                               "timestamp": f"2026-11-27T09:{index:02d}:00Z"})  # fmt: skip
    path = paths.WS_PRICES
    async with client.ws_connect(path, params={"zones": "", "token": token()}) as ws:
        await ws.receive_json()
        many = await ask(ws, {"type": "request_price_history", "zones": list(zones), "from": FROM})
        assert (many["code"], "at most 2 zones" in many["message"]) == ("invalid_message", True)
        # A 4 KiB answer budget: cut at its end, said with truncated, never over it.
        cut = await ask(ws, {"type": "request_price_history", "zones": ["pjm"], "from": FROM})
        assert cut["truncated"] is True and 0 < len(cut["data"]) < 60
        assert [p["seq"] for p in cut["data"]] == list(range(1, len(cut["data"]) + 1))
        assert cut["cursor"] == {"pjm": len(cut["data"])}
    async with client.ws_connect(path, params={"zones": "", "token": token(zones=["ercot"])}) as ws:
        await ws.receive_json()
        error = await ask(ws, {"type": "request_price_history", "zones": ["pjm"], "from": FROM})
        assert error["code"] == "forbidden_zone"


async def test_a_single_zone_socket_s_ranged_history_defaults_to_its_zone(
    make_client: MakeClient,
) -> None:
    zone = "pjm"
    client = await make_client(zones=("pjm", "caiso", "ercot"))
    await published_history(client)
    async with client.ws_connect(paths.ws_market(zone)) as ws:
        await receive_until(ws, lambda m: m["type"] == "initial_data")
        answer = await ask(ws, {"type": "request_price_history", "from": FROM, "to": TO})
        assert pairs(answer["data"]) == [pair for pair in EXPECTED if pair[0] == zone]
        assert answer["zones"] == [zone] and "market_zone" not in answer


# --- the session's hold, without I/O (the rare paths the sockets above do not force) -----


class SnapshotStore(Store):
    """``tests.server.test_session.Store`` that also answers a snapshot (its zones' latest) and
    performs ``Hold`` as the driver does (the streams syncing); ``arrive`` runs while
    the snapshot is read: what the fan-out delivers meanwhile."""

    def __init__(self, arrive: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.arrive = arrive
        self.before_since: Callable[[], None] = lambda: None

    def answer(self, effect: Effect) -> Any:
        match effect:
            case ReadSince():
                self.before_since()
            case Hold(streams):
                for stream in streams:
                    stream.syncing = True
                return None
            case ReadSnapshot(zones):
                self.arrive()
                return Snapshot(self.epoch, {
                    zone: prices[-1] if (prices := self.zones.get(zone)) else None
                    for zone in zones
                })  # fmt: skip
        return super().answer(effect)


def opened(store: SnapshotStore, **policy: Any) -> Session:
    """A session with pjm open at its latest price (seq 5)."""
    store.fill("pjm", 1, 5)
    session = make_session(**policy)
    run(session.start(["pjm"], since=None, epoch=None), store)
    return session


def test_updates_held_above_the_cursor_follow_the_snapshot_once() -> None:
    store = SnapshotStore()
    session = opened(store, held_limit=4)
    stream = session.streams["pjm"]

    def arrive() -> None:
        store.fill("pjm", 1, 8)  # the snapshot sees 8 ...
        stream.held.extend(price("pjm", seq) for seq in range(6, 13))  # ... 6..12 arrive

    store.arrive = arrive
    effects = run(session.text('{"type":"snapshot"}'), store)
    assert [type(e).__name__ for e in effects[:3]] == ["Drain", "Hold", "ReadSnapshot"]
    messages_ = sent(effects)
    assert messages_[0]["cursor"] == {"pjm": 8}
    # The hold kept 9..12 (limit 4): it follows on from the cursor, nothing to read.
    assert [(m["seq"], m.get("replay")) for m in messages_[1:]] == [
        (9, None), (10, None), (11, None), (12, None),
    ]
    assert not any(isinstance(e, ReadSince) for e in effects)


def test_an_overflowed_hold_reads_the_missing_seqs_from_storage() -> None:
    store = SnapshotStore()
    session = opened(store, held_limit=2)
    stream = session.streams["pjm"]

    def arrive() -> None:
        store.zones["pjm"] = [price("pjm", seq) for seq in range(1, 7)]  # snapshot: 6
        stream.held.extend(price("pjm", seq) for seq in range(6, 11))  # hold keeps 9, 10

    def grown() -> None:  # the history has 10 by the time the hold is filled
        store.zones["pjm"] = [price("pjm", seq) for seq in range(1, 11)]

    store.arrive, store.before_since = arrive, grown
    effects = run(session.text('{"type":"snapshot"}'), store)
    messages_ = sent(effects)
    assert messages_[0]["cursor"] == {"pjm": 6}
    assert [m["seq"] for m in messages_[1:]] == [7, 8, 9, 10]
    assert all("replay" not in m for m in messages_[1:])
    assert any(isinstance(e, ReadSince) and e.seq == 6 for e in effects)


def test_a_zone_that_went_live_while_held_says_so_before_its_update() -> None:
    """``zone_status`` skips syncing streams: a zone stale before the hold and live after
    gets its ``live`` right before the first update above the cursor."""
    stale = {"pjm": b'{"type":"zone_status","market_zone":"pjm","status":"stale"}'}
    store = SnapshotStore()
    session = opened(store, zone_status=stale.get)
    stream = session.streams["pjm"]

    def arrive() -> None:
        stream.held.append(price("pjm", 6))
        stale.clear()  # the price made it live

    store.arrive = arrive
    effects = run(session.text('{"type":"snapshot"}'), store)
    assert [(m["type"], m.get("status"), m.get("seq"), m.get("last_seq"))
            for m in sent(effects)] == [
        ("snapshot", None, None, None), ("zone_status", "live", None, 6),
        ("price_update", None, 6, None),
    ]  # fmt: skip


def test_a_paced_zone_gets_the_newest_held_with_skipped_from_the_cursor() -> None:
    store = SnapshotStore()
    session = opened(store, max_rate=2.0)
    stream = session.streams["pjm"]

    def arrive() -> None:
        store.fill("pjm", 1, 6)
        stream.held.extend(price("pjm", seq) for seq in range(6, 10))

    store.arrive = arrive
    effects = run(session.text('{"type":"snapshot"}'), store)
    updates_ = [m for m in sent(effects) if m["type"] == "price_update"]
    assert [(m["seq"], m["skipped"]) for m in updates_] == [(9, 2)]


async def test_a_price_kept_for_a_slow_reader_is_held_with_the_rest(
    make_client: MakeClient,
) -> None:
    """A socket conflating (a slow reader: its newest price kept, not sent) takes a
    snapshot: the kept price is at or below the cursor, so it is never sent after it; the
    stream goes on above the cursor. (The conflation is started by hand, without the
    monitor that would release it, so the kept price is still there when the snapshot
    is taken.)"""
    client = await make_client(zones=("pjm",))
    async with client.ws_connect(paths.ws_market("pjm")) as ws:
        hello = await ws.receive_json()
        connection = connection_by_id(client.app[BROADCASTER], hello["connection_id"])
        await publish(client, *({"market_zone": "pjm", "price": float(i)} for i in range(3)))
        assert await collect_updates(ws, "pjm", until_seq=3) == [1, 2, 3]
        connection.conflated, connection.conflated_from = {}, {}
        client.app[BROADCASTER].detach(connection)  # as the flush does for a slow member
        await publish(client, {"market_zone": "pjm", "price": 4.0},
                      {"market_zone": "pjm", "price": 5.0})  # fmt: skip
        assert connection.conflated["pjm"].seq == 5 and connection.conflated_from["pjm"] == 3
        answer = await ask(ws, {"type": "snapshot"})
        assert answer["cursor"] == {"pjm": 5}
        assert "pjm" not in connection.conflated  # held, then dropped: the cursor has it
        connection.conflated = None
        await publish(client, {"market_zone": "pjm", "price": 6.0})
        assert await collect_updates(ws, "pjm", until_seq=6) == [6]
