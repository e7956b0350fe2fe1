"""Helpers for in-process server tests: settings, publishing, reading frames with deadlines."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from pricehub.server.settings import Settings

__all__ = [
    "PUBLISH_KEY",
    "WAIT",
    "Client",
    "MakeClient",
    "collect_updates",
    "eventually",
    "make_settings",
    "missing_tool",
    "publish",
    "receive_json",
    "receive_until",
]

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
PUBLISH_KEY = "test-publish-key"
WAIT = 10.0  # upper bound of every wait; the happy path takes milliseconds


def make_settings(**overrides: Any) -> Settings:
    """In-memory (nothing on disk), no simulator, publishing on: a server that only does
    what a test says."""
    base: dict[str, Any] = {
        "redis_url": None, "data_dir": None, "simulate": False, "publish_key": (PUBLISH_KEY,)
    }
    return Settings(**(base | overrides))


async def publish(
    client: TestClient[Any, Any], *prices: dict[str, Any], key: str = PUBLISH_KEY
) -> list[dict[str, Any]]:
    """POST prices (one object, or a batch) and return the ``accepted`` list."""
    body: Any = prices[0] if len(prices) == 1 else list(prices)
    response = await client.post(
        "/api/ws/ws/broadcast/price", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202, await response.text()
    accepted: list[dict[str, Any]] = (await response.json())["accepted"]
    return accepted


async def receive_json(ws: aiohttp.ClientWebSocketResponse, *, timeout: float = WAIT) -> Any:
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, f"expected text, got {message!r}"
    return orjson.loads(message.data)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = WAIT,
) -> list[dict[str, Any]]:
    """Every message up to and including the first one matching ``predicate``."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = await receive_json(ws, timeout=timeout)
            seen.append(message)
            if predicate(message):
                return seen


async def collect_updates(
    ws: aiohttp.ClientWebSocketResponse, zone: str, *, until_seq: int, timeout: float = WAIT
) -> list[int]:
    """The seqs of ``zone``'s price updates received until ``until_seq`` arrives."""
    messages = await receive_until(
        ws,
        lambda m: m["type"] == "price_update" and m["market_zone"] == zone
        and m["seq"] >= until_seq,
        timeout=timeout,
    )
    return [
        m["seq"] for m in messages if m["type"] == "price_update" and m["market_zone"] == zone
    ]


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = WAIT
) -> None:
    """Wait until ``condition()`` (sync or async) holds, polling state that has no event
    to await (a counter another task or process updates); fails after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            name = getattr(condition, "__name__", "condition")
            raise AssertionError(f"{name} not met within {within} s")
        await asyncio.sleep(0.01)


def missing_tool(message: str) -> NoReturn:
    """A tool a test needs is not installed: a failure under ``CI=true`` (CI must have
    everything), a skip with the reason elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
