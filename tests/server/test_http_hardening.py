"""Issue 11's HTTP findings, through a real aiohttp server and real sockets (raw TCP
where the attack is below HTTP): history auth, operator endpoints, corrupt and trickled
bodies, dashboard headers, strict prices and tokens, key guessing, error codes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import orjson
import pytest

from pricehub.server.policy.auth import FailedAttempts
from pricehub.wire import paths
from pricehub.wire.codes import CloseCode, HttpErrorCode
from tests.harness.support import PUBLISH_KEY, WAIT, Client, MakeClient

SECRET = "hs256-hardening-secret-of-at-least-32-bytes"
OPERATOR = "operator-key-5e1d"
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}
PRICE = {"market_zone": "pjm", "price": 41.5}


def token(*, exp: Any = None, **claims: Any) -> str:
    return jwt.encode(
        {"exp": int(time.time()) + 60 if exp is None else exp, **claims}, SECRET, "HS256"
    )


async def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    return body


# --- (2) history follows the subscriber rules; operator endpoints ------------------------


async def test_history_needs_a_token_allowing_the_zone_when_auth_is_on(
    make_client: MakeClient,
) -> None:
    client = await make_client(jwt_secret=SECRET)
    url = paths.history("pjm")
    assert (await error_of(await client.get(url), 401))["error"] == HttpErrorCode.INVALID_TOKEN
    response = await client.get(url, params={"token": "not-a-jwt"})
    assert (await error_of(response, 401))["error"] == HttpErrorCode.INVALID_TOKEN
    response = await client.get(url, params={"token": token(zones=["ercot"])})
    assert (await error_of(response, 403))["error"] == HttpErrorCode.FORBIDDEN_ZONE
    response = await client.get(url, params={"token": token(zones=["pjm"])})
    assert response.status == 200 and (await response.json())["market_zone"] == "pjm"
    response = await client.get(url, headers={"Authorization": f"Bearer {token()}"})
    assert response.status == 200


async def test_a_string_exp_is_an_invalid_token_on_sockets_and_history(
    make_client: MakeClient,
) -> None:
    client = await make_client(jwt_secret=SECRET)
    forged = token(exp=str(int(time.time()) + 3600))
    response = await client.get(paths.history("pjm"), params={"token": forged})
    assert (await error_of(response, 401))["error"] == HttpErrorCode.INVALID_TOKEN
    ws = await client.ws_connect(paths.ws_market("pjm"), params={"token": forged})
    message = await ws.receive(timeout=WAIT)
    assert ws.close_code == CloseCode.INVALID_TOKEN, message


OPERATOR_URLS = (paths.STATS, paths.CONNECTIONS, paths.METRICS)


async def test_operator_endpoints_need_the_operator_key_when_auth_is_on(
    make_client: MakeClient,
) -> None:
    client = await make_client(jwt_secret=SECRET, operator_key=("old", OPERATOR))
    for url in OPERATOR_URLS:
        assert (await error_of(await client.get(url), 401))["error"] == HttpErrorCode.UNAUTHORIZED
        response = await client.get(url, headers={"Authorization": "Bearer wrong"})
        assert (await error_of(response, 403))["error"] == HttpErrorCode.FORBIDDEN
        response = await client.get(url, headers={"Authorization": f"Bearer {OPERATOR}"})
        assert response.status == 200, url
    health = await client.get(paths.HEALTH)
    assert health.status == 200
    assert set(await health.json()) == {"status", "checks", "timestamp"}
    health = await client.get(paths.HEALTH, headers={"Authorization": f"Bearer {OPERATOR}"})
    assert {"statistics", "active_connections"} <= set(await health.json())


async def test_operator_endpoints_are_closed_when_auth_is_on_without_an_operator_key(
    make_client: MakeClient,
) -> None:
    client = await make_client(jwt_secret=SECRET)
    for url in OPERATOR_URLS:
        body = await error_of(await client.get(url), 403)
        assert body["error"] == HttpErrorCode.OPERATOR_KEY_REQUIRED
    health = await client.get(paths.HEALTH)
    assert health.status == 200
    assert set(await health.json()) == {"status", "checks", "timestamp"}


async def test_operator_endpoints_stay_public_without_auth(make_client: MakeClient) -> None:
    client = await make_client()
    for url in (*OPERATOR_URLS, paths.HEALTH):
        assert (await client.get(url)).status == 200
    assert "statistics" in await (await client.get(paths.HEALTH)).json()


# --- (4) (5) bodies that cannot be decoded or never arrive ------------------------------


async def raw_exchange(
    client: Client, request: bytes, *, trickle: bytes = b"", every: float = 0.2
) -> bytes:
    """Send ``request`` on a raw TCP connection, then ``trickle`` one byte per ``every``
    s; return everything the server sends until it closes the connection."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)

    async def dribble() -> None:
        for byte in trickle:
            await asyncio.sleep(every)
            writer.write(bytes([byte]))
            await writer.drain()

    writer.write(request)
    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read(-1)  # until EOF: the server closed the connection
    finally:
        sender.cancel()
        writer.close()


def publish_head(length: int, *extra: str) -> bytes:
    lines = [
        f"POST {paths.BROADCAST_PRICE} HTTP/1.1", "Host: 127.0.0.1",
        f"Authorization: Bearer {PUBLISH_KEY}", "Content-Type: application/json",
        f"Content-Length: {length}", *extra, "", "",
    ]
    return "\r\n".join(lines).encode()


def split_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


async def test_a_corrupt_gzip_body_is_400_json_not_500(make_client: MakeClient) -> None:
    client = await make_client()
    body = b"this is not gzip at all"
    raw = await raw_exchange(client, publish_head(len(body), "Content-Encoding: gzip") + body)
    status, error = split_response(raw)
    assert status == 400 and error["error"] == HttpErrorCode.INVALID_BODY


async def test_a_trickled_body_is_cut_with_408_and_the_connection_closed(
    make_client: MakeClient,
) -> None:
    client = await make_client(body_timeout=0.5)
    body = orjson.dumps(PRICE)
    started = time.monotonic()
    # 0.2 s a byte: the whole body would take ~5 s; the server must not wait for it.
    raw = await raw_exchange(client, publish_head(len(body)), trickle=body)
    status, error = split_response(raw)
    assert status == 408 and error["error"] == HttpErrorCode.BODY_TIMEOUT
    assert time.monotonic() - started < 3.0


# --- (7) dashboard security headers -----------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/static/dashboard.js", "/static/dashboard.css"])
async def test_dashboard_responses_carry_security_headers(
    make_client: MakeClient, path: str
) -> None:
    client = await make_client()
    response = await client.get(path)
    assert response.status == 200
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "connect-src 'self' ws: wss:" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"


# --- (8) strict prices, key guessing ----------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-27T15:00:00Z\x00", "9999-01-01T00:00:00Z", "1999-12-31T23:59:59Z",
        iso(NOW + timedelta(days=2)),
    ],
    ids=["nul", "year9999", "before2000", "in2days"],
)
async def test_timestamps_outside_the_window_or_with_nul_are_422(
    make_client: MakeClient, stamp: str
) -> None:
    client = await make_client()
    response = await client.post(
        paths.BROADCAST_PRICE, json={**PRICE, "timestamp": stamp}, headers=AUTH
    )
    body = await error_of(response, 422)
    assert body["error"] == HttpErrorCode.INVALID_TIMESTAMP and body["field"] == "timestamp"


async def test_a_time_within_the_next_day_is_accepted(make_client: MakeClient) -> None:
    client = await make_client()
    stamp = iso(datetime.now(UTC) + timedelta(hours=12))
    response = await client.post(
        paths.BROADCAST_PRICE, json={**PRICE, "timestamp": stamp}, headers=AUTH
    )
    assert response.status == 202


async def test_negative_zero_is_stored_as_zero(make_client: MakeClient) -> None:
    client = await make_client()
    # json= would go through Python's json, which keeps -0.0; the raw text is the point.
    response = await client.post(
        paths.BROADCAST_PRICE, data=b'{"market_zone":"pjm","price":-0.0,"volume":-0.0}',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 202
    raw = await (await client.get(paths.history("pjm"))).read()
    assert b"-0.0" not in raw
    (stored,) = orjson.loads(raw)["data"]
    assert stored["volume"] == 0.0 and stored["price"] == 0.0


async def test_failed_publish_keys_are_rate_limited_per_address(
    make_client: MakeClient,
) -> None:
    client = await make_client(auth_failure_limit=3)
    for _ in range(3):
        response = await client.post(
            paths.BROADCAST_PRICE, json=PRICE, headers={"Authorization": "Bearer guess"}
        )
        assert response.status == 403
    for key in ("guess", PUBLISH_KEY):  # blocked, even with the right key, for the window
        response = await client.post(
            paths.BROADCAST_PRICE, json=PRICE, headers={"Authorization": f"Bearer {key}"}
        )
        body = await error_of(response, 429)
        assert body["error"] == HttpErrorCode.AUTH_RATE_LIMITED
        assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_failed_attempts_remember_a_bounded_number_of_addresses() -> None:
    clock = [0.0]
    attempts = FailedAttempts(limit=2, max_addresses=2, clock=lambda: clock[0])
    for remote in ("a", "a", "b", "c"):  # "c" evicts "a", the least recently failing
        attempts.failed(remote)
    assert attempts.retry_after("a") is None
    attempts.failed("c")
    assert attempts.retry_after("c") == 60
    clock[0] = 60.0
    assert attempts.retry_after("c") is None  # the window is over


# --- (16) error codes that name the problem ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({**PRICE, "timestamp": "yesterday"}, HttpErrorCode.INVALID_TIMESTAMP, "timestamp"),
        ({**PRICE, "market_zone": "mars"}, HttpErrorCode.INVALID_ZONE, "market_zone"),
        ({**PRICE, "price": "cheap"}, HttpErrorCode.INVALID_NUMBER, "price"),
        ({**PRICE, "volume": -1}, HttpErrorCode.INVALID_NUMBER, "volume"),
        ({**PRICE, "colour": "red"}, HttpErrorCode.INVALID_PRICE, "colour"),
        ([PRICE, {**PRICE, "timestamp": "x"}], HttpErrorCode.INVALID_TIMESTAMP, "[1].timestamp"),
    ],
    ids=["timestamp", "zone", "price", "volume", "unknown", "batch"],
)
async def test_422_names_the_problem(
    make_client: MakeClient, body: Any, code: HttpErrorCode, field: str
) -> None:
    client = await make_client()
    response = await client.post(paths.BROADCAST_PRICE, json=body, headers=AUTH)
    error = await error_of(response, 422)
    assert (error["error"], error["field"]) == (code, field)
