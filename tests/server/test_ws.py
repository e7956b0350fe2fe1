"""Both WebSocket endpoints through real sockets: every message type, close code and resume."""

from __future__ import annotations

import asyncio
import cProfile
import os
import re
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from pricehub.server.keys import BROADCASTER, STATS
from tests.harness.support import (
    WAIT,
    Client,
    MakeClient,
    collect_updates,
    eventually,
    publish,
    receive_json,
    receive_until,
)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def connect(client: Client, path: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect(path, **kwargs)


async def test_single_zone_connect_sends_established_then_initial_data(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 41.5, "volume": 10})
    ws = await connect(client, "/api/ws/ws/market/pjm")
    hello = await receive_json(ws)
    assert hello["type"] == "connection_established"
    assert uuid.UUID(hello["connection_id"]).version == 4
    assert hello["market_zone"] == "pjm" and "zones" not in hello
    assert hello["storage_backend"] == "in-memory"
    assert hello["heartbeat_interval"] == 30.0 and isinstance(hello["epoch"], str)
    assert hello["message"] == "Connected to pjm market updates"
    assert TIMESTAMP.match(hello["timestamp"])
    initial = await receive_json(ws)
    assert initial["type"] == "initial_data" and initial["market_zone"] == "pjm"
    assert initial["latest_price"] == {
        "market_zone": "pjm",
        "price": 41.5,
        "volume": 10.0,
        "seq": 1,
        "timestamp": initial["latest_price"]["timestamp"],
        "accepted_at": initial["latest_price"]["accepted_at"],  # tests/server/test_accepted_at.py
    }
    await publish(
        client, {"market_zone": "pjm", "price": -3.25, "timestamp": "2026-11-27T10:00:00-05:00"}
    )
    update = await receive_json(ws)
    assert update == {
        "type": "price_update",
        "market_zone": "pjm",
        "price": -3.25,
        "volume": None,
        "seq": 2,
        "timestamp": "2026-11-27T15:00:00.000Z",
        "accepted_at": update["accepted_at"],
    }


async def test_no_initial_data_for_a_zone_without_prices(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await connect(client, "/api/ws/ws/market/ercot")
    assert (await receive_json(ws))["type"] == "connection_established"
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"  # nothing was queued before it


async def test_multi_zone_socket_defaults_to_all_zones_and_routes_updates(
    make_client: MakeClient,
) -> None:
    client = await make_client(zones=("pjm", "ercot", "caiso"))
    ws = await connect(client, "/api/ws/ws/prices")
    hello = await receive_json(ws)
    assert hello["zones"] == ["pjm", "ercot", "caiso"] and "market_zone" not in hello
    few = await connect(client, "/api/ws/ws/prices?zones=ercot,pjm")
    assert (await receive_json(few))["zones"] == ["ercot", "pjm"]
    await publish(client, {"market_zone": "caiso", "price": 1}, {"market_zone": "pjm", "price": 2})
    assert [
        (m["market_zone"], m["seq"]) for m in [await receive_json(ws), await receive_json(ws)]
    ] == [("caiso", 1), ("pjm", 1)]
    only = await receive_json(few)
    assert (only["market_zone"], only["price"]) == ("pjm", 2.0)


async def test_empty_zones_then_subscribe_and_unsubscribe(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "miso", "price": 30})
    ws = await connect(client, "/api/ws/ws/prices?zones=")
    assert (await receive_json(ws))["zones"] == []
    await ws.send_json({"type": "subscribe", "zones": ["miso", "spp"]})
    assert (await receive_json(ws))["type"] == "subscribed"
    initial = await receive_json(ws)
    assert initial["type"] == "initial_data" and initial["latest_price"]["seq"] == 1
    await ws.send_json({"type": "unsubscribe", "zones": ["miso"]})
    answer = await receive_json(ws)
    assert (answer["type"], answer["zones"]) == ("unsubscribed", ["miso"])
    await publish(client, {"market_zone": "miso", "price": 31}, {"market_zone": "spp", "price": 5})
    update = await receive_json(ws)
    assert update["market_zone"] == "spp"  # miso's update was not delivered


async def test_ping_heartbeat_and_history(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(5)])
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_until(ws, lambda m: m["type"] == "initial_data")
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"
    await ws.send_json({"type": "heartbeat"})
    ack = await receive_json(ws)
    assert ack["type"] == "heartbeat_ack" and TIMESTAMP.match(ack["timestamp"])
    await ws.send_json({"type": "request_price_history", "limit": 5000})
    capped = await receive_json(ws)  # the limit is echoed as asked; the data is capped
    assert capped["limit"] == 5000 and len(capped["data"]) == 5
    await ws.send_json({"type": "request_price_history", "limit": 3})
    history = await receive_json(ws)
    assert history["type"] == "price_history" and history["limit"] == 3
    assert [p["seq"] for p in history["data"]] == [3, 4, 5]
    await ws.send_json({"type": "request_price_history", "hours": 1})
    recent = await receive_json(ws)
    assert recent["hours"] == 1 and [p["seq"] for p in recent["data"]] == [1, 2, 3, 4, 5]
    await publish(client, {"market_zone": "pjm", "price": 1, "timestamp": "2020-01-01T00:00:00Z"})
    await receive_json(ws)  # the live update
    await ws.send_json({"type": "request_price_history", "hours": 1})
    assert 6 not in [p["seq"] for p in (await receive_json(ws))["data"]]  # too old


async def test_history_on_multi_zone_socket_needs_a_zone(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await connect(client, "/api/ws/ws/prices?zones=")
    await receive_json(ws)
    await ws.send_json({"type": "request_price_history", "limit": 1})
    assert (await receive_json(ws))["code"] == "invalid_message"
    await ws.send_json({"type": "request_price_history", "limit": 1, "market_zone": "atlantis"})
    assert (await receive_json(ws))["code"] == "unknown_zone"
    await ws.send_json({"type": "request_price_history", "limit": 1, "market_zone": "spp"})
    answer = await receive_json(ws)
    assert (answer["type"], answer["market_zone"], answer["data"]) == ("price_history", "spp", [])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('{"no_type": 1}', "invalid_message"),
        ('{"type": "order_pizza"}', "unknown_type"),
        ('{"type": "subscribe", "zones": "pjm"}', "invalid_message"),
        ('{"type": "subscribe", "zones": ["atlantis"]}', "unknown_zone"),
        ('{"type": "request_price_history", "limit": "ten"}', "invalid_message"),
    ],
)
async def test_bad_input_gets_an_error_and_the_socket_stays_open(
    make_client: MakeClient, frame: str, code: str
) -> None:
    client = await make_client()
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_json(ws)
    await ws.send_str(frame)
    error = await receive_json(ws)
    assert (error["type"], error["code"]) == ("error", code) and error["message"]
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"


async def test_binary_frames_are_rejected_politely(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_json(ws)
    await ws.send_bytes(b"\x00\x01")
    error = await receive_json(ws)
    assert error["code"] == "invalid_message" and "binary" in error["message"]


@pytest.mark.parametrize(
    "path",
    ["/api/ws/ws/market/atlantis", "/api/ws/ws/market/PJM", "/api/ws/ws/prices?zones=pjm,atlantis"],
)
async def test_unknown_or_malformed_zone_closes_1008(make_client: MakeClient, path: str) -> None:
    client = await make_client()
    ws = await connect(client, path)
    message = await ws.receive(timeout=WAIT)
    assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1008


async def test_oversized_frame_closes_1009(make_client: MakeClient) -> None:
    client = await make_client(max_frame_size=1024)
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_json(ws)
    await ws.send_str('{"type":"ping","pad":"' + "x" * 2000 + '"}')
    error = await receive_json(ws)
    assert (error["type"], error["code"]) == ("error", "message_too_large")
    message = await ws.receive(timeout=WAIT)
    assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1009
    stats = client.app[STATS]
    # The server notices the close on its next read, a moment after the client does.
    await eventually(lambda: stats.protocol_errors["message_too_large"] == 1)
    assert stats.disconnections["protocol"] == 1


async def test_rate_limit_warns_then_closes_4029(make_client: MakeClient) -> None:
    client = await make_client(client_rate_limit=2.0)  # burst 4
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_json(ws)
    for _ in range(12):
        await ws.send_json({"type": "ping"})
    kinds = []
    while True:
        message = await ws.receive(timeout=WAIT)
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        body = message.json()
        kinds.append(body.get("code") or body["type"])
    assert kinds[:4] == ["pong"] * 4 and "rate_limited" in kinds
    assert ws.close_code == 4029


async def test_connection_limits_close_1013(make_client: MakeClient) -> None:
    client = await make_client(max_connections=2)
    first = await connect(client, "/api/ws/ws/market/pjm")
    second = await connect(client, "/api/ws/ws/market/pjm")
    await receive_json(first)
    await receive_json(second)
    third = await connect(client, "/api/ws/ws/market/pjm")
    assert (await third.receive(timeout=WAIT)).type is aiohttp.WSMsgType.CLOSE
    assert third.close_code == 1013
    await first.close()
    fourth = await connect(client, "/api/ws/ws/market/pjm")
    assert (await receive_json(fourth))["type"] == "connection_established"


async def test_resume_replays_missed_updates_flagged_then_goes_live(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(10)])
    ws = await connect(client, "/api/ws/ws/market/pjm")
    epoch = (await receive_json(ws))["epoch"]
    await ws.close()
    ws = await connect(client, f"/api/ws/ws/market/pjm?since=6&epoch={epoch}")
    await receive_json(ws)
    replayed = [await receive_json(ws) for _ in range(4)]
    assert [(m["seq"], m.get("replay")) for m in replayed] == [
        (7, True),
        (8, True),
        (9, True),
        (10, True),
    ]
    done = await receive_json(ws)
    assert done["type"] == "resume_complete" and done["recovered"] is True
    assert (done["from_seq"], done["to_seq"]) == (7, 10)
    await publish(client, {"market_zone": "pjm", "price": 99})
    live = await receive_json(ws)
    assert live["seq"] == 11 and "replay" not in live


async def test_resume_up_to_date_client_is_recovered_without_replay(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1})
    ws = await connect(client, "/api/ws/ws/market/pjm?since=1")
    await receive_json(ws)
    done = await receive_json(ws)
    assert (done["type"], done["recovered"], done["from_seq"], done["to_seq"]) == (
        "resume_complete",
        True,
        2,
        1,
    )


@pytest.mark.parametrize(
    ("query", "gap"),
    [
        # The contract's gap comes first, naming what the client will never get.
        ("since=1&epoch=another-lineage",
         {"reason": "epoch_changed", "from_seq": 2, "to_seq": None, "epoch": "another-lineage"}),
        ("since=50", None),  # ahead of the zone: nothing newer is missing, no gap
        ("since=1", {"reason": "history_exceeded", "from_seq": 2, "to_seq": 5}),
    ],
)  # fmt: skip
async def test_resume_that_cannot_be_filled_sends_initial_data_and_recovered_false(
    make_client: MakeClient, query: str, gap: dict[str, Any] | None
) -> None:
    client = await make_client(history_size=3)
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(6)])
    ws = await connect(client, f"/api/ws/ws/market/pjm?{query}")
    await receive_json(ws)
    initial = await receive_json(ws)
    if gap is not None:
        assert initial["type"] == "gap" and initial["market_zone"] == "pjm"
        assert {key: initial.get(key) for key in gap} == gap
        initial = await receive_json(ws)
    assert initial["type"] == "initial_data" and initial["latest_price"]["seq"] == 6
    done = await receive_json(ws)
    assert done["type"] == "resume_complete" and done["recovered"] is False
    assert done["to_seq"] == 6


async def test_bad_since_is_reported_and_the_client_gets_current_state(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1})
    ws = await connect(client, "/api/ws/ws/market/pjm?since=-4")
    await receive_json(ws)
    assert (await receive_json(ws))["code"] == "invalid_message"
    assert (await receive_json(ws))["type"] == "initial_data"


async def test_subscribe_with_since_resumes_per_zone(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, *[{"market_zone": z, "price": 1} for z in ("pjm", "ercot") * 3])
    ws = await connect(client, "/api/ws/ws/prices?zones=")
    epoch = (await receive_json(ws))["epoch"]
    await ws.send_json(
        {"type": "subscribe", "zones": ["pjm", "ercot"], "since": {"pjm": 1}, "epoch": epoch}
    )
    messages = await receive_until(
        ws, lambda m: m["type"] == "initial_data" and m["market_zone"] == "ercot"
    )
    assert [(m["type"], m.get("market_zone"), m.get("seq")) for m in messages] == [
        ("subscribed", None, None),
        ("price_update", "pjm", 2),
        ("price_update", "pjm", 3),
        ("resume_complete", "pjm", None),
        ("initial_data", "ercot", None),
    ]


async def test_resume_with_concurrent_publisher_has_no_gap_and_no_duplicate(
    make_client: MakeClient,
) -> None:
    client = await make_client(history_size=5000)
    await publish(client, *[{"market_zone": "pjm", "price": p} for p in range(200)])
    total = 600

    async def publisher() -> None:
        for start in range(200, total, 10):
            await publish(
                client, *[{"market_zone": "pjm", "price": p} for p in range(start, start + 10)]
            )

    task = asyncio.create_task(publisher())
    resumers = []
    for since in (0, 50, 150):
        ws = await connect(client, f"/api/ws/ws/market/pjm?since={since}")
        resumers.append((since, ws))
    await task
    for since, ws in resumers:
        await receive_json(ws)
        seqs = await collect_updates(ws, "pjm", until_seq=total)
        assert seqs == list(range(since + 1, total + 1))


async def test_200_clients_receive_every_update_in_order(make_client: MakeClient) -> None:
    client = await make_client()
    url = client.make_url("/api/ws/ws/market/ercot")
    # The test client's session pools at most 100 connections; sockets hold theirs.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with asyncio.timeout(WAIT):
            sockets = await asyncio.gather(*(session.ws_connect(url) for _ in range(200)))
        for ws in sockets:
            await receive_json(ws)
        for start in range(0, 50, 10):
            await publish(
                client, *[{"market_zone": "ercot", "price": p} for p in range(start, start + 10)]
            )
        results = await asyncio.gather(
            *(collect_updates(ws, "ercot", until_seq=50) for ws in sockets)
        )
        assert all(seqs == list(range(1, 51)) for seqs in results)
        for ws in sockets:
            await ws.close()


async def test_server_pings_and_reaper_closes_silent_clients_4000(make_client: MakeClient) -> None:
    client = await make_client(heartbeat_interval=0.1, heartbeat_timeout=0.6)
    # autoping=False: this client never answers pings, so only its own frames count.
    silent = await connect(client, "/api/ws/ws/market/pjm", autoping=False)
    lively = await connect(client, "/api/ws/ws/market/pjm")  # answers pings while reading
    await receive_json(silent)
    await receive_json(lively)
    lively_closed = asyncio.create_task(lively.receive())  # keeps reading, so it pongs
    ping = await silent.receive(timeout=WAIT)
    assert ping.type is aiohttp.WSMsgType.PING
    while True:
        message = await silent.receive(timeout=WAIT)
        if message.type is aiohttp.WSMsgType.CLOSE:
            break
    assert silent.close_code == 4000
    assert not lively_closed.done()  # the reaper ran several times and spared it
    await lively.send_json({"type": "ping"})
    assert orjson.loads((await asyncio.wait_for(lively_closed, WAIT)).data)["type"] == "pong"


async def test_backend_change_is_announced_to_every_client(make_client: MakeClient) -> None:
    client = await make_client(compression=True)
    sockets = [
        await connect(client, path, compress=compress)
        for path, compress in (
            ("/api/ws/ws/market/pjm", 0), ("/api/ws/ws/prices?zones=", 0),
            ("/api/ws/ws/market/pjm", 15),  # permessage-deflate: its own framing
        )
    ]
    assert [bool(ws.compress) for ws in sockets] == [False, False, True]
    for ws in sockets:
        await receive_json(ws)
    client.app[BROADCASTER].on_backend_changed("redis")
    for ws in sockets:
        message = await receive_json(ws)
        assert (message["type"], message["storage_backend"]) == ("storage_backend_changed", "redis")


async def test_history_for_absurdly_many_hours_returns_everything(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1})
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_until(ws, lambda m: m["type"] == "initial_data")
    await ws.send_json({"type": "request_price_history", "hours": 1e300})
    answer = await receive_json(ws)
    assert answer["type"] == "price_history" and [p["seq"] for p in answer["data"]] == [1]


async def test_epoch_change_closes_sockets_with_1001_so_clients_resume(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1})
    ws = await connect(client, "/api/ws/ws/market/pjm")
    epoch = (await receive_json(ws))["epoch"]
    await receive_json(ws)  # initial_data
    client.app[BROADCASTER].on_epoch_changed("a-new-lineage")
    message = await ws.receive(timeout=WAIT)
    assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
    # The resume the client then makes with its old epoch is answered as a gap.
    again = await connect(client, f"/api/ws/ws/market/pjm?since=1&epoch={epoch}x")
    await receive_json(again)
    assert (await receive_json(again))["reason"] == "epoch_changed"  # the gap, then ...
    assert (await receive_json(again))["type"] == "initial_data"
    assert (await receive_json(again))["recovered"] is False
    await eventually(lambda: client.app[STATS].disconnections["epoch_changed"] == 1)


# --- paced replays and histories (issue 11 item 1) ------------------------------------------

ALL_ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")


async def fill(client: Client, zone: str, count: int) -> None:
    for start in range(0, count, 1000):
        await publish(client, *[
            {"market_zone": zone, "price": float(p)} for p in range(start, min(count, start + 1000))
        ])


async def test_a_reading_client_gets_its_whole_paced_replay_once_in_order_then_live(
    make_client: MakeClient,
) -> None:
    """Seven zones of 3,000 prices (~2.3 MB of replay, paced in 16 KiB chunks) while a
    publisher keeps going: every seq of every zone once, in order, replay then live."""
    client = await make_client(history_size=4000)  # room for the live ones: nothing evicted
    for zone in ALL_ZONES:
        await fill(client, zone, 3000)
    ws = await connect(client, "/api/ws/ws/prices?zones=")
    await receive_json(ws)
    await ws.send_json(
        {"type": "subscribe", "zones": list(ALL_ZONES), "since": dict.fromkeys(ALL_ZONES, 0)}
    )
    live = 20  # batches of one price per zone, published while the replay is under way

    async def publisher() -> None:
        for n in range(live):
            await publish(client, *[{"market_zone": z, "price": float(n)} for z in ALL_ZONES])

    task = asyncio.create_task(publisher())
    seen: dict[str, list[tuple[int, bool]]] = {zone: [] for zone in ALL_ZONES}
    completes: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(3 * WAIT):
        while len(completes) < len(ALL_ZONES) or any(
            not s or s[-1][0] < 3000 + live for s in seen.values()
        ):
            message = await receive_json(ws)
            if message["type"] == "price_update":
                assert not message.get("conflated")
                seen[message["market_zone"]].append((message["seq"], "replay" in message))
            elif message["type"] == "resume_complete":
                completes[message["market_zone"]] = message
    await task
    for zone, updates in seen.items():
        assert [seq for seq, _ in updates] == list(range(1, 3000 + live + 1)), zone
        to_seq = completes[zone]["to_seq"]
        assert completes[zone]["recovered"] is True and to_seq >= 3000
        assert all(replay == (seq <= to_seq) for seq, replay in updates), zone


async def stalled_replay(client: Client, *, since: int) -> tuple[Any, Any]:
    """A raw socket that asks for a replay and does not read: (socket, its connection)."""
    from tests.server.test_flood import RawSocket

    assert client.port is not None
    sock = await RawSocket.open(
        client.port, f"/api/ws/ws/market/pjm?since={since}", receive_buffer=4096
    )
    broadcaster = client.app[BROADCASTER]
    await eventually(lambda: len(broadcaster.connections) == 1)
    connection = next(iter(broadcaster.connections))
    # Stalled mid-replay: the zone is still syncing and its unsent bytes are what a
    # paced replay may have queued, far less than the replay itself.
    await eventually(lambda: connection.unsent() > 0 and connection.streams["pjm"].syncing)
    return sock, connection


async def test_a_replay_whose_hold_overflows_reads_on_from_storage_with_no_gap(
    make_client: MakeClient,
) -> None:
    """Live updates held during a stalled replay overflow the hold (1024): the oldest are
    dropped and read from storage again, so the client still sees every seq once."""
    client = await make_client(history_size=10000, send_high_water=16 * 1024,
                               send_hard_limit=64 * 1024)
    await fill(client, "pjm", 5000)
    sock, connection = await stalled_replay(client, since=0)
    await fill(client, "pjm", 1500)  # seqs 5001..6500, published while it is stalled
    stream = connection.streams["pjm"]
    assert stream.syncing and len(stream.held) == 1024 and stream.missing_after(5000)
    assert connection.unsent() < 200 * 1024  # never the whole 550 KB replay
    seqs: list[int] = []
    replayed, complete = 0, None
    async with asyncio.timeout(WAIT):
        while complete is None or seqs[-1] < 6500:
            message = await sock.message()
            assert isinstance(message, dict), message
            if message["type"] == "price_update":
                seqs.append(message["seq"])
                replayed += bool(message.get("replay"))
            elif message["type"] == "resume_complete":
                complete = message
    sock.abort()
    assert seqs == list(range(1, 6501))
    assert complete is not None and complete["recovered"] is True
    assert complete["to_seq"] == replayed >= 6500 - 1024  # the dropped part was replayed


async def test_a_replay_that_falls_behind_the_history_is_closed_4008(
    make_client: MakeClient,
) -> None:
    client = await make_client(history_size=3000, send_high_water=16 * 1024,
                               send_hard_limit=64 * 1024)
    await fill(client, "pjm", 3000)
    sock, _ = await stalled_replay(client, since=0)
    await fill(client, "pjm", 4500)  # the history rolls past what the replay reached
    async with asyncio.timeout(WAIT):
        while isinstance(message := await sock.message(), dict):
            assert message["type"] in ("connection_established", "price_update")
    sock.abort()
    assert message == 4008
    await eventually(lambda: client.app[STATS].disconnections["slow_consumer"] == 1)


async def test_a_history_over_the_reply_budget_is_cut_to_the_newest_with_an_error(
    make_client: MakeClient,
) -> None:
    # Budget: send_hard_limit - send_high_water = 48 KiB, about 400 prices.
    client = await make_client(history_size=2000, send_high_water=16 * 1024,
                               send_hard_limit=64 * 1024)
    await fill(client, "pjm", 2000)
    ws = await connect(client, "/api/ws/ws/market/pjm")
    await receive_until(ws, lambda m: m["type"] == "initial_data")
    await ws.send_json({"type": "request_price_history", "limit": 2000})
    error = await receive_json(ws)
    assert (error["type"], error["code"]) == ("error", "invalid_message")
    assert "cut to the newest" in error["message"]
    answer = await receive_json(ws)
    seqs = [price["seq"] for price in answer["data"]]
    assert answer["type"] == "price_history" and answer["limit"] == 2000
    assert 300 < len(seqs) < 2000 and seqs == list(range(2001 - len(seqs), 2001))
    assert len(orjson.dumps(answer)) <= 48 * 1024
    await ws.send_json({"type": "request_price_history", "limit": 100})  # fits: not cut
    answer = await receive_json(ws)
    assert [price["seq"] for price in answer["data"]] == list(range(1901, 2001))


# --- aiohttp's private API that compression.py overrides (issue 12) -------------------------


def test_aiohttp_private_api_is_what_compression_overrides() -> None:
    """``BroadcastWebSocketResponse`` overrides ``WebSocketResponse._handshake`` and reads
    ``_timeout``, neither of them public. This pins the versions it was written for: on
    another one, re-check both (and the permessage-deflate tests) before widening it."""
    import inspect

    from aiohttp import web

    version = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])
    assert (3, 10) <= version < (3, 15), aiohttp.__version__
    parameters = list(inspect.signature(web.WebSocketResponse._handshake).parameters)
    assert parameters == ["self", "request"]
    source = inspect.getsource(web.WebSocketResponse._handshake)
    assert "return (" in source and "compress" in source and "notakeover" in source
    assert web.WebSocketResponse(timeout=7.0)._timeout == 7.0


async def test_a_client_busy_reading_a_long_replay_is_not_taken_for_dead(
    make_client: MakeClient,
) -> None:
    """Its own frames wait unread behind the replay, so what it receives is its sign of
    life: a replay read slowly for longer than the heartbeat timeout is not closed 4000."""
    from tests.server.test_flood import RawSocket

    client = await make_client(
        history_size=3000, heartbeat_interval=0.2, heartbeat_timeout=0.6,
        send_high_water=16 * 1024, send_hard_limit=64 * 1024,
    )
    await fill(client, "pjm", 3000)
    assert client.port is not None
    sock = await RawSocket.open(client.port, "/api/ws/ws/market/pjm?since=0", receive_buffer=4096)
    started, seqs = asyncio.get_running_loop().time(), list[int]()
    async with asyncio.timeout(WAIT):
        while not seqs or seqs[-1] < 3000:
            message = await sock.message()
            assert isinstance(message, dict), f"closed with {message}"
            if message["type"] == "price_update":
                seqs.append(message["seq"])
                if len(seqs) % 100 == 0:
                    await asyncio.sleep(0.03)  # a slow reader: ~1 s for the whole replay
        done = await sock.message()
        assert isinstance(done, dict) and done["type"] == "resume_complete"
    elapsed = asyncio.get_running_loop().time() - started
    sock.abort()
    assert seqs == list(range(1, 3001)) and elapsed > 0.6
    assert client.app[STATS].disconnections["heartbeat_timeout"] == 0


# --- many zones on one socket (issue 23, item 6) ----------------------------------------


def pricehub_calls(profile: cProfile.Profile) -> int:
    """Calls of pricehub's own functions plus the calls they make (builtins included): the
    work a profile saw pricehub do, whatever the machine's speed (speed targets live in
    bench/; this counts operations)."""
    package = f"{os.sep}pricehub{os.sep}"
    total = 0
    for entry in profile.getstats():
        code = entry.code
        if isinstance(code, str) or package not in code.co_filename:
            continue
        total += entry.callcount + sum(sub.callcount for sub in entry.calls or ())
    return total


def many_zones(count: int) -> tuple[str, ...]:
    return tuple(f"z{index}" for index in range(count))


async def publish_one_price_each(client: Client, zones: tuple[str, ...]) -> None:
    for start in range(0, len(zones), 1000):
        batch = zones[start:start + 1000]
        await publish(client, *[{"market_zone": zone, "price": 1.0} for zone in batch])


async def open_zones(client: Client, zones: tuple[str, ...], how: str) -> list[dict[str, Any]]:
    """Open every zone on one socket (in the URL, or with one ``subscribe``); every message
    up to the pong of a ping sent after it (answered once the opening job is done)."""
    ws = await connect(client, "/api/ws/ws/prices" if how == "url" else "/api/ws/ws/prices?zones=")
    if how == "subscribe":
        await ws.send_json({"type": "subscribe", "zones": list(zones)})
    await ws.send_json({"type": "ping"})
    seen = await receive_until(ws, lambda m: m["type"] == "pong", timeout=60)
    await ws.close()
    return seen


async def opening_calls(make_client: MakeClient, count: int, how: str) -> int:
    zones = many_zones(count)
    client = await make_client(zones=zones, max_zones_per_socket=count)
    await publish_one_price_each(client, zones)
    profile = cProfile.Profile()
    profile.enable()
    try:
        seen = await open_zones(client, zones, how)
    finally:
        profile.disable()
    assert [m["market_zone"] for m in seen if m["type"] == "initial_data"] == list(zones)
    return pricehub_calls(profile)


@pytest.mark.parametrize("how", ["url", "subscribe"])
async def test_opening_zones_on_one_socket_is_linear_work(
    make_client: MakeClient, how: str
) -> None:
    """4x the zones is about 4x the work (it was quadratic: each zone opened made and
    unmade an audience of all the zones opened before it, ~16x)."""
    small = await opening_calls(make_client, 1000, how)
    large = await opening_calls(make_client, 4000, how)
    assert large < 6 * small, f"1,000 zones: {small} calls; 4,000 zones: {large}"


async def test_a_client_reading_everything_while_its_zones_open_is_not_closed_4000(
    make_client: MakeClient,
) -> None:
    """The client answers pings, but its pongs wait unread behind the opening job: the
    bytes it takes in meanwhile are its sign of life. (20,000 zones: the opening lasts
    well past the 0.3 s timeout even on a fast machine, ~35 us per zone.)"""
    zones = many_zones(20_000)
    client = await make_client(
        zones=zones, max_zones_per_socket=len(zones), max_frame_size=1 << 20,
        heartbeat_interval=0.1, heartbeat_timeout=0.3,
    )
    await publish_one_price_each(client, zones)
    started = asyncio.get_running_loop().time()
    seen = await open_zones(client, zones, "subscribe")
    elapsed = asyncio.get_running_loop().time() - started
    assert sum(m["type"] == "initial_data" for m in seen) == len(zones)
    assert elapsed > 0.3, "the opening must outlast the heartbeat timeout to test anything"
    assert client.app[STATS].disconnections["heartbeat_timeout"] == 0


async def test_a_peer_that_stops_reading_during_a_job_is_still_reaped_4000(
    make_client: MakeClient,
) -> None:
    """Bytes count as life only once the peer has taken them in: a socket that reads
    nothing while its zones open (a tiny window, so the job waits on it) is closed 4000."""
    from tests.server.test_flood import RawSocket

    zones = many_zones(2000)
    client = await make_client(
        zones=zones, max_zones_per_socket=len(zones), heartbeat_interval=0.1,
        heartbeat_timeout=0.3, send_high_water=16 * 1024, send_hard_limit=1 << 20,
    )
    await publish_one_price_each(client, zones)
    assert client.port is not None
    sock = await RawSocket.open(client.port, "/api/ws/ws/prices", receive_buffer=4096)
    try:
        await eventually(lambda: client.app[STATS].disconnections["heartbeat_timeout"] == 1)
    finally:
        sock.abort()
