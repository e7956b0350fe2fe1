"""Placeholder until Redis Stream ingest lands."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

__all__ = ["ingest_ctx"]


async def ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
