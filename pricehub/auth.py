"""Subscriber tokens (JWT, PyJWT) and publisher keys.

Tokens are optional: with neither ``--jwt-secret`` nor ``--jwt-public-key`` every
subscriber may read every zone. When on, a token must carry ``exp`` and may restrict the
zones with a ``zones`` claim (a list). Publisher keys are compared in constant time so
response timing does not reveal how much of a guessed key was right.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import jwt

from pricehub.exceptions import AuthError
from pricehub.settings import Settings

__all__ = ["CLOSE_FORBIDDEN_ZONE", "CLOSE_INVALID_TOKEN", "TokenVerifier", "key_matches"]

CLOSE_INVALID_TOKEN = 4001
CLOSE_FORBIDDEN_ZONE = 4003


class TokenVerifier:
    """Checks subscriber tokens; ``None`` from ``allowed_zones`` means every zone."""

    def __init__(self, *, key: str | None, algorithms: list[str]) -> None:
        self._key = key
        self._algorithms = algorithms

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        if settings.jwt_secret is not None:
            return cls(key=settings.jwt_secret, algorithms=["HS256"])
        if settings.jwt_public_key is not None:
            return cls(key=Path(settings.jwt_public_key).read_text(), algorithms=["RS256", "ES256"])
        return cls(key=None, algorithms=[])

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def allowed_zones(self, token: str | None) -> frozenset[str] | None:
        """The zones a token allows (``None``: all); raise ``AuthError`` (4001) if bad."""
        if self._key is None:
            return None
        if not token:
            raise AuthError(CLOSE_INVALID_TOKEN, "subscriber token required")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=self._algorithms, options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CLOSE_INVALID_TOKEN, "token expired") from None
        except jwt.InvalidTokenError:
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid token") from None
        zones = claims.get("zones")
        if zones is None:
            return None
        if not isinstance(zones, list) or not all(isinstance(zone, str) for zone in zones):
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid 'zones' claim")
        return frozenset(zones)


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (rotation: several keys)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found
