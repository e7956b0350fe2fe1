"""Structured logs an operator can use: JSON lines from a real server process, the fields
bound per connection, one line per connect/disconnect, the access log in the same
pipeline, a console renderer on a real TTY, and secrets that never reach the output."""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest
import structlog

from pricehub.server.app import create_app
from pricehub.server.logs import configure_logging, redact_text
from tests.harness.serverproc import ServerProcess
from tests.harness.support import WAIT, make_settings, receive_json

SECRET = "jwt-secret-never-logged-7f3a-long-enough-for-hs256"
PUBLISH_KEY = "publish-key-never-logged-91c2"
FORGED = "forged-secret-of-an-attacker-32-bytes-or-more"
UPDATES = 20
PINGS = 10


def token_for(zones: list[str], *, secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 300, "zones": zones}, secret, algorithm="HS256")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the other tests."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**config)
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object with the pipeline's common fields."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"timestamp", "level", "logger", "event"} <= line.keys(), line
    return lines


async def scripted_session(server: ServerProcess, token: str, forged: str) -> str:
    """One subscriber with a token in its URL and an Authorization header; publishes
    and pings; two refused subscribers. Returns the subscriber's connection id."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{server.ws_url}/api/ws/ws/market/pjm?token={token}",
            headers={"Authorization": f"Bearer {token}"},
        )
        hello = await receive_json(ws)
        for i in range(UPDATES):
            await server.publish({"market_zone": "pjm", "price": float(i)})
            assert (await receive_json(ws))["seq"] == i + 1
        for _ in range(PINGS):
            await ws.send_json({"type": "ping"})
            assert (await receive_json(ws))["type"] == "pong"
        await ws.close()
        for path, code in (
            (f"/api/ws/ws/market/ercot?token={token}", 4003),
            (f"/api/ws/ws/market/pjm?token={forged}", 4001),
        ):
            refused = await session.ws_connect(server.ws_url + path)
            assert (await refused.receive(timeout=WAIT)).data == code
    return str(hello["connection_id"])


async def test_server_logs_json_lines_per_connection_and_never_a_secret() -> None:
    with ServerProcess(
        "--no-simulate", "--log-format", "json", "--jwt-secret", SECRET, publish_key=PUBLISH_KEY
    ) as server:
        token, forged = token_for(["pjm"]), token_for(["pjm"], secret=FORGED)
        connection_id = await scripted_session(server, token, forged)
        deadline = time.monotonic() + WAIT
        while '"disconnected"' not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)  # noqa: ASYNC251 - our sockets are closed, nothing to serve
        assert await server.stop_async() == 0
        text = server.log()

    for secret in (SECRET, PUBLISH_KEY, FORGED, token, forged):
        assert secret not in text
    for part in (*token.split("."), *forged.split(".")):
        assert part not in text
    lines = json_lines(text)

    mine = [line for line in lines if line.get("connection_id") == connection_id]
    assert [line["event"] for line in mine] == ["connected", "disconnected"]  # nothing per message
    for line in mine:
        assert (line["zone"], line["remote"], line["level"]) == ("pjm", "127.0.0.1", "info")
    gone = mine[1]
    assert (gone["reason"], gone["close_code"]) == ("client_close", 1000)
    assert isinstance(gone["duration_s"], float) and gone["duration_s"] >= 0
    assert (gone["messages_sent"], gone["messages_received"]) == (1 + UPDATES + PINGS, PINGS)

    access = [line for line in lines if line["logger"] == "pricehub.access"]
    sockets = [line for line in access if line["path"].startswith("/api/ws/ws/market/")]
    assert [line["status"] for line in sockets] == [101, 101, 101]
    assert all(line["path"].endswith("?token=[redacted]") for line in sockets)
    posts = [line for line in access if line["method"] == "POST"]
    assert len(posts) == UPDATES and {line["status"] for line in posts} == {202}
    assert not any(line["path"] == "/api/ws/ws/health" for line in access)  # probes: debug


def test_console_renderer_on_a_real_tty_json_elsewhere(restore_logging: None) -> None:
    master, replica = os.openpty()
    with os.fdopen(replica, "w") as tty, os.fdopen(master, "rb", buffering=0) as screen:
        configure_logging(stream=tty)
        structlog.get_logger("pricehub.test").info("hello_tty", zone="pjm")
        tty.flush()
        shown = screen.read(4096).decode()
    assert "hello_tty" in shown and "zone" in shown
    assert not shown.lstrip().startswith("{")

    captured = io.StringIO()
    configure_logging(stream=captured)  # not a TTY: JSON
    structlog.get_logger("pricehub.test").info("hello_pipe", zone="pjm")
    (line,) = json_lines(captured.getvalue())
    assert (line["event"], line["zone"], line["logger"]) == ("hello_pipe", "pjm", "pricehub.test")


def test_secrets_are_redacted_from_fields_messages_and_tracebacks(restore_logging: None) -> None:
    token = token_for(["pjm"])
    captured = io.StringIO()
    configure_logging(stream=captured, log_format="json")
    log = structlog.get_logger("pricehub.test")
    log.info("fields", token=token, headers={"Authorization": f"Bearer {PUBLISH_KEY}"})
    log.info("embedded", url=f"ws://h/api/ws/ws/market/pjm?since=3&token={token}")
    try:
        raise ValueError(f"cannot use redis://:{SECRET}@127.0.0.1:1/0 for {token}")
    except ValueError:
        log.exception("failed")
    logging.getLogger("aiohttp.server").error("Error handling /x?token=%s", token)
    warnings.warn(f"weak key for {token}", UserWarning, stacklevel=1)
    text = captured.getvalue()
    for secret in (SECRET, PUBLISH_KEY, token):
        assert secret not in text
    fields, embedded, failed, foreign, warning = json_lines(text)
    assert fields["token"] == "[redacted]" and fields["headers"] == {"Authorization": "[redacted]"}
    assert embedded["url"] == "ws://h/api/ws/ws/market/pjm?since=3&token=[redacted]"
    assert "ValueError: cannot use redis://:[redacted]@127.0.0.1:1/0" in failed["exception"]
    assert (foreign["logger"], foreign["level"]) == ("aiohttp.server", "error")
    assert foreign["event"] == "Error handling /x?token=[redacted]"
    assert warning["logger"] == "py.warnings" and "weak key for [redacted]" in warning["event"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /p?token=abc&since=1", "GET /p?token=[redacted]&since=1"),
        ("Authorization: Bearer k-123", "Authorization: Bearer [redacted]"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln", "[redacted]"),
        ("redis://user:pw@host:6379/0", "redis://user:[redacted]@host:6379/0"),
        ("redis://127.0.0.1:6379/0 and http://h:8080/x?since=2", None),
        ("GET /?key=k1&api_key=k2&limit=5", "GET /?key=[redacted]&api_key=[redacted]&limit=5"),
        ("b'Authorization: Bearer\\x01 k-9'", "b'Authorization: [redacted]'"),
        ("redis://:p@ss@host/0", "redis://:[redacted]@host/0"),
        ("got 'redis//:pw@host/0'", "got 'redis//:[redacted]@host/0'"),
        ("redsi://:pw@host", "redsi://:[redacted]@host"),
        ("redis://pw@host/0", "redis://[redacted]@host/0"),
    ],
)
def test_redact_text(text: str, expected: str | None) -> None:
    assert redact_text(text) == (text if expected is None else expected)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_probe_and_scrape_requests_are_debug_others_info(
    aiohttp_client: Any, restore_logging: None, level: str
) -> None:
    captured = io.StringIO()
    configure_logging(stream=captured, log_format="json", level=level)
    client = await aiohttp_client(create_app(make_settings()))
    for path in ("/api/ws/ws/health", "/metrics", "/api/ws/ws/stats"):
        assert (await client.get(path)).status == 200
    access = {
        line["path"]: line["level"] for line in json_lines(captured.getvalue())
        if line["logger"] == "pricehub.access"
    }
    quiet = {"/api/ws/ws/health": "debug", "/metrics": "debug"} if level == "debug" else {}
    assert access == quiet | {"/api/ws/ws/stats": "info"}
