"""Every exception pricehub raises on purpose lives here.

Keeping them in one module lets callers catch by family (``PriceHubError``) and
keeps the wire error codes of ``PROTOCOL.md`` next to the exceptions that carry them.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "PriceHubError",
    "ProtocolError",
    "StorageError",
    "StorageUnavailable",
    "ValidationError",
]


class PriceHubError(Exception):
    """Base class of all pricehub errors."""


class ConfigError(PriceHubError):
    """A setting is missing, malformed or inconsistent; the message names the setting."""


class ProtocolError(PriceHubError):
    """A client message broke the wire contract.

    ``code`` is one of the contract's error codes (``invalid_json``, ``invalid_message``,
    ``unknown_type``, ``unknown_zone``, ``forbidden_zone``, ``rate_limited``,
    ``message_too_large``); the connection stays open after it is reported.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ValidationError(PriceHubError):
    """A published price (HTTP body or Redis ingest entry) is invalid.

    ``field`` names the offending field so a publisher can fix its payload.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class StorageError(PriceHubError):
    """A storage backend failed an operation."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (connection refused, timeout, ...)."""


class AuthError(PriceHubError):
    """A subscriber token is missing, invalid, expired (4001) or does not allow a zone (4003)."""

    def __init__(self, close_code: int, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.message = message
