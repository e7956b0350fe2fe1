"""Health that tells the truth: the verdict table, its sliding windows, and every
transition through a real server (loop stall, failing connections, unusable storage,
shutdown, Redis lost and back)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from pricehub.server.app import create_app
from pricehub.server.settings import load_settings
from pricehub.server.stats import ERROR_RATE_WINDOW, LOOP_LAG_WINDOW, Stats, health_report
from pricehub.storage import DiskState, DiskStatus, MemoryStorage, StoredPrice
from pricehub.storage.errors import StorageUnavailable
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import REPO, ServerProcess, free_port
from tests.harness.support import WAIT, make_settings, missing_tool, publish, receive_json

Client = TestClient[Any, Any]
HEALTH = "/api/ws/ws/health"


def report(stats: Stats, **overrides: Any) -> tuple[str, int, dict[str, str]]:
    options: dict[str, Any] = {
        "redis_configured": True, "backend": "redis", "storage_ok": True,
        "loop_lag_threshold": 0.5,
    }
    result = health_report(stats, **(options | overrides))
    return result.status, result.http_status, result.checks


def stats_with(**fields: Any) -> Stats:
    stats = Stats()
    for name, value in fields.items():
        setattr(stats, name, value)
    return stats


# --- the verdict ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_stats", "overrides", "status", "failing"),
    [
        (Stats, {}, "healthy", {}),
        (Stats, {"redis_configured": False, "backend": "in-memory"}, "healthy",
         {"redis": "disabled"}),
        (Stats, {"backend": "in-memory"}, "degraded", {"redis": "unavailable"}),
        # The embedded default: no Redis URL given, none answering the default one.
        (Stats, {"backend": "in-memory", "redis_required": False}, "healthy",
         {"redis": "not_found"}),
        (Stats, {"redis_required": False}, "healthy", {}),
        (lambda: stats_with(total_connections=10, connection_errors=1), {}, "degraded",
         {"error_rate": "high"}),
        (lambda: stats_with(loop_lag=0.6), {}, "degraded", {"event_loop": "lagging"}),
        (lambda: stats_with(shutting_down=True), {}, "unhealthy",
         {"shutdown": "shutting_down"}),
        (Stats, {"storage_ok": False}, "unhealthy", {"storage": "unavailable"}),
        (lambda: stats_with(shutting_down=True), {"backend": "in-memory"}, "unhealthy",
         {"shutdown": "shutting_down", "redis": "unavailable"}),
        (Stats, {"disk": DiskStatus(DiskState.OK)}, "healthy", {"disk": "ok"}),
        (Stats, {"disk": DiskStatus(DiskState.UNAVAILABLE, "No space left on device")},
         "degraded", {"disk": "unavailable: No space left on device"}),
        # With a Redis URL, a data dir not usable at start: a warning, not a degradation.
        (Stats, {"disk": DiskStatus(DiskState.DISABLED, "data dir is locked")}, "healthy",
         {"disk": "disabled: data dir is locked"}),
    ],
)  # fmt: skip
def test_verdict_and_the_checks_that_decide_it(
    make_stats: Callable[[], Stats], overrides: dict[str, Any], status: str,
    failing: dict[str, str],
) -> None:
    # Stats are built in the test, not at collection: their samples age in real time.
    got_status, http_status, checks = report(make_stats(), **overrides)
    assert got_status == status
    assert http_status == (503 if status == "unhealthy" else 200)
    all_ok = dict.fromkeys(
        ("redis", "storage", "event_loop", "error_rate", "shutdown", "background"), "ok"
    ) | {"disk": "disabled"}
    assert checks == all_ok | failing


def test_error_rate_just_under_the_threshold_is_healthy() -> None:
    stats = stats_with(total_connections=1001, connection_errors=100)
    assert stats.error_rate() == 9.99
    assert report(stats)[0] == "healthy"


def test_error_rate_forgets_errors_older_than_its_window() -> None:
    stats = Stats()
    start = time.monotonic()
    stats.total_connections, stats.connection_errors = 4, 1
    assert stats.error_rate(now=start + 1) == 25.0
    # Healthy traffic read every 70 s: the error counts until the window has passed the
    # first checkpoint after it (70 s), however much good traffic came since.
    step = 70.0
    for reading in range(1, 11):
        stats.total_connections += 100
        rate = stats.error_rate(now=start + step * reading)
        assert (rate > 0) == (step * reading < ERROR_RATE_WINDOW + step), (reading, rate)
    assert health_report(
        stats, redis_configured=False, backend="in-memory", storage_ok=True,
        loop_lag_threshold=0.5, now=start + 11 * step,
    ).status == "healthy"


def test_a_failure_of_a_connection_accepted_before_the_window_counts() -> None:
    stats = Stats()
    start = time.monotonic()
    stats.total_connections = 1
    stats.error_rate(now=start + 20)  # a checkpoint that already counts the connection
    stats.connection_errors = 1  # the long-lived socket fails much later
    assert stats.error_rate(now=start + 20 + ERROR_RATE_WINDOW + 5) == 100.0


def test_loop_lag_spike_stays_visible_for_its_window() -> None:
    stats = Stats()
    start = time.monotonic()
    stats.record_loop_lag(0.8, now=start)
    stats.record_loop_lag(0.001, now=start + 0.5)
    assert stats.loop_lag == 0.001  # the latest sample
    assert stats.max_loop_lag(now=start + 1) == 0.8
    assert stats.max_loop_lag(now=start + LOOP_LAG_WINDOW + 0.1) == 0.001


# --- through a real server ------------------------------------------------------------


async def health(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get(HEALTH)
    body: dict[str, Any] = await response.json()
    return response.status, body


async def health_until(
    client: Client, status: str, *, timeout: float = WAIT
) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await health(client)
        if body["status"] == status:
            return code, body
        assert time.monotonic() < deadline, f"health never became {status}: {body}"
        await asyncio.sleep(0.05)


MakeApp = Callable[..., Awaitable[tuple[Client, web.Application]]]


@pytest.fixture
def make_app(aiohttp_client: Any) -> MakeApp:
    async def factory(*, storage: Any = None, **overrides: Any) -> tuple[Client, web.Application]:
        app = create_app(make_settings(**overrides), storage=storage)
        client: Client = await aiohttp_client(app)
        return client, app

    return factory


async def metric(client: Client, line_start: str) -> float:
    text = await (await client.get("/metrics")).text()
    (line,) = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


async def test_healthy_server_says_so_with_every_check(make_app: MakeApp) -> None:
    client, _ = await make_app()
    code, body = await health(client)
    assert code == 200 and body["status"] == "healthy"
    assert body["checks"] == {
        "redis": "disabled", "storage": "ok", "event_loop": "ok", "error_rate": "ok",
        "shutdown": "ok", "background": "ok", "disk": "disabled",
    }
    assert body["error_rate"] == 0.0


async def test_a_stalled_event_loop_degrades_health(make_app: MakeApp) -> None:
    client, _ = await make_app(loop_lag_threshold=0.1)
    await health_until(client, "healthy")
    # Longer than the probe's 0.5 s sleep plus the threshold: whenever it falls, the
    # probe's timer fires at least 0.2 s late.
    time.sleep(0.7)  # noqa: ASYNC251 - stalling the loop is the point
    code, body = await health_until(client, "degraded")
    assert code == 200 and body["checks"]["event_loop"] == "lagging"
    assert await metric(client, "pricehub_event_loop_lag_max_seconds") >= 0.2


class FailingStorage(MemoryStorage):
    """Memory storage whose reads blow up: every connection ends in an internal error."""

    async def latest(self, zone: str) -> StoredPrice | None:
        raise RuntimeError("disk on fire")


async def test_failing_connections_degrade_health_and_are_counted(make_app: MakeApp) -> None:
    client, _ = await make_app(storage=FailingStorage())
    ws = await client.ws_connect("/api/ws/ws/market/pjm")
    async with asyncio.timeout(WAIT):
        while (message := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
            pass  # connection_established, if it was flushed before the failure
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1011
    code, body = await health_until(client, "degraded")
    assert code == 200 and body["checks"]["error_rate"] == "high"
    assert body["error_rate"] == 100.0
    assert await metric(client, "pricehub_connection_errors_total") == 1
    assert await metric(client, 'pricehub_disconnections_total{reason="error"}') == 1


class UnusableStorage(MemoryStorage):
    async def check(self) -> None:
        raise StorageUnavailable("backing store gone")


async def test_unusable_storage_is_unhealthy(make_app: MakeApp) -> None:
    client, _ = await make_app(storage=UnusableStorage())
    code, body = await health(client)
    assert code == 503 and body["status"] == "unhealthy"
    assert body["checks"]["storage"] == "unavailable"


async def test_shutdown_answers_503_while_sockets_drain(make_app: MakeApp) -> None:
    client, app = await make_app()
    ws = await client.ws_connect("/api/ws/ws/market/pjm")
    assert (await receive_json(ws))["type"] == "connection_established"
    shutdown = asyncio.create_task(app.shutdown())  # what the runner does on SIGTERM
    closing = await ws.receive(timeout=WAIT)
    assert closing.data == 1001
    code, body = await health(client)
    assert code == 503 and body["status"] == "unhealthy"
    assert body["checks"]["shutdown"] == "shutting_down"
    await asyncio.wait_for(shutdown, WAIT)
    assert await metric(client, "pricehub_shutting_down") == 1
    assert await metric(client, 'pricehub_disconnections_total{reason="shutdown"}') == 1


async def test_redis_unreachable_at_start_is_degraded_not_down(make_app: MakeApp) -> None:
    client, _ = await make_app(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.2,
        redis_probe_interval=0.2,
    )
    code, body = await health(client)
    assert code == 200 and body["status"] == "degraded"
    assert body["checks"]["redis"] == "unavailable" and body["storage_backend"] == "in-memory"
    await publish(client, {"market_zone": "pjm", "price": 1.0})  # still serving
    assert await metric(client, 'pricehub_storage_backend{backend="in-memory"}') == 1
    assert await metric(client, "pricehub_redis_errors_total") >= 1


async def test_redis_lost_and_back_moves_health_and_failover_counters(
    make_app: MakeApp,
) -> None:
    with RedisProcess() as redis_server:
        client, _ = await make_app(
            redis_url=redis_server.url, redis_timeout=0.3, redis_probe_interval=0.2
        )
        code, body = await health_until(client, "healthy")
        assert body["checks"]["redis"] == "ok" and body["storage_backend"] == "redis"
        await asyncio.to_thread(redis_server.kill)
        code, body = await health_until(client, "degraded")
        assert code == 200 and body["checks"]["redis"] == "unavailable"
        assert await metric(client, "pricehub_storage_failovers_total") == 1
        await asyncio.to_thread(redis_server.start)
        await health_until(client, "healthy")
        assert await metric(client, "pricehub_storage_recoveries_total") == 1
        assert await metric(client, 'pricehub_storage_backend{backend="redis"}') == 1


# --- the embedded default is no fallback (issue 22.7) ---------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "explicit"),
    [
        ([], {}, None, False),
        (["--redis-url", "redis://127.0.0.1:6379/0"], {}, None, True),  # the default, named
        ([], {"PRICEHUB_REDIS_URL": "redis://10.0.0.1:6379/0"}, None, True),
        ([], {}, 'redis_url = "redis://10.0.0.1:6379/0"', True),
        ([], {}, 'port = 9000', False),
    ],
)
def test_settings_know_whether_the_redis_url_was_given(
    tmp_path: Path, argv: list[str], environ: dict[str, str], toml: str | None, explicit: bool
) -> None:
    if toml is not None:
        config = tmp_path / "pricehub.toml"
        config.write_text(toml + "\n")
        argv = [*argv, "--config", str(config)]
    assert load_settings(argv, environ=environ).redis_url_explicit is explicit


def unanswered_url() -> str:
    """A Redis URL nothing answers (never the machine's Redis on 6379)."""
    return f"redis://127.0.0.1:{free_port()}/0"


FAST_PROBES: dict[str, Any] = {"redis_timeout": 0.2, "redis_probe_interval": 0.2}


async def test_the_embedded_default_without_redis_is_healthy(make_app: MakeApp) -> None:
    """``python3 run_server.py`` on a machine without Redis, as it would load its
    settings: the default URL, not given (here a free port, so the machine's Redis on
    6379 cannot answer)."""
    client, _ = await make_app(redis_url=unanswered_url(), redis_url_explicit=False, **FAST_PROBES)
    code, body = await health(client)
    assert (code, body["status"], body["storage_backend"]) == (200, "healthy", "in-memory")
    assert body["checks"]["redis"] == "not_found"
    assert await metric(client, "pricehub_redis_required") == 0
    assert await metric(client, 'pricehub_storage_backend{backend="redis"}') == 0


async def test_a_given_redis_url_that_does_not_answer_is_degraded(make_app: MakeApp) -> None:
    client, _ = await make_app(redis_url=unanswered_url(), **FAST_PROBES)
    code, body = await health(client)
    assert (code, body["status"], body["checks"]["redis"]) == (200, "degraded", "unavailable")
    assert await metric(client, "pricehub_redis_required") == 1


def test_a_redis_url_given_on_the_command_line_that_does_not_answer_is_degraded() -> None:
    """The real ``run_server.py`` with ``--redis-url`` (what ``ServerProcess`` passes)."""
    with ServerProcess("--no-simulate", redis_url=unanswered_url()) as server:
        with urllib.request.urlopen(server.url + HEALTH, timeout=WAIT) as response:
            body = orjson.loads(response.read())
        assert (body["status"], body["checks"]["redis"]) == ("degraded", "unavailable")


async def test_the_default_url_is_required_once_redis_served_there(make_app: MakeApp) -> None:
    """Not given, but answering: losing it since is a fallback like any other (the
    instances that shared it drift apart), until it is back."""
    with RedisProcess() as redis_server:
        client, _ = await make_app(
            redis_url=redis_server.url, redis_url_explicit=False, redis_timeout=0.3,
            redis_probe_interval=0.2,
        )
        _, body = await health_until(client, "healthy")
        assert body["checks"]["redis"] == "ok"
        assert await metric(client, "pricehub_redis_required") == 0
        await asyncio.to_thread(redis_server.kill)
        _, body = await health_until(client, "degraded")
        assert body["checks"]["redis"] == "unavailable"
        assert await metric(client, "pricehub_redis_required") == 1
        await asyncio.to_thread(redis_server.start)
        await health_until(client, "healthy")


OPERATIONS_MD = REPO / "docs" / "operations.md"
# promtool unit test of the documented rules: per instance, 10 minutes of samples.
ALERT_TEST = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}
    alert_rule_test:
      - eval_time: 5m
        alertname: PricehubOnFallback
        exp_alerts:
{alerts}
"""


def test_the_fallback_alert_fires_only_where_memory_is_a_fallback(tmp_path: Path) -> None:
    """``PricehubOnFallback`` as docs/operations.md has it: for a Redis that is required
    and gone, not for ``--redis-url none`` nor for the embedded default."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool not installed (Debian package 'prometheus')")
    (rules,) = re.findall(r"```yaml\n(.*?)```", OPERATIONS_MD.read_text(), flags=re.DOTALL)
    (tmp_path / "rules.yml").write_text(rules)
    # instance: (pricehub_storage_backend{backend="redis"}, pricehub_redis_required)
    instances = {"given": (0, 1), "embedded": (0, 0), "none": (0, 0), "on_redis": (1, 1)}
    series = "\n".join(
        f"      - series: '{name}{{job=\"pricehub\",instance=\"{instance}\"{extra}}}'\n"
        f"        values: '{value}x10'"
        for instance, values in instances.items()
        for name, extra, value in zip(
            ("pricehub_storage_backend", "pricehub_redis_required"),
            (',backend="redis"', ""), values, strict=True,
        )
    )
    alerts = (
        "          - exp_labels: {severity: page, job: pricehub, instance: given, "
        "backend: redis}"
    )
    (tmp_path / "test.yml").write_text(ALERT_TEST.format(series=series, alerts=alerts))
    result = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True,
        timeout=WAIT, check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
