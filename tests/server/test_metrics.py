"""``GET /metrics`` through a real server: exact counter movements after scripted sessions,
per-app registries, ``promtool check metrics``, and the operations page in step."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from pricehub import __version__
from pricehub.server.app import create_app
from pricehub.server.http.group_metrics import WORKERS_MISSING
from pricehub.server.http.metrics import DELIVERY_LAG, METRICS
from pricehub.storage import MemoryStorage, StorageCounters
from pricehub.wire.codes import DisconnectReason
from tests.harness.support import (
    WAIT,
    Client,
    MakeClient,
    collect_updates,
    make_settings,
    missing_tool,
    publish,
    receive_json,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

OPERATIONS_MD = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
LATENCY = "pricehub_publish_to_send_latency_seconds"


async def scrape_text(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await response.text()


async def scrape(client: Client) -> Samples:
    """Every sample of the exposition, keyed by (sample name, sorted labels)."""
    families = text_string_to_metric_families(await scrape_text(client))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a sample grew; a labelled series may first appear in ``after``."""
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


async def eventually(
    client: Client, check: Callable[[Samples], bool], *, timeout: float = WAIT
) -> Samples:
    """Scrape until ``check`` holds (server-side teardown runs after the client's close
    returns), or fail with the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(client)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never reached the expected state"
        await asyncio.sleep(0.02)


async def open_socket(client: Client, path: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    ws: aiohttp.ClientWebSocketResponse = await client.ws_connect(path, **kwargs)
    assert (await receive_json(ws))["type"] == "connection_established"
    return ws


async def test_scripted_session_moves_every_counter_by_exactly_its_share(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    before = await scrape(client)

    alice = await open_socket(client, "/api/ws/ws/market/pjm")
    bob = await open_socket(client, "/api/ws/ws/market/pjm")
    carol = await open_socket(client, "/api/ws/ws/prices?zones=pjm,ercot")
    refused = await client.ws_connect("/api/ws/ws/market/atlantis")
    assert (await refused.receive(timeout=WAIT)).data == 1008
    await alice.send_json({"type": "ping"})
    assert (await receive_json(alice))["type"] == "pong"
    # Three requests, so three flushed ticks: the latency histogram counts ticks.
    await publish(client, {"market_zone": "pjm", "price": 41.5})
    await publish(client, {"market_zone": "pjm", "price": 42.0})
    await publish(client, {"market_zone": "ercot", "price": -3.0})
    assert await collect_updates(alice, "pjm", until_seq=2) == [1, 2]
    assert await collect_updates(bob, "pjm", until_seq=2) == [1, 2]
    assert await collect_updates(carol, "ercot", until_seq=1) == [1]
    await bob.close()
    after = await eventually(
        client, lambda s: moved(before, s, "pricehub_disconnections_total", reason="client_close")
        >= 1,
    )

    assert moved(before, after, "pricehub_connections_accepted_total") == 3
    assert moved(before, after, "pricehub_connections_rejected_total", reason="unknown_zone") == 1
    for reason in DisconnectReason:
        expected = 1 if reason == DisconnectReason.CLIENT else 0
        assert moved(before, after, "pricehub_disconnections_total", reason=reason) == expected
    assert value(after, "pricehub_connections_open") == 2
    assert value(after, "pricehub_zone_subscribers", zone="pjm") == 2
    assert value(after, "pricehub_zone_subscribers", zone="ercot") == 1
    assert value(after, "pricehub_zone_subscribers", zone="caiso") == 0
    assert moved(before, after, "pricehub_messages_received_total") == 1
    # alice: established, pong, 2 updates; bob: established, 2; carol: established, 3.
    assert moved(before, after, "pricehub_messages_sent_total") == 4 + 3 + 4
    for zone, count in (("pjm", 2), ("ercot", 1), ("caiso", 0)):
        assert moved(
            before, after, "pricehub_price_updates_accepted_total", zone=zone, source="http"
        ) == count
        assert moved(
            before, after, "pricehub_price_updates_accepted_total", zone=zone, source="simulator"
        ) == 0
    assert moved(before, after, "pricehub_price_updates_broadcast_total") == 3
    assert moved(before, after, LATENCY + "_count") == 3
    assert moved(before, after, LATENCY + "_bucket", le="+Inf") == 3
    assert 0 < moved(before, after, LATENCY + "_sum") < 3 * WAIT
    assert moved(before, after, "pricehub_connection_errors_total") == 0
    assert value(after, "pricehub_storage_backend", backend="in-memory") == 1
    assert value(after, "pricehub_storage_backend", backend="redis") == 0
    assert value(after, "pricehub_shutting_down") == 0


async def test_latency_is_observed_per_tick_not_per_delivery(make_client: MakeClient) -> None:
    """The hot path stays free of prometheus calls: a batch fanned out to five clients
    makes at most one observation per price, never one per delivered frame."""
    client = await make_client()
    sockets = [await open_socket(client, "/api/ws/ws/market/spp") for _ in range(5)]
    before = await scrape(client)
    await publish(client, *({"market_zone": "spp", "price": float(i)} for i in range(50)))
    for ws in sockets:
        assert len(await collect_updates(ws, "spp", until_seq=50)) == 50
    after = await scrape(client)
    assert moved(before, after, "pricehub_messages_sent_total") == 5 * 50
    assert 1 <= moved(before, after, LATENCY + "_count") <= 50


async def test_heartbeat_and_rate_limit_closes_are_counted_by_reason(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        heartbeat_interval=0.2, heartbeat_timeout=0.6, client_rate_limit=5.0
    )
    before = await scrape(client)
    silent = await open_socket(client, "/api/ws/ws/market/pjm", autoping=False)
    async with asyncio.timeout(WAIT):
        while (message := await silent.receive()).type is aiohttp.WSMsgType.PING:
            pass  # never answered: the reaper must close it
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 4000

    flooder = await open_socket(client, "/api/ws/ws/market/pjm")
    for _ in range(30):  # burst 10, then 5 rejected in a row: close
        await flooder.send_json({"type": "ping"})
    async with asyncio.timeout(WAIT):
        while (message := await flooder.receive()).type is aiohttp.WSMsgType.TEXT:
            pass  # pongs and rate_limited errors
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 4029

    after = await eventually(
        client, lambda s: moved(before, s, "pricehub_connections_open") == 0
        and moved(before, s, "pricehub_disconnections_total", reason="rate_limit") == 1,
    )
    assert moved(before, after, "pricehub_disconnections_total", reason="heartbeat_timeout") == 1
    assert moved(before, after, "pricehub_disconnections_total", reason="client_close") == 0
    assert moved(before, after, "pricehub_reaper_closes_total") == 1
    assert moved(before, after, "pricehub_reaper_runs_total") >= 1
    assert moved(before, after, "pricehub_client_errors_total", code="rate_limited") >= 1


def raw_websocket_that_never_reads(host: str, port: int, path: str) -> socket.socket:
    """Upgrade a socket with a tiny receive buffer, then leave it unread: the server's
    send buffer for it fills up as it would for a stalled trading UI."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: leave every frame after the headers unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_slow_consumer_is_conflated_then_closed(make_client: MakeClient) -> None:
    client = await make_client(
        send_high_water=4096, send_hard_limit=64 * 1024 * 1024, slow_consumer_timeout=0.3,
        shutdown_grace=1.0,
    )
    before = await scrape(client)
    server = client.server
    sock = await asyncio.to_thread(
        raw_websocket_that_never_reads, str(server.host), int(server.port or 0),
        "/api/ws/ws/market/miso",
    )
    try:
        batch = [{"market_zone": "miso", "price": float(i), "volume": 1.0} for i in range(1000)]
        deadline = time.monotonic() + WAIT
        while value(await scrape(client), "pricehub_slow_consumer_conflations_total") == 0:
            assert time.monotonic() < deadline, "the stalled reader never conflated"
            await publish(client, *batch)
        after = await eventually(
            client, lambda s: moved(before, s, "pricehub_disconnections_total",
                                    reason="slow_consumer") == 1,
        )
    finally:
        sock.close()
    assert moved(before, after, "pricehub_slow_consumer_conflations_total") == 1
    assert moved(before, after, "pricehub_slow_consumer_closes_total") == 1
    assert value(after, "pricehub_slow_consumers") == 0
    assert value(after, "pricehub_connections_open") == 0


async def test_each_app_has_its_own_registry(make_client: MakeClient) -> None:
    first, second = await make_client(), await make_client()
    await publish(first, {"market_zone": "pjm", "price": 1.0})
    one, two = await scrape(first), await scrape(second)
    key = {"zone": "pjm", "source": "http"}
    assert value(one, "pricehub_price_updates_accepted_total", **key) == 1
    assert value(two, "pricehub_price_updates_accepted_total", **key) == 0
    info_one, info_two = info_labels(one), info_labels(two)
    assert info_one["version"] == __version__ == info_two["version"]
    assert info_one["instance_id"] != info_two["instance_id"]


def info_labels(samples: Samples) -> dict[str, str]:
    (labels,) = [dict(labels) for name, labels in samples if name == "pricehub_info"]
    return labels


async def test_openmetrics_when_the_scraper_asks_for_it(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, {"market_zone": "pjm", "price": 1.0})
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await response.text()
    assert text.endswith("# EOF\n")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in openmetrics_families(text)  # type: ignore[no-untyped-call]
        for sample in family.samples
    }
    assert value(samples, "pricehub_price_updates_accepted_total", zone="pjm", source="http") == 1


def require_promtool() -> str:
    """promtool's path; skip without it, except in CI (``CI=true``), where that fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool not installed (Debian package 'prometheus')")
    return promtool


async def test_promtool_finds_nothing_to_complain_about(make_client: MakeClient) -> None:
    promtool = require_promtool()
    client = await make_client()
    ws = await open_socket(client, "/api/ws/ws/market/pjm")
    await ws.send_str("not json")  # a labelled client-error series
    assert (await receive_json(ws))["code"] == "invalid_json"
    await publish(client, {"market_zone": "pjm", "price": 1.0})
    await client.ws_connect("/api/ws/ws/market/atlantis")  # a labelled rejection series
    exposition = await scrape_text(client)
    assert "pricehub_client_errors_total{" in exposition
    assert "pricehub_connections_rejected_total{" in exposition
    assert "\nprocess_open_fds " in exposition  # gathered in a thread, still exported
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=exposition.encode(),
        capture_output=True, timeout=WAIT,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_promtool_check_fails_on_a_bad_exposition() -> None:
    """The check above can fail: promtool does flag convention breaks."""
    promtool = require_promtool()
    bad = b"# HELP pricehub_things Things.\n# TYPE pricehub_things counter\npricehub_things 1\n"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=bad, capture_output=True, timeout=WAIT,
        check=False,
    )
    assert result.returncode != 0 and b"_total" in result.stdout + result.stderr


async def test_every_declared_metric_is_exposed_and_documented(make_client: MakeClient) -> None:
    client = await make_client()
    families = list(text_string_to_metric_families(await scrape_text(client)))
    exposed = {
        family.name for family in families
        # prometheus_client adds the histogram's creation time as a family of its own.
        if family.name.startswith("pricehub_") and not family.name.endswith("_created")
    }
    declared = {spec.name for spec in METRICS} | {LATENCY, DELIVERY_LAG}
    assert exposed == {name.removesuffix("_total") for name in declared}
    page = OPERATIONS_MD.read_text()
    # the tables, plus the gauge only a --workers group exposes
    assert set(re.findall(r"`(pricehub_[a-z_]+)", page)) == declared | {WORKERS_MISSING}
    sample_names = {sample.name for family in families for sample in family.samples}
    documented = sample_names | declared | {WORKERS_MISSING}
    assert set(re.findall(r"pricehub_[a-z_]+", page)) <= documented  # no typos


def test_documented_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = require_promtool()
    (rules,) = re.findall(r"```yaml\n(.*?)```", OPERATIONS_MD.read_text(), flags=re.DOTALL)
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, timeout=WAIT, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


class CountingStorage(MemoryStorage):
    """A backend that counts, as the failover does: it reports ``StorageCounters``."""

    def counters(self) -> StorageCounters:
        return StorageCounters(
            failovers=2, recoveries=1, redis_errors=7, gaps=3, holds=1, held_refusals=4,
            resyncs=5, foreign_messages=6, epoch_changes=8,
        )  # fmt: skip


async def test_storage_counters_are_exported_as_the_backend_reports_them(
    aiohttp_client: Any,
) -> None:
    """From ``Storage.counters()``, typed: not read attribute by attribute (where a
    renamed attribute was exported as 0). A failover seen at the default Redis URL makes
    serving from memory a degradation."""
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", redis_url_explicit=False)
    client = await aiohttp_client(create_app(settings, storage=CountingStorage()))
    samples = await scrape(client)
    exported = {
        name: samples[(f"pricehub_{name}_total", ())]
        for name in ("storage_failovers", "storage_recoveries", "redis_errors", "storage_gaps",
                     "storage_holds", "storage_held_refusals", "storage_resyncs",
                     "storage_foreign_messages", "epoch_changes")
    }  # fmt: skip
    assert exported == {
        "storage_failovers": 2, "storage_recoveries": 1, "redis_errors": 7, "storage_gaps": 3,
        "storage_holds": 1, "storage_held_refusals": 4, "storage_resyncs": 5,
        "storage_foreign_messages": 6, "epoch_changes": 8,
    }  # fmt: skip
    assert samples[("pricehub_redis_required", ())] == 1
