"""Subscriber tokens (JWT, PyJWT) and publisher keys.

Tokens are optional: with neither ``--jwt-secret`` nor ``--jwt-public-key`` every
subscriber may read every zone. When on, a token must carry ``exp`` and may restrict the
zones with a ``zones`` claim: absent, every zone; present, it must be a list of strings
(``null`` or anything else is an invalid token, never "every zone"). Publisher keys are
compared in constant time so response timing does not reveal how much of a guessed key
was right.

Algorithm confusion is ruled out by construction: a secret only ever verifies HS256, and
a public key only the one algorithm its type allows (RSA: RS256, P-256: ES256), so a token
cannot pick how it is checked.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import hdrs, web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from pricehub.server.errors import AuthError, ConfigError
from pricehub.server.settings import Settings
from pricehub.wire.codes import CloseCode

__all__ = [
    "FailedAttempts",
    "Grant",
    "TokenVerifier",
    "key_matches",
    "load_public_key",
    "request_token",
]

FAR_FUTURE = 2**53  # Unix seconds; any later expiry is "never" for a socket
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows: ``zones`` (None: every zone) until ``expires_at``
    (Unix seconds; None when auth is off)."""

    zones: frozenset[str] | None
    expires_at: float | None


OPEN_GRANT = Grant(zones=None, expires_at=None)


class TokenVerifier:
    """Checks subscriber tokens against one key and the algorithms that key allows."""

    def __init__(self, *, key: str | PublicKey | None, algorithms: list[str]) -> None:
        self._key = key
        self._algorithms = algorithms

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        if settings.jwt_secret is not None:
            return cls(key=settings.jwt_secret, algorithms=["HS256"])
        if settings.jwt_public_key is not None:
            key = load_public_key(Path(settings.jwt_public_key))
            algorithm = "RS256" if isinstance(key, rsa.RSAPublicKey) else "ES256"
            return cls(key=key, algorithms=[algorithm])
        return cls(key=None, algorithms=[])

    def verify(self, token: str | None) -> Grant:
        """The grant of a token; raise ``AuthError`` (4001) if missing, invalid or expired."""
        if self._key is None:
            return OPEN_GRANT
        if not token:
            raise AuthError(CloseCode.INVALID_TOKEN, "subscriber token required")
        if not token.isascii():  # compact JWTs are base64url; PyJWT would fail to encode
            raise AuthError(CloseCode.INVALID_TOKEN, "invalid token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=self._algorithms, options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CloseCode.INVALID_TOKEN, "token expired") from None
        except jwt.PyJWTError:
            # PyJWTError, not InvalidTokenError: a token signed for another key type
            # raises InvalidKeyError, which is not an InvalidTokenError.
            raise AuthError(CloseCode.INVALID_TOKEN, "invalid token") from None
        _check_numeric_dates(claims)
        # PyJWT checked that ``exp`` is in the future; clamp it because a huge one
        # (signed by a buggy issuer) would overflow a float.
        expires_at = float(min(int(claims["exp"]), FAR_FUTURE))
        return Grant(zones=_zones_claim(claims), expires_at=expires_at)


def request_token(request: web.Request) -> str | None:
    """A subscriber token over HTTP: the ``token`` query (EventSource cannot set headers)
    or ``Authorization: Bearer``. An empty ``token=`` is no token, so it does not hide a
    valid header."""
    token = request.query.get("token")
    if not token:
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    return token or None


def _check_numeric_dates(claims: dict[str, Any]) -> None:
    """``exp``/``nbf``/``iat`` must be JSON numbers (RFC 7519 NumericDate). PyJWT runs
    ``int()`` on them, so a string ``"exp": "9999999999"`` would otherwise pass."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise AuthError(CloseCode.INVALID_TOKEN, f"invalid '{name}' claim")


def _zones_claim(claims: dict[str, Any]) -> frozenset[str] | None:
    """None (every zone) only when the token has no ``zones`` claim: ``"zones": null``
    from a buggy issuer must not widen a grant to every zone."""
    if "zones" not in claims:
        return None
    zones = claims["zones"]
    if not isinstance(zones, list) or not all(isinstance(zone, str) for zone in zones):
        raise AuthError(CloseCode.INVALID_TOKEN, "invalid 'zones' claim")
    return frozenset(zones)


def load_public_key(path: Path) -> PublicKey:
    """An RSA or P-256 public key from a PEM file (a public key or an X.509 certificate)."""
    data = path.read_bytes()
    try:
        key: object = (
            x509.load_pem_x509_certificate(data).public_key()
            if b"BEGIN CERTIFICATE" in data
            else load_pem_public_key(data)
        )
    except ValueError as exc:
        raise ConfigError(f"jwt_public_key: {path}: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"jwt_public_key: {path}: need an RSA (RS256) or P-256 (ES256) key")


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (rotation: several keys).

    Both sides are hashed first so the comparison takes the same time whatever the
    candidate's length, and every key is compared so timing does not reveal which
    matched. ``surrogatepass`` accepts any header text (no 500 on non-UTF-8).
    """
    digest = _digest(candidate)
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, _digest(key))
    return found


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class FailedAttempts:
    """Failed key attempts per remote address, in fixed one-minute windows.

    ``limit`` failures within a window refuse every further attempt from that address
    (429, right key or not) until the window ends: guessing a key costs a minute per
    ``limit`` tries. At most ``max_addresses`` are remembered; a new address evicts the
    one that failed least recently (dropping its count: under a flood of addresses the
    stalest failures are forgotten first, and memory stays bounded).
    """

    WINDOW = 60.0

    def __init__(
        self, *, limit: int, max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.max_addresses = max_addresses
        self._clock = clock
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, remote: str) -> int | None:
        """Whole seconds until ``remote`` may try again, or None when it may now."""
        entry = self._windows.get(remote)
        if entry is None:
            return None
        started, count = entry
        left = started + self.WINDOW - self._clock()
        if left <= 0:
            del self._windows[remote]
            return None
        return max(1, math.ceil(left)) if count >= self.limit else None

    def failed(self, remote: str) -> None:
        """Count one failed attempt of ``remote``."""
        now = self._clock()
        started, count = self._windows.get(remote, (now, 0))
        if started + self.WINDOW <= now:
            started, count = now, 0
        elif remote not in self._windows and len(self._windows) >= self.max_addresses:
            self._windows.popitem(last=False)
        self._windows[remote] = (started, count + 1)
        self._windows.move_to_end(remote)
