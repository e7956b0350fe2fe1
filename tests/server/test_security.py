"""Every protection of issue 7, through real sockets and HTTP against ``create_app``.

Publishers (bearer keys, rotation, body / batch caps, per-key rate limit), subscribers
(JWT HS256 / RS256 / ES256, ``exp``, ``zones`` claim), the browser Origin check, the
per-socket and per-server limits, and inputs that used to crash a handler.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pricehub.server.app import create_app
from pricehub.server.errors import AuthError
from pricehub.server.keys import STATS
from pricehub.server.policy.admission import ConnectionLimits
from pricehub.server.policy.auth import TokenVerifier, key_matches
from pricehub.server.settings import DEFAULT_ZONES, Settings
from pricehub.wire import paths
from pricehub.wire.codes import DisconnectReason
from tests.harness.support import eventually

WAIT = 5.0  # upper bound of every wait; the happy path takes milliseconds
SECRET = "hs256-test-secret-of-at-least-32-bytes!"
PUBLISH = "/api/ws/ws/broadcast/price"
MARKET = "/api/ws/ws/market/"
PRICES = "/api/ws/ws/prices"

Client = TestClient[Any, Any]
Serve = Callable[..., Awaitable[Client]]


@pytest.fixture
def serve(aiohttp_client: Any) -> Serve:
    """``await serve(**settings)``: a test client of a fresh app; no Redis, no simulator,
    publish keys k1 and k2, subscriber auth off unless asked for."""

    async def start(**overrides: Any) -> Client:
        options: dict[str, Any] = {
            "redis_url": None, "data_dir": None, "publish_key": ("k1", "k2"),
            "simulate": False, **overrides,
        }
        client: Client = await aiohttp_client(create_app(Settings(**options)))
        return client

    return start


def token(*, key: Any = SECRET, algorithm: str = "HS256", ttl: float = 60, **claims: Any) -> str:
    payload = {"exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token PyJWT refuses to make (a PEM public key as the HMAC secret)."""
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read (and drop) messages until the server closes; the close code."""
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return ws.close_code


async def next_json(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next server message of type ``kind`` (others are skipped)."""
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.receive()
            assert message.type is WSMsgType.TEXT, (message.type, message.data)
            data: dict[str, Any] = message.json()
            if data["type"] == kind:
                return data


async def refusal(client: Client, path: str, **kwargs: Any) -> int:
    """How a socket was refused: an HTTP status before the upgrade, or a close code."""
    try:
        ws = await client.ws_connect(path, **kwargs)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    code = await close_code(ws)
    assert code is not None
    return code


async def raw_request(client: Client, request: bytes) -> bytes:
    """Send raw bytes (headers aiohttp's client would not send) and read the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        async with asyncio.timeout(WAIT):
            return await reader.read(65536)
    finally:
        writer.close()


# --- publishers ---------------------------------------------------------------------------

PRICE = {"market_zone": "pjm", "price": 41.5}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_publish_needs_a_bearer_key(serve: Serve) -> None:
    client = await serve()
    response = await client.post(PUBLISH, json=PRICE)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    response = await client.post(PUBLISH, json=PRICE, headers={"Authorization": "Basic k1"})
    assert response.status == 401


@pytest.mark.parametrize(
    "wrong", ["k", "k1x", "K1", "k3", "k1,k2", "x" * 5000],
    ids=["prefix", "longer", "case", "other", "both", "long"],
)
async def test_publish_rejects_wrong_keys(serve: Serve, wrong: str) -> None:
    client = await serve()
    response = await client.post(PUBLISH, json=PRICE, headers=bearer(wrong))
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"


async def test_every_configured_key_publishes_for_rotation(serve: Serve) -> None:
    client = await serve()
    seqs = []
    for key in ("k1", "k2"):
        response = await client.post(PUBLISH, json=PRICE, headers=bearer(key))
        assert response.status == 202
        seqs.append((await response.json())["accepted"][0]["seq"])
    assert seqs == [1, 2]


async def test_no_key_configured_disables_publishing(serve: Serve) -> None:
    client = await serve(publish_key=())
    for key in ("", "k1", "anything"):
        response = await client.post(PUBLISH, json=PRICE, headers=bearer(key))
        assert response.status == 403
        assert (await response.json())["error"] == "publishing_disabled"


async def test_non_utf8_authorization_header_is_refused_not_crashed(serve: Serve) -> None:
    client = await serve()
    answer = await raw_request(
        client,
        b"POST " + PUBLISH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Authorization: Bearer k1\xff\xfe\r\nConnection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]


async def test_body_over_the_limit_is_413(serve: Serve) -> None:
    client = await serve(max_body_size=1000)
    headers = {"Authorization": "Bearer k1"}
    big = b'{"market_zone":"pjm","price":1,"volume":' + b"1" * 2000 + b"}"
    response = await client.post(PUBLISH, data=big, headers=headers)
    assert response.status == 413

    async def chunks() -> Any:  # no Content-Length: the cap must hold while reading
        for _ in range(30):
            yield b" " * 100

    response = await client.post(PUBLISH, data=chunks(), headers=headers)
    assert response.status == 413
    response = await client.post(PUBLISH, json=PRICE, headers=headers)
    assert response.status == 202


async def test_batch_over_the_limit_is_422(serve: Serve) -> None:
    client = await serve(max_batch_size=3)
    headers = {"Authorization": "Bearer k1"}
    response = await client.post(PUBLISH, json=[PRICE] * 4, headers=headers)
    assert response.status == 422
    assert (await response.json())["field"] == "body"
    response = await client.post(PUBLISH, json=[PRICE] * 3, headers=headers)
    assert response.status == 202


async def test_publish_rate_is_limited_per_key(serve: Serve) -> None:
    client = await serve(publish_rate_limit=2)  # burst 4, then one every 0.5 s
    statuses = []
    for _ in range(6):
        response = await client.post(PUBLISH, json=PRICE, headers={"Authorization": "Bearer k1"})
        statuses.append(response.status)
        if response.status == 429:
            retry_after = response.headers["Retry-After"]
    assert statuses[:4] == [202] * 4
    assert statuses[-1] == 429
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 2
    # The other key has its own bucket: one noisy publisher does not block the rest.
    response = await client.post(PUBLISH, json=PRICE, headers={"Authorization": "Bearer k2"})
    assert response.status == 202


@pytest.mark.parametrize(
    "timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]
)
async def test_publish_time_out_of_range_is_422(serve: Serve, timestamp: str) -> None:
    client = await serve()
    response = await client.post(
        PUBLISH, json={**PRICE, "timestamp": timestamp}, headers={"Authorization": "Bearer k1"}
    )
    assert response.status == 422
    assert (await response.json())["field"] == "timestamp"


@pytest.mark.parametrize(
    "limit", ["%C2%B2", "1" * 5000, "-1", "0", "x"], ids=["sup2", "long", "neg", "zero", "x"]
)
async def test_history_limit_garbage_is_422(serve: Serve, limit: str) -> None:
    client = await serve()
    response = await client.get(f"/api/ws/ws/history/pjm?limit={limit}")
    assert response.status == 422


def test_key_matches_needs_the_whole_key() -> None:
    keys = ("k1", "second-key")
    assert key_matches("k1", keys)
    assert key_matches("second-key", keys)
    for candidate in ("", "k", "k1 ", "second", "second-key2", "\udcff", "k1\x00"):
        assert not key_matches(candidate, keys)
    assert not key_matches("k1", ())


# --- subscribers: JWT -----------------------------------------------------------------------


def write_pem(tmp_path: Path, name: str, private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
              ) -> Path:
    path = tmp_path / name
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def test_hs256_token_rules(serve: Serve) -> None:
    client = await serve(jwt_secret=SECRET)
    ok = await client.ws_connect(f"{MARKET}pjm?token={token()}")
    assert (await next_json(ok, "connection_established"))["market_zone"] == "pjm"
    await ok.close()
    refused = {
        "missing": f"{MARKET}pjm",
        "empty": f"{MARKET}pjm?token=",
        "garbage": f"{MARKET}pjm?token=not.a.jwt",
        "wrong secret": f"{MARKET}pjm?token={token(key=SECRET + 'x')}",
        "expired": f"{MARKET}pjm?token={token(ttl=-5)}",
        "no exp": f"{MARKET}pjm?token={jwt.encode({'zones': ['pjm']}, SECRET)}",
        "alg none": f"{MARKET}pjm?token={jwt.encode({'exp': 2**40}, None, algorithm='none')}",
        "bad zones claim": f"{MARKET}pjm?token={token(zones='pjm')}",
        "multi-zone, missing": PRICES,
    }
    codes = {name: await refusal(client, path) for name, path in refused.items()}
    assert codes == dict.fromkeys(refused, 4001)


async def test_zones_claim_restricts_zones(serve: Serve) -> None:
    client = await serve(jwt_secret=SECRET)
    only_pjm = token(zones=["pjm"])
    assert await refusal(client, f"{MARKET}ercot?token={only_pjm}") == 4003
    assert await refusal(client, f"{PRICES}?zones=pjm,ercot&token={only_pjm}") == 4003
    assert await refusal(client, f"{PRICES}?token={only_pjm}") == 4003  # default: all zones
    ws = await client.ws_connect(f"{PRICES}?zones=pjm&token={only_pjm}")
    await next_json(ws, "connection_established")
    await ws.send_json({"type": "request_price_history", "market_zone": "ercot"})
    assert (await next_json(ws, "error"))["code"] == "forbidden_zone"
    await ws.send_json({"type": "subscribe", "zones": ["pjm"]})
    assert (await next_json(ws, "subscribed"))["zones"] == ["pjm"]
    await ws.send_json({"type": "subscribe", "zones": ["ercot"]})
    assert await close_code(ws) == 4003


async def test_socket_is_closed_when_its_token_expires(serve: Serve) -> None:
    client = await serve(jwt_secret=SECRET)
    ws = await client.ws_connect(f"{MARKET}pjm?token={token(ttl=1.5)}")
    await next_json(ws, "connection_established")
    started = time.monotonic()
    assert await close_code(ws) == 4001  # within WAIT: access does not outlive the token
    assert time.monotonic() - started < 3.0


async def test_sse_stream_ends_at_exp_even_in_the_middle_of_its_replay(serve: Serve) -> None:
    """A client pacing its reads of a long opening replay used to keep its stream well
    past ``exp`` (the deadline started after the replay); it ends at ``exp`` like the
    socket's 4001, whatever the stream is doing."""
    client = await serve(jwt_secret=SECRET, history_size=5000, send_high_water=4096)
    for start in range(0, 3000, 500):
        body = [{"market_zone": "pjm", "price": float(i)} for i in range(start, start + 500)]
        assert (await client.post(PUBLISH, json=body, headers=bearer("k1"))).status == 202
    reader = PacedReader(await tiny_window_socket(client))
    request = f"GET /api/ws/sse/market/pjm?since=0&token={token(ttl=1.5)} HTTP/1.1\r\n"
    await reader.send(request.encode() + b"Host: x\r\n\r\n")
    # 3,000 replayed events are ~750 KB: ~15 s at this pace, ended after at most 1.5 s.
    received = await reader.until_closed(rate=50_000, within=1.5 + WAIT / 2)
    assert received.startswith(b"HTTP/1.1 200") and b"event: price_update" in received
    assert b"resume_complete" not in received  # cut off in the middle of the replay
    stats = client.app[STATS]
    await eventually(lambda: stats.disconnections[DisconnectReason.AUTH] == 1, within=WAIT)


async def tiny_window_socket(client: Client) -> socket.socket:
    """A socket to the server whose receive window is 4 KiB (set before connecting, so
    the kernel cannot autotune it): what the server writes waits for our reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    return sock


class PacedReader:
    """Reads a raw socket at a set pace, as a client that takes its time would."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def until_closed(self, *, rate: int, within: float) -> bytes:
        """Everything received until the server closes, reading ``rate`` bytes/s in
        1 KiB steps; fails if it is still open after ``within`` s."""
        received = bytearray()
        try:
            async with asyncio.timeout(within):
                while chunk := await self.loop.sock_recv(self.sock, 1024):
                    received += chunk
                    await asyncio.sleep(1024 / rate)
        except ConnectionResetError:
            pass  # the server aborts a stream whose last bytes we had not read yet
        except TimeoutError:
            raise AssertionError(f"still open after {within} s ({len(received)} bytes)") from None
        finally:
            self.sock.close()
        return bytes(received)


async def test_rs256_and_es256_public_keys(
    serve: Serve, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for private, algorithm, other in ((rsa_key, "RS256", ec_key), (ec_key, "ES256", rsa_key)):
        pem = write_pem(tmp_path, f"{algorithm}.pem", private)
        client = await serve(jwt_public_key=str(pem))
        good = token(key=private, algorithm=algorithm, zones=["caiso"])
        ws = await client.ws_connect(f"{MARKET}caiso?token={good}")
        await next_json(ws, "connection_established")
        await ws.close()
        other_algorithm = "ES256" if algorithm == "RS256" else "RS256"
        forged = {
            # The other key type: PyJWT raises InvalidKeyError, not an InvalidTokenError.
            "other key type": token(key=other, algorithm=other_algorithm),
            # Algorithm confusion: the public key's PEM used as an HMAC secret.
            "hs256 with the public pem": hs256_by_hand({"exp": 2**40}, pem.read_bytes()),
            "expired": token(key=private, algorithm=algorithm, ttl=-5),
        }
        for name, forged_token in forged.items():
            code = await refusal(client, f"{MARKET}caiso?token={forged_token}")
            assert code == 4001, (algorithm, name)
        assert await refusal(client, f"{MARKET}pjm?token={good}") == 4003
        # A bad token must not leak a connection slot (each refusal released its own).
        ws = await client.ws_connect(f"{MARKET}caiso?token={good}")
        await next_json(ws, "connection_established")
        await ws.close()


def test_verifier_maps_every_bad_token_to_4001(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier.from_settings(
        Settings(redis_url=None, jwt_public_key=str(write_pem(tmp_path, "k.pem", rsa_key)))
    )
    far = token(key=rsa_key, algorithm="RS256", ttl=10**30)
    assert verifier.verify(far).expires_at is not None
    for bad in ("", "a.b.c", "\udcff", "e30.e30.", token(key=rsa_key, algorithm="RS256", ttl=-1)):
        with pytest.raises(AuthError) as caught:
            verifier.verify(bad)
        assert caught.value.close_code == 4001


# --- browser Origin -------------------------------------------------------------------------


async def test_foreign_origin_is_refused_before_the_upgrade(serve: Serve) -> None:
    client = await serve()
    own = f"http://{client.host}:{client.port}"
    foreign = ("https://evil.example", "null", f"http://{client.host}:1", own + ".evil.example")
    for origin in foreign:
        assert await refusal(client, f"{MARKET}pjm", origin=origin) == 403, origin
    for origin in (own, own.upper(), None):
        ws = await client.ws_connect(f"{MARKET}pjm", origin=origin)
        await next_json(ws, "connection_established")
        await ws.close()


async def test_allowed_origins_list_and_wildcard(serve: Serve) -> None:
    client = await serve(allowed_origins=("https://App.example/",))
    assert await refusal(client, PRICES, origin="https://other.example") == 403
    ws = await client.ws_connect(PRICES, origin="https://app.example")
    await next_json(ws, "connection_established")
    await ws.close()
    client = await serve(allowed_origins=("*",))
    ws = await client.ws_connect(PRICES, origin="https://any.example")
    await next_json(ws, "connection_established")
    await ws.close()


async def test_sse_answers_carry_cors_headers_for_allowed_origins_only(serve: Serve) -> None:
    """A refusal for a foreign Origin used to echo it in ``Access-Control-Allow-Origin``
    with credentials (that page could read the answer); an allowed Origin still gets
    them, on a refusal for another reason too (its page may read why)."""
    client = await serve(allowed_origins=("https://desk.example",))
    foreign = await client.get(paths.sse_market("pjm"), headers={"Origin": "https://evil.example"})
    assert foreign.status == 403
    assert not [name for name in foreign.headers if name.lower().startswith("access-control-")]
    assert foreign.headers["Vary"] == "Origin"
    allowed = {"Origin": "https://desk.example"}
    for path, status in ((paths.sse_market("nowhere"), 404), (paths.sse_market("pjm"), 200)):
        response = await client.get(path, headers=allowed)
        assert response.status == status
        assert response.headers["Access-Control-Allow-Origin"] == "https://desk.example"
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        response.close()


async def test_origin_without_host_header_is_refused(serve: Serve) -> None:
    # aiohttp itself answers 400 today; 403 from the Origin check is as good. What must
    # not happen: an upgrade, or a blocking DNS lookup for a missing Host.
    client = await serve()
    answer = await raw_request(
        client,
        b"GET " + MARKET.encode() + b"pjm HTTP/1.1\r\nOrigin: http://example\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert answer.split(b" ", 2)[1] in (b"400", b"403"), answer[:200]


# --- limits ---------------------------------------------------------------------------------


async def test_frame_over_the_limit_closes_1009(serve: Serve) -> None:
    client = await serve(max_frame_size=1024)
    ws = await client.ws_connect(f"{MARKET}pjm")
    await next_json(ws, "connection_established")
    await ws.send_str('{"type":"ping"}' + " " * 1000)  # just under: answered
    await next_json(ws, "pong")
    await ws.send_str('{"type":"ping","pad":"' + "x" * 2000 + '"}')
    assert await close_code(ws) == 1009


async def test_message_rate_error_then_4029(serve: Serve) -> None:
    client = await serve(client_rate_limit=5)  # burst 10; 5 rejections in a row close
    ws = await client.ws_connect(f"{MARKET}pjm")
    await next_json(ws, "connection_established")
    for _ in range(12):
        await ws.send_json({"type": "ping"})
    answers = []
    async with asyncio.timeout(WAIT):
        while len(answers) < 12:
            answers.append((await ws.receive_json())["type"])
    assert answers.count("pong") >= 10
    assert "error" in answers
    assert not ws.closed
    for _ in range(20):
        await ws.send_json({"type": "ping"})
    assert await close_code(ws) == 4029


async def test_pings_count_against_the_rate(serve: Serve) -> None:
    client = await serve(client_rate_limit=5)  # a ping costs a pong write like any answer
    ws = await client.ws_connect(f"{MARKET}pjm")
    await next_json(ws, "connection_established")
    for _ in range(40):
        await ws.ping(b"p" * 125)
    assert await close_code(ws) == 4029


async def test_binary_frames_count_against_the_rate(serve: Serve) -> None:
    client = await serve(client_rate_limit=1)  # burst 2; the 1st rejection closes
    ws = await client.ws_connect(f"{MARKET}pjm")
    await next_json(ws, "connection_established")
    for _ in range(2):
        await ws.send_json({"type": "heartbeat"})
        await next_json(ws, "heartbeat_ack")
    await ws.send_bytes(b"\x00")
    assert await close_code(ws) == 4029


async def test_zones_per_socket_limit(serve: Serve) -> None:
    client = await serve(max_zones_per_socket=2)
    assert await refusal(client, f"{PRICES}?zones=pjm,caiso,ercot") == 1008
    ws = await client.ws_connect(f"{PRICES}?zones=pjm,caiso")
    await next_json(ws, "connection_established")
    await ws.send_json({"type": "subscribe", "zones": ["ercot"]})
    error = await next_json(ws, "error")
    assert error["code"] == "invalid_message"
    await ws.send_json({"type": "unsubscribe", "zones": ["caiso"]})
    await next_json(ws, "unsubscribed")
    await ws.send_json({"type": "subscribe", "zones": ["ercot"]})
    assert (await next_json(ws, "subscribed"))["zones"] == ["ercot"]


@pytest.mark.parametrize(
    ("limits", "refused_on"),
    [({"max_connections": 2}, 3), ({"max_connections_per_ip": 2}, 3)],
)
async def test_connection_limits(serve: Serve, limits: dict[str, int], refused_on: int) -> None:
    client = await serve(**limits)
    sockets = []
    for _ in range(refused_on - 1):
        ws = await client.ws_connect(f"{MARKET}pjm")
        await next_json(ws, "connection_established")
        sockets.append(ws)
    assert await refusal(client, f"{MARKET}pjm") in (1013, 503)
    await sockets.pop().close()
    # The slot comes back once the server has seen the close (bounded poll).
    async with asyncio.timeout(WAIT):
        while True:
            ws = await client.ws_connect(f"{MARKET}pjm")
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                break
            await asyncio.sleep(0.02)
    assert message.json()["type"] == "connection_established"


def test_connection_limits_book_keeping() -> None:
    limits = ConnectionLimits(total=3, per_ip=2)
    assert [limits.acquire("a"), limits.acquire("a"), limits.acquire("a")] == [None, None, "per_ip"]
    assert limits.acquire("b") is None
    assert limits.acquire("c") == "total"
    for remote in ("a", "a", "b"):
        limits.release(remote)
    assert (limits.open, dict(limits.by_ip)) == (0, {})  # no per-address residue
    with pytest.raises(RuntimeError):
        limits.release("a")


async def test_idle_and_slow_handshakes_are_closed(serve: Serve) -> None:
    client = await serve(handshake_timeout=0.5)
    for first_bytes in (b"", b"GET " + MARKET.encode() + b"pjm HTTP/1.1\r\nHost: x\r\n"):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(first_bytes)
        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # EOF: the server hung up
        assert time.monotonic() - started < 3.0
        writer.close()


# --- inputs that must not crash a socket ---------------------------------------------------


async def test_garbage_on_the_socket_is_answered_not_fatal(serve: Serve) -> None:
    client = await serve()
    ws = await client.ws_connect(f"{PRICES}?zones=pjm")
    await next_json(ws, "connection_established")
    garbage: list[tuple[str | bytes, str]] = [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_message"),
        ('{"type":1}', "invalid_message"),
        ('{"type":"nope"}', "unknown_type"),
        ('{"type":"subscribe","zones":"pjm"}', "invalid_message"),
        ('{"type":"subscribe","zones":["nowhere"]}', "unknown_zone"),
        ('{"type":"request_price_history","market_zone":"pjm","hours":-1}', "invalid_message"),
        ("[" * 5000, "invalid_json"),
        (b"\x00\x01", "invalid_message"),
    ]
    for frame, code in garbage:
        await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
        assert (await next_json(ws, "error"))["code"] == code, frame
    await ws.send_json({"type": "ping"})
    await next_json(ws, "pong")


async def test_huge_history_hours_do_not_kill_the_socket(serve: Serve) -> None:
    client = await serve()
    ws = await client.ws_connect(f"{MARKET}pjm")
    await next_json(ws, "connection_established")
    await ws.send_json({"type": "request_price_history", "hours": 1e300})
    async with asyncio.timeout(WAIT):
        message = await ws.receive()
    assert message.type is WSMsgType.TEXT, (message.type, message.data)
    assert message.json()["type"] in ("price_history", "error")
    stats = await (await client.get("/api/ws/ws/stats")).json()
    assert stats["statistics"]["connection_errors"] == 0


@pytest.mark.parametrize(
    "since", ["%C2%B2", "1" * 5000, "-3", "1.5"], ids=["sup2", "long", "neg", "float"]
)
async def test_bad_since_is_an_error_message(serve: Serve, since: str) -> None:
    client = await serve()
    ws = await client.ws_connect(f"{MARKET}pjm?since={since}")
    await next_json(ws, "connection_established")
    assert (await next_json(ws, "error"))["code"] == "invalid_message"


@pytest.mark.parametrize(
    "zone", ["%C3%A9" * 60, "%F0%9F%98%80" * 40, "x" * 300, "PJM", "pjm%00"],
    ids=["e-acute", "emoji", "long", "upper", "nul"],
)
async def test_odd_zone_paths_close_1008(serve: Serve, zone: str) -> None:
    client = await serve()
    assert await refusal(client, f"{MARKET}{zone}") == 1008


# --- token rules, settled (issue 23, item 9) ------------------------------------------------


async def test_a_null_zones_claim_is_an_invalid_token_not_every_zone(serve: Serve) -> None:
    """``"zones": null`` used to grant every zone; only a token *without* the claim does."""
    client = await serve(jwt_secret=SECRET)
    null_zones = token(zones=None)
    assert await refusal(client, f"{PRICES}?token={null_zones}") == 4001
    response = await client.get(paths.history("pjm"), params={"token": null_zones})
    assert response.status == 401
    every_zone = await client.ws_connect(f"{PRICES}?token={token()}")  # no claim: all zones
    hello = await next_json(every_zone, "connection_established")
    assert hello["zones"] == list(DEFAULT_ZONES)
    await every_zone.close()


async def test_an_empty_token_query_does_not_hide_the_authorization_header(
    serve: Serve,
) -> None:
    client = await serve(jwt_secret=SECRET)
    response = await client.get(
        paths.history("pjm") + "?token=", headers={"Authorization": f"Bearer {token()}"}
    )
    assert response.status == 200, await response.text()
    # The SSE stream reads its token the same way (EventSource sends ?token=, a proxy or
    # a non-browser client may send the header).
    stream = await client.get(
        paths.sse_market("pjm") + "?token=", headers={"Authorization": f"Bearer {token()}"}
    )
    assert stream.status == 200, await stream.text()
    stream.close()
