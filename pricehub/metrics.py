"""Prometheus ``/metrics`` (placeholder: the observability issue fills it in)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["REGISTRY", "add_routes"]

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app[REGISTRY] = CollectorRegistry(auto_describe=True)
    app.router.add_get("/metrics", metrics_handler)
