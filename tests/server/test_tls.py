"""TLS without a proxy: ``--tls-cert`` / ``--tls-key`` serve https and wss (real process).

The certificate, its key and the subscribers' RS256 key are generated here with
``cryptography``; clients verify the server against that certificate, as a real client
would against its CA.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.harness.serverproc import HEALTH_PATH, ServerProcess

KEY = "tls-publish-key"
WAIT = 10.0


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its private key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pricehub test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TlsServerProcess(ServerProcess):
    """``ServerProcess`` on https/wss; health is polled over verified TLS."""

    def __init__(self, *args: str, cert: Path, key: Path, **kwargs: Any) -> None:
        super().__init__(*args, "--tls-cert", str(cert), "--tls-key", str(key), **kwargs)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ws_url = f"wss://127.0.0.1:{self.port}"
        self.ssl = ssl.create_default_context(cafile=str(cert))

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.url + HEALTH_PATH, timeout=1, context=self.ssl
            ) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False


@pytest.fixture(scope="module")
def subscriber_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def server(tmp_path: Path, subscriber_key: rsa.RSAPrivateKey) -> Iterator[TlsServerProcess]:
    cert, key = self_signed(tmp_path)
    public = tmp_path / "jwt.pem"
    public.write_bytes(
        subscriber_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with TlsServerProcess(
        "--no-simulate", "--jwt-public-key", str(public), cert=cert, key=key, publish_key=KEY
    ) as proc:
        yield proc


async def test_https_and_wss_with_a_token_that_is_never_logged(
    server: TlsServerProcess, subscriber_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(
        {"exp": int(time.time()) + 60, "zones": ["pjm"]}, subscriber_key, algorithm="RS256"
    )
    connector = aiohttp.TCPConnector(ssl=server.ssl)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(server.url + HEALTH_PATH) as response:
            assert response.status == 200
        ws = await session.ws_connect(f"{server.ws_url}/api/ws/ws/market/pjm?token={token}")
        async with asyncio.timeout(WAIT):
            hello = await ws.receive_json()
            assert hello["type"] == "connection_established"
            async with session.post(
                server.url + "/api/ws/ws/broadcast/price",
                json={"market_zone": "pjm", "price": 12.5},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as response:
                assert response.status == 202
            update = await ws.receive_json()
        assert (update["type"], update["price"], update["seq"]) == ("price_update", 12.5, 1)
        await ws.close()
        # Without a token the same socket is refused with 4001, over TLS as well.
        ws = await session.ws_connect(f"{server.ws_url}/api/ws/ws/market/pjm")
        async with asyncio.timeout(WAIT):
            message = await ws.receive()
        assert message.type is WSMsgType.CLOSE
        assert ws.close_code == 4001
    log = server.log()
    assert "/api/ws/ws/market/pjm" in log  # the access log saw the request...
    assert token not in log  # ...but not the token
    assert token.split(".")[2] not in log  # not even its signature


async def test_plain_http_on_the_tls_port_gets_nothing(server: TlsServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{server.port}{HEALTH_PATH}") as response:
                await response.read()


async def test_a_client_that_does_not_trust_the_cert_is_refused(server: TlsServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(server.url + HEALTH_PATH)
