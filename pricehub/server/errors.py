"""Server-side errors: configuration, and a subscriber refused by its token."""

from __future__ import annotations

from pricehub.wire.errors import PriceHubError

__all__ = ["AuthError", "ConfigError"]


class ConfigError(PriceHubError):
    """A setting is missing, malformed or inconsistent; the message names the setting."""


class AuthError(PriceHubError):
    """A subscriber token is missing, invalid, expired (4001) or does not allow a zone (4003)."""

    def __init__(self, close_code: int, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.message = message
