"""Typed application keys: the state the handlers and background tasks share."""

from __future__ import annotations

from aiohttp import web

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.policy.admission import ConnectionLimits
from pricehub.server.policy.auth import TokenVerifier
from pricehub.server.publisher import Publisher
from pricehub.server.settings import Settings
from pricehub.server.socket.connection import SendLimits
from pricehub.server.stats import Stats
from pricehub.storage import Storage

__all__ = [
    "BROADCASTER", "INSTANCE_ID", "LIMITS", "PUBLISHER", "SEND_LIMITS", "SETTINGS", "STATS",
    "STORAGE", "VERIFIER",
]

SETTINGS = web.AppKey("settings", Settings)
STORAGE = web.AppKey("storage", Storage)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)
PUBLISHER = web.AppKey("publisher", Publisher)
STATS = web.AppKey("stats", Stats)
LIMITS = web.AppKey("limits", ConnectionLimits)
SEND_LIMITS = web.AppKey("send_limits", SendLimits)  # one per app, shared by every socket
VERIFIER = web.AppKey("verifier", TokenVerifier)
INSTANCE_ID = web.AppKey("instance_id", str)
