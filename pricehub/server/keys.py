"""Typed application keys: the state the handlers and background tasks share.

The value types are imported for the type checker only (each key's type is its
annotation): a module that needs an app key does not import, at run time, every module
whose objects live in the app, and no import cycle runs through this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from pricehub.server.fanout.broadcaster import Broadcaster
    from pricehub.server.fanout.connection import SendLimits
    from pricehub.server.policy.admission import ConnectionLimits
    from pricehub.server.policy.auth import TokenVerifier
    from pricehub.server.publisher import Publisher
    from pricehub.server.settings import Settings
    from pricehub.server.stats import IngestStats, Stats
    from pricehub.storage import Storage

__all__ = [
    "BROADCASTER", "INGEST_STATS", "INSTANCE_ID", "LIMITS", "PUBLISHER", "SEND_LIMITS",
    "SETTINGS", "STATS", "STORAGE", "VERIFIER",
]

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
STORAGE: web.AppKey[Storage] = web.AppKey("storage")
BROADCASTER: web.AppKey[Broadcaster] = web.AppKey("broadcaster")
PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher")
STATS: web.AppKey[Stats] = web.AppKey("stats")
LIMITS: web.AppKey[ConnectionLimits] = web.AppKey("limits")
SEND_LIMITS: web.AppKey[SendLimits] = web.AppKey("send_limits")  # one per app, shared
VERIFIER: web.AppKey[TokenVerifier] = web.AppKey("verifier")
INSTANCE_ID = web.AppKey("instance_id", str)
# Set by the Redis ingest (``ingest.install``) when there is one; the metrics read it.
INGEST_STATS: web.AppKey[IngestStats] = web.AppKey("ingest_stats")
