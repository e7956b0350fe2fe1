"""History by market time (PROTOCOL.md, "History by market time"): the wire's checks and
builders, ``GET /api/ws/ws/history`` and ``/history/{zone}?from=`` through real servers
(memory, durable, Redis), and the Redis script itself: one command per query, filtering on
the Redis side."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from pricehub.storage import StoredPrice
from pricehub.storage.redis import KeyLayout, RedisStorage
from pricehub.storage.redis.reads import history_between
from pricehub.wire import decode, messages, paths
from pricehub.wire.codes import ErrorCode, HttpErrorCode
from pricehub.wire.errors import ProtocolError, ValidationError
from tests.harness.history_data import EXPECTED, FROM, PRICES, TO, body
from tests.harness.redisproc import RecordingListener, RedisCluster, RedisProcess
from tests.harness.serverproc import ServerProcess
from tests.harness.support import PUBLISH_KEY, MakeClient, publish
from tests.server.test_security import SECRET, token
from tests.server.test_snapshot import commands_of

ZONES = ("pjm", "caiso", "ercot")
NOW = "2026-12-01T00:00:00.000Z"
HISTORY = paths.HISTORY_ZONES


def pairs(data: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(price["market_zone"], price["seq"]) for price in data]


# --- wire -------------------------------------------------------------------------------


def check(**fields: Any) -> messages.HistoryQuery:
    options: dict[str, Any] = {
        "zones": ("pjm", "ercot"), "start": FROM, "end": TO, "limit": None, "known": ZONES,
        "now": NOW, **fields,
    }  # fmt: skip
    return messages.history_range(**options)


def test_a_range_is_normalised_and_bounded() -> None:
    assert check() == messages.HistoryQuery(("pjm", "ercot"), FROM, TO, 1000)
    assert check(end=None).end == NOW  # ``to`` defaults to now
    assert check(zones=("pjm", "pjm"), limit=10_000).zones == ("pjm",)
    # Any offset, normalised; sub-millisecond bounds rounded up (stored times have ms).
    query = check(start="2026-11-27T10:00:00.0005+01:00", end="2026-11-27T09:30:00.001999Z")
    assert (query.start, query.end) == ("2026-11-27T09:00:00.001Z", "2026-11-27T09:30:00.002Z")
    assert check(start=TO, end=TO).start == TO  # [t, t): empty, not refused


@pytest.mark.parametrize(
    ("fields", "field", "code"),
    [
        ({"start": TO, "end": FROM}, "from", HttpErrorCode.INVALID_RANGE),
        ({"start": "2026-11-27T09:00:00"}, "from", HttpErrorCode.INVALID_TIMESTAMP),
        ({"end": "2026-11-27T10:00:00"}, "to", HttpErrorCode.INVALID_TIMESTAMP),
        ({"start": "yesterday"}, "from", HttpErrorCode.INVALID_TIMESTAMP),
        ({"start": None}, "from", HttpErrorCode.INVALID_TIMESTAMP),
        ({"end": "9999-12-31T23:59:59.9999Z"}, "to", HttpErrorCode.INVALID_TIMESTAMP),
        ({"zones": ("pjm", "nope")}, "zones", HttpErrorCode.UNKNOWN_ZONE),
        ({"zones": ()}, "zones", HttpErrorCode.INVALID_ZONE),
        ({"limit": 0}, "limit", HttpErrorCode.INVALID_LIMIT),
        ({"limit": 10_001}, "limit", HttpErrorCode.INVALID_LIMIT),
    ],
)
def test_bad_ranges_name_their_field(
    fields: dict[str, Any], field: str, code: HttpErrorCode
) -> None:
    with pytest.raises(ValidationError) as refused:
        check(**fields)
    assert (refused.value.field, refused.value.code) == (field, code)


def request(text: str) -> messages.RequestHistory:
    decoded = messages.decode_client_message(text)
    assert isinstance(decoded, messages.RequestHistory)
    return decoded


def test_request_price_history_by_time_on_the_websocket() -> None:
    parse = messages.parse_history_request
    options: dict[str, Any] = {"zones": ZONES, "default_zones": ("caiso",), "now": NOW}
    assert parse(request('{"type":"request_price_history","limit":5}'), **options) is None
    by_zones = request(
        f'{{"type":"request_price_history","zones":["ercot","pjm"],"from":"{FROM}","limit":2}}'
    )
    assert parse(by_zones, **options) == messages.HistoryQuery(("ercot", "pjm"), FROM, NOW, 2)
    one = request(f'{{"type":"request_price_history","market_zone":"pjm","from":"{FROM}"}}')
    assert parse(one, **options) == messages.HistoryQuery(("pjm",), FROM, NOW, 1000, "pjm")
    default = request(f'{{"type":"request_price_history","from":"{FROM}","to":"{TO}"}}')
    assert parse(default, **options) == messages.HistoryQuery(("caiso",), FROM, TO, 1000)
    for message in (by_zones, one, default):
        assert request(messages.encode_client_message(message).decode()) == message
    for bad in (
        f'{{"type":"request_price_history","from":"{TO}","to":"{FROM}"}}',
        '{"type":"request_price_history","zones":["pjm"]}',  # no from
        f'{{"type":"request_price_history","zones":["nope"],"from":"{FROM}"}}',
        '{"type":"request_price_history","from":"2026-11-27T09:00:00"}',
        f'{{"type":"request_price_history","from":"{FROM}","limit":10001}}',
    ):
        with pytest.raises(ProtocolError) as refused:
            parse(request(bad), **options)
        assert refused.value.code == ErrorCode.INVALID_MESSAGE
    for malformed in (
        '{"type":"request_price_history","from":5}',
        f'{{"type":"request_price_history","from":"{FROM}","hours":1}}',
        f'{{"type":"request_price_history","zones":["pjm"],"market_zone":"pjm","from":"{FROM}"}}',
    ):
        with pytest.raises(ProtocolError) as refused:
            messages.decode_client_message(malformed)
        assert refused.value.code == ErrorCode.INVALID_MESSAGE


def stored(zone: str, seq: int, timestamp: str) -> StoredPrice:
    return StoredPrice(zone, seq, messages.with_seq(body(zone, timestamp), seq, b"x"))


def test_the_answer_carries_the_range_truncation_and_cursor() -> None:
    query = messages.HistoryQuery(("pjm", "ercot", "caiso"), FROM, TO, 2)
    prices = [stored("ercot", 2, FROM), stored("pjm", 1, FROM)]
    answer = messages.price_history_range(query, prices, truncated=True, now=NOW)
    obj = orjson.loads(answer)
    assert obj["type"] == "price_history" and obj["timestamp"] == NOW
    assert {k: obj[k] for k in ("zones", "from", "to", "truncated", "cursor", "limit")} == {
        "zones": ["pjm", "ercot", "caiso"], "from": FROM, "to": TO, "truncated": True,
        "cursor": {"pjm": 1, "ercot": 2}, "limit": 2,
    }  # fmt: skip
    assert pairs(obj["data"]) == [("ercot", 2), ("pjm", 1)]
    assert "market_zone" not in obj
    decoded = decode.decode_server_message(answer)
    assert isinstance(decoded, decode.PriceHistory)
    assert (decoded.zones, decoded.start, decoded.end, decoded.truncated) == (
        ("pjm", "ercot", "caiso"), FROM, TO, True
    )
    assert decoded.cursor == {"pjm": 1, "ercot": 2}
    assert [(p.zone, p.seq) for p in decoded.data] == [("ercot", 2), ("pjm", 1)]
    body_only = orjson.loads(messages.history_range_body(query, prices, truncated=True))
    assert body_only == {k: v for k, v in obj.items() if k not in ("type", "timestamp")}
    older = decode.decode_server_object({"type": "price_history", "market_zone": "pjm",
                                         "data": [], "limit": 5})  # fmt: skip
    assert isinstance(older, decode.PriceHistory)
    assert (older.zones, older.truncated, older.cursor) == (None, False, None)


# --- HTTP ---------------------------------------------------------------------------------


def published() -> list[dict[str, Any]]:
    return [{"market_zone": zone, "price": float(i), "timestamp": timestamp}
            for i, (zone, timestamp) in enumerate(PRICES)]  # fmt: skip


async def test_http_history_by_market_time_in_memory(make_client: MakeClient) -> None:
    client = await make_client(zones=ZONES)
    for price in published():  # one by one: the order of PRICES is the seq order
        await publish(client, price)
    response = await client.get(HISTORY, params={"zones": "pjm,ercot", "from": FROM, "to": TO})
    assert response.status == 200
    answer = await response.json()
    assert pairs(answer["data"]) == list(EXPECTED)
    assert {k: answer[k] for k in ("zones", "from", "to", "truncated", "cursor", "limit")} == {
        "zones": ["pjm", "ercot"], "from": FROM, "to": TO, "truncated": False,
        "cursor": {"pjm": 5, "ercot": 3}, "limit": 1000,
    }  # fmt: skip
    cut = await (await client.get(
        HISTORY, params={"zones": "ercot,pjm", "from": FROM, "to": TO, "limit": "3"}
    )).json()  # fmt: skip
    assert (pairs(cut["data"]), cut["truncated"], cut["cursor"]) == (
        list(EXPECTED[:3]), True, {"ercot": 2, "pjm": 1}
    )
    # Offsets are normalised; ``to`` defaults to now; every zone without ``zones``.
    offset = "2026-11-27T04:00:00-05:00"
    everything = await (await client.get(HISTORY, params={"from": offset})).json()
    assert everything["from"] == FROM and everything["zones"] == list(ZONES)
    assert len(everything["data"]) == len(PRICES) - 1  # pjm 3 is before 09:00
    one = await (await client.get(paths.history("pjm"), params={"from": FROM, "to": TO})).json()
    assert one["market_zone"] == "pjm" and one["zones"] == ["pjm"]
    assert pairs(one["data"]) == [("pjm", 1), ("pjm", 2), ("pjm", 5)]
    by_count = await (await client.get(paths.history("pjm"), params={"limit": "2"})).json()
    assert set(by_count) == {"market_zone", "data"}  # without from/to: as before
    assert pairs(by_count["data"]) == [("pjm", 4), ("pjm", 5)]


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        (HISTORY, {"zones": "pjm", "from": TO, "to": FROM}, 422, HttpErrorCode.INVALID_RANGE),
        (HISTORY, {"zones": "pjm", "from": "2026-11-27T09:00:00"}, 422,
         HttpErrorCode.INVALID_TIMESTAMP),
        (HISTORY, {"zones": "pjm"}, 422, HttpErrorCode.INVALID_TIMESTAMP),  # no from
        (HISTORY, {"zones": "pjm,nope", "from": FROM}, 422, HttpErrorCode.UNKNOWN_ZONE),
        (HISTORY, {"zones": "pjm", "from": FROM, "limit": "10001"}, 422,
         HttpErrorCode.INVALID_LIMIT),
        (HISTORY, {"zones": "pjm", "from": FROM, "limit": "ten"}, 422,
         HttpErrorCode.INVALID_LIMIT),
        (paths.history("pjm"), {"from": TO, "to": FROM}, 422, HttpErrorCode.INVALID_RANGE),
        (paths.history("pjm"), {"to": TO}, 422, HttpErrorCode.INVALID_TIMESTAMP),
        (paths.history("nope"), {"from": FROM}, 404, HttpErrorCode.UNKNOWN_ZONE),
    ],
)  # fmt: skip
async def test_http_bad_ranges_are_refused(
    make_client: MakeClient, path: str, params: dict[str, str], status: int,
    code: HttpErrorCode,
) -> None:
    client = await make_client(zones=ZONES)
    response = await client.get(path, params=params)
    assert response.status == status
    assert (await response.json())["error"] == code


async def test_http_history_by_time_covers_at_most_max_zones_per_socket(
    make_client: MakeClient,
) -> None:
    """Nothing unbounded: on Redis the history script holds Redis's one thread ~1 ms per
    queried zone, so a query covers at most ``--max-zones-per-socket`` distinct zones,
    named or (without ``zones``) every configured one; one more is 422 ``too_many_zones``
    naming the bound."""
    zones = tuple(f"z{index}" for index in range(5))
    client = await make_client(zones=zones, max_zones_per_socket=4)
    for named in (",".join(zones[:4]), "z0,z1,z0,z1,z2,z3,z3"):  # repeats count once
        response = await client.get(HISTORY, params={"zones": named, "from": FROM})
        assert response.status == 200, await response.text()
    for params in ({"zones": ",".join(zones)}, {}):  # named, or every configured zone
        response = await client.get(HISTORY, params={**params, "from": FROM})
        assert response.status == 422
        answer = await response.json()
        assert (answer["error"], answer["field"]) == (HttpErrorCode.TOO_MANY_ZONES, "zones")
        assert "at most 4" in answer["message"], answer
    # One zone's own path is one zone: never refused for the bound.
    assert (await client.get(paths.history("z4"), params={"from": FROM})).status == 200


async def test_http_history_by_time_follows_the_token_rules(make_client: MakeClient) -> None:
    client = await make_client(zones=ZONES, jwt_secret=SECRET)
    params = {"zones": "pjm,ercot", "from": FROM}
    assert (await client.get(HISTORY, params=params)).status == 401
    narrow = token(zones=["pjm"])
    assert (await client.get(HISTORY, params={**params, "token": narrow})).status == 403
    allowed = await client.get(HISTORY, params={"zones": "pjm", "from": FROM, "token": narrow})
    assert allowed.status == 200


async def get_json(url: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as response:
        return response.status, await response.json()


async def publish_in_order(server: ServerProcess) -> None:
    for price in published():
        await server.publish(price)


async def test_http_history_by_time_durable_after_a_restart(tmp_path: Path) -> None:
    with ServerProcess(
        "--no-simulate", "--zones", ",".join(ZONES), publish_key=PUBLISH_KEY, data_dir=tmp_path
    ) as server:  # fmt: skip
        await publish_in_order(server)
        server.stop()
        server.start()
        status, answer = await get_json(server.url + HISTORY, zones="pjm,ercot", to=TO,
                                        **{"from": FROM})  # fmt: skip
    assert status == 200
    assert pairs(answer["data"]) == list(EXPECTED)


async def test_http_history_by_time_on_redis(redis_server: RedisProcess) -> None:
    with ServerProcess(
        "--no-simulate", "--zones", ",".join(ZONES), publish_key=PUBLISH_KEY,
        redis_url=redis_server.url, env={"PRICEHUB_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:"},
    ) as server:  # fmt: skip
        await publish_in_order(server)
        status, answer = await get_json(server.url + HISTORY, zones="pjm,ercot", to=TO,
                                        limit="4", **{"from": FROM})  # fmt: skip
    assert status == 200
    assert (pairs(answer["data"]), answer["truncated"]) == (list(EXPECTED[:4]), True)


async def test_http_history_by_time_and_snapshot_on_redis_cluster() -> None:
    """Zones on different slots (and masters): the history is one script per slot, merged
    in (timestamp, zone, seq) order and truncated as on one node; the snapshot is per zone."""
    with RedisCluster() as cluster, ServerProcess(
        "--no-simulate", "--zones", ",".join(ZONES), publish_key=PUBLISH_KEY,
        redis_url=cluster.url,
    ) as server:  # fmt: skip
        await publish_in_order(server)
        status, whole = await get_json(server.url + HISTORY, zones="pjm,ercot", to=TO,
                                       **{"from": FROM})  # fmt: skip
        cut_status, cut = await get_json(server.url + HISTORY, zones="pjm,ercot", to=TO,
                                         limit="4", **{"from": FROM})  # fmt: skip
        snap_status, snapshot = await get_json(server.url + paths.SNAPSHOT, zones="pjm,ercot")
    assert (status, pairs(whole["data"]), whole["truncated"]) == (200, list(EXPECTED), False)
    assert (cut_status, pairs(cut["data"]), cut["truncated"]) == (200, list(EXPECTED[:4]), True)
    last = {zone: max(seq for name, seq in pairs(whole["data"]) if name == zone)
            for zone in ("pjm", "ercot")}  # fmt: skip
    assert snap_status == 200 and all(snapshot["cursor"][zone] >= last[zone] for zone in last)


# --- the Redis script ------------------------------------------------------------------------


@pytest.fixture
async def appended(redis_server: RedisProcess) -> KeyLayout:
    """``PRICES`` appended by a RedisStorage, which is then closed (nothing else runs
    commands while a query is counted)."""
    storage = RedisStorage(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    await storage.start(RecordingListener())
    for zone, timestamp in PRICES:
        await storage.append(zone, body(zone, timestamp))
    await storage.close()
    return storage.keys


async def test_redis_history_is_one_script_filtering_in_redis(
    appended: KeyLayout, raw: aioredis.Redis
) -> None:
    await raw.ping()
    query = history_between(raw, appended, ["pjm", "ercot"], FROM, TO, limit=4)
    found, ran = await commands_of(raw, query)
    # One round trip (EVAL); inside it, one ZRANGE per zone queried (commandstats counts
    # a script's calls too), none for any other zone.
    assert ran == {"cmdstat_eval": 1, "cmdstat_zrange": 2}
    assert ([(p.zone, p.seq) for p in found.prices], found.truncated) == (list(EXPECTED[:4]), True)
    whole = await history_between(raw, appended, ["pjm", "ercot", "pjm"], FROM, TO, limit=6)
    assert ([(p.zone, p.seq) for p in whole.prices], whole.truncated) == (list(EXPECTED), False)
    stored = await raw.zrange(appended.history("ercot"), 1, 1)
    assert whole.prices[0].payload == stored[0]  # ercot 2, byte for byte


async def test_redis_history_reads_an_odd_payload_and_skips_a_damaged_zone(
    appended: KeyLayout, raw: aioredis.Redis
) -> None:
    """A payload whose ``timestamp`` is not last (never written by pricehub) is still
    filtered by its field; a history key that is no sorted set is left out."""
    odd = b'{"seq":9,"accepted_at":null,"timestamp":"2026-11-27T09:10:00.000Z","price":1}'
    await raw.zadd(appended.history("pjm"), {odd: 9})
    await raw.set(appended.history("caiso"), b"not a sorted set")
    found = await history_between(raw, appended, ["pjm", "caiso"], FROM, TO, limit=10)
    assert [(p.zone, p.seq) for p in found.prices] == [("pjm", 1), ("pjm", 9), ("pjm", 2),
                                                       ("pjm", 5)]  # fmt: skip
