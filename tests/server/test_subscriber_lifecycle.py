"""One lifecycle for both transports (issue 24, item 1), through real sockets and HTTP
against ``create_app``: admission in one order (origin, slot, token, zones), every
refusal said from the one table of ``wire.refusals``, and the same stats and log fields
whichever transport a subscriber uses."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from pricehub.server.app import create_app
from pricehub.server.keys import BROADCASTER, STATS
from pricehub.server.settings import Settings
from pricehub.server.subscriber.lifecycle import FAILURES, failure
from pricehub.storage import StoredPrice
from pricehub.storage.memory import MemoryStorage
from pricehub.wire import paths
from pricehub.wire.codes import CloseCode, DisconnectReason, HttpErrorCode
from pricehub.wire.refusals import REFUSALS, RefusalReason
from tests.harness.ssestream import EventStream
from tests.harness.support import eventually

WAIT = 5.0
SECRET = "lifecycle-test-secret-of-at-least-32-bytes"
Client = TestClient[Any, Any]


def token(zones: list[str] | None = None) -> str:
    claims: dict[str, Any] = {"exp": int(time.time() + 60)}
    if zones is not None:
        claims["zones"] = zones
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def serve(aiohttp_client: Any) -> Any:
    async def start(**overrides: Any) -> Client:
        options: dict[str, Any] = {
            "redis_url": None, "data_dir": None, "publish_key": ("k1",), "simulate": False,
            **overrides,
        }
        client: Client = await aiohttp_client(create_app(Settings(**options)))
        return client

    return start


async def ws_answer(client: Client, path: str, **kwargs: Any) -> tuple[int | None, int | None]:
    """(HTTP status before the upgrade, close code after it): one of them is None."""
    try:
        ws = await client.ws_connect(path, **kwargs)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status, None
    async with asyncio.timeout(WAIT):
        while (await ws.receive()).type not in (
            WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED
        ):
            pass
    return None, ws.close_code


async def sse_answer(client: Client, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    response = await client.get(path, **kwargs)
    body: dict[str, Any] = await response.json()
    response.release()
    return response.status, body


def test_every_refusal_has_one_row_of_codes() -> None:
    assert set(REFUSALS) == set(RefusalReason)
    for reason, codes in REFUSALS.items():
        assert isinstance(codes.error, HttpErrorCode), reason
        assert 400 <= codes.status < 600, reason
    # Said before a WebSocket upgrade (the contract's 403 for a browser Origin) or SSE only.
    http_only = {reason for reason, codes in REFUSALS.items() if codes.close_code is None}
    assert http_only == {
        RefusalReason.ORIGIN, RefusalReason.INVALID_CURSOR, RefusalReason.INVALID_SINCE,
        RefusalReason.INVALID_MAX_RATE,
    }
    assert REFUSALS[RefusalReason.INVALID_MAX_RATE].status == 400
    assert REFUSALS[RefusalReason.LIMIT_TOTAL].close_code == CloseCode.TRY_AGAIN_LATER
    assert REFUSALS[RefusalReason.AUTH].status == 401


def test_the_failure_table_is_the_lifecycle_s() -> None:
    assert failure(OSError("boom")) == (DisconnectReason.ERROR, CloseCode.INTERNAL_ERROR)
    assert [row[1] for row in FAILURES] == ["client_close", "shutdown", "error"]


async def test_origin_is_refused_alike_with_the_same_json(serve: Any) -> None:
    """A disallowed browser Origin: HTTP 403 before the upgrade (WebSocket) or before the
    stream (SSE), with the same JSON error body, counted under the same reason."""
    client = await serve(allowed_origins=("https://desk.example",))
    headers = {"Origin": "https://evil.example"}
    try:
        await client.ws_connect(paths.WS_PRICES, headers=headers)
        raise AssertionError("upgraded")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 403
    raw = await client.get(paths.WS_PRICES, headers=headers)  # the body the upgrade got
    assert raw.status == 403 and (await raw.json())["error"] == "origin_not_allowed"
    status, body = await sse_answer(client, paths.sse_market("pjm"), headers=headers)
    assert (status, body["error"]) == (403, "origin_not_allowed")
    assert client.app[STATS].rejected_connections["origin"] == 3


async def test_the_slot_is_checked_before_the_token_on_both(serve: Any) -> None:
    """Over the connection limit, a bad token is not even looked at: 1013 / 503 (the SSE
    copy used to check the token first and answer 401)."""
    client = await serve(jwt_secret=SECRET, max_connections=1)
    ws = await client.ws_connect(f"{paths.ws_market('pjm')}?token={token()}")
    assert (await ws.receive_json(timeout=WAIT))["type"] == "connection_established"
    assert await ws_answer(client, f"{paths.ws_market('pjm')}?token=bad") == (
        None, CloseCode.TRY_AGAIN_LATER,
    )
    status, body = await sse_answer(client, f"{paths.sse_market('pjm')}?token=bad")
    assert (status, body["error"]) == (503, "over_capacity")
    assert client.app[STATS].rejected_connections["limit_total"] == 2
    assert client.app[STATS].rejected_connections["auth"] == 0
    await ws.close()


@pytest.mark.parametrize(
    ("zone", "token_zones", "reason"),
    [("nowhere", None, "unknown_zone"), ("ercot", ["pjm"], "forbidden_zone")],
)
async def test_zones_are_refused_alike(
    serve: Any, zone: str, token_zones: list[str] | None, reason: str
) -> None:
    """Each zone refusal gets the close code and the HTTP status of its one table row,
    and is counted under the same reason for both transports."""
    client = await serve(jwt_secret=SECRET)
    query = f"?token={token(token_zones)}"
    codes = REFUSALS[RefusalReason(reason)]
    assert await ws_answer(client, paths.ws_market(zone) + query) == (None, codes.close_code)
    status, body = await sse_answer(client, paths.sse_market(zone) + query)
    assert (status, body["error"]) == (codes.status, codes.error)
    assert client.app[STATS].rejected_connections[reason] == 2


async def test_too_many_zones_use_one_row_and_the_zone_set(serve: Any) -> None:
    """20,000 configured zones: the zone check is a set lookup on both transports (the
    SSE copy scanned the settings tuple per zone), and too many zones is 1008 / 422."""
    zones = tuple(f"node_{index:05d}" for index in range(20_000))
    client = await serve(zones=zones, max_zones_per_socket=2)
    asked = ",".join(zones[-3:])
    assert await ws_answer(client, f"{paths.WS_PRICES}?zones={asked}") == (
        None, CloseCode.POLICY,
    )
    status, body = await sse_answer(client, f"{paths.SSE_PRICES}?zones={asked}")
    assert (status, body["error"]) == (422, "too_many_zones")
    assert client.app[STATS].rejected_connections["too_many_zones"] == 2


async def test_an_ended_stream_is_torn_down_like_a_socket(serve: Any) -> None:
    """Registration, stats and teardown are the lifecycle's: a WebSocket and an SSE
    stream that end are both unregistered and counted as closed by the client."""
    client = await serve()
    ws = await client.ws_connect(paths.ws_market("pjm"))
    assert (await ws.receive_json(timeout=WAIT))["type"] == "connection_established"
    response = await client.get(paths.sse_market("pjm"))
    stream = EventStream(response)
    hello = await stream.next()
    assert hello.type == "connection_established" and hello.data["transport"] == "sse"
    broadcaster, stats = client.app[BROADCASTER], client.app[STATS]
    assert broadcaster.connections_by_transport() == {"ws": 1, "sse": 1}
    await ws.close()
    response.close()
    await eventually(lambda: not broadcaster.connections)
    assert stats.total_connections == 2
    assert stats.disconnections["client_close"] == 2


class BrokenLatest(MemoryStorage):
    """A store whose ``latest`` fails: an internal error while a zone is opened."""

    async def latest(self, zone: str) -> StoredPrice | None:
        raise RuntimeError("store broke")


async def test_an_internal_error_ends_either_transport_through_the_failure_table(
    aiohttp_client: Any,
) -> None:
    """The ``FAILURES`` row of an unexpected exception on both transports: counted,
    logged, closed with 1011 (the WebSocket's code; an SSE stream just ends), and
    torn down with reason ``error`` (the SSE copy had its own chain for this)."""
    settings = Settings(redis_url=None, data_dir=None, simulate=False)
    client: Client = await aiohttp_client(create_app(settings, storage=BrokenLatest()))
    assert await ws_answer(client, paths.ws_market("pjm")) == (None, CloseCode.INTERNAL_ERROR)
    response = await client.get(paths.sse_market("pjm"))
    stream = EventStream(response)
    assert (await stream.next()).type == "connection_established"
    with pytest.raises(EOFError):
        await stream.next(timeout=WAIT)
    stats = client.app[STATS]
    await eventually(lambda: stats.disconnections["error"] == 2)
    assert stats.connection_errors == 2
