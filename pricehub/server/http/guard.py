"""Who may read what over HTTP: bearer keys (publish and operator), subscriber tokens on
the history endpoint, the operator-only endpoints, and the dashboard's security headers.

Operator endpoints (``stats``, ``connections``, ``/metrics``) are public while the feed
is (no subscriber auth, no ``--operator-key``), as the contract has them. Once the
operator says the feed is private (``--jwt-secret`` / ``--jwt-public-key``) they would
leak who reads which zone, so:

* with ``--operator-key``: they need ``Authorization: Bearer <operator key>`` (401
  without, 403 wrong, 429 after ``--auth-failure-limit`` failures a minute);
* without one: they are closed (403 ``operator_key_required``). Failing closed is the
  safe default: there is no credential that could open them, and the 403 says which
  option does. An ``--operator-key`` alone (no subscriber auth) also protects them.

``health`` stays open for load balancers, with the same status code; without the
operator key its body is only ``status``, ``checks`` and ``timestamp`` while the
endpoints above are protected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from pricehub.server.errors import AuthError
from pricehub.server.http.replies import json_error
from pricehub.server.keys import SETTINGS, VERIFIER
from pricehub.server.policy.auth import FailedAttempts, Grant, key_matches, request_token
from pricehub.server.settings import Settings
from pricehub.wire import paths
from pricehub.wire.codes import HttpErrorCode

__all__ = [
    "DASHBOARD_HEADERS", "KEY_FAILURES", "OPERATOR_PATHS", "bearer_refusal", "guard",
    "install", "operator_allowed", "operators_protected", "subscriber_grant",
]

OPERATOR_PATHS = frozenset({paths.STATS, paths.CONNECTIONS, paths.METRICS})
STATIC_PREFIX = "/static/"
# The dashboard loads only its own files and opens sockets to its own server (or to
# another one named in its URL: ws:/wss:). No inline script or style, no framing
# (clickjacking), no Referer (a token in the page's query string must not leak).
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
KEY_FAILURES = web.AppKey("key_failures", FailedAttempts)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application) -> None:
    app[KEY_FAILURES] = FailedAttempts(limit=app[SETTINGS].auth_failure_limit)
    app.middlewares.append(guard)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Operator paths need the operator key; dashboard responses get security headers."""
    if request.path in OPERATOR_PATHS:
        refusal = operator_refusal(request)
        if refusal is not None:
            return refusal
    response = await handler(request)
    if request.path == paths.DASHBOARD or request.path.startswith(STATIC_PREFIX):
        response.headers.update(DASHBOARD_HEADERS)
    return response


def subscriber_auth_on(settings: Settings) -> bool:
    return settings.jwt_secret is not None or settings.jwt_public_key is not None


def operators_protected(settings: Settings) -> bool:
    return bool(settings.operator_key) or subscriber_auth_on(settings)


def operator_refusal(request: web.Request) -> web.Response | None:
    settings = request.app[SETTINGS]
    if not operators_protected(settings):
        return None
    if not settings.operator_key:
        return json_error(
            403, HttpErrorCode.OPERATOR_KEY_REQUIRED,
            "subscriber auth is on: this endpoint needs --operator-key to be configured",
        )
    refusal = bearer_refusal(request, settings.operator_key, what="operator key")
    return refusal if isinstance(refusal, web.Response) else None


def operator_allowed(request: web.Request) -> bool:
    """True when the operator endpoints are open, or the request carries a right key
    (a wrong one counts as a failed attempt: the reduced health is no key oracle)."""
    settings = request.app[SETTINGS]
    if not operators_protected(settings):
        return True
    if not settings.operator_key or hdrs.AUTHORIZATION not in request.headers:
        return False
    return isinstance(bearer_refusal(request, settings.operator_key, what="operator key"), str)


def bearer_refusal(
    request: web.Request, keys: tuple[str, ...], *, what: str
) -> web.Response | str:
    """429 / 401 / 403 for ``Authorization: Bearer <key>`` against ``keys``; the key when
    it matches. Wrong keys are counted per remote address (``FailedAttempts``)."""
    failures = request.app[KEY_FAILURES]
    remote = request.remote or "unknown"
    wait = failures.retry_after(remote)
    if wait is not None:
        return json_error(
            429, HttpErrorCode.AUTH_RATE_LIMITED, "too many failed key attempts",
            headers={"Retry-After": str(wait)},
        )
    scheme, _, candidate = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    candidate = candidate.strip()
    if scheme.lower() != "bearer" or not candidate:
        return json_error(
            401, HttpErrorCode.UNAUTHORIZED, f"Authorization: Bearer <{what}> required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(candidate, keys):
        failures.failed(remote)
        return json_error(403, HttpErrorCode.FORBIDDEN, f"wrong {what}")
    return candidate


def subscriber_grant(request: web.Request, zone: str) -> web.Response | Grant:
    """The socket rules over HTTP: a token from the ``token`` query or ``Authorization:
    Bearer``; 401 without or invalid, 403 when its ``zones`` claim leaves ``zone`` out."""
    try:
        grant = request.app[VERIFIER].verify(request_token(request))
    except AuthError as exc:
        return json_error(
            401, HttpErrorCode.INVALID_TOKEN, exc.message,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if grant.zones is not None and zone not in grant.zones:
        return json_error(403, HttpErrorCode.FORBIDDEN_ZONE, "token does not allow this zone")
    return grant
