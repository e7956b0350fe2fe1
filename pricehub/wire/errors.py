"""Errors of the wire contract: what a client message or a published price did wrong."""

from __future__ import annotations

__all__ = ["MalformedMessage", "PriceHubError", "ProtocolError", "ValidationError"]


class PriceHubError(Exception):
    """Base class of all pricehub errors (server, storage and client alike)."""


class ProtocolError(PriceHubError):
    """A client message broke the wire contract.

    ``code`` is one of the contract's error codes (``ErrorCode``); the connection stays
    open after it is reported.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ValidationError(PriceHubError):
    """A published price (HTTP body or Redis ingest entry) is invalid.

    ``field`` names the offending field so a publisher can fix its payload; ``code`` is
    the error code when the field alone does not decide it (None: the field's), e.g.
    ``unknown_zone`` for a zone in capitals, as every transport answers it.
    """

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


class MalformedMessage(PriceHubError, ValueError):
    """A server message a client cannot read: not JSON, not an object, or a field of the
    wrong type (``pricehub.wire.decode``).

    ``kind`` is the message's ``type`` when it had a readable one (None otherwise). A
    ``ValueError`` too, so code written against the older decoders keeps catching it.
    """

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(f"{kind}: {message}" if kind else message)
        self.kind = kind
        self.message = message
