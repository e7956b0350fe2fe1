"""The Server-Sent Events transport through real HTTP streams (PROTOCOL.md, "Server-Sent
Events transport"): events, cursors, ``Last-Event-ID`` resume, admission, heartbeat,
slow streams, shutdown and resume across restarts and instances."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.server.keys import BROADCASTER, STATS
from pricehub.wire import paths, sse
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import ServerProcess
from tests.harness.ssestream import Event, EventStream
from tests.harness.support import PUBLISH_KEY, WAIT, Client, MakeClient, eventually, publish

MARKET = paths.sse_market("pjm")


@asynccontextmanager
async def stream(
    client: Client, path: str, *, headers: dict[str, str] | None = None
) -> AsyncIterator[EventStream]:
    response = await client.get(path, headers=headers or {})
    assert response.status == 200, await response.text()
    try:
        yield EventStream(response)
    finally:
        response.close()


def price(zone: str, value: float) -> dict[str, Any]:
    return {"market_zone": zone, "price": value}


def updates(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.data["market_zone"], e.data["seq"]) for e in events if e.type == "price_update"]


def cursor_seqs(event: Event, zones: list[str]) -> dict[str, int]:
    """What an event's ``id:`` says, per zone (the cursor is opaque on the wire)."""
    assert event.id is not None, event
    return dict(sse.decode_cursor(event.id, zones).seqs)


async def test_single_zone_stream_sends_retry_established_initial_data_and_ids(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, price("pjm", 40.0))
    response = await client.get(MARKET)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert await response.content.readline() == b"retry: 1000\n"  # the first line
    events = EventStream(response)
    hello = await events.next()
    assert hello.type == "connection_established" and hello.data["transport"] == "sse"
    assert hello.data["market_zone"] == "pjm" and hello.id is None
    initial = await events.next()
    assert initial.type == "initial_data" and initial.data["latest_price"]["seq"] == 1
    await publish(client, price("pjm", 41.0))
    update = await events.next()
    assert update.type == "price_update" and update.data["seq"] == 2
    assert update.data["price"] == 41.0 and "replay" not in update.data
    assert update.id is not None and update.id.isascii() and " " not in update.id
    assert sse.decode_cursor(update.id, ["pjm"]) == sse.Cursor(hello.data["epoch"], {"pjm": 2})
    response.close()


async def test_multi_zone_stream_cursor_names_every_zone(make_client: MakeClient) -> None:
    client = await make_client()
    async with stream(client, paths.SSE_PRICES + "?zones=pjm,ercot") as events:
        hello = await events.next()
        assert hello.data["zones"] == ["pjm", "ercot"]
        await publish(client, price("pjm", 1.0), price("ercot", 2.0), price("pjm", 3.0))
        seen = await events.until(lambda e: e.type == "price_update" and e.data["seq"] == 2)
        assert updates(seen) == [("pjm", 1), ("ercot", 1), ("pjm", 2)]
        cursors = [cursor_seqs(e, ["pjm", "ercot"]) for e in seen if e.type == "price_update"]
        assert cursors == [
            {"pjm": 1, "ercot": 0}, {"pjm": 1, "ercot": 1}, {"pjm": 2, "ercot": 1},
        ]


async def test_last_event_id_resumes_exactly(make_client: MakeClient) -> None:
    client = await make_client()
    path = paths.SSE_PRICES + "?zones=pjm,ercot"
    async with stream(client, path) as events:
        await events.next()
        await publish(client, price("pjm", 1.0), price("ercot", 1.0))
        await events.until(lambda e: e.data.get("market_zone") == "ercot")
        cursor = events.last_id
    assert cursor is not None
    await publish(client, price("pjm", 2.0), price("pjm", 3.0), price("ercot", 2.0))
    async with stream(client, path, headers={"Last-Event-ID": cursor}) as events:
        seen = await events.until(
            lambda e: e.type == "resume_complete" and e.data["market_zone"] == "ercot"
        )
        replayed = [e for e in seen if e.type == "price_update"]
        assert updates(replayed) == [("pjm", 2), ("pjm", 3), ("ercot", 2)]
        assert all(e.data["replay"] is True for e in replayed)
        completes = [e.data for e in seen if e.type == "resume_complete"]
        assert [(c["market_zone"], c["recovered"]) for c in completes] == [
            ("pjm", True), ("ercot", True),
        ]
        assert not [e for e in seen if e.type == "initial_data"]
        await publish(client, price("pjm", 4.0))
        live = await events.next()
        assert (live.data["seq"], "replay" in live.data) == (4, False)


async def test_a_cursor_of_the_previous_decimal_form_still_resumes(
    make_client: MakeClient,
) -> None:
    """Clients holding a cursor written before the compact form resume across an upgrade
    (``<epoch>.<hash>.<seq>...``, one decimal seq a zone in sorted zone order)."""
    client = await make_client()
    path = paths.SSE_PRICES + "?zones=pjm,ercot"
    async with stream(client, path) as events:
        epoch = (await events.next()).data["epoch"]
    await publish(client, price("pjm", 1.0), price("ercot", 1.0), price("pjm", 2.0))
    decimal = f"{epoch}.{sse.zone_set_hash(['pjm', 'ercot'])}.1.1"  # ercot 1, pjm 1
    async with stream(client, path, headers={"Last-Event-ID": decimal}) as events:
        seen = await events.until(
            lambda e: e.type == "resume_complete" and e.data["market_zone"] == "ercot"
        )
    assert updates(seen) == [("pjm", 2)]
    assert all(e.data["recovered"] for e in seen if e.type == "resume_complete")


async def test_since_and_epoch_query_resume_on_the_single_zone_stream(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, price("pjm", 1.0), price("pjm", 2.0), price("pjm", 3.0))
    async with stream(client, MARKET) as events:
        epoch = (await events.next()).data["epoch"]
    async with stream(client, f"{MARKET}?since=1&epoch={epoch}") as events:
        seen = await events.until(lambda e: e.type == "resume_complete")
        assert [e.data["seq"] for e in seen if e.type == "price_update"] == [2, 3]
        assert seen[-1].data["recovered"] is True
    async with stream(client, f"{MARKET}?since=1&epoch=another") as events:
        seen = await events.until(lambda e: e.type == "resume_complete")
        assert seen[-1].data["recovered"] is False
        assert [e.type for e in seen[1:]] == ["gap", "initial_data", "resume_complete"]
        assert seen[1].data["reason"] == "epoch_changed" and seen[1].id is None


PJM_HASH = sse.zone_set_hash(["pjm"])


@pytest.mark.parametrize(
    "last_event_id",
    [
        "garbage", "abc.00000000.1", f"e.{PJM_HASH}.x", "e" * (sse.MAX_CURSOR + 1),
        "\u00e9poch.1.2", f"e.{PJM_HASH}.1.zAA", f"e.{PJM_HASH}.1.aAAA", f"e.{PJM_HASH}.1.a+A",
        f"e.{PJM_HASH}.{2**63}", f"e.{PJM_HASH}.1.AA",
    ],
    ids=[
        "garbage", "wrong-hash", "not-a-seq", "too-long", "not-ascii", "bad-width",
        "deltas-too-long", "not-base64url", "seq-over-2^63", "no-width",
    ],
)  # fmt: skip
async def test_malformed_cursor_is_400_with_json(
    make_client: MakeClient, last_event_id: str
) -> None:
    client = await make_client()
    response = await client.get(MARKET, headers={"Last-Event-ID": last_event_id})
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_cursor" and body["message"]


# One zone more than a stream may carry; the first MAX_STREAM_ZONES make the widest stream.
MANY_ZONES = tuple(f"z{i:04d}" for i in range(sse.MAX_STREAM_ZONES + 1))


async def test_the_widest_stream_resumes_from_its_own_cursor(
    make_client: MakeClient, redis_server: RedisProcess, raw: aioredis.Redis, prefix: str
) -> None:
    """A stream of the most zones allowed, on a feed that has been running a while (seqs
    of 5 to 7 digits: the decimal cursor was 7 KB and refused over 4 KiB, so EventSource
    stopped reconnecting for good), resumes from the ``id:`` it was given, exactly."""
    client = await make_client(
        zones=MANY_ZONES, max_zones_per_socket=2 * len(MANY_ZONES), max_batch_size=2000,
        redis_url=redis_server.url, key_prefix=prefix,
    )  # fmt: skip
    zones = MANY_ZONES[:-1]
    # Where a long-running feed's seqs are; the next price of each zone takes the next one.
    await raw.mset({f"{prefix}seq:{zone}": 10_000 + 997 * i for i, zone in enumerate(zones)})
    await publish(client, *[price(zone, 1.0) for zone in zones])
    path = paths.SSE_PRICES + "?zones=" + ",".join(zones)
    async with stream(client, path) as events:
        await events.until(lambda e: e.data.get("market_zone") == zones[-1], timeout=30)
        (accepted,) = await publish(client, price(zones[0], 2.0))
        await events.until(lambda e: e.data.get("seq") == accepted["seq"])
        cursor = events.last_id
    assert cursor is not None
    (missed,) = await publish(client, price(zones[500], 3.0))
    async with stream(client, path, headers={"Last-Event-ID": cursor}) as events:
        seen = await events.until(
            lambda e: e.type == "resume_complete" and e.data["market_zone"] == zones[-1],
            timeout=30,
        )
    assert updates(seen) == [(zones[500], missed["seq"])]
    completes = [e.data for e in seen if e.type == "resume_complete"]
    assert len(completes) == len(zones) and all(c["recovered"] for c in completes)


async def test_the_widest_cursor_there_can_be_is_accepted(make_client: MakeClient) -> None:
    """``MAX_STREAM_ZONES`` zones with seqs as far apart as a store can hand out and the
    longest epoch: the longest ``id:`` the server could ever write still passes its own
    header limits and checks; a stream of one zone more is refused before it starts."""
    client = await make_client(zones=MANY_ZONES, max_zones_per_socket=2 * len(MANY_ZONES))
    zones = MANY_ZONES[:-1]
    seqs = {zone: sse.MAX_SEQ if i % 2 else 2**62 for i, zone in enumerate(zones)}
    widest = sse.encode_cursor("e" * 64, zones, seqs).decode()
    assert len(widest) == sse.MAX_CURSOR
    path = paths.SSE_PRICES + "?zones=" + ",".join(zones)
    async with stream(client, path, headers={"Last-Event-ID": widest}) as events:
        assert (await events.next()).type == "connection_established"
    refused = await client.get(paths.SSE_PRICES)  # every zone: one too many
    assert refused.status == 422 and (await refused.json())["error"] == "too_many_zones"


async def test_cursor_of_another_zone_set_is_400(make_client: MakeClient) -> None:
    client = await make_client()
    async with stream(client, MARKET) as events:
        await events.next()
        await publish(client, price("pjm", 1.0))
        await events.until(lambda e: e.type == "price_update")
        cursor = events.last_id
    assert cursor is not None
    response = await client.get(paths.sse_market("ercot"), headers={"Last-Event-ID": cursor})
    assert response.status == 400


async def test_admission_answers_with_http_status_before_the_stream(
    make_client: MakeClient,
) -> None:
    secret = "s" * 32
    client = await make_client(jwt_secret=secret, allowed_origins=("https://desk.example",))
    token = jwt.encode({"exp": int(time.time()) + 60, "zones": ["pjm"]}, secret)
    assert (await client.get(paths.sse_market("nowhere") + f"?token={token}")).status == 404
    missing = await client.get(MARKET)
    assert missing.status == 401 and (await missing.json())["error"] == "invalid_token"
    assert (await client.get(paths.sse_market("ercot") + f"?token={token}")).status == 403
    evil = await client.get(MARKET + f"?token={token}", headers={"Origin": "https://evil.example"})
    assert evil.status == 403
    good = await client.get(MARKET + f"?token={token}", headers={"Origin": "https://desk.example"})
    assert good.status == 200
    assert good.headers["Access-Control-Allow-Origin"] == "https://desk.example"
    good.close()
    bearer = await client.get(MARKET, headers={"Authorization": f"Bearer {token}"})
    assert bearer.status == 200
    bearer.close()
    rejected = client.app[STATS].rejected_connections
    assert rejected["unknown_zone"] == 1 and rejected["auth"] == 1
    assert rejected["forbidden_zone"] == 1 and rejected["origin"] == 1


async def test_connection_limit_is_503(make_client: MakeClient) -> None:
    client = await make_client(max_connections_per_ip=1)
    async with stream(client, MARKET) as events:
        await events.next()
        over = await client.get(MARKET)
        assert over.status == 503 and (await over.json())["error"] == "over_capacity"
    # The slot comes back once the first stream is gone.
    await eventually(lambda: client.app[STATS].total_disconnections == 1)
    async with stream(client, MARKET) as events:
        assert (await events.next()).type == "connection_established"


async def test_heartbeat_is_a_ping_comment_and_a_reading_stream_stays_open(
    make_client: MakeClient,
) -> None:
    client = await make_client(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    async with stream(client, MARKET) as events:
        await events.next()
        started = time.monotonic()
        pings = 0
        while time.monotonic() - started < 2.5:  # well past the heartbeat timeout
            assert await events.comment(timeout=5) == "ping"
            pings += 1
        assert pings >= 5
        assert client.app[STATS].disconnections["heartbeat_timeout"] == 0


async def test_stats_and_metrics_count_streams_by_transport(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await client.ws_connect(paths.ws_market("pjm"))
    async with stream(client, MARKET) as events:
        await events.next()
        stats = await (await client.get(paths.STATS)).json()
        assert stats["total_connections"] == 2
        assert stats["connections_by_transport"] == {"ws": 1, "sse": 1}
        text = await (await client.get(paths.METRICS)).text()
        assert 'pricehub_connections_open_by_transport{transport="sse"} 1.0' in text
        assert 'pricehub_connections_open_by_transport{transport="ws"} 1.0' in text
    await ws.close()


async def test_a_stream_that_is_not_read_is_conflated_then_closed(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        send_high_water=4096, send_hard_limit=65536, slow_consumer_timeout=1.0, send_max_lag=0.2
    )
    port = client.server.port
    assert port is not None
    # A tiny receive window and never reading: the server's writes back up quickly. Set
    # before connecting: afterwards the window is already advertised, and a kernel that
    # autotunes receive buffers to 32 MiB takes the whole test's output.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {MARKET} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await eventually(lambda: client.app[STATS].total_connections == 1)
    # Until the kernel's buffers are full (their size varies: up to 4 MiB on a machine
    # here) and ours back up; bounded at 100,000 prices (~17 MB of events).
    stats, broadcaster = client.app[STATS], client.app[BROADCASTER]
    for start in range(0, 100_000, 500):
        await publish(client, *[price("pjm", float(i)) for i in range(start, start + 500)])
        if stats.disconnections["slow_consumer"] or broadcaster.conflation_events:
            break
    await eventually(lambda: stats.disconnections["slow_consumer"] == 1, within=15)
    writer.close()


def test_stream_ends_on_shutdown_and_resumes_across_a_restart_on_redis() -> None:
    """SIGTERM ends the stream; the cursor resumes on the restarted server and on a
    second instance of the same Redis (same epoch, same seqs)."""
    with RedisProcess() as redis_server:
        url = redis_server.url
        a = ServerProcess("--no-simulate", publish_key=PUBLISH_KEY, redis_url=url)
        b = ServerProcess("--no-simulate", publish_key=PUBLISH_KEY, redis_url=url)
        with a, b:
            asyncio.run(_restart_and_resume(a, b))


async def drain_to_end(events: EventStream) -> None:
    """Read until the stream ends (bounded by each read's deadline)."""
    while True:
        try:
            await events.next(timeout=10)
        except EOFError:
            return


async def _restart_and_resume(a: ServerProcess, b: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.get(a.url + MARKET)
        events = EventStream(response)
        await events.next()
        for value in (1.0, 2.0):
            await a.publish(price("pjm", value))
        await events.until(lambda e: e.type == "price_update" and e.data["seq"] == 2)
        cursor = events.last_id
        assert cursor is not None
        await a.stop_async()
        await drain_to_end(events)  # the stream ended with the server
        await b.publish(price("pjm", 3.0))
        await a.start_async()
        await b.publish(price("pjm", 4.0))
        for server in (a, b):
            response = await session.get(server.url + MARKET, headers={"Last-Event-ID": cursor})
            assert response.status == 200
            resumed = EventStream(response)
            seen = await resumed.until(lambda e: e.type == "resume_complete")
            assert [e.data["seq"] for e in seen if e.type == "price_update"] == [3, 4]
            assert seen[-1].data["recovered"] is True
            response.close()


async def test_streams_in_step_share_one_encoding_and_one_cursor(make_client: MakeClient) -> None:
    """Three streams on the same zones form one audience: each update is encoded once and
    the same bytes (ids included) reach all three."""
    client = await make_client()
    path = paths.SSE_PRICES + "?zones=ercot,pjm"
    async with stream(client, path) as a, stream(client, path) as b, stream(client, path) as c:
        for events in (a, b, c):
            await events.next()
        await publish(client, price("pjm", 1.0))
        for events in (a, b, c):
            await events.until(lambda e: e.type == "price_update")
        broadcaster = client.app[BROADCASTER]
        audiences = [aud for aud in broadcaster._audiences.values() if aud.encoding.name == "sse"]
        assert len(audiences) == 1 and len(audiences[0].members) == 3
        await publish(client, price("ercot", 2.0), price("pjm", 3.0))
        got = [await events.until(lambda e: e.data.get("seq") == 2) for events in (a, b, c)]
        assert got[0] == got[1] == got[2]
        assert [cursor_seqs(e, ["pjm", "ercot"]) for e in got[0] if e.id] == [
            {"pjm": 1, "ercot": 1}, {"pjm": 2, "ercot": 1},
        ]


# Every line an event stream of the contract may carry: a field (``event``, ``data``,
# ``id``, ``retry``), a comment (``: ping``), or the blank line that ends an event.
SSE_LINE = re.compile(rb"(?:(?:event|data|id|retry): [^\r\n]*|:[^\r\n]*)?\n")


async def strict_event(response: aiohttp.ClientResponse, *, timeout: float = 10.0) -> Event:
    """The next event, failing on any line the contract never writes (a WebSocket
    frame's bytes, say: ``EventStream`` would skip it as an unknown field) and on an
    event whose ``event:`` name is missing or is not its data's ``type``."""
    fields: dict[bytes, bytes] = {}
    async with asyncio.timeout(timeout):
        while True:
            line = await response.content.readline()
            if not line:
                raise EOFError("event stream ended")
            assert SSE_LINE.fullmatch(line), f"not an SSE line: {line[:120]!r}"
            if line.startswith(b":"):
                continue
            if line == b"\n":
                if b"data" in fields:
                    break
                fields.clear()  # the end of the ``retry:`` block
                continue
            name, _, value = line[:-1].partition(b": ")
            assert name not in fields, f"{name!r} twice in one event: {fields}"
            fields[name] = value
    data = orjson.loads(fields[b"data"])
    assert fields.get(b"event") == data["type"].encode(), (fields.get(b"event"), data)
    event_id = fields.get(b"id")
    return Event(data["type"], data, None if event_id is None else event_id.decode())


def test_a_live_stream_gets_failover_and_recovery_as_well_formed_events() -> None:
    """Redis SIGKILLed under a live stream, then back: each backend change is an SSE
    event (no WebSocket frame in the stream) and the next price keeps its ``event:``."""
    with RedisProcess() as redis_server:
        server = ServerProcess(
            "--no-simulate", "--redis-timeout", "0.3", "--redis-probe-interval", "0.2",
            # A ping every second ends the line a stray frame would leave open.
            "--heartbeat-interval", "1", "--heartbeat-timeout", "30",
            publish_key=PUBLISH_KEY, redis_url=redis_server.url,
        )  # fmt: skip
        with server:
            asyncio.run(_backend_changes_on_a_stream(server, redis_server))


async def _backend_changes_on_a_stream(server: ServerProcess, redis_server: RedisProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(server.url + MARKET) as response:
        assert response.status == 200
        hello = await strict_event(response)
        assert (hello.type, hello.data["storage_backend"]) == ("connection_established", "redis")
        for value, (backend, change) in enumerate(
            [("in-memory", redis_server.kill), ("redis", redis_server.start)]
        ):
            await asyncio.to_thread(change)
            while (event := await strict_event(response)).type != "storage_backend_changed":
                assert event.type == "price_update", event  # nothing else is due
            assert event.data["storage_backend"] == backend and event.id is None
            (accepted,) = await server.publish(price("pjm", float(value)))
            while (event := await strict_event(response)).type != "price_update":
                pass
            assert event.data["seq"] == accepted["seq"] and event.id is not None


# --- bytes a client sends after its request (issue 23, finding 1) -----------------------

JUNK_STREAMS = 8
JUNK_PER_STREAM = 12 << 20  # bytes; past aiohttp's 32 queued parse errors of 256 KiB
JUNK_BUDGET_KIB = 48 << 10  # what the server may grow by for all of them (it used to be ~300 MB)


def open_raw_stream(port: int) -> socket.socket:
    """A bare SSE request, read up to the end of the response headers (the stream runs)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"GET {MARKET} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        assert data, f"the server closed before the stream started: {head!r}"
        head += data
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def send_junk(sock: socket.socket) -> int:
    """Up to ``JUNK_PER_STREAM`` NUL bytes (the costliest junk: each repr is 4 bytes);
    returns how many the server took before it stopped reading (bounded: 2 s a chunk)."""
    chunk, sent = b"\0" * (1 << 20), 0
    sock.settimeout(2.0)
    with contextlib.suppress(TimeoutError, OSError):
        while sent < JUNK_PER_STREAM:
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


def test_bytes_after_the_request_cost_the_server_no_memory() -> None:
    """An SSE client has nothing to send once its stream runs; what one sends anyway is
    dropped unparsed: the server's memory stays flat while streams push junk and nothing
    of it remains after they close (it used to queue ~39 MB of parse errors per stream,
    cyclic garbage the frozen, rarely running collector kept for good)."""
    with ServerProcess("--no-simulate") as server:
        baseline = server.memory_kib()
        sockets = [open_raw_stream(server.port) for _ in range(JUNK_STREAMS)]
        try:
            with ThreadPoolExecutor(JUNK_STREAMS) as pool:
                sent = list(pool.map(send_junk, sockets))
            peak = server.memory_kib("VmHWM") - baseline
            assert peak < JUNK_BUDGET_KIB, f"grew {peak} KiB while streams sent {sent}"
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + WAIT
        # Reading went on (only parsing stopped), so the server saw every client leave.
        while True:
            still, grown = open_connections(server), server.memory_kib() - baseline
            if not still and grown <= JUNK_BUDGET_KIB // 4:
                break
            assert time.monotonic() < deadline, f"{still} streams open, {grown} KiB more"
            time.sleep(0.05)


def open_connections(server: ServerProcess) -> int:
    with urllib.request.urlopen(server.url + paths.HEALTH, timeout=WAIT) as response:
        return int(orjson.loads(response.read())["active_connections"])
