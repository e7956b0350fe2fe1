"""Server-side errors: configuration, and a subscriber refused by its token; and the one
line a failed start prints."""

from __future__ import annotations

from pricehub.server.logs import redact_text
from pricehub.storage.errors import ConfigError
from pricehub.wire.errors import PriceHubError

__all__ = ["AuthError", "ConfigError", "UsageError", "error_line"]

# ``ConfigError`` (a setting is missing, malformed or inconsistent) is defined by the
# storage, which raises it too (an unparsable Redis URL) and must import nothing of the
# server; it is re-exported here, where the settings and the CLI have always found it.


class UsageError(ConfigError):
    """The command line itself is wrong (an unknown option, a flag without its value).

    A ``ConfigError``, so whoever loads settings handles both alike; its line says no
    "configuration error": the message is about the command, not a setting."""


class AuthError(PriceHubError):
    """A subscriber token is missing, invalid, expired (4001) or does not allow a zone (4003)."""

    def __init__(self, close_code: int, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.message = message


def error_line(exc: Exception) -> str:
    """How a start that failed is reported, by the CLI and the runner alike: one line
    for stderr (then exit 2), the same whatever the log format, never a traceback. A
    mistyped URL may carry a password: redacted like every log line."""
    setting = isinstance(exc, ConfigError) and not isinstance(exc, UsageError)
    what = "configuration error: " if setting else ""
    return f"pricehub: {what}{redact_text(str(exc))}"
