"""The server as operators run it: README commands, CLI, graceful shutdown (subprocesses)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import REPO, ServerProcess, free_port
from tests.harness.support import WAIT, eventually, receive_json

README = (REPO / "README.md").read_text()


def readme_block(heading: str) -> list[str]:
    """The shell lines of the first ```bash block after ``heading`` in the README."""
    section = README.split(heading, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    (test_command,) = readme_block("## Run the tests")
    ci = (REPO / ".ci" / "run").read_text()
    assert f"exec {test_command}" in ci.splitlines()


@pytest.fixture
async def embedded_default(tmp_path: Path) -> AsyncIterator[str]:
    """The README's run command exactly, typed in a working directory of the test's own,
    with only the port (and an unreachable Redis, so the machine's own Redis is never
    touched) changed through the environment. ``run_server.py`` there is a link to the
    checkout's, so the default ``--data-dir data`` (relative to the working directory)
    is ``tmp_path / "data"``, never the checkout's: its journal would be replayed into the
    next real Redis that server is started with."""
    (run_command,) = readme_block("## Run the server")
    port = free_port()
    env = {**os.environ, "PRICEHUB_PORT": str(port),
           "PRICEHUB_REDIS_URL": "redis://127.0.0.1:1/0", "PRICEHUB_LOG_FORMAT": "json"}
    argv = shlex.split(run_command)
    assert argv[0] in ("python", "python3") and argv[1:] == ["run_server.py"], run_command
    (tmp_path / "run_server.py").symlink_to(REPO / "run_server.py")
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0, stderr.decode()[-2000:]


async def connect_when_up(
    session: aiohttp.ClientSession, url: str
) -> aiohttp.ClientWebSocketResponse:
    async with asyncio.timeout(30):
        while True:
            try:
                return await session.ws_connect(url)
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.05)  # polling for the port to open, bounded above


async def test_readme_run_command_streams_simulated_prices_in_memory(
    embedded_default: str, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await connect_when_up(session, embedded_default + "/api/ws/ws/prices")
        hello = await receive_json(ws)
        assert hello["storage_backend"] == "in-memory" and len(hello["zones"]) == 7
        async with asyncio.timeout(WAIT):
            while (message := await receive_json(ws))["type"] != "price_update":
                pass
        assert message["market_zone"] in hello["zones"] and message["seq"] >= 1
        await ws.close()
    # Journaled where the README's default --data-dir says: data/ of the working directory.
    journal = await asyncio.to_thread((tmp_path / "data" / "pricehub.db").exists)
    assert journal, "no journal in data/ of the server's working directory"


async def test_readme_curl_publish_example_works() -> None:
    (curl_line,) = [line for line in readme_block("## Publish a price") if "curl" in line]
    with ServerProcess("--no-simulate", publish_key="change-me") as server:
        command = curl_line.replace("http://127.0.0.1:8080", server.url)
        result = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", command + " -sS --fail"], capture_output=True,
            timeout=WAIT,
        )
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout)["accepted"][0]["seq"] == 1


async def test_sigterm_closes_every_socket_with_1001_and_exits_0() -> None:
    server = ServerProcess("--no-simulate", publish_key="k")
    await server.start_async()
    try:
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(server.ws_url + path) for path in
                       ("/api/ws/ws/market/pjm", "/api/ws/ws/prices", "/api/ws/ws/prices")]
            for ws in sockets:
                await receive_json(ws)
            stopping = asyncio.create_task(server.stop_async())
            for ws in sockets:
                message = await ws.receive(timeout=WAIT)
                assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
            assert await stopping == 0
    finally:
        if server.running:
            server.kill()
    assert '"event":"stopped"' in server.log() or "stopped" in server.log()


@pytest.mark.parametrize("argv", [["-m", "pricehub", "--help"], ["run_server.py", "--help"]])
def test_help_lists_the_contract_flags(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--redis-url", "--zones", "--publish-key", "--simulate",
                 "--no-simulate", "--heartbeat-interval", "--heartbeat-timeout",
                 "--history-size", "--allowed-origins", "--workers", "--tls-cert", "--tls-key",
                 "--log-format", "--jwt-secret", "--jwt-public-key", "--max-frame-size",
                 "--max-connections", "--max-connections-per-ip", "--client-rate-limit",
                 "--config"):
        assert re.search(rf"(^|\s){re.escape(flag)}[\s,=]", result.stdout), flag


def test_bad_configuration_exits_2_with_a_precise_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricehub", "--port", "eighty"], cwd=REPO, capture_output=True,
        text=True, timeout=WAIT,
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "port" in result.stderr


# --- issue 11: a taken port, malformed HTTP and secrets in the process's output ----------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_port_in_use_is_one_line_and_exit_2_before_anything_starts(
    redis_server: RedisProcess, workers: int
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            "--workers", str(workers), port=port, redis_url=redis_server.url,
            startup_timeout=WAIT,
        )
        with pytest.raises(RuntimeError, match="server exited with 2"):
            await server.start_async()
    output = server.log()
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], output
    assert "Traceback" not in output and "ingest_lease_acquired" not in output


def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh TCP connection; what the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


HEADER_SECRET = "header-secret-6d1e"
MALFORMED = (
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\x01 " + HEADER_SECRET.encode()
    + b"\r\n\r\n",
    b"POST /api/ws/ws/broadcast/price HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
    b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\nnot-gzip!!",
)


async def test_malformed_http_is_one_warning_line_without_traceback_or_secret() -> None:
    async with asyncio.timeout(30):
        with ServerProcess("--no-simulate", publish_key="k") as server:
            for data in MALFORMED:
                answer = await asyncio.to_thread(raw_request, server.port, data)
                assert answer.split(b" ", 2)[1] == b"400", answer
            await eventually(lambda: server.log().count("bad_http_request") >= len(MALFORMED))
            output = server.log()
    assert "Traceback" not in output and HEADER_SECRET not in output
    events = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    warnings = [e for e in events if e["event"] == "bad_http_request"]
    assert len(warnings) == len(MALFORMED)
    assert all(e["level"] == "warning" and e["remote"] == "127.0.0.1" for e in warnings)
    assert not [e for e in events if e["level"] == "error"]


async def test_credentials_in_query_strings_never_reach_the_access_log() -> None:
    secrets = {"key": "q-key-3b7a", "api_key": "q-apikey-90fe", "token": "q-token-1c4d"}
    with ServerProcess("--no-simulate") as server:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.url + "/", params={**secrets, "limit": "5"}) as response,
        ):
            assert response.status == 200
        await eventually(lambda: '"path":"/?' in server.log())
        output = server.log()
    assert "limit=5" in output
    for secret in secrets.values():
        assert secret not in output


@pytest.mark.parametrize(
    "argv",
    [
        ["--redis-url", "redsi://:url-secret-77aa@127.0.0.1:6379/0"],  # a mistyped scheme
        ["--workers", "2", "--redis-url", "redis://:url-secret-77aa@127.0.0.1:1/0"],
    ],
    ids=["settings", "workers"],
)
def test_a_redis_password_is_never_printed(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricehub", "--port", str(free_port()), *argv], cwd=REPO,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "url-secret-77aa" not in result.stdout + result.stderr
    assert "[redacted]" in result.stderr
