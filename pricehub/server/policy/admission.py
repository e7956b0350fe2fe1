"""Who may subscribe: one admission for every transport (``admit``).

In this order: the browser Origin, a connection slot, the token, the zones (known,
allowed by the token, not too many), then anything the transport found wrong with the
request itself (an SSE cursor). The answer is an ``Admitted`` (the token's grant, and
the slot it holds) or a ``Refusal``, whose reason says, through ``wire.refusals``, the
close code, HTTP status and HTTP error code each transport answers with.

The Origin check stops cross-site WebSocket hijacking: a page on another site could
otherwise open a socket with the trader's cookies. Non-browser clients send no Origin
and are not affected (they can forge any header anyway; tokens are what stops them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from pricehub.server.errors import AuthError
from pricehub.server.policy.auth import Grant, TokenVerifier, request_token
from pricehub.server.settings import Settings
from pricehub.wire import messages
from pricehub.wire.refusals import REFUSALS, RefusalCodes, RefusalReason

__all__ = [
    "Admitted", "ConnectionLimits", "Gate", "Refusal", "admit", "normalise_origin",
    "origin_allowed",
]

OVER_CAPACITY = "server over its connection limit"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Admission said no: why, and a message for the client."""

    reason: RefusalReason
    message: str

    @property
    def codes(self) -> RefusalCodes:
        return REFUSALS[self.reason]


@dataclass(frozen=True, slots=True)
class Admitted:
    """Admission said yes: what the token grants, and the remote whose connection slot
    is now taken (``ConnectionLimits.release`` it when the subscriber ends)."""

    grant: Grant
    remote: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Gate:
    """What admission checks a request against.

    :param zones: the zones asked for.
    :param fewest_zones: the fewest a subscriber may ask for (an SSE stream carries at
        least one; a WebSocket may start with none and subscribe later).
    :param most_zones: the most (``--max-zones-per-socket``, or less for a transport).
    :param late: what the transport found wrong with the request (checked last).
    """

    settings: Settings
    limits: ConnectionLimits
    verifier: TokenVerifier
    zones: tuple[str, ...]
    fewest_zones: int
    most_zones: int
    late: Refusal | None = None


def admit(request: web.Request, gate: Gate) -> Admitted | Refusal:
    """Origin, slot, token, zones, then ``gate.late``. A refusal after the slot gives
    it back."""
    if not origin_allowed(request, gate.settings.allowed_origins):
        return Refusal(RefusalReason.ORIGIN, "origin not allowed")
    remote = request.remote or "unknown"
    over = gate.limits.acquire(remote)
    if over is not None:
        return Refusal(RefusalReason(f"limit_{over}"), OVER_CAPACITY)
    try:
        grant = gate.verifier.verify(request_token(request))
    except AuthError as exc:
        refusal: Refusal | None = Refusal(RefusalReason.AUTH, exc.message)
    else:
        refusal = zones_refusal(grant, gate) or gate.late
    if refusal is not None:
        gate.limits.release(remote)
        return refusal
    return Admitted(grant, remote)


def zones_refusal(grant: Grant, gate: Gate) -> Refusal | None:
    """Unknown zones first (the client named something that does not exist), then
    zones the token leaves out, then their number."""
    zones = gate.zones
    zone_set = gate.settings.zone_set  # a frozenset: O(1) per zone at 20,000 zones
    for zone in zones:
        if zone not in zone_set:
            return Refusal(RefusalReason.UNKNOWN_ZONE, messages.unknown_zone_text(zone, zone_set))
    if grant.zones is not None and not grant.zones.issuperset(zones):
        return Refusal(RefusalReason.FORBIDDEN_ZONE, "token does not allow this zone")
    if len(zones) > gate.most_zones:
        return Refusal(RefusalReason.TOO_MANY_ZONES, f"too many zones (at most {gate.most_zones})")
    if len(zones) < gate.fewest_zones:
        message = f"a stream carries {gate.fewest_zones} to {gate.most_zones} zones"
        return Refusal(RefusalReason.TOO_MANY_ZONES, message)
    return None


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case without a trailing slash, so a configured
    ``https://App.example/`` matches what browsers send (``https://app.example``)."""
    return origin.strip().rstrip("/").lower()


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """True for no Origin, an allowed one (``*``: any) or the server's own origin."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or "*" in allowed:
        return True
    origin = normalise_origin(origin)
    if origin in {normalise_origin(entry) for entry in allowed}:
        return True
    # Same origin: the page was served by this very host and port. The Host header is
    # read directly: ``request.host`` falls back to a blocking DNS lookup without one.
    host = request.headers.get(hdrs.HOST)
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False
    return (
        host is not None
        and parts.scheme in {"http", "https"}
        and parts.netloc == host.strip().lower()
    )


class ConnectionLimits:
    """Open sockets in total and per remote address (``--max-connections*``).

    ``by_ip`` only holds addresses with an open socket, so it is bounded by ``total``
    however many addresses come and go.
    """

    def __init__(self, *, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: Counter[str] = Counter()

    def acquire(self, remote: str) -> str | None:
        """Take a slot; returns why not (``"total"`` / ``"per_ip"``) or None on success."""
        if self.open >= self.total:
            return "total"
        if self.by_ip[remote] >= self.per_ip:
            return "per_ip"
        self.open += 1
        self.by_ip[remote] += 1
        return None

    def release(self, remote: str) -> None:
        """Give back a slot taken by a successful ``acquire``."""
        if self.by_ip[remote] <= 0:
            raise RuntimeError(f"release without acquire for {remote!r}")
        self.open -= 1
        self.by_ip[remote] -= 1
        if self.by_ip[remote] == 0:
            del self.by_ip[remote]
