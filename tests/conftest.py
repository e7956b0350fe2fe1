"""Shared fixtures: an in-process pricehub behind a real aiohttp test server."""

from __future__ import annotations

from typing import Any

import pytest

from pricehub.app import create_app
from tests.support import Client, MakeClient, make_settings


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    """``await make_client(**settings_overrides)``: a client of a fresh in-memory server."""

    async def factory(**overrides: Any) -> Client:
        client: Client = await aiohttp_client(create_app(make_settings(**overrides)))
        return client

    return factory
