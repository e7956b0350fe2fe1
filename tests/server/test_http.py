"""HTTP endpoints through a real server: publish, history, stats, health, dashboard."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pricehub.server.app import create_app
from pricehub.server.keys import STATS
from pricehub.storage import MemoryStorage
from tests.harness.support import (
    PUBLISH_KEY,
    MakeClient,
    eventually,
    make_settings,
    publish,
    receive_json,
)

PUBLISH = "/api/ws/ws/broadcast/price"
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_publish_single_and_batch_get_consecutive_seqs(make_client: MakeClient) -> None:
    client = await make_client()
    assert await publish(client, {"market_zone": "pjm", "price": 1}) == [
        {"market_zone": "pjm", "seq": 1}
    ]
    accepted = await publish(
        client, {"market_zone": "pjm", "price": 2}, {"market_zone": "ercot", "price": 3},
        {"market_zone": "pjm", "price": 4},
    )
    assert accepted == [{"market_zone": "pjm", "seq": 2}, {"market_zone": "ercot", "seq": 1},
                        {"market_zone": "pjm", "seq": 3}]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Basic abc"}, 401), ({"Authorization": "Bearer nope"}, 403)],
)
async def test_publish_needs_the_right_bearer_key(
    make_client: MakeClient, headers: dict[str, str], status: int
) -> None:
    client = await make_client()
    response = await client.post(PUBLISH, json={"market_zone": "pjm", "price": 1},
                                 headers=headers)
    assert response.status == status
    history = await (await client.get("/api/ws/ws/history/pjm")).json()
    assert history["data"] == []  # nothing was published


async def test_publish_accepts_any_of_several_keys(make_client: MakeClient) -> None:
    client = await make_client(publish_key=("old-key", "new-key"))
    for key in ("old-key", "new-key"):
        response = await client.post(PUBLISH, json={"market_zone": "pjm", "price": 1},
                                     headers={"Authorization": f"Bearer {key}"})
        assert response.status == 202


async def test_publishing_disabled_without_keys_is_403(make_client: MakeClient) -> None:
    client = await make_client(publish_key=())
    response = await client.post(PUBLISH, json={"market_zone": "pjm", "price": 1}, headers=AUTH)
    assert response.status == 403
    assert (await response.json())["error"] == "publishing_disabled"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"market_zone": "pjm"}, "price"),
        ({"market_zone": "atlantis", "price": 1}, "market_zone"),
        ({"market_zone": "pjm", "price": 1, "timestamp": "2026-11-27T15:00:00"}, "timestamp"),
        ([{"market_zone": "pjm", "price": 1}, {"market_zone": "pjm", "price": "x"}], "[1].price"),
        ("just a string", "body"),
    ],
)
async def test_invalid_publish_is_422_naming_the_field_and_publishes_nothing(
    make_client: MakeClient, body: Any, field: str
) -> None:
    client = await make_client()
    response = await client.post(PUBLISH, json=body, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["field"] == field
    assert (await (await client.get("/api/ws/ws/history/pjm")).json())["data"] == []


async def test_invalid_json_body_and_oversized_body(make_client: MakeClient) -> None:
    client = await make_client(max_body_size=1024)
    response = await client.post(PUBLISH, data=b"{nope", headers=AUTH)
    assert response.status == 422
    big = [{"market_zone": "pjm", "price": 1}] * 100
    response = await client.post(PUBLISH, json=big, headers=AUTH)
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        yield b"[" + b'{"market_zone":"pjm","price":1},' * 60
        yield b'{"market_zone":"pjm","price":1}]'

    response = await client.post(PUBLISH, data=chunks(), headers=AUTH)
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


async def test_history_endpoint(make_client: MakeClient) -> None:
    client = await make_client()
    await publish(client, *[{"market_zone": "spp", "price": p} for p in range(5)])
    body = await (await client.get("/api/ws/ws/history/spp?limit=2")).json()
    assert body["market_zone"] == "spp" and [p["seq"] for p in body["data"]] == [4, 5]
    assert len((await (await client.get("/api/ws/ws/history/spp")).json())["data"]) == 5
    assert (await client.get("/api/ws/ws/history/atlantis")).status == 404
    assert (await client.get("/api/ws/ws/history/NOT-A-ZONE")).status == 422
    assert (await client.get("/api/ws/ws/history/spp?limit=zero")).status == 422


async def test_stats_count_connections_and_messages(make_client: MakeClient) -> None:
    client = await make_client()
    first = await client.ws_connect("/api/ws/ws/market/pjm")
    second = await client.ws_connect("/api/ws/ws/prices?zones=pjm,ercot")
    await receive_json(first)
    await receive_json(second)
    await first.send_json({"type": "ping"})
    await receive_json(first)
    await publish(client, {"market_zone": "ercot", "price": 1})
    await receive_json(second)
    stats = await (await client.get("/api/ws/ws/stats")).json()
    assert stats["total_connections"] == 2
    assert stats["connections_by_zone"] == {"pjm": 2, "ercot": 1}
    assert sorted(stats["active_zones"]) == ["ercot", "pjm"]
    assert "cluster" not in stats  # in-memory only
    assert TIMESTAMP.match(stats["timestamp"])
    statistics = stats["statistics"]
    assert statistics == {
        "total_connections": 2, "total_disconnections": 0,
        "total_messages_sent": 4,  # 2 x connection_established, pong, one update
        "total_messages_received": 1, "connection_errors": 0, "active_connections": 2,
        "active_zones": 2, "storage_backend": "in-memory",
    }
    await first.close()
    await second.close()


async def test_health_reports_in_memory_and_healthy(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/api/ws/ws/health")
    assert response.status == 200
    health = await response.json()
    assert health["status"] == "healthy" and health["storage_backend"] == "in-memory"
    assert health["checks"]["redis"] == "disabled" and health["error_rate"] == 0.0
    assert health["active_connections"] == 0 and "statistics" in health
    assert TIMESTAMP.match(health["timestamp"])


async def test_unreachable_redis_at_start_runs_in_memory_and_says_so(
    make_client: MakeClient,
) -> None:
    client = await make_client(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    ws = await client.ws_connect("/api/ws/ws/market/pjm")
    assert (await receive_json(ws))["storage_backend"] == "in-memory"
    stats = await (await client.get("/api/ws/ws/stats")).json()
    assert stats["statistics"]["storage_backend"] == "in-memory"
    health = await (await client.get("/api/ws/ws/health")).json()
    assert health["storage_backend"] == "in-memory"
    assert health["status"] == "degraded" and health["checks"]["redis"] == "unavailable"


async def test_dashboard_and_client_module_are_served(make_client: MakeClient) -> None:
    client = await make_client()
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert "/static/pricehub.js" in await page.text() or "dashboard.js" in await page.text()
    module = await client.get("/static/pricehub.js")
    assert module.status == 200 and "javascript" in module.headers["Content-Type"]


async def test_per_connection_statistics(make_client: MakeClient) -> None:
    client = await make_client()
    first = await client.ws_connect("/api/ws/ws/market/pjm")
    await receive_json(first)
    second = await client.ws_connect("/api/ws/ws/prices?zones=ercot,spp")
    hello = await receive_json(second)
    for _ in range(3):
        await second.send_json({"type": "heartbeat"})
        await receive_json(second)
    body = await (await client.get("/api/ws/ws/connections")).json()
    assert body["total"] == 2
    newest = body["connections"][0]
    assert newest["connection_id"] == hello["connection_id"]
    assert newest["zones"] == ["ercot", "spp"]
    assert (newest["messages_sent"], newest["messages_received"]) == (4, 3)
    assert newest["conflating"] is False and "remote" not in newest
    assert body["connections"][1]["zones"] == ["pjm"]
    one = await (await client.get("/api/ws/ws/connections?limit=1")).json()
    assert len(one["connections"]) == 1
    assert (await client.get("/api/ws/ws/connections?limit=-1")).status == 422


class RegistryBug(MemoryStorage):
    """A storage whose registry write has a bug (not a storage outage)."""

    async def register_instance(self, instance_id: str, snapshot: bytes, *, ttl: float) -> None:
        raise RuntimeError("bug in register_instance")


async def test_a_crashed_background_task_makes_health_unhealthy_and_surfaces() -> None:
    app = create_app(make_settings(), storage=RegistryBug())
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        await eventually(lambda: app[STATS].failed_tasks == ["registry"])
        response = await client.get("/api/ws/ws/health")
        body = await response.json()
        assert response.status == 503 and body["status"] == "unhealthy"
        assert body["checks"]["background"] == "failed: registry"
    finally:
        with pytest.raises(RuntimeError, match="bug in register_instance"):
            await client.close()  # cleanup re-raises the crash instead of hiding it


# --- zone names in capitals (issue 22.6): one code and message on every path ---------

CASE_MESSAGE = 'zone names are lower case: "PJM" (did you mean "pjm"?)'


async def test_a_zone_in_capitals_gets_one_answer_on_every_path(make_client: MakeClient) -> None:
    """Publish, history, SSE and WebSocket all refuse ``PJM`` with ``unknown_zone`` and
    the same message, each in its transport's shape (PROTOCOL.md)."""
    client = await make_client()
    published = await client.post(
        PUBLISH, json=[{"market_zone": "pjm", "price": 1}, {"market_zone": "PJM", "price": 2}],
        headers=AUTH,
    )
    assert published.status == 422
    assert await published.json() == {
        "error": "unknown_zone", "message": CASE_MESSAGE, "field": "[1].market_zone"
    }
    for path in ("/api/ws/ws/history/PJM", "/api/ws/sse/market/PJM",
                 "/api/ws/sse/prices?zones=ercot,PJM"):
        refused = await client.get(path)
        assert refused.status == 404, path
        assert await refused.json() == {"error": "unknown_zone", "message": CASE_MESSAGE}, path
    for path in ("/api/ws/ws/market/PJM", "/api/ws/ws/prices?zones=ercot,PJM"):
        ws = await client.ws_connect(path)
        closing = await ws.receive(timeout=10)
        assert (ws.close_code, closing.extra) == (1008, CASE_MESSAGE), path
    ws = await client.ws_connect("/api/ws/ws/prices?zones=")
    assert (await receive_json(ws))["type"] == "connection_established"
    for message in ({"type": "subscribe", "zones": ["PJM"]},
                    {"type": "request_price_history", "market_zone": "PJM", "limit": 1}):
        await ws.send_json(message)
        error = await receive_json(ws)
        assert (error["type"], error["code"], error["message"]) == (
            "error", "unknown_zone", CASE_MESSAGE
        )
    await ws.close()
