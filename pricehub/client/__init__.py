"""Clients of the pricehub feed: the reconnecting Python client, its backoff, ``tail``.

Imports only ``pricehub.wire`` and aiohttp: nothing of the server or the storage, so a
trading bot can use it without the server's dependencies doing anything.
"""

from pricehub.client.backoff import Backoff, GiveUp, Retry
from pricehub.client.client import (
    ClientError,
    ConnectionState,
    Gap,
    HistoryPage,
    PriceClient,
    PriceUpdate,
    ReconnectFailed,
    Snapshot,
    Status,
    TerminalCloseError,
    ZoneState,
)

__all__ = [
    "Backoff", "ClientError", "ConnectionState", "Gap", "GiveUp", "HistoryPage", "PriceClient",
    "PriceUpdate", "ReconnectFailed", "Retry", "Snapshot", "Status", "TerminalCloseError",
    "ZoneState",
]
